//! permessage-deflate: the extension-header negotiation and the inflate path never panic; an
//! accepted offer is always one of the two answers; inflating never yields more than the limit,
//! and what the server compresses always inflates back.
#![no_main]

use bts_guru::ws::deflate::{negotiate, Deflater, Inflater, ACCEPT, ACCEPT_WINDOW_15};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(a) = negotiate(s) {
            assert!(a == ACCEPT || a == ACCEPT_WINDOW_15);
        }
    }
    let limit = 4096;
    let mut out = Vec::new();
    match Inflater::default().inflate(data, limit, &mut out) {
        Ok(()) => assert!(out.len() <= limit),
        Err(_) => assert!(out.is_empty()),
    }
    let mut c = Vec::new();
    Deflater::default().compress(data, &mut c);
    let mut back = Vec::new();
    Inflater::default().inflate(&c, data.len(), &mut back).unwrap();
    assert_eq!(back, data);
});
