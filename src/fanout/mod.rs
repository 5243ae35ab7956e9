//! Broadcast plumbing between producers and shards: each event is framed once
//! (`frame::SharedFrame`) and handed to every shard's bounded inbox (`router`).
//!
//! Never writes to sockets; never looks at subscriptions (that is each shard's business).

pub mod frame;
pub mod router;
