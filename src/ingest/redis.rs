//! Laravel's `redis` broadcaster as an ingest path, on a dedicated thread.
//!
//! Laravel (BROADCAST_CONNECTION=redis) PUBLISHes `{"event":E,"data":{...},"socket":S|null}` to
//! `<REDIS_PREFIX><channel>` for each channel of an event (one EVAL publishing the same payload to
//! every channel). This thread PSUBSCRIBEs `<prefix>*`, strips the prefix, parses with simd-json,
//! frames each event once, and hands it to every shard through the router (bounded inboxes that
//! wake their shard; a full inbox drops that shard's copy and counts it: the thread never blocks
//! on a shard).
//!
//! It is the only code allowed to block: a plain std thread pinned to its own CPU, using the
//! redis crate's blocking `PubSub::get_message`. When Redis is unreachable or drops, it retries
//! with a backoff capped at one second and resubscribes; pub/sub has no replay, so what was
//! published meanwhile is lost and nothing is delivered twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use simd_json::prelude::*;
use simd_json::BorrowedValue;

use crate::config::RedisConfig;
use crate::fanout::frame::SharedFrame;
use crate::node::{Event, Shared};
use crate::protocol::{channel, depth, outbound, SocketId};

/// Why a Redis message was not turned into an event.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not a JSON object")]
    NotAnObject,
    #[error("payload has no \"event\" string")]
    NoEvent,
    #[error("payload has no \"data\"")]
    NoData,
    #[error("invalid channel name")]
    BadChannel,
    #[error("event name longer than 200 characters")]
    LongEvent,
    #[error("payload nested deeper than {} levels", depth::MAX_JSON_DEPTH)]
    TooDeep,
}

/// An event decoded from Laravel's payload.
#[derive(Debug, PartialEq, Eq)]
pub struct LaravelEvent {
    pub event: String,
    /// `data` JSON-encoded, then escaped as a JSON string literal (ready to frame).
    pub data_json: Vec<u8>,
    pub except: Option<SocketId>,
}

/// Decodes `{"event":E,"data":D,"socket":S|null}`. `payload` is scratch for simd-json.
pub fn decode(payload: &mut [u8]) -> Result<LaravelEvent, PayloadError> {
    // Building the value, serializing `data` again and dropping it recurse once per level.
    if !depth::within(payload, depth::MAX_JSON_DEPTH) {
        return Err(PayloadError::TooDeep);
    }
    let v = simd_json::to_borrowed_value(payload).map_err(|_| PayloadError::NotAnObject)?;
    let BorrowedValue::Object(obj) = v else {
        return Err(PayloadError::NotAnObject);
    };
    let event = obj
        .get("event")
        .and_then(|e| e.as_str())
        .filter(|e| !e.is_empty())
        .ok_or(PayloadError::NoEvent)?;
    if event.len() > 200 {
        return Err(PayloadError::LongEvent);
    }
    // Laravel's data is an array (a JSON object); Pusher wants it JSON-encoded as a string.
    let data = match obj.get("data").ok_or(PayloadError::NoData)? {
        BorrowedValue::String(s) => s.to_string(),
        other => simd_json::to_string(other).map_err(|_| PayloadError::NoData)?,
    };
    let mut data_json = Vec::with_capacity(data.len() + 16);
    outbound::push_json_str(&mut data_json, &data);
    let except = obj
        .get("socket")
        .and_then(|s| s.as_str())
        .and_then(SocketId::parse);
    Ok(LaravelEvent {
        event: event.to_owned(),
        data_json,
        except,
    })
}

/// The PSUBSCRIBE pattern for `prefix`: glob characters in the prefix are escaped.
pub fn pattern(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('*');
    p
}

/// Starts the ingest thread, pinned to `cfg.cpu`.
pub fn spawn(
    cfg: RedisConfig,
    shared: Arc<Shared>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    shared.ingest.enabled.store(true, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("bts-redis-ingest".into())
        .spawn(move || {
            if let Err(e) = crate::sys::pin_to_cpu(cfg.cpu) {
                tracing::warn!(cpu = cfg.cpu, error = %e, "cannot pin the Redis ingest thread");
            }
            run(&cfg, &shared)
        })
}

const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Why connecting and subscribing to Redis failed, as the log says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Redis refused the credentials (a wrong REDIS_PASSWORD or REDIS_USERNAME, a password sent
    /// to a Redis without one, or none sent to a Redis that needs one).
    Authentication,
    /// The credentials were accepted but the user may not PSUBSCRIBE/SUBSCRIBE (Redis ACLs).
    Permission,
    /// Anything else: nothing listening, a timeout, a TLS failure, a dropped connection.
    Unreachable,
}

impl Failure {
    pub fn of(e: &redis::RedisError) -> Failure {
        if e.kind() == redis::ErrorKind::AuthenticationFailed {
            return Failure::Authentication;
        }
        match e.code() {
            // NOAUTH: no credentials sent; WRONGPASS: Redis 6+ ACL users.
            Some("NOAUTH" | "WRONGPASS") => Failure::Authentication,
            Some("NOPERM") => Failure::Permission,
            _ => Failure::Unreachable,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Failure::Authentication => {
                "Redis authentication failed (check REDIS_PASSWORD and REDIS_USERNAME, or the \
                 credentials in REDIS_URL)"
            }
            Failure::Permission => {
                "Redis refused the subscription: its ACL does not allow this user PSUBSCRIBE"
            }
            Failure::Unreachable => "Redis unreachable",
        }
    }
}

fn run(cfg: &RedisConfig, shared: &Shared) {
    let stats = &shared.ingest;
    let mut backoff = Duration::from_millis(50);
    let mut ever_connected = false;
    let mut last_error_log: Option<Instant> = None;
    let pattern = pattern(&cfg.prefix);
    // Cluster-wide webhook decisions: this thread's alone, kept across reconnects.
    let mut arbiter = super::cluster::Arbiter::default();
    let mut positions = super::positions::Positions::default();
    loop {
        let conn = cfg
            .client()
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)));
        // The PubSub handle must live as long as the subscription: dropping it unsubscribes.
        let subscribed = conn.and_then(|mut conn| {
            // A PING first: a Redis that wants a password answers NOAUTH here, while a
            // PSUBSCRIBE's refusal would only arrive later, looking like a dropped connection.
            redis::cmd("PING").query::<()>(&mut conn)?;
            let mut pubsub = conn.as_pubsub();
            pubsub.psubscribe(&pattern)?;
            if let Some(cluster) = &shared.cluster {
                pubsub.subscribe(&cluster.channel)?;
                pubsub.subscribe(crate::resume::store::announce_channel(&cluster.channel))?;
                // Wake up at least once a second to notice silent cluster nodes.
                pubsub.set_read_timeout(Some(Duration::from_secs(1)))?;
                super::cluster::announce(shared);
            }
            stats.connected.store(true, Ordering::Relaxed);
            if ever_connected {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            ever_connected = true;
            backoff = Duration::from_millis(50);
            tracing::info!(redis = %cfg.redacted_url(), %pattern, "Redis ingest subscribed");
            if shared.cluster.is_some() {
                // Subscribed first: what is announced meanwhile waits in the socket, and
                // `deliver_at` skips what the preload already holds.
                positions.preload(cfg, shared);
            }
            let err = consume(cfg, shared, &mut arbiter, &mut positions, &mut pubsub);
            stats.connected.store(false, Ordering::Relaxed);
            match Failure::of(&err) {
                Failure::Unreachable => {
                    tracing::warn!(error = %err, "Redis ingest lost its connection; reconnecting")
                }
                refused => tracing::warn!(
                    error = %err,
                    "{}; Redis ingest reconnecting",
                    refused.describe()
                ),
            }
            Ok(())
        });
        match subscribed {
            Ok(()) => {}
            Err(e) => {
                // Log the first failure, then at most every 30 s while it keeps failing.
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::warn!(
                        redis = %cfg.redacted_url(),
                        error = %e,
                        "{}; serving WebSocket and HTTP API locally, retrying",
                        Failure::of(&e).describe()
                    );
                    last_error_log = Some(Instant::now());
                }
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reads messages until the connection fails; returns the error.
fn consume(
    cfg: &RedisConfig,
    shared: &Shared,
    arbiter: &mut super::cluster::Arbiter,
    positions: &mut super::positions::Positions,
    pubsub: &mut redis::PubSub<'_>,
) -> redis::RedisError {
    let stats = &shared.ingest;
    let mut last_warn: Option<Instant> = None;
    let mut suppressed = 0u64;
    // The app's settings, re-read once a second so a reload's new limits apply.
    let mut apps = shared.apps.current();
    let cluster_channel = shared.cluster.as_ref().map(|c| c.channel.as_str());
    let announce_channel = shared
        .cluster
        .as_ref()
        .map(|c| crate::resume::store::announce_channel(&c.channel));
    let mut last_tick = Instant::now();
    loop {
        if last_tick.elapsed() >= Duration::from_secs(1) {
            super::cluster::tick(shared, arbiter);
            positions.gc();
            apps = shared.apps.current();
            last_tick = Instant::now();
        }
        let msg = match pubsub.get_message() {
            Ok(m) => m,
            Err(e) if e.is_timeout() => continue,
            Err(e) => return e,
        };
        let name = msg.get_channel_name();
        if Some(name) == cluster_channel {
            super::cluster::receive(shared, arbiter, msg.get_payload_bytes());
            continue;
        }
        if Some(name) == announce_channel.as_deref() {
            positions.announced(cfg, shared, msg.get_payload_bytes());
            continue;
        }
        let Some(channel) = name.strip_prefix(cfg.prefix.as_str()) else {
            continue;
        };
        let raw = msg.get_payload_bytes();
        let mut payload = raw.to_vec();
        let decoded = if channel::validate(channel).is_err() {
            Err(PayloadError::BadChannel)
        } else {
            decode(&mut payload)
        };
        let ev = match decoded {
            Ok(ev) => ev,
            Err(e) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                // Rate-limited: one line per 10 s, with how many were not logged.
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(channel = name, error = %e, suppressed, "ignored a Redis message that is not a Laravel broadcast");
                    last_warn = Some(Instant::now());
                    suppressed = 0;
                } else {
                    suppressed += 1;
                }
                continue;
            }
        };
        if ev.data_json.len() > apps.get(cfg.app).max_message_size + 2 {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        stats.events.fetch_add(1, Ordering::Relaxed);
        let event = Event {
            app: cfg.app,
            channel,
            frame: SharedFrame::event(&ev.event, channel, &ev.data_json),
            except: ev.except,
            cache: channel::is_cache(channel),
            positioned: apps.get(cfg.app).positioned(channel),
            settings: apps.get(cfg.app),
        };
        if event.positioned && shared.cluster.is_some() {
            // Every node offers it with the same id; Redis appends it once and announces it.
            let id = positions.dedupe_id(channel, msg.get_payload_bytes());
            shared.offer(&event, Some(id));
            continue;
        }
        // Every node consumes Redis itself: delivered here only, never replicated.
        let dropped = shared.deliver(event);
        if dropped > 0 {
            stats.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laravel_payloads() {
        let mut p = br#"{"event":"match.update","data":{"match_id":12345,"home_team":{"score":2}},"socket":null}"#.to_vec();
        let ev = decode(&mut p).unwrap();
        assert_eq!(ev.event, "match.update");
        let data: String = serde_json::from_slice(&ev.data_json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["home_team"]["score"], 2);
        assert_eq!(ev.except, None);
        let mut p = br#"{"event":"App\\Events\\Goal","data":[],"socket":"123.456"}"#.to_vec();
        let ev = decode(&mut p).unwrap();
        assert_eq!(ev.event, r"App\Events\Goal");
        assert_eq!(ev.except, Some(SocketId { hi: 123, lo: 456 }));
        for bad in [
            &b"nope"[..],
            b"[]",
            br#"{"data":{}}"#,
            br#"{"event":"e"}"#,
            br#"{"event":5,"data":{}}"#,
        ] {
            assert!(
                decode(&mut bad.to_vec()).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn deeply_nested_payload_is_refused_before_parsing() {
        let mut p = format!(
            r#"{{"event":"e","data":{}{},"socket":null}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        )
        .into_bytes();
        assert_eq!(decode(&mut p), Err(PayloadError::TooDeep));
    }

    #[test]
    fn patterns_escape_globs() {
        assert_eq!(pattern("laravel_database_"), "laravel_database_*");
        assert_eq!(pattern(""), "*");
        assert_eq!(pattern("a*b?[c]"), r"a\*b\?\[c\]*");
    }
}
