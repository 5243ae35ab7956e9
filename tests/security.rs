//! Hostile input and what the logs give away: JSON nested 100,000 levels deep is refused with a
//! clear error (over WebSocket and the HTTP API) without crashing the daemon or growing its
//! memory, and secrets (app secret, Redis password, signatures) never reach its output, even at
//! debug level.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// `levels` of `open`, then `inner`, then as many `close`.
fn nested(open: &str, inner: &str, close: &str, levels: usize) -> String {
    format!("{}{inner}{}", open.repeat(levels), close.repeat(levels))
}

fn assert_alive(d: &mut Daemon, after: &str) {
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon died after {after}; stderr tail:\n{}",
        tail(&d.stderr(), 30)
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn deeply_nested_json_is_refused_and_nothing_else_is_disturbed() {
    let mut d = Daemon::builder()
        .env("REVERB_APP_MAX_MESSAGE_SIZE", "1000000")
        .env("REVERB_MAX_REQUEST_SIZE", "1100000")
        .env("REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM", "all")
        .server_toml("max_outbound_bytes = 4000000")
        .shards(1)
        .start();
    let mut bystander = d.client();
    bystander.subscribe("sports.football");
    let mut attacker = d.client();
    attacker.subscribe("sports.football");
    let channel = "private-sports.football";
    attacker.subscribe_private(channel);

    // Over WebSocket: each message is under the app's 1 MB limit and nests 100,000 levels.
    let messages = [
        (
            "100,000 [ in a client event's data",
            format!(
                r#"{{"event":"client-x","channel":"{channel}","data":{}}}"#,
                nested("[", "", "]", 100_000)
            ),
        ),
        (
            r#"100,000 {"a": in a client event's data"#,
            format!(
                r#"{{"event":"client-x","channel":"{channel}","data":{}}}"#,
                nested(r#"{"a":"#, "1", "}", 100_000)
            ),
        ),
        (
            "a top-level array 100,000 deep",
            nested("[", "", "]", 100_000),
        ),
        (
            "pusher:subscribe with data as a string 100,000 deep",
            json!({"event":"pusher:subscribe","data": nested("[", "", "]", 100_000)}).to_string(),
        ),
        (
            "pusher:ping with 300,000 unclosed [",
            format!(
                r#"{{"event":"pusher:ping","data":{}}}"#,
                "[".repeat(300_000)
            ),
        ),
    ];
    // Over the HTTP API (signed: only the secret's holder gets this far): 400, nothing published.
    let bodies = [
        (
            "data 100,000 [ deep",
            format!(
                r#"{{"name":"e","channel":"sports.football","data":{}}}"#,
                nested("[", "", "]", 100_000)
            ),
        ),
        (
            r#"an unknown field 100,000 {"a": deep"#,
            format!(
                r#"{{"name":"e","channel":"sports.football","data":"{{}}","x":{}}}"#,
                nested(r#"{"a":"#, "1", "}", 100_000)
            ),
        ),
    ];
    // The same sizes, shallow: what any large message costs the allocator, as the baseline.
    for (what, msg) in &messages {
        let pad = "p".repeat(msg.len() - 40);
        let shallow = json!({"event":"pusher:ping","data":{"pad":pad}}).to_string();
        attacker
            .ws
            .send(tungstenite::Message::text(shallow))
            .unwrap();
        assert_eq!(attacker.next_event(T)["event"], "pusher:pong", "{what}");
    }
    for (what, body) in &bodies {
        let pad = "p".repeat(body.len() - 60);
        let shallow = json!({"name":"e","channel":"sports.nobody","data":pad}).to_string();
        assert_eq!(d.api().post("events", &shallow).0, 200, "{what}");
    }
    let rss_before = d.rss_kib();
    eprintln!("RSS after shallow {rss_before}");
    for (what, msg) in &messages {
        assert!(msg.len() < 1_000_000, "{what}: {} bytes", msg.len());
        let started = Instant::now();
        attacker
            .ws
            .send(tungstenite::Message::text(msg.as_str()))
            .unwrap();
        let ev = attacker.next_event(T);
        assert_eq!(ev["event"], "pusher:error", "{what}: {ev}");
        assert_eq!(ev["data"]["code"], 4200, "{what}: {ev}");
        let text = ev["data"]["message"].as_str().unwrap_or_default();
        assert!(
            text.contains("nested deeper than 128 levels"),
            "{what}: {text}"
        );
        eprintln!(
            "{what}: {} bytes refused in {:?}: {text} RSS {}",
            msg.len(),
            started.elapsed(),
            d.rss_kib()
        );
        assert_alive(&mut d, what);
        // The connection is kept and still answered.
        attacker.send_json(json!({"event":"pusher:ping","data":{}}));
        assert_eq!(attacker.next_event(T)["event"], "pusher:pong", "{what}");
    }

    for (what, body) in &bodies {
        let (status, v) = d.api().post("events", body);
        assert_eq!(status, 400, "{what}: {v}");
        let text = v["error"].as_str().unwrap_or_default();
        assert!(
            text.contains("nested deeper than 128 levels"),
            "{what}: {v}"
        );
        eprintln!(
            "HTTP {what}: {} bytes answered 400: {text} RSS {}",
            body.len(),
            d.rss_kib()
        );
        assert_alive(&mut d, what);
    }
    let batch = format!(
        r#"{{"batch":[{{"name":"e","channel":"sports.football","data":{}}}]}}"#,
        nested("[", "", "]", 100_000)
    );
    assert_eq!(d.api().post("batch_events", &batch).0, 400);

    // Nothing was published by any of it; the next real event reaches both, in order.
    assert_eq!(
        d.api()
            .trigger(&["sports.football"], "match.update", r#"{"seq":1}"#)
            .0,
        200
    );
    for c in [&mut bystander, &mut attacker] {
        let ev = c.next_event(T);
        assert_eq!(
            (ev["event"].as_str(), ev["data"].as_str()),
            (Some("match.update"), Some(r#"{"seq":1}"#)),
            "{ev}"
        );
    }
    bystander.expect_silence(Duration::from_millis(200));
    // No large allocation stayed behind: the messages themselves were ~4 MB in all.
    let rss_after = d.rss_kib();
    eprintln!("daemon RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_alive(&mut d, "everything");
}

#[test]
fn secrets_never_reach_the_logs_even_at_debug_level() {
    // Distinctive values, so any appearance in the output is a leak and not a coincidence.
    let secret = format!("app-secret-{:x}", now_secs() ^ 0x5ec7e7);
    let password = format!("redis-pass-{:x}", now_secs() ^ 0xbadc0de);
    let wrong_password = format!("wrong-pass-{:x}", now_secs() ^ 0xfeed);
    let mut redis = RedisServer::start_with_password(&password);
    let redis_url = redis.url();
    let d = Daemon::builder()
        .env("REVERB_APP_SECRET", secret.as_str())
        .env("REDIS_URL", redis_url.as_str())
        .env("REDIS_PREFIX", "")
        .env("RUST_LOG", "debug")
        .env("BTS_LOG", "debug")
        .shards(2)
        .start();
    let api = Api {
        secret: secret.clone(),
        ..d.api()
    };
    let mut signatures: Vec<String> = Vec::new();

    // Connect; private auth, valid and invalid.
    let mut c = d.client();
    let ch = "private-sports.football";
    let good = hmac_hex(&secret, &format!("{}:{ch}", c.socket_id));
    let bad = hmac_hex("not-the-secret", &format!("{}:{ch}", c.socket_id));
    c.send_json(
        json!({"event":"pusher:subscribe","data":{"channel":ch,"auth":format!("{APP_KEY}:{bad}")}}),
    );
    assert_eq!(c.expect_event("pusher:error")["data"]["code"], 4009);
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":ch,"auth":format!("{APP_KEY}:{good}")}}));
    c.expect_event("pusher_internal:subscription_succeeded");
    signatures.extend([good, bad]);
    // Presence auth (its signature covers channel_data).
    let pch = "presence-room";
    let data = json!({"user_id":"u1","user_info":{}}).to_string();
    let psig = hmac_hex(&secret, &format!("{}:{pch}:{data}", c.socket_id));
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":pch,"auth":format!("{APP_KEY}:{psig}"),"channel_data":data}}));
    c.expect_event("pusher_internal:subscription_succeeded");
    signatures.push(psig);

    // HTTP API publish: valid, then signed with the wrong secret; a signed GET.
    let body = json!({"name":"e","channel":ch,"data":"{}"}).to_string();
    assert_eq!(api.post("events", &body).0, 200);
    assert_eq!(c.next_event(T)["event"], "e");
    let (s, _) = api.post_at("events", &body, now_secs(), "not-the-secret");
    assert_eq!(s, 401);
    assert_eq!(api.get("connections", &[]).0, 200);
    // The HTTP signatures these requests carried, recomputed the way Api signs them.
    for (sec, ts) in [
        (secret.as_str(), now_secs()),
        ("not-the-secret", now_secs()),
    ] {
        for t in [ts.saturating_sub(1), ts] {
            let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(body.as_bytes()));
            let q =
                format!("auth_key={APP_KEY}&auth_timestamp={t}&auth_version=1.0&body_md5={md5}");
            signatures.push(hmac_hex(sec, &format!("POST\n/apps/{APP_ID}/events\n{q}")));
        }
    }
    // An event through Redis reaches the subscriber (the ingest really used the password).
    let deadline = Instant::now() + T;
    loop {
        let mut conn = redis.conn();
        let payload = json!({"event":"from-redis","data":{},"socket":null}).to_string();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(ch)
            .arg(payload)
            .query(&mut conn)
            .unwrap();
        if let Got::Event(v) = c.next(Duration::from_millis(300)) {
            assert_eq!(v["event"], "from-redis");
            break;
        }
        assert!(Instant::now() < deadline, "Redis event never arrived");
    }
    // Redis goes away: the reconnect path logs too.
    redis.kill();
    std::thread::sleep(Duration::from_millis(1500));

    // A second daemon whose Redis password is wrong logs the failure, not the password.
    let redis2 = RedisServer::start_with_password(&password);
    let d2 = Daemon::builder()
        .env("REVERB_APP_SECRET", secret.as_str())
        .env(
            "REDIS_URL",
            format!("redis://:{wrong_password}@127.0.0.1:{}/0", redis2.port),
        )
        .env("RUST_LOG", "debug")
        .env("BTS_LOG", "debug")
        .start();
    let c2 = d2.client();
    c2.close();
    std::thread::sleep(Duration::from_millis(1000));

    for (name, daemon) in [
        ("daemon", &d),
        ("daemon with the wrong Redis password", &d2),
    ] {
        let log = daemon.stderr();
        assert!(
            log.lines().count() > 5,
            "{name}: expected a debug log, got:\n{log}"
        );
        assert!(
            log.contains("connected"),
            "{name}: debug lines missing:\n{log}"
        );
        let mut leaks = Vec::new();
        for (what, s) in [
            ("the app secret", secret.as_str()),
            ("the Redis password", password.as_str()),
            ("the wrong Redis password", wrong_password.as_str()),
        ] {
            if log.contains(s) {
                leaks.push(what.to_owned());
            }
        }
        for sig in &signatures {
            if log.contains(sig.as_str()) {
                leaks.push(format!("signature {sig}"));
            }
        }
        assert!(
            leaks.is_empty(),
            "{name} logged {leaks:?}:\n{}",
            tail(&log, 80)
        );
        eprintln!(
            "{name}: {} log lines, {} bytes: no secret, password or signature",
            log.lines().count(),
            log.len()
        );
    }
    // stdout carries the `ready` line and nothing else.
    for (name, daemon) in [("daemon", &d), ("second daemon", &d2)] {
        let out = daemon.stdout();
        assert_eq!(out.lines().count(), 1, "{name} stdout: {out}");
        assert!(out.starts_with("ready "), "{name} stdout: {out}");
    }
}
