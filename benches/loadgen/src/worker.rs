//! Client threads. Each owns many non-blocking WebSocket connections watched by one epoll
//! instance, takes commands from the orchestrator (open these, join, leave, report a phase,
//! stop), and checks every delivery as it arrives: latency, duplicates, order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use socket2::{Domain, Socket, Type};

use super::auth::Creds;
use super::publish::set_bit;
use super::stats::{new_hist, now_ns, Errors};
use super::sys::{self, Epoll};
use super::wire::{self, FrameHead};

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
    pub addr: SocketAddr,
    pub host_header: String,
    pub path: String,
    pub creds: Creds,
    pub sources: Vec<IpAddr>,
    pub connect_timeout: Duration,
    pub event: String,
    pub channels: Arc<Vec<String>>,
    pub lookup: HashMap<Box<[u8]>, u32>,
    pub presence: Option<PresenceSetup>,
    pub shared: Arc<Shared>,
    pub max_frame: usize,
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

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum St {
    Connecting,
    Upgrading,
    Open,
    Closing,
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

struct Conn {
    stream: TcpStream,
    st: St,
    out_interest: bool,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    frag: Vec<u8>,
    fragmenting: bool,
    key: Option<Box<str>>,
    spec: Spec,
    started: Instant,
    ready: bool,
    subscribed: bool,
    socket_id: Option<Box<str>>,
    tracks: Vec<Track>,
    pres: Option<Box<Pres>>,
    churn: bool,
}

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
    rng: u64,
    inflight: usize,
    delivered_unflushed: u64,
    phases: Vec<PhaseAcc>,
    dead: Vec<(u32, Vec<Track>)>,
    timers: BinaryHeap<Reverse<(Instant, u64, u8)>>,
    by_id: HashMap<u32, u64>,
    churn_hold: Duration,
    res: WorkerResult,
}

/// Marks a connection's fate after handling its input.
pub(super) enum Fate {
    Keep,
    /// Remove it; the string is the error (None: a clean end).
    Drop(Option<String>),
}

pub struct Worker {
    ctx: Ctx,
    epoll: Epoll,
    slots: Vec<Option<Conn>>,
    gens: Vec<u32>,
    free: Vec<u32>,
    pending_free: Vec<u32>,
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

/// An epoll token: a connection's slot and its generation, so a stale event never reaches a
/// newer connection in the same slot.
pub(super) fn token(idx: u32, gen: u32) -> u64 {
    ((gen as u64) << 32) | idx as u64
}

/// The connection a token names, if its slot still holds that generation.
pub(super) fn slot_mut<'a, C>(
    slots: &'a mut [Option<C>],
    gens: &[u32],
    tok: u64,
) -> Option<&'a mut C> {
    let idx = (tok & 0xFFFF_FFFF) as usize;
    if gens.get(idx) != Some(&((tok >> 32) as u32)) {
        return None;
    }
    slots.get_mut(idx)?.as_mut()
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
        Ok(Worker {
            ctx: Ctx {
                setup,
                rng: 0x9E37_79B9_7F4A_7C15 ^ ((index as u64 + 1) * 0x2545_F491_4F6C_DD1D),
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
            epoll: Epoll::new(1024)?,
            slots: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            pending_free: Vec::new(),
            pending: VecDeque::new(),
            max_inflight: max_inflight.max(1),
            connect_interval: (connect_rate > 0.0)
                .then(|| Duration::from_secs_f64(1.0 / connect_rate)),
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
            if let Err(e) = self.epoll.wait(wait, &mut events) {
                self.ctx.res.errors.add(format!("epoll_wait: {e}"));
                std::thread::sleep(Duration::from_millis(10));
            }
            for &(tok, flags) in &events {
                self.io(tok, flags, &mut scratch);
            }
            self.free.append(&mut self.pending_free);
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
        let d = until.saturating_duration_since(now);
        if d.is_zero() {
            0
        } else {
            (d.as_micros().div_ceil(1000) as i32).max(1)
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Open(specs) => self.pending.extend(specs),
            Cmd::Join { ids, rate } => {
                self.join_q.extend(ids);
                self.join_interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
                self.join_next = Instant::now();
            }
            Cmd::Leave { ids, rate } => {
                self.leave_q.extend(ids);
                self.leave_interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
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
        let Some(conn) = slot_mut(&mut self.slots, &self.gens, tok) else {
            self.ctx
                .res
                .errors
                .add("presence: member's connection is gone");
            if join {
                self.ctx.setup.shared.join_failed.fetch_add(1, Relaxed);
            }
            return;
        };
        let ctx = &mut self.ctx;
        let setup = ctx.setup.clone();
        let p = setup.presence.as_ref().expect("presence run");
        if join {
            let socket_id = conn.socket_id.clone().unwrap_or_default();
            let user = format!("bench-{id}");
            let channel_data = serde_json::json!({
                "user_id": user,
                "user_info": {"name": format!("Bench member {id}")}
            })
            .to_string();
            let msg = setup
                .creds
                .subscribe_message(&socket_id, &p.channel, Some(&channel_data));
            conn.pres = Some(Box::new(Pres {
                known: Vec::new(),
                count: 0,
                joined: false,
                left: false,
            }));
            p.join_sent[id as usize].store(now_ns(), Relaxed);
            send_text(ctx, conn, msg.as_bytes());
        } else {
            let Some(pr) = conn.pres.as_mut().filter(|pr| pr.joined && !pr.left) else {
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
            send_text(ctx, conn, msg.as_bytes());
        }
        let fate = flush(conn, &self.epoll, tok);
        if let Fate::Drop(e) = fate {
            self.remove(tok, e);
        }
    }

    fn timers_due(&mut self, now: Instant) {
        while let Some(Reverse((t, tok, kind))) = self.ctx.timers.peek().copied() {
            if t > now {
                break;
            }
            self.ctx.timers.pop();
            let Some(conn) = slot_mut(&mut self.slots, &self.gens, tok) else {
                continue;
            };
            match kind {
                T_CONNECT if !conn.ready && conn.st != St::Closing => {
                    let stage = match conn.st {
                        St::Connecting => "the TCP connect",
                        St::Upgrading => "the WebSocket upgrade",
                        _ if conn.socket_id.is_none() => "pusher:connection_established",
                        _ => "pusher_internal:subscription_succeeded",
                    };
                    let msg = format!(
                        "timed out after {:?} waiting for {stage}",
                        self.ctx.setup.connect_timeout
                    );
                    self.remove(tok, Some(msg));
                }
                T_HOLD if conn.st == St::Open => {
                    start_close(&mut self.ctx, conn, tok);
                    if let Fate::Drop(e) = flush(conn, &self.epoll, tok) {
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
        let src = if setup.sources.is_empty() {
            None
        } else {
            self.source_rr = self.source_rr.wrapping_add(1);
            Some(setup.sources[self.source_rr % setup.sources.len()])
        };
        let stream = match connect_nonblocking(setup.addr, src) {
            Ok(s) => s,
            Err(e) => {
                let from = src.map(|s| format!(" from {s}")).unwrap_or_default();
                self.ctx
                    .res
                    .errors
                    .add(format!("connect to {}{from}: {e}", setup.addr));
                setup.shared.failed.fetch_add(1, Relaxed);
                if churn {
                    setup.shared.churn_failed.fetch_add(1, Relaxed);
                }
                return;
            }
        };
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.gens.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let gen = self.gens[idx as usize];
        let tok = token(idx, gen);
        if let Err(e) = self.epoll.add(stream.as_raw_fd(), tok, sys::IN | sys::OUT) {
            self.ctx.res.errors.add(format!("epoll_ctl: {e}"));
            setup.shared.failed.fetch_add(1, Relaxed);
            self.free.push(idx);
            return;
        }
        self.slots[idx as usize] = Some(Conn {
            stream,
            st: St::Connecting,
            out_interest: true,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            frag: Vec::new(),
            fragmenting: false,
            key: None,
            spec,
            started: Instant::now(),
            ready: false,
            subscribed: false,
            socket_id: None,
            tracks: Vec::new(),
            pres: None,
            churn,
        });
        if setup.presence.is_some() {
            self.ctx.by_id.insert(spec.id, tok);
        }
        self.ctx.inflight += 1;
        self.ctx.timers.push(Reverse((
            Instant::now() + setup.connect_timeout,
            tok,
            T_CONNECT,
        )));
    }

    /// Removes a connection. `err` is why, when it is an error.
    fn remove(&mut self, tok: u64, err: Option<String>) {
        let idx = (tok & 0xFFFF_FFFF) as usize;
        let Some(conn) = self.slots[idx].take() else {
            return;
        };
        self.gens[idx] = self.gens[idx].wrapping_add(1);
        self.pending_free.push(idx as u32);
        let ctx = &mut self.ctx;
        let shared = &ctx.setup.shared;
        if !conn.ready {
            ctx.inflight -= 1;
            shared.failed.fetch_add(1, Relaxed);
            if conn.churn {
                shared.churn_failed.fetch_add(1, Relaxed);
            }
            ctx.res
                .errors
                .add(err.unwrap_or_else(|| "connection closed before it was ready".into()));
        } else if conn.churn {
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
            if let Some(c) = conn.spec.channel.filter(|_| conn.subscribed) {
                ctx.dead.push((c, conn.tracks));
            }
            if let Some(p) = conn.pres.as_ref() {
                if p.joined && !p.left {
                    shared.presence_known.fetch_sub(p.count, Relaxed);
                }
            }
        }
        if ctx.setup.presence.is_some() {
            ctx.by_id.remove(&conn.spec.id);
        }
        // Dropping the stream closes the fd, which also leaves the epoll set.
    }

    fn io(&mut self, tok: u64, flags: u32, scratch: &mut [u8]) {
        let Some(conn) = slot_mut(&mut self.slots, &self.gens, tok) else {
            return;
        };
        let fate = if conn.st == St::Connecting {
            match conn.stream.take_error() {
                Ok(None) if flags & (sys::ERR | sys::HUP) == 0 => {
                    let key = tungstenite::handshake::client::generate_key();
                    let setup = &self.ctx.setup;
                    conn.outbuf.extend_from_slice(&wire::handshake_request(
                        &setup.host_header,
                        &setup.path,
                        &key,
                    ));
                    conn.key = Some(key.into_boxed_str());
                    conn.st = St::Upgrading;
                    flush(conn, &self.epoll, tok)
                }
                Ok(None) => Fate::Drop(Some(format!(
                    "connect to {}: connection closed",
                    self.ctx.setup.addr
                ))),
                Ok(Some(e)) | Err(e) => {
                    Fate::Drop(Some(format!("connect to {}: {e}", self.ctx.setup.addr)))
                }
            }
        } else {
            let mut fate = Fate::Keep;
            if flags & sys::OUT != 0 {
                fate = flush(conn, &self.epoll, tok);
            }
            if matches!(fate, Fate::Keep) && flags & (sys::IN | sys::ERR | sys::HUP) != 0 {
                fate = read_input(&mut self.ctx, conn, tok, scratch);
                if matches!(fate, Fate::Keep) && !conn.outbuf.is_empty() {
                    fate = flush(conn, &self.epoll, tok);
                }
            }
            fate
        };
        if let Fate::Drop(e) = fate {
            self.remove(tok, e);
        }
    }

    fn snapshot(&mut self, phase: u32, expected: &[PubExpect]) -> PhaseStats {
        let mut st = PhaseStats::new();
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
        for conn in self.slots.iter_mut().flatten() {
            if let (Some(c), true) = (conn.spec.channel, conn.subscribed) {
                check(&mut st, c, &mut conn.tracks);
            }
        }
        for (c, tracks) in self.ctx.dead.iter_mut() {
            st.lost_subscribers += 1;
            check(&mut st, *c, tracks);
        }
        st
    }

    fn stop(mut self) -> WorkerResult {
        let mut close = Vec::new();
        for slot in self.slots.iter_mut() {
            if let Some(mut conn) = slot.take() {
                if conn.st == St::Open {
                    close.clear();
                    let m = next_mask(&mut self.ctx.rng);
                    wire::encode_frame(&mut close, wire::OP_CLOSE, &1000u16.to_be_bytes(), m);
                    let _ = conn.stream.write(&close);
                }
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        self.ctx.res
    }
}

/// Paced senders catch up at most 100 ms of backlog in one burst.
pub(super) fn catch_up_floor(now: Instant) -> Instant {
    now.checked_sub(Duration::from_millis(100)).unwrap_or(now)
}

pub(super) fn next_mask(rng: &mut u64) -> [u8; 4] {
    let mut x = *rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *rng = x;
    (x as u32).to_le_bytes()
}

pub(super) fn connect_nonblocking(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    if let Some(ip) = src {
        let _ = sys::bind_address_no_port(s.as_raw_fd());
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}

fn send_text(ctx: &mut Ctx, conn: &mut Conn, payload: &[u8]) {
    let m = next_mask(&mut ctx.rng);
    wire::encode_frame(&mut conn.outbuf, wire::OP_TEXT, payload, m);
}

fn start_close(ctx: &mut Ctx, conn: &mut Conn, tok: u64) {
    let m = next_mask(&mut ctx.rng);
    wire::encode_frame(&mut conn.outbuf, wire::OP_CLOSE, &1000u16.to_be_bytes(), m);
    conn.st = St::Closing;
    ctx.timers.push(Reverse((
        Instant::now() + Duration::from_secs(5),
        tok,
        T_CLOSE,
    )));
}

/// Writes what is queued; asks for POLLOUT only while something is left.
fn flush(conn: &mut Conn, epoll: &Epoll, tok: u64) -> Fate {
    write_queued(
        &mut conn.stream,
        &mut conn.outbuf,
        &mut conn.out_interest,
        epoll,
        tok,
    )
}

/// Writes what is queued in `outbuf` without blocking; asks epoll for POLLOUT (`out_interest`)
/// only while something is left, and frees a large emptied buffer. `Fate::Drop`: the connection
/// must be dropped, and why.
pub(super) fn write_queued(
    stream: &mut TcpStream,
    outbuf: &mut Vec<u8>,
    out_interest: &mut bool,
    epoll: &Epoll,
    tok: u64,
) -> Fate {
    while !outbuf.is_empty() {
        match stream.write(outbuf) {
            Ok(0) => return Fate::Drop(Some("write returned 0".into())),
            Ok(n) => {
                outbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Fate::Drop(Some(format!("write: {e}"))),
        }
    }
    let want_out = !outbuf.is_empty();
    if want_out != *out_interest {
        let interest = if want_out {
            sys::IN | sys::OUT
        } else {
            sys::IN
        };
        if let Err(e) = epoll.modify(stream.as_raw_fd(), tok, interest) {
            return Fate::Drop(Some(format!("epoll_ctl: {e}")));
        }
        *out_interest = want_out;
    }
    if outbuf.capacity() > 4096 && outbuf.is_empty() {
        *outbuf = Vec::new();
    }
    Fate::Keep
}

fn read_input(ctx: &mut Ctx, conn: &mut Conn, tok: u64, scratch: &mut [u8]) -> Fate {
    loop {
        let n = match conn.stream.read(scratch) {
            Ok(0) => {
                return match conn.st {
                    St::Closing => Fate::Drop(None),
                    St::Upgrading => Fate::Drop(Some(
                        "server closed the connection during the WebSocket upgrade".into(),
                    )),
                    _ => Fate::Drop(Some("server closed the TCP connection".into())),
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fate::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return match conn.st {
                    St::Closing => Fate::Drop(None),
                    _ => Fate::Drop(Some(format!("read: {e}"))),
                }
            }
        };
        let now = now_ns();
        let fate = input(ctx, conn, tok, &scratch[..n], now);
        if !matches!(fate, Fate::Keep) {
            return fate;
        }
        if n < scratch.len() {
            return Fate::Keep;
        }
    }
}

/// Handles bytes read from a connection.
fn input(ctx: &mut Ctx, conn: &mut Conn, tok: u64, data: &[u8], now: u64) -> Fate {
    let mut buf = std::mem::take(&mut conn.inbuf);
    let mut fate = Fate::Keep;
    let consumed;
    {
        let src: &[u8] = if buf.is_empty() {
            data
        } else {
            buf.extend_from_slice(data);
            &buf
        };
        let mut pos = 0;
        if conn.st == St::Upgrading {
            match wire::head_end(src) {
                Some(end) => {
                    let key = conn.key.take().unwrap_or_default();
                    if let Err(e) = wire::check_handshake(&src[..end], &key) {
                        let body = String::from_utf8_lossy(&src[end..src.len().min(end + 200)])
                            .trim()
                            .to_string();
                        let e = if body.is_empty() {
                            e
                        } else {
                            format!("{e} {body:?}")
                        };
                        conn.inbuf = Vec::new();
                        return Fate::Drop(Some(e));
                    }
                    conn.st = St::Open;
                    pos = end;
                }
                None if src.len() > 16 << 10 => {
                    return Fate::Drop(Some("WebSocket upgrade answer too large".into()));
                }
                None => {
                    conn.inbuf = src.to_vec();
                    return Fate::Keep;
                }
            }
        }
        while pos < src.len() {
            let head = match wire::parse_frame(&src[pos..], ctx.setup.max_frame) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    fate = Fate::Drop(Some(e));
                    break;
                }
            };
            let FrameHead {
                fin,
                opcode,
                start,
                end,
            } = head;
            let payload = &src[pos + start..pos + end];
            pos += end;
            fate = frame(ctx, conn, tok, fin, opcode, payload, now);
            if !matches!(fate, Fate::Keep) {
                break;
            }
        }
        consumed = pos;
        if matches!(fate, Fate::Keep) && consumed < src.len() {
            let rest = src[consumed..].to_vec();
            conn.inbuf = rest;
        }
    }
    fate
}

fn frame(
    ctx: &mut Ctx,
    conn: &mut Conn,
    tok: u64,
    fin: bool,
    opcode: u8,
    payload: &[u8],
    now: u64,
) -> Fate {
    match opcode {
        wire::OP_TEXT | wire::OP_BINARY if fin && !conn.fragmenting => {
            if opcode == wire::OP_BINARY {
                return Fate::Drop(Some("server sent a binary frame".into()));
            }
            text(ctx, conn, tok, payload, now)
        }
        wire::OP_TEXT | wire::OP_BINARY if !conn.fragmenting => {
            conn.fragmenting = true;
            conn.frag.clear();
            conn.frag.extend_from_slice(payload);
            Fate::Keep
        }
        wire::OP_CONT if conn.fragmenting => {
            conn.frag.extend_from_slice(payload);
            if fin {
                conn.fragmenting = false;
                let msg = std::mem::take(&mut conn.frag);
                let f = text(ctx, conn, tok, &msg, now);
                conn.frag = msg;
                conn.frag.clear();
                if conn.frag.capacity() > 4096 {
                    conn.frag = Vec::new();
                }
                f
            } else {
                Fate::Keep
            }
        }
        wire::OP_PING => {
            let m = next_mask(&mut ctx.rng);
            wire::encode_frame(&mut conn.outbuf, wire::OP_PONG, payload, m);
            Fate::Keep
        }
        wire::OP_PONG => Fate::Keep,
        wire::OP_CLOSE => {
            let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned();
            if conn.st == St::Closing {
                return Fate::Drop(None);
            }
            // Answer the close (best effort), then drop.
            let m = next_mask(&mut ctx.rng);
            let mut out = Vec::new();
            wire::encode_frame(
                &mut out,
                wire::OP_CLOSE,
                &payload[..payload.len().min(2)],
                m,
            );
            let _ = conn.stream.write(&out);
            let code_txt = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
            if conn.ready {
                *ctx.res.server_closes.entry(code_txt.clone()).or_default() += 1;
            }
            let reason = if reason.is_empty() {
                String::new()
            } else {
                format!(" ({reason})")
            };
            Fate::Drop(Some(format!(
                "server closed the WebSocket with code {code_txt}{reason}"
            )))
        }
        _ => Fate::Drop(Some(format!(
            "unexpected frame opcode {opcode} (fragmenting: {})",
            conn.fragmenting
        ))),
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
            let sid = wire::data_value(msg).and_then(|d| {
                d.get("socket_id")
                    .and_then(|s| s.as_str())
                    .map(str::to_owned)
            });
            let Some(sid) = sid else {
                return Fate::Drop(Some("connection_established without a socket_id".into()));
            };
            if conn.socket_id.is_some() {
                ctx.res
                    .errors
                    .add("second pusher:connection_established on one connection");
                return Fate::Keep;
            }
            ctx.res
                .handshake
                .saturating_record(conn.started.elapsed().as_nanos() as u64);
            conn.socket_id = Some(sid.into_boxed_str());
            match conn.spec.channel {
                Some(c) => {
                    let name = &ctx.setup.channels[c as usize];
                    let sid = conn.socket_id.as_deref().unwrap_or("");
                    let msg = ctx.setup.creds.subscribe_message(sid, name, None);
                    send_text(ctx, conn, msg.as_bytes());
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
                let sent = p.join_sent[conn.spec.id as usize].load(Relaxed);
                ctx.res
                    .presence_join
                    .saturating_record(now.saturating_sub(sent).max(1));
                let ids: Vec<String> = wire::data_value(msg)
                    .and_then(|d| {
                        d.pointer("/presence/ids")
                            .and_then(|v| v.as_array())
                            .map(|a| {
                                a.iter()
                                    .map(|x| match x {
                                        serde_json::Value::String(s) => s.clone(),
                                        other => other.to_string(),
                                    })
                                    .collect()
                            })
                    })
                    .unwrap_or_default();
                let me = conn.spec.id;
                let shared = ctx.setup.shared.clone();
                let Some(pr) = conn.pres.as_mut() else {
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
                    match member_id(&id) {
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
                .spec
                .channel
                .map(|c| ctx.setup.channels[c as usize].as_bytes())
                == Some(ch)
            {
                if !conn.subscribed {
                    conn.subscribed = true;
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
            send_text(ctx, conn, br#"{"event":"pusher:pong","data":{}}"#);
            Fate::Keep
        }
        b"pusher:error" => {
            let d = wire::data_value(msg).unwrap_or_default();
            let code = d.get("code").map(|c| c.to_string()).unwrap_or_default();
            let m = d.get("message").and_then(|m| m.as_str()).unwrap_or("");
            ctx.res.errors.add(format!("pusher:error {code}: {m}"));
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

fn member_id(s: &str) -> Option<u32> {
    s.strip_prefix("bench-")?.parse().ok()
}

fn presence_event(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8], added: bool, now: u64) {
    let Some(p) = ctx.setup.presence.as_ref() else {
        ctx.res.other_events += 1;
        return;
    };
    let d = wire::data_value(msg).unwrap_or_default();
    let uid = match d.get("user_id") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let Some(i) = member_id(&uid) else {
        ctx.res.presence_foreign += 1;
        return;
    };
    let Some(pr) = conn.pres.as_mut() else {
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
    if i == conn.spec.id {
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
    conn.ready = true;
    ctx.inflight -= 1;
    ctx.setup.shared.ready.fetch_add(1, Relaxed);
    ctx.res
        .establish
        .saturating_record(conn.started.elapsed().as_nanos() as u64);
    if conn.churn {
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
    let Some(chan) = chan.filter(|&c| conn.spec.channel == Some(c)) else {
        acc.unexpected += 1;
        return;
    };
    let publisher = publisher as u32;
    let t = match conn
        .tracks
        .iter_mut()
        .position(|t| t.channel == chan && t.publisher == publisher)
    {
        Some(i) => &mut conn.tracks[i],
        None => {
            conn.tracks.push(Track {
                channel: chan,
                publisher,
                top: 0,
                bits: Vec::new(),
            });
            conn.tracks.last_mut().expect("just pushed")
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
