//! The one way an event enters the shards: framed once per channel, handed to every shard's
//! inbox (`deliver`), and, for what this node's own API and clients publish, to the other nodes
//! of a cluster too (`publish`).
//!
//! The other nodes get the frame's own payload bytes (the event JSON, borrowed, not copied or
//! parsed out of the frame again); nothing here waits: a full inbox or outbox drops and counts.

use std::sync::Arc;
use std::time::Instant;

use super::Shared;
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
}

impl Shared {
    /// To this node's subscribers: every shard's inbox gets the frame, one `Bytes` clone each.
    /// Returns how many shards dropped it (their inbox was full). For events every node gets
    /// by itself: Laravel's Redis broadcasts, other nodes' events, internal events.
    pub fn deliver(&self, event: Event<'_>) -> usize {
        if event.positioned {
            // The one point positions are assigned on this node: under the channel's history
            // lock, which also covers the broadcast, so inboxes get offsets in order.
            let now = Instant::now();
            return self
                .resume
                .append(event.app, event.channel, &event.frame, now, |frame| {
                    self.router.broadcast(Broadcast {
                        app: event.app,
                        channel: Arc::from(event.channel),
                        frame: frame.bytes,
                        except: event.except,
                        cache: event.cache,
                        created: now,
                    })
                });
        }
        self.router.broadcast(Broadcast {
            app: event.app,
            channel: Arc::from(event.channel),
            frame: event.frame.bytes,
            except: event.except,
            cache: event.cache,
            created: Instant::now(),
        })
    }

    /// `deliver`, and in a cluster the same event for the other nodes' subscribers: what this
    /// node's HTTP API and clients publish. Returns how many of this node's shards dropped it.
    pub fn publish(&self, event: Event<'_>) -> usize {
        if let Some(cluster) = &self.cluster {
            // The payload was written from strings and escaped JSON: always UTF-8.
            match std::str::from_utf8(event.frame.payload()) {
                Ok(json) => cluster.publish(&Wire::Event {
                    node: self.node,
                    app: self.router.app_id(event.app).into(),
                    channel: event.channel.into(),
                    json: json.into(),
                    except: event.except.map(|s| s.to_string()),
                    cache: event.cache,
                }),
                Err(_) => {
                    cluster
                        .outbox
                        .dropped
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        self.deliver(event)
    }
}
