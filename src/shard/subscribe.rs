//! A shard's side of subscriptions: adding and removing its connections in its index under the
//! channel caps, and telling the owner shards what changed (subscriber counts, presence joins
//! and leaves, signed-in users and their watchlists). What the owners do with it is `owner`'s.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::conn::Conn;
use super::conn::Enqueued;
use super::index::SubscriptionIndex;
use super::outqueue::Frame;
use super::Shard;
use crate::fanout::router::{ConnId, Joined, PresenceOp, Resume, ResumeOutcome, ShardCmd};
use crate::protocol::{channel, outbound, ChannelKind, SocketId};
use crate::webhooks;

/// Why a subscribe that would add a channel to a shard's index was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChannelLimit {
    #[error("Channel limit reached: at most {0} channels with subscribers per shard")]
    Shard(usize),
    #[error("Channel limit reached: this app may have at most {0} channels with subscribers")]
    App(usize),
}

impl ChannelLimit {
    pub(super) fn reason(self) -> &'static str {
        match self {
            ChannelLimit::Shard(_) => "shard_channels",
            ChannelLimit::App(_) => "app_channels",
        }
    }
}

impl Shard {
    /// Adds `conn` to a channel's local subscribers; `Ok(false)` if it already was one. A
    /// channel new to this shard's index must fit under the shard's and the app's channel caps.
    pub(super) fn subscribe_local(&self, conn: &Conn, channel: &str) -> Result<bool, ChannelLimit> {
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
    pub(super) fn reserve_channel(
        &self,
        index: &SubscriptionIndex,
        app: usize,
    ) -> Result<(), ChannelLimit> {
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
    pub(super) fn refused(&self, reason: &'static str) {
        *self
            .stats
            .subscribes_refused
            .borrow_mut()
            .entry(reason)
            .or_default() += 1;
    }

    /// Removes `conn` from a channel's local subscribers; `false` if it was not one.
    pub(super) fn unsubscribe_local(&self, conn: &Conn, channel: &str) -> bool {
        let removed = self.with_channel_count(conn.app, |index| {
            index.unsubscribe(conn.id, conn.app, channel)
        });
        if removed {
            self.count_changed(conn.app, channel, -1);
        }
        removed
    }

    /// Runs `f` on the index and gives back to `app`'s channel count the channels it emptied.
    pub(super) fn with_channel_count<T>(
        &self,
        app: usize,
        f: impl FnOnce(&mut SubscriptionIndex) -> T,
    ) -> T {
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
    pub(super) fn count_changed(&self, app: usize, channel: &str, delta: i64) {
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
    pub(super) fn leave_presence(&self, conn: &Conn, channel: &str) {
        let user = {
            let mut ext = conn.ext();
            let pos = ext.presence.iter().position(|(c, _)| &**c == channel);
            pos.map(|i| ext.presence.swap_remove(i).1)
        };
        if let Some(user) = user {
            self.send_leave(conn, channel, &user);
        }
    }

    pub(super) fn send_leave(&self, conn: &Conn, channel: &str, user: &str) {
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
    pub(super) fn send_cached(&self, conn: &Conn, channel: &str) {
        if !channel::is_cache(channel) {
            return;
        }
        let cache = self.cache.borrow();
        match cache.get(conn.app, channel, Instant::now()) {
            Some(frame) => {
                conn.enqueue_shared(frame, usize::MAX);
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

    /// The owner answered a join: start the subscription, or undo a join nobody waits for.
    pub(super) fn presence_joined(&self, j: Joined) {
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
                conn.enqueue_shared(&Rc::new(Frame::plain(frame)), usize::MAX);
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

    /// A connection signed in (`+1`) or closed (`-1`) as `user`: tell the user's owner, and
    /// start or stop watching the users on its watchlist.
    pub(super) fn user_presence(&self, conn: &Conn, user: &str, delta: i32) {
        let watchlist = conn.ext().watchlist.clone();
        self.user_watch(conn, user, delta, watchlist);
    }

    /// A signed-in connection ended: its user loses a connection, its watches stop.
    pub(super) fn user_offline(&self, conn: &Conn, user: &str, watchlist: Vec<Rc<str>>) {
        self.user_watch(conn, user, -1, watchlist);
    }

    pub(super) fn user_watch(&self, conn: &Conn, user: &str, delta: i32, watchlist: Vec<Rc<str>>) {
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

    /// Subscribes a registered connection (for benches and tests of the pure path).
    #[doc(hidden)]
    pub fn bench_subscribe(&self, conn: &Conn, channel: &str) {
        let _ = self.subscribe_local(conn, channel);
    }

    /// `pusher_internal:watchlist_events` for one of this shard's connections.
    pub(super) fn watch_event(&self, conn: ConnId, online: bool, user_id: &str) {
        let conn = self.conns.borrow().get(conn).cloned();
        if let Some(conn) = conn {
            let name = if online { "online" } else { "offline" };
            conn.send_text(&outbound::watchlist_event(name, &[user_id]));
            self.mark_dirty(&conn);
        }
    }
}

impl Shard {
    /// Subscribes `conn` to a positioned channel from `from` (the last position its client saw,
    /// if it sent one). The channel's history answers under its lock, and the answer goes into
    /// this shard's own inbox under that same lock: every event it covers is ahead of it there
    /// and every later one behind it, so the subscription (`resumed`) starts exactly after it.
    pub(super) fn subscribe_positioned(
        &self,
        conn: &Conn,
        channel: &str,
        from: Option<crate::resume::Position>,
    ) {
        conn.ext().presence_pending.push(Rc::from(channel));
        let router = &self.shared.router;
        let pushed = self
            .shared
            .resume
            .resume(conn.app, channel, from, Instant::now(), |answer| {
                use crate::resume::history::Replay;
                let outcome = match answer.replay {
                    Replay::Fresh => ResumeOutcome::Fresh,
                    Replay::Recovered(frames) => ResumeOutcome::Recovered(frames),
                    Replay::Lost { missed } => ResumeOutcome::Lost(missed),
                };
                router.try_push(
                    self.id,
                    ShardCmd::Resume(Resume {
                        conn: conn.id,
                        app: conn.app,
                        channel: Arc::from(channel),
                        head: answer.head.to_string(),
                        outcome,
                    }),
                )
            });
        if pushed.is_err() {
            refuse_overloaded(conn, channel);
        }
    }

    /// A positioned subscription's turn in the inbox: add the connection, then
    /// `subscription_succeeded` (with the position), the missed frames (the same `Bytes` every
    /// subscriber got, under the connection's outbound bound: a replay that does not fit closes
    /// it with 4100 like any slow consumer), and `bts:recovered`.
    pub(super) fn resumed(&self, r: Resume) {
        let conn = self.conns.borrow().get(r.conn).cloned();
        let Some(conn) = conn.filter(|c| c.join_pending(&r.channel) && c.is_open()) else {
            return;
        };
        conn.ext().presence_pending.retain(|c| **c != *r.channel);
        if let Err(limit) = self.subscribe_local(&conn, &r.channel) {
            conn.send_text(&outbound::error(None, &limit.to_string()));
            self.mark_dirty(&conn);
            return;
        }
        conn.send_text(&outbound::subscription_succeeded_at(&r.channel, &r.head));
        let stats = &self.stats;
        // A cache channel's last event goes to a fresh subscriber, and after `recovered:
        // false`; a recovered client already has it.
        let mut cached = true;
        match r.outcome {
            ResumeOutcome::Fresh => {}
            ResumeOutcome::Recovered(frames)
                if self.replay_fits(&frames) && self.replay_budget(frames.len()) =>
            {
                let n = frames.len() as u64;
                for f in frames {
                    if !matches!(
                        conn.enqueue_shared(&Rc::new(Frame::plain(f)), usize::MAX),
                        Enqueued::Yes(_)
                    ) {
                        // Closed as a slow consumer: its client resumes again.
                        self.mark_dirty(&conn);
                        return;
                    }
                }
                stats.replayed.set(stats.replayed.get() + n);
                stats.recovered.set(stats.recovered.get() + 1);
                conn.send_text(&outbound::recovered(&r.channel, true, Some(n), &r.head));
                cached = false;
            }
            ResumeOutcome::Recovered(frames) => {
                // Larger than half the connection's outbound bound (it could only end in
                // 4100, and the same resume again), or over this shard's replay budget for
                // this second.
                stats.not_recovered.set(stats.not_recovered.get() + 1);
                let missed = Some(frames.len() as u64);
                conn.send_text(&outbound::recovered(&r.channel, false, missed, &r.head));
            }
            ResumeOutcome::Lost(missed) => {
                stats.not_recovered.set(stats.not_recovered.get() + 1);
                conn.send_text(&outbound::recovered(&r.channel, false, missed, &r.head));
            }
        }
        if cached {
            self.send_cached(&conn, &r.channel);
        }
        self.mark_dirty(&conn);
    }

    /// Whether a replay fits in half of a connection's outbound bound: a larger one would close
    /// the connection with 4100 before it is written, and its client would ask for the same
    /// replay again.
    fn replay_fits(&self, frames: &[bytes::Bytes]) -> bool {
        let bytes: usize = frames.iter().map(|f| f.len()).sum();
        bytes <= self.shared.cfg.max_outbound_bytes / 2
    }

    /// Takes `n` events from this shard's replay budget for the current second; `false` (and
    /// nothing taken) when they do not fit.
    fn replay_budget(&self, n: usize) -> bool {
        let limit = self.shared.resume.bounds().replay_per_shard;
        let now = self.now_ms();
        let (start, used) = self.stats.replay_window.get();
        let (start, used) = if now.wrapping_sub(start) >= 1000 {
            (now, 0)
        } else {
            (start, used)
        };
        if used + n > limit {
            self.stats.replay_window.set((start, used));
            return false;
        }
        self.stats.replay_window.set((start, used + n));
        true
    }
}

/// A subscription waiting for another shard's answer (a presence join, a positioned channel's
/// turn) whose request found that inbox full: it is no longer pending, and the client is told
/// to try again (`pusher:subscription_error`, 503).
pub(super) fn refuse_overloaded(conn: &Conn, channel: &str) {
    conn.ext().presence_pending.retain(|c| &**c != channel);
    conn.send_text(&outbound::subscription_error(
        channel,
        "Overloaded",
        "server is overloaded, try again",
        503,
    ));
}
