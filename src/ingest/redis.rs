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
use crate::redis_conn::{subscribe, Message, Redis, Wanted};

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

/// What one ingest thread subscribes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Laravel's broadcasts and (in cluster mode) the nodes' channel, on one connection to the
    /// primary: one server or Sentinel.
    Both,
    /// Laravel's broadcasts only (PSUBSCRIBE on any node; on a Redis Cluster every node relays
    /// every classic PUBLISH).
    Laravel,
    /// The nodes' channel only, sharded (SSUBSCRIBE on its slot's primary): Redis Cluster in
    /// cluster mode.
    Cluster,
}

/// Starts the ingest thread(s), pinned to the configured CPU: one, or on a Redis Cluster in
/// cluster mode two (Laravel's broadcasts and the nodes' sharded channel live on different
/// nodes).
pub fn spawn(redis: Redis, shared: Arc<Shared>) -> std::io::Result<()> {
    shared.ingest.enabled.store(true, Ordering::Relaxed);
    let roles: &[Role] = match (&shared.cluster, redis.sharded()) {
        (Some(_), true) => &[Role::Laravel, Role::Cluster],
        (Some(_), false) => &[Role::Both],
        (None, _) => &[Role::Laravel],
    };
    shared.ingest.wanted.store(roles.len(), Ordering::Relaxed);
    shared.ingest.down(true);
    for &role in roles {
        let redis = redis.clone();
        let shared = Arc::clone(&shared);
        let name = match role {
            Role::Cluster => "bts-cluster-recv",
            _ => "bts-redis-ingest",
        };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let cpu = redis.config().cpu;
                if let Err(e) = crate::sys::pin_to_cpu(cpu) {
                    tracing::warn!(cpu, error = %e, "cannot pin the Redis ingest thread");
                }
                run(&redis, &shared, role)
            })?;
    }
    Ok(())
}

/// Longest wait between two attempts to reach Redis (a failover is followed this fast).
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How often a subscription's reader wakes up with no message (ticks: silent peers).
const TICK: Duration = Duration::from_millis(250);

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

fn run(redis: &Redis, shared: &Shared, role: Role) {
    let cfg = redis.config();
    let stats = &shared.ingest;
    let mut backoff = Duration::from_millis(50);
    let mut ever_connected = false;
    let mut last_error_log: Option<Instant> = None;
    let pattern = pattern(&cfg.prefix);
    let cluster_channel = shared.cluster.as_ref().map(|c| c.channel.clone());
    // Positioned channels' announcements: a classic channel (the append script PUBLISHes
    // them; a Redis Cluster relays a classic PUBLISH to every node), with Laravel's.
    let announce = shared
        .cluster
        .as_ref()
        .map(|c| crate::resume::store::announce_channel(&c.channel));
    // Cluster-wide webhook decisions: this thread's alone, kept across reconnects.
    let mut arbiter = super::cluster::Arbiter::default();
    let mut positions = super::positions::Positions::default();
    loop {
        let found = match (role, &cluster_channel) {
            (Role::Cluster, Some(ch)) => redis.sharded_subscriber(ch.as_bytes()),
            (Role::Both, _) => redis.primary(),
            _ => redis.any(),
        };
        let subscribed = found.and_then(|mut node| {
            // A PING first: a Redis that wants a password answers NOAUTH here, while a
            // PSUBSCRIBE's refusal would only arrive later, looking like a dropped connection.
            redis::cmd("PING").query::<()>(&mut node.conn)?;
            let patterns = [pattern.as_str()];
            let channel: Vec<&str> = cluster_channel.iter().map(String::as_str).collect();
            let announced: Vec<&str> = announce.iter().map(String::as_str).collect();
            let both: Vec<&str> = channel.iter().chain(&announced).copied().collect();
            let wanted = match role {
                Role::Both => Wanted {
                    patterns: &patterns,
                    channels: &both,
                    sharded: &[],
                },
                Role::Laravel => Wanted {
                    patterns: &patterns,
                    channels: &announced,
                    sharded: &[],
                },
                Role::Cluster => Wanted {
                    sharded: &channel,
                    ..Wanted::default()
                },
            };
            let addr = node.addr.clone();
            let mut reader = Reader::new(redis, shared, &mut arbiter, &mut positions, role);
            let mut started = false;
            let err = subscribe(&mut node, wanted, TICK, |msg| {
                if !started {
                    started = true;
                    stats.up();
                    if ever_connected {
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    ever_connected = true;
                    backoff = Duration::from_millis(50);
                    tracing::info!(redis = %redis.describe(), node = %addr, ?role, "Redis ingest subscribed");
                    if role != Role::Laravel {
                        if let Some(cluster) = &shared.cluster {
                            // Nobody could be heard while we were away: give every peer its
                            // full timeout again before it counts as gone.
                            cluster.grace();
                        }
                        super::cluster::announce(shared);
                    }
                    if role != Role::Cluster && shared.cluster.is_some() {
                        // Subscribed first: what is announced meanwhile waits in the socket,
                        // and `deliver_at` skips what the preload already holds.
                        reader.positions.preload(redis, shared);
                    }
                }
                reader.read(msg)
            })?;
            if started {
                stats.down(false);
            }
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
                        redis = %redis.describe(),
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

/// How long a cluster subscription may go without hearing this node's own heartbeat (while
/// the publisher is connected) before it is made again: a sharded subscription whose slot
/// moved is ended by the server with a push the reader does not see.
const OWN_SILENCE: Duration = Duration::from_secs(7);

/// Turns messages into deliveries, per subscription.
struct Reader<'a> {
    redis: &'a Redis,
    cfg: &'a RedisConfig,
    shared: &'a Shared,
    arbiter: &'a mut super::cluster::Arbiter,
    positions: &'a mut super::positions::Positions,
    /// `<cluster channel>:resume`, in cluster mode.
    announce: Option<String>,
    role: Role,
    last_warn: Option<Instant>,
    suppressed: u64,
    /// The app's settings, re-read once a second so a reload's new limits apply.
    apps: Arc<crate::apps::AppSet>,
    last_tick: Instant,
    /// When this node last heard its own message on the cluster channel.
    heard_self: Instant,
}

impl<'a> Reader<'a> {
    fn new(
        redis: &'a Redis,
        shared: &'a Shared,
        arbiter: &'a mut super::cluster::Arbiter,
        positions: &'a mut super::positions::Positions,
        role: Role,
    ) -> Reader<'a> {
        Reader {
            redis,
            cfg: redis.config(),
            shared,
            arbiter,
            positions,
            announce: shared
                .cluster
                .as_ref()
                .map(|c| crate::resume::store::announce_channel(&c.channel)),
            role,
            last_warn: None,
            suppressed: 0,
            apps: shared.apps.current(),
            last_tick: Instant::now(),
            heard_self: Instant::now(),
        }
    }

    /// One message (or a tick); `Some(error)` ends the subscription.
    fn read(&mut self, msg: Option<Message>) -> Option<redis::RedisError> {
        let shared = self.shared;
        if self.last_tick.elapsed() >= Duration::from_secs(1) {
            if self.role != Role::Laravel {
                super::cluster::tick(shared, self.arbiter);
                if let Some(c) = &shared.cluster {
                    if !c.outbox.connected.load(Ordering::Relaxed) {
                        self.heard_self = Instant::now();
                    } else if self.heard_self.elapsed() > OWN_SILENCE {
                        return Some(crate::redis_conn::ended(
                            "this node's own heartbeats stopped arriving",
                            format!("for {:?}", self.heard_self.elapsed()),
                        ));
                    }
                }
            }
            self.positions.gc();
            self.apps = shared.apps.current();
            self.last_tick = Instant::now();
        }
        let msg = msg?;
        let cluster_channel = shared.cluster.as_ref().map(|c| c.channel.as_bytes());
        if Some(msg.channel.as_slice()) == cluster_channel {
            if super::cluster::receive(shared, self.arbiter, &msg.payload) {
                self.heard_self = Instant::now();
            }
            return None;
        }
        if Some(msg.channel.as_slice()) == self.announce.as_deref().map(str::as_bytes) {
            self.positions.announced(self.redis, shared, &msg.payload);
            return None;
        }
        self.laravel(msg);
        None
    }

    /// A message from Laravel's broadcaster.
    fn laravel(&mut self, msg: Message) {
        let (cfg, shared) = (self.cfg, self.shared);
        let stats = &shared.ingest;
        let Ok(name) = std::str::from_utf8(&msg.channel) else {
            return;
        };
        let Some(channel) = name.strip_prefix(cfg.prefix.as_str()) else {
            return;
        };
        let raw = msg.payload;
        let mut payload = raw.clone();
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
                if self
                    .last_warn
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    let suppressed = self.suppressed;
                    tracing::warn!(channel = name, error = %e, suppressed, "ignored a Redis message that is not a Laravel broadcast");
                    self.last_warn = Some(Instant::now());
                    self.suppressed = 0;
                } else {
                    self.suppressed += 1;
                }
                return;
            }
        };
        if ev.data_json.len() > self.apps.get(cfg.app).max_message_size + 2 {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        stats.events.fetch_add(1, Ordering::Relaxed);
        let event = Event {
            app: cfg.app,
            channel,
            frame: SharedFrame::event(&ev.event, channel, &ev.data_json),
            except: ev.except,
            cache: channel::is_cache(channel),
            positioned: self.apps.get(cfg.app).positioned(channel),
            settings: self.apps.get(cfg.app),
        };
        if event.positioned && shared.cluster.is_some() {
            // Every node offers it with the same id; Redis appends it once and announces it.
            let id = self.positions.dedupe_id(channel, &raw);
            if let Err(refused) = shared.offer(&event, id) {
                // Past the outbox's bounds (Redis away too long): not appended by this node;
                // another node that received it may still append it.
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%refused, "a Laravel event on a positioned channel was refused");
            }
            return;
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
