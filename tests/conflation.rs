//! Conflation for slow viewers, over a real slow link: the viewer runs in a network namespace
//! whose veth link is shaped to 8 KiB/s (`tc ... tbf`), with a small receive buffer so the
//! kernel cannot hide the backlog, while 200 `match.update`s a second (about 1 KB each, on two
//! channels) and a few `match.event`s go out. With `match.update` conflated the viewer stays
//! connected, receives every `match.event` in order, updates only in increasing order, and the
//! last update of each channel within a bounded time after the burst; without conflation the
//! same viewer is closed with 4100. Needs root, iproute2 (`ip`, `tc`); CI runs as root.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::*;
use serde_json::{json, Value};

/// Set in the child process that plays the slow viewer inside the namespace.
const VIEWER_ENV: &str = "BTS_CONFLATION_VIEWER_ADDR";
const CHANNELS: [&str; 2] = ["match.1", "match.2"];
/// How long updates are published, at 200 a second.
const BURST: Duration = Duration::from_secs(5);
const LINK: &str = "64kbit";

/// Not a test: the slow viewer, run inside the namespace (`ip netns exec`). It connects with an
/// 8 KiB receive buffer, subscribes, says so, then reads everything the link lets through and
/// prints one JSON line: what it got, or the close code that ended it.
#[test]
#[ignore = "helper process for the conflation tests"]
fn slow_viewer_helper() {
    let Ok(addr) = std::env::var(VIEWER_ENV) else {
        return;
    };
    let addr: SocketAddr = addr.parse().expect("viewer address");
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(8 << 10).unwrap();
    sock.connect(&addr.into()).unwrap();
    let stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let url = format!("ws://{addr}/app/{APP_KEY}?protocol=7&client=rust&version=0.1");
    let (ws, _) = tungstenite::client::client(url.as_str(), stream).expect("ws handshake");
    let mut c = Client::established(ws);
    for ch in CHANNELS {
        c.subscribe(ch);
    }
    println!("VIEWER-READY");
    std::io::stdout().flush().unwrap();
    let mut updates: Vec<Vec<u64>> = vec![Vec::new(); CHANNELS.len()];
    let mut events = Vec::new();
    let started = Instant::now();
    let summary = loop {
        match c.next(Duration::from_secs(60)) {
            Got::Event(v) if v["event"] == "pusher:ping" => {
                c.send_json(json!({"event":"pusher:pong","data":{}}))
            }
            // Before a 4100 close: its reason.
            Got::Event(v) if v["event"] == "pusher:error" => {}
            Got::Event(v) => {
                let data: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
                let ch = CHANNELS.iter().position(|c| v["channel"] == *c).unwrap();
                match v["event"].as_str().unwrap() {
                    "match.update" => updates[ch].push(data["seq"].as_u64().unwrap()),
                    "match.event" if data["done"] == true => {
                        break json!({"closed": null, "updates": updates, "events": events, "secs": started.elapsed().as_secs_f64()})
                    }
                    "match.event" => events.push(data["seq"].as_u64().unwrap()),
                    other => panic!("unexpected event {other}"),
                }
            }
            Got::Closed(code) => {
                break json!({"closed": code, "updates": updates, "events": events, "secs": started.elapsed().as_secs_f64()})
            }
            Got::Timeout => {
                break json!({"closed": "timeout", "updates": updates, "events": events})
            }
        }
    };
    println!("VIEWER-DONE {summary}");
    std::io::stdout().flush().unwrap();
}

/// Runs the burst against a daemon (conflating `match.update` or not) with the slow viewer in a
/// shaped namespace; returns the viewer's summary, the seconds from the end of the burst to the
/// summary, how many updates and events were published per channel, and the metrics.
fn burst(conflate: bool) -> (Value, f64, u64, u64, String) {
    let mut ns = Netns::create();
    ns.shape_to_ns(LINK).unwrap();
    let metrics_port = free_port();
    let mut b = Daemon::builder()
        .host(&ns.host_ip)
        .metrics_port(metrics_port)
        .server_toml("max_outbound_bytes = 262144\nconflation_threshold = 16384")
        .shards(2);
    if conflate {
        b = b.env("BTS_APP_CONFLATE", "match.update");
    }
    let d = b.start();
    let mut viewer = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "slow_viewer_helper", "--ignored", "--nocapture"])
        .env(VIEWER_ENV, d.addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ip netns exec");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = viewer.stdout.take().unwrap();
    ns.inside = Some(viewer);
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20).saturating_sub(ready.elapsed()))
            .expect("the viewer never got ready");
        if line == "VIEWER-READY" {
            break;
        }
    }
    // 200 updates a second over both channels, in batches of 10 every 50 ms, about 1 KB each;
    // a match.event on each channel every 250 ms.
    let api = d.api();
    let pad = "x".repeat(900);
    let start = Instant::now();
    let (mut seq, mut ev_seq, mut tick) = (0u64, 0u64, 0u64);
    while start.elapsed() < BURST {
        let mut batch = Vec::new();
        for i in 0..10 {
            let ch = CHANNELS[i % 2];
            batch.push(json!({"channel": ch, "name": "match.update",
                "data": json!({"seq": seq + (i / 2) as u64, "pad": pad}).to_string()}));
        }
        seq += 5;
        let (st, v) = api.post("batch_events", &json!({ "batch": batch }).to_string());
        assert_eq!(st, 200, "{v}");
        if tick % 5 == 0 {
            let events: Vec<Value> = CHANNELS
                .iter()
                .map(|ch| json!({"channel": ch, "name": "match.event", "data": json!({"seq": ev_seq}).to_string()}))
                .collect();
            let (st, v) = api.post("batch_events", &json!({ "batch": events }).to_string());
            assert_eq!(st, 200, "{v}");
            ev_seq += 1;
        }
        tick += 1;
        let next = start + Duration::from_millis(50 * tick);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    // The last update of each channel, then the end marker.
    let last = seq;
    let mut batch: Vec<Value> = CHANNELS
        .iter()
        .map(|ch| json!({"channel": ch, "name": "match.update", "data": json!({"seq": last, "pad": pad}).to_string()}))
        .collect();
    batch.push(json!({"channel": CHANNELS[0], "name": "match.event", "data": json!({"done": true}).to_string()}));
    let (st, v) = api.post("batch_events", &json!({ "batch": batch }).to_string());
    assert_eq!(st, 200, "{v}");
    let ended = Instant::now();
    let summary = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the viewer never finished");
        if let Some(s) = line.strip_prefix("VIEWER-DONE ") {
            break serde_json::from_str::<Value>(s).unwrap();
        }
    };
    let after = ended.elapsed().as_secs_f64();
    let m = scrape_metrics(metrics_port);
    (summary, after, last, ev_seq, m)
}

#[test]
fn a_slow_viewer_stays_current_with_conflation() {
    let (s, after, last, events, m) = burst(true);
    assert!(s["closed"].is_null(), "the viewer was closed: {s}");
    // Every match.event, on both channels, in order: never conflated.
    let got: Vec<u64> = serde_json::from_value(s["events"].clone()).unwrap();
    let want: Vec<u64> = (0..events).flat_map(|e| [e, e]).collect();
    assert_eq!(got, want, "match.event lost or reordered");
    // Updates: in order, ending with the last one of each channel.
    let mut received = 0;
    for (i, ch) in CHANNELS.iter().enumerate() {
        let u: Vec<u64> = serde_json::from_value(s["updates"][i].clone()).unwrap();
        assert!(
            u.windows(2).all(|w| w[0] < w[1]),
            "{ch}: updates out of order: {u:?}"
        );
        assert_eq!(
            u.last(),
            Some(&last),
            "{ch}: the latest update did not arrive"
        );
        received += u.len();
    }
    let conflated = metric(&m, "bts_frames_conflated_total");
    assert!(conflated > 0.0, "{m}");
    assert_eq!(metric(&m, "bts_slow_consumer_closes_total"), 0.0, "{m}");
    // The backlog left after the burst is bounded: the conflation threshold (16 KiB), a frame
    // per channel and the match.events in the server's queue, plus what the kernel's socket
    // buffers hold (about 100 KiB here): at 8 KiB/s, about 16 s; unconflated, the burst's
    // 1 MB would take two minutes (and is cut off with 4100 long before).
    assert!(
        after < 30.0,
        "the latest updates took {after:.1} s to arrive"
    );
    eprintln!(
        "conflation: {received} of {} updates delivered, {conflated} conflated, every one of {} match.events; \
         the latest update of each channel arrived {after:.1} s after the burst",
        2 * (last + 1),
        2 * events
    );
}

#[test]
fn the_same_viewer_without_conflation_is_closed_4100() {
    let (s, _, _, _, m) = burst(false);
    assert_eq!(s["closed"], 4100, "{s}");
    assert_eq!(metric(&m, "bts_slow_consumer_closes_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "bts_frames_conflated_total"), 0.0, "{m}");
}
