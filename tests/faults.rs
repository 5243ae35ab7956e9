//! Faults a real network produces, against the real binary: a client that vanishes without a
//! FIN (its packets dropped on a veth pair into a network namespace), a client that sends half
//! a frame and goes quiet, and 10,000 clients reconnecting at once after a drain. The first
//! needs root and iproute2 (`ip`); CI runs as root and `tests/run.sh` installs iproute2.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{ip, Netns};
use common::*;
use serde_json::{json, Value};

/// Set in the child process that plays the silent peer inside the namespace.
const PEER_ENV: &str = "BTS_FAULTS_SILENT_PEER_ADDR";

/// Not a test: the silent peer, run by `client_that_vanishes_without_fin_...` inside the
/// namespace (`ip netns exec`). It connects, subscribes, says so, then holds the socket and
/// never reads or writes again.
#[test]
#[ignore = "helper process for client_that_vanishes_without_fin_is_detected_by_ping_pong"]
fn silent_peer_helper() {
    let Ok(addr) = std::env::var(PEER_ENV) else {
        return;
    };
    let addr: SocketAddr = addr.parse().expect("peer address");
    let mut c = Client::connect(addr, APP_KEY);
    c.subscribe("sports.football");
    println!("PEER-READY {}", c.socket_id);
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(300));
    drop(c);
}

/// `GET /apps/{id}/connections`.
fn connections(d: &Daemon) -> u64 {
    let (s, v) = d.api().get("connections", &[]);
    assert_eq!(s, 200, "{v}");
    v["connections"].as_u64().unwrap()
}

/// A subscriber on its own thread that answers pings and checks it receives `seq` 0, 1, 2...
/// in order; returns how many it got when `stop` is set.
fn healthy_subscriber(
    mut c: Client,
    stop: Arc<AtomicBool>,
    got: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut next = 0u64;
        while !stop.load(Ordering::Relaxed) {
            match c.next(Duration::from_millis(100)) {
                Got::Event(v) if v["event"] == "pusher:ping" => {
                    c.send_json(json!({"event":"pusher:pong","data":{}}))
                }
                Got::Event(v) if v["event"] == "match.update" => {
                    let data: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
                    assert_eq!(data["seq"], next, "healthy subscriber: gap or reorder");
                    next += 1;
                    got.store(next as usize, Ordering::Relaxed);
                }
                Got::Event(v) => panic!("healthy subscriber got {v}"),
                Got::Closed(code) => panic!("healthy subscriber closed with {code:?}"),
                Got::Timeout => {}
            }
        }
        next as usize
    })
}

#[test]
fn client_that_vanishes_without_fin_is_detected_by_ping_pong() {
    const ACTIVITY: u64 = 2;
    const PONG: u64 = 3;
    let mut ns = Netns::create();
    let metrics_port = free_port();
    // Explicit credentials (the harness's), so a non-loopback address may be bound.
    let d = Daemon::builder()
        .host(&ns.host_ip)
        .metrics_port(metrics_port)
        .env("REVERB_APP_ACTIVITY_TIMEOUT", ACTIVITY.to_string())
        .server_toml(&format!("pong_timeout_secs = {PONG}"))
        .shards(2)
        .start();
    assert_eq!(d.addr.ip().to_string(), ns.host_ip);

    // The peer, inside the namespace: this test binary again, running the helper above.
    let mut peer = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "silent_peer_helper", "--ignored", "--nocapture"])
        .env(PEER_ENV, d.addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ip netns exec");
    let mut lines = BufReader::new(peer.stdout.take().unwrap()).lines();
    ns.inside = Some(peer);
    let socket_id = loop {
        let line = lines
            .next()
            .expect("the peer exited before connecting")
            .unwrap();
        if let Some(id) = line.strip_prefix("PEER-READY ") {
            break id.to_owned();
        }
    };
    // A healthy client on the host side keeps receiving through all of it.
    let mut healthy = d.client();
    healthy.subscribe("sports.football");
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicUsize::new(0));
    let reader = healthy_subscriber(healthy, stop.clone(), got.clone());
    assert_eq!(connections(&d), 2);

    // Drop everything on the wire: the namespace's end goes down, so neither a FIN nor a reset
    // (nor anything else) from the peer can reach the server again.
    ip(&["-n", &ns.name, "link", "set", &ns.ns_if, "down"]).unwrap();
    let cut = Instant::now();
    let bound = Duration::from_secs(ACTIVITY + 30);
    let mut seq = 0u64;
    let detected = loop {
        let data = json!({ "seq": seq }).to_string();
        assert_eq!(
            d.api()
                .trigger(&["sports.football"], "match.update", &data)
                .0,
            200
        );
        seq += 1;
        if connections(&d) == 1 {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < bound,
            "the vanished peer {socket_id} is still counted {:?} after its link went down; \
             daemon log:\n{}",
            cut.elapsed(),
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // It was the liveness check that ended it: pinged, no pong, 4201.
    let m = scrape_metrics(metrics_port);
    assert_eq!(
        metric(&m, r#"bts_disconnects_total{code="4201"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"bts_connections{shard="0",app="test-app"}"#)
            + metric(&m, r#"bts_connections{shard="1",app="test-app"}"#),
        1.0,
        "{m}"
    );
    // The healthy client got every event, in order, and is still served.
    let wait = Instant::now();
    while got.load(Ordering::Relaxed) < seq as usize && wait.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(reader.join().expect("healthy subscriber"), seq as usize);
    eprintln!(
        "silent peer {socket_id}: counted closed {:.1} s after its packets were dropped \
         (activity timeout {ACTIVITY} s + pong timeout {PONG} s + 5 s close grace; bound {} s); \
         the healthy subscriber got all {seq} events in order",
        detected.as_secs_f64(),
        bound.as_secs()
    );
}

/// Reads raw server frames until the connection ends: the text payloads, then the close code.
fn read_until_close(c: &mut Client, limit: Duration) -> (Vec<(Duration, Value)>, Option<u16>) {
    use std::io::Read;
    let started = Instant::now();
    let s = c.ws.get_mut();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = Vec::new();
    let mut texts = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        assert!(
            started.elapsed() < limit,
            "no close within {limit:?}: {texts:?}"
        );
        match s.read(&mut chunk) {
            Ok(0) => return (texts, None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return (texts, None),
        }
        // Server frames are unmasked; every one here is small.
        while buf.len() >= 2 {
            let len = (buf[1] & 0x7f) as usize;
            let (len, hdr) = match len {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                126 => break,
                n => (n, 2),
            };
            if buf.len() < hdr + len {
                break;
            }
            let payload = buf[hdr..hdr + len].to_vec();
            let op = buf[0] & 0x0f;
            buf.drain(..hdr + len);
            match op {
                0x1 => texts.push((started.elapsed(), serde_json::from_slice(&payload).unwrap())),
                0x8 => return (texts, Some(u16::from_be_bytes([payload[0], payload[1]]))),
                _ => {}
            }
        }
    }
}

#[test]
fn half_a_frame_then_silence_is_closed_by_the_activity_timeout() {
    const ACTIVITY: u64 = 2;
    const PONG: u64 = 2;
    let d = Daemon::builder()
        .env("REVERB_APP_ACTIVITY_TIMEOUT", ACTIVITY.to_string())
        .server_toml(&format!("pong_timeout_secs = {PONG}"))
        .shards(2)
        .start();
    let mut bystander = d.client();
    bystander.subscribe("sports.football");
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicUsize::new(0));
    let reader = healthy_subscriber(bystander, stop.clone(), got.clone());
    let mut half = d.client();
    half.subscribe("sports.tennis");
    // A masked text frame announcing 100 bytes, and only 40 of them.
    let msg = format!(
        r#"{{"event":"pusher:ping","data":{{"pad":"{}"}}}}"#,
        "x".repeat(59)
    );
    assert_eq!(msg.len(), 100);
    let frame = raw_frame(0x81, msg.as_bytes(), true);
    let sent = Instant::now();
    half.ws.get_mut().write_all(&frame[..6 + 40]).unwrap();
    // Meanwhile events flow to the bystander.
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publisher = {
        let api = d.api();
        let stop = stop_publishing.clone();
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let data = json!({ "seq": seq }).to_string();
                assert_eq!(
                    api.trigger(&["sports.football"], "match.update", &data).0,
                    200
                );
                seq += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            seq
        })
    };
    let limit = Duration::from_secs(ACTIVITY + PONG + 10);
    let (texts, close) = read_until_close(&mut half, limit);
    let closed_after = sent.elapsed();
    let events: Vec<&str> = texts
        .iter()
        .map(|(_, v)| v["event"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(events, ["pusher:ping", "pusher:error"], "{texts:?}");
    assert_eq!(texts[1].1["data"]["code"], 4201, "{texts:?}");
    assert_eq!(close, Some(4201), "{texts:?}");
    stop_publishing.store(true, Ordering::Relaxed);
    let published = publisher.join().unwrap();
    let wait = Instant::now();
    while (got.load(Ordering::Relaxed) as u64) < published
        && wait.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let received = reader.join().expect("bystander");
    assert!(published > 0);
    assert_eq!(received as u64, published, "the bystander missed events");
    eprintln!(
        "half a frame: pinged after {:.2} s, pusher:error 4201 and close 4201 after {:.2} s \
         (activity {ACTIVITY} s, pong {PONG} s); the bystander got {received} of {published} \
         events in order",
        texts[0].0.as_secs_f64(),
        closed_after.as_secs_f64()
    );
}

#[test]
fn ten_thousand_clients_reconnecting_at_once_after_a_drain_are_all_established() {
    const CLIENTS: usize = 10_000;
    // The old process, with clients, drains while the new one listens on the same port.
    let mut old = Daemon::builder()
        .arg("--drain-secs")
        .arg("1")
        .shards(2)
        .start();
    let port = old.addr.port();
    let mut before: Vec<Client> = (0..50).map(|_| old.client()).collect();
    for c in &mut before {
        c.subscribe("sports.football");
    }
    let new = Daemon::builder().port(port).shards(2).start();
    old.signal("TERM");
    for c in &mut before {
        let (close, _) = c.expect_close(Duration::from_secs(10));
        assert_eq!(close, Some(4200));
    }
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(Some(0)));

    // The storm: every connection at once (as many handshakes in flight as connections).
    let run = run_bench(
        &new,
        &[
            "--connect-concurrency",
            &CLIENTS.to_string(),
            "--connect-timeout-s",
            "90",
            "--timeout-s",
            "300",
            "idle",
            "--connections",
            &CLIENTS.to_string(),
            "--settle-ms",
            "500",
        ],
    );
    let v = &run.json;
    assert!(v.is_object(), "no JSON line\n{}", run.context(&new));
    let context = || run.context(&new);
    assert!(run.status.success(), "{}", context());
    assert_eq!(v["connect"]["ready"], CLIENTS, "{}", context());
    assert_eq!(v["connect"]["failed"], 0, "{}", context());
    assert_eq!(
        v["server"]["connections_reported"],
        CLIENTS,
        "{}",
        context()
    );
    let h = &v["connect"]["handshake_us"];
    eprintln!(
        "{CLIENTS} connections at once, after a drain, to the new process (debug build, 2 \
         shards): all established in {:.2} s; connect → pusher:connection_established p50 {:.1} \
         ms, p99 {:.1} ms, max {:.1} ms; server RSS +{:.0} B per connection",
        v["connect"]["seconds"].as_f64().unwrap_or(f64::NAN),
        h["p50"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        h["p99"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        h["max"].as_f64().unwrap_or(f64::NAN) / 1000.0,
        v["server"]["rss_bytes_per_connection"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
}
