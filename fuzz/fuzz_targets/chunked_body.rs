//! The chunked request-body decoder: any input, cut into reads anywhere, gets the same verdict
//! and the same body as in one read, and never decodes past the limit.
#![no_main]

use bts_guru::ws::chunked::{Decoder, Progress};
use libfuzzer_sys::fuzz_target;

/// Feeds `input` in pieces ending at `cuts`, draining what each feed consumed, like the
/// connection's read loop: the body and bytes consumed when it ended, `Ok(None)` when the input
/// ended first, or the error.
fn run(input: &[u8], cuts: &[usize], max: usize) -> Result<Option<(Vec<u8>, usize)>, u16> {
    let mut dec = Decoder::new(max);
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    let (mut fed, mut consumed) = (0, 0);
    for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        let end = end.clamp(fed, input.len());
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        let (n, progress) = dec.feed(&buf, &mut out).map_err(|e| e.status())?;
        assert!(out.len() <= max, "decoded past the limit");
        assert!(n <= buf.len());
        buf.drain(..n);
        consumed += n;
        if progress == Progress::Done {
            assert!(dec.is_done());
            return Ok(Some((out, consumed)));
        }
        assert!(buf.is_empty(), "More must consume everything");
    }
    Ok(None)
}

fuzz_target!(|data: &[u8]| {
    // The first bytes choose the limit and where reads end; the rest is the body.
    if data.len() < 3 {
        return;
    }
    let max = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let step = usize::from(data[2]).max(1);
    let input = &data[3..];
    let cuts: Vec<usize> = (step..input.len()).step_by(step).collect();
    assert_eq!(run(input, &cuts, max), run(input, &[], max));
});
