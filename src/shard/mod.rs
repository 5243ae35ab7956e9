//! A shard: one glommio executor pinned to one CPU, owning its listener (SO_REUSEPORT), the
//! connections it accepts, their subscriptions (`index`) and their outbound queues. Here: the
//! `Shard` struct and `handle`, which sends each inbox command to the room that does it.
//!
//! Rooms: `lifecycle` (run, accept loop, sweep, reload, drain), `accept` (a socket's HTTP
//! phase up to the upgrade), `conn` (an upgraded connection's I/O and session loop) with
//! `outqueue` (its bounded queue), `session` (what client messages do), `http` (the HTTP API),
//! `slab` (connections by id), `subscribe` (this shard's subscriptions and what it tells the
//! owners), `owner` (what it does as a channel's or user's owner), `remote` (cluster
//! commands), `query` (reads across shards), `pacing` (fan-out and writes), `index`,
//! `presence`, `cache`, `admission`.
//!
//! May not touch another shard's state: other shards and threads reach it only through its
//! inbox (`fanout::router`). Nothing here is `Send`; there is no lock, `Arc` or atomic on the
//! per-event path (the `Arc<Shared>` is read-only configuration, dereferenced without atomics).

mod accept;
pub mod admission;
pub mod cache;
pub mod conn;
pub mod http;
pub mod index;
mod lifecycle;
mod outqueue;
mod owner;
mod pacing;
pub mod presence;
mod query;
mod remote;
mod session;
mod slab;
mod subscribe;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::fanout::router::ConnId;
use crate::fanout::router::ShardCmd;
use crate::node::Shared;

pub use conn::Conn;
use index::SubscriptionIndex;
pub use lifecycle::run;
use query::PendingQuery;
pub(crate) use query::{breathe, merge, LISTING_SLICE};
pub(crate) use slab::AppConnGuard;
use slab::Slab;

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
    /// Events replayed to resuming clients (`bts_resume_replayed_events_total`).
    pub replayed: Cell<u64>,
    /// Resumes answered `recovered: true` / `recovered: false`.
    pub recovered: Cell<u64>,
    pub not_recovered: Cell<u64>,
    /// This shard's replay budget: (window start on the shard clock in ms, events replayed in
    /// that second).
    pub replay_window: Cell<(u32, usize)>,
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
            frames_conflated: crate::metrics::conflated(),
            frames_delta: crate::metrics::deltas(),
            inbox_overflows: self.shared.router.dropped(self.id),
            channels,
            http: self.stats.http.borrow().clone(),
            subscribes_refused: self.stats.subscribes_refused.borrow().clone(),
            replayed: self.stats.replayed.get(),
            recovered: self.stats.recovered.get(),
            not_recovered: self.stats.not_recovered.get(),
            latency: self
                .stats
                .latency
                .borrow()
                .clone()
                .unwrap_or_else(crate::metrics::new_histogram),
        }
    }

    /// Every command a shard takes from its inbox, to the room that does it.
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
            ShardCmd::Drain { window } => self.stop_accepting(window),
            ShardCmd::CountDelta {
                app,
                channel,
                delta,
            } => self.count_delta(app, channel, delta),
            ShardCmd::Resume(r) => self.resumed(r),
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
            } => self.watch_event(conn, online, &user_id),
        }
    }
}
