//! Builds the one WebSocket frame every subscriber of a channel is sent.

use bytes::Bytes;

use crate::protocol::outbound;
use crate::ws::codec::{encode_header, MAX_SERVER_HEADER, OP_TEXT};

/// A complete, unmasked WebSocket text frame carrying one Pusher event. Built once per event and
/// channel per node; every recipient is sent these exact bytes, so the payload is never copied
/// per subscriber (possible because server frames are unmasked and permessage-deflate is never
/// negotiated). Where its payload (the event JSON) starts is kept from building it, so the
/// cluster gets the JSON without the frame being parsed again.
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

    /// The payload: the event JSON every subscriber gets.
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
        }
    }
}
