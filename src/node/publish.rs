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
}

impl Shared {
    /// To this node's subscribers: every shard's inbox gets the frame, one `Bytes` clone each.
    /// Returns how many shards dropped it (their inbox was full). For events every node gets
    /// by itself: Laravel's Redis broadcasts, other nodes' events, internal events.
    pub fn deliver(&self, event: Event<'_>) -> usize {
        self.router.broadcast(Broadcast {
            app: event.app,
            channel: Arc::from(event.channel),
            frame: event.frame.bytes,
            except: event.except,
            cache: event.cache,
            created: Instant::now(),
        })
    }

    /// `deliver`, and in a cluster the same events for the other nodes' subscribers: what this
    /// node's HTTP API and clients publish. In a cluster the outbox takes all of `events` or
    /// none (`Refused`: past its bounds; then none is delivered here either, so no event is
    /// half-delivered). Local delivery does not wait for the other nodes: the outbox holds the
    /// events until every live peer has them. Returns how many shard copies were dropped
    /// (inboxes full).
    pub fn publish_all(&self, events: Vec<Event<'_>>) -> Result<usize, Refused> {
        if let Some(cluster) = &self.cluster {
            // The payload was written from strings and escaped JSON: always UTF-8.
            let msgs: Vec<Wire<'_>> = events
                .iter()
                .filter_map(|e| {
                    Some(Wire::Event {
                        node: self.node,
                        app: self.router.app_id(e.app).into(),
                        channel: e.channel.into(),
                        json: std::str::from_utf8(e.frame.payload()).ok()?.into(),
                        except: e.except.map(|s| s.to_string()),
                        cache: e.cache,
                        seq: None,
                    })
                })
                .collect();
            cluster.outbox.publish_events(&msgs)?;
        }
        Ok(events.into_iter().map(|e| self.deliver(e)).sum())
    }

    /// `publish_all` for one event.
    pub fn publish(&self, event: Event<'_>) -> Result<usize, Refused> {
        self.publish_all(vec![event])
    }
}
