//! Channel membership for one shard (uWebSockets' TopicTree, in Rust): channel → subscribers
//! and subscriber → channels.
//!
//! Owned by its `Shard`; never shared, never `Send`. The index is the only owner of membership:
//! connections are named by `ConnId`, never referenced.

use std::collections::HashMap;
use std::rc::Rc;

use crate::fanout::router::ConnId;
use crate::protocol::ChannelKind;

/// Channel kinds as metrics name them (`bts_channels{type=…}`), in `kind_index` order.
pub const KINDS: [&str; 5] = [
    "public",
    "private",
    "presence",
    "encrypted",
    "server-to-user",
];

fn kind_index(channel: &str) -> usize {
    if channel.starts_with('#') {
        return 4;
    }
    match ChannelKind::of(channel) {
        ChannelKind::Public => 0,
        ChannelKind::Private => 1,
        ChannelKind::Presence => 2,
        ChannelKind::PrivateEncrypted => 3,
    }
}

/// Invariant: `by_channel[app][c]` contains `id` iff `by_conn[id]` contains `(app, c)`.
/// Empty channels are removed eagerly, so the map sizes are the live channel counts.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    /// Per app. A `Vec` of subscribers, not a set: fan-out iterates far more often than clients
    /// unsubscribe.
    by_channel: Vec<HashMap<Rc<str>, Vec<ConnId>>>,
    by_conn: HashMap<ConnId, Vec<(usize, Rc<str>)>>,
    /// (channels, subscriptions) by kind (`KINDS`), all apps together, kept as they change so
    /// a metrics scrape or console poll reads them without walking every channel.
    kinds: [(u64, u64); KINDS.len()],
}

impl SubscriptionIndex {
    pub fn new(apps: usize) -> SubscriptionIndex {
        SubscriptionIndex {
            by_channel: (0..apps).map(|_| HashMap::new()).collect(),
            by_conn: HashMap::new(),
            kinds: Default::default(),
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
        let kind = &mut self.kinds[kind_index(channel)];
        let subs = map.entry(key).or_default();
        kind.0 += u64::from(subs.is_empty());
        kind.1 += 1;
        subs.push(conn);
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

    /// Channels of `app` with local subscribers, and how many. The names are the index's own
    /// (a clone is a non-atomic increment), so a listing can hold them across a yield.
    pub fn channels(&self, app: usize) -> impl Iterator<Item = (&Rc<str>, usize)> {
        self.by_channel
            .get(app)
            .into_iter()
            .flat_map(|m| m.iter().map(|(c, subs)| (c, subs.len())))
    }

    /// (kind, channels, subscriptions) on this shard, all apps together.
    pub fn kinds(&self) -> impl Iterator<Item = (&'static str, u64, u64)> + '_ {
        KINDS
            .iter()
            .zip(&self.kinds)
            .filter(|(_, (c, _))| *c > 0)
            .map(|(k, (c, s))| (*k, *c, *s))
    }

    fn detach(&mut self, conn: ConnId, app: usize, channel: &str) {
        let map = &mut self.by_channel[app];
        if let Some(subs) = map.get_mut(channel) {
            if let Some(i) = subs.iter().position(|&c| c == conn) {
                subs.swap_remove(i);
                self.kinds[kind_index(channel)].1 -= 1;
            }
            if subs.is_empty() {
                map.remove(channel);
                self.kinds[kind_index(channel)].0 -= 1;
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

    /// Live channels on this shard, all apps together.
    pub fn total_channels(&self) -> usize {
        self.by_channel.iter().map(HashMap::len).sum()
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

    /// Channel `ch` of the model, of one kind or another.
    fn name(ch: u8) -> String {
        [
            "ch0",
            "private-ch1",
            "presence-ch2",
            "#server-to-user-3",
            "private-encrypted-ch4",
        ][usize::from(ch) % 5]
            .to_owned()
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
                        let name = name(ch);
                        let fresh = model.insert((c, a, name.clone()));
                        prop_assert_eq!(idx.subscribe(id(c), a, &name), fresh);
                    }
                    Op::Unsub(c, a, ch) => {
                        let name = name(ch);
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
                        let name = name(ch);
                        let mut got: Vec<u32> = idx.subscribers(a, &name).iter().map(|c| c.slot).collect();
                        got.sort();
                        let want: Vec<u32> = model.iter().filter(|(_, ma, mn)| *ma == a && *mn == name).map(|(c, _, _)| *c).collect();
                        prop_assert_eq!(got, want);
                    }
                    let live: BTreeSet<&String> = model.iter().filter(|(_, ma, _)| *ma == a).map(|(_, _, n)| n).collect();
                    prop_assert_eq!(idx.channel_count(a), live.len());
                }
                // Counted as they change, they match a walk over the model.
                let mut want: Vec<(&str, u64, u64)> = Vec::new();
                for (k, kind) in KINDS.iter().enumerate() {
                    let subs: Vec<_> = model.iter().filter(|(_, _, n)| kind_index(n) == k).collect();
                    let chans: BTreeSet<(usize, &String)> = subs.iter().map(|(_, a, n)| (*a, n)).collect();
                    if !chans.is_empty() {
                        want.push((kind, chans.len() as u64, subs.len() as u64));
                    }
                }
                prop_assert_eq!(idx.kinds().collect::<Vec<_>>(), want);
            }
        }
    }
}
