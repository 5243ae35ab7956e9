//! Client → server Pusher messages, parsed with simd-json in place.

use std::borrow::Cow;

use simd_json::prelude::*;
use simd_json::BorrowedValue;

use super::depth;

/// A message a client sent, borrowing from the (unmasked, in-place parsed) frame payload.
#[derive(Debug, PartialEq)]
pub enum ClientMessage<'a> {
    Ping,
    Pong,
    Subscribe {
        channel: Cow<'a, str>,
        auth: Option<Cow<'a, str>>,
        channel_data: Option<Cow<'a, str>>,
        /// `bts_position`: the last position the client saw on a positioned channel (sent by
        /// the resume script; stock clients never send it).
        position: Option<Cow<'a, str>>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
    },
    /// `client-*` events (whispers). `data` is re-serialized JSON, relayed as the client sent it.
    ClientEvent {
        event: Cow<'a, str>,
        channel: Option<Cow<'a, str>>,
        data: Vec<u8>,
    },
    /// `pusher:signin` (user authentication).
    Signin {
        auth: Option<Cow<'a, str>>,
        user_data: Option<Cow<'a, str>>,
    },
    /// Any other `event` name: answered with `pusher:error`, connection kept.
    Unknown {
        event: Cow<'a, str>,
    },
}

/// Why a client message could not be understood. The connection is kept (Reverb: 4200
/// "Invalid message format").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    #[error("message is not a JSON object with an \"event\" string")]
    NotAnEvent,
    #[error("{0} needs data.channel as a string")]
    MissingChannel(&'static str),
    #[error("JSON nested deeper than {} levels", depth::MAX_JSON_DEPTH)]
    TooDeep,
}

/// Parses one text frame's payload. `buf` is scratch: simd-json rewrites it while parsing.
pub fn parse(buf: &mut [u8]) -> Result<ClientMessage<'_>, InboundError> {
    // Building the value recurses once per level: refuse deep nesting before parsing.
    if !depth::within(buf, depth::MAX_JSON_DEPTH) {
        return Err(InboundError::TooDeep);
    }
    let value = simd_json::to_borrowed_value(buf).map_err(|_| InboundError::NotAnEvent)?;
    let BorrowedValue::Object(mut obj) = value else {
        return Err(InboundError::NotAnEvent);
    };
    let event = match obj.remove("event") {
        Some(BorrowedValue::String(e)) => e,
        _ => return Err(InboundError::NotAnEvent),
    };
    let data = obj.remove("data");
    Ok(match event.as_ref() {
        "pusher:ping" => ClientMessage::Ping,
        "pusher:pong" => ClientMessage::Pong,
        "pusher:subscribe" => {
            let data = data_object(data)?;
            let channel =
                field(&data, "channel").ok_or(InboundError::MissingChannel("pusher:subscribe"))?;
            ClientMessage::Subscribe {
                channel,
                auth: field(&data, "auth"),
                channel_data: field(&data, "channel_data"),
                position: field(&data, "bts_position"),
            }
        }
        "pusher:unsubscribe" => {
            let data = data_object(data)?;
            let channel = field(&data, "channel")
                .ok_or(InboundError::MissingChannel("pusher:unsubscribe"))?;
            ClientMessage::Unsubscribe { channel }
        }
        "pusher:signin" => {
            let data = data_object(data)?;
            ClientMessage::Signin {
                auth: field(&data, "auth"),
                user_data: field(&data, "user_data"),
            }
        }
        e if e.starts_with("client-") => ClientMessage::ClientEvent {
            channel: match obj.remove("channel") {
                Some(BorrowedValue::String(c)) => Some(c),
                _ => None,
            },
            data: match data {
                Some(v) => simd_json::to_vec(&v).map_err(|_| InboundError::NotAnEvent)?,
                None => b"null".to_vec(),
            },
            event,
        },
        _ => ClientMessage::Unknown { event },
    })
}

/// Pusher clients send `data` as an object; a few send it JSON-encoded as a string. Both work.
/// A string is JSON from outside too, so its nesting is checked before it is parsed.
fn data_object(data: Option<BorrowedValue<'_>>) -> Result<Option<BorrowedValue<'_>>, InboundError> {
    match data {
        Some(BorrowedValue::String(s)) => {
            if !depth::within(s.as_bytes(), depth::MAX_JSON_DEPTH) {
                return Err(InboundError::TooDeep);
            }
            let mut bytes = s.as_bytes().to_vec();
            Ok(simd_json::to_owned_value(&mut bytes)
                .ok()
                .map(|v| BorrowedValue::from(v).into_static()))
        }
        other => Ok(other),
    }
}

fn field<'a>(data: &Option<BorrowedValue<'a>>, name: &str) -> Option<Cow<'a, str>> {
    match data.as_ref()?.get(name)? {
        BorrowedValue::String(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: Result<ClientMessage<'_>, InboundError>) {
        let mut buf = input.as_bytes().to_vec();
        assert_eq!(parse(&mut buf), expect, "{input}");
    }

    #[test]
    fn table() {
        check(
            r#"{"event":"pusher:ping","data":{}}"#,
            Ok(ClientMessage::Ping),
        );
        check(r#"{"event":"pusher:pong"}"#, Ok(ClientMessage::Pong));
        check(
            r#"{"event":"pusher:subscribe","data":{"channel":"sports.football"}}"#,
            Ok(ClientMessage::Subscribe {
                channel: "sports.football".into(),
                auth: None,
                channel_data: None,
                position: None,
            }),
        );
        check(
            r#"{"event":"pusher:subscribe","data":{"channel":"private-a","auth":"k:s","channel_data":"{\"user_id\":1}"}}"#,
            Ok(ClientMessage::Subscribe {
                channel: "private-a".into(),
                auth: Some("k:s".into()),
                channel_data: Some(r#"{"user_id":1}"#.into()),
                position: None,
            }),
        );
        check(
            r#"{"event":"pusher:subscribe","data":"{\"channel\":\"x\"}"}"#,
            Ok(ClientMessage::Subscribe {
                channel: "x".into(),
                auth: None,
                channel_data: None,
                position: None,
            }),
        );
        check(
            r#"{"event":"pusher:unsubscribe","data":{"channel":"x"}}"#,
            Ok(ClientMessage::Unsubscribe {
                channel: "x".into(),
            }),
        );
        check(
            r#"{"event":"client-typing","channel":"private-x","data":{"a":1}}"#,
            Ok(ClientMessage::ClientEvent {
                event: "client-typing".into(),
                channel: Some("private-x".into()),
                data: br#"{"a":1}"#.to_vec(),
            }),
        );
        check(
            r#"{"event":"pusher:signin","data":{"auth":"k:s","user_data":"{\"id\":\"1\"}"}}"#,
            Ok(ClientMessage::Signin {
                auth: Some("k:s".into()),
                user_data: Some(r#"{"id":"1"}"#.into()),
            }),
        );
        check(
            r#"{"event":"hello"}"#,
            Ok(ClientMessage::Unknown {
                event: "hello".into(),
            }),
        );
        check(
            r#"{"event":"pusher:subscribe","data":{}}"#,
            Err(InboundError::MissingChannel("pusher:subscribe")),
        );
        check(
            r#"{"event":"pusher:subscribe","data":{"channel":5}}"#,
            Err(InboundError::MissingChannel("pusher:subscribe")),
        );
        check("not json", Err(InboundError::NotAnEvent));
        check("[]", Err(InboundError::NotAnEvent));
        check(r#"{"data":{}}"#, Err(InboundError::NotAnEvent));
        check(r#"{"event":5}"#, Err(InboundError::NotAnEvent));
        check("", Err(InboundError::NotAnEvent));
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        // 100,000 levels would overflow the stack while the value is built (issue 8).
        let deep = format!(
            r#"{{"event":"client-x","channel":"private-a","data":{}1{}}}"#,
            r#"{"a":"#.repeat(100_000),
            "}".repeat(100_000)
        );
        check(&deep, Err(InboundError::TooDeep));
        let deep_array = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        check(&deep_array, Err(InboundError::TooDeep));
        // `data` sent as a string is parsed too: its nesting is checked as well.
        let inner = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let as_string = serde_json::json!({"event":"pusher:subscribe","data": inner}).to_string();
        check(&as_string, Err(InboundError::TooDeep));
        // At the limit it parses.
        let ok = format!(
            r#"{{"event":"client-x","data":{}{}}}"#,
            "[".repeat(depth::MAX_JSON_DEPTH - 1),
            "]".repeat(depth::MAX_JSON_DEPTH - 1)
        );
        let mut buf = ok.into_bytes();
        assert!(matches!(
            parse(&mut buf),
            Ok(ClientMessage::ClientEvent { .. })
        ));
    }
}
