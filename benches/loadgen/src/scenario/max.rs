//! `max`: raise the event rate stepwise until a step loses events or its p99 passes the limit;
//! report every step and the best passing one (the server's highest loss-free delivery rate).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use clap::Args as ClapArgs;
use serde_json::{json, Value};

use super::phase::{drain, open_sinks, publish_phase};
use super::rows::{connect_rows, cpu_delta, errors_into, opt_round, self_cpu, worker_json};
use super::{channel_names, open_subscribed, preflight, setup_for, Connected};
use crate::publish::Sink;
use crate::report::{round1, thousands, Report};
use crate::stats::{summary_us, Errors, ProcSample};
use crate::worker::{Setup, WorkerResult, Workers};
use crate::{Common, Env, Result};

#[derive(ClapArgs, Debug, Clone)]
pub struct MaxArgs {
    /// Subscribing connections.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub connections: usize,
    /// Channels; connection i subscribes to channel i mod K.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub channels: usize,
    /// Events per second of the first step.
    #[arg(long, default_value_t = 100.0)]
    pub start_rate: f64,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 1.5)]
    pub step_factor: f64,
    /// Seconds per step.
    #[arg(long, default_value_t = 5.0)]
    pub step_s: f64,
    /// Most steps.
    #[arg(long, default_value_t = 15)]
    pub max_steps: usize,
    /// Stop before a step over this rate (events/s).
    #[arg(long, default_value_t = 1_000_000.0)]
    pub max_rate: f64,
    /// A step passes when its p99 is at most this (and nothing is lost), ms.
    #[arg(long, default_value_t = 50.0)]
    pub p99_ms: f64,
    /// Publisher threads (one connection each), sharing the rate.
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Channels each event is published to.
    #[arg(long, default_value_t = 1)]
    pub channels_per_event: usize,
    /// After each step, wait at most this long for outstanding deliveries, ms.
    #[arg(long, default_value_t = 3000)]
    pub drain_ms: u64,
    /// Channel names are <prefix><i>.
    #[arg(long, default_value = "sports.football.leagues.l")]
    pub channel_prefix: String,
}

/// A generous guess of how long the run takes, seconds.
pub fn estimate_secs(c: &Common, a: &MaxArgs) -> f64 {
    c.connect_secs(a.connections)
        + a.max_steps as f64 * (a.step_s + a.drain_ms as f64 / 1000.0 + 2.0)
}

/// The subscribers, the client threads and the publishers every step uses.
struct Rig {
    setup: Arc<Setup>,
    workers: Workers,
    sinks: Vec<Sink>,
    /// Subscribers per channel.
    subs: Vec<u64>,
}

/// What the steps came to.
struct Ladder {
    /// Every step's JSON.
    steps: Vec<Value>,
    best: Option<Value>,
    stop_reason: String,
    pub_errors: Errors,
    /// Deliveries counted before the step now running.
    delivered_before: u64,
}

/// Runs the scenario.
pub fn run(env: &Env, a: &MaxArgs) -> Result<Report> {
    if a.connections == 0 || a.channels == 0 || a.start_rate <= 0.0 || a.step_factor <= 1.0 {
        return Err(
            "max needs --connections, --channels, --start-rate above 0 and --step-factor above 1"
                .into(),
        );
    }
    env.check_fds(a.connections)?;
    let channels = channel_names(&a.channel_prefix, a.channels, false);
    preflight(env, true)?;
    let sinks = open_sinks(env, a.publishers)?;
    let s0 = env.server();
    let setup = setup_for(env, channels, None);
    let (workers, con) = open_subscribed(env, &setup, a.connections, a.channels)?;
    let s1 = env.server();
    let mut subs = vec![0u64; a.channels];
    for i in 0..a.connections {
        subs[i % a.channels] += 1;
    }
    let mut rig = Rig {
        setup,
        workers,
        sinks,
        subs,
    };
    let mut r = env.report("max");
    let mut ladder = Ladder {
        steps: Vec::new(),
        best: None,
        stop_reason: String::from("reached --max-steps / --max-rate without failing"),
        pub_errors: Errors::default(),
        delivered_before: 0,
    };
    let mut rate = a.start_rate;
    for step in 0..a.max_steps {
        if rate > a.max_rate {
            break;
        }
        let (row, fail) = run_step(env, a, &mut rig, &mut ladder, &mut r, step, rate);
        ladder.steps.push(row.clone());
        if !fail.is_empty() {
            ladder.stop_reason = format!(
                "step {step} at {rate:.0} events/s failed: {}",
                fail.join("; ")
            );
            break;
        }
        ladder.best = Some(row);
        rate *= a.step_factor;
    }
    let res = rig.workers.stop();
    finish(env, a, &mut r, &con, &res, ladder, [s0, s1]);
    Ok(r)
}

/// One step: publish at `rate` for `--step-s`, wait for the deliveries, judge them; its row in
/// the table and its plot go into `r`. Its JSON, and why it failed (empty: it passed).
fn run_step(
    env: &Env,
    a: &MaxArgs,
    rig: &mut Rig,
    ladder: &mut Ladder,
    r: &mut Report,
    step: usize,
    rate: f64,
) -> (Value, Vec<String>) {
    let total = (rate * a.step_s).round().max(1.0) as u64;
    eprintln!(
        "bts-guru-bench: max: step {step}: {rate:.0} events/s for {} s",
        a.step_s
    );
    let (c0, g0) = (env.server(), self_cpu());
    let channels = rig.setup.channels.clone();
    let p = publish_phase(
        env,
        &mut rig.sinks,
        &channels,
        step as u32,
        rate,
        total,
        a.channels_per_event,
    );
    let expected: u64 = p
        .per_channel
        .iter()
        .zip(&rig.subs)
        .map(|(e, s)| e * s)
        .sum();
    let drained = drain(
        &rig.setup.shared,
        ladder.delivered_before + expected,
        Duration::from_millis(a.drain_ms),
    );
    let (c1, g1) = (env.server(), self_cpu());
    let ps = rig.workers.snapshot(step as u32, p.expected.clone());
    ladder.delivered_before = rig.setup.shared.delivered.load(Relaxed);
    ladder.pub_errors.merge(&p.errors());
    let secs = p.elapsed.as_secs_f64().max(1e-9);
    let per_s = ps.received as f64 / secs;
    let p99_ms = ps.latency.value_at_quantile(0.99) as f64 / 1e6;
    let cpu = cpu_delta(c0, c1);
    let mut fail = Vec::new();
    if ps.missing > 0 {
        fail.push(format!("{} missing", ps.missing));
    }
    if ps.duplicates > 0 || ps.reordered > 0 || ps.unexpected > 0 {
        fail.push(format!(
            "{} duplicates, {} reordered, {} unexpected",
            ps.duplicates, ps.reordered, ps.unexpected
        ));
    }
    if ps.lost_subscribers > 0 {
        fail.push(format!("{} subscribers lost", ps.lost_subscribers));
    }
    if p.errors().total() > 0 {
        fail.push(format!("{} publish errors", p.errors().total()));
    }
    if p99_ms > a.p99_ms {
        fail.push(format!("p99 {p99_ms:.2} ms > {} ms", a.p99_ms));
    }
    if p.achieved_rate() < 0.95 * rate {
        let cores = |c: Option<f64>| {
            c.map(|c| format!("{:.0}%", c / (secs + drained.as_secs_f64()) / 10.0))
                .unwrap_or_else(|| "?".into())
        };
        fail.push(format!(
            "publishers achieved only {:.0}/s of {rate:.0}/s (publish round trip p50 {:.0} µs; \
             server CPU {}, generator CPU {} of one core: a saturated server answers \
             publishes late, otherwise try more --publishers)",
            p.achieved_rate(),
            p.rtt().value_at_quantile(0.5) as f64 / 1e3,
            cores(cpu),
            cores(cpu_delta(g0, g1)),
        ));
    }
    let pass = fail.is_empty();
    let row = json!({
        "step": step, "rate": round1(rate), "achieved_rate": round1(p.achieved_rate()),
        "deliveries": ps.received, "expected": ps.expected, "missing": ps.missing,
        "duplicates": ps.duplicates, "reordered": ps.reordered, "unexpected": ps.unexpected,
        "deliveries_per_s": round1(per_s), "latency_us": summary_us(&ps.latency),
        "publish_rtt_us": summary_us(&p.rtt()),
        "server_cpu_ms": opt_round(cpu),
        "server_cpu_cores": opt_round(cpu.map(|c| c / (secs + drained.as_secs_f64()) / 1000.0)),
        "server_cpu_ms_per_1000_deliveries": opt_round(cpu.filter(|_| ps.received > 0).map(|c| c / (ps.received as f64 / 1000.0))),
        "generator_cpu_cores": opt_round(cpu_delta(g0, g1).map(|c| c / (secs + drained.as_secs_f64()) / 1000.0)),
        "drain_ms": round1(drained.as_secs_f64() * 1000.0),
        "pass": pass, "fail_reasons": fail,
    });
    r.row(
        format!("step {step:>2} {:>9.0} ev/s", rate),
        format!(
            "{} {} deliveries/s, p50 {:.2} ms p99 {:.2} ms max {:.2} ms, server {:.0}% CPU{}",
            if pass { "PASS" } else { "FAIL" },
            thousands(per_s as u64),
            ps.latency.value_at_quantile(0.5) as f64 / 1e6,
            p99_ms,
            ps.latency.max() as f64 / 1e6,
            cpu.map(|c| c / (secs + drained.as_secs_f64()) / 10.0)
                .unwrap_or(f64::NAN),
            if pass {
                String::new()
            } else {
                format!(": {}", fail.join("; "))
            }
        ),
    );
    r.plots.push((
        format!("{rate:.0} ev/s{}", if pass { "" } else { " (fail)" }),
        ps.latency.clone(),
    ));
    (row, fail)
}

/// After the last step: the connections, every step, the best one and why it stopped.
fn finish(
    env: &Env,
    a: &MaxArgs,
    r: &mut Report,
    con: &Connected,
    res: &WorkerResult,
    ladder: Ladder,
    [s0, s1]: [Option<ProcSample>; 2],
) {
    let Ladder {
        steps,
        best,
        stop_reason,
        pub_errors,
        ..
    } = ladder;
    r.set(
        "params",
        json!({"connections": a.connections, "channels": a.channels, "start_rate": a.start_rate,
               "step_factor": a.step_factor, "step_s": a.step_s, "p99_ms": a.p99_ms,
               "publishers": a.publishers, "channels_per_event": a.channels_per_event,
               "threads": env.threads}),
    );
    connect_rows(
        r,
        a.connections,
        con,
        res,
        "connect → subscription_succeeded",
    );
    r.set("steps", Value::Array(steps));
    r.set("stop_reason", json!(stop_reason));
    match &best {
        Some(b) => {
            r.row(
                "best passing step",
                format!(
                    "{} events/s = {} deliveries/s (p99 {} µs)",
                    b["rate"], b["deliveries_per_s"], b["latency_us"]["p99"]
                ),
            );
            r.set("best", b.clone());
            r.set("max_deliveries_per_s", b["deliveries_per_s"].clone());
            r.set("latency_us", b["latency_us"].clone());
        }
        None => {
            r.set("best", Value::Null);
            r.set("max_deliveries_per_s", Value::Null);
            r.problem("even the first step failed (lower --start-rate)");
        }
    }
    r.row("stopped because", stop_reason.clone());
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "cpu_ms_connect": opt_round(cpu_delta(s0, s1)),
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_connected": s1.map(|s| s.rss_kib),
        }),
    );
    r.set("other", worker_json(res));
    errors_into(r, res, &pub_errors);
}
