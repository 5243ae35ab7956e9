//! The event's last steps on a shard: its inbox drained a batch at a time, each broadcast queued
//! on every local subscriber (`fanout`: no await, no write), then each touched connection
//! written once (`flush_dirty`), through the send ring when there is one. Write coalescing
//! defers a connection written less than a window ago to the pacer, which writes it when its
//! window ends with everything queued meanwhile.
//!
//! Nothing here allocates, locks or touches an atomic per subscriber.

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::conn::{self, Conn};
use super::outqueue::Frame;
use super::Shard;
use crate::fanout::router::Broadcast;

/// Most commands taken from the inbox before the queued frames are flushed and other tasks get
/// a turn.
const DRAIN_BATCH: usize = 1024;

impl Shard {
    /// Fan-out without I/O, for the criterion bench: queues `b` on every local subscriber, then
    /// empties the queues again (nothing is written). Not used by the server.
    #[doc(hidden)]
    pub fn bench_fanout(&self, b: Broadcast) {
        self.fanout(b);
        for conn in self.dirty.borrow_mut().drain(..) {
            conn.in_dirty.set(false);
            conn.bench_clear();
        }
        self.stats.burst.borrow_mut().clear();
    }

    /// Queues `b`'s frame to every local subscriber of its channel. Synchronous: it never awaits,
    /// so no `RefCell` borrow lives across a yield. Writes happen in `flush_dirty`, after the
    /// whole burst is queued, so several events leave in one `sendmsg`.
    pub(super) fn fanout(&self, b: Broadcast) {
        let index = self.index.borrow();
        let subscribers = index.subscribers(b.app, &b.channel);
        if subscribers.is_empty() && !b.cache {
            return;
        }
        // One non-atomic Rc per shard per event: the per-subscriber clones below never touch
        // the cross-core refcount inside `Bytes`.
        let conflate = if b.conflate {
            // The bytes that name the event and its channel (the event was checked against the
            // app's list when it was delivered).
            let plain = b.frame.plain_bytes();
            let at = plain.len() - crate::ws::codec::payload_of(plain).len();
            crate::fanout::frame::conflation_key_len(&plain[at..]).map(|n| at..at + n)
        } else {
            None
        };
        let frame = Rc::new(Frame {
            framed: b.frame,
            conflate,
        });
        if b.cache {
            let ttl = self.app(b.app).cache_ttl;
            self.cache
                .borrow_mut()
                .put(b.app, &b.channel, Rc::clone(&frame), Instant::now(), ttl);
        }
        if subscribers.is_empty() {
            return;
        }
        let conflate_over = self.shared.cfg.conflation_threshold;
        let full = self.coalesce_full();
        let conns = self.conns.borrow();
        let mut dirty = self.dirty.borrow_mut();
        let mut queued = 0;
        for &id in subscribers {
            let Some(conn) = conns.get(id) else { continue };
            if Some(conn.socket_id) == b.except {
                continue;
            }
            let crossed = match conn.enqueue_shared(&frame, conflate_over) {
                conn::Enqueued::Yes(bytes) => {
                    queued += 1;
                    let len = frame.for_conn(conn.deflates()).len();
                    bytes >= full && bytes.saturating_sub(len) < full
                }
                // Closing with 4100 (counted by the connection): its close frame is written
                // with this burst.
                conn::Enqueued::Overflow => false,
                conn::Enqueued::Closed => continue,
            };
            // A deferred connection whose queue just filled up is written with this burst
            // instead of at its window's end (`flush_dirty` skips it if it is listed twice).
            if !conn.in_dirty.replace(true) || (crossed && conn.in_deferred.get()) {
                dirty.push(Rc::clone(conn));
            }
        }
        self.stats
            .events_fanned_out
            .set(self.stats.events_fanned_out.get() + 1);
        if queued > 0 {
            self.stats.burst.borrow_mut().push(b.created);
        }
        self.stats
            .frames_queued
            .set(self.stats.frames_queued.get() + queued);
    }

    /// Milliseconds since the shard started, offset so that a new connection's `last_write` of 0
    /// is always older than any coalescing window (wraps after 49 days; a wrap can at worst hold
    /// one write back for one window).
    pub(super) fn now_ms(&self) -> u32 {
        (self.epoch.elapsed().as_millis() as u32).wrapping_add(1 << 16)
    }

    /// Writes what the last burst queued: one write per connection, batched through the send
    /// ring when there is one. With write coalescing on, a connection written less than the
    /// window ago is deferred to the pacer instead, so a fast stream of events reaches it in
    /// fewer, larger writes.
    pub(super) fn flush_dirty(&self) {
        let mut list = std::mem::take(&mut *self.dirty.borrow_mut());
        if list.is_empty() {
            *self.dirty.borrow_mut() = list;
            return;
        }
        let window = self.shared.cfg.write_coalesce_ms;
        let now = self.now_ms();
        let full = self.coalesce_full();
        let mut writing = std::mem::take(&mut *self.writing.borrow_mut());
        {
            let mut deferred = self.deferred.borrow_mut();
            let was_empty = deferred.is_empty();
            for conn in list.drain(..) {
                if !conn.in_dirty.get() {
                    // Listed twice this burst and already taken for writing.
                    continue;
                }
                if window > 0
                    && now.wrapping_sub(conn.last_write.get()) < window
                    && conn.is_open()
                    && conn.queued_bytes() < full
                {
                    // Stays marked dirty: frames queued meanwhile join this write.
                    if !conn.in_deferred.replace(true) {
                        deferred.push(conn);
                    }
                    continue;
                }
                conn.in_dirty.set(false);
                conn.last_write.set(now);
                writing.push(conn);
            }
            if was_empty && !deferred.is_empty() {
                if let Some(w) = self.pacer.borrow_mut().take() {
                    w.wake();
                }
            }
        }
        self.write_now(&mut writing);
        *self.writing.borrow_mut() = writing;
        // Keep the allocation for the next burst.
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            *dirty = list;
        }
    }

    /// Queued bytes at which a connection is written at once, whatever its coalescing window:
    /// holding a fast stream back for a whole window would otherwise fill the queue of a client
    /// that keeps up and close it with 4100 as a slow consumer. A quarter of the bound (at most
    /// 64 KiB) is already a large write, so nothing is gained by waiting longer.
    pub(super) fn coalesce_full(&self) -> usize {
        (self.shared.cfg.max_outbound_bytes / 4).clamp(1, 64 << 10)
    }

    /// Writes every connection in `conns` (emptied): through the send ring, or one `sendmsg`
    /// each when there is no ring or the batch is too small to gain from one.
    pub(super) fn write_now(&self, conns: &mut Vec<Rc<Conn>>) {
        const RING_MIN: usize = 4;
        if conns.len() >= RING_MIN {
            let mut ring = self.ring.borrow_mut();
            if let Some(r) = ring.as_mut() {
                if let Err(e) = r.send(conns) {
                    tracing::warn!(shard = self.id, error = %e, "send ring failed: writing with sendmsg from now on");
                    *ring = None;
                }
            }
        }
        for conn in conns.drain(..) {
            conn.flush_and_notify();
        }
    }

    /// The pacer's turn: writes the deferred connections whose window has ended. Returns how
    /// long until the next one is due, or `None` when nothing is deferred.
    pub(super) fn flush_deferred(&self) -> Option<Duration> {
        let window = self.shared.cfg.write_coalesce_ms;
        let now = self.now_ms();
        let mut writing = std::mem::take(&mut *self.writing.borrow_mut());
        let mut next: Option<u32> = None;
        let full = self.coalesce_full();
        self.deferred.borrow_mut().retain(|conn| {
            if !conn.in_dirty.get() {
                // Written since it was deferred (its queue filled up).
                conn.in_deferred.set(false);
                return false;
            }
            let waited = now.wrapping_sub(conn.last_write.get());
            if waited >= window || !conn.is_open() || conn.queued_bytes() >= full {
                conn.in_deferred.set(false);
                conn.in_dirty.set(false);
                conn.last_write.set(now);
                writing.push(Rc::clone(conn));
                false
            } else {
                let left = window - waited;
                next = Some(next.map_or(left, |n| n.min(left)));
                true
            }
        });
        self.write_now(&mut writing);
        *self.writing.borrow_mut() = writing;
        let mut burst = std::mem::take(&mut *self.deferred_burst.borrow_mut());
        self.record_latency(&mut burst);
        next.map(|ms| Duration::from_millis(ms.into()))
    }

    /// Takes up to `DRAIN_BATCH` commands from the inbox, then flushes, then records how long
    /// each delivered event took from arrival to written.
    pub(super) fn drain_inbox(&self) {
        let router = &self.shared.router;
        for _ in 0..DRAIN_BATCH {
            match router.try_pop(self.id) {
                Some(cmd) => self.handle(cmd),
                None => break,
            }
        }
        self.flush_dirty();
        let mut burst = self.stats.burst.borrow_mut();
        if self.deferred.borrow().is_empty() {
            self.record_latency(&mut burst);
        } else {
            // Some of these events' writes wait for the pacer: count them when it runs.
            self.deferred_burst.borrow_mut().append(&mut burst);
        }
    }

    /// Records, and empties, the arrival times of events whose writes just went out.
    pub(super) fn record_latency(&self, burst: &mut Vec<Instant>) {
        if burst.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut latency = self.stats.latency.borrow_mut();
        let h = latency.get_or_insert_with(crate::metrics::new_histogram);
        for t in burst.drain(..) {
            let us = now.duration_since(t).as_micros().clamp(1, 60_000_000) as u64;
            let _ = h.record(us);
        }
    }

    pub(super) fn mark_dirty(&self, conn: &Rc<Conn>) {
        if !conn.in_dirty.replace(true) {
            self.dirty.borrow_mut().push(Rc::clone(conn));
        }
    }
}

/// Write coalescing: sleeps until the first deferred connection's window ends, writes the due
/// ones, and parks while nothing is deferred.
pub(super) async fn pacer_loop(shard: Rc<Shard>) {
    loop {
        std::future::poll_fn(|cx| {
            if shard.deferred.borrow().is_empty() {
                *shard.pacer.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        while let Some(wait) = shard.flush_deferred() {
            glommio::timer::sleep(wait).await;
        }
    }
}
