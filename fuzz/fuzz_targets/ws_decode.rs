//! The client frame decoder: never panics, never buffers more than the message limit, and any
//! split of the input into reads yields the same messages as one read.
#![no_main]

use bts_guru::ws::codec::{Decoder, Inbound, Text};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 10_000;

/// Decodes `chunks` as successive reads; the messages (or the first error) it yields.
fn decode(chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, u16> {
    let mut dec = Decoder::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match dec.next(&mut buf, MAX, true) {
                Ok(Some((m, used))) => {
                    match m {
                        Inbound::Text(Text::InBuf(r)) => out.push(buf[r].to_vec()),
                        Inbound::Text(Text::Assembled(v)) => out.push(v),
                        // Compressed (RSV1): the still-compressed bytes, marked.
                        Inbound::Deflated(Text::InBuf(r)) => out.push([b"z:", &buf[r]].concat()),
                        Inbound::Deflated(Text::Assembled(v)) => out.push([&b"z:"[..], &v].concat()),
                        Inbound::Ping(p) => out.push(p),
                        Inbound::Close(code) => out.push(code.unwrap_or(0).to_be_bytes().to_vec()),
                        Inbound::Pong | Inbound::Fragment => {}
                    }
                    buf.drain(..used);
                }
                Ok(None) => break,
                Err(e) => return Err(e.close_code()),
            }
            // An incomplete frame is never allowed to grow past the limit plus a header.
            assert!(
                buf.len() <= MAX + 14 + c.len(),
                "buffered {} bytes",
                buf.len()
            );
        }
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let whole = decode(&[rest]);
    let at = (cut as usize).min(rest.len());
    let split = decode(&[&rest[..at], &rest[at..]]);
    // Same outcome however the bytes arrive (errors compared by close code).
    assert_eq!(whole, split);
});
