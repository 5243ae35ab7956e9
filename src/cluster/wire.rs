//! The cluster's wire format: what one node tells the others on the Redis pub/sub channel.
//!
//! A contract between nodes of different versions: the JSON field names are short and fixed
//! (`#[serde(rename)]`), new fields are optional, and `wire_bytes_are_unchanged` pins the bytes.
//! Pure: no I/O, no clock.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::fanout::router::QueryKind;

/// One message on the cluster channel. Field names are one or two letters on the wire:
/// events are the bulk of the traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub enum Wire<'a> {
    /// An event for one channel.
    #[serde(rename = "ev")]
    Event {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "a")]
        app: Cow<'a, str>,
        #[serde(rename = "c")]
        channel: Cow<'a, str>,
        /// The complete Pusher event JSON, as subscribers get it.
        #[serde(rename = "j")]
        json: Cow<'a, str>,
        /// The `socket_id` that does not get the event.
        #[serde(rename = "x")]
        except: Option<String>,
        /// Keep it as the channel's last event (cache channels).
        #[serde(rename = "k")]
        cache: bool,
        /// This node's number for it (from 1, no gaps, per process: the node id is the epoch).
        /// Receivers deliver each origin's events in this order and once. Added later: absent
        /// from older nodes (their events are delivered as they come), ignored by them.
        /// Always the last field: `Outbox::publish_event` appends it to the serialized rest.
        #[serde(rename = "q", default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// A socket of `node` joined a presence channel.
    #[serde(rename = "pj")]
    Join {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "a")]
        app: String,
        #[serde(rename = "c")]
        channel: String,
        #[serde(rename = "u")]
        user: String,
        /// `user_info` as JSON.
        #[serde(rename = "i")]
        info: Option<String>,
        #[serde(rename = "s")]
        socket: String,
    },
    #[serde(rename = "pl")]
    Leave {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "a")]
        app: String,
        #[serde(rename = "c")]
        channel: String,
        #[serde(rename = "u")]
        user: String,
        #[serde(rename = "s")]
        socket: String,
    },
    /// `node`'s members of every channel its shard `part` (of `parts`) owns.
    #[serde(rename = "sync")]
    Sync {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "p")]
        part: usize,
        #[serde(rename = "ps")]
        parts: usize,
        #[serde(rename = "m")]
        members: Vec<SyncMember>,
    },
    /// A node (re)joined.
    #[serde(rename = "hello")]
    Hello {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "s")]
        shards: usize,
    },
    /// Heartbeat, with the node's shard count (how many answers a query gets from it).
    #[serde(rename = "hb")]
    Heartbeat {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "s")]
        shards: usize,
        /// Acks: (origin node, the last of its event seqs this node has delivered, with none
        /// missing). Added later, like `lo`.
        #[serde(rename = "ak", default, skip_serializing_if = "Option::is_none")]
        acks: Option<Vec<(u64, u64)>>,
        /// The oldest seq this node still holds (it resends from there); a receiver behind it
        /// missed events that were given up (it was dropped as silent) and moves on.
        #[serde(rename = "lo", default, skip_serializing_if = "Option::is_none")]
        low: Option<u64>,
    },
    /// `node` is missing `to`'s events from seq `from` on: resend them. (Added with `q`: only
    /// sent to nodes that number their events; older nodes count it as malformed.)
    #[serde(rename = "nack")]
    Nack {
        #[serde(rename = "n")]
        node: u64,
        to: u64,
        from: u64,
    },
    /// An HTTP API read, asked of every node's shards; answered to shard `origin` of `node`.
    #[serde(rename = "q")]
    Query {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "o")]
        origin: usize,
        id: u64,
        #[serde(rename = "a")]
        app: String,
        #[serde(rename = "k")]
        kind: WireQuery,
    },
    /// One shard's part of the answer to query `id` of node `to`.
    #[serde(rename = "ans")]
    Answer {
        #[serde(rename = "n")]
        node: u64,
        to: u64,
        #[serde(rename = "o")]
        origin: usize,
        id: u64,
        #[serde(rename = "conns")]
        connections: u64,
        /// (name, subscriptions, presence users).
        #[serde(rename = "ch")]
        channels: Vec<(String, u64, Option<u64>)>,
        users: Option<Vec<String>>,
        /// `QueryPart::channels_total` (added later: absent from older nodes, ignored by them).
        #[serde(rename = "ct", default)]
        channels_total: u64,
    },
    /// terminate_connections for a user, on every node.
    #[serde(rename = "term")]
    Terminate {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "a")]
        app: String,
        #[serde(rename = "u")]
        user: String,
    },
    /// `node`'s own occupancy of a webhook key (`hook_key_*`) turned on or off: the cluster-
    /// wide webhooks (occupied/vacated, member_added/removed) are decided from these, in the
    /// order Redis delivers them, which is the same on every node (`ingest::cluster::Arbiter`).
    #[serde(rename = "hk")]
    Hook {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "a")]
        app: String,
        #[serde(rename = "k")]
        key: String,
        on: bool,
    },
    /// `node` saw node `dead` go silent past the timeout.
    #[serde(rename = "gone")]
    Gone {
        #[serde(rename = "n")]
        node: u64,
        #[serde(rename = "d")]
        dead: u64,
    },
}

/// One presence member in a sync: (app id, channel, user id, user_info, sockets on the node).
pub type SyncMember = (String, String, String, Option<String>, u32);

impl Wire<'_> {
    /// The node that sent it.
    pub fn node(&self) -> u64 {
        match self {
            Wire::Event { node, .. }
            | Wire::Join { node, .. }
            | Wire::Leave { node, .. }
            | Wire::Sync { node, .. }
            | Wire::Hello { node, .. }
            | Wire::Heartbeat { node, .. }
            | Wire::Query { node, .. }
            | Wire::Answer { node, .. }
            | Wire::Terminate { node, .. }
            | Wire::Hook { node, .. }
            | Wire::Nack { node, .. }
            | Wire::Gone { node, .. } => *node,
        }
    }
}

/// Webhook key of a channel's occupancy.
pub fn hook_key_channel(channel: &str) -> String {
    format!("c\0{channel}")
}

/// Webhook key of a user's membership of a presence channel.
pub fn hook_key_member(channel: &str, user_id: &str) -> String {
    format!("m\0{channel}\0{user_id}")
}

/// What an HTTP API read asks, on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WireQuery {
    Channels(String),
    Channel(String),
    Users(String),
    Connections,
    /// `QueryKind::TopChannels` (added later: a node without it does not answer, and the
    /// console shows no channel list until every node has it).
    Top(usize),
}

impl WireQuery {
    pub fn from_kind(k: &QueryKind) -> WireQuery {
        match k {
            QueryKind::Channels { prefix } => WireQuery::Channels(prefix.clone()),
            QueryKind::Channel { name } => WireQuery::Channel(name.to_string()),
            QueryKind::Users { channel } => WireQuery::Users(channel.to_string()),
            QueryKind::Connections => WireQuery::Connections,
            QueryKind::TopChannels { limit } => WireQuery::Top(*limit),
        }
    }

    pub fn into_kind(self) -> QueryKind {
        match self {
            WireQuery::Channels(prefix) => QueryKind::Channels { prefix },
            WireQuery::Channel(name) => QueryKind::Channel { name: name.into() },
            WireQuery::Users(channel) => QueryKind::Users {
                channel: channel.into(),
            },
            WireQuery::Connections => QueryKind::Connections,
            WireQuery::Top(limit) => QueryKind::TopChannels { limit },
        }
    }
}

/// A random node id (time, pid and address entropy; uniqueness, not secrecy).
pub fn new_node_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ (u64::from(std::process::id()) << 32) ^ (&t as *const u64 as u64);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes other nodes (of this version or an older one) read: one of each message, as
    /// the wire format had them before its fields were named in the code.
    #[test]
    fn wire_bytes_are_unchanged() {
        let cases: Vec<(Wire, &str)> = vec![
            (
                Wire::Event {
                    node: 1,
                    app: "app".into(),
                    channel: "c".into(),
                    json: r#"{"event":"e"}"#.into(),
                    except: Some("1.2".into()),
                    cache: true,
                    seq: None,
                },
                r#"{"t":"ev","n":1,"a":"app","c":"c","j":"{\"event\":\"e\"}","x":"1.2","k":true}"#,
            ),
            (
                Wire::Event {
                    node: 1,
                    app: "app".into(),
                    channel: "c".into(),
                    json: "{}".into(),
                    except: None,
                    cache: false,
                    seq: Some(7),
                },
                r#"{"t":"ev","n":1,"a":"app","c":"c","j":"{}","x":null,"k":false,"q":7}"#,
            ),
            (
                Wire::Join {
                    node: 1,
                    app: "a".into(),
                    channel: "presence-p".into(),
                    user: "7".into(),
                    info: None,
                    socket: "1.2".into(),
                },
                r#"{"t":"pj","n":1,"a":"a","c":"presence-p","u":"7","i":null,"s":"1.2"}"#,
            ),
            (
                Wire::Leave {
                    node: 1,
                    app: "a".into(),
                    channel: "presence-p".into(),
                    user: "7".into(),
                    socket: "1.2".into(),
                },
                r#"{"t":"pl","n":1,"a":"a","c":"presence-p","u":"7","s":"1.2"}"#,
            ),
            (
                Wire::Sync {
                    node: 2,
                    part: 0,
                    parts: 2,
                    members: vec![("a".into(), "presence-p".into(), "7".into(), None, 2)],
                },
                r#"{"t":"sync","n":2,"p":0,"ps":2,"m":[["a","presence-p","7",null,2]]}"#,
            ),
            (
                Wire::Hello { node: 3, shards: 4 },
                r#"{"t":"hello","n":3,"s":4}"#,
            ),
            (
                Wire::Heartbeat {
                    node: 3,
                    shards: 4,
                    acks: None,
                    low: None,
                },
                r#"{"t":"hb","n":3,"s":4}"#,
            ),
            (
                Wire::Heartbeat {
                    node: 3,
                    shards: 4,
                    acks: Some(vec![(5, 10)]),
                    low: Some(9),
                },
                r#"{"t":"hb","n":3,"s":4,"ak":[[5,10]],"lo":9}"#,
            ),
            (
                Wire::Nack {
                    node: 3,
                    to: 5,
                    from: 11,
                },
                r#"{"t":"nack","n":3,"to":5,"from":11}"#,
            ),
            (
                Wire::Query {
                    node: 3,
                    origin: 1,
                    id: 9,
                    app: "a".into(),
                    kind: WireQuery::Channels("presence-".into()),
                },
                r#"{"t":"q","n":3,"o":1,"id":9,"a":"a","k":{"Channels":"presence-"}}"#,
            ),
            (
                Wire::Answer {
                    node: 3,
                    to: 4,
                    origin: 1,
                    id: 9,
                    connections: 5,
                    channels: vec![("c".into(), 2, Some(1))],
                    users: None,
                    channels_total: 1,
                },
                r#"{"t":"ans","n":3,"to":4,"o":1,"id":9,"conns":5,"ch":[["c",2,1]],"users":null,"ct":1}"#,
            ),
            (
                Wire::Terminate {
                    node: 3,
                    app: "a".into(),
                    user: "7".into(),
                },
                r#"{"t":"term","n":3,"a":"a","u":"7"}"#,
            ),
            (
                Wire::Hook {
                    node: 3,
                    app: "a".into(),
                    key: "c\0x".into(),
                    on: true,
                },
                r#"{"t":"hk","n":3,"a":"a","k":"c\u0000x","on":true}"#,
            ),
            (
                Wire::Gone { node: 3, dead: 5 },
                r#"{"t":"gone","n":3,"d":5}"#,
            ),
        ];
        for (msg, json) in cases {
            assert_eq!(serde_json::to_string(&msg).unwrap(), json);
            let mut bytes = json.as_bytes().to_vec();
            let back: Wire = simd_json::serde::from_slice(&mut bytes).unwrap();
            assert_eq!(back, msg);
        }
        // An answer from a node older than `ct`.
        let mut old =
            br#"{"t":"ans","n":3,"to":4,"o":1,"id":9,"conns":5,"ch":[],"users":null}"#.to_vec();
        let back: Wire = simd_json::serde::from_slice(&mut old).unwrap();
        assert!(matches!(
            back,
            Wire::Answer {
                channels_total: 0,
                ..
            }
        ));
    }
}
