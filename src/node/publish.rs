//! The one way an event enters the shards: framed once per channel, handed to every shard's
//! inbox (`deliver`), and, for what this node's own API and clients publish, to the other nodes
//! of a cluster too (`publish`).
//!
//! The other nodes get the frame's own payload bytes (the event JSON, borrowed, not copied or
//! parsed out of the frame again); nothing here waits: a full inbox or outbox drops and counts.

use std::sync::Arc;
use std::time::Instant;

use super::Shared;
use crate::cluster::outbox::Refused;
use crate::cluster::Wire;
use crate::fanout::frame::SharedFrame;
use crate::fanout::router::Broadcast;
use crate::protocol::SocketId;

/// One event for one channel, framed.
pub struct Event<'a> {
    /// The app's slot.
    pub app: usize,
    pub channel: &'a str,
    pub frame: SharedFrame,
    /// Pusher `socket_id` exclusion: this connection does not get the event.
    pub except: Option<SocketId>,
    /// Keep the frame as the channel's last event (server events on cache channels only).
    pub cache: bool,
    /// A positioned channel's event (`App::positioned`; never internal events): `deliver`
    /// gives it the channel's next position and keeps it in the channel's history.
    pub positioned: bool,
    /// The app's settings (compression, conflation), as the caller already holds them.
    pub settings: &'a crate::config::App,
}

impl Shared {
    /// To this node's subscribers: every shard's inbox gets the frame, one `Bytes` clone each.
    /// Returns how many shards dropped it (their inbox was full). For events every node gets
    /// by itself: Laravel's Redis broadcasts, other nodes' events, internal events.
    ///
    /// This is where every event's frame is compressed, once for every compressing subscriber
    /// on every shard (when compression is on for the server and the app and the payload is
    /// at least `compression_threshold` bytes), and where its conflation key is decided.
    pub fn deliver(&self, event: Event<'_>) -> usize {
        let encoding = self.encoding(&event);
        // In a cluster, positions come from Redis (`offer`, `deliver_at`), never from here.
        if event.positioned && self.cluster.is_none() {
            // The one point positions are assigned on this node: under the channel's history
            // lock, which also covers the broadcast, so inboxes get offsets in order.
            let now = Instant::now();
            return self
                .resume
                .append(event.app, event.channel, &event.frame, now, |frame| {
                    self.broadcast(&event, frame, encoding, now)
                });
        }
        let frame = event.frame.clone();
        self.broadcast(&event, frame, encoding, Instant::now())
    }

    /// `frame` (the event's, with its position if it has one) to every shard's inbox,
    /// compressed and conflated as `encoding` says (`encoding`).
    fn broadcast(
        &self,
        event: &Event<'_>,
        frame: SharedFrame,
        (compress, conflate): (bool, bool),
        created: Instant,
    ) -> usize {
        self.router.broadcast(Broadcast {
            app: event.app,
            channel: Arc::from(event.channel),
            frame: self.framed(event.app, event.channel, frame, compress),
            conflate,
            except: event.except,
            cache: event.cache,
            created,
        })
    }

    /// The frame for the shards, compressed when `compress`; in shared-context mode
    /// (`compression_context`) with its tag and, when the channel's previous compressed message
    /// is remembered, the delta against it (`fanout::frame::SharedFrame::framed_with`). Called
    /// once per event and channel, after the position member (if any) was added: the
    /// dictionary is exactly what clients were sent.
    fn framed(
        &self,
        app: usize,
        channel: &str,
        frame: SharedFrame,
        compress: bool,
    ) -> crate::fanout::frame::Framed {
        if !compress || !self.cfg.compression_context {
            return frame.framed(compress);
        }
        frame.framed_with(
            true,
            Some(|payload| {
                let tag = self.contexts.next_tag();
                let prev = self
                    .contexts
                    .swap(app, channel, tag, payload, Instant::now());
                (tag, prev)
            }),
        )
    }

    /// Whether `event`'s frame is compressed (the server's and the app's switch, and the
    /// threshold) and whether its app conflates it (its event name is in `conflate`).
    fn encoding(&self, event: &Event<'_>) -> (bool, bool) {
        let settings = event.settings;
        let compress = self.cfg.compression
            && settings.compression
            && event.frame.payload().len() >= self.cfg.compression_threshold;
        let conflate = !settings.conflate.is_empty()
            && event
                .frame
                .event_name()
                .is_some_and(|name| settings.conflate.iter().any(|e| **e == *name));
        (compress, conflate)
    }

    /// `deliver`, and in a cluster the same events for the other nodes' subscribers: what this
    /// node's HTTP API and clients publish. In a cluster the outbox takes all of `events` or
    /// none (`Refused`: past its bounds; then none is delivered here either, so no event is
    /// half-delivered). Local delivery of a plain channel's event does not wait for the other
    /// nodes: the outbox holds it until every live peer has it. A positioned channel's event is
    /// not delivered here at all: the outbox holds it until Redis has appended it (its position,
    /// its history) and every node, this one included, delivers Redis's announcement
    /// (`deliver_at`). Returns how many shard copies were dropped (inboxes full).
    pub fn publish_all(&self, events: Vec<Event<'_>>) -> Result<usize, Refused> {
        let Some(cluster) = &self.cluster else {
            return Ok(events.into_iter().map(|e| self.deliver(e)).sum());
        };
        let mut msgs = Vec::new();
        let mut appends = Vec::new();
        for e in &events {
            // The payload was written from strings and escaped JSON: always UTF-8.
            let Ok(json) = std::str::from_utf8(e.frame.payload()) else {
                continue;
            };
            if e.positioned {
                appends.push(self.append_of(e, json, None));
            } else {
                msgs.push(Wire::Event {
                    node: self.node,
                    app: self.router.app_id(e.app).into(),
                    channel: e.channel.into(),
                    json: json.into(),
                    except: e.except.map(|s| s.to_string()),
                    cache: e.cache,
                    seq: None,
                });
            }
        }
        cluster.outbox.hold(&msgs, appends)?;
        Ok(events
            .into_iter()
            .filter(|e| !e.positioned)
            .map(|e| self.deliver(e))
            .sum())
    }

    /// `publish_all` for one event.
    pub fn publish(&self, event: Event<'_>) -> Result<usize, Refused> {
        self.publish_all(vec![event])
    }

    fn append_of(
        &self,
        e: &Event<'_>,
        json: &str,
        dedupe: Option<String>,
    ) -> crate::resume::store::Append {
        crate::resume::store::Append {
            app_id: self.router.app_id(e.app).into(),
            channel: e.channel.into(),
            json: json.into(),
            except: e.except.map(|s| s.to_string()),
            cache: e.cache,
            dedupe,
        }
    }

    /// Cluster mode, a Laravel event on a positioned channel, which every node receives and
    /// offers with the same `dedupe` id: held in the outbox (under its bounds) until Redis
    /// appends it (for the first offer of the id only) and announces it to every node.
    pub fn offer(&self, event: &Event<'_>, dedupe: String) -> Result<(), Refused> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let Ok(json) = std::str::from_utf8(event.frame.payload()) else {
            return Ok(());
        };
        cluster
            .outbox
            .hold(&[], vec![self.append_of(event, json, Some(dedupe))])
    }

    /// Cluster mode: a positioned event as Redis announced it, delivered to this node's
    /// subscribers at the position Redis gave it and kept in this node's history (`fill`: what
    /// Redis kept before it, asked only when this node's history does not reach it). Returns
    /// how many shards dropped it.
    pub fn deliver_at(
        &self,
        event: Event<'_>,
        position: crate::resume::Position,
        fill: impl FnOnce() -> Option<(u64, Vec<(u64, SharedFrame)>)>,
    ) -> usize {
        let encoding = self.encoding(&event);
        let now = Instant::now();
        self.resume
            .append_at(
                event.app,
                event.channel,
                position,
                &event.frame,
                fill,
                |frame| self.broadcast(&event, frame, encoding, now),
            )
            .unwrap_or(0)
    }
}
