//! Cluster mode: several daemons sharing one Redis act as one server.
//!
//! Every node publishes what others must know on one Redis pub/sub channel (REVERB_SCALING_CHANNEL,
//! default `bts-guru`) and receives it on its Redis ingest thread:
//! - events (HTTP API publishes and client events) are delivered locally at once and published
//!   for the other nodes, which deliver them to their own subscribers: exactly once per node,
//!   `socket_id` exclusion included (socket ids are unique across nodes with high probability);
//! - presence joins and leaves are applied locally at once and published; every node keeps every
//!   node's sockets per user (`shard::presence`), so `here`, user counts and member_added /
//!   member_removed are per user cluster-wide, each node telling its own subscribers;
//! - a node that (re)connects says `hello`; every node answers with a `sync` of its own members,
//!   which replaces that node's part everywhere;
//! - every node sends a heartbeat every `HEARTBEAT`; a node silent for `NODE_TIMEOUT` is dropped,
//!   and its members are removed (member_removed sent) on every other node;
//! - HTTP API reads ask every live node's shards and wait for all answers (or fail with 503);
//!   terminate_connections reaches every node.
//!
//! Shards never block on Redis: they hand messages to the publisher thread through a bounded
//! channel (`try_send`; a full channel drops the message and counts it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fanout::frame::SharedFrame;
use crate::fanout::router::{Broadcast, ChannelPart, QueryKind, QueryPart, RemoteCmd, ShardCmd};
use crate::protocol::{channel, depth, SocketId};
use crate::shard::Shared;

/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node silent this long is dropped and its presence members removed.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages waiting for the publisher thread.
const OUTBOX: usize = 65_536;

/// One message on the cluster channel. Field names are short: events are the bulk of traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub enum Wire {
    /// An event for one channel: `j` is the complete Pusher event JSON.
    #[serde(rename = "ev")]
    Event {
        n: u64,
        a: String,
        c: String,
        j: String,
        x: Option<String>,
        k: bool,
    },
    #[serde(rename = "pj")]
    Join {
        n: u64,
        a: String,
        c: String,
        u: String,
        i: Option<String>,
        s: String,
    },
    #[serde(rename = "pl")]
    Leave {
        n: u64,
        a: String,
        c: String,
        u: String,
        s: String,
    },
    /// Node `n`'s members of every channel its shard `p` (of `ps`) owns: (app, channel, user,
    /// info, sockets).
    #[serde(rename = "sync")]
    Sync {
        n: u64,
        p: usize,
        ps: usize,
        m: Vec<(String, String, String, Option<String>, u32)>,
    },
    /// A node (re)joined; `s` is its shard count.
    #[serde(rename = "hello")]
    Hello { n: u64, s: usize },
    /// Heartbeat; `s` is the node's shard count (how many answers a query gets from it).
    #[serde(rename = "hb")]
    Heartbeat { n: u64, s: usize },
    #[serde(rename = "q")]
    Query {
        n: u64,
        o: usize,
        id: u64,
        a: String,
        k: WireQuery,
    },
    #[serde(rename = "ans")]
    Answer {
        n: u64,
        to: u64,
        o: usize,
        id: u64,
        conns: u64,
        ch: Vec<(String, u64, Option<u64>)>,
        users: Option<Vec<String>>,
        /// `QueryPart::channels_total` (added later: absent from older nodes, ignored by them).
        #[serde(default)]
        ct: u64,
    },
    #[serde(rename = "term")]
    Terminate { n: u64, a: String, u: String },
    /// Node `n`'s own occupancy of a webhook key (`hook_key_*`) turned on or off: the cluster-
    /// wide webhooks (occupied/vacated, member_added/removed) are decided from these, in the
    /// order Redis delivers them, which is the same on every node (`Arbiter`).
    #[serde(rename = "hk")]
    Hook {
        n: u64,
        a: String,
        k: String,
        on: bool,
    },
    /// Node `n` saw node `d` go silent past the timeout.
    #[serde(rename = "gone")]
    Gone { n: u64, d: u64 },
}

/// Webhook key of a channel's occupancy.
pub fn hook_key_channel(channel: &str) -> String {
    format!("c\0{channel}")
}

/// Webhook key of a user's membership of a presence channel.
pub fn hook_key_member(channel: &str, user_id: &str) -> String {
    format!("m\0{channel}\0{user_id}")
}

/// Decides which node sends each cluster-wide webhook, once.
///
/// Every node sends `Wire::Hook` when its *own* occupancy of a key turns on or off (its first
/// subscriber of a channel, its last; a user's first socket on it, the last). Redis delivers
/// the messages of one pub/sub channel to every subscriber in one order, the sender included,
/// so every node applies the same sequence and reaches the same conclusions: the key became
/// occupied cluster-wide (no node had it before) or empty (no node has it now), and which node
/// emits that webhook. The emitter of a key is sticky: the node that emitted its last webhook
/// emits the next one while it lives, so a `channel_vacated` held back for 3 s and the
/// `channel_occupied` that cancels it meet in the same node's webhook queue. A node's death is
/// sequenced the same way (`Wire::Gone`, sent by every node that notices; the first one
/// counts): the keys only it held become empty, emitted by the node whose `Gone` came first
/// (or their sticky emitter).
#[derive(Debug, Default)]
pub struct Arbiter {
    keys: HashMap<(String, String), Occupancy>,
    /// Nodes declared gone (stream order), with when: their late messages are ignored.
    dead: HashMap<u64, Instant>,
}

#[derive(Debug)]
struct Occupancy {
    nodes: Vec<u64>,
    emitter: Option<u64>,
    idle_since: Option<Instant>,
}

/// Empty keys are forgotten after this long (far beyond the 3 s hold-back).
const ARBITER_IDLE: Duration = Duration::from_secs(300);
/// Most keys tracked; beyond, new keys are not arbitrated (counted as dropped webhooks).
const ARBITER_MAX_KEYS: usize = 1_000_000;

impl Arbiter {
    fn pick(&self, emitter: Option<u64>, from: u64) -> u64 {
        match emitter {
            Some(e) if !self.dead.contains_key(&e) => e,
            _ => from,
        }
    }

    /// Applies node `from`'s change of `key`; `Some(on)` when this node (`me`) must send the
    /// cluster-wide webhook (`on`: occupied / member_added, else vacated / member_removed).
    pub fn apply(&mut self, me: u64, from: u64, app: &str, key: &str, on: bool) -> Option<bool> {
        if self.dead.contains_key(&from) {
            return None;
        }
        let k = (app.to_owned(), key.to_owned());
        if !self.keys.contains_key(&k) {
            if !on || self.keys.len() >= ARBITER_MAX_KEYS {
                return None;
            }
            self.keys.insert(
                k.clone(),
                Occupancy {
                    nodes: Vec::new(),
                    emitter: None,
                    idle_since: None,
                },
            );
        }
        let (emitter, empty_before) = {
            let e = &self.keys[&k];
            (e.emitter, e.nodes.is_empty())
        };
        let who = self.pick(emitter, from);
        let e = self.keys.get_mut(&k)?;
        if on {
            if e.nodes.contains(&from) {
                return None;
            }
            e.nodes.push(from);
            e.idle_since = None;
            if !empty_before {
                return None;
            }
        } else {
            let pos = e.nodes.iter().position(|n| *n == from)?;
            e.nodes.swap_remove(pos);
            if !e.nodes.is_empty() {
                return None;
            }
            e.idle_since = Some(Instant::now());
        }
        e.emitter = Some(who);
        (who == me).then_some(on)
    }

    /// Node `from` declared `dead` gone: the (app, key)s that became empty and whose
    /// vacated / member_removed this node (`me`) must send.
    pub fn gone(&mut self, me: u64, from: u64, dead: u64) -> Vec<(String, String)> {
        if self.dead.contains_key(&dead) || self.dead.contains_key(&from) {
            return Vec::new();
        }
        self.dead.insert(dead, Instant::now());
        let mut mine = Vec::new();
        let dead_set = &self.dead;
        for (k, e) in self.keys.iter_mut() {
            let Some(pos) = e.nodes.iter().position(|n| *n == dead) else {
                continue;
            };
            e.nodes.swap_remove(pos);
            if e.nodes.is_empty() {
                let who = match e.emitter {
                    Some(x) if !dead_set.contains_key(&x) => x,
                    _ => from,
                };
                e.emitter = Some(who);
                e.idle_since = Some(Instant::now());
                if who == me {
                    mine.push(k.clone());
                }
            }
        }
        mine
    }

    /// `node` announced itself again after being declared gone.
    pub fn revive(&mut self, node: u64) {
        self.dead.remove(&node);
    }

    /// Forgets keys empty for a long time, and old death records.
    pub fn gc(&mut self) {
        self.keys
            .retain(|_, e| e.idle_since.is_none_or(|t| t.elapsed() < ARBITER_IDLE));
        self.dead
            .retain(|_, t| t.elapsed() < Duration::from_secs(3600));
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The webhook event for an arbitrated key (`None`: not a key we make).
fn hook_event(key: &str, on: bool) -> Option<(&'static str, Value)> {
    let mut parts = key.split('\0');
    match (parts.next()?, parts.next(), parts.next()) {
        ("c", Some(channel), None) => {
            let name = if on {
                "channel_occupied"
            } else {
                "channel_vacated"
            };
            Some((name, serde_json::json!({"name": name, "channel": channel})))
        }
        ("m", Some(channel), Some(user)) => {
            let name = if on { "member_added" } else { "member_removed" };
            Some((
                name,
                serde_json::json!({"name": name, "channel": channel, "user_id": user}),
            ))
        }
        _ => None,
    }
}

/// Sends an arbitrated webhook through this node's webhook queue, when the app wants it.
fn emit_arbitrated(shared: &Shared, app_id: &str, key: &str, on: bool) {
    let apps = shared.apps.current();
    let Some(slot) = apps.by_id(app_id) else {
        return;
    };
    let app = apps.get(slot);
    let Some((name, event)) = hook_event(key, on) else {
        return;
    };
    if !app.webhooks.is_empty() && crate::webhooks::wanted(app, name) {
        shared.webhooks.emit(slot, event);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WireQuery {
    Channels(String),
    Channel(String),
    Users(String),
    Connections,
    /// `QueryKind::TopChannels` (added later: a node without it does not answer, and the
    /// console shows no channel list until every node has it).
    Top(usize),
}

impl WireQuery {
    pub fn from_kind(k: &QueryKind) -> WireQuery {
        match k {
            QueryKind::Channels { prefix } => WireQuery::Channels(prefix.clone()),
            QueryKind::Channel { name } => WireQuery::Channel(name.to_string()),
            QueryKind::Users { channel } => WireQuery::Users(channel.to_string()),
            QueryKind::Connections => WireQuery::Connections,
            QueryKind::TopChannels { limit } => WireQuery::Top(*limit),
        }
    }

    fn into_kind(self) -> QueryKind {
        match self {
            WireQuery::Channels(prefix) => QueryKind::Channels { prefix },
            WireQuery::Channel(name) => QueryKind::Channel { name: name.into() },
            WireQuery::Users(channel) => QueryKind::Users {
                channel: channel.into(),
            },
            WireQuery::Connections => QueryKind::Connections,
            WireQuery::Top(limit) => QueryKind::TopChannels { limit },
        }
    }
}

/// Another node, as heartbeats describe it.
#[derive(Debug, Clone, Copy)]
struct Peer {
    last_seen: Instant,
    shards: usize,
}

/// This node's cluster state, shared by shards (publishing) and the ingest thread (receiving).
pub struct Cluster {
    pub node: u64,
    pub channel: String,
    out: Sender<Vec<u8>>,
    /// Taken once by the publisher thread.
    out_rx: Mutex<Option<Receiver<Vec<u8>>>>,
    /// Live peers. Touched on heartbeats and queries only, never per event.
    peers: Mutex<HashMap<u64, Peer>>,
    /// Cluster-wide webhook decisions; used by the ingest thread only.
    pub arbiter: Mutex<Arbiter>,
    /// Messages dropped because the outbox was full or Redis was unreachable.
    pub dropped: AtomicU64,
    pub published: AtomicU64,
    pub received: AtomicU64,
}

impl Cluster {
    pub fn new(node: u64, channel: String) -> Cluster {
        let (out, rx) = crossbeam_channel::bounded(OUTBOX);
        Cluster {
            node,
            channel,
            out,
            out_rx: Mutex::new(Some(rx)),
            peers: Mutex::new(HashMap::new()),
            arbiter: Mutex::new(Arbiter::default()),
            dropped: AtomicU64::new(0),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    /// Queues `msg` for the other nodes. Never blocks.
    pub fn publish(&self, msg: &Wire) {
        let bytes = match serde_json::to_vec(msg) {
            Ok(b) => b,
            Err(_) => return,
        };
        match self.out.try_send(bytes) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Live peers and how many shards each has (for how many query answers to expect).
    pub fn peers(&self) -> Vec<(u64, usize)> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.iter().map(|(n, p)| (*n, p.shards)).collect()
    }

    fn seen(&self, node: u64, shards: Option<usize>) -> bool {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = !peers.contains_key(&node);
        let p = peers.entry(node).or_insert(Peer {
            last_seen: Instant::now(),
            shards: 1,
        });
        p.last_seen = Instant::now();
        if let Some(s) = shards {
            p.shards = s;
        }
        fresh
    }

    /// Drops peers silent for `NODE_TIMEOUT`; returns them.
    fn expire(&self) -> Vec<u64> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let dead: Vec<u64> = peers
            .iter()
            .filter(|(_, p)| p.last_seen.elapsed() > NODE_TIMEOUT)
            .map(|(n, _)| *n)
            .collect();
        for n in &dead {
            peers.remove(n);
        }
        dead
    }
}

/// A random node id (time, pid and address entropy; uniqueness, not secrecy).
pub fn new_node_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ (u64::from(std::process::id()) << 32) ^ (&t as *const u64 as u64);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x.max(1)
}

/// Starts the publisher thread: PUBLISHes queued messages and a heartbeat every `HEARTBEAT`.
pub fn spawn_publisher(
    redis: crate::config::RedisConfig,
    shared: Arc<Shared>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("bts-cluster-pub".into())
        .spawn(move || {
            let Some(cluster) = shared.cluster.as_ref() else {
                return;
            };
            let Some(rx) = cluster
                .out_rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            else {
                return;
            };
            publisher(&redis, cluster, &rx, shared.cfg.shards());
        })
}

fn publisher(
    redis: &crate::config::RedisConfig,
    cluster: &Cluster,
    rx: &Receiver<Vec<u8>>,
    shards: usize,
) {
    let mut conn: Option<redis::Connection> = None;
    let mut next_beat = Instant::now();
    let mut retry_at = Instant::now();
    let heartbeat = serde_json::to_vec(&Wire::Heartbeat {
        n: cluster.node,
        s: shards,
    })
    .unwrap_or_default();
    loop {
        let wait = next_beat.saturating_duration_since(Instant::now());
        let msg = match rx.recv_timeout(wait) {
            Ok(m) => m,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                next_beat = Instant::now() + HEARTBEAT;
                heartbeat.clone()
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        if conn.is_none() && Instant::now() >= retry_at {
            conn = redis
                .client()
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
                .ok();
            if conn.is_none() {
                retry_at = Instant::now() + Duration::from_millis(500);
            }
        }
        let Some(c) = conn.as_mut() else {
            cluster.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&cluster.channel)
            .arg(msg)
            .query(c);
        match sent {
            Ok(_) => {
                cluster.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                cluster.dropped.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}

/// On the ingest thread: a message from the cluster channel.
pub fn receive(shared: &Shared, payload: &[u8]) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    // Unknown fields are skipped through serde, which recurses once per level.
    if !depth::within(payload, depth::MAX_JSON_DEPTH) {
        shared.ingest.malformed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut bytes = payload.to_vec();
    let Ok(msg) = simd_json::serde::from_slice::<Wire>(&mut bytes) else {
        shared.ingest.malformed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let from = match &msg {
        Wire::Event { n, .. }
        | Wire::Join { n, .. }
        | Wire::Leave { n, .. }
        | Wire::Sync { n, .. }
        | Wire::Hello { n, .. }
        | Wire::Heartbeat { n, .. }
        | Wire::Query { n, .. }
        | Wire::Answer { n, .. }
        | Wire::Terminate { n, .. }
        | Wire::Hook { n, .. }
        | Wire::Gone { n, .. } => *n,
    };
    // Webhook arbitration applies every node's messages, this node's own included, in the
    // order Redis delivered them.
    match &msg {
        Wire::Hook { a, k, on, .. } => {
            let decided = cluster
                .arbiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .apply(cluster.node, from, a, k, *on);
            if let Some(on) = decided {
                emit_arbitrated(shared, a, k, on);
            }
        }
        Wire::Hello { .. } => {
            // A node declared gone came back (it re-announces itself): take its messages again.
            cluster
                .arbiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .revive(from);
        }
        Wire::Gone { d, .. } => {
            let mine = cluster
                .arbiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .gone(cluster.node, from, *d);
            for (a, k) in mine {
                emit_arbitrated(shared, &a, &k, false);
            }
        }
        _ => {}
    }
    if from == cluster.node {
        return;
    }
    cluster.received.fetch_add(1, Ordering::Relaxed);
    // Every node's answer count to queries is its shard count: learn it from any message
    // that says it.
    let shards_hint = match &msg {
        Wire::Heartbeat { s, .. } | Wire::Hello { s, .. } => Some(*s),
        Wire::Sync { ps, .. } => Some(*ps),
        _ => None,
    };
    if cluster.seen(from, shards_hint) {
        tracing::info!(node = from, "cluster: node joined");
        // Tell it who is here.
        send_all(shared, || ShardCmd::Remote(RemoteCmd::PublishSync));
    }
    let router = &shared.router;
    match msg {
        Wire::Event { a, c, j, x, k, .. } => {
            let Some(app) = router.app_index(&a) else {
                return;
            };
            if channel::validate(&c).is_err() {
                return;
            }
            router.broadcast(Broadcast {
                app,
                channel: Arc::from(c.as_str()),
                frame: SharedFrame::text(j.as_bytes()).0,
                except: x.as_deref().and_then(SocketId::parse),
                cache: k,
                created: std::time::Instant::now(),
            });
        }
        Wire::Join { n, a, c, u, i, s } => {
            let Some(app) = router.app_index(&a) else {
                return;
            };
            let owner = router.owner(app, &c);
            let _ = router.try_push(
                owner,
                ShardCmd::Remote(RemoteCmd::Join {
                    node: n,
                    app,
                    channel: Arc::from(c.as_str()),
                    user_id: Arc::from(u.as_str()),
                    user_info: i.map(|i| Arc::from(i.as_str())),
                    socket_id: SocketId::parse(&s),
                }),
            );
        }
        Wire::Leave { n, a, c, u, s } => {
            let Some(app) = router.app_index(&a) else {
                return;
            };
            let owner = router.owner(app, &c);
            let _ = router.try_push(
                owner,
                ShardCmd::Remote(RemoteCmd::Leave {
                    node: n,
                    app,
                    channel: Arc::from(c.as_str()),
                    user_id: Arc::from(u.as_str()),
                    socket_id: SocketId::parse(&s),
                }),
            );
        }
        Wire::Sync { n, p, ps, m } => {
            let entries: Vec<_> = m
                .into_iter()
                .filter_map(|(a, c, u, i, k)| {
                    Some((
                        router.app_index(&a)?,
                        Arc::<str>::from(c.as_str()),
                        (
                            Arc::<str>::from(u.as_str()),
                            i.map(|i| Arc::from(i.as_str())),
                            k,
                        ),
                    ))
                })
                .collect();
            let entries = Arc::new(entries);
            send_all(shared, || {
                ShardCmd::Remote(RemoteCmd::Sync {
                    node: n,
                    part: p,
                    parts: ps,
                    entries: Arc::clone(&entries),
                })
            });
        }
        Wire::Hello { .. } | Wire::Heartbeat { .. } | Wire::Hook { .. } | Wire::Gone { .. } => {}
        Wire::Query { n, o, id, a, k } => {
            let Some(app) = router.app_index(&a) else {
                return;
            };
            let what = k.into_kind();
            for shard in 0..router.shards() {
                let _ = router.try_push(
                    shard,
                    ShardCmd::Query(crate::fanout::router::Query {
                        id,
                        origin: o,
                        app,
                        what: what.clone(),
                        remote: Some(n),
                    }),
                );
            }
        }
        Wire::Answer {
            to,
            o,
            id,
            conns,
            ch,
            users,
            ct,
            ..
        } => {
            if to != cluster.node || o >= router.shards() {
                return;
            }
            let part = QueryPart {
                connections: conns,
                channels: ch
                    .into_iter()
                    .map(|(name, subscriptions, users)| ChannelPart {
                        name,
                        subscriptions,
                        users,
                    })
                    .collect(),
                users,
                channels_total: ct,
            };
            let _ = router.try_push(
                o,
                ShardCmd::Answer(crate::fanout::router::Answer { id, part }),
            );
        }
        Wire::Terminate { a, u, .. } => {
            let Some(app) = router.app_index(&a) else {
                return;
            };
            let user_id: Arc<str> = Arc::from(u.as_str());
            send_all(shared, || ShardCmd::TerminateUser {
                app,
                user_id: Arc::clone(&user_id),
            });
        }
    }
}

/// On the ingest thread, about once a second: drop silent peers everywhere.
pub fn tick(shared: &Shared) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    for node in cluster.expire() {
        tracing::warn!(
            node,
            "cluster: node silent for {NODE_TIMEOUT:?}; removing its members"
        );
        send_all(shared, || ShardCmd::Remote(RemoteCmd::NodeGone { node }));
        cluster.publish(&Wire::Gone {
            n: cluster.node,
            d: node,
        });
    }
    cluster
        .arbiter
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .gc();
}

/// After the ingest (re)subscribed: announce ourselves and our members.
pub fn announce(shared: &Shared) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    cluster.publish(&Wire::Hello {
        n: cluster.node,
        s: shared.cfg.shards(),
    });
    send_all(shared, || ShardCmd::Remote(RemoteCmd::PublishSync));
}

fn send_all(shared: &Shared, mut cmd: impl FnMut() -> ShardCmd) {
    for shard in 0..shared.router.shards() {
        if shared.router.try_push(shard, cmd()).is_err() {
            tracing::warn!(shard, "inbox full: cluster message dropped for a shard");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every node applies the same sequence; exactly one of them sends each webhook, and the
    /// emitter of a key stays the same while it lives.
    #[test]
    fn arbiter_picks_one_emitter_per_transition() {
        let seq = [
            (1, "k", true),  // occupied, by 1
            (2, "k", true),  // still occupied
            (1, "k", false), // 2 still holds it
            (2, "k", false), // vacated: the sticky emitter (1) sends it
            (3, "k", true),  // occupied again: 1 again
        ];
        let mut sent: Vec<(u64, bool)> = Vec::new();
        for me in [1u64, 2, 3] {
            let mut arb = Arbiter::default();
            for (from, key, on) in seq {
                if let Some(on) = arb.apply(me, from, "app", key, on) {
                    sent.push((me, on));
                }
            }
        }
        assert_eq!(sent, vec![(1, true), (1, false), (1, true)]);
        // Node 1 dies; 3's Gone is sequenced first, 2's second. Only 3 holds "k", so "k" stays;
        // "j", held by 1 only (emitter 1, dead), becomes empty: 3 sends its vacated.
        let mut out = Vec::new();
        for me in [2u64, 3] {
            let mut arb = Arbiter::default();
            for (from, key, on) in seq {
                arb.apply(me, from, "app", key, on);
            }
            arb.apply(me, 1, "app", "j", true);
            out.extend(arb.gone(me, 3, 1).into_iter().map(|k| (me, k.1)));
            assert!(arb.gone(me, 2, 1).is_empty());
            // Late messages from the dead node are ignored.
            assert_eq!(arb.apply(me, 1, "app", "x", true), None);
        }
        assert_eq!(out, vec![(3, "j".to_owned())]);
        assert_eq!(
            hook_event(&hook_key_member("presence-m", "7"), false)
                .unwrap()
                .1,
            serde_json::json!({"name":"member_removed","channel":"presence-m","user_id":"7"})
        );
    }

    #[test]
    fn wire_round_trip() {
        let msgs = [
            Wire::Event {
                n: 1,
                a: "app".into(),
                c: "sports.football".into(),
                j: r#"{"event":"e","channel":"sports.football","data":"{}"}"#.into(),
                x: Some("1.2".into()),
                k: false,
            },
            Wire::Sync {
                n: 2,
                p: 0,
                ps: 2,
                m: vec![("app".into(), "presence-a".into(), "7".into(), None, 2)],
            },
            Wire::Query {
                n: 3,
                o: 1,
                id: 9,
                a: "app".into(),
                k: WireQuery::Channels("presence-".into()),
            },
        ];
        for m in msgs {
            let mut bytes = serde_json::to_vec(&m).unwrap();
            let back: Wire = simd_json::serde::from_slice(&mut bytes).unwrap();
            assert_eq!(back, m);
        }
    }
}
