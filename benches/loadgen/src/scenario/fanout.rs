//! `fanout`: C subscribers over K channels; publish R events/s for D seconds through the HTTP
//! API or Redis; check every delivery (latency, loss, duplicates, order) and measure the
//! server's CPU per delivery.

use std::time::Duration;

use clap::Args as ClapArgs;
use serde_json::json;

use super::phase::{drain, open_sinks, publish_phase};
use super::rows::{
    checks, connect_rows, cpu_delta, delivery_rows, errors_into, gen_rows, publish_rows, self_cpu,
    server_rows, worker_json,
};
use super::{channel_names, open_subscribed, preflight, setup_for};
use crate::report::{thousands, Report};
use crate::{Common, Env, Result};

#[derive(ClapArgs, Debug, Clone)]
pub struct FanoutArgs {
    /// Subscribing connections.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub connections: usize,
    /// Channels; connection i subscribes to channel i mod K.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub channels: usize,
    /// Events per second, all publishers together.
    #[arg(short = 'r', long, default_value_t = 10.0)]
    pub rate: f64,
    /// Publishing time, seconds.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,
    /// Channels each event is published to (rotating over the K channels).
    #[arg(long, default_value_t = 1)]
    pub channels_per_event: usize,
    /// Publisher threads (one connection each), sharing the rate.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscribe to private- channels (signed auth).
    #[arg(long)]
    pub private: bool,
    /// Channel names are <prefix><i>.
    #[arg(long, default_value = "sports.football.leagues.l")]
    pub channel_prefix: String,
    /// After publishing, wait at most this long for outstanding deliveries, ms.
    #[arg(long, default_value_t = 5000)]
    pub drain_ms: u64,
    /// Pause between the last subscription and the first publish, ms.
    #[arg(long, default_value_t = 500)]
    pub settle_ms: u64,
}

/// A generous guess of how long the run takes, seconds.
pub fn estimate_secs(c: &Common, a: &FanoutArgs) -> f64 {
    c.connect_secs(a.connections)
        + a.duration
        + a.drain_ms as f64 / 1000.0
        + a.settle_ms as f64 / 1000.0
}

/// Runs the scenario.
pub fn run(env: &Env, a: &FanoutArgs) -> Result<Report> {
    if a.connections == 0 || a.channels == 0 || a.rate <= 0.0 || a.duration <= 0.0 {
        return Err("fanout needs --connections, --channels, --rate and --duration above 0".into());
    }
    env.check_fds(a.connections)?;
    let channels = channel_names(&a.channel_prefix, a.channels, a.private);
    preflight(env, true)?;
    let mut sinks = open_sinks(env, a.publishers)?;
    let s0 = env.server();
    let setup = setup_for(env, channels, None);
    let channels = setup.channels.clone();
    let (workers, con) = open_subscribed(env, &setup, a.connections, a.channels)?;
    let s1 = env.server();
    std::thread::sleep(Duration::from_millis(a.settle_ms));
    // Zeroes the wire-byte counters: what the subscribers read from here on is deliveries.
    let connect_phase = workers.snapshot(0, std::sync::Arc::new(Vec::new()));
    let (s2, g2) = (env.server(), self_cpu());
    let total = (a.rate * a.duration).round().max(1.0) as u64;
    eprintln!(
        "bts-guru-bench: {} subscribers ready; publishing {total} events at {}/s",
        con.ready, a.rate
    );
    let published = publish_phase(
        env,
        &mut sinks,
        &channels,
        0,
        a.rate,
        total,
        a.channels_per_event,
    );
    let mut subs = vec![0u64; a.channels];
    for i in 0..a.connections {
        subs[i % a.channels] += 1;
    }
    let expected_deliveries: u64 = published
        .per_channel
        .iter()
        .zip(&subs)
        .map(|(e, s)| e * s)
        .sum();
    let drained = drain(
        &setup.shared,
        expected_deliveries,
        Duration::from_millis(a.drain_ms),
    );
    let (s3, g3) = (env.server(), self_cpu());
    let ps = workers.snapshot(0, published.expected.clone());
    let res = workers.stop();
    let s4 = env.server();

    let mut r = env.report("fanout");
    r.set("deflate", json!(env.c.deflate));
    r.set("connect_wire_bytes", json!(connect_phase.wire_bytes));
    r.set(
        "params",
        json!({
            "connections": a.connections, "channels": a.channels, "rate": a.rate,
            "duration_s": a.duration, "channels_per_event": a.channels_per_event,
            "publishers": a.publishers, "private": a.private, "threads": env.threads,
            "source_addrs": env.sources.len(), "event": env.c.event,
        }),
    );
    r.row(
        "params",
        format!(
            "{} connections over {} channels, {}/s for {} s, {} channel(s)/event, {} publisher(s)",
            thousands(a.connections as u64),
            a.channels,
            a.rate,
            a.duration,
            a.channels_per_event,
            a.publishers
        ),
    );
    connect_rows(
        &mut r,
        a.connections,
        &con,
        &res,
        "connect → subscription_succeeded",
    );
    publish_rows(&mut r, &published);
    let window = published.elapsed + drained;
    delivery_rows(&mut r, &ps, expected_deliveries, published.elapsed, drained);
    let cpu_pub = cpu_delta(s2, s3);
    server_rows(
        &mut r,
        env,
        &[s0, s1, s3, s4],
        cpu_delta(s0, s1),
        cpu_pub,
        window,
        ps.received,
        a.connections as u64,
    );
    gen_rows(&mut r, cpu_delta(g2, g3), window);
    r.set("other", worker_json(&res));
    errors_into(&mut r, &res, &published.errors());
    checks(&mut r, &ps, &published, &res);
    r.plots.push((
        format!("{} subs × {}/s", thousands(a.connections as u64), a.rate),
        ps.latency.clone(),
    ));
    Ok(r)
}
