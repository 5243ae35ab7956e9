//! The node: what every shard and thread of this process shares, and none owns. Configuration,
//! the router, the app table, per-app counters, the cluster outbox, the webhook hand-off, the
//! socket budget, drain state, and the ingest counters.
//!
//! Read-only or atomics touched on connect, disconnect, accept and reload only: nothing here is
//! touched per event except the router's inboxes.

pub mod admission;
mod context;
mod publish;

use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::fanout::router::Router;
pub use admission::Admission;
pub use publish::Event;

/// State every shard reads and none owns: configuration, the router, per-app connection
/// counters (touched on connect and disconnect only, never per event).
pub struct Shared {
    pub cfg: Config,
    pub router: Router,
    /// Live connections per app slot, all shards together (for REVERB_APP_MAX_CONNECTIONS).
    pub app_conns: Box<[AtomicUsize]>,
    /// Channels with subscribers per app slot, summed over shards (each shard's index entries),
    /// for the app's `max_channels`. Touched when a shard's index gains or loses a channel,
    /// never per event.
    pub app_channels: Box<[AtomicUsize]>,
    /// The app table (replaced by a reload); shards keep their own copy of it.
    pub apps: Arc<crate::apps::Apps>,
    /// Redis ingest state and counters (written by the ingest thread).
    pub ingest: IngestStats,
    /// This node's id: presence sockets are counted per node.
    pub node: u64,
    /// Cluster mode: talking to the other nodes.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Webhook hand-off (used when an app has webhook endpoints).
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// TLS on the main port (replaced by a reload); `None`: plain only.
    pub tls: std::sync::RwLock<Option<Arc<rustls::ServerConfig>>>,
    /// Set when a drain starts: readiness turns false.
    pub draining: std::sync::atomic::AtomicBool,
    /// Shards that finished draining.
    pub drained: AtomicUsize,
    /// The /metrics listener, closed when a drain starts.
    pub metrics_listener: MetricsListener,
    /// Shards whose listener a drain has closed.
    pub listeners_closed: AtomicUsize,
    /// The socket budget, per-IP counts and refusal counters (touched on accept and close).
    pub admission: Admission,
    /// Positioned channels' positions and history (locked per event on those channels only).
    pub resume: crate::resume::Histories,
    /// Shared-context compression: each channel's last compressed message (`context`).
    pub contexts: context::Contexts,
}

impl Shared {
    pub fn new(cfg: Config) -> Shared {
        let app_ids = cfg.apps.iter().map(|a| a.id.clone()).collect();
        let router = Router::new(cfg.shards(), cfg.inbox_capacity, app_ids);
        let apps = Arc::new(crate::apps::Apps::new(crate::apps::AppSet::new(
            cfg.apps.clone(),
        )));
        let app_conns = (0..crate::apps::MAX_APP_SLOTS)
            .map(|_| AtomicUsize::new(0))
            .collect();
        let app_channels = (0..crate::apps::MAX_APP_SLOTS)
            .map(|_| AtomicUsize::new(0))
            .collect();
        let webhooks = Arc::new(crate::webhooks::Webhooks::new(cfg.webhook_queue_capacity));
        let node = crate::cluster::wire::new_node_id();
        let limits = cfg.redis.as_ref().map(|r| r.outbox).unwrap_or_default();
        let cluster = cfg
            .cluster
            .clone()
            .map(|channel| Arc::new(crate::cluster::Cluster::new(node, channel, limits)));
        let admission = Admission::new(cfg.fd_reserve, cfg.max_connections_per_ip);
        // A standalone restart must never reuse an epoch: seed from the clock and the node id.
        let seed = node
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        let resume = crate::resume::Histories::new(cfg.resume, seed);
        Shared {
            contexts: Default::default(),
            resume,
            admission,
            cfg,
            router,
            apps,
            app_conns,
            ingest: Default::default(),
            node,
            cluster,
            webhooks,
            app_channels,
            tls: Default::default(),
            draining: Default::default(),
            drained: AtomicUsize::new(0),
            metrics_listener: Default::default(),
            listeners_closed: AtomicUsize::new(0),
        }
    }
}

/// Counters shared with the shards (read on `/up`; written by the ingest thread only).
#[derive(Debug, Default)]
pub struct IngestStats {
    pub enabled: AtomicBool,
    /// Every subscription this node needs is up (one, or two on a Redis Cluster in cluster
    /// mode: Laravel's and the nodes' channel).
    pub connected: AtomicBool,
    /// Subscriptions up, and how many are needed.
    live: AtomicUsize,
    pub wanted: AtomicUsize,
    /// Since when Redis has been down (Unix ms; 0: up).
    pub down_since_ms: AtomicU64,
    /// Successful (re)subscriptions after the first.
    pub reconnects: AtomicU64,
    pub events: AtomicU64,
    /// Messages that were not Laravel's payload shape, or named an invalid channel.
    pub malformed: AtomicU64,
    /// Shard copies dropped because a shard's inbox was full.
    pub dropped: AtomicU64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl IngestStats {
    /// A subscription is up (`true` when it made all of them up).
    pub fn up(&self) -> bool {
        let live = self.live.fetch_add(1, Ordering::AcqRel) + 1;
        let all = live >= self.wanted.load(Ordering::Relaxed);
        if all {
            self.connected.store(true, Ordering::Relaxed);
            self.down_since_ms.store(0, Ordering::Relaxed);
        }
        all
    }

    /// A subscription is down (or never came up: `first`).
    pub fn down(&self, first: bool) {
        if !first {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
        self.connected.store(false, Ordering::Relaxed);
        let _ =
            self.down_since_ms
                .compare_exchange(0, unix_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// How long Redis has been down, and since when (Unix ms).
    pub fn down_for(&self) -> Option<(std::time::Duration, u64)> {
        match self.down_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some((
                std::time::Duration::from_millis(unix_ms().saturating_sub(since)),
                since,
            )),
        }
    }
}

/// The metrics listener's handle, for the drain to close it (`exporter` holds the listener).
#[derive(Debug, Default)]
pub struct MetricsListener {
    /// A duplicate of the listening socket, shut down by [`MetricsListener::close`].
    socket: Mutex<Option<socket2::Socket>>,
    closed: AtomicBool,
}

impl MetricsListener {
    /// Stops accepting at once (a drain starting): shutting the listening socket down takes it
    /// out of the port's SO_REUSEPORT group, so new scrapes go to a process started beside this
    /// one, and wakes the accept loop, which then closes it. Scrapes already accepted are
    /// answered.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sk) = socket {
            let _ = sk.shutdown(Shutdown::Both);
        }
    }

    /// Keeps a duplicate of the listening socket, for `close` to shut down.
    pub fn hold(&self, socket: socket2::Socket) {
        *self.socket.lock().unwrap_or_else(|e| e.into_inner()) = Some(socket);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}
