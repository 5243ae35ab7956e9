//! A shard: one glommio executor pinned to one CPU, owning its listener (SO_REUSEPORT), the
//! connections it accepts, their subscriptions (`index`) and their outbound queues.
//!
//! May not touch another shard's state: other shards and threads reach it only through its
//! inbox (`fanout::router`). Nothing here is `Send`; there is no lock, `Arc` or atomic on the
//! per-event path (the `Arc<Shared>` is read-only configuration, dereferenced without atomics).

pub mod conn;
mod http;
pub mod index;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::fanout::router::{Broadcast, Router, ShardCmd};
use crate::protocol::SocketId;

pub use conn::Conn;
use index::SubscriptionIndex;

/// State every shard reads and none owns: configuration, the router, per-app connection
/// counters (touched on connect and disconnect only, never per event).
pub struct Shared {
    pub cfg: Config,
    pub router: Router,
    /// Live connections per app, all shards together (for REVERB_APP_MAX_CONNECTIONS).
    pub app_conns: Box<[AtomicUsize]>,
    by_key: HashMap<String, usize>,
    by_id: HashMap<String, usize>,
}

impl Shared {
    pub fn new(cfg: Config) -> Shared {
        let router = Router::new(cfg.shards(), cfg.inbox_capacity);
        let by_key = cfg
            .apps
            .iter()
            .enumerate()
            .map(|(i, a)| (a.key.clone(), i))
            .collect();
        let by_id = cfg
            .apps
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.clone(), i))
            .collect();
        let app_conns = cfg.apps.iter().map(|_| AtomicUsize::new(0)).collect();
        Shared {
            cfg,
            router,
            app_conns,
            by_key,
            by_id,
        }
    }

    pub fn app_by_key(&self, key: &str) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    pub fn app_by_id(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }
}

/// A connection's slot in its shard: index plus generation, so a stale id never names a newer
/// connection that reused the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub slot: u32,
    pub gen: u32,
}

#[derive(Default)]
struct Slab {
    entries: Vec<(u32, Option<Rc<Conn>>)>,
    free: Vec<u32>,
    len: usize,
}

impl Slab {
    fn insert(&mut self, make: impl FnOnce(ConnId) -> Rc<Conn>) -> Rc<Conn> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.entries.push((0, None));
                (self.entries.len() - 1) as u32
            }
        };
        let entry = &mut self.entries[slot as usize];
        entry.0 = entry.0.wrapping_add(1);
        let conn = make(ConnId { slot, gen: entry.0 });
        entry.1 = Some(Rc::clone(&conn));
        self.len += 1;
        conn
    }

    fn get(&self, id: ConnId) -> Option<&Rc<Conn>> {
        match self.entries.get(id.slot as usize) {
            Some((gen, Some(c))) if *gen == id.gen => Some(c),
            _ => None,
        }
    }

    fn remove(&mut self, id: ConnId) {
        if let Some(entry) = self.entries.get_mut(id.slot as usize) {
            if entry.0 == id.gen && entry.1.take().is_some() {
                self.free.push(id.slot);
                self.len -= 1;
            }
        }
    }

    fn all(&self) -> Vec<Rc<Conn>> {
        self.entries.iter().filter_map(|(_, c)| c.clone()).collect()
    }
}

/// Per-shard counters: plain cells, read by whoever asks on this shard (no atomics).
#[derive(Default)]
pub struct Stats {
    pub events_fanned_out: Cell<u64>,
    pub frames_queued: Cell<u64>,
    pub slow_consumer_closes: Cell<u64>,
    pub broadcasts_dropped: Cell<u64>,
}

pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    conns: RefCell<Slab>,
    pub index: RefCell<SubscriptionIndex>,
    /// Connections with frames queued by the current burst, flushed once it is drained.
    dirty: RefCell<Vec<Rc<Conn>>>,
    next_conn: Cell<u64>,
    rng: Cell<u64>,
    pub stats: Stats,
}

/// Most commands taken from the inbox before the queued frames are flushed and other tasks get
/// a turn.
const DRAIN_BATCH: usize = 1024;

impl Shard {
    pub fn new(id: usize, shared: Arc<Shared>) -> Shard {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ ((id as u64 + 1) << 48)
            | 1;
        Shard {
            id,
            index: RefCell::new(SubscriptionIndex::new(shared.cfg.apps.len())),
            shared,
            conns: RefCell::default(),
            dirty: RefCell::default(),
            next_conn: Cell::new(0),
            rng: Cell::new(seed),
            stats: Stats::default(),
        }
    }

    /// xorshift64*: socket ids need to be unguessable-ish and unique, not cryptographic.
    fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A fresh socket id: the low half is unique per process (counter × shards + shard), the
    /// high half random, both in Pusher's `<digits>.<digits>` form.
    fn new_socket_id(&self) -> SocketId {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        SocketId {
            hi: self.random() % 1_000_000_000 + 1,
            lo: n * self.shared.cfg.shards() as u64 + self.id as u64 + 1,
        }
    }

    pub fn register(&self, app: usize, fd: std::os::fd::RawFd) -> Rc<Conn> {
        let socket_id = self.new_socket_id();
        self.conns
            .borrow_mut()
            .insert(|id| Rc::new(Conn::new(id, socket_id, app, fd)))
    }

    pub fn unregister(&self, conn: &Conn) {
        conn.mark_dead();
        self.index.borrow_mut().remove_conn(conn.id);
        self.conns.borrow_mut().remove(conn.id);
    }

    pub fn connection_count(&self) -> usize {
        self.conns.borrow().len
    }

    /// Queues `b`'s frame to every local subscriber of its channel. Synchronous: it never awaits,
    /// so no `RefCell` borrow lives across a yield. Writes happen in `flush_dirty`, after the
    /// whole burst is queued, so several events leave in one `sendmsg`.
    fn fanout(&self, b: Broadcast) {
        let index = self.index.borrow();
        let subscribers = index.subscribers(b.app, &b.channel);
        if subscribers.is_empty() {
            return;
        }
        // One non-atomic Rc per shard per event: the per-subscriber clones below never touch
        // the cross-core refcount inside `Bytes`.
        let frame = Rc::new(b.frame);
        let max = self.shared.cfg.max_outbound_bytes;
        let conns = self.conns.borrow();
        let mut dirty = self.dirty.borrow_mut();
        let mut queued = 0;
        for &id in subscribers {
            let Some(conn) = conns.get(id) else { continue };
            if Some(conn.socket_id) == b.except {
                continue;
            }
            match conn.enqueue_shared(&frame, max) {
                conn::Enqueued::Yes => queued += 1,
                conn::Enqueued::Overflow => self
                    .stats
                    .slow_consumer_closes
                    .set(self.stats.slow_consumer_closes.get() + 1),
                conn::Enqueued::Closed => continue,
            }
            if !conn.in_dirty.replace(true) {
                dirty.push(Rc::clone(conn));
            }
        }
        self.stats
            .events_fanned_out
            .set(self.stats.events_fanned_out.get() + 1);
        self.stats
            .frames_queued
            .set(self.stats.frames_queued.get() + queued);
    }

    /// Writes what the last burst queued: one `sendmsg` per connection.
    fn flush_dirty(&self) {
        let mut list = std::mem::take(&mut *self.dirty.borrow_mut());
        for conn in list.drain(..) {
            conn.in_dirty.set(false);
            conn.flush_and_notify();
        }
        // Keep the allocation for the next burst.
        let mut dirty = self.dirty.borrow_mut();
        if dirty.is_empty() {
            *dirty = list;
        }
    }

    /// Takes up to `DRAIN_BATCH` commands from the inbox, then flushes.
    fn drain_inbox(&self) {
        let router = &self.shared.router;
        for _ in 0..DRAIN_BATCH {
            match router.try_pop(self.id) {
                Some(ShardCmd::Broadcast(b)) => self.fanout(b),
                None => break,
            }
        }
        self.flush_dirty();
    }

    /// Liveness: pings connections silent for their app's activity timeout, closes those that
    /// stay silent `pong_timeout` after the ping (4201), and ends closing connections whose
    /// peers never finished the close handshake.
    fn sweep(&self, now: Instant) {
        let pong_timeout = self.shared.cfg.pong_timeout;
        for conn in self.conns.borrow().all() {
            let activity =
                Duration::from_secs(self.shared.cfg.apps[conn.app].activity_timeout.into());
            conn.check_liveness(now, activity, pong_timeout);
        }
    }
}

/// Runs shard `id` on the current glommio executor: starts its accept loop and liveness sweep,
/// reports readiness, then serves its inbox forever.
pub async fn run(
    id: usize,
    shared: Arc<Shared>,
    listener: socket2::Socket,
    ready: std::sync::mpsc::Sender<usize>,
) {
    let listener = crate::sys::into_glommio_listener(listener);
    let shard = Rc::new(Shard::new(id, shared));
    glommio::spawn_local(accept_loop(Rc::clone(&shard), listener)).detach();
    glommio::spawn_local(sweep_loop(Rc::clone(&shard))).detach();
    let _ = ready.send(id);
    tracing::debug!(shard = id, "accepting");
    loop {
        shard.shared.router.ready(id).await;
        shard.drain_inbox();
        glommio::yield_if_needed().await;
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: glommio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(conn::serve(Rc::clone(&shard), stream)).detach();
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn sweep_loop(shard: Rc<Shard>) {
    let tick = Duration::from_millis(500);
    loop {
        glommio::timer::sleep(tick).await;
        shard.sweep(Instant::now());
        let dropped = shard.shared.router.dropped(shard.id);
        if dropped > shard.stats.broadcasts_dropped.get() {
            tracing::warn!(
                shard = shard.id,
                dropped = dropped - shard.stats.broadcasts_dropped.get(),
                "inbox full: broadcasts dropped for this shard"
            );
            shard.stats.broadcasts_dropped.set(dropped);
        }
    }
}

/// Decrements an app's live-connection count when a connection ends, however it ends.
pub(crate) struct AppConnGuard<'a>(&'a AtomicUsize);

impl<'a> AppConnGuard<'a> {
    /// Counts a new connection; `None` (and nothing counted) when the app is at `max`.
    pub(crate) fn try_new(counter: &'a AtomicUsize, max: Option<usize>) -> Option<Self> {
        let before = counter.fetch_add(1, Ordering::Relaxed);
        if max.is_some_and(|m| before >= m) {
            counter.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(AppConnGuard(counter))
    }
}

impl Drop for AppConnGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
