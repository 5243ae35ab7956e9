//! Channel membership for one shard (uWebSockets' TopicTree, in Rust): channel → subscribers
//! and subscriber → channels.
//!
//! Owned by its `Shard`; never shared, never `Send`. The index is the only owner of membership:
//! connections are named by `ConnId`, never referenced.

use std::collections::HashMap;
use std::rc::Rc;

use super::ConnId;

/// Invariant: `by_channel[app][c]` contains `id` iff `by_conn[id]` contains `(app, c)`.
/// Empty channels are removed eagerly, so the map sizes are the live channel counts.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    /// Per app. A `Vec` of subscribers, not a set: fan-out iterates far more often than clients
    /// unsubscribe.
    by_channel: Vec<HashMap<Rc<str>, Vec<ConnId>>>,
    by_conn: HashMap<ConnId, Vec<(usize, Rc<str>)>>,
}

impl SubscriptionIndex {
    pub fn new(apps: usize) -> SubscriptionIndex {
        SubscriptionIndex {
            by_channel: (0..apps).map(|_| HashMap::new()).collect(),
            by_conn: HashMap::new(),
        }
    }

    /// Adds `conn` to `channel`; `false` if it was already subscribed.
    /// Makes room for apps up to slot `apps - 1` (a reload added some).
    pub fn ensure_apps(&mut self, apps: usize) {
        while self.by_channel.len() < apps {
            self.by_channel.push(HashMap::new());
        }
    }

    pub fn subscribe(&mut self, conn: ConnId, app: usize, channel: &str) -> bool {
        let chans = self.by_conn.entry(conn).or_default();
        if chans.iter().any(|(a, c)| *a == app && &**c == channel) {
            return false;
        }
        let map = &mut self.by_channel[app];
        let key = match map.get_key_value(channel) {
            Some((k, _)) => Rc::clone(k),
            None => Rc::from(channel),
        };
        chans.push((app, Rc::clone(&key)));
        map.entry(key).or_default().push(conn);
        true
    }

    /// Removes `conn` from `channel`; `false` if it was not subscribed.
    pub fn unsubscribe(&mut self, conn: ConnId, app: usize, channel: &str) -> bool {
        let Some(chans) = self.by_conn.get_mut(&conn) else {
            return false;
        };
        let Some(pos) = chans.iter().position(|(a, c)| *a == app && &**c == channel) else {
            return false;
        };
        chans.swap_remove(pos);
        if chans.is_empty() {
            self.by_conn.remove(&conn);
        }
        self.detach(conn, app, channel);
        true
    }

    /// Removes every subscription of a closing connection; returns them.
    pub fn remove_conn(&mut self, conn: ConnId) -> Vec<(usize, Rc<str>)> {
        let chans = self.by_conn.remove(&conn).unwrap_or_default();
        for (app, ch) in &chans {
            self.detach(conn, *app, ch);
        }
        chans
    }

    pub fn is_subscribed(&self, conn: ConnId, app: usize, channel: &str) -> bool {
        self.by_conn
            .get(&conn)
            .is_some_and(|chans| chans.iter().any(|(a, c)| *a == app && &**c == channel))
    }

    /// Channels of `app` with local subscribers, and how many.
    pub fn channels(&self, app: usize) -> impl Iterator<Item = (&str, usize)> {
        self.by_channel
            .get(app)
            .into_iter()
            .flat_map(|m| m.iter().map(|(c, subs)| (&**c, subs.len())))
    }

    fn detach(&mut self, conn: ConnId, app: usize, channel: &str) {
        let map = &mut self.by_channel[app];
        if let Some(subs) = map.get_mut(channel) {
            if let Some(i) = subs.iter().position(|&c| c == conn) {
                subs.swap_remove(i);
            }
            if subs.is_empty() {
                map.remove(channel);
            }
        }
    }

    pub fn subscribers(&self, app: usize, channel: &str) -> &[ConnId] {
        self.by_channel
            .get(app)
            .and_then(|m| m.get(channel))
            .map_or(&[], Vec::as_slice)
    }

    /// How many channels `conn` is subscribed to.
    pub fn channels_of(&self, conn: ConnId) -> usize {
        self.by_conn.get(&conn).map_or(0, Vec::len)
    }

    /// Live channels of `app` on this shard.
    pub fn channel_count(&self, app: usize) -> usize {
        self.by_channel.get(app).map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Sub(u32, usize, u8),
        Unsub(u32, usize, u8),
        Remove(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..6, 0usize..2, 0u8..5).prop_map(|(c, a, ch)| Op::Sub(c, a, ch)),
            (0u32..6, 0usize..2, 0u8..5).prop_map(|(c, a, ch)| Op::Unsub(c, a, ch)),
            (0u32..6).prop_map(Op::Remove),
        ]
    }

    fn id(n: u32) -> ConnId {
        ConnId { slot: n, gen: 1 }
    }

    proptest! {
        /// The index agrees with a naive set of (conn, app, channel) after any sequence of ops.
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec(op(), 0..200)) {
            let mut idx = SubscriptionIndex::new(2);
            let mut model: BTreeSet<(u32, usize, String)> = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Sub(c, a, ch) => {
                        let name = format!("ch{ch}");
                        let fresh = model.insert((c, a, name.clone()));
                        prop_assert_eq!(idx.subscribe(id(c), a, &name), fresh);
                    }
                    Op::Unsub(c, a, ch) => {
                        let name = format!("ch{ch}");
                        let had = model.remove(&(c, a, name.clone()));
                        prop_assert_eq!(idx.unsubscribe(id(c), a, &name), had);
                    }
                    Op::Remove(c) => {
                        let removed = idx.remove_conn(id(c)).len();
                        prop_assert_eq!(removed, model.iter().filter(|(mc, _, _)| *mc == c).count());
                        model.retain(|(mc, _, _)| *mc != c);
                    }
                }
                for a in 0..2 {
                    for ch in 0..5 {
                        let name = format!("ch{ch}");
                        let mut got: Vec<u32> = idx.subscribers(a, &name).iter().map(|c| c.slot).collect();
                        got.sort();
                        let want: Vec<u32> = model.iter().filter(|(_, ma, mn)| *ma == a && *mn == name).map(|(c, _, _)| *c).collect();
                        prop_assert_eq!(got, want);
                    }
                    let live: BTreeSet<&String> = model.iter().filter(|(_, ma, _)| *ma == a).map(|(_, _, n)| n).collect();
                    prop_assert_eq!(idx.channel_count(a), live.len());
                }
            }
        }
    }
}
