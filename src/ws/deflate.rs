//! permessage-deflate (RFC 7692) the way a broadcast server can afford it: server messages
//! compressed once for every subscriber, either each on its own (`server_no_context_takeover`)
//! or, when the client keeps its window (shared context, [`ACCEPT_CONTEXT`]), also against the
//! channel's previous message (`Deflater::compress_with_dictionary`; which connection may get
//! that form is the shard's tag check, ARCHITECTURE.md "Shared compression context"); and every
//! client message on its own (`client_no_context_takeover`), so one inflater per thread, reset
//! per message, reads them all. Nothing here is kept per connection.
//!
//! `negotiate` reads the client's offers (`Sec-WebSocket-Extensions`) and picks the first one it
//! can honour; `Deflater` and `Inflater` do the (de)compression with `flate2`.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// What the 101 answers when the accepted offer did not limit the server's window.
pub const ACCEPT: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// What the 101 answers when the accepted offer said `server_max_window_bits=15`: an offer with
/// that parameter is accepted only by answering it (RFC 7692 §7.1.2.1).
pub const ACCEPT_WINDOW_15: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15";
/// Shared-context mode's answer (the offer did not demand `server_no_context_takeover`): the
/// client keeps its LZ77 window across server messages, so a message may be sent as a "delta"
/// compressed against the previous compressed message of its channel (`fanout::frame`); client
/// messages still arrive each on its own.
pub const ACCEPT_CONTEXT: &str = "permessage-deflate; client_no_context_takeover";
/// Shared-context mode's answer to an offer with `server_max_window_bits=15`.
pub const ACCEPT_CONTEXT_WINDOW_15: &str =
    "permessage-deflate; client_no_context_takeover; server_max_window_bits=15";

/// An accepted offer: the answer line, and whether the client keeps context (the answer has
/// no `server_no_context_takeover`, so delta frames may be sent to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub line: &'static str,
    pub context: bool,
}

/// The empty stored block a sync flush ends with: removed from every compressed message and put
/// back before inflating one (RFC 7692 §7.2.1, §7.2.2).
pub const TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// DEFLATE level for server messages. Compressed once per event, not per subscriber; chosen in
/// BENCHMARKS.md ("permessage-deflate").
pub const LEVEL: u32 = 6;

/// The answer to a request's `Sec-WebSocket-Extensions` (every such header, joined with `, `):
/// `Some(line)` for the first `permessage-deflate` offer this server can honour, `None` when
/// there is none (the connection goes on without compression; a refusal is no answer at all).
///
/// An offer is declined when it is malformed (a parameter twice, one with a value it may not
/// have or without one it needs, a value out of 8..=15, an unknown parameter; RFC 7692 §7.1) or
/// when it asks for `server_max_window_bits` below 15: frames are compressed once for every
/// subscriber with a 32 KiB window, which a client limited to less could not inflate.
///
/// With `context` (shared-context mode on), an offer that does not demand
/// `server_no_context_takeover` is answered without it ([`ACCEPT_CONTEXT`]).
pub fn negotiate(offers: &str, context: bool) -> Option<Accepted> {
    offers.split(',').find_map(|o| offer(o, context))
}

/// One offer: `permessage-deflate` and its parameters.
fn offer(text: &str, context: bool) -> Option<Accepted> {
    let mut parts = text.split(';');
    let name = parts.next()?.trim();
    if !name.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let (mut server_nct, mut client_nct) = (false, false);
    let mut server_bits: Option<u8> = None;
    let mut client_bits: Option<Option<u8>> = None;
    for param in parts {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
            None => (param.trim(), None),
        };
        match key.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() && !server_nct => server_nct = true,
            "client_no_context_takeover" if value.is_none() && !client_nct => client_nct = true,
            "server_max_window_bits" if server_bits.is_none() => {
                server_bits = Some(window_bits(value?)?);
            }
            "client_max_window_bits" if client_bits.is_none() => {
                client_bits = Some(match value {
                    Some(v) => Some(window_bits(v)?),
                    None => None,
                });
            }
            _ => return None,
        }
    }
    let context = context && !server_nct;
    let line = match (server_bits, context) {
        (None, false) => ACCEPT,
        (Some(15), false) => ACCEPT_WINDOW_15,
        (None, true) => ACCEPT_CONTEXT,
        (Some(15), true) => ACCEPT_CONTEXT_WINDOW_15,
        (Some(_), _) => return None,
    };
    Some(Accepted { line, context })
}

/// A parameter value, its quotes removed (RFC 7692 §7.1: a quoted-string must hold a token).
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').filter(|s| !s.contains('"')),
        None => Some(v),
    }
}

/// A window-bits value: 8..=15, digits only, no leading zero.
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// Compresses whole messages, each on its own: raw DEFLATE, sync-flushed, without the trailing
/// `00 00 ff ff`. One per thread is enough (`fanout::frame` keeps one per thread).
pub struct Deflater {
    c: Compress,
}

impl Default for Deflater {
    fn default() -> Self {
        Deflater {
            c: Compress::new(Compression::new(LEVEL), false),
        }
    }
}

impl Deflater {
    /// Appends `payload` compressed to `out` (no context from earlier messages).
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        self.c.reset();
        self.run(payload, out);
    }

    /// Appends `payload` compressed against `dictionary` (RFC 1951 back-references may reach
    /// into it, as if it were the message before): only a decompressor whose window ends with
    /// exactly `dictionary` inflates it correctly. Sync-flushed, no final block, trailer
    /// removed, like [`Deflater::compress`].
    pub fn compress_with_dictionary(
        &mut self,
        dictionary: &[u8],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) {
        self.c.reset();
        // Only the last 32 KiB of a dictionary can be referenced (the window); zlib keeps
        // exactly those. An error here would be a zlib misuse (a fresh stream always takes one).
        if self.c.set_dictionary(dictionary).is_err() {
            self.c.reset();
        }
        self.run(payload, out);
    }

    fn run(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.reserve(payload.len() / 2 + 64);
        let mut pos = 0;
        loop {
            let before = self.c.total_in();
            // Only the "no progress possible" error exists, and space is made below first.
            let _ = self
                .c
                .compress_vec(&payload[pos..], out, FlushCompress::Sync);
            pos += (self.c.total_in() - before) as usize;
            if pos == payload.len() && out.len() < out.capacity() {
                // The sync flush completed with room to spare: everything is out.
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.len() >= start + TRAILER.len() && out.ends_with(&TRAILER) {
            out.truncate(out.len() - TRAILER.len());
        }
    }
}

/// Why a compressed client message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit (close 1009).
    TooBig,
    /// It is not valid DEFLATE data (close 1007).
    Corrupt,
}

/// Inflates client messages one at a time (`client_no_context_takeover`): one per thread.
pub struct Inflater {
    d: Decompress,
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater {
            d: Decompress::new(false),
        }
    }
}

/// Bytes inflated per step: output grows by at most this much past what is known to be needed.
const INFLATE_STEP: usize = 16 * 1024;

impl Inflater {
    /// Appends the inflated `compressed` (a message without its `00 00 ff ff` trailer) to
    /// `out`, refusing it as soon as it passes `limit` bytes: a small message that inflates to
    /// gigabytes costs at most `limit + INFLATE_STEP` bytes and stops there.
    pub fn inflate(
        &mut self,
        compressed: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        self.d.reset(false);
        let start = out.len();
        let result = self.run(compressed, limit, start, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn run(
        &mut self,
        compressed: &[u8],
        limit: usize,
        start: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        for part in [compressed, &TRAILER[..]] {
            let mut pos = 0;
            loop {
                let produced = out.len() - start;
                if produced > limit {
                    return Err(InflateError::TooBig);
                }
                let room = (limit + 1 - produced).min(INFLATE_STEP);
                let len = out.len();
                out.resize(len + room, 0);
                let (in0, out0) = (self.d.total_in(), self.d.total_out());
                let status = self
                    .d
                    .decompress(&part[pos..], &mut out[len..], FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                let used = (self.d.total_in() - in0) as usize;
                let wrote = (self.d.total_out() - out0) as usize;
                out.truncate(len + wrote);
                pos += used;
                if status == Status::StreamEnd {
                    // A final block (allowed, RFC 7692 §7.2.3): the message ends here.
                    return if out.len() - start > limit {
                        Err(InflateError::TooBig)
                    } else {
                        Ok(())
                    };
                }
                if wrote < room && pos == part.len() {
                    break;
                }
                if used == 0 && wrote == 0 {
                    return Err(InflateError::Corrupt);
                }
            }
        }
        if out.len() - start > limit {
            return Err(InflateError::TooBig);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn negotiate(offers: &str) -> Option<&'static str> {
        let plain = super::negotiate(offers, false).map(|a| a.line);
        // Shared-context mode: the same offers accepted, without server_no_context_takeover
        // unless the offer demanded it.
        let ctx = super::negotiate(offers, true);
        assert_eq!(ctx.is_some(), plain.is_some(), "{offers:?}");
        if let (Some(c), Some(p)) = (ctx, plain) {
            if c.context {
                assert_eq!(c.line, p.replace(" server_no_context_takeover;", ""));
            } else {
                assert_eq!(c.line, p);
            }
        }
        plain
    }

    #[test]
    fn context_is_kept_unless_the_offer_demands_otherwise() {
        let a = super::negotiate("permessage-deflate; client_max_window_bits", true).unwrap();
        assert_eq!((a.line, a.context), (ACCEPT_CONTEXT, true));
        let a = super::negotiate("permessage-deflate; server_no_context_takeover", true).unwrap();
        assert_eq!((a.line, a.context), (ACCEPT, false));
        let a = super::negotiate("permessage-deflate; server_max_window_bits=15", true).unwrap();
        assert_eq!((a.line, a.context), (ACCEPT_CONTEXT_WINDOW_15, true));
        let a = super::negotiate("permessage-deflate", false).unwrap();
        assert_eq!((a.line, a.context), (ACCEPT, false));
    }

    /// A delta inflates correctly with an inflater that kept the predecessor in its window,
    /// and is much smaller than the message on its own.
    #[test]
    fn a_delta_inflates_after_its_predecessor() {
        let m1 = br#"{"event":"match.update","channel":"match.1","data":"{\"home\":{\"name\":\"Arsenal\",\"score\":2},\"away\":{\"name\":\"Chelsea\",\"score\":1},\"minute\":67}"}"#;
        let m2 = br#"{"event":"match.update","channel":"match.1","data":"{\"home\":{\"name\":\"Arsenal\",\"score\":3},\"away\":{\"name\":\"Chelsea\",\"score\":1},\"minute\":68}"}"#;
        let mut d = Deflater::default();
        let (mut c1, mut c2, mut alone) = (Vec::new(), Vec::new(), Vec::new());
        d.compress(m1, &mut c1);
        d.compress_with_dictionary(m1, m2, &mut c2);
        d.compress(m2, &mut alone);
        assert!(
            c2.len() * 2 < alone.len(),
            "{} vs {}",
            c2.len(),
            alone.len()
        );
        // The client's inflater, context kept across messages.
        let mut z = Decompress::new(false);
        let mut out = Vec::with_capacity(4096);
        for (c, m) in [(&c1, &m1[..]), (&c2, &m2[..])] {
            let mut input = c.clone();
            input.extend_from_slice(&TRAILER);
            out.clear();
            z.decompress_vec(&input, &mut out, FlushDecompress::Sync)
                .unwrap();
            assert_eq!(out, m);
        }
    }

    #[test]
    fn offers_browsers_and_ws_send_are_accepted() {
        // Chromium, Firefox, Node's ws.
        assert_eq!(
            negotiate("permessage-deflate; client_max_window_bits"),
            Some(ACCEPT)
        );
        assert_eq!(negotiate("permessage-deflate"), Some(ACCEPT));
        assert_eq!(
            negotiate("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
            Some(ACCEPT)
        );
        assert_eq!(
            negotiate("permessage-deflate; client_max_window_bits=10"),
            Some(ACCEPT)
        );
        assert_eq!(
            negotiate("permessage-deflate; server_max_window_bits=15"),
            Some(ACCEPT_WINDOW_15)
        );
        assert_eq!(
            negotiate("Permessage-Deflate ; Client_Max_Window_Bits = \"12\""),
            Some(ACCEPT)
        );
    }

    #[test]
    fn offers_that_cannot_be_honoured_are_declined_and_the_next_tried() {
        for bad in [
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=015",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits",
            "permessage-deflate; foo",
            "permessage-deflate; client_max_window_bits=\"1\"5\"",
            "x-webkit-deflate-frame",
            "",
            ";;;",
            "garbage\u{1}",
        ] {
            assert_eq!(negotiate(bad), None, "{bad:?}");
        }
        assert_eq!(
            negotiate(
                "permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits"
            ),
            Some(ACCEPT)
        );
        assert_eq!(
            negotiate("x-webkit-deflate-frame, permessage-deflate"),
            Some(ACCEPT)
        );
    }

    #[test]
    fn compressed_messages_end_without_the_trailer_and_inflate_back() {
        let payload = br#"{"event":"match.update","channel":"match.1","data":"{\"home\":1,\"away\":2,\"home\":1}"}"#;
        let mut out = Vec::new();
        Deflater::default().compress(payload, &mut out);
        assert!(!out.ends_with(&TRAILER));
        let mut back = Vec::new();
        Inflater::default()
            .inflate(&out, payload.len(), &mut back)
            .unwrap();
        assert_eq!(back, payload);
        // One byte under: refused.
        assert_eq!(
            Inflater::default().inflate(&out, payload.len() - 1, &mut Vec::new()),
            Err(InflateError::TooBig)
        );
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let big = vec![b'a'; 50 << 20];
        let mut bomb = Vec::new();
        Deflater::default().compress(&big, &mut bomb);
        assert!(bomb.len() < 100 << 10, "{}", bomb.len());
        let mut out = Vec::new();
        assert_eq!(
            Inflater::default().inflate(&bomb, 10_000, &mut out),
            Err(InflateError::TooBig)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        let mut out = Vec::new();
        assert_eq!(
            Inflater::default().inflate(&[0xff, 0xff, 0xff, 0xff, 0x00], 1000, &mut out),
            Err(InflateError::Corrupt)
        );
    }

    proptest! {
        #[test]
        fn round_trip(payload in proptest::collection::vec(any::<u8>(), 0..20_000), json in "[a-z0-9{}\":,]{0,3000}") {
            let mut d = Deflater::default();
            let mut i = Inflater::default();
            for p in [&payload[..], json.as_bytes()] {
                let mut c = Vec::new();
                d.compress(p, &mut c);
                let mut back = Vec::new();
                i.inflate(&c, p.len(), &mut back).unwrap();
                prop_assert_eq!(&back[..], p);
            }
        }

        #[test]
        fn negotiate_never_panics(s in "\\PC{0,200}") {
            let _ = negotiate(&s);
        }

        #[test]
        fn inflate_never_panics_and_respects_the_limit(data in proptest::collection::vec(any::<u8>(), 0..2000), limit in 0usize..5000) {
            let mut out = Vec::new();
            if Inflater::default().inflate(&data, limit, &mut out).is_ok() {
                prop_assert!(out.len() <= limit);
            } else {
                prop_assert!(out.is_empty());
            }
        }
    }
}
