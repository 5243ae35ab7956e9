//! Metrics as plain counters: the thread-local write counters the write path bumps, the
//! latency histogram's shape, and one shard's [`Snapshot`] at scrape time. Counters live on
//! each shard as plain `Cell`s (or thread-locals here), with no atomics or locks on the
//! per-event path. Serving them is `exporter`'s.

use std::cell::Cell;
use std::collections::BTreeMap;

use hdrhistogram::Histogram;

thread_local! {
    /// Frames, bytes and socket writes done by this thread (one shard per thread).
    static WRITTEN: Cell<(u64, u64, u64)> = const { Cell::new((0, 0, 0)) };
    /// Connections this thread closed with 4100 because their queue would pass its bound.
    static SLOW_CONSUMERS: Cell<u64> = const { Cell::new(0) };
    /// Queued frames this thread dropped because a newer frame superseded them (conflation).
    static CONFLATED: Cell<u64> = const { Cell::new(0) };
    /// Broadcasts this thread queued as delta frames (shared-context compression).
    static DELTAS: Cell<u64> = const { Cell::new(0) };
}

/// Counts one broadcast queued as a delta frame (shard thread only).
pub fn count_delta() {
    DELTAS.with(|c| c.set(c.get() + 1));
}

/// Delta frames queued by this thread.
pub fn deltas() -> u64 {
    DELTAS.with(Cell::get)
}

/// Counts `n` queued frames dropped by conflation (shard thread only).
pub fn count_conflated(n: u64) {
    CONFLATED.with(|c| c.set(c.get() + n));
}

/// Frames conflated by this thread.
pub fn conflated() -> u64 {
    CONFLATED.with(Cell::get)
}

/// Counts one connection closed as a slow consumer (shard thread only; whatever frame, a
/// broadcast or a reply, would have taken its queue over the bound).
pub fn count_slow_consumer() {
    SLOW_CONSUMERS.with(|c| c.set(c.get() + 1));
}

/// Slow-consumer closes made by this thread.
pub fn slow_consumers() -> u64 {
    SLOW_CONSUMERS.with(Cell::get)
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
    /// Queued frames dropped by conflation (superseded by a newer frame of the same event).
    pub frames_conflated: u64,
    /// Broadcasts queued as delta frames (compressed against the channel's previous message).
    pub frames_delta: u64,
    pub inbox_overflows: u64,
    /// (channel kind, channels, subscriptions) on this shard.
    pub channels: Vec<(&'static str, u64, u64)>,
    /// HTTP API requests by (endpoint, status).
    pub http: BTreeMap<(&'static str, u16), u64>,
    /// Subscribes refused by reason (`rate_limit`, `shard_channels`, `app_channels`).
    pub subscribes_refused: BTreeMap<&'static str, u64>,
    /// Events replayed to resuming clients, and resumes answered recovered / not recovered.
    pub replayed: u64,
    pub recovered: u64,
    pub not_recovered: u64,
    /// Event received (HTTP, Redis, client, other node) to its frames written, microseconds.
    pub latency: Histogram<u64>,
}
