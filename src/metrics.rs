//! Prometheus metrics. Counters live on each shard as plain `Cell`s (or thread-locals for the
//! write path), with no atomics or locks on the per-event path; a scrape asks every shard for a
//! snapshot through its inbox and renders the sum. Served on its own listener (default
//! 127.0.0.1:9601) by a std thread, so scraping never touches a shard's socket loop.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::fanout::router::ShardCmd;
use crate::shard::Shared;

thread_local! {
    /// Frames, bytes and socket writes done by this thread (one shard per thread).
    static WRITTEN: Cell<(u64, u64, u64)> = const { Cell::new((0, 0, 0)) };
}

/// Counts one socket write (a `sendmsg` or a send-ring entry) that completed `frames` frames
/// and `bytes` bytes (shard thread only).
pub fn count_written(frames: u64, bytes: u64) {
    WRITTEN.with(|w| {
        let (f, b, n) = w.get();
        w.set((f + frames, b + bytes, n + 1));
    });
}

/// (frames, bytes, writes) written by this thread.
pub fn written() -> (u64, u64, u64) {
    WRITTEN.with(Cell::get)
}

/// Latency histogram in microseconds, up to one minute.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// One shard's numbers at scrape time.
#[derive(Debug)]
pub struct Snapshot {
    pub shard: usize,
    /// Open connections per app index.
    pub connections: Vec<u64>,
    pub connects: u64,
    /// Connections ended, by close code (1006 when the peer vanished without one).
    pub closes: BTreeMap<u16, u64>,
    pub events_http: u64,
    pub events_client: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    /// Socket writes that carried them; `frames_out / writes_out` is how well frames coalesce.
    pub writes_out: u64,
    pub slow_consumer_closes: u64,
    pub inbox_overflows: u64,
    /// (channel kind, channels, subscriptions) on this shard.
    pub channels: Vec<(&'static str, u64, u64)>,
    /// HTTP API requests by (endpoint, status).
    pub http: BTreeMap<(&'static str, u16), u64>,
    /// Event received (HTTP, Redis, client, other node) to its frames written, microseconds.
    pub latency: Histogram<u64>,
}

/// Starts the metrics listener (bound here, so a port in use fails start-up).
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("bts-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // Skip the headers.
                let mut h = String::new();
                while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                    h.clear();
                }
                let (status, ctype, body) = if line.starts_with("GET /metrics ") {
                    ("200 OK", "text/plain; version=0.0.4", render(&shared, &gather(&shared)))
                } else {
                    ("404 Not Found", "text/plain", "not found: try /metrics\n".to_owned())
                };
                let mut w = &stream;
                let _ = write!(
                    w,
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(local)
}

/// Asks every shard for its snapshot (a shard that does not answer in 2 s is left out).
pub fn gather(shared: &Shared) -> Vec<Snapshot> {
    let (tx, rx) = std::sync::mpsc::sync_channel(shared.router.shards());
    let mut asked = 0;
    for shard in 0..shared.router.shards() {
        if shared
            .router
            .try_push(shard, ShardCmd::Scrape(tx.clone()))
            .is_ok()
        {
            asked += 1;
        }
    }
    drop(tx);
    let mut out = Vec::with_capacity(asked);
    for _ in 0..asked {
        match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(s) => out.push(s),
            Err(_) => break,
        }
    }
    out.sort_by_key(|s| s.shard);
    out
}

/// Prometheus text exposition format 0.0.4.
pub fn render(shared: &Shared, snaps: &[Snapshot]) -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let mut o = String::with_capacity(4096);
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "bts_connections",
        "gauge",
        "Open WebSocket connections.",
    );
    for s in snaps {
        for (app, n) in s.connections.iter().enumerate() {
            let _ = writeln!(
                o,
                "bts_connections{{shard=\"{}\",app=\"{}\"}} {n}",
                s.shard,
                shared.router.app_id(app)
            );
        }
    }
    family(
        &mut o,
        "bts_connects_total",
        "counter",
        "WebSocket connections accepted.",
    );
    let _ = writeln!(
        o,
        "bts_connects_total {}",
        snaps.iter().map(|s| s.connects).sum::<u64>()
    );
    family(
        &mut o,
        "bts_disconnects_total",
        "counter",
        "Connections ended, by close code (1006: no close frame).",
    );
    let mut closes: BTreeMap<u16, u64> = BTreeMap::new();
    for s in snaps {
        for (code, n) in &s.closes {
            *closes.entry(*code).or_default() += n;
        }
    }
    for (code, n) in closes {
        let _ = writeln!(o, "bts_disconnects_total{{code=\"{code}\"}} {n}");
    }
    family(
        &mut o,
        "bts_channels",
        "gauge",
        "Channels with subscribers, by type (summed over shards).",
    );
    let mut chans: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for s in snaps {
        for (kind, c, subs) in &s.channels {
            let e = chans.entry(kind).or_default();
            e.0 += c;
            e.1 += subs;
        }
    }
    for (kind, (c, _)) in &chans {
        let _ = writeln!(o, "bts_channels{{type=\"{kind}\"}} {c}");
    }
    family(
        &mut o,
        "bts_subscriptions",
        "gauge",
        "Subscriptions, by channel type.",
    );
    for (kind, (_, subs)) in &chans {
        let _ = writeln!(o, "bts_subscriptions{{type=\"{kind}\"}} {subs}");
    }
    family(
        &mut o,
        "bts_events_in_total",
        "counter",
        "Events received, by source.",
    );
    let http: u64 = snaps.iter().map(|s| s.events_http).sum();
    let client: u64 = snaps.iter().map(|s| s.events_client).sum();
    let _ = writeln!(o, "bts_events_in_total{{source=\"http\"}} {http}");
    let _ = writeln!(o, "bts_events_in_total{{source=\"client\"}} {client}");
    let _ = writeln!(
        o,
        "bts_events_in_total{{source=\"redis\"}} {}",
        shared.ingest.events.load(Relaxed)
    );
    if let Some(c) = &shared.cluster {
        let _ = writeln!(
            o,
            "bts_events_in_total{{source=\"cluster\"}} {}",
            c.received.load(Relaxed)
        );
    }
    family(
        &mut o,
        "bts_frames_out_total",
        "counter",
        "WebSocket frames written to sockets.",
    );
    let _ = writeln!(
        o,
        "bts_frames_out_total {}",
        snaps.iter().map(|s| s.frames_out).sum::<u64>()
    );
    family(
        &mut o,
        "bts_socket_writes_total",
        "counter",
        "Socket writes (sendmsg calls and send-ring entries) that carried the frames; \
         bts_frames_out_total / bts_socket_writes_total is the frames per write.",
    );
    let _ = writeln!(
        o,
        "bts_socket_writes_total {}",
        snaps.iter().map(|s| s.writes_out).sum::<u64>()
    );
    family(
        &mut o,
        "bts_bytes_out_total",
        "counter",
        "Bytes written to sockets.",
    );
    let _ = writeln!(
        o,
        "bts_bytes_out_total {}",
        snaps.iter().map(|s| s.bytes_out).sum::<u64>()
    );
    family(
        &mut o,
        "bts_slow_consumer_closes_total",
        "counter",
        "Connections closed with 4100 for falling behind.",
    );
    let _ = writeln!(
        o,
        "bts_slow_consumer_closes_total {}",
        snaps.iter().map(|s| s.slow_consumer_closes).sum::<u64>()
    );
    family(
        &mut o,
        "bts_queue_overflows_total",
        "counter",
        "Commands dropped because a queue was full, by queue.",
    );
    for s in snaps {
        let _ = writeln!(
            o,
            "bts_queue_overflows_total{{queue=\"shard{}\"}} {}",
            s.shard, s.inbox_overflows
        );
    }
    let _ = writeln!(
        o,
        "bts_queue_overflows_total{{queue=\"redis_ingest\"}} {}",
        shared.ingest.dropped.load(Relaxed)
    );
    if let Some(c) = &shared.cluster {
        let _ = writeln!(
            o,
            "bts_queue_overflows_total{{queue=\"cluster_out\"}} {}",
            c.dropped.load(Relaxed)
        );
    }
    let hooks = &shared.webhooks;
    let _ = writeln!(
        o,
        "bts_queue_overflows_total{{queue=\"webhooks\"}} {}",
        hooks.dropped.load(Relaxed)
    );
    family(
        &mut o,
        "bts_webhooks_total",
        "counter",
        "Webhook requests, by outcome.",
    );
    let _ = writeln!(
        o,
        "bts_webhooks_total{{outcome=\"sent\"}} {}",
        hooks.sent.load(Relaxed)
    );
    let _ = writeln!(
        o,
        "bts_webhooks_total{{outcome=\"failed\"}} {}",
        hooks.failed.load(Relaxed)
    );
    shared.admission.render(&mut o);
    if shared.ingest.enabled.load(Relaxed) {
        family(
            &mut o,
            "bts_redis_connected",
            "gauge",
            "1 while the Redis ingest is subscribed.",
        );
        let _ = writeln!(
            o,
            "bts_redis_connected {}",
            u8::from(shared.ingest.connected.load(Relaxed))
        );
        family(
            &mut o,
            "bts_redis_reconnects_total",
            "counter",
            "Redis ingest resubscriptions after a drop.",
        );
        let _ = writeln!(
            o,
            "bts_redis_reconnects_total {}",
            shared.ingest.reconnects.load(Relaxed)
        );
        family(
            &mut o,
            "bts_redis_malformed_total",
            "counter",
            "Redis messages that were not Laravel broadcasts.",
        );
        let _ = writeln!(
            o,
            "bts_redis_malformed_total {}",
            shared.ingest.malformed.load(Relaxed)
        );
    }
    family(
        &mut o,
        "bts_http_requests_total",
        "counter",
        "HTTP API requests, by endpoint and status.",
    );
    let mut http_reqs: BTreeMap<(&str, u16), u64> = BTreeMap::new();
    for s in snaps {
        for (k, n) in &s.http {
            *http_reqs.entry(*k).or_default() += n;
        }
    }
    for ((endpoint, status), n) in http_reqs {
        let _ = writeln!(
            o,
            "bts_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
        );
    }
    family(&mut o, "bts_delivery_latency_seconds", "histogram", "From an event's arrival (HTTP, Redis, client, other node) to its frames written on this node.");
    let mut all = new_histogram();
    for s in snaps {
        let _ = all.add(&s.latency);
    }
    for le_us in [
        100u64, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    ] {
        let n = all.count_between(0, le_us);
        let _ = writeln!(
            o,
            "bts_delivery_latency_seconds_bucket{{le=\"{}\"}} {n}",
            le_us as f64 / 1e6
        );
    }
    let _ = writeln!(
        o,
        "bts_delivery_latency_seconds_bucket{{le=\"+Inf\"}} {}",
        all.len()
    );
    let sum_us: f64 = all
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum();
    let _ = writeln!(o, "bts_delivery_latency_seconds_sum {}", sum_us / 1e6);
    let _ = writeln!(o, "bts_delivery_latency_seconds_count {}", all.len());
    o
}
