//! Bad input gets a clear error and the right Pusher or WebSocket close code; nothing else is
//! disturbed.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

/// Connects to `path`, expects `pusher:error` with `code` and then a close frame with `code`.
fn expect_refused(d: &Daemon, path: &str, code: u16) {
    let ws = ws_connect(d.addr, path);
    let mut c = Client {
        ws,
        socket_id: String::new(),
    };
    let (close, err) = c.expect_close(T);
    assert_eq!(close, Some(code), "close code for {path}");
    assert_eq!(err, Some(u64::from(code)), "pusher:error code for {path}");
}

#[test]
fn unknown_app_key_is_4001() {
    let d = Daemon::start(1);
    expect_refused(&d, "/app/nope?protocol=7", 4001);
}

#[test]
fn wrong_path_is_4005() {
    let d = Daemon::start(1);
    expect_refused(&d, "/socket?protocol=7", 4005);
    expect_refused(&d, &format!("/app/{APP_KEY}/extra?protocol=7"), 4005);
}

#[test]
fn protocol_version_is_checked() {
    let d = Daemon::start(1);
    expect_refused(&d, &format!("/app/{APP_KEY}"), 4008);
    expect_refused(&d, &format!("/app/{APP_KEY}?protocol=6"), 4007);
    expect_refused(&d, &format!("/app/{APP_KEY}?protocol=seven"), 4006);
}

#[test]
fn over_connection_limit_is_4004_and_frees_on_close() {
    let d = Daemon::builder()
        .env("REVERB_APP_MAX_CONNECTIONS", "2")
        .shards(2)
        .start();
    let a = d.client();
    let _b = d.client();
    expect_refused(&d, &format!("/app/{APP_KEY}?protocol=7"), 4004);
    a.close();
    // The slot frees once the server has seen the close.
    let mut ok = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(50));
        let mut ws = ws_connect(d.addr, &format!("/app/{APP_KEY}?protocol=7"));
        let v: serde_json::Value =
            serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
        if v["event"] == "pusher:connection_established" {
            ok = true;
            break;
        }
    }
    assert!(ok, "connection slot was not released");
}

#[test]
fn garbled_json_and_unknown_events_get_pusher_error_and_keep_the_connection() {
    let d = Daemon::start(1);
    let mut c = d.client();
    c.subscribe("sports.football");
    c.ws.send(tungstenite::Message::text("{not json")).unwrap();
    let ev = c.expect_event("pusher:error");
    assert_eq!(ev["data"]["code"], 4200);
    c.send_json(json!({"event":"pusher:bogus","data":{}}));
    let ev = c.expect_event("pusher:error");
    assert!(ev["data"]["message"]
        .as_str()
        .unwrap()
        .contains("pusher:bogus"));
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":"bad channel!"}}));
    let ev = c.expect_event("pusher:error");
    assert!(ev["data"]["message"]
        .as_str()
        .unwrap()
        .contains("Invalid channel"));
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":"x".repeat(201)}}));
    c.expect_event("pusher:error");
    // Still subscribed, still served.
    assert_eq!(
        d.api()
            .trigger(&["sports.football"], "match.update", "{}")
            .0,
        200
    );
    assert_eq!(c.next_event(T)["event"], "match.update");
}

#[test]
fn private_channel_needs_a_valid_signature_for_this_socket() {
    let d = Daemon::start(1);
    let mut c = d.client();
    let other = d.client();
    let ch = "private-sports.basketball.leagues.nba.matches.12345";
    // A signature made for another socket is refused with 4009; the connection stays.
    let stolen = format!(
        "{APP_KEY}:{}",
        hmac_hex(APP_SECRET, &format!("{}:{ch}", other.socket_id))
    );
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":ch,"auth":stolen}}));
    assert_eq!(c.expect_event("pusher:error")["data"]["code"], 4009);
    assert_eq!(d.api().trigger(&[ch], "match.event", "{}").0, 200);
    c.expect_silence(Duration::from_millis(300));
    let good = format!(
        "{APP_KEY}:{}",
        hmac_hex(APP_SECRET, &format!("{}:{ch}", c.socket_id))
    );
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":ch,"auth":good}}));
    assert_eq!(
        c.expect_event("pusher_internal:subscription_succeeded")["channel"],
        ch
    );
    assert_eq!(d.api().trigger(&[ch], "match.event", "{}").0, 200);
    assert_eq!(c.next_event(T)["channel"], ch);
}

#[test]
fn http_api_refuses_bad_requests_with_json_errors() {
    let d = Daemon::builder()
        .env("REVERB_MAX_REQUEST_SIZE", "50000")
        .start();
    let api = d.api();
    let body = json!({"name":"match.update","channel":"sports.football","data":"{}"}).to_string();
    // Wrong secret.
    let (s, v) = api.post_at("events", &body, now_secs(), "not-the-secret");
    assert_eq!(s, 401);
    assert!(v["error"].as_str().unwrap().contains("signature"), "{v}");
    // Stale timestamp (correctly signed).
    let (s, v) = api.post_at("events", &body, now_secs() - 601, APP_SECRET);
    assert_eq!(s, 401);
    assert!(v["error"].as_str().unwrap().contains("600"), "{v}");
    // data over the app's max message size (10,000 bytes by default).
    let big = json!({"name":"e","channel":"sports.football","data":"x".repeat(10_001)}).to_string();
    assert_eq!(api.post("events", &big).0, 413);
    let ok = json!({"name":"e","channel":"sports.football","data":"x".repeat(10_000)}).to_string();
    assert_eq!(api.post("events", &ok).0, 200);
    // Body over REVERB_MAX_REQUEST_SIZE.
    let huge =
        json!({"name":"e","channel":"sports.football","data":"x".repeat(60_000)}).to_string();
    assert_eq!(api.post("events", &huge).0, 413);
    // 101 channels.
    let chans: Vec<String> = (0..101).map(|i| format!("sports.c{i}")).collect();
    let many = json!({"name":"e","channels":chans,"data":"{}"}).to_string();
    let (s, v) = api.post("events", &many);
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("100"), "{v}");
    let hundred = json!({"name":"e","channels":chans[..100],"data":"{}"}).to_string();
    assert_eq!(api.post("events", &hundred).0, 200);
    // 11 events in a batch.
    let batch: Vec<_> = (0..11)
        .map(|_| json!({"name":"e","channel":"a","data":"{}"}))
        .collect();
    assert_eq!(
        api.post("batch_events", &json!({"batch":batch}).to_string())
            .0,
        400
    );
    // Malformed body, bad channel name, bad socket_id.
    assert_eq!(api.post("events", "{oops").0, 400);
    let bad = json!({"name":"e","channel":"no spaces","data":"{}"}).to_string();
    assert_eq!(api.post("events", &bad).0, 400);
    let bad = json!({"name":"e","channel":"a","data":"{}","socket_id":"abc"}).to_string();
    assert_eq!(api.post("events", &bad).0, 400);
    // Unknown app, unknown endpoint, health.
    let other = Api {
        app_id: "nope".into(),
        ..d.api()
    };
    assert_eq!(other.post("events", &body).0, 404);
    assert_eq!(http(d.addr, "GET", "/nope", b"").0, 404);
    let (s, b) = http(d.addr, "GET", "/up", b"");
    assert_eq!((s, b.as_str()), (200, r#"{"health":"OK"}"#));
}

/// Sends `bytes` on a fresh connection and returns the close code the server answers with.
fn close_code_for(d: &Daemon, bytes: &[u8]) -> Option<u16> {
    let mut c = d.client();
    c.ws.get_mut().write_all(bytes).unwrap();
    // tungstenite rejects some of what the server echoes for broken input; read raw instead.
    let mut s: &TcpStream = c.ws.get_ref();
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut s, &mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    // Find the server's close frame (0x88) among what came back.
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0f;
        let (len, hdr) = match buf[i + 1] & 0x7f {
            126 => (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(buf[i + 2..i + 10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        if op == 0x8 {
            return Some(u16::from_be_bytes([buf[i + hdr], buf[i + hdr + 1]]));
        }
        i += hdr + len;
    }
    None
}

#[test]
fn malformed_frames_get_the_right_close_code_and_others_keep_receiving() {
    let d = Daemon::start(2);
    let mut bystander = d.client();
    bystander.subscribe("sports.football");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", raw_frame(0x81, b"{}", false), 1002),
        ("reserved opcode", raw_frame(0x83, b"x", true), 1002),
        ("126-byte ping", raw_frame(0x89, &[0u8; 126], true), 1002),
        ("fragmented ping", raw_frame(0x09, b"", true), 1002),
        ("rsv bits", raw_frame(0xC1, b"{}", true), 1002),
        (
            "invalid utf-8",
            raw_frame(0x81, &[0xff, 0xfe, 0xfd], true),
            1007,
        ),
        ("binary", raw_frame(0x82, b"{}", true), 1003),
        ("oversize", raw_frame(0x81, &[b'a'; 10_001], true), 1009),
        (
            "close with reserved code",
            raw_frame(0x88, &1005u16.to_be_bytes(), true),
            1002,
        ),
    ];
    for (i, (name, bytes, want)) in cases.into_iter().enumerate() {
        assert_eq!(close_code_for(&d, &bytes), Some(want), "{name}");
        let data = format!("{{\"seq\":{i}}}");
        assert_eq!(
            d.api()
                .trigger(&["sports.football"], "match.update", &data)
                .0,
            200
        );
        assert_eq!(bystander.next_event(T)["data"], data, "after {name}");
    }
}

#[test]
fn close_handshake_echoes_the_code() {
    let d = Daemon::start(1);
    let c = d.client();
    let mut s = c.ws.get_ref().try_clone().unwrap();
    s.write_all(&raw_frame(0x88, &4321u16.to_be_bytes(), true))
        .unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while let Ok(n) = std::io::Read::read(&mut s, &mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&got[..4], &[0x88, 0x02, 0x10, 0xE1]); // unmasked close, code 4321
}

#[test]
fn fragmented_message_is_reassembled() {
    let d = Daemon::start(1);
    let mut c = d.client();
    let msg = json!({"event":"pusher:subscribe","data":{"channel":"sports.tennis"}}).to_string();
    let (a, b) = msg.as_bytes().split_at(10);
    let mut bytes = raw_frame(0x01, a, true);
    bytes.extend(raw_frame(0x89, b"hi", true)); // a ping between fragments is allowed
    bytes.extend(raw_frame(0x80, b, true));
    c.ws.get_mut().write_all(&bytes).unwrap();
    let ev = c.expect_event("pusher_internal:subscription_succeeded");
    assert_eq!(ev["channel"], "sports.tennis");
}

#[test]
fn message_size_limit_is_configurable_to_1_mb() {
    let d = Daemon::builder()
        .env("REVERB_APP_MAX_MESSAGE_SIZE", "1000000")
        .env("REVERB_MAX_REQUEST_SIZE", "1100000")
        .server_toml("max_outbound_bytes = 4000000")
        .start();
    let mut c = d.client();
    c.subscribe("sports.football");
    let data = "y".repeat(1_000_000);
    let body = json!({"name":"match.update","channel":"sports.football","data":data}).to_string();
    assert_eq!(d.api().post("events", &body).0, 200);
    let ev = c.next_event(T);
    assert_eq!(ev["data"].as_str().unwrap().len(), 1_000_000);
    // A client message just under the limit is accepted (answered), one over is 1009.
    let mut padded = json!({"event":"pusher:ping","data":{"pad":"z".repeat(999_000)}}).to_string();
    assert!(padded.len() < 1_000_000);
    c.ws.send(tungstenite::Message::text(std::mem::take(&mut padded)))
        .unwrap();
    c.expect_event("pusher:pong");
}

#[test]
fn slow_request_head_is_cut_off_at_the_handshake_timeout() {
    let d = Daemon::builder()
        .server_toml("handshake_timeout_secs = 1")
        .start();
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let started = std::time::Instant::now();
    let head = b"GET /app/test-key?protocol=7 HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    // One byte every 100 ms: each read is quick, the head never completes.
    for b in head.iter() {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        let mut buf = [0u8; 16];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
            Ok(_) => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "server kept a trickling request head open for {waited:?}"
    );
}
