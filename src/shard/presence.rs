//! Presence membership of the channels this shard owns (`Router::owner`): per user, not per
//! socket. A user is a member while at least one of their sockets is subscribed, wherever that
//! socket lives; member_added and member_removed follow the first join and the last leave.

use std::collections::HashMap;
use std::sync::Arc;

use crate::protocol::outbound;

#[derive(Debug)]
struct Member {
    /// `user_info` JSON from the first socket's channel_data.
    info: Option<Arc<str>>,
    /// Sockets of this user subscribed to the channel, all shards together.
    sockets: u32,
}

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
    ) -> Join {
        let members = self.channels.entry((app, Arc::clone(channel))).or_default();
        if let Some(m) = members.by_user.get_mut(user_id) {
            m.sockets += 1;
            return Join::AnotherSocket;
        }
        if members.by_user.len() >= max {
            if members.by_user.is_empty() {
                self.channels.remove(&(app, Arc::clone(channel)));
            }
            return Join::Full;
        }
        members.order.push(Arc::clone(user_id));
        members
            .by_user
            .insert(Arc::clone(user_id), Member { info, sockets: 1 });
        Join::NewMember
    }

    /// One socket of `user_id` left; `true` when it was their last (announce member_removed).
    pub fn leave(&mut self, app: usize, channel: &Arc<str>, user_id: &str) -> bool {
        let key = (app, Arc::clone(channel));
        let Some(members) = self.channels.get_mut(&key) else {
            return false;
        };
        let Some(m) = members.by_user.get_mut(user_id) else {
            return false;
        };
        m.sockets -= 1;
        if m.sockets > 0 {
            return false;
        }
        members.by_user.remove(user_id);
        members.order.retain(|u| &**u != user_id);
        if members.by_user.is_empty() {
            self.channels.remove(&key);
        }
        true
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
            r.join(0, &ch, &a("1"), Some(a(r#"{"n":"A"}"#)), 2),
            Join::NewMember
        );
        assert_eq!(r.join(0, &ch, &a("1"), None, 2), Join::AnotherSocket);
        assert_eq!(r.join(0, &ch, &a("2"), None, 2), Join::NewMember);
        assert_eq!(r.join(0, &ch, &a("3"), None, 2), Join::Full);
        let snap: serde_json::Value = serde_json::from_str(&r.snapshot(0, "presence-m")).unwrap();
        assert_eq!(snap["presence"]["ids"], serde_json::json!(["1", "2"]));
        assert_eq!(snap["presence"]["hash"]["1"]["n"], "A");
        assert_eq!(snap["presence"]["hash"]["2"], serde_json::Value::Null);
        assert_eq!(snap["presence"]["count"], 2);
        assert!(!r.leave(0, &ch, "1"), "user 1 still has a socket");
        assert!(r.leave(0, &ch, "1"));
        assert!(r.leave(0, &ch, "2"));
        assert_eq!(r.count(0, "presence-m"), 0);
        let empty: serde_json::Value = serde_json::from_str(&r.snapshot(0, "presence-m")).unwrap();
        assert_eq!(empty["presence"]["count"], 0);
        let added: serde_json::Value =
            serde_json::from_str(&r.added_data(0, "presence-m", "9")).unwrap();
        assert_eq!(added["user_id"], "9");
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
                    let got = r.join(0, &chan, &uid, None, 100);
                    prop_assert_eq!(got == Join::NewMember, *n == 0);
                    *n += 1;
                } else if *n > 0 {
                    let removed = r.leave(0, &chan, &uid);
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
