//! Configuration tests: every source (flags, environment, `.env`, TOML) through `resolve`, its
//! precedence, its defaults, and each refusal by name.

use super::*;
use std::collections::HashMap;

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
fn sentinel_cluster_and_outbox_settings() {
    let base = [
        ("REVERB_APP_ID", "1"),
        ("REVERB_APP_KEY", "k"),
        ("REVERB_APP_SECRET", "s"),
    ];
    // Sentinels alone turn Redis on; REDIS_PASSWORD is the data nodes', the sentinels have
    // their own.
    let mut e = base.to_vec();
    e.extend([
        (
            "REDIS_SENTINELS",
            "10.0.0.1:26379, 10.0.0.2:26379,[::1]:26380",
        ),
        ("REDIS_SENTINEL_MASTER", "mymaster"),
        ("REDIS_SENTINEL_PASSWORD", "sp"),
        ("REDIS_PASSWORD", "dp"),
    ]);
    let r = resolve(&Cli::default(), &e, "").unwrap().redis.unwrap();
    assert_eq!(
        r.topology,
        Topology::Sentinel {
            sentinels: vec![
                ("10.0.0.1".into(), 26379),
                ("10.0.0.2".into(), 26379),
                ("::1".into(), 26380)
            ],
            master: "mymaster".into(),
            password: Some("sp".into()),
        }
    );
    assert_eq!(r.url_at("10.0.0.9", 6380), "redis://:dp@10.0.0.9:6380/0");
    assert_eq!(r.outbox, OutboxLimits::default());
    // The master name is required; a bad address is named.
    let mut no_master = base.to_vec();
    no_master.push(("REDIS_SENTINELS", "10.0.0.1:26379"));
    let err = resolve(&Cli::default(), &no_master, "")
        .unwrap_err()
        .to_string();
    assert!(err.contains("REDIS_SENTINEL_MASTER"), "{err}");
    let mut bad = base.to_vec();
    bad.push(("REDIS_CLUSTER_NODES", "10.0.0.1"));
    let err = resolve(&Cli::default(), &bad, "").unwrap_err().to_string();
    assert!(err.contains("REDIS_CLUSTER_NODES"), "{err}");
    // Redis Cluster from the TOML file, with the outbox's bounds; the environment wins.
    let file = r#"
        [redis]
        cluster_nodes = ["10.0.0.1:7000", "10.0.0.2:7000"]
        outbox_bytes = 1048576
        outbox_max_age_secs = 10
    "#;
    let mut e = base.to_vec();
    e.push(("BTS_CLUSTER_OUTBOX_MAX_AGE_SECS", "5"));
    let r = resolve(&Cli::default(), &e, file).unwrap().redis.unwrap();
    assert_eq!(
        r.topology,
        Topology::Cluster {
            seeds: vec![("10.0.0.1".into(), 7000), ("10.0.0.2".into(), 7000)]
        }
    );
    assert_eq!(
        r.outbox,
        OutboxLimits {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(5)
        }
    );
    // Both at once, or a uselessly small outbox: refused.
    let mut both = base.to_vec();
    both.extend([
        ("REDIS_SENTINELS", "a:1"),
        ("REDIS_SENTINEL_MASTER", "m"),
        ("REDIS_CLUSTER_NODES", "b:2"),
    ]);
    assert!(resolve(&Cli::default(), &both, "").is_err());
    let mut tiny = base.to_vec();
    tiny.extend([
        ("REDIS_URL", "redis://x:1"),
        ("BTS_CLUSTER_OUTBOX_BYTES", "10"),
    ]);
    assert!(resolve(&Cli::default(), &tiny, "").is_err());
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

const LARAVEL_11_ENV: &str = include_str!("../../tests/fixtures/laravel-11.env");

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
    let c =
        with("REVERB_SCALING_ENABLED=(true)\nBTS_CONSOLE=TRUE\nMETRICS_ENABLED=(false)").unwrap();
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
    let c =
        with("REVERB_SERVER_HOST=127.0.0.1   # where bts-guru binds\nREVERB_SERVER_PORT=8090 # x")
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

#[test]
fn resume_patterns_and_history_bounds() {
    let c = resolve(&Cli::default(), &[], "").unwrap();
    assert!(c.apps[0].resume.is_empty());
    assert!(!c.apps[0].positioned("sports.a"));
    assert_eq!(c.resume, ResumeBounds::default());
    assert_eq!(
        (c.resume.events, c.resume.bytes, c.resume.age.as_secs()),
        (300, 1 << 20, 600)
    );
    // From the REVERB_APP_* app's environment.
    let e = [
        ("REVERB_APP_ID", "1"),
        ("REVERB_APP_KEY", "k"),
        ("REVERB_APP_SECRET", "s"),
        ("BTS_APP_RESUME", "sports.*, scores-*-live ,"),
        ("BTS_RESUME_HISTORY_EVENTS", "50"),
        ("BTS_RESUME_MEMORY_BYTES", "1000000"),
    ];
    let c = resolve(&Cli::default(), &e, "").unwrap();
    let app = &c.apps[0];
    assert_eq!(app.resume, ["sports.*", "scores-*-live"]);
    for (ch, want) in [
        ("sports.football", true),
        ("sports.", true),
        ("sport.x", false),
        ("scores-a-live", true),
        ("scores-a-live2", false),
        ("Sports.x", false),
    ] {
        assert_eq!(app.positioned(ch), want, "{ch}");
    }
    assert_eq!((c.resume.events, c.resume.memory), (50, 1_000_000));
    // From the file; presence channels never.
    let f = "[server]\nresume_history_secs = 5\nresume_max_replay = 7\n\
             [[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\nresume = [\"*\"]";
    let c = resolve(&Cli::default(), &[], f).unwrap();
    assert!(c.apps[0].positioned("private-x"));
    assert!(!c.apps[0].positioned("presence-x"));
    assert_eq!((c.resume.age.as_secs(), c.resume.max_replay), (5, 7));
    // Refusals, by name.
    let bad = "[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\nresume = [\"sports.{x}\"]";
    let err = resolve(&Cli::default(), &[], bad).unwrap_err().to_string();
    assert!(err.contains("resume pattern"), "{err}");
    let err = resolve(&Cli::default(), &[], "[server]\nresume_history_events = 0")
        .unwrap_err()
        .to_string();
    assert!(err.contains("resume_history_events"), "{err}");
    let err = resolve(&Cli::default(), &[("BTS_RESUME_HISTORY_BYTES", "lots")], "")
        .unwrap_err()
        .to_string();
    assert!(err.contains("BTS_RESUME_HISTORY_BYTES"), "{err}");
}
