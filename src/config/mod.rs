//! Configuration in two stages: what the user wrote (CLI flags, environment, an optional `.env`
//! file and an optional TOML file), then the validated `Config` the server runs with.
//!
//! Precedence, highest first: CLI flags, process environment, the `.env` file, the TOML file,
//! built-in defaults. Environment names are the ones a Laravel `.env` already has for Reverb.
//! This module may not open sockets or spawn threads; bad settings fail here, at start-up.
//! It knows only the server's configuration: the tools' subcommands are the binary's.
//!
//! Here: the validated types. `raw` is what the user wrote (flags, the TOML file), `env` the
//! environment as Laravel reads it, `resolve` (with `app` and `redis`) turns both into a
//! `Config`, one resolver per section.

mod app;
mod env;
mod raw;
mod redis_section;
mod resolve;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use env::{laravel_prefix, laravel_redis_url, laravel_value, Env, ProcessEnv};
pub use raw::{Cli, RawApp, RawFile, RawRedis, RawServer};

/// Where Laravel's `redis` broadcaster publishes, and how we consume it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    /// redis:// or rediss:// URL, credentials included.
    pub url: String,
    /// Laravel's key prefix (REDIS_PREFIX): stripped from channel names; only channels that start
    /// with it are ours.
    pub prefix: String,
    /// Index of the app Redis events belong to.
    pub app: usize,
    /// CPU the ingest thread is pinned to.
    pub cpu: usize,
    /// PEM CA certificate(s) to trust for rediss:// instead of the public web roots
    /// (REDIS_TLS_CA), for Redis servers with a private CA.
    pub tls_ca: Option<Vec<u8>>,
    /// How the data nodes are found: `url` itself, through sentinels, or a Redis Cluster
    /// (then `url` is a template: its credentials, database and scheme, at each node's address).
    pub topology: Topology,
    /// The cluster outbox's bounds (cluster mode only).
    pub outbox: OutboxLimits,
}

/// Where the Redis data nodes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One server, `RedisConfig::url`.
    Single,
    /// A primary with replicas, found through Redis Sentinel.
    Sentinel {
        /// (host, port) of every sentinel.
        sentinels: Vec<(String, u16)>,
        /// The name the sentinels monitor the primary under.
        master: String,
        /// The sentinels' own `requirepass` (REDIS_PASSWORD is the data nodes').
        password: Option<String>,
    },
    /// A Redis Cluster, reached first through these seed nodes.
    Cluster { seeds: Vec<(String, u16)> },
}

/// Bounds of the cluster outbox: the events this node accepted and holds until every live peer
/// has them. Past either, the HTTP API refuses new publishes with 503.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most bytes held (serialized cluster messages).
    pub max_bytes: usize,
    /// Publishes are refused while the oldest held event is older than this.
    pub max_age: Duration,
}

impl Default for OutboxLimits {
    fn default() -> OutboxLimits {
        OutboxLimits {
            max_bytes: 64 << 20,
            max_age: Duration::from_secs(30),
        }
    }
}

impl RedisConfig {
    /// A client for this Redis, with the configured TLS trust.
    pub fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.tls_ca {
            Some(ca) => redis::Client::build_with_tls(
                self.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
            None => redis::Client::open(self.url.as_str()),
        }
    }
}

impl RedisConfig {
    /// `url` with its host and port replaced by a data node's (Sentinel, Redis Cluster): the
    /// scheme, credentials and database stay.
    pub fn url_at(&self, host: &str, port: u16) -> String {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let Some((scheme, rest)) = self.url.split_once("://") else {
            return format!("redis://{host}:{port}");
        };
        let path_at = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(path_at);
        let auth = authority.rfind('@').map_or("", |at| &authority[..=at]);
        format!("{scheme}://{auth}{host}:{port}{path}")
    }

    /// A client for the data node at `host:port`, with the configured credentials and TLS.
    pub fn client_at(&self, host: &str, port: u16) -> redis::RedisResult<redis::Client> {
        RedisConfig {
            url: self.url_at(host, port),
            ..self.clone()
        }
        .client()
    }

    /// The URL with any password replaced, for logs.
    pub fn redacted_url(&self) -> String {
        match (self.url.split_once("://"), self.url.rfind('@')) {
            (Some((scheme, _)), Some(at)) => format!("{scheme}://***@{}", &self.url[at + 1..]),
            _ => self.url.clone(),
        }
    }
}

/// One Pusher app: credentials and per-app limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
    /// Seconds of silence before the server pings, also sent to clients in
    /// `connection_established` (pusher-js refuses a handshake without it).
    pub activity_timeout: u32,
    /// Largest WebSocket message and largest HTTP-published event `data`, in bytes.
    pub max_message_size: usize,
    /// Most simultaneous connections, all shards together (4004 beyond).
    pub max_connections: Option<usize>,
    /// Who may send client events (REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM).
    pub client_events: ClientEvents,
    /// Client events one connection may send per second (Pusher: 10); 4301 beyond.
    pub client_events_per_second: u32,
    /// Pings (WebSocket ping frames and `pusher:ping`) one connection may send per second;
    /// beyond, it is closed with 4301. Each ping costs a reply; no Pusher client comes close.
    pub max_pings_per_second: u32,
    /// Most members (distinct users) in one presence channel (Pusher: 100).
    pub max_presence_members: usize,
    /// Largest presence `user_info`, as JSON bytes (Pusher: 1 KB; Reverb-style apps send more).
    pub max_user_info: usize,
    /// How long a cache channel keeps its last event (Pusher: 30 minutes).
    pub cache_ttl: Duration,
    /// Send `pusher_internal:subscription_count` to subscribers when a channel's count changes.
    pub subscription_count: bool,
    /// Origins allowed to open WebSocket connections (`*` wildcards; `["*"]` allows all).
    pub allowed_origins: Vec<String>,
    /// Per-connection message rate limit (Reverb's REVERB_APP_RATE_LIMITING_*).
    pub rate_limit: Option<RateLimit>,
    /// Where to POST Pusher-style webhooks.
    pub webhooks: Vec<WebhookTarget>,
    /// Most channels with subscribers, node-wide, counted once per shard that holds some (each
    /// is an index entry there); a subscribe that would add one more is refused.
    pub max_channels: Option<usize>,
    /// Subscription changes: a token bucket per connection, refilled at `per_second` up to
    /// `burst`; every subscribe and unsubscribe takes a token, and a subscribe that finds none
    /// is refused with 4301 (an unsubscribe is always honoured).
    pub subscription_rate: SubscriptionRate,
    /// Positioned channels (`resume`, BTS_APP_RESUME): names matching one of these patterns
    /// (`*` matches any run of characters) carry a position in every event and keep a history
    /// that reconnecting clients resume from. Presence channels are never positioned.
    pub resume: Vec<String>,
    /// permessage-deflate for this app's clients (`compression` in its `[[apps]]` table;
    /// default on): off, its connections never negotiate it, whatever the server says.
    pub compression: bool,
    /// Events carrying full state (`conflate`, BTS_APP_CONFLATE): a slow connection's queued,
    /// unsent frame of one of them is dropped when a newer one of the same channel is queued.
    pub conflate: Vec<std::sync::Arc<str>>,
}

impl App {
    /// Is `channel` a positioned channel of this app?
    pub fn positioned(&self, channel: &str) -> bool {
        !self.resume.is_empty()
            && !channel.starts_with("presence-")
            && self
                .resume
                .iter()
                .any(|p| glob_exact(p.as_bytes(), channel.as_bytes()))
    }
}

/// `*` matches any run of characters; everything else matches itself (case-sensitive, as
/// channel names are).
fn glob_exact(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob_exact(rest, &s[i..])),
        Some((c, rest)) => s
            .split_first()
            .is_some_and(|(d, srest)| c == d && glob_exact(rest, srest)),
    }
}

/// Bounds on positioned channels' history (`[server] resume_*`, BTS_RESUME_*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumeBounds {
    /// Most events one channel's history keeps.
    pub events: usize,
    /// Most bytes (frames) one channel's history keeps.
    pub bytes: usize,
    /// Oldest event one channel's history keeps.
    pub age: Duration,
    /// Most bytes every channel's history holds together on this node; beyond, the channels
    /// that have gone longest without an event lose their history (a new epoch).
    pub memory: usize,
    /// Most events one resume may replay; a longer gap is answered `recovered: false`.
    pub max_replay: usize,
    /// Most events a shard replays per second, all resumes together; beyond, resumes are
    /// answered `recovered: false` until the next second.
    pub replay_per_shard: usize,
}

impl Default for ResumeBounds {
    fn default() -> ResumeBounds {
        ResumeBounds {
            events: 300,
            bytes: 1 << 20,
            age: Duration::from_secs(600),
            memory: 256 << 20,
            max_replay: 300,
            replay_per_shard: 200_000,
        }
    }
}

/// `subscription_changes_per_second` and `subscription_changes_burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriptionRate {
    pub per_second: u32,
    pub burst: u32,
}

/// Defaults no pusher-js or Laravel Echo app reaches: a reconnect subscribes to every channel
/// of the connection at once, and one connection holds at most 1,000.
pub const DEFAULT_SUBSCRIPTION_RATE: SubscriptionRate = SubscriptionRate {
    per_second: 100,
    burst: 1000,
};

/// A webhook endpoint and the event names it wants (`None`: all of them).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTarget {
    pub url: String,
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
}

/// Webhook event names (Pusher's).
pub const WEBHOOK_EVENTS: [&str; 7] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
];

/// At most `max` client messages per `per`; beyond, `pusher:error` 4301, and the connection is
/// closed when `terminate` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub max: u32,
    pub per: Duration,
    pub terminate: bool,
}

/// Does `origin` (the Origin header) match one of `allowed`? Patterns match the whole origin
/// (`https://scores.example.com`) or its host (`scores.example.com`), with `*` matching any run
/// of characters, like Reverb's `allowed_origins`.
pub fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    if allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some(origin) = origin else {
        return false;
    };
    let host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    allowed
        .iter()
        .any(|p| glob(p.as_bytes(), origin.as_bytes()) || glob(p.as_bytes(), host.as_bytes()))
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s
            .split_first()
            .is_some_and(|(d, srest)| c.eq_ignore_ascii_case(d) && glob(rest, srest)),
    }
}

/// REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM: `members` (subscribers of the channel; the default),
/// `all` (any connection of the app), anything else disables client events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEvents {
    Members,
    All,
    None,
}

impl ClientEvents {
    pub fn parse(s: &str) -> ClientEvents {
        match s.trim().to_ascii_lowercase().as_str() {
            "members" => ClientEvents::Members,
            "all" => ClientEvents::All,
            _ => ClientEvents::None,
        }
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// CPU each shard is pinned to; its length is the shard count.
    pub shard_cpus: Vec<usize>,
    pub apps: Vec<App>,
    /// Largest HTTP request body (REVERB_MAX_REQUEST_SIZE).
    pub max_request_size: usize,
    /// How long a pinged connection may stay silent before it is closed with 4201.
    pub pong_timeout: Duration,
    /// Bytes queued for one connection before it is closed as a slow consumer (4100).
    pub max_outbound_bytes: usize,
    /// Write coalescing window in ms (0: off): a connection is written at most once per window,
    /// so events arriving faster than that leave together, at the cost of up to this much
    /// latency for them. Connections receiving less often are written at once.
    pub write_coalesce_ms: u32,
    /// Batch each burst's broadcast writes through a per-shard io_uring (one system call per
    /// 256 connections) instead of one `sendmsg` per connection.
    pub send_ring: bool,
    /// Commands each shard's inbox holds before new broadcasts for it are dropped and counted.
    pub inbox_capacity: usize,
    /// A request head must arrive within this time.
    pub handshake_timeout: Duration,
    /// Most cache channels whose last event is kept (per shard, all apps together).
    pub max_cache_channels: usize,
    /// True when running with the built-in development app.
    pub dev_credentials: bool,
    /// Laravel redis-broadcaster ingest, when a Redis is configured.
    pub redis: Option<RedisConfig>,
    /// Cluster mode: the Redis pub/sub channel the nodes talk on (REVERB_SCALING_CHANNEL).
    pub cluster: Option<String>,
    /// Window over which a graceful drain spreads its closes.
    pub drain_window: Duration,
    /// Where Prometheus metrics are served; `None` when turned off.
    pub metrics: Option<SocketAddr>,
    /// The debug console at /console; `None` (the default) when turned off.
    pub console: Option<ConsoleConfig>,
    /// Certificate and key for TLS on the main port; `None`: plain ws:// and http:// only.
    pub tls: Option<TlsFiles>,
    /// Where the process id is written once every shard accepts (`--pid-file`).
    pub pid_file: Option<PathBuf>,
    /// Bound of each webhook class's queue, held events and retried events.
    pub webhook_queue_capacity: usize,
    /// Most channels with subscribers on one shard, all apps together: bounds each shard's
    /// subscription index.
    pub max_channels_per_shard: usize,
    /// Most channels one `GET /apps/{id}/channels` lists; a listing with more is refused (400)
    /// and names `filter_by_prefix`.
    pub max_channels_listed: usize,
    /// Descriptors kept free below the open-files limit (for `/up`, `/ready`, metrics,
    /// webhooks, Redis): client sockets beyond `limit - reserve` are refused, the address
    /// holding the most first. At most a quarter of the limit is kept.
    pub fd_reserve: usize,
    /// Most sockets one client address (IPv6: one /64) may hold, the HTTP phase included;
    /// `None` (the default): no cap, since behind a load balancer every viewer shares its address.
    pub max_connections_per_ip: Option<u32>,
    /// Load balancers whose PROXY protocol header and `X-Forwarded-For` are believed.
    pub trusted_proxies: crate::proxy::Trusted,
    /// Connections from `trusted_proxies` start with a PROXY protocol (v1 or v2) header.
    pub proxy_protocol: bool,
    /// Positioned channels' history bounds.
    pub resume: ResumeBounds,
    /// permessage-deflate with clients that offer it (BTS_COMPRESSION, `[server] compression`;
    /// default on). Off: never negotiated, nothing compressed (the behaviour before it existed).
    pub compression: bool,
    /// Frames whose payload is shorter than this many bytes are sent uncompressed even to
    /// compressing clients (BTS_COMPRESSION_THRESHOLD, `[server] compression_threshold`).
    pub compression_threshold: usize,
    /// Shared-context compression (BTS_COMPRESSION_CONTEXT, `[server] compression_context`;
    /// default on): clients whose offer allows it keep their window across server messages,
    /// and a message may be sent to them compressed against its channel's previous one (a
    /// "delta" frame, still built once per event). Off: every message compressed on its own.
    pub compression_context: bool,
    /// Unsent bytes a connection's queue must hold before its frames of `conflate` events are
    /// conflated (BTS_CONFLATION_THRESHOLD, `[server] conflation_threshold`).
    pub conflation_threshold: usize,
}

/// Defaults for the channel bounds: far above what any deployment we know of lists or holds
/// (a sports site with one private channel per signed-in user stays under them), low enough
/// that one shard's index and one listing stay bounded.
pub const DEFAULT_MAX_CHANNELS_PER_SHARD: usize = 1_000_000;
pub const DEFAULT_MAX_CHANNELS_LISTED: usize = 100_000;

/// PEM files for TLS (`--tls-cert` / `--tls-key`, BTS_TLS_CERT / BTS_TLS_KEY, or
/// `[server] tls_cert` / `tls_key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The debug console (`/console`): off unless enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// What opens it (BTS_CONSOLE_TOKEN); `None`: the secret of the app it shows.
    pub token: Option<String>,
}

/// Shortest console token accepted.
pub const MIN_CONSOLE_TOKEN: usize = 8;

pub const DEV_APP_ID: &str = "bts-guru-dev";
pub const DEV_APP_KEY: &str = "bts-guru-dev-key";
pub const DEV_APP_SECRET: &str = "bts-guru-dev-secret";

pub const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_ACTIVITY_TIMEOUT: u32 = 30;
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 10_000;
/// Upper bound on any configured message size: far above the "at least 1 MB" users ask for,
/// low enough that one connection cannot hold a large share of memory.
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 16 << 20;
pub const DEFAULT_MAX_REQUEST_SIZE: usize = 10_000;
pub const DEFAULT_OUTBOUND_BYTES: usize = 1 << 20;
/// `compression_threshold`: payloads shorter than this are not compressed (BENCHMARKS.md,
/// "permessage-deflate", has the measurement behind it).
pub const DEFAULT_COMPRESSION_THRESHOLD: usize = 128;
/// `conflation_threshold`: conflation starts once this much is queued for a connection (a
/// connection keeping up never has that much waiting; one that is not falls behind by at most
/// about this much plus one frame per conflated channel).
pub const DEFAULT_CONFLATION_THRESHOLD: usize = 64 << 10;
/// Pings per connection per second before 4301: pusher-js pings at most once per activity
/// timeout (30 s and up), browsers never ping, other clients' keep-alives come seconds apart.
pub const DEFAULT_MAX_PINGS_PER_SECOND: u32 = 10;
/// Write coalescing window (`write_coalesce_ms`); see BENCHMARKS.md for the trade.
pub const DEFAULT_WRITE_COALESCE_MS: u32 = 20;
/// Descriptors kept free below the open-files limit (`fd_reserve`).
pub const DEFAULT_FD_RESERVE: usize = 256;
/// Bound of each webhook class's queue, held set and retry budget (`webhook_queue_capacity`).
pub const DEFAULT_WEBHOOK_QUEUE_CAPACITY: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot read env file {path}: {message}")]
    EnvFile { path: PathBuf, message: String },
    #[error("{name}={value:?} is not valid: {why}")]
    BadValue {
        name: String,
        value: String,
        why: &'static str,
    },
    #[error("app {app:?}: {why}")]
    BadApp { app: String, why: String },
    #[error("{0}")]
    Other(String),
}

/// CPUs this process may run on, in order.
pub fn available_cpus() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    crate::sys::allowed_cpus().unwrap_or_else(|| (0..n).collect())
}
