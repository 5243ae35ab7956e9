//! The load generator against the real daemon: a tiny fanout run through the built
//! `bts-guru-bench` binary must deliver every published event to every subscriber exactly once
//! and in order, and print exactly one parseable JSON line with the figures.

mod common;
use common::*;

#[test]
fn tiny_fanout_delivers_every_event_once_in_order() {
    let d = Daemon::start(2);
    let run = run_bench(
        &d,
        &[
            "--timeout-s",
            "30",
            "fanout",
            "--connections",
            "50",
            "--channels",
            "2",
            "--rate",
            "20",
            "--duration",
            "2",
            "--settle-ms",
            "100",
        ],
    );
    let context = || run.context(&d);
    assert_eq!(
        run.json_lines(),
        1,
        "exactly one JSON line expected; {}",
        context()
    );
    let v = &run.json;
    assert!(
        run.status.success(),
        "exit status {:?}; {}",
        run.status,
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

/// A short soak (the 30-minute run's checks on 300 connections for 20 s): churning connections
/// and subscriptions over public, private and presence channels while publishing; every
/// delivery checked, presence counts compared with the HTTP API, the server's open files back
/// to where they started.
#[test]
fn short_soak_checks_deliveries_presence_and_open_files() {
    let d = Daemon::start(2);
    let run = run_bench(
        &d,
        &[
            "--timeout-s",
            "120",
            "soak",
            "--connections",
            "300",
            "--duration",
            "20",
            "--warmup",
            "5",
            "--churn-rate",
            "30",
            "--sub-rate",
            "60",
            "--rate",
            "20",
            "--steady",
            "10",
            "--progress-s",
            "5",
            "--public-channels",
            "4",
            "--private-channels",
            "4",
            "--presence-channels",
            "4",
            "--presence-max-members",
            "40",
            // RSS of a debug build over 7.5 s windows is noisy at this size; the 30-minute run
            // holds the 2 % bound (RELIABILITY.md).
            "--max-rss-growth-pct",
            "25",
        ],
    );
    let context = || run.context(&d);
    assert_eq!(run.json_lines(), 1, "one JSON line; {}", context());
    let v = &run.json;
    assert!(run.status.success(), "{:?}; {}", run.status, context());
    assert_eq!(v["ok"], true, "{}", context());
    assert_eq!(v["scenario"], "soak");
    // It churned, on every kind of channel, and checked what it claims to have checked.
    assert!(
        v["connections"]["disconnects"].as_u64().unwrap() > 100,
        "{}",
        context()
    );
    assert!(v["subscriptions"]["unsubscribes"].as_u64().unwrap() > 50);
    assert!(v["subscriptions"]["presence_joins"].as_u64().unwrap() > 20);
    assert!(v["deliveries"]["received"].as_u64().unwrap() > 1000);
    assert!(v["deliveries"]["steady_received"].as_u64().unwrap() > 100);
    for k in ["missing", "duplicated_or_reordered", "unexpected"] {
        assert_eq!(v["deliveries"][k], 0, "{k}; {}", context());
    }
    assert_eq!(v["presence"]["api_mismatches"], serde_json::json!([]));
    assert!(v["presence"]["member_views"].as_u64().unwrap() > 0);
    let fds = &v["server"];
    assert!(
        fds["fds_after_close"].as_u64().unwrap() <= fds["fds_start"].as_u64().unwrap(),
        "{}",
        context()
    );
    assert!(fds["fds_after_warmup"].as_u64().unwrap() >= 300);
    assert_eq!(fds["connections_after_close"], 0);
}

/// The reconnect scenario against the real daemon with positioned channels: viewers dropped
/// and resumed every second while events flow, none lost or repeated, every resume recovered.
#[test]
fn tiny_reconnect_run_resumes_every_dropped_viewer() {
    let d = Daemon::builder()
        .env("BTS_APP_RESUME", "sports.*")
        .shards(2)
        .start();
    let run = run_bench(
        &d,
        &[
            "--timeout-s",
            "40",
            "reconnect",
            "--connections",
            "60",
            "--channels",
            "3",
            "--rate",
            "40",
            "--duration",
            "3",
            "--drop-fraction",
            "0.2",
            "--away-ms",
            "150",
        ],
    );
    let v = &run.json;
    assert!(
        run.status.success(),
        "exit status {:?}; {}",
        run.status,
        run.context(&d)
    );
    let r = &v["result"];
    assert_eq!(
        (r["lost"].as_u64(), r["duplicates"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    assert!(r["recovered"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(r["not_recovered"], 0, "{v}");
    assert_eq!(r["delivered"].as_u64(), Some(120 / 3 * 60), "{v}");
}
