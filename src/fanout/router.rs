//! One bounded inbox per shard, fed from any thread (shards, the Redis ingest thread, reloads
//! and drains; events through `node::Shared::deliver`) and drained by its shard; and the closed
//! set of commands it carries (`ShardCmd`), with the ids they name (`ConnId`).
//!
//! A crossbeam `ArrayQueue` plus an `AtomicWaker`: measured in `docs/glommio-findings.md` §2 to
//! beat glommio's own channels, and the only option a plain std thread can feed. The queue wakes
//! its shard itself: no polling timer. Wakes coalesce: after the first, later pushes are no-ops
//! until the shard parks again, which batches bursts for free.
//!
//! Overflow policy: a push to a full inbox fails at once (producers never block); the command is
//! dropped for that shard, counted in `Inbox::dropped`, and reported to the producer (the HTTP
//! API answers 503 so the publisher knows its event did not reach everyone).

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

use crate::fanout::frame::Framed;
use crate::protocol::SocketId;

/// A connection's slot in its shard: index plus generation, so a stale id never names a newer
/// connection that reused the slot. Named here, below the shards, because commands carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub slot: u32,
    pub gen: u32,
}

/// One presence member as a node reports it in a sync: (user id, user_info, sockets on that
/// node).
pub type SyncEntry = (Arc<str>, Option<Arc<str>>, u32);

/// An event for one channel of one app, framed and ready to write.
#[derive(Debug, Clone)]
pub struct Broadcast {
    /// Index of the app in `Config::apps`.
    pub app: usize,
    pub channel: Arc<str>,
    /// The complete WebSocket frame, and the same message compressed once for the subscribers
    /// that negotiated permessage-deflate (if it was: `Framed::deflated`); cloned once per
    /// shard, never per subscriber.
    pub frame: Framed,
    /// The app lists this event in `conflate`: a slow subscriber's queued, unsent frame of the
    /// same event and channel may be dropped for this newer one.
    pub conflate: bool,
    /// Pusher `socket_id` exclusion: this connection does not get the event.
    pub except: Option<SocketId>,
    /// Keep the frame as the channel's last event (cache channels; never internal events).
    pub cache: bool,
    /// When the event arrived (for the delivery-latency histogram).
    pub created: std::time::Instant,
}

/// Everything that can make a shard do work from outside: a closed set.
#[derive(Debug)]
pub enum ShardCmd {
    Broadcast(Broadcast),
    /// To the shard that owns a presence channel (`Router::owner`).
    Presence(PresenceOp),
    /// The owner's answer to a `PresenceOp::Join`, back to the joining connection's shard.
    Joined(Joined),
    /// An HTTP API read: every shard answers its part to `origin`.
    Query(Query),
    Answer(Answer),
    /// Close every connection signed in as this user (terminate_connections).
    TerminateUser {
        app: usize,
        user_id: Arc<str>,
    },
    /// A signed-in user gained (`+1`) or lost (`-1`) a connection; to the user's owner shard
    /// (`Router::user_owner`), which tells watchers on the first and last one.
    UserOnline {
        app: usize,
        user_id: Arc<str>,
        delta: i32,
    },
    /// Start (`on`) or stop watching `watched` for the connection `conn` on shard `shard`; to
    /// the watched user's owner shard.
    Watch {
        app: usize,
        watched: Arc<str>,
        shard: usize,
        conn: ConnId,
        on: bool,
    },
    /// `pusher_internal:watchlist_events` for one connection.
    WatchEvent {
        conn: ConnId,
        online: bool,
        user_id: Arc<str>,
    },
    /// From other nodes of a cluster (via the Redis ingest thread).
    Remote(RemoteCmd),
    /// Graceful drain: stop accepting, close every client with 4200 spread over `window`.
    Drain {
        window: std::time::Duration,
    },
    /// A new app table (configuration reload): apps no longer live have their connections
    /// closed with 4003; new and changed apps take effect for what follows.
    Reload(Arc<crate::apps::AppSet>),
    /// A re-read TLS certificate, for connections accepted from now on.
    Tls(Arc<rustls::ServerConfig>),
    /// Send this shard's metrics.
    Scrape(std::sync::mpsc::SyncSender<crate::metrics::Snapshot>),
    /// A subscribe to a positioned channel, answered under the channel's history lock and
    /// pushed by the subscribing shard into its own inbox: it sits after every event it covers
    /// and before every later one, so the subscription starts exactly at `head`.
    Resume(Resume),
    /// A shard's subscriber count of a channel changed; to the channel's owner, which keeps the
    /// total for `pusher_internal:subscription_count`.
    CountDelta {
        app: usize,
        channel: Arc<str>,
        delta: i64,
    },
}

/// The answer to a subscribe on a positioned channel (`ShardCmd::Resume`).
#[derive(Debug)]
pub struct Resume {
    pub conn: ConnId,
    pub app: usize,
    pub channel: Arc<str>,
    /// The channel's position when answered (`<epoch>:<offset>`).
    pub head: String,
    pub outcome: ResumeOutcome,
}

#[derive(Debug)]
pub enum ResumeOutcome {
    /// No position was asked for.
    Fresh,
    /// The missed frames, in order.
    Recovered(Vec<Bytes>),
    /// The history cannot cover the gap; how many were missed when known.
    Lost(Option<u64>),
}

/// Presence membership changes, applied by the channel's owner shard only, so membership has
/// one writer and member_added / member_removed go out once per user.
#[derive(Debug)]
pub enum PresenceOp {
    Join {
        app: usize,
        channel: Arc<str>,
        user_id: Arc<str>,
        /// `user_info` as JSON.
        user_info: Option<Arc<str>>,
        origin: usize,
        conn: ConnId,
        socket_id: SocketId,
    },
    Leave {
        app: usize,
        channel: Arc<str>,
        user_id: Arc<str>,
        socket_id: SocketId,
    },
}

/// What other nodes tell this node's shards (cluster mode).
#[derive(Debug)]
pub enum RemoteCmd {
    /// A socket of `node` joined a presence channel this shard owns.
    Join {
        node: u64,
        app: usize,
        channel: Arc<str>,
        user_id: Arc<str>,
        user_info: Option<Arc<str>>,
        socket_id: Option<SocketId>,
    },
    Leave {
        node: u64,
        app: usize,
        channel: Arc<str>,
        user_id: Arc<str>,
        socket_id: Option<SocketId>,
    },
    /// `node`'s complete members of the channels its shard `part` (of `parts`) owns: replaces
    /// that node's part on the channels this shard owns.
    Sync {
        node: u64,
        part: usize,
        parts: usize,
        entries: Arc<Vec<(usize, Arc<str>, SyncEntry)>>,
    },
    /// `node` stopped sending heartbeats: remove its members.
    NodeGone { node: u64 },
    /// Publish this shard's part of our members (a node joined, or we reconnected).
    PublishSync,
}

#[derive(Debug)]
pub struct Joined {
    pub app: usize,
    pub channel: Arc<str>,
    pub conn: ConnId,
    pub user_id: Arc<str>,
    /// The `subscription_succeeded` frame with the whole channel's members, or why not.
    pub result: Result<Bytes, &'static str>,
}

#[derive(Debug, Clone)]
pub enum QueryKind {
    /// Occupied channels, optionally by name prefix.
    Channels {
        prefix: String,
    },
    /// One channel, for `/channels/{name}` and `info` on publishes.
    Channel {
        name: Arc<str>,
    },
    /// Members of a presence channel.
    Users {
        channel: Arc<str>,
    },
    Connections,
    /// The debug console's list: each shard's `limit` busiest channels (and the presence
    /// channels it owns with the most members), and how many channels it has.
    TopChannels {
        limit: usize,
    },
}

#[derive(Debug)]
pub struct Query {
    pub id: u64,
    /// The asking shard (on the asking node).
    pub origin: usize,
    pub app: usize,
    pub what: QueryKind,
    /// The asking node, when another node asked (cluster mode): answer through Redis.
    pub remote: Option<u64>,
}

/// One channel as one shard sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPart {
    pub name: String,
    /// Local subscribers on this shard.
    pub subscriptions: u64,
    /// Presence members, from the channel's owner only.
    pub users: Option<u64>,
}

/// One shard's answer to a `Query`.
#[derive(Debug, Default)]
pub struct QueryPart {
    pub connections: u64,
    pub channels: Vec<ChannelPart>,
    /// Member user ids, from the presence channel's owner only.
    pub users: Option<Vec<String>>,
    /// `TopChannels`: how many channels of the app this shard has (it listed at most `limit`).
    pub channels_total: u64,
}

#[derive(Debug)]
pub struct Answer {
    pub id: u64,
    pub part: QueryPart,
}

/// A shard's inbox. Padded so two shards' queue heads never share a cache line.
pub struct Inbox {
    queue: ArrayQueue<ShardCmd>,
    waker: AtomicWaker,
    /// Commands refused because the queue was full (cold path only).
    dropped: AtomicU64,
}

/// The set of shard inboxes, created once at start-up and shared by every producer.
pub struct Router {
    inboxes: Box<[CachePadded<Inbox>]>,
    /// App ids by slot (`apps`), set once per slot, appended by reloads: ownership hashes the
    /// id, so every node of a cluster agrees on it.
    app_ids: Box<[std::sync::OnceLock<Box<str>>]>,
}

/// Which of `parts` owns `channel` of app `app_id` (FNV-1a). The same on every shard and every
/// node with the same number of shards, whatever the order of apps in their configs.
pub fn partition(app_id: &str, channel: &str, parts: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in app_id
        .as_bytes()
        .iter()
        .chain(&[0u8])
        .chain(channel.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % parts.max(1) as u64) as usize
}

impl Router {
    pub fn new(shards: usize, capacity: usize, app_ids: Vec<String>) -> Router {
        let slots: Box<[std::sync::OnceLock<Box<str>>]> = (0..crate::apps::MAX_APP_SLOTS)
            .map(|_| std::sync::OnceLock::new())
            .collect();
        for (slot, id) in app_ids.into_iter().enumerate() {
            let _ = slots[slot].set(id.into_boxed_str());
        }
        Router {
            app_ids: slots,
            inboxes: (0..shards)
                .map(|_| {
                    CachePadded::new(Inbox {
                        queue: ArrayQueue::new(capacity),
                        waker: AtomicWaker::new(),
                        dropped: AtomicU64::new(0),
                    })
                })
                .collect(),
        }
    }

    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// The shard that owns a channel's presence membership and total counts (FNV-1a of app and
    /// name): the same answer on every shard, so every op for a channel meets in one place.
    pub fn owner(&self, app: usize, channel: &str) -> usize {
        partition(self.app_id(app), channel, self.inboxes.len())
    }

    /// The id of the app in `slot` ("" for a slot no app has yet).
    pub fn app_id(&self, slot: usize) -> &str {
        self.app_ids
            .get(slot)
            .and_then(|s| s.get())
            .map_or("", |s| s)
    }

    /// Records the id of a slot a reload gave out (a slot's id never changes).
    pub fn set_app_id(&self, slot: usize, id: &str) {
        if let Some(s) = self.app_ids.get(slot) {
            let _ = s.set(id.into());
        }
    }

    /// The slot of an app id (live or removed), for messages from other cluster nodes.
    pub fn app_index(&self, app_id: &str) -> Option<usize> {
        self.app_ids
            .iter()
            .map_while(|s| s.get())
            .position(|a| &**a == app_id)
    }

    /// Like `try_push`, for control commands a caller retries (a reload): a full inbox is not
    /// counted as a dropped broadcast.
    pub fn try_push_control(&self, shard: usize, cmd: ShardCmd) -> Result<(), ShardCmd> {
        let inbox = &self.inboxes[shard];
        let r = inbox.queue.push(cmd);
        inbox.waker.wake();
        r
    }

    /// Queues `cmd` for `shard` and wakes it. Never blocks; `Err` gives the command back when the
    /// inbox is full (already counted as dropped).
    pub fn try_push(&self, shard: usize, cmd: ShardCmd) -> Result<(), ShardCmd> {
        let inbox = &self.inboxes[shard];
        let r = inbox.queue.push(cmd);
        inbox.waker.wake();
        if r.is_err() {
            inbox.dropped.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Hands `b` to every shard: one `Bytes` clone per shard. Returns how many shards dropped it.
    pub fn broadcast(&self, b: Broadcast) -> usize {
        let n = self.inboxes.len();
        let mut dropped = 0;
        for shard in 0..n - 1 {
            dropped += usize::from(
                self.try_push(shard, ShardCmd::Broadcast(b.clone()))
                    .is_err(),
            );
        }
        dropped += usize::from(self.try_push(n - 1, ShardCmd::Broadcast(b)).is_err());
        dropped
    }

    /// The shard that tracks whether a user is online and who watches them.
    pub fn user_owner(&self, app: usize, user_id: &str) -> usize {
        self.owner(app, &format!("#user:{user_id}"))
    }

    /// Takes the next queued command for `shard` without waiting.
    pub fn try_pop(&self, shard: usize) -> Option<ShardCmd> {
        self.inboxes[shard].queue.pop()
    }

    /// Waits until `shard`'s inbox is non-empty. Registers before the second check, so a push
    /// that races with parking is never missed: a shard never sleeps with commands queued.
    pub async fn ready(&self, shard: usize) {
        let inbox = &self.inboxes[shard];
        poll_fn(|cx| {
            if !inbox.queue.is_empty() {
                return Poll::Ready(());
            }
            inbox.waker.register(cx.waker());
            if inbox.queue.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// Commands dropped for `shard` because its inbox was full.
    pub fn dropped(&self, shard: usize) -> u64 {
        self.inboxes[shard].dropped.load(Ordering::Relaxed)
    }

    pub fn queued(&self, shard: usize) -> usize {
        self.inboxes[shard].queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(i: u8) -> Broadcast {
        Broadcast {
            app: 0,
            channel: "c".into(),
            frame: Framed::plain_only(Bytes::from(vec![i])),
            conflate: false,
            except: None,
            cache: false,
            created: std::time::Instant::now(),
        }
    }

    #[test]
    fn bounded_and_counted() {
        let r = Router::new(2, 2, vec!["a".into()]);
        assert_eq!(r.broadcast(b(1)), 0);
        assert_eq!(r.broadcast(b(2)), 0);
        assert_eq!(r.broadcast(b(3)), 2);
        assert_eq!(r.dropped(0), 1);
        assert_eq!(r.dropped(1), 1);
        let Some(ShardCmd::Broadcast(first)) = r.try_pop(1) else {
            panic!("expected a broadcast")
        };
        assert_eq!(&first.frame.plain()[..], &[1]);
    }

    #[test]
    fn std_thread_wakes_a_parked_consumer() {
        let r = Arc::new(Router::new(1, 1024, vec!["a".into()]));
        let r2 = Arc::clone(&r);
        let producer = std::thread::spawn(move || {
            for i in 0..10_000u32 {
                while r2.try_push(0, ShardCmd::Broadcast(b(i as u8))).is_err() {
                    std::thread::yield_now();
                }
            }
        });
        let mut got = 0;
        futures_lite::future::block_on(async {
            while got < 10_000 {
                r.ready(0).await;
                while r.try_pop(0).is_some() {
                    got += 1;
                }
            }
        });
        producer.join().unwrap();
        assert_eq!(got, 10_000);
    }
}
