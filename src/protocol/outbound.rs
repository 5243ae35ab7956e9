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

/// `subscription_succeeded` on a positioned channel: the position the subscription starts
/// after, as the frame's last member (pusher-js ignores it; the resume script reads it).
pub fn subscription_succeeded_at(channel: &str, position: &str) -> Vec<u8> {
    let mut out = subscription_succeeded(channel);
    out.pop();
    out.extend_from_slice(br#","bts_position":"#);
    push_json_str(&mut out, position);
    out.push(b'}');
    out
}

/// `bts:recovered` after a resume: whether the missed events were replayed (they come right
/// before it) and how many (`null` when unknown: the position was from another epoch), with
/// the position the client is at now.
pub fn recovered(channel: &str, recovered: bool, missed: Option<u64>, position: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(120 + channel.len());
    out.extend_from_slice(br#"{"event":"bts:recovered","channel":"#);
    push_json_str(&mut out, channel);
    let missed = missed.map_or_else(|| "null".to_owned(), |m| m.to_string());
    let data = format!(r#"{{"recovered":{recovered},"missed":{missed}}}"#);
    out.extend_from_slice(br#","data":"#);
    push_json_str(&mut out, &data);
    out.extend_from_slice(br#","bts_position":"#);
    push_json_str(&mut out, position);
    out.push(b'}');
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

/// `{"event":E,"channel":C,"data":D}` with `data` given as a plain string (escaped here).
pub fn channel_event_str(event: &str, channel: &str, data: &str) -> Vec<u8> {
    let mut esc = Vec::with_capacity(data.len() + 16);
    push_json_str(&mut esc, data);
    let mut out = Vec::with_capacity(esc.len() + event.len() + channel.len() + 40);
    channel_event(&mut out, event, channel, &esc);
    out
}

/// A client event as relayed to other subscribers: `data` stays the JSON the client sent (not
/// string-encoded, as Pusher relays it), plus `user_id` on presence channels.
pub fn client_event(
    event: &str,
    channel: &str,
    data_json: &[u8],
    user_id: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(data_json.len() + event.len() + channel.len() + 64);
    out.extend_from_slice(br#"{"event":"#);
    push_json_str(&mut out, event);
    out.extend_from_slice(br#","channel":"#);
    push_json_str(&mut out, channel);
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(data_json);
    if let Some(uid) = user_id {
        out.extend_from_slice(br#","user_id":"#);
        push_json_str(&mut out, uid);
    }
    out.push(b'}');
    out
}

/// `pusher:cache_miss` for a cache channel with nothing cached.
pub fn cache_miss(channel: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + channel.len());
    out.extend_from_slice(br#"{"event":"pusher:cache_miss","channel":"#);
    push_json_str(&mut out, channel);
    out.push(b'}');
    out
}

/// `pusher:subscription_error` on a channel: pusher-js emits it on the channel, Echo's `.error()`.
pub fn subscription_error(channel: &str, kind: &str, message: &str, status: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + channel.len() + message.len());
    out.extend_from_slice(br#"{"event":"pusher:subscription_error","channel":"#);
    push_json_str(&mut out, channel);
    out.extend_from_slice(br#","data":{"type":"#);
    push_json_str(&mut out, kind);
    out.extend_from_slice(br#","error":"#);
    push_json_str(&mut out, message);
    out.extend_from_slice(format!(r#","status":{status}}}}}"#).as_bytes());
    out
}

/// `pusher:signin_success`, echoing the signed `user_data` string.
pub fn signin_success(user_data: &str) -> Vec<u8> {
    let inner = serde_json::json!({ "user_data": user_data }).to_string();
    let mut out = Vec::with_capacity(inner.len() + 48);
    out.extend_from_slice(br#"{"event":"pusher:signin_success","data":"#);
    push_json_str(&mut out, &inner);
    out.push(b'}');
    out
}

/// `pusher_internal:watchlist_events` with one `online` or `offline` entry.
pub fn watchlist_event(name: &str, user_ids: &[&str]) -> Vec<u8> {
    let inner = serde_json::json!({ "events": [{ "name": name, "user_ids": user_ids }] });
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(br#"{"event":"pusher_internal:watchlist_events","data":"#);
    push_json_str(&mut out, &inner.to_string());
    out.push(b'}');
    out
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn shapes_of_channel_extras() {
        let v: serde_json::Value = serde_json::from_slice(&client_event(
            "client-t",
            "private-a",
            br#"{"x":1}"#,
            Some("7"),
        ))
        .unwrap();
        assert_eq!(v["data"]["x"], 1);
        assert_eq!(v["user_id"], "7");
        let v: serde_json::Value = serde_json::from_slice(&cache_miss("cache-a")).unwrap();
        assert_eq!(v["event"], "pusher:cache_miss");
        let v: serde_json::Value =
            serde_json::from_slice(&subscription_error("p", "LimitReached", "full", 403)).unwrap();
        assert_eq!(v["data"]["status"], 403);
        let v: serde_json::Value =
            serde_json::from_slice(&signin_success(r#"{"id":"1"}"#)).unwrap();
        let d: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(d["user_data"], r#"{"id":"1"}"#);
        let v: serde_json::Value =
            serde_json::from_slice(&watchlist_event("online", &["1"])).unwrap();
        let d: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(d["events"][0]["user_ids"][0], "1");
    }
}
