//! Prometheus metrics on their own listener, summed over shards on scrape.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn scrape(port: u16) -> String {
    scrape_metrics(port)
}

/// The value of one sample line; panics when absent.
fn value(text: &str, sample: &str) -> f64 {
    assert!(
        text.lines().any(|l| l.starts_with(&format!("{sample} "))),
        "no sample {sample} in:\n{text}"
    );
    metric(text, sample)
}

#[test]
fn metrics_count_connections_events_frames_closes_and_latency() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::builder().metrics_port(port).shards(2).start();
    let mut clients: Vec<Client> = (0..6).map(|_| d.client()).collect();
    for c in &mut clients {
        c.subscribe("sports.football");
    }
    clients[0].subscribe_private("private-x");
    for i in 0..5 {
        assert_eq!(
            d.api()
                .trigger(&["sports.football"], "e", &format!("{{\"i\":{i}}}"))
                .0,
            200
        );
    }
    for c in &mut clients {
        for _ in 0..5 {
            c.next_event(Duration::from_secs(5));
        }
    }
    assert_eq!(d.api().post("events", "{oops").0, 400);
    let c = clients.pop().unwrap();
    c.close();
    std::thread::sleep(Duration::from_millis(300));
    let m = scrape(port);
    let open: f64 = m
        .lines()
        .filter(|l| l.starts_with("bts_connections{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(open, 5.0, "{m}");
    assert_eq!(value(&m, "bts_connects_total"), 6.0);
    assert_eq!(value(&m, r#"bts_disconnects_total{code="1000"}"#), 1.0);
    assert_eq!(value(&m, r#"bts_events_in_total{source="http"}"#), 5.0);
    assert_eq!(
        value(&m, r#"bts_channels{type="public"}"#),
        2.0,
        "one per shard"
    );
    assert_eq!(value(&m, r#"bts_subscriptions{type="public"}"#), 5.0);
    assert_eq!(value(&m, r#"bts_subscriptions{type="private"}"#), 1.0);
    assert_eq!(
        value(
            &m,
            r#"bts_http_requests_total{endpoint="events",status="200"}"#
        ),
        5.0
    );
    assert_eq!(
        value(
            &m,
            r#"bts_http_requests_total{endpoint="events",status="400"}"#
        ),
        1.0
    );
    // 6 clients x (connection_established + subscribed + 5 events) + 2 for the private channel,
    // plus the close answer: at least 6 * 7 + 2 frames.
    assert!(value(&m, "bts_frames_out_total") >= 44.0, "{m}");
    assert!(value(&m, "bts_bytes_out_total") > 1000.0);
    // Latency: each shard with subscribers recorded each of the 5 events.
    assert!(
        value(&m, "bts_delivery_latency_seconds_count") >= 5.0,
        "{m}"
    );
    assert_eq!(
        value(&m, r#"bts_delivery_latency_seconds_bucket{le="+Inf"}"#),
        value(&m, "bts_delivery_latency_seconds_count")
    );
    let _ = json!({});
}

#[test]
fn metrics_can_be_turned_off_and_default_to_loopback() {
    // Logs are written asynchronously: wait for the start-up lines.
    let log_of = |d: &Daemon| {
        for _ in 0..100 {
            let log = d.stderr();
            if log.contains("all shards accepting") {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        d.stderr()
    };
    let d = Daemon::builder().arg("--no-metrics").start();
    let log = log_of(&d);
    assert!(log.contains("all shards accepting"), "{log}");
    assert!(!log.contains("Prometheus metrics at"), "{log}");
    let d2 = Daemon::start(1);
    let log = log_of(&d2);
    assert!(
        log.lines()
            .any(|l| l.contains("Prometheus metrics at http://127.0.0.1:")),
        "{log}"
    );
}
