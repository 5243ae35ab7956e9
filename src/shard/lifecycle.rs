//! A shard's life: `run` (the executor's main loop: accept, sweep and pacer tasks, then the
//! inbox forever), the accept loop and its EMFILE defence, the liveness sweep, app-table
//! reloads, terminate_connections, and the graceful drain.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{accept, admission, http, pacing, Shard};
use crate::node::Shared;
use crate::protocol::PusherError;

impl Shard {
    /// Takes a new app table: per-app state grows to its slots, and the connections of apps it
    /// no longer has are closed with 4003 (Pusher's "application disabled").
    pub(super) fn reload(&self, set: &crate::apps::AppSet) {
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

    /// Stops accepting now: shutting the listener down takes it out of the port's SO_REUSEPORT
    /// group, so the kernel sends new connections to the other listeners on this port (a new
    /// process started beside this one); dropping the task cancels it and closes its
    /// descriptor. The shard loop then starts the drain.
    pub(super) fn stop_accepting(&self, window: Duration) {
        if let Some(sk) = self.listener.borrow_mut().take() {
            let _ = sk.shutdown(std::net::Shutdown::Both);
        }
        self.accept_task.borrow_mut().take();
        self.shared
            .listeners_closed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.drain_requested.set(Some(window));
    }

    /// Liveness: pings connections silent for their app's activity timeout, closes those that
    /// stay silent `pong_timeout` after the ping (4201), and ends closing connections whose
    /// peers never finished the close handshake.
    pub(super) fn sweep(&self, now: Instant) {
        self.cache.borrow_mut().purge(now);
        let pong_timeout = self.shared.cfg.pong_timeout;
        for conn in self.conns.borrow().all() {
            let activity = Duration::from_secs(self.app(conn.app).activity_timeout.into());
            conn.check_liveness(now, activity, pong_timeout);
        }
    }

    /// terminate_connections: close every connection signed in as `user_id` with 4009.
    pub(super) fn terminate_user(&self, app: usize, user_id: &str) {
        for conn in self.conns.borrow().all() {
            if conn.app == app && conn.user().as_deref() == Some(user_id) {
                conn.close_pusher(PusherError::Unauthorized);
                self.mark_dirty(&conn);
            }
        }
    }
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
        glommio::spawn_local(pacing::pacer_loop(Rc::clone(&shard))).detach();
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
pub(super) async fn drain(shard: Rc<Shard>, window: Duration) {
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

pub(super) async fn accept_loop(shard: Rc<Shard>, listener: glommio::net::TcpListener) {
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
pub(super) fn admit_and_serve(shard: &Rc<Shard>, stream: glommio::net::TcpStream) -> bool {
    let Ok(peer) = stream.peer_addr() else {
        // Already reset by the client.
        return true;
    };
    let trusted = shard.shared.cfg.trusted_proxies.contains(peer.ip());
    match admission::admit(shard, peer.ip(), trusted) {
        Ok((ticket, made_room)) => {
            glommio::spawn_local(accept::serve(Rc::clone(shard), stream, peer, ticket)).detach();
            !made_room
        }
        Err(why) => {
            admission::refuse_socket(shard, stream.as_raw_fd(), why);
            true
        }
    }
}

pub(super) fn spare_fd() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

pub(super) async fn sweep_loop(shard: Rc<Shard>) {
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
