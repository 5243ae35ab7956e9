//! The README's zero-downtime restart, with the default configuration (the metrics listener on,
//! on one fixed port shared by both processes): process A serves viewers while events are
//! published through the HTTP API all along; process B starts on the same ports and becomes
//! ready beside it; SIGTERM to A closes every viewer with 4200, each reconnects at once (as
//! pusher-js does) and lands on B; every event published after a viewer's reconnect reaches it,
//! none twice; A exits 0 within its drain window.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tungstenite::Message;

const CHANNEL: &str = "sports.football.leagues.premier-league";
const VIEWERS: usize = 20;
const DRAIN_SECS: u64 = 2;

/// One publish: its sequence number, when it started, and whether a server answered 200 (a
/// publish whose connection was refused or reset is not counted as published).
struct Published {
    seq: u64,
    started: Instant,
    accepted: bool,
}

/// What one viewer saw.
#[derive(Default)]
struct Viewer {
    /// (sequence number, connection number) of every event received, in order.
    got: Vec<(u64, usize)>,
    /// Close codes of the connections that ended.
    closes: Vec<Option<u16>>,
    /// When each connection's subscription succeeded.
    subscribed_at: Vec<Instant>,
    /// Connection attempts that failed (refused or reset while the old listeners close).
    failed_connects: usize,
}

/// A WebSocket client that reports failure instead of panicking (a reconnect may meet a
/// listener as it closes, and tries again, as pusher-js does).
fn try_connect(addr: SocketAddr) -> Option<Client> {
    let stream = TcpStream::connect(addr).ok()?;
    stream.set_nodelay(true).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let url = format!("ws://{addr}/app/{APP_KEY}?protocol=7&client=js&version=8.6.0");
    let (ws, _) = tungstenite::client::client(url.as_str(), stream).ok()?;
    let mut c = Client {
        ws,
        socket_id: String::new(),
    };
    let Got::Event(ev) = c.next(Duration::from_secs(5)) else {
        return None;
    };
    let data: Value = serde_json::from_str(ev["data"].as_str()?).ok()?;
    c.socket_id = data["socket_id"].as_str()?.to_owned();
    c.ws.send(Message::text(
        serde_json::json!({"event":"pusher:subscribe","data":{"channel":CHANNEL}}).to_string(),
    ))
    .ok()?;
    match c.next(Duration::from_secs(5)) {
        Got::Event(ev) if ev["event"] == "pusher_internal:subscription_succeeded" => Some(c),
        _ => None,
    }
}

/// A signed HTTP API publish that reports failure instead of panicking; `Some(status)` when a
/// server answered.
fn try_publish(addr: SocketAddr, seq: u64) -> Option<u16> {
    let body = serde_json::json!({
        "name": "match.update",
        "channel": CHANNEL,
        "data": serde_json::json!({"seq": seq}).to_string(),
    })
    .to_string();
    let target = signed_events(body.as_bytes());
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!(
        "POST {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.split_whitespace().nth(1)?.parse().ok()
}

/// Runs a viewer until `stop` is set and it has seen `last` (or 10 s after `stop`):
/// reconnecting at once whenever its connection ends.
fn run_viewer(
    addr: SocketAddr,
    ready: std::sync::mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
) -> Viewer {
    let mut v = Viewer::default();
    let mut ready = Some(ready);
    let mut stop_seen: Option<Instant> = None;
    loop {
        let Some(mut c) = try_connect(addr) else {
            v.failed_connects += 1;
            assert!(v.failed_connects < 100, "could not reconnect");
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        v.subscribed_at.push(Instant::now());
        let conn = v.subscribed_at.len() - 1;
        if let Some(r) = ready.take() {
            r.send(()).unwrap();
        }
        loop {
            if stop.load(Ordering::SeqCst) {
                let since = *stop_seen.get_or_insert_with(Instant::now);
                let want = last.load(Ordering::SeqCst);
                if v.got.last().is_some_and(|(s, _)| *s >= want)
                    || since.elapsed() > Duration::from_secs(10)
                {
                    return v;
                }
            }
            match c.next(Duration::from_millis(100)) {
                Got::Event(ev) if ev["event"] == "match.update" => {
                    let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
                    v.got.push((data["seq"].as_u64().unwrap(), conn));
                }
                Got::Event(ev) if ev["event"] == "pusher:error" => {}
                Got::Event(ev) => panic!("unexpected {ev}"),
                Got::Closed(code) => {
                    v.closes.push(code);
                    break;
                }
                Got::Timeout => {}
            }
        }
    }
}

fn restart_with_shards(shards: usize) {
    // The defaults, metrics on: one metrics port for both processes, as 9601 would be.
    let metrics_port = free_port();
    let start = |port: u16| {
        Daemon::builder()
            .metrics_port(metrics_port)
            .arg("--drain-secs")
            .arg(DRAIN_SECS.to_string())
            .shards(shards)
            .start_on(port)
    };
    let mut a = start(0);
    let addr = a.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let viewers: Vec<_> = (0..VIEWERS)
        .map(|_| {
            let (ready, stop, last) = (ready_tx.clone(), Arc::clone(&stop), Arc::clone(&last));
            std::thread::spawn(move || run_viewer(addr, ready, stop, last))
        })
        .collect();
    for _ in 0..VIEWERS {
        ready_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    }

    // Publish every 20 ms all along, through whichever process the kernel picks.
    let published = Arc::new(Mutex::new(Vec::<Published>::new()));
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (published, publishing) = (Arc::clone(&published), Arc::clone(&publishing));
        std::thread::spawn(move || {
            let mut seq = 0;
            while publishing.load(Ordering::SeqCst) {
                let started = Instant::now();
                let status = try_publish(addr, seq);
                assert!(
                    matches!(status, None | Some(200)),
                    "publish {seq}: {status:?}"
                );
                published.lock().unwrap().push(Published {
                    seq,
                    started,
                    accepted: status == Some(200),
                });
                seq += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // B starts beside A on the same ports, metrics included, and becomes ready.
    let b = start(addr.port());
    assert_eq!(b.addr, addr);
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    a.signal("TERM");
    let code = a.wait_exit(Duration::from_secs(DRAIN_SECS + 20));
    let took = signalled.elapsed();
    assert_eq!(code, Some(Some(0)), "A did not exit 0: {}", a.stderr());
    eprintln!("{shards} shard(s): A exited 0 {took:?} after SIGTERM (drain window {DRAIN_SECS} s)");
    // The drain window, plus the time the last closes take on a loaded machine.
    assert!(
        took < Duration::from_secs(DRAIN_SECS + 8),
        "A took {took:?} to exit"
    );
    // Only B is left on both ports: it counts every viewer, and its metrics answer there.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape_metrics(metrics_port);
        let open: f64 = m
            .lines()
            .filter(|l| l.starts_with("bts_connections{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum();
        if open == VIEWERS as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "B counts {open} viewers:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    publishing.store(false, Ordering::SeqCst);
    publisher.join().unwrap();
    let published = Arc::try_unwrap(published)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();
    let last_accepted = published
        .iter()
        .rev()
        .find(|p| p.accepted)
        .expect("B accepted publishes")
        .seq;
    last.store(last_accepted, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let viewers: Vec<Viewer> = viewers.into_iter().map(|v| v.join().unwrap()).collect();

    let refused = published.iter().filter(|p| !p.accepted).count();
    let mut after_reconnect = 0;
    for (i, v) in viewers.iter().enumerate() {
        // Closed once, by A's drain, with 4200; reconnected to B, which still serves it.
        assert_eq!(v.closes, vec![Some(4200)], "viewer {i}");
        assert_eq!(v.subscribed_at.len(), 2, "viewer {i}");
        // None twice, and in order on each connection.
        let mut seen = HashMap::new();
        for (seq, conn) in &v.got {
            assert!(
                seen.insert(*seq, *conn).is_none(),
                "viewer {i}: event {seq} twice"
            );
        }
        for w in v.got.windows(2) {
            if w[0].1 == w[1].1 {
                assert!(w[0].0 < w[1].0, "viewer {i}: {w:?} out of order");
            }
        }
        // Every event published after its reconnect (so through B: A's listeners were closed
        // before A closed it) reached it, over that connection.
        let back = v.subscribed_at[1];
        for p in published.iter().filter(|p| p.accepted && p.started > back) {
            assert_eq!(
                seen.get(&p.seq),
                Some(&1),
                "viewer {i}: event {} published {:?} after its reconnect is missing",
                p.seq,
                p.started - back
            );
            after_reconnect += 1;
        }
        // Before B started, every publish went to A: all delivered.
        let first = v.subscribed_at[0];
        for p in published.iter().take(5) {
            if p.accepted && p.started > first {
                assert!(
                    seen.contains_key(&p.seq),
                    "viewer {i}: early event {}",
                    p.seq
                );
            }
        }
    }
    assert!(after_reconnect >= VIEWERS * 10, "{after_reconnect}");
    eprintln!(
        "{shards} shard(s): {} publishes ({refused} refused while A's listeners closed), {after_reconnect} \
         deliveries checked after the reconnects, failed reconnect attempts {}",
        published.len(),
        viewers.iter().map(|v| v.failed_connects).sum::<usize>()
    );
    drop(b);
}

#[test]
fn restart_with_default_settings_loses_no_viewer_and_no_event() {
    restart_with_shards(1);
}

#[test]
fn restart_with_two_shards_loses_no_viewer_and_no_event() {
    restart_with_shards(2);
}
