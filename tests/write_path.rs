//! The broadcast write path: the send ring (one io_uring submission for many connections'
//! writes) delivers every event in order to healthy subscribers while slow ones among them are
//! closed 4100, with and without the ring; and write coalescing joins a fast stream of events to
//! one connection into fewer socket writes, with nothing lost or reordered.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const CHANNEL: &str = "sports.football.matches.42";

fn slow_and_healthy_subscribers(send_ring: bool) {
    let metrics_port = free_port();
    let d = Daemon::builder()
        .metrics_port(metrics_port)
        .env("REVERB_MAX_REQUEST_SIZE", "200000")
        .env("BTS_SEND_RING", send_ring.to_string())
        .server_toml("max_outbound_bytes = 262144")
        .shards(2)
        .start();
    // 12 subscribers over 2 shards, so each burst writes several connections at once (the ring
    // takes batches of 4 or more); 4 of them never read.
    let mut slow = Vec::new();
    let mut readers = Vec::new();
    const EVENTS: usize = 2000; // ~18 MB each: far beyond socket buffers plus the 256 KiB cap
    for i in 0..12 {
        let mut c = d.client();
        c.subscribe(CHANNEL);
        if i % 3 == 0 {
            slow.push(c);
            continue;
        }
        readers.push(std::thread::spawn(move || {
            for seq in 0..EVENTS {
                let ev = c.next_event(Duration::from_secs(30));
                let data: serde_json::Value =
                    serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
                assert_eq!(data["seq"], seq, "healthy subscriber saw a gap or reorder");
            }
            c.expect_silence(Duration::from_millis(200));
        }));
    }
    let pad = "p".repeat(9_000);
    for batch in 0..EVENTS / 10 {
        let events: Vec<_> = (0..10)
            .map(|j| {
                json!({"name":"match.update","channel":CHANNEL,
                       "data":json!({"seq":batch * 10 + j,"pad":pad}).to_string()})
            })
            .collect();
        let (s, _) = d
            .api()
            .post("batch_events", &json!({ "batch": events }).to_string());
        assert_eq!(s, 200);
    }
    for r in readers {
        r.join().expect("a healthy subscriber");
    }
    let m = scrape_metrics(metrics_port);
    assert_eq!(metric(&m, "bts_slow_consumer_closes_total"), 4.0, "{m}");
    let (frames, writes) = (
        metric(&m, "bts_frames_out_total"),
        metric(&m, "bts_socket_writes_total"),
    );
    assert!(writes > 0.0 && frames >= 8.0 * EVENTS as f64, "{m}");
    for mut c in slow {
        // None: the 5 s close grace ran out first and the daemon dropped the socket.
        if let Some(code) = c.next_close_or_reset(Duration::from_secs(10)) {
            assert_eq!(code, 4100);
        }
    }
}

#[test]
fn send_ring_serves_healthy_subscribers_and_closes_slow_ones_4100() {
    slow_and_healthy_subscribers(true);
}

#[test]
fn without_the_send_ring_the_same_holds() {
    slow_and_healthy_subscribers(false);
}

/// Publishes one event and waits for it, then `burst` more one request at a time, and returns
/// the socket writes the burst took (from the metrics) after checking every event arrived once,
/// in order.
fn writes_for_a_stream(coalesce_ms: u32, burst: usize) -> f64 {
    let metrics_port = free_port();
    let d = Daemon::builder()
        .metrics_port(metrics_port)
        .env("BTS_WRITE_COALESCE_MS", coalesce_ms.to_string())
        .shards(1)
        .start();
    let mut c = d.client();
    c.subscribe(CHANNEL);
    let api = d.api();
    let publish = |seq: usize| {
        let (s, _) = api.trigger(
            &[CHANNEL],
            "match.update",
            &json!({ "seq": seq }).to_string(),
        );
        assert_eq!(s, 200);
    };
    publish(0);
    assert_eq!(c.expect_event("match.update")["channel"], CHANNEL);
    let before = metric(&scrape_metrics(metrics_port), "bts_socket_writes_total");
    // Each request is answered before the next is sent, so the events reach the shard one by
    // one: without coalescing each is its own write.
    for seq in 1..=burst {
        publish(seq);
    }
    for seq in 1..=burst {
        let ev = c.next_event(Duration::from_secs(5));
        let data: serde_json::Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["seq"], seq, "gap, duplicate or reorder");
    }
    c.expect_silence(Duration::from_millis(300));
    let after = metric(&scrape_metrics(metrics_port), "bts_socket_writes_total");
    after - before
}

#[test]
fn write_coalescing_joins_a_fast_stream_into_fewer_writes() {
    // A window far longer than publishing 10 events takes: the first event after the one just
    // written waits for the window's end, and the others join it.
    let coalesced = writes_for_a_stream(1000, 10);
    assert!(
        coalesced <= 2.0,
        "{coalesced} writes for 10 events with a 1 s window"
    );
    // Off, the same stream takes a write per event.
    let plain = writes_for_a_stream(0, 10);
    assert!(
        plain >= 8.0,
        "{plain} writes for 10 events without coalescing"
    );
}
