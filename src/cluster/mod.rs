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
//! - exactness across Redis outages and failovers: every node numbers its events (`seq`, per
//!   process); receivers deliver each origin's events in that order and once (`accept`), and
//!   say in their heartbeats what they have (acks); the origin holds each event in its outbox
//!   until every live peer has acked it, resends the unacked tail after a reconnect, a peer's
//!   `hello` or `nack`, or when acks stall, and refuses new publishes (HTTP 503) when the
//!   outbox is past its bounds (`config::OutboxLimits`).
//!
//! Here: the wire format (`wire`), the outbox shards publish through (`outbox`), the live peers
//! and their acks, and what this node has received. Shards never block on Redis: events are
//! held within the outbox's bounds or refused; other messages are dropped (and counted) when
//! their queue is full.

pub mod outbox;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use outbox::Outbox;
pub use wire::{Wire, WireQuery};

use crate::config::OutboxLimits;

/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node silent this long is dropped and its presence members removed.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a heartbeat carries new acks (sooner than `HEARTBEAT`, so the origins' outboxes
/// empty quickly).
pub const ACK_INTERVAL: Duration = Duration::from_millis(250);
/// Least time between two resend requests (`Wire::Nack`) for one origin.
const NACK_INTERVAL: Duration = Duration::from_millis(200);

/// Another node, as heartbeats describe it.
#[derive(Debug, Clone, Copy)]
struct Peer {
    last_seen: Instant,
    shards: usize,
    /// The last of our events it has delivered, none missing (from its heartbeats); `None`
    /// until it says (an older node never does: it holds nothing back).
    acked: Option<u64>,
}

/// What we have delivered of one origin's numbered events.
#[derive(Debug, Clone, Copy)]
struct Received {
    /// The last seq delivered, none missing before it.
    last: u64,
    nacked: Option<Instant>,
    /// When the origin was last heard (its state is forgotten an hour later).
    heard: Instant,
}

/// An origin not heard for this long is forgotten (node ids are per process: a restarted node
/// is a new origin).
const RECEIVED_IDLE: Duration = Duration::from_secs(3600);

/// What to do with an origin's numbered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// The next one: deliver it.
    Deliver,
    /// Delivered before (a resend).
    Duplicate,
    /// One or more before it are missing: not delivered (the origin resends from `expected`);
    /// `nack`: ask for the resend now (at most every 200 ms per origin).
    Gap { expected: u64, nack: bool },
}

/// This node's cluster state, shared by shards (publishing, counting answers) and the ingest
/// thread (receiving).
pub struct Cluster {
    pub node: u64,
    pub channel: String,
    pub outbox: Outbox,
    /// Live peers. Touched on heartbeats and queries only, never per event.
    peers: Mutex<HashMap<u64, Peer>>,
    /// Per origin, what the receiver has delivered. Touched by the receiver thread per received
    /// event and by the publisher per heartbeat: never by a shard.
    received: Mutex<HashMap<u64, Received>>,
    /// Set when an ack moved since the last heartbeat.
    pub acks_moved: AtomicBool,
    /// Messages received from other nodes.
    pub messages: AtomicU64,
    /// Numbered events received again (resends) and dropped.
    pub duplicates: AtomicU64,
    /// Numbered events received after a gap and dropped (to be resent).
    pub gaps: AtomicU64,
    /// Events another node gave up on before this one had them (it was silent past
    /// `NODE_TIMEOUT` for that node): learned from the origin's `low`.
    pub lost: AtomicU64,
}

impl Cluster {
    pub fn new(node: u64, channel: String, limits: OutboxLimits) -> Cluster {
        Cluster {
            node,
            channel,
            outbox: Outbox::new(limits, node),
            peers: Mutex::new(HashMap::new()),
            received: Mutex::new(HashMap::new()),
            acks_moved: AtomicBool::new(false),
            messages: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    /// Queues `msg` (not an event: those go through `Outbox::publish_events`) for the other
    /// nodes. Never blocks.
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
            acked: None,
        });
        p.last_seen = Instant::now();
        if let Some(s) = shards {
            p.shards = s;
        }
        fresh
    }

    /// `node` has delivered our events up to `seq` (`None`: it acks, but has not heard from
    /// us yet: everything we hold is held for it too, until it says).
    pub fn acked_by(&self, node: u64, seq: Option<u64>) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = peers.get_mut(&node) {
            let seq = seq.unwrap_or(0);
            p.acked = Some(p.acked.map_or(seq, |a| a.max(seq)));
        }
    }

    /// The last of our events every live peer that acks has delivered; `None` when no live
    /// peer acks (nothing to hold back for).
    pub fn min_ack(&self) -> Option<u64> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.values().filter_map(|p| p.acked).min()
    }

    /// After this node's own Redis outage: every peer gets `NODE_TIMEOUT` to be heard again
    /// (we could not hear anyone meanwhile; that is no sign they died).
    pub fn grace(&self) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        for p in peers.values_mut() {
            p.last_seen = Instant::now();
        }
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

    /// `origin`'s event number `seq` arrived: deliver it, or not. The first event heard from an
    /// origin starts its count.
    pub fn accept(&self, origin: u64, seq: u64) -> Accept {
        let mut received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        let r = received.entry(origin).or_insert(Received {
            last: seq.saturating_sub(1),
            nacked: None,
            heard: Instant::now(),
        });
        r.heard = Instant::now();
        if seq <= r.last {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Accept::Duplicate;
        }
        if seq == r.last + 1 {
            r.last = seq;
            self.acks_moved.store(true, Ordering::Relaxed);
            return Accept::Deliver;
        }
        self.gaps.fetch_add(1, Ordering::Relaxed);
        let nack = r.nacked.is_none_or(|t| t.elapsed() >= NACK_INTERVAL);
        if nack {
            r.nacked = Some(Instant::now());
        }
        Accept::Gap {
            expected: r.last + 1,
            nack,
        }
    }

    /// `origin` holds nothing before `low` (its heartbeat says). Heard first: its count
    /// starts there (what it still holds will come). Else what we miss before `low` was given
    /// up (we were dropped as silent): count it and go on from there.
    pub fn origin_low(&self, origin: u64, low: u64) {
        let mut received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        let r = received.entry(origin).or_insert_with(|| {
            self.acks_moved.store(true, Ordering::Relaxed);
            Received {
                last: low.saturating_sub(1),
                nacked: None,
                heard: Instant::now(),
            }
        });
        r.heard = Instant::now();
        {
            if r.last + 1 < low {
                self.lost.fetch_add(low - 1 - r.last, Ordering::Relaxed);
                tracing::warn!(
                    origin,
                    missed = low - 1 - r.last,
                    "cluster: events another node gave up on before this node had them"
                );
                r.last = low - 1;
                self.acks_moved.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Forgets origins not heard for an hour (bounds the receive state).
    pub fn forget_idle(&self) {
        let mut received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        received.retain(|_, r| r.heard.elapsed() < RECEIVED_IDLE);
    }

    /// Our acks, for the heartbeat: (origin, last delivered seq).
    pub fn acks(&self) -> Vec<(u64, u64)> {
        let received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        received.iter().map(|(n, r)| (*n, r.last)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receivers_deliver_in_order_once_and_ask_for_gaps() {
        let c = Cluster::new(1, "x".into(), OutboxLimits::default());
        // The first event heard from an origin starts its count.
        assert_eq!(c.accept(9, 5), Accept::Deliver);
        assert_eq!(c.accept(9, 5), Accept::Duplicate);
        assert_eq!(c.accept(9, 6), Accept::Deliver);
        assert_eq!(
            c.accept(9, 8),
            Accept::Gap {
                expected: 7,
                nack: true
            }
        );
        // Asked once per interval.
        assert_eq!(
            c.accept(9, 9),
            Accept::Gap {
                expected: 7,
                nack: false
            }
        );
        assert_eq!(c.acks(), vec![(9, 6)]);
        // The resend: 7, 8, 9 in order, then the duplicates are dropped.
        for s in 7..=9 {
            assert_eq!(c.accept(9, s), Accept::Deliver);
        }
        assert_eq!(c.accept(9, 8), Accept::Duplicate);
        // The origin gave up on 10..=11 (this node was dropped): move on, counted.
        c.origin_low(9, 12);
        assert_eq!(c.lost.load(Ordering::Relaxed), 2);
        assert_eq!(c.accept(9, 12), Accept::Deliver);
        // A low behind us changes nothing.
        c.origin_low(9, 3);
        assert_eq!(c.acks(), vec![(9, 12)]);
        // An origin first heard through its heartbeat: its count starts at its oldest held.
        c.origin_low(4, 20);
        assert_eq!(c.accept(4, 20), Accept::Deliver);
        assert_eq!(c.lost.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_outbox_holds_back_for_the_slowest_live_peer_that_acks() {
        let c = Cluster::new(1, "x".into(), OutboxLimits::default());
        assert_eq!(c.min_ack(), None);
        c.seen(2, Some(1));
        c.seen(3, Some(1));
        assert_eq!(
            c.min_ack(),
            None,
            "peers that never acked hold nothing back"
        );
        c.acked_by(2, Some(10));
        c.acked_by(3, None);
        assert_eq!(
            c.min_ack(),
            Some(0),
            "a peer that acks but never heard us holds all"
        );
        c.acked_by(3, Some(4));
        assert_eq!(c.min_ack(), Some(4));
        c.acked_by(3, Some(2));
        assert_eq!(c.min_ack(), Some(4), "acks never go back");
    }
}
