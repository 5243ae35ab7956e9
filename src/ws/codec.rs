//! Inbound frame decoding (client → server) and outbound frame encoding (server → client).
//!
//! The decoder is the classic "parse what is buffered, else read more" loop: an incomplete frame
//! is `Ok(None)`, never an error, and nothing is consumed until a whole frame is there. It checks
//! every rule RFC 6455 puts on client frames before buffering a payload, so an oversized or
//! malformed frame is refused from its header alone.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Longest header an unmasked server frame can need: 2 + 8 bytes.
pub const MAX_SERVER_HEADER: usize = 10;
/// Longest header a client frame can have: 2 + 8 + 4 (mask).
pub const MAX_CLIENT_HEADER: usize = 14;

/// WebSocket close codes we send (RFC 6455 §7.4.1).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
}

/// A client broke RFC 6455; the connection is closed with `close_code()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("client frame is not masked")]
    Unmasked,
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode")]
    ReservedOpcode,
    #[error("control frame is fragmented or longer than 125 bytes")]
    BadControlFrame,
    #[error("continuation frame without a message to continue, or a new message inside one")]
    BadContinuation,
    #[error("binary messages are not supported")]
    Binary,
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("message is larger than the app's maximum message size")]
    TooBig,
    #[error("malformed close frame")]
    BadClose,
    #[error("compressed message is not valid DEFLATE data")]
    BadDeflate,
}

impl WsError {
    pub fn close_code(self) -> u16 {
        match self {
            WsError::Binary => close::UNSUPPORTED_DATA,
            WsError::InvalidUtf8 | WsError::BadDeflate => close::INVALID_PAYLOAD,
            WsError::TooBig => close::MESSAGE_TOO_BIG,
            _ => close::PROTOCOL_ERROR,
        }
    }
}

/// Where a complete text message is: in the read buffer (the common single-frame case, no copy)
/// or reassembled from fragments.
#[derive(Debug, PartialEq, Eq)]
pub enum Text {
    /// Payload range inside the buffer passed to `Decoder::next`, already unmasked.
    InBuf(std::ops::Range<usize>),
    Assembled(Vec<u8>),
}

impl Text {
    /// The message's bytes, given the buffer `Decoder::next` was handed.
    pub fn bytes<'a>(&'a self, buf: &'a [u8]) -> &'a [u8] {
        match self {
            Text::InBuf(r) => &buf[r.clone()],
            Text::Assembled(v) => v,
        }
    }
}

/// One complete thing the client said.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Text(Text),
    /// A text message compressed with permessage-deflate (RSV1 on its first frame): still
    /// compressed, without the `00 00 ff ff` trailer; UTF-8 is checked once it is inflated.
    Deflated(Text),
    Ping(Vec<u8>),
    Pong,
    /// A close frame; `None` when it carried no code (we answer 1000 then).
    Close(Option<u16>),
    /// A non-final fragment was taken into the decoder; nothing to act on yet.
    Fragment,
}

/// Reassembles messages from client frames. Holds only the fragments of an unfinished message.
#[derive(Debug, Default)]
pub struct Decoder {
    /// A fragmented message so far; `None` outside one. Boxed: every connection's session
    /// holds a decoder, and fragmented messages are rare.
    fragments: Option<Box<Fragments>>,
}

#[derive(Debug, Default)]
struct Fragments {
    data: Vec<u8>,
    /// Compressed (RSV1 on its first frame).
    compressed: bool,
}

impl Decoder {
    /// Decodes the next frame at the front of `buf`. Returns what it found and how many bytes of
    /// `buf` it used; `Ok(None)` means "read more" (nothing used). `max_message` bounds a
    /// message's payload, summed over its fragments (compressed messages: their compressed
    /// size here, their inflated size where they are inflated). Payloads are unmasked in place.
    /// `deflate`: permessage-deflate was negotiated, so RSV1 may mark a message's first frame.
    pub fn next(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        deflate: bool,
    ) -> Result<Option<(Inbound, usize)>, WsError> {
        let Some((hdr, len, hdr_len)) = parse_header(buf)? else {
            return Ok(None);
        };
        let mask = hdr.mask.ok_or(WsError::Unmasked)?;
        // RFC 7692 §6.1: RSV1 only on the first frame of a data message, only when negotiated.
        let rsv1_ok = deflate && matches!(hdr.opcode, OpCode::Data(Data::Text));
        if (hdr.rsv1 && !rsv1_ok) || hdr.rsv2 || hdr.rsv3 {
            return Err(WsError::ReservedBits);
        }
        match hdr.opcode {
            OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                return Err(WsError::ReservedOpcode)
            }
            OpCode::Data(Data::Binary) => return Err(WsError::Binary),
            OpCode::Control(_) if !hdr.is_final || len > 125 => {
                return Err(WsError::BadControlFrame)
            }
            OpCode::Control(_) => {}
            OpCode::Data(_) => {
                let so_far = self.fragments.as_ref().map_or(0, |f| f.data.len()) as u64;
                if so_far + len > max_message as u64 {
                    return Err(WsError::TooBig);
                }
            }
        }
        // Fits in usize: bounded by max_message or 125 above.
        let len = len as usize;
        if buf.len() - hdr_len < len {
            return Ok(None);
        }
        let (start, end) = (hdr_len, hdr_len + len);
        unmask(&mut buf[start..end], mask);
        let found = match hdr.opcode {
            OpCode::Control(Control::Ping) => Inbound::Ping(buf[start..end].to_vec()),
            OpCode::Control(Control::Pong) => Inbound::Pong,
            OpCode::Control(Control::Close) => Inbound::Close(close_code(&buf[start..end])?),
            OpCode::Data(Data::Text) => {
                if self.fragments.is_some() {
                    return Err(WsError::BadContinuation);
                }
                if hdr.is_final && hdr.rsv1 {
                    Inbound::Deflated(Text::InBuf(start..end))
                } else if hdr.is_final {
                    std::str::from_utf8(&buf[start..end]).map_err(|_| WsError::InvalidUtf8)?;
                    Inbound::Text(Text::InBuf(start..end))
                } else {
                    self.fragments = Some(Box::new(Fragments {
                        data: buf[start..end].to_vec(),
                        compressed: hdr.rsv1,
                    }));
                    Inbound::Fragment
                }
            }
            OpCode::Data(Data::Continue) => {
                let frags = self.fragments.as_mut().ok_or(WsError::BadContinuation)?;
                frags.data.extend_from_slice(&buf[start..end]);
                if hdr.is_final {
                    let Fragments {
                        data: msg,
                        compressed,
                    } = *self.fragments.take().unwrap_or_default();
                    if compressed {
                        Inbound::Deflated(Text::Assembled(msg))
                    } else {
                        std::str::from_utf8(&msg).map_err(|_| WsError::InvalidUtf8)?;
                        Inbound::Text(Text::Assembled(msg))
                    }
                } else {
                    Inbound::Fragment
                }
            }
            // Refused above.
            OpCode::Data(_) | OpCode::Control(_) => return Err(WsError::ReservedOpcode),
        };
        Ok(Some((found, end)))
    }
}

/// Parses a frame header without consuming: `(header, payload length, header length)`.
fn parse_header(buf: &[u8]) -> Result<Option<(FrameHeader, u64, usize)>, WsError> {
    let mut cur = Cursor::new(buf);
    match FrameHeader::parse(&mut cur) {
        Ok(Some((hdr, len))) => Ok(Some((hdr, len, cur.position() as usize))),
        Ok(None) => Ok(None),
        // tungstenite's only reachable error on an in-memory cursor is a reserved opcode.
        Err(_) => Err(WsError::ReservedOpcode),
    }
}

/// RFC 6455 §5.3: XOR with the 4-byte key, cycling.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// The status code in a close frame's payload, checked against RFC 6455 §7.4.
fn close_code(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::BadClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid || std::str::from_utf8(&payload[2..]).is_err() {
                return Err(WsError::BadClose);
            }
            Ok(Some(code))
        }
    }
}

/// RSV1 in a frame's first byte: the message is compressed (permessage-deflate, RFC 7692 §6).
/// `encode_header(RSV1 | OP_TEXT, ..)` writes a compressed text frame's header.
pub const RSV1: u8 = 0x40;

/// Writes the header of an unmasked, final server frame carrying `len` payload bytes into `out`,
/// returning its length. RFC 6455 §5.1: servers never mask. `opcode` may carry `RSV1`.
pub fn encode_header(opcode: u8, len: usize, out: &mut [u8; MAX_SERVER_HEADER]) -> usize {
    out[0] = 0x80 | opcode;
    match len {
        0..=125 => {
            out[1] = len as u8;
            2
        }
        126..=0xFFFF => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    }
}

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A whole server frame (header + payload) in a new buffer. For replies to one connection;
/// broadcasts use `fanout::frame`, which avoids even this copy.
pub fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut hdr = [0u8; MAX_SERVER_HEADER];
    let n = encode_header(opcode, payload.len(), &mut hdr);
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(&hdr[..n]);
    out.extend_from_slice(payload);
    out
}

/// The payload of an unmasked frame built by this module (header skipped).
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let hdr = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(hdr..).unwrap_or_default()
}

/// A close frame with a status code and a reason, the reason cut to fit the 125-byte limit on
/// control frames (at a char boundary).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    server_frame(OP_CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A masked client frame, as a browser would send it.
    fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let start = out.len();
        out.extend_from_slice(payload);
        unmask(&mut out[start..], mask);
        out
    }

    fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<Inbound>, WsError> {
        decode_with(bytes, max, false)
    }

    fn decode_with(bytes: &[u8], max: usize, deflate: bool) -> Result<Vec<Inbound>, WsError> {
        let mut buf = bytes.to_vec();
        let mut dec = Decoder::default();
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some((m, used)) = dec.next(&mut buf[pos..], max, deflate)? {
            let m = match m {
                Inbound::Text(Text::InBuf(r)) => {
                    Inbound::Text(Text::Assembled(buf[pos + r.start..pos + r.end].to_vec()))
                }
                Inbound::Deflated(Text::InBuf(r)) => {
                    Inbound::Deflated(Text::Assembled(buf[pos + r.start..pos + r.end].to_vec()))
                }
                Inbound::Fragment => {
                    pos += used;
                    continue;
                }
                m => m,
            };
            out.push(m);
            pos += used;
        }
        Ok(out)
    }

    #[test]
    fn rsv1_marks_compressed_messages_only_when_negotiated() {
        let m = [1, 2, 3, 4];
        let one = client_frame(0xC1, b"\xff\x00z", m);
        // Not negotiated: a protocol error.
        assert_eq!(decode_with(&one, 100, false), Err(WsError::ReservedBits));
        // Negotiated: handed on still compressed (not checked as UTF-8 here).
        assert_eq!(
            decode_with(&one, 100, true),
            Ok(vec![Inbound::Deflated(Text::Assembled(
                b"\xff\x00z".to_vec()
            ))])
        );
        // Fragmented: RSV1 on the first frame marks the whole message.
        let mut frags = client_frame(0x41, b"ab", m);
        frags.extend(client_frame(0x80, b"cd", m));
        assert_eq!(
            decode_with(&frags, 100, true),
            Ok(vec![Inbound::Deflated(Text::Assembled(b"abcd".to_vec()))])
        );
        // RSV1 on a continuation, a control frame, or with RSV2: refused.
        let mut bad = client_frame(0x01, b"ab", m);
        bad.extend(client_frame(0xC0, b"cd", m));
        assert_eq!(decode_with(&bad, 100, true), Err(WsError::ReservedBits));
        assert_eq!(
            decode_with(&client_frame(0xC9, b"", m), 100, true),
            Err(WsError::ReservedBits)
        );
        assert_eq!(
            decode_with(&client_frame(0xE1, b"a", m), 100, true),
            Err(WsError::ReservedBits)
        );
        // The compressed size is held to the limit too.
        assert_eq!(
            decode_with(&client_frame(0xC1, &[0; 101], m), 100, true),
            Err(WsError::TooBig)
        );
    }

    #[test]
    fn header_matches_tungstenite() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20] {
            let mut ours = [0u8; MAX_SERVER_HEADER];
            let n = encode_header(OP_TEXT, len, &mut ours);
            let mut theirs = Vec::new();
            FrameHeader {
                opcode: OpCode::Data(Data::Text),
                ..FrameHeader::default()
            }
            .format(len as u64, &mut theirs)
            .unwrap();
            assert_eq!(&ours[..n], &theirs[..], "len {len}");
        }
    }

    #[test]
    fn text_ping_close() {
        let mut bytes = client_frame(0x81, b"hello", [1, 2, 3, 4]);
        bytes.extend(client_frame(0x89, b"p", [9, 9, 9, 9]));
        bytes.extend(client_frame(0x88, &[0x03, 0xE8, b'b'], [5, 6, 7, 8]));
        assert_eq!(
            decode_all(&bytes, 100).unwrap(),
            vec![
                Inbound::Text(Text::Assembled(b"hello".to_vec())),
                Inbound::Ping(b"p".to_vec()),
                Inbound::Close(Some(1000)),
            ]
        );
    }

    #[test]
    fn fragmented_with_interleaved_ping() {
        let mut bytes = client_frame(0x01, b"hel", [1, 2, 3, 4]);
        bytes.extend(client_frame(0x89, b"", [1, 1, 1, 1]));
        bytes.extend(client_frame(0x00, b"lo ", [4, 3, 2, 1]));
        bytes.extend(client_frame(0x80, "wörld".as_bytes(), [7, 7, 7, 7]));
        assert_eq!(
            decode_all(&bytes, 100).unwrap(),
            vec![
                Inbound::Ping(vec![]),
                Inbound::Text(Text::Assembled("hello wörld".as_bytes().to_vec())),
            ]
        );
    }

    #[test]
    fn violations() {
        let unmasked = [0x81, 0x02, b'h', b'i'];
        assert_eq!(decode_all(&unmasked, 100), Err(WsError::Unmasked));
        let reserved = client_frame(0x83, b"x", [1, 2, 3, 4]);
        assert_eq!(decode_all(&reserved, 100), Err(WsError::ReservedOpcode));
        let big_ping = client_frame(0x89, &[0u8; 126], [1, 2, 3, 4]);
        assert_eq!(decode_all(&big_ping, 1000), Err(WsError::BadControlFrame));
        let frag_ping = client_frame(0x09, b"", [1, 2, 3, 4]);
        assert_eq!(decode_all(&frag_ping, 1000), Err(WsError::BadControlFrame));
        let bad_utf8 = client_frame(0x81, &[0xff, 0xfe], [1, 2, 3, 4]);
        assert_eq!(decode_all(&bad_utf8, 100), Err(WsError::InvalidUtf8));
        let binary = client_frame(0x82, b"x", [1, 2, 3, 4]);
        assert_eq!(decode_all(&binary, 100), Err(WsError::Binary));
        let rsv = client_frame(0xC1, b"x", [1, 2, 3, 4]);
        assert_eq!(decode_all(&rsv, 100), Err(WsError::ReservedBits));
        let lone_cont = client_frame(0x80, b"x", [1, 2, 3, 4]);
        assert_eq!(decode_all(&lone_cont, 100), Err(WsError::BadContinuation));
        let bad_close = client_frame(0x88, &[0x03, 0xED], [1, 2, 3, 4]); // 1005 is reserved
        assert_eq!(decode_all(&bad_close, 100), Err(WsError::BadClose));
        let mut frags = client_frame(0x01, &[b'a'; 60], [1, 2, 3, 4]);
        frags.extend(client_frame(0x80, &[b'a'; 60], [1, 2, 3, 4]));
        assert_eq!(decode_all(&frags, 100), Err(WsError::TooBig));
        // Refused from the header alone: 1 MB declared, 14 bytes present.
        let mut huge = client_frame(0x81, &[b'a'; 1 << 20], [1, 2, 3, 4]);
        huge.truncate(14);
        assert_eq!(decode_all(&huge, 10_000), Err(WsError::TooBig));
    }

    #[test]
    fn close_frame_fits_control_limit() {
        let f = close_frame(4100, &"é".repeat(200));
        assert!(f.len() <= 2 + 125);
        assert_eq!(&f[2..4], &4100u16.to_be_bytes());
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    proptest! {
        /// Any split of the input into reads yields the same messages as one read.
        #[test]
        fn any_split_same_messages(
            msgs in proptest::collection::vec("[a-zé0-9 ]{0,300}", 1..6),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let mut bytes = Vec::new();
            for m in &msgs {
                bytes.extend(client_frame(0x81, m.as_bytes(), [0xA, 0xB, 0xC, 0xD]));
            }
            let whole = decode_all(&bytes, 10_000).unwrap();
            // Feed the same bytes in chunks, like reads from a socket would.
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort();
            let mut dec = Decoder::default();
            let mut buf: Vec<u8> = Vec::new();
            let mut got = Vec::new();
            let mut fed = 0;
            for c in cuts {
                buf.extend_from_slice(&bytes[fed..c]);
                fed = c;
                while let Some((m, used)) = dec.next(&mut buf, 10_000, false).unwrap() {
                    if let Inbound::Text(Text::InBuf(r)) = m {
                        got.push(Inbound::Text(Text::Assembled(buf[r].to_vec())));
                    }
                    buf.drain(..used);
                }
            }
            prop_assert_eq!(got, whole);
        }
    }
}
