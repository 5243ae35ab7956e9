//! The cluster outbox: the bounded, non-blocking hand-off that shards (and the ingest thread)
//! publish through, and the publisher thread that drains it into Redis.
//!
//! Shards never block on Redis: `publish` serializes the message and `try_send`s it; a full
//! outbox drops it and counts it (`dropped`). The publisher thread owns its own Redis
//! connection, PUBLISHes what it takes, and sends a heartbeat when the outbox has been quiet for
//! a `HEARTBEAT`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::wire::Wire;
use super::HEARTBEAT;
use crate::config::RedisConfig;

/// Messages waiting for the publisher thread.
const OUTBOX: usize = 65_536;

/// What the publisher thread sends: a serialized message for the cluster channel, or a
/// positioned channel's event to append (`resume::store`).
pub enum Out {
    Publish(Vec<u8>),
    Append(crate::resume::store::Append),
}

/// Messages on their way to the publisher thread.
pub struct Outbox {
    tx: Sender<Out>,
    /// Taken once by the publisher thread.
    rx: Mutex<Option<Receiver<Out>>>,
    /// Messages dropped because the outbox was full or Redis was unreachable.
    pub dropped: AtomicU64,
    pub published: AtomicU64,
}

impl Default for Outbox {
    fn default() -> Outbox {
        let (tx, rx) = crossbeam_channel::bounded(OUTBOX);
        Outbox {
            tx,
            rx: Mutex::new(Some(rx)),
            dropped: AtomicU64::new(0),
            published: AtomicU64::new(0),
        }
    }
}

impl Outbox {
    /// Queues `msg` for the other nodes. Never blocks.
    pub fn publish(&self, msg: &Wire<'_>) {
        let Ok(bytes) = serde_json::to_vec(msg) else {
            return;
        };
        self.send(Out::Publish(bytes));
    }

    /// Queues a positioned channel's event for Redis to order, keep and announce to every node
    /// (this one included). Never blocks.
    pub fn append(&self, a: crate::resume::store::Append) {
        self.send(Out::Append(a));
    }

    fn send(&self, out: Out) {
        match self.tx.try_send(out) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Starts the publisher thread: PUBLISHes queued messages on `channel` and a heartbeat (this
/// node's id and `shards`) every `HEARTBEAT`.
pub fn spawn_publisher(
    redis: RedisConfig,
    cluster: std::sync::Arc<super::Cluster>,
    shards: usize,
    history_events: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("bts-cluster-pub".into())
        .spawn(move || {
            let Some(rx) = cluster
                .outbox
                .rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            else {
                return;
            };
            publisher(&redis, &cluster, &rx, shards, history_events);
        })
}

fn publisher(
    redis: &RedisConfig,
    cluster: &super::Cluster,
    rx: &Receiver<Out>,
    shards: usize,
    history_events: usize,
) {
    let announce = crate::resume::store::announce_channel(&cluster.channel);
    let mut epochs = 0u64;
    let outbox = &cluster.outbox;
    let mut conn: Option<redis::Connection> = None;
    let mut next_beat = Instant::now();
    let mut retry_at = Instant::now();
    let heartbeat = serde_json::to_vec(&Wire::Heartbeat {
        node: cluster.node,
        shards,
    })
    .unwrap_or_default();
    loop {
        let wait = next_beat.saturating_duration_since(Instant::now());
        let msg = match rx.recv_timeout(wait) {
            Ok(m) => m,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                next_beat = Instant::now() + HEARTBEAT;
                Out::Publish(heartbeat.clone())
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
            outbox.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let sent: redis::RedisResult<()> = match msg {
            Out::Publish(msg) => redis::cmd("PUBLISH")
                .arg(&cluster.channel)
                .arg(msg)
                .query(c),
            Out::Append(a) => {
                // Used only if the channel has no epoch in Redis yet.
                epochs += 1;
                let candidate =
                    crate::cluster::wire::new_node_id() ^ cluster.node.rotate_left(17) ^ epochs;
                crate::resume::store::append(c, &a, history_events, candidate, &announce)
                    .map(|_| ())
            }
        };
        match sent {
            Ok(_) => {
                outbox.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                outbox.dropped.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}
