//! The cluster outbox: the hand-off that shards (and the ingest thread) publish through, and
//! the publisher thread that drains it into Redis.
//!
//! Two queues, neither of which ever blocks a shard:
//! - **events** (HTTP API publishes, client events): bounded by bytes and age
//!   (`config::OutboxLimits`). `publish_events` reserves room for every event of a request
//!   before any is numbered or delivered, so a refusal (`Refused`, the API's 503) means the
//!   event went nowhere. The publisher holds each event, numbered, until every live peer has
//!   acked it (`Cluster::min_ack`), sending in seq order; after a reconnect (a failover), a
//!   peer's `hello` or `nack`, or acks that stall for `RESEND_AFTER`, it sends the unacked
//!   tail again (receivers drop what they have). While Redis is away nothing leaves, and once
//!   it is back the held events go first, in order, before newer ones. An accepted event is
//!   never expired: the age bound refuses new publishes instead, once the oldest held event
//!   is older than it.
//! - **appends** (cluster mode, positioned channels' events: HTTP API, client events and
//!   Laravel's): under the same byte and age bounds, reserved together with a request's events
//!   (`hold`: all or none). The publisher runs `resume::store::APPEND` for each, in order, on
//!   the node that holds the channel's keys (`redis_conn::Keyed`: the primary, or on a Redis
//!   Cluster the keys' slot's primary), and lets go of it only once Redis answered. A failed
//!   round trip (Redis away, a failover) is tried again, from the oldest unanswered append on;
//!   every append carries an idempotency key (this node's id and a seq, or Laravel's shared
//!   id), so one that Redis ran before the connection broke is not appended twice. Nothing is
//!   delivered at accept time: every node delivers Redis's announcement.
//! - **everything else** (presence, syncs, queries, webhook arbitration, heartbeats): a
//!   bounded channel, dropped and counted when full; while Redis is away the publisher keeps at
//!   most `CONTROL_HELD` of them (presence is re-synced after a reconnect anyway).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::wire::Wire;
use super::{Cluster, ACK_INTERVAL, HEARTBEAT};
use crate::config::OutboxLimits;
use crate::redis_conn::{Keyed, Node, Redis};
use crate::resume::store::{self, Append};

/// Non-event messages waiting for the publisher thread.
const CONTROL: usize = 65_536;
/// Non-event messages the publisher keeps while Redis is away (the oldest are dropped).
const CONTROL_HELD: usize = 16_384;
/// Room reserved for the `,"q":<seq>` appended to an event (`u64::MAX` has 20 digits).
const SEQ_ROOM: usize = 26;
/// An unacked event sent this long ago, while the acks have not moved for as long, is sent
/// again (with everything after it).
pub const RESEND_AFTER: Duration = Duration::from_millis(1500);
/// Most messages per pipelined round trip to Redis.
const BATCH: usize = 256;
/// Between two connection attempts while Redis is away.
const RETRY: Duration = Duration::from_millis(200);

/// Why the outbox refused an event: the HTTP API answers 503 with this, and the event was
/// delivered nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Holding it would pass the byte bound.
    Full { held: usize, max: usize },
    /// The oldest held event is older than the age bound.
    TooOld { age: Duration, max: Duration },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Full { held, max } => write!(
                f,
                "The cluster outbox is full ({held} of {max} bytes held while Redis is \
                 unreachable or other nodes have not confirmed): the event was not delivered \
                 anywhere; retry later"
            ),
            Refused::TooOld { age, max } => write!(
                f,
                "The cluster outbox holds an event for {:.1} s (limit {} s) while Redis is \
                 unreachable or other nodes have not confirmed: the event was not delivered \
                 anywhere; retry later",
                age.as_secs_f64(),
                max.as_secs()
            ),
        }
    }
}

/// An event on its way to the other nodes.
struct Held {
    seq: u64,
    bytes: Vec<u8>,
    /// What it holds of the byte bound.
    reserved: usize,
    /// When it was accepted (the age bound).
    at: Instant,
    /// When it was last sent.
    sent: Option<Instant>,
}

/// A positioned channel's event on its way to Redis.
struct HeldAppend {
    append: Append,
    /// What it holds of the byte bound.
    reserved: usize,
    /// When it was accepted (the age bound).
    at: Instant,
}

/// Room an append takes beyond its JSON (the channel, ids, the script's arguments).
const APPEND_ROOM: usize = 96;

/// The publisher's ends: events, appends, and everything else.
type Receivers = (Receiver<Held>, Receiver<HeldAppend>, Receiver<Vec<u8>>);

/// Serialized messages on their way to the publisher thread.
pub struct Outbox {
    events_tx: Sender<Held>,
    appends_tx: Sender<HeldAppend>,
    control_tx: Sender<Vec<u8>>,
    /// Taken once by the publisher thread.
    rx: Mutex<Option<Receivers>>,
    limits: OutboxLimits,
    /// The last seq given out.
    seq: AtomicU64,
    /// Appends handed to the publisher (it compares with what it took).
    appends_given: AtomicU64,
    /// This node's id (idempotency keys of its appends).
    node: u64,
    /// Bytes reserved by held events (and by events on their way to the publisher).
    held_bytes: AtomicUsize,
    /// Held events (the publisher's count).
    held_events: AtomicUsize,
    /// When the oldest held event was accepted, in ms after `epoch`, plus one; 0: none.
    oldest: AtomicU64,
    epoch: Instant,
    /// Resend from this seq (`u64::MAX`: nothing asked).
    resend_from: AtomicU64,
    /// The publisher's connection is up.
    pub connected: AtomicBool,
    /// Non-event messages dropped because their queue was full.
    pub dropped: AtomicU64,
    /// Messages published (events, resends included, and the rest).
    pub published: AtomicU64,
    /// Events sent again.
    pub resent: AtomicU64,
    /// Events refused (the API answered 503).
    pub refused: AtomicU64,
    /// Positioned events appended to Redis (and announced).
    pub appended: AtomicU64,
    /// Appends Redis found done already (their idempotency key was taken).
    pub appends_deduped: AtomicU64,
    /// Append round trips that failed and were tried again.
    pub append_retries: AtomicU64,
}

impl Outbox {
    pub fn new(limits: OutboxLimits, node: u64) -> Outbox {
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let (appends_tx, appends_rx) = crossbeam_channel::unbounded();
        let (control_tx, control_rx) = crossbeam_channel::bounded(CONTROL);
        Outbox {
            events_tx,
            appends_tx,
            control_tx,
            rx: Mutex::new(Some((events_rx, appends_rx, control_rx))),
            limits,
            seq: AtomicU64::new(0),
            appends_given: AtomicU64::new(0),
            node,
            held_bytes: AtomicUsize::new(0),
            held_events: AtomicUsize::new(0),
            oldest: AtomicU64::new(0),
            epoch: Instant::now(),
            resend_from: AtomicU64::new(u64::MAX),
            connected: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            published: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            appends_deduped: AtomicU64::new(0),
            append_retries: AtomicU64::new(0),
        }
    }

    /// Queues a message that is not an event for the other nodes. Never blocks.
    pub fn publish(&self, msg: &Wire<'_>) {
        let Ok(bytes) = serde_json::to_vec(msg) else {
            return;
        };
        match self.control_tx.try_send(bytes) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Holds events (`Wire::Event`s without a seq) for the other nodes, all or none: room for
    /// all of them is reserved first, then each is numbered. Never blocks. `Err`: none was
    /// taken (the caller delivers none of them either).
    pub fn publish_events(&self, msgs: &[Wire<'_>]) -> Result<(), Refused> {
        self.hold(msgs, Vec::new())
    }

    /// Holds `msgs` (`Wire::Event`s without a seq) for the other nodes and `appends`
    /// (positioned channels' events) for Redis, all or none: room for all of them is reserved
    /// first. Never blocks. `Err`: none was taken. An append without an idempotency key gets
    /// one (this node's id and a seq), so that trying it again never appends it twice.
    pub fn hold(&self, msgs: &[Wire<'_>], appends: Vec<Append>) -> Result<(), Refused> {
        let bodies: Vec<Vec<u8>> = msgs
            .iter()
            .filter_map(|m| serde_json::to_vec(m).ok())
            .collect();
        let total: usize = bodies.iter().map(|b| b.len() + SEQ_ROOM).sum::<usize>()
            + appends.iter().map(append_size).sum::<usize>();
        if total == 0 {
            return Ok(());
        }
        self.reserve(total)?;
        for mut append in appends {
            let reserved = append_size(&append);
            let n = self.appends_given.fetch_add(1, Ordering::Relaxed) + 1;
            if append.dedupe.is_none() {
                append.dedupe = Some(format!("n{:016x}.{n}", self.node));
            }
            let at = Instant::now();
            self.note_oldest(at);
            let held = HeldAppend {
                append,
                reserved,
                at,
            };
            if self.appends_tx.send(held).is_err() {
                self.held_bytes.fetch_sub(reserved, Ordering::Relaxed);
            }
        }
        for mut bytes in bodies {
            let reserved = bytes.len() + SEQ_ROOM;
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            append_seq(&mut bytes, seq);
            let held = Held {
                seq,
                bytes,
                reserved,
                at: Instant::now(),
                sent: None,
            };
            self.note_oldest(held.at);
            if self.events_tx.send(held).is_err() {
                // The publisher is gone (the process is exiting).
                self.held_bytes.fetch_sub(reserved, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// Records `at` as the oldest held event's time if none is recorded.
    fn note_oldest(&self, at: Instant) {
        let _ = self
            .oldest
            .compare_exchange(0, self.ms(at), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Reserves `bytes` of the byte bound, unless the oldest held event is past the age bound.
    fn reserve(&self, bytes: usize) -> Result<(), Refused> {
        if let Some(age) = self.oldest_age() {
            if age > self.limits.max_age {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::TooOld {
                    age,
                    max: self.limits.max_age,
                });
            }
        }
        let max = self.limits.max_bytes;
        let mut held = self.held_bytes.load(Ordering::Relaxed);
        loop {
            if held + bytes > max {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Full { held, max });
            }
            match self.held_bytes.compare_exchange_weak(
                held,
                held + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => held = now,
            }
        }
    }

    /// Age of the oldest held event.
    pub fn oldest_age(&self) -> Option<Duration> {
        match self.oldest.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }

    /// Bytes held (reserved) and events held.
    pub fn fill(&self) -> (usize, usize) {
        (
            self.held_bytes.load(Ordering::Relaxed),
            self.held_events.load(Ordering::Relaxed),
        )
    }

    pub fn limits(&self) -> OutboxLimits {
        self.limits
    }

    /// A peer asks for our events from `seq` on (0: everything held).
    pub fn request_resend(&self, seq: u64) {
        self.resend_from.fetch_min(seq, Ordering::Relaxed);
    }
}

/// What an append holds of the byte bound.
fn append_size(a: &Append) -> usize {
    a.json.len()
        + a.channel.len()
        + a.app_id.len()
        + a.except.as_ref().map_or(0, String::len)
        + a.dedupe.as_ref().map_or(40, String::len)
        + APPEND_ROOM
}

/// Appends `,"q":<seq>` as the last field of a serialized `Wire::Event` (the same bytes serde
/// writes for `seq: Some(seq)`: pinned by a test).
fn append_seq(bytes: &mut Vec<u8>, seq: u64) {
    if bytes.last() == Some(&b'}') {
        bytes.pop();
    }
    bytes.extend_from_slice(b",\"q\":");
    bytes.extend_from_slice(seq.to_string().as_bytes());
    bytes.push(b'}');
}

/// Starts the publisher thread: PUBLISHes (SPUBLISH on a Redis Cluster) queued messages on the
/// cluster channel and a heartbeat (this node's id, `shards`, its acks and its oldest held
/// seq) every `HEARTBEAT`, or every `ACK_INTERVAL` while acks move.
pub fn spawn_publisher(
    redis: Redis,
    cluster: Arc<Cluster>,
    shards: usize,
    history_events: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("bts-cluster-pub".into())
        .spawn(move || {
            let Some((events, appends, control)) = cluster
                .outbox
                .rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            else {
                return;
            };
            Publisher {
                keyed: Keyed::new(redis.clone()),
                redis,
                cluster: &cluster,
                appends: VecDeque::new(),
                appends_taken: 0,
                history_events,
                announce: store::announce_channel(&cluster.channel),
                epochs: 0,
                append_retry_at: Instant::now(),
                shards,
                conn: None,
                held: BTreeMap::new(),
                next_send: 1,
                high_sent: 0,
                control: VecDeque::new(),
                retry_at: Instant::now(),
                last_resend: Instant::now(),
                min_ack: None,
                min_ack_since: Instant::now(),
                next_beat: Instant::now(),
                last_beat: Instant::now(),
                last_error_log: None,
            }
            .run(&events, &appends, &control);
        })
}

struct Publisher<'a> {
    redis: Redis,
    /// Connections for appends (by the channel's keys).
    keyed: Keyed,
    cluster: &'a Cluster,
    /// Appends not yet answered by Redis, in order.
    appends: VecDeque<HeldAppend>,
    /// Appends taken from the queue.
    appends_taken: u64,
    /// Most events a channel's stream keeps (`MAXLEN ~`).
    history_events: usize,
    /// `<cluster channel>:resume`.
    announce: String,
    /// Epoch candidates made (a channel without one takes the next).
    epochs: u64,
    /// When to try appends again after a failure.
    append_retry_at: Instant,
    shards: usize,
    conn: Option<Node>,
    /// Events not yet acked by every live peer, by seq.
    held: BTreeMap<u64, Held>,
    /// The next seq to send.
    next_send: u64,
    /// The highest seq sent at least once.
    high_sent: u64,
    /// Non-event messages not yet sent.
    control: VecDeque<Vec<u8>>,
    retry_at: Instant,
    last_resend: Instant,
    /// The live peers' lowest ack, and since when it has not moved (a stall, unlike acks
    /// that merely lag behind a busy stream, is resent).
    min_ack: Option<u64>,
    min_ack_since: Instant,
    next_beat: Instant,
    last_beat: Instant,
    last_error_log: Option<Instant>,
}

impl Publisher<'_> {
    fn run(
        &mut self,
        events: &Receiver<Held>,
        appends: &Receiver<HeldAppend>,
        control: &Receiver<Vec<u8>>,
    ) {
        let outbox = &self.cluster.outbox;
        loop {
            let wait = if self.conn.is_none()
                || self.held.contains_key(&self.next_send)
                || !self.appends.is_empty()
            {
                RETRY.min(Duration::from_millis(50))
            } else {
                self.next_beat
                    .saturating_duration_since(Instant::now())
                    .min(ACK_INTERVAL)
            };
            crossbeam_channel::select! {
                recv(events) -> m => match m {
                    Ok(h) => { self.held.insert(h.seq, h); }
                    Err(_) => return,
                },
                recv(control) -> m => match m {
                    Ok(b) => self.hold_control(b),
                    Err(_) => return,
                },
                recv(appends) -> m => match m {
                    Ok(a) => self.take_append(a),
                    Err(_) => return,
                },
                default(wait) => {}
            }
            for _ in 0..4096 {
                match appends.try_recv() {
                    Ok(a) => self.take_append(a),
                    Err(_) => break,
                }
            }
            for _ in 0..4096 {
                match events.try_recv() {
                    Ok(h) => {
                        self.held.insert(h.seq, h);
                    }
                    Err(_) => break,
                }
            }
            for _ in 0..4096 {
                match control.try_recv() {
                    Ok(b) => self.hold_control(b),
                    Err(_) => break,
                }
            }
            self.release();
            self.plan_resend();
            if self.conn.is_none() && Instant::now() >= self.retry_at {
                self.connect();
            }
            if self.conn.is_some() {
                self.send();
            }
            if Instant::now() >= self.append_retry_at {
                self.send_appends();
            }
            let acks_due = self.cluster.acks_moved.load(Ordering::Relaxed)
                && self.last_beat.elapsed() >= ACK_INTERVAL;
            if Instant::now() >= self.next_beat || acks_due {
                self.heartbeat();
            }
            outbox
                .held_events
                .store(self.held.len() + self.appends.len(), Ordering::Relaxed);
        }
    }

    fn take_append(&mut self, a: HeldAppend) {
        self.appends_taken += 1;
        self.appends.push_back(a);
    }

    /// Runs the held appends in order, a pipelined round trip per run of appends to one node
    /// (`BATCH` at most); lets go of each once Redis answered it. A failure keeps them all for
    /// the next try (from the first unanswered one: Redis answers a pipeline in order).
    fn send_appends(&mut self) {
        let outbox = &self.cluster.outbox;
        while !self.appends.is_empty() {
            let key = store::keys(
                &self.appends[0].append.app_id,
                &self.appends[0].append.channel,
            )
            .1;
            let slot = self
                .redis
                .sharded()
                .then(|| crate::redis_conn::slot(key.as_bytes()));
            let n = self
                .appends
                .iter()
                .take(BATCH)
                .take_while(|h| {
                    slot.is_none_or(|s| {
                        let k = store::keys(&h.append.app_id, &h.append.channel).1;
                        crate::redis_conn::slot(k.as_bytes()) == s
                    })
                })
                .count();
            let (node, replid) = match self.keyed.get(key.as_bytes()) {
                Ok(c) => c,
                Err(e) => {
                    self.append_failed(&key, &e);
                    return;
                }
            };
            let mut pipe = redis::pipe();
            for h in self.appends.iter().take(n) {
                // Used only by a channel that has no epoch yet (or a new replication history).
                self.epochs += 1;
                let candidate = crate::cluster::wire::new_node_id()
                    ^ self.cluster.node.rotate_left(17)
                    ^ self.epochs;
                pipe.add_command(store::append_cmd(
                    &h.append,
                    self.history_events,
                    candidate,
                    &self.announce,
                    replid,
                ));
            }
            let answers: Vec<redis::Value> = match pipe.query(&mut node.conn) {
                Ok(a) => a,
                Err(e) => {
                    self.append_failed(&key, &e);
                    return;
                }
            };
            for (h, v) in self
                .appends
                .drain(..n)
                .zip(answers.iter().chain(std::iter::repeat(&redis::Value::Nil)))
            {
                outbox.held_bytes.fetch_sub(h.reserved, Ordering::AcqRel);
                if store::appended(v).is_some() {
                    outbox.appended.fetch_add(1, Ordering::Relaxed);
                } else {
                    outbox.appends_deduped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn append_failed(&mut self, key: &str, e: &redis::RedisError) {
        self.keyed.failed(key.as_bytes());
        self.cluster
            .outbox
            .append_retries
            .fetch_add(1, Ordering::Relaxed);
        self.append_retry_at = Instant::now() + RETRY;
        if self
            .last_error_log
            .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
        {
            tracing::warn!(redis = %self.redis.describe(), error = %e, held = self.appends.len(), "cluster publisher: appends to Redis failed; holding them and trying again");
            self.last_error_log = Some(Instant::now());
        }
    }

    fn hold_control(&mut self, bytes: Vec<u8>) {
        if self.control.len() >= CONTROL_HELD {
            self.control.pop_front();
            self.cluster.outbox.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.control.push_back(bytes);
    }

    /// Lets go of every sent event each live peer has acked (all sent ones when no live peer
    /// acks), and updates the oldest held event's time.
    fn release(&mut self) {
        let outbox = &self.cluster.outbox;
        let min_ack = self.cluster.min_ack();
        if min_ack != self.min_ack {
            self.min_ack = min_ack;
            self.min_ack_since = Instant::now();
        }
        let upto = min_ack.unwrap_or(self.high_sent).min(self.high_sent);
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() > upto {
                break;
            }
            let h = entry.remove();
            outbox.held_bytes.fetch_sub(h.reserved, Ordering::AcqRel);
        }
        let oldest = match (self.held.first_key_value(), self.appends.front()) {
            (Some((_, h)), Some(a)) => Some(h.at.min(a.at)),
            (Some((_, h)), None) => Some(h.at),
            (None, Some(a)) => Some(a.at),
            (None, None) => None,
        };
        match oldest {
            Some(at) => outbox.oldest.store(outbox.ms(at), Ordering::Relaxed),
            None => {
                // An event or append between its reservation and this thread may set it
                // again: only clear what we saw.
                let seen = outbox.oldest.load(Ordering::Relaxed);
                if outbox.seq.load(Ordering::Relaxed) < self.next_send
                    && outbox.appends_given.load(Ordering::Relaxed) == self.appends_taken
                {
                    let _ = outbox.oldest.compare_exchange(
                        seen,
                        0,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
        }
        if self.held.is_empty() && self.next_send <= self.high_sent {
            self.next_send = self.high_sent + 1;
        }
    }

    /// Goes back to the oldest held event when a peer asked for it, or when acks stalled.
    fn plan_resend(&mut self) {
        let outbox = &self.cluster.outbox;
        let Some((&first, h)) = self.held.first_key_value() else {
            outbox.resend_from.store(u64::MAX, Ordering::Relaxed);
            return;
        };
        let asked = outbox.resend_from.swap(u64::MAX, Ordering::Relaxed);
        let stalled = h.sent.is_some_and(|t| t.elapsed() >= RESEND_AFTER)
            && self.min_ack_since.elapsed() >= RESEND_AFTER
            && self.last_resend.elapsed() >= RESEND_AFTER;
        let from = if asked != u64::MAX {
            Some(asked.max(first))
        } else if stalled {
            Some(first)
        } else {
            None
        };
        if let Some(from) = from {
            if from < self.next_send {
                self.next_send = from;
                self.last_resend = Instant::now();
            }
        }
    }

    fn channel_key(&self) -> &[u8] {
        self.cluster.channel.as_bytes()
    }

    fn connect(&mut self) {
        let found = if self.redis.sharded() {
            self.redis.for_key(self.channel_key())
        } else {
            self.redis.primary()
        };
        match found {
            Ok(node) => {
                tracing::info!(node = %node.addr, "cluster publisher connected");
                self.conn = Some(node);
                self.cluster.outbox.connected.store(true, Ordering::Relaxed);
                // What was sent before may have died with the old primary: from the oldest
                // unacked event on, again.
                if let Some((&first, _)) = self.held.first_key_value() {
                    self.next_send = self.next_send.min(first);
                }
            }
            Err(e) => {
                self.retry_at = Instant::now() + RETRY;
                if self
                    .last_error_log
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
                {
                    tracing::warn!(redis = %self.redis.describe(), error = %e, "cluster publisher: Redis unreachable; holding events");
                    self.last_error_log = Some(Instant::now());
                }
            }
        }
    }

    fn lost_connection(&mut self, e: &redis::RedisError) {
        tracing::warn!(error = %e, "cluster publisher lost Redis; reconnecting");
        self.conn = None;
        self.cluster
            .outbox
            .connected
            .store(false, Ordering::Relaxed);
        self.retry_at = Instant::now() + Duration::from_millis(50);
    }

    fn publish_cmd(&self) -> &'static str {
        if self.redis.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// Sends held control messages, then events from `next_send` on while they are
    /// contiguous, `BATCH` per round trip.
    fn send(&mut self) {
        let outbox = &self.cluster.outbox;
        let cmd = self.publish_cmd();
        while !self.control.is_empty() {
            let n = self.control.len().min(BATCH);
            let mut pipe = redis::pipe();
            for m in self.control.iter().take(n) {
                pipe.cmd(cmd).arg(&self.cluster.channel).arg(m).ignore();
            }
            let Some(node) = self.conn.as_mut() else {
                return;
            };
            if let Err(e) = pipe.query::<()>(&mut node.conn) {
                self.lost_connection(&e);
                return;
            }
            self.control.drain(..n);
            outbox.published.fetch_add(n as u64, Ordering::Relaxed);
        }
        loop {
            let mut pipe = redis::pipe();
            let mut seqs = Vec::new();
            let mut s = self.next_send;
            while seqs.len() < BATCH {
                let Some(h) = self.held.get(&s) else { break };
                pipe.cmd(cmd)
                    .arg(&self.cluster.channel)
                    .arg(&h.bytes)
                    .ignore();
                seqs.push(s);
                s += 1;
            }
            if seqs.is_empty() {
                return;
            }
            let Some(node) = self.conn.as_mut() else {
                return;
            };
            if let Err(e) = pipe.query::<()>(&mut node.conn) {
                self.lost_connection(&e);
                return;
            }
            let now = Instant::now();
            for q in &seqs {
                if let Some(h) = self.held.get_mut(q) {
                    if h.sent.is_some() {
                        outbox.resent.fetch_add(1, Ordering::Relaxed);
                    }
                    h.sent = Some(now);
                }
            }
            outbox
                .published
                .fetch_add(seqs.len() as u64, Ordering::Relaxed);
            self.next_send = s;
            self.high_sent = self.high_sent.max(s - 1);
        }
    }

    fn heartbeat(&mut self) {
        self.next_beat = Instant::now() + HEARTBEAT;
        self.last_beat = Instant::now();
        self.cluster.acks_moved.store(false, Ordering::Relaxed);
        let low = self
            .held
            .first_key_value()
            .map_or(self.high_sent + 1, |(s, _)| *s);
        let beat = Wire::Heartbeat {
            node: self.cluster.node,
            shards: self.shards,
            acks: Some(self.cluster.acks()),
            low: Some(low),
        };
        let Ok(bytes) = serde_json::to_vec(&beat) else {
            return;
        };
        let cmd = self.publish_cmd();
        let Some(node) = self.conn.as_mut() else {
            return;
        };
        let sent: redis::RedisResult<i64> = redis::cmd(cmd)
            .arg(&self.cluster.channel)
            .arg(bytes)
            .query(&mut node.conn);
        match sent {
            Ok(_) => {
                self.cluster
                    .outbox
                    .published
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.lost_connection(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_appended_seq_is_what_serde_writes() {
        let ev = |seq| Wire::Event {
            node: 1,
            app: "a".into(),
            channel: "c".into(),
            json: r#"{"event":"e","data":"{}"}"#.into(),
            except: None,
            cache: false,
            seq,
        };
        let mut bytes = serde_json::to_vec(&ev(None)).unwrap();
        append_seq(&mut bytes, u64::MAX);
        assert_eq!(bytes, serde_json::to_vec(&ev(Some(u64::MAX))).unwrap());
        assert!(bytes.len() <= serde_json::to_vec(&ev(None)).unwrap().len() + SEQ_ROOM);
    }

    #[test]
    fn refusals_take_nothing() {
        let outbox = Outbox::new(
            OutboxLimits {
                max_bytes: 1024,
                max_age: Duration::from_secs(60),
            },
            7,
        );
        let ev = |n: usize| Wire::Event {
            node: 1,
            app: "a".into(),
            channel: "c".into(),
            json: "x".repeat(n).into(),
            except: None,
            cache: false,
            seq: None,
        };
        assert!(outbox.publish_events(&[ev(400)]).is_ok());
        // A batch that does not fit as a whole takes nothing and numbers nothing.
        let r = outbox.publish_events(&[ev(200), ev(400)]);
        assert!(matches!(r, Err(Refused::Full { max: 1024, .. })), "{r:?}");
        assert_eq!(outbox.seq.load(Ordering::Relaxed), 1);
        assert!(outbox.publish_events(&[ev(200)]).is_ok());
        assert_eq!(outbox.seq.load(Ordering::Relaxed), 2);
        assert!(outbox.oldest_age().is_some());
        assert!(outbox.fill().0 <= 1024);
    }

    #[test]
    fn appends_share_the_bound_and_get_idempotency_keys() {
        let outbox = Outbox::new(
            OutboxLimits {
                max_bytes: 2048,
                max_age: Duration::from_secs(60),
            },
            0xab,
        );
        let (_, appends, _) = outbox.rx.lock().unwrap().take().unwrap();
        let append = |n: usize, dedupe: Option<&str>| Append {
            app_id: "a".into(),
            channel: "sports.x".into(),
            json: "x".repeat(n),
            except: None,
            cache: false,
            dedupe: dedupe.map(Into::into),
        };
        let ev = Wire::Event {
            node: 1,
            app: "a".into(),
            channel: "c".into(),
            json: "y".repeat(300).into(),
            except: None,
            cache: false,
            seq: None,
        };
        outbox
            .hold(&[], vec![append(500, None), append(10, Some("laravel.1"))])
            .unwrap();
        // An event and an append that do not fit together are refused together.
        let held = outbox.fill().0;
        let r = outbox.hold(std::slice::from_ref(&ev), vec![append(1200, None)]);
        assert!(matches!(r, Err(Refused::Full { .. })), "{r:?}");
        assert_eq!(outbox.fill().0, held);
        assert_eq!(outbox.seq.load(Ordering::Relaxed), 0);
        outbox.hold(&[ev], vec![append(10, None)]).unwrap();
        let keys: Vec<Option<String>> = appends.try_iter().map(|h| h.append.dedupe).collect();
        assert_eq!(
            keys,
            vec![
                Some("n00000000000000ab.1".into()),
                Some("laravel.1".into()),
                Some("n00000000000000ab.3".into())
            ]
        );
    }
}
