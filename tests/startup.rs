//! Start-up: one `ready <addr>` line when every shard accepts, and one clear line plus a non-zero
//! exit for every bad configuration.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// Runs the daemon expecting it to refuse to start; returns (exit code, stdout, stderr).
fn refuse(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bts-guru"));
    cmd.args(args)
        .args(["--metrics-port", "0"])
        .env_remove("REVERB_APP_ID")
        .env_remove("REVERB_APP_KEY")
        .env_remove("REVERB_APP_SECRET")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The first line the daemon prints on stdout (`ready <addr>` when it started).
fn first_stdout_line(child: &mut std::process::Child) -> String {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    line
}

#[test]
fn port_zero_resolves_one_port_for_every_shard_and_prints_ready_once() {
    let d = Daemon::start(2);
    assert_ne!(d.addr.port(), 0);
    // Both shards listen on the reported port: 32 connections land on both.
    let clients: Vec<Client> = (0..32).map(|_| d.client()).collect();
    let shards: std::collections::HashSet<u64> = clients
        .iter()
        .map(|c| {
            (c.socket_id
                .split_once('.')
                .unwrap()
                .1
                .parse::<u64>()
                .unwrap()
                - 1)
                % 2
        })
        .collect();
    assert_eq!(shards.len(), 2);
}

#[test]
fn port_in_use_fails_with_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, stdout, stderr) = refuse(&["--host", "127.0.0.1", "--port", &port], &[]);
    assert_ne!(code, 0);
    assert!(stdout.is_empty(), "{stdout}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("bts-guru:"))
        .unwrap_or_default();
    assert!(
        line.contains("cannot listen on 127.0.0.1:") && line.contains("in use"),
        "{stderr}"
    );
}

#[test]
fn unreadable_config_and_missing_secret_fail_clearly() {
    let (code, _, stderr) = refuse(&["--config", "/nonexistent/bts.toml"], &[]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("cannot read config file /nonexistent/bts.toml"),
        "{stderr}"
    );
    let (code, _, stderr) = refuse(
        &["--port", "0"],
        &[("REVERB_APP_ID", "1"), ("REVERB_APP_KEY", "k")],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("REVERB_APP_SECRET"), "{stderr}");
    let (code, _, stderr) = refuse(&[], &[("REVERB_SERVER_PORT", "eighty")]);
    assert_ne!(code, 0);
    assert!(stderr.contains("REVERB_SERVER_PORT"), "{stderr}");
}

#[test]
fn dev_credentials_stay_on_loopback_unless_allowed() {
    let (code, _, stderr) = refuse(&["--host", "0.0.0.0", "--port", "0"], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--allow-dev-credentials"), "{stderr}");
    // With nothing set it starts, on loopback, and prints the credentials it uses.
    let mut child = Command::new(env!("CARGO_BIN_EXE_bts-guru"))
        .args(["--port", "0", "--metrics-port", "0"])
        .env_remove("REVERB_APP_ID")
        .env_remove("REVERB_APP_KEY")
        .env_remove("REVERB_APP_SECRET")
        .env_remove("REVERB_SERVER_HOST")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_stdout_line(&mut child);
    assert!(line.starts_with("ready 127.0.0.1:"), "{line}");
    let addr = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
    let c = Client::connect(addr, "bts-guru-dev-key");
    assert!(!c.socket_id.is_empty());
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bts-guru-dev-secret"), "{stderr}");
}

/// glommio pins 3 x io_memory per executor against RLIMIT_MEMLOCK. Three shards fit in 8 MiB;
/// when a limit is too small the daemon says so, naming the limit, instead of degrading.
#[test]
fn memlock_limit_is_checked_at_start() {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        have("prlimit") && have("setpriv"),
        "prlimit and setpriv (util-linux) are needed for this test"
    );
    let bin = env!("CARGO_BIN_EXE_bts-guru");
    // As root, CAP_IPC_LOCK would exempt us from the limit: drop it so the limit applies.
    let drop_cap = if std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    {
        "setpriv --inh-caps=-ipc_lock --bounding-set=-ipc_lock"
    } else {
        ""
    };
    let run = |memlock: &str, shards: &str| {
        let script = format!(
            "exec prlimit --memlock={memlock}:{memlock} {drop_cap} {bin} --host 127.0.0.1 --port 0 --metrics-port 0 --shards {shards}"
        );
        Command::new("sh")
            .args(["-c", &script])
            .env("REVERB_APP_ID", APP_ID)
            .env("REVERB_APP_KEY", APP_KEY)
            .env("REVERB_APP_SECRET", APP_SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut fits = run("8388608", "3");
    let line = first_stdout_line(&mut fits);
    assert!(line.starts_with("ready "), "3 shards in 8 MiB: {line:?}");
    fits.kill().unwrap();
    let out = fits.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("registering buffers"), "{stderr}");

    let tight = run("524288", "8").wait_with_output().unwrap();
    assert!(!tight.status.success());
    let stderr = String::from_utf8_lossy(&tight.stderr);
    assert!(
        stderr.contains("RLIMIT_MEMLOCK is 512 KiB") && stderr.contains("--shards"),
        "{stderr}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let d = Daemon::builder().arg("--log-format").arg("json").start();
    let mut c = d.client();
    c.subscribe("sports.football");
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = d.stderr();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l.contains("\"all shards accepting\"")),
        "{log}"
    );
}
