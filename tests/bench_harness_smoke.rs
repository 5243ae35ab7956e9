//! The load generator against the real daemon: a tiny fanout run through the built
//! `bts-guru-bench` binary must deliver every published event to every subscriber exactly once
//! and in order, and print exactly one parseable JSON line with the figures.

mod common;
use common::*;

use std::process::Command;

use serde_json::Value;

#[test]
fn tiny_fanout_delivers_every_event_once_in_order() {
    let d = Daemon::start(2);
    let port = d.addr.port().to_string();
    let pid = d.pid().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_bts-guru-bench"))
        .args(["--host", "127.0.0.1", "--port", &port])
        .args([
            "--app-id",
            APP_ID,
            "--app-key",
            APP_KEY,
            "--app-secret",
            APP_SECRET,
        ])
        .args(["--server-pid", &pid, "--timeout-s", "30"])
        .args(["fanout", "--connections", "50", "--channels", "2"])
        .args(["--rate", "20", "--duration", "2", "--settle-ms", "100"])
        .env_remove("REVERB_APP_ID")
        .env_remove("REVERB_APP_KEY")
        .env_remove("REVERB_APP_SECRET")
        .output()
        .expect("run bts-guru-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = || {
        format!(
            "stdout:\n{stdout}\nstderr:\n{stderr}\ndaemon stderr:\n{}",
            d.stderr()
        )
    };
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one JSON line expected; {}",
        context()
    );
    let v: Value = serde_json::from_str(lines[0]).expect("the JSON line parses");
    assert!(
        out.status.success(),
        "exit status {:?}; {}",
        out.status,
        context()
    );
    assert_eq!(v["ok"], true, "{}", context());
    assert_eq!(v["scenario"], "fanout");

    assert_eq!(v["connect"]["ready"], 50, "{}", context());
    assert_eq!(v["connect"]["failed"], 0);
    // 20 events/s for 2 s, alternating over 2 channels of 25 subscribers each.
    assert_eq!(v["publish"]["accepted"], 40, "{}", context());
    assert_eq!(v["publish"]["errors"], 0);
    let del = &v["deliveries"];
    assert_eq!(del["expected"], 40 * 25, "{}", context());
    assert_eq!(del["received"], 40 * 25, "{}", context());
    for k in [
        "missing",
        "duplicates",
        "reordered",
        "unexpected",
        "lost_subscribers",
    ] {
        assert_eq!(del[k], 0, "{k}; {}", context());
    }
    assert_eq!(v["latency_us"]["count"], 40 * 25);
    assert!(v["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    assert!(
        v["server"]["cpu_ms_publish"].as_f64().is_some(),
        "server CPU read from /proc; {}",
        context()
    );
    assert!(v["server"]["rss_kib_connected"].as_u64().unwrap() > 0);
}
