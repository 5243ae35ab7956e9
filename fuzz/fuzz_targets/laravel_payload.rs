//! Laravel's redis broadcaster payloads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    if let Ok(ev) = bts_guru::ingest::redis::decode(&mut buf) {
        assert!(!ev.event.is_empty() && ev.event.len() <= 200);
        // data_json is a JSON string literal.
        assert_eq!(ev.data_json.first(), Some(&b'"'));
    }
});
