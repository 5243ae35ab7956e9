//! A Laravel project's own `.env`, read as Laravel reads it: a fresh Laravel 11 skeleton's
//! `.env` plus the lines `php artisan install:broadcasting` adds for Reverb
//! (`tests/fixtures/laravel-11.env`), with `REDIS_PASSWORD=null`. bts-guru takes the app from
//! it, connects to the Redis it names without a password, and delivers what Laravel's redis
//! broadcaster publishes; a Redis that refuses the credentials is logged as an authentication
//! failure, not as unreachable.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const FIXTURE: &str = include_str!("fixtures/laravel-11.env");
const KEY: &str = "wlzqyxyd6t1mudlnbpnr";

/// The fixture with some lines replaced (`KEY=value`, matched by key), written to a file.
fn env_file(dir: &std::path::Path, set: &[(&str, String)]) -> std::path::PathBuf {
    let mut text = String::new();
    for line in FIXTURE.lines() {
        let key = line.split('=').next().unwrap_or_default();
        match set.iter().find(|(k, _)| *k == key) {
            Some((k, v)) => text.push_str(&format!("{k}={v}\n")),
            None => text.push_str(&format!("{line}\n")),
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(".env");
    std::fs::write(&path, text).unwrap();
    path
}

fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "bts-guru-laravel-{name}-{}-{}",
        std::process::id(),
        now_secs()
    ))
}

fn daemon_with_env_file(path: &std::path::Path) -> Daemon {
    Daemon::builder()
        .without_app_env()
        .arg("--env-file")
        .arg(path.to_string_lossy())
        .start()
}

fn redis_state(d: &Daemon) -> Value {
    let (_, body) = http(d.addr, "GET", "/up", b"");
    serde_json::from_str::<Value>(&body).unwrap()["redis"].clone()
}

/// Waits (bounded) until the log has a line containing `what`.
fn wait_log(d: &Daemon, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.stderr();
        if log.contains(what) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {what:?} in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fresh_laravel_11_env_with_redis_password_null_delivers_laravel_broadcasts() {
    let redis = RedisServer::start();
    let dir = scratch("ok");
    let path = env_file(&dir, &[("REDIS_PORT", redis.port.to_string())]);
    let d = daemon_with_env_file(&path);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_state(&d) != "connected" {
        assert!(
            Instant::now() < deadline,
            "ingest never connected:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The app is the .env's REVERB_APP_*; the prefix Laravel's default for APP_NAME=Laravel.
    let mut c = Client::connect(d.addr, KEY);
    c.subscribe("sports.football");
    let data = json!({"match_id": 12345, "home_team": {"score": 2}, "away_team": {"score": 1}});
    redis.laravel_broadcast(
        "laravel_database_",
        &["sports.football"],
        "match.update",
        data.clone(),
        None,
    );
    let ev = c.next_event(Duration::from_secs(5));
    assert_eq!(ev["event"], "match.update");
    let got: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
    assert_eq!(got, data);
    let log = d.stderr();
    assert!(!log.contains("Redis unreachable"), "{log}");
    assert!(!log.contains("authentication failed"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_refused_redis_password_is_logged_as_an_authentication_failure() {
    let redis = RedisServer::start_with_password("right-password");
    let dir = scratch("auth");
    // A wrong password, and none at all (REDIS_PASSWORD=null) for a Redis that needs one.
    for (name, password) in [("wrong", "\"wrong-password\""), ("none", "null")] {
        let path = env_file(
            &dir.join(name),
            &[
                ("REDIS_PORT", redis.port.to_string()),
                ("REDIS_PASSWORD", password.to_owned()),
            ],
        );
        let d = daemon_with_env_file(&path);
        let log = wait_log(&d, "Redis authentication failed");
        assert!(!log.contains("Redis unreachable"), "{name}: {log}");
        assert!(
            !log.contains("wrong-password"),
            "{name}: password logged: {log}"
        );
        assert_eq!(redis_state(&d), "disconnected", "{name}");
        // The WebSocket side serves regardless.
        let mut c = Client::connect(d.addr, KEY);
        c.subscribe("sports.football");
    }
    // The right one, quoted as a Laravel .env may write it, connects.
    let path = env_file(
        &dir.join("right"),
        &[
            ("REDIS_PORT", redis.port.to_string()),
            ("REDIS_PASSWORD", "\"right-password\"".to_owned()),
        ],
    );
    let d = daemon_with_env_file(&path);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_state(&d) != "connected" {
        assert!(Instant::now() < deadline, "{}", d.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(dir);
}
