//! The soak's report: what the phases measured ([`Outcome`]), the figures derived from it, the
//! table, the JSON line and the pass criteria.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::peer::Tally;
use super::plan::{Plan, SoakArgs};
use super::publisher::PubOut;
use super::timeline::{mean_rss, rss_trend_pct, Sample, Timeline};
use super::worker::ViewCheck;
use crate::report::{round1, round3, thousands, Report};
use crate::stats::{fmt_hist, new_hist, summary_us, Errors};
use crate::Env;

/// Width of the windows whose mean RSS is compared (after the warm-up, at the end).
const RSS_WINDOW: Duration = Duration::from_secs(10);

/// The server before the run.
pub struct Baseline {
    pub pid: u32,
    pub fds: u64,
    pub rss_kib: u64,
    /// Connections it counted (`GET /apps/{id}/connections`), where it has that.
    pub connections: Option<u64>,
}

/// After the churn: how many client threads settled and caught up, and the publishers' work.
pub struct Settled {
    pub quiet: usize,
    pub fenced: usize,
    /// How long the final catch-up took.
    pub fence_s: f64,
    pub pubs: Vec<PubOut>,
}

/// The presence channels at the end, by the HTTP API and by every member's own view.
pub struct PresenceCheck {
    /// Channels where the server and the generator disagree, and how.
    pub bad: Vec<String>,
    /// Members the generator expects, all channels together.
    pub members: u64,
    /// How long the HTTP API was asked.
    pub seconds: f64,
    pub views: Vec<ViewCheck>,
    /// The server with every connection still open.
    pub with_connections: Option<Sample>,
}

/// After every connection closed.
pub struct Closed {
    pub tally: Tally,
    pub fds: Option<u64>,
    pub connections: Option<u64>,
    /// How long the server took to come back down.
    pub seconds: f64,
    pub rss_kib: Option<u64>,
}

/// Everything a soak run measured.
pub struct Outcome {
    pub plan: std::sync::Arc<Plan>,
    pub base: Baseline,
    pub timeline: Timeline,
    pub publishers: usize,
    pub threads: usize,
    pub disconnects: u64,
    pub settled: Settled,
    pub presence: PresenceCheck,
    pub closed: Closed,
}

/// What the report says that is computed from the outcome.
struct Figures {
    end: Sample,
    /// Seconds from the population first full to the end.
    steady_secs: f64,
    sent: u64,
    accepted: u64,
    pub_errors: Errors,
    rtt: Histogram<u64>,
    max_lag: Duration,
    /// Width of the RSS windows compared.
    window: f64,
    rss_warm: Option<f64>,
    rss_end: Option<f64>,
    growth: Option<f64>,
    trend: Option<f64>,
    rss_max: Option<u64>,
    view_total: u64,
    view_bad: u64,
    /// The client threads' errors and the publishers'.
    all_errors: Errors,
}

impl Figures {
    fn of(a: &SoakArgs, o: &Outcome) -> Figures {
        let (samples, full_at, warm) = (&o.timeline.samples, o.timeline.full_at, o.timeline.warm);
        let end = o.timeline.last();
        let pubs = &o.settled.pubs;
        let warmup = a.warmup;
        let (sent, accepted): (u64, u64) = pubs
            .iter()
            .fold((0, 0), |(s, a), p| (s + p.sent, a + p.accepted));
        let mut pub_errors = Errors::default();
        let mut rtt = new_hist();
        let mut max_lag = Duration::ZERO;
        for p in pubs {
            pub_errors.merge(&p.errors);
            let _ = rtt.add(&p.rtt);
            max_lag = max_lag.max(p.max_lag);
        }
        let warm_at = warm.map(|w| w.at).unwrap_or(warmup);
        // Short runs compare shorter windows, so the two never overlap.
        let window = RSS_WINDOW
            .as_secs_f64()
            .min((end.at - warm_at) / 2.0)
            .max(0.0);
        let rss_warm = mean_rss(samples, warm_at, warm_at + window);
        let rss_end = mean_rss(samples, end.at - window, end.at);
        let growth = match (rss_warm, rss_end) {
            (Some(w), Some(e)) if w > 0.0 => Some((e - w) / w * 100.0),
            _ => None,
        };
        let trend = rss_trend_pct(samples, warm_at, end.at);
        let rss_max = samples
            .iter()
            .filter(|s| s.at >= warm_at)
            .map(|s| s.rss_kib)
            .max();
        let views = &o.presence.views;
        let view_total: u64 = views.iter().map(|v| v.views).sum();
        let view_bad: u64 = views.iter().map(|v| v.mismatches).sum();
        let mut all_errors = o.closed.tally.errors.clone();
        all_errors.merge(&pub_errors);
        Figures {
            end,
            steady_secs: (end.at - full_at.unwrap_or(end.at)).max(1e-9),
            sent,
            accepted,
            pub_errors,
            rtt,
            max_lag,
            window,
            rss_warm,
            rss_end,
            growth,
            trend,
            rss_max,
            view_total,
            view_bad,
            all_errors,
        }
    }
}

/// The table, the JSON line's figures and the pass criteria of a soak run.
pub fn report(env: &Env, a: &SoakArgs, o: &Outcome) -> Report {
    let f = Figures::of(a, o);
    let mut r = env.report("soak");
    rows(&mut r, a, o, &f);
    server_rows(&mut r, o, &f);
    json(&mut r, env, a, o, &f);
    problems(&mut r, a, o, &f);
    r.plots
        .push(("publish → receive".into(), o.closed.tally.latency.clone()));
    r
}

/// The table's rows on the run, the connections, the publishing and the deliveries.
fn rows(r: &mut Report, a: &SoakArgs, o: &Outcome, f: &Figures) {
    let (tally, disconnects, full_at) = (&o.closed.tally, o.disconnects, o.timeline.full_at);
    let Figures {
        end,
        steady_secs,
        sent,
        accepted,
        ref pub_errors,
        ref rtt,
        max_lag,
        ..
    } = *f;
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
    r.row("publish round trip", fmt_hist(rtt));
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
}

/// The table's rows on the server (RSS, open files), presence and errors.
fn server_rows(r: &mut Report, o: &Outcome, f: &Figures) {
    let (plan, tally) = (&o.plan, &o.closed.tally);
    let (fd_start, rss_start, warm) = (o.base.fds, o.base.rss_kib, o.timeline.warm);
    let presence = &o.presence;
    let (presence_bad, presence_members, presence_s) =
        (&presence.bad, presence.members, presence.seconds);
    let closed = &o.closed;
    let (fd_after, close_s, rss_after_close) = (closed.fds, closed.seconds, closed.rss_kib);
    let Figures {
        end,
        window,
        rss_warm,
        rss_end,
        growth,
        trend,
        rss_max,
        view_total,
        view_bad,
        ref all_errors,
        ..
    } = *f;
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
    let mut errs: Vec<(&String, &u64)> = all_errors.0.iter().collect();
    errs.sort_by(|a, b| b.1.cmp(a.1));
    for (e, n) in errs.iter().take(8) {
        r.row("error", format!("{n}x {e}"));
    }
}

/// The JSON line's sections.
fn json(r: &mut Report, env: &Env, a: &SoakArgs, o: &Outcome, f: &Figures) {
    let (plan, tally, disconnects) = (&o.plan, &o.closed.tally, o.disconnects);
    let (publishers, threads) = (o.publishers, o.threads);
    let base = &o.base;
    let (pid, fd_start, rss_start, conns_start) =
        (base.pid, base.fds, base.rss_kib, base.connections);
    let (samples, full_at, warm) = (&o.timeline.samples, o.timeline.full_at, o.timeline.warm);
    let (quiet, fenced, fence_s) = (o.settled.quiet, o.settled.fenced, o.settled.fence_s);
    let presence = &o.presence;
    let (presence_bad, presence_members) = (&presence.bad, presence.members);
    let (views, with_conns) = (&presence.views, presence.with_connections);
    let closed = &o.closed;
    let (fd_after, conns_after, rss_after_close) = (closed.fds, closed.connections, closed.rss_kib);
    let Figures {
        end,
        steady_secs,
        sent,
        accepted,
        ref pub_errors,
        ref rtt,
        max_lag,
        window,
        rss_warm,
        rss_end,
        growth,
        trend,
        rss_max,
        view_total,
        view_bad,
        ref all_errors,
        ..
    } = *f;
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
            "rtt_us": summary_us(rtt),
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
    r.set("errors", all_errors.to_json());
    r.set(
        "run",
        json!({"seconds": round3(end.at), "quiesced_threads": quiet, "fenced_threads": fenced}),
    );
}

/// What makes the run fail.
fn problems(r: &mut Report, a: &SoakArgs, o: &Outcome, f: &Figures) {
    let (tally, threads) = (&o.closed.tally, o.threads);
    let (fd_start, conns_start) = (o.base.fds, o.base.connections);
    let full_at = o.timeline.full_at;
    let (quiet, fenced) = (o.settled.quiet, o.settled.fenced);
    let presence_bad = &o.presence.bad;
    let (fd_after, conns_after) = (o.closed.fds, o.closed.connections);
    let Figures {
        ref pub_errors,
        trend,
        view_bad,
        ref all_errors,
        ..
    } = *f;
    if full_at.is_none_or(|t| t > a.warmup) {
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
}
