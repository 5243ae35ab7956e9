//! The chunked transfer coding of HTTP/1.1 request bodies (RFC 9112 §7.1), decoded incrementally.
//!
//! A byte-at-a-time state machine for the framing (chunk-size lines, the CRLF after each chunk,
//! the trailer section) and bulk copies for chunk data: "parse what is buffered, else read more",
//! with every byte of the input consumed until the body ends. Nothing but the decoded body is
//! kept, so neither a long chunk-size line nor an endless trailer section can grow memory; both
//! are bounded and refused. The decoded body is bounded by the caller's limit, checked at each
//! chunk-size line, before that chunk's data is read.
//!
//! No I/O: the caller reads, feeds what it read, and drops what was consumed.

/// Longest chunk-size line accepted: the size, its extensions and the CRLF. Real clients send a
/// few hex digits; 1 KiB leaves room for extensions nobody uses.
pub const MAX_CHUNK_LINE: usize = 1024;
/// Largest trailer section accepted (every field line and the final CRLF), as for a request head.
pub const MAX_TRAILERS: usize = 8 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("malformed chunk size")]
    BadSize,
    #[error("chunk size does not fit in 64 bits")]
    SizeOverflow,
    #[error("chunk-size line longer than 1024 bytes")]
    LineTooLong,
    #[error("malformed chunk extension")]
    BadExtension,
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    #[error("line in chunked framing not ended by CRLF")]
    BareLineEnding,
    #[error("malformed trailer field")]
    BadTrailer,
    #[error("trailer section larger than 8 KiB")]
    TrailersTooLarge,
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
}

impl ChunkError {
    /// The HTTP status that answers it: 413 over the body limit, 431 for oversized trailers
    /// (header fields, RFC 6585 §5), 400 for every framing error.
    pub fn status(self) -> u16 {
        match self {
            ChunkError::TooLarge(_) => 413,
            ChunkError::TrailersTooLarge => 431,
            _ => 400,
        }
    }
}

/// Where `Decoder::feed` stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Every byte fed was consumed; the body goes on.
    More,
    /// The body ended (last chunk and trailer section); bytes after it were not consumed.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size (`any`: at least one read).
    Size {
        any: bool,
    },
    /// Whitespace after the size: only `;` may follow (BWS before a chunk-ext, §7.1.1).
    SizeWs,
    /// Chunk extensions, up to the CR ending the line; never interpreted.
    Ext,
    /// The CR ending a chunk-size line was read: LF must follow.
    SizeLf,
    /// Chunk data still to copy.
    Data {
        left: u64,
    },
    /// After chunk data: CR, then LF, must follow.
    DataCr,
    DataLf,
    /// The start of a trailer line, or of the empty line ending the trailer section.
    TrailerStart,
    /// A trailer field's name (a token, §5.1: no whitespace before the colon).
    TrailerName,
    TrailerValue,
    /// The CR ending a trailer field line was read.
    TrailerLf,
    /// The CR of the empty line ending the body was read.
    EndLf,
    Done,
}

/// Decodes one chunked body. `feed` it what is buffered, as often as needed.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Largest decoded body accepted.
    max_body: usize,
    /// Decoded bytes so far.
    decoded: u64,
    /// The chunk size being read.
    size: u64,
    /// Bytes of the current chunk-size line, or of the whole trailer section, so far.
    line: usize,
}

/// `tchar` of RFC 9110 §5.6.2: what a field name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field value or chunk-ext byte: VCHAR, SP, HTAB or obs-text (RFC 9110 §5.5); no other CTL.
fn is_text(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

impl Decoder {
    pub fn new(max_body: usize) -> Decoder {
        Decoder {
            state: State::Size { any: false },
            max_body,
            decoded: 0,
            size: 0,
            line: 0,
        }
    }

    /// Whether the whole body was decoded.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, appending body bytes to `out` (which never passes the limit).
    /// Returns how many bytes of `input` were consumed: all of them while the body goes on
    /// (`Progress::More`), up to the end of the body once it ends (`Progress::Done`; the rest
    /// is the next request). An error is final: the connection's framing is lost.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, Progress), ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Done {
                return Ok((i, Progress::Done));
            }
            if let State::Data { left } = self.state {
                // Bulk copy: at most what is buffered, and never past the chunk's end.
                let avail = (input.len() - i) as u64;
                let n = left.min(avail) as usize;
                out.extend_from_slice(&input[i..i + n]);
                i += n;
                self.state = if left == n as u64 {
                    State::DataCr
                } else {
                    State::Data {
                        left: left - n as u64,
                    }
                };
                continue;
            }
            self.step(input[i])?;
            i += 1;
        }
        Ok((i, self.progress()))
    }

    fn progress(&self) -> Progress {
        if self.state == State::Done {
            Progress::Done
        } else {
            Progress::More
        }
    }

    /// One byte of framing.
    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        match self.state {
            State::Size { .. } | State::SizeWs | State::Ext | State::SizeLf => {
                self.line += 1;
                if self.line > MAX_CHUNK_LINE {
                    return Err(ChunkError::LineTooLong);
                }
            }
            State::TrailerStart
            | State::TrailerName
            | State::TrailerValue
            | State::TrailerLf
            | State::EndLf => {
                self.line += 1;
                if self.line > MAX_TRAILERS {
                    return Err(ChunkError::TrailersTooLarge);
                }
            }
            _ => {}
        }
        self.state = match self.state {
            // chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF; chunk-size = 1*HEXDIG
            State::Size { any } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    let digit = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(digit))
                        .ok_or(ChunkError::SizeOverflow)?;
                    State::Size { any: true }
                }
                _ if !any => return Err(ChunkError::BadSize),
                b'\r' => {
                    self.check_limit()?;
                    State::SizeLf
                }
                b';' => {
                    self.check_limit()?;
                    State::Ext
                }
                b' ' | b'\t' => {
                    self.check_limit()?;
                    State::SizeWs
                }
                b'\n' => return Err(ChunkError::BareLineEnding),
                _ => return Err(ChunkError::BadSize),
            },
            State::SizeWs => match b {
                b' ' | b'\t' => State::SizeWs,
                b';' => State::Ext,
                // `5 5`, `5 \r\n`: whitespace is only allowed before an extension.
                _ => return Err(ChunkError::BadSize),
            },
            State::Ext => match b {
                b'\r' => State::SizeLf,
                b'\n' => return Err(ChunkError::BareLineEnding),
                _ if is_text(b) => State::Ext,
                _ => return Err(ChunkError::BadExtension),
            },
            State::SizeLf => match b {
                b'\n' => {
                    self.line = 0;
                    if self.size == 0 {
                        // last-chunk: the trailer section follows (§7.1.2).
                        State::TrailerStart
                    } else {
                        let left = self.size;
                        self.decoded += left;
                        self.size = 0;
                        State::Data { left }
                    }
                }
                _ => return Err(ChunkError::BareLineEnding),
            },
            // Never stepped: `feed` copies data itself and stops at `Done`.
            State::Data { .. } | State::Done => return Ok(()),
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(ChunkError::MissingCrlf),
            },
            State::DataLf => match b {
                b'\n' => State::Size { any: false },
                _ => return Err(ChunkError::MissingCrlf),
            },
            // trailer-section = *( field-line CRLF ); then the final CRLF.
            State::TrailerStart => match b {
                b'\r' => State::EndLf,
                b'\n' => return Err(ChunkError::BareLineEnding),
                // A line starting with whitespace is obs-fold (§5.2): refused in requests.
                _ if is_tchar(b) => State::TrailerName,
                _ => return Err(ChunkError::BadTrailer),
            },
            State::TrailerName => match b {
                b':' => State::TrailerValue,
                _ if is_tchar(b) => State::TrailerName,
                _ => return Err(ChunkError::BadTrailer),
            },
            State::TrailerValue => match b {
                b'\r' => State::TrailerLf,
                b'\n' => return Err(ChunkError::BareLineEnding),
                _ if is_text(b) => State::TrailerValue,
                _ => return Err(ChunkError::BadTrailer),
            },
            State::TrailerLf => match b {
                b'\n' => State::TrailerStart,
                _ => return Err(ChunkError::BareLineEnding),
            },
            State::EndLf => match b {
                b'\n' => State::Done,
                _ => return Err(ChunkError::BareLineEnding),
            },
        };
        Ok(())
    }

    /// The chunk size just read must fit in what is left of the body limit: checked before any
    /// of its data is read, so an oversized body is refused without buffering it.
    fn check_limit(&self) -> Result<(), ChunkError> {
        let left = (self.max_body as u64).saturating_sub(self.decoded);
        if self.size > left {
            return Err(ChunkError::TooLarge(self.max_body));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decodes `input` fed at once: the body, the bytes consumed, or the error.
    fn decode(input: &[u8], max: usize) -> Result<(Vec<u8>, usize), ChunkError> {
        Ok(decode_split(input, &[], max)?.expect("the input ended before the body did"))
    }

    /// Decodes `input` fed in pieces cut at `cuts`, draining what each feed consumed, like the
    /// connection's read loop. `None`: the input ended before the body did.
    fn decode_split(
        input: &[u8],
        cuts: &[usize],
        max: usize,
    ) -> Result<Option<(Vec<u8>, usize)>, ChunkError> {
        let mut dec = Decoder::new(max);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let (mut fed, mut consumed) = (0, 0);
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        ends.push(input.len());
        ends.sort_unstable();
        for end in ends {
            buf.extend_from_slice(&input[fed..end.max(fed)]);
            fed = end.max(fed);
            let (n, p) = dec.feed(&buf, &mut out)?;
            assert!(out.len() <= max);
            buf.drain(..n);
            consumed += n;
            if p == Progress::Done {
                return Ok(Some((out, consumed)));
            }
            assert!(buf.is_empty(), "More must consume everything");
        }
        Ok(None)
    }

    #[test]
    fn valid_bodies() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"0\r\n\r\n", b""),
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"2\r\n{}\r\n0\r\n\r\n", b"{}"),
            (b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n", b"abcdef"),
            (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (b"0005\r\nhello\r\n0\r\n\r\n", b"hello"),
            // Extensions, with and without values, quoted, and whitespace before `;`.
            (b"5;foo=bar\r\nhello\r\n0;last\r\n\r\n", b"hello"),
            (b"5 ; name=\"q v\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            // Trailers are read and dropped.
            (
                b"5\r\nhello\r\n0\r\nX-Sum: 1\r\nX-Other:two words\r\n\r\n",
                b"hello",
            ),
        ];
        for (input, body) in cases {
            let (got, n) = decode(input, 1000).unwrap_or_else(|e| {
                panic!("{:?}: {e}", String::from_utf8_lossy(input));
            });
            assert_eq!(&got, body, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(n, input.len());
        }
    }

    #[test]
    fn stops_at_the_end_of_the_body() {
        let input = b"2\r\n{}\r\n0\r\n\r\nPOST /next HTTP/1.1\r\n";
        let (body, n) = decode(input, 100).unwrap();
        assert_eq!(body, b"{}");
        assert_eq!(&input[n..], b"POST /next HTTP/1.1\r\n");
    }

    #[test]
    fn malformed_framing_is_refused() {
        let cases: &[(&[u8], ChunkError)] = &[
            (b"\r\n", ChunkError::BadSize),
            (b"x\r\n", ChunkError::BadSize),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::BadSize),
            (b"-5\r\n", ChunkError::BadSize),
            (b"+5\r\n", ChunkError::BadSize),
            (b" 5\r\n", ChunkError::BadSize),
            (b"5 5\r\n", ChunkError::BadSize),
            (b"5 \r\nhello\r\n0\r\n\r\n", ChunkError::BadSize),
            (b";ext\r\n", ChunkError::BadSize),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::BareLineEnding),
            (b"5\rhello\r\n", ChunkError::BareLineEnding),
            (b"5;a\nhello\r\n", ChunkError::BareLineEnding),
            (b"5;a\x00\r\nhello\r\n", ChunkError::BadExtension),
            (b"5\r\nhelloX\r\n0\r\n\r\n", ChunkError::MissingCrlf),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::MissingCrlf),
            (b"5\r\nhello\rX", ChunkError::MissingCrlf),
            (b"3\r\nhello\r\n", ChunkError::MissingCrlf),
            (b"0\r\n\n", ChunkError::BareLineEnding),
            (b"0\r\n\rX", ChunkError::BareLineEnding),
            (b"0\r\nX-A: 1\n\r\n", ChunkError::BareLineEnding),
            (b"0\r\nX-A: 1\r\n folded\r\n\r\n", ChunkError::BadTrailer),
            (b"0\r\nX-A : 1\r\n\r\n", ChunkError::BadTrailer),
            (b"0\r\n: 1\r\n\r\n", ChunkError::BadTrailer),
            (b"0\r\nX-A: \x01\r\n\r\n", ChunkError::BadTrailer),
            (b"10000000000000000\r\n", ChunkError::SizeOverflow),
            (b"fffffffffffffffffffff\r\n", ChunkError::SizeOverflow),
        ];
        for (input, want) in cases {
            assert_eq!(
                decode(input, 1000).err(),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn the_limit_is_checked_before_the_data() {
        // Exactly at the limit is fine, over it is refused at the size line, data or not.
        assert_eq!(decode(b"4\r\nabcd\r\n0\r\n\r\n", 4).unwrap().0, b"abcd");
        assert_eq!(decode(b"5\r\n", 4).err(), Some(ChunkError::TooLarge(4)));
        assert_eq!(
            decode(b"2\r\nab\r\n3;x\r\n", 4).err(),
            Some(ChunkError::TooLarge(4))
        );
        assert_eq!(
            decode(b"ffffffffffffffff\r\n", 4).err(),
            Some(ChunkError::TooLarge(4))
        );
        assert_eq!(ChunkError::TooLarge(4).status(), 413);
        assert_eq!(ChunkError::TrailersTooLarge.status(), 431);
        assert_eq!(ChunkError::BadSize.status(), 400);
    }

    #[test]
    fn long_lines_and_trailers_are_bounded() {
        // A megabyte of zeros in a size line is refused after the first kilobyte.
        let zeros = vec![b'0'; 1 << 20];
        let mut dec = Decoder::new(100);
        let mut out = Vec::new();
        assert_eq!(dec.feed(&zeros, &mut out), Err(ChunkError::LineTooLong));
        let ext = format!("5;{}\r\n", "a".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            decode(ext.as_bytes(), 100).err(),
            Some(ChunkError::LineTooLong)
        );
        // Up to the limit is fine: 1024 bytes with the CRLF.
        let ok = format!("0;{}\r\n\r\n", "a".repeat(MAX_CHUNK_LINE - 4));
        assert!(decode(ok.as_bytes(), 100).is_ok());
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_TRAILERS + 100 {
            trailers.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(
            decode(&trailers, 100).err(),
            Some(ChunkError::TrailersTooLarge)
        );
    }

    #[test]
    fn truncated_bodies_are_not_done() {
        for input in [
            &b"5\r\nhel"[..],
            b"5\r\nhello\r\n",
            b"0\r\n",
            b"0\r\nX: 1\r\n",
        ] {
            assert_eq!(decode_split(input, &[], 100), Ok(None));
        }
    }

    /// Chunked bodies made of `pieces`, with optional extensions and trailers.
    fn encode(pieces: &[Vec<u8>], ext: bool, trailers: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces.iter().filter(|p| !p.is_empty()) {
            out.extend(format!("{:x}", p.len()).bytes());
            if ext {
                out.extend_from_slice(b" ;n=\"v\"");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        if trailers {
            out.extend_from_slice(b"X-Trailer: yes\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest! {
        /// Any split of a valid body into reads decodes to the same body as one read.
        #[test]
        fn any_split_same_body(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..6),
            ext in any::<bool>(),
            trailers in any::<bool>(),
            cuts in proptest::collection::vec(0usize..400, 0..10),
        ) {
            let input = encode(&pieces, ext, trailers);
            let whole: Vec<u8> = pieces.concat();
            prop_assert_eq!(decode_split(&input, &[], 10_000), Ok(Some((whole.clone(), input.len()))));
            prop_assert_eq!(decode_split(&input, &cuts, 10_000), Ok(Some((whole, input.len()))));
        }

        /// Any input, valid or not, split anyhow, gets the same verdict and the same body as in
        /// one read, and never decodes past the limit.
        #[test]
        fn any_split_same_verdict(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'0'), Just(b'5'), Just(b'a'),
                            Just(b';'), Just(b' '), Just(b':'), Just(b'x'), any::<u8>()],
                0..60),
            cuts in proptest::collection::vec(0usize..60, 0..10),
            max in 0usize..40,
        ) {
            prop_assert_eq!(decode_split(&input, &cuts, max), decode_split(&input, &[], max));
        }
    }
}
