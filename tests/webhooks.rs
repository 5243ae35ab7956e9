//! Pusher-compatible webhooks: signed, held back 3 s for vacated/member_removed (and dropped when
//! the channel or user comes back), retried on failure.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A webhook endpoint that records what it gets; answers 500 to the first `fail_first` requests.
struct Endpoint {
    url: String,
    got: Arc<Mutex<Vec<(String, String, Value)>>>,
}

impl Endpoint {
    fn start(fail_first: usize) -> Endpoint {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks", l.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        std::thread::spawn(move || {
            let mut n = 0;
            for s in l.incoming().flatten() {
                let mut r = BufReader::new(&s);
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let (mut len, mut key, mut sig) = (0usize, String::new(), String::new());
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "x-pusher-key" => key = v.trim().to_owned(),
                        "x-pusher-signature" => sig = v.trim().to_owned(),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                n += 1;
                let status = if n <= fail_first {
                    "500 Oops"
                } else {
                    "200 OK"
                };
                let mut w = &s;
                let _ = write!(
                    w,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                if n > fail_first {
                    let body = String::from_utf8(body).unwrap();
                    assert_eq!(
                        sig,
                        hmac_hex(APP_SECRET, &body),
                        "signature over the raw body"
                    );
                    g.lock()
                        .unwrap()
                        .push((key, sig, serde_json::from_str(&body).unwrap()));
                }
            }
        });
        Endpoint { url, got }
    }

    /// Event names received so far, in order.
    fn names(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, _, b)| b["events"].as_array().unwrap().clone())
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn events(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, _, b)| b["events"].as_array().unwrap().clone())
            .collect()
    }

    fn wait_for(&self, n: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        while self.names().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.names()
    }
}

#[test]
fn occupied_vacated_members_client_events_and_cache_miss() {
    let ep = Endpoint::start(0);
    let d = Daemon::builder()
        .env("BTS_APP_WEBHOOK_URLS", &ep.url)
        .shards(2)
        .start();
    let mut a = d.client();
    a.subscribe("sports.football");
    assert_eq!(
        ep.wait_for(2, Duration::from_secs(3)),
        vec!["channel_occupied", "subscription_count"]
    );
    let key_seen = ep.got.lock().unwrap()[0].0.clone();
    assert_eq!(key_seen, APP_KEY);
    // Unsubscribe and come back within 3 s: no vacated, no second occupied.
    a.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"sports.football"}}));
    std::thread::sleep(Duration::from_millis(300));
    a.subscribe("sports.football");
    std::thread::sleep(Duration::from_millis(3500));
    let names = ep.names();
    assert_eq!(
        names.iter().filter(|n| *n == "channel_occupied").count(),
        1,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| *n == "channel_vacated").count(),
        0,
        "{names:?}"
    );
    // Leave for good: vacated about 3 s later.
    let left = Instant::now();
    a.close();
    let deadline = Instant::now() + Duration::from_secs(6);
    while !ep.names().contains(&"channel_vacated".to_owned()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = left.elapsed();
    assert!(ep.names().contains(&"channel_vacated".to_owned()));
    assert!(
        after >= Duration::from_millis(2900),
        "vacated after {after:?}"
    );

    // Presence members, client events, cache miss.
    let mut p1 = d.client();
    let mut p2 = d.client();
    p1.join("presence-m", "1", json!(null));
    p2.join("presence-m", "2", json!(null));
    p1.expect_event("pusher_internal:member_added");
    p2.send_json(json!({"event":"client-cheer","channel":"presence-m","data":{"n":1}}));
    // p1 is a member too, so the client event reaches it before it subscribes again.
    let cheer = p1.expect_event("client-cheer");
    assert_eq!(cheer["user_id"], "2");
    p1.subscribe("cache-score");
    std::thread::sleep(Duration::from_millis(500));
    let evs = ep.events();
    let find = |name: &str| {
        evs.iter()
            .filter(|e| e["name"] == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let added: Vec<String> = find("member_added")
        .iter()
        .map(|e| e["user_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(added, vec!["1", "2"]);
    let ce = &find("client_event")[0];
    assert_eq!(ce["event"], "client-cheer");
    assert_eq!(ce["channel"], "presence-m");
    assert_eq!(ce["user_id"], "2");
    assert_eq!(
        serde_json::from_str::<Value>(ce["data"].as_str().unwrap()).unwrap(),
        json!({"n":1})
    );
    assert_eq!(ce["socket_id"], p2.socket_id.as_str());
    assert_eq!(find("cache_miss")[0]["channel"], "cache-score");
    // The last socket of user 2 leaves: member_removed after the hold.
    p2.close();
    let deadline = Instant::now() + Duration::from_secs(6);
    while find_now(&ep, "member_removed").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(find_now(&ep, "member_removed")[0]["user_id"], "2");
}

fn find_now(ep: &Endpoint, name: &str) -> Vec<Value> {
    ep.events()
        .into_iter()
        .filter(|e| e["name"] == name)
        .collect()
}

#[test]
fn failed_deliveries_are_retried() {
    let ep = Endpoint::start(2);
    let d = Daemon::builder()
        .env("BTS_APP_WEBHOOK_URLS", &ep.url)
        .start();
    let mut a = d.client();
    a.subscribe("sports.tennis");
    // Two 500s, then success: retried after 1 s and 2 s.
    let names = ep.wait_for(1, Duration::from_secs(8));
    assert!(names.contains(&"channel_occupied".to_owned()), "{names:?}");
}

fn cluster_node(redis: &RedisServer, hooks: &str) -> Daemon {
    Daemon::builder()
        .env("REDIS_URL", redis.url())
        .env("REVERB_SCALING_ENABLED", "true")
        .env("BTS_APP_WEBHOOK_URLS", hooks)
        .start()
}

fn count(ep: &Endpoint, name: &str) -> usize {
    ep.names().iter().filter(|n| *n == name).count()
}

#[test]
fn cluster_sends_each_webhook_once_for_the_whole_cluster() {
    let redis = RedisServer::start();
    let ep = Endpoint::start(0);
    let a = cluster_node(&redis, &ep.url);
    let mut b = cluster_node(&redis, &ep.url);
    let deadline = Instant::now() + Duration::from_secs(10);
    for d in [&a, &b] {
        loop {
            let up: Value = serde_json::from_str(&http(d.addr, "GET", "/up", b"").1).unwrap();
            if up["cluster_nodes"] == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not form: {up}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The channel fills on A, then on B: one channel_occupied.
    let mut on_a = a.client();
    on_a.subscribe("sports.football");
    let mut on_b = b.client();
    on_b.subscribe("sports.football");
    // The same user joins a presence channel on both nodes: one member_added.
    let mut pa = a.client();
    pa.join("presence-match", "7", json!(null));
    let mut pb = b.client();
    pb.join("presence-match", "7", json!(null));
    // sports.football and presence-match: two occupied; user 7: one member_added. Wait for them,
    // then make sure no second copy follows.
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&ep, "channel_occupied") < 2 || count(&ep, "member_added") < 1 {
        assert!(Instant::now() < deadline, "{:?}", ep.names());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&ep, "channel_occupied"), 2, "{:?}", ep.names());
    assert_eq!(count(&ep, "member_added"), 1, "{:?}", ep.names());
    // B's subscriber and B's socket of user 7 leave: the channel and the user are still there.
    on_b.close();
    pb.close();
    std::thread::sleep(Duration::from_millis(3600));
    assert_eq!(count(&ep, "channel_vacated"), 0, "{:?}", ep.names());
    assert_eq!(count(&ep, "member_removed"), 0, "{:?}", ep.names());
    // A's leaves, and within the hold-back a subscriber comes back on B: neither a vacated nor
    // a second occupied (the same node holds both).
    on_a.close();
    std::thread::sleep(Duration::from_millis(500));
    let mut again = b.client();
    again.subscribe("sports.football");
    std::thread::sleep(Duration::from_millis(3600));
    assert_eq!(count(&ep, "channel_vacated"), 0, "{:?}", ep.names());
    assert_eq!(count(&ep, "channel_occupied"), 2, "{:?}", ep.names());
    // User 7's last socket (on A) leaves: one member_removed; and the presence channel empties.
    pa.close();
    let deadline = Instant::now() + Duration::from_secs(6);
    while count(&ep, "member_removed") < 1 || count(&ep, "channel_vacated") < 1 {
        assert!(Instant::now() < deadline, "{:?}", ep.names());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Node B dies holding the only subscriber of sports.football: A sends the vacated, once,
    // after the node timeout and the hold-back.
    b.child.kill().unwrap();
    let _ = b.child.wait();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(20);
    while count(&ep, "channel_vacated") < 2 {
        assert!(Instant::now() < deadline, "{:?}", ep.names());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("vacated after the node died: {:?}", killed.elapsed());
    std::thread::sleep(Duration::from_millis(1000));
    let names = ep.names();
    assert_eq!(count(&ep, "channel_occupied"), 2, "{names:?}");
    assert_eq!(count(&ep, "channel_vacated"), 2, "{names:?}");
    assert_eq!(count(&ep, "member_added"), 1, "{names:?}");
    assert_eq!(count(&ep, "member_removed"), 1, "{names:?}");
    drop(again);
}
