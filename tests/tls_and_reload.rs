//! TLS on the main port (wss:// and https:// beside ws:// and http://, certificate re-read on
//! SIGHUP) and live reload of apps on SIGHUP, against the real binary.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bts-guru-tls-{tag}-{}-{}",
        std::process::id(),
        now_secs()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TLS client trusting only `ca`.
fn tls_connect(addr: SocketAddr, ca: &CertificateDer<'static>) -> Tls {
    tls_connect_any(addr, &[ca])
}

/// The certificate the server presented.
fn peer_cert(tls: &Tls) -> CertificateDer<'static> {
    tls.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// One HTTPS request with `Connection: close`; (status, body).
fn https(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    method: &str,
    target: &str,
    body: &[u8],
) -> (u16, String) {
    http_over(
        &mut tls_connect(addr, ca),
        "localhost",
        method,
        target,
        body,
    )
}

/// A signed `POST /apps/{id}/events` target for `body`.
fn signed_events_target(app_id: &str, key: &str, secret: &str, body: &str) -> String {
    signed_post(app_id, key, secret, "events", body.as_bytes(), now_secs())
}

/// A Pusher client over wss://.
fn wss_client(addr: SocketAddr, ca: &CertificateDer<'static>, key: &str) -> WebSocket<Tls> {
    let tls = tls_connect(addr, ca);
    let url = format!("wss://localhost:{}/app/{key}?protocol=7", addr.port());
    let (mut ws, resp) = tungstenite::client::client(url.as_str(), tls).expect("wss handshake");
    assert_eq!(resp.status().as_u16(), 101);
    let ev = next_json(&mut ws);
    assert_eq!(ev["event"], "pusher:connection_established", "{ev}");
    ws
}

fn next_json(ws: &mut WebSocket<Tls>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no message within 5 s");
        match ws.read() {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).unwrap(),
            Ok(_) => continue,
            Err(e) => panic!("wss read failed: {e}"),
        }
    }
}

fn wss_subscribe(ws: &mut WebSocket<Tls>, channel: &str) {
    ws.send(Message::text(
        json!({"event":"pusher:subscribe","data":{"channel":channel}}).to_string(),
    ))
    .unwrap();
    let ev = next_json(ws);
    assert_eq!(
        ev["event"], "pusher_internal:subscription_succeeded",
        "{ev}"
    );
}

fn tls_daemon(cert: &Cert) -> Daemon {
    Daemon::builder().tls(cert).shards(2).start()
}

#[test]
fn wss_and_https_share_the_port_with_ws_and_http() {
    let dir = scratch("share");
    let cert = make_cert(&dir, "a");
    let d = tls_daemon(&cert);
    let (status, body) = https(d.addr, &cert.der, "GET", "/up", b"");
    assert_eq!(status, 200, "{body}");
    // Plain HTTP on the same port still works.
    let (status, _) = http(d.addr, "GET", "/up", b"");
    assert_eq!(status, 200);

    let mut secure = wss_client(d.addr, &cert.der, APP_KEY);
    wss_subscribe(&mut secure, "sports.football.leagues.premier-league");
    let mut plain = d.client();
    plain.subscribe("sports.football.leagues.premier-league");

    // Publish over https:// (signed) with a payload larger than one TLS record.
    let big = "x".repeat(9_000);
    for seq in 0..20 {
        let data = json!({"seq": seq, "pad": big}).to_string();
        let body = json!({"name":"match.update","channels":["sports.football.leagues.premier-league"],"data":data}).to_string();
        let target = signed_events_target(APP_ID, APP_KEY, APP_SECRET, &body);
        let (status, resp) = https(d.addr, &cert.der, "POST", &target, body.as_bytes());
        assert_eq!(status, 200, "{resp}");
    }
    for seq in 0..20 {
        let a = next_json(&mut secure);
        assert_eq!(a["event"], "match.update");
        let data: Value = serde_json::from_str(a["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["seq"], seq);
        let b = plain.expect_event("match.update");
        let data: Value = serde_json::from_str(b["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["seq"], seq);
    }
    // Pusher ping/pong over TLS.
    secure
        .send(Message::text(r#"{"event":"pusher:ping","data":{}}"#))
        .unwrap();
    assert_eq!(next_json(&mut secure)["event"], "pusher:pong");
    // A bad signature over https:// is refused like over http://.
    let body = r#"{"name":"e","channels":["c"],"data":"{}"}"#;
    let target = signed_events_target(APP_ID, APP_KEY, "wrong-secret", body);
    let (status, _) = https(d.addr, &cert.der, "POST", &target, body.as_bytes());
    assert_eq!(status, 401);
    // Garbage that is neither TLS nor HTTP is answered 400 and closed; the server keeps going.
    let (status, _) = http(d.addr, "NOT-A-METHOD\u{1}", "/", b"");
    assert!(status == 400 || status == 0, "{status}");
    secure.close(None).unwrap();
    let (status, _) = https(d.addr, &cert.der, "GET", "/up", b"");
    assert_eq!(status, 200);
}

#[test]
fn a_bad_certificate_fails_start_with_a_clear_message() {
    let dir = scratch("bad");
    let cert = make_cert(&dir, "a");
    let other = make_cert(&dir, "b");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bts-guru"))
        .args(["--host", "127.0.0.1", "--port", "0", "--no-metrics"])
        .env("REVERB_APP_ID", APP_ID)
        .env("REVERB_APP_KEY", APP_KEY)
        .env("REVERB_APP_SECRET", APP_SECRET)
        .env("BTS_TLS_CERT", &cert.cert_path)
        .env("BTS_TLS_KEY", &other.key_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not work together"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bts-guru"))
        .args(["--host", "127.0.0.1", "--port", "0", "--no-metrics"])
        .env("REVERB_APP_ID", APP_ID)
        .env("REVERB_APP_KEY", APP_KEY)
        .env("REVERB_APP_SECRET", APP_SECRET)
        .env("BTS_TLS_CERT", dir.join("missing.crt"))
        .env("BTS_TLS_KEY", &cert.key_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read TLS certificate"), "{err}");
}

#[test]
fn sighup_rereads_the_certificate_and_open_connections_stay() {
    let dir = scratch("rotate");
    let first = make_cert(&dir, "live");
    let d = tls_daemon(&first);
    let before = tls_connect(d.addr, &first.der);
    assert_eq!(peer_cert(&before), first.der);
    let mut old = wss_client(d.addr, &first.der, APP_KEY);
    wss_subscribe(&mut old, "sports.tennis");

    // Rotate: new files at the same paths, then SIGHUP.
    let second = make_cert(&dir.join("next"), "next");
    std::fs::copy(&second.cert_path, &first.cert_path).unwrap();
    std::fs::copy(&second.key_path, &first.key_path).unwrap();
    d.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tls = tls_connect_any(d.addr, &[&first.der, &second.der]);
        if peer_cert(&tls) == second.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new certificate not served after SIGHUP; stderr:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        d.stderr().contains("configuration reloaded"),
        "{}",
        d.stderr()
    );
    // The connection made with the old certificate still receives.
    let (status, _) = d
        .api()
        .trigger(&["sports.tennis"], "match.update", r#"{"set":2}"#);
    assert_eq!(status, 200);
    assert_eq!(next_json(&mut old)["event"], "match.update");

    // A broken certificate on SIGHUP is refused; the server keeps serving the last good one.
    std::fs::write(&first.cert_path, "not a certificate").unwrap();
    d.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.stderr().contains("reload refused") {
        assert!(Instant::now() < deadline, "{}", d.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let tls = tls_connect(d.addr, &second.der);
    assert_eq!(peer_cert(&tls), second.der);
}

/// A TLS client trusting any of `cas` (to see which one the server presents).
fn tls_connect_any(addr: SocketAddr, cas: &[&CertificateDer<'static>]) -> Tls {
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.set_nodelay(true).unwrap();
    let mut tls = tls_client_over(sock, cas);
    // Finish the handshake now, so a certificate problem shows here.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls
}

fn app_toml(id: &str, key: &str, secret: &str, extra: &str) -> String {
    format!("[[apps]]\nid = \"{id}\"\nkey = \"{key}\"\nsecret = \"{secret}\"\n{extra}\n")
}

fn rewrite_config(d: &Daemon, apps: &str) {
    std::fs::write(d.dir.join("config.toml"), format!("[server]\n\n{apps}")).unwrap();
}

fn api_for(d: &Daemon, id: &str, key: &str, secret: &str) -> Api {
    Api {
        addr: d.addr,
        app_id: id.into(),
        key: key.into(),
        secret: secret.into(),
    }
}

fn wait_for_log(d: &Daemon, needle: &str, nth: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.stderr().matches(needle).count() < nth {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} (#{nth}) in stderr:\n{}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_adds_changes_and_removes_apps_without_touching_the_others() {
    // test-app comes from REVERB_APP_*; "scores" from the file.
    let d = Daemon::builder()
        .server_toml(&format!(
            "\n{}",
            app_toml("scores", "scores-key", "scores-secret", "")
        ))
        .shards(2)
        .start();
    let mut bystander = d.client();
    bystander.subscribe("sports.football");
    let mut scores = Client::connect(d.addr, "scores-key");
    scores.subscribe("sports.basketball");
    let mut refused = ws_connect(d.addr, "/app/extra-key?protocol=7");
    let ev: Value = match refused.read().unwrap() {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(ev["data"]["code"], 4001, "{ev}");

    // 1. Add "extra", change "scores" (activity timeout 30 -> 90).
    rewrite_config(
        &d,
        &format!(
            "{}{}",
            app_toml(
                "scores",
                "scores-key",
                "scores-secret",
                "activity_timeout = 90"
            ),
            app_toml("extra", "extra-key", "extra-secret", "")
        ),
    );
    d.signal("HUP");
    wait_for_log(&d, "configuration reloaded", 1);
    let log = d.stderr();
    assert!(log.contains(r#"added=["extra"]"#), "{log}");
    assert!(log.contains(r#"changed=["scores"]"#), "{log}");
    let mut extra = Client::connect(d.addr, "extra-key");
    extra.subscribe("sports.hockey");
    let (status, resp) = api_for(&d, "extra", "extra-key", "extra-secret").trigger(
        &["sports.hockey"],
        "match.update",
        "{}",
    );
    assert_eq!(status, 200, "{resp}");
    extra.expect_event("match.update");
    // The changed app's new connections get the new settings; its open one stays.
    let ws = ws_connect(d.addr, "/app/scores-key?protocol=7");
    let mut fresh = Client {
        ws,
        socket_id: String::new(),
    };
    let ev = fresh.expect_event("pusher:connection_established");
    let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["activity_timeout"], 90);
    let scores_api = api_for(&d, "scores", "scores-key", "scores-secret");
    let (status, _) = scores_api.trigger(&["sports.basketball"], "match.update", "{}");
    assert_eq!(status, 200);
    scores.expect_event("match.update");

    // 2. Remove "scores": its connections close with 4003, its key and id stop working, and
    // the other apps' connections do not notice.
    rewrite_config(&d, &app_toml("extra", "extra-key", "extra-secret", ""));
    d.signal("HUP");
    wait_for_log(&d, "configuration reloaded", 2);
    assert!(
        d.stderr().contains(r#"removed=["scores"]"#),
        "{}",
        d.stderr()
    );
    let (code, _) = scores.expect_close(Duration::from_secs(5));
    assert_eq!(code, Some(4003));
    let (code, _) = fresh.expect_close(Duration::from_secs(5));
    assert_eq!(code, Some(4003));
    let (status, _) = scores_api.trigger(&["sports.basketball"], "match.update", "{}");
    assert_eq!(status, 404);
    let mut gone = ws_connect(d.addr, "/app/scores-key?protocol=7");
    let ev: Value = match gone.read().unwrap() {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(ev["data"]["code"], 4001, "{ev}");
    let (status, _) = d
        .api()
        .trigger(&["sports.football"], "match.update", r#"{"still":true}"#);
    assert_eq!(status, 200);
    bystander.expect_event("match.update");
    let (status, _) = api_for(&d, "extra", "extra-key", "extra-secret").trigger(
        &["sports.hockey"],
        "match.update",
        "{}",
    );
    assert_eq!(status, 200);
    extra.expect_event("match.update");

    // 3. A broken file is refused as a whole: nothing changes.
    std::fs::write(d.dir.join("config.toml"), "[server\nnot toml").unwrap();
    d.signal("HUP");
    wait_for_log(&d, "reload refused", 1);
    let (status, _) = api_for(&d, "extra", "extra-key", "extra-secret").trigger(
        &["sports.hockey"],
        "match.update",
        "{}",
    );
    assert_eq!(status, 200);
    extra.expect_event("match.update");
    // 4. Removed apps come back in their old slot.
    rewrite_config(
        &d,
        &format!(
            "{}{}",
            app_toml("extra", "extra-key", "extra-secret", ""),
            app_toml("scores", "scores-key", "scores-secret", "")
        ),
    );
    d.signal("HUP");
    wait_for_log(&d, "configuration reloaded", 3);
    let mut back = Client::connect(d.addr, "scores-key");
    back.subscribe("sports.basketball");
    let (status, _) = scores_api.trigger(&["sports.basketball"], "match.update", "{}");
    assert_eq!(status, 200);
    back.expect_event("match.update");
}
