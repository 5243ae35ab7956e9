//! The `[redis]` section and Laravel's `REDIS_*` settings: the Redis the ingest consumes (and,
//! in cluster mode, the channel the nodes talk on).

use std::path::PathBuf;
use std::time::Duration;

use super::env::{env_bool, env_parse, env_str, laravel_prefix, laravel_redis_url, Env};
use super::{App, Cli, ConfigError, OutboxLimits, RawRedis, RedisConfig, Topology};

/// A `host:port` list (`REDIS_SENTINELS`, `REDIS_CLUSTER_NODES`): from the environment
/// (comma-separated) or the TOML array. IPv6 hosts in brackets.
fn addr_list(
    env: &dyn Env,
    name: &str,
    raw: &Option<Vec<String>>,
) -> Result<Option<Vec<(String, u16)>>, ConfigError> {
    let items: Vec<String> = match env_str(env, name) {
        Some(v) => v.split(',').map(|s| s.trim().to_owned()).collect(),
        None => match raw {
            Some(v) => v.clone(),
            None => return Ok(None),
        },
    };
    let bad = |value: &str| ConfigError::BadValue {
        name: name.to_owned(),
        value: value.to_owned(),
        why: "a comma-separated list of host:port",
    };
    let mut out = Vec::new();
    for item in items.iter().filter(|s| !s.is_empty()) {
        let (host, port) = item.rsplit_once(':').ok_or_else(|| bad(item))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad(item))?;
        if host.is_empty() || port == 0 {
            return Err(bad(item));
        }
        out.push((host.to_owned(), port));
    }
    if out.is_empty() {
        return Err(bad(&items.join(",")));
    }
    Ok(Some(out))
}

/// Sentinel or Redis Cluster, when configured.
fn resolve_topology(env: &dyn Env, raw: &RawRedis) -> Result<Topology, ConfigError> {
    let sentinels = addr_list(env, "REDIS_SENTINELS", &raw.sentinels)?;
    let nodes = addr_list(env, "REDIS_CLUSTER_NODES", &raw.cluster_nodes)?;
    match (sentinels, nodes) {
        (Some(_), Some(_)) => Err(ConfigError::Other(
            "REDIS_SENTINELS and REDIS_CLUSTER_NODES are both set: a Redis is either \
             behind sentinels or a Redis Cluster"
                .into(),
        )),
        (Some(sentinels), None) => {
            let master = env_str(env, "REDIS_SENTINEL_MASTER")
                .or(raw.sentinel_master.clone())
                .ok_or_else(|| {
                    ConfigError::Other(
                        "REDIS_SENTINELS needs REDIS_SENTINEL_MASTER (the name the sentinels \
                         monitor the primary under, e.g. mymaster)"
                            .into(),
                    )
                })?;
            let password =
                env_str(env, "REDIS_SENTINEL_PASSWORD").or(raw.sentinel_password.clone());
            Ok(Topology::Sentinel {
                sentinels,
                master,
                password,
            })
        }
        (None, Some(seeds)) => Ok(Topology::Cluster { seeds }),
        (None, None) => Ok(Topology::Single),
    }
}

fn resolve_outbox(env: &dyn Env, raw: &RawRedis) -> Result<OutboxLimits, ConfigError> {
    let d = OutboxLimits::default();
    let max_bytes = env_parse(env, "BTS_CLUSTER_OUTBOX_BYTES", "a number of bytes")?
        .or(raw.outbox_bytes)
        .unwrap_or(d.max_bytes);
    let max_age = env_parse(
        env,
        "BTS_CLUSTER_OUTBOX_MAX_AGE_SECS",
        "a number of seconds",
    )?
    .or(raw.outbox_max_age_secs)
    .map_or(d.max_age, Duration::from_secs);
    if max_bytes < 1024 || max_age.is_zero() {
        return Err(ConfigError::Other(
            "the cluster outbox needs at least 1024 bytes (BTS_CLUSTER_OUTBOX_BYTES) and a max \
             age of at least 1 s (BTS_CLUSTER_OUTBOX_MAX_AGE_SECS)"
                .into(),
        ));
    }
    Ok(OutboxLimits { max_bytes, max_age })
}

pub(super) fn resolve_redis(
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
    let topology = resolve_topology(env, raw)?;
    let url = match (
        &cli.redis,
        env_str(env, "REDIS_URL"),
        env_str(env, "REDIS_HOST"),
        &raw.url,
    ) {
        (Some(u), _, _, _) => u.clone(),
        (None, Some(u), _, _) => u,
        (None, None, Some(_), _) => laravel_redis_url(env, None)?.unwrap_or_default(),
        (None, None, None, Some(u)) => u.clone(),
        // Sentinel or Cluster without a URL: REDIS_PASSWORD and friends at each node.
        (None, None, None, None) if topology != Topology::Single => {
            laravel_redis_url(env, Some("127.0.0.1"))?.unwrap_or_default()
        }
        (None, None, None, None) => return Ok(None),
    };
    if topology != Topology::Single && url.starts_with("unix://") {
        return Err(ConfigError::Other(
            "REDIS_SENTINELS / REDIS_CLUSTER_NODES need a redis:// or rediss:// REDIS_URL (the \
             data nodes' credentials), not unix://"
                .into(),
        ));
    }
    let outbox = resolve_outbox(env, raw)?;
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
        topology,
        outbox,
    }))
}

/// Cluster mode's channel (REVERB_SCALING_CHANNEL), when cluster mode is on: it needs a Redis.
pub(super) fn resolve_cluster(
    cli: &Cli,
    env: &dyn Env,
    raw: &RawRedis,
    redis: bool,
) -> Result<Option<String>, ConfigError> {
    let on = !cli.standalone
        && (cli.cluster
            || env_bool(env, "REVERB_SCALING_ENABLED")?.unwrap_or(false)
            || raw.cluster.unwrap_or(false));
    if !on {
        return Ok(None);
    }
    if !redis {
        return Err(ConfigError::Other(
            "cluster mode (--cluster / REVERB_SCALING_ENABLED) needs a Redis: set REDIS_URL \
             or REDIS_HOST, or pass --redis"
                .into(),
        ));
    }
    Ok(Some(
        env_str(env, "REVERB_SCALING_CHANNEL")
            .or(raw.cluster_channel.clone())
            .unwrap_or_else(|| "bts-guru".into()),
    ))
}
