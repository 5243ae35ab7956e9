//! Positioned channels and resume, over real sockets: positions in the shared frame, the
//! replay of exactly the missed events between `subscription_succeeded` and `bts:recovered`,
//! `recovered: false` without a partial replay when the history cannot cover the gap, plain
//! channels unchanged, and clients that drop and resume while events keep flowing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn daemon(history: usize) -> (Daemon, u16) {
    let port = free_port();
    let d = Daemon::builder()
        .env("BTS_APP_RESUME", "sports.*,scores-*")
        .env("BTS_RESUME_HISTORY_EVENTS", history.to_string())
        .metrics_port(port)
        .shards(2)
        .start();
    (d, port)
}

#[test]
fn missed_events_are_replayed_once_in_order_then_live() {
    let (d, metrics) = daemon(5);
    let api = d.api();
    let mut a = d.client();
    let mut watcher = d.client();
    let start = subscribe_at(&mut a, "sports.match-1", None);
    let (epoch, zero) = split_position(&start);
    assert_eq!((epoch.len(), zero), (16, 0));
    subscribe_at(&mut watcher, "sports.match-1", None);
    // A stock subscribe (no position) on a plain channel: today's frames, no position.
    watcher.subscribe("news");
    for i in 1..=3 {
        assert_eq!(
            api.trigger(&["sports.match-1"], "goal", &format!("g{i}")).0,
            200
        );
    }
    let mut last = String::new();
    for i in 1..=3 {
        let raw = next_text(&mut a);
        let same = next_text(&mut watcher);
        assert_eq!(raw, same, "every subscriber gets the same bytes");
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(
            (v["event"].as_str(), v["data"].as_str()),
            (Some("goal"), Some(&*format!("g{i}")))
        );
        last = v["bts_position"].as_str().unwrap().to_owned();
        assert_eq!(split_position(&last), (epoch.clone(), i));
        assert!(
            raw.ends_with(&format!(",\"bts_position\":\"{last}\"}}")),
            "{raw}"
        );
    }
    api.trigger(&["news"], "headline", "plain");
    let plain = next_text(&mut watcher);
    assert_eq!(
        plain, r#"{"event":"headline","channel":"news","data":"plain"}"#,
        "a plain channel's frame is unchanged"
    );

    // `a` drops; three events go by.
    a.close();
    for i in 4..=6 {
        api.trigger(&["sports.match-1"], "goal", &format!("g{i}"));
    }
    for _ in 4..=6 {
        next_text(&mut watcher);
    }
    let mut b = d.client();
    let head = subscribe_at(&mut b, "sports.match-1", Some(&last));
    assert_eq!(split_position(&head), (epoch.clone(), 6));
    for i in 4..=6 {
        let v = b.next_event(Duration::from_secs(5));
        assert_eq!(v["event"], "goal", "{v}");
        assert_eq!(v["data"], format!("g{i}"));
        assert_eq!(
            split_position(v["bts_position"].as_str().unwrap()),
            (epoch.clone(), i)
        );
    }
    let rec = b.expect_event("bts:recovered");
    let data: Value = serde_json::from_str(rec["data"].as_str().unwrap()).unwrap();
    assert_eq!(data, json!({"recovered": true, "missed": 3}));
    assert_eq!(rec["bts_position"], head);
    api.trigger(&["sports.match-1"], "goal", "g7");
    let live = b.next_event(Duration::from_secs(5));
    assert_eq!(
        (
            live["data"].as_str(),
            split_position(live["bts_position"].as_str().unwrap()).1
        ),
        (Some("g7"), 7)
    );
    b.expect_silence(Duration::from_millis(200));

    // Resuming at the head: nothing to replay.
    let mut c = d.client();
    let at = subscribe_at(&mut c, "sports.match-1", Some(&format!("{epoch}:7")));
    assert_eq!(split_position(&at).1, 7);
    let rec = c.expect_event("bts:recovered");
    assert_eq!(rec["data"], r#"{"recovered":true,"missed":0}"#);

    // Older than the bound (5 events kept, 7 missed): recovered false, no partial replay.
    let mut old = d.client();
    subscribe_at(&mut old, "sports.match-1", Some(&format!("{epoch}:0")));
    let rec = old.expect_event("bts:recovered");
    assert_eq!(rec["data"], r#"{"recovered":false,"missed":7}"#);
    // Another epoch (a restart, a dropped history): recovered false, missed unknown.
    let mut other = d.client();
    subscribe_at(&mut other, "sports.match-1", Some("00000000000000ff:3"));
    let rec = other.expect_event("bts:recovered");
    assert_eq!(rec["data"], r#"{"recovered":false,"missed":null}"#);
    // A position that is not one: the same.
    let mut junk = d.client();
    subscribe_at(&mut junk, "sports.match-1", Some("nonsense"));
    assert_eq!(
        junk.expect_event("bts:recovered")["data"],
        r#"{"recovered":false,"missed":null}"#
    );
    // Then live, from the current position.
    api.trigger(&["sports.match-1"], "goal", "g8");
    for cl in [&mut old, &mut other, &mut junk] {
        let v = cl.next_event(Duration::from_secs(5));
        assert_eq!(v["data"], "g8");
    }

    let text = scrape_metrics(metrics);
    assert_eq!(metric(&text, "bts_resume_replayed_events_total"), 3.0);
    assert_eq!(
        metric(&text, r#"bts_resumes_total{outcome="recovered"}"#),
        2.0
    );
    assert_eq!(
        metric(&text, r#"bts_resumes_total{outcome="not_recovered"}"#),
        3.0
    );
    assert_eq!(metric(&text, "bts_resume_events_total"), 8.0);
    assert!(metric(&text, "bts_resume_history_bytes") > 0.0);
}

/// Clients drop and resume over and over while a publisher keeps going: each ends with the
/// whole published sequence, once, in order (the real-socket variant of the history model's
/// property test). Events published while a resume is answered are held behind the replay.
#[test]
fn resumes_while_events_flow_lose_and_repeat_nothing() {
    let (d, _) = daemon(1000);
    let total = 400u64;
    let done = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let api = d.api();
        let published = Arc::clone(&published);
        std::thread::spawn(move || {
            for i in 1..=total {
                let (status, body) = api.trigger(&["scores-live"], "tick", &i.to_string());
                assert_eq!(status, 200, "{body}");
                published.store(i, Ordering::SeqCst);
                if i % 8 == 0 {
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
        })
    };
    let mut handles = vec![];
    for seed in 0..4u64 {
        let addr = d.addr;
        let done = Arc::clone(&done);
        handles.push(std::thread::spawn(move || {
            let mut rng = seed * 7919 + 17;
            let mut next_rand = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut got: Vec<u64> = vec![];
            let mut pos: Option<String> = None;
            let mut resumes = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            'outer: while Instant::now() < deadline {
                let mut c = Client::connect(addr, APP_KEY);
                let head = subscribe_at(&mut c, "scores-live", pos.as_deref());
                if pos.is_none() {
                    // First subscribe: the sequence starts after the head it names.
                    let (_, o) = split_position(&head);
                    got.extend(1..=o);
                    pos = Some(head);
                } else {
                    resumes += 1;
                }
                let take = 5 + next_rand() % 60;
                for _ in 0..take {
                    let v = match c.next(Duration::from_secs(10)) {
                        Got::Event(v) => v,
                        Got::Timeout if got.len() as u64 == total => break 'outer,
                        other => panic!("client {seed}: {other:?} after {}", got.len()),
                    };
                    match v["event"].as_str() {
                        Some("tick") => {
                            let p = v["bts_position"].as_str().unwrap().to_owned();
                            let n: u64 = v["data"].as_str().unwrap().parse().unwrap();
                            assert_eq!(split_position(&p).1, n, "offset = publish order");
                            got.push(n);
                            pos = Some(p);
                        }
                        Some("bts:recovered") => {
                            let data: Value =
                                serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
                            assert_eq!(data["recovered"], true, "client {seed}: {v}");
                        }
                        _ => panic!("unexpected {v}"),
                    }
                    if got.len() as u64 == total {
                        break 'outer;
                    }
                }
                c.close();
            }
            done.store(true, Ordering::SeqCst);
            (got, resumes)
        }));
    }
    publisher.join().unwrap();
    assert_eq!(published.load(Ordering::SeqCst), total);
    for (i, h) in handles.into_iter().enumerate() {
        let (got, resumes) = h.join().unwrap();
        let want: Vec<u64> = (1..=total).collect();
        assert_eq!(got, want, "client {i} after {resumes} resumes");
        assert!(resumes > 0, "client {i} resumed");
    }
}

/// A replay larger than half of the connection's outbound bound would only end in 4100 and the
/// same resume again: it is answered `recovered: false`; a smaller one is replayed.
#[test]
fn a_replay_larger_than_half_the_outbound_bound_is_not_recovered() {
    let d = Daemon::builder()
        .env("BTS_APP_RESUME", "sports.*")
        .env("REVERB_APP_MAX_MESSAGE_SIZE", "2000")
        .server_toml("max_outbound_bytes = 8192")
        .shards(1)
        .start();
    let api = d.api();
    let mut a = d.client();
    let start = subscribe_at(&mut a, "sports.big", None);
    a.close();
    let kb = "x".repeat(1000);
    for _ in 0..3 {
        assert_eq!(api.trigger(&["sports.big"], "e", &kb).0, 200);
    }
    // 3 KB missed: replayed.
    let mut b = d.client();
    let head = subscribe_at(&mut b, "sports.big", Some(&start));
    for _ in 0..3 {
        assert_eq!(b.next_event(Duration::from_secs(5))["data"], kb);
    }
    assert_eq!(
        b.expect_event("bts:recovered")["data"],
        r#"{"recovered":true,"missed":3}"#
    );
    b.close();
    for _ in 0..6 {
        assert_eq!(api.trigger(&["sports.big"], "e", &kb).0, 200);
    }
    // 6 KB missed, over half of 8 KiB: not replayed, and the connection stays.
    let mut c = d.client();
    subscribe_at(&mut c, "sports.big", Some(&head));
    assert_eq!(
        c.expect_event("bts:recovered")["data"],
        r#"{"recovered":false,"missed":6}"#
    );
    api.trigger(&["sports.big"], "e", "small");
    assert_eq!(c.next_event(Duration::from_secs(5))["data"], "small");
}

/// Conflation (issue 16) on a positioned channel: a slow viewer whose superseded `match.update`s
/// were dropped sees offsets with gaps, yet nothing about it looks like a loss: the history keeps
/// every offset, a resume from the viewer's last position is `recovered: true` with nothing
/// missed, and a resume from an offset the viewer never got (conflated away) replays exactly the
/// events after it.
#[test]
fn conflated_updates_do_not_look_like_a_loss_to_resume() {
    let port = free_port();
    let d = Daemon::builder()
        .env("BTS_APP_RESUME", "sports.*")
        .env("BTS_APP_CONFLATE", "match.update")
        .env("BTS_RESUME_HISTORY_EVENTS", "1000")
        .env("BTS_RESUME_MAX_REPLAY", "1000")
        .env("BTS_CONFLATION_THRESHOLD", "8192")
        .metrics_port(port)
        .shards(1)
        .start();
    const CH: &str = "sports.match-1";
    // The slow viewer: a 4 KiB receive buffer, so the kernel cannot hide the backlog.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&d.addr.into()).unwrap();
    let stream: std::net::TcpStream = sock.into();
    let url = format!(
        "ws://{}/app/{APP_KEY}?protocol=7&client=rust&version=0.1",
        d.addr
    );
    let (ws, _) = tungstenite::client::client(url.as_str(), stream).expect("ws handshake");
    let mut slow = Client::established(ws);
    let start = subscribe_at(&mut slow, CH, None);
    let (epoch, _) = split_position(&start);

    // 300 updates of ~1 KB and 10 match.events, while the viewer reads nothing.
    let api = d.api();
    let pad = "x".repeat(1000);
    let mut events = Vec::new();
    let mut published = 0u64;
    for i in 1..=300u64 {
        let data = format!("{{\"n\":{i},\"pad\":\"{pad}\"}}");
        assert_eq!(api.trigger(&[CH], "match.update", &data).0, 200);
        published += 1;
        if i % 30 == 0 {
            assert_eq!(api.trigger(&[CH], "match.event", &format!("e{i}")).0, 200);
            published += 1;
            events.push(published);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let conflated = loop {
        let n = metric(&scrape_metrics(port), "bts_frames_conflated_total");
        if n > 0.0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        conflated > 0.0,
        "nothing was conflated: the test did not build a backlog"
    );

    // The viewer now reads everything, up to the last offset.
    let mut offsets = Vec::new();
    let mut event_offsets = Vec::new();
    while offsets.last() != Some(&published) {
        let v = slow.next_event(Duration::from_secs(10));
        if v["event"] == "pusher:ping" {
            continue;
        }
        let (e, o) = split_position(v["bts_position"].as_str().expect("positioned"));
        assert_eq!(e, epoch);
        if v["event"] == "match.event" {
            event_offsets.push(o);
        }
        offsets.push(o);
    }
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "offsets increase: {offsets:?}"
    );
    assert_eq!(event_offsets, events, "every match.event arrives, in order");
    let skipped = published as usize - offsets.len();
    assert!(skipped > 0, "the viewer got every update: nothing to check");
    eprintln!(
        "published {published}, the slow viewer got {} ({skipped} conflated away), \
         bts_frames_conflated_total {conflated}",
        offsets.len()
    );

    // Resume from the viewer's last position: recovered, nothing missed.
    let last = format!("{epoch}:{published}");
    let mut again = d.client();
    subscribe_at(&mut again, CH, Some(&last));
    assert_eq!(
        again.expect_event("bts:recovered")["data"],
        r#"{"recovered":true,"missed":0}"#
    );
    // Resume from an offset the viewer never got: exactly what follows it, in order.
    let gap = (1..published)
        .find(|o| !offsets.contains(o))
        .expect("a conflated offset");
    let mut from_gap = d.client();
    subscribe_at(&mut from_gap, CH, Some(&format!("{epoch}:{gap}")));
    for want in gap + 1..=published {
        let v = from_gap.next_event(Duration::from_secs(10));
        assert_eq!(
            split_position(v["bts_position"].as_str().unwrap()),
            (epoch.clone(), want),
            "{v}"
        );
    }
    let rec = from_gap.expect_event("bts:recovered");
    let data: Value = serde_json::from_str(rec["data"].as_str().unwrap()).unwrap();
    assert_eq!(data, json!({"recovered": true, "missed": published - gap}));
}
