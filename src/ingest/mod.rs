//! Producers of broadcasts from outside the WebSocket port. Today: Laravel's `redis`
//! broadcaster (`redis`). The HTTP API lives with the shards (`shard::http`), since it runs on
//! whichever shard accepted the request.

pub mod cluster;
pub mod positions;
pub mod redis;
