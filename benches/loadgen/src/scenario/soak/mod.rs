//! The `soak` scenario: a population of connections that churns for a long time (connects and
//! disconnects, subscribes and unsubscribes over public, private and presence channels) while
//! events are published at a steady rate, and the checks that make it worth running: the
//! server's RSS stays flat after the warm-up, its open files come back to where they started,
//! every subscriber gets every event it is owed on every channel, in order and once
//! ([`window`] says what it is owed), and the presence channels' members are exactly who the
//! generator put there.
//!
//! [`run`] goes through the phases in order: set-up (checks, the server's baseline, the
//! publisher and client threads), ramp (the population opens and the warm-up passes), steady
//! churn (until `--duration`), the checks (quiesce, final catch-up, presence against the HTTP
//! API, close everything and watch the server's files and connections come back), and the
//! report ([`report`]).

mod peer;
mod plan;
mod publisher;
mod report;
mod timeline;
mod window;
mod worker;

use std::collections::HashSet;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde_json::Value;

use self::peer::{user_of, Tally};
pub use self::plan::SoakArgs;
use self::plan::{build_plan, Board, Plan};
use self::publisher::{publisher, PubOut};
use self::report::{Baseline, Closed, Outcome, PresenceCheck, Settled};
use self::timeline::{fd_count, Timeline};
use self::worker::{Cmd, SoakWorker};
use super::{preflight, server_connections};
use crate::auth::Creds;
use crate::publish::{HttpClient, Sink};
use crate::report::Report;
use crate::stats::proc_sample;
use crate::{BenchError, Env, Result};

/// A generous guess of the run's length, seconds (the hard timeout adds 120 to it).
pub fn estimate_secs(a: &SoakArgs) -> f64 {
    a.duration.max(a.warmup) + 4.0 * a.catch_up_s + 90.0
}

/// Runs the scenario.
pub fn run(env: &Env, a: &SoakArgs) -> Result<Report> {
    let base = set_up(env, a)?;
    let mut running = start(env, a)?;
    let mut timeline = Timeline::new(base.pid);
    ramp(a, &running, &mut timeline)?;
    steady_churn(a, &running, &mut timeline)?;
    let settled = wind_down(&mut running);
    let presence = check_presence(env, &running, &timeline)?;
    let closed = close_all(env, &base, running.txs, running.handles);
    let outcome = Outcome {
        plan: running.plan,
        base,
        timeline,
        publishers: running.publishers,
        threads: running.threads,
        disconnects: running.board.disconnects.load(SeqCst),
        settled,
        presence,
        closed,
    };
    Ok(report::report(env, a, &outcome))
}

/// Set-up, first part: the arguments make sense, the server works and is on this machine, and
/// its open files, RSS and connections before anything starts.
fn set_up(env: &Env, a: &SoakArgs) -> Result<Baseline> {
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
    Ok(Baseline {
        pid,
        fds: fd_count(pid).ok_or_else(|| BenchError(format!("cannot read /proc/{pid}/fd")))?,
        rss_kib: proc_sample(&pid.to_string())?.rss_kib,
        connections: server_connections(env),
    })
}

/// The threads of a run and what they share.
struct Running {
    plan: Arc<Plan>,
    board: Arc<Board>,
    publishers: usize,
    pub_handles: Vec<JoinHandle<PubOut>>,
    threads: usize,
    txs: Vec<Sender<Cmd>>,
    handles: Vec<JoinHandle<Tally>>,
}

/// Set-up, second part: the plan, the publisher threads (each owning every P-th channel) and
/// the client threads, which start opening their share of the population at once.
fn start(env: &Env, a: &SoakArgs) -> Result<Running> {
    let plan = Arc::new(build_plan(env, a));
    let k = plan.channels.len();
    let board = Arc::new(Board::new(k, plan.presence.len()));
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
    Ok(Running {
        plan,
        board,
        publishers,
        pub_handles,
        threads,
        txs,
        handles,
    })
}

/// The server went away: the run cannot go on.
fn gone(pid: u32) -> BenchError {
    BenchError(format!("the server (pid {pid}) went away"))
}

/// Ramp and warm-up: the population opens at `--ramp-rate` and starts churning once full;
/// the server is sampled every second until the warm-up is over.
fn ramp(a: &SoakArgs, running: &Running, timeline: &mut Timeline) -> Result<()> {
    loop {
        let s = timeline
            .tick(&running.board, a)
            .ok_or_else(|| gone(timeline.pid))?;
        if s.at >= a.warmup {
            return Ok(());
        }
        timeline.sleep_past(s);
    }
}

/// Steady churn: connections replaced and subscriptions changed at their rates, the server
/// sampled every second, until `--duration`.
fn steady_churn(a: &SoakArgs, running: &Running, timeline: &mut Timeline) -> Result<()> {
    loop {
        let s = timeline.last();
        if s.at >= a.duration {
            return Ok(());
        }
        timeline.sleep_past(s);
        timeline
            .tick(&running.board, a)
            .ok_or_else(|| gone(timeline.pid))?;
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

/// Checks, first part: no more churn, and everything in flight (handshakes, subscribes,
/// catch-ups, closes) finishes; the publishers stop; then every subscription must get
/// everything the server accepted.
fn wind_down(running: &mut Running) -> Settled {
    let plan = &running.plan;
    running.board.stop_churn.store(true, SeqCst);
    let quiet_limit = plan.catch_up + plan.target.connect_timeout + Duration::from_secs(10);
    let quiet = ask_all(&running.txs, quiet_limit, Cmd::Quiesce).len();
    running.board.stop_publish.store(true, SeqCst);
    let pubs: Vec<PubOut> = std::mem::take(&mut running.pub_handles)
        .into_iter()
        .map(|h| h.join().expect("publisher thread"))
        .collect();
    let t_fence = Instant::now();
    let fence_limit = plan.catch_up + Duration::from_secs(5);
    let fenced = ask_all(&running.txs, fence_limit, Cmd::FinalFence).len();
    Settled {
        quiet,
        fenced,
        fence_s: t_fence.elapsed().as_secs_f64(),
        pubs,
    }
}

/// Checks, second part: the server's presence members and counts against the generator's
/// book, until they agree (at most 10 s); then every member's own view against the book.
fn check_presence(env: &Env, running: &Running, timeline: &Timeline) -> Result<PresenceCheck> {
    let plan = &running.plan;
    let mut http = env.api_client()?;
    let expected: Vec<HashSet<u32>> = running
        .board
        .book
        .lock()
        .expect("presence book")
        .iter()
        .map(|m| m.keys().copied().collect())
        .collect();
    let mut bad: Vec<String> = Vec::new();
    let t_pres = Instant::now();
    loop {
        bad.clear();
        for (slot, &chan) in plan.presence.iter().enumerate() {
            let name = &plan.channels[chan as usize];
            let want = &expected[slot];
            match server_presence(&mut http, &env.creds, name) {
                Ok((users, count)) => {
                    if users != *want || count != want.len() as u64 {
                        let extra: Vec<_> = users.difference(want).take(5).collect();
                        let absent: Vec<_> = want.difference(&users).take(5).collect();
                        bad.push(format!(
                            "{name}: server lists {} users, user_count {count}, generator \
                             expects {}; extra {extra:?}, absent {absent:?}",
                            users.len(),
                            want.len()
                        ));
                    }
                }
                Err(e) => bad.push(e),
            }
        }
        if bad.is_empty() || t_pres.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let seconds = t_pres.elapsed().as_secs_f64();
    let views = ask_all(&running.txs, Duration::from_secs(10), Cmd::Check);
    Ok(PresenceCheck {
        bad,
        members: expected.iter().map(|m| m.len() as u64).sum(),
        seconds,
        views,
        with_connections: timeline.sample_now(&running.board),
    })
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

/// Checks, last part: every connection closed (close handshakes, at most 5 s), then the
/// server's open files and connections must come back to where they started (at most 20 s).
fn close_all(
    env: &Env,
    base: &Baseline,
    txs: Vec<Sender<Cmd>>,
    handles: Vec<JoinHandle<Tally>>,
) -> Closed {
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
    let (mut fds, mut connections);
    loop {
        fds = fd_count(base.pid);
        connections = server_connections(env);
        let done = fds.is_some_and(|f| f <= base.fds)
            && connections.is_none_or(|c| c <= base.connections.unwrap_or(0));
        if done || t_close.elapsed() > Duration::from_secs(20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Closed {
        tally,
        fds,
        connections,
        seconds: t_close.elapsed().as_secs_f64(),
        rss_kib: proc_sample(&base.pid.to_string()).ok().map(|s| s.rss_kib),
    }
}
