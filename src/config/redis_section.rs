//! The `[redis]` section and Laravel's `REDIS_*` settings: the Redis the ingest consumes (and,
//! in cluster mode, the channel the nodes talk on).

use std::path::PathBuf;

use super::env::{env_bool, env_str, laravel_prefix, laravel_redis_url, Env};
use super::{App, Cli, ConfigError, RawRedis, RedisConfig};

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
