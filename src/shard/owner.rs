//! What a shard does as the owner of a channel or user (`Router::owner`, `Router::user_owner`):
//! presence membership (one writer per channel, so member_added / member_removed go out once),
//! subscriber totals for `subscription_count` and occupancy webhooks, and who is online for the
//! watchlists. Other shards reach it only through its inbox; in a cluster, it publishes its
//! node's share for the other nodes.

use std::sync::Arc;

use super::{presence, Shard};
use crate::cluster::Wire;
use crate::fanout::frame::SharedFrame;
use crate::fanout::router::{ConnId, Joined, PresenceOp, ShardCmd};
use crate::node::Event;
use crate::protocol::{outbound, ChannelKind, SocketId};
use crate::webhooks;

impl Shard {
    /// Owner side of the watchlist: online on a user's first connection, offline on the last.
    pub(super) fn user_online(&self, app: usize, user_id: Arc<str>, delta: i32) {
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

    pub(super) fn watch(
        &self,
        app: usize,
        watched: Arc<str>,
        shard: usize,
        conn: ConnId,
        on: bool,
    ) {
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
    pub(super) fn presence_apply(&self, op: PresenceOp) {
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
                    Ok(SharedFrame::text(&json).bytes)
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
    pub(super) fn announce_removed(
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
    pub(super) fn broadcast_internal(
        &self,
        app: usize,
        channel: Arc<str>,
        event: &str,
        data: &str,
        except: Option<SocketId>,
    ) {
        let json = outbound::channel_event_str(event, &channel, data);
        let settings = self.app(app);
        self.shared.deliver(Event {
            app,
            channel: &channel,
            frame: SharedFrame::text(&json),
            except,
            cache: false,
            positioned: false,
            settings: &settings,
        });
    }

    /// `member_added` for `user_id` to this node's subscribers of the channel.
    pub(super) fn announce_added(
        &self,
        app: usize,
        channel: Arc<str>,
        user_id: &str,
        except: Option<SocketId>,
    ) {
        let data = self.presence.borrow().added_data(app, &channel, user_id);
        self.broadcast_internal(app, channel, "pusher_internal:member_added", &data, except);
    }

    /// Owner side of subscription_count: keep the total, tell the channel.
    pub(super) fn count_delta(&self, app: usize, channel: Arc<str>, delta: i64) {
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
    pub(super) fn member_hook(
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
}
