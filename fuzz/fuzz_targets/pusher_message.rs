//! Pusher client messages (simd-json, in place), and presence channel_data / sign-in user_data.
#![no_main]

use bts_guru::protocol::{channel, inbound, members};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    if let Ok(inbound::ClientMessage::Subscribe { channel: c, .. }) = inbound::parse(&mut buf) {
        let _ = channel::validate(&c);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = members::parse_channel_data(s, 2048);
        let _ = members::parse_user_data(s);
        let _ = bts_guru::protocol::SocketId::parse(s);
    }
});
