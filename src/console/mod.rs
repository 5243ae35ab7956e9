//! The debug console: a page at `/console`, served by every shard's HTTP phase when enabled
//! (`--console`, `BTS_CONSOLE=true` or `[server] console = true`; off by default), and the JSON
//! it polls every second (`/console/api/stats`).
//!
//! The stats come from the machinery `/metrics` and the HTTP API already use: a scrape of every
//! shard (`exporter::gather`, run on glommio's blocking pool so this shard stays free to answer its
//! own part) and a channel query across shards (`Shard::query`). The page's live parts (the
//! scoreboard and the event tail) are not served from here: the page subscribes with pusher-js,
//! vendored in `assets/` and embedded in the binary, over the ordinary `/app/{key}` WebSocket.
//!
//! Adds no state to the shard: every request is answered from a fresh scrape. The one thing it
//! keeps is, per shard thread, a bounded count of failed logins per source address
//! (`Logins`): 10 in a minute and that address gets 429 for the rest of the minute.
//! Must not serve anything but the login page without the token (compared exactly, in constant
//! time). Every answer says not to cache it, not to send it as a referrer, not to frame it.

pub mod demo;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fanout::router::QueryKind;
use crate::metrics::Snapshot;
use crate::protocol::auth;
use crate::shard::http::RouteHook;
use crate::shard::Shard;
use crate::ws::handshake::{Request, Response};

const INDEX_HTML: &str = include_str!("assets/index.html");
const LOGIN_HTML: &str = include_str!("assets/login.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");
/// pusher-js 8.6.0 `dist/web/pusher.min.js`, unmodified (see `assets/VENDORED.md`).
const PUSHER_JS: &str = include_str!("assets/pusher.min.js");
const PUSHER_LICENSE: &str = include_str!("assets/pusher-js-LICENCE.txt");

/// Most channels listed in one stats answer (the busiest first).
pub const MAX_CHANNELS_LISTED: usize = 200;

/// On every console answer: the token may travel in the URL, so the page must not be kept by a
/// cache, sent on as a `Referer`, or framed by another site.
const HEADERS: &[(&str, &str)] = &[
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
];
const LOCKED_HEADERS: &[(&str, &str)] = &[
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Retry-After", "60"),
];

/// Failed logins (a wrong token) one source address may make per `FAILURE_WINDOW` on a shard
/// before its console requests are refused with 429 until the window ends.
pub const MAX_FAILED_LOGINS: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked per shard; when that many failed within the window, further addresses
/// share one entry (so many addresses cannot grow the table, only lock each other out).
const MAX_TRACKED: usize = 1024;

thread_local! {
    /// Per shard thread: failed logins per source address (`Logins`).
    static LOGINS: RefCell<Logins> = RefCell::new(Logins::default());
}

/// Failed logins per source: (start of its window, failures in it). IPv6 sources count per
/// /64, the block one host usually holds.
#[derive(Default)]
struct Logins {
    failed: HashMap<IpAddr, (Instant, u32)>,
}

impl Logins {
    fn source(peer: IpAddr) -> IpAddr {
        match peer {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & (!0u128 << 64)).into()),
            },
            v4 => v4,
        }
    }

    /// How long `peer` is still refused, if it is.
    fn locked(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let (start, n) = self.failed.get(&Self::source(peer))?;
        let end = *start + FAILURE_WINDOW;
        (*n >= MAX_FAILED_LOGINS && now < end).then(|| end - now)
    }

    fn fail(&mut self, peer: IpAddr, now: Instant) {
        let mut source = Self::source(peer);
        if !self.failed.contains_key(&source) && self.failed.len() >= MAX_TRACKED {
            self.failed
                .retain(|_, (start, _)| now.duration_since(*start) < FAILURE_WINDOW);
            if self.failed.len() >= MAX_TRACKED {
                source = IpAddr::V4(Ipv4Addr::BROADCAST);
            }
        }
        let e = self.failed.entry(source).or_insert((now, 0));
        if now.duration_since(e.0) >= FAILURE_WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Whether `path` belongs to the console.
pub fn serves(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

/// The console's routes, which `lib::run` installs on every shard when the console is on.
pub struct ConsoleRoutes;

impl RouteHook for ConsoleRoutes {
    fn claims(&self, path: &str) -> bool {
        serves(path)
    }

    fn handle<'a>(
        &'a self,
        shard: &'a Shard,
        req: &'a Request,
        peer: IpAddr,
    ) -> Pin<Box<dyn Future<Output = Response> + 'a>> {
        Box::pin(handle(shard, req, peer))
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    Response {
        status: 200,
        content_type,
        body: Cow::Borrowed(body.as_bytes()),
        headers: &[],
    }
}

fn json_error(status: u16, msg: &str) -> Response {
    Response::json(status, json!({ "error": msg }).to_string())
}

/// Answers a request for a console path (only called when the console is enabled); `peer` is
/// the client's address, for the failed-login limit.
pub async fn handle(shard: &Shard, req: &Request, peer: IpAddr) -> Response {
    let mut resp = answer(shard, req, peer).await;
    if resp.headers.is_empty() {
        resp.headers = HEADERS;
    }
    resp
}

async fn answer(shard: &Shard, req: &Request, peer: IpAddr) -> Response {
    if req.method != "GET" {
        return json_error(405, "Method not allowed");
    }
    // Static code, no data: served without the token so the login page can be styled and the
    // page can load before it has checked the token.
    match req.path.as_str() {
        "/console/console.js" => return asset(JS, CONSOLE_JS),
        "/console/console.css" => return asset("text/css; charset=utf-8", CONSOLE_CSS),
        "/console/pusher.min.js" => return asset(JS, PUSHER_JS),
        "/console/pusher-js-LICENCE.txt" => return asset(TEXT, PUSHER_LICENSE),
        _ => {}
    }
    let cfg = &shard.shared.cfg;
    let apps = shard.apps();
    let app = match req.query_param("app") {
        // The first app of the configuration (that a reload has not removed).
        None => match apps.live().next() {
            Some((i, _)) => i,
            None => return json_error(404, "No app configured"),
        },
        Some(id) => match apps.by_id(id) {
            Some(i) => i,
            None => return json_error(404, &format!("Unknown app {id:?}")),
        },
    };
    let expected = cfg
        .console
        .as_ref()
        .and_then(|c| c.token.as_deref())
        .unwrap_or(&apps.get(app).secret);
    let guarded = matches!(
        req.path.as_str(),
        "/console" | "/console/" | "/console/api/stats"
    );
    let now = Instant::now();
    if guarded {
        if let Some(wait) = LOGINS.with(|l| l.borrow().locked(peer, now)) {
            // Refused whatever the token: a right guess must not answer differently.
            return Response {
                headers: LOCKED_HEADERS,
                ..json_error(
                    429,
                    &format!(
                        "too many failed console logins from this address: try again in {} s",
                        wait.as_secs().max(1)
                    ),
                )
            };
        }
    }
    let presented = presented_token(req);
    let allowed = presented.is_some_and(|t| token_matches(t, expected));
    if guarded && presented.is_some() && !allowed {
        LOGINS.with(|l| l.borrow_mut().fail(peer, now));
    }
    match req.path.as_str() {
        "/console" | "/console/" if allowed => asset(HTML, INDEX_HTML),
        "/console" | "/console/" => Response {
            status: 401,
            ..asset(HTML, LOGIN_HTML)
        },
        "/console/api/stats" if allowed => stats(shard, app).await,
        "/console/api/stats" => json_error(
            401,
            "the console needs its token: ?token= or Authorization: Bearer",
        ),
        _ => json_error(404, "Not found"),
    }
}

/// The token from `?token=` or `Authorization: Bearer …`.
fn presented_token(req: &Request) -> Option<&str> {
    req.query_param("token").or_else(|| {
        let h = req.authorization.as_deref()?;
        let (scheme, token) = h.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    })
}

/// Exact, constant-time comparison: each side is the *message* of an HMAC under one fixed key,
/// and the two 32-byte MACs are compared with `verify_slice` (`subtle`), so the response time
/// tells neither how much of a guess was right nor the token's length. (Keying the HMAC by the
/// token instead, as before, compared keys, and HMAC pads a short key with zeros: `secret` and
/// `secret\0` were the same key, so `?token=secret%00` opened the console.)
fn token_matches(given: &str, expected: &str) -> bool {
    const KEY: &str = "bts-guru console token";
    !given.is_empty() && auth::verify(KEY, given.as_bytes(), &auth::sign(KEY, expected.as_bytes()))
}

/// Scrapes every shard of this node (as `/metrics` does) without blocking this shard.
async fn scrape(shard: &Shard) -> Vec<Snapshot> {
    let shared = Arc::clone(&shard.shared);
    glommio::executor()
        .spawn_blocking(move || crate::exporter::gather(&shared))
        .await
}

async fn stats(shard: &Shard, app: usize) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let shared = &shard.shared;
    let snaps = scrape(shard).await;
    // Each shard's busiest channels only, not a listing of all: the page polls every second.
    let parts = shard
        .query(
            app,
            QueryKind::TopChannels {
                limit: MAX_CHANNELS_LISTED,
            },
        )
        .await;
    let redis = shared.ingest.events.load(Relaxed);
    let cluster = shared
        .cluster
        .as_ref()
        .map_or(0, |c| c.messages.load(Relaxed));
    let a = shard.app(app);
    let mut body = summarize(&snaps, app, redis, cluster);
    body["time_ms"] = json!(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64));
    body["app"] = json!({ "id": a.id, "key": a.key });
    body["shard_count"] = json!(shared.router.shards());
    body["scoreboard"] = json!(crate::simulate::sport_channels());
    match parts {
        Some(parts) => {
            let merged = crate::shard::merge(&parts);
            // Exact while every shard listed all its channels; beyond, at least the largest
            // shard's count (a channel with subscribers on several shards is one channel).
            let complete = parts
                .iter()
                .all(|p| p.channels_total as usize <= MAX_CHANNELS_LISTED);
            let most = parts.iter().map(|p| p.channels_total).max().unwrap_or(0);
            body["channel_count"] = json!((merged.len() as u64).max(most));
            body["channel_count_exact"] = json!(complete);
            body["channels"] = channel_list(merged);
        }
        // A shard did not answer in time: say so rather than show a partial count.
        None => body["channels"] = Value::Null,
    }
    Response::json(200, body.to_string())
}

/// The node-wide numbers of one scrape: connections of `app` per shard, events in by source,
/// frames and bytes out, and delivery-latency percentiles (microseconds, since start).
fn summarize(snaps: &[Snapshot], app: usize, redis_events: u64, cluster_events: u64) -> Value {
    let shards: Vec<Value> = snaps
        .iter()
        .map(|s| {
            json!({
                "shard": s.shard,
                "connections": s.connections.get(app).copied().unwrap_or(0),
            })
        })
        .collect();
    let connections: u64 = snaps
        .iter()
        .map(|s| s.connections.get(app).copied().unwrap_or(0))
        .sum();
    let http: u64 = snaps.iter().map(|s| s.events_http).sum();
    let client: u64 = snaps.iter().map(|s| s.events_client).sum();
    let mut latency = crate::metrics::new_histogram();
    for s in snaps {
        let _ = latency.add(&s.latency);
    }
    let q = |quantile: f64| {
        if latency.is_empty() {
            0
        } else {
            latency.value_at_quantile(quantile)
        }
    };
    json!({
        "shards": shards,
        "connections": connections,
        "events_in": { "http": http, "client": client, "redis": redis_events, "cluster": cluster_events },
        "events_in_total": http + client + redis_events + cluster_events,
        "frames_out": snaps.iter().map(|s| s.frames_out).sum::<u64>(),
        "bytes_out": snaps.iter().map(|s| s.bytes_out).sum::<u64>(),
        "latency_us": {
            "count": latency.len(),
            "p50": q(0.5),
            "p90": q(0.9),
            "p99": q(0.99),
            "p999": q(0.999),
            "max": latency.max(),
        },
    })
}

/// Channels with their subscriptions (and presence users), busiest first, at most
/// `MAX_CHANNELS_LISTED`.
fn channel_list(merged: std::collections::BTreeMap<String, (u64, Option<u64>)>) -> Value {
    let mut list: Vec<(String, u64, Option<u64>)> = merged
        .into_iter()
        .filter(|(_, (subs, users))| *subs > 0 || users.unwrap_or(0) > 0)
        .map(|(name, (subs, users))| (name, subs, users))
        .collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    list.truncate(MAX_CHANNELS_LISTED);
    Value::Array(
        list.into_iter()
            .map(|(name, subs, users)| match users {
                Some(u) => json!({ "name": name, "subscriptions": subs, "users": u }),
                None => json!({ "name": name, "subscriptions": subs }),
            })
            .collect(),
    )
}

/// The console's address for a daemon listening on `addr`, token included (percent-encoded).
/// An unspecified bind address (`0.0.0.0`, `::`) is shown as loopback, which always reaches it.
pub fn url(addr: std::net::SocketAddr, token: &str) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let host = std::net::SocketAddr::new(ip, addr.port());
    let token: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
    format!("http://{host}/console?token={token}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::handshake;

    fn req(raw: &str) -> Request {
        handshake::parse(raw.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn token_from_query_or_bearer_header() {
        let r = req("GET /console?token=a%2Bb HTTP/1.1\r\n\r\n");
        assert_eq!(presented_token(&r), Some("a+b"));
        let r = req("GET /console/api/stats HTTP/1.1\r\nAuthorization: bearer  s3cret \r\n\r\n");
        assert_eq!(presented_token(&r), Some("s3cret"));
        let r = req("GET /console/api/stats HTTP/1.1\r\nAuthorization: Basic eDp5\r\n\r\n");
        assert_eq!(presented_token(&r), None);
        assert_eq!(presented_token(&req("GET /console HTTP/1.1\r\n\r\n")), None);
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches("bts-guru-dev-secret", "bts-guru-dev-secret"));
        assert!(!token_matches("bts-guru-dev-secre", "bts-guru-dev-secret"));
        assert!(!token_matches(
            "bts-guru-dev-secretX",
            "bts-guru-dev-secret"
        ));
        assert!(!token_matches("", ""));
        assert!(!token_matches("BTS-GURU-DEV-SECRET", "bts-guru-dev-secret"));
        // Zero bytes after the token made the same HMAC key as the token itself.
        assert!(!token_matches(
            "bts-guru-dev-secret\0",
            "bts-guru-dev-secret"
        ));
        assert!(!token_matches(
            "bts-guru-dev-secret\0\0\0",
            "bts-guru-dev-secret"
        ));
        assert!(!token_matches(
            "bts-guru-dev-secret",
            "bts-guru-dev-secret\0"
        ));
    }

    #[test]
    fn failed_logins_lock_out_their_source_for_the_window() {
        let mut l = Logins::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..MAX_FAILED_LOGINS - 1 {
            l.fail(a, t0);
        }
        assert_eq!(l.locked(a, t0), None);
        l.fail(a, t0);
        assert_eq!(l.locked(a, t0), Some(FAILURE_WINDOW));
        assert_eq!(l.locked(b, t0), None, "another address is not locked");
        assert_eq!(l.locked(a, t0 + FAILURE_WINDOW), None, "the window ends");
        // IPv6 counts per /64; an IPv4-mapped address as the IPv4 one.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        for i in 0..MAX_FAILED_LOGINS {
            l.fail(v6(&format!("2001:db8::{i:x}")), t0);
        }
        assert!(l.locked(v6("2001:db8::ffff:1"), t0).is_some());
        assert!(l.locked(v6("2001:db8:0:1::1"), t0).is_none());
        assert!(l.locked(v6("::ffff:192.0.2.1"), t0).is_some());
        // Bounded: past MAX_TRACKED addresses, new ones share one entry.
        for i in 0..MAX_TRACKED as u32 * 2 {
            l.fail(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), t0);
        }
        assert!(l.failed.len() <= MAX_TRACKED + 1);
    }

    #[test]
    fn console_paths() {
        assert!(serves("/console") && serves("/console/") && serves("/console/api/stats"));
        assert!(!serves("/consoles") && !serves("/apps/1/console") && !serves("/"));
    }

    #[test]
    fn url_shows_loopback_for_unspecified_and_encodes_the_token() {
        assert_eq!(
            url("0.0.0.0:8080".parse().unwrap(), "a b&c"),
            "http://127.0.0.1:8080/console?token=a+b%26c"
        );
        assert_eq!(
            url("[::]:9000".parse().unwrap(), "t"),
            "http://[::1]:9000/console?token=t"
        );
        assert_eq!(
            url("10.1.2.3:80".parse().unwrap(), "t"),
            "http://10.1.2.3:80/console?token=t"
        );
    }

    #[test]
    fn summary_sums_shards_for_one_app() {
        let snap = |shard: usize, conns: Vec<u64>, http: u64, lat: &[u64]| {
            let mut latency = crate::metrics::new_histogram();
            for &us in lat {
                latency.record(us).unwrap();
            }
            Snapshot {
                shard,
                connections: conns,
                connects: 0,
                closes: Default::default(),
                events_http: http,
                events_client: 1,
                frames_out: 10,
                bytes_out: 100,
                writes_out: 5,
                slow_consumer_closes: 0,
                frames_conflated: 0,
                frames_delta: 0,
                inbox_overflows: 0,
                channels: Vec::new(),
                http: Default::default(),
                subscribes_refused: Default::default(),
                replayed: 0,
                recovered: 0,
                not_recovered: 0,
                latency,
            }
        };
        let snaps = [
            snap(0, vec![3, 7], 5, &[100, 200]),
            snap(1, vec![2, 0], 4, &[300]),
        ];
        let v = summarize(&snaps, 0, 6, 0);
        assert_eq!(v["connections"], 5);
        assert_eq!(v["shards"][1], json!({ "shard": 1, "connections": 2 }));
        assert_eq!(v["events_in"]["http"], 9);
        assert_eq!(v["events_in_total"], 9 + 2 + 6);
        assert_eq!(
            (v["frames_out"].clone(), v["bytes_out"].clone()),
            (json!(20), json!(200))
        );
        let l = &v["latency_us"];
        assert_eq!(l["count"], 3);
        assert!((199..=201).contains(&l["p50"].as_u64().unwrap()), "{l}");
        assert!((299..=301).contains(&l["max"].as_u64().unwrap()), "{l}");
        let empty = summarize(&[], 0, 0, 0);
        assert_eq!(empty["latency_us"]["p99"], 0);
        assert_eq!(empty["connections"], 0);
    }

    #[test]
    fn channel_list_is_busiest_first_and_bounded() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("b".to_owned(), (2, None));
        m.insert("a".to_owned(), (2, None));
        m.insert("presence-x".to_owned(), (0, Some(3)));
        m.insert("z".to_owned(), (9, None));
        m.insert("gone".to_owned(), (0, None));
        let v = channel_list(m);
        let names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["z", "a", "b", "presence-x"]);
        assert_eq!(v[3]["users"], 3);
        let many = (0..MAX_CHANNELS_LISTED + 5)
            .map(|i| (format!("c{i}"), (1, None)))
            .collect();
        assert_eq!(
            channel_list(many).as_array().unwrap().len(),
            MAX_CHANNELS_LISTED
        );
    }
}
