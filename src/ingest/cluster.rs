//! The cluster receiver, on the Redis ingest thread: other nodes' messages (`cluster::Wire`)
//! turned into shard commands, silent peers dropped (`tick`), this node announced after each
//! (re)subscription (`announce`), and the cluster-wide webhooks decided (`Arbiter`, owned by
//! the ingest thread alone).
//!
//! Never blocks a shard: everything reaches them through their bounded inboxes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Accept, Cluster, Wire, NODE_TIMEOUT};
use crate::fanout::frame::SharedFrame;
use crate::fanout::router::{
    Answer, ChannelPart, Query, QueryKind, QueryPart, RemoteCmd, ShardCmd,
};
use crate::node::{Event, Shared};
use crate::protocol::{channel, depth, SocketId};

/// Decides which node sends each cluster-wide webhook, once.
///
/// Every node sends `Wire::Hook` when its *own* occupancy of a key turns on or off (its first
/// subscriber of a channel, its last; a user's first socket on it, the last). Redis delivers
/// the messages of one pub/sub channel to every subscriber in one order, the sender included,
/// so every node applies the same sequence and reaches the same conclusions: the key became
/// occupied cluster-wide (no node had it before) or empty (no node has it now), and which node
/// emits that webhook. The emitter of a key is sticky: the node that emitted its last webhook
/// emits the next one while it lives, so a `channel_vacated` held back for 3 s and the
/// `channel_occupied` that cancels it meet in the same node's webhook queue. A node's death is
/// sequenced the same way (`Wire::Gone`, sent by every node that notices; the first one
/// counts): the keys only it held become empty, emitted by the node whose `Gone` came first
/// (or their sticky emitter).
#[derive(Debug, Default)]
pub struct Arbiter {
    keys: HashMap<(String, String), Occupancy>,
    /// Nodes declared gone (stream order), with when: their late messages are ignored.
    dead: HashMap<u64, Instant>,
}

#[derive(Debug)]
struct Occupancy {
    nodes: Vec<u64>,
    emitter: Option<u64>,
    idle_since: Option<Instant>,
}

/// Empty keys are forgotten after this long (far beyond the 3 s hold-back).
const ARBITER_IDLE: Duration = Duration::from_secs(300);
/// Most keys tracked; beyond, new keys are not arbitrated (counted as dropped webhooks).
const ARBITER_MAX_KEYS: usize = 1_000_000;

impl Arbiter {
    fn pick(&self, emitter: Option<u64>, from: u64) -> u64 {
        match emitter {
            Some(e) if !self.dead.contains_key(&e) => e,
            _ => from,
        }
    }

    /// Applies node `from`'s change of `key`; `Some(on)` when this node (`me`) must send the
    /// cluster-wide webhook (`on`: occupied / member_added, else vacated / member_removed).
    pub fn apply(&mut self, me: u64, from: u64, app: &str, key: &str, on: bool) -> Option<bool> {
        if self.dead.contains_key(&from) {
            return None;
        }
        let k = (app.to_owned(), key.to_owned());
        if !self.keys.contains_key(&k) {
            if !on || self.keys.len() >= ARBITER_MAX_KEYS {
                return None;
            }
            self.keys.insert(
                k.clone(),
                Occupancy {
                    nodes: Vec::new(),
                    emitter: None,
                    idle_since: None,
                },
            );
        }
        let (emitter, empty_before) = {
            let e = &self.keys[&k];
            (e.emitter, e.nodes.is_empty())
        };
        let who = self.pick(emitter, from);
        let e = self.keys.get_mut(&k)?;
        if on {
            if e.nodes.contains(&from) {
                return None;
            }
            e.nodes.push(from);
            e.idle_since = None;
            if !empty_before {
                return None;
            }
        } else {
            let pos = e.nodes.iter().position(|n| *n == from)?;
            e.nodes.swap_remove(pos);
            if !e.nodes.is_empty() {
                return None;
            }
            e.idle_since = Some(Instant::now());
        }
        e.emitter = Some(who);
        (who == me).then_some(on)
    }

    /// Node `from` declared `dead` gone: the (app, key)s that became empty and whose
    /// vacated / member_removed this node (`me`) must send.
    pub fn gone(&mut self, me: u64, from: u64, dead: u64) -> Vec<(String, String)> {
        if self.dead.contains_key(&dead) || self.dead.contains_key(&from) {
            return Vec::new();
        }
        self.dead.insert(dead, Instant::now());
        let mut mine = Vec::new();
        let dead_set = &self.dead;
        for (k, e) in self.keys.iter_mut() {
            let Some(pos) = e.nodes.iter().position(|n| *n == dead) else {
                continue;
            };
            e.nodes.swap_remove(pos);
            if e.nodes.is_empty() {
                let who = match e.emitter {
                    Some(x) if !dead_set.contains_key(&x) => x,
                    _ => from,
                };
                e.emitter = Some(who);
                e.idle_since = Some(Instant::now());
                if who == me {
                    mine.push(k.clone());
                }
            }
        }
        mine
    }

    /// `node` announced itself again after being declared gone.
    pub fn revive(&mut self, node: u64) {
        self.dead.remove(&node);
    }

    /// Forgets keys empty for a long time, and old death records.
    pub fn gc(&mut self) {
        self.keys
            .retain(|_, e| e.idle_since.is_none_or(|t| t.elapsed() < ARBITER_IDLE));
        self.dead
            .retain(|_, t| t.elapsed() < Duration::from_secs(3600));
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The webhook event for an arbitrated key (`None`: not a key we make).
fn hook_event(key: &str, on: bool) -> Option<(&'static str, Value)> {
    let mut parts = key.split('\0');
    match (parts.next()?, parts.next(), parts.next()) {
        ("c", Some(channel), None) => {
            let name = if on {
                "channel_occupied"
            } else {
                "channel_vacated"
            };
            Some((name, serde_json::json!({"name": name, "channel": channel})))
        }
        ("m", Some(channel), Some(user)) => {
            let name = if on { "member_added" } else { "member_removed" };
            Some((
                name,
                serde_json::json!({"name": name, "channel": channel, "user_id": user}),
            ))
        }
        _ => None,
    }
}

/// Sends an arbitrated webhook through this node's webhook queue, when the app wants it.
fn emit_arbitrated(shared: &Shared, app_id: &str, key: &str, on: bool) {
    let apps = shared.apps.current();
    let Some(slot) = apps.by_id(app_id) else {
        return;
    };
    let app = apps.get(slot);
    let Some((name, event)) = hook_event(key, on) else {
        return;
    };
    if !app.webhooks.is_empty() && crate::webhooks::wanted(app, name) {
        shared.webhooks.emit(slot, event);
    }
}

/// On the ingest thread: a message from the cluster channel. `arbiter` is the ingest thread's
/// own (it alone decides cluster-wide webhooks, in Redis's delivery order). `true` when it was
/// this node's own message (the subscription works both ways).
pub fn receive(shared: &Shared, arbiter: &mut Arbiter, payload: &[u8]) -> bool {
    let Some(cluster) = shared.cluster.as_deref() else {
        return false;
    };
    // Unknown fields are skipped through serde, which recurses once per level.
    if !depth::within(payload, depth::MAX_JSON_DEPTH) {
        shared.ingest.malformed.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    let mut bytes = payload.to_vec();
    let Ok(msg) = simd_json::serde::from_slice::<Wire>(&mut bytes) else {
        shared.ingest.malformed.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    let from = msg.node();
    // Webhook arbitration applies every node's messages, this node's own included, in the
    // order Redis delivered them.
    match &msg {
        Wire::Hook { app, key, on, .. } => {
            if let Some(on) = arbiter.apply(cluster.node, from, app, key, *on) {
                emit_arbitrated(shared, app, key, on);
            }
        }
        // A node declared gone came back (it re-announces itself): take its messages again.
        Wire::Hello { .. } => {
            arbiter.revive(from);
            if from != cluster.node {
                // It (re)subscribed, maybe after a failover: what it missed of ours goes
                // again (it drops what it has), and so does who is here.
                cluster.outbox.request_resend(0);
                send_all(shared, || ShardCmd::Remote(RemoteCmd::PublishSync));
            }
        }
        Wire::Gone { dead, .. } => {
            for (app, key) in arbiter.gone(cluster.node, from, *dead) {
                emit_arbitrated(shared, &app, &key, false);
            }
        }
        _ => {}
    }
    if from == cluster.node {
        return true;
    }
    cluster.messages.fetch_add(1, Ordering::Relaxed);
    // Every node's answer count to queries is its shard count: learn it from any message
    // that says it.
    let shards_hint = match &msg {
        Wire::Heartbeat { shards, .. } | Wire::Hello { shards, .. } => Some(*shards),
        Wire::Sync { parts, .. } => Some(*parts),
        _ => None,
    };
    if cluster.seen(from, shards_hint) {
        tracing::info!(node = from, "cluster: node joined");
        // Tell it who is here.
        send_all(shared, || ShardCmd::Remote(RemoteCmd::PublishSync));
    }
    match &msg {
        // A numbered event: in its origin's order, once; a gap waits for the resend.
        Wire::Event { seq: Some(seq), .. } => match cluster.accept(from, *seq) {
            Accept::Deliver => {}
            Accept::Duplicate => return false,
            Accept::Gap { expected, nack } => {
                if nack {
                    cluster.publish(&Wire::Nack {
                        node: cluster.node,
                        to: from,
                        from: expected,
                    });
                }
                return false;
            }
        },
        Wire::Heartbeat { acks, low, .. } => {
            if let Some(low) = low {
                cluster.origin_low(from, *low);
            }
            if let Some(acks) = acks {
                let mine = acks.iter().find(|(n, _)| *n == cluster.node);
                cluster.acked_by(from, mine.map(|(_, seq)| *seq));
            }
        }
        Wire::Nack { to, from: seq, .. } if *to == cluster.node => {
            cluster.outbox.request_resend(*seq);
        }
        _ => {}
    }
    apply(shared, cluster, msg);
    false
}

/// Hands another node's message to the shards it concerns.
fn apply(shared: &Shared, cluster: &Cluster, msg: Wire<'_>) {
    let router = &shared.router;
    match msg {
        Wire::Event {
            app,
            channel,
            json,
            except,
            cache,
            ..
        } => {
            let Some(app) = router.app_index(&app) else {
                return;
            };
            if channel::validate(&channel).is_err() {
                return;
            }
            let apps = shared.apps.current();
            shared.deliver(Event {
                app,
                channel: &channel,
                frame: SharedFrame::text(json.as_bytes()),
                except: except.as_deref().and_then(SocketId::parse),
                cache,
                // In a cluster, positioned channels' events come through Redis's append
                // (`ingest::positions`), never as `Wire::Event`.
                positioned: false,
                settings: apps.get(app),
            });
        }
        Wire::Join {
            node,
            app,
            channel,
            user,
            info,
            socket,
        } => to_owner(shared, &app, &channel, |app, channel| RemoteCmd::Join {
            node,
            app,
            channel,
            user_id: Arc::from(user.as_str()),
            user_info: info.map(|i| Arc::from(i.as_str())),
            socket_id: SocketId::parse(&socket),
        }),
        Wire::Leave {
            node,
            app,
            channel,
            user,
            socket,
        } => to_owner(shared, &app, &channel, |app, channel| RemoteCmd::Leave {
            node,
            app,
            channel,
            user_id: Arc::from(user.as_str()),
            socket_id: SocketId::parse(&socket),
        }),
        Wire::Sync {
            node,
            part,
            parts,
            members,
        } => {
            let entries: Vec<_> = members
                .into_iter()
                .filter_map(|(app, channel, user, info, sockets)| {
                    Some((
                        router.app_index(&app)?,
                        Arc::<str>::from(channel.as_str()),
                        (
                            Arc::<str>::from(user.as_str()),
                            info.map(|i| Arc::from(i.as_str())),
                            sockets,
                        ),
                    ))
                })
                .collect();
            let entries = Arc::new(entries);
            send_all(shared, || {
                ShardCmd::Remote(RemoteCmd::Sync {
                    node,
                    part,
                    parts,
                    entries: Arc::clone(&entries),
                })
            });
        }
        Wire::Hello { .. }
        | Wire::Heartbeat { .. }
        | Wire::Hook { .. }
        | Wire::Gone { .. }
        | Wire::Nack { .. } => {}
        Wire::Query {
            node,
            origin,
            id,
            app,
            kind,
        } => {
            let Some(app) = router.app_index(&app) else {
                return;
            };
            ask_shards(shared, node, origin, id, app, kind.into_kind());
        }
        Wire::Answer {
            to,
            origin,
            id,
            connections,
            channels,
            users,
            channels_total,
            ..
        } => {
            if to != cluster.node || origin >= router.shards() {
                return;
            }
            let part = QueryPart {
                connections,
                channels: channels
                    .into_iter()
                    .map(|(name, subscriptions, users)| ChannelPart {
                        name,
                        subscriptions,
                        users,
                    })
                    .collect(),
                users,
                channels_total,
            };
            let _ = router.try_push(origin, ShardCmd::Answer(Answer { id, part }));
        }
        Wire::Terminate { app, user, .. } => {
            let Some(app) = router.app_index(&app) else {
                return;
            };
            let user_id: Arc<str> = Arc::from(user.as_str());
            send_all(shared, || ShardCmd::TerminateUser {
                app,
                user_id: Arc::clone(&user_id),
            });
        }
    }
}

/// A presence change for the shard that owns `channel` of the app with id `app_id` (if this node
/// has that app).
fn to_owner(
    shared: &Shared,
    app_id: &str,
    channel: &str,
    cmd: impl FnOnce(usize, Arc<str>) -> RemoteCmd,
) {
    let router = &shared.router;
    let Some(app) = router.app_index(app_id) else {
        return;
    };
    let owner = router.owner(app, channel);
    let _ = router.try_push(owner, ShardCmd::Remote(cmd(app, Arc::from(channel))));
}

/// Another node's HTTP API read: every shard of this node answers its part to shard `origin`
/// of node `node`, through Redis.
fn ask_shards(shared: &Shared, node: u64, origin: usize, id: u64, app: usize, what: QueryKind) {
    let router = &shared.router;
    for shard in 0..router.shards() {
        let _ = router.try_push(
            shard,
            ShardCmd::Query(Query {
                id,
                origin,
                app,
                what: what.clone(),
                remote: Some(node),
            }),
        );
    }
}

/// On the ingest thread, about once a second: drop silent peers everywhere.
pub fn tick(shared: &Shared, arbiter: &mut Arbiter) {
    let Some(cluster) = shared.cluster.as_deref() else {
        return;
    };
    for node in cluster.expire() {
        tracing::warn!(
            node,
            "cluster: node silent for {NODE_TIMEOUT:?}; removing its members"
        );
        send_all(shared, || ShardCmd::Remote(RemoteCmd::NodeGone { node }));
        cluster.publish(&Wire::Gone {
            node: cluster.node,
            dead: node,
        });
    }
    arbiter.gc();
    cluster.forget_idle();
}

/// After the ingest (re)subscribed: announce ourselves and our members.
pub fn announce(shared: &Shared) {
    let Some(cluster) = shared.cluster.as_deref() else {
        return;
    };
    cluster.publish(&Wire::Hello {
        node: cluster.node,
        shards: shared.cfg.shards(),
    });
    send_all(shared, || ShardCmd::Remote(RemoteCmd::PublishSync));
}

fn send_all(shared: &Shared, mut cmd: impl FnMut() -> ShardCmd) {
    for shard in 0..shared.router.shards() {
        if shared.router.try_push(shard, cmd()).is_err() {
            tracing::warn!(shard, "inbox full: cluster message dropped for a shard");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every node applies the same sequence; exactly one of them sends each webhook, and the
    /// emitter of a key stays the same while it lives.
    #[test]
    fn arbiter_picks_one_emitter_per_transition() {
        let seq = [
            (1, "k", true),  // occupied, by 1
            (2, "k", true),  // still occupied
            (1, "k", false), // 2 still holds it
            (2, "k", false), // vacated: the sticky emitter (1) sends it
            (3, "k", true),  // occupied again: 1 again
        ];
        let mut sent: Vec<(u64, bool)> = Vec::new();
        for me in [1u64, 2, 3] {
            let mut arb = Arbiter::default();
            for (from, key, on) in seq {
                if let Some(on) = arb.apply(me, from, "app", key, on) {
                    sent.push((me, on));
                }
            }
        }
        assert_eq!(sent, vec![(1, true), (1, false), (1, true)]);
        // Node 1 dies; 3's Gone is sequenced first, 2's second. Only 3 holds "k", so "k" stays;
        // "j", held by 1 only (emitter 1, dead), becomes empty: 3 sends its vacated.
        let mut out = Vec::new();
        for me in [2u64, 3] {
            let mut arb = Arbiter::default();
            for (from, key, on) in seq {
                arb.apply(me, from, "app", key, on);
            }
            arb.apply(me, 1, "app", "j", true);
            out.extend(arb.gone(me, 3, 1).into_iter().map(|k| (me, k.1)));
            assert!(arb.gone(me, 2, 1).is_empty());
            // Late messages from the dead node are ignored.
            assert_eq!(arb.apply(me, 1, "app", "x", true), None);
        }
        assert_eq!(out, vec![(3, "j".to_owned())]);
        assert_eq!(
            hook_event(
                &crate::cluster::wire::hook_key_member("presence-m", "7"),
                false
            )
            .unwrap()
            .1,
            serde_json::json!({"name":"member_removed","channel":"presence-m","user_id":"7"})
        );
    }
}
