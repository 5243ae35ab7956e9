//! The apps: the `[[apps]]` of the file, the one app a Laravel `.env` describes
//! (`REVERB_APP_*`, over the file's app with the same id), or the built-in development app
//! when there is none; each validated, ids and keys unique.

use std::collections::HashSet;
use std::time::Duration;

use super::env::{env_bool, env_parse, env_str, Env};
use super::{
    App, ClientEvents, ConfigError, RateLimit, RawApp, SubscriptionRate, WebhookTarget,
    DEFAULT_ACTIVITY_TIMEOUT, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_PINGS_PER_SECOND,
    DEFAULT_SUBSCRIPTION_RATE, DEV_APP_ID, DEV_APP_KEY, DEV_APP_SECRET, MAX_MESSAGE_SIZE_LIMIT,
    WEBHOOK_EVENTS,
};

/// The validated apps, and whether they are the built-in development app.
pub(super) fn resolve_apps(
    env: &dyn Env,
    file_apps: &[RawApp],
) -> Result<(Vec<App>, bool), ConfigError> {
    let mut apps = file_apps.to_vec();
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
        resume: env_str(env, "BTS_APP_RESUME").map(|v| {
            v.split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect()
        }),
        webhooks: env_str(env, "BTS_APP_WEBHOOK_URLS").map(|v| {
            v.split(',')
                .map(|u| WebhookTarget {
                    url: u.trim().to_owned(),
                    event_types: None,
                })
                .collect()
        }),
        conflate: env_str(env, "BTS_APP_CONFLATE").map(|v| {
            v.split(',')
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect()
        }),
        ..RawApp::default()
    };
    let env_has_creds = env_app.id.is_some() || env_app.key.is_some() || env_app.secret.is_some();
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
                a.allowed_origins = env_app.allowed_origins.clone().or(a.allowed_origins.take());
                a.max_pings_per_second = env_app.max_pings_per_second.or(a.max_pings_per_second);
                a.rate_limiting = env_app.rate_limiting.or(a.rate_limiting);
                a.rate_limit_max_attempts = env_app
                    .rate_limit_max_attempts
                    .or(a.rate_limit_max_attempts);
                a.rate_limit_decay_seconds = env_app
                    .rate_limit_decay_seconds
                    .or(a.rate_limit_decay_seconds);
                a.rate_limit_terminate = env_app.rate_limit_terminate.or(a.rate_limit_terminate);
                a.webhooks = env_app.webhooks.clone().or(a.webhooks.take());
                a.resume = env_app.resume.clone().or(a.resume.take());
                a.conflate = env_app.conflate.clone().or(a.conflate.take());
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
    Ok((apps, dev_credentials))
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
    let resume = a.resume.clone().unwrap_or_default();
    for p in &resume {
        if p.is_empty() || channel_pattern_invalid(p) {
            return Err(bad(format!(
                "resume pattern {p:?} is not a channel name with `*` wildcards"
            )));
        }
    }
    let conflate: Vec<std::sync::Arc<str>> = a
        .conflate
        .iter()
        .flatten()
        .map(|e| std::sync::Arc::from(e.as_str()))
        .collect();
    if let Some(e) = conflate
        .iter()
        .find(|e| e.is_empty() || e.starts_with("pusher:") || e.starts_with("pusher_internal:"))
    {
        return Err(bad(format!(
            "conflate: {e:?} is not an event name the server publishes for the app"
        )));
    }
    Ok(App {
        resume,
        compression: a.compression.unwrap_or(true),
        conflate,
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

/// A resume pattern is a channel name in which `*` stands for any run of characters.
fn channel_pattern_invalid(p: &str) -> bool {
    p.len() > 200
        || !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=@,.;*".contains(&b))
}
