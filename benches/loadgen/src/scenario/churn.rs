//! `churn`: connect, subscribe, hold and disconnect (close handshake) at a target rate for D
//! seconds; report the cycle times and the server's CPU per cycle, and check the server counts
//! no connection more than before.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use serde_json::json;

use super::rows::{cpu_delta, errors_into, fmt_kib, opt_round, worker_json};
use super::{channel_names, preflight, server_connections, setup_for, spawn};
use crate::report::{round1, round3, thousands, Report};
use crate::stats::{fmt_hist, summary_us, Errors, ProcSample};
use crate::worker::{ChurnPlan, Shared, WorkerResult};
use crate::{Common, Env, Result};

#[derive(ClapArgs, Debug, Clone)]
pub struct ChurnArgs {
    /// New connections per second.
    #[arg(short = 'r', long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds to keep opening connections.
    #[arg(short = 'd', long, default_value_t = 5.0)]
    pub duration: f64,
    /// Each connection stays this long after subscribing, ms.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Each connection subscribes to one of K channels (0: none, close after connecting).
    #[arg(short = 'k', long, default_value_t = 10)]
    pub channels: usize,
    /// Wait this long after the last close before reading the server's RSS, ms.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Channel names are <prefix><i>.
    #[arg(long, default_value = "sports.football.leagues.l")]
    pub channel_prefix: String,
}

/// A generous guess of how long the run takes, seconds.
pub fn estimate_secs(c: &Common, a: &ChurnArgs) -> f64 {
    a.duration + a.hold_ms as f64 / 1000.0 + c.connect_timeout_s + 10.0
}

/// Runs the scenario.
pub fn run(env: &Env, a: &ChurnArgs) -> Result<Report> {
    if a.rate <= 0.0 || a.duration <= 0.0 {
        return Err("churn needs --rate and --duration above 0".into());
    }
    preflight(env, false)?;
    std::thread::sleep(Duration::from_millis(200));
    let channels = channel_names(&a.channel_prefix, a.channels, false);
    let s0 = env.server();
    let before_conns = server_connections(env);
    let setup = setup_for(env, channels, None);
    let start = Instant::now() + Duration::from_millis(20);
    let until = start + Duration::from_secs_f64(a.duration);
    let plan = ChurnPlan {
        rate: a.rate,
        start,
        until,
        hold: Duration::from_millis(a.hold_ms),
        channels: a.channels as u32,
        index: 0,
        stride: 1,
    };
    let workers = spawn(env, &setup, usize::MAX, Some(plan))?;
    let sh = setup.shared.clone();
    wait_cycles(env, a, &sh, until);
    let finished_at = start.elapsed();
    let s1 = env.server();
    std::thread::sleep(Duration::from_millis(a.settle_ms));
    let s2 = env.server();
    let after_conns = server_connections(env);
    let cycles = Cycles {
        started: sh.churn_started.load(Relaxed),
        completed: sh.churn_completed.load(Relaxed),
        failed: sh.churn_failed.load(Relaxed),
        finished_at,
        connections: [before_conns, after_conns],
    };
    let res = workers.stop();
    Ok(report(env, a, &cycles, &res, [s0, s1, s2]))
}

/// What the cycles came to.
struct Cycles {
    started: u64,
    completed: u64,
    failed: u64,
    /// From the first cycle's start to the last one's end.
    finished_at: Duration,
    /// What the server counted before and after (`GET /apps/{id}/connections`).
    connections: [Option<u64>; 2],
}

/// Waits until the churn is over and every cycle started has ended (or the limit).
fn wait_cycles(env: &Env, a: &ChurnArgs, sh: &Shared, until: Instant) {
    let limit = until
        + Duration::from_millis(a.hold_ms)
        + Duration::from_secs_f64(env.c.connect_timeout_s)
        + Duration::from_secs(8);
    let mut last = Instant::now();
    loop {
        let started = sh.churn_started.load(Relaxed);
        let done = sh.churn_completed.load(Relaxed) + sh.churn_failed.load(Relaxed);
        if Instant::now() >= until && done >= started {
            break;
        }
        if Instant::now() > limit {
            break;
        }
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            eprintln!("bts-guru-bench: churn: {started} started, {done} finished");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The table, the JSON and the checks; `s`: the server before, when done, after settling.
fn report(
    env: &Env,
    a: &ChurnArgs,
    cycles: &Cycles,
    res: &WorkerResult,
    s: [Option<ProcSample>; 3],
) -> Report {
    let [s0, s1, s2] = s;
    let (started, completed, failed) = (cycles.started, cycles.completed, cycles.failed);
    let finished_at = cycles.finished_at;
    let [before_conns, after_conns] = cycles.connections;
    let mut r = env.report("churn");
    r.set(
        "params",
        json!({"rate": a.rate, "duration_s": a.duration, "hold_ms": a.hold_ms,
               "channels": a.channels, "threads": env.threads, "source_addrs": env.sources.len(),
               "connect_concurrency": env.c.connect_concurrency}),
    );
    let achieved = started as f64 / a.duration;
    r.row(
        "cycles",
        format!(
            "{} started ({:.1}/s, target {}/s), {} completed, {} failed, {} started over 50 ms \
             late; all done after {:.2} s",
            thousands(started),
            achieved,
            a.rate,
            thousands(completed),
            failed,
            res.churn_deferred,
            finished_at.as_secs_f64()
        ),
    );
    let what = if a.channels > 0 {
        "connect → subscription_succeeded"
    } else {
        "connect → connection_established"
    };
    r.row(format!("establish ({what})"), fmt_hist(&res.establish));
    r.row("cycle (connect → closed)", fmt_hist(&res.churn_cycle));
    let cpu = cpu_delta(s0, s1);
    let per_1000 = cpu
        .filter(|_| completed > 0)
        .map(|c| c / (completed as f64 / 1000.0));
    if env.c.server_pid.is_some() {
        r.row(
            "server CPU",
            format!(
                "{:.0} ms = {:.1} ms per 1,000 connection cycles ({:.0}% of one core)",
                cpu.unwrap_or(f64::NAN),
                per_1000.unwrap_or(f64::NAN),
                cpu.unwrap_or(f64::NAN) / finished_at.as_secs_f64() / 10.0
            ),
        );
        r.row(
            "server RSS",
            format!(
                "{} KiB before, {} KiB when done, {} KiB after {} ms ({:+} KiB)",
                fmt_kib(s0),
                fmt_kib(s1),
                fmt_kib(s2),
                a.settle_ms,
                match (s0, s2) {
                    (Some(x), Some(y)) => y.rss_kib as i64 - x.rss_kib as i64,
                    _ => 0,
                }
            ),
        );
    } else {
        r.row("server CPU/RSS", "not measured (pass --server-pid)");
    }
    if let Some(n) = after_conns {
        r.row(
            "server says",
            format!(
                "{} connections before, {n} after (GET /apps/{{id}}/connections)",
                before_conns
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "?".into())
            ),
        );
    }
    r.set(
        "cycles",
        json!({
            "started": started, "completed": completed, "failed": failed,
            "started_late": res.churn_deferred, "per_s": round1(achieved),
            "seconds": round3(finished_at.as_secs_f64()),
            "establish_us": summary_us(&res.establish),
            "handshake_us": summary_us(&res.handshake),
            "cycle_us": summary_us(&res.churn_cycle),
        }),
    );
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "cpu_ms": opt_round(cpu),
            "cpu_ms_per_1000_connections": opt_round(per_1000),
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_done": s1.map(|s| s.rss_kib),
            "rss_kib_settled": s2.map(|s| s.rss_kib),
            "connections_before": before_conns,
            "connections_after": after_conns,
        }),
    );
    r.set("other", worker_json(res));
    errors_into(&mut r, res, &Errors::default());
    if failed > 0 {
        r.problem(format!("{failed} connection cycles failed"));
    }
    if completed + failed < started {
        r.problem(format!(
            "{} cycles did not finish",
            started - completed - failed
        ));
    }
    if achieved < a.rate * 0.9 {
        r.problem(format!(
            "achieved {achieved:.1} connections/s of {}/s (raise --connect-concurrency?)",
            a.rate
        ));
    }
    if let (Some(b), Some(n)) = (before_conns, after_conns) {
        if n > b {
            r.problem(format!(
                "the server still counts {} connections more than before",
                n - b
            ));
        }
    }
    r.plots.push(("establish".into(), res.establish.clone()));
    r.plots
        .push(("connect → closed".into(), res.churn_cycle.clone()));
    r
}
