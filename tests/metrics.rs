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
    // One per shard holding a subscriber: SO_REUSEPORT may put all five on one shard. The
    // socket id's second part names the shard (`n * shards + shard + 1`).
    let shards_holding: std::collections::HashSet<u64> = clients
        .iter()
        .map(|c| {
            (c.socket_id
                .split('.')
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
                - 1)
                % 2
        })
        .collect();
    assert_eq!(
        value(&m, r#"bts_channels{type="public"}"#),
        shards_holding.len() as f64,
        "one per shard holding a subscriber"
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

/// A request head with no end: the listener answers 431 after 8 KiB and closes, so the bytes
/// stop at the socket buffers instead of growing the daemon (before: a 300 MB line grew RSS by
/// 307 MB), and a scrape meanwhile is answered.
#[test]
fn a_header_line_without_newline_is_cut_off_at_8_kib_and_memory_stays_flat() {
    use std::io::{Read, Write};
    let port = free_port();
    let d = Daemon::builder().metrics_port(port).start();
    scrape(port);
    let before = d.rss_kib();
    let mut hostile = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    hostile
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    hostile
        .write_all(b"GET /metrics HTTP/1.1\r\nX-Long: ")
        .unwrap();
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = 0usize;
    let limit = 64 << 20;
    while sent < limit {
        match hostile.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
        if sent == 4 << 20 {
            // Another scraper is served while this one streams.
            assert!(scrape(port).contains("bts_connects_total"));
        }
    }
    assert!(
        sent < limit,
        "the listener took all {sent} bytes of one header line"
    );
    // The answer, if it arrived before the reset: 431.
    let mut resp = Vec::new();
    let _ = hostile.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp);
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 431"),
        "{resp}"
    );
    let grown = d.rss_kib().saturating_sub(before);
    assert!(grown < 8 << 10, "RSS grew {grown} KiB after {sent} bytes");
    assert!(scrape(port).contains("bts_connects_total"));

    // A head over 8 KiB that does end is refused with 431 too.
    let mut big = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!(
        "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    let _ = big.write_all(head.as_bytes());
    let mut resp = String::new();
    let _ = big.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
}

/// Slow scrapers (each trickling its head a byte at a time, reopened as soon as they are cut
/// off, more of them than the listener serves at once) delay no real scrape: the listener
/// serves connections concurrently and drops the one that has waited longest for its head.
#[test]
fn slowloris_scrapers_do_not_block_a_real_scrape() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let port = free_port();
    let _d = Daemon::builder().metrics_port(port).start();
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = |stop: Arc<AtomicBool>| {
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
                while !stop.load(Ordering::Relaxed) && s.write_all(b"X").is_ok() {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
    };
    let slow: Vec<_> = (0..40).map(|_| trickle(Arc::clone(&stop))).collect();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let m = scrape(port);
        assert!(m.contains("bts_connects_total"), "{m}");
        // Well under the 5 s head deadline: nobody waited for a slow one to time out.
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "scrape took {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    for t in slow {
        t.join().unwrap();
    }
    // One slow head on its own gets 408 once its 5 s are up.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
}

/// A drain closes the metrics listener at once, like the WebSocket port's, so a new process
/// started beside this one answers the scrapes.
#[test]
fn the_metrics_listener_closes_when_a_drain_starts() {
    let port = free_port();
    let mut d = Daemon::builder()
        .metrics_port(port)
        .arg("--drain-secs")
        .arg("30")
        .start();
    let mut c = d.client();
    c.subscribe("sports.football");
    scrape(port);
    d.signal("TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "metrics port still accepting 5 s into the drain"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        d.wait_exit(Duration::from_millis(10)),
        None,
        "still draining"
    );
}
