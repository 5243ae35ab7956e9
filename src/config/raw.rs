//! What the user wrote: the daemon's command-line flags (`Cli`) and the TOML file (`RawFile`),
//! before any default, precedence or validation (`resolve`'s).

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::WebhookTarget;

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
    /// Redis Sentinel: `host:port` of each sentinel (REDIS_SENTINELS).
    pub sentinels: Option<Vec<String>>,
    /// The sentinels' name of the primary (REDIS_SENTINEL_MASTER).
    pub sentinel_master: Option<String>,
    /// The sentinels' own password (REDIS_SENTINEL_PASSWORD).
    pub sentinel_password: Option<String>,
    /// Redis Cluster: seed nodes, `host:port` (REDIS_CLUSTER_NODES).
    pub cluster_nodes: Option<Vec<String>>,
    /// Most bytes of accepted events held for the other nodes (BTS_CLUSTER_OUTBOX_BYTES).
    pub outbox_bytes: Option<usize>,
    /// Oldest held event, in seconds, past which publishes are refused
    /// (BTS_CLUSTER_OUTBOX_MAX_AGE_SECS).
    pub outbox_max_age_secs: Option<u64>,
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
    pub resume_history_events: Option<usize>,
    pub resume_history_bytes: Option<usize>,
    pub resume_history_secs: Option<u64>,
    pub resume_memory_bytes: Option<usize>,
    pub resume_max_replay: Option<usize>,
    pub resume_replay_per_shard: Option<usize>,
    pub compression: Option<bool>,
    pub compression_threshold: Option<usize>,
    pub compression_context: Option<bool>,
    pub conflation_threshold: Option<usize>,
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
    pub resume: Option<Vec<String>>,
    pub compression: Option<bool>,
    pub conflate: Option<Vec<String>>,
}
