//! A soak client thread: its share of the population, opened at the ramp rate, then churned
//! (connections replaced, subscriptions changed) at the churn and subscription rates; the
//! timeouts of handshakes, subscribes, catch-ups and closes; and the orchestrator's requests
//! (quiesce, final catch-up, presence views, stop).

use std::collections::HashSet;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::peer::{
    complete_fence, leave_pop, maybe_close, release_presence, start_close, start_fence, sub_op,
    Ctx, Peer, Tally,
};
use super::plan::{Board, Plan, SoakArgs};
use super::window::{SubSt, Then};
use crate::client::{Fate, Pool, St};
use crate::pace::{catch_up_floor, interval, wait_ms};
use crate::stats::now_ns;

/// How long the server may take to answer our close frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the orchestrator asks a thread.
pub enum Cmd {
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
pub struct ViewCheck {
    pub views: u64,
    pub mismatches: u64,
    pub examples: Vec<String>,
}

/// The operations paced once the population is full.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Churn,
    Subscription,
}

pub struct SoakWorker {
    pub ctx: Ctx,
    pub pool: Pool<Peer>,
    pub index: u32,
    pub threads: u32,
    pub target: usize,
    pub steady_target: usize,
    pub steady_opened: usize,
    pub opened: u32,
    pub pop: usize,
    pub reached: bool,
    pub open_iv: Duration,
    pub next_open: Instant,
    pub churn_iv: Option<Duration>,
    pub next_churn: Instant,
    pub sub_iv: Option<Duration>,
    pub next_sub: Instant,
    pub next_scan: Instant,
    pub quiesce: Option<Sender<()>>,
    pub final_fence: Option<Sender<()>>,
}

pub fn per_thread(total: usize, threads: usize, i: usize) -> usize {
    total / threads + usize::from(i < total % threads)
}

impl SoakWorker {
    pub fn new(
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

    pub fn run(mut self, rx: Receiver<Cmd>) -> Tally {
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

    /// The connection for the next `op` due by `now`, advancing its schedule; None when none is
    /// due (or the population is not full yet) or no connection fit for it was found.
    fn next_due(&mut self, now: Instant, op: Op) -> Option<u64> {
        let reached = self.reached;
        let (iv, next) = match op {
            Op::Churn => (self.churn_iv, &mut self.next_churn),
            Op::Subscription => (self.sub_iv, &mut self.next_sub),
        };
        let iv = iv.filter(|_| reached)?;
        if now < *next {
            return None;
        }
        *next = (*next + iv).max(catch_up_floor(now));
        self.pick(op == Op::Subscription)
    }

    /// Connections replaced: each chosen one catches up, then closes (with a close frame, or,
    /// for `--abrupt-fraction` of them, by dropping TCP); a new one is opened in its place.
    fn churn_due(&mut self, now: Instant) {
        while let Some(tok) = self.next_due(now, Op::Churn) {
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

    /// Subscription changes on connections not catching up.
    fn sub_due(&mut self, now: Instant) {
        while let Some(tok) = self.next_due(now, Op::Subscription) {
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
