//! What a new user trips on first: `bts-guru demo --config`, a PID file that names the process
//! a reload is meant for (also while two overlap during a restart), and `BTS_LOG=debug`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Waits (bounded) until `cond` holds.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn demo_takes_the_daemons_flags_after_the_subcommand() {
    let dir = std::env::temp_dir().join(format!("bts-guru-demo-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        "[[apps]]\nid = \"scores\"\nkey = \"scores-key\"\nsecret = \"scores-secret-123\"\n",
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    let demo = Demo::start(
        &[],
        &[
            "--config",
            &config,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--shards",
            "1",
        ],
        &[],
    );
    // The file's app is the demo's: its secret opens the console, its key connects.
    assert_eq!(demo.token(), "scores-secret-123", "{}", demo.url);
    let mut c = Client::connect(demo.addr, "scores-key");
    c.subscribe("sports.football");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_pid_file_names_the_newest_process_through_a_restart() {
    let dir = std::env::temp_dir().join(format!("bts-guru-pid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("bts-guru.pid");
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let read_pid = || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
    };
    let mut a = Daemon::builder()
        .arg("--pid-file")
        .arg(&pid_arg)
        .arg("--drain-secs")
        .arg("1")
        .start();
    // Written before `ready`.
    assert_eq!(read_pid(), Some(a.pid()));
    // The README's reload recipe reaches this process.
    let hup = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -HUP \"$(cat {pid_arg})\""))
        .status()
        .unwrap();
    assert!(hup.success());
    wait_for("the reload", || {
        a.stderr().contains("configuration reloaded")
    });

    // B starts beside A with the same settings: the file now names B, and A's exit leaves it.
    let mut b = Daemon::builder()
        .port(a.addr.port())
        .arg("--pid-file")
        .arg(&pid_arg)
        .arg("--drain-secs")
        .arg("1")
        .env("BTS_PID_FILE", "/nonexistent/ignored-the-flag-wins.pid")
        .start();
    assert_eq!(read_pid(), Some(b.pid()));
    a.signal("TERM");
    assert_eq!(a.wait_exit(Duration::from_secs(15)), Some(Some(0)));
    assert_eq!(
        read_pid(),
        Some(b.pid()),
        "the old process removed the new one's file"
    );
    assert!(!b.stderr().contains("configuration reloaded"));
    b.signal("TERM");
    assert_eq!(b.wait_exit(Duration::from_secs(15)), Some(Some(0)));
    assert!(!pid_file.exists(), "removed on exit");

    // A pid file in a directory that does not exist fails start-up, naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_bts-guru"))
        .args(["--port", "0", "--no-metrics", "--env-file", "/dev/null"])
        .args(["--pid-file", "/nonexistent-dir/bts-guru.pid"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent-dir/bts-guru.pid"), "{err}");
    assert!(out.stdout.is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

/// `BTS_LOG=debug` and `BTS_LOG=bts_guru=debug`, as the README says, give debug lines (the
/// build no longer caps tracing at info; `cargo test --release --lib static_log_level` checks
/// the release profile).
#[test]
fn bts_log_debug_gives_debug_lines() {
    for filter in ["debug", "bts_guru=debug"] {
        let d = Daemon::builder().env("BTS_LOG", filter).start();
        let c = d.client();
        c.close();
        // A connection's end is logged at debug level, asynchronously.
        wait_for("the debug line of the disconnect", || {
            d.stderr()
                .lines()
                .any(|l| l.contains(" DEBUG bts_guru") && l.contains("disconnected"))
        });
        let log = d.stderr();
        assert!(!log.contains("disabled statically"), "{filter}: {log}");
    }
    let d = Daemon::builder().env("BTS_LOG", "info").start();
    d.client().close();
    wait_for("the start-up lines", || {
        d.stderr().contains("all shards accepting")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!d.stderr().contains("DEBUG"), "{}", d.stderr());
}

/// The release build is what users run, and `cargo test` builds the debug one, where tracing's
/// `release_max_level_*` features do nothing: so check the manifest asks for no static cap on
/// tracing's level in any profile.
#[test]
fn no_build_caps_the_log_level() {
    let manifest: toml::Value = toml::from_str(include_str!("../Cargo.toml")).unwrap();
    let tracing = &manifest["dependencies"]["tracing"];
    let features: Vec<&str> = tracing
        .get("features")
        .and_then(|f| f.as_array())
        .map(|f| f.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(
        !features.iter().any(|f| f.contains("max_level")),
        "tracing features {features:?}: BTS_LOG=debug would print nothing in that build"
    );
}
