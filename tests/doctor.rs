//! `bts-guru doctor` reads this host and reports against a tuning profile.

use std::process::Command;

#[test]
fn doctor_reports_and_fails_on_what_would_stop_the_daemon() {
    let bin = env!("CARGO_BIN_EXE_bts-guru");
    let out = Command::new(bin)
        .args(["doctor", "--profile", "small"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for check in [
        "io_uring",
        "locked memory",
        "open files",
        "net.core.somaxconn",
    ] {
        assert!(text.contains(check), "{check} missing from:\n{text}");
    }
    // Without CAP_IPC_LOCK and with 256 KiB of locked memory, 4 shards cannot start: FAIL, exit 1.
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let drop_cap = if root {
        "setpriv --inh-caps=-ipc_lock --bounding-set=-ipc_lock"
    } else {
        ""
    };
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec prlimit --memlock=262144:262144 {drop_cap} {bin} --shards 4 doctor --profile small"
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("FAIL  locked memory")),
        "{text}"
    );
    let out = Command::new(bin)
        .args(["doctor", "--profile", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
