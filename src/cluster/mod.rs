//! Cluster mode: several daemons sharing one Redis act as one server.
//!
//! Every node publishes what others must know on one Redis pub/sub channel (REVERB_SCALING_CHANNEL,
//! default `bts-guru`) and receives it on its Redis ingest thread (`ingest::cluster`):
//! - events (HTTP API publishes and client events) are delivered locally at once and published
//!   for the other nodes (`node::Shared::publish`), which deliver them to their own
//!   subscribers: exactly once per node, `socket_id` exclusion included (socket ids are unique
//!   across nodes with high probability);
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
//! Here: the wire format (`wire`), the outbox shards publish through (`outbox`), and the
//! live peers. Shards never block on Redis: a full outbox drops the message and counts it.

pub mod outbox;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use outbox::Outbox;
pub use wire::{Wire, WireQuery};

/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node silent this long is dropped and its presence members removed.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Another node, as heartbeats describe it.
#[derive(Debug, Clone, Copy)]
struct Peer {
    last_seen: Instant,
    shards: usize,
}

/// This node's cluster state, shared by shards (publishing, counting answers) and the ingest
/// thread (receiving).
pub struct Cluster {
    pub node: u64,
    pub channel: String,
    pub outbox: Outbox,
    /// Live peers. Touched on heartbeats and queries only, never per event.
    peers: Mutex<HashMap<u64, Peer>>,
    /// Messages received from other nodes.
    pub received: AtomicU64,
}

impl Cluster {
    pub fn new(node: u64, channel: String) -> Cluster {
        Cluster {
            node,
            channel,
            outbox: Outbox::default(),
            peers: Mutex::new(HashMap::new()),
            received: AtomicU64::new(0),
        }
    }

    /// Queues `msg` for the other nodes. Never blocks.
    pub fn publish(&self, msg: &Wire<'_>) {
        self.outbox.publish(msg);
    }

    /// Live peers and how many shards each has (for how many query answers to expect).
    pub fn peers(&self) -> Vec<(u64, usize)> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.iter().map(|(n, p)| (*n, p.shards)).collect()
    }

    /// A message from `node` arrived (with its shard count, if it says it); `true` when the
    /// node is new to us.
    pub fn seen(&self, node: u64, shards: Option<usize>) -> bool {
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
    pub fn expire(&self) -> Vec<u64> {
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
