//! HTTP API requests: head, query, body and signature checks together.
#![no_main]

use bts_guru::protocol::auth;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((req, used))) = bts_guru::ws::handshake::parse(data) else {
        return;
    };
    let body = &data[used..];
    let r = auth::verify_api_request(
        "key",
        "secret",
        &req.method,
        &req.path,
        &req.query,
        body,
        1_700_000_000,
    );
    // A request we did not sign can only pass by forging HMAC-SHA256.
    if r.is_ok() {
        let to_sign = auth::api_string_to_sign(&req.method, &req.path, &req.query);
        let sig = req.query_param("auth_signature").unwrap_or_default();
        assert_eq!(
            auth::sign("secret", to_sign.as_bytes()),
            sig.to_ascii_lowercase()
        );
    }
});
