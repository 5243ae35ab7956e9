//! Presence membership of the channels this shard owns (`Router::owner`): per user, not per
//! socket. A user is a member while at least one of their sockets is subscribed, wherever that
//! socket lives (any shard, and in cluster mode any node); member_added and member_removed
//! follow the first join and the last leave.
//!
//! Sockets are counted per node, so a node's whole contribution can be replaced (a sync after it
//! (re)joins the cluster) or dropped (it stopped sending heartbeats).

use std::collections::HashMap;
use std::sync::Arc;

use crate::protocol::outbound;

#[derive(Debug)]
struct Member {
    /// `user_info` JSON from the first socket's channel_data.
    info: Option<Arc<str>>,
    /// Sockets of this user subscribed to the channel, per node (all shards of a node together).
    sockets: Vec<(u64, u32)>,
}

impl Member {
    fn total(&self) -> u32 {
        self.sockets.iter().map(|(_, n)| n).sum()
    }

    fn add(&mut self, node: u64, n: u32) {
        match self.sockets.iter_mut().find(|(nd, _)| *nd == node) {
            Some((_, c)) => *c += n,
            None => self.sockets.push((node, n)),
        }
    }
}

pub use crate::fanout::router::SyncEntry;

#[derive(Debug, Default)]
struct Members {
    /// Join order, so `here` lists members oldest first, like Pusher.
    order: Vec<Arc<str>>,
    by_user: HashMap<Arc<str>, Member>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Join {
    /// The user's first socket: announce member_added.
    NewMember,
    /// Another socket of a member: nothing to announce.
    AnotherSocket,
    /// The channel already has `max` members.
    Full,
}

/// Invariant: a channel is present iff it has at least one member; `order` and `by_user` hold
/// the same users.
#[derive(Debug, Default)]
pub struct PresenceRegistry {
    channels: HashMap<(usize, Arc<str>), Members>,
}

impl PresenceRegistry {
    pub fn join(
        &mut self,
        app: usize,
        channel: &Arc<str>,
        user_id: &Arc<str>,
        info: Option<Arc<str>>,
        max: usize,
        node: u64,
    ) -> Join {
        let members = self.channels.entry((app, Arc::clone(channel))).or_default();
        if let Some(m) = members.by_user.get_mut(user_id) {
            m.add(node, 1);
            return Join::AnotherSocket;
        }
        if members.by_user.len() >= max {
            if members.by_user.is_empty() {
                self.channels.remove(&(app, Arc::clone(channel)));
            }
            return Join::Full;
        }
        members.order.push(Arc::clone(user_id));
        members.by_user.insert(
            Arc::clone(user_id),
            Member {
                info,
                sockets: vec![(node, 1)],
            },
        );
        Join::NewMember
    }

    /// Sockets `user_id` has in the channel on `node`.
    pub fn node_sockets(&self, app: usize, channel: &Arc<str>, user_id: &str, node: u64) -> u32 {
        self.channels
            .get(&(app, Arc::clone(channel)))
            .and_then(|m| m.by_user.get(user_id))
            .and_then(|m| m.sockets.iter().find(|(n, _)| *n == node))
            .map_or(0, |(_, k)| *k)
    }

    /// One socket of `user_id` on `node` left; `true` when it was the user's last anywhere
    /// (announce member_removed).
    pub fn leave(&mut self, app: usize, channel: &Arc<str>, user_id: &str, node: u64) -> bool {
        let key = (app, Arc::clone(channel));
        let Some(members) = self.channels.get_mut(&key) else {
            return false;
        };
        let Some(m) = members.by_user.get_mut(user_id) else {
            return false;
        };
        let Some(pos) = m.sockets.iter().position(|(nd, _)| *nd == node) else {
            return false;
        };
        m.sockets[pos].1 -= 1;
        if m.sockets[pos].1 == 0 {
            m.sockets.swap_remove(pos);
        }
        if m.total() > 0 {
            return false;
        }
        members.by_user.remove(user_id);
        members.order.retain(|u| &**u != user_id);
        if members.by_user.is_empty() {
            self.channels.remove(&key);
        }
        true
    }

    /// Replaces `node`'s sockets on one channel with `entries`; returns the users that became
    /// members and those that stopped being members. The member limit does not apply: the
    /// members are already subscribed on that node.
    pub fn set_node(
        &mut self,
        app: usize,
        channel: &Arc<str>,
        node: u64,
        entries: &[SyncEntry],
    ) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let key = (app, Arc::clone(channel));
        let members = self.channels.entry(key.clone()).or_default();
        let mut added = Vec::new();
        let mut removed = Vec::new();
        // Drop the node's old contribution.
        for m in members.by_user.values_mut() {
            m.sockets.retain(|(nd, _)| *nd != node);
        }
        for (user, info, n) in entries {
            if *n == 0 {
                continue;
            }
            match members.by_user.get_mut(user) {
                Some(m) => m.add(node, *n),
                None => {
                    members.order.push(Arc::clone(user));
                    members.by_user.insert(
                        Arc::clone(user),
                        Member {
                            info: info.clone(),
                            sockets: vec![(node, *n)],
                        },
                    );
                }
            }
        }
        // Who is a member now versus before is decided by totals.
        let mut keep = Vec::with_capacity(members.order.len());
        for u in members.order.drain(..) {
            let total = members.by_user.get(&u).map_or(0, Member::total);
            if total == 0 {
                members.by_user.remove(&u);
                removed.push(u);
            } else {
                keep.push(u);
            }
        }
        members.order = keep;
        for (user, _, n) in entries {
            if *n > 0
                && members
                    .by_user
                    .get(user)
                    .is_some_and(|m| m.total() == *n && m.sockets.len() == 1)
            {
                added.push(Arc::clone(user));
            }
        }
        if members.by_user.is_empty() {
            self.channels.remove(&key);
        }
        (added, removed)
    }

    /// Channels (of this registry) where `node` has sockets, with `filter` deciding which count.
    pub fn node_channels(&self, node: u64) -> Vec<(usize, Arc<str>)> {
        self.channels
            .iter()
            .filter(|(_, m)| {
                m.by_user
                    .values()
                    .any(|mb| mb.sockets.iter().any(|(nd, _)| *nd == node))
            })
            .map(|((a, c), _)| (*a, Arc::clone(c)))
            .collect()
    }

    /// `node`'s members of one channel, for a sync.
    pub fn node_entries(&self, app: usize, channel: &str, node: u64) -> Vec<SyncEntry> {
        self.get(app, channel)
            .map(|m| {
                m.order
                    .iter()
                    .filter_map(|u| {
                        let mb = m.by_user.get(u)?;
                        let n = mb.sockets.iter().find(|(nd, _)| *nd == node)?.1;
                        Some((Arc::clone(u), mb.info.clone(), n))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn count(&self, app: usize, channel: &str) -> usize {
        self.get(app, channel).map_or(0, |m| m.by_user.len())
    }

    fn get(&self, app: usize, channel: &str) -> Option<&Members> {
        // Keys hold an Arc<str>; a temporary Arc for the lookup is cheap on this cold path.
        self.channels.get(&(app, Arc::from(channel)))
    }

    pub fn user_ids(&self, app: usize, channel: &str) -> Vec<String> {
        self.get(app, channel)
            .map(|m| m.order.iter().map(|u| u.to_string()).collect())
            .unwrap_or_default()
    }

    /// `(channel, members)` of every presence channel of `app` this shard owns.
    pub fn channels(&self, app: usize) -> impl Iterator<Item = (&str, usize)> {
        self.channels
            .iter()
            .filter(move |((a, _), _)| *a == app)
            .map(|((_, c), m)| (&**c, m.by_user.len()))
    }

    /// `{"presence":{"ids":[…],"hash":{id:info},"count":n}}` for subscription_succeeded.
    pub fn snapshot(&self, app: usize, channel: &str) -> String {
        let mut out = String::from(r#"{"presence":{"ids":["#);
        let members = self.get(app, channel);
        let order = members.map_or(&[][..], |m| &m.order[..]);
        for (i, u) in order.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&json_str(u));
        }
        out.push_str(r#"],"hash":{"#);
        for (i, u) in order.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&json_str(u));
            out.push(':');
            let info = members
                .and_then(|m| m.by_user.get(u))
                .and_then(|m| m.info.as_deref());
            out.push_str(info.unwrap_or("null"));
        }
        out.push_str(&format!(r#"}},"count":{}}}}}"#, order.len()));
        out
    }

    /// `pusher_internal:member_added` data for a member of `channel`.
    pub fn added_data(&self, app: usize, channel: &str, user_id: &str) -> String {
        let info = self
            .get(app, channel)
            .and_then(|m| m.by_user.get(user_id))
            .and_then(|m| m.info.as_deref());
        match info {
            Some(info) => format!(r#"{{"user_id":{},"user_info":{info}}}"#, json_str(user_id)),
            None => format!(r#"{{"user_id":{}}}"#, json_str(user_id)),
        }
    }
}

fn json_str(s: &str) -> String {
    let mut v = Vec::with_capacity(s.len() + 2);
    outbound::push_json_str(&mut v, s);
    String::from_utf8(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn a(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn per_user_not_per_socket() {
        let mut r = PresenceRegistry::default();
        let ch = a("presence-m");
        assert_eq!(
            r.join(0, &ch, &a("1"), Some(a(r#"{"n":"A"}"#)), 2, 1),
            Join::NewMember
        );
        assert_eq!(r.join(0, &ch, &a("1"), None, 2, 1), Join::AnotherSocket);
        assert_eq!(r.join(0, &ch, &a("2"), None, 2, 1), Join::NewMember);
        assert_eq!(r.join(0, &ch, &a("3"), None, 2, 1), Join::Full);
        let snap: serde_json::Value = serde_json::from_str(&r.snapshot(0, "presence-m")).unwrap();
        assert_eq!(snap["presence"]["ids"], serde_json::json!(["1", "2"]));
        assert_eq!(snap["presence"]["hash"]["1"]["n"], "A");
        assert_eq!(snap["presence"]["hash"]["2"], serde_json::Value::Null);
        assert_eq!(snap["presence"]["count"], 2);
        assert!(!r.leave(0, &ch, "1", 1), "user 1 still has a socket");
        assert!(r.leave(0, &ch, "1", 1));
        assert!(r.leave(0, &ch, "2", 1));
        assert_eq!(r.count(0, "presence-m"), 0);
        let empty: serde_json::Value = serde_json::from_str(&r.snapshot(0, "presence-m")).unwrap();
        assert_eq!(empty["presence"]["count"], 0);
        let added: serde_json::Value =
            serde_json::from_str(&r.added_data(0, "presence-m", "9")).unwrap();
        assert_eq!(added["user_id"], "9");
    }

    #[test]
    fn nodes_contribute_and_can_be_replaced() {
        let mut r = PresenceRegistry::default();
        let ch = a("presence-m");
        // User 1 on node 1 (local) and node 2; user 2 on node 2 only.
        assert_eq!(r.join(0, &ch, &a("1"), None, 100, 1), Join::NewMember);
        let (added, removed) = r.set_node(0, &ch, 2, &[(a("1"), None, 2), (a("2"), None, 1)]);
        assert_eq!((added, removed), (vec![a("2")], vec![]));
        assert_eq!(r.count(0, "presence-m"), 2);
        assert_eq!(r.node_entries(0, "presence-m", 2).len(), 2);
        // Node 2 goes away: user 2 leaves, user 1 stays (node 1 still has a socket).
        let (added, removed) = r.set_node(0, &ch, 2, &[]);
        assert_eq!((added, removed), (vec![], vec![a("2")]));
        assert_eq!(r.user_ids(0, "presence-m"), vec!["1"]);
        assert!(r.leave(0, &ch, "1", 1));
        assert_eq!(r.count(0, "presence-m"), 0);
        assert!(r.node_channels(2).is_empty());
    }

    proptest! {
        /// Against a naive model of socket counts per (channel, user): member_added exactly on
        /// 0 -> 1 sockets, member_removed exactly on 1 -> 0, counts always equal.
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec((any::<bool>(), 0u8..3, 0u8..4), 0..300)) {
            let mut r = PresenceRegistry::default();
            let mut model: BTreeMap<(u8, u8), u32> = BTreeMap::new();
            for (join, ch, user) in ops {
                let chan = a(&format!("presence-{ch}"));
                let uid = a(&user.to_string());
                let n = model.entry((ch, user)).or_default();
                if join {
                    let got = r.join(0, &chan, &uid, None, 100, 1);
                    prop_assert_eq!(got == Join::NewMember, *n == 0);
                    *n += 1;
                } else if *n > 0 {
                    let removed = r.leave(0, &chan, &uid, 1);
                    prop_assert_eq!(removed, *n == 1);
                    *n -= 1;
                }
                for c in 0..3u8 {
                    let want = model.iter().filter(|((mc, _), n)| *mc == c && **n > 0).count();
                    prop_assert_eq!(r.count(0, &format!("presence-{c}")), want);
                }
            }
        }
    }
}
