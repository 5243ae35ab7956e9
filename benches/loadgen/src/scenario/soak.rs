//! The `soak` scenario: a population of connections that churns for a long time (connects and
//! disconnects, subscribes and unsubscribes over public, private and presence channels) while
//! events are published at a steady rate, and the checks that make it worth running: the
//! server's RSS stays flat after the warm-up, its open files come back to where they started,
//! every subscriber gets every event it is owed on every channel, in order and once, and the
//! presence channels' members are exactly who the generator put there.
//!
//! **What a subscriber is owed.** Each channel has one publisher thread and one sequence
//! (`seq` 0, 1, 2...), published in order over one HTTP connection, so every shard sees a
//! channel's events in sequence order. A subscription *window* runs from the client reading
//! `subscription_succeeded` to its unsubscribe (or disconnect). Within a window the sequence
//! numbers received must be consecutive: a jump is a loss, a step back a duplicate or reorder.
//! At its start, every event whose publish *began* after the client read `subscription_succeeded`
//! is owed (the server registered the subscription before sending that), so the first one
//! received may not come after that point. At its end, before unsubscribing or disconnecting,
//! the client waits until it has every event the server had *accepted* (HTTP 200) by then,
//! for at most `--catch-up-s`; what is still missing is counted. Events that arrive after the
//! unsubscribe was sent (fanned out before the server read it) must continue the sequence.
//! Neither edge needs a timing margin.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::{preflight, server_connections};
use crate::auth::Creds;
use crate::client::{self, Fate, Handler, Pool, St, Target};
use crate::pace::{catch_up_floor, interval, wait_ms};
use crate::publish::{match_update, HttpClient, Sink};
use crate::report::{round1, round3, thousands, Report};
use crate::stats::{fmt_hist, new_hist, now_ns, proc_sample, summary_us, Errors};
use crate::wire;
use crate::{BenchError, Env, Result};

#[derive(ClapArgs, Debug, Clone)]
pub struct SoakArgs {
    /// Connections held open (the population churns, its size stays).
    #[arg(short = 'c', long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connections closed and replaced by new ones per second, once all are open.
    #[arg(long, default_value_t = 500.0)]
    pub churn_rate: f64,
    /// Subscribe and unsubscribe operations per second, all connections together.
    #[arg(long, default_value_t = 500.0)]
    pub sub_rate: f64,
    /// Events per second published, all channels together (one channel per event).
    #[arg(short = 'r', long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds from the first connection to the end of the churn, warm-up included.
    #[arg(short = 'd', long, default_value_t = 1800.0)]
    pub duration: f64,
    /// Seconds of warm-up (the ramp included); RSS and fds are compared from its end.
    #[arg(long, default_value_t = 120.0)]
    pub warmup: f64,
    /// New connections per second while ramping up to --connections.
    #[arg(long, default_value_t = 1000.0)]
    pub ramp_rate: f64,
    /// Public channels.
    #[arg(long, default_value_t = 20)]
    pub public_channels: usize,
    /// Private channels (subscriptions signed with the app secret).
    #[arg(long, default_value_t = 20)]
    pub private_channels: usize,
    /// Presence channels (channel_data signed with the app secret).
    #[arg(long, default_value_t = 20)]
    pub presence_channels: usize,
    /// Most users the generator puts in one presence channel (the server's limit is 100).
    #[arg(long, default_value_t = 90)]
    pub presence_max_members: usize,
    /// Distinct presence users; connections pick one at random, so a user may have several
    /// sockets in a channel (default: connections / 4).
    #[arg(long)]
    pub users: Option<usize>,
    /// Most channels one connection is subscribed to at a time.
    #[arg(long, default_value_t = 3)]
    pub max_subs: usize,
    /// Connections that stay the whole run, subscribed to one channel of each kind.
    #[arg(long, default_value_t = 100)]
    pub steady: usize,
    /// Fraction of the disconnects that drop TCP without a WebSocket close frame.
    #[arg(long, default_value_t = 0.1)]
    pub abrupt_fraction: f64,
    /// Largest RSS growth allowed after the warm-up, percent, by the least-squares trend of the
    /// per-second samples from the end of the warm-up to the end.
    #[arg(long, default_value_t = 2.0)]
    pub max_rss_growth_pct: f64,
    /// How long a subscriber may take to receive every event it is owed before unsubscribing
    /// or at the end (else those events count as missing), seconds.
    #[arg(long, default_value_t = 30.0)]
    pub catch_up_s: f64,
    /// Publisher threads (one HTTP connection each; each owns every P-th channel).
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Seconds between progress lines on stderr.
    #[arg(long, default_value_t = 10.0)]
    pub progress_s: f64,
    /// Channel names start with this (a random suffix keeps runs apart).
    #[arg(long, default_value = "soak")]
    pub channel_prefix: String,
}

/// How long the server may take to answer our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Width of the windows whose mean RSS is compared (after the warm-up, at the end).
const RSS_WINDOW: Duration = Duration::from_secs(10);

/// A generous guess of the run's length, seconds (the hard timeout adds 120 to it).
pub fn estimate_secs(a: &SoakArgs) -> f64 {
    a.duration.max(a.warmup) + 4.0 * a.catch_up_s + 90.0
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Public,
    Private,
    Presence,
}

/// What every thread knows and nobody changes.
struct Plan {
    target: Target,
    creds: Creds,
    event: String,
    channels: Vec<String>,
    kinds: Vec<Kind>,
    lookup: HashMap<Box<[u8]>, u32>,
    /// Channel index → its slot in the presence book (presence channels only).
    pres_slot: Vec<Option<usize>>,
    public: Vec<u32>,
    private: Vec<u32>,
    presence: Vec<u32>,
    users: u32,
    presence_cap: usize,
    max_subs: usize,
    abrupt_fraction: f64,
    catch_up: Duration,
}

/// What the threads share while running.
struct Board {
    /// Per channel: sequence numbers whose publish has begun (the next one to begin).
    started: Vec<AtomicU64>,
    /// Per channel: one past the highest sequence number the server accepted.
    answered: Vec<AtomicU64>,
    /// Per presence channel: user → sockets subscribed (as far as the generator has sent).
    book: Mutex<Vec<HashMap<u32, u32>>>,
    stop_churn: AtomicBool,
    stop_publish: AtomicBool,
    live: AtomicU64,
    deliveries: AtomicU64,
    connects: AtomicU64,
    disconnects: AtomicU64,
    sub_ops: AtomicU64,
    troubles: AtomicU64,
}

enum Cmd {
    /// Stop churning; answer once nothing is in flight (handshakes, subscribes, fences,
    /// closes).
    Quiesce(Sender<()>),
    /// Every subscription catches up to everything accepted so far; answer when done.
    FinalFence(Sender<()>),
    /// Compare every presence member's view with the book.
    Check(Sender<ViewCheck>),
    Stop,
}

#[derive(Default)]
struct ViewCheck {
    views: u64,
    mismatches: u64,
    examples: Vec<String>,
}

/// What one client thread counted.
struct Tally {
    establish: Histogram<u64>,
    latency: Histogram<u64>,
    fence_wait: Histogram<u64>,
    errors: Errors,
    server_close_codes: BTreeMap<String, u64>,
    connects: u64,
    established: u64,
    connect_failed: u64,
    closes_clean: u64,
    closes_abrupt: u64,
    server_closed: u64,
    subscribes: u64,
    subscribed: u64,
    unsubscribes: u64,
    sub_errors: u64,
    windows: u64,
    deliveries: u64,
    steady_deliveries: u64,
    missing: u64,
    steady_missing: u64,
    gaps: u64,
    dup_or_reordered: u64,
    unexpected: u64,
    fence_timeouts: u64,
    presence_joins: u64,
    presence_refused_by_cap: u64,
    dup_added: u64,
    unknown_removed: u64,
    pings: u64,
    malformed: u64,
    other: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            establish: new_hist(),
            latency: new_hist(),
            fence_wait: new_hist(),
            errors: Errors::default(),
            server_close_codes: BTreeMap::new(),
            connects: 0,
            established: 0,
            connect_failed: 0,
            closes_clean: 0,
            closes_abrupt: 0,
            server_closed: 0,
            subscribes: 0,
            subscribed: 0,
            unsubscribes: 0,
            sub_errors: 0,
            windows: 0,
            deliveries: 0,
            steady_deliveries: 0,
            missing: 0,
            steady_missing: 0,
            gaps: 0,
            dup_or_reordered: 0,
            unexpected: 0,
            fence_timeouts: 0,
            presence_joins: 0,
            presence_refused_by_cap: 0,
            dup_added: 0,
            unknown_removed: 0,
            pings: 0,
            malformed: 0,
            other: 0,
        }
    }

    fn merge(&mut self, o: &Tally) {
        let _ = self.establish.add(&o.establish);
        let _ = self.latency.add(&o.latency);
        let _ = self.fence_wait.add(&o.fence_wait);
        self.errors.merge(&o.errors);
        for (k, v) in &o.server_close_codes {
            *self.server_close_codes.entry(k.clone()).or_default() += v;
        }
        self.connects += o.connects;
        self.established += o.established;
        self.connect_failed += o.connect_failed;
        self.closes_clean += o.closes_clean;
        self.closes_abrupt += o.closes_abrupt;
        self.server_closed += o.server_closed;
        self.subscribes += o.subscribes;
        self.subscribed += o.subscribed;
        self.unsubscribes += o.unsubscribes;
        self.sub_errors += o.sub_errors;
        self.windows += o.windows;
        self.deliveries += o.deliveries;
        self.steady_deliveries += o.steady_deliveries;
        self.missing += o.missing;
        self.steady_missing += o.steady_missing;
        self.gaps += o.gaps;
        self.dup_or_reordered += o.dup_or_reordered;
        self.unexpected += o.unexpected;
        self.fence_timeouts += o.fence_timeouts;
        self.presence_joins += o.presence_joins;
        self.presence_refused_by_cap += o.presence_refused_by_cap;
        self.dup_added += o.dup_added;
        self.unknown_removed += o.unknown_removed;
        self.pings += o.pings;
        self.malformed += o.malformed;
        self.other += o.other;
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Then {
    Unsubscribe,
    Stay,
}

#[derive(Clone, Copy, Debug)]
enum SubSt {
    Pending {
        since: Instant,
    },
    Active,
    /// Waiting to have every event up to `target` before `then`.
    Fencing {
        target: u64,
        since: Instant,
        then: Then,
    },
    Left,
}

/// One connection's record of one channel, kept for the connection's life.
struct Sub {
    chan: u32,
    st: SubSt,
    /// A subscribe was sent and no unsubscribe since: the server counts it.
    on_server: bool,
    /// An earlier window exists, whose trailing events may still arrive.
    had_window: bool,
    /// The window was given up on (catch-up timeout): its events are ignored.
    abandoned: bool,
    first_required: u64,
    expect: Option<u64>,
    view: Option<HashSet<u32>>,
}

/// What one received sequence number means for its window.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    InOrder,
    /// This many events before it never came.
    Gap(u64),
    /// At or before one already received: a duplicate or a reorder.
    Backward,
}

impl Sub {
    fn receive(&mut self, seq: u64) -> Seen {
        let from = self.expect.unwrap_or(self.first_required);
        if self.expect.is_some_and(|e| seq < e) {
            return Seen::Backward;
        }
        self.expect = Some(seq + 1);
        // The first event of a window may be older than `first_required` (published before
        // the subscribe, fanned out after it), never newer.
        if seq > from {
            Seen::Gap(seq - from)
        } else {
            Seen::InOrder
        }
    }

    /// Has every event below `target` that this window is owed.
    fn caught_up(&self, target: u64) -> bool {
        self.expect.unwrap_or(self.first_required) >= target
    }
}

/// What a soak thread keeps per connection beside its WebSocket.
struct Peer {
    closing_since: Option<Instant>,
    established: bool,
    socket_id: Option<Box<str>>,
    steady: bool,
    gid: u32,
    user: u32,
    subs: Vec<Sub>,
    /// Chosen to disconnect: counted out of the population already.
    leaving: bool,
    /// Disconnect once no window is catching up (true: without a close frame).
    close_when_fenced: Option<bool>,
    /// Remove now, dropping TCP without a close frame.
    drop_now: bool,
}

type Conn = client::Conn<Peer>;

struct Ctx {
    plan: Arc<Plan>,
    board: Arc<Board>,
    rng: u64,
    t: Tally,
}

impl Ctx {
    fn rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.rand() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.rand() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

struct SoakWorker {
    ctx: Ctx,
    pool: Pool<Peer>,
    index: u32,
    threads: u32,
    target: usize,
    steady_target: usize,
    steady_opened: usize,
    opened: u32,
    pop: usize,
    reached: bool,
    open_iv: Duration,
    next_open: Instant,
    churn_iv: Option<Duration>,
    next_churn: Instant,
    sub_iv: Option<Duration>,
    next_sub: Instant,
    next_scan: Instant,
    quiesce: Option<Sender<()>>,
    final_fence: Option<Sender<()>>,
}

fn per_thread(total: usize, threads: usize, i: usize) -> usize {
    total / threads + usize::from(i < total % threads)
}

impl SoakWorker {
    fn new(
        plan: Arc<Plan>,
        board: Arc<Board>,
        index: usize,
        threads: usize,
        a: &SoakArgs,
    ) -> io::Result<SoakWorker> {
        let now = Instant::now();
        let t = threads as f64;
        let rng = 0x9E37_79B9_7F4A_7C15 ^ ((index as u64 + 1) * 0x2545_F491_4F6C_DD1D) ^ now_ns();
        // The server must answer our close frame: an end of TCP without it is a trouble.
        let pool = Pool::new(&plan.target, rng, true)?;
        Ok(SoakWorker {
            ctx: Ctx {
                plan,
                board,
                rng,
                t: Tally::new(),
            },
            pool,
            index: index as u32,
            threads: threads as u32,
            target: per_thread(a.connections, threads, index),
            steady_target: per_thread(a.steady.min(a.connections), threads, index),
            steady_opened: 0,
            opened: 0,
            pop: 0,
            reached: false,
            open_iv: interval(a.ramp_rate / t).unwrap_or(Duration::ZERO),
            next_open: now,
            churn_iv: interval(a.churn_rate / t),
            next_churn: now,
            sub_iv: interval(a.sub_rate / t),
            next_sub: now,
            next_scan: now,
            quiesce: None,
            final_fence: None,
        })
    }

    fn run(mut self, rx: Receiver<Cmd>) -> Tally {
        let mut scratch = vec![0u8; 64 << 10];
        let mut events: Vec<(u64, u32)> = Vec::with_capacity(1024);
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Cmd::Stop) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        return self.stop(&mut scratch)
                    }
                    Ok(Cmd::Quiesce(reply)) => self.quiesce = Some(reply),
                    Ok(Cmd::FinalFence(reply)) => {
                        self.start_final_fence();
                        self.final_fence = Some(reply);
                    }
                    Ok(Cmd::Check(reply)) => {
                        let _ = reply.send(self.check_views());
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                }
            }
            let now = Instant::now();
            let churning = !self.ctx.board.stop_churn.load(Relaxed);
            if churning {
                self.open_due(now);
                self.churn_due(now);
                self.sub_due(now);
            }
            if now >= self.next_scan {
                self.next_scan = now + Duration::from_millis(100);
                self.scan(now);
            }
            let wait = self.next_wake(now, churning);
            if let Err(e) = self.pool.wait(wait, &mut events) {
                self.ctx.t.errors.add(format!("epoll_wait: {e}"));
                std::thread::sleep(Duration::from_millis(10));
            }
            let before = self.ctx.t.deliveries;
            for &(tok, flags) in &events {
                self.io(tok, flags, &mut scratch);
            }
            let delivered = self.ctx.t.deliveries - before;
            if delivered > 0 {
                self.ctx.board.deliveries.fetch_add(delivered, Relaxed);
            }
            self.pool.recycle();
        }
    }

    fn next_wake(&self, now: Instant, churning: bool) -> i32 {
        let mut until = self.next_scan.min(now + Duration::from_millis(20));
        if churning {
            if self.pop < self.target {
                until = until.min(self.next_open);
            }
            if self.reached {
                if self.churn_iv.is_some() {
                    until = until.min(self.next_churn);
                }
                if self.sub_iv.is_some() {
                    until = until.min(self.next_sub);
                }
            }
        }
        wait_ms(now, until)
    }

    fn open_due(&mut self, now: Instant) {
        while self.pop < self.target && now >= self.next_open {
            let steady = self.steady_opened < self.steady_target;
            if steady {
                self.steady_opened += 1;
            }
            self.open(steady);
            self.next_open = (self.next_open + self.open_iv).max(catch_up_floor(now));
        }
        if self.pop >= self.target && !self.reached {
            self.reached = true;
            self.next_churn = now;
            self.next_sub = now;
        }
    }

    /// A random connection that is open, established, not leaving and not steady.
    fn pick(&mut self, no_fencing: bool) -> Option<u64> {
        if self.pool.slot_count() == 0 {
            return None;
        }
        for _ in 0..16 {
            let i = self.ctx.below(self.pool.slot_count());
            let Some((tok, c)) = self.pool.at(i) else {
                continue;
            };
            let p = &c.app;
            if c.st != St::Open || !p.established || p.leaving || p.steady {
                continue;
            }
            if no_fencing && p.subs.iter().any(|s| matches!(s.st, SubSt::Fencing { .. })) {
                continue;
            }
            return Some(tok);
        }
        None
    }

    fn churn_due(&mut self, now: Instant) {
        let Some(iv) = self.churn_iv.filter(|_| self.reached) else {
            return;
        };
        while now >= self.next_churn {
            self.next_churn = (self.next_churn + iv).max(catch_up_floor(now));
            let Some(tok) = self.pick(false) else {
                break;
            };
            let abrupt = self.ctx.chance(self.ctx.plan.abrupt_fraction);
            let Some(conn) = self.pool.get_mut(tok) else {
                continue;
            };
            self.ctx.board.disconnects.fetch_add(1, Relaxed);
            leave_pop(&mut self.ctx, conn, &mut self.pop);
            conn.app.close_when_fenced = Some(abrupt);
            let now = Instant::now();
            for i in 0..conn.app.subs.len() {
                if matches!(conn.app.subs[i].st, SubSt::Active) {
                    start_fence(&mut self.ctx, conn, i, Then::Stay, now);
                }
            }
            maybe_close(&mut self.ctx, conn);
            self.after(tok);
        }
    }

    fn sub_due(&mut self, now: Instant) {
        let Some(iv) = self.sub_iv.filter(|_| self.reached) else {
            return;
        };
        while now >= self.next_sub {
            self.next_sub = (self.next_sub + iv).max(catch_up_floor(now));
            let Some(tok) = self.pick(true) else {
                break;
            };
            self.ctx.board.sub_ops.fetch_add(1, Relaxed);
            let Some(conn) = self.pool.get_mut(tok) else {
                continue;
            };
            sub_op(&mut self.ctx, conn);
            self.after(tok);
        }
    }

    /// After acting on a connection outside its I/O: flush it, or remove it.
    fn after(&mut self, tok: u64) {
        let Some(conn) = self.pool.get_mut(tok) else {
            return;
        };
        if conn.app.drop_now {
            self.remove(tok, None);
            return;
        }
        if let Fate::Drop(e) = self.pool.flush(tok) {
            self.remove(tok, e);
        }
    }

    fn open(&mut self, steady: bool) {
        let plan = self.ctx.plan.clone();
        let sources = &plan.target.sources;
        let src = if sources.is_empty() {
            None
        } else {
            Some(sources[self.ctx.below(sources.len())])
        };
        let gid = self.opened * self.threads + self.index;
        self.opened += 1;
        self.ctx.t.connects += 1;
        self.ctx.board.connects.fetch_add(1, Relaxed);
        let user = if steady {
            plan.users + gid
        } else {
            self.ctx.below(plan.users as usize) as u32
        };
        let peer = Peer {
            closing_since: None,
            established: false,
            socket_id: None,
            steady,
            gid,
            user,
            subs: Vec::new(),
            leaving: false,
            close_when_fenced: None,
            drop_now: false,
        };
        if let Err(e) = self.pool.open(src, peer) {
            self.ctx.t.errors.add(e);
            self.ctx.t.connect_failed += 1;
            self.ctx.board.troubles.fetch_add(1, Relaxed);
            return;
        }
        self.pop += 1;
    }

    /// Removes a connection and accounts for how it ended.
    fn remove(&mut self, tok: u64, err: Option<String>) {
        let Some(mut conn) = self.pool.remove(tok) else {
            return;
        };
        let ctx = &mut self.ctx;
        if !conn.app.established {
            ctx.t.connect_failed += 1;
            ctx.board.troubles.fetch_add(1, Relaxed);
            ctx.t
                .errors
                .add(err.unwrap_or_else(|| "connection closed before it was established".into()));
        } else if conn.app.drop_now {
            ctx.t.closes_abrupt += 1;
            conn.shutdown();
        } else if conn.st == St::Closing {
            match err {
                None => ctx.t.closes_clean += 1,
                Some(e) => {
                    ctx.board.troubles.fetch_add(1, Relaxed);
                    ctx.t.errors.add(e);
                }
            }
        } else {
            // The server (or the network) ended a connection we did not close.
            ctx.t.server_closed += 1;
            ctx.board.troubles.fetch_add(1, Relaxed);
            ctx.t
                .errors
                .add(err.unwrap_or_else(|| "server closed an open connection".into()));
            release_presence(ctx, &mut conn);
        }
        leave_pop(ctx, &mut conn, &mut self.pop);
    }

    fn io(&mut self, tok: u64, flags: u32, scratch: &mut [u8]) {
        if let Fate::Drop(e) = self.pool.io(tok, flags, scratch, &mut self.ctx) {
            self.remove(tok, e);
        }
    }

    /// Timeouts (handshakes, subscribes, catch-ups, closes) and the answers to the
    /// orchestrator's waits.
    fn scan(&mut self, now: Instant) {
        let timeout = self.ctx.plan.target.connect_timeout;
        let catch_up = self.ctx.plan.catch_up;
        let mut busy = false;
        let mut fencing = false;
        for i in 0..self.pool.slot_count() {
            let Some((tok, conn)) = self.pool.at(i) else {
                continue;
            };
            if !conn.app.established {
                busy = true;
                if now.duration_since(conn.started) > timeout {
                    let stage = match conn.st {
                        St::Connecting => "the TCP connect",
                        St::Upgrading => "the WebSocket upgrade",
                        _ => "pusher:connection_established",
                    };
                    self.remove(tok, Some(format!("timed out waiting for {stage}")));
                }
                continue;
            }
            if conn.st == St::Closing {
                busy = true;
                if conn
                    .app
                    .closing_since
                    .is_some_and(|t| now.duration_since(t) > CLOSE_TIMEOUT)
                {
                    self.remove(
                        tok,
                        Some("server did not answer our close frame in 5 s".into()),
                    );
                }
                continue;
            }
            let ctx = &mut self.ctx;
            for s in 0..conn.app.subs.len() {
                match conn.app.subs[s].st {
                    SubSt::Pending { since } => {
                        busy = true;
                        if now.duration_since(since) > timeout {
                            ctx.t.sub_errors += 1;
                            ctx.board.troubles.fetch_add(1, Relaxed);
                            ctx.t
                                .errors
                                .add(format!("no subscription_succeeded within {timeout:?}"));
                            conn.app.subs[s].st = SubSt::Left;
                        }
                    }
                    SubSt::Fencing { target, since, .. } => {
                        busy = true;
                        fencing = true;
                        if now.duration_since(since) > catch_up {
                            let sub = &mut conn.app.subs[s];
                            let have = sub.expect.unwrap_or(sub.first_required);
                            let lost = target.saturating_sub(have);
                            ctx.t.missing += lost;
                            if conn.app.steady {
                                ctx.t.steady_missing += lost;
                            }
                            ctx.t.fence_timeouts += 1;
                            ctx.board.troubles.fetch_add(1, Relaxed);
                            ctx.t
                                .errors
                                .add(format!("events still missing after waiting {catch_up:?}"));
                            sub.abandoned = true;
                            complete_fence(ctx, conn, s, now);
                        }
                    }
                    _ => {}
                }
            }
            if conn.app.close_when_fenced.is_some() {
                busy = true;
                maybe_close(ctx, conn);
            }
            self.after(tok);
        }
        if !busy {
            if let Some(reply) = self.quiesce.take() {
                let _ = reply.send(());
            }
        }
        if !fencing {
            if let Some(reply) = self.final_fence.take() {
                let _ = reply.send(());
            }
        }
    }

    fn start_final_fence(&mut self) {
        let now = Instant::now();
        for i in 0..self.pool.slot_count() {
            let Some((tok, conn)) = self.pool.at(i) else {
                continue;
            };
            if conn.st != St::Open || conn.app.leaving {
                continue;
            }
            for s in 0..conn.app.subs.len() {
                if matches!(conn.app.subs[s].st, SubSt::Active) {
                    start_fence(&mut self.ctx, conn, s, Then::Stay, now);
                }
            }
            self.after(tok);
        }
    }

    fn check_views(&mut self) -> ViewCheck {
        let mut out = ViewCheck::default();
        let plan = self.ctx.plan.clone();
        let book = self.ctx.board.book.lock().expect("presence book");
        for conn in self.pool.conns() {
            if conn.st != St::Open || conn.app.leaving {
                continue;
            }
            for sub in &conn.app.subs {
                let (Some(view), Some(slot)) = (&sub.view, plan.pres_slot[sub.chan as usize])
                else {
                    continue;
                };
                if !matches!(sub.st, SubSt::Active) || sub.abandoned {
                    continue;
                }
                out.views += 1;
                let want: HashSet<u32> = book[slot].keys().copied().collect();
                if *view != want {
                    out.mismatches += 1;
                    if out.examples.len() < 5 {
                        let extra: Vec<_> = view.difference(&want).take(5).collect();
                        let absent: Vec<_> = want.difference(view).take(5).collect();
                        out.examples.push(format!(
                            "{} (user u{}) on {}: sees {} members, {} expected; extra {extra:?}, \
                             absent {absent:?}",
                            conn.app.socket_id.as_deref().unwrap_or("?"),
                            conn.app.user,
                            plan.channels[sub.chan as usize],
                            view.len(),
                            want.len()
                        ));
                    }
                }
            }
        }
        out
    }

    /// Closes every connection with a close handshake and waits (at most 5 s) for the answers.
    fn stop(mut self, scratch: &mut [u8]) -> Tally {
        let now = Instant::now();
        for i in 0..self.pool.slot_count() {
            let Some((tok, conn)) = self.pool.at(i) else {
                continue;
            };
            if conn.st == St::Open && conn.app.established {
                leave_pop(&mut self.ctx, conn, &mut self.pop);
                start_close(&mut self.ctx, conn, now);
                self.after(tok);
            } else if conn.st != St::Closing {
                conn.shutdown();
            }
        }
        let deadline = Instant::now() + CLOSE_TIMEOUT + Duration::from_secs(1);
        let mut events = Vec::with_capacity(1024);
        while self.pool.conns().any(|c| c.st == St::Closing) && Instant::now() < deadline {
            if self.pool.wait(20, &mut events).is_err() {
                break;
            }
            for &(tok, flags) in &events {
                self.io(tok, flags, scratch);
            }
            self.scan(Instant::now());
        }
        self.ctx.t
    }
}

/// Counts a connection out of the population (once).
fn leave_pop(ctx: &mut Ctx, conn: &mut Conn, pop: &mut usize) {
    if !conn.app.leaving {
        conn.app.leaving = true;
        *pop -= 1;
        if conn.app.established {
            ctx.board.live.fetch_sub(1, Relaxed);
        }
    }
}

/// The connection is going away: the server drops its presence memberships.
fn release_presence(ctx: &mut Ctx, conn: &mut Conn) {
    let plan = ctx.plan.clone();
    let mut book = None;
    for sub in conn.app.subs.iter_mut().filter(|s| s.on_server) {
        sub.on_server = false;
        if let Some(slot) = plan.pres_slot[sub.chan as usize] {
            let b = book.get_or_insert_with(|| ctx.board.book.lock().expect("presence book"));
            book_leave(&mut b[slot], conn.app.user);
        }
    }
}

fn book_leave(members: &mut HashMap<u32, u32>, user: u32) {
    if let Some(n) = members.get_mut(&user) {
        *n -= 1;
        if *n == 0 {
            members.remove(&user);
        }
    }
}

fn start_close(ctx: &mut Ctx, conn: &mut Conn, now: Instant) {
    release_presence(ctx, conn);
    conn.start_close();
    conn.app.closing_since = Some(now);
}

/// Disconnects a connection chosen to leave once none of its windows is catching up.
fn maybe_close(ctx: &mut Ctx, conn: &mut Conn) {
    let Some(abrupt) = conn.app.close_when_fenced else {
        return;
    };
    if conn.st != St::Open
        || conn
            .app
            .subs
            .iter()
            .any(|s| matches!(s.st, SubSt::Fencing { .. }))
    {
        return;
    }
    conn.app.close_when_fenced = None;
    if abrupt {
        release_presence(ctx, conn);
        conn.app.drop_now = true;
    } else {
        start_close(ctx, conn, Instant::now());
    }
}

/// Before a window ends: wait until every event the server accepted so far has arrived.
fn start_fence(ctx: &mut Ctx, conn: &mut Conn, i: usize, then: Then, now: Instant) {
    let sub = &mut conn.app.subs[i];
    let target = ctx.board.answered[sub.chan as usize].load(SeqCst);
    sub.st = SubSt::Fencing {
        target,
        since: now,
        then,
    };
    if sub.abandoned || sub.caught_up(target) {
        complete_fence(ctx, conn, i, now);
    }
}

fn complete_fence(ctx: &mut Ctx, conn: &mut Conn, i: usize, now: Instant) {
    let SubSt::Fencing { since, then, .. } = conn.app.subs[i].st else {
        return;
    };
    ctx.t
        .fence_wait
        .saturating_record(now.duration_since(since).as_nanos().max(1) as u64);
    match then {
        Then::Stay => conn.app.subs[i].st = SubSt::Active,
        Then::Unsubscribe => {
            let chan = conn.app.subs[i].chan;
            let name = ctx.plan.channels[chan as usize].clone();
            let msg = json!({"event":"pusher:unsubscribe","data":{"channel": name}}).to_string();
            conn.send_text(msg.as_bytes());
            ctx.t.unsubscribes += 1;
            let sub = &mut conn.app.subs[i];
            sub.st = SubSt::Left;
            sub.on_server = false;
            if let Some(slot) = ctx.plan.pres_slot[chan as usize] {
                let mut book = ctx.board.book.lock().expect("presence book");
                book_leave(&mut book[slot], conn.app.user);
            }
        }
    }
    maybe_close(ctx, conn);
}

/// Subscribes `conn` to `chan`; `false` when the presence channel is full (nothing sent).
fn subscribe(ctx: &mut Ctx, conn: &mut Conn, chan: u32) -> bool {
    let plan = ctx.plan.clone();
    let name = &plan.channels[chan as usize];
    let i = match conn.app.subs.iter().position(|s| s.chan == chan) {
        Some(i) if conn.app.subs[i].on_server => return false,
        Some(i) => i,
        None => {
            conn.app.subs.push(Sub {
                chan,
                st: SubSt::Left,
                on_server: false,
                had_window: false,
                abandoned: false,
                first_required: 0,
                expect: None,
                view: None,
            });
            conn.app.subs.len() - 1
        }
    };
    let socket_id = conn.app.socket_id.as_deref().unwrap_or("");
    let msg = match plan.kinds[chan as usize] {
        Kind::Public | Kind::Private => plan.creds.subscribe_message(socket_id, name, None),
        Kind::Presence => {
            let slot = plan.pres_slot[chan as usize].expect("presence slot");
            {
                let mut book = ctx.board.book.lock().expect("presence book");
                let members = &mut book[slot];
                if !members.contains_key(&conn.app.user) && members.len() >= plan.presence_cap {
                    ctx.t.presence_refused_by_cap += 1;
                    return false;
                }
                *members.entry(conn.app.user).or_default() += 1;
            }
            ctx.t.presence_joins += 1;
            let data = json!({"user_id": format!("u{}", conn.app.user),
                              "user_info": {"name": format!("Soak user {}", conn.app.user)}})
            .to_string();
            plan.creds.subscribe_message(socket_id, name, Some(&data))
        }
    };
    let sub = &mut conn.app.subs[i];
    sub.st = SubSt::Pending {
        since: Instant::now(),
    };
    sub.on_server = true;
    ctx.t.subscribes += 1;
    conn.send_text(msg.as_bytes());
    true
}

/// One random subscription change: subscribe to a channel not held, or leave one.
fn sub_op(ctx: &mut Ctx, conn: &mut Conn) {
    let held = conn
        .app
        .subs
        .iter()
        .filter(|s| matches!(s.st, SubSt::Pending { .. } | SubSt::Active))
        .count();
    let add = held == 0 || (held < ctx.plan.max_subs && ctx.rand() & 1 == 0);
    if add {
        for _ in 0..4 {
            let chan = ctx.below(ctx.plan.channels.len()) as u32;
            if subscribe(ctx, conn, chan) {
                return;
            }
        }
        return;
    }
    let active: Vec<usize> = (0..conn.app.subs.len())
        .filter(|&i| matches!(conn.app.subs[i].st, SubSt::Active))
        .collect();
    if active.is_empty() {
        return;
    }
    let i = active[ctx.below(active.len())];
    start_fence(ctx, conn, i, Then::Unsubscribe, Instant::now());
}

impl Handler<Peer> for Ctx {
    fn text(&mut self, conn: &mut Conn, _tok: u64, msg: &[u8], _read_at: u64) -> Fate {
        let fate = text(self, conn, msg);
        if matches!(fate, Fate::Keep) && conn.app.drop_now {
            // Chosen to leave without a close frame: nothing more is read from it.
            return Fate::Drop(None);
        }
        fate
    }

    fn server_closed(&mut self, _conn: &mut Conn, code: Option<u16>) {
        let code = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        *self.t.server_close_codes.entry(code).or_default() += 1;
    }
}

fn text(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8]) -> Fate {
    if conn.st == St::Closing {
        // The window ended when we decided to leave; what is still in flight is not owed.
        return Fate::Keep;
    }
    let Some(ev) = wire::str_field(msg, "event") else {
        ctx.t.malformed += 1;
        return Fate::Keep;
    };
    if ev == ctx.plan.event.as_bytes() {
        delivery(ctx, conn, msg);
        return Fate::Keep;
    }
    match ev {
        b"pusher:connection_established" => established(ctx, conn, msg),
        b"pusher_internal:subscription_succeeded" => {
            succeeded(ctx, conn, msg);
            Fate::Keep
        }
        b"pusher_internal:member_added" | b"pusher_internal:member_removed" => {
            member_event(ctx, conn, msg, ev == b"pusher_internal:member_added");
            Fate::Keep
        }
        b"pusher:ping" => {
            ctx.t.pings += 1;
            conn.send_text(wire::PUSHER_PONG);
            Fate::Keep
        }
        b"pusher:error" => {
            ctx.board.troubles.fetch_add(1, Relaxed);
            ctx.t.errors.add(wire::pusher_error(msg));
            Fate::Keep
        }
        b"pusher:subscription_error" => {
            let ch = wire::str_field(msg, "channel").unwrap_or(b"");
            let chan = ctx.plan.lookup.get(ch).copied();
            ctx.t.sub_errors += 1;
            ctx.board.troubles.fetch_add(1, Relaxed);
            ctx.t.errors.add(format!(
                "pusher:subscription_error on {}: {}",
                String::from_utf8_lossy(ch),
                wire::data_value(msg).unwrap_or_default()
            ));
            if let Some(i) = chan.and_then(|c| conn.app.subs.iter().position(|s| s.chan == c)) {
                let plan = ctx.plan.clone();
                let sub = &mut conn.app.subs[i];
                if sub.on_server {
                    sub.on_server = false;
                    if let Some(slot) = plan.pres_slot[sub.chan as usize] {
                        let mut book = ctx.board.book.lock().expect("presence book");
                        book_leave(&mut book[slot], conn.app.user);
                    }
                }
                sub.st = SubSt::Left;
            }
            Fate::Keep
        }
        b"pusher:pong" | b"pusher_internal:subscription_count" => Fate::Keep,
        _ => {
            ctx.t.other += 1;
            Fate::Keep
        }
    }
}

fn established(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8]) -> Fate {
    let Some(sid) = wire::socket_id(msg) else {
        return Fate::Drop(Some("connection_established without a socket_id".into()));
    };
    if conn.app.established {
        ctx.t
            .errors
            .add("second pusher:connection_established on one connection");
        return Fate::Keep;
    }
    conn.app.socket_id = Some(sid.into_boxed_str());
    conn.app.established = true;
    ctx.t.established += 1;
    ctx.t
        .establish
        .saturating_record(conn.started.elapsed().as_nanos() as u64);
    if !conn.app.leaving {
        ctx.board.live.fetch_add(1, Relaxed);
    }
    let plan = ctx.plan.clone();
    if conn.app.steady {
        // One channel of each kind, for the whole run.
        let g = conn.app.gid as usize;
        for set in [&plan.public, &plan.private, &plan.presence] {
            if !set.is_empty() {
                subscribe(ctx, conn, set[g % set.len()]);
            }
        }
    } else {
        let n = 1 + ctx.below(2);
        for _ in 0..n {
            let chan = ctx.below(plan.channels.len()) as u32;
            subscribe(ctx, conn, chan);
        }
    }
    Fate::Keep
}

fn succeeded(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8]) {
    let ch = wire::str_field(msg, "channel").unwrap_or(b"");
    let Some(chan) = ctx.plan.lookup.get(ch).copied() else {
        ctx.t.other += 1;
        return;
    };
    let Some(sub) = conn.app.subs.iter_mut().find(|s| s.chan == chan) else {
        ctx.t.unexpected += 1;
        return;
    };
    if !matches!(sub.st, SubSt::Pending { .. }) {
        ctx.t
            .errors
            .add("subscription_succeeded without a subscribe");
        ctx.board.troubles.fetch_add(1, Relaxed);
        return;
    }
    // A new window: every event whose publish begins from now on is owed.
    sub.first_required = ctx.board.started[chan as usize].load(SeqCst);
    sub.expect = None;
    sub.abandoned = false;
    sub.had_window = true;
    sub.st = SubSt::Active;
    ctx.t.subscribed += 1;
    ctx.t.windows += 1;
    if ctx.plan.pres_slot[chan as usize].is_some() {
        let ids: HashSet<u32> = wire::presence_ids(msg)
            .iter()
            .filter_map(|id| user_of(id))
            .collect();
        sub.view = Some(ids);
    }
}

fn user_of(id: &str) -> Option<u32> {
    id.strip_prefix('u')?.parse().ok()
}

fn member_event(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8], added: bool) {
    let ch = wire::str_field(msg, "channel").unwrap_or(b"");
    let Some(chan) = ctx.plan.lookup.get(ch).copied() else {
        ctx.t.other += 1;
        return;
    };
    let Some(sub) = conn.app.subs.iter_mut().find(|s| s.chan == chan) else {
        ctx.t.unexpected += 1;
        return;
    };
    // Events for a window that ended (or has not been acknowledged yet) are not ours to check.
    if !matches!(sub.st, SubSt::Active | SubSt::Fencing { .. }) {
        return;
    }
    let Some(view) = sub.view.as_mut() else {
        ctx.t.unexpected += 1;
        return;
    };
    let Some(user) = wire::member_id(msg).as_deref().and_then(user_of) else {
        ctx.t.malformed += 1;
        return;
    };
    if added {
        if !view.insert(user) {
            ctx.t.dup_added += 1;
            ctx.board.troubles.fetch_add(1, Relaxed);
        }
    } else if !view.remove(&user) {
        ctx.t.unknown_removed += 1;
        ctx.board.troubles.fetch_add(1, Relaxed);
    }
}

fn delivery(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8]) {
    let (Some(seq), Some(sent)) = (wire::num_field(msg, "seq"), wire::num_field(msg, "sent_ns"))
    else {
        ctx.t.malformed += 1;
        return;
    };
    let ch = wire::str_field(msg, "channel").unwrap_or(b"");
    let Some(chan) = ctx.plan.lookup.get(ch).copied() else {
        ctx.t.unexpected += 1;
        return;
    };
    let Some(i) = conn.app.subs.iter().position(|s| s.chan == chan) else {
        ctx.t.unexpected += 1;
        ctx.board.troubles.fetch_add(1, Relaxed);
        return;
    };
    let sub = &mut conn.app.subs[i];
    if sub.abandoned {
        return;
    }
    if !sub.had_window {
        // Before the first subscription_succeeded: no window it could belong to.
        ctx.t.unexpected += 1;
        ctx.board.troubles.fetch_add(1, Relaxed);
        return;
    }
    ctx.t.deliveries += 1;
    if conn.app.steady {
        ctx.t.steady_deliveries += 1;
    }
    ctx.t
        .latency
        .saturating_record(now_ns().saturating_sub(sent).max(1));
    match sub.receive(seq) {
        Seen::InOrder => {}
        Seen::Gap(n) => {
            ctx.t.gaps += 1;
            ctx.t.missing += n;
            if conn.app.steady {
                ctx.t.steady_missing += n;
            }
            ctx.board.troubles.fetch_add(1, Relaxed);
        }
        Seen::Backward => {
            ctx.t.dup_or_reordered += 1;
            ctx.board.troubles.fetch_add(1, Relaxed);
            return;
        }
    }
    if let SubSt::Fencing { target, .. } = sub.st {
        if sub.caught_up(target) {
            complete_fence(ctx, conn, i, Instant::now());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The publishers.

struct PubOut {
    sent: u64,
    accepted: u64,
    errors: Errors,
    rtt: Histogram<u64>,
    max_lag: Duration,
}

/// Publishes one event at a time, in turn to each channel it owns, at `rate` per second,
/// until told to stop. Each channel's sequence numbers go out in order over one connection.
fn publisher(
    mut sink: Sink,
    owned: Vec<u32>,
    rate: f64,
    plan: Arc<Plan>,
    board: Arc<Board>,
) -> PubOut {
    let mut out = PubOut {
        sent: 0,
        accepted: 0,
        errors: Errors::default(),
        rtt: new_hist(),
        max_lag: Duration::ZERO,
    };
    if owned.is_empty() || rate <= 0.0 {
        return out;
    }
    let mut next = vec![0u64; plan.channels.len()];
    let start = Instant::now();
    let mut n = 0u64;
    let mut consecutive_errors = 0;
    while !board.stop_publish.load(Relaxed) {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        out.max_lag = out.max_lag.max(now - due);
        let c = owned[(n % owned.len() as u64) as usize] as usize;
        let seq = next[c];
        next[c] += 1;
        board.started[c].store(seq + 1, SeqCst);
        let data = match_update(n, c as u32 + 1, c as u32, seq, now_ns());
        let t = Instant::now();
        let res = sink.publish(&plan.event, &[plan.channels[c].as_str()], &data);
        out.rtt.saturating_record(t.elapsed().as_nanos() as u64);
        out.sent += 1;
        match res {
            Ok(()) => {
                out.accepted += 1;
                board.answered[c].fetch_max(seq + 1, SeqCst);
                consecutive_errors = 0;
            }
            Err(e) => {
                out.errors.add(e);
                board.troubles.fetch_add(1, Relaxed);
                consecutive_errors += 1;
                if consecutive_errors >= 20 {
                    out.errors
                        .add("publisher stopped after 20 consecutive failed publishes");
                    break;
                }
            }
        }
        n += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The orchestrator.

#[derive(Clone, Copy)]
struct Sample {
    at: f64,
    rss_kib: u64,
    fds: u64,
    live: u64,
    deliveries: u64,
}

fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

fn sample(pid: u32, t0: Instant, board: &Board) -> Option<Sample> {
    Some(Sample {
        at: t0.elapsed().as_secs_f64(),
        rss_kib: proc_sample(&pid.to_string()).ok()?.rss_kib,
        fds: fd_count(pid)?,
        live: board.live.load(Relaxed),
        deliveries: board.deliveries.load(Relaxed),
    })
}

fn mean_rss(samples: &[Sample], from: f64, to: f64) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.at >= from && s.at <= to)
        .map(|s| s.rss_kib as f64)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Least-squares line through the RSS samples taken in `[from, to]`: the growth it implies over
/// that span, as a percentage of the line's value at `from`. A leak is sustained growth, which
/// this measures; a one-off step (a structure reaching its steady size a little after the
/// warm-up) or the allocator's swings move it far less than they move two short windows.
fn rss_trend_pct(samples: &[Sample], from: f64, to: f64) -> Option<f64> {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.at >= from && s.at <= to)
        .map(|s| (s.at, s.rss_kib as f64))
        .collect();
    if pts.len() < 3 {
        return None;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let slope = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx;
    let (first, last) = (pts[0].0, pts[pts.len() - 1].0);
    let at_first = my - slope * (mx - first);
    (at_first > 0.0).then(|| slope * (last - first) / at_first * 100.0)
}

/// The server's view of a presence channel: (user ids, user_count).
fn server_presence(
    http: &mut HttpClient,
    creds: &Creds,
    channel: &str,
) -> std::result::Result<(HashSet<u32>, u64), String> {
    let path = format!("/apps/{}/channels/{channel}/users", creds.app_id);
    let (status, body) = http.request("GET", &creds.signed_target("GET", &path, &[], b""), b"")?;
    if status != 200 {
        return Err(format!("GET {path}: {status} {body}"));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}"))?;
    let users: HashSet<u32> = v["users"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u["id"].as_str().and_then(user_of))
                .collect()
        })
        .unwrap_or_default();
    let path = format!("/apps/{}/channels/{channel}", creds.app_id);
    let (status, body) = http.request(
        "GET",
        &creds.signed_target("GET", &path, &[("info", "user_count")], b""),
        b"",
    )?;
    if status != 200 {
        return Err(format!("GET {path}?info=user_count: {status} {body}"));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}"))?;
    Ok((users, v["user_count"].as_u64().unwrap_or(0)))
}

fn build_plan(env: &Env, a: &SoakArgs) -> Plan {
    let nonce = &env.nonce[env.nonce.len().saturating_sub(8)..];
    let mut channels = Vec::new();
    let mut kinds = Vec::new();
    let (mut public, mut private, mut presence) = (Vec::new(), Vec::new(), Vec::new());
    let mut pres_slot = Vec::new();
    for i in 0..a.public_channels {
        public.push(channels.len() as u32);
        channels.push(format!("{}.{nonce}.public.{i}", a.channel_prefix));
        kinds.push(Kind::Public);
        pres_slot.push(None);
    }
    for i in 0..a.private_channels {
        private.push(channels.len() as u32);
        channels.push(format!("private-{}.{nonce}.{i}", a.channel_prefix));
        kinds.push(Kind::Private);
        pres_slot.push(None);
    }
    for i in 0..a.presence_channels {
        presence.push(channels.len() as u32);
        channels.push(format!("presence-{}.{nonce}.{i}", a.channel_prefix));
        kinds.push(Kind::Presence);
        pres_slot.push(Some(i));
    }
    let lookup = channels
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_bytes().to_vec().into_boxed_slice(), i as u32))
        .collect();
    Plan {
        target: env.target(),
        creds: env.creds.clone(),
        event: env.c.event.clone(),
        channels,
        kinds,
        lookup,
        pres_slot,
        public,
        private,
        presence,
        users: a
            .users
            .unwrap_or(a.connections / 4)
            .clamp(1, u32::MAX as usize / 4) as u32,
        presence_cap: a.presence_max_members.max(1),
        max_subs: a.max_subs.max(1),
        abrupt_fraction: a.abrupt_fraction.clamp(0.0, 1.0),
        catch_up: Duration::from_secs_f64(a.catch_up_s.max(0.1)),
    }
}

/// Sends `make(reply)` to every worker and waits for all answers, at most `limit`.
fn ask_all<T>(txs: &[Sender<Cmd>], limit: Duration, make: impl Fn(Sender<T>) -> Cmd) -> Vec<T> {
    let (rtx, rrx) = crossbeam_channel::unbounded();
    for tx in txs {
        let _ = tx.send(make(rtx.clone()));
    }
    drop(rtx);
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    while out.len() < txs.len() {
        match rrx.recv_deadline(deadline) {
            Ok(v) => out.push(v),
            Err(_) => break,
        }
    }
    out
}

/// Runs the scenario.
pub fn run(env: &Env, a: &SoakArgs) -> Result<Report> {
    if a.connections == 0 || a.rate <= 0.0 || a.duration <= 0.0 {
        return Err("soak needs --connections, --rate and --duration above 0".into());
    }
    if a.warmup >= a.duration || a.ramp_rate <= 0.0 {
        return Err(BenchError(format!(
            "soak needs --warmup ({} s) shorter than --duration ({} s) and --ramp-rate above 0",
            a.warmup, a.duration
        )));
    }
    if a.public_channels + a.private_channels + a.presence_channels == 0 {
        return Err("soak needs at least one channel".into());
    }
    let Some(pid) = env.c.server_pid else {
        return Err("soak checks the server's RSS and open files: pass --server-pid".into());
    };
    env.check_fds(a.connections + 64)?;
    preflight(env, true)?;
    // Let the preflight connection go away before the baseline.
    std::thread::sleep(Duration::from_millis(500));
    let fd_start =
        fd_count(pid).ok_or_else(|| BenchError(format!("cannot read /proc/{pid}/fd")))?;
    let rss_start = proc_sample(&pid.to_string())?.rss_kib;
    let conns_start = server_connections(env);

    let plan = Arc::new(build_plan(env, a));
    let k = plan.channels.len();
    let board = Arc::new(Board {
        started: (0..k).map(|_| AtomicU64::new(0)).collect(),
        answered: (0..k).map(|_| AtomicU64::new(0)).collect(),
        book: Mutex::new(vec![HashMap::new(); plan.presence.len()]),
        stop_churn: AtomicBool::new(false),
        stop_publish: AtomicBool::new(false),
        live: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        connects: AtomicU64::new(0),
        disconnects: AtomicU64::new(0),
        sub_ops: AtomicU64::new(0),
        troubles: AtomicU64::new(0),
    });
    let publishers = a.publishers.clamp(1, k);
    let mut pub_handles = Vec::new();
    for p in 0..publishers {
        let sink = Sink::open(&env.via, &env.creds)?;
        let owned: Vec<u32> = (0..k as u32)
            .filter(|c| *c as usize % publishers == p)
            .collect();
        let rate = a.rate * owned.len() as f64 / k as f64;
        let (plan, board) = (plan.clone(), board.clone());
        pub_handles.push(
            std::thread::Builder::new()
                .name(format!("publisher-{p}"))
                .spawn(move || publisher(sink, owned, rate, plan, board))
                .map_err(|e| format!("cannot start a publisher thread: {e}"))?,
        );
    }
    let threads = env.threads.clamp(1, a.connections);
    let mut txs = Vec::new();
    let mut handles = Vec::new();
    for i in 0..threads {
        let w = SoakWorker::new(plan.clone(), board.clone(), i, threads, a)
            .map_err(|e| format!("cannot create epoll instance: {e}"))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        handles.push(
            std::thread::Builder::new()
                .name(format!("soak-{i}"))
                .spawn(move || w.run(rx))
                .map_err(|e| format!("cannot start a client thread: {e}"))?,
        );
        txs.push(tx);
    }

    // Run: sample the server every second until the end of the churn.
    let t0 = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut last_progress = t0;
    let mut full_at: Option<f64> = None;
    let mut warm: Option<Sample> = None;
    let warmup = a.warmup;
    loop {
        let s = sample(pid, t0, &board)
            .ok_or_else(|| BenchError(format!("the server (pid {pid}) went away")))?;
        samples.push(s);
        if full_at.is_none() && s.live >= a.connections as u64 {
            full_at = Some(s.at);
        }
        if warm.is_none() && s.at >= warmup {
            warm = Some(s);
        }
        if last_progress.elapsed().as_secs_f64() >= a.progress_s {
            last_progress = Instant::now();
            let prev = samples
                .iter()
                .rev()
                .find(|p| s.at - p.at >= a.progress_s * 0.9)
                .copied()
                .unwrap_or(samples[0]);
            eprintln!(
                "bts-guru-bench: soak {:>6.0} s: {} open, {} connects, {} disconnects, {} \
                 subscription changes, {:.0} deliveries/s, server RSS {} KiB, {} fds, {} problems",
                s.at,
                s.live,
                board.connects.load(Relaxed),
                board.disconnects.load(Relaxed),
                board.sub_ops.load(Relaxed),
                (s.deliveries - prev.deliveries) as f64 / (s.at - prev.at).max(1e-9),
                thousands(s.rss_kib),
                s.fds,
                board.troubles.load(Relaxed)
            );
        }
        if s.at >= a.duration {
            break;
        }
        let next = t0 + Duration::from_secs_f64((s.at + 1.0).floor());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let end = *samples.last().expect("at least one sample");

    // Quiesce: no more churn; let handshakes, subscribes, catch-ups and closes finish.
    board.stop_churn.store(true, SeqCst);
    let quiet_limit = plan.catch_up + plan.target.connect_timeout + Duration::from_secs(10);
    let quiet = ask_all(&txs, quiet_limit, Cmd::Quiesce).len();
    board.stop_publish.store(true, SeqCst);
    let pubs: Vec<PubOut> = pub_handles
        .into_iter()
        .map(|h| h.join().expect("publisher thread"))
        .collect();
    // Every subscription must now get everything the server accepted.
    let t_fence = Instant::now();
    let fenced = ask_all(
        &txs,
        plan.catch_up + Duration::from_secs(5),
        Cmd::FinalFence,
    )
    .len();
    let fence_s = t_fence.elapsed().as_secs_f64();
    // Presence: the server's members and counts against the book, until they agree (10 s).
    let mut http = env.api_client()?;
    let expected: Vec<HashSet<u32>> = board
        .book
        .lock()
        .expect("presence book")
        .iter()
        .map(|m| m.keys().copied().collect())
        .collect();
    let mut presence_bad: Vec<String> = Vec::new();
    let presence_members: u64 = expected.iter().map(|m| m.len() as u64).sum();
    let t_pres = Instant::now();
    loop {
        presence_bad.clear();
        for (slot, &chan) in plan.presence.iter().enumerate() {
            let name = &plan.channels[chan as usize];
            let want = &expected[slot];
            match server_presence(&mut http, &env.creds, name) {
                Ok((users, count)) => {
                    if users != *want || count != want.len() as u64 {
                        let extra: Vec<_> = users.difference(want).take(5).collect();
                        let absent: Vec<_> = want.difference(&users).take(5).collect();
                        presence_bad.push(format!(
                            "{name}: server lists {} users, user_count {count}, generator \
                             expects {}; extra {extra:?}, absent {absent:?}",
                            users.len(),
                            want.len()
                        ));
                    }
                }
                Err(e) => presence_bad.push(e),
            }
        }
        if presence_bad.is_empty() || t_pres.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let presence_s = t_pres.elapsed().as_secs_f64();
    let views = ask_all(&txs, Duration::from_secs(10), Cmd::Check);
    let with_conns = sample(pid, t0, &board);
    drop(http);

    // Close everything, then the server's connections and open files must come back down.
    for tx in &txs {
        let _ = tx.send(Cmd::Stop);
    }
    let mut tally = Tally::new();
    for h in handles {
        if let Ok(t) = h.join() {
            tally.merge(&t);
        }
    }
    let t_close = Instant::now();
    let (mut fd_after, mut conns_after);
    loop {
        fd_after = fd_count(pid);
        conns_after = server_connections(env);
        let done = fd_after.is_some_and(|f| f <= fd_start)
            && conns_after.is_none_or(|c| c <= conns_start.unwrap_or(0));
        if done || t_close.elapsed() > Duration::from_secs(20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let close_s = t_close.elapsed().as_secs_f64();
    let rss_after_close = proc_sample(&pid.to_string()).ok().map(|s| s.rss_kib);

    // ---- report
    let mut r = env.report("soak");
    r.set(
        "params",
        json!({
            "connections": a.connections, "churn_rate": a.churn_rate, "sub_rate": a.sub_rate,
            "rate": a.rate, "duration_s": a.duration, "warmup_s": a.warmup,
            "ramp_rate": a.ramp_rate, "public_channels": a.public_channels,
            "private_channels": a.private_channels, "presence_channels": a.presence_channels,
            "presence_max_members": plan.presence_cap, "users": plan.users,
            "max_subs": plan.max_subs, "steady": a.steady, "abrupt_fraction": plan.abrupt_fraction,
            "max_rss_growth_pct": a.max_rss_growth_pct, "catch_up_s": a.catch_up_s,
            "publishers": publishers, "threads": threads, "source_addrs": env.sources.len(),
        }),
    );
    r.row(
        "params",
        format!(
            "{} connections, {}/s replaced, {}/s subscription changes over {} public + {} \
             private + {} presence channels, {} events/s, {} s ({} s warm-up)",
            thousands(a.connections as u64),
            a.churn_rate,
            a.sub_rate,
            a.public_channels,
            a.private_channels,
            a.presence_channels,
            a.rate,
            a.duration,
            a.warmup
        ),
    );
    let steady_secs = (end.at - full_at.unwrap_or(end.at)).max(1e-9);
    r.row(
        "connections",
        format!(
            "{} opened ({} established, {} failed), {} closed cleanly, {} dropped without a close \
             frame, {} ended by the server; all {} open after {:.1} s",
            thousands(tally.connects),
            thousands(tally.established),
            tally.connect_failed,
            thousands(tally.closes_clean),
            thousands(tally.closes_abrupt),
            tally.server_closed,
            thousands(a.connections as u64),
            full_at.unwrap_or(f64::NAN)
        ),
    );
    let disconnects = board.disconnects.load(Relaxed);
    r.row(
        "churn",
        format!(
            "{} disconnects + reconnects ({:.0}/s once all were open), {} subscribes, {} \
             unsubscribes, {} presence joins ({} skipped: channel at the member cap)",
            thousands(disconnects),
            disconnects as f64 / steady_secs,
            thousands(tally.subscribes),
            thousands(tally.unsubscribes),
            thousands(tally.presence_joins),
            thousands(tally.presence_refused_by_cap)
        ),
    );
    r.row(
        "establish (connect → established)",
        fmt_hist(&tally.establish),
    );
    let (sent, accepted): (u64, u64) = pubs
        .iter()
        .fold((0, 0), |(s, a), p| (s + p.sent, a + p.accepted));
    let mut pub_errors = Errors::default();
    let mut rtt = new_hist();
    let mut max_lag = Duration::ZERO;
    for p in &pubs {
        pub_errors.merge(&p.errors);
        let _ = rtt.add(&p.rtt);
        max_lag = max_lag.max(p.max_lag);
    }
    r.row(
        "published",
        format!(
            "{} events sent, {} accepted, {} errors ({:.1}/s, max lag {:.1} ms)",
            thousands(sent),
            thousands(accepted),
            pub_errors.total(),
            sent as f64 / end.at.max(1e-9),
            max_lag.as_secs_f64() * 1000.0
        ),
    );
    r.row("publish round trip", fmt_hist(&rtt));
    r.row(
        "deliveries",
        format!(
            "{} checked in {} subscription windows ({} to the {} steady connections): {} missing \
             ({} gaps, {} catch-up timeouts), {} duplicated or out of order, {} unexpected",
            thousands(tally.deliveries),
            thousands(tally.windows),
            thousands(tally.steady_deliveries),
            a.steady,
            tally.missing,
            tally.gaps,
            tally.fence_timeouts,
            tally.dup_or_reordered,
            tally.unexpected
        ),
    );
    r.row("latency publish → receive", fmt_hist(&tally.latency));
    r.row("catch-up before leaving", fmt_hist(&tally.fence_wait));
    let warm_at = warm.map(|w| w.at).unwrap_or(warmup);
    // Short runs compare shorter windows, so the two never overlap.
    let window = RSS_WINDOW
        .as_secs_f64()
        .min((end.at - warm_at) / 2.0)
        .max(0.0);
    let rss_warm = mean_rss(&samples, warm_at, warm_at + window);
    let rss_end = mean_rss(&samples, end.at - window, end.at);
    let growth = match (rss_warm, rss_end) {
        (Some(w), Some(e)) if w > 0.0 => Some((e - w) / w * 100.0),
        _ => None,
    };
    let trend = rss_trend_pct(&samples, warm_at, end.at);
    let rss_max = samples
        .iter()
        .filter(|s| s.at >= warm_at)
        .map(|s| s.rss_kib)
        .max();
    r.row(
        "server RSS",
        format!(
            "{} KiB at start, {:.0} KiB after warm-up, {:.0} KiB at the end ({:+.2}%, mean of \
             {window:.0} s windows; trend {:+.2}% over the run after the warm-up; max {} KiB), \
             {} KiB after closing",
            thousands(rss_start),
            rss_warm.unwrap_or(f64::NAN),
            rss_end.unwrap_or(f64::NAN),
            growth.unwrap_or(f64::NAN),
            trend.unwrap_or(f64::NAN),
            rss_max.map(thousands).unwrap_or_default(),
            rss_after_close.map(thousands).unwrap_or_default()
        ),
    );
    r.row(
        "server open files",
        format!(
            "{fd_start} at start, {} after warm-up, {} at the end, {} with every connection \
             closed ({close_s:.1} s after closing)",
            warm.map(|w| w.fds.to_string()).unwrap_or_default(),
            end.fds,
            fd_after
                .map(|f| f.to_string())
                .unwrap_or_else(|| "?".into())
        ),
    );
    let view_total: u64 = views.iter().map(|v| v.views).sum();
    let view_bad: u64 = views.iter().map(|v| v.mismatches).sum();
    r.row(
        "presence",
        format!(
            "{} channels, {presence_members} members at the end: the HTTP API {} (checked for \
             {presence_s:.1} s); {view_total} member views, {view_bad} wrong; {} duplicate \
             member_added, {} member_removed for non-members",
            plan.presence.len(),
            if presence_bad.is_empty() {
                "agrees (users and user_count)"
            } else {
                "DISAGREES"
            },
            tally.dup_added,
            tally.unknown_removed
        ),
    );
    let timeline: Vec<Value> = samples
        .iter()
        .step_by((samples.len() / 200).max(1))
        .map(|s| json!([round1(s.at), s.rss_kib, s.fds, s.live]))
        .collect();
    r.set(
        "connections",
        json!({
            "opened": tally.connects, "established": tally.established,
            "failed": tally.connect_failed, "closed_clean": tally.closes_clean,
            "closed_abrupt": tally.closes_abrupt, "ended_by_server": tally.server_closed,
            "server_close_codes": tally.server_close_codes,
            "all_open_after_s": full_at.map(round3), "disconnects": disconnects,
            "disconnects_per_s": round1(disconnects as f64 / steady_secs),
            "establish_us": summary_us(&tally.establish),
        }),
    );
    r.set(
        "subscriptions",
        json!({
            "subscribes": tally.subscribes, "succeeded": tally.subscribed,
            "unsubscribes": tally.unsubscribes, "errors": tally.sub_errors,
            "windows": tally.windows, "presence_joins": tally.presence_joins,
            "presence_skipped_at_cap": tally.presence_refused_by_cap,
            "catch_up_us": summary_us(&tally.fence_wait),
        }),
    );
    r.set(
        "publish",
        json!({
            "sent": sent, "accepted": accepted, "errors": pub_errors.total(),
            "per_s": round1(sent as f64 / end.at.max(1e-9)),
            "max_lag_ms": round3(max_lag.as_secs_f64() * 1000.0),
            "rtt_us": summary_us(&rtt),
        }),
    );
    r.set(
        "deliveries",
        json!({
            "received": tally.deliveries, "steady_received": tally.steady_deliveries,
            "missing": tally.missing, "steady_missing": tally.steady_missing,
            "gaps": tally.gaps, "catch_up_timeouts": tally.fence_timeouts,
            "duplicated_or_reordered": tally.dup_or_reordered, "unexpected": tally.unexpected,
            "final_catch_up_s": round3(fence_s),
        }),
    );
    r.set("latency_us", summary_us(&tally.latency));
    r.set(
        "server",
        json!({
            "pid": pid,
            "rss_kib_start": rss_start,
            "rss_kib_after_warmup": rss_warm.map(round1),
            "rss_kib_end": rss_end.map(round1),
            "rss_growth_pct": growth.map(round3),
            "rss_trend_growth_pct": trend.map(round3),
            "rss_window_s": round1(window),
            "rss_kib_max_after_warmup": rss_max,
            "rss_kib_with_connections_at_the_end": with_conns.map(|s| s.rss_kib),
            "rss_kib_after_close": rss_after_close,
            "fds_start": fd_start,
            "fds_after_warmup": warm.map(|w| w.fds),
            "fds_end": end.fds,
            "fds_after_close": fd_after,
            "connections_before": conns_start,
            "connections_after_close": conns_after,
            "timeline_columns": ["s", "rss_kib", "fds", "open_connections"],
            "timeline": timeline,
        }),
    );
    r.set(
        "presence",
        json!({
            "channels": plan.presence.len(), "members_at_end": presence_members,
            "api_mismatches": presence_bad, "member_views": view_total,
            "member_views_wrong": view_bad,
            "member_view_examples": views.iter().flat_map(|v| v.examples.clone()).take(5).collect::<Vec<_>>(),
            "duplicate_member_added": tally.dup_added,
            "unknown_member_removed": tally.unknown_removed,
        }),
    );
    r.set(
        "other",
        json!({"pings_answered": tally.pings, "malformed": tally.malformed, "other_events": tally.other}),
    );
    let mut all_errors = tally.errors.clone();
    all_errors.merge(&pub_errors);
    r.set("errors", all_errors.to_json());
    let mut errs: Vec<(&String, &u64)> = all_errors.0.iter().collect();
    errs.sort_by(|a, b| b.1.cmp(a.1));
    for (e, n) in errs.iter().take(8) {
        r.row("error", format!("{n}x {e}"));
    }
    r.set(
        "run",
        json!({"seconds": round3(end.at), "quiesced_threads": quiet, "fenced_threads": fenced}),
    );

    // ---- pass criteria
    if full_at.is_none_or(|t| t > warmup) {
        r.problem(format!(
            "the population never reached {} open connections during the warm-up",
            a.connections
        ));
    }
    match trend {
        Some(g) if g >= a.max_rss_growth_pct => r.problem(format!(
            "server RSS grew {g:.2}% after the warm-up, by its trend (limit {}%)",
            a.max_rss_growth_pct
        )),
        None => r.problem("server RSS was not sampled enough after the warm-up"),
        _ => {}
    }
    match fd_after {
        Some(f) if f <= fd_start => {}
        Some(f) => r.problem(format!(
            "server holds {f} open files after every connection closed, {fd_start} at the start"
        )),
        None => r.problem("cannot count the server's open files after closing"),
    }
    if let (Some(c), Some(b)) = (conns_after, conns_start) {
        if c > b {
            r.problem(format!(
                "server still counts {c} connections after every one closed ({b} before)"
            ));
        }
    }
    for (what, n) in [
        ("deliveries missing", tally.missing),
        (
            "deliveries duplicated or out of order",
            tally.dup_or_reordered,
        ),
        ("unexpected deliveries", tally.unexpected),
        ("connections failed", tally.connect_failed),
        ("connections ended by the server", tally.server_closed),
        ("subscription errors", tally.sub_errors),
        ("publish errors", pub_errors.total()),
        ("malformed messages", tally.malformed),
        ("duplicate member_added", tally.dup_added),
        ("member_removed for non-members", tally.unknown_removed),
        ("wrong presence member views", view_bad),
    ] {
        if n > 0 {
            r.problem(format!("{n} {what}"));
        }
    }
    if tally.deliveries == 0 || tally.steady_deliveries == 0 {
        r.problem("nothing was delivered (to the steady connections)");
    }
    for p in presence_bad.iter().take(5) {
        r.problem(format!("presence count wrong: {p}"));
    }
    if quiet < threads {
        r.problem("the client threads did not settle at the end of the churn");
    }
    if fenced < threads {
        r.problem("the final catch-up did not finish");
    }
    let other_errors = all_errors.total().saturating_sub(
        pub_errors.total() + tally.connect_failed + tally.server_closed + tally.sub_errors,
    );
    if other_errors > 0 {
        r.problem(format!("{other_errors} other errors (see \"errors\")"));
    }
    r.plots
        .push(("publish → receive".into(), tally.latency.clone()));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(first_required: u64) -> Sub {
        Sub {
            chan: 0,
            st: SubSt::Active,
            on_server: true,
            had_window: true,
            abandoned: false,
            first_required,
            expect: None,
            view: None,
        }
    }

    fn rss(points: &[(f64, u64)]) -> Vec<Sample> {
        points
            .iter()
            .map(|&(at, rss_kib)| Sample {
                at,
                rss_kib,
                fds: 0,
                live: 0,
                deliveries: 0,
            })
            .collect()
    }

    #[test]
    fn rss_trend_sees_sustained_growth_and_not_swings_or_an_early_step() {
        // A leak: +10 % over the span, under allocator swings of +-3 %.
        let leak: Vec<_> = (0..=100)
            .map(|i| {
                let swing = if i % 7 < 3 { 1030 } else { 970 };
                (i as f64, (100_000 + 100 * i) * swing / 1000)
            })
            .collect();
        let g = rss_trend_pct(&rss(&leak), 0.0, 100.0).unwrap();
        assert!((8.0..12.0).contains(&g), "{g}");
        // Flat with the same swings: near zero.
        let flat: Vec<_> = (0..=100)
            .map(|i| (i as f64, if i % 7 < 3 { 103_000 } else { 97_000 }))
            .collect();
        assert!(rss_trend_pct(&rss(&flat), 0.0, 100.0).unwrap().abs() < 1.0);
        // A one-off 2.2 % step early on, flat after it (the 15:08 soak's shape): well under the
        // 2 % bound, where two 10 s windows read +2.2 %.
        let step: Vec<_> = (0..=168)
            .map(|i| (i as f64 * 10.0, if i < 10 { 41_260 } else { 42_180 }))
            .collect();
        let g = rss_trend_pct(&rss(&step), 0.0, 1680.0).unwrap();
        assert!((0.0..1.5).contains(&g), "{g}");
        assert_eq!(rss_trend_pct(&rss(&step[..2]), 0.0, 1680.0), None);
    }

    fn run(first_required: u64, seqs: &[u64]) -> Vec<Seen> {
        let mut w = window(first_required);
        seqs.iter().map(|&s| w.receive(s)).collect()
    }

    #[test]
    fn a_window_accepts_only_a_gapless_run_that_starts_early_enough() {
        use Seen::*;
        // Events published before the subscribe may still arrive; then every one in order.
        assert_eq!(run(5, &[3, 4, 5, 6]), vec![InOrder; 4]);
        assert_eq!(run(5, &[5, 6, 7]), vec![InOrder; 3]);
        // The first event owed (5) never came.
        assert_eq!(run(5, &[7, 8]), vec![Gap(2), InOrder]);
        // A hole in the middle, a duplicate, a reorder.
        assert_eq!(
            run(0, &[0, 1, 3, 4]),
            vec![InOrder, InOrder, Gap(1), InOrder]
        );
        assert_eq!(
            run(0, &[0, 1, 1, 2]),
            vec![InOrder, InOrder, Backward, InOrder]
        );
        assert_eq!(
            run(0, &[0, 2, 1, 3]),
            vec![InOrder, Gap(1), Backward, InOrder]
        );
    }

    #[test]
    fn catching_up_means_having_everything_below_the_target() {
        let mut w = window(5);
        // Nothing owed below 5.
        assert!(w.caught_up(5));
        assert!(!w.caught_up(6));
        w.receive(4);
        assert!(!w.caught_up(6));
        w.receive(5);
        assert!(w.caught_up(6));
        assert!(!w.caught_up(7));
    }

    #[test]
    fn presence_user_ids_round_trip() {
        assert_eq!(user_of("u42"), Some(42));
        assert_eq!(user_of("42"), None);
        assert_eq!(user_of("u"), None);
    }
}
