//! The HTTP/1.1 request head parser (WebSocket upgrade and HTTP API share it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = bts_guru::ws::handshake::parse(data) {
        assert!(used <= data.len());
        assert!(used <= bts_guru::ws::handshake::MAX_HEAD);
        // No accepted head has an ambiguous framing (RFC 9112 §6.3) or a line not ended by CRLF.
        assert!(!(req.chunked && req.content_length.is_some()));
        let head = &data[..used];
        for (i, &b) in head.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && head[i - 1] == b'\r', "bare LF accepted");
            }
        }
        let _ = req.query_param("protocol");
        if let Some(key) = &req.ws_key {
            let _ = bts_guru::ws::handshake::valid_ws_key(key);
            let _ = bts_guru::ws::handshake::switching_protocols(key);
        }
    }
});
