//! The server pings silent clients and drops those that never answer (4201); a subscriber that
//! stops reading is closed (4100) instead of growing memory, and everyone else keeps receiving;
//! shards never sleep with events queued.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn idle_connection_is_pinged_then_closed_4201_while_a_ponging_one_stays() {
    let d = Daemon::builder()
        .env("REVERB_APP_ACTIVITY_TIMEOUT", "1")
        .server_toml("pong_timeout_secs = 1")
        .start();
    let mut silent = d.client();
    let mut polite = d.client();
    // The polite client answers every ping on its own thread, from the start.
    let polite = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut pings = 0;
        while Instant::now() < deadline {
            match polite.next(Duration::from_millis(100)) {
                Got::Event(v) if v["event"] == "pusher:ping" => {
                    pings += 1;
                    polite.send_json(json!({"event":"pusher:pong","data":{}}))
                }
                Got::Event(v) => panic!("unexpected {v}"),
                Got::Closed(c) => panic!("polite client closed with {c:?}"),
                Got::Timeout => {}
            }
        }
        polite.send_json(json!({"event":"pusher:ping","data":{}}));
        assert_eq!(
            polite.next_event(Duration::from_secs(2))["event"],
            "pusher:pong"
        );
        pings
    });
    let started = Instant::now();
    // The silent one is pinged after ~1 s of silence, then closed ~1 s later with 4201.
    let ping = silent.next_event(Duration::from_secs(4));
    assert_eq!(ping["event"], "pusher:ping");
    let (close, err) = silent.expect_close(Duration::from_secs(4));
    assert_eq!((close, err), (Some(4201), Some(4201)));
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let pings = polite.join().expect("polite client");
    assert!(pings >= 2, "polite client was pinged {pings} times in 5 s");
}

#[test]
fn subscriber_that_never_reads_is_closed_4100_and_memory_stays_bounded() {
    let metrics_port = free_port();
    let d = Daemon::builder()
        .metrics_port(metrics_port)
        .env("REVERB_MAX_REQUEST_SIZE", "200000")
        .server_toml("max_outbound_bytes = 262144")
        .shards(2)
        .start();
    let mut slow = d.client();
    slow.subscribe("sports.football");
    // A healthy subscriber drains on its own thread and must see every event in order.
    let mut healthy = d.client();
    healthy.subscribe("sports.football");
    const EVENTS: usize = 3000; // 3000 x ~9 KB = ~27 MB: far beyond socket buffers plus the cap
    let received = Arc::new(AtomicUsize::new(0));
    let r2 = Arc::clone(&received);
    let reader = std::thread::spawn(move || {
        for i in 0..EVENTS {
            let ev = healthy.next_event(Duration::from_secs(20));
            let data: serde_json::Value =
                serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
            assert_eq!(data["seq"], i, "healthy subscriber saw a gap or reorder");
            r2.fetch_add(1, Ordering::Relaxed);
        }
    });
    let rss_before = d.rss_kib();
    let pad = "p".repeat(9_000);
    for batch in 0..EVENTS / 10 {
        let events: Vec<_> = (0..10)
            .map(|j| {
                let seq = batch * 10 + j;
                json!({"name":"match.update","channel":"sports.football","data":json!({"seq":seq,"pad":pad}).to_string()})
            })
            .collect();
        let (s, _) = d
            .api()
            .post("batch_events", &json!({ "batch": events }).to_string());
        assert_eq!(s, 200);
    }
    reader.join().expect("healthy subscriber");
    assert_eq!(received.load(Ordering::Relaxed), EVENTS);
    let rss_after = d.rss_kib();
    // 27 MB went through; the slow subscriber may hold at most 256 KiB of it in the daemon.
    assert!(
        rss_after < rss_before + 24 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // The daemon closed it as a slow consumer, with 4100 (its own account of it).
    let m = scrape_metrics(metrics_port);
    assert_eq!(metric(&m, "bts_slow_consumer_closes_total"), 1.0, "{m}");
    // When the slow client finally reads, it finds the 4100 close after whatever was in flight,
    // unless it waited past the 5 s grace for a peer that reads nothing, after which the daemon
    // drops the socket (a reset).
    match slow.next_close_or_reset(Duration::from_secs(10)) {
        Some(code) => assert_eq!(code, 4100),
        None => assert!(
            metric(
                &scrape_metrics(metrics_port),
                r#"bts_disconnects_total{code="4100"}"#
            ) == 1.0
        ),
    }
}

#[test]
fn shards_never_sleep_with_events_queued_under_load() {
    let d = Daemon::builder()
        .env("REVERB_MAX_REQUEST_SIZE", "100000")
        .shards(2)
        .start();
    const CLIENTS: usize = 40;
    const PUBLISHERS: usize = 4;
    const BATCHES: usize = 100; // per publisher, 10 events each: 4000 events
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| d.client()).collect();
    for c in &mut clients {
        c.subscribe("sports.football.leagues.premier-league");
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                // Per publisher, sequence numbers must arrive in order, each exactly once.
                let mut next = [0usize; PUBLISHERS];
                for _ in 0..PUBLISHERS * BATCHES * 10 {
                    let ev = c.next_event(Duration::from_secs(20));
                    let data: serde_json::Value =
                        serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
                    let p = data["p"].as_u64().unwrap() as usize;
                    assert_eq!(data["seq"].as_u64().unwrap() as usize, next[p]);
                    next[p] += 1;
                }
                c.expect_silence(Duration::from_millis(200));
            })
        })
        .collect();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let api = d.api();
            std::thread::spawn(move || {
                for b in 0..BATCHES {
                    let batch: Vec<_> = (0..10)
                        .map(|j| json!({"name":"match.update","channel":"sports.football.leagues.premier-league","data":json!({"p":p,"seq":b*10+j}).to_string()}))
                        .collect();
                    assert_eq!(api.post("batch_events", &json!({ "batch": batch }).to_string()).0, 200);
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    for r in readers {
        r.join()
            .expect("a subscriber missed, duplicated or reordered an event");
    }
}
