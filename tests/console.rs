//! The debug console and `bts-guru demo`, over real sockets: the console is off unless enabled,
//! the page and its stats need the token (the app secret, or BTS_CONSOLE_TOKEN when set), the
//! assets are the vendored pusher-js and the page's own code, and the stats report connections
//! per shard, channels with their subscribers, events in and delivery latency. The demo prints
//! its console URL, honours REVERB_* like the daemon, feeds itself through its HTTP API, and
//! refuses a port a daemon already listens on.
//!
//! What the page does in a browser is tests/console_browser.rs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PUSHER_JS: &str = include_str!("../src/console/assets/pusher.min.js");
const PUSHER_NOTICE: &str = include_str!("../src/console/assets/pusher.min.js.LICENSE.txt");
const COMPAT_PACKAGE: &str = include_str!("compat/package.json");

fn stats(addr: std::net::SocketAddr, token: &str) -> Value {
    let (status, ctype, body) = http_get(addr, &format!("/console/api/stats?token={token}"), &[]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(ctype, "application/json");
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn console_is_off_unless_enabled() {
    let d = Daemon::start(1);
    for path in [
        "/console",
        "/console?token=test-secret",
        "/console/api/stats?token=test-secret",
        "/console/pusher.min.js",
    ] {
        let (status, ctype, _) = http_get(d.addr, path, &[]);
        assert_eq!(
            (status, ctype.as_str()),
            (404, "application/json"),
            "{path}"
        );
    }
}

#[test]
fn page_and_stats_need_the_app_secret_and_assets_are_served() {
    let d = Daemon::builder().arg("--console").start();
    // Without the token, or with a wrong one: the page asks for it, the stats refuse.
    for target in [
        "/console",
        "/console?token=",
        "/console?token=test-secre",
        "/console/?token=test-secretX",
    ] {
        let (status, ctype, body) = http_get(d.addr, target, &[]);
        let body = String::from_utf8(body).unwrap();
        assert_eq!(status, 401, "{target}");
        assert_eq!(ctype, "text/html; charset=utf-8");
        assert!(
            body.contains(r#"name="token""#),
            "{target}: login form: {body}"
        );
        assert!(
            !body.contains("console.js"),
            "{target}: not the console page"
        );
    }
    for (target, headers) in [
        ("/console/api/stats", vec![]),
        ("/console/api/stats?token=nope", vec![]),
        (
            "/console/api/stats",
            vec![("Authorization", "Bearer test-secreT")],
        ),
        ("/console/api/stats", vec![("Authorization", "test-secret")]),
    ] {
        let (status, ctype, body) = http_get(d.addr, target, &headers);
        assert_eq!(
            (status, ctype.as_str()),
            (401, "application/json"),
            "{target} {headers:?}"
        );
        let err: Value = serde_json::from_slice(&body).unwrap();
        assert!(err["error"].as_str().unwrap().contains("token"), "{err}");
    }
    // With it: the page, and the stats by query or by bearer header.
    let (status, ctype, body) = http_get(d.addr, "/console?token=test-secret", &[]);
    let page = String::from_utf8(body).unwrap();
    assert_eq!((status, ctype.as_str()), (200, "text/html; charset=utf-8"));
    assert!(
        page.contains(r#"<script src="/console/pusher.min.js"></script>"#),
        "{page}"
    );
    assert!(
        page.contains(r#"<script src="/console/console.js"></script>"#),
        "{page}"
    );
    let (status, _, _) = http_get(
        d.addr,
        "/console/api/stats",
        &[("Authorization", "Bearer test-secret")],
    );
    assert_eq!(status, 200);
    assert_eq!(stats(d.addr, "test-secret")["app"]["key"], APP_KEY);
    // Only GET, only known paths, only known apps.
    let (status, _) = http(
        d.addr,
        "POST",
        "/console/api/stats?token=test-secret",
        b"{}",
    );
    assert_eq!(status, 405);
    let (status, _, _) = http_get(d.addr, "/console/secrets?token=test-secret", &[]);
    assert_eq!(status, 404);
    let (status, _, _) = http_get(d.addr, "/console/api/stats?token=test-secret&app=nope", &[]);
    assert_eq!(status, 404);

    // Assets: code and no data, so no token; pusher-js is the vendored copy of the version the
    // client-compatibility tests pin.
    let (status, ctype, js) = http_get(d.addr, "/console/pusher.min.js", &[]);
    assert_eq!(
        (status, ctype.as_str()),
        (200, "text/javascript; charset=utf-8")
    );
    assert_eq!(js, PUSHER_JS.as_bytes());
    let package: Value = serde_json::from_str(COMPAT_PACKAGE).unwrap();
    let pinned = package["dependencies"]["pusher-js"].as_str().unwrap();
    assert!(
        PUSHER_NOTICE.contains(&format!(" * Pusher JavaScript Library v{pinned}\n"))
            && PUSHER_JS.contains(&format!("=\"{pinned}\",")),
        "vendored pusher.min.js is not pusher-js {pinned}"
    );
    let installed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/compat/node_modules/pusher-js/dist/web/pusher.min.js");
    if let Ok(npm) = std::fs::read(&installed) {
        assert!(
            npm == PUSHER_JS.as_bytes(),
            "src/console/assets/pusher.min.js differs from {}",
            installed.display()
        );
    }
    let (status, ctype, js) = http_get(d.addr, "/console/console.js", &[]);
    assert_eq!(
        (status, ctype.as_str()),
        (200, "text/javascript; charset=utf-8")
    );
    assert!(String::from_utf8(js)
        .unwrap()
        .contains("/console/api/stats"));
    let (status, ctype, _) = http_get(d.addr, "/console/console.css", &[]);
    assert_eq!((status, ctype.as_str()), (200, "text/css; charset=utf-8"));
    let (status, _, licence) = http_get(d.addr, "/console/pusher-js-LICENCE.txt", &[]);
    assert_eq!(status, 200);
    assert!(String::from_utf8(licence).unwrap().contains("Pusher, Ltd"));
    // The rest of the port works as before, keep-alive included.
    let (status, _) = http(d.addr, "GET", "/up", b"");
    assert_eq!(status, 200);
}

#[test]
fn a_configured_token_replaces_the_secret() {
    let d = Daemon::builder()
        .env("BTS_CONSOLE", "true")
        .env("BTS_CONSOLE_TOKEN", "console-token-1")
        .start();
    let (status, _, _) = http_get(d.addr, "/console?token=test-secret", &[]);
    assert_eq!(status, 401, "the secret no longer opens it");
    let (status, _, _) = http_get(d.addr, "/console/api/stats?token=test-secret", &[]);
    assert_eq!(status, 401);
    let (status, _, _) = http_get(d.addr, "/console?token=console-token-1", &[]);
    assert_eq!(status, 200);
    assert_eq!(stats(d.addr, "console-token-1")["app"]["id"], APP_ID);

    let d = Daemon::builder()
        .server_toml("console = true\nconsole_token = \"from-the-file\"")
        .start();
    let (status, _, _) = http_get(d.addr, "/console?token=from-the-file", &[]);
    assert_eq!(status, 200, "[server] console = true turns it on");
}

/// One GET from source address `from` (any 127.x address reaches the daemon on 127.0.0.1);
/// returns the status and the response head.
fn get_from(from: std::net::Ipv4Addr, addr: std::net::SocketAddr, target: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&std::net::SocketAddr::from((from, 0)).into())
        .unwrap();
    s.connect(&addr.into()).unwrap();
    let mut s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (status, head)
}

fn has_header(head: &str, name: &str, value: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.eq_ignore_ascii_case(name) && v.trim() == value)
    })
}

#[test]
fn the_token_is_compared_exactly_pages_are_not_cached_and_failed_logins_are_limited() {
    let d = Daemon::builder().arg("--console").shards(1).start();
    let me = std::net::Ipv4Addr::LOCALHOST;
    // Zero bytes after the secret made the same HMAC key as the secret itself, so
    // `?token=test-secret%00` used to open the console.
    for target in [
        "/console?token=test-secret%00",
        "/console/api/stats?token=test-secret%00%00",
        "/console/api/stats?token=test-secret%20",
    ] {
        assert_eq!(get_from(me, d.addr, target).0, 401, "{target}");
    }
    // Every console answer, whatever it is, says: do not cache, do not refer, do not frame.
    for (target, status) in [
        ("/console?token=test-secret", 200),
        ("/console", 401),
        ("/console/api/stats?token=test-secret", 200),
        ("/console/console.js", 200),
        ("/console/nothing-here", 404),
    ] {
        let (got, head) = get_from(me, d.addr, target);
        assert_eq!(got, status, "{target}");
        for (name, value) in [
            ("Cache-Control", "no-store"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
        ] {
            assert!(has_header(&head, name, value), "{target}: {name}\n{head}");
        }
    }
    // Ten wrong tokens in a minute from one address (three above, seven here): the eleventh
    // request is refused, the right token included, so guessing learns nothing more.
    for i in 0..7 {
        let (status, _) = get_from(me, d.addr, &format!("/console/api/stats?token=guess-{i}"));
        assert_eq!(status, 401);
    }
    for target in [
        "/console?token=test-secret",
        "/console/api/stats?token=test-secret",
    ] {
        let (status, head) = get_from(me, d.addr, target);
        assert_eq!(status, 429, "{target}\n{head}");
        assert!(has_header(&head, "Retry-After", "60"), "{head}");
        assert!(has_header(&head, "Cache-Control", "no-store"), "{head}");
    }
    // Another address is not locked out, and the rest of the port is not either.
    let (status, _) = get_from(
        std::net::Ipv4Addr::new(127, 0, 0, 2),
        d.addr,
        "/console/api/stats?token=test-secret",
    );
    assert_eq!(status, 200);
    assert_eq!(get_from(me, d.addr, "/up").0, 200);
    let mut c = d.client();
    c.subscribe("sports.football");
}

#[test]
fn a_token_too_short_fails_start_up_by_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bts-guru"))
        .args(["--env-file", "/dev/null", "--port", "0", "--console"])
        .env("BTS_CONSOLE_TOKEN", "short")
        .env_remove("REVERB_APP_ID")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("BTS_CONSOLE_TOKEN"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn stats_report_connections_channels_events_and_latency() {
    const SHARDS: u64 = 2;
    let d = Daemon::builder()
        .shards(SHARDS as usize)
        .arg("--console")
        .start();
    let s = stats(d.addr, "test-secret");
    assert_eq!(s["connections"], 0);
    assert_eq!(s["events_in_total"], 0);
    assert_eq!(s["latency_us"]["count"], 0);
    assert_eq!(s["channels"], json!([]));
    assert_eq!(
        s["scoreboard"],
        json!(["sports.football", "sports.basketball"])
    );

    let mut clients: Vec<Client> = (0..8).map(|_| d.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.subscribe(if i < 5 {
            "sports.football"
        } else {
            "sports.basketball"
        });
    }
    for n in 0..3 {
        let (status, _) = d
            .api()
            .trigger(&["sports.football"], "match.update", &n.to_string());
        assert_eq!(status, 200);
    }
    for c in clients.iter_mut().take(5) {
        for _ in 0..3 {
            c.expect_event("match.update");
        }
    }
    let mut per_shard = vec![0u64; SHARDS as usize];
    for c in &clients {
        per_shard[c.shard(SHARDS) as usize] += 1;
    }

    let s = stats(d.addr, "test-secret");
    assert_eq!(s["app"], json!({ "id": APP_ID, "key": APP_KEY }));
    assert_eq!(s["connections"], 8, "{s}");
    assert_eq!(s["shard_count"], SHARDS);
    let shards: Vec<(u64, u64)> = s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["shard"].as_u64().unwrap(),
                x["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shards, vec![(0, per_shard[0]), (1, per_shard[1])], "{s}");
    assert_eq!(
        s["channels"],
        json!([
            { "name": "sports.football", "subscriptions": 5 },
            { "name": "sports.basketball", "subscriptions": 3 },
        ])
    );
    assert_eq!(s["channel_count"], 2);
    assert_eq!(
        s["events_in"],
        json!({ "http": 3, "client": 0, "redis": 0, "cluster": 0 })
    );
    assert_eq!(s["events_in_total"], 3);
    // 8 connection_established + 8 subscription_succeeded + 15 deliveries, at least.
    assert!(s["frames_out"].as_u64().unwrap() >= 31, "{s}");
    assert!(s["bytes_out"].as_u64().unwrap() > 0, "{s}");
    let l = &s["latency_us"];
    let get = |k: &str| l[k].as_u64().unwrap();
    // One sample per event per shard with subscribers of its channel.
    assert!((3..=3 * SHARDS).contains(&get("count")), "{l}");
    assert!(get("p50") >= 1, "{l}");
    assert!(
        get("p50") <= get("p90")
            && get("p90") <= get("p99")
            && get("p99") <= get("p999")
            && get("p999") <= get("max"),
        "{l}"
    );
    assert!(s["time_ms"].as_u64().unwrap() > 0);

    // Unsubscribing shows at the next poll.
    for c in clients.drain(5..) {
        c.close();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats(d.addr, "test-secret");
        if s["connections"] == 5 {
            assert_eq!(
                s["channels"],
                json!([{ "name": "sports.football", "subscriptions": 5 }])
            );
            break;
        }
        assert!(Instant::now() < deadline, "closes not counted: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn demo_prints_its_console_url_and_feeds_itself() {
    let demo = Demo::start(&["--shards", "2"], &["--port", "0"], &[]);
    assert_eq!(demo.addr.ip().to_string(), "127.0.0.1");
    assert_eq!(
        demo.url,
        format!("http://{}/console?token=bts-guru-dev-secret", demo.addr)
    );
    let (status, _, _) = http_get(demo.addr, "/console?token=bts-guru-dev-secret", &[]);
    assert_eq!(status, 200);
    // A viewer of a sport channel gets the simulator's updates.
    let mut viewer = Client::connect(demo.addr, "bts-guru-dev-key");
    viewer.subscribe("sports.football");
    let update = viewer.next_event(Duration::from_secs(15));
    assert_eq!(update["event"], "match.update", "{update}");
    let data: Value = serde_json::from_str(update["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["sport_id"], "football", "{data}");
    let s = stats(demo.addr, demo.token());
    assert!(s["events_in"]["http"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["shard_count"], 2);
    assert!(demo.stderr().contains("simulate:"), "{}", demo.stderr());
}

#[test]
fn demo_honours_the_daemons_configuration() {
    // REVERB_* as the daemon reads them: the app, its secret as the token, the port.
    let demo = Demo::start(
        &[],
        &[],
        &[
            ("REVERB_APP_ID", APP_ID),
            ("REVERB_APP_KEY", APP_KEY),
            ("REVERB_APP_SECRET", APP_SECRET),
            ("REVERB_SERVER_HOST", "127.0.0.1"),
            ("REVERB_SERVER_PORT", "0"),
        ],
    );
    assert_eq!(demo.token(), APP_SECRET);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(demo.addr, APP_SECRET);
        assert_eq!(s["app"]["id"], APP_ID);
        if s["events_in"]["http"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the simulator published nothing: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A configured console token opens it instead, and is what the URL carries.
    let demo = Demo::start(
        &[],
        &["--port", "0"],
        &[("BTS_CONSOLE_TOKEN", "demo token/1")],
    );
    assert_eq!(demo.token(), "demo+token%2F1");
    let (status, _, _) = http_get(demo.addr, &format!("/console?token={}", demo.token()), &[]);
    assert_eq!(status, 200);
}

#[test]
fn demo_refuses_a_port_a_daemon_listens_on() {
    // A running daemon listens with SO_REUSEPORT: binding beside it would succeed and split its
    // clients, so the demo must refuse instead.
    let d = Daemon::start(1);
    let port = d.addr.port().to_string();
    let (mut child, stderr_path) = Demo::spawn(&[], &["--port", &port], &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("demo did not refuse port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(stderr_path).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&port) && stderr.contains("--port"),
        "{stderr}"
    );
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert_eq!(out, "", "no ready line");
    // The daemon still serves its clients.
    let mut c = d.client();
    c.subscribe("news");
}
