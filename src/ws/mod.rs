//! WebSocket (RFC 6455) for a server: the HTTP request head and Upgrade (`handshake`), chunked
//! request bodies (`chunked`), inbound frame decoding with limits and server frame encoding
//! (`codec`), and permessage-deflate (`deflate`: the offer's answer, compression once per
//! message).
//!
//! Knows nothing about Pusher or channels, and does no I/O.

pub mod chunked;
pub mod codec;
pub mod deflate;
pub mod handshake;
