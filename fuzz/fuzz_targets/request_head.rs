//! The HTTP/1.1 request head parser (WebSocket upgrade and HTTP API share it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = bts_guru::ws::handshake::parse(data) {
        assert!(used <= data.len());
        assert!(used <= bts_guru::ws::handshake::MAX_HEAD);
        let _ = req.query_param("protocol");
        if let Some(key) = &req.ws_key {
            let _ = bts_guru::ws::handshake::switching_protocols(key);
        }
    }
});
