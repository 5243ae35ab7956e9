//! The Pusher HTTP API, served by whichever shard accepted the request: signed publishes
//! (`events`, `batch_events`) handed to every shard through the router; signed reads (channels,
//! one channel, its users, connections) answered from every shard's part; user termination;
//! `GET /up` and `GET /ready`; and the routes a hook installed at start-up claims (the debug
//! console's, when it is on: [`RouteHook`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{merge, Shard};
use crate::cluster::Wire;
use crate::fanout::frame::SharedFrame;
use crate::fanout::router::{QueryKind, ShardCmd};
use crate::node::Event;
use crate::protocol::{auth, channel, depth, outbound, ChannelKind, SocketId};
use crate::ws::handshake::{Request, Response};

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
    info: Option<String>,
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
    info: Info,
}

/// Which counts a caller asked for (`info=user_count,subscription_count,cache`).
#[derive(Clone, Copy, Default)]
struct Info {
    user_count: bool,
    subscription_count: bool,
    cache: bool,
}

impl Info {
    fn parse(s: Option<&str>) -> Info {
        let mut info = Info::default();
        for attr in s.unwrap_or_default().split(',').map(str::trim) {
            match attr {
                "user_count" => info.user_count = true,
                "subscription_count" => info.subscription_count = true,
                "cache" => info.cache = true,
                _ => {}
            }
        }
        info
    }

    fn any(self) -> bool {
        self.user_count || self.subscription_count
    }
}

type Reply = (u16, String);

fn err(status: u16, msg: &str) -> Reply {
    (status, json!({ "error": msg }).to_string())
}

/// HTTP routes served beside the API, installed on every shard at start-up (`lib::run`: the
/// debug console's, when it is on). A shard asks it only about the paths it claims, so no
/// other request pays for it, and without one installed nothing is asked at all.
pub trait RouteHook: Send + Sync {
    /// Whether `path` is one of these routes (a prefix check, asked of every HTTP request).
    fn claims(&self, path: &str) -> bool;
    /// The answer to a request it claims; `peer` is the client's address. Boxed: only these
    /// requests pay for the future.
    fn handle<'a>(
        &'a self,
        shard: &'a Shard,
        req: &'a Request,
        peer: IpAddr,
    ) -> Pin<Box<dyn Future<Output = Response> + 'a>>;
}

const INCOMPLETE: &str = "a shard did not answer in time; counts would not be exact";

/// Answers one HTTP request, and counts it by endpoint and status.
pub(super) async fn handle(shard: &Shard, req: &Request, body: &[u8], peer: IpAddr) -> Response {
    if let Some(reply) = resume_script(req) {
        count(shard, req, reply.status);
        return reply;
    }
    let reply = match shard.route_hook(&req.path) {
        Some(hook) => hook.handle(shard, req, peer).await,
        None => {
            let (status, body) = route(shard, req, body).await;
            Response::json(status, body)
        }
    };
    count(shard, req, reply.status);
    reply
}

/// Headers of the resume script: cacheable for an hour (it changes only with the daemon),
/// loadable from the app's own origin (`<script>` and ES module imports across origins need
/// CORS), never sniffed as anything else.
const SCRIPT_HEADERS: &[(&str, &str)] = &[
    ("Cache-Control", "public, max-age=3600"),
    ("Access-Control-Allow-Origin", "*"),
    ("X-Content-Type-Options", "nosniff"),
];

/// `GET /bts-guru/resume.js` (UMD: `<script>`, `require()`) and `/bts-guru/resume.mjs` (ES
/// module): the client side of positioned channels, embedded in the binary.
fn resume_script(req: &Request) -> Option<Response> {
    let body = match req.path.as_str() {
        "/bts-guru/resume.js" => crate::resume::SCRIPT,
        "/bts-guru/resume.mjs" => crate::resume::SCRIPT_MJS,
        _ => return None,
    };
    if req.method != "GET" {
        let (status, body) = err(405, "Method not allowed");
        return Some(Response::json(status, body));
    }
    Some(Response {
        status: 200,
        content_type: "text/javascript; charset=utf-8",
        body: body.as_bytes().into(),
        headers: SCRIPT_HEADERS,
    })
}

/// Counts an answer by endpoint and status.
fn count(shard: &Shard, req: &Request, status: u16) {
    let endpoint = endpoint_label(req);
    *shard
        .stats
        .http
        .borrow_mut()
        .entry((endpoint, status))
        .or_default() += 1;
}

/// For `Expect: 100-continue` (RFC 9110 §10.1.1), before the body is read: the answer when the
/// request is refused whatever its body (unknown path or app, wrong method, missing or bad
/// signature, stale timestamp), counted like any other; `None` when the body is needed.
pub(super) fn refuse_before_body(shard: &Shard, req: &Request) -> Option<Response> {
    if shard.route_hook(&req.path).is_some() || req.path.starts_with("/bts-guru/") {
        return None;
    }
    let (status, body) = match resolve(shard, req) {
        Err(reply) => reply,
        // The signature covers the query, `body_md5` included, not the body itself: all but
        // the body's digest can be checked now (`route` checks everything again with the body).
        Ok(Target::Api(app_idx, _)) => match verify(shard, app_idx, req, &[]) {
            Ok(()) => return None,
            Err(reply) => reply,
        },
        Ok(Target::Up | Target::Ready) => return None,
    };
    count(shard, req, status);
    Some(Response::json(status, body))
}

/// A bounded label for metrics (never the raw path).
fn endpoint_label(req: &Request) -> &'static str {
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["up"] => "up",
        ["ready"] => "ready",
        ["apps", _, "events"] => "events",
        ["apps", _, "batch_events"] => "batch_events",
        ["apps", _, "channels"] => "channels",
        ["apps", _, "channels", _] => "channel",
        ["apps", _, "channels", _, "users"] => "channel_users",
        ["apps", _, "connections"] => "connections",
        ["apps", _, "users", _, "terminate_connections"] => "terminate_connections",
        ["console", ..] => "console",
        ["bts-guru", "resume.js" | "resume.mjs"] => "resume_script",
        _ => "other",
    }
}

/// Where a request goes, from its method and path alone.
enum Target {
    Up,
    Ready,
    Api(usize, Route),
}

/// Routes a request by method and path: the app and endpoint, or the refusal (404, 405, 426).
fn resolve(shard: &Shard, req: &Request) -> Result<Target, Reply> {
    if req.path == "/up" {
        return Ok(Target::Up);
    }
    if req.path == "/ready" {
        return Ok(Target::Ready);
    }
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let (app_id, rest) = match parts.as_slice() {
        ["apps", id, rest @ ..] if !rest.is_empty() => (*id, rest),
        ["app", _] => {
            return Err(err(
                426,
                "WebSocket connections need an Upgrade: websocket request",
            ))
        }
        _ => return Err(err(404, "Not found")),
    };
    let Some(app_idx) = shard.apps().by_id(app_id) else {
        return Err(err(404, &format!("Unknown app {app_id:?}")));
    };
    let method = req.method.as_str();
    let route = match (method, rest) {
        ("POST", ["events"]) => Route::Events,
        ("POST", ["batch_events"]) => Route::Batch,
        ("GET", ["channels"]) => Route::Channels,
        ("GET", ["channels", name]) => Route::Channel(decode(name)),
        ("GET", ["channels", name, "users"]) => Route::Users(decode(name)),
        ("GET", ["connections"]) => Route::Connections,
        ("POST", ["users", user, "terminate_connections"]) => Route::Terminate(decode(user)),
        (_, ["events" | "batch_events" | "channels" | "connections", ..] | ["users", ..]) => {
            return Err(err(405, "Method not allowed"))
        }
        _ => return Err(err(404, "Not found")),
    };
    Ok(Target::Api(app_idx, route))
}

/// Pusher's HTTP API signature: key, version, timestamp window, the signature over method, path
/// and query, and `body_md5` when `body` is not empty; 401 otherwise.
fn verify(shard: &Shard, app_idx: usize, req: &Request, body: &[u8]) -> Result<(), Reply> {
    let app = shard.app(app_idx);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    auth::verify_api_request(
        &app.key,
        &app.secret,
        &req.method,
        &req.path,
        &req.query,
        body,
        now,
    )
    .map_err(|e| err(401, &e.to_string()))
}

async fn route(shard: &Shard, req: &Request, body: &[u8]) -> Reply {
    let (app_idx, route) = match resolve(shard, req) {
        Err(reply) => return reply,
        Ok(Target::Up) => return up(shard),
        Ok(Target::Ready) => {
            // Readiness: false while draining, so load balancers stop sending new clients here.
            return if shard
                .shared
                .draining
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                (503, r#"{"ready":false,"draining":true}"#.to_owned())
            } else {
                (200, r#"{"ready":true}"#.to_owned())
            };
        }
        Ok(Target::Api(app_idx, route)) => (app_idx, route),
    };
    if let Err(reply) = verify(shard, app_idx, req, body) {
        return reply;
    }
    let shared = &shard.shared;
    let app = shard.app(app_idx);
    match route {
        Route::Events | Route::Batch => {
            publish(shard, app_idx, body, matches!(route, Route::Batch)).await
        }
        Route::Channels => channels(shard, app_idx, req).await,
        Route::Channel(name) => one_channel(shard, app_idx, &name, req).await,
        Route::Users(name) => users(shard, app_idx, &name).await,
        Route::Connections => match shard.query(app_idx, QueryKind::Connections).await {
            Some(parts) => {
                let n: u64 = parts.iter().map(|p| p.connections).sum();
                (200, json!({ "connections": n }).to_string())
            }
            None => err(503, INCOMPLETE),
        },
        Route::Terminate(user) => {
            if let Some(cluster) = &shared.cluster {
                cluster.publish(&Wire::Terminate {
                    node: shared.node,
                    app: app.id.clone(),
                    user: user.clone(),
                });
            }
            let user_id: Arc<str> = Arc::from(user.as_str());
            for s in 0..shared.router.shards() {
                let cmd = ShardCmd::TerminateUser {
                    app: app_idx,
                    user_id: Arc::clone(&user_id),
                };
                if shared.router.try_push(s, cmd).is_err() {
                    return err(503, "Server overloaded: could not reach every shard");
                }
            }
            (200, "{}".to_owned())
        }
    }
}

/// Health: 200 while serving; with Redis ingest on, its state and counters too (still 200 while
/// Redis is away: WebSocket and HTTP API keep working locally).
fn up(shard: &Shard) -> Reply {
    use std::sync::atomic::Ordering::Relaxed;
    let ingest = &shard.shared.ingest;
    if !ingest.enabled.load(Relaxed) {
        return (200, r#"{"health":"OK"}"#.to_owned());
    }
    let mut body = json!({
        "health": "OK",
        "redis": if ingest.connected.load(Relaxed) { "connected" } else { "disconnected" },
        "redis_reconnects": ingest.reconnects.load(Relaxed),
        "redis_events": ingest.events.load(Relaxed),
        "redis_malformed": ingest.malformed.load(Relaxed),
        "redis_dropped": ingest.dropped.load(Relaxed),
    });
    if let Some((down, since_ms)) = ingest.down_for() {
        body["redis_down_since"] = json!(since_ms / 1000);
        body["redis_down_secs"] = json!((down.as_secs_f64() * 10.0).round() / 10.0);
    }
    if let Some(cluster) = &shard.shared.cluster {
        let outbox = &cluster.outbox;
        let (bytes, events) = outbox.fill();
        body["cluster_node"] = json!(cluster.node.to_string());
        body["cluster_nodes"] = json!(cluster.peers().len() + 1);
        body["cluster_published"] = json!(outbox.published.load(Relaxed));
        body["cluster_dropped"] = json!(outbox.dropped.load(Relaxed));
        body["cluster_outbox_bytes"] = json!(bytes);
        body["cluster_outbox_events"] = json!(events);
        body["cluster_outbox_max_bytes"] = json!(outbox.limits().max_bytes);
        body["cluster_outbox_oldest_secs"] =
            json!(outbox
                .oldest_age()
                .map_or(0.0, |d| (d.as_secs_f64() * 10.0).round() / 10.0));
        body["cluster_refused"] = json!(outbox.refused.load(Relaxed));
        body["cluster_resent"] = json!(outbox.resent.load(Relaxed));
        body["cluster_duplicates"] = json!(cluster.duplicates.load(Relaxed));
        body["cluster_gaps"] = json!(cluster.gaps.load(Relaxed));
        body["cluster_lost"] = json!(cluster.lost.load(Relaxed));
    }
    (200, body.to_string())
}

enum Route {
    Events,
    Batch,
    Channels,
    Channel(String),
    Users(String),
    Connections,
    Terminate(String),
}

/// Percent-decodes one path segment (`%23server-to-user-1`).
fn decode(segment: &str) -> String {
    form_urlencoded::parse(format!("x={}", segment.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

async fn publish(shard: &Shard, app_idx: usize, body: &[u8], batch: bool) -> Reply {
    let shared = &shard.shared;
    let app = shard.app(app_idx);
    // Deserializing `data` (any JSON) and skipping unknown fields recurse once per level.
    if !depth::within(body, depth::MAX_JSON_DEPTH) {
        return err(
            400,
            &format!(
                "Invalid JSON body: nested deeper than {} levels",
                depth::MAX_JSON_DEPTH
            ),
        );
    }
    let mut body = body.to_vec();
    let events = if !batch {
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
        match check_event(e, app.max_message_size, batch) {
            Ok(c) => checked.push(c),
            Err((status, msg)) if batch => return err(status, &format!("batch[{i}]: {msg}")),
            Err((status, msg)) => return err(status, &msg),
        }
    }
    // Every event of the request, for every channel, at once: in a cluster the outbox takes
    // all of them or none (then none is delivered here either).
    let mut events = Vec::new();
    for c in &checked {
        for ch in &c.channels {
            events.push(Event {
                app: app_idx,
                channel: ch,
                frame: SharedFrame::event(&c.name, ch, &c.data_json),
                except: c.except,
                cache: channel::is_cache(ch),
                positioned: app.positioned(ch),
                settings: &app,
            });
        }
    }
    let dropped = match shared.publish_all(events) {
        Ok(dropped) => dropped,
        Err(refused) => return err(503, &refused.to_string()),
    };
    shard
        .stats
        .events_http
        .set(shard.stats.events_http.get() + checked.len() as u64);
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
    // `info`: counts after the publish, per channel.
    let mut items = Vec::with_capacity(checked.len());
    for c in &checked {
        if !c.info.any() {
            items.push(json!({}));
            continue;
        }
        let mut chans = Map::new();
        for ch in &c.channels {
            let Some(parts) = shard
                .query(
                    app_idx,
                    QueryKind::Channel {
                        name: Arc::from(ch.as_str()),
                    },
                )
                .await
            else {
                return err(503, INCOMPLETE);
            };
            let (subs, users) = merge(&parts).get(ch).copied().unwrap_or_default();
            let mut o = Map::new();
            if c.info.subscription_count {
                o.insert("subscription_count".into(), json!(subs));
            }
            if c.info.user_count && ChannelKind::of(ch) == ChannelKind::Presence {
                o.insert("user_count".into(), json!(users.unwrap_or(0)));
            }
            chans.insert(ch.clone(), Value::Object(o));
        }
        items.push(json!({ "channels": chans }));
    }
    if !batch {
        let item = items.pop().unwrap_or_else(|| json!({}));
        (200, item.to_string())
    } else {
        (200, json!({ "batch": items }).to_string())
    }
}

/// `GET /apps/{id}/channels`. Pusher's API has no paging, so a listing is bounded instead: over
/// `server.max_channels_listed` channels it is refused (400, naming `filter_by_prefix`). Each
/// shard builds its part in slices and this one merges and writes the answer in slices too, so
/// none of them stops serving its sockets for the whole listing.
async fn channels(shard: &Shard, app_idx: usize, req: &Request) -> Reply {
    let prefix = req.query_param("filter_by_prefix").unwrap_or_default();
    let info = Info::parse(req.query_param("info"));
    if info.user_count && !prefix.starts_with("presence-") {
        return err(400, "info=user_count needs filter_by_prefix=presence-");
    }
    let what = QueryKind::Channels {
        prefix: prefix.to_owned(),
    };
    let Some(parts) = shard.query(app_idx, what).await else {
        return err(503, INCOMPLETE);
    };
    let cap = shard.shared.cfg.max_channels_listed;
    let too_many = || {
        err(
            400,
            &format!(
                "more than {cap} channels match: narrow the listing with filter_by_prefix \
                 (the limit is server.max_channels_listed)"
            ),
        )
    };
    let mut merged: BTreeMap<String, (u64, Option<u64>)> = BTreeMap::new();
    let mut taken = 0usize;
    for c in parts.into_iter().flat_map(|p| p.channels) {
        let e = merged.entry(c.name).or_default();
        e.0 += c.subscriptions;
        if c.users.is_some() {
            e.1 = e.1.max(c.users);
        }
        if merged.len() > cap {
            return too_many();
        }
        taken += 1;
        if taken % super::LISTING_SLICE == 0 {
            super::breathe().await;
        }
    }
    // `{"channels":{name:{…},…}}`, byte for byte what serializing one `json!` value gave.
    let mut out = br#"{"channels":{"#.to_vec();
    let mut first = true;
    for (i, (name, (subs, users))) in merged.into_iter().enumerate() {
        if subs == 0 && users.unwrap_or(0) == 0 {
            continue;
        }
        let mut o = Map::new();
        if info.user_count {
            o.insert("user_count".into(), json!(users.unwrap_or(0)));
        }
        if info.subscription_count {
            o.insert("subscription_count".into(), json!(subs));
        }
        if !first {
            out.push(b',');
        }
        first = false;
        let _ = serde_json::to_writer(&mut out, &name);
        out.push(b':');
        let _ = serde_json::to_writer(&mut out, &Value::Object(o));
        if (i + 1) % super::LISTING_SLICE == 0 {
            super::breathe().await;
        }
    }
    out.extend_from_slice(b"}}");
    (200, String::from_utf8(out).unwrap_or_default())
}

async fn one_channel(shard: &Shard, app_idx: usize, name: &str, req: &Request) -> Reply {
    if let Err(e) = channel::validate(name) {
        return err(400, &format!("Invalid channel {name:?}: {e}"));
    }
    let info = Info::parse(req.query_param("info"));
    let presence = ChannelKind::of(name) == ChannelKind::Presence;
    if info.user_count && !presence {
        return err(400, "info=user_count is only for presence channels");
    }
    if info.cache && !channel::is_cache(name) {
        return err(400, "info=cache is only for cache channels");
    }
    let what = QueryKind::Channel {
        name: Arc::from(name),
    };
    let Some(parts) = shard.query(app_idx, what).await else {
        return err(503, INCOMPLETE);
    };
    let (subs, users) = merge(&parts).get(name).copied().unwrap_or_default();
    let mut o = Map::new();
    o.insert("occupied".into(), json!(subs > 0));
    if info.user_count {
        o.insert("user_count".into(), json!(users.unwrap_or(0)));
    }
    if info.subscription_count {
        o.insert("subscription_count".into(), json!(subs));
    }
    if info.cache {
        if let Some((frame, ttl)) = shard.cached(app_idx, name) {
            // The cached frame's payload is the event JSON; report its event and data.
            let payload = crate::ws::codec::payload_of(&frame);
            if let Ok(Value::Object(ev)) = serde_json::from_slice::<Value>(payload) {
                o.insert(
                    "cache".into(),
                    json!({ "event": ev.get("event"), "data": ev.get("data"), "ttl": ttl }),
                );
            }
        }
    }
    (200, Value::Object(o).to_string())
}

async fn users(shard: &Shard, app_idx: usize, name: &str) -> Reply {
    if ChannelKind::of(name) != ChannelKind::Presence || channel::validate(name).is_err() {
        return err(400, "users are only listed for presence channels");
    }
    let what = QueryKind::Users {
        channel: Arc::from(name),
    };
    let Some(parts) = shard.query(app_idx, what).await else {
        return err(503, INCOMPLETE);
    };
    // Each node's owner shard lists the whole channel; merge them without repeats.
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<String> = parts
        .into_iter()
        .filter_map(|p| p.users)
        .flatten()
        .filter(|id| seen.insert(id.clone()))
        .collect();
    let users: Vec<Value> = ids.into_iter().map(|id| json!({ "id": id })).collect();
    (200, json!({ "users": users }).to_string())
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
    let encrypted = channels
        .iter()
        .filter(|c| ChannelKind::of(c) == ChannelKind::PrivateEncrypted)
        .count();
    if encrypted > 0 && encrypted < channels.len() {
        return Err((
            400,
            "An event to an encrypted channel cannot name other channels".to_owned(),
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
        info: Info::parse(e.info.as_deref()),
    })
}
