//! From what the user wrote to the validated [`Config`]: one resolver per section, each taking
//! the flag, then the environment, then the file, then the default, and refusing a bad value
//! by name. `from_parts` only calls them, in the order their errors are reported.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::app::resolve_apps;
use super::env::{env_bool, env_parse, env_str, Env};
use super::redis_section::{resolve_cluster, resolve_redis};
use super::{
    available_cpus, App, Cli, Config, ConfigError, ConsoleConfig, RawFile, RawServer, TlsFiles,
    DEFAULT_COMPRESSION_THRESHOLD, DEFAULT_CONFLATION_THRESHOLD, DEFAULT_FD_RESERVE,
    DEFAULT_MAX_CHANNELS_LISTED, DEFAULT_MAX_CHANNELS_PER_SHARD, DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_OUTBOUND_BYTES, DEFAULT_PORT, DEFAULT_WEBHOOK_QUEUE_CAPACITY,
    DEFAULT_WRITE_COALESCE_MS, DEV_APP_SECRET, MIN_CONSOLE_TOKEN,
};

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

    /// The configuration from flags, environment, the parsed file and the CPUs this process may
    /// use (the shards are pinned to them in turn).
    pub fn from_parts(
        cli: &Cli,
        env: &dyn Env,
        file: RawFile,
        cpus: Vec<usize>,
    ) -> Result<Config, ConfigError> {
        let s = &file.server;
        let (apps, dev_credentials) = resolve_apps(env, &file.apps)?;
        let listen = resolve_listen(cli, env, s, dev_credentials)?;
        let shard_cpus = resolve_shards(cli, env, s, &cpus)?;
        let io = resolve_io(env, s, &apps)?;
        let cpus = if cpus.is_empty() { vec![0] } else { cpus };
        let redis = resolve_redis(cli, env, &file.redis, &apps, &cpus, shard_cpus.len())?;
        let cluster = resolve_cluster(cli, env, &file.redis, redis.is_some())?;
        let tls = resolve_tls(cli, env, s)?;
        let console = resolve_console(cli, env, s)?;
        let pid_file = resolve_pid_file(cli, env, s)?;
        let bounds = resolve_bounds(s)?;
        let sockets = resolve_sockets(env, s)?;
        let metrics = resolve_metrics(cli, env, s)?;
        let drain_secs = cli
            .drain_secs
            .or(env_parse(env, "BTS_DRAIN_SECS", "seconds")?)
            .or(s.drain_secs)
            .unwrap_or(10);
        Ok(Config {
            listen,
            shard_cpus,
            apps,
            max_request_size: io.max_request_size,
            pong_timeout: io.pong_timeout,
            max_outbound_bytes: io.max_outbound_bytes,
            compression: io.compression,
            compression_threshold: io.compression_threshold,
            compression_context: io.compression_context,
            conflation_threshold: io.conflation_threshold,
            write_coalesce_ms: io.write_coalesce_ms,
            send_ring: io.send_ring,
            inbox_capacity: io.inbox_capacity,
            handshake_timeout: io.handshake_timeout,
            max_cache_channels: s.max_cache_channels.unwrap_or(100_000).max(1),
            dev_credentials,
            redis,
            cluster,
            drain_window: Duration::from_secs(drain_secs),
            metrics,
            console,
            tls,
            pid_file,
            webhook_queue_capacity: bounds.webhook_queue_capacity,
            max_channels_per_shard: bounds.max_channels_per_shard,
            max_channels_listed: bounds.max_channels_listed,
            fd_reserve: sockets.fd_reserve,
            max_connections_per_ip: sockets.max_connections_per_ip,
            trusted_proxies: sockets.trusted_proxies,
            proxy_protocol: sockets.proxy_protocol,
            resume: resolve_resume(env, s)?,
        })
    }

    pub fn shards(&self) -> usize {
        self.shard_cpus.len()
    }
}

/// The listen address. With the built-in development credentials (a public secret) it stays
/// on loopback unless told otherwise, and a public address needs `allow_dev_credentials`.
fn resolve_listen(
    cli: &Cli,
    env: &dyn Env,
    s: &RawServer,
    dev_credentials: bool,
) -> Result<SocketAddr, ConfigError> {
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
    Ok(SocketAddr::new(host, port))
}

/// The CPU of each shard: one shard per CPU by default, pinned in turn.
fn resolve_shards(
    cli: &Cli,
    env: &dyn Env,
    s: &RawServer,
    cpus: &[usize],
) -> Result<Vec<usize>, ConfigError> {
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
    let cpus = if cpus.is_empty() { &[0][..] } else { cpus };
    Ok((0..shards).map(|i| cpus[i % cpus.len()]).collect())
}

/// Request and write-path limits.
struct Io {
    max_request_size: usize,
    max_outbound_bytes: usize,
    compression: bool,
    compression_threshold: usize,
    compression_context: bool,
    conflation_threshold: usize,
    write_coalesce_ms: u32,
    send_ring: bool,
    pong_timeout: Duration,
    handshake_timeout: Duration,
    inbox_capacity: usize,
}

fn resolve_io(env: &dyn Env, s: &RawServer, apps: &[App]) -> Result<Io, ConfigError> {
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
    let compression = env_bool(env, "BTS_COMPRESSION")?
        .or(s.compression)
        .unwrap_or(true);
    let compression_threshold = env_parse(env, "BTS_COMPRESSION_THRESHOLD", "bytes")?
        .or(s.compression_threshold)
        .unwrap_or(DEFAULT_COMPRESSION_THRESHOLD);
    let compression_context = env_bool(env, "BTS_COMPRESSION_CONTEXT")?
        .or(s.compression_context)
        .unwrap_or(true);
    let conflation_threshold = env_parse(env, "BTS_CONFLATION_THRESHOLD", "bytes")?
        .or(s.conflation_threshold)
        .unwrap_or(DEFAULT_CONFLATION_THRESHOLD);
    if conflation_threshold >= max_outbound_bytes && apps.iter().any(|a| !a.conflate.is_empty()) {
        return Err(ConfigError::Other(format!(
            "conflation_threshold ({conflation_threshold}) must be below max_outbound_bytes \
             ({max_outbound_bytes}), or a slow connection is closed before anything is conflated"
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
    Ok(Io {
        max_request_size,
        max_outbound_bytes,
        compression,
        compression_threshold,
        compression_context,
        conflation_threshold,
        write_coalesce_ms,
        send_ring,
        pong_timeout: Duration::from_secs(pong_timeout),
        handshake_timeout: Duration::from_secs(handshake_timeout),
        inbox_capacity,
    })
}

/// TLS on the main port: a certificate and its key, or neither.
fn resolve_tls(cli: &Cli, env: &dyn Env, s: &RawServer) -> Result<Option<TlsFiles>, ConfigError> {
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
    match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::Other(
            "a TLS certificate is set (--tls-cert / BTS_TLS_CERT / tls_cert) but no key \
             (--tls-key / BTS_TLS_KEY / tls_key)"
                .into(),
        )),
        (None, Some(_)) => Err(ConfigError::Other(
            "a TLS key is set (--tls-key / BTS_TLS_KEY / tls_key) but no certificate \
             (--tls-cert / BTS_TLS_CERT / tls_cert)"
                .into(),
        )),
    }
}

/// The debug console: off unless enabled; its token, when one is set, long enough.
fn resolve_console(
    cli: &Cli,
    env: &dyn Env,
    s: &RawServer,
) -> Result<Option<ConsoleConfig>, ConfigError> {
    let console_on = cli.console || env_bool(env, "BTS_CONSOLE")?.or(s.console).unwrap_or(false);
    if !console_on {
        return Ok(None);
    }
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
    Ok(Some(ConsoleConfig { token }))
}

/// `--pid-file`: refused now when it could only fail after the sockets are bound.
fn resolve_pid_file(
    cli: &Cli,
    env: &dyn Env,
    s: &RawServer,
) -> Result<Option<PathBuf>, ConfigError> {
    let pid_file = cli
        .pid_file
        .clone()
        .or(env_str(env, "BTS_PID_FILE").map(PathBuf::from))
        .or(s.pid_file.clone());
    if let Some(path) = &pid_file {
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
    Ok(pid_file)
}

/// Bounds on webhook queues and channels.
struct Bounds {
    webhook_queue_capacity: usize,
    max_channels_per_shard: usize,
    max_channels_listed: usize,
}

fn resolve_bounds(s: &RawServer) -> Result<Bounds, ConfigError> {
    let bounds = Bounds {
        webhook_queue_capacity: s
            .webhook_queue_capacity
            .unwrap_or(DEFAULT_WEBHOOK_QUEUE_CAPACITY),
        max_channels_per_shard: s
            .max_channels_per_shard
            .unwrap_or(DEFAULT_MAX_CHANNELS_PER_SHARD),
        max_channels_listed: s.max_channels_listed.unwrap_or(DEFAULT_MAX_CHANNELS_LISTED),
    };
    for (name, v) in [
        ("webhook_queue_capacity", bounds.webhook_queue_capacity),
        ("max_channels_per_shard", bounds.max_channels_per_shard),
        ("max_channels_listed", bounds.max_channels_listed),
    ] {
        if v == 0 {
            return Err(ConfigError::Other(format!("{name} must be at least 1")));
        }
    }
    Ok(bounds)
}

/// Who may hold the node's sockets: the descriptor reserve, the per-IP cap, and the load
/// balancers whose PROXY headers and X-Forwarded-For are believed.
struct Sockets {
    fd_reserve: usize,
    max_connections_per_ip: Option<u32>,
    trusted_proxies: crate::proxy::Trusted,
    proxy_protocol: bool,
}

fn resolve_sockets(env: &dyn Env, s: &RawServer) -> Result<Sockets, ConfigError> {
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
    Ok(Sockets {
        fd_reserve,
        max_connections_per_ip,
        trusted_proxies,
        proxy_protocol,
    })
}

/// Where Prometheus metrics are served; `None` when turned off.
fn resolve_metrics(
    cli: &Cli,
    env: &dyn Env,
    s: &RawServer,
) -> Result<Option<SocketAddr>, ConfigError> {
    if cli.no_metrics
        || !env_bool(env, "METRICS_ENABLED")?
            .or(s.metrics)
            .unwrap_or(true)
    {
        return Ok(None);
    }
    Ok(Some(SocketAddr::new(
        cli.metrics_host
            .or(env_parse(env, "METRICS_HOST", "an IP address")?)
            .or(s.metrics_host)
            .unwrap_or(IpAddr::from([127, 0, 0, 1])),
        cli.metrics_port
            .or(env_parse(env, "METRICS_PORT", "a port number")?)
            .or(s.metrics_port)
            .unwrap_or(9601),
    )))
}

/// Positioned channels' history bounds: environment, then the file, then the defaults.
fn resolve_resume(env: &dyn Env, s: &RawServer) -> Result<super::ResumeBounds, ConfigError> {
    let d = super::ResumeBounds::default();
    let secs: Option<u64> =
        env_parse(env, "BTS_RESUME_HISTORY_SECS", "seconds")?.or(s.resume_history_secs);
    let b = super::ResumeBounds {
        events: env_parse(env, "BTS_RESUME_HISTORY_EVENTS", "a count")?
            .or(s.resume_history_events)
            .unwrap_or(d.events),
        bytes: env_parse(env, "BTS_RESUME_HISTORY_BYTES", "bytes")?
            .or(s.resume_history_bytes)
            .unwrap_or(d.bytes),
        age: secs.map_or(d.age, Duration::from_secs),
        memory: env_parse(env, "BTS_RESUME_MEMORY_BYTES", "bytes")?
            .or(s.resume_memory_bytes)
            .unwrap_or(d.memory),
        max_replay: env_parse(env, "BTS_RESUME_MAX_REPLAY", "a count")?
            .or(s.resume_max_replay)
            .unwrap_or(d.max_replay),
        replay_per_shard: s.resume_replay_per_shard.unwrap_or(d.replay_per_shard),
    };
    for (name, v) in [
        ("resume_history_events", b.events),
        ("resume_history_bytes", b.bytes),
        ("resume_history_secs", b.age.as_secs() as usize),
        ("resume_memory_bytes", b.memory),
        ("resume_max_replay", b.max_replay),
        ("resume_replay_per_shard", b.replay_per_shard),
    ] {
        if v == 0 {
            return Err(ConfigError::Other(format!("{name} must be at least 1")));
        }
    }
    Ok(b)
}
