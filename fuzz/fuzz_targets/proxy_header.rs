//! PROXY protocol v1/v2 headers, as a trusted load balancer's connection starts.
#![no_main]

use bts_guru::proxy::{parse, Parsed, V1_MAX, V2_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Parsed::Header(h)) => {
            assert!(h.len <= data.len());
            assert!(h.len <= V1_MAX.max(V2_MAX));
            // The header alone parses the same, whatever followed it.
            assert_eq!(parse(&data[..h.len]), Ok(Parsed::Header(h)));
        }
        Ok(Parsed::Incomplete { need }) => {
            assert!(need.is_none_or(|n| n > data.len() && n <= V2_MAX));
        }
        Ok(Parsed::NotProxy) | Err(_) => {}
    }
    // The trusted-proxy walk over arbitrary X-Forwarded-For text.
    if let Ok(text) = std::str::from_utf8(data) {
        let trusted = bts_guru::proxy::Trusted(vec![
            bts_guru::proxy::Cidr::parse("10.0.0.0/8").unwrap(),
        ]);
        let _ = trusted.client("10.0.0.1".parse().unwrap(), Some(text));
    }
});
