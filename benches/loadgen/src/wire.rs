//! The client side of RFC 6455 (handshake request, answer check, frame encode/decode), the
//! allocation-free field scanners used on every delivery, and the few Pusher messages every
//! client reads the same way.

use bts_guru::ws::codec;

/// What a browser offers (`--deflate`): permessage-deflate, any client window.
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// The upgrade request for `path` (e.g. `/app/KEY?protocol=7...`), offering permessage-deflate
/// with `deflate`.
pub fn handshake_request(host: &str, path: &str, key: &str, deflate: bool) -> Vec<u8> {
    let ext = if deflate {
        format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
    } else {
        String::new()
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: bts-guru-bench\r\n{ext}\r\n"
    )
    .into_bytes()
}

/// What the server's answer says about compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deflate {
    /// Not negotiated.
    Off,
    /// permessage-deflate with `server_no_context_takeover`: every message inflates on its own.
    NoContext,
    /// permessage-deflate with the server keeping its window between messages: the connection
    /// needs its own inflater.
    Context,
}

/// Offset just past the `\r\n\r\n` that ends an HTTP head.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Checks the server's answer to the upgrade: 101, the right Sec-WebSocket-Accept, and no
/// extension we did not offer (`offered`: permessage-deflate); what it says about compression.
pub fn check_handshake(head: &[u8], key: &str, offered: bool) -> Result<Deflate, String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("101") {
        return Err(format!("WebSocket upgrade refused: {:?}", status.trim()));
    }
    let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut accepted = None;
    let mut deflate = Deflate::Off;
    for l in lines {
        if let Some((name, value)) = l.split_once(':') {
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("sec-websocket-accept") {
                accepted = Some(value == want);
            } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
                let mut params = value.split(';').map(str::trim);
                if !offered || params.next() != Some("permessage-deflate") {
                    return Err(format!(
                        "WebSocket upgrade: extension not offered: {value:?}"
                    ));
                }
                deflate = if params.any(|p| p == "server_no_context_takeover") {
                    Deflate::NoContext
                } else {
                    Deflate::Context
                };
            }
        }
    }
    match accepted {
        Some(true) => Ok(deflate),
        Some(false) => Err("WebSocket upgrade: wrong Sec-WebSocket-Accept".into()),
        None => Err("WebSocket upgrade: no Sec-WebSocket-Accept".into()),
    }
}

pub use bts_guru::ws::codec::{OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
pub const OP_CONT: u8 = 0;
pub const OP_BINARY: u8 = 2;

/// Appends one final, masked client frame: the daemon's frame header (the same for both
/// directions but for the mask bit) and its masking, which is the same XOR as unmasking.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let mut head = [0u8; codec::MAX_SERVER_HEADER];
    let n = codec::encode_header(opcode, payload.len(), &mut head);
    // RFC 6455 §5.3: every frame a client sends is masked.
    head[1] |= 0x80;
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    codec::unmask(&mut out[start..], mask);
}

/// One complete server frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    /// RSV1: a compressed message's first frame (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    /// Where the payload starts and ends within the buffer.
    pub start: usize,
    pub end: usize,
}

/// Parses the frame at the start of `buf`: `Ok(None)` when it is not complete yet. `deflate`:
/// permessage-deflate was negotiated, so RSV1 may be set.
pub fn parse_frame(buf: &[u8], max_len: usize, deflate: bool) -> Result<Option<FrameHead>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let rsv = if deflate { 0x30 } else { 0x70 };
    if b0 & rsv != 0 {
        return Err("server frame with RSV bits set".into());
    }
    if b1 & 0x80 != 0 {
        return Err("server frame is masked (RFC 6455 5.1 forbids it)".into());
    }
    let (len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if len > max_len as u64 {
        return Err(format!("server frame of {len} bytes exceeds {max_len}"));
    }
    let len = len as usize;
    if buf.len() < pos + len {
        return Ok(None);
    }
    let start = pos;
    pos += len;
    Ok(Some(FrameHead {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        opcode: b0 & 0x0F,
        start,
        end: pos,
    }))
}

/// The string value of a top-level key, e.g. `"event":"x"` → `x` (escapes are not decoded; the
/// names we look for never contain any). Keys inside the `data` string are escaped (`\"key\"`)
/// and therefore never match.
pub fn str_field<'a>(msg: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let k = key.as_bytes();
    let mut from = 0;
    while let Some(p) = find(&msg[from..], k) {
        let at = from + p;
        from = at + 1;
        if at == 0 || msg[at - 1] != b'"' {
            continue;
        }
        let mut i = at + k.len();
        if msg.get(i) != Some(&b'"') {
            continue;
        }
        i += 1;
        i = skip_ws(msg, i);
        if msg.get(i) != Some(&b':') {
            continue;
        }
        i = skip_ws(msg, i + 1);
        if msg.get(i) != Some(&b'"') {
            continue;
        }
        let s = i + 1;
        let mut e = s;
        while e < msg.len() {
            match msg[e] {
                b'\\' => e += 2,
                b'"' => return Some(&msg[s..e]),
                _ => e += 1,
            }
        }
        return None;
    }
    None
}

/// The unsigned number of `key` anywhere in the message, inside the `data` string (`\"key\":12`)
/// or inside a `data` object (`"key":12`). Searches from the end: our fields close the payload.
pub fn num_field(msg: &[u8], key: &str) -> Option<u64> {
    let k = key.as_bytes();
    let mut to = msg.len();
    while let Some(at) = rfind(&msg[..to], k) {
        to = at;
        if at == 0 || msg[at - 1] != b'"' {
            continue;
        }
        let mut i = at + k.len();
        if msg.get(i) == Some(&b'\\') {
            i += 1;
        }
        if msg.get(i) != Some(&b'"') {
            continue;
        }
        i = skip_ws(msg, i + 1);
        if msg.get(i) != Some(&b':') {
            continue;
        }
        i = skip_ws(msg, i + 1);
        let s = i;
        let mut v: u64 = 0;
        while let Some(d) = msg.get(i).filter(|c| c.is_ascii_digit()) {
            v = v.checked_mul(10)?.checked_add((d - b'0') as u64)?;
            i += 1;
        }
        if i == s {
            continue;
        }
        return Some(v);
    }
    None
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last = hay.len() - needle.len();
    let mut i = 0;
    while i <= last {
        if hay[i] == first && &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = hay.len() - needle.len() + 1;
    while i > 0 {
        i -= 1;
        if hay[i] == first && &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
    }
    None
}

/// The `data` member of a server message as a JSON value: Pusher sends it as a string holding
/// JSON; some servers send an object.
pub fn data_value(msg: &[u8]) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(msg).ok()?;
    match v.get("data")? {
        serde_json::Value::String(s) => serde_json::from_str(s)
            .ok()
            .or(Some(serde_json::Value::Null)),
        other => Some(other.clone()),
    }
}

/// The answer to `pusher:ping`.
pub const PUSHER_PONG: &[u8] = br#"{"event":"pusher:pong","data":{}}"#;

/// The `socket_id` of a `pusher:connection_established`.
pub fn socket_id(msg: &[u8]) -> Option<String> {
    let d = data_value(msg)?;
    Some(d.get("socket_id")?.as_str()?.to_owned())
}

/// `pusher:error CODE: MESSAGE`, for the error counts.
pub fn pusher_error(msg: &[u8]) -> String {
    let d = data_value(msg).unwrap_or_default();
    let code = d.get("code").map(|c| c.to_string()).unwrap_or_default();
    let m = d.get("message").and_then(|m| m.as_str()).unwrap_or("");
    format!("pusher:error {code}: {m}")
}

/// A user id as text: a string as it is, any other JSON value as JSON.
fn id_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The members a presence `subscription_succeeded` lists (`presence.ids`).
pub fn presence_ids(msg: &[u8]) -> Vec<String> {
    data_value(msg)
        .and_then(|d| {
            let ids = d.pointer("/presence/ids")?.as_array()?;
            Some(ids.iter().map(id_text).collect())
        })
        .unwrap_or_default()
}

/// The `user_id` of a `member_added` or `member_removed`.
pub fn member_id(msg: &[u8]) -> Option<String> {
    data_value(msg)?.get("user_id").map(id_text)
}

#[cfg(test)]
mod tests {
    use super::*;

    // What the daemon's encoder writes, the client's parser reads back whole; one byte short
    // is not a frame yet.
    #[test]
    fn frames_round_trip_lengths() {
        for n in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload = vec![b'x'; n];
            let f = codec::server_frame(OP_TEXT, &payload);
            let h = parse_frame(&f, 1 << 20, false).unwrap().unwrap();
            assert_eq!(
                (h.fin, h.opcode, h.end - h.start, h.end),
                (true, 1, n, f.len())
            );
            assert_eq!(
                parse_frame(&f[..f.len() - 1], 1 << 20, false).unwrap(),
                None
            );
        }
        let big = codec::server_frame(OP_TEXT, &[b'x'; 300]);
        assert!(parse_frame(&big, 299, false).is_err());
    }

    // What the client encodes, the daemon's decoder (which checks every RFC 6455 rule on client
    // frames) reads back, at every length encoding.
    #[test]
    fn masked_client_frames_decode_in_the_daemon() {
        for n in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let text = "y".repeat(n);
            let mut out = Vec::new();
            encode_frame(&mut out, OP_TEXT, text.as_bytes(), [1, 2, 3, 4]);
            assert_eq!(out[1] & 0x80, 0x80, "masked");
            let mut dec = codec::Decoder::default();
            let (msg, used) = dec.next(&mut out, 1 << 20, false).unwrap().unwrap();
            assert_eq!(used, out.len());
            let codec::Inbound::Text(codec::Text::InBuf(r)) = msg else {
                panic!("{msg:?}");
            };
            assert_eq!(&out[r], text.as_bytes());
        }
        let mut out = Vec::new();
        encode_frame(&mut out, OP_CLOSE, &1000u16.to_be_bytes(), [9, 8, 7, 6]);
        let (msg, _) = codec::Decoder::default()
            .next(&mut out, 1 << 20, false)
            .unwrap()
            .unwrap();
        assert_eq!(msg, codec::Inbound::Close(Some(1000)));
    }

    #[test]
    fn scans_fields() {
        let m = br#"{"event":"match.update","channel":"sports.l1","data":"{\"match_id\":1,\"publisher\":3,\"seq\":42,\"sent_ns\":1700000000000000000}"}"#;
        assert_eq!(str_field(m, "event"), Some(&b"match.update"[..]));
        assert_eq!(str_field(m, "channel"), Some(&b"sports.l1"[..]));
        assert_eq!(num_field(m, "seq"), Some(42));
        assert_eq!(num_field(m, "publisher"), Some(3));
        assert_eq!(num_field(m, "sent_ns"), Some(1_700_000_000_000_000_000));
        let o = br#"{"data": {"seq": 7, "sent_ns": 9}, "channel": "c", "event": "e"}"#;
        assert_eq!(num_field(o, "seq"), Some(7));
        assert_eq!(str_field(o, "event"), Some(&b"e"[..]));
        assert_eq!(num_field(o, "missing"), None);
        assert_eq!(str_field(br#"{"channel":"x"}"#, "event"), None);
    }

    #[test]
    fn pusher_messages() {
        let est = br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":30}"}"#;
        assert_eq!(socket_id(est).as_deref(), Some("1.2"));
        let err = br#"{"event":"pusher:error","data":{"code":4001,"message":"App key x does not exist"}}"#;
        assert_eq!(
            pusher_error(err),
            "pusher:error 4001: App key x does not exist"
        );
        let ok = br#"{"event":"pusher_internal:subscription_succeeded","channel":"presence-a","data":"{\"presence\":{\"ids\":[\"u1\",2],\"hash\":{},\"count\":2}}"}"#;
        assert_eq!(presence_ids(ok), vec!["u1".to_string(), "2".to_string()]);
        let added = br#"{"event":"pusher_internal:member_added","channel":"presence-a","data":"{\"user_id\":\"u7\"}"}"#;
        assert_eq!(member_id(added).as_deref(), Some("u7"));
        assert_eq!(member_id(est), None);
    }

    #[test]
    fn accept_key() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(check_handshake(head, "dGhlIHNhbXBsZSBub25jZQ==", false) == Ok(Deflate::Off));
        assert!(check_handshake(head, "other", false).is_err());
        assert!(check_handshake(b"HTTP/1.1 404 Not Found\r\n\r\n", "k", false).is_err());
    }
}
