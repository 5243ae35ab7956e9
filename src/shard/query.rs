//! HTTP API reads across shards (and nodes): a `Query` scattered to every shard, each shard's
//! `QueryPart` gathered on the asking one, merged into exact counts or refused (503) when a part
//! does not come in time. Channel listings are copied and merged in slices, so no shard stops
//! serving its sockets for a long one.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Shard;
use crate::cluster::{Wire, WireQuery};
use crate::fanout::router::{Answer, ChannelPart, Query, QueryKind, QueryPart, ShardCmd};
use crate::node::Shared;

/// How long an HTTP API read waits for every shard's answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// An HTTP API read in flight: the answers so far.
pub(super) struct PendingQuery {
    pub(super) expected: usize,
    pub(super) parts: Vec<QueryPart>,
    pub(super) waker: Option<std::task::Waker>,
}

impl Shard {
    /// This shard's part of an HTTP API read. A channel listing is taken here (its names are
    /// shared with the index, not copied) and built by a task of its own, in slices
    /// (`answer_listing`), so a large one never holds up this shard's sockets.
    pub(super) fn answer(&self, q: Query) {
        if let QueryKind::Channels { prefix } = &q.what {
            let (names, part) = self.listing(q.app, prefix);
            glommio::spawn_local(answer_listing(Arc::clone(&self.shared), q, names, part)).detach();
            return;
        }
        let mut part = QueryPart::default();
        let index = self.index.borrow();
        let presence = self.presence.borrow();
        let router = &self.shared.router;
        match &q.what {
            QueryKind::Connections => {
                part.connections = self
                    .conns
                    .borrow()
                    .iter()
                    .filter(|c| c.app == q.app)
                    .count() as u64;
            }
            // Answered by `answer_listing` (above).
            QueryKind::Channels { .. } => {}
            QueryKind::TopChannels { limit } => {
                part.channels_total = index.channel_count(q.app) as u64;
                part.channels = top(index.channels(q.app).map(|(n, s)| (&**n, s)), *limit)
                    .map(|(name, subs)| ChannelPart {
                        name: name.to_owned(),
                        subscriptions: subs as u64,
                        users: None,
                    })
                    .collect();
                part.channels
                    .extend(top(presence.channels(q.app), *limit).map(|(name, users)| {
                        ChannelPart {
                            name: name.to_owned(),
                            subscriptions: 0,
                            users: Some(users as u64),
                        }
                    }));
            }
            QueryKind::Channel { name } => {
                let subs = index.subscribers(q.app, name).len() as u64;
                let users = (router.owner(q.app, name) == self.id)
                    .then(|| presence.count(q.app, name) as u64);
                part.channels.push(ChannelPart {
                    name: name.to_string(),
                    subscriptions: subs,
                    users,
                });
            }
            QueryKind::Users { channel } => {
                if router.owner(q.app, channel) == self.id {
                    part.users = Some(presence.user_ids(q.app, channel));
                }
            }
        }
        send_answer(&self.shared, q, part);
    }

    /// The channels of `app` named `prefix…` on this shard: the index's own names with their
    /// subscriber counts, and (in `part`) the presence channels this shard owns with their
    /// members. At most one more than a listing may hold of each: enough for the asker to
    /// know it is over `max_channels_listed`.
    pub(super) fn listing(&self, app: usize, prefix: &str) -> (Vec<(Rc<str>, u64)>, QueryPart) {
        let most = self.shared.cfg.max_channels_listed.saturating_add(1);
        let names = self
            .index
            .borrow()
            .channels(app)
            .filter(|(name, _)| name.starts_with(prefix))
            .take(most)
            .map(|(name, subs)| (Rc::clone(name), subs as u64))
            .collect();
        let part = QueryPart {
            channels: self
                .presence
                .borrow()
                .channels(app)
                .filter(|(name, _)| name.starts_with(prefix))
                .take(most)
                .map(|(name, users)| ChannelPart {
                    name: name.to_owned(),
                    subscriptions: 0,
                    users: Some(users as u64),
                })
                .collect(),
            ..QueryPart::default()
        };
        (names, part)
    }

    pub(super) fn collect(&self, a: Answer) {
        let mut queries = self.queries.borrow_mut();
        if let Some(p) = queries.get_mut(&a.id) {
            p.parts.push(a.part);
            if p.parts.len() == p.expected {
                if let Some(w) = p.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Asks every shard for its part of `what` and merges the answers. `None` if some shard did
    /// not answer in time (its inbox was full or it is stuck), so counts are exact or absent.
    pub async fn query(&self, app: usize, what: QueryKind) -> Option<Vec<QueryPart>> {
        let id = self.next_query.get();
        self.next_query.set(id + 1);
        let router = &self.shared.router;
        let n = router.shards();
        // In a cluster, every live node's shards answer too.
        let peers = self
            .shared
            .cluster
            .as_ref()
            .map(|c| c.peers())
            .unwrap_or_default();
        let remote: usize = peers.iter().map(|(_, shards)| shards).sum();
        let expected = n + remote;
        self.queries.borrow_mut().insert(
            id,
            PendingQuery {
                expected,
                parts: Vec::with_capacity(expected),
                waker: None,
            },
        );
        let mut sent = 0;
        for shard in 0..n {
            let q = Query {
                id,
                origin: self.id,
                app,
                what: what.clone(),
                remote: None,
            };
            if router.try_push(shard, ShardCmd::Query(q)).is_ok() {
                sent += 1;
            }
        }
        if let (Some(cluster), true) = (&self.shared.cluster, remote > 0) {
            cluster.publish(&Wire::Query {
                node: self.shared.node,
                origin: self.id,
                id,
                app: router.app_id(app).to_owned(),
                kind: WireQuery::from_kind(&what),
            });
            sent += remote;
        }
        let wait = std::future::poll_fn(|cx| {
            let mut queries = self.queries.borrow_mut();
            let Some(p) = queries.get_mut(&id) else {
                return std::task::Poll::Ready(());
            };
            if p.parts.len() >= p.expected {
                std::task::Poll::Ready(())
            } else {
                p.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        });
        let complete = sent == expected
            && glommio::timer::timeout(QUERY_TIMEOUT, async {
                wait.await;
                Ok(())
            })
            .await
            .is_ok();
        let p = self.queries.borrow_mut().remove(&id)?;
        (complete && p.parts.len() == expected).then_some(p.parts)
    }

    pub fn cached(&self, app: usize, channel: &str) -> Option<(Bytes, u64)> {
        let now = Instant::now();
        let cache = self.cache.borrow();
        Some((
            cache.get(app, channel, now)?.framed.plain(),
            cache.ttl_left(app, channel, now)?,
        ))
    }
}

/// Totals per channel from every shard's part: (subscriptions, presence users).
pub fn merge(parts: &[QueryPart]) -> BTreeMap<String, (u64, Option<u64>)> {
    let mut out: BTreeMap<String, (u64, Option<u64>)> = BTreeMap::new();
    for p in parts {
        for c in &p.channels {
            let e = out.entry(c.name.clone()).or_default();
            e.0 += c.subscriptions;
            // Every node's owner shard knows the whole channel's members: take the largest
            // (they agree once the cluster has settled).
            if c.users.is_some() {
                e.1 = e.1.max(c.users);
            }
        }
    }
    out
}

/// Channels a listing task turns into its answer between two chances for the shard's other
/// tasks to run: a few hundred microseconds of copying at most.
pub(crate) const LISTING_SLICE: usize = 1024;

/// Gives the shard's sockets a turn between two slices of a long job. glommio polls for I/O
/// only when its task queue runs dry or its preemption timer (100 ms) fires, so
/// `yield_if_needed` would let a job of many slices run for up to 100 ms without the shard
/// reading a socket (measured: a 41 MB listing held a ping 205 ms that way); a short sleep takes
/// the job off the queue until the reactor has polled.
pub(crate) async fn breathe() {
    glommio::timer::sleep(Duration::from_micros(20)).await;
}

/// Builds a channel listing's answer from the names `Shard::listing` took, a slice at a time,
/// then sends it like any other part.
pub(super) async fn answer_listing(
    shared: Arc<Shared>,
    q: Query,
    names: Vec<(Rc<str>, u64)>,
    mut part: QueryPart,
) {
    part.channels.reserve(names.len());
    for slice in names.chunks(LISTING_SLICE) {
        part.channels
            .extend(slice.iter().map(|(name, subs)| ChannelPart {
                name: name.to_string(),
                subscriptions: *subs,
                users: None,
            }));
        breathe().await;
    }
    drop(names);
    send_answer(&shared, q, part);
}

/// Sends a shard's part of a query to the asking shard, or through Redis to the asking node.
pub(super) fn send_answer(shared: &Shared, q: Query, part: QueryPart) {
    if let (Some(node), Some(cluster)) = (q.remote, &shared.cluster) {
        cluster.publish(&Wire::Answer {
            node: shared.node,
            to: node,
            origin: q.origin,
            id: q.id,
            connections: part.connections,
            channels: part
                .channels
                .into_iter()
                .map(|c| (c.name, c.subscriptions, c.users))
                .collect(),
            users: part.users,
            channels_total: part.channels_total,
        });
        return;
    }
    if shared
        .router
        .try_push(q.origin, ShardCmd::Answer(Answer { id: q.id, part }))
        .is_err()
    {
        tracing::warn!("inbox full: query answer dropped");
    }
}

/// The `limit` entries with the largest counts (ties by name), largest first: a bounded heap,
/// so a shard with a million channels keeps `limit` of them, not a sorted copy of all.
pub(super) fn top<'a>(
    entries: impl Iterator<Item = (&'a str, usize)>,
    limit: usize,
) -> impl Iterator<Item = (&'a str, usize)> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // A min-heap of the best so far: its top is the first to give way.
    let mut heap: BinaryHeap<Reverse<(usize, Reverse<&'a str>)>> = BinaryHeap::new();
    for (name, n) in entries {
        let e = Reverse((n, Reverse(name)));
        if heap.len() < limit {
            heap.push(e);
        } else if heap.peek().is_some_and(|least| e < *least) {
            heap.pop();
            heap.push(e);
        }
    }
    heap.into_sorted_vec()
        .into_iter()
        .map(|Reverse((n, Reverse(name)))| (name, n))
}

#[cfg(test)]
mod tests {
    use super::top;

    #[test]
    fn top_keeps_the_largest_counts_ties_by_name() {
        let entries = [("d", 1), ("a", 5), ("c", 5), ("b", 9), ("e", 0), ("f", 5)];
        let got: Vec<_> = top(entries.iter().copied(), 3).collect();
        assert_eq!(got, [("b", 9), ("a", 5), ("c", 5)]);
        let all: Vec<_> = top(entries.iter().copied(), 10).collect();
        assert_eq!(all.len(), 6);
        assert_eq!(all.last(), Some(&("e", 0)));
        assert_eq!(top(entries.iter().copied(), 0).count(), 0);
    }
}
