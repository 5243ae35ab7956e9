//! Configuration in two stages: what the user wrote (CLI flags, environment, an optional `.env`
//! file and an optional TOML file), then the validated `Config` the server runs with.
//!
//! Precedence, highest first: CLI flags, process environment, the `.env` file, the TOML file,
//! built-in defaults. Environment names are the ones a Laravel `.env` already has for Reverb.
//! This module may not open sockets or spawn threads; bad settings fail here, at start-up.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Command-line flags of the daemon.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Cli {
    /// Address to bind (overrides REVERB_SERVER_HOST; default 0.0.0.0, or 127.0.0.1 while running
    /// with the built-in development credentials).
    #[arg(long)]
    pub host: Option<IpAddr>,
    /// Port to bind (overrides REVERB_SERVER_PORT; default 8080; 0 picks a free port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Number of shards, one glommio executor pinned to its own CPU each (default: one per CPU
    /// this process may run on).
    #[arg(long)]
    pub shards: Option<usize>,
    /// TOML file with several apps and every limit (see README).
    #[arg(long, env = "BTS_CONFIG")]
    pub config: Option<PathBuf>,
    /// A dotenv file to read REVERB_* settings from (default: ./.env when it exists).
    #[arg(long, env = "BTS_ENV_FILE")]
    pub env_file: Option<PathBuf>,
    /// Allow the built-in development credentials on a non-loopback address.
    #[arg(long)]
    pub allow_dev_credentials: bool,
    /// Consume Laravel's redis broadcaster from this Redis (redis:// or rediss://); overrides
    /// REDIS_URL / REDIS_HOST.
    #[arg(long)]
    pub redis: Option<String>,
    /// Do not consume Redis even when REDIS_URL or REDIS_HOST is set.
    #[arg(long)]
    pub no_redis: bool,
    /// CPU the Redis ingest thread is pinned to (default: a CPU no shard uses, else the last).
    #[arg(long)]
    pub ingest_cpu: Option<usize>,
    /// Run as one node of a cluster sharing the Redis (REVERB_SCALING_ENABLED=true).
    #[arg(long)]
    pub cluster: bool,
    /// Seconds over which SIGTERM/SIGINT spread the 4200 closes of a graceful drain.
    #[arg(long)]
    pub drain_secs: Option<u64>,
    /// Port of the Prometheus /metrics listener (METRICS_PORT; default 9601; 0 picks one).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Address of the /metrics listener (METRICS_HOST; default 127.0.0.1).
    #[arg(long)]
    pub metrics_host: Option<IpAddr>,
    /// No /metrics listener (METRICS_ENABLED=false).
    #[arg(long)]
    pub no_metrics: bool,
    /// PEM certificate chain: serve wss:// and https:// on the same port as ws:// and http://
    /// (BTS_TLS_CERT; needs --tls-key). Re-read on SIGHUP.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert (BTS_TLS_KEY).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Log format on stderr: `human` (default) or `json` (one JSON object per line).
    #[arg(long, env = "BTS_LOG_FORMAT", value_parser = ["human", "json"])]
    pub log_format: Option<String>,
    /// Write the process id to this file once every shard accepts, and remove it on exit if it
    /// still holds this process's id (BTS_PID_FILE); `kill -HUP "$(cat FILE)"` then reloads
    /// the newest process, even while an old one drains beside it.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Serve the debug console at /console (BTS_CONSOLE=true), opened with BTS_CONSOLE_TOKEN or,
    /// when none is set, the app secret.
    #[arg(long)]
    pub console: bool,
    /// Never join a cluster, whatever REVERB_SCALING_ENABLED says (`bts-guru demo`: simulated
    /// events must not reach a real deployment's nodes).
    #[arg(skip)]
    pub standalone: bool,
}

impl Cli {
    /// These flags with `later`'s (given after a subcommand) over them.
    pub fn overlay(self, later: Cli) -> Cli {
        // Destructured without `..`: a new flag does not compile until it is merged here.
        let Cli {
            host,
            port,
            shards,
            config,
            env_file,
            allow_dev_credentials,
            redis,
            no_redis,
            ingest_cpu,
            cluster,
            drain_secs,
            metrics_port,
            metrics_host,
            no_metrics,
            tls_cert,
            tls_key,
            log_format,
            pid_file,
            console,
            standalone,
        } = later;
        Cli {
            host: host.or(self.host),
            port: port.or(self.port),
            shards: shards.or(self.shards),
            config: config.or(self.config),
            env_file: env_file.or(self.env_file),
            allow_dev_credentials: allow_dev_credentials || self.allow_dev_credentials,
            redis: redis.or(self.redis),
            no_redis: no_redis || self.no_redis,
            ingest_cpu: ingest_cpu.or(self.ingest_cpu),
            cluster: cluster || self.cluster,
            drain_secs: drain_secs.or(self.drain_secs),
            metrics_port: metrics_port.or(self.metrics_port),
            metrics_host: metrics_host.or(self.metrics_host),
            no_metrics: no_metrics || self.no_metrics,
            tls_cert: tls_cert.or(self.tls_cert),
            tls_key: tls_key.or(self.tls_key),
            log_format: log_format.or(self.log_format),
            pid_file: pid_file.or(self.pid_file),
            console: console || self.console,
            standalone: standalone || self.standalone,
        }
    }
}

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

/// The TOML file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub apps: Vec<RawApp>,
    #[serde(default)]
    pub redis: RawRedis,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Option<String>,
    pub prefix: Option<String>,
    /// App id Redis events belong to (default: the first app).
    pub app: Option<String>,
    pub enabled: Option<bool>,
    pub ingest_cpu: Option<usize>,
    pub cluster: Option<bool>,
    pub cluster_channel: Option<String>,
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    pub shards: Option<usize>,
    pub max_request_size: Option<usize>,
    pub pong_timeout_secs: Option<u64>,
    pub max_outbound_bytes: Option<usize>,
    pub write_coalesce_ms: Option<u32>,
    pub send_ring: Option<bool>,
    pub inbox_capacity: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
    pub allow_dev_credentials: Option<bool>,
    pub max_cache_channels: Option<usize>,
    pub drain_secs: Option<u64>,
    pub metrics_port: Option<u16>,
    pub metrics_host: Option<IpAddr>,
    pub metrics: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub console: Option<bool>,
    pub console_token: Option<String>,
    pub pid_file: Option<PathBuf>,
    pub webhook_queue_capacity: Option<usize>,
    pub max_channels_per_shard: Option<usize>,
    pub max_channels_listed: Option<usize>,
    pub fd_reserve: Option<usize>,
    pub max_connections_per_ip: Option<u32>,
    pub trusted_proxies: Option<Vec<String>>,
    pub proxy_protocol: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub id: Option<String>,
    pub key: Option<String>,
    pub secret: Option<String>,
    pub activity_timeout: Option<u32>,
    pub max_message_size: Option<usize>,
    pub max_connections: Option<usize>,
    pub accept_client_events_from: Option<String>,
    pub client_events_per_second: Option<u32>,
    pub max_pings_per_second: Option<u32>,
    pub max_presence_members: Option<usize>,
    pub max_user_info: Option<usize>,
    pub cache_ttl_secs: Option<u64>,
    pub subscription_count: Option<bool>,
    pub allowed_origins: Option<Vec<String>>,
    pub rate_limiting: Option<bool>,
    pub rate_limit_max_attempts: Option<u32>,
    pub rate_limit_decay_seconds: Option<u64>,
    pub rate_limit_terminate: Option<bool>,
    pub webhooks: Option<Vec<WebhookTarget>>,
    pub max_channels: Option<usize>,
    pub subscription_changes_per_second: Option<u32>,
    pub subscription_changes_burst: Option<u32>,
}

/// Environment lookups; the process environment in production, a map in tests.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

impl Env for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// The process environment layered over a `.env` file's values.
pub struct ProcessEnv {
    file: HashMap<String, String>,
}

impl ProcessEnv {
    /// Reads `env_file`, or `./.env` when none is named and one exists.
    pub fn load(env_file: Option<&PathBuf>) -> Result<ProcessEnv, ConfigError> {
        let path = match env_file {
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from(".env")).filter(|p| p.is_file()),
        };
        let mut file = HashMap::new();
        if let Some(path) = path {
            let iter = dotenvy::from_path_iter(&path).map_err(|e| ConfigError::EnvFile {
                path: path.clone(),
                message: e.to_string(),
            })?;
            for item in iter {
                let (k, v) = item.map_err(|e| ConfigError::EnvFile {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                // A later line wins, as in phpdotenv.
                file.insert(k, v);
            }
        }
        Ok(ProcessEnv { file })
    }
}

impl Env for ProcessEnv {
    /// The process environment first, else the file; either way read as Laravel's `env()` reads
    /// it ([`laravel_value`]), so a Laravel `.env` means to bts-guru what it means to Laravel.
    fn get(&self, name: &str) -> Option<String> {
        let raw = std::env::var(name)
            .ok()
            .or_else(|| self.file.get(name).cloned())?;
        laravel_value(name, &raw)
    }
}

/// Variables whose `null` Laravel passes on as null where its configuration has a non-null
/// default, with an effect bts-guru reproduces: `REDIS_PREFIX=null` gives the redis broadcaster
/// no prefix at all (`config/database.php` `options.prefix`, used as the broadcaster's channel
/// prefix), not the APP_NAME-derived default.
const NULL_MEANS_EMPTY: [&str; 1] = ["REDIS_PREFIX"];

/// A variable's value as Laravel's `env()` returns it (`Illuminate\Support\Env::get`), given
/// the string the environment or the dotenv parser holds (the parser has already removed the
/// file's own quotes and expanded `${VAR}`): `true`/`(true)` and `false`/`(false)` (any case)
/// are booleans, written here as `true`/`false`; `empty`/`(empty)` is the empty string;
/// `null`/`(null)` is unset (`None`; the empty string for [`NULL_MEANS_EMPTY`]); otherwise one
/// pair of matching surrounding quotes is removed (`'/\A([\'"])(.*)\1\z/'`).
pub fn laravel_value(name: &str, raw: &str) -> Option<String> {
    match raw.to_ascii_lowercase().as_str() {
        "true" | "(true)" => return Some("true".into()),
        "false" | "(false)" => return Some("false".into()),
        "empty" | "(empty)" => return Some(String::new()),
        "null" | "(null)" if NULL_MEANS_EMPTY.contains(&name) => return Some(String::new()),
        "null" | "(null)" => return None,
        _ => {}
    }
    let b = raw.as_bytes();
    let quoted = b.len() >= 2 && matches!(b[0], b'"' | b'\'') && b[b.len() - 1] == b[0];
    // PCRE's `.` stops at a newline: a multi-line value keeps its quotes.
    if quoted && !raw[1..raw.len() - 1].contains('\n') {
        return Some(raw[1..raw.len() - 1].to_owned());
    }
    Some(raw.to_owned())
}

fn env_parse<T: std::str::FromStr>(
    env: &dyn Env,
    name: &str,
    why: &'static str,
) -> Result<Option<T>, ConfigError> {
    match env.get(name).filter(|v| !v.trim().is_empty()) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ConfigError::BadValue {
                name: name.to_owned(),
                value: v,
                why,
            }),
    }
}

/// A boolean variable: `true`/`false` (after [`laravel_value`], which folds `TRUE`, `(true)`
/// and the like into these), or `1`/`0`, which PHP reads as true and false too.
fn env_bool(env: &dyn Env, name: &str) -> Result<Option<bool>, ConfigError> {
    match env.get(name).as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some("true" | "1") => Ok(Some(true)),
        Some("false" | "0") => Ok(Some(false)),
        Some(v) => Err(ConfigError::BadValue {
            name: name.to_owned(),
            value: v.to_owned(),
            why: "true or false (or 1 or 0)",
        }),
    }
}

fn env_str(env: &dyn Env, name: &str) -> Option<String> {
    env.get(name).filter(|v| !v.trim().is_empty())
}

/// CPUs this process may run on, in order.
pub fn available_cpus() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    crate::sys::allowed_cpus().unwrap_or_else(|| (0..n).collect())
}

impl Config {
    /// Resolves CLI flags, environment and files into a validated configuration.
    pub fn resolve(cli: &Cli, env: &dyn Env) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<RawFile>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.message().to_owned(),
                })?
            }
            None => RawFile::default(),
        };
        Self::from_parts(cli, env, file, available_cpus())
    }

    pub fn from_parts(
        cli: &Cli,
        env: &dyn Env,
        file: RawFile,
        cpus: Vec<usize>,
    ) -> Result<Config, ConfigError> {
        let s = &file.server;
        let mut apps = file.apps.clone();
        // The single app a Laravel .env describes (REVERB_APP_*): it overrides the file's app
        // with the same id, or is added to the file's apps.
        let env_app = RawApp {
            id: env_str(env, "REVERB_APP_ID"),
            key: env_str(env, "REVERB_APP_KEY"),
            secret: env_str(env, "REVERB_APP_SECRET"),
            activity_timeout: env_parse(env, "REVERB_APP_ACTIVITY_TIMEOUT", "seconds")?,
            max_message_size: env_parse(env, "REVERB_APP_MAX_MESSAGE_SIZE", "bytes")?,
            max_connections: env_parse(env, "REVERB_APP_MAX_CONNECTIONS", "a count")?,
            accept_client_events_from: env_str(env, "REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM"),
            max_pings_per_second: env_parse(env, "BTS_APP_MAX_PINGS_PER_SECOND", "a count")?,
            allowed_origins: env_str(env, "BTS_APP_ALLOWED_ORIGINS")
                .map(|v| v.split(',').map(|o| o.trim().to_owned()).collect()),
            rate_limiting: env_bool(env, "REVERB_APP_RATE_LIMITING_ENABLED")?,
            rate_limit_max_attempts: env_parse(
                env,
                "REVERB_APP_RATE_LIMITING_MAX_ATTEMPTS",
                "a count",
            )?,
            rate_limit_decay_seconds: env_parse(
                env,
                "REVERB_APP_RATE_LIMITING_DECAY_SECONDS",
                "seconds",
            )?,
            rate_limit_terminate: env_bool(env, "REVERB_APP_RATE_LIMIT_TERMINATE")?,
            webhooks: env_str(env, "BTS_APP_WEBHOOK_URLS").map(|v| {
                v.split(',')
                    .map(|u| WebhookTarget {
                        url: u.trim().to_owned(),
                        event_types: None,
                    })
                    .collect()
            }),
            ..RawApp::default()
        };
        let env_has_creds =
            env_app.id.is_some() || env_app.key.is_some() || env_app.secret.is_some();
        if env_has_creds {
            match apps
                .iter_mut()
                .find(|a| a.id.is_some() && a.id == env_app.id)
            {
                Some(a) => {
                    a.key = env_app.key.clone().or(a.key.take());
                    a.secret = env_app.secret.clone().or(a.secret.take());
                    a.activity_timeout = env_app.activity_timeout.or(a.activity_timeout);
                    a.max_message_size = env_app.max_message_size.or(a.max_message_size);
                    a.max_connections = env_app.max_connections.or(a.max_connections);
                    a.accept_client_events_from = env_app
                        .accept_client_events_from
                        .clone()
                        .or(a.accept_client_events_from.take());
                    a.allowed_origins =
                        env_app.allowed_origins.clone().or(a.allowed_origins.take());
                    a.max_pings_per_second =
                        env_app.max_pings_per_second.or(a.max_pings_per_second);
                    a.rate_limiting = env_app.rate_limiting.or(a.rate_limiting);
                    a.rate_limit_max_attempts = env_app
                        .rate_limit_max_attempts
                        .or(a.rate_limit_max_attempts);
                    a.rate_limit_decay_seconds = env_app
                        .rate_limit_decay_seconds
                        .or(a.rate_limit_decay_seconds);
                    a.rate_limit_terminate =
                        env_app.rate_limit_terminate.or(a.rate_limit_terminate);
                    a.webhooks = env_app.webhooks.clone().or(a.webhooks.take());
                }
                None => apps.push(env_app.clone()),
            }
        }
        let dev_credentials = apps.is_empty();
        if dev_credentials {
            apps.push(RawApp {
                id: Some(DEV_APP_ID.into()),
                key: Some(DEV_APP_KEY.into()),
                secret: Some(DEV_APP_SECRET.into()),
                ..env_app
            });
        }
        let apps = apps
            .into_iter()
            .enumerate()
            .map(|(i, a)| resolve_app(i, a, env_has_creds))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ids = HashSet::new();
        let mut keys = HashSet::new();
        for a in &apps {
            if !ids.insert(&a.id) {
                return Err(ConfigError::BadApp {
                    app: a.id.clone(),
                    why: "app id is used twice".into(),
                });
            }
            if !keys.insert(&a.key) {
                return Err(ConfigError::BadApp {
                    app: a.id.clone(),
                    why: "app key is used by another app".into(),
                });
            }
        }

        let allow_dev = cli.allow_dev_credentials
            || s.allow_dev_credentials.unwrap_or(false)
            || env_bool(env, "BTS_ALLOW_DEV_CREDENTIALS")?.unwrap_or(false);
        let host_given = cli
            .host
            .or(env_parse(env, "REVERB_SERVER_HOST", "an IP address")?)
            .or(s.host);
        let host = match host_given {
            Some(h) => h,
            // With the public development secret, stay on loopback unless told otherwise.
            None if dev_credentials => IpAddr::from([127, 0, 0, 1]),
            None => IpAddr::from([0, 0, 0, 0]),
        };
        if dev_credentials && !host.is_loopback() && !allow_dev {
            return Err(ConfigError::Other(format!(
                "refusing to listen on {host} with the built-in development credentials (secret \
                 {DEV_APP_SECRET:?} is public): set REVERB_APP_ID, REVERB_APP_KEY and \
                 REVERB_APP_SECRET (or [[apps]] in --config), or pass --allow-dev-credentials"
            )));
        }
        let port = cli
            .port
            .or(env_parse(env, "REVERB_SERVER_PORT", "a port number")?)
            .or(s.port)
            .unwrap_or(DEFAULT_PORT);

        let shards = cli
            .shards
            .or(env_parse(env, "BTS_SHARDS", "a count")?)
            .or(s.shards)
            .unwrap_or(cpus.len().max(1));
        if shards == 0 || shards > 1024 {
            return Err(ConfigError::Other(format!(
                "--shards must be between 1 and 1024 (got {shards})"
            )));
        }
        let cpus = if cpus.is_empty() { vec![0] } else { cpus };
        let shard_cpus = (0..shards).map(|i| cpus[i % cpus.len()]).collect();

        let max_request_size = env_parse(env, "REVERB_MAX_REQUEST_SIZE", "bytes")?
            .or(s.max_request_size)
            .unwrap_or(DEFAULT_MAX_REQUEST_SIZE);
        if !(100..=64 << 20).contains(&max_request_size) {
            return Err(ConfigError::Other(format!(
                "max request size must be between 100 bytes and 64 MiB (got {max_request_size})"
            )));
        }
        let max_outbound_bytes = s.max_outbound_bytes.unwrap_or(DEFAULT_OUTBOUND_BYTES);
        let biggest_message = apps.iter().map(|a| a.max_message_size).max().unwrap_or(0);
        if max_outbound_bytes < biggest_message + 64 {
            return Err(ConfigError::Other(format!(
                "max_outbound_bytes ({max_outbound_bytes}) must exceed the largest max_message_size \
                 ({biggest_message}), or no event that size could ever be delivered"
            )));
        }
        let write_coalesce_ms = env_parse(env, "BTS_WRITE_COALESCE_MS", "milliseconds")?
            .or(s.write_coalesce_ms)
            .unwrap_or(DEFAULT_WRITE_COALESCE_MS);
        if write_coalesce_ms > 1000 {
            return Err(ConfigError::Other(format!(
                "write_coalesce_ms must be at most 1000 (got {write_coalesce_ms})"
            )));
        }
        let send_ring = env_bool(env, "BTS_SEND_RING")?
            .or(s.send_ring)
            .unwrap_or(true);
        let pong_timeout = s.pong_timeout_secs.unwrap_or(30);
        let handshake_timeout = s.handshake_timeout_secs.unwrap_or(10);
        if pong_timeout == 0 || handshake_timeout == 0 {
            return Err(ConfigError::Other(
                "pong_timeout_secs and handshake_timeout_secs must be at least 1".into(),
            ));
        }
        let inbox_capacity = s.inbox_capacity.unwrap_or(16_384);
        if inbox_capacity < 16 {
            return Err(ConfigError::Other(
                "inbox_capacity must be at least 16".into(),
            ));
        }
        let redis = resolve_redis(cli, env, &file.redis, &apps, &cpus, shards)?;
        let cluster_on = !cli.standalone
            && (cli.cluster
                || env_bool(env, "REVERB_SCALING_ENABLED")?.unwrap_or(false)
                || file.redis.cluster.unwrap_or(false));
        let cluster = if cluster_on {
            if redis.is_none() {
                return Err(ConfigError::Other(
                    "cluster mode (--cluster / REVERB_SCALING_ENABLED) needs a Redis: set REDIS_URL \
                     or REDIS_HOST, or pass --redis"
                        .into(),
                ));
            }
            Some(
                env_str(env, "REVERB_SCALING_CHANNEL")
                    .or(file.redis.cluster_channel.clone())
                    .unwrap_or_else(|| "bts-guru".into()),
            )
        } else {
            None
        };
        let tls_cert = cli
            .tls_cert
            .clone()
            .or(env_str(env, "BTS_TLS_CERT").map(PathBuf::from))
            .or(s.tls_cert.clone());
        let tls_key = cli
            .tls_key
            .clone()
            .or(env_str(env, "BTS_TLS_KEY").map(PathBuf::from))
            .or(s.tls_key.clone());
        let tls =
            match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                (Some(_), None) => return Err(ConfigError::Other(
                    "a TLS certificate is set (--tls-cert / BTS_TLS_CERT / tls_cert) but no key \
                     (--tls-key / BTS_TLS_KEY / tls_key)"
                        .into(),
                )),
                (None, Some(_)) => {
                    return Err(ConfigError::Other(
                        "a TLS key is set (--tls-key / BTS_TLS_KEY / tls_key) but no certificate \
                     (--tls-cert / BTS_TLS_CERT / tls_cert)"
                            .into(),
                    ))
                }
            };
        let console_on =
            cli.console || env_bool(env, "BTS_CONSOLE")?.or(s.console).unwrap_or(false);
        let console = if console_on {
            let token = env_str(env, "BTS_CONSOLE_TOKEN")
                .or(s.console_token.clone())
                .map(|t| t.trim().to_owned());
            if let Some(t) = &token {
                if t.len() < MIN_CONSOLE_TOKEN {
                    return Err(ConfigError::BadValue {
                        name: "BTS_CONSOLE_TOKEN".into(),
                        value: "(hidden)".into(),
                        why: "must be at least 8 characters",
                    });
                }
            }
            Some(ConsoleConfig { token })
        } else {
            None
        };
        let pid_file = cli
            .pid_file
            .clone()
            .or(env_str(env, "BTS_PID_FILE").map(PathBuf::from))
            .or(s.pid_file.clone());
        if let Some(path) = &pid_file {
            // Refuse now what could only fail after the sockets are bound.
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            if path.is_dir() || !dir.is_dir() {
                return Err(ConfigError::BadValue {
                    name: "--pid-file / BTS_PID_FILE / pid_file".into(),
                    value: path.display().to_string(),
                    why: "must be a file name in an existing directory",
                });
            }
        }
        let webhook_queue_capacity = s
            .webhook_queue_capacity
            .unwrap_or(DEFAULT_WEBHOOK_QUEUE_CAPACITY);
        let max_channels_per_shard = s
            .max_channels_per_shard
            .unwrap_or(DEFAULT_MAX_CHANNELS_PER_SHARD);
        let max_channels_listed = s.max_channels_listed.unwrap_or(DEFAULT_MAX_CHANNELS_LISTED);
        for (name, v) in [
            ("webhook_queue_capacity", webhook_queue_capacity),
            ("max_channels_per_shard", max_channels_per_shard),
            ("max_channels_listed", max_channels_listed),
        ] {
            if v == 0 {
                return Err(ConfigError::Other(format!("{name} must be at least 1")));
            }
        }
        let fd_reserve = env_parse(env, "BTS_FD_RESERVE", "a count")?
            .or(s.fd_reserve)
            .unwrap_or(DEFAULT_FD_RESERVE);
        if !(16..=1 << 20).contains(&fd_reserve) {
            return Err(ConfigError::Other(format!(
                "fd_reserve must be between 16 and 1048576 descriptors (got {fd_reserve})"
            )));
        }
        let max_connections_per_ip: Option<u32> =
            env_parse(env, "BTS_MAX_CONNECTIONS_PER_IP", "a count")?.or(s.max_connections_per_ip);
        if max_connections_per_ip == Some(0) {
            return Err(ConfigError::Other(
                "max_connections_per_ip must be at least 1 (leave it unset for no cap)".into(),
            ));
        }
        let trusted_proxies = match env_str(env, "BTS_TRUSTED_PROXIES") {
            Some(v) => v.split(',').map(|p| p.trim().to_owned()).collect(),
            None => s.trusted_proxies.clone().unwrap_or_default(),
        };
        let trusted_proxies = crate::proxy::Trusted(
            trusted_proxies
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| {
                    crate::proxy::Cidr::parse(p).ok_or_else(|| ConfigError::BadValue {
                        name: "trusted_proxies".into(),
                        value: p.clone(),
                        why: "must be an IP address or a network like 10.0.0.0/8",
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        );
        let proxy_protocol = env_parse::<bool>(env, "BTS_PROXY_PROTOCOL", "true or false")?
            .or(s.proxy_protocol)
            .unwrap_or(false);
        if proxy_protocol && trusted_proxies.is_empty() {
            return Err(ConfigError::Other(
                "proxy_protocol needs trusted_proxies (BTS_TRUSTED_PROXIES): the load balancers \
                 whose PROXY headers are believed; a header from any other address is refused"
                    .into(),
            ));
        }
        Ok(Config {
            webhook_queue_capacity,
            max_channels_per_shard,
            max_channels_listed,
            fd_reserve,
            max_connections_per_ip,
            trusted_proxies,
            proxy_protocol,
            tls,
            console,
            pid_file,
            listen: SocketAddr::new(host, port),
            shard_cpus,
            apps,
            max_request_size,
            pong_timeout: Duration::from_secs(pong_timeout),
            max_outbound_bytes,
            write_coalesce_ms,
            send_ring,
            inbox_capacity,
            handshake_timeout: Duration::from_secs(handshake_timeout),
            max_cache_channels: s.max_cache_channels.unwrap_or(100_000).max(1),
            dev_credentials,
            redis,
            cluster,
            metrics: if cli.no_metrics
                || !env_bool(env, "METRICS_ENABLED")?
                    .or(s.metrics)
                    .unwrap_or(true)
            {
                None
            } else {
                Some(SocketAddr::new(
                    cli.metrics_host
                        .or(env_parse(env, "METRICS_HOST", "an IP address")?)
                        .or(s.metrics_host)
                        .unwrap_or(IpAddr::from([127, 0, 0, 1])),
                    cli.metrics_port
                        .or(env_parse(env, "METRICS_PORT", "a port number")?)
                        .or(s.metrics_port)
                        .unwrap_or(9601),
                ))
            },
            drain_window: Duration::from_secs(
                cli.drain_secs
                    .or(env_parse(env, "BTS_DRAIN_SECS", "seconds")?)
                    .or(s.drain_secs)
                    .unwrap_or(10),
            ),
        })
    }

    pub fn shards(&self) -> usize {
        self.shard_cpus.len()
    }
}

/// Laravel's default REDIS_PREFIX: `Str::slug(APP_NAME, '_') . '_database_'`.
pub fn laravel_prefix(app_name: &str) -> String {
    let mut slug = String::new();
    for c in app_name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('_') {
            slug.push('_');
        }
    }
    let slug = slug.trim_end_matches('_');
    format!(
        "{}_database_",
        if slug.is_empty() { "laravel" } else { slug }
    )
}

fn resolve_redis(
    cli: &Cli,
    env: &dyn Env,
    raw: &RawRedis,
    apps: &[App],
    cpus: &[usize],
    shards: usize,
) -> Result<Option<RedisConfig>, ConfigError> {
    if cli.no_redis || raw.enabled == Some(false) {
        return Ok(None);
    }
    let url = match (
        &cli.redis,
        env_str(env, "REDIS_URL"),
        env_str(env, "REDIS_HOST"),
        &raw.url,
    ) {
        (Some(u), _, _, _) => u.clone(),
        (None, Some(u), _, _) => u,
        (None, None, Some(host), _) => {
            let port: u16 = env_parse(env, "REDIS_PORT", "a port number")?.unwrap_or(6379);
            let db: u32 = env_parse(env, "REDIS_DB", "a database number")?.unwrap_or(0);
            let scheme = match env_str(env, "REDIS_SCHEME").as_deref() {
                Some("tls" | "rediss") => "rediss",
                _ => "redis",
            };
            let enc = |s: String| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let auth = match (
                env_str(env, "REDIS_USERNAME"),
                env_str(env, "REDIS_PASSWORD"),
            ) {
                (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
                (None, Some(p)) => format!(":{}@", enc(p)),
                (Some(u), None) => format!("{}@", enc(u)),
                (None, None) => String::new(),
            };
            format!("{scheme}://{auth}{host}:{port}/{db}")
        }
        (None, None, None, Some(u)) => u.clone(),
        (None, None, None, None) => return Ok(None),
    };
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
    {
        return Err(ConfigError::BadValue {
            name: "REDIS_URL".into(),
            value: url,
            why: "must start with redis://, rediss:// or unix://",
        });
    }
    // REDIS_PREFIX may be set to the empty string on purpose: read it raw.
    let prefix = match env.get("REDIS_PREFIX") {
        Some(p) => p,
        None => match &raw.prefix {
            Some(p) => p.clone(),
            None => laravel_prefix(&env.get("APP_NAME").unwrap_or_else(|| "laravel".into())),
        },
    };
    let app = match &raw.app {
        Some(id) => apps.iter().position(|a| &a.id == id).ok_or_else(|| {
            ConfigError::Other(format!("[redis] app = {id:?} names no configured app"))
        })?,
        None => 0,
    };
    let cpus = if cpus.is_empty() { &[0][..] } else { cpus };
    let cpu = cli
        .ingest_cpu
        .or(raw.ingest_cpu)
        .unwrap_or_else(|| cpus.get(shards).copied().unwrap_or(cpus[cpus.len() - 1]));
    let tls_ca = match env_str(env, "REDIS_TLS_CA")
        .map(PathBuf::from)
        .or(raw.tls_ca.clone())
    {
        Some(path) => {
            Some(std::fs::read(&path).map_err(|source| ConfigError::Read { path, source })?)
        }
        None => None,
    };
    Ok(Some(RedisConfig {
        url,
        prefix,
        app,
        cpu,
        tls_ca,
    }))
}

fn resolve_app(index: usize, a: RawApp, from_env: bool) -> Result<App, ConfigError> {
    let label = a.id.clone().unwrap_or_else(|| format!("#{}", index + 1));
    let missing = |field: &str, env: &str| ConfigError::BadApp {
        app: label.clone(),
        why: if from_env {
            format!("missing {field} (set {env}, or give the app in --config)")
        } else {
            format!("missing {field}")
        },
    };
    let id = a.id.clone().ok_or_else(|| missing("id", "REVERB_APP_ID"))?;
    let key = a
        .key
        .clone()
        .ok_or_else(|| missing("key", "REVERB_APP_KEY"))?;
    let secret = a
        .secret
        .clone()
        .ok_or_else(|| missing("secret", "REVERB_APP_SECRET"))?;
    let bad = |why: String| ConfigError::BadApp {
        app: label.clone(),
        why,
    };
    if key.contains(['/', '?', '#', ' ']) {
        return Err(bad("app key may not contain '/', '?', '#' or spaces".into()));
    }
    if id.contains(['/', '?', '#', ' ']) {
        return Err(bad("app id may not contain '/', '?', '#' or spaces".into()));
    }
    let activity_timeout = a.activity_timeout.unwrap_or(DEFAULT_ACTIVITY_TIMEOUT);
    if activity_timeout == 0 || activity_timeout > 3600 {
        return Err(bad(format!(
            "activity_timeout must be 1..=3600 seconds (got {activity_timeout})"
        )));
    }
    let max_message_size = a.max_message_size.unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
    if !(100..=MAX_MESSAGE_SIZE_LIMIT).contains(&max_message_size) {
        return Err(bad(format!(
            "max_message_size must be between 100 and {MAX_MESSAGE_SIZE_LIMIT} bytes (got {max_message_size})"
        )));
    }
    let subscription_rate = SubscriptionRate {
        per_second: a
            .subscription_changes_per_second
            .unwrap_or(DEFAULT_SUBSCRIPTION_RATE.per_second),
        burst: a
            .subscription_changes_burst
            .unwrap_or(DEFAULT_SUBSCRIPTION_RATE.burst),
    };
    if subscription_rate.per_second == 0 || subscription_rate.burst == 0 {
        return Err(bad(
            "subscription_changes_per_second and subscription_changes_burst must be at least 1"
                .into(),
        ));
    }
    if a.max_channels == Some(0) {
        return Err(bad("max_channels must be at least 1".into()));
    }
    let client_events_per_second = a.client_events_per_second.unwrap_or(10);
    let max_presence_members = a.max_presence_members.unwrap_or(100);
    let max_user_info = a.max_user_info.unwrap_or(2048);
    if client_events_per_second == 0 || max_presence_members == 0 || max_user_info == 0 {
        return Err(bad(
            "client_events_per_second, max_presence_members and max_user_info must be at least 1"
                .into(),
        ));
    }
    let max_pings_per_second = a
        .max_pings_per_second
        .unwrap_or(DEFAULT_MAX_PINGS_PER_SECOND);
    if max_pings_per_second == 0 {
        return Err(bad(
            "max_pings_per_second must be at least 1 (pusher-js pings when a connection is idle)"
                .into(),
        ));
    }
    Ok(App {
        max_channels: a.max_channels,
        subscription_rate,
        id,
        key,
        secret,
        activity_timeout,
        max_message_size,
        max_connections: a.max_connections,
        client_events: a
            .accept_client_events_from
            .as_deref()
            .map_or(ClientEvents::Members, ClientEvents::parse),
        client_events_per_second,
        max_pings_per_second,
        max_presence_members,
        max_user_info,
        cache_ttl: Duration::from_secs(a.cache_ttl_secs.unwrap_or(1800)),
        subscription_count: a.subscription_count.unwrap_or(false),
        allowed_origins: a
            .allowed_origins
            .clone()
            .filter(|o| !o.is_empty())
            .unwrap_or_else(|| vec!["*".into()]),
        webhooks: {
            let hooks = a.webhooks.clone().unwrap_or_default();
            for h in &hooks {
                if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                    return Err(bad(format!(
                        "webhook url {:?} must be http:// or https://",
                        h.url
                    )));
                }
                for e in h.event_types.iter().flatten() {
                    if !WEBHOOK_EVENTS.contains(&e.as_str()) {
                        return Err(bad(format!("unknown webhook event type {e:?}")));
                    }
                }
            }
            hooks
        },
        rate_limit: if a.rate_limiting.unwrap_or(false) {
            let max = a.rate_limit_max_attempts.unwrap_or(60);
            let per = a.rate_limit_decay_seconds.unwrap_or(60);
            if max == 0 || per == 0 {
                return Err(bad(
                    "rate limit attempts and decay seconds must be at least 1".into(),
                ));
            }
            Some(RateLimit {
                max,
                per: Duration::from_secs(per),
                terminate: a.rate_limit_terminate.unwrap_or(false),
            })
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resolve(cli: &Cli, e: &[(&str, &str)], file: &str) -> Result<Config, ConfigError> {
        let file: RawFile = toml::from_str(file).unwrap();
        Config::from_parts(cli, &env(e), file, vec![0, 1])
    }

    #[test]
    fn nothing_set_means_dev_app_on_loopback() {
        let c = resolve(&Cli::default(), &[], "").unwrap();
        assert!(c.dev_credentials);
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.apps[0].key, DEV_APP_KEY);
        assert_eq!(c.shards(), 2);
    }

    #[test]
    fn dev_credentials_refused_on_public_address() {
        let e = resolve(&Cli::default(), &[("REVERB_SERVER_HOST", "0.0.0.0")], "");
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("--allow-dev-credentials"));
        let cli = Cli {
            allow_dev_credentials: true,
            ..Cli::default()
        };
        assert!(resolve(&cli, &[("REVERB_SERVER_HOST", "0.0.0.0")], "").is_ok());
    }

    #[test]
    fn reverb_env_configures_app_and_bind() {
        let e = [
            ("REVERB_APP_ID", "123"),
            ("REVERB_APP_KEY", "k"),
            ("REVERB_APP_SECRET", "s"),
            ("REVERB_SERVER_PORT", "9000"),
            ("REVERB_HOST", "example.com"),
            ("REVERB_PORT", "443"),
            ("REVERB_APP_MAX_MESSAGE_SIZE", "1000000"),
            ("REVERB_APP_ACTIVITY_TIMEOUT", "120"),
            ("REVERB_APP_MAX_CONNECTIONS", "5"),
            ("REVERB_MAX_REQUEST_SIZE", "2000000"),
        ];
        let c = resolve(&Cli::default(), &e, "").unwrap();
        assert!(!c.dev_credentials);
        assert_eq!(c.listen, "0.0.0.0:9000".parse().unwrap());
        let a = &c.apps[0];
        assert_eq!(
            (a.id.as_str(), a.key.as_str(), a.secret.as_str()),
            ("123", "k", "s")
        );
        assert_eq!(a.max_message_size, 1_000_000);
        assert_eq!(a.activity_timeout, 120);
        assert_eq!(a.max_connections, Some(5));
        assert_eq!(c.max_request_size, 2_000_000);
        // CLI beats env.
        let cli = Cli {
            port: Some(1),
            shards: Some(3),
            ..Cli::default()
        };
        let c = resolve(&cli, &e, "").unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.shard_cpus, vec![0, 1, 0]);
    }

    #[test]
    fn descriptor_and_proxy_settings() {
        let c = resolve(&Cli::default(), &[], "").unwrap();
        assert_eq!(c.fd_reserve, DEFAULT_FD_RESERVE);
        assert_eq!(c.max_connections_per_ip, None, "no per-IP cap by default");
        assert!(c.trusted_proxies.is_empty());
        assert!(!c.proxy_protocol);

        let f = r#"
            [server]
            fd_reserve = 512
            max_connections_per_ip = 100
            trusted_proxies = ["10.0.0.0/8", "192.0.2.7"]
            proxy_protocol = true
        "#;
        let c = resolve(&Cli::default(), &[], f).unwrap();
        assert_eq!(c.fd_reserve, 512);
        assert_eq!(c.max_connections_per_ip, Some(100));
        assert!(c.trusted_proxies.contains("10.9.8.7".parse().unwrap()));
        assert!(c.trusted_proxies.contains("192.0.2.7".parse().unwrap()));
        assert!(!c.trusted_proxies.contains("192.0.2.8".parse().unwrap()));
        assert!(c.proxy_protocol);

        // The environment beats the file.
        let e = [
            ("BTS_FD_RESERVE", "1000"),
            ("BTS_MAX_CONNECTIONS_PER_IP", "7"),
            ("BTS_TRUSTED_PROXIES", "203.0.113.0/24, 2001:db8::/32"),
            ("BTS_PROXY_PROTOCOL", "false"),
        ];
        let c = resolve(&Cli::default(), &e, f).unwrap();
        assert_eq!(c.fd_reserve, 1000);
        assert_eq!(c.max_connections_per_ip, Some(7));
        assert!(!c.trusted_proxies.contains("10.0.0.1".parse().unwrap()));
        assert!(c.trusted_proxies.contains("2001:db8::9".parse().unwrap()));
        assert!(!c.proxy_protocol);

        let bad = [
            ("[server]\nfd_reserve = 3", "fd_reserve"),
            (
                "[server]\nmax_connections_per_ip = 0",
                "max_connections_per_ip",
            ),
            (
                "[server]\ntrusted_proxies = [\"10.0.0.0/40\"]",
                "10.0.0.0/40",
            ),
            (
                "[server]\ntrusted_proxies = [\"lb.internal\"]",
                "lb.internal",
            ),
            ("[server]\nproxy_protocol = true", "trusted_proxies"),
        ];
        for (file, named) in bad {
            let err = resolve(&Cli::default(), &[], file).unwrap_err().to_string();
            assert!(err.contains(named), "{file}: {err}");
        }
        let err = resolve(
            &Cli::default(),
            &[("BTS_MAX_CONNECTIONS_PER_IP", "lots")],
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("BTS_MAX_CONNECTIONS_PER_IP"), "{err}");
    }

    #[test]
    fn missing_secret_is_named() {
        let e = [("REVERB_APP_ID", "1"), ("REVERB_APP_KEY", "k")];
        let err = resolve(&Cli::default(), &e, "").unwrap_err().to_string();
        assert!(err.contains("REVERB_APP_SECRET"), "{err}");
    }

    #[test]
    fn file_with_several_apps() {
        let f = r#"
            [server]
            port = 7000
            max_outbound_bytes = 200000
            [[apps]]
            id = "a"
            key = "ka"
            secret = "sa"
            [[apps]]
            id = "b"
            key = "kb"
            secret = "sb"
            max_message_size = 100000
        "#;
        let c = resolve(&Cli::default(), &[], f).unwrap();
        assert_eq!(c.apps.len(), 2);
        assert_eq!(c.listen, "0.0.0.0:7000".parse().unwrap());
        let dup = f.replace("\"kb\"", "\"ka\"");
        assert!(resolve(&Cli::default(), &[], &dup).is_err());
        let too_small_queue = f.replace("200000", "1000");
        assert!(resolve(&Cli::default(), &[], &too_small_queue).is_err());
    }

    #[test]
    fn redis_settings_like_laravel() {
        let base = [
            ("REVERB_APP_ID", "1"),
            ("REVERB_APP_KEY", "k"),
            ("REVERB_APP_SECRET", "s"),
        ];
        let c = resolve(&Cli::default(), &base, "").unwrap();
        assert_eq!(c.redis, None);
        let mut e = base.to_vec();
        e.extend([
            ("REDIS_HOST", "10.0.0.5"),
            ("REDIS_PASSWORD", "p@ss/word"),
            ("REDIS_DB", "2"),
            ("APP_NAME", "BTS Guru"),
        ]);
        let r = resolve(&Cli::default(), &e, "").unwrap().redis.unwrap();
        assert_eq!(r.url, "redis://:p%40ss%2Fword@10.0.0.5:6379/2");
        assert_eq!(r.prefix, "bts_guru_database_");
        assert_eq!(r.redacted_url(), "redis://***@10.0.0.5:6379/2");
        e.push(("REDIS_PREFIX", ""));
        e.push(("REDIS_URL", "rediss://cache.example:6380"));
        let r = resolve(&Cli::default(), &e, "").unwrap().redis.unwrap();
        assert_eq!(
            (r.url.as_str(), r.prefix.as_str()),
            ("rediss://cache.example:6380", "")
        );
        let off = Cli {
            no_redis: true,
            ..Cli::default()
        };
        assert_eq!(resolve(&off, &e, "").unwrap().redis, None);
        assert_eq!(laravel_prefix("Laravel"), "laravel_database_");
        assert_eq!(laravel_prefix(""), "laravel_database_");
        let bad = [("REDIS_URL", "http://x")];
        let mut e2 = base.to_vec();
        e2.extend(bad);
        assert!(resolve(&Cli::default(), &e2, "").is_err());
    }

    #[test]
    fn origins_match_like_reverb() {
        let allowed = vec!["scores.example.com".to_owned(), "*.bts.test".to_owned()];
        assert!(origin_allowed(&allowed, Some("https://scores.example.com")));
        assert!(origin_allowed(
            &allowed,
            Some("http://scores.example.com:8080")
        ));
        assert!(origin_allowed(&allowed, Some("https://live.bts.test")));
        assert!(!origin_allowed(&allowed, Some("https://bts.test")));
        assert!(!origin_allowed(&allowed, Some("https://evil.example.com")));
        assert!(!origin_allowed(&allowed, None));
        assert!(origin_allowed(&["*".to_owned()], None));
        assert!(origin_allowed(
            &["https://a.test".to_owned()],
            Some("https://a.test")
        ));
    }

    #[test]
    fn console_is_off_unless_enabled_and_takes_a_token() {
        assert_eq!(resolve(&Cli::default(), &[], "").unwrap().console, None);
        let on = Cli {
            console: true,
            ..Cli::default()
        };
        let c = resolve(&on, &[], "").unwrap();
        assert_eq!(c.console, Some(ConsoleConfig { token: None }));
        let by_env = resolve(&Cli::default(), &[("BTS_CONSOLE", "true")], "").unwrap();
        assert!(by_env.console.is_some());
        let by_file = "[server]\nconsole = true\nconsole_token = \"from-the-file\"";
        let c = resolve(&Cli::default(), &[], by_file).unwrap();
        assert_eq!(c.console.unwrap().token.as_deref(), Some("from-the-file"));
        // Environment beats the file, for the switch and for the token.
        let e = [("BTS_CONSOLE", "false")];
        assert_eq!(resolve(&Cli::default(), &e, by_file).unwrap().console, None);
        let e = [("BTS_CONSOLE_TOKEN", " from-the-env ")];
        let c = resolve(&Cli::default(), &e, by_file).unwrap();
        assert_eq!(c.console.unwrap().token.as_deref(), Some("from-the-env"));
        // A token set while the console is off changes nothing.
        let e = [("BTS_CONSOLE_TOKEN", "x")];
        assert_eq!(resolve(&Cli::default(), &e, "").unwrap().console, None);
        let err = resolve(&on, &[("BTS_CONSOLE_TOKEN", "short")], "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("BTS_CONSOLE_TOKEN"), "{err}");
        assert!(!err.contains("short"), "the token is not echoed: {err}");
    }

    #[test]
    fn standalone_never_joins_a_cluster() {
        let e = [
            ("REVERB_APP_ID", "1"),
            ("REVERB_APP_KEY", "k"),
            ("REVERB_APP_SECRET", "s"),
            ("REVERB_SCALING_ENABLED", "true"),
            ("REDIS_HOST", "127.0.0.1"),
        ];
        assert!(resolve(&Cli::default(), &e, "").unwrap().cluster.is_some());
        let demo = Cli {
            standalone: true,
            ..Cli::default()
        };
        assert_eq!(resolve(&demo, &e, "").unwrap().cluster, None);
    }

    #[test]
    fn values_read_as_laravels_env_reads_them() {
        let v = |raw: &str| laravel_value("X", raw);
        assert_eq!(v("null"), None);
        assert_eq!(v("(null)"), None);
        assert_eq!(v("NULL"), None);
        assert_eq!(laravel_value("REDIS_PREFIX", "null"), Some(String::new()));
        assert_eq!(v("empty").as_deref(), Some(""));
        assert_eq!(v("(Empty)").as_deref(), Some(""));
        for t in ["true", "(true)", "TRUE", "True"] {
            assert_eq!(v(t).as_deref(), Some("true"), "{t}");
        }
        for f in ["false", "(false)", "FALSE"] {
            assert_eq!(v(f).as_deref(), Some("false"), "{f}");
        }
        assert_eq!(v("\"quoted\"").as_deref(), Some("quoted"));
        assert_eq!(v("'single'").as_deref(), Some("single"));
        assert_eq!(v("\"mismatched'").as_deref(), Some("\"mismatched'"));
        assert_eq!(v("\"").as_deref(), Some("\""));
        assert_eq!(v("\"two\nlines\"").as_deref(), Some("\"two\nlines\""));
        assert_eq!(
            v("\"null\"").as_deref(),
            Some("null"),
            "quotes go after the keywords"
        );
        assert_eq!(v("p@ss null").as_deref(), Some("p@ss null"));
        assert_eq!(v("").as_deref(), Some(""));
    }

    /// A scratch dotenv file, removed on drop.
    struct EnvFile(PathBuf);

    impl EnvFile {
        fn new(text: &str) -> EnvFile {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "bts-guru-env-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            std::fs::write(&path, text).unwrap();
            EnvFile(path)
        }

        fn resolve(&self) -> Result<Config, ConfigError> {
            let env = ProcessEnv::load(Some(&self.0)).unwrap();
            Config::from_parts(&Cli::default(), &env, RawFile::default(), vec![0, 1])
        }
    }

    impl Drop for EnvFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const LARAVEL_11_ENV: &str = include_str!("../tests/fixtures/laravel-11.env");

    #[test]
    fn a_fresh_laravel_11_env_configures_the_app_and_a_redis_without_password() {
        let c = EnvFile::new(LARAVEL_11_ENV).resolve().unwrap();
        let a = &c.apps[0];
        assert_eq!(
            (a.id.as_str(), a.key.as_str(), a.secret.as_str()),
            ("384615", "wlzqyxyd6t1mudlnbpnr", "tjhxz1zwvtxy2xvhsqfn")
        );
        assert!(!c.dev_credentials);
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        // REDIS_PASSWORD=null is no password, as in Laravel; not the password "null".
        let r = c.redis.unwrap();
        assert_eq!(r.url, "redis://127.0.0.1:6379/0");
        assert_eq!(r.prefix, "laravel_database_");
        assert_eq!(c.cluster, None);
    }

    #[test]
    fn laravel_keywords_in_an_env_file() {
        let with = |extra: &str| EnvFile::new(&format!("{LARAVEL_11_ENV}\n{extra}\n")).resolve();
        let c = with("REDIS_PASSWORD=(null)\nREDIS_USERNAME=null").unwrap();
        assert_eq!(c.redis.unwrap().url, "redis://127.0.0.1:6379/0");
        let c = with("REDIS_PASSWORD=\"s3cret\"").unwrap();
        assert_eq!(c.redis.unwrap().url, "redis://:s3cret@127.0.0.1:6379/0");
        let c = with("REDIS_PREFIX=null").unwrap();
        assert_eq!(c.redis.unwrap().prefix, "");
        let c = with("REDIS_PREFIX=(empty)").unwrap();
        assert_eq!(c.redis.unwrap().prefix, "");
        let c = with("REDIS_PREFIX=\"my_app_\"").unwrap();
        assert_eq!(c.redis.unwrap().prefix, "my_app_");
        let c = with("REDIS_HOST=null").unwrap();
        assert_eq!(c.redis, None, "no Redis host: ingest off");
        let c = with("REVERB_SCALING_ENABLED=(true)\nBTS_CONSOLE=TRUE\nMETRICS_ENABLED=(false)")
            .unwrap();
        assert!(c.cluster.is_some() && c.console.is_some() && c.metrics.is_none());
        let c = with("REVERB_SCALING_ENABLED=1\nREVERB_APP_RATE_LIMITING_ENABLED=true").unwrap();
        assert!(c.cluster.is_some() && c.apps[0].rate_limit.is_some());
        let c = with("REVERB_SCALING_ENABLED=false\nREVERB_SERVER_PORT=null").unwrap();
        assert_eq!((c.cluster.is_none(), c.listen.port()), (true, 8080));
        let c = with("REVERB_APP_MAX_CONNECTIONS=null\nREVERB_APP_ACTIVITY_TIMEOUT=empty").unwrap();
        assert_eq!(
            (c.apps[0].max_connections, c.apps[0].activity_timeout),
            (None, DEFAULT_ACTIVITY_TIMEOUT)
        );
        // The README's `.env` block: comments after unquoted values.
        let c = with(
            "REVERB_SERVER_HOST=127.0.0.1   # where bts-guru binds\nREVERB_SERVER_PORT=8090 # x",
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:8090".parse().unwrap());
        let err = with("REVERB_SCALING_ENABLED=maybe")
            .unwrap_err()
            .to_string();
        assert!(err.contains("REVERB_SCALING_ENABLED"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = resolve(&Cli::default(), &[("REVERB_SERVER_PORT", "http")], "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("REVERB_SERVER_PORT"), "{err}");
        assert!(toml::from_str::<RawFile>("[server]\nbogus = 1").is_err());
    }

    #[test]
    fn channel_and_churn_bounds_default_and_refuse_zero() {
        let c = resolve(&Cli::default(), &[], "").unwrap();
        assert_eq!(c.max_channels_per_shard, DEFAULT_MAX_CHANNELS_PER_SHARD);
        assert_eq!(c.max_channels_listed, DEFAULT_MAX_CHANNELS_LISTED);
        assert_eq!(c.webhook_queue_capacity, DEFAULT_WEBHOOK_QUEUE_CAPACITY);
        assert_eq!(c.apps[0].max_channels, None);
        assert_eq!(c.apps[0].subscription_rate, DEFAULT_SUBSCRIPTION_RATE);
        let f = "[server]\nmax_channels_per_shard = 5\nmax_channels_listed = 7\n\
                 webhook_queue_capacity = 9\n[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\n\
                 max_channels = 3\nsubscription_changes_per_second = 4\nsubscription_changes_burst = 6";
        let c = resolve(&Cli::default(), &[], f).unwrap();
        assert_eq!(
            (
                c.max_channels_per_shard,
                c.max_channels_listed,
                c.webhook_queue_capacity
            ),
            (5, 7, 9)
        );
        assert_eq!(c.apps[0].max_channels, Some(3));
        assert_eq!(
            c.apps[0].subscription_rate,
            SubscriptionRate {
                per_second: 4,
                burst: 6
            }
        );
        for (from, to, name) in [
            (
                "max_channels_per_shard = 5",
                "max_channels_per_shard = 0",
                "max_channels_per_shard",
            ),
            (
                "max_channels_listed = 7",
                "max_channels_listed = 0",
                "max_channels_listed",
            ),
            (
                "webhook_queue_capacity = 9",
                "webhook_queue_capacity = 0",
                "webhook_queue_capacity",
            ),
            ("max_channels = 3", "max_channels = 0", "max_channels"),
            (
                "subscription_changes_burst = 6",
                "subscription_changes_burst = 0",
                "subscription_changes_burst",
            ),
        ] {
            let err = resolve(&Cli::default(), &[], &f.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn write_path_settings_come_from_env_or_file_and_are_bounded() {
        let c = resolve(&Cli::default(), &[], "").unwrap();
        assert_eq!(c.write_coalesce_ms, DEFAULT_WRITE_COALESCE_MS);
        assert!(c.send_ring);
        let file = "[server]\nwrite_coalesce_ms = 20\nsend_ring = false";
        let c = resolve(&Cli::default(), &[], file).unwrap();
        assert_eq!((c.write_coalesce_ms, c.send_ring), (20, false));
        let e = [("BTS_WRITE_COALESCE_MS", "0"), ("BTS_SEND_RING", "true")];
        let c = resolve(&Cli::default(), &e, file).unwrap();
        assert_eq!((c.write_coalesce_ms, c.send_ring), (0, true));
        let err = resolve(&Cli::default(), &[("BTS_WRITE_COALESCE_MS", "5000")], "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("write_coalesce_ms"), "{err}");
        assert!(resolve(&Cli::default(), &[("BTS_SEND_RING", "maybe")], "").is_err());
    }

    #[test]
    fn ping_rate_comes_from_env_or_file_and_is_at_least_one() {
        let c = resolve(&Cli::default(), &[], "").unwrap();
        assert_eq!(c.apps[0].max_pings_per_second, DEFAULT_MAX_PINGS_PER_SECOND);
        let file = "[[apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"s\"\nmax_pings_per_second = 50";
        let c = resolve(&Cli::default(), &[], file).unwrap();
        assert_eq!(c.apps[0].max_pings_per_second, 50);
        let e = [
            ("REVERB_APP_ID", "1"),
            ("BTS_APP_MAX_PINGS_PER_SECOND", "3"),
        ];
        let c = resolve(&Cli::default(), &e, file).unwrap();
        assert_eq!(c.apps[0].max_pings_per_second, 3);
        let e = [
            ("REVERB_APP_ID", "1"),
            ("BTS_APP_MAX_PINGS_PER_SECOND", "0"),
        ];
        let err = resolve(&Cli::default(), &e, file).unwrap_err().to_string();
        assert!(err.contains("max_pings_per_second"), "{err}");
    }
}
