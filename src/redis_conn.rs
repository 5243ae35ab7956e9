//! Finding Redis: the one place that knows where the data nodes are, for every thread that
//! talks to Redis (the ingest thread, the cluster receiver and publisher, and the resume
//! history's appends, reads and preload through `Keyed`). Three set-ups (`config::Topology`):
//!
//! - one server: `RedisConfig::url`;
//! - Redis Sentinel: each sentinel in turn is asked `SENTINEL get-master-addr-by-name`, and the
//!   node it names is asked `ROLE`: only a node that says `master` is used (a sentinel that has
//!   not seen the failover yet, or a demoted primary, is passed over);
//! - Redis Cluster: a seed (or a node learned before) is asked `CLUSTER SLOTS`; a key's slot
//!   (CRC16 of the key or of its `{hash tag}`, mod 16384) names its primary, which is asked
//!   `ROLE` too.
//!
//! A failover is followed by asking again: every caller holds its connection until it fails (a
//! killed primary closes it; a replica answers writes with READONLY, a moved slot with MOVED,
//! a sharded subscription is ended with `sunsubscribe`) and then calls here for a new one, with
//! a short backoff. Blocking, with timeouts: for the threads that may block, never for shards.
//!
//! `subscribe` makes a subscription and reads it (classic and sharded pub/sub).

use std::time::Duration;

use redis::{Connection, RedisError, RedisResult, Value};

use crate::config::{RedisConfig, Topology};

/// Connecting to one node (a sentinel or a data node).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
/// A command's answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Number of slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// A connection to a data node, and which node it is (`host:port`, for logs).
pub struct Node {
    pub conn: Connection,
    pub addr: String,
}

/// Finds the node to talk to for the configured topology. Cheap to clone; holds no
/// connection.
#[derive(Clone)]
pub struct Redis {
    cfg: RedisConfig,
}

fn failed(what: &'static str, detail: String) -> RedisError {
    RedisError::from((redis::ErrorKind::Io, what, detail))
}

impl Redis {
    pub fn new(cfg: RedisConfig) -> Redis {
        Redis { cfg }
    }

    pub fn config(&self) -> &RedisConfig {
        &self.cfg
    }

    /// Whether node-to-node traffic uses sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`): on a Redis
    /// Cluster, so each message goes to one shard instead of every node of the cluster.
    pub fn sharded(&self) -> bool {
        matches!(self.cfg.topology, Topology::Cluster { .. })
    }

    /// Where we look, for logs (no passwords).
    pub fn describe(&self) -> String {
        let list = |v: &[(String, u16)]| {
            v.iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        match &self.cfg.topology {
            Topology::Single => self.cfg.redacted_url(),
            Topology::Sentinel {
                sentinels, master, ..
            } => format!("sentinel {master} via {}", list(sentinels)),
            Topology::Cluster { seeds } => format!("redis cluster via {}", list(seeds)),
        }
    }

    /// The primary: the one server, the sentinels' current master, or (Redis Cluster) the
    /// primary of slot 0's shard. For writes that are not tied to a key.
    pub fn primary(&self) -> RedisResult<Node> {
        match &self.cfg.topology {
            Topology::Single => {
                let conn = open(self.cfg.client()?)?;
                Ok(Node {
                    conn,
                    addr: self.cfg.redacted_url(),
                })
            }
            Topology::Sentinel {
                sentinels,
                master,
                password,
            } => self.sentinel_primary(sentinels, master, password.as_deref()),
            Topology::Cluster { seeds } => self.cluster_node(seeds, 0),
        }
    }

    /// The primary that holds `key` (its slot's, on a Redis Cluster; else `primary`). Keys and
    /// sharded channels alike: a sharded channel lives in its name's slot.
    pub fn for_key(&self, key: &[u8]) -> RedisResult<Node> {
        match &self.cfg.topology {
            Topology::Cluster { seeds } => self.cluster_node(seeds, slot(key)),
            _ => self.primary(),
        }
    }

    /// A connection for a sharded subscription to `key`'s slot (its primary, in RESP3).
    pub fn sharded_subscriber(&self, key: &[u8]) -> RedisResult<Node> {
        match &self.cfg.topology {
            Topology::Cluster { seeds } => self.cluster_node_as(seeds, slot(key), true),
            _ => self.primary(),
        }
    }

    /// Any live primary: where a classic (`PUBLISH`/`PSUBSCRIBE`) subscription may be made. On
    /// a Redis Cluster every node relays every classic publish, so any one does.
    pub fn any(&self) -> RedisResult<Node> {
        match &self.cfg.topology {
            Topology::Cluster { seeds } => {
                let mut last = failed("no reachable cluster node", String::new());
                for (host, port) in seeds {
                    match self.data_node(host, *port, true) {
                        Ok(n) => return Ok(n),
                        Err(e) => last = e,
                    }
                }
                // No seed is a live primary: the slot map names the others.
                self.cluster_node(seeds, 0).map_err(|_| last)
            }
            _ => self.primary(),
        }
    }

    fn sentinel_primary(
        &self,
        sentinels: &[(String, u16)],
        master: &str,
        password: Option<&str>,
    ) -> RedisResult<Node> {
        let mut why = Vec::new();
        for (host, port) in sentinels {
            let url = match password {
                Some(p) => format!(
                    "redis://:{}@{host}:{port}",
                    form_urlencoded::byte_serialize(p.as_bytes()).collect::<String>()
                ),
                None => format!("redis://{host}:{port}"),
            };
            let asked = redis::Client::open(url.as_str())
                .and_then(open)
                .and_then(|mut s| {
                    redis::cmd("SENTINEL")
                        .arg("get-master-addr-by-name")
                        .arg(master)
                        .query::<Option<(String, u16)>>(&mut s)
                });
            match asked {
                Ok(Some((h, p))) => match self.data_node(&h, p, true) {
                    Ok(n) => return Ok(n),
                    Err(e) => why.push(format!("sentinel {host}:{port} names {h}:{p}: {e}")),
                },
                Ok(None) => why.push(format!("sentinel {host}:{port} knows no {master:?}")),
                Err(e) => why.push(format!("sentinel {host}:{port}: {e}")),
            }
        }
        Err(failed(
            "no sentinel named a reachable primary",
            why.join("; "),
        ))
    }

    /// The primary of `slot`, from the first node that answers `CLUSTER SLOTS`.
    fn cluster_node(&self, seeds: &[(String, u16)], slot: u16) -> RedisResult<Node> {
        self.cluster_node_as(seeds, slot, false)
    }

    fn cluster_node_as(
        &self,
        seeds: &[(String, u16)],
        slot: u16,
        resp3: bool,
    ) -> RedisResult<Node> {
        let mut why = Vec::new();
        let mut tried = Vec::new();
        for (host, port) in seeds {
            let owner = self
                .data_node(host, *port, false)
                .and_then(|mut n| slot_owner(&mut n.conn, slot));
            match owner {
                Ok((h, p)) => {
                    if tried.contains(&(h.clone(), p)) {
                        continue;
                    }
                    match self.data_node_as(&h, p, true, resp3) {
                        Ok(n) => return Ok(n),
                        Err(e) => why.push(format!("{host}:{port} names {h}:{p}: {e}")),
                    }
                    tried.push((h, p));
                }
                Err(e) => why.push(format!("{host}:{port}: {e}")),
            }
        }
        Err(failed(
            "no cluster node named a reachable primary",
            format!("slot {slot}: {}", why.join("; ")),
        ))
    }

    /// A connection to the data node at `host:port`; with `primary`, only if it says `ROLE`
    /// master.
    fn data_node(&self, host: &str, port: u16, primary: bool) -> RedisResult<Node> {
        self.data_node_as(host, port, primary, false)
    }

    fn data_node_as(&self, host: &str, port: u16, primary: bool, resp3: bool) -> RedisResult<Node> {
        let client = if resp3 {
            let url = self.cfg.url_at(host, port);
            let sep = if url.contains('?') { '&' } else { '?' };
            RedisConfig {
                url: format!("{url}{sep}protocol=resp3"),
                ..self.cfg.clone()
            }
            .client()?
        } else {
            self.cfg.client_at(host, port)?
        };
        let mut conn = open(client)?;
        if primary {
            let role: Vec<Value> = redis::cmd("ROLE").query(&mut conn)?;
            let is_master = matches!(role.first(), Some(Value::BulkString(b)) if b == b"master")
                || matches!(role.first(), Some(Value::SimpleString(s)) if s == "master");
            if !is_master {
                return Err(failed("not a primary", format!("{host}:{port}")));
            }
        }
        Ok(Node {
            conn,
            addr: format!("{host}:{port}"),
        })
    }
}

/// Connections for keyed commands (the resume history's), kept between calls: the primary on
/// one server or Sentinel; on a Redis Cluster one per slot in use (each to that slot's
/// primary; at most `KEYED_MAX`, then they are all dropped and made again as needed). Each
/// remembers its node's replication id (`INFO replication`'s `master_replid`), which changes
/// when a replica is promoted or a server restarts without its replication state.
pub struct Keyed {
    redis: Redis,
    conns: std::collections::HashMap<u16, (Node, String)>,
}

/// Most connections a `Keyed` holds.
pub const KEYED_MAX: usize = 64;

impl Keyed {
    pub fn new(redis: Redis) -> Keyed {
        Keyed {
            redis,
            conns: std::collections::HashMap::new(),
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn slot_of(&self, key: &[u8]) -> u16 {
        if self.redis.sharded() {
            slot(key)
        } else {
            0
        }
    }

    /// The connection for `key` and its node's replication id, made if needed.
    pub fn get(&mut self, key: &[u8]) -> RedisResult<(&mut Node, &str)> {
        let s = self.slot_of(key);
        if !self.conns.contains_key(&s) {
            if self.conns.len() >= KEYED_MAX {
                self.conns.clear();
            }
            let mut node = self.redis.for_key(key)?;
            let id = replication_id(&mut node.conn)?;
            self.conns.insert(s, (node, id));
        }
        let (node, id) = self.conns.get_mut(&s).expect("inserted above");
        Ok((node, id.as_str()))
    }

    /// Forgets the connection for `key` (after an error: the next `get` finds the node again).
    pub fn failed(&mut self, key: &[u8]) {
        let s = self.slot_of(key);
        self.conns.remove(&s);
    }

    /// Forgets every connection.
    pub fn clear(&mut self) {
        self.conns.clear();
    }
}

/// A data node's replication id (`master_replid` of `INFO replication`).
pub fn replication_id(conn: &mut Connection) -> RedisResult<String> {
    let info: String = redis::cmd("INFO").arg("replication").query(conn)?;
    info.lines()
        .find_map(|l| l.strip_prefix("master_replid:"))
        .map(|id| id.trim().to_owned())
        .ok_or_else(|| failed("no master_replid in INFO replication", String::new()))
}

impl Redis {
    /// Every primary: the one server or the sentinels' master, or each primary of a Redis
    /// Cluster (for commands that walk the keyspace, like `SCAN`).
    pub fn primaries(&self) -> RedisResult<Vec<Node>> {
        let Topology::Cluster { seeds } = &self.cfg.topology else {
            return Ok(vec![self.primary()?]);
        };
        let mut why = Vec::new();
        for (host, port) in seeds {
            let owners = self
                .data_node(host, *port, false)
                .and_then(|mut n| slot_owners(&mut n.conn));
            match owners {
                Ok(list) => {
                    return list
                        .into_iter()
                        .map(|(h, p)| self.data_node(&h, p, true))
                        .collect()
                }
                Err(e) => why.push(format!("{host}:{port}: {e}")),
            }
        }
        Err(failed(
            "no cluster node answered CLUSTER SLOTS",
            why.join("; "),
        ))
    }
}

/// Every distinct slot owner by `CLUSTER SLOTS`.
fn slot_owners(conn: &mut Connection) -> RedisResult<Vec<(String, u16)>> {
    let ranges: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query(conn)?;
    let mut out: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Value::Array(r) = range else { continue };
        let Some(Value::Array(primary)) = r.get(2) else {
            continue;
        };
        let (Some(Value::BulkString(h)), Some(Value::Int(p))) = (primary.first(), primary.get(1))
        else {
            continue;
        };
        let owner = (String::from_utf8_lossy(h).into_owned(), *p as u16);
        if !out.contains(&owner) {
            out.push(owner);
        }
    }
    Ok(out)
}

/// Connects with the module's timeouts.
fn open(client: redis::Client) -> RedisResult<Connection> {
    let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// Who serves `slot`, by `CLUSTER SLOTS`: `[[start, end, [host, port, id, ...], replicas...]]`.
fn slot_owner(conn: &mut Connection, slot: u16) -> RedisResult<(String, u16)> {
    let ranges: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query(conn)?;
    for range in ranges {
        let Value::Array(r) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
            (r.first(), r.get(1), r.get(2))
        else {
            continue;
        };
        if !(*start..=*end).contains(&i64::from(slot)) {
            continue;
        }
        let host = match primary.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => continue,
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            continue;
        };
        return Ok((host, *port as u16));
    }
    Err(failed("slot not served", format!("slot {slot}")))
}

/// A key's Redis Cluster slot: CRC16 (XMODEM) of the key, or of its hash tag (the part between
/// the first `{` and the next `}`, when not empty), mod 16384.
pub fn slot(key: &[u8]) -> u16 {
    let key = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(key) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// What a subscription asks for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wanted<'a> {
    /// PSUBSCRIBE patterns.
    pub patterns: &'a [&'a str],
    /// SUBSCRIBE channels.
    pub channels: &'a [&'a str],
    /// SSUBSCRIBE (sharded) channels: all in one slot, on that slot's primary, on a connection
    /// opened by `Redis::sharded_subscriber` (RESP3: the redis crate reads `smessage` only
    /// as a RESP3 push). Not with `patterns` or `channels`.
    pub sharded: &'a [&'a str],
}

/// One message: its channel and payload.
pub struct Message {
    pub channel: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Subscribes `node` to `wanted`, and reads: `read` gets each message, or `None` when none
/// came within `tick`; it returns `Some(error)` to end the subscription. Returns the error
/// that ended it.
///
/// Read through the redis crate's `PubSub` (a read timeout on a plain `recv_response` would
/// make the crate skip the next message).
pub fn subscribe(
    node: &mut Node,
    wanted: Wanted<'_>,
    tick: Duration,
    mut read: impl FnMut(Option<Message>) -> Option<RedisError>,
) -> RedisResult<RedisError> {
    if !wanted.sharded.is_empty() {
        let mut c = redis::cmd("SSUBSCRIBE");
        for n in wanted.sharded {
            c.arg(*n);
        }
        // The confirmation comes back as a push, which `get_message` passes over.
        node.conn.send_packed_command(&c.get_packed_command())?;
    }
    let mut pubsub = node.conn.as_pubsub();
    for p in wanted.patterns {
        pubsub.psubscribe(*p)?;
    }
    for c in wanted.channels {
        pubsub.subscribe(*c)?;
    }
    pubsub.set_read_timeout(Some(tick))?;
    loop {
        let msg = match pubsub.get_message() {
            Ok(m) => Some(Message {
                channel: m.get_channel_name().as_bytes().to_vec(),
                payload: m.get_payload_bytes().to_vec(),
            }),
            Err(e) if e.is_timeout() => None,
            Err(e) => return Ok(e),
        };
        if let Some(e) = read(msg) {
            return Ok(e);
        }
    }
}

/// An error that ends a subscription on purpose.
pub fn ended(why: &'static str, detail: String) -> RedisError {
    failed(why, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's own examples (cluster spec: `CRC16("123456789") = 0x31C3`) and hash tags.
    #[test]
    fn slots_follow_the_cluster_spec() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    }

    #[test]
    fn node_urls_keep_credentials_and_database() {
        let mut cfg = RedisConfig {
            url: "redis://user:p%40ss@127.0.0.1:6379/2".into(),
            prefix: String::new(),
            app: 0,
            cpu: 0,
            tls_ca: None,
            topology: Topology::Single,
            outbox: Default::default(),
        };
        assert_eq!(
            cfg.url_at("10.0.0.5", 7001),
            "redis://user:p%40ss@10.0.0.5:7001/2"
        );
        assert_eq!(cfg.url_at("::1", 7001), "redis://user:p%40ss@[::1]:7001/2");
        cfg.url = "rediss://127.0.0.1:6379".into();
        assert_eq!(cfg.url_at("h", 1), "rediss://h:1");
    }
}
