//! The Pusher session: what a connection's client messages do. Called synchronously from the
//! connection task with the decoded message; answers by queueing frames on the connection and
//! reaches other shards only through the router.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::{Conn, Shard};
use crate::config::ClientEvents;
use crate::fanout::frame::SharedFrame;
use crate::fanout::router::{PresenceOp, ShardCmd};
use crate::node::Event;
use crate::protocol::inbound::{self, ClientMessage};
use crate::protocol::members::{parse_channel_data, parse_user_data};
use crate::protocol::{auth, channel, outbound, ChannelKind, PusherError};
use crate::resume::Position;

/// Most channels one connection may be subscribed to at once; bounds the index per connection.
pub const MAX_CHANNELS_PER_CONN: usize = 1000;
/// Longest client event name.
const MAX_EVENT_NAME: usize = 200;

/// One Pusher message from the client.
pub(super) fn on_text(shard: &Shard, conn: &Conn, payload: &mut [u8]) {
    if let Some(limit) = shard.app(conn.app).rate_limit {
        // Reverb's semantics: at most `max` messages per `per` window, per connection.
        let (start, n) = conn.rate_window.get();
        let now = Instant::now();
        let (start, n) = if now.duration_since(start) >= limit.per {
            (now, 0)
        } else {
            (start, n)
        };
        conn.rate_window.set((start, n.saturating_add(1)));
        if n >= limit.max {
            if limit.terminate {
                conn.close_pusher(PusherError::RateLimited);
            } else {
                let err = PusherError::RateLimited;
                conn.send_text(&outbound::error(Some(err.code()), &err.to_string()));
            }
            return;
        }
    }
    let msg = match inbound::parse(payload) {
        Ok(m) => m,
        Err(e) => {
            let err = PusherError::InvalidMessage;
            conn.send_text(&outbound::error(Some(err.code()), &format!("{err}: {e}")));
            return;
        }
    };
    match msg {
        ClientMessage::Ping => {
            if ping_allowed(shard, conn) {
                conn.send_text(outbound::pong());
            }
        }
        ClientMessage::Pong => {}
        ClientMessage::Subscribe {
            channel,
            auth,
            channel_data,
            position,
        } => subscribe(
            shard,
            conn,
            &channel,
            auth.as_deref(),
            channel_data.as_deref(),
            position.as_deref(),
        ),
        ClientMessage::Unsubscribe { channel } => {
            subscription_token(shard, conn, false);
            unsubscribe(shard, conn, &channel)
        }
        ClientMessage::ClientEvent {
            event,
            channel,
            data,
        } => client_event(shard, conn, &event, channel.as_deref(), &data),
        ClientMessage::Signin { auth, user_data } => {
            signin(shard, conn, auth.as_deref(), user_data.as_deref())
        }
        ClientMessage::Unknown { event } => {
            let err = PusherError::InvalidMessage;
            conn.send_text(&outbound::error(
                Some(err.code()),
                &format!("{err}: unknown event {event:?}"),
            ));
        }
    }
}

/// Counts one ping (a WebSocket ping frame or `pusher:ping`) against the app's
/// `max_pings_per_second`; over it, the connection is closed with 4301 and `false` returned.
/// Answering pings costs a shard a reply each, so a client may not ask faster than any Pusher
/// client would (pusher-js pings once per activity timeout at most).
pub(super) fn ping_allowed(shard: &Shard, conn: &Conn) -> bool {
    let limit = shard.app(conn.app).max_pings_per_second;
    let now = shard.now_ms();
    let (start, n) = conn.ping_window.get();
    // A fixed one-second window on the shard clock (wrapping arithmetic: the clock is u32 ms).
    let (start, n) = if now.wrapping_sub(start) >= 1000 {
        (now, 0)
    } else {
        (start, n)
    };
    if n >= limit {
        tracing::debug!(socket_id = %conn.socket_id, limit, "ping flood: closing with 4301");
        conn.close_pusher(PusherError::RateLimited);
        return false;
    }
    conn.ping_window.set((start, n + 1));
    true
}

fn unauthorized(conn: &Conn, why: &str) {
    let err = PusherError::Unauthorized;
    conn.send_text(&outbound::error(Some(err.code()), &format!("{err}: {why}")));
}

/// What a subscription change may do (`subscription_token`).
#[derive(Debug, PartialEq, Eq)]
enum Churn {
    Allowed,
    /// A subscribe that found the bucket empty: refused with `pusher:error` 4301.
    Refused,
    /// The same, once refused subscribes have run a whole burst into debt: the client does not
    /// slow down, so the connection is closed with 4301.
    Close,
}

/// Takes a token from `conn`'s subscription-change bucket. Churning fresh public channels costs
/// the server index entries, webhooks and cross-shard counts, so an anonymous socket may only do
/// it at the app's `subscription_rate`. An unsubscribe is always honoured (it only takes state
/// away); a refused subscribe still costs a token, so one that keeps going runs into debt.
fn subscription_token(shard: &Shard, conn: &Conn, subscribe: bool) -> Churn {
    let rate = shard.app(conn.app).subscription_rate;
    let now = shard.now_ms();
    let (tokens, last) = conn.sub_tokens.get();
    let elapsed = now.wrapping_sub(last) as f32 / 1000.0;
    let burst = rate.burst as f32;
    let tokens = (tokens.min(burst) + elapsed * rate.per_second as f32).min(burst);
    if tokens >= 1.0 {
        conn.sub_tokens.set((tokens - 1.0, now));
        return Churn::Allowed;
    }
    if !subscribe {
        conn.sub_tokens.set((tokens, now));
        return Churn::Allowed;
    }
    let owed = tokens - 1.0;
    conn.sub_tokens.set((owed, now));
    if owed <= -burst {
        Churn::Close
    } else {
        Churn::Refused
    }
}

fn subscribe(
    shard: &Shard,
    conn: &Conn,
    channel: &str,
    auth_token: Option<&str>,
    channel_data: Option<&str>,
    position: Option<&str>,
) {
    match subscription_token(shard, conn, true) {
        Churn::Allowed => {}
        Churn::Refused => {
            shard.refused("rate_limit");
            let rate = shard.app(conn.app).subscription_rate;
            let err = PusherError::RateLimited;
            conn.send_text(&outbound::error(
                Some(err.code()),
                &format!(
                    "{err}: at most {} subscribes and unsubscribes per second (bursts of {}); {channel:?} was not subscribed",
                    rate.per_second, rate.burst
                ),
            ));
            return;
        }
        Churn::Close => {
            shard.refused("rate_limit");
            conn.close_pusher(PusherError::RateLimited);
            return;
        }
    }
    if let Err(e) = channel::validate(channel) {
        conn.send_text(&outbound::error(
            None,
            &format!("Invalid channel {channel:?}: {e}"),
        ));
        return;
    }
    if shard
        .index
        .borrow()
        .is_subscribed(conn.id, conn.app, channel)
        || conn.join_pending(channel)
    {
        // Pusher answers a repeated subscribe as a fresh one; the membership does not change.
        if ChannelKind::of(channel) != ChannelKind::Presence {
            conn.send_text(&outbound::subscription_succeeded(channel));
        }
        return;
    }
    if shard.index.borrow().channels_of(conn.id) + conn.pending_joins() >= MAX_CHANNELS_PER_CONN {
        conn.send_text(&outbound::error(
            None,
            &format!("Subscription limit reached: at most {MAX_CHANNELS_PER_CONN} channels per connection"),
        ));
        return;
    }
    let app = shard.app(conn.app);
    if let Some(user) = channel::server_to_user_id(channel) {
        // Only the signed-in user may listen to their own server-to-user channel.
        if conn.user().as_deref() != Some(user) {
            unauthorized(
                conn,
                &format!("{channel:?} needs pusher:signin as user {user:?}"),
            );
            return;
        }
        if let Err(limit) = shard.subscribe_local(conn, channel) {
            conn.send_text(&outbound::error(None, &limit.to_string()));
            return;
        }
        conn.send_text(&outbound::subscription_succeeded(channel));
        return;
    }
    let kind = ChannelKind::of(channel);
    if kind.needs_auth() {
        let data = channel_data.filter(|_| kind == ChannelKind::Presence);
        if kind == ChannelKind::Presence && data.is_none() {
            unauthorized(
                conn,
                &format!("presence channel {channel:?} needs channel_data"),
            );
            return;
        }
        let ok = auth_token.is_some_and(|token| {
            auth::verify_channel_auth(
                &app.key,
                &app.secret,
                &conn.socket_id.to_string(),
                channel,
                data,
                token,
            )
        });
        if !ok {
            unauthorized(conn, &format!("invalid signature for {channel:?}"));
            return;
        }
    }
    if kind == ChannelKind::Presence {
        let member = match parse_channel_data(channel_data.unwrap_or_default(), app.max_user_info) {
            Ok(m) => m,
            Err(e) => {
                conn.send_text(&outbound::subscription_error(
                    channel,
                    "InvalidChannelData",
                    &e.to_string(),
                    400,
                ));
                return;
            }
        };
        // Membership is decided by the channel's owner shard; the subscription starts when it
        // answers (ShardCmd::Joined), with the whole channel's members.
        let channel_arc: Arc<str> = Arc::from(channel);
        conn.ext().presence_pending.push(Rc::from(channel));
        let owner = shard.shared.router.owner(conn.app, channel);
        let op = PresenceOp::Join {
            app: conn.app,
            channel: channel_arc,
            user_id: Arc::from(member.user_id.as_str()),
            user_info: member.user_info.map(|i| Arc::from(i.as_str())),
            origin: shard.id,
            conn: conn.id,
            socket_id: conn.socket_id,
        };
        if shard
            .shared
            .router
            .try_push(owner, ShardCmd::Presence(op))
            .is_err()
        {
            super::subscribe::refuse_overloaded(conn, channel);
        }
        return;
    }
    if app.positioned(channel) {
        // A position that does not parse is one the history cannot cover.
        let from = position.map(|p| {
            Position::parse(p).unwrap_or(Position {
                epoch: 0,
                offset: u64::MAX,
            })
        });
        return shard.subscribe_positioned(conn, channel, from);
    }
    if let Err(limit) = shard.subscribe_local(conn, channel) {
        conn.send_text(&outbound::error(None, &limit.to_string()));
        return;
    }
    conn.send_text(&outbound::subscription_succeeded(channel));
    shard.send_cached(conn, channel);
}

fn unsubscribe(shard: &Shard, conn: &Conn, channel: &str) {
    // A join still waiting for the owner is undone when its answer arrives.
    if conn.join_pending(channel) {
        conn.ext().presence_pending.retain(|c| &**c != channel);
    }
    if shard.unsubscribe_local(conn, channel) {
        shard.leave_presence(conn, channel);
    }
}

fn client_event(shard: &Shard, conn: &Conn, event: &str, channel: Option<&str>, data: &[u8]) {
    let app = shard.app(conn.app);
    let reject = |code: PusherError, why: &str| {
        conn.send_text(&outbound::error(Some(code.code()), why));
    };
    if app.client_events == ClientEvents::None {
        return reject(
            PusherError::ClientEventRejected,
            "Client events are disabled for this app",
        );
    }
    let Some(channel) = channel.filter(|c| channel::validate(c).is_ok()) else {
        return reject(
            PusherError::InvalidMessage,
            "Client event needs a valid channel",
        );
    };
    if event.len() > MAX_EVENT_NAME {
        return reject(
            PusherError::InvalidMessage,
            "Client event name is longer than 200 characters",
        );
    }
    let kind = ChannelKind::of(channel);
    if !kind.allows_client_events() || channel.starts_with('#') {
        return reject(
            PusherError::Unauthorized,
            &format!(
                "Client events are only allowed on private and presence channels, not {channel:?}"
            ),
        );
    }
    let subscribed = shard
        .index
        .borrow()
        .is_subscribed(conn.id, conn.app, channel);
    if !subscribed && app.client_events == ClientEvents::Members {
        return reject(
            PusherError::Unauthorized,
            &format!("Client events on {channel:?} need a subscription to it"),
        );
    }
    // Token bucket: `rate` per second, bursts up to `rate`.
    let rate = f64::from(app.client_events_per_second);
    let now = Instant::now();
    let elapsed = now.duration_since(conn.client_refill.get()).as_secs_f64();
    let tokens = (conn.client_tokens.get().min(rate) + elapsed * rate).min(rate);
    conn.client_refill.set(now);
    if tokens < 1.0 {
        conn.client_tokens.set(tokens);
        return reject(
            PusherError::ClientEventRejected,
            &format!(
                "Client event rejected: over the rate limit of {} per second",
                app.client_events_per_second
            ),
        );
    }
    conn.client_tokens.set(tokens - 1.0);
    let user_id = conn.presence_user(channel);
    shard
        .stats
        .events_client
        .set(shard.stats.events_client.get() + 1);
    let json = outbound::client_event(event, channel, data, user_id.as_deref());
    let published = shard.shared.publish(Event {
        app: conn.app,
        channel,
        frame: SharedFrame::text(&json),
        // Never echoed to the sender.
        except: Some(conn.socket_id),
        // A cache channel's cached event is the last one its server published (in a cluster,
        // on every node): a client event would otherwise replace it for the whole TTL (Pusher
        // caches server events only).
        cache: false,
        positioned: app.positioned(channel),
        settings: &app,
    });
    if let Err(refused) = published {
        // The cluster outbox is past its bounds: the event goes nowhere (no webhook either).
        tracing::debug!(%refused, "client event refused");
        return;
    }
    if !app.webhooks.is_empty() && crate::webhooks::wanted(&app, "client_event") {
        let mut hook = serde_json::json!({
            "name": "client_event",
            "channel": channel,
            "event": event,
            "data": String::from_utf8_lossy(data),
            "socket_id": conn.socket_id.to_string(),
        });
        if let Some(uid) = &user_id {
            hook["user_id"] = serde_json::Value::from(&**uid);
        }
        shard.shared.webhooks.emit(conn.app, hook);
    }
}

fn signin(shard: &Shard, conn: &Conn, auth_token: Option<&str>, user_data: Option<&str>) {
    let app = shard.app(conn.app);
    if conn.user().is_some() {
        conn.send_text(&outbound::error(
            None,
            "This connection is already signed in",
        ));
        return;
    }
    let (Some(token), Some(user_data)) = (auth_token, user_data) else {
        return conn.close_pusher(PusherError::Unauthorized);
    };
    let signed = token.split_once(':').is_some_and(|(key, sig)| {
        key == app.key
            && auth::verify(
                &app.secret,
                format!("{}::user::{user_data}", conn.socket_id).as_bytes(),
                sig,
            )
    });
    let user = match parse_user_data(user_data) {
        Ok(u) if signed => u,
        // Pusher and Soketi close the connection on a failed sign-in.
        _ => return conn.close_pusher(PusherError::Unauthorized),
    };
    {
        let mut ext = conn.ext();
        ext.user = Some(Rc::from(user.id.as_str()));
        ext.watchlist = user
            .watchlist
            .iter()
            .map(|w| Rc::from(w.as_str()))
            .collect();
    }
    conn.send_text(&outbound::signin_success(user_data));
    shard.user_presence(conn, &user.id, 1);
}
