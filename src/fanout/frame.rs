//! Builds the one WebSocket frame every subscriber of a channel is sent.

use std::cell::RefCell;

use bytes::Bytes;

use crate::protocol::outbound;
use crate::ws::codec::{encode_header, MAX_SERVER_HEADER, OP_TEXT, RSV1};
use crate::ws::deflate::Deflater;

thread_local! {
    /// One compressor per thread (shards, the ingest thread), reset for every frame: a frame is
    /// compressed on its own or against a dictionary given for it (a delta), so nothing is kept
    /// between frames.
    static DEFLATER: RefCell<Deflater> = RefCell::new(Deflater::default());
}

/// A complete, unmasked WebSocket text frame carrying one Pusher event. Built once per event and
/// channel per node; every recipient is sent these exact bytes, so the payload is never copied
/// per subscriber (possible because server frames are unmasked, and compressed once for every
/// compressing subscriber: `deflated`). Where its payload (the event JSON) starts is kept from
/// building it, so the cluster gets the JSON without the frame being parsed again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedFrame {
    /// The whole frame: header, then payload.
    pub bytes: Bytes,
    /// Where the payload starts in `bytes` (the header's length).
    payload_at: usize,
}

impl SharedFrame {
    /// `{"event":E,"channel":C,"data":D}` framed, where `data_json` is the event's data already
    /// escaped as a JSON string literal (escape it once per event with
    /// [`outbound::push_json_str`], then build one frame per channel).
    ///
    /// Serializes after `MAX_SERVER_HEADER` bytes of headroom, then writes the real header
    /// right-aligned into the headroom, so the payload is written exactly once.
    pub fn event(event: &str, channel: &str, data_json: &[u8]) -> SharedFrame {
        let mut buf = Vec::with_capacity(
            MAX_SERVER_HEADER + 40 + event.len() + channel.len() + data_json.len(),
        );
        buf.resize(MAX_SERVER_HEADER, 0);
        outbound::channel_event(&mut buf, event, channel, data_json);
        Self::finish(buf)
    }

    /// A frame for one event that is not built from parts: client events relay the client's
    /// JSON, and internal events and other nodes' events arrive as complete JSON.
    pub fn text(json: &[u8]) -> SharedFrame {
        let bytes = Bytes::from(crate::ws::codec::server_frame(
            crate::ws::codec::OP_TEXT,
            json,
        ));
        SharedFrame {
            payload_at: bytes.len() - json.len(),
            bytes,
        }
    }

    /// This frame's event with one more top-level member, `"name":"value"`, added last (for
    /// a positioned channel: its position). One copy of the payload per event and node, never
    /// per subscriber. `name` and `value` must need no JSON escaping. A payload that is not a
    /// JSON object is returned unchanged.
    pub fn with_member(&self, name: &str, value: &str) -> SharedFrame {
        let p = self.payload();
        if p.last() != Some(&b'}') || p.len() < 2 {
            return self.clone();
        }
        let mut buf =
            Vec::with_capacity(MAX_SERVER_HEADER + p.len() + name.len() + value.len() + 8);
        buf.resize(MAX_SERVER_HEADER, 0);
        buf.extend_from_slice(&p[..p.len() - 1]);
        buf.extend_from_slice(b",\"");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\":\"");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\"}");
        Self::finish(buf)
    }

    /// Frames a text payload that was written after `MAX_SERVER_HEADER` bytes of headroom.
    fn finish(mut buf: Vec<u8>) -> SharedFrame {
        let mut hdr = [0u8; MAX_SERVER_HEADER];
        let n = encode_header(OP_TEXT, buf.len() - MAX_SERVER_HEADER, &mut hdr);
        let start = MAX_SERVER_HEADER - n;
        buf[start..MAX_SERVER_HEADER].copy_from_slice(&hdr[..n]);
        SharedFrame {
            bytes: Bytes::from(buf).slice(start..),
            payload_at: n,
        }
    }

    /// The same message as a permessage-deflate frame (RFC 7692): RSV1 set, the payload as raw
    /// DEFLATE, sync-flushed, its trailing `00 00 ff ff` removed, compressed without context so
    /// that every subscriber that negotiated compression can be sent these same bytes. Built once
    /// per event and channel (`node::Shared::deliver`), beside the plain frame. `None` when
    /// compressing would not make it smaller.
    pub fn deflated(&self) -> Option<Bytes> {
        let mut buf = Vec::new();
        let start = self.deflate_into(&mut buf)?;
        Some(Bytes::from(buf).slice(start..))
    }

    /// Appends the compressed frame to `buf`; returns where it starts, or `None` (and `buf`
    /// as it was) when compressing does not make the message smaller.
    fn deflate_into(&self, buf: &mut Vec<u8>) -> Option<usize> {
        let payload = self.payload();
        let at = buf.len();
        buf.reserve(MAX_SERVER_HEADER + payload.len() / 2 + 64);
        buf.resize(at + MAX_SERVER_HEADER, 0);
        DEFLATER.with(|d| d.borrow_mut().compress(payload, buf));
        let len = buf.len() - at - MAX_SERVER_HEADER;
        if len >= payload.len() {
            buf.truncate(at);
            return None;
        }
        let mut hdr = [0u8; MAX_SERVER_HEADER];
        let n = encode_header(RSV1 | OP_TEXT, len, &mut hdr);
        let start = at + MAX_SERVER_HEADER - n;
        buf[start..start + n].copy_from_slice(&hdr[..n]);
        Some(start)
    }

    /// The frame for the shards: with `compress`, its compressed form too, in the same buffer
    /// (compressed here, once for every compressing subscriber of every shard).
    pub fn framed(self, compress: bool) -> Framed {
        self.framed_with(compress, None::<fn(Bytes) -> FrameContext>)
    }

    /// [`SharedFrame::framed`], in shared-context mode: when the message is compressed, `ctx`
    /// is called with its payload (to remember it as its channel's last compressed message)
    /// and answers this message's tag (unique on the node, non-zero) and its channel's
    /// previous compressed message (its tag and its plain payload, exactly as clients received
    /// it) if one is known. The frame then carries the tags, and a third form when it is
    /// smaller than the independent one: the "delta", compressed with the predecessor's payload
    /// as preset dictionary, valid only for a connection whose last compressed message was
    /// that predecessor (ARCHITECTURE.md, "Shared compression context").
    pub fn framed_with<F>(self, compress: bool, ctx: Option<F>) -> Framed
    where
        F: FnOnce(Bytes) -> FrameContext,
    {
        let plain_len = self.bytes.len();
        if compress {
            let mut buf = Vec::with_capacity(plain_len * 3 / 2 + 3 * MAX_SERVER_HEADER + 32);
            buf.extend_from_slice(&self.bytes);
            if let Some(at) = self.deflate_into(&mut buf) {
                let mut deflated_at = at as u32;
                if let Some(ctx) = ctx {
                    let (tag, pred) = ctx(self.bytes.slice(self.payload_at..));
                    let independent = buf.len() - at;
                    let mut delta_at = 0u32;
                    let mut pred_tag = 0u64;
                    if let Some((ptag, dict)) = pred {
                        if let Some(d) = self.delta_into(&dict, independent, &mut buf) {
                            delta_at = d as u32;
                            pred_tag = ptag;
                        }
                    }
                    buf.extend_from_slice(&tag.to_le_bytes());
                    buf.extend_from_slice(&pred_tag.to_le_bytes());
                    buf.extend_from_slice(&delta_at.to_le_bytes());
                    deflated_at |= CTX_BIT;
                }
                return Framed {
                    bytes: Bytes::from(buf),
                    plain_len: plain_len as u32,
                    deflated_at,
                };
            }
        }
        Framed {
            bytes: self.bytes,
            plain_len: plain_len as u32,
            deflated_at: 0,
        }
    }

    /// Appends the delta frame (the payload compressed against `dict`) to `buf` when it is
    /// shorter than `independent` bytes (the independent frame's length); returns where it
    /// starts, or `None` and `buf` as it was.
    fn delta_into(&self, dict: &[u8], independent: usize, buf: &mut Vec<u8>) -> Option<usize> {
        let payload = self.payload();
        let at = buf.len();
        buf.resize(at + MAX_SERVER_HEADER, 0);
        DEFLATER.with(|d| d.borrow_mut().compress_with_dictionary(dict, payload, buf));
        let len = buf.len() - at - MAX_SERVER_HEADER;
        let mut hdr = [0u8; MAX_SERVER_HEADER];
        let n = encode_header(RSV1 | OP_TEXT, len, &mut hdr);
        if n + len >= independent {
            buf.truncate(at);
            return None;
        }
        // Move the delta left so no gap is left before it (the frames are contiguous).
        let start = at + MAX_SERVER_HEADER - n;
        buf[start..start + n].copy_from_slice(&hdr[..n]);
        buf.copy_within(start.., at);
        buf.truncate(at + n + len);
        Some(at)
    }

    /// The event's name (see [`event_name`]).
    pub fn event_name(&self) -> Option<&str> {
        event_name(self.payload())
    }

    /// The payload: the event JSON every subscriber gets.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.payload_at..]
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// An event's name when its JSON starts `{"event":"NAME"` with no escape in NAME, as every
/// frame this server builds does (for conflation: an escaped name is never listed).
pub fn event_name(payload: &[u8]) -> Option<&str> {
    let rest = payload.strip_prefix(br#"{"event":""#)?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

/// The conflation key of an event JSON this server built: the length of its prefix
/// `{"event":"NAME","channel":"CHANNEL"`, which names the event and its channel (every frame
/// of one connection's queue is of its one app). Two frames supersede one another exactly when
/// these bytes are equal. `None` for any other shape (never conflated).
pub fn conflation_key_len(payload: &[u8]) -> Option<usize> {
    let name = event_name(payload)?;
    let at = br#"{"event":""#.len() + name.len() + 1;
    let rest = payload.get(at..)?.strip_prefix(br#","channel":""#)?;
    let at = at + br#","channel":""#.len();
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            b'\\' => i += 2,
            b'"' => return Some(at + i + 1),
            _ => i += 1,
        }
    }
    None
}

/// What `SharedFrame::framed_with`'s context answers: the message's tag and its predecessor
/// (tag, plain payload), if known.
pub type FrameContext = (u64, Option<(u64, Bytes)>);

/// A frame as it travels to the shards: the plain frame and, when the message was compressed,
/// the compressed frame after it in the same buffer, so one `Bytes` clone per shard carries
/// both (and every inbox slot stays as small as it was).
///
/// In shared-context mode (`deflated_at` has `CTX_BIT`), a compressed message's buffer also
/// carries, after the independent compressed frame, the delta frame if any, then a 20-byte
/// trailer: its tag (u64), its predecessor's tag (u64; 0: no delta) and where the delta
/// starts (u32; 0: none), little-endian.
#[derive(Clone, Debug)]
pub struct Framed {
    bytes: Bytes,
    plain_len: u32,
    /// Where the compressed frame starts; 0: none. `CTX_BIT`: the context trailer is there.
    deflated_at: u32,
}

/// `Framed::deflated_at`'s flag: the buffer ends with the context trailer.
const CTX_BIT: u32 = 1 << 31;
/// The context trailer's length.
const CTX_TRAILER: usize = 20;

impl Framed {
    /// A frame with no compressed form.
    pub fn plain_only(bytes: Bytes) -> Framed {
        Framed {
            plain_len: bytes.len() as u32,
            bytes,
            deflated_at: 0,
        }
    }

    /// The plain frame (a slice of the shared buffer: no copy).
    pub fn plain(&self) -> Bytes {
        self.bytes.slice(..self.plain_len as usize)
    }

    /// The compressed frame, if the message was compressed.
    pub fn deflated(&self) -> Option<Bytes> {
        let r = self.deflated_range()?;
        Some(self.bytes.slice(r))
    }

    fn deflated_range(&self) -> Option<std::ops::Range<usize>> {
        let at = (self.deflated_at & !CTX_BIT) as usize;
        if at == 0 {
            return None;
        }
        if self.deflated_at & CTX_BIT == 0 {
            return Some(at..self.bytes.len());
        }
        let end = match self.delta_at() {
            0 => self.bytes.len() - CTX_TRAILER,
            d => d,
        };
        Some(at..end)
    }

    fn trailer(&self) -> Option<&[u8]> {
        (self.deflated_at & CTX_BIT != 0).then(|| &self.bytes[self.bytes.len() - CTX_TRAILER..])
    }

    fn delta_at(&self) -> usize {
        self.trailer().map_or(0, |t| {
            u32::from_le_bytes(t[16..20].try_into().unwrap()) as usize
        })
    }

    /// The compressed message's tag (shared-context mode); 0: none (not compressed, or the
    /// mode is off).
    pub fn tag(&self) -> u64 {
        self.trailer()
            .map_or(0, |t| u64::from_le_bytes(t[..8].try_into().unwrap()))
    }

    /// The tag of the message the delta frame was compressed against; 0: there is no delta.
    pub fn pred_tag(&self) -> u64 {
        self.trailer()
            .map_or(0, |t| u64::from_le_bytes(t[8..16].try_into().unwrap()))
    }

    /// The delta frame, borrowed: valid only for a connection whose last compressed message
    /// was the one tagged [`Framed::pred_tag`].
    pub fn delta_bytes(&self) -> Option<&[u8]> {
        match self.delta_at() {
            0 => None,
            d => Some(&self.bytes[d..self.bytes.len() - CTX_TRAILER]),
        }
    }

    pub fn plain_len(&self) -> usize {
        self.plain_len as usize
    }

    /// The plain frame's bytes, borrowed (no reference count touched: what shards use per
    /// event).
    pub fn plain_bytes(&self) -> &[u8] {
        &self.bytes[..self.plain_len as usize]
    }

    /// The compressed frame's bytes, borrowed, if the message was compressed.
    pub fn deflated_bytes(&self) -> Option<&[u8]> {
        let r = self.deflated_range()?;
        Some(&self.bytes[r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn frame_parses_with_tungstenite() {
        for size in [10usize, 200, 70_000] {
            let data = "x".repeat(size);
            let mut esc = Vec::new();
            outbound::push_json_str(&mut esc, &data);
            let f = SharedFrame::event("match.update", "sports.football", &esc);
            let mut cur = Cursor::new(f.bytes.to_vec());
            let (hdr, len) = tungstenite::protocol::frame::FrameHeader::parse(&mut cur)
                .unwrap()
                .unwrap();
            assert!(hdr.is_final && hdr.mask.is_none());
            let payload = &f.bytes[cur.position() as usize..];
            assert_eq!(len as usize, payload.len());
            assert_eq!(f.payload(), payload, "the kept payload is the parsed one");
            let text = SharedFrame::text(payload);
            assert_eq!((text.payload(), &text.bytes), (payload, &f.bytes));
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            assert_eq!(v["data"].as_str().unwrap().len(), size);
            let m = f.with_member("bts_position", "00ab:7");
            let mut cur = Cursor::new(m.bytes.to_vec());
            let (_, len) = tungstenite::protocol::frame::FrameHeader::parse(&mut cur)
                .unwrap()
                .unwrap();
            assert_eq!(len as usize, m.payload().len());
            let w: serde_json::Value = serde_json::from_slice(m.payload()).unwrap();
            assert_eq!(
                (&w["data"], &w["bts_position"]),
                (&v["data"], &"00ab:7".into())
            );
            assert_eq!(f.event_name(), Some("match.update"));
        }
    }

    #[test]
    fn deflated_frame_has_rsv1_and_inflates_to_the_payload() {
        let data = r#"{"home":{"name":"Arsenal","score":2},"away":{"name":"Chelsea","score":1},"minute":67}"#
            .repeat(4);
        let mut esc = Vec::new();
        outbound::push_json_str(&mut esc, &data);
        let f = SharedFrame::event("match.update", "match.1", &esc);
        let d = f.deflated().expect("JSON compresses");
        let mut cur = Cursor::new(d.to_vec());
        let (hdr, len) = tungstenite::protocol::frame::FrameHeader::parse(&mut cur)
            .unwrap()
            .unwrap();
        assert!(hdr.is_final && hdr.rsv1 && !hdr.rsv2 && hdr.mask.is_none());
        let body = &d[cur.position() as usize..];
        assert_eq!(len as usize, body.len());
        assert!(body.len() < f.payload().len() / 2, "{} bytes", body.len());
        let mut back = Vec::new();
        crate::ws::deflate::Inflater::default()
            .inflate(body, 1 << 20, &mut back)
            .unwrap();
        assert_eq!(back, f.payload());
        let framed = f.clone().framed(true);
        assert_eq!(
            (framed.plain(), framed.deflated()),
            (f.bytes.clone(), Some(d))
        );
        assert_eq!(f.clone().framed(false).deflated(), None);
        // Incompressible: no compressed frame.
        let noise: String = (0..64u32)
            .map(|i| char::from(b'!' + (i * 37 % 90) as u8))
            .collect();
        assert!(SharedFrame::text(noise.as_bytes()).deflated().is_none());
    }

    #[test]
    fn context_frames_carry_tags_and_a_smaller_delta() {
        let ev = |home: u32| {
            let data = format!(
                r#"{{"home":{{"name":"Arsenal","score":{home}}},"away":{{"name":"Chelsea","score":1}},"minute":67,"stats":[1,2,3,4,5,6]}}"#
            );
            let mut esc = Vec::new();
            outbound::push_json_str(&mut esc, &data);
            SharedFrame::event("match.update", "match.1", &esc)
        };
        let (a, b) = (ev(1), ev(2));
        let fa = a.clone().framed_with(true, Some(|_p: Bytes| (7u64, None)));
        assert_eq!((fa.tag(), fa.pred_tag(), fa.delta_bytes()), (7, 0, None));
        // The independent form is exactly what `framed` builds, without the trailer.
        assert_eq!(fa.deflated(), a.clone().framed(true).deflated());
        let dict = Bytes::copy_from_slice(a.payload());
        let fb = b.clone().framed_with(
            true,
            Some(|p: Bytes| {
                assert_eq!(&p[..], b.payload());
                (8u64, Some((7u64, dict)))
            }),
        );
        assert_eq!((fb.tag(), fb.pred_tag()), (8, 7));
        let delta = fb.delta_bytes().expect("a delta");
        let independent = fb.deflated_bytes().unwrap();
        assert!(
            delta.len() * 2 < independent.len(),
            "{} vs {}",
            delta.len(),
            independent.len()
        );
        assert_eq!(fb.plain_bytes(), &b.bytes[..]);
        // A client that kept its window inflates a's independent frame, then b's delta.
        let mut z = flate2::Decompress::new(false);
        for (frame, want) in [
            (fa.deflated_bytes().unwrap(), a.payload()),
            (delta, b.payload()),
        ] {
            let mut cur = Cursor::new(frame.to_vec());
            let (hdr, len) = tungstenite::protocol::frame::FrameHeader::parse(&mut cur)
                .unwrap()
                .unwrap();
            assert!(hdr.rsv1 && hdr.is_final);
            let mut body = frame[cur.position() as usize..].to_vec();
            assert_eq!(body.len(), len as usize);
            body.extend_from_slice(&crate::ws::deflate::TRAILER);
            let mut out = Vec::with_capacity(4096);
            z.decompress_vec(&body, &mut out, flate2::FlushDecompress::Sync)
                .unwrap();
            assert_eq!(out, want);
        }
        // Not compressed: the context is not asked, nothing carried.
        let tiny = SharedFrame::text(b"{}").framed_with(
            true,
            Some(|_p: Bytes| -> FrameContext { panic!("asked for an uncompressed frame") }),
        );
        assert_eq!((tiny.tag(), tiny.deflated_bytes()), (0, None));
    }

    #[test]
    fn conflation_keys_name_event_and_channel() {
        fn key(json: &[u8]) -> Option<&[u8]> {
            conflation_key_len(json).map(|n| &json[..n])
        }
        let f = SharedFrame::event("match.update", "match.\"1", b"\"x\"");
        assert_eq!(
            key(f.payload()),
            Some(&br#"{"event":"match.update","channel":"match.\"1""#[..])
        );
        assert_eq!(key(br#"{"event":"a","data":"x"}"#), None);
        assert_eq!(key(br#"{"event":"a","channel":"unterminated"#), None);
    }

    #[test]
    fn event_name_needs_our_own_prefix() {
        let noise: String = (0..64u32)
            .map(|i| char::from(b'!' + (i * 37 % 90) as u8))
            .collect();
        let f = SharedFrame::text(noise.as_bytes()).framed(true);
        assert_eq!((f.plain().len(), f.deflated()), (noise.len() + 2, None));
        assert_eq!(
            SharedFrame::text(br#"{"event":"a\"b","data":1}"#).event_name(),
            None
        );
        assert_eq!(
            SharedFrame::text(br#"{"data":1,"event":"x"}"#).event_name(),
            None
        );
        assert_eq!(
            SharedFrame::text(br#"{"event":"x","data":1}"#).event_name(),
            Some("x")
        );
    }
}
