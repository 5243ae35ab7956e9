//! `presence`: M members join one presence channel (each `channel_data` signed with the
//! secret), then a fraction leaves; every member must learn of every other one exactly once,
//! and of every leave; join and member_added/member_removed latencies.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use serde_json::json;

use super::rows::{connect_rows, cpu_delta, errors_into, opt_round, worker_json};
use super::{
    connect_failure, connect_limit, preflight, setup_for, spawn, wait_connected, Connected,
};
use crate::report::{round1, round3, Report};
use crate::stats::{fmt_hist, summary_us, Errors, ProcSample};
use crate::worker::{Cmd, PresenceSetup, Shared, Spec, WorkerResult, Workers};
use crate::{BenchError, Common, Env, Result};

#[derive(ClapArgs, Debug, Clone)]
pub struct PresenceArgs {
    /// Members (one connection and user each).
    #[arg(short = 'm', long, default_value_t = 200)]
    pub members: usize,
    /// Joins (and leaves) per second, all threads together (0: all at once).
    #[arg(short = 'r', long, default_value_t = 0.0)]
    pub rate: f64,
    /// Fraction of the members that leave (unsubscribe) after everyone joined.
    #[arg(long, default_value_t = 0.5)]
    pub leave_fraction: f64,
    /// Presence channel (default presence-bench.<random>).
    #[arg(long)]
    pub channel: Option<String>,
    /// Wait at most this long for every member to know every other one, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub settle_timeout_s: f64,
}

/// A generous guess of how long the run takes, seconds.
pub fn estimate_secs(c: &Common, a: &PresenceArgs) -> f64 {
    let storm = if a.rate > 0.0 {
        2.0 * a.members as f64 / a.rate
    } else {
        0.0
    };
    c.connect_secs(a.members) + storm + 2.0 * a.settle_timeout_s
}

/// The pairs (member, other member) there are among `j` members.
fn known_target(j: u64) -> i64 {
    (j * j.saturating_sub(1)) as i64
}

/// How the join storm went.
struct Joins {
    elapsed: Duration,
    /// When every join was acknowledged (or refused).
    done: Option<Duration>,
    joined: u64,
    failed: u64,
    /// (member, other member) pairs known after it.
    known: i64,
}

/// How the leave storm went.
struct Leaves {
    elapsed: Duration,
    left: u64,
    remaining: u64,
    known: i64,
}

/// Runs the scenario.
pub fn run(env: &Env, a: &PresenceArgs) -> Result<Report> {
    let n = a.members;
    if n < 2 {
        return Err("presence needs at least 2 --members".into());
    }
    if !(0.0..=1.0).contains(&a.leave_fraction) {
        return Err("--leave-fraction must be within 0..1".into());
    }
    env.check_fds(n)?;
    preflight(env, false)?;
    let channel = a
        .channel
        .clone()
        .unwrap_or_else(|| format!("presence-bench.{}", env.nonce));
    if !channel.starts_with("presence-") {
        return Err(BenchError(format!(
            "{channel:?} is not a presence channel (presence-...)"
        )));
    }
    let pres = PresenceSetup {
        channel: channel.clone(),
        join_sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
        leave_sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
    };
    let setup = setup_for(env, Vec::new(), Some(pres));
    let workers = spawn(env, &setup, n, None)?;
    workers.open(
        (0..n as u32)
            .map(|i| Spec {
                id: i,
                channel: None,
            })
            .collect(),
    );
    let con = wait_connected(&setup.shared, n as u64, "connecting", connect_limit(env, n));
    if con.ready < n as u64 {
        return Err(connect_failure(workers, &con, n as u64));
    }
    let s0 = env.server();
    let joins = join_storm(a, &workers, &setup.shared);
    let s1 = env.server();
    let leaves = leave_storm(a, &workers, &setup.shared, joins.joined);
    let s2 = env.server();
    let res = workers.stop();
    let mut r = report(env, a, &channel, &con, &joins, &leaves, &res, [s0, s1, s2]);
    checks(&mut r, &joins, &leaves, &res);
    Ok(r)
}

/// Every member subscribes, `--rate` per second; waits until every member knows every other
/// (at most the settle timeout plus the storm's length).
fn join_storm(a: &PresenceArgs, workers: &Workers, sh: &Shared) -> Joins {
    let n = a.members;
    let w = workers.threads();
    let per_rate = a.rate / w as f64;
    let t_join = Instant::now();
    workers.each(|wi| Cmd::Join {
        ids: (0..n as u32).filter(|i| *i as usize % w == wi).collect(),
        rate: per_rate,
    });
    let settle = Duration::from_secs_f64(a.settle_timeout_s)
        + Duration::from_secs_f64(if a.rate > 0.0 { n as f64 / a.rate } else { 0.0 });
    let mut join_done = None;
    loop {
        let joined = sh.joined.load(Relaxed);
        let jf = sh.join_failed.load(Relaxed);
        if joined + jf >= n as u64 && join_done.is_none() {
            join_done = Some(t_join.elapsed());
        }
        if joined + jf >= n as u64 && sh.presence_known.load(Relaxed) >= known_target(joined) {
            break;
        }
        if t_join.elapsed() > settle {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Joins {
        elapsed: t_join.elapsed(),
        done: join_done,
        joined: sh.joined.load(Relaxed),
        failed: sh.join_failed.load(Relaxed),
        known: sh.presence_known.load(Relaxed),
    }
}

/// An evenly spread `--leave-fraction` of the members unsubscribe; waits until the others
/// know, then a little more, for late or duplicate events to show.
fn leave_storm(a: &PresenceArgs, workers: &Workers, sh: &Shared, joined: u64) -> Leaves {
    let n = a.members;
    let w = workers.threads();
    let per_rate = a.rate / w as f64;
    let leaving: Vec<u32> = (0..n as u32)
        .filter(|&i| {
            ((i as f64 + 1.0) * a.leave_fraction).floor() > (i as f64 * a.leave_fraction).floor()
        })
        .collect();
    let l = leaving.len() as u64;
    let t_leave = Instant::now();
    workers.each(|wi| Cmd::Leave {
        ids: leaving
            .iter()
            .copied()
            .filter(|i| *i as usize % w == wi)
            .collect(),
        rate: per_rate,
    });
    let settle = Duration::from_secs_f64(a.settle_timeout_s)
        + Duration::from_secs_f64(if a.rate > 0.0 { l as f64 / a.rate } else { 0.0 });
    loop {
        let (left, skipped) = (sh.left.load(Relaxed), sh.leave_skipped.load(Relaxed));
        let remaining = joined.saturating_sub(left);
        if left + skipped >= l && sh.presence_known.load(Relaxed) <= known_target(remaining) {
            break;
        }
        if t_leave.elapsed() > settle {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = t_leave.elapsed();
    let left = sh.left.load(Relaxed);
    // Late or duplicate events would show up here.
    std::thread::sleep(Duration::from_millis(300));
    Leaves {
        elapsed,
        left,
        remaining: joined.saturating_sub(left),
        known: sh.presence_known.load(Relaxed),
    }
}

/// The table and the JSON; `s`: the server before the joins, after them, after the leaves.
#[allow(clippy::too_many_arguments)]
fn report(
    env: &Env,
    a: &PresenceArgs,
    channel: &str,
    con: &Connected,
    joins: &Joins,
    leaves: &Leaves,
    res: &WorkerResult,
    s: [Option<ProcSample>; 3],
) -> Report {
    let [s0, s1, s2] = s;
    let (joined, join_failed, join_elapsed) = (joins.joined, joins.failed, joins.elapsed);
    let (known_after_join, known_after_leave) = (joins.known, leaves.known);
    let (l, leave_elapsed, remaining) = (leaves.left, leaves.elapsed, leaves.remaining);
    let join_done = joins.done;
    let n = a.members;
    let mut r = env.report("presence");
    r.set(
        "params",
        json!({"members": n, "rate": a.rate, "leave_fraction": a.leave_fraction,
               "channel": channel, "threads": env.threads}),
    );
    connect_rows(&mut r, n, con, res, "connect → connection_established");
    r.row(
        "joins",
        format!(
            "{joined} joined, {join_failed} refused, in {:.3} s (all acknowledged after {:.3} s)",
            join_elapsed.as_secs_f64(),
            join_done.unwrap_or(join_elapsed).as_secs_f64()
        ),
    );
    r.row("join (subscribe → succeeded)", fmt_hist(&res.presence_join));
    r.row("member_added propagation", fmt_hist(&res.presence_added));
    r.row(
        "membership after joins",
        format!(
            "{known_after_join} of {} (member, other member) pairs known",
            known_target(joined)
        ),
    );
    r.row(
        "leaves",
        format!("{l} left in {:.3} s", leave_elapsed.as_secs_f64()),
    );
    r.row(
        "member_removed propagation",
        fmt_hist(&res.presence_removed),
    );
    r.row(
        "membership after leaves",
        format!(
            "{known_after_leave} of {} pairs known",
            known_target(remaining)
        ),
    );
    r.row(
        "anomalies",
        format!(
            "{} duplicate member_added, {} member_removed for unknown members, {} events about \
             oneself, {} foreign members, {} events before joining",
            res.presence_dup_added,
            res.presence_unknown_removed,
            res.presence_self_events,
            res.presence_foreign,
            res.presence_early
        ),
    );
    let cpu = cpu_delta(s0, s2);
    if env.c.server_pid.is_some() {
        r.row(
            "server CPU",
            format!(
                "{:.0} ms for the join storm, {:.0} ms for the leaves",
                cpu_delta(s0, s1).unwrap_or(f64::NAN),
                cpu_delta(s1, s2).unwrap_or(f64::NAN)
            ),
        );
    }
    r.set(
        "presence",
        json!({
            "joined": joined, "join_failed": join_failed,
            "join_seconds": round3(join_elapsed.as_secs_f64()),
            "joins_per_s": round1(joined as f64 / join_done.unwrap_or(join_elapsed).as_secs_f64().max(1e-9)),
            "join_us": summary_us(&res.presence_join),
            "member_added_us": summary_us(&res.presence_added),
            "known_after_join": known_after_join, "known_expected_after_join": known_target(joined),
            "left": l, "leave_seconds": round3(leave_elapsed.as_secs_f64()),
            "member_removed_us": summary_us(&res.presence_removed),
            "known_after_leave": known_after_leave,
            "known_expected_after_leave": known_target(remaining),
            "duplicate_member_added": res.presence_dup_added,
            "unknown_member_removed": res.presence_unknown_removed,
            "self_events": res.presence_self_events,
            "foreign_members": res.presence_foreign,
            "events_before_join": res.presence_early,
            "events_after_leave": res.presence_after_leave,
        }),
    );
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "cpu_ms_join": opt_round(cpu_delta(s0, s1)),
            "cpu_ms_leave": opt_round(cpu_delta(s1, s2)),
            "cpu_ms": opt_round(cpu),
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_after": s2.map(|s| s.rss_kib),
        }),
    );
    r.set("latency_us", summary_us(&res.presence_added));
    r.set("other", worker_json(res));
    errors_into(&mut r, res, &Errors::default());
    r.plots.push((
        "join (subscribe → succeeded)".into(),
        res.presence_join.clone(),
    ));
    r.plots
        .push(("member_added".into(), res.presence_added.clone()));
    r.plots
        .push(("member_removed".into(), res.presence_removed.clone()));
    r
}

/// What makes the run fail.
fn checks(r: &mut Report, joins: &Joins, leaves: &Leaves, res: &WorkerResult) {
    let (joined, join_failed, known_after_join) = (joins.joined, joins.failed, joins.known);
    let (remaining, known_after_leave) = (leaves.remaining, leaves.known);
    if join_failed > 0 {
        r.problem(format!("{join_failed} joins refused or failed"));
    }
    if known_after_join != known_target(joined) {
        r.problem(format!(
            "after the joins members knew {known_after_join} of {} other members",
            known_target(joined)
        ));
    }
    if known_after_leave != known_target(remaining) {
        r.problem(format!(
            "after the leaves members knew {known_after_leave}, expected {}",
            known_target(remaining)
        ));
    }
    for (what, v) in [
        ("duplicate member_added", res.presence_dup_added),
        (
            "member_removed for unknown members",
            res.presence_unknown_removed,
        ),
        (
            "presence events about the receiving member itself",
            res.presence_self_events,
        ),
        (
            "presence events before subscription_succeeded",
            res.presence_early,
        ),
    ] {
        if v > 0 {
            r.problem(format!("{v} {what}"));
        }
    }
    if res.errors.total() > join_failed {
        r.problem(format!("{} errors", res.errors.total()));
    }
}
