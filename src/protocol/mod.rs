//! The Pusher protocol 7 wire contract: channel names, signatures, client messages, server
//! messages and error codes.
//!
//! **API boundary.** Everything here is someone else's stable contract (Pusher protocol 7 and
//! Reverb's behaviour); change it only to match them more exactly. The module is pure: no I/O,
//! no glommio, no clock (callers pass `now`), so it unit-tests and benches anywhere.

pub mod auth;
pub mod channel;
pub mod depth;
pub mod error;
pub mod inbound;
pub mod members;
pub mod outbound;
pub mod socket_id;

pub use channel::{ChannelKind, ChannelName};
pub use error::PusherError;
pub use socket_id::SocketId;
