//! The client threads of the short scenarios (fanout, idle, churn, presence, max) and the
//! orchestrator's handle on them ([`Workers`]). Each thread drives its connections through a
//! [`Pool`], takes commands (open these, join, leave, report a phase, stop), and checks every
//! delivery as it arrives: latency, duplicates, order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;

use crate::auth::Creds;
use crate::client::{self, Fate, Handler, Pool, St, Target};
use crate::pace::{catch_up_floor, interval, wait_ms};
use crate::publish::set_bit;
use crate::stats::{new_hist, now_ns, Errors};
use crate::wire;

/// Publisher ids are `phase * PUB_STRIDE + index`, so a delivery names its phase.
pub const PUB_STRIDE: u64 = 1000;

/// Progress every thread reports as it goes, read by the orchestrator while it waits.
#[derive(Default)]
pub struct Shared {
    /// Connections established (and subscribed, when they subscribe).
    pub ready: AtomicU64,
    /// Connections that failed before they were ready.
    pub failed: AtomicU64,
    /// Deliveries counted (first copy of each).
    pub delivered: AtomicU64,
    /// Ready connections the server closed or that broke.
    pub disconnects: AtomicU64,
    /// Sum over joined presence members of the other members each one knows.
    pub presence_known: AtomicI64,
    pub joined: AtomicU64,
    pub join_failed: AtomicU64,
    pub left: AtomicU64,
    /// Leaves not sent because the member had not joined.
    pub leave_skipped: AtomicU64,
    pub churn_started: AtomicU64,
    pub churn_completed: AtomicU64,
    pub churn_failed: AtomicU64,
}

/// The presence channel every member joins.
pub struct PresenceSetup {
    pub channel: String,
    /// When each member's subscribe was sent (ns since the epoch), by member id.
    pub join_sent: Vec<AtomicU64>,
    pub leave_sent: Vec<AtomicU64>,
}

/// What every thread shares.
pub struct Setup {
    pub target: Target,
    pub creds: Creds,
    pub event: String,
    pub channels: Arc<Vec<String>>,
    pub lookup: HashMap<Box<[u8]>, u32>,
    pub presence: Option<PresenceSetup>,
    pub shared: Arc<Shared>,
}

/// Churn: open at `rate` per second from `start` until `until`, each connection subscribing,
/// staying `hold`, then closing with a close handshake.
#[derive(Clone, Copy)]
pub struct ChurnPlan {
    pub rate: f64,
    pub start: Instant,
    pub until: Instant,
    pub hold: Duration,
    pub channels: u32,
    /// This thread's position among `stride` threads (connection ids are interleaved).
    pub index: u32,
    pub stride: u32,
}

/// One connection to open: `id` (global) and the channel it subscribes to, if any.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub id: u32,
    pub channel: Option<u32>,
}

/// What one phase's publishers had accepted: per publisher, per channel, a bitset of seqs.
pub struct PubExpect {
    pub publisher: u32,
    pub by_channel: Vec<Vec<u64>>,
}

pub enum Cmd {
    Open(Vec<Spec>),
    Join {
        ids: Vec<u32>,
        rate: f64,
    },
    Leave {
        ids: Vec<u32>,
        rate: f64,
    },
    Snapshot {
        phase: u32,
        expected: Arc<Vec<PubExpect>>,
        reply: Sender<PhaseStats>,
    },
    Stop,
}

/// One phase's deliveries as seen by one thread.
pub struct PhaseStats {
    pub latency: Histogram<u64>,
    pub expected: u64,
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Deliveries nobody published (or published with an error answer), or on a channel the
    /// connection did not subscribe to.
    pub unexpected: u64,
    /// Subscribers lost (closed by the server or broken) by the time of the snapshot.
    pub lost_subscribers: u64,
    /// Bytes the subscribers' sockets read since the previous snapshot (everything on the
    /// wire: frame headers, compressed or not, control frames).
    pub wire_bytes: u64,
}

impl PhaseStats {
    pub fn new() -> PhaseStats {
        PhaseStats {
            latency: new_hist(),
            expected: 0,
            received: 0,
            missing: 0,
            duplicates: 0,
            reordered: 0,
            unexpected: 0,
            lost_subscribers: 0,
            wire_bytes: 0,
        }
    }
    pub fn merge(&mut self, o: &PhaseStats) {
        let _ = self.latency.add(&o.latency);
        self.expected += o.expected;
        self.received += o.received;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.unexpected += o.unexpected;
        self.lost_subscribers += o.lost_subscribers;
        self.wire_bytes += o.wire_bytes;
    }
}

impl Default for PhaseStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything a thread measured, returned when it stops.
pub struct WorkerResult {
    /// Connect start → ready (subscription_succeeded, or connection_established without one).
    pub establish: Histogram<u64>,
    /// Connect start → pusher:connection_established.
    pub handshake: Histogram<u64>,
    pub errors: Errors,
    /// Close codes of connections the server closed (after they were ready).
    pub server_closes: BTreeMap<String, u64>,
    pub malformed: u64,
    pub other_events: u64,
    pub pings_answered: u64,
    pub churn_cycle: Histogram<u64>,
    pub churn_deferred: u64,
    pub presence_join: Histogram<u64>,
    pub presence_added: Histogram<u64>,
    pub presence_removed: Histogram<u64>,
    pub presence_dup_added: u64,
    pub presence_unknown_removed: u64,
    pub presence_self_events: u64,
    pub presence_foreign: u64,
    pub presence_after_leave: u64,
    pub presence_early: u64,
}

/// The orchestrator's handle on its client threads.
pub struct Workers {
    txs: Vec<Sender<Cmd>>,
    handles: Vec<JoinHandle<WorkerResult>>,
}

impl Workers {
    /// Starts `threads` client threads sharing `setup`: together they keep at most
    /// `connect_concurrency` handshakes in flight and open `connect_rate` connections per
    /// second (0: unpaced); `churn`'s rate is split between them.
    pub fn spawn(
        setup: &Arc<Setup>,
        threads: usize,
        connect_concurrency: usize,
        connect_rate: f64,
        churn: Option<ChurnPlan>,
    ) -> Result<Workers, String> {
        let n = threads.max(1);
        let per_inflight = connect_concurrency.div_ceil(n).max(1);
        let per_rate = connect_rate / n as f64;
        let mut txs = Vec::new();
        let mut handles = Vec::new();
        for i in 0..n {
            let plan = churn.map(|mut c| {
                c.rate /= n as f64;
                c.index = i as u32;
                c.stride = n as u32;
                c
            });
            let w = Worker::new(setup.clone(), i, per_inflight, per_rate, plan)
                .map_err(|e| format!("cannot create epoll instance: {e}"))?;
            let (tx, rx) = crossbeam_channel::unbounded();
            let h = std::thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn(move || w.run(rx))
                .map_err(|e| format!("cannot start a client thread: {e}"))?;
            txs.push(tx);
            handles.push(h);
        }
        Ok(Workers { txs, handles })
    }

    pub fn threads(&self) -> usize {
        self.txs.len()
    }

    /// Sends thread `i` the command `make(i)`.
    pub fn each(&self, make: impl Fn(usize) -> Cmd) {
        for (i, tx) in self.txs.iter().enumerate() {
            let _ = tx.send(make(i));
        }
    }

    /// Spec `i` goes to thread `i % threads`.
    pub fn open(&self, specs: Vec<Spec>) {
        let n = self.txs.len();
        let mut per: Vec<Vec<Spec>> = vec![Vec::new(); n];
        for (i, s) in specs.into_iter().enumerate() {
            per[i % n].push(s);
        }
        for (tx, s) in self.txs.iter().zip(per) {
            let _ = tx.send(Cmd::Open(s));
        }
    }

    /// Every thread's view of phase `phase`'s deliveries, checked against `expected`, merged.
    pub fn snapshot(&self, phase: u32, expected: Arc<Vec<PubExpect>>) -> PhaseStats {
        let (rtx, rrx) = crossbeam_channel::unbounded();
        for tx in &self.txs {
            let _ = tx.send(Cmd::Snapshot {
                phase,
                expected: expected.clone(),
                reply: rtx.clone(),
            });
        }
        drop(rtx);
        let mut total = PhaseStats::new();
        for st in rrx.iter() {
            total.merge(&st);
        }
        total
    }

    /// Stops the threads (closing their connections); what they measured, merged.
    pub fn stop(self) -> WorkerResult {
        for tx in &self.txs {
            let _ = tx.send(Cmd::Stop);
        }
        let mut all: Option<WorkerResult> = None;
        for h in self.handles {
            let Ok(r) = h.join() else {
                continue;
            };
            match all.as_mut() {
                None => all = Some(r),
                Some(a) => a.merge(&r),
            }
        }
        all.expect("at least one client thread")
    }
}

impl WorkerResult {
    fn merge(&mut self, b: &WorkerResult) {
        let a = self;
        let _ = a.establish.add(&b.establish);
        let _ = a.handshake.add(&b.handshake);
        a.errors.merge(&b.errors);
        for (k, v) in &b.server_closes {
            *a.server_closes.entry(k.clone()).or_default() += v;
        }
        a.malformed += b.malformed;
        a.other_events += b.other_events;
        a.pings_answered += b.pings_answered;
        let _ = a.churn_cycle.add(&b.churn_cycle);
        a.churn_deferred += b.churn_deferred;
        let _ = a.presence_join.add(&b.presence_join);
        let _ = a.presence_added.add(&b.presence_added);
        let _ = a.presence_removed.add(&b.presence_removed);
        a.presence_dup_added += b.presence_dup_added;
        a.presence_unknown_removed += b.presence_unknown_removed;
        a.presence_self_events += b.presence_self_events;
        a.presence_foreign += b.presence_foreign;
        a.presence_after_leave += b.presence_after_leave;
        a.presence_early += b.presence_early;
    }
}

struct Track {
    channel: u32,
    publisher: u32,
    /// Highest seq seen + 1.
    top: u64,
    bits: Vec<u64>,
}

struct Pres {
    known: Vec<u64>,
    count: i64,
    joined: bool,
    left: bool,
}

/// What a client thread keeps per connection beside its WebSocket.
struct State {
    spec: Spec,
    ready: bool,
    subscribed: bool,
    socket_id: Option<Box<str>>,
    tracks: Vec<Track>,
    pres: Option<Box<Pres>>,
    churn: bool,
}

type Conn = client::Conn<State>;

const T_CONNECT: u8 = 0;
const T_HOLD: u8 = 1;
const T_CLOSE: u8 = 2;

struct PhaseAcc {
    hist: Histogram<u64>,
    duplicates: u64,
    reordered: u64,
    unexpected: u64,
}

/// Everything but the connections, so handlers can borrow both.
struct Ctx {
    setup: Arc<Setup>,
    inflight: usize,
    delivered_unflushed: u64,
    phases: Vec<PhaseAcc>,
    dead: Vec<(u32, Vec<Track>)>,
    timers: BinaryHeap<Reverse<(Instant, u64, u8)>>,
    by_id: HashMap<u32, u64>,
    churn_hold: Duration,
    res: WorkerResult,
}

pub struct Worker {
    ctx: Ctx,
    pool: Pool<State>,
    pending: VecDeque<Spec>,
    max_inflight: usize,
    connect_interval: Option<Duration>,
    next_open: Instant,
    source_rr: usize,
    churn: Option<ChurnPlan>,
    churn_n: u64,
    join_q: VecDeque<u32>,
    join_interval: Option<Duration>,
    join_next: Instant,
    leave_q: VecDeque<u32>,
    leave_interval: Option<Duration>,
    leave_next: Instant,
}

impl Worker {
    pub fn new(
        setup: Arc<Setup>,
        index: usize,
        max_inflight: usize,
        connect_rate: f64,
        churn: Option<ChurnPlan>,
    ) -> io::Result<Worker> {
        let now = Instant::now();
        let seed = 0x9E37_79B9_7F4A_7C15 ^ ((index as u64 + 1) * 0x2545_F491_4F6C_DD1D);
        // A churn cycle ends when the server ends TCP after our close frame, answered or not.
        let pool = Pool::new(&setup.target, seed, false)?;
        Ok(Worker {
            ctx: Ctx {
                setup,
                inflight: 0,
                delivered_unflushed: 0,
                phases: Vec::new(),
                dead: Vec::new(),
                timers: BinaryHeap::new(),
                by_id: HashMap::new(),
                churn_hold: churn.map(|c| c.hold).unwrap_or_default(),
                res: WorkerResult {
                    establish: new_hist(),
                    handshake: new_hist(),
                    errors: Errors::default(),
                    server_closes: BTreeMap::new(),
                    malformed: 0,
                    other_events: 0,
                    pings_answered: 0,
                    churn_cycle: new_hist(),
                    churn_deferred: 0,
                    presence_join: new_hist(),
                    presence_added: new_hist(),
                    presence_removed: new_hist(),
                    presence_dup_added: 0,
                    presence_unknown_removed: 0,
                    presence_self_events: 0,
                    presence_foreign: 0,
                    presence_after_leave: 0,
                    presence_early: 0,
                },
            },
            pool,
            pending: VecDeque::new(),
            max_inflight: max_inflight.max(1),
            connect_interval: interval(connect_rate),
            next_open: now,
            source_rr: index,
            churn,
            churn_n: 0,
            join_q: VecDeque::new(),
            join_interval: None,
            join_next: now,
            leave_q: VecDeque::new(),
            leave_interval: None,
            leave_next: now,
        })
    }

    /// Runs until `Cmd::Stop` (or the command channel closes).
    pub fn run(mut self, rx: Receiver<Cmd>) -> WorkerResult {
        let mut scratch = vec![0u8; 64 << 10];
        let mut events: Vec<(u64, u32)> = Vec::with_capacity(1024);
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Cmd::Stop) => return self.stop(),
                    Ok(cmd) => self.command(cmd),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return self.stop(),
                }
            }
            let now = Instant::now();
            self.open_due(now);
            self.churn_due(now);
            self.presence_due(now);
            self.timers_due(now);
            let wait = self.next_wake(now);
            if let Err(e) = self.pool.wait(wait, &mut events) {
                self.ctx.res.errors.add(format!("epoll_wait: {e}"));
                std::thread::sleep(Duration::from_millis(10));
            }
            for &(tok, flags) in &events {
                if let Fate::Drop(e) = self.pool.io(tok, flags, &mut scratch, &mut self.ctx) {
                    self.remove(tok, e);
                }
            }
            self.pool.recycle();
            if self.ctx.delivered_unflushed > 0 {
                self.ctx
                    .setup
                    .shared
                    .delivered
                    .fetch_add(self.ctx.delivered_unflushed, Relaxed);
                self.ctx.delivered_unflushed = 0;
            }
        }
    }

    fn next_wake(&self, now: Instant) -> i32 {
        let mut until = now + Duration::from_millis(20);
        if !self.pending.is_empty() && self.ctx.inflight < self.max_inflight {
            until = until.min(self.next_open);
        }
        if let Some(c) = &self.churn {
            if now < c.until {
                until = until.min(self.churn_due_at(c));
            }
        }
        if !self.join_q.is_empty() {
            until = until.min(self.join_next);
        }
        if !self.leave_q.is_empty() {
            until = until.min(self.leave_next);
        }
        if let Some(Reverse((t, _, _))) = self.ctx.timers.peek() {
            until = until.min(*t);
        }
        wait_ms(now, until)
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Open(specs) => self.pending.extend(specs),
            Cmd::Join { ids, rate } => {
                self.join_q.extend(ids);
                self.join_interval = interval(rate);
                self.join_next = Instant::now();
            }
            Cmd::Leave { ids, rate } => {
                self.leave_q.extend(ids);
                self.leave_interval = interval(rate);
                self.leave_next = Instant::now();
            }
            Cmd::Snapshot {
                phase,
                expected,
                reply,
            } => {
                let st = self.snapshot(phase, &expected);
                let _ = reply.send(st);
            }
            Cmd::Stop => {}
        }
    }

    fn open_due(&mut self, now: Instant) {
        while self.ctx.inflight < self.max_inflight && now >= self.next_open {
            let Some(spec) = self.pending.pop_front() else {
                break;
            };
            self.open(spec, false);
            if let Some(iv) = self.connect_interval {
                self.next_open = (self.next_open + iv).max(catch_up_floor(now));
            }
        }
    }

    fn churn_due_at(&self, c: &ChurnPlan) -> Instant {
        c.start + Duration::from_secs_f64(self.churn_n as f64 / c.rate)
    }

    fn churn_due(&mut self, now: Instant) {
        let Some(c) = self.churn else {
            return;
        };
        while now < c.until && now >= self.churn_due_at(&c) {
            if self.ctx.inflight >= self.max_inflight {
                break;
            }
            if now.duration_since(self.churn_due_at(&c)) > Duration::from_millis(50) {
                // Started more than 50 ms late: the concurrency limit (or this thread) held it.
                self.ctx.res.churn_deferred += 1;
            }
            let id = (self.churn_n as u32)
                .wrapping_mul(c.stride)
                .wrapping_add(c.index);
            let channel = (c.channels > 0).then(|| id % c.channels);
            self.churn_n += 1;
            self.ctx.setup.shared.churn_started.fetch_add(1, Relaxed);
            self.open(Spec { id, channel }, true);
        }
    }

    fn presence_due(&mut self, now: Instant) {
        while !self.join_q.is_empty() && now >= self.join_next {
            let id = self.join_q.pop_front().expect("not empty");
            self.presence_send(id, true);
            if let Some(iv) = self.join_interval {
                self.join_next = (self.join_next + iv).max(catch_up_floor(now));
            }
        }
        while !self.leave_q.is_empty() && now >= self.leave_next {
            let id = self.leave_q.pop_front().expect("not empty");
            self.presence_send(id, false);
            if let Some(iv) = self.leave_interval {
                self.leave_next = (self.leave_next + iv).max(catch_up_floor(now));
            }
        }
    }

    fn presence_send(&mut self, id: u32, join: bool) {
        let Some(&tok) = self.ctx.by_id.get(&id) else {
            self.ctx
                .res
                .errors
                .add("presence: member has no open connection");
            if join {
                self.ctx.setup.shared.join_failed.fetch_add(1, Relaxed);
            }
            return;
        };
        let Some(conn) = self.pool.get_mut(tok) else {
            self.ctx
                .res
                .errors
                .add("presence: member's connection is gone");
            if join {
                self.ctx.setup.shared.join_failed.fetch_add(1, Relaxed);
            }
            return;
        };
        let setup = self.ctx.setup.clone();
        let p = setup.presence.as_ref().expect("presence run");
        if join {
            let socket_id = conn.app.socket_id.clone().unwrap_or_default();
            let user = format!("bench-{id}");
            let channel_data = serde_json::json!({
                "user_id": user,
                "user_info": {"name": format!("Bench member {id}")}
            })
            .to_string();
            let msg = setup
                .creds
                .subscribe_message(&socket_id, &p.channel, Some(&channel_data));
            conn.app.pres = Some(Box::new(Pres {
                known: Vec::new(),
                count: 0,
                joined: false,
                left: false,
            }));
            p.join_sent[id as usize].store(now_ns(), Relaxed);
            conn.send_text(msg.as_bytes());
        } else {
            let Some(pr) = conn.app.pres.as_mut().filter(|pr| pr.joined && !pr.left) else {
                setup.shared.leave_skipped.fetch_add(1, Relaxed);
                return;
            };
            let msg = serde_json::json!({
                "event": "pusher:unsubscribe", "data": {"channel": p.channel}
            })
            .to_string();
            pr.left = true;
            setup.shared.presence_known.fetch_sub(pr.count, Relaxed);
            pr.count = 0;
            pr.known.clear();
            p.leave_sent[id as usize].store(now_ns(), Relaxed);
            setup.shared.left.fetch_add(1, Relaxed);
            conn.send_text(msg.as_bytes());
        }
        if let Fate::Drop(e) = self.pool.flush(tok) {
            self.remove(tok, e);
        }
    }

    fn timers_due(&mut self, now: Instant) {
        while let Some(Reverse((t, tok, kind))) = self.ctx.timers.peek().copied() {
            if t > now {
                break;
            }
            self.ctx.timers.pop();
            let Some(conn) = self.pool.get_mut(tok) else {
                continue;
            };
            match kind {
                T_CONNECT if !conn.app.ready && conn.st != St::Closing => {
                    let stage = match conn.st {
                        St::Connecting => "the TCP connect",
                        St::Upgrading => "the WebSocket upgrade",
                        _ if conn.app.socket_id.is_none() => "pusher:connection_established",
                        _ => "pusher_internal:subscription_succeeded",
                    };
                    let msg = format!(
                        "timed out after {:?} waiting for {stage}",
                        self.ctx.setup.target.connect_timeout
                    );
                    self.remove(tok, Some(msg));
                }
                T_HOLD if conn.st == St::Open => {
                    conn.start_close();
                    self.ctx.timers.push(Reverse((
                        Instant::now() + Duration::from_secs(5),
                        tok,
                        T_CLOSE,
                    )));
                    if let Fate::Drop(e) = self.pool.flush(tok) {
                        self.remove(tok, e);
                    }
                }
                T_CLOSE if conn.st == St::Closing => {
                    // No close frame back in time: count the cycle anyway, as a failure.
                    self.remove(
                        tok,
                        Some("server did not answer our close frame in 5 s".into()),
                    );
                }
                _ => {}
            }
        }
    }

    fn open(&mut self, spec: Spec, churn: bool) {
        let setup = self.ctx.setup.clone();
        let sources = &setup.target.sources;
        let src = if sources.is_empty() {
            None
        } else {
            self.source_rr = self.source_rr.wrapping_add(1);
            Some(sources[self.source_rr % sources.len()])
        };
        let state = State {
            spec,
            ready: false,
            subscribed: false,
            socket_id: None,
            tracks: Vec::new(),
            pres: None,
            churn,
        };
        let tok = match self.pool.open(src, state) {
            Ok(tok) => tok,
            Err(e) => {
                self.ctx.res.errors.add(e);
                setup.shared.failed.fetch_add(1, Relaxed);
                if churn {
                    setup.shared.churn_failed.fetch_add(1, Relaxed);
                }
                return;
            }
        };
        if setup.presence.is_some() {
            self.ctx.by_id.insert(spec.id, tok);
        }
        self.ctx.inflight += 1;
        self.ctx.timers.push(Reverse((
            Instant::now() + setup.target.connect_timeout,
            tok,
            T_CONNECT,
        )));
    }

    /// Removes a connection. `err` is why, when it is an error.
    fn remove(&mut self, tok: u64, err: Option<String>) {
        let Some(conn) = self.pool.remove(tok) else {
            return;
        };
        let ctx = &mut self.ctx;
        let shared = &ctx.setup.shared;
        let app = conn.app;
        if !app.ready {
            ctx.inflight -= 1;
            shared.failed.fetch_add(1, Relaxed);
            if app.churn {
                shared.churn_failed.fetch_add(1, Relaxed);
            }
            ctx.res
                .errors
                .add(err.unwrap_or_else(|| "connection closed before it was ready".into()));
        } else if app.churn {
            if let Some(e) = err {
                shared.churn_failed.fetch_add(1, Relaxed);
                ctx.res.errors.add(e);
            } else {
                shared.churn_completed.fetch_add(1, Relaxed);
                ctx.res
                    .churn_cycle
                    .saturating_record(conn.started.elapsed().as_nanos() as u64);
            }
        } else {
            shared.disconnects.fetch_add(1, Relaxed);
            ctx.res
                .errors
                .add(err.unwrap_or_else(|| "server closed a ready connection".into()));
            if let Some(p) = app.pres.as_ref() {
                if p.joined && !p.left {
                    shared.presence_known.fetch_sub(p.count, Relaxed);
                }
            }
            if let Some(c) = app.spec.channel.filter(|_| app.subscribed) {
                ctx.dead.push((c, app.tracks));
            }
        }
        if ctx.setup.presence.is_some() {
            ctx.by_id.remove(&app.spec.id);
        }
    }

    fn snapshot(&mut self, phase: u32, expected: &[PubExpect]) -> PhaseStats {
        let mut st = PhaseStats::new();
        st.wire_bytes = self.pool.take_bytes_in();
        if let Some(acc) = self.ctx.phases.get_mut(phase as usize) {
            let _ = st.latency.add(&acc.hist);
            acc.hist.reset();
            st.duplicates = std::mem::take(&mut acc.duplicates);
            st.reordered = std::mem::take(&mut acc.reordered);
            st.unexpected = std::mem::take(&mut acc.unexpected);
        }
        let check = |st: &mut PhaseStats, chan: u32, tracks: &mut Vec<Track>| {
            for pe in expected {
                let empty = Vec::new();
                let e = pe.by_channel.get(chan as usize).unwrap_or(&empty);
                let r = tracks
                    .iter()
                    .find(|t| t.channel == chan && t.publisher == pe.publisher)
                    .map(|t| &t.bits)
                    .unwrap_or(&empty);
                for i in 0..e.len().max(r.len()) {
                    let ew = e.get(i).copied().unwrap_or(0);
                    let rw = r.get(i).copied().unwrap_or(0);
                    st.expected += ew.count_ones() as u64;
                    st.received += (ew & rw).count_ones() as u64;
                    st.missing += (ew & !rw).count_ones() as u64;
                    st.unexpected += (rw & !ew).count_ones() as u64;
                }
            }
            tracks.retain(|t| t.publisher as u64 / PUB_STRIDE != phase as u64);
        };
        for conn in self.pool.conns_mut() {
            let app = &mut conn.app;
            if let (Some(c), true) = (app.spec.channel, app.subscribed) {
                check(&mut st, c, &mut app.tracks);
            }
        }
        for (c, tracks) in self.ctx.dead.iter_mut() {
            st.lost_subscribers += 1;
            check(&mut st, *c, tracks);
        }
        st
    }

    fn stop(mut self) -> WorkerResult {
        for mut conn in self.pool.drain() {
            conn.close_now();
        }
        self.ctx.res
    }
}

impl Handler<State> for Ctx {
    fn text(&mut self, conn: &mut Conn, tok: u64, msg: &[u8], now: u64) -> Fate {
        text(self, conn, tok, msg, now)
    }

    fn server_closed(&mut self, conn: &mut Conn, code: Option<u16>) {
        if conn.app.ready {
            let code = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
            *self.res.server_closes.entry(code).or_default() += 1;
        }
    }
}

fn text(ctx: &mut Ctx, conn: &mut Conn, tok: u64, msg: &[u8], now: u64) -> Fate {
    let Some(ev) = wire::str_field(msg, "event") else {
        ctx.res.malformed += 1;
        return Fate::Keep;
    };
    if ev == ctx.setup.event.as_bytes() {
        delivery(ctx, conn, msg, now);
        return Fate::Keep;
    }
    match ev {
        b"pusher:connection_established" => {
            let Some(sid) = wire::socket_id(msg) else {
                return Fate::Drop(Some("connection_established without a socket_id".into()));
            };
            if conn.app.socket_id.is_some() {
                ctx.res
                    .errors
                    .add("second pusher:connection_established on one connection");
                return Fate::Keep;
            }
            ctx.res
                .handshake
                .saturating_record(conn.started.elapsed().as_nanos() as u64);
            conn.app.socket_id = Some(sid.into_boxed_str());
            match conn.app.spec.channel {
                Some(c) => {
                    let name = &ctx.setup.channels[c as usize];
                    let sid = conn.app.socket_id.as_deref().unwrap_or("");
                    let msg = ctx.setup.creds.subscribe_message(sid, name, None);
                    conn.send_text(msg.as_bytes());
                }
                None => ready(ctx, conn, tok),
            }
            Fate::Keep
        }
        b"pusher_internal:subscription_succeeded" => {
            let ch = wire::str_field(msg, "channel").unwrap_or(b"");
            if let Some(p) = ctx
                .setup
                .presence
                .as_ref()
                .filter(|p| p.channel.as_bytes() == ch)
            {
                let sent = p.join_sent[conn.app.spec.id as usize].load(Relaxed);
                ctx.res
                    .presence_join
                    .saturating_record(now.saturating_sub(sent).max(1));
                let ids = wire::presence_ids(msg);
                let me = conn.app.spec.id;
                let shared = ctx.setup.shared.clone();
                let Some(pr) = conn.app.pres.as_mut() else {
                    ctx.res.presence_early += 1;
                    return Fate::Keep;
                };
                if pr.joined {
                    ctx.res
                        .errors
                        .add("presence: second subscription_succeeded");
                    return Fate::Keep;
                }
                pr.joined = true;
                for id in ids {
                    match bench_member(&id) {
                        Some(i) if i == me => {}
                        Some(i) => {
                            if set_bit(&mut pr.known, i as u64) {
                                ctx.res.presence_dup_added += 1;
                            } else {
                                pr.count += 1;
                            }
                        }
                        None => ctx.res.presence_foreign += 1,
                    }
                }
                shared.presence_known.fetch_add(pr.count, Relaxed);
                shared.joined.fetch_add(1, Relaxed);
                return Fate::Keep;
            }
            if conn
                .app
                .spec
                .channel
                .map(|c| ctx.setup.channels[c as usize].as_bytes())
                == Some(ch)
            {
                if !conn.app.subscribed {
                    conn.app.subscribed = true;
                    ready(ctx, conn, tok);
                }
            } else {
                ctx.res.other_events += 1;
            }
            Fate::Keep
        }
        b"pusher_internal:member_added" | b"pusher_internal:member_removed" => {
            let added = ev == b"pusher_internal:member_added";
            presence_event(ctx, conn, msg, added, now);
            Fate::Keep
        }
        b"pusher:ping" => {
            ctx.res.pings_answered += 1;
            conn.send_text(wire::PUSHER_PONG);
            Fate::Keep
        }
        b"pusher:error" => {
            ctx.res.errors.add(wire::pusher_error(msg));
            Fate::Keep
        }
        b"pusher:subscription_error" => {
            let ch = String::from_utf8_lossy(wire::str_field(msg, "channel").unwrap_or(b""))
                .into_owned();
            let d = wire::data_value(msg).unwrap_or_default();
            let e = format!("pusher:subscription_error on {ch}: {d}");
            if ctx.setup.presence.as_ref().is_some_and(|p| p.channel == ch) {
                ctx.res.errors.add(e);
                ctx.setup.shared.join_failed.fetch_add(1, Relaxed);
                Fate::Keep
            } else {
                Fate::Drop(Some(e))
            }
        }
        b"pusher:pong"
        | b"pusher_internal:subscription_count"
        | b"pusher:cache_miss"
        | b"pusher:signin_success" => Fate::Keep,
        _ => {
            ctx.res.other_events += 1;
            Fate::Keep
        }
    }
}

/// The member number of a user id the generator gave (`bench-N`).
fn bench_member(s: &str) -> Option<u32> {
    s.strip_prefix("bench-")?.parse().ok()
}

fn presence_event(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8], added: bool, now: u64) {
    let Some(p) = ctx.setup.presence.as_ref() else {
        ctx.res.other_events += 1;
        return;
    };
    let uid = wire::member_id(msg).unwrap_or_default();
    let Some(i) = bench_member(&uid) else {
        ctx.res.presence_foreign += 1;
        return;
    };
    let Some(pr) = conn.app.pres.as_mut() else {
        ctx.res.presence_early += 1;
        return;
    };
    if pr.left {
        ctx.res.presence_after_leave += 1;
        return;
    }
    if !pr.joined {
        ctx.res.presence_early += 1;
        return;
    }
    if i == conn.app.spec.id {
        ctx.res.presence_self_events += 1;
        return;
    }
    let shared = &ctx.setup.shared;
    if added {
        let sent = p.join_sent[i as usize].load(Relaxed);
        if set_bit(&mut pr.known, i as u64) {
            ctx.res.presence_dup_added += 1;
        } else {
            pr.count += 1;
            shared.presence_known.fetch_add(1, Relaxed);
            if sent > 0 {
                ctx.res
                    .presence_added
                    .saturating_record(now.saturating_sub(sent).max(1));
            }
        }
    } else {
        let w = (i / 64) as usize;
        let m = 1u64 << (i % 64);
        if pr.known.get(w).is_some_and(|b| b & m != 0) {
            pr.known[w] &= !m;
            pr.count -= 1;
            shared.presence_known.fetch_sub(1, Relaxed);
            let sent = p.leave_sent[i as usize].load(Relaxed);
            if sent > 0 {
                ctx.res
                    .presence_removed
                    .saturating_record(now.saturating_sub(sent).max(1));
            }
        } else {
            ctx.res.presence_unknown_removed += 1;
        }
    }
}

fn ready(ctx: &mut Ctx, conn: &mut Conn, tok: u64) {
    conn.app.ready = true;
    ctx.inflight -= 1;
    ctx.setup.shared.ready.fetch_add(1, Relaxed);
    ctx.res
        .establish
        .saturating_record(conn.started.elapsed().as_nanos() as u64);
    if conn.app.churn {
        ctx.timers
            .push(Reverse((Instant::now() + ctx.churn_hold, tok, T_HOLD)));
    }
}

fn delivery(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8], now: u64) {
    let fields = (
        wire::num_field(msg, "publisher"),
        wire::num_field(msg, "seq"),
        wire::num_field(msg, "sent_ns"),
    );
    let (Some(publisher), Some(seq), Some(sent)) = fields else {
        ctx.res.malformed += 1;
        return;
    };
    let phase = (publisher / PUB_STRIDE) as usize;
    if phase > 10_000 || seq > 1 << 32 {
        ctx.res.malformed += 1;
        return;
    }
    while ctx.phases.len() <= phase {
        ctx.phases.push(PhaseAcc {
            hist: new_hist(),
            duplicates: 0,
            reordered: 0,
            unexpected: 0,
        });
    }
    let acc = &mut ctx.phases[phase];
    let chan = wire::str_field(msg, "channel").and_then(|c| ctx.setup.lookup.get(c).copied());
    let Some(chan) = chan.filter(|&c| conn.app.spec.channel == Some(c)) else {
        acc.unexpected += 1;
        return;
    };
    let publisher = publisher as u32;
    let t = match conn
        .app
        .tracks
        .iter_mut()
        .position(|t| t.channel == chan && t.publisher == publisher)
    {
        Some(i) => &mut conn.app.tracks[i],
        None => {
            conn.app.tracks.push(Track {
                channel: chan,
                publisher,
                top: 0,
                bits: Vec::new(),
            });
            conn.app.tracks.last_mut().expect("just pushed")
        }
    };
    if set_bit(&mut t.bits, seq) {
        acc.duplicates += 1;
        return;
    }
    if seq + 1 < t.top {
        acc.reordered += 1;
    }
    t.top = t.top.max(seq + 1);
    acc.hist.saturating_record(now.saturating_sub(sent).max(1));
    ctx.delivered_unflushed += 1;
}
