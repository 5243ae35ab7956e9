//! A shard inbox filling under a burst: the overflow is refused at once (503 to the publisher),
//! counted, and nothing else is disturbed.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn a_full_shard_inbox_drops_counts_and_recovers() {
    let metrics_port = free_port();
    let d = Daemon::builder()
        .metrics_port(metrics_port)
        .server_toml("inbox_capacity = 16")
        .shards(2)
        .start();
    let mut c = d.client();
    c.subscribe("sports.football");
    // One event to 100 channels is 100 commands per shard at once: far over 16.
    let chans: Vec<String> = (0..99).map(|i| format!("sports.c{i}")).collect();
    let mut all: Vec<&str> = chans.iter().map(String::as_str).collect();
    all.push("sports.football");
    let body = json!({"name":"burst","channels":all,"data":"{}"}).to_string();
    let (status, v) = d.api().post("events", &body);
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("overloaded"), "{v}");
    let m = scrape_metrics(metrics_port);
    let dropped: f64 = m
        .lines()
        .filter(|l| l.starts_with("bts_queue_overflows_total{queue=\"shard"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(dropped > 0.0, "{m}");
    // The subscriber is still connected, and later events arrive normally, in order.
    while let Got::Event(ev) = c.next(Duration::from_millis(300)) {
        assert_eq!(ev["event"], "burst");
    }
    for i in 0..5 {
        let data = format!("{{\"i\":{i}}}");
        assert_eq!(d.api().trigger(&["sports.football"], "after", &data).0, 200);
        assert_eq!(c.next_event(Duration::from_secs(5))["data"], data);
    }
}
