//! A shard: one glommio executor pinned to one CPU, owning its listener (SO_REUSEPORT), the
//! connections it accepts, their subscriptions (`index`) and their outbound queues.
//!
//! May not touch another shard's state: other shards and threads reach it only through its
//! inbox (`fanout::router`). Nothing here is `Send`; there is no lock, `Arc` or atomic on the
//! per-event path (the `Arc<Shared>` is read-only configuration, dereferenced without atomics).

pub mod admission;
pub mod cache;
pub mod conn;
pub mod http;
pub mod index;
pub mod presence;
mod session;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::cluster::{Wire, WireQuery};
use crate::fanout::frame::SharedFrame;
pub use crate::fanout::router::ConnId;
use crate::fanout::router::{
    partition, Answer, Broadcast, ChannelPart, Joined, PresenceOp, Query, QueryKind, QueryPart,
    RemoteCmd, ShardCmd,
};
use crate::node::Shared;
use crate::protocol::{channel, outbound, ChannelKind, PusherError, SocketId};
use crate::webhooks;

pub use conn::Conn;
use conn::Extra;
use index::SubscriptionIndex;

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

    fn iter(&self) -> impl Iterator<Item = &Rc<Conn>> {
        self.entries.iter().filter_map(|(_, c)| c.as_ref())
    }

    /// Owned handles, for loops that may touch the slab while they run.
    fn all(&self) -> Vec<Rc<Conn>> {
        self.iter().cloned().collect()
    }
}

/// Per-shard counters: plain cells, read by whoever asks on this shard (no atomics).
#[derive(Default)]
pub struct Stats {
    pub events_fanned_out: Cell<u64>,
    pub frames_queued: Cell<u64>,
    pub broadcasts_dropped: Cell<u64>,
    pub connects: Cell<u64>,
    /// Ended connections by close code (1006: no close frame).
    pub closes: RefCell<std::collections::BTreeMap<u16, u64>>,
    pub events_http: Cell<u64>,
    pub events_client: Cell<u64>,
    /// HTTP API requests by (endpoint, status).
    pub http: RefCell<std::collections::BTreeMap<(&'static str, u16), u64>>,
    /// Subscribes refused, by reason (`bts_subscribes_refused_total`).
    pub subscribes_refused: RefCell<std::collections::BTreeMap<&'static str, u64>>,
    /// Arrival to written, in microseconds, for events with local subscribers.
    pub latency: RefCell<Option<hdrhistogram::Histogram<u64>>>,
    /// Arrival times of the events fanned out in the current burst.
    burst: RefCell<Vec<Instant>>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// This shard's copy of the app table (swapped by `ShardCmd::Reload`).
    apps: RefCell<Rc<crate::apps::AppSet>>,
    /// TLS settings new connections get (swapped by `ShardCmd::Tls`).
    pub(crate) tls: RefCell<Option<Arc<rustls::ServerConfig>>>,
    conns: RefCell<Slab>,
    pub index: RefCell<SubscriptionIndex>,
    /// Presence membership of the channels this shard owns.
    presence: RefCell<presence::PresenceRegistry>,
    /// Last event of cache channels (a copy on every shard).
    cache: RefCell<cache::CacheStore>,
    /// Total subscribers of the channels this shard owns, for subscription_count.
    counts: RefCell<HashMap<AppKey, u64>>,
    /// Signed-in connections per user, for the users this shard owns (`Router::user_owner`).
    online: RefCell<HashMap<AppKey, u32>>,
    /// Who watches each user this shard owns: (shard, connection).
    watchers: RefCell<HashMap<AppKey, Vec<(usize, ConnId)>>>,
    /// HTTP API reads waiting for every shard's part.
    queries: RefCell<HashMap<u64, PendingQuery>>,
    next_query: Cell<u64>,
    /// The accept loop; dropped (cancelled, listener closed) when draining starts.
    accept_task: RefCell<Option<glommio::Task<()>>>,
    /// A duplicate of the listening socket: shut down when draining starts, which takes this
    /// shard out of the port's SO_REUSEPORT group at once (the cancelled accept task closes its
    /// own descriptor only when the executor next gets to it).
    listener: RefCell<Option<socket2::Socket>>,
    /// A drain was asked for (by the inbox); the shard loop starts it.
    drain_requested: Cell<Option<Duration>>,
    /// Connections with frames queued by the current burst, flushed once it is drained.
    dirty: RefCell<Vec<Rc<Conn>>>,
    /// Write coalescing: dirty connections written less than `write_coalesce` ago, held until
    /// their window ends so the frames queued meanwhile leave in the same write.
    deferred: RefCell<Vec<Rc<Conn>>>,
    /// The pacer task, parked while nothing is deferred.
    pacer: RefCell<Option<std::task::Waker>>,
    /// Arrival times of events some of whose writes were deferred (for the latency histogram).
    deferred_burst: RefCell<Vec<Instant>>,
    /// Reused list of connections to write now.
    writing: RefCell<Vec<Rc<Conn>>>,
    /// Batches broadcast writes into one system call per `sys::send_ring::ENTRIES` connections;
    /// `None` when turned off or when this host refused an io_uring.
    ring: RefCell<Option<crate::sys::send_ring::SendRing<Conn>>>,
    /// Start of the shard's millisecond clock (`now_ms`).
    epoch: Instant,
    next_conn: Cell<u64>,
    rng: Cell<u64>,
    pub stats: Stats,
    /// This shard's admitted sockets by client address, for the fairness rule.
    admission: RefCell<admission::Local>,
    /// Routes served beside the HTTP API (the console's), installed by `run`.
    routes: Option<Arc<dyn http::RouteHook>>,
}

/// One app's settings, from the shard's app table of the moment.
pub struct AppRef {
    set: Rc<crate::apps::AppSet>,
    slot: usize,
}

impl std::ops::Deref for AppRef {
    type Target = crate::config::App;
    fn deref(&self) -> &crate::config::App {
        self.set.get(self.slot)
    }
}

/// A channel or user id within an app.
type AppKey = (usize, Arc<str>);

/// Why a subscribe that would add a channel to a shard's index was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChannelLimit {
    #[error("Channel limit reached: at most {0} channels with subscribers per shard")]
    Shard(usize),
    #[error("Channel limit reached: this app may have at most {0} channels with subscribers")]
    App(usize),
}

impl ChannelLimit {
    fn reason(self) -> &'static str {
        match self {
            ChannelLimit::Shard(_) => "shard_channels",
            ChannelLimit::App(_) => "app_channels",
        }
    }
}

/// Most commands taken from the inbox before the queued frames are flushed and other tasks get
/// a turn.
const DRAIN_BATCH: usize = 1024;
/// How long an HTTP API read waits for every shard's answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// An HTTP API read in flight: the answers so far.
struct PendingQuery {
    expected: usize,
    parts: Vec<QueryPart>,
    waker: Option<std::task::Waker>,
}

impl Shard {
    pub fn new(id: usize, shared: Arc<Shared>) -> Shard {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ ((id as u64 + 1) << 48)
            | 1;
        let apps = Rc::new((*shared.apps.current()).clone());
        let tls = shared.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        Shard {
            id,
            index: RefCell::new(SubscriptionIndex::new(apps.len())),
            presence: RefCell::default(),
            cache: RefCell::new(cache::CacheStore::new(
                apps.len(),
                shared.cfg.max_cache_channels,
            )),
            apps: RefCell::new(apps),
            tls: RefCell::new(tls),
            counts: RefCell::default(),
            online: RefCell::default(),
            watchers: RefCell::default(),
            queries: RefCell::default(),
            next_query: Cell::new(0),
            accept_task: RefCell::new(None),
            listener: RefCell::new(None),
            drain_requested: Cell::new(None),
            shared,
            conns: RefCell::default(),
            dirty: RefCell::default(),
            deferred: RefCell::default(),
            pacer: RefCell::default(),
            deferred_burst: RefCell::default(),
            writing: RefCell::default(),
            ring: RefCell::new(None),
            epoch: Instant::now(),
            next_conn: Cell::new(0),
            rng: Cell::new(seed),
            stats: Stats::default(),
            admission: RefCell::default(),
            routes: None,
        }
    }

    /// The installed route hook, if it claims `path`.
    pub(crate) fn route_hook(&self, path: &str) -> Option<&dyn http::RouteHook> {
        self.routes.as_deref().filter(|r| r.claims(path))
    }

    /// This shard's current app table.
    pub fn apps(&self) -> Rc<crate::apps::AppSet> {
        Rc::clone(&self.apps.borrow())
    }

    /// The settings of the app in `slot` (its last settings if a reload removed it).
    pub fn app(&self, slot: usize) -> AppRef {
        AppRef {
            set: self.apps(),
            slot,
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
        self.register_with(app, fd, None)
    }

    /// Registers a connection, with its TLS state when it came in over wss://.
    pub fn register_with(
        &self,
        app: usize,
        fd: std::os::fd::RawFd,
        tls: Option<Box<rustls::ServerConnection>>,
    ) -> Rc<Conn> {
        bump(&self.stats.connects);
        let socket_id = self.new_socket_id();
        self.conns.borrow_mut().insert(|id| {
            Rc::new(Conn::new(
                id,
                socket_id,
                app,
                fd,
                tls,
                self.shared.cfg.max_outbound_bytes,
            ))
        })
    }

    /// Forgets a finished connection: its subscriptions, counts and presence memberships.
    pub fn unregister(&self, conn: &Conn) {
        let code = conn.close_code().unwrap_or(1006);
        *self.stats.closes.borrow_mut().entry(code).or_default() += 1;
        conn.mark_dead();
        let chans = self.with_channel_count(conn.app, |index| index.remove_conn(conn.id));
        for (app, ch) in &chans {
            self.count_changed(*app, ch, -1);
        }
        if let Some(ext) = conn.take_ext() {
            let Extra {
                user,
                watchlist,
                presence,
                ..
            } = *ext;
            for (ch, user) in presence {
                self.send_leave(conn, &ch, &user);
            }
            if let Some(user) = user {
                self.user_offline(conn, &user, watchlist);
            }
        }
        self.conns.borrow_mut().remove(conn.id);
    }

    /// Adds `conn` to a channel's local subscribers; `Ok(false)` if it already was one. A
    /// channel new to this shard's index must fit under the shard's and the app's channel caps.
    fn subscribe_local(&self, conn: &Conn, channel: &str) -> Result<bool, ChannelLimit> {
        let mut index = self.index.borrow_mut();
        if index.subscribers(conn.app, channel).is_empty() {
            if let Err(limit) = self.reserve_channel(&index, conn.app) {
                self.refused(limit.reason());
                return Err(limit);
            }
        }
        let added = index.subscribe(conn.id, conn.app, channel);
        drop(index);
        if added {
            self.count_changed(conn.app, channel, 1);
        }
        Ok(added)
    }

    /// Room for one more channel in this shard's index, counted for `app` (node-wide).
    fn reserve_channel(&self, index: &SubscriptionIndex, app: usize) -> Result<(), ChannelLimit> {
        let cap = self.shared.cfg.max_channels_per_shard;
        if index.total_channels() >= cap {
            return Err(ChannelLimit::Shard(cap));
        }
        // Reserve first, then check: shards subscribing at the same moment cannot both take the
        // last place.
        let counter = &self.shared.app_channels[app];
        let before = counter.fetch_add(1, Ordering::Relaxed);
        if let Some(max) = self.app(app).max_channels.filter(|m| before >= *m) {
            counter.fetch_sub(1, Ordering::Relaxed);
            return Err(ChannelLimit::App(max));
        }
        Ok(())
    }

    /// Counts a refused subscribe for `bts_subscribes_refused_total`.
    fn refused(&self, reason: &'static str) {
        *self
            .stats
            .subscribes_refused
            .borrow_mut()
            .entry(reason)
            .or_default() += 1;
    }

    /// Removes `conn` from a channel's local subscribers; `false` if it was not one.
    fn unsubscribe_local(&self, conn: &Conn, channel: &str) -> bool {
        let removed = self.with_channel_count(conn.app, |index| {
            index.unsubscribe(conn.id, conn.app, channel)
        });
        if removed {
            self.count_changed(conn.app, channel, -1);
        }
        removed
    }

    /// Runs `f` on the index and gives back to `app`'s channel count the channels it emptied.
    fn with_channel_count<T>(&self, app: usize, f: impl FnOnce(&mut SubscriptionIndex) -> T) -> T {
        let mut index = self.index.borrow_mut();
        let before = index.channel_count(app);
        let out = f(&mut index);
        let gone = before.saturating_sub(index.channel_count(app));
        if gone > 0 {
            self.shared.app_channels[app].fetch_sub(gone, Ordering::Relaxed);
        }
        out
    }

    /// Tells the channel's owner about a subscriber count change, when the app wants
    /// `pusher_internal:subscription_count` (never for presence channels, as Pusher).
    fn count_changed(&self, app: usize, channel: &str, delta: i64) {
        let a = self.app(app);
        let presence = ChannelKind::of(channel) == ChannelKind::Presence;
        let events = a.subscription_count && !presence;
        let hooks = !a.webhooks.is_empty();
        if !events && !hooks {
            return;
        }
        let router = &self.shared.router;
        let owner = router.owner(app, channel);
        let _ = router.try_push(
            owner,
            ShardCmd::CountDelta {
                app,
                channel: Arc::from(channel),
                delta,
            },
        );
    }

    /// Leaves a presence channel `conn` had joined (unsubscribe).
    fn leave_presence(&self, conn: &Conn, channel: &str) {
        let user = {
            let mut ext = conn.ext();
            let pos = ext.presence.iter().position(|(c, _)| &**c == channel);
            pos.map(|i| ext.presence.swap_remove(i).1)
        };
        if let Some(user) = user {
            self.send_leave(conn, channel, &user);
        }
    }

    fn send_leave(&self, conn: &Conn, channel: &str, user: &str) {
        let router = &self.shared.router;
        let op = PresenceOp::Leave {
            app: conn.app,
            channel: Arc::from(channel),
            user_id: Arc::from(user),
            socket_id: conn.socket_id,
        };
        if router
            .try_push(router.owner(conn.app, channel), ShardCmd::Presence(op))
            .is_err()
        {
            tracing::warn!(channel, "inbox full: presence leave dropped");
        }
    }

    /// After `subscription_succeeded` on a cache channel: its last event, or `pusher:cache_miss`.
    fn send_cached(&self, conn: &Conn, channel: &str) {
        if !channel::is_cache(channel) {
            return;
        }
        let cache = self.cache.borrow();
        match cache.get(conn.app, channel, Instant::now()) {
            Some(frame) => {
                conn.enqueue_shared(&Rc::new(frame.clone()));
            }
            None => {
                conn.send_text(&outbound::cache_miss(channel));
                let a = self.app(conn.app);
                if !a.webhooks.is_empty() && webhooks::wanted(&a, "cache_miss") {
                    self.shared.webhooks.emit(
                        conn.app,
                        serde_json::json!({"name":"cache_miss","channel":channel}),
                    );
                }
            }
        }
    }

    /// The live connection with this id, if any.
    pub(crate) fn conn(&self, id: ConnId) -> Option<Rc<Conn>> {
        self.conns.borrow().get(id).cloned()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.borrow().len
    }

    /// Queues `b`'s frame to every local subscriber of its channel. Synchronous: it never awaits,
    /// so no `RefCell` borrow lives across a yield. Writes happen in `flush_dirty`, after the
    /// whole burst is queued, so several events leave in one `sendmsg`.
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

    /// Subscribes a registered connection (for benches and tests of the pure path).
    #[doc(hidden)]
    pub fn bench_subscribe(&self, conn: &Conn, channel: &str) {
        let _ = self.subscribe_local(conn, channel);
    }

    fn fanout(&self, b: Broadcast) {
        if b.cache {
            let ttl = self.app(b.app).cache_ttl;
            self.cache
                .borrow_mut()
                .put(b.app, &b.channel, b.frame.clone(), Instant::now(), ttl);
        }
        let index = self.index.borrow();
        let subscribers = index.subscribers(b.app, &b.channel);
        if subscribers.is_empty() {
            return;
        }
        // One non-atomic Rc per shard per event: the per-subscriber clones below never touch
        // the cross-core refcount inside `Bytes`.
        let (len, frame) = (b.frame.len(), Rc::new(b.frame));
        let full = self.coalesce_full();
        let conns = self.conns.borrow();
        let mut dirty = self.dirty.borrow_mut();
        let mut queued = 0;
        for &id in subscribers {
            let Some(conn) = conns.get(id) else { continue };
            if Some(conn.socket_id) == b.except {
                continue;
            }
            let crossed = match conn.enqueue_shared(&frame) {
                conn::Enqueued::Yes(bytes) => {
                    queued += 1;
                    bytes >= full && bytes - len < full
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
    fn now_ms(&self) -> u32 {
        (self.epoch.elapsed().as_millis() as u32).wrapping_add(1 << 16)
    }

    /// Writes what the last burst queued: one write per connection, batched through the send
    /// ring when there is one. With write coalescing on, a connection written less than the
    /// window ago is deferred to the pacer instead, so a fast stream of events reaches it in
    /// fewer, larger writes.
    fn flush_dirty(&self) {
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
    fn coalesce_full(&self) -> usize {
        (self.shared.cfg.max_outbound_bytes / 4).clamp(1, 64 << 10)
    }

    /// Writes every connection in `conns` (emptied): through the send ring, or one `sendmsg`
    /// each when there is no ring or the batch is too small to gain from one.
    fn write_now(&self, conns: &mut Vec<Rc<Conn>>) {
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
    fn flush_deferred(&self) -> Option<Duration> {
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
    fn drain_inbox(&self) {
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
    fn record_latency(&self, burst: &mut Vec<Instant>) {
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

    /// Takes a new app table: per-app state grows to its slots, and the connections of apps it
    /// no longer has are closed with 4003 (Pusher's "application disabled").
    fn reload(&self, set: &crate::apps::AppSet) {
        let next = Rc::new(set.clone());
        self.index.borrow_mut().ensure_apps(next.len());
        self.cache.borrow_mut().ensure_apps(next.len());
        let old = self.apps.replace(Rc::clone(&next));
        let mut closed = 0usize;
        let conns = self.conns.borrow().all();
        for conn in conns {
            if old.is_live(conn.app) && !next.is_live(conn.app) && conn.is_open() {
                conn.close_pusher(PusherError::AppDisabled);
                conn.flush_and_notify();
                closed += 1;
            }
        }
        tracing::debug!(
            shard = self.id,
            apps = next.live().count(),
            closed,
            "app table reloaded"
        );
    }

    /// This shard's numbers for a scrape.
    fn snapshot(&self) -> crate::metrics::Snapshot {
        let apps = self.apps().len();
        let mut connections = vec![0u64; apps];
        for c in self.conns.borrow().iter() {
            connections[c.app] += 1;
        }
        let channels = self.index.borrow().kinds().collect();
        let (frames_out, bytes_out, writes_out) = crate::metrics::written();
        crate::metrics::Snapshot {
            shard: self.id,
            connections,
            connects: self.stats.connects.get(),
            closes: self.stats.closes.borrow().clone(),
            events_http: self.stats.events_http.get(),
            events_client: self.stats.events_client.get(),
            frames_out,
            bytes_out,
            writes_out,
            slow_consumer_closes: crate::metrics::slow_consumers(),
            inbox_overflows: self.shared.router.dropped(self.id),
            channels,
            http: self.stats.http.borrow().clone(),
            subscribes_refused: self.stats.subscribes_refused.borrow().clone(),
            latency: self
                .stats
                .latency
                .borrow()
                .clone()
                .unwrap_or_else(crate::metrics::new_histogram),
        }
    }

    fn handle(&self, cmd: ShardCmd) {
        match cmd {
            ShardCmd::Broadcast(b) => self.fanout(b),
            ShardCmd::Presence(op) => self.presence_apply(op),
            ShardCmd::Joined(j) => self.presence_joined(j),
            ShardCmd::Query(q) => self.answer(q),
            ShardCmd::Answer(a) => self.collect(a),
            ShardCmd::TerminateUser { app, user_id } => self.terminate_user(app, &user_id),
            ShardCmd::Remote(cmd) => self.remote(cmd),
            ShardCmd::Scrape(reply) => {
                let _ = reply.try_send(self.snapshot());
            }
            ShardCmd::Reload(set) => self.reload(&set),
            ShardCmd::Tls(cfg) => *self.tls.borrow_mut() = Some(cfg),
            ShardCmd::Drain { window } => {
                // Stop accepting now: shutting the listener down takes it out of the port's
                // SO_REUSEPORT group, so the kernel sends new connections to the other listeners
                // on this port (a new process started beside this one); dropping the task
                // cancels it and closes its descriptor.
                if let Some(sk) = self.listener.borrow_mut().take() {
                    let _ = sk.shutdown(std::net::Shutdown::Both);
                }
                self.accept_task.borrow_mut().take();
                self.shared
                    .listeners_closed
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.drain_requested.set(Some(window));
            }
            ShardCmd::CountDelta {
                app,
                channel,
                delta,
            } => self.count_delta(app, channel, delta),
            ShardCmd::UserOnline {
                app,
                user_id,
                delta,
            } => self.user_online(app, user_id, delta),
            ShardCmd::Watch {
                app,
                watched,
                shard,
                conn,
                on,
            } => self.watch(app, watched, shard, conn, on),
            ShardCmd::WatchEvent {
                conn,
                online,
                user_id,
            } => {
                let conn = self.conns.borrow().get(conn).cloned();
                if let Some(conn) = conn {
                    let name = if online { "online" } else { "offline" };
                    conn.send_text(&outbound::watchlist_event(name, &[&user_id]));
                    self.mark_dirty(&conn);
                }
            }
        }
    }

    /// A connection signed in (`+1`) or closed (`-1`) as `user`: tell the user's owner, and
    /// start or stop watching the users on its watchlist.
    fn user_presence(&self, conn: &Conn, user: &str, delta: i32) {
        let watchlist = conn.ext().watchlist.clone();
        self.user_watch(conn, user, delta, watchlist);
    }

    /// A signed-in connection ended: its user loses a connection, its watches stop.
    fn user_offline(&self, conn: &Conn, user: &str, watchlist: Vec<Rc<str>>) {
        self.user_watch(conn, user, -1, watchlist);
    }

    fn user_watch(&self, conn: &Conn, user: &str, delta: i32, watchlist: Vec<Rc<str>>) {
        let router = &self.shared.router;
        let _ = router.try_push(
            router.user_owner(conn.app, user),
            ShardCmd::UserOnline {
                app: conn.app,
                user_id: Arc::from(user),
                delta,
            },
        );
        for watched in watchlist {
            let _ = router.try_push(
                router.user_owner(conn.app, &watched),
                ShardCmd::Watch {
                    app: conn.app,
                    watched: Arc::from(&*watched),
                    shard: self.id,
                    conn: conn.id,
                    on: delta > 0,
                },
            );
        }
    }

    /// Owner side of the watchlist: online on a user's first connection, offline on the last.
    fn user_online(&self, app: usize, user_id: Arc<str>, delta: i32) {
        let key = (app, user_id);
        let changed = {
            let mut online = self.online.borrow_mut();
            let n = online.entry(key.clone()).or_insert(0);
            let before = *n;
            *n = n.saturating_add_signed(delta);
            let after = *n;
            if after == 0 {
                online.remove(&key);
            }
            (before == 0) != (after == 0)
        };
        if !changed {
            return;
        }
        let online = delta > 0;
        let router = &self.shared.router;
        for &(shard, conn) in self.watchers.borrow().get(&key).into_iter().flatten() {
            let _ = router.try_push(
                shard,
                ShardCmd::WatchEvent {
                    conn,
                    online,
                    user_id: Arc::clone(&key.1),
                },
            );
        }
    }

    fn watch(&self, app: usize, watched: Arc<str>, shard: usize, conn: ConnId, on: bool) {
        let key = (app, watched);
        let mut watchers = self.watchers.borrow_mut();
        if on {
            watchers.entry(key.clone()).or_default().push((shard, conn));
            if self.online.borrow().contains_key(&key) {
                let _ = self.shared.router.try_push(
                    shard,
                    ShardCmd::WatchEvent {
                        conn,
                        online: true,
                        user_id: Arc::clone(&key.1),
                    },
                );
            }
        } else if let Some(list) = watchers.get_mut(&key) {
            list.retain(|w| *w != (shard, conn));
            if list.is_empty() {
                watchers.remove(&key);
            }
        }
    }

    /// Owner side of presence: one writer per channel, so member_added and member_removed go
    /// out exactly once per user, to every shard, never to the socket that caused them.
    fn presence_apply(&self, op: PresenceOp) {
        let router = &self.shared.router;
        match op {
            PresenceOp::Join {
                app,
                channel,
                user_id,
                user_info,
                origin,
                conn,
                socket_id,
            } => {
                let max = self.app(app).max_presence_members;
                let node = self.shared.node;
                let outcome = self.presence.borrow_mut().join(
                    app,
                    &channel,
                    &user_id,
                    user_info.clone(),
                    max,
                    node,
                );
                if outcome != presence::Join::Full {
                    if let Some(cluster) = &self.shared.cluster {
                        cluster.publish(&Wire::Join {
                            node,
                            app: router.app_id(app).to_owned(),
                            channel: channel.to_string(),
                            user: user_id.to_string(),
                            info: user_info.map(|i| i.to_string()),
                            socket: socket_id.to_string(),
                        });
                    }
                }
                let result = if outcome == presence::Join::Full {
                    Err("presence channel is full")
                } else {
                    let snapshot = self.presence.borrow().snapshot(app, &channel);
                    let json = outbound::channel_event_str(
                        "pusher_internal:subscription_succeeded",
                        &channel,
                        &snapshot,
                    );
                    Ok(SharedFrame::text(&json).0)
                };
                let new_member = outcome == presence::Join::NewMember;
                let reply = Joined {
                    app,
                    channel: Arc::clone(&channel),
                    conn,
                    user_id: Arc::clone(&user_id),
                    result,
                };
                if router.try_push(origin, ShardCmd::Joined(reply)).is_err() {
                    tracing::warn!(%channel, "inbox full: presence answer dropped");
                }
                if outcome != presence::Join::Full {
                    let mine = self
                        .presence
                        .borrow()
                        .node_sockets(app, &channel, &user_id, node);
                    self.member_hook(app, new_member, mine == 1, true, &channel, &user_id);
                }
                if new_member {
                    self.announce_added(app, channel, &user_id, Some(socket_id));
                }
            }
            PresenceOp::Leave {
                app,
                channel,
                user_id,
                socket_id,
            } => {
                let node = self.shared.node;
                if let Some(cluster) = &self.shared.cluster {
                    cluster.publish(&Wire::Leave {
                        node,
                        app: router.app_id(app).to_owned(),
                        channel: channel.to_string(),
                        user: user_id.to_string(),
                        socket: socket_id.to_string(),
                    });
                }
                let had = self
                    .presence
                    .borrow()
                    .node_sockets(app, &channel, &user_id, node);
                let last = self
                    .presence
                    .borrow_mut()
                    .leave(app, &channel, &user_id, node);
                let has = self
                    .presence
                    .borrow()
                    .node_sockets(app, &channel, &user_id, node);
                self.member_hook(app, last, had > 0 && has == 0, false, &channel, &user_id);
                if last {
                    self.announce_removed(app, channel, &user_id, Some(socket_id));
                }
            }
        }
    }

    /// `member_removed` for `user_id` to this node's subscribers of the channel.
    fn announce_removed(
        &self,
        app: usize,
        channel: Arc<str>,
        user_id: &str,
        except: Option<SocketId>,
    ) {
        let mut data = Vec::new();
        outbound::push_json_str(&mut data, user_id);
        let data = format!(r#"{{"user_id":{}}}"#, String::from_utf8_lossy(&data));
        self.broadcast_internal(
            app,
            channel,
            "pusher_internal:member_removed",
            &data,
            except,
        );
    }

    /// A `pusher_internal:*` event (data given as a string) to this node's subscribers of a
    /// channel, through every shard's inbox. Never cached.
    fn broadcast_internal(
        &self,
        app: usize,
        channel: Arc<str>,
        event: &str,
        data: &str,
        except: Option<SocketId>,
    ) {
        let json = outbound::channel_event_str(event, &channel, data);
        self.shared.router.broadcast(Broadcast {
            app,
            channel,
            frame: SharedFrame::text(&json).0,
            except,
            cache: false,
            created: Instant::now(),
        });
    }

    /// `member_added` for `user_id` to this node's subscribers of the channel.
    fn announce_added(
        &self,
        app: usize,
        channel: Arc<str>,
        user_id: &str,
        except: Option<SocketId>,
    ) {
        let data = self.presence.borrow().added_data(app, &channel, user_id);
        self.broadcast_internal(app, channel, "pusher_internal:member_added", &data, except);
    }

    /// What other nodes tell us (cluster mode).
    fn remote(&self, cmd: RemoteCmd) {
        let router = &self.shared.router;
        match cmd {
            RemoteCmd::Join {
                node,
                app,
                channel,
                user_id,
                user_info,
                socket_id,
            } => {
                // The joining node already admitted the socket: no member limit here.
                let outcome = self.presence.borrow_mut().join(
                    app,
                    &channel,
                    &user_id,
                    user_info,
                    usize::MAX,
                    node,
                );
                if outcome == presence::Join::NewMember {
                    self.announce_added(app, channel, &user_id, socket_id);
                }
            }
            RemoteCmd::Leave {
                node,
                app,
                channel,
                user_id,
                socket_id,
            } => {
                if self
                    .presence
                    .borrow_mut()
                    .leave(app, &channel, &user_id, node)
                {
                    self.announce_removed(app, channel, &user_id, socket_id);
                }
            }
            RemoteCmd::Sync {
                node,
                part,
                parts,
                entries,
            } => {
                // Channels this shard owns that the sender's shard `part` covers: those in the
                // sync, and those where the node has members now (they may have none any more).
                let mut channels: Vec<(usize, Arc<str>)> = entries
                    .iter()
                    .filter(|(app, ch, _)| router.owner(*app, ch) == self.id)
                    .map(|(app, ch, _)| (*app, Arc::clone(ch)))
                    .collect();
                let known = self.presence.borrow().node_channels(node);
                for (app, ch) in known {
                    if partition(router.app_id(app), &ch, parts) == part {
                        channels.push((app, ch));
                    }
                }
                channels.sort();
                channels.dedup();
                for (app, ch) in channels {
                    let mine: Vec<_> = entries
                        .iter()
                        .filter(|(a, c, _)| *a == app && **c == *ch)
                        .map(|(_, _, e)| e.clone())
                        .collect();
                    self.set_node_members(app, ch, node, &mine);
                }
            }
            RemoteCmd::NodeGone { node } => {
                // Collect first: set_node_members needs the registry mutably.
                let channels = self.presence.borrow().node_channels(node);
                for (app, ch) in channels {
                    self.set_node_members(app, ch, node, &[]);
                }
            }
            RemoteCmd::PublishSync => self.publish_sync(),
        }
    }

    fn set_node_members(
        &self,
        app: usize,
        channel: Arc<str>,
        node: u64,
        entries: &[presence::SyncEntry],
    ) {
        let (added, removed) = self
            .presence
            .borrow_mut()
            .set_node(app, &channel, node, entries);
        for u in removed {
            self.announce_removed(app, Arc::clone(&channel), &u, None);
        }
        for u in added {
            self.announce_added(app, Arc::clone(&channel), &u, None);
        }
    }

    /// Our members of the presence channels this shard owns, for the other nodes.
    fn publish_sync(&self) {
        let Some(cluster) = &self.shared.cluster else {
            return;
        };
        let node = self.shared.node;
        let router = &self.shared.router;
        let registry = self.presence.borrow();
        let mut m = Vec::new();
        for (app, ch) in registry.node_channels(node) {
            for (u, info, n) in registry.node_entries(app, &ch, node) {
                m.push((
                    router.app_id(app).to_owned(),
                    ch.to_string(),
                    u.to_string(),
                    info.map(|i| i.to_string()),
                    n,
                ));
            }
        }
        cluster.publish(&Wire::Sync {
            node,
            part: self.id,
            parts: router.shards(),
            members: m,
        });
    }

    /// The owner answered a join: start the subscription, or undo a join nobody waits for.
    fn presence_joined(&self, j: Joined) {
        let conn = self.conns.borrow().get(j.conn).cloned();
        let waiting = conn.as_ref().filter(|c| {
            if !c.join_pending(&j.channel) {
                return false;
            }
            c.ext().presence_pending.retain(|ch| **ch != *j.channel);
            c.is_open()
        });
        match (waiting, j.result) {
            (Some(conn), Ok(frame)) => {
                if let Err(limit) = self.subscribe_local(conn, &j.channel) {
                    // The owner admitted the member: take it back.
                    conn.send_text(&outbound::error(None, &limit.to_string()));
                    self.mark_dirty(conn);
                    self.send_leave(conn, &j.channel, &j.user_id);
                    return;
                }
                conn.ext()
                    .presence
                    .push((Rc::from(&*j.channel), Rc::from(&*j.user_id)));
                conn.enqueue_shared(&Rc::new(frame));
                self.send_cached(conn, &j.channel);
                self.mark_dirty(conn);
            }
            (Some(conn), Err(why)) => {
                conn.send_text(&outbound::subscription_error(
                    &j.channel,
                    "LimitReached",
                    why,
                    403,
                ));
                self.mark_dirty(conn);
            }
            (None, Ok(_)) => {
                // Closed or unsubscribed meanwhile: take the membership back.
                let router = &self.shared.router;
                let op = PresenceOp::Leave {
                    app: j.app,
                    channel: Arc::clone(&j.channel),
                    user_id: j.user_id,
                    socket_id: SocketId { hi: 0, lo: 0 },
                };
                let _ = router.try_push(router.owner(j.app, &j.channel), ShardCmd::Presence(op));
            }
            (None, Err(_)) => {}
        }
    }

    fn mark_dirty(&self, conn: &Rc<Conn>) {
        if !conn.in_dirty.replace(true) {
            self.dirty.borrow_mut().push(Rc::clone(conn));
        }
    }

    /// Owner side of subscription_count: keep the total, tell the channel.
    fn count_delta(&self, app: usize, channel: Arc<str>, delta: i64) {
        let total = {
            let mut counts = self.counts.borrow_mut();
            let key = (app, Arc::clone(&channel));
            let n = counts.entry(key.clone()).or_insert(0);
            *n = n.saturating_add_signed(delta);
            let n = *n;
            if n == 0 {
                counts.remove(&key);
            }
            n
        };
        let a = self.app(app);
        let presence = ChannelKind::of(&channel) == ChannelKind::Presence;
        let before = total.saturating_add_signed(-delta);
        let occupancy = if before == 0 && total > 0 {
            Some(true)
        } else if before > 0 && total == 0 {
            Some(false)
        } else {
            None
        };
        if let (Some(cluster), Some(on)) = (&self.shared.cluster, occupancy) {
            // This node's first or last subscriber: the arbiter decides the cluster-wide
            // occupied / vacated webhook (`ingest::cluster::Arbiter`).
            cluster.publish(&Wire::Hook {
                node: self.shared.node,
                app: self.shared.router.app_id(app).to_owned(),
                key: crate::cluster::wire::hook_key_channel(&channel),
                on,
            });
        }
        if !a.webhooks.is_empty() {
            let hooks = &self.shared.webhooks;
            let local = self.shared.cluster.is_none();
            if local && before == 0 && total > 0 && webhooks::wanted(&a, "channel_occupied") {
                hooks.emit(
                    app,
                    serde_json::json!({"name":"channel_occupied","channel":&*channel}),
                );
            }
            if local && before > 0 && total == 0 && webhooks::wanted(&a, "channel_vacated") {
                hooks.emit(
                    app,
                    serde_json::json!({"name":"channel_vacated","channel":&*channel}),
                );
            }
            if !presence && webhooks::wanted(&a, "subscription_count") {
                hooks.emit(
                    app,
                    serde_json::json!({"name":"subscription_count","channel":&*channel,"subscription_count":total}),
                );
            }
        }
        if a.subscription_count && !presence {
            let data = format!(r#"{{"subscription_count":{total}}}"#);
            self.broadcast_internal(
                app,
                channel,
                "pusher_internal:subscription_count",
                &data,
                None,
            );
        }
    }

    /// A presence webhook (`member_added` when `on`, else `member_removed`). Alone, when the
    /// user's membership changed (`changed`) and the app wants it; in a cluster, the node-level
    /// change (`node_changed`: this node's first or last socket of the user) goes to the
    /// arbiter, which sends the cluster-wide webhook once (`ingest::cluster::Arbiter`).
    fn member_hook(
        &self,
        app: usize,
        changed: bool,
        node_changed: bool,
        on: bool,
        channel: &str,
        user_id: &str,
    ) {
        if let Some(cluster) = &self.shared.cluster {
            if node_changed {
                cluster.publish(&Wire::Hook {
                    node: self.shared.node,
                    app: self.shared.router.app_id(app).to_owned(),
                    key: crate::cluster::wire::hook_key_member(channel, user_id),
                    on,
                });
            }
            return;
        }
        if !changed {
            return;
        }
        let name = if on { "member_added" } else { "member_removed" };
        let a = self.app(app);
        if !a.webhooks.is_empty() && webhooks::wanted(&a, name) {
            self.shared.webhooks.emit(
                app,
                serde_json::json!({"name": name, "channel": channel, "user_id": user_id}),
            );
        }
    }

    /// terminate_connections: close every connection signed in as `user_id` with 4009.
    fn terminate_user(&self, app: usize, user_id: &str) {
        for conn in self.conns.borrow().all() {
            if conn.app == app && conn.user().as_deref() == Some(user_id) {
                conn.close_pusher(PusherError::Unauthorized);
                self.mark_dirty(&conn);
            }
        }
    }

    /// This shard's part of an HTTP API read. A channel listing is taken here (its names are
    /// shared with the index, not copied) and built by a task of its own, in slices
    /// (`answer_listing`), so a large one never holds up this shard's sockets.
    fn answer(&self, q: Query) {
        if let QueryKind::Channels { prefix } = &q.what {
            let (names, part) = self.listing(q.app, prefix);
            glommio::spawn_local(answer_listing(Arc::clone(&self.shared), q, names, part)).detach();
            return;
        }
        let mut part = QueryPart::default();
        let index = self.index.borrow();
        let presence = self.presence.borrow();
        let router = &self.shared.router;
        match &q.what {
            QueryKind::Connections => {
                part.connections = self
                    .conns
                    .borrow()
                    .iter()
                    .filter(|c| c.app == q.app)
                    .count() as u64;
            }
            // Answered by `answer_listing` (above).
            QueryKind::Channels { .. } => {}
            QueryKind::TopChannels { limit } => {
                part.channels_total = index.channel_count(q.app) as u64;
                part.channels = top(index.channels(q.app).map(|(n, s)| (&**n, s)), *limit)
                    .map(|(name, subs)| ChannelPart {
                        name: name.to_owned(),
                        subscriptions: subs as u64,
                        users: None,
                    })
                    .collect();
                part.channels
                    .extend(top(presence.channels(q.app), *limit).map(|(name, users)| {
                        ChannelPart {
                            name: name.to_owned(),
                            subscriptions: 0,
                            users: Some(users as u64),
                        }
                    }));
            }
            QueryKind::Channel { name } => {
                let subs = index.subscribers(q.app, name).len() as u64;
                let users = (router.owner(q.app, name) == self.id)
                    .then(|| presence.count(q.app, name) as u64);
                part.channels.push(ChannelPart {
                    name: name.to_string(),
                    subscriptions: subs,
                    users,
                });
            }
            QueryKind::Users { channel } => {
                if router.owner(q.app, channel) == self.id {
                    part.users = Some(presence.user_ids(q.app, channel));
                }
            }
        }
        send_answer(&self.shared, q, part);
    }

    /// The channels of `app` named `prefix…` on this shard: the index's own names with their
    /// subscriber counts, and (in `part`) the presence channels this shard owns with their
    /// members. At most one more than a listing may hold of each: enough for the asker to
    /// know it is over `max_channels_listed`.
    fn listing(&self, app: usize, prefix: &str) -> (Vec<(Rc<str>, u64)>, QueryPart) {
        let most = self.shared.cfg.max_channels_listed.saturating_add(1);
        let names = self
            .index
            .borrow()
            .channels(app)
            .filter(|(name, _)| name.starts_with(prefix))
            .take(most)
            .map(|(name, subs)| (Rc::clone(name), subs as u64))
            .collect();
        let part = QueryPart {
            channels: self
                .presence
                .borrow()
                .channels(app)
                .filter(|(name, _)| name.starts_with(prefix))
                .take(most)
                .map(|(name, users)| ChannelPart {
                    name: name.to_owned(),
                    subscriptions: 0,
                    users: Some(users as u64),
                })
                .collect(),
            ..QueryPart::default()
        };
        (names, part)
    }

    fn collect(&self, a: Answer) {
        let mut queries = self.queries.borrow_mut();
        if let Some(p) = queries.get_mut(&a.id) {
            p.parts.push(a.part);
            if p.parts.len() == p.expected {
                if let Some(w) = p.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Asks every shard for its part of `what` and merges the answers. `None` if some shard did
    /// not answer in time (its inbox was full or it is stuck), so counts are exact or absent.
    pub async fn query(&self, app: usize, what: QueryKind) -> Option<Vec<QueryPart>> {
        let id = self.next_query.get();
        self.next_query.set(id + 1);
        let router = &self.shared.router;
        let n = router.shards();
        // In a cluster, every live node's shards answer too.
        let peers = self
            .shared
            .cluster
            .as_ref()
            .map(|c| c.peers())
            .unwrap_or_default();
        let remote: usize = peers.iter().map(|(_, shards)| shards).sum();
        let expected = n + remote;
        self.queries.borrow_mut().insert(
            id,
            PendingQuery {
                expected,
                parts: Vec::with_capacity(expected),
                waker: None,
            },
        );
        let mut sent = 0;
        for shard in 0..n {
            let q = Query {
                id,
                origin: self.id,
                app,
                what: what.clone(),
                remote: None,
            };
            if router.try_push(shard, ShardCmd::Query(q)).is_ok() {
                sent += 1;
            }
        }
        if let (Some(cluster), true) = (&self.shared.cluster, remote > 0) {
            cluster.publish(&Wire::Query {
                node: self.shared.node,
                origin: self.id,
                id,
                app: router.app_id(app).to_owned(),
                kind: WireQuery::from_kind(&what),
            });
            sent += remote;
        }
        let wait = std::future::poll_fn(|cx| {
            let mut queries = self.queries.borrow_mut();
            let Some(p) = queries.get_mut(&id) else {
                return std::task::Poll::Ready(());
            };
            if p.parts.len() >= p.expected {
                std::task::Poll::Ready(())
            } else {
                p.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        });
        let complete = sent == expected
            && glommio::timer::timeout(QUERY_TIMEOUT, async {
                wait.await;
                Ok(())
            })
            .await
            .is_ok();
        let p = self.queries.borrow_mut().remove(&id)?;
        (complete && p.parts.len() == expected).then_some(p.parts)
    }

    pub fn cached(&self, app: usize, channel: &str) -> Option<(Bytes, u64)> {
        let now = Instant::now();
        let cache = self.cache.borrow();
        Some((
            cache.get(app, channel, now)?.clone(),
            cache.ttl_left(app, channel, now)?,
        ))
    }

    /// Liveness: pings connections silent for their app's activity timeout, closes those that
    /// stay silent `pong_timeout` after the ping (4201), and ends closing connections whose
    /// peers never finished the close handshake.
    fn sweep(&self, now: Instant) {
        self.cache.borrow_mut().purge(now);
        let pong_timeout = self.shared.cfg.pong_timeout;
        for conn in self.conns.borrow().all() {
            let activity = Duration::from_secs(self.app(conn.app).activity_timeout.into());
            conn.check_liveness(now, activity, pong_timeout);
        }
    }
}

/// Channels a listing task turns into its answer between two chances for the shard's other
/// tasks to run: a few hundred microseconds of copying at most.
pub(crate) const LISTING_SLICE: usize = 1024;

/// Gives the shard's sockets a turn between two slices of a long job. glommio polls for I/O
/// only when its task queue runs dry or its preemption timer (100 ms) fires, so
/// `yield_if_needed` would let a job of many slices run for up to 100 ms without the shard
/// reading a socket (measured: a 41 MB listing held a ping 205 ms that way); a short sleep takes
/// the job off the queue until the reactor has polled.
pub(crate) async fn breathe() {
    glommio::timer::sleep(Duration::from_micros(20)).await;
}

/// Builds a channel listing's answer from the names `Shard::listing` took, a slice at a time,
/// then sends it like any other part.
async fn answer_listing(
    shared: Arc<Shared>,
    q: Query,
    names: Vec<(Rc<str>, u64)>,
    mut part: QueryPart,
) {
    part.channels.reserve(names.len());
    for slice in names.chunks(LISTING_SLICE) {
        part.channels
            .extend(slice.iter().map(|(name, subs)| ChannelPart {
                name: name.to_string(),
                subscriptions: *subs,
                users: None,
            }));
        breathe().await;
    }
    drop(names);
    send_answer(&shared, q, part);
}

/// Sends a shard's part of a query to the asking shard, or through Redis to the asking node.
fn send_answer(shared: &Shared, q: Query, part: QueryPart) {
    if let (Some(node), Some(cluster)) = (q.remote, &shared.cluster) {
        cluster.publish(&Wire::Answer {
            node: shared.node,
            to: node,
            origin: q.origin,
            id: q.id,
            connections: part.connections,
            channels: part
                .channels
                .into_iter()
                .map(|c| (c.name, c.subscriptions, c.users))
                .collect(),
            users: part.users,
            channels_total: part.channels_total,
        });
        return;
    }
    if shared
        .router
        .try_push(q.origin, ShardCmd::Answer(Answer { id: q.id, part }))
        .is_err()
    {
        tracing::warn!("inbox full: query answer dropped");
    }
}

/// The `limit` entries with the largest counts (ties by name), largest first: a bounded heap,
/// so a shard with a million channels keeps `limit` of them, not a sorted copy of all.
fn top<'a>(
    entries: impl Iterator<Item = (&'a str, usize)>,
    limit: usize,
) -> impl Iterator<Item = (&'a str, usize)> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // A min-heap of the best so far: its top is the first to give way.
    let mut heap: BinaryHeap<Reverse<(usize, Reverse<&'a str>)>> = BinaryHeap::new();
    for (name, n) in entries {
        let e = Reverse((n, Reverse(name)));
        if heap.len() < limit {
            heap.push(e);
        } else if heap.peek().is_some_and(|least| e < *least) {
            heap.pop();
            heap.push(e);
        }
    }
    heap.into_sorted_vec()
        .into_iter()
        .map(|Reverse((n, Reverse(name)))| (name, n))
}

/// Runs shard `id` on the current glommio executor: starts its accept loop and liveness sweep,
/// reports readiness, then serves its inbox forever. `routes`: what its HTTP phase serves beside
/// the API (the console's).
pub async fn run(
    id: usize,
    shared: Arc<Shared>,
    listener: socket2::Socket,
    ready: std::sync::mpsc::Sender<usize>,
    routes: Option<Arc<dyn http::RouteHook>>,
) {
    let dup = listener.try_clone().ok();
    let listener = crate::sys::into_glommio_listener(listener);
    let mut shard = Shard::new(id, shared);
    shard.routes = routes;
    let shard = Rc::new(shard);
    *shard.listener.borrow_mut() = dup;
    let accept = glommio::spawn_local(accept_loop(Rc::clone(&shard), listener));
    *shard.accept_task.borrow_mut() = Some(accept);
    glommio::spawn_local(sweep_loop(Rc::clone(&shard))).detach();
    if shard.shared.cfg.write_coalesce_ms > 0 {
        glommio::spawn_local(pacer_loop(Rc::clone(&shard))).detach();
    }
    if shard.shared.cfg.send_ring {
        match crate::sys::send_ring::SendRing::new() {
            Ok(r) => *shard.ring.borrow_mut() = Some(r),
            Err(e) => tracing::warn!(
                shard = id,
                error = %e,
                "no io_uring for batched sends: writing with one sendmsg per connection"
            ),
        }
    }
    let _ = ready.send(id);
    tracing::debug!(shard = id, "accepting");
    loop {
        shard.shared.router.ready(id).await;
        shard.drain_inbox();
        if let Some(window) = shard.drain_requested.take() {
            glommio::spawn_local(drain(Rc::clone(&shard), window)).detach();
        }
        glommio::yield_if_needed().await;
    }
}

/// Closes every client with 4200 in random order, spread evenly over `window`, so they do not
/// all reconnect in the same instant; waits for the closes to finish (bounded), then reports.
async fn drain(shard: Rc<Shard>, window: Duration) {
    const STEP: Duration = Duration::from_millis(50);
    // Close no client before every shard's listener is closed: a client closed here must not
    // reconnect to this process through another shard's listener, nor miss an event that the
    // HTTP API of this process would take after its reconnect to the new one.
    let all_closed = Instant::now() + Duration::from_secs(1);
    while shard
        .shared
        .listeners_closed
        .load(std::sync::atomic::Ordering::SeqCst)
        < shard.shared.router.shards()
        && Instant::now() < all_closed
    {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    let mut conns = shard.conns.borrow().all();
    // Fisher-Yates with the shard's generator: the jitter.
    for i in (1..conns.len()).rev() {
        let j = (shard.random() % (i as u64 + 1)) as usize;
        conns.swap(i, j);
    }
    tracing::info!(
        shard = shard.id,
        connections = conns.len(),
        ?window,
        "draining"
    );
    // At most one batch per STEP, and the batches cover the whole window.
    let steps = (window.as_millis() / STEP.as_millis()).max(1) as usize;
    let batches = steps.min(conns.len()).max(1);
    let per_batch = conns.len().div_ceil(batches).max(1);
    for chunk in conns.chunks(per_batch) {
        for conn in chunk {
            conn.close_pusher(PusherError::Restarting);
            conn.flush_and_notify();
        }
        glommio::timer::sleep(window / batches as u32).await;
    }
    let deadline = Instant::now() + Duration::from_secs(6);
    while shard.connection_count() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(STEP).await;
    }
    shard
        .shared
        .drained
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

async fn accept_loop(shard: Rc<Shard>, listener: glommio::net::TcpListener) {
    // The classic EMFILE defence: one descriptor held in reserve, given back to take one pending
    // connection off the listen queue and close it, so clients are answered (by a close)
    // instead of waiting in a queue that cannot move. The socket budget (`admission`) keeps
    // this from happening unless something else used the reserve.
    let mut spare = spare_fd();
    let mut errors = admission::AcceptErrors::default();
    loop {
        match listener.accept().await {
            Ok(stream) => {
                if !admit_and_serve(&shard, stream) {
                    // Room was made by closing another connection: let its task run (and its
                    // descriptor close) before taking more.
                    futures_lite::future::yield_now().await;
                }
                if spare.is_none() {
                    spare = spare_fd();
                }
            }
            Err(e) => {
                let e = std::io::Error::from(e);
                shard
                    .shared
                    .admission
                    .accept_errors
                    .fetch_add(1, Ordering::Relaxed);
                let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                if exhausted && spare.take().is_some() {
                    let pending = glommio::timer::timeout(Duration::from_millis(50), async {
                        Ok(listener.accept().await.ok())
                    })
                    .await;
                    if let Ok(Some(s)) = pending {
                        admission::refuse_socket(
                            &shard,
                            s.as_raw_fd(),
                            admission::Refusal::Descriptors,
                        );
                    }
                    spare = spare_fd();
                }
                if let Some(failures) = errors.note(Instant::now()) {
                    tracing::warn!(
                        shard = shard.id,
                        error = %e,
                        failures,
                        "accept failed (failures since the last such line; one line per 10 s at most)"
                    );
                }
                if spare.is_none() {
                    // No descriptor to trade: back off instead of spinning on the error.
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Admits an accepted socket and starts serving it, or refuses it at once. `false` when a
/// connection of another address was closed to make room.
fn admit_and_serve(shard: &Rc<Shard>, stream: glommio::net::TcpStream) -> bool {
    let Ok(peer) = stream.peer_addr() else {
        // Already reset by the client.
        return true;
    };
    let trusted = shard.shared.cfg.trusted_proxies.contains(peer.ip());
    match admission::admit(shard, peer.ip(), trusted) {
        Ok((ticket, made_room)) => {
            glommio::spawn_local(conn::serve(Rc::clone(shard), stream, peer, ticket)).detach();
            !made_room
        }
        Err(why) => {
            admission::refuse_socket(shard, stream.as_raw_fd(), why);
            true
        }
    }
}

fn spare_fd() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Write coalescing: sleeps until the first deferred connection's window ends, writes the due
/// ones, and parks while nothing is deferred.
async fn pacer_loop(shard: Rc<Shard>) {
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

async fn sweep_loop(shard: Rc<Shard>) {
    let tick = Duration::from_millis(500);
    loop {
        glommio::timer::sleep(tick).await;
        shard.sweep(Instant::now());
        crate::sys::allocator_collect();
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
pub(crate) struct AppConnGuard {
    shard: Rc<Shard>,
    app: usize,
}

impl AppConnGuard {
    /// Counts a new connection; `None` (and nothing counted) when the app is at `max`.
    pub(crate) fn try_new(shard: Rc<Shard>, app: usize, max: Option<usize>) -> Option<Self> {
        let counter = &shard.shared.app_conns[app];
        let before = counter.fetch_add(1, Ordering::Relaxed);
        if max.is_some_and(|m| before >= m) {
            counter.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(AppConnGuard { shard, app })
    }
}

impl Drop for AppConnGuard {
    fn drop(&mut self) {
        self.shard.shared.app_conns[self.app].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::top;

    #[test]
    fn top_keeps_the_largest_counts_ties_by_name() {
        let entries = [("d", 1), ("a", 5), ("c", 5), ("b", 9), ("e", 0), ("f", 5)];
        let got: Vec<_> = top(entries.iter().copied(), 3).collect();
        assert_eq!(got, [("b", 9), ("a", 5), ("c", 5)]);
        let all: Vec<_> = top(entries.iter().copied(), 10).collect();
        assert_eq!(all.len(), 6);
        assert_eq!(all.last(), Some(&("e", 0)));
        assert_eq!(top(entries.iter().copied(), 0).count(), 0);
    }
}
