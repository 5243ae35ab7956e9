//! The environment as Laravel reads it: the process environment over a `.env` file, values read
//! as Laravel's `env()` reads them (`laravel_value`), the typed lookups the resolvers use, and
//! what Laravel derives from it (the Redis URL, the default key prefix).

use std::collections::HashMap;
use std::path::PathBuf;

use super::ConfigError;

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

pub(crate) fn env_parse<T: std::str::FromStr>(
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
pub(crate) fn env_bool(env: &dyn Env, name: &str) -> Result<Option<bool>, ConfigError> {
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

pub(crate) fn env_str(env: &dyn Env, name: &str) -> Option<String> {
    env.get(name).filter(|v| !v.trim().is_empty())
}

/// The Redis URL Laravel's `REDIS_HOST`, `REDIS_PORT`, `REDIS_DB`, `REDIS_SCHEME`,
/// `REDIS_USERNAME` and `REDIS_PASSWORD` describe (credentials percent-encoded), with `host`
/// when `REDIS_HOST` is unset; `None` when neither is there.
pub fn laravel_redis_url(env: &dyn Env, host: Option<&str>) -> Result<Option<String>, ConfigError> {
    let Some(host) = env_str(env, "REDIS_HOST").or(host.map(str::to_owned)) else {
        return Ok(None);
    };
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
    Ok(Some(format!("{scheme}://{auth}{host}:{port}/{db}")))
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
