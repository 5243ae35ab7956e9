//! Server → client Pusher messages, as JSON text (framing is `ws::codec`'s job).
//!
//! `data` is always a JSON-encoded *string* for events (protocol 7), except `pusher:error`, whose
//! `data` is an object as Pusher itself sends it.

use crate::protocol::SocketId;

/// Appends `s` as a JSON string literal (quotes and escapes included).
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaper is correct for every code point and fast; writing into a Vec
    // cannot fail.
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// `{"event":E,"channel":C,"data":D}` where `data_json` is `D` already escaped as a JSON string
/// literal. Field order matches Pusher's.
pub fn channel_event(out: &mut Vec<u8>, event: &str, channel: &str, data_json: &[u8]) {
    out.extend_from_slice(br#"{"event":"#);
    push_json_str(out, event);
    out.extend_from_slice(br#","channel":"#);
    push_json_str(out, channel);
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(data_json);
    out.push(b'}');
}

pub fn connection_established(socket_id: SocketId, activity_timeout: u32) -> Vec<u8> {
    format!(
        r#"{{"event":"pusher:connection_established","data":"{{\"socket_id\":\"{socket_id}\",\"activity_timeout\":{activity_timeout}}}"}}"#
    )
    .into_bytes()
}

pub fn pong() -> &'static [u8] {
    br#"{"event":"pusher:pong","data":"{}"}"#
}

pub fn ping() -> &'static [u8] {
    br#"{"event":"pusher:ping","data":"{}"}"#
}

pub fn subscription_succeeded(channel: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(80 + channel.len());
    out.extend_from_slice(br#"{"event":"pusher_internal:subscription_succeeded","channel":"#);
    push_json_str(&mut out, channel);
    out.extend_from_slice(br#","data":"{}"}"#);
    out
}

/// `pusher:error`; `code` is `None` for errors Pusher sends without one.
pub fn error(code: Option<u16>, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(br#"{"event":"pusher:error","data":{"code":"#);
    match code {
        Some(c) => out.extend_from_slice(c.to_string().as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","message":"#);
    push_json_str(&mut out, message);
    out.extend_from_slice(b"}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn shapes() {
        let est = json(&connection_established(SocketId { hi: 12, lo: 34 }, 30));
        assert_eq!(est["event"], "pusher:connection_established");
        let data: serde_json::Value = serde_json::from_str(est["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["socket_id"], "12.34");
        assert_eq!(data["activity_timeout"], 30);

        let mut ev = Vec::new();
        let mut data = Vec::new();
        push_json_str(&mut data, r#"{"score":"2-1 \"late\""}"#);
        channel_event(&mut ev, "match.update", "sports.football", &data);
        let ev = json(&ev);
        assert_eq!(ev["event"], "match.update");
        assert_eq!(ev["channel"], "sports.football");
        assert_eq!(ev["data"], r#"{"score":"2-1 \"late\""}"#);

        let err = json(&error(Some(4001), "Application does not exist"));
        assert_eq!(err["data"]["code"], 4001);
        assert_eq!(err["data"]["message"], "Application does not exist");
        assert_eq!(json(&subscription_succeeded("a"))["channel"], "a");
        assert_eq!(json(pong())["event"], "pusher:pong");
    }
}
