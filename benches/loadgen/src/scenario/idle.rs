//! `idle`: open C connections (optionally each subscribed to one of K channels), hold them,
//! and report the server's RSS per connection and CPU per connection opened.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::Args as ClapArgs;
use serde_json::json;

use super::rows::{connect_rows, cpu_delta, errors_into, fmt_kib, opt_round, worker_json};
use super::{
    channel_names, connect_failure, connect_limit, preflight, server_connections, setup_for, spawn,
    wait_connected,
};
use crate::report::Report;
use crate::stats::{Errors, ProcSample};
use crate::worker::Spec;
use crate::{Common, Env, Result};

#[derive(ClapArgs, Debug, Clone)]
pub struct IdleArgs {
    /// Connections to open and hold.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub connections: usize,
    /// Also subscribe each connection to one of K channels (0: no subscription).
    #[arg(short = 'k', long, default_value_t = 0)]
    pub channels: usize,
    /// Wait this long after the last connection is ready before reading the RSS, ms.
    #[arg(long, default_value_t = 1500)]
    pub settle_ms: u64,
    /// Then hold the connections this many seconds more (RSS read again at the end).
    #[arg(long, default_value_t = 0.0)]
    pub hold_s: f64,
    /// Channel names are <prefix><i>.
    #[arg(long, default_value = "sports.football.leagues.l")]
    pub channel_prefix: String,
}

/// A generous guess of how long the run takes, seconds.
pub fn estimate_secs(c: &Common, a: &IdleArgs) -> f64 {
    c.connect_secs(a.connections) + a.settle_ms as f64 / 1000.0 + a.hold_s
}

/// Runs the scenario.
pub fn run(env: &Env, a: &IdleArgs) -> Result<Report> {
    if a.connections == 0 {
        return Err("idle needs --connections above 0".into());
    }
    env.check_fds(a.connections)?;
    preflight(env, false)?;
    let channels = channel_names(&a.channel_prefix, a.channels, false);
    // Let the preflight connection go away before the baseline.
    std::thread::sleep(Duration::from_millis(200));
    let s0 = env.server();
    let setup = setup_for(env, channels, None);
    let workers = spawn(env, &setup, a.connections, None)?;
    workers.open(
        (0..a.connections as u32)
            .map(|i| Spec {
                id: i,
                channel: (a.channels > 0).then(|| i % a.channels as u32),
            })
            .collect(),
    );
    let want = a.connections as u64;
    let con = wait_connected(
        &setup.shared,
        want,
        "connecting",
        connect_limit(env, a.connections),
    );
    if con.ready < want {
        return Err(connect_failure(workers, &con, want));
    }
    let s_ready = env.server();
    std::thread::sleep(Duration::from_millis(a.settle_ms));
    let s1 = env.server();
    let api_count = server_connections(env);
    if a.hold_s > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(a.hold_s));
    }
    let s2 = env.server();
    let disconnects = setup.shared.disconnects.load(Relaxed);
    let res = workers.stop();
    std::thread::sleep(Duration::from_millis(a.settle_ms.min(2000)));
    let s3 = env.server();

    let mut r = env.report("idle");
    r.set(
        "params",
        json!({"connections": a.connections, "channels": a.channels, "settle_ms": a.settle_ms,
               "hold_s": a.hold_s, "threads": env.threads, "source_addrs": env.sources.len(),
               "connect_concurrency": env.c.connect_concurrency, "connect_rate": env.c.connect_rate}),
    );
    let what = if a.channels > 0 {
        "connect → subscription_succeeded"
    } else {
        "connect → connection_established"
    };
    connect_rows(&mut r, a.connections, &con, &res, what);
    let per_conn = |b: Option<ProcSample>| match (s0, b) {
        (Some(x), Some(y)) => {
            Some((y.rss_kib as f64 - x.rss_kib as f64) * 1024.0 / con.ready as f64)
        }
        _ => None,
    };
    if env.c.server_pid.is_some() {
        r.row(
            "server RSS",
            format!(
                "{} KiB before, {} KiB when all were ready, {} KiB after {} ms settle, {} KiB at the \
                 end, {} KiB after closing",
                fmt_kib(s0),
                fmt_kib(s_ready),
                fmt_kib(s1),
                a.settle_ms,
                fmt_kib(s2),
                fmt_kib(s3)
            ),
        );
        r.row(
            "RSS per connection",
            format!(
                "{:.0} B ({:.2} KiB) after settle; {:.0} B at the end",
                per_conn(s1).unwrap_or(f64::NAN),
                per_conn(s1).unwrap_or(f64::NAN) / 1024.0,
                per_conn(s2).unwrap_or(f64::NAN)
            ),
        );
        r.row(
            "server CPU",
            format!(
                "{:.0} ms for {} connections = {:.3} ms per 1,000 connections",
                cpu_delta(s0, s_ready).unwrap_or(f64::NAN),
                con.ready,
                cpu_delta(s0, s_ready).unwrap_or(f64::NAN) / (con.ready as f64 / 1000.0)
            ),
        );
    } else {
        r.row("server CPU/RSS", "not measured (pass --server-pid)");
    }
    if let Some(n) = api_count {
        r.row(
            "server says",
            format!("{n} connections (GET /apps/{{id}}/connections)"),
        );
    }
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_ready": s_ready.map(|s| s.rss_kib),
            "rss_kib_settled": s1.map(|s| s.rss_kib),
            "rss_kib_end": s2.map(|s| s.rss_kib),
            "rss_kib_after_close": s3.map(|s| s.rss_kib),
            "rss_bytes_per_connection": opt_round(per_conn(s1)),
            "rss_bytes_per_connection_end": opt_round(per_conn(s2)),
            "cpu_ms_connect": opt_round(cpu_delta(s0, s_ready)),
            "cpu_ms_per_1000_connections": opt_round(cpu_delta(s0, s_ready).map(|c| c / (con.ready as f64 / 1000.0))),
            "connections_reported": api_count,
        }),
    );
    r.set("other", worker_json(&res));
    errors_into(&mut r, &res, &Errors::default());
    if disconnects > 0 {
        r.problem(format!("{disconnects} connections dropped while idle"));
    }
    if !res.errors.is_empty() {
        r.problem(format!("{} connection errors", res.errors.total()));
    }
    if let Some(n) = api_count {
        if n < con.ready {
            r.problem(format!(
                "the server reports {n} connections, {} are open",
                con.ready
            ));
        }
    }
    r.plots
        .push((format!("{} x establish", con.ready), res.establish.clone()));
    Ok(r)
}
