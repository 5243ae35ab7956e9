//! The `bts-guru-bench` binary's command line and its failures before any load: `--help`, a bad
//! flag, and runs that cannot be done (bad settings, nothing listening), each answered with the
//! documented exit status and, for a run, exactly one JSON line saying why. (Runs against the
//! real daemon are the root package's tests: tests/bench_harness_smoke.rs, tests/faults.rs.)

use std::net::TcpListener;
use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bts-guru-bench"))
        .args(args)
        .env_remove("REVERB_APP_ID")
        .env_remove("REVERB_APP_KEY")
        .env_remove("REVERB_APP_SECRET")
        .output()
        .expect("run bts-guru-bench")
}

/// The one JSON line of a run, parsed; panics with the output when there is not exactly one.
fn json_line(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(
        lines.len(),
        1,
        "one JSON line expected\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(lines[0]).expect("the JSON line parses")
}

#[test]
fn help_names_every_scenario_and_the_exit_statuses() {
    let out = bench(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for s in [
        "fanout",
        "idle",
        "churn",
        "presence",
        "max",
        "soak",
        "reconnect",
    ] {
        assert!(text.contains(s), "{s} missing from --help:\n{text}");
    }
    assert!(text.contains("3 the hard timeout fired"), "{text}");
    let out = bench(&["soak", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--churn-rate"));
}

#[test]
fn an_unknown_flag_is_a_usage_error() {
    let out = bench(&["fanout", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_settings_fail_the_setup_with_one_json_line() {
    let out = bench(&["--threads", "0", "idle", "-c", "1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v = json_line(&out);
    assert_eq!(v["ok"], false);
    assert_eq!(v["scenario"], "idle");
    assert_eq!(v["exit"], 2);
    assert_eq!(v["tool"], "bts-guru-bench");
    assert!(v["error"].as_str().unwrap().contains("--threads"), "{v}");

    // The soak checks the server's RSS and open files, so it needs the server's pid.
    let out = bench(&["soak", "--duration", "2", "--warmup", "1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v = json_line(&out);
    assert!(v["error"].as_str().unwrap().contains("--server-pid"), "{v}");
}

#[test]
fn a_server_that_is_not_there_fails_the_setup_naming_the_address() {
    // A loopback port that nothing listens on (bound, then released).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let out = bench(&["--port", &port, "--timeout-s", "30", "fanout", "-c", "1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v = json_line(&out);
    assert_eq!(v["scenario"], "fanout");
    let err = v["error"].as_str().unwrap();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
}
