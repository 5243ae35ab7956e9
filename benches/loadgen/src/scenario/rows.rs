//! Report rows and JSON sections more than one scenario prints: connections, publishing,
//! deliveries, the server's and the generator's CPU and RSS, errors, and the delivery checks.

use std::time::Duration;

use serde_json::{json, Value};

use super::phase::Published;
use super::Connected;
use crate::report::{round1, round3, thousands, Report};
use crate::stats::{cpu_between, fmt_hist, proc_sample, summary_us, Errors, ProcSample};
use crate::worker::{PhaseStats, WorkerResult};
use crate::Env;

pub fn cpu_delta(a: Option<ProcSample>, b: Option<ProcSample>) -> Option<f64> {
    Some(cpu_between(a?, b?))
}

pub fn opt_round(v: Option<f64>) -> Value {
    v.map(|v| json!(round3(v))).unwrap_or(Value::Null)
}

pub fn self_cpu() -> Option<ProcSample> {
    proc_sample("self").ok()
}

pub fn worker_json(r: &WorkerResult) -> Value {
    json!({
        "malformed": r.malformed,
        "other_events": r.other_events,
        "pings_answered": r.pings_answered,
        "server_closes": r.server_closes,
    })
}

pub fn errors_into(report: &mut Report, r: &WorkerResult, extra: &Errors) {
    let mut all = r.errors.clone();
    all.merge(extra);
    report.set("errors", all.to_json());
    if !all.is_empty() {
        let mut v: Vec<(&String, &u64)> = all.0.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        for (e, n) in v.iter().take(8) {
            report.row("error", format!("{n}x {e}"));
        }
    }
}

pub fn connect_rows(
    report: &mut Report,
    requested: usize,
    c: &Connected,
    r: &WorkerResult,
    what: &str,
) {
    let rate = c.ready as f64 / c.elapsed.as_secs_f64().max(1e-9);
    report.row(
        "connections",
        format!(
            "{} ready, {} failed of {} in {:.2} s ({}/s)",
            thousands(c.ready),
            c.failed,
            thousands(requested as u64),
            c.elapsed.as_secs_f64(),
            thousands(rate as u64)
        ),
    );
    report.row(format!("establish ({what})"), fmt_hist(&r.establish));
    report.set(
        "connect",
        json!({
            "requested": requested,
            "ready": c.ready,
            "failed": c.failed,
            "seconds": round3(c.elapsed.as_secs_f64()),
            "per_s": round1(rate),
            "establish_us": summary_us(&r.establish),
            "handshake_us": summary_us(&r.handshake),
            "establish_means": what,
        }),
    );
}

pub fn publish_rows(r: &mut Report, p: &Published) {
    r.row(
        "published",
        format!(
            "{} of {} events sent, {} accepted, {} errors; {:.1}/s achieved (target {}/s), \
             max lag {:.1} ms",
            thousands(p.sent()),
            thousands(p.planned),
            thousands(p.accepted()),
            p.errors().total(),
            p.achieved_rate(),
            p.rate,
            p.max_lag().as_secs_f64() * 1000.0
        ),
    );
    r.row("publish round trip", fmt_hist(&p.rtt()));
    r.set("publish", p.json());
}

pub fn delivery_rows(
    r: &mut Report,
    ps: &PhaseStats,
    expected: u64,
    publish: Duration,
    drained: Duration,
) {
    let per_s = ps.received as f64 / publish.as_secs_f64().max(1e-9);
    r.row(
        "deliveries",
        format!(
            "{} expected, {} received, {} missing, {} duplicates, {} reordered, {} unexpected",
            thousands(ps.expected),
            thousands(ps.received),
            ps.missing,
            ps.duplicates,
            ps.reordered,
            ps.unexpected
        ),
    );
    r.row(
        "throughput",
        format!(
            "{} deliveries/s (drain {:.0} ms after the last publish)",
            thousands(per_s as u64),
            drained.as_secs_f64() * 1000.0
        ),
    );
    r.row("latency publish→receive", fmt_hist(&ps.latency));
    let wire_per = (ps.received > 0).then(|| ps.wire_bytes as f64 / ps.received as f64);
    r.row(
        "wire bytes",
        format!(
            "{} read by the subscribers = {:.1} B per delivery",
            thousands(ps.wire_bytes),
            wire_per.unwrap_or(f64::NAN)
        ),
    );
    r.set(
        "wire",
        json!({ "bytes": ps.wire_bytes, "bytes_per_delivery": wire_per.map(round1) }),
    );
    r.set(
        "deliveries",
        json!({
            "expected": ps.expected,
            "expected_by_publishers": expected,
            "received": ps.received,
            "missing": ps.missing,
            "duplicates": ps.duplicates,
            "reordered": ps.reordered,
            "unexpected": ps.unexpected,
            "lost_subscribers": ps.lost_subscribers,
            "per_s": round1(per_s),
            "drain_ms": round1(drained.as_secs_f64() * 1000.0),
        }),
    );
    r.set("latency_us", summary_us(&ps.latency));
}

/// `samples`: before connecting, connected, after publishing, after disconnecting.
#[allow(clippy::too_many_arguments)]
pub fn server_rows(
    r: &mut Report,
    env: &Env,
    samples: &[Option<ProcSample>; 4],
    cpu_connect: Option<f64>,
    cpu_publish: Option<f64>,
    window: Duration,
    deliveries: u64,
    conns: u64,
) {
    let [s0, s1, s2, s3] = *samples;
    let per_1000 = cpu_publish
        .filter(|_| deliveries > 0)
        .map(|c| c / (deliveries as f64 / 1000.0));
    let util = cpu_publish.map(|c| c / window.as_secs_f64().max(1e-9) / 1000.0);
    let rss_per_conn = match (s0, s1) {
        (Some(a), Some(b)) if conns > 0 => {
            Some((b.rss_kib as f64 - a.rss_kib as f64) * 1024.0 / conns as f64)
        }
        _ => None,
    };
    if env.c.server_pid.is_some() {
        r.row(
            "server CPU",
            format!(
                "{:.0} ms connecting; {:.0} ms while publishing = {:.3} ms per 1,000 deliveries \
                 ({:.0}% of one core)",
                cpu_connect.unwrap_or(f64::NAN),
                cpu_publish.unwrap_or(f64::NAN),
                per_1000.unwrap_or(f64::NAN),
                util.unwrap_or(f64::NAN) * 100.0
            ),
        );
        r.row(
            "server RSS",
            format!(
                "{} KiB before, {} KiB connected, {} KiB after publishing, {} KiB after closing \
                 ({:.0} B per connection)",
                fmt_kib(s0),
                fmt_kib(s1),
                fmt_kib(s2),
                fmt_kib(s3),
                rss_per_conn.unwrap_or(f64::NAN)
            ),
        );
    } else {
        r.row("server CPU/RSS", "not measured (pass --server-pid)");
    }
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "cpu_ms_connect": opt_round(cpu_connect),
            "cpu_ms_publish": opt_round(cpu_publish),
            "cpu_ms_per_1000_deliveries": opt_round(per_1000),
            "cpu_cores_publish": opt_round(util),
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_connected": s1.map(|s| s.rss_kib),
            "rss_kib_after_publish": s2.map(|s| s.rss_kib),
            "rss_kib_after_close": s3.map(|s| s.rss_kib),
            "rss_bytes_per_connection": opt_round(rss_per_conn),
        }),
    );
}

pub fn fmt_kib(s: Option<ProcSample>) -> String {
    s.map(|s| thousands(s.rss_kib))
        .unwrap_or_else(|| "?".into())
}

pub fn gen_rows(r: &mut Report, cpu: Option<f64>, window: Duration) {
    let util = cpu.map(|c| c / window.as_secs_f64().max(1e-9) / 1000.0);
    r.row(
        "generator CPU",
        format!(
            "{:.0} ms while publishing ({:.0}% of one core)",
            cpu.unwrap_or(f64::NAN),
            util.unwrap_or(f64::NAN) * 100.0
        ),
    );
    r.set(
        "generator",
        json!({"cpu_ms_publish": opt_round(cpu), "cpu_cores_publish": opt_round(util)}),
    );
}

pub fn checks(r: &mut Report, ps: &PhaseStats, p: &Published, res: &WorkerResult) {
    if ps.missing > 0 {
        r.problem(format!("{} deliveries missing", ps.missing));
    }
    if ps.duplicates > 0 {
        r.problem(format!("{} duplicate deliveries", ps.duplicates));
    }
    if ps.reordered > 0 {
        r.problem(format!("{} deliveries out of order", ps.reordered));
    }
    if ps.unexpected > 0 {
        r.problem(format!(
            "{} unexpected deliveries (not published, or on a channel not subscribed)",
            ps.unexpected
        ));
    }
    if ps.lost_subscribers > 0 {
        r.problem(format!("{} subscribers disconnected", ps.lost_subscribers));
    }
    if p.errors().total() > 0 {
        r.problem(format!("{} publish errors", p.errors().total()));
    }
    if p.accepted() == 0 {
        r.problem("nothing was published");
    }
    if res.malformed > 0 {
        r.problem(format!("{} malformed messages", res.malformed));
    }
    if !res.errors.is_empty() {
        r.problem(format!("{} connection errors", res.errors.total()));
    }
}
