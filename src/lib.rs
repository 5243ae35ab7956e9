//! bts-guru: a thread-per-core WebSocket broadcast server speaking the Pusher Channels protocol
//! 7 and the Pusher HTTP API, a drop-in replacement for Laravel Reverb.
//!
//! # Layout, in layers
//! Each module imports only from the layers above it in this list (no import circles); the
//! list follows the data: pure formats, configuration, counters, the hand-off to the shards,
//! the node-wide context, the shards, then what feeds and watches them.
//! - [`protocol`]: the Pusher wire contract (channel names, signatures, client and server
//!   messages, error codes). Pure: no I/O, no clock.
//! - [`ws`]: WebSocket handshake, chunked bodies and frame codec. Knows nothing of Pusher.
//! - [`sys`]: the only `unsafe`: vectored `sendmsg`, the send ring, listener hand-off,
//!   affinity, rlimits, the allocator.
//! - [`proxy`]: PROXY protocol headers, trusted proxies and `X-Forwarded-For`. Pure.
//! - [`config`]: CLI flags, Reverb's environment names and a TOML file, resolved into a validated
//!   [`config::Config`]. No sockets, no threads.
//! - [`apps`]: the app table, replaceable at run time (slots never reused).
//! - [`tls`]: rustls configuration from PEM files.
//! - [`redis_conn`]: where the Redis data nodes are (one server, Sentinel, Redis Cluster): a
//!   connection for the primary or for a key, followed across failovers; pub/sub reading.
//! - [`metrics`]: plain counters (thread-local write counters, a shard's scrape `Snapshot`).
//! - [`fanout`]: frames each event once; every shard's bounded inbox and the commands it carries.
//! - [`webhooks`]: Pusher webhooks on their own thread, bounded per class.
//! - [`cluster`]: the cluster's wire format and the outbox shards publish through.
//! - [`node`]: what every shard and thread shares (`node::Shared`), and the one publish call.
//! - [`shard`]: one per core: listener, HTTP phase and API, connections, subscription index,
//!   owner-shard state, fan-out and writes.
//! - [`ingest`]: Laravel's Redis broadcaster and the cluster receiver, on one pinned thread.
//! - [`exporter`]: `/metrics` on its own listener.
//! - [`simulate`]: `bts-guru simulate`, a live-sports feed publishing through the HTTP API or Redis.
//! - [`doctor`]: `bts-guru doctor`, host checks against a tuning profile.
//! - [`console`]: the debug console page at `/console` (off by default), registered with the
//!   shards through their route hook, and `bts-guru demo`.
//!
//! The load generator, `bts-guru-bench`, is a package of its own (`benches/loadgen`): a client of
//! any Pusher server, using this library only for pure parts ([`protocol::auth`]'s signing,
//! [`ws::codec`]'s frame header and masking).
//!
//! [`run`] binds every shard's listener, starts one pinned glommio executor per shard, and
//! returns once all of them accept connections.

// Layer 1, pure: formats and the only `unsafe`.
pub mod protocol;
pub mod proxy;
pub mod sys;
pub mod ws;

// Layer 2: the server's configuration, then what is built from it.
pub mod config;

pub mod apps;
pub mod redis_conn;
pub mod tls;

// Layer 3: plain counters.
pub mod metrics;

// Layer 4: the hand-off to the shards.
pub mod fanout;

// Layer 5: beside it, the other hand-offs, and positioned channels' history.
pub mod cluster;
pub mod resume;
pub mod webhooks;

// Layer 6: the node-wide context.
pub mod node;

// Layer 7: the shards.
pub mod shard;

// Layer 8: what feeds and watches them.
pub mod exporter;
pub mod ingest;

// Layer 9: the tools beside the server (the console's demo runs the simulator).
pub mod doctor;
pub mod simulate;

pub mod console;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

pub use config::Config;

/// glommio registers `io_memory` with 3 io_uring rings per executor, pinned against
/// RLIMIT_MEMLOCK (docs/glommio-findings.md §1). Our sockets never use those buffers (they are
/// for DMA file I/O), so a small amount is enough: 512 KiB pins 1.5 MiB per executor, and 3
/// executors fit in an 8 MiB limit with room to spare.
pub const IO_MEMORY: usize = 512 << 10;
/// Smallest `io_memory` we will shrink to when many shards share a tight memlock limit.
pub const MIN_IO_MEMORY: usize = 64 << 10;
/// glommio refuses to start below this RLIMIT_MEMLOCK, whatever `io_memory` is.
pub const GLOMMIO_MIN_MEMLOCK: u64 = 512 << 10;
/// Backlog for each shard's listener (the kernel caps it at net.core.somaxconn).
pub const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "locked-memory limit too low: {shards} shard(s) need {need_kib} KiB of locked memory for \
         glommio's io_uring buffers (3 rings x {per_kib} KiB each) but RLIMIT_MEMLOCK is \
         {limit_kib} KiB; raise it (`ulimit -l`, LimitMEMLOCK= in systemd, memlock in \
         limits.conf; see tuning/) or run fewer shards with --shards"
    )]
    Memlock {
        shards: usize,
        need_kib: u64,
        per_kib: u64,
        limit_kib: u64,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start shard {shard} on CPU {cpu}: {message}")]
    Executor {
        shard: usize,
        cpu: usize,
        message: String,
    },
    #[error("shards did not become ready within 30 s")]
    NotReady,
    #[error("{0}")]
    Tls(String),
    #[error(
        "the open-files limit ({limit}) leaves no room for connections once fd_reserve ({reserve}) \
         and the daemon's own {own} descriptors are set aside; raise it (`ulimit -n`, \
         LimitNOFILE= in systemd, nofile in limits.conf; see tuning/) or lower fd_reserve"
    )]
    Descriptors {
        limit: u64,
        reserve: usize,
        own: usize,
    },
}

/// Client sockets allowed: the open-files limit less the reserve and the descriptors the daemon
/// holds itself (`own`: listeners, io_uring rings, eventfds, logs). `None`: no room at all.
pub fn socket_budget(limit: u64, reserve: usize, own: usize) -> Option<usize> {
    let budget = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .checked_sub(reserve)?
        .checked_sub(own)?;
    (budget >= 16).then_some(budget)
}

/// How much `io_memory` each executor gets, so that `shards` executors fit the memlock limit.
pub fn plan_io_memory(
    shards: usize,
    limit: Option<u64>,
    cap_ipc_lock: bool,
) -> Result<usize, StartError> {
    let Some(limit) = limit.filter(|_| !cap_ipc_lock) else {
        return Ok(IO_MEMORY);
    };
    let per = (limit / (3 * shards as u64)).min(IO_MEMORY as u64) & !4095;
    if limit < GLOMMIO_MIN_MEMLOCK || per < MIN_IO_MEMORY as u64 {
        let per_kib = (MIN_IO_MEMORY as u64).max(per) >> 10;
        return Err(StartError::Memlock {
            shards,
            need_kib: 3 * shards as u64 * per_kib.max(MIN_IO_MEMORY as u64 >> 10),
            per_kib,
            limit_kib: limit >> 10,
        });
    }
    Ok(per as usize)
}

/// A started server.
pub struct Running {
    /// The address every shard listens on (port 0 resolved).
    pub addr: SocketAddr,
    pub shared: Arc<node::Shared>,
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
}

/// Graceful drain of every shard: readiness turns false, every listener closes (the shards'
/// and the metrics one: new connections go to other processes on the same ports), clients are
/// closed with 4200 spread over `window`, queued frames are flushed first. Blocks until every
/// shard finished, or `window` plus 10 s.
pub fn drain(shared: &node::Shared, window: Duration) {
    use std::sync::atomic::Ordering::SeqCst;
    shared.draining.store(true, SeqCst);
    shared.metrics_listener.close();
    let shards = shared.router.shards();
    for shard in 0..shards {
        let _ = shared
            .router
            .try_push(shard, fanout::router::ShardCmd::Drain { window });
    }
    let deadline = std::time::Instant::now() + window + Duration::from_secs(10);
    while shared.drained.load(SeqCst) < shards && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a configuration reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub apps: apps::Changes,
    /// The TLS certificate and key were read again.
    pub tls: bool,
    /// Settings that differ in the new configuration but need a restart to change.
    pub needs_restart: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Apps(#[from] apps::ReloadError),
    #[error("{0}")]
    Tls(String),
    #[error(
        "the new configuration has no app and would switch to the built-in development \
         credentials; configure at least one app (nothing was changed)"
    )]
    DevCredentials,
    #[error("TLS was not enabled at start; enabling it needs a restart (nothing was changed)")]
    TlsNotEnabled,
}

/// Applies a re-read configuration (SIGHUP): apps added, changed or removed (a removed app's
/// connections are closed with 4003; other apps' connections are untouched), and the TLS
/// certificate read again. Everything else needs a restart and is listed in `needs_restart`.
/// Nothing changes when an error is returned.
pub fn reload(shared: &node::Shared, cfg: &Config) -> Result<Reloaded, ReloadError> {
    if cfg.dev_credentials && !shared.cfg.dev_credentials {
        return Err(ReloadError::DevCredentials);
    }
    let old = &shared.cfg;
    let new_tls = match (&cfg.tls, &old.tls) {
        (Some(files), Some(_)) => Some(tls::load(files).map_err(ReloadError::Tls)?),
        (Some(_), None) => return Err(ReloadError::TlsNotEnabled),
        (None, _) => None,
    };
    let mut needs_restart = Vec::new();
    let mut differs = |name: &'static str, same: bool| {
        if !same {
            needs_restart.push(name);
        }
    };
    differs("listen address", cfg.listen == old.listen);
    differs("shards", cfg.shard_cpus == old.shard_cpus);
    differs("redis", cfg.redis == old.redis);
    differs("cluster", cfg.cluster == old.cluster);
    differs("metrics", cfg.metrics == old.metrics);
    differs(
        "max_request_size",
        cfg.max_request_size == old.max_request_size,
    );
    differs(
        "max_outbound_bytes",
        cfg.max_outbound_bytes == old.max_outbound_bytes,
    );
    differs("inbox_capacity", cfg.inbox_capacity == old.inbox_capacity);
    differs(
        "handshake_timeout",
        cfg.handshake_timeout == old.handshake_timeout,
    );
    differs("pong_timeout", cfg.pong_timeout == old.pong_timeout);
    differs("drain window", cfg.drain_window == old.drain_window);
    differs(
        "max_cache_channels",
        cfg.max_cache_channels == old.max_cache_channels,
    );
    differs("fd_reserve", cfg.fd_reserve == old.fd_reserve);
    differs(
        "max_connections_per_ip",
        cfg.max_connections_per_ip == old.max_connections_per_ip,
    );
    differs(
        "trusted_proxies",
        cfg.trusted_proxies == old.trusted_proxies,
    );
    differs("proxy_protocol", cfg.proxy_protocol == old.proxy_protocol);
    differs(
        "webhook_queue_capacity",
        cfg.webhook_queue_capacity == old.webhook_queue_capacity,
    );
    differs(
        "max_channels_per_shard",
        cfg.max_channels_per_shard == old.max_channels_per_shard,
    );
    differs(
        "max_channels_listed",
        cfg.max_channels_listed == old.max_channels_listed,
    );
    differs(
        "tls (turning it off)",
        cfg.tls.is_some() || old.tls.is_none(),
    );
    let push_all = |cmd: &dyn Fn() -> fanout::router::ShardCmd| {
        for shard in 0..shared.router.shards() {
            // A reload must reach every shard: wait out a full inbox (bounded).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while shared.router.try_push_control(shard, cmd()).is_err() {
                if std::time::Instant::now() > deadline {
                    tracing::error!(shard, "reload: shard inbox stayed full for 10 s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let changes = shared.apps.replace(cfg.apps.clone(), |next, _old| {
        for (slot, app) in next.live() {
            shared.router.set_app_id(slot, &app.id);
        }
        push_all(&|| fanout::router::ShardCmd::Reload(Arc::clone(next)));
    })?;
    let tls_reloaded = new_tls.is_some();
    if let Some(tls) = new_tls {
        *shared.tls.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&tls));
        push_all(&|| fanout::router::ShardCmd::Tls(Arc::clone(&tls)));
    }
    Ok(Reloaded {
        apps: changes,
        tls: tls_reloaded,
        needs_restart,
    })
}

impl Running {
    /// Blocks until every shard stops (today: never, short of the process ending).
    pub fn wait(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Starts the server: binds one SO_REUSEPORT listener per shard on the same address, starts one
/// glommio executor per shard pinned to its CPU, and returns once all of them accept.
pub fn run(cfg: Config) -> Result<Running, StartError> {
    let shards = cfg.shards();
    let io_memory = plan_io_memory(shards, sys::memlock_limit(), sys::has_cap_ipc_lock())?;
    let nofile = sys::raise_nofile();
    if let Some(nofile) = nofile {
        tracing::info!(nofile, "open-files limit");
    }
    // Bind every listener here so that a port in use fails start-up, and port 0 becomes one
    // concrete port that every shard shares.
    let mut listeners = Vec::with_capacity(shards);
    let mut addr = cfg.listen;
    for _ in 0..shards {
        let sk = sys::reuseport_listener(addr, LISTEN_BACKLOG)
            .map_err(|source| StartError::Bind { addr, source })?;
        if addr.port() == 0 {
            if let Some(local) = sk.local_addr().ok().and_then(|a| a.as_socket()) {
                addr = local;
            }
        }
        listeners.push(sk);
    }
    let tls = match &cfg.tls {
        Some(files) => Some(tls::load(files).map_err(StartError::Tls)?),
        None => None,
    };
    let shared = node::Shared::new(cfg);
    *shared.tls.write().unwrap_or_else(|e| e.into_inner()) = tls;
    // Until every thread has opened its descriptors: an estimate of ~16 per shard (rings,
    // eventfds, the spare descriptor), refined below.
    // At most a quarter of the limit, so a small limit still leaves room for clients.
    let reserve = nofile.map_or(shared.cfg.fd_reserve, |limit| {
        shared
            .cfg
            .fd_reserve
            .min(usize::try_from(limit / 4).unwrap_or(usize::MAX))
    });
    if let Some(limit) = nofile {
        let own = sys::open_fds().unwrap_or(0) + 16 * shards;
        let budget = socket_budget(limit, reserve, own).ok_or(StartError::Descriptors {
            limit,
            reserve,
            own,
        })?;
        shared.admission.set_budget(budget, reserve);
    }
    let shared = Arc::new(shared);
    // The console registers its routes with every shard (none when it is off).
    let routes = shared
        .cfg
        .console
        .is_some()
        .then(|| Arc::new(console::ConsoleRoutes) as Arc<dyn shard::http::RouteHook>);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut handles = Vec::with_capacity(shards);
    for (id, listener) in listeners.into_iter().enumerate() {
        let cpu = shared.cfg.shard_cpus[id];
        let shared2 = Arc::clone(&shared);
        let ready = ready_tx.clone();
        let routes = routes.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("bts-shard-{id}"))
            .io_memory(io_memory)
            .spawn(move || shard::run(id, shared2, listener, ready, routes))
            .map_err(|e| StartError::Executor {
                shard: id,
                cpu,
                message: e.to_string(),
            })?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..shards {
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| StartError::NotReady)?;
    }
    // Always started (it idles on its queue): a reload may give an app webhook endpoints.
    {
        let _ = rustls::crypto::ring::default_provider().install_default();
        webhooks::spawn(Arc::clone(&shared.apps), Arc::clone(&shared.webhooks)).map_err(|e| {
            StartError::Executor {
                shard: shards,
                cpu: 0,
                message: format!("cannot start the webhook thread: {e}"),
            }
        })?;
    }
    if let Some(addr) = shared.cfg.metrics {
        let local = exporter::serve(addr, Arc::clone(&shared))
            .map_err(|source| StartError::Bind { addr, source })?;
        tracing::info!(%local, "Prometheus metrics at http://{local}/metrics");
    }
    if shared.cfg.redis.is_some() {
        // rediss:// goes through rustls; pick its crypto provider once for the process
        // (an error only means one is already installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    if let (Some(redis), Some(cluster)) = (&shared.cfg.redis, &shared.cluster) {
        tracing::info!(node = cluster.node, channel = %cluster.channel, "cluster mode");
        let redis = redis_conn::Redis::new(redis.clone());
        cluster::outbox::spawn_publisher(
            redis,
            Arc::clone(cluster),
            shards,
            shared.cfg.resume.events,
        )
        .map_err(|e| StartError::Executor {
            shard: shards,
            cpu: 0,
            message: format!("cannot start the cluster publisher thread: {e}"),
        })?;
    }
    if let Some(redis) = shared.cfg.redis.clone() {
        let redis = redis_conn::Redis::new(redis);
        tracing::info!(redis = %redis.describe(), prefix = %redis.config().prefix, cpu = redis.config().cpu, "starting Redis ingest");
        ingest::redis::spawn(redis, Arc::clone(&shared)).map_err(|e| StartError::Executor {
            shard: shards,
            cpu: 0,
            message: format!("cannot start the Redis ingest thread: {e}"),
        })?;
    }
    if let (Some(limit), Some(fds)) = (nofile, sys::open_fds()) {
        // What the daemon holds itself now that every thread is up (client sockets aside).
        let own = fds.saturating_sub(shared.admission.open());
        let budget = socket_budget(limit, reserve, own).ok_or(StartError::Descriptors {
            limit,
            reserve,
            own,
        })?;
        shared.admission.set_budget(budget, reserve);
        tracing::info!(
            sockets = budget,
            reserve,
            own,
            "client sockets allowed (open-files limit less the reserve and the daemon's own)"
        );
    }
    tracing::info!(%addr, shards, io_memory_kib = io_memory >> 10, "all shards accepting");
    Ok(Running {
        addr,
        shared,
        handles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `BTS_LOG=debug` must work in the build users run: no compile-time cap on tracing's
    /// level (`cargo test --release --lib static_log_level` checks the release profile).
    #[test]
    fn static_log_level_is_not_capped() {
        assert_eq!(
            tracing::level_filters::STATIC_MAX_LEVEL,
            tracing::level_filters::LevelFilter::TRACE
        );
    }

    #[test]
    fn socket_budget_leaves_the_reserve() {
        assert_eq!(socket_budget(20_000, 256, 30), Some(19_714));
        assert_eq!(socket_budget(1024, 256, 30), Some(738));
        assert_eq!(socket_budget(300, 256, 30), None);
        assert_eq!(socket_budget(200, 256, 0), None);
        assert_eq!(socket_budget(u64::MAX, 256, 30), Some(usize::MAX - 286));
    }

    #[test]
    fn three_executors_fit_8_mib() {
        assert_eq!(plan_io_memory(3, Some(8 << 20), false).unwrap(), IO_MEMORY);
        let per = plan_io_memory(16, Some(8 << 20), false).unwrap();
        assert!(3 * 16 * per as u64 <= 8 << 20);
        assert_eq!(plan_io_memory(64, Some(8 << 20), true).unwrap(), IO_MEMORY);
        assert_eq!(plan_io_memory(64, None, false).unwrap(), IO_MEMORY);
        let err = plan_io_memory(3, Some(256 << 10), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("RLIMIT_MEMLOCK is 256 KiB"), "{err}");
        assert!(plan_io_memory(64, Some(8 << 20), false).is_err());
    }
}
