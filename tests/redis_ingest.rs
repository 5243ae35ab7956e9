//! Laravel's redis broadcaster as an ingest path: the exact EVAL Laravel runs, prefixes,
//! socket exclusion, malformed payloads, and Redis going away and coming back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);
const PREFIX: &str = "laravel_database_";

fn daemon_with(redis: &RedisServer, shards: usize) -> Daemon {
    Daemon::builder()
        .env("REDIS_URL", redis.url())
        .env("REDIS_PREFIX", PREFIX)
        .shards(shards)
        .start()
}

/// Waits until `/up` reports the ingest subscribed.
fn wait_connected(d: &Daemon) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http(d.addr, "GET", "/up", b"");
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["redis"] == "connected" {
            return v;
        }
        assert!(Instant::now() < deadline, "ingest never connected: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn laravel_eval_to_three_channels_reaches_each_subscriber_once() {
    let redis = RedisServer::start();
    let d = daemon_with(&redis, 2);
    wait_connected(&d);
    let channels = [
        "sports.football",
        "sports.football.leagues.premier-league",
        "sports.football.leagues.premier-league.matches.12345",
    ];
    let mut subs: Vec<Client> = channels
        .iter()
        .map(|ch| {
            let mut c = d.client();
            c.subscribe(ch);
            c
        })
        .collect();
    let data = json!({"match_id":12345,"home_team":{"id":101,"name":"Team A","score":2},"away_team":{"id":102,"name":"Team B","score":1}});
    redis.laravel_broadcast(PREFIX, &channels, "match.update", data.clone(), None);
    for (c, ch) in subs.iter_mut().zip(channels) {
        let ev = c.next_event(T);
        assert_eq!(ev["event"], "match.update");
        assert_eq!(ev["channel"], ch);
        // data is JSON-encoded as a string, as Pusher clients expect.
        let got: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
        assert_eq!(got, data);
        c.expect_silence(Duration::from_millis(200));
    }
}

#[test]
fn private_and_presence_channels_and_socket_exclusion() {
    let redis = RedisServer::start();
    let d = daemon_with(&redis, 2);
    wait_connected(&d);
    let mut a = d.client();
    let mut b = d.client();
    a.subscribe_private("private-orders.1");
    b.subscribe_private("private-orders.1");
    a.join("presence-match.1", "1", json!(null));
    b.join("presence-match.1", "2", json!(null));
    a.expect_event("pusher_internal:member_added");
    // toOthers(): Laravel sends the originator's socket id.
    redis.laravel_broadcast(
        PREFIX,
        &["private-orders.1", "presence-match.1"],
        "OrderShipped",
        json!({"id":1}),
        Some(&a.socket_id),
    );
    let mut got: Vec<String> = (0..2)
        .map(|_| b.next_event(T)["channel"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    assert_eq!(got, vec!["presence-match.1", "private-orders.1"]);
    a.expect_silence(Duration::from_millis(300));
    redis.laravel_broadcast(
        PREFIX,
        &["private-orders.1"],
        "OrderShipped",
        json!({"id":2}),
        None,
    );
    assert_eq!(a.next_event(T)["event"], "OrderShipped");
    assert_eq!(b.next_event(T)["event"], "OrderShipped");
}

#[test]
fn other_prefixes_and_malformed_payloads_are_ignored_and_counted() {
    let redis = RedisServer::start();
    let d = daemon_with(&redis, 1);
    wait_connected(&d);
    let mut c = d.client();
    c.subscribe("sports.football");
    let mut conn = redis.conn();
    let publish = |conn: &mut redis::Connection, ch: &str, payload: &str| {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(ch)
            .arg(payload)
            .query(conn)
            .unwrap();
    };
    // Another app's prefix, and a key-space-ish channel: not ours.
    publish(
        &mut conn,
        "other_app_sports.football",
        r#"{"event":"x","data":{}}"#,
    );
    publish(&mut conn, "sports.football", r#"{"event":"x","data":{}}"#);
    // Ours, but not Laravel's shape, or a bad channel name.
    for bad in ["not json", "[1,2]", r#"{"data":{}}"#, r#"{"event":"e"}"#] {
        publish(&mut conn, &format!("{PREFIX}sports.football"), bad);
    }
    publish(
        &mut conn,
        &format!("{PREFIX}bad channel"),
        r#"{"event":"e","data":{}}"#,
    );
    // Then a good one: the only thing the subscriber gets.
    publish(
        &mut conn,
        &format!("{PREFIX}sports.football"),
        r#"{"event":"ok","data":{"n":1},"socket":null}"#,
    );
    let ev = c.next_event(T);
    assert_eq!(ev["event"], "ok");
    c.expect_silence(Duration::from_millis(300));
    let up = wait_connected(&d);
    assert_eq!(up["redis_malformed"], 5, "{up}");
    assert_eq!(up["redis_events"], 1, "{up}");
}

#[test]
fn redis_down_at_start_then_restarted_mid_stream() {
    // Not started yet: the daemon serves locally and keeps retrying.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let d = Daemon::builder()
        .env("REDIS_URL", &url)
        .env("REDIS_PREFIX", PREFIX)
        .shards(2)
        .start();
    let (_, up) = http(d.addr, "GET", "/up", b"");
    let up: Value = serde_json::from_str(&up).unwrap();
    assert_eq!(up["redis"], "disconnected");
    let mut c = d.client();
    c.subscribe("sports.football");
    assert_eq!(d.api().trigger(&["sports.football"], "local", "{}").0, 200);
    assert_eq!(c.next_event(T)["event"], "local");

    let mut redis = RedisServer::start_on(port);
    let started = Instant::now();
    wait_connected(&d);
    let first_connect = started.elapsed();
    redis.laravel_broadcast(PREFIX, &["sports.football"], "seq", json!({"n":1}), None);
    assert_eq!(c.next_event(T)["data"], r#"{"n":1}"#);

    // Kill Redis mid-stream, leave it down long enough for the retry backoff to reach its cap,
    // and bring it back on the same port.
    redis.kill();
    drop(redis);
    std::thread::sleep(Duration::from_secs(2));
    let redis = RedisServer::start_on(port);
    let restarted = Instant::now();
    // Publish until one gets through: delivery resumes, and nothing arrives twice.
    let mut n = 2;
    let resumed = loop {
        redis.laravel_broadcast(PREFIX, &["sports.football"], "seq", json!({"n":n}), None);
        match c.next(Duration::from_millis(50)) {
            Got::Event(ev) => break ev,
            Got::Timeout => {}
            Got::Closed(code) => panic!("client closed {code:?}"),
        }
        n += 1;
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "delivery never resumed"
        );
    };
    let resume_after = restarted.elapsed();
    assert_eq!(resumed["event"], "seq");
    let first: Value = serde_json::from_str(resumed["data"].as_str().unwrap()).unwrap();
    let mut last = first["n"].as_u64().unwrap();
    loop {
        match c.next(Duration::from_millis(300)) {
            Got::Event(ev) => {
                let v: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
                let k = v["n"].as_u64().unwrap();
                assert!(k > last, "duplicate or reordered event {k} after {last}");
                last = k;
            }
            Got::Timeout => break,
            Got::Closed(code) => panic!("client closed {code:?}"),
        }
    }
    let up = wait_connected(&d);
    assert!(up["redis_reconnects"].as_u64().unwrap() >= 1, "{up}");
    eprintln!(
        "redis: first connect {first_connect:?} after start; delivery resumed {resume_after:?} after restart"
    );
    // Retries are at most 1 s apart, so delivery resumes within about a second.
    assert!(
        resume_after < Duration::from_millis(2500),
        "resumed only after {resume_after:?}"
    );
}

/// rediss:// with a private CA (REDIS_TLS_CA): certificates made with the openssl CLI.
#[test]
fn rediss_with_a_private_ca() {
    use std::process::Command;
    let dir = std::env::temp_dir().join(format!("bts-guru-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&dir)
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=bts-test-ca 2>/dev/null");
    sh("openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null");
    sh("printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf && openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 1 -extfile ext.cnf 2>/dev/null");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    // Killed however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(server);
    let url = format!("rediss://127.0.0.1:{port}/0");
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match client.get_connection() {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "TLS redis-server did not start: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let d = Daemon::builder()
        .env("REDIS_URL", &url)
        .env("REDIS_TLS_CA", dir.join("ca.crt").to_string_lossy())
        .env("REDIS_PREFIX", PREFIX)
        .start();
    wait_connected(&d);
    let mut c = d.client();
    c.subscribe("sports.football");
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{PREFIX}sports.football"))
        .arg(r#"{"event":"over.tls","data":{"ok":true},"socket":null}"#)
        .query(&mut conn)
        .unwrap();
    assert_eq!(c.next_event(T)["event"], "over.tls");
    let _ = std::fs::remove_dir_all(&dir);
}
