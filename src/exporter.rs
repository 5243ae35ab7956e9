//! The Prometheus exporter: `/metrics` on its own listener (default 127.0.0.1:9601), served by
//! std threads so scraping never touches a shard's socket loop. A scrape asks every shard for
//! its [`Snapshot`] through its inbox (`gather`) and renders the sum with the node's own
//! counters (`render`).
//!
//! The listener is a bounded, hostile-tolerant HTTP/1.1 responder: SO_REUSEPORT (a new process
//! binds beside a draining one, as the WebSocket port does), closed when a drain starts, one
//! thread per connection up to [`MAX_CONNECTIONS`], a request head of at most [`MAX_HEAD`] bytes
//! (431 beyond) that must arrive within [`HEAD_TIMEOUT`] (408 after), and, when every slot is
//! taken, the connection that has waited longest for its head is dropped to make room: a
//! scraper that trickles bytes can delay nobody.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fanout::router::ShardCmd;
use crate::metrics::{new_histogram, Snapshot};
use crate::node::Shared;

/// Largest request head (request line and headers) the metrics listener reads; 431 beyond.
pub const MAX_HEAD: usize = 8 << 10;
/// Time a connection has to send its whole request head; 408 after.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed to write the answer to a scraper that does not read it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once (one thread each). When all are taken, the oldest one still
/// sending its head is closed for the new one; when all are past their head, the new one gets
/// 503.
pub const MAX_CONNECTIONS: usize = 16;
/// Listen backlog of the metrics socket (scrapers are few).
const BACKLOG: i32 = 128;
/// Stack of a connection thread: rendering needs little, and sixteen of them stay small.
const STACK: usize = 256 << 10;

/// Connections in flight: how many threads, and which connections are still sending their head
/// (oldest first), with a handle to cut each one off.
#[derive(Default)]
struct Slots {
    threads: usize,
    next_id: u64,
    reading: VecDeque<(u64, TcpStream)>,
}

/// Starts the metrics listener (bound here, so a port in use fails start-up). Like the
/// WebSocket port it is bound with SO_REUSEPORT, so a new process can start beside one that is
/// draining; `shared.metrics_listener` closes it.
pub fn serve(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let sk = crate::sys::reuseport_listener(addr, BACKLOG)?;
    let local = sk
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("metrics listener has no IP address"))?;
    shared.metrics_listener.hold(sk.try_clone()?);
    let listener: TcpListener = sk.into();
    std::thread::Builder::new()
        .name("bts-metrics".into())
        .spawn(move || accept_loop(&listener, &shared))?;
    Ok(local)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    loop {
        let accepted = listener.accept();
        if shared.metrics_listener.is_closed() {
            tracing::debug!("metrics listener closed");
            return;
        }
        match accepted {
            Ok((stream, _)) => admit(stream, shared, &slots),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Gives `stream` a thread of its own, making room by cutting off the connection that has
/// waited longest for its head when every slot is taken.
fn admit(stream: TcpStream, shared: &Arc<Shared>, slots: &Arc<Mutex<Slots>>) {
    let lock = || slots.lock().unwrap_or_else(|e| e.into_inner());
    let Ok(handle) = stream.try_clone() else {
        return;
    };
    let id = {
        let mut s = lock();
        if s.threads >= MAX_CONNECTIONS {
            match s.reading.pop_front() {
                // Its thread sees the shutdown at its next read and ends.
                Some((_, oldest)) => {
                    let _ = oldest.shutdown(Shutdown::Both);
                }
                None => {
                    drop(s);
                    busy(&stream);
                    return;
                }
            }
        }
        // Cut-off threads take a moment to end: never more than twice the cap in all.
        if s.threads >= 2 * MAX_CONNECTIONS {
            drop(s);
            busy(&stream);
            return;
        }
        s.threads += 1;
        s.next_id += 1;
        let id = s.next_id;
        s.reading.push_back((id, handle));
        id
    };
    let shared = Arc::clone(shared);
    let slots2 = Arc::clone(slots);
    let spawned = std::thread::Builder::new()
        .name("bts-metrics-conn".into())
        .stack_size(STACK)
        .spawn(move || {
            respond(&stream, &shared, &|| take_slot(&slots2, id));
            let mut s = slots2.lock().unwrap_or_else(|e| e.into_inner());
            s.threads -= 1;
            s.reading.retain(|(i, _)| *i != id);
        });
    if spawned.is_err() {
        let mut s = lock();
        s.threads -= 1;
        s.reading.retain(|(i, _)| *i != id);
    }
}

/// The head is in: this connection may no longer be cut off. `false` if it already was.
fn take_slot(slots: &Mutex<Slots>, id: u64) -> bool {
    let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
    let before = s.reading.len();
    s.reading.retain(|(i, _)| *i != id);
    s.reading.len() < before
}

/// 503 without reading anything (every slot busy rendering).
fn busy(stream: &TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    reply(
        stream,
        "503 Service Unavailable",
        "text/plain",
        "busy: too many scrapes at once\n",
    );
}

/// Why a request head was not read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// Over [`MAX_HEAD`] bytes without its end.
    TooLarge,
    /// Not complete within [`HEAD_TIMEOUT`].
    Timeout,
    /// The peer closed, reset, or was cut off.
    Gone,
}

/// Reads one request head (up to its blank line) into `buf`, within `deadline` and
/// [`MAX_HEAD`] bytes; returns its length.
fn read_head(
    stream: &mut impl Read,
    buf: &mut Vec<u8>,
    deadline: Instant,
    set_timeout: &dyn Fn(Duration),
) -> Result<usize, HeadError> {
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::Timeout);
        }
        set_timeout(left);
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        let n = match stream.read(&mut chunk[..room]) {
            Ok(0) => return Err(HeadError::Gone),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HeadError::Timeout)
            }
            Err(_) => return Err(HeadError::Gone),
        };
        // Look for the blank line from just before the new bytes (it may straddle reads).
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[from..]) {
            return Ok(from + end);
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Length of the head up to and including its blank line (RFC 9112 §2.2 lets a server accept a
/// bare LF as a line terminator).
fn head_end(b: &[u8]) -> Option<usize> {
    (0..b.len()).find_map(|i| {
        if b[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if b[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else if b[i..].starts_with(b"\n\r\n") {
            Some(i + 3)
        } else {
            None
        }
    })
}

/// Serves one connection: one request, one answer, then close. `head_done` is called once the
/// head is in; `false` means the connection was cut off meanwhile.
fn respond(stream: &TcpStream, shared: &Shared, head_done: &dyn Fn() -> bool) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut buf = Vec::with_capacity(MAX_HEAD);
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let set_timeout = |d: Duration| {
        let _ = stream.set_read_timeout(Some(d));
    };
    let mut reader = stream;
    let head = read_head(&mut reader, &mut buf, deadline, &set_timeout);
    if !head_done() {
        return;
    }
    let len = match head {
        Ok(len) => len,
        Err(HeadError::TooLarge) => {
            reply(
                stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head over 8 KiB\n",
            );
            return;
        }
        Err(HeadError::Timeout) => {
            reply(
                stream,
                "408 Request Timeout",
                "text/plain",
                "request head not received in time\n",
            );
            return;
        }
        Err(HeadError::Gone) => return,
    };
    let line = buf[..len].split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if method == b"GET" && path == b"/metrics" {
        let body = render(shared, &gather(shared));
        reply(stream, "200 OK", "text/plain; version=0.0.4", &body);
    } else {
        reply(
            stream,
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n",
        );
    }
}

fn reply(mut stream: &TcpStream, status: &str, ctype: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.shutdown(Shutdown::Write);
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
/// Prometheus text exposition format 0.0.4: every shard's snapshot summed, with the node's own
/// counters (ingest, cluster, webhooks, admission).
pub fn render(shared: &Shared, snaps: &[Snapshot]) -> String {
    let mut o = String::with_capacity(4096);
    render_connections(&mut o, shared, snaps);
    render_traffic(&mut o, shared, snaps);
    render_drops(&mut o, shared, snaps);
    shared.admission.render(&mut o);
    render_ingest(&mut o, shared);
    render_requests(&mut o, snaps);
    render_resume(&mut o, shared, snaps);
    o
}

/// Positioned channels: history memory against its bound, replays and their outcomes.
fn render_resume(o: &mut String, shared: &Shared, snaps: &[Snapshot]) {
    let (memory, channels, dropped, events) = shared.resume.stats();
    let bound = shared.resume.bounds().memory;
    for (name, kind, help, value) in [
        (
            "bts_resume_history_bytes",
            "gauge",
            "Memory held by positioned channels' history (frames and overheads).",
            memory as u64,
        ),
        (
            "bts_resume_history_bytes_limit",
            "gauge",
            "The node's bound on that memory (resume_memory_bytes).",
            bound as u64,
        ),
        (
            "bts_resume_channels",
            "gauge",
            "Positioned channels with a history on this node.",
            channels as u64,
        ),
        (
            "bts_resume_channels_dropped_total",
            "counter",
            "Channel histories dropped by the memory bound (their clients get recovered: false).",
            dropped,
        ),
        (
            "bts_resume_events_total",
            "counter",
            "Events given a position.",
            events,
        ),
        (
            "bts_resume_replayed_events_total",
            "counter",
            "Events replayed to resuming clients.",
            snaps.iter().map(|s| s.replayed).sum(),
        ),
    ] {
        family(o, name, kind, help);
        let _ = writeln!(o, "{name} {value}");
    }
    family(
        o,
        "bts_resumes_total",
        "counter",
        "Resumes by outcome: recovered (the gap replayed) or not (recovered: false).",
    );
    let _ = writeln!(
        o,
        "bts_resumes_total{{outcome=\"recovered\"}} {}\nbts_resumes_total{{outcome=\"not_recovered\"}} {}",
        snaps.iter().map(|s| s.recovered).sum::<u64>(),
        snaps.iter().map(|s| s.not_recovered).sum::<u64>()
    );
}

/// `# HELP` and `# TYPE` of one metric family.
fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Connections, channels and subscriptions.
fn render_connections(o: &mut String, shared: &Shared, snaps: &[Snapshot]) {
    family(o, "bts_connections", "gauge", "Open WebSocket connections.");
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
        o,
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
        o,
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
        o,
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
        o,
        "bts_subscriptions",
        "gauge",
        "Subscriptions, by channel type.",
    );
    for (kind, (_, subs)) in &chans {
        let _ = writeln!(o, "bts_subscriptions{{type=\"{kind}\"}} {subs}");
    }
}

/// Events in by source, frames and bytes out, slow consumers.
fn render_traffic(o: &mut String, shared: &Shared, snaps: &[Snapshot]) {
    family(
        o,
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
            c.messages.load(Relaxed)
        );
    }
    family(
        o,
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
        o,
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
        o,
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
        o,
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
        o,
        "bts_frames_conflated_total",
        "counter",
        "Queued frames of a conflated event dropped because a newer one of the same channel was queued for the same slow connection.",
    );
    let _ = writeln!(
        o,
        "bts_frames_conflated_total {}",
        snaps.iter().map(|s| s.frames_conflated).sum::<u64>()
    );
    family(
        o,
        "bts_frames_delta_total",
        "counter",
        "Broadcasts queued as delta frames: compressed against the previous compressed message of their channel, which the connection's client holds in its window (shared-context compression).",
    );
    let _ = writeln!(
        o,
        "bts_frames_delta_total {}",
        snaps.iter().map(|s| s.frames_delta).sum::<u64>()
    );
}

/// What was dropped or refused: queue overflows, webhook events, subscribes; webhook outcomes.
fn render_drops(o: &mut String, shared: &Shared, snaps: &[Snapshot]) {
    family(
        o,
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
            c.outbox.dropped.load(Relaxed)
        );
    }
    let hooks = &shared.webhooks;
    let _ = writeln!(
        o,
        "bts_queue_overflows_total{{queue=\"webhooks\"}} {}",
        hooks.dropped.load(Relaxed)
    );
    family(
        o,
        "bts_webhook_events_dropped_total",
        "counter",
        "Webhook events dropped (queue, hold-back or retry budget full, or retries exhausted), \
         by event type. Occupancy events (channel_occupied, channel_vacated, subscription_count) \
         have their own queue, so their drops never cost a member or client event.",
    );
    for (name, n) in crate::config::WEBHOOK_EVENTS
        .iter()
        .zip(&hooks.dropped_by_type)
    {
        let _ = writeln!(
            o,
            "bts_webhook_events_dropped_total{{event=\"{name}\"}} {}",
            n.load(Relaxed)
        );
    }
    family(
        o,
        "bts_subscribes_refused_total",
        "counter",
        "Subscribes refused, by reason: rate_limit (4301, the app's subscription_changes_*), \
         shard_channels (server.max_channels_per_shard), app_channels (the app's max_channels).",
    );
    let mut refused: BTreeMap<&str, u64> = BTreeMap::new();
    for s in snaps {
        for (reason, n) in &s.subscribes_refused {
            *refused.entry(reason).or_default() += n;
        }
    }
    for (reason, n) in refused {
        let _ = writeln!(o, "bts_subscribes_refused_total{{reason=\"{reason}\"}} {n}");
    }
    family(
        o,
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
}

/// The Redis ingest, when it is on.
fn render_ingest(o: &mut String, shared: &Shared) {
    if shared.ingest.enabled.load(Relaxed) {
        family(
            o,
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
            o,
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
            o,
            "bts_redis_malformed_total",
            "counter",
            "Redis messages that were not Laravel broadcasts.",
        );
        let _ = writeln!(
            o,
            "bts_redis_malformed_total {}",
            shared.ingest.malformed.load(Relaxed)
        );
        family(
            o,
            "bts_redis_down_seconds",
            "gauge",
            "How long Redis has been unreachable (0 while subscribed).",
        );
        let down = shared
            .ingest
            .down_for()
            .map_or(0.0, |(d, _)| d.as_secs_f64());
        let _ = writeln!(o, "bts_redis_down_seconds {down:.3}");
    }
    if let Some(c) = &shared.cluster {
        render_outbox(o, c);
    }
}

/// The cluster outbox: how full, and what the exactness machinery did.
fn render_outbox(o: &mut String, c: &crate::cluster::Cluster) {
    let (bytes, events) = c.outbox.fill();
    let limits = c.outbox.limits();
    let gauges: [(&str, &str, f64); 5] = [
        (
            "bts_cluster_outbox_bytes",
            "Bytes of accepted events held until every live node has them.",
            bytes as f64,
        ),
        (
            "bts_cluster_outbox_events",
            "Accepted events held until every live node has them.",
            events as f64,
        ),
        (
            "bts_cluster_outbox_max_bytes",
            "The outbox's byte bound (BTS_CLUSTER_OUTBOX_BYTES).",
            limits.max_bytes as f64,
        ),
        (
            "bts_cluster_outbox_oldest_seconds",
            "Age of the oldest held event (publishes are refused past \
             BTS_CLUSTER_OUTBOX_MAX_AGE_SECS).",
            c.outbox.oldest_age().map_or(0.0, |d| d.as_secs_f64()),
        ),
        (
            "bts_cluster_publisher_connected",
            "1 while the cluster publisher holds a connection to Redis.",
            f64::from(u8::from(c.outbox.connected.load(Relaxed))),
        ),
    ];
    for (name, help, v) in gauges {
        family(o, name, "gauge", help);
        let _ = writeln!(o, "{name} {v}");
    }
    let counters: [(&str, &str, u64); 8] = [
        (
            "bts_cluster_appends_total",
            "Positioned channels' events this node appended to Redis (and Redis announced).",
            c.outbox.appended.load(Relaxed),
        ),
        (
            "bts_cluster_appends_deduped_total",
            "Appends Redis had already run (another node's offer of a Laravel event, or a try \
             again after a lost answer): not appended twice.",
            c.outbox.appends_deduped.load(Relaxed),
        ),
        (
            "bts_cluster_append_retries_total",
            "Round trips of appends to Redis that failed (Redis away, a failover); the appends \
             were held and tried again.",
            c.outbox.append_retries.load(Relaxed),
        ),
        (
            "bts_cluster_refused_total",
            "Publishes refused (503) because the outbox was past its bounds.",
            c.outbox.refused.load(Relaxed),
        ),
        (
            "bts_cluster_resent_total",
            "Events sent to the cluster again (after a reconnect, a nack or stalled acks).",
            c.outbox.resent.load(Relaxed),
        ),
        (
            "bts_cluster_duplicates_total",
            "Events received again from another node and dropped.",
            c.duplicates.load(Relaxed),
        ),
        (
            "bts_cluster_gaps_total",
            "Events received after a gap, dropped until the origin resends.",
            c.gaps.load(Relaxed),
        ),
        (
            "bts_cluster_lost_total",
            "Events another node gave up on before this node had them (it was dropped as \
             silent).",
            c.lost.load(Relaxed),
        ),
    ];
    for (name, help, v) in counters {
        family(o, name, "counter", help);
        let _ = writeln!(o, "{name} {v}");
    }
}

/// HTTP API requests and the delivery-latency histogram.
fn render_requests(o: &mut String, snaps: &[Snapshot]) {
    family(
        o,
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
    family(o, "bts_delivery_latency_seconds", "histogram", "From an event's arrival (HTTP, Redis, client, other node) to its frames written on this node.");
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
}
