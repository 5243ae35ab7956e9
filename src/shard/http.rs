//! The Pusher HTTP API, served by whichever shard accepted the request: signed publishes
//! (`events`, `batch_events`) handed to every shard through the router, and `GET /up`.

use std::sync::Arc;

use serde::Deserialize;

use super::Shard;
use crate::fanout::frame::SharedFrame;
use crate::fanout::router::Broadcast;
use crate::protocol::{auth, channel, outbound, SocketId};
use crate::ws::handshake::Request;

/// Most channels one event may name (Pusher's limit).
pub const MAX_CHANNELS_PER_EVENT: usize = 100;
/// Most events in one `batch_events` request (Pusher's limit).
pub const MAX_BATCH: usize = 10;
/// Longest event name.
pub const MAX_EVENT_NAME: usize = 200;

#[derive(Deserialize)]
struct EventBody {
    name: Option<String>,
    data: Option<serde_json::Value>,
    channel: Option<String>,
    channels: Option<Vec<String>>,
    socket_id: Option<String>,
}

#[derive(Deserialize)]
struct BatchBody {
    batch: Vec<EventBody>,
}

/// An event that passed validation, ready to frame.
struct Checked {
    name: String,
    /// `data` as a JSON string literal, escaped once for all its channels.
    data_json: Vec<u8>,
    channels: Vec<String>,
    except: Option<SocketId>,
}

type Reply = (u16, String);

fn err(status: u16, msg: &str) -> Reply {
    let mut body = Vec::new();
    outbound::push_json_str(&mut body, msg);
    (
        status,
        format!(r#"{{"error":{}}}"#, String::from_utf8_lossy(&body)),
    )
}

/// Answers one HTTP request: `(status, JSON body)`.
pub(super) fn handle(shard: &Shard, req: &Request, body: &[u8]) -> Reply {
    if req.path == "/up" {
        return (200, r#"{"health":"OK"}"#.to_owned());
    }
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let (app_id, endpoint) = match parts.as_slice() {
        ["apps", id, endpoint] => (*id, *endpoint),
        ["app", _] => {
            return err(
                426,
                "WebSocket connections need an Upgrade: websocket request",
            )
        }
        _ => return err(404, "Not found"),
    };
    if !matches!(endpoint, "events" | "batch_events") {
        return err(404, "Not found");
    }
    let shared = &shard.shared;
    let Some(app_idx) = shared.app_by_id(app_id) else {
        return err(404, &format!("Unknown app {app_id:?}"));
    };
    if req.method != "POST" {
        return err(405, "Use POST");
    }
    let app = &shared.cfg.apps[app_idx];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Err(e) = auth::verify_api_request(
        &app.key,
        &app.secret,
        &req.method,
        &req.path,
        &req.query,
        body,
        now,
    ) {
        return err(401, &e.to_string());
    }
    let mut body = body.to_vec();
    let events = if endpoint == "events" {
        match simd_json::serde::from_slice::<EventBody>(&mut body) {
            Ok(e) => vec![e],
            Err(e) => return err(400, &format!("Invalid JSON body: {e}")),
        }
    } else {
        match simd_json::serde::from_slice::<BatchBody>(&mut body) {
            Ok(b) if b.batch.len() > MAX_BATCH => {
                return err(400, &format!("Batch of more than {MAX_BATCH} events"))
            }
            Ok(b) => b.batch,
            Err(e) => return err(400, &format!("Invalid JSON body: {e}")),
        }
    };
    // Validate every event before publishing any, so a batch is all or nothing.
    let mut checked = Vec::with_capacity(events.len());
    for (i, e) in events.into_iter().enumerate() {
        match check_event(e, app.max_message_size, endpoint == "batch_events") {
            Ok(c) => checked.push(c),
            Err((status, msg)) if endpoint == "batch_events" => {
                return err(status, &format!("batch[{i}]: {msg}"))
            }
            Err((status, msg)) => return err(status, &msg),
        }
    }
    let mut dropped = 0;
    for c in &checked {
        for ch in &c.channels {
            let frame = SharedFrame::event(&c.name, ch, &c.data_json);
            dropped += shared.router.broadcast(Broadcast {
                app: app_idx,
                channel: Arc::from(ch.as_str()),
                frame: frame.0,
                except: c.except,
            });
        }
    }
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "shard inboxes full: event not delivered everywhere"
        );
        return err(
            503,
            "Server overloaded: the event could not be queued on every shard",
        );
    }
    if endpoint == "events" {
        (200, "{}".to_owned())
    } else {
        let items = vec!["{}"; checked.len()].join(",");
        (200, format!(r#"{{"batch":[{items}]}}"#))
    }
}

fn check_event(e: EventBody, max_data: usize, batch: bool) -> Result<Checked, (u16, String)> {
    let name = e
        .name
        .filter(|n| !n.is_empty())
        .ok_or((400, "Missing event name".to_owned()))?;
    if name.len() > MAX_EVENT_NAME {
        return Err((
            400,
            format!("Event name longer than {MAX_EVENT_NAME} characters"),
        ));
    }
    let mut channels = match (e.channel, e.channels) {
        (Some(c), None) => vec![c],
        (None, Some(cs)) => cs,
        (Some(c), Some(mut cs)) => {
            cs.insert(0, c);
            cs
        }
        (None, None) => return Err((400, "Missing channel or channels".to_owned())),
    };
    if channels.is_empty() {
        return Err((400, "Missing channel or channels".to_owned()));
    }
    if channels.len() > MAX_CHANNELS_PER_EVENT {
        return Err((
            400,
            format!("An event can be published to at most {MAX_CHANNELS_PER_EVENT} channels"),
        ));
    }
    if batch && channels.len() > 1 {
        return Err((400, "Batch events take one channel each".to_owned()));
    }
    let mut seen = std::collections::HashSet::new();
    channels.retain(|c| seen.insert(c.clone()));
    for c in &channels {
        if let Err(err) = channel::validate(c) {
            return Err((400, format!("Invalid channel {c:?}: {err}")));
        }
    }
    // Pusher: `data` is a string; SDKs JSON-encode objects first. Accept both.
    let data = match e.data {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    if data.len() > max_data {
        return Err((
            413,
            format!(
                "Event data is {} bytes; the limit is {max_data}",
                data.len()
            ),
        ));
    }
    let except = match e.socket_id.as_deref() {
        None | Some("") => None,
        Some(s) => Some(SocketId::parse(s).ok_or((400, format!("Invalid socket_id {s:?}")))?),
    };
    let mut data_json = Vec::with_capacity(data.len() + 16);
    outbound::push_json_str(&mut data_json, &data);
    Ok(Checked {
        name,
        data_json,
        channels,
        except,
    })
}
