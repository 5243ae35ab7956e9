//! Redis that fails: Sentinel failover, Redis Cluster failover, and Redis away past the
//! cluster outbox's bound. Real redis-server and sentinels on loopback, two bts-guru nodes,
//! viewers on both, a steady stream of signed HTTP publishes to both; every event the API
//! answered 200 for must reach every viewer, in its node's order, once. The figures are
//! printed (`eprintln!`) for RELIABILITY.md.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CH: &str = "match.1";

fn up(d: &Daemon) -> Value {
    serde_json::from_str(&http(d.addr, "GET", "/up", b"").1).unwrap()
}

/// Polls `f` every 50 ms until it is true; panics with `what` after `limit`.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two cluster nodes with `env` (and their metrics ports), once each sees the other.
fn two_nodes(env: &[(&str, String)]) -> (Vec<Daemon>, Vec<u16>) {
    let ports = vec![free_port(), free_port()];
    let nodes: Vec<Daemon> = ports
        .iter()
        .map(|&port| {
            let mut b = Daemon::builder()
                .metrics_port(port)
                .env("REDIS_PREFIX", "laravel_database_")
                .env("REVERB_SCALING_ENABLED", "true");
            for (k, v) in env {
                b = b.env(k, v.clone());
            }
            b.start()
        })
        .collect();
    for d in &nodes {
        wait_for(Duration::from_secs(15), "the cluster to form", || {
            up(d)["cluster_nodes"] == 2
        });
    }
    (nodes, ports)
}

/// What a viewer received: (when, origin node index, number).
type Seen = Arc<Mutex<Vec<(Instant, usize, u64)>>>;

/// A subscriber on its own thread and what it has kept so far.
type Viewer<T> = (Arc<Mutex<Vec<T>>>, JoinHandle<()>);

/// A subscriber of `channel` reading on its own thread until `stop`, keeping `read(ev)` of
/// every `tick` event it receives.
fn watch<T: Send + 'static>(
    d: &Daemon,
    channel: &str,
    stop: &Arc<AtomicBool>,
    read: fn(&Value) -> T,
) -> Viewer<T> {
    let mut c = d.client();
    c.subscribe(channel);
    let seen: Arc<Mutex<Vec<T>>> = Arc::default();
    let (out, stop) = (Arc::clone(&seen), Arc::clone(stop));
    let h = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Got::Event(ev) = c.next(Duration::from_millis(100)) {
                if ev["event"] != "tick" {
                    continue;
                }
                let kept = read(&ev);
                out.lock().unwrap().push(kept);
            }
        }
    });
    (seen, h)
}

/// A subscriber of `CH` reading on its own thread until `stop`.
fn viewer(d: &Daemon, stop: &Arc<AtomicBool>) -> (Seen, JoinHandle<()>) {
    watch(d, CH, stop, |ev| {
        let (o, i) = tick_of(ev);
        (Instant::now(), o as usize, i)
    })
}

/// Every publish: (number, when it was sent, the API's status).
type Sent = Arc<Mutex<Vec<(u64, Instant, u16)>>>;

/// Publishes `{"o":origin,"i":n}` to `channel` on node `d` every `every` until `stop`.
fn publisher(
    d: &Daemon,
    channel: &'static str,
    origin: usize,
    every: Duration,
    stop: &Arc<AtomicBool>,
) -> (Sent, JoinHandle<()>) {
    let api = d.api();
    let sent: Sent = Arc::default();
    let (out, stop) = (Arc::clone(&sent), Arc::clone(stop));
    let h = std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let at = Instant::now();
            let (status, _) =
                api.trigger(&[channel], "tick", &format!(r#"{{"o":{origin},"i":{n}}}"#));
            out.lock().unwrap().push((n, at, status));
            std::thread::sleep(every.saturating_sub(at.elapsed()));
        }
    });
    (sent, h)
}

/// A stream through a failure: the viewers (still reading), every publish of each node, the
/// numbers the API accepted of each, and when the failure struck.
struct Stream<T> {
    viewers: Vec<Viewer<T>>,
    stop_view: Arc<AtomicBool>,
    sent: Vec<Vec<(u64, Instant, u16)>>,
    accepted: Vec<Vec<u64>>,
    struck: Instant,
}

/// A viewer on every node (`view`), then a publisher on each to `channel` every 25 ms; `fail`
/// 1.5 s into the stream (it returns when it struck), `after` more of it, then the publishers
/// stop.
fn stream<T>(
    nodes: &[Daemon],
    channel: &'static str,
    view: fn(&Daemon, &Arc<AtomicBool>) -> Viewer<T>,
    after: Duration,
    fail: impl FnOnce() -> Instant,
) -> Stream<T> {
    let stop_pub = Arc::new(AtomicBool::new(false));
    let stop_view = Arc::new(AtomicBool::new(false));
    let viewers: Vec<_> = nodes.iter().map(|d| view(d, &stop_view)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let pubs: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, d)| publisher(d, channel, i, Duration::from_millis(25), &stop_pub))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let struck = fail();
    std::thread::sleep(after);
    stop_pub.store(true, Ordering::Relaxed);
    let sent: Vec<Vec<(u64, Instant, u16)>> = pubs
        .into_iter()
        .map(|(s, h)| {
            h.join().unwrap();
            Arc::try_unwrap(s).unwrap().into_inner().unwrap()
        })
        .collect();
    let accepted: Vec<Vec<u64>> = sent
        .iter()
        .map(|s| s.iter().filter(|e| e.2 == 200).map(|e| e.0).collect())
        .collect();
    Stream {
        viewers,
        stop_view,
        sent,
        accepted,
        struck,
    }
}

/// Waits (30 s at most) until `complete` holds for what every viewer kept, then 500 ms more
/// (anything more, a duplicate, would have arrived by then too); stops the viewers and returns
/// what each kept.
fn gather<T: std::fmt::Debug>(
    viewers: Vec<Viewer<T>>,
    stop: &AtomicBool,
    complete: impl Fn(&[T]) -> bool,
) -> Vec<Vec<T>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !viewers.iter().all(|(s, _)| complete(&s.lock().unwrap())) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    viewers
        .into_iter()
        .map(|(seen, h)| {
            h.join().unwrap();
            Arc::try_unwrap(seen).unwrap().into_inner().unwrap()
        })
        .collect()
}

/// The last `n` lines of `d`'s stderr, newest first (for a failure message).
fn stderr_tail(d: &Daemon, n: usize) -> String {
    d.stderr()
        .lines()
        .rev()
        .take(n)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The next `n` events `c` receives (each within `limit`); panics with what came instead, the
/// events before it, and `context()`.
fn next_events(
    c: &mut Client,
    n: usize,
    limit: Duration,
    context: impl Fn() -> String,
) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        match c.next(limit) {
            Got::Event(ev) => got.push(ev),
            other => panic!("got {other:?} after {got:?}; {}", context()),
        }
    }
    got
}

/// The viewer on node `v` got exactly `acc`, the events of node `o` the API accepted, in order.
fn assert_got_accepted(nodes: &[Daemon], v: usize, o: usize, got: &[u64], acc: &[u64]) {
    assert_eq!(
        got,
        acc,
        "viewer on node {v}, events of node {o}: got {} of {} accepted (first difference at \
         {:?}); node stderr:\n{}",
        got.len(),
        acc.len(),
        got.iter().zip(acc).position(|(a, b)| a != b),
        stderr_tail(&nodes[v], 30)
    );
}

/// The figures of one run.
struct Outcome {
    accepted: [usize; 2],
    refused: [usize; 2],
    /// From the kill to the first event published after it that crossed nodes, each way.
    recovery: [Duration; 2],
}

/// Two nodes publishing to one channel, viewers on both, `fail` at 1.5 s into the stream;
/// streams for `after` more, then checks every viewer got exactly the accepted events of each
/// origin, in order. `fail` returns when it struck.
fn stream_through(nodes: &[Daemon], after: Duration, fail: impl FnOnce() -> Instant) -> Outcome {
    let st = stream(nodes, CH, viewer, after, fail);
    let (sent, accepted, struck) = (&st.sent, &st.accepted, st.struck);
    // Everything accepted reaches both viewers (held events included), or the test fails.
    let seen_by = gather(st.viewers, &st.stop_view, |seen| {
        (0..2).all(|o| seen.iter().filter(|e| e.1 == o).count() >= accepted[o].len())
    });
    let mut recovery = [Duration::ZERO; 2];
    for (v, seen) in seen_by.iter().enumerate() {
        for (o, acc) in accepted.iter().enumerate() {
            let got: Vec<u64> = seen.iter().filter(|e| e.1 == o).map(|e| e.2).collect();
            assert_got_accepted(nodes, v, o, &got, acc);
        }
        // Cross-node delivery again: the first event of the other node published after the
        // failure, as this viewer received it.
        let other = 1 - v;
        let first_after = sent[other]
            .iter()
            .find(|e| e.1 >= struck && e.2 == 200)
            .map(|e| e.0)
            .expect("no event accepted after the failure");
        let at = seen
            .iter()
            .find(|e| e.1 == other && e.2 >= first_after)
            .map(|e| e.0)
            .unwrap();
        recovery[other] = at.saturating_duration_since(struck);
    }
    Outcome {
        accepted: [accepted[0].len(), accepted[1].len()],
        refused: [
            sent[0].len() - accepted[0].len(),
            sent[1].len() - accepted[1].len(),
        ],
        recovery,
    }
}

/// A client on each node, subscribed to each of `channels`.
fn subscribers(nodes: &[Daemon], channels: &[&str]) -> Vec<Client> {
    nodes
        .iter()
        .map(|d| {
            let mut c = d.client();
            for ch in channels {
                c.subscribe(ch);
            }
            c
        })
        .collect()
}

/// Prints each node's cluster counters and checks that none lost an event and that
/// cross-node delivery came back within 15 s each way; returns each node's /up.
fn nothing_lost(nodes: &[Daemon], out: &Outcome) -> Vec<Value> {
    let ups: Vec<Value> = nodes.iter().map(up).collect();
    for u in &ups {
        eprintln!(
            "  node: resent {} duplicates dropped {} gaps {} lost {}",
            u["cluster_resent"], u["cluster_duplicates"], u["cluster_gaps"], u["cluster_lost"]
        );
        assert_eq!(u["cluster_lost"], 0, "{u}");
    }
    assert!(
        out.recovery.iter().all(|r| *r < Duration::from_secs(15)),
        "recovery took {:?}",
        out.recovery
    );
    ups
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_cmd(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_secs(1))?;
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query(&mut conn)
}

fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let v: String = redis::from_redis_value(redis_cmd(port, &["INFO", section]).ok()?).ok()?;
    v.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|s| s.trim().to_owned())
}

/// A primary, one replica, three sentinels (`down-after-milliseconds 1000`).
struct Sentinels {
    primary: RedisServer,
    _replica: RedisServer,
    ports: Vec<u16>,
    _procs: Vec<Proc>,
}

impl Sentinels {
    fn start() -> Sentinels {
        let primary = RedisServer::start();
        let p = primary.port.to_string();
        let replica = RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &p]);
        wait_for(Duration::from_secs(10), "the replica to sync", || {
            info_field(replica.port, "replication", "master_link_status").as_deref() == Some("up")
        });
        let dir = scratch_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let mut ports = Vec::new();
        let mut procs = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor mymaster 127.0.0.1 {p} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 3000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    dir.display()
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel");
            procs.push(Proc(child));
            ports.push(port);
        }
        // Each sentinel knows the replica and the two other sentinels (their hellos go
        // through the primary every 2 s), so a failover can be agreed on.
        for &port in &ports {
            wait_for(Duration::from_secs(20), "the sentinels to meet", || {
                let Ok(v) = redis_cmd(port, &["SENTINEL", "master", "mymaster"]) else {
                    return false;
                };
                let Ok(fields) = redis::from_redis_value::<Vec<String>>(v) else {
                    return false;
                };
                let get = |k: &str| {
                    fields
                        .iter()
                        .position(|f| f == k)
                        .and_then(|i| fields.get(i + 1))
                        .cloned()
                };
                get("num-other-sentinels").as_deref() == Some("2")
                    && get("num-slaves").as_deref() == Some("1")
            });
        }
        Sentinels {
            primary,
            _replica: replica,
            ports,
            _procs: procs,
        }
    }

    fn env(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[test]
fn sentinel_failover_loses_no_accepted_event() {
    let mut s = Sentinels::start();
    let (nodes, _) = two_nodes(&[
        ("REDIS_SENTINELS", s.env()),
        ("REDIS_SENTINEL_MASTER", "mymaster".into()),
    ]);
    let mut late = None;
    let out = stream_through(&nodes, Duration::from_secs(8), || {
        s.primary.kill();
        let at = Instant::now();
        // A member joins on node 1 while there is no primary.
        let mut c = nodes[1].client();
        c.join("presence-room", "late", serde_json::json!(null));
        late = Some(c);
        at
    });
    // Presence reads are exact again everywhere: node 0 lists the member that joined on
    // node 1 during the failover.
    wait_for(
        Duration::from_secs(10),
        "node 0 to list the late member",
        || {
            let (status, v) = nodes[0].api().get("channels/presence-room/users", &[]);
            status == 200
                && v["users"]
                    .as_array()
                    .is_some_and(|u| u.len() == 1 && u[0]["id"] == "late")
        },
    );
    // Laravel's broadcaster, publishing to the primary the sentinels name now, reaches both
    // nodes: the ingest followed the failover too.
    let (host, port): (String, u16) = redis::from_redis_value(
        redis_cmd(
            s.ports[0],
            &["SENTINEL", "get-master-addr-by-name", "mymaster"],
        )
        .unwrap(),
    )
    .unwrap();
    assert_ne!(port, s.primary.port, "no failover happened ({host})");
    let mut views = subscribers(&nodes, &[CH]);
    let payload = r#"{"event":"laravel","data":{"after":"failover"},"socket":null}"#;
    redis_cmd(port, &["PUBLISH", "laravel_database_match.1", payload]).unwrap();
    for v in &mut views {
        assert_eq!(v.next_event(Duration::from_secs(5))["event"], "laravel");
    }
    eprintln!(
        "sentinel failover (SIGKILL of the primary, down-after 1000 ms): cross-node delivery \
         again after {:?} (node 0 -> 1) and {:?} (node 1 -> 0); accepted {:?} events, refused \
         {:?}; every accepted event reached both viewers, in order, once",
        out.recovery[0], out.recovery[1], out.accepted, out.refused
    );
    for u in nothing_lost(&nodes, &out) {
        assert_eq!(u["redis"], "connected", "{u}");
    }
}

/// The data of a `tick` event: (origin, number).
fn tick_of(ev: &Value) -> (u64, u64) {
    assert_eq!(ev["event"], "tick", "{ev}");
    let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
    (data["o"].as_u64().unwrap(), data["i"].as_u64().unwrap())
}

/// Publishes to `channel` on `d` a tick with 400 bytes of padding (about 620 bytes as the
/// cluster carries it).
fn padded_tick(d: &Daemon, channel: &str, i: u64) -> (u16, Value) {
    let pad = "x".repeat(400);
    d.api().trigger(
        &[channel],
        "tick",
        &format!(r#"{{"o":0,"i":{i},"pad":"{pad}"}}"#),
    )
}

/// Kills `redis`, waits until `node` sees it down, then publishes padded ticks 1, 2, ... to
/// `channel` on `node` until the outbox's byte bound refuses one: a 503 saying the outbox is
/// full and the event is delivered nowhere. `on_accept(i)` runs after each accepted tick.
/// Returns the accepted numbers (at least 3), the refused one, and when Redis was killed.
fn kill_redis_and_fill_the_outbox(
    redis: &mut RedisServer,
    node: &Daemon,
    channel: &str,
    mut on_accept: impl FnMut(u64),
) -> (Vec<u64>, u64, Instant) {
    redis.kill();
    let down_at = Instant::now();
    wait_for(Duration::from_secs(10), "node 0 to see Redis down", || {
        up(node)["redis"] == "disconnected"
    });
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 1..=50 {
        let (status, body) = padded_tick(node, channel, i);
        if status == 200 {
            accepted.push(i);
            on_accept(i);
            continue;
        }
        assert_eq!(status, 503, "{body}");
        let msg = body["error"].as_str().unwrap();
        assert!(
            msg.contains("outbox is full") && msg.contains("not delivered anywhere"),
            "{msg}"
        );
        refused = Some(i);
        break;
    }
    let refused = refused.expect("the outbox's byte bound was never reached");
    assert!(accepted.len() >= 3, "{accepted:?}");
    (accepted, refused, down_at)
}

/// `node`'s /up once its outbox holds `held` events, past 3000 bytes, and has refused one.
fn up_with_the_outbox_full(node: &Daemon, held: usize) -> Value {
    let u = up(node);
    assert_eq!(u["cluster_outbox_events"], held, "{u}");
    assert!(u["cluster_outbox_bytes"].as_u64().unwrap() > 3000, "{u}");
    assert_eq!(u["cluster_refused"], 1, "{u}");
    u
}

/// Past the outbox's age bound (3 s: the oldest held event is from about `down_at`), a small
/// tick (number 999) to `channel` on `node` is refused too, with a 503 naming the limit.
fn refused_past_the_age_bound(node: &Daemon, channel: &str, down_at: Instant) {
    std::thread::sleep(Duration::from_millis(3300).saturating_sub(down_at.elapsed()));
    let (status, body) = node.api().trigger(&[channel], "tick", r#"{"o":0,"i":999}"#);
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("limit 3 s"),
        "{body}"
    );
}

/// Starts Redis again on `port` and publishes padded ticks 1001, 1002, ... to `channel` on
/// `node` until three are accepted. Returns the new Redis, the accepted numbers, and how long
/// that took.
fn redis_back(port: u16, node: &Daemon, channel: &str) -> (RedisServer, Vec<u64>, Duration) {
    let back = Instant::now();
    let redis = RedisServer::start_on(port);
    let mut after = Vec::new();
    let mut n = 1000;
    wait_for(
        Duration::from_secs(20),
        "publishes to be accepted again",
        || {
            n += 1;
            if padded_tick(node, channel, n).0 == 200 {
                after.push(n);
            }
            after.len() >= 3
        },
    );
    (redis, after, back.elapsed())
}

/// Redis, two cluster nodes on it with a 4096-byte, 3 s outbox (and `env`), and a viewer of
/// `channel` on each node.
struct Outage {
    redis: RedisServer,
    nodes: Vec<Daemon>,
    metrics_ports: Vec<u16>,
    a: Client,
    b: Client,
}

fn outage_setup(channel: &str, env: &[(&str, String)]) -> Outage {
    let redis = RedisServer::start();
    let mut all = vec![
        ("REDIS_URL", redis.url()),
        ("BTS_CLUSTER_OUTBOX_BYTES", "4096".into()),
        ("BTS_CLUSTER_OUTBOX_MAX_AGE_SECS", "3".into()),
    ];
    all.extend(env.iter().cloned());
    let (nodes, metrics_ports) = two_nodes(&all);
    let mut a = nodes[0].client();
    a.subscribe(channel);
    let mut b = nodes[1].client();
    b.subscribe(channel);
    Outage {
        redis,
        nodes,
        metrics_ports,
        a,
        b,
    }
}

#[test]
fn redis_away_past_the_outbox_bound_refuses_then_recovers() {
    const T: Duration = Duration::from_secs(5);
    let Outage {
        mut redis,
        nodes,
        metrics_ports,
        mut a,
        mut b,
    } = outage_setup(CH, &[]);
    let port = redis.port;
    // Held while Redis is away: 200, and node 0's own viewer has it at once (local delivery
    // does not wait for the hand-off); node 1's has nothing yet.
    let (accepted, refused, down_at) =
        kill_redis_and_fill_the_outbox(&mut redis, &nodes[0], CH, |i| {
            assert_eq!(tick_of(&a.next_event(T)), (0, i));
        });
    // The refused event went nowhere, and nothing crossed.
    a.expect_silence(Duration::from_millis(300));
    b.expect_silence(Duration::from_millis(300));
    let u = up_with_the_outbox_full(&nodes[0], accepted.len());
    assert_eq!(u["redis"], "disconnected", "{u}");
    assert!(u["redis_down_secs"].as_f64().unwrap() > 0.0, "{u}");
    assert!(u["redis_down_since"].as_u64().is_some(), "{u}");
    let m = scrape_metrics(metrics_ports[0]);
    assert!(metric(&m, "bts_redis_down_seconds") > 0.0, "{m}");
    assert_eq!(metric(&m, "bts_redis_connected"), 0.0);
    assert_eq!(
        metric(&m, "bts_cluster_outbox_events"),
        accepted.len() as f64
    );
    assert!(metric(&m, "bts_cluster_outbox_bytes") > 3000.0);
    assert_eq!(metric(&m, "bts_cluster_refused_total"), 1.0);
    // Past the age bound a small event is refused too (the oldest held is over 3 s old).
    refused_past_the_age_bound(&nodes[0], CH, down_at);
    eprintln!(
        "outage: {} events held and delivered locally at once, then 503 (byte bound 4096), \
         then 503 (age bound 3 s); /up while down: {u}",
        accepted.len()
    );
    // Redis back on the same port: the held events cross first, in order, then new ones.
    let (_redis, after, took) = redis_back(port, &nodes[0], CH);
    eprintln!("outage: publishes accepted again {took:?} after Redis came back");
    let expected: Vec<u64> = accepted.iter().chain(&after).copied().collect();
    let got: Vec<u64> = next_events(&mut b, expected.len(), Duration::from_secs(10), || {
        format!("node 1's viewer expected {expected:?}")
    })
    .iter()
    .map(|ev| tick_of(ev).1)
    .collect();
    assert_eq!(got, expected);
    assert!(!got.contains(&refused) && !got.contains(&999));
    b.expect_silence(Duration::from_millis(500));
    for i in &after {
        assert_eq!(tick_of(&a.next_event(T)), (0, *i));
    }
    a.expect_silence(Duration::from_millis(300));
    let u = up(&nodes[0]);
    assert_eq!(u["redis"], "connected", "{u}");
    assert!(u.get("redis_down_secs").is_none(), "{u}");
}

/// A Redis Cluster: three primaries, a replica each (`cluster-node-timeout 1000`).
struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_with_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ])
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            wait_for(
                Duration::from_secs(20),
                "the Redis Cluster to be ok",
                || info_field_cluster(n.port).as_deref() == Some("ok"),
            );
        }
        // Every replica has its primary's data link up (so it may take over).
        for n in &nodes {
            wait_for(Duration::from_secs(20), "the replicas to sync", || {
                info_field(n.port, "replication", "role").as_deref() == Some("master")
                    || info_field(n.port, "replication", "master_link_status").as_deref()
                        == Some("up")
            });
        }
        RedisCluster { nodes }
    }

    fn env(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node that serves `key`'s slot now.
    fn owner_of(&self, key: &str) -> usize {
        let port = self.nodes[0].port;
        let slot: i64 =
            redis::from_redis_value(redis_cmd(port, &["CLUSTER", "KEYSLOT", key]).unwrap())
                .unwrap();
        let ranges: Vec<(i64, i64, (String, i64))> =
            match redis_cmd(port, &["CLUSTER", "SLOTS"]).unwrap() {
                redis::Value::Array(rs) => rs
                    .into_iter()
                    .map(|r| match r {
                        redis::Value::Array(v) => {
                            let start: i64 = redis::from_redis_value(v[0].clone()).unwrap();
                            let end: i64 = redis::from_redis_value(v[1].clone()).unwrap();
                            let (h, p): (String, i64) = match &v[2] {
                                redis::Value::Array(n) => (
                                    redis::from_redis_value(n[0].clone()).unwrap(),
                                    redis::from_redis_value(n[1].clone()).unwrap(),
                                ),
                                other => panic!("{other:?}"),
                            };
                            (start, end, (h, p))
                        }
                        other => panic!("{other:?}"),
                    })
                    .collect(),
                other => panic!("{other:?}"),
            };
        let port = ranges
            .iter()
            .find(|r| (r.0..=r.1).contains(&slot))
            .map(|r| (r.2).1 as u16)
            .unwrap();
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }
}

fn info_field_cluster(port: u16) -> Option<String> {
    let v: String = redis::from_redis_value(redis_cmd(port, &["CLUSTER", "INFO"]).ok()?).ok()?;
    v.lines()
        .find_map(|l| l.strip_prefix("cluster_state:"))
        .map(|s| s.trim().to_owned())
}

#[test]
fn redis_cluster_failover_loses_no_accepted_event() {
    let mut rc = RedisCluster::start();
    let (nodes, _) = two_nodes(&[("REDIS_CLUSTER_NODES", rc.env())]);
    // Laravel's broadcaster on a Redis Cluster: a plain PUBLISH on any node reaches every
    // node's pattern subscription.
    let mut views = subscribers(&nodes, &[CH]);
    for n in &rc.nodes {
        if info_field(n.port, "replication", "role").as_deref() != Some("master") {
            continue;
        }
        let payload = r#"{"event":"laravel","data":{"via":"publish"},"socket":null}"#;
        redis_cmd(n.port, &["PUBLISH", "laravel_database_match.1", payload]).unwrap();
        for v in &mut views {
            let ev = v.next_event(Duration::from_secs(5));
            assert_eq!(ev["event"], "laravel", "{ev}");
        }
    }
    drop(views);
    // The nodes' channel is sharded: both nodes subscribe on its slot's primary only (no
    // classic subscription anywhere, so no node of the Redis Cluster relays their traffic to
    // all the others). Kill that primary.
    let victim = rc.owner_of("bts-guru");
    let owner = rc.nodes[victim].port;
    wait_for(Duration::from_secs(5), "both sharded subscriptions", || {
        let n: Vec<redis::Value> = redis::from_redis_value(
            redis_cmd(owner, &["PUBSUB", "SHARDNUMSUB", "bts-guru"]).unwrap(),
        )
        .unwrap();
        n.get(1) == Some(&redis::Value::Int(2))
    });
    for n in &rc.nodes {
        let v: Vec<redis::Value> =
            redis::from_redis_value(redis_cmd(n.port, &["PUBSUB", "NUMSUB", "bts-guru"]).unwrap())
                .unwrap();
        assert_eq!(v.get(1), Some(&redis::Value::Int(0)));
    }
    let out = stream_through(&nodes, Duration::from_secs(8), || {
        rc.nodes[victim].kill();
        Instant::now()
    });
    eprintln!(
        "redis cluster failover (SIGKILL of the primary of the nodes' channel slot, \
         cluster-node-timeout 1000 ms): cross-node delivery again after {:?} (node 0 -> 1) and \
         {:?} (node 1 -> 0); accepted {:?} events, refused {:?}; every accepted event reached \
         both viewers, in order, once",
        out.recovery[0], out.recovery[1], out.accepted, out.refused
    );
    nothing_lost(&nodes, &out);
}

/// A batch the outbox cannot take whole is refused whole: none of its events reaches anyone,
/// although some would have fit.
#[test]
fn a_batch_is_held_whole_or_refused_whole() {
    const T: Duration = Duration::from_secs(5);
    let mut redis = RedisServer::start();
    let (nodes, _) = two_nodes(&[
        ("REDIS_URL", redis.url()),
        ("BTS_CLUSTER_OUTBOX_BYTES", "4096".into()),
    ]);
    let mut a = nodes[0].client();
    a.subscribe(CH);
    redis.kill();
    wait_for(Duration::from_secs(10), "node 0 to see Redis down", || {
        up(&nodes[0])["redis"] == "disconnected"
    });
    let pad = "x".repeat(400);
    let data = |i: u64| format!(r#"{{"o":0,"i":{i},"pad":"{pad}"}}"#);
    // Four single events (~620 bytes each as the cluster carries them) are held.
    for i in 1..=4 {
        assert_eq!(nodes[0].api().trigger(&[CH], "tick", &data(i)).0, 200);
        assert_eq!(tick_of(&a.next_event(T)), (0, i));
    }
    let held = up(&nodes[0])["cluster_outbox_bytes"].as_u64().unwrap();
    assert!(held + 620 < 4096 && held + 3 * 620 > 4096, "held {held}");
    // A batch of three does not fit whole (one would): refused, and none of it delivered.
    let batch = |from: u64, n: u64| {
        let items: Vec<Value> = (from..from + n)
            .map(|i| serde_json::json!({"name":"tick","channel":CH,"data":data(i)}))
            .collect();
        serde_json::json!({ "batch": items }).to_string()
    };
    let (status, body) = nodes[0].api().post("batch_events", &batch(5, 3));
    assert_eq!(status, 503, "{body}");
    a.expect_silence(Duration::from_millis(500));
    assert_eq!(up(&nodes[0])["cluster_outbox_bytes"], held);
    // A batch of one fits.
    assert_eq!(nodes[0].api().post("batch_events", &batch(8, 1)).0, 200);
    assert_eq!(tick_of(&a.next_event(T)), (0, 8));
}

/// The positioned channel of the resume tests (`BTS_APP_RESUME=sports.*`).
const POS: &str = "sports.live";

/// What a viewer of the positioned channel received: (origin, number, epoch, offset), and
/// when.
type SeenAt = Arc<Mutex<Vec<((u64, u64, String, u64), Instant)>>>;

fn position_of(ev: &Value) -> (String, u64) {
    let p = ev["bts_position"]
        .as_str()
        .unwrap_or_else(|| panic!("no bts_position: {ev}"));
    split_position(p)
}

/// A subscriber of `POS` reading on its own thread until `stop`.
fn positioned_viewer(d: &Daemon, stop: &Arc<AtomicBool>) -> (SeenAt, JoinHandle<()>) {
    watch(d, POS, stop, |ev| {
        let (o, i) = tick_of(ev);
        let (epoch, off) = position_of(ev);
        ((o, i, epoch, off), Instant::now())
    })
}

/// Positioned channels across a Sentinel failover. Appends are held in the publishing node's
/// outbox until Redis answers them and sent again (with their idempotency keys) after the
/// failover, so every event the API accepted reaches both viewers, in order, with the same
/// position on both. The promoted replica has another replication id, so the channel's next
/// append starts a new epoch (Redis replicates asynchronously: the replica may lack the last
/// appends, whose offsets were already delivered): offsets are contiguous within each epoch,
/// and a client resuming from the old epoch is told `recovered: false`, while one resuming
/// within the new epoch gets its missed events.
#[test]
fn sentinel_failover_keeps_positioned_events_ordered_and_complete() {
    let mut s = Sentinels::start();
    let (nodes, _) = two_nodes(&[
        ("REDIS_SENTINELS", s.env()),
        ("REDIS_SENTINEL_MASTER", "mymaster".into()),
        ("BTS_APP_RESUME", "sports.*".into()),
    ]);
    let st = stream(
        &nodes,
        POS,
        positioned_viewer,
        Duration::from_secs(8),
        || {
            s.primary.kill();
            Instant::now()
        },
    );
    let (sent, accepted, struck) = (&st.sent, &st.accepted, st.struck);
    let seen_by_viewer = gather(st.viewers, &st.stop_view, |seen| {
        (0..2).all(|o| {
            let mut got: Vec<u64> = seen
                .iter()
                .filter(|e| e.0 .0 == o)
                .map(|e| e.0 .1)
                .collect();
            got.dedup();
            got.len() >= accepted[o as usize].len()
        })
    });
    let mut seen_by = Vec::new();
    let mut repeats = 0;
    let mut new_epoch_after = None;
    for (v, timed) in seen_by_viewer.into_iter().enumerate() {
        if v == 0 {
            let first_new = timed.iter().position(|e| e.0 .2 != timed[0].0 .2);
            new_epoch_after = first_new.map(|i| timed[i].1.saturating_duration_since(struck));
        }
        let seen: Vec<(u64, u64, String, u64)> = timed.into_iter().map(|e| e.0).collect();
        // Positions: contiguous offsets within an epoch, and exactly two epochs (before and
        // after the failover).
        let mut epochs: Vec<&str> = Vec::new();
        for w in seen.windows(2) {
            if w[0].2 == w[1].2 {
                assert_eq!(
                    w[1].3,
                    w[0].3 + 1,
                    "viewer on node {v}: offsets not contiguous: {:?} then {:?}",
                    w[0],
                    w[1]
                );
            }
        }
        for e in &seen {
            if epochs.last() != Some(&e.2.as_str()) {
                epochs.push(&e.2);
            }
        }
        assert_eq!(epochs.len(), 2, "viewer on node {v}: epochs {epochs:?}");
        // Every accepted event, in its origin's order. An event seen twice can only be one
        // that the dying primary announced and whose answer never came back: sent again, it
        // is in the new epoch.
        for (o, acc) in accepted.iter().enumerate() {
            let mine: Vec<&(u64, u64, String, u64)> =
                seen.iter().filter(|e| e.0 == o as u64).collect();
            let mut firsts: Vec<u64> = Vec::new();
            for e in &mine {
                if firsts.contains(&e.1) {
                    assert_eq!(e.2, epochs[1], "a repeat within one epoch: {e:?}");
                    repeats += 1;
                } else {
                    firsts.push(e.1);
                }
            }
            assert_got_accepted(&nodes, v, o, &firsts, acc);
        }
        seen_by.push(seen);
    }
    // The same events at the same positions on both nodes.
    assert_eq!(seen_by[0], seen_by[1], "the two viewers differ");
    let seen = &seen_by[0];
    let new_epoch = seen.last().unwrap().2.clone();
    let first_new = seen.iter().position(|e| e.2 == new_epoch).unwrap();
    let old_last = &seen[first_new - 1];
    let recovery = sent
        .iter()
        .flatten()
        .filter(|e| e.1 >= struck && e.2 == 200)
        .count();
    eprintln!(
        "sentinel failover, positioned channel: accepted {:?} events, refused {:?}; epoch \
         {} ended at offset {}, epoch {} began at offset {} ({} events after the kill); \
         repeats across the epoch change: {repeats}; both viewers saw the same {} events at \
         the same positions; the first event of the new epoch reached node 0's viewer {:?} \
         after the kill",
        [accepted[0].len(), accepted[1].len()],
        [
            sent[0].len() - accepted[0].len(),
            sent[1].len() - accepted[1].len()
        ],
        old_last.2,
        old_last.3,
        new_epoch,
        seen[first_new].3,
        recovery,
        seen.len(),
        new_epoch_after.unwrap()
    );
    // Resuming from the old epoch: recovered false. From within the new one: the events
    // after it, in order, then `bts:recovered`.
    let resume = |p: String| {
        let mut c = nodes[0].client();
        subscribe_at(&mut c, POS, Some(&p));
        c
    };
    let mut old = resume(format!("{}:{}", old_last.2, old_last.3));
    let rec = old.expect_event("bts:recovered");
    let data: Value = serde_json::from_str(rec["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["recovered"], false, "{rec}");
    let from = seen.len() - 5;
    let mut new = resume(format!("{}:{}", seen[from].2, seen[from].3));
    for e in &seen[from + 1..] {
        let ev = new.next_event(Duration::from_secs(5));
        assert_eq!(tick_of(&ev), (e.0, e.1));
        assert_eq!(position_of(&ev), (e.2.clone(), e.3));
    }
    let rec = new.expect_event("bts:recovered");
    let data: Value = serde_json::from_str(rec["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["recovered"], true, "{rec}");
    for d in &nodes {
        assert_eq!(up(d)["redis"], "connected");
    }
}

/// Positioned channels while Redis is away: their events are ordered by Redis, so they are
/// held (not delivered, not even locally), counted against the outbox's bounds (503 past
/// them, with the same body as plain events, and delivered nowhere), and once Redis is back
/// appended in order and delivered to the viewers of both nodes with contiguous positions.
#[test]
fn positioned_events_are_held_while_redis_is_away() {
    const T: Duration = Duration::from_secs(5);
    let Outage {
        mut redis,
        nodes,
        mut a,
        mut b,
        ..
    } = outage_setup(POS, &[("BTS_APP_RESUME", "sports.*".into())]);
    let port = redis.port;
    // Before the outage: delivered at once on both, at offset 1.
    assert_eq!(
        nodes[0].api().trigger(&[POS], "tick", r#"{"o":0,"i":0}"#).0,
        200
    );
    for c in [&mut a, &mut b] {
        let ev = c.next_event(T);
        assert_eq!(tick_of(&ev), (0, 0));
        assert_eq!(position_of(&ev).1, 1);
    }
    let (accepted, refused, down_at) =
        kill_redis_and_fill_the_outbox(&mut redis, &nodes[0], POS, |_| {});
    // Held: no viewer has any of them, not even node 0's own.
    a.expect_silence(Duration::from_millis(300));
    b.expect_silence(Duration::from_millis(300));
    up_with_the_outbox_full(&nodes[0], accepted.len());
    // Past the age bound a small event is refused too.
    refused_past_the_age_bound(&nodes[0], POS, down_at);
    // Redis back (empty: a new epoch): the held events are appended first, in order.
    let (_redis, after, took) = redis_back(port, &nodes[0], POS);
    let expected: Vec<u64> = accepted.iter().chain(&after).copied().collect();
    let mut positions = Vec::new();
    for (name, c) in [("node 0", &mut a), ("node 1", &mut b)] {
        let events = next_events(c, expected.len(), Duration::from_secs(10), || {
            format!(
                "{name}'s viewer expected {expected:?}; /up {}; node 0 stderr:\n{}",
                up(&nodes[0]),
                stderr_tail(&nodes[0], 20)
            )
        });
        let got: Vec<u64> = events.iter().map(|ev| tick_of(ev).1).collect();
        let pos: Vec<(String, u64)> = events.iter().map(position_of).collect();
        assert_eq!(got, expected, "{name}");
        assert!(!got.contains(&refused) && !got.contains(&999));
        c.expect_silence(Duration::from_millis(500));
        // One epoch (Redis lost the keys: not the one of offset 1), offsets 1, 2, ...
        assert!(pos.iter().all(|p| p.0 == pos[0].0), "{pos:?}");
        let offsets: Vec<u64> = pos.iter().map(|p| p.1).collect();
        assert_eq!(offsets, (1..=expected.len() as u64).collect::<Vec<_>>());
        positions.push(pos);
    }
    assert_eq!(positions[0], positions[1]);
    eprintln!(
        "positioned outage: {} events held (not delivered, even locally), then 503 (byte \
         bound 4096), then 503 (age bound 3 s); Redis back: accepted again after {took:?}, the \
         held ones appended first, in order, offsets 1..{} on both nodes",
        accepted.len(),
        expected.len()
    );
}

/// Positioned channels on a Redis Cluster: each channel's keys and append script go to its
/// slot's primary (two channels on two different primaries here), the announcements (a plain
/// PUBLISH in the script) reach both nodes' subscription wherever it is, positions are the
/// same on both nodes, and a node started later finds both histories (its preload scans every
/// primary): a client resuming there gets exactly what it missed.
#[test]
fn redis_cluster_positioned_channels_live_on_their_slots_primary() {
    const T: Duration = Duration::from_secs(5);
    let rc = RedisCluster::start();
    let env = [
        ("REDIS_CLUSTER_NODES", rc.env()),
        ("BTS_APP_RESUME", "sports.*".into()),
    ];
    let (nodes, _) = two_nodes(&env);
    // Both subscriptions of each node are made (the announcements' is Laravel's, which may
    // come up after the cluster channel's).
    for d in &nodes {
        wait_for(Duration::from_secs(10), "both subscriptions", || {
            up(d)["redis"] == "connected"
        });
    }
    let stream = |ch: &str| format!("bts:resume:{{test-app:{ch}}}:s");
    // Two channels whose keys live on different primaries.
    let first = "sports.c0".to_owned();
    let second = (1..100)
        .map(|i| format!("sports.c{i}"))
        .find(|c| rc.owner_of(&stream(c)) != rc.owner_of(&stream(&first)))
        .unwrap();
    let chans = [first, second];
    let mut viewers = subscribers(&nodes, &[&chans[0], &chans[1]]);
    for i in 1..=10u64 {
        for ch in &chans {
            let (status, body) = nodes[(i % 2) as usize].api().trigger(
                &[ch],
                "tick",
                &format!(r#"{{"o":0,"i":{i}}}"#),
            );
            assert_eq!(status, 200, "{body}");
        }
    }
    let mut positions: Vec<Vec<(String, u64, u64, String)>> = Vec::new();
    for v in &mut viewers {
        let mut got = Vec::new();
        let events = next_events(v, 20, T, || {
            format!("node 0 stderr:\n{}", stderr_tail(&nodes[0], 25))
        });
        for ev in events {
            let (e, o) = position_of(&ev);
            got.push((
                ev["channel"].as_str().unwrap().to_owned(),
                tick_of(&ev).1,
                o,
                e,
            ));
        }
        v.expect_silence(Duration::from_millis(300));
        for ch in &chans {
            let mine: Vec<_> = got.iter().filter(|g| &g.0 == ch).collect();
            let offsets: Vec<u64> = mine.iter().map(|g| g.2).collect();
            assert_eq!(offsets, (1..=10).collect::<Vec<_>>(), "{ch}: {mine:?}");
            let mut ticks: Vec<u64> = mine.iter().map(|g| g.1).collect();
            ticks.sort();
            assert_eq!(ticks, (1..=10).collect::<Vec<_>>());
        }
        positions.push(got);
    }
    let sorted = |mut v: Vec<(String, u64, u64, String)>| {
        v.sort();
        v
    };
    assert_eq!(sorted(positions[0].clone()), sorted(positions[1].clone()));
    // The keys are on each channel's slot primary.
    for ch in &chans {
        let owner = rc.nodes[rc.owner_of(&stream(ch))].port;
        let n: i64 =
            redis::from_redis_value(redis_cmd(owner, &["XLEN", &stream(ch)]).unwrap()).unwrap();
        assert_eq!(n, 10, "{ch} on 127.0.0.1:{owner}");
    }
    // A third node, started now, loads both histories.
    let late = Daemon::builder()
        .env("REDIS_PREFIX", "laravel_database_")
        .env("REVERB_SCALING_ENABLED", "true")
        .env(env[0].0, env[0].1.clone())
        .env(env[1].0, env[1].1.clone())
        .start();
    wait_for(Duration::from_secs(15), "the third node to join", || {
        up(&late)["cluster_nodes"] == 3
    });
    for ch in &chans {
        let epoch = &positions[0].iter().find(|g| &g.0 == ch).unwrap().3;
        // Its preload runs once its subscriptions are made.
        wait_for(Duration::from_secs(10), "the third node's preload", || {
            let mut c = late.client();
            c.send_json(serde_json::json!({"event":"pusher:subscribe","data":{"channel":ch}}));
            let ev = c.expect_event("pusher_internal:subscription_succeeded");
            ev["bts_position"] == format!("{epoch}:10")
        });
        let mut c = late.client();
        subscribe_at(&mut c, ch, Some(&format!("{epoch}:5")));
        for o in 6..=10 {
            let ev = c.next_event(T);
            assert_eq!(position_of(&ev), (epoch.clone(), o), "{ev}");
        }
        let rec = c.expect_event("bts:recovered");
        assert_eq!(rec["data"], r#"{"recovered":true,"missed":5}"#, "{rec}");
    }
    eprintln!(
        "redis cluster, positioned: {} and {} on primaries 127.0.0.1:{} and 127.0.0.1:{}; \
         offsets 1..10 on both nodes; a third node resumed both from offset 5",
        chans[0],
        chans[1],
        rc.nodes[rc.owner_of(&stream(&chans[0]))].port,
        rc.nodes[rc.owner_of(&stream(&chans[1]))].port
    );
}
