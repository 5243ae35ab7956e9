//! Cluster mode, positioned channels, on the ingest thread: the announcements Redis makes for
//! every appended event (delivered at the position Redis gave, with a backfill from Redis when
//! this node's history does not reach it), the history preload at start, and the idempotency
//! ids of Laravel's events, which every node offers for appending.
//!
//! Laravel's broadcaster PUBLISHes each event once; every node receives it, in the one order
//! Redis delivers a channel's messages to every subscriber. Every node offers it
//! (`Shared::offer`) with the same id: the channel, the payload's SHA-256, and how many times
//! this node has seen that exact payload on that channel in the last `WINDOW`; the append
//! script appends only for the first offer of an id. So an event enters the history once
//! while at least one node that received it is alive, whichever node that is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::fanout::frame::SharedFrame;
use crate::node::{Event, Shared};
use crate::protocol::{channel, SocketId};
use crate::redis_conn::{Keyed, Redis};
use crate::resume::{store, Position};

/// How long an identical payload counts as a repeat (well under the ids' lifetime in Redis,
/// `store::DEDUPE_SECS`).
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Positions {
    /// Plain connections for reads (the subscription's cannot send commands), to the node
    /// that holds each channel's keys (`redis_conn`: it follows a failover).
    conns: Option<Keyed>,
    /// (channel, payload digest) → (times seen, last seen).
    seen: HashMap<(String, [u8; 32]), (u64, Instant)>,
}

impl Positions {
    fn conns(&mut self, redis: &Redis) -> &mut Keyed {
        self.conns.get_or_insert_with(|| Keyed::new(redis.clone()))
    }

    /// What Redis keeps of one channel (its epoch and its kept events), or `None` (none, or
    /// Redis unreachable: tried twice, the second time on a new connection).
    fn read(&mut self, redis: &Redis, app_id: &str, ch: &str) -> Option<(u64, Vec<store::Kept>)> {
        let key = store::keys(app_id, ch).1;
        let conns = self.conns(redis);
        let mut last = None;
        for _ in 0..2 {
            let read = conns
                .get(key.as_bytes())
                .and_then(|(node, _)| store::history(&mut node.conn, app_id, ch));
            match read {
                Ok(h) => return h,
                Err(e) => {
                    conns.failed(key.as_bytes());
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            tracing::warn!(error = %e, channel = ch, "cannot read a positioned channel's history from Redis");
        }
        None
    }

    /// What Redis keeps of one channel, as frames.
    fn history(
        &mut self,
        redis: &Redis,
        app_id: &str,
        ch: &str,
    ) -> Option<(u64, Vec<(u64, SharedFrame)>)> {
        self.read(redis, app_id, ch).map(|(e, kept)| {
            (
                e,
                kept.into_iter()
                    .map(|k| (k.offset, SharedFrame::text(k.json.as_bytes())))
                    .collect(),
            )
        })
    }

    /// After this node's announcement subscription is made (at start, and after every
    /// reconnect: a failover, Redis back after an outage): every positioned channel Redis
    /// keeps. A channel this node holds no history of is loaded (a client resuming here right
    /// away finds it). A channel it holds events of is caught up: the events Redis appended
    /// after this node's head (announced while this node was not subscribed: appends held in
    /// an outbox while Redis was away, sent before this node subscribed again) are delivered
    /// to its viewers now, in order, at their positions; after a new epoch (a failover, Redis
    /// restarted), every event of the new epoch Redis keeps is, since this node delivered
    /// none of them. If Redis trimmed past this node's head, the history restarts and those
    /// clients are told `recovered: false` when they resume, as before.
    pub fn preload(&mut self, redis: &Redis, shared: &Shared) {
        // Connections made before the subscription dropped are likely dead.
        if let Some(c) = self.conns.as_mut() {
            c.clear();
        }
        let apps = shared.apps.current();
        // Every primary's keys (a Redis Cluster spreads the channels over its shards).
        let list = redis.primaries().and_then(|nodes| {
            let mut list = Vec::new();
            for mut node in nodes {
                list.extend(store::channels(&mut node.conn)?);
            }
            Ok(list)
        });
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list positioned channels in Redis");
                return;
            }
        };
        let (mut loaded, mut caught_up) = (0, 0);
        for (app_id, ch) in list {
            let Some(app) = shared.router.app_index(&app_id) else {
                continue;
            };
            if !apps.get(app).positioned(&ch) {
                continue;
            }
            let Some((epoch, kept)) = self.read(redis, &app_id, &ch) else {
                continue;
            };
            let missed: Vec<store::Kept> = match shared.resume.head_of(app, &ch) {
                Some(head) if head.epoch == epoch => {
                    let after: Vec<store::Kept> = kept
                        .iter()
                        .filter(|k| k.offset > head.offset)
                        .cloned()
                        .collect();
                    match after.first() {
                        None => continue,
                        Some(k) if k.offset == head.offset + 1 => after,
                        // Trimmed past this node's head: restart from what is kept.
                        Some(_) => Vec::new(),
                    }
                }
                Some(_) => kept.clone(),
                None => Vec::new(),
            };
            if missed.is_empty() {
                let frames = kept
                    .into_iter()
                    .map(|k| (k.offset, SharedFrame::text(k.json.as_bytes())))
                    .collect();
                shared.resume.load(app, &ch, epoch, frames, Instant::now());
                loaded += 1;
                continue;
            }
            for k in &missed {
                shared.deliver_at(
                    Event {
                        app,
                        channel: &ch,
                        frame: SharedFrame::text(k.json.as_bytes()),
                        except: k.except.as_deref().and_then(SocketId::parse),
                        cache: k.cache,
                        positioned: true,
                        settings: apps.get(app),
                    },
                    Position {
                        epoch,
                        offset: k.offset,
                    },
                    || None,
                );
            }
            caught_up += missed.len();
        }
        if loaded > 0 || caught_up > 0 {
            tracing::info!(
                channels = loaded,
                events_caught_up = caught_up,
                "positioned channels' history loaded from Redis"
            );
        }
    }

    /// An announcement on `<cluster channel>:resume`: deliver it here at its position.
    pub fn announced(&mut self, redis: &Redis, shared: &Shared, payload: &[u8]) {
        let Some(a) = store::decode(payload) else {
            shared
                .ingest
                .malformed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        let Some(app) = shared.router.app_index(a.app_id) else {
            return;
        };
        if channel::validate(a.channel).is_err() {
            return;
        }
        let apps = shared.apps.current();
        let dropped = shared.deliver_at(
            Event {
                app,
                channel: a.channel,
                frame: SharedFrame::text(a.json.as_bytes()),
                except: a.except.and_then(SocketId::parse),
                cache: a.cache,
                positioned: true,
                settings: apps.get(app),
            },
            a.position,
            || self.history(redis, a.app_id, a.channel),
        );
        if dropped > 0 {
            shared
                .ingest
                .dropped
                .fetch_add(dropped as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The id every node gives the same Laravel event (see the module's note).
    pub fn dedupe_id(&mut self, channel: &str, payload: &[u8]) -> String {
        let digest: [u8; 32] = Sha256::digest(payload).into();
        let now = Instant::now();
        let e = self
            .seen
            .entry((channel.to_owned(), digest))
            .or_insert((0, now));
        if now.duration_since(e.1) > WINDOW {
            e.0 = 0;
        }
        e.0 += 1;
        e.1 = now;
        format!("{}.{}", hex::encode(&digest[..16]), e.0)
    }

    /// Forgets payloads not seen for a `WINDOW` (once a second).
    pub fn gc(&mut self) {
        let now = Instant::now();
        self.seen
            .retain(|_, (_, at)| now.duration_since(*at) <= WINDOW);
    }
}
