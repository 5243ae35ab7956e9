//! Hostile clients (issue 13 §1 and §6): a client that floods messages which each earn a reply
//! and never reads them cannot grow the daemon's memory past its connection's outbound bound (it
//! is closed with 4100 instead); pings beyond the app's rate close the connection with 4301, and
//! a closed connection that keeps sending is dropped after 1 MiB; a client event never becomes a
//! cache channel's cached event; `#` names other than `#server-to-user-<id>` are refused. Every
//! flood test keeps another subscriber receiving throughout.

mod common;
#[path = "common/flood.rs"]
mod flood;

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flood::Kind;
use serde_json::json;
use tungstenite::Message;

const T: Duration = Duration::from_secs(10);
/// `max_outbound_bytes` in the flood tests: small, so the bound is obvious against the slack.
const BOUND: u64 = 64 * 1024;
/// Allowance over the bound for everything else a daemon's RSS does meanwhile (allocator caches,
/// the healthy subscriber, the publisher's requests). Without the defence, each flood grows RSS
/// by well over 50 MiB before it ends.
const SLACK_KIB: u64 = 16 * 1024;

/// Publishes `seq` 0, 1, ... on `channel` every 50 ms until `stop`; a reader thread checks that the
/// healthy client gets every one, in order, each within 5 s. Returns (publisher, reader).
fn keep_publishing(
    d: &Daemon,
    mut healthy: Client,
    channel: &'static str,
    stop: Arc<AtomicBool>,
) -> (
    std::thread::JoinHandle<u64>,
    std::thread::JoinHandle<Result<u64, String>>,
) {
    let api = d.api();
    let stop2 = Arc::clone(&stop);
    let publisher = std::thread::spawn(move || {
        let mut seq = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let data = json!({ "seq": seq }).to_string();
            let (s, body) = api.trigger(&[channel], "tick", &data);
            assert_eq!(s, 200, "{body}");
            seq += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        seq
    });
    let reader = std::thread::spawn(move || {
        let mut next = 0u64;
        loop {
            match healthy.next(Duration::from_secs(5)) {
                Got::Event(v) if v["event"] == "tick" => {
                    let data: serde_json::Value =
                        serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
                    if data["seq"] != next {
                        return Err(format!("expected seq {next}, got {v}"));
                    }
                    next += 1;
                }
                Got::Event(v) => return Err(format!("unexpected {v}")),
                Got::Closed(c) => return Err(format!("healthy client closed with {c:?}")),
                // Silence is only fine once the publisher has stopped.
                Got::Timeout if stop.load(Ordering::Relaxed) => return Ok(next),
                Got::Timeout => return Err(format!("no event for 5 s after seq {next}")),
            }
        }
    });
    (publisher, reader)
}

/// One flood of `kind` from a client that never reads, against a daemon whose connections may
/// queue `BOUND` bytes: RSS stays within the bound plus slack, the flooder is closed with 4100,
/// and a healthy subscriber receives every event meanwhile.
fn flood_is_bounded_and_closed_4100(kind: Kind, env: &[(&str, &str)]) {
    let metrics_port = free_port();
    let mut b = Daemon::builder()
        .metrics_port(metrics_port)
        // Pings and subscribes are allowed at any rate here: this test is about the outbound
        // bound (tests/hostile_channels.rs covers the subscription rate).
        .server_toml(&format!(
            "max_outbound_bytes = {BOUND}\n[[apps]]\nid = \"{APP_ID}\"\nkey = \"{APP_KEY}\"\n\
             secret = \"{APP_SECRET}\"\nsubscription_changes_per_second = 1000000000\n\
             subscription_changes_burst = 1000000000"
        ))
        .env("BTS_APP_MAX_PINGS_PER_SECOND", "1000000000");
    for (k, v) in env {
        b = b.env(k, *v);
    }
    let d = b.start();
    let mut healthy = d.client();
    healthy.subscribe("sports.football");
    let stop = Arc::new(AtomicBool::new(false));
    let (publisher, reader) = keep_publishing(&d, healthy, "sports.football", Arc::clone(&stop));

    std::thread::sleep(Duration::from_millis(300));
    let before = d.rss_kib();
    let peak = flood::RssPeak::start(d.pid());
    let mut attacker = flood::connect(d.addr, APP_KEY);
    // 48 MB is ~370,000 messages: without the bound, far more replies than the slack holds. And
    // more than the kernel buffers between the two, so the flood stalls once the daemon stops
    // reading the closing connection.
    let cap = (48 << 20).max(flood::kernel_buffers() + (16 << 20));
    let out = flood::flood(&mut attacker, kind, cap, Duration::from_secs(6));
    let peak = peak.finish();
    eprintln!("{kind:?} flood: {out:?}; RSS {before} KiB before, peak {peak} KiB");
    assert!(
        peak < before + BOUND / 1024 + SLACK_KIB,
        "{kind:?} flood ({out:?}) grew RSS from {before} KiB to {peak} KiB"
    );

    // Once closing with its socket full, the daemon stops reading it: the flood stalls instead
    // of keeping the shard busy decoding input it would discard.
    assert!(out.stalled, "{kind:?} flood never stalled: {out:?}");
    // Closed as a slow consumer: counted at once, and the connection ends within the 5 s close
    // grace (its client never reads the close frame).
    let deadline = Instant::now() + T;
    loop {
        let m = scrape_metrics(metrics_port);
        if metric(&m, r#"bts_disconnects_total{code="4100"}"#) == 1.0 {
            assert_eq!(metric(&m, "bts_slow_consumer_closes_total"), 1.0, "{m}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flooder ({out:?}) not closed with 4100:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its socket is over: reading it ends (EOF or reset) instead of waiting.
    attacker
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match attacker.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "flooder's socket still open: {e}"
                );
                break;
            }
        }
    }

    stop.store(true, Ordering::Relaxed);
    let published = publisher.join().expect("publisher");
    let received = reader.join().expect("reader");
    assert_eq!(received, Ok(published), "healthy subscriber");
    assert!(published >= 20, "only {published} events published");
}

#[test]
fn pong_flood_from_a_client_that_never_reads_is_bounded_and_closed_4100() {
    flood_is_bounded_and_closed_4100(Kind::Ping, &[]);
}

#[test]
fn pusher_ping_flood_from_a_client_that_never_reads_is_bounded_and_closed_4100() {
    flood_is_bounded_and_closed_4100(Kind::PusherPing, &[]);
}

#[test]
fn refused_subscribe_flood_from_a_client_that_never_reads_is_bounded_and_closed_4100() {
    flood_is_bounded_and_closed_4100(Kind::Subscribe, &[]);
}

#[test]
fn rate_limited_flood_from_a_client_that_never_reads_is_bounded_and_closed_4100() {
    // Every message past the first is refused with a 4301 pusher:error, which is queued too.
    flood_is_bounded_and_closed_4100(
        Kind::Subscribe,
        &[
            ("REVERB_APP_RATE_LIMITING_ENABLED", "true"),
            ("REVERB_APP_RATE_LIMITING_MAX_ATTEMPTS", "1"),
        ],
    );
}

/// Reads until the server closes: (pongs of either kind seen, pusher:error code, close code).
fn pongs_until_close(c: &mut Client) -> (usize, Option<u64>, Option<u16>) {
    c.set_timeout(Duration::from_millis(500));
    let deadline = Instant::now() + T;
    let (mut pongs, mut err) = (0, None);
    loop {
        assert!(Instant::now() < deadline, "server did not close");
        match c.ws.read() {
            Ok(Message::Pong(_)) => pongs += 1,
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                match v["event"].as_str() {
                    Some("pusher:pong") => pongs += 1,
                    Some("pusher:error") => err = v["data"]["code"].as_u64(),
                    _ => panic!("unexpected {v}"),
                }
            }
            Ok(Message::Close(f)) => return (pongs, err, f.map(|f| u16::from(f.code))),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read failed before a close frame: {e}"),
        }
    }
}

#[test]
fn pings_beyond_the_rate_close_4301_while_a_client_pinging_sanely_stays() {
    // The default: 10 pings per second per connection.
    let d = Daemon::start(1);
    let mut polite = d.client();
    polite.subscribe("sports.football");
    let mut control = d.client();
    let mut text = d.client();
    // 30 WebSocket pings at once: 10 answered, then pusher:error 4301 and close 4301.
    for _ in 0..30 {
        control
            .ws
            .write(Message::Ping(vec![1u8; 8].into()))
            .unwrap();
    }
    control.ws.flush().unwrap();
    let (pongs, err, close) = pongs_until_close(&mut control);
    assert_eq!((err, close), (Some(4301), Some(4301)));
    assert!(pongs <= 10, "{pongs} pongs");
    // `pusher:ping` counts the same way.
    for _ in 0..30 {
        text.ws
            .write(Message::text(r#"{"event":"pusher:ping","data":{}}"#))
            .unwrap();
    }
    text.ws.flush().unwrap();
    let (pongs, err, close) = pongs_until_close(&mut text);
    assert_eq!((err, close), (Some(4301), Some(4301)));
    assert!(pongs <= 10, "{pongs} pongs");
    // A client pinging 4 times a second (both kinds) gets every answer and keeps receiving.
    polite.set_timeout(T);
    for i in 0..8 {
        if i % 2 == 0 {
            polite.ws.send(Message::Ping(vec![i as u8].into())).unwrap();
            loop {
                match polite.ws.read().unwrap() {
                    Message::Pong(p) => {
                        assert_eq!(&p[..], &[i as u8]);
                        break;
                    }
                    Message::Text(t) => panic!("unexpected {t}"),
                    _ => {}
                }
            }
        } else {
            polite.send_json(json!({"event":"pusher:ping","data":{}}));
            polite.expect_event("pusher:pong");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(d.api().trigger(&["sports.football"], "e", "{}").0, 200);
    assert_eq!(polite.next_event(T)["event"], "e");
}

#[test]
fn ping_flood_from_a_client_that_never_reads_is_closed_4301_and_dropped() {
    // The default ping rate (10 per second): the flood is closed with 4301 at its 11th ping. The
    // daemon then reads at most 1 MiB more from it before dropping it, instead of decoding and
    // discarding it at full speed for the 5 s close grace.
    let metrics_port = free_port();
    let d = Daemon::builder().metrics_port(metrics_port).start();
    let mut healthy = d.client();
    healthy.subscribe("sports.football");
    let stop = Arc::new(AtomicBool::new(false));
    let (publisher, reader) = keep_publishing(&d, healthy, "sports.football", Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(300));
    let before = d.rss_kib();
    let mut attacker = flood::connect(d.addr, APP_KEY);
    let buffers = flood::kernel_buffers();
    let out = flood::flood(
        &mut attacker,
        Kind::Ping,
        buffers + (64 << 20),
        Duration::from_secs(8),
    );
    let after = d.rss_kib();
    eprintln!("4301 ping flood: {out:?}; RSS {before} KiB before, {after} KiB after");
    assert!(out.closed.is_some(), "flooder never dropped: {out:?}");
    // What it got in: 1 MiB after the close, plus what the kernel buffers held when it was dropped.
    assert!(
        out.sent < buffers + (4 << 20),
        "the daemon took {out:?} (kernel buffers {buffers})"
    );
    let deadline = Instant::now() + T;
    while metric(
        &scrape_metrics(metrics_port),
        r#"bts_disconnects_total{code="4301"}"#,
    ) != 1.0
    {
        assert!(Instant::now() < deadline, "no 4301 disconnect counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let published = publisher.join().expect("publisher");
    assert_eq!(
        reader.join().expect("reader"),
        Ok(published),
        "healthy subscriber"
    );
    assert!(
        after < before + SLACK_KIB,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

#[test]
fn client_events_never_replace_a_cache_channels_cached_event() {
    let d = Daemon::start(1);
    let ch = "private-cache-match.7";
    let mut a = d.client();
    let mut b = d.client();
    a.subscribe_private(ch);
    b.subscribe_private(ch);
    let _ = a.expect_event("pusher:cache_miss");
    let _ = b.expect_event("pusher:cache_miss");
    // The server's event is cached, then a member's client event goes to the others only.
    assert_eq!(d.api().trigger(&[ch], "score", r#"{"s":"1-0"}"#).0, 200);
    assert_eq!(a.next_event(T)["data"], r#"{"s":"1-0"}"#);
    assert_eq!(b.next_event(T)["data"], r#"{"s":"1-0"}"#);
    a.send_json(json!({"event":"client-fake","channel":ch,"data":{"s":"9-9"}}));
    assert_eq!(b.next_event(T)["event"], "client-fake");
    // A late subscriber gets the server's event, not the client's.
    let mut late = d.client();
    late.subscribe_private(ch);
    let ev = late.next_event(T);
    assert_eq!(
        (ev["event"].as_str(), ev["data"].as_str()),
        (Some("score"), Some(r#"{"s":"1-0"}"#))
    );
    let (s, info) = d.api().get(&format!("channels/{ch}"), &[("info", "cache")]);
    assert_eq!(s, 200);
    assert_eq!(info["cache"]["event"], "score", "{info}");
    // On a cache channel the server never published to, a client event leaves a cache miss.
    let empty = "presence-cache-lobby";
    a.join(empty, "u1", json!({}));
    b.join(empty, "u2", json!({}));
    let _ = a.expect_event("pusher:cache_miss");
    let _ = a.expect_event("pusher_internal:member_added");
    let _ = b.expect_event("pusher:cache_miss");
    a.send_json(json!({"event":"client-fake","channel":empty,"data":{}}));
    assert_eq!(b.next_event(T)["event"], "client-fake");
    let mut late = d.client();
    late.join(empty, "u3", json!({}));
    assert_eq!(late.next_event(T)["event"], "pusher:cache_miss");
}

#[test]
fn hash_channels_other_than_server_to_user_are_refused() {
    let d = Daemon::start(1);
    let mut c = d.client();
    for name in ["#foo", "#server-to-user-", "#private-x"] {
        c.send_json(json!({"event":"pusher:subscribe","data":{"channel":name}}));
        let ev = c.expect_event("pusher:error");
        let msg = ev["data"]["message"].as_str().unwrap();
        assert!(
            msg.contains("reserved") && msg.contains(&format!("{name:?}")),
            "{ev}"
        );
    }
    // Refused like any invalid name: the connection goes on, nothing was subscribed.
    c.subscribe("sports.football");
    let (s, body) = d.api().trigger(&["#foo"], "e", "{}");
    assert_eq!(s, 400, "{body}");
    let (s, body) = d.api().get("channels", &[]);
    assert_eq!(s, 200);
    assert_eq!(body["channels"].as_object().unwrap().len(), 1, "{body}");
    // The one `#` channel still works as before: refused until signed in as its user.
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":"#server-to-user-42"}}));
    assert_eq!(c.expect_event("pusher:error")["data"]["code"], 4009);
}

/// Measures one flood against a daemon started separately (RELIABILITY.md's "Hostile client"
/// figures): `FLOOD_ADDR` and `FLOOD_PID` name it, `FLOOD_KIND` is `ping`, `pusher-ping` or
/// `subscribe`, `FLOOD_SECS` (5) how long, `FLOOD_KEY` (`test-key`) its app key. Prints what was
/// sent, whether the daemon closed the connection, and the daemon's RSS before, at its peak, at
/// the end and 2 s after the client left.
#[test]
#[ignore = "a measurement against a running daemon; see RELIABILITY.md"]
fn measure_flood() {
    let var = |k: &str| std::env::var(k).ok();
    let (Some(addr), Some(pid), Some(kind)) = (
        var("FLOOD_ADDR").and_then(|a| a.parse().ok()),
        var("FLOOD_PID").and_then(|p| p.parse::<u32>().ok()),
        var("FLOOD_KIND").and_then(|k| Kind::parse(&k)),
    ) else {
        panic!("set FLOOD_ADDR, FLOOD_PID and FLOOD_KIND (ping|pusher-ping|subscribe)");
    };
    let secs: f64 = var("FLOOD_SECS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let key = var("FLOOD_KEY").unwrap_or_else(|| APP_KEY.to_owned());

    let before = flood::rss_kib(pid);
    let peak = flood::RssPeak::start(pid);
    let mut s = flood::connect(addr, &key);
    let out = flood::flood(&mut s, kind, u64::MAX, Duration::from_secs_f64(secs));
    let peak = peak.finish();
    let at_end = flood::rss_kib(pid);
    drop(s);
    std::thread::sleep(Duration::from_secs(2));
    let after = flood::rss_kib(pid);
    let closed = match out.closed {
        Some(t) => format!("closed by the daemon after {:.1} s", t.as_secs_f64()),
        None => "still open".to_owned(),
    };
    println!(
        "{kind:?}: sent {:.1} MB in {:.1} s, {closed}; daemon RSS {before} KiB before, peak \
         {peak} KiB (+{} KiB), {at_end} KiB at the end, {after} KiB 2 s after the client left",
        out.sent as f64 / 1e6,
        out.elapsed.as_secs_f64(),
        peak.saturating_sub(before),
    );
}
