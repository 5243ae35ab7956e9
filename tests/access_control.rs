//! Allowed origins per app (4009 "Origin not allowed") and Reverb-style message rate limits
//! (4301, optionally terminating).

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::json;
use tungstenite::client::IntoClientRequest;

const T: Duration = Duration::from_secs(5);

fn connect_with_origin(d: &Daemon, origin: Option<&str>) -> Client {
    let stream = TcpStream::connect(d.addr).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    let mut req = format!("ws://{}/app/{APP_KEY}?protocol=7", d.addr)
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    let (ws, _) = tungstenite::client::client(req, stream).unwrap();
    Client {
        ws,
        socket_id: String::new(),
    }
}

#[test]
fn origins_outside_the_allowed_list_are_refused_with_4009() {
    let d = Daemon::builder()
        .env("BTS_APP_ALLOWED_ORIGINS", "scores.example.com, *.bts.test")
        .start();
    for ok in ["https://scores.example.com", "https://live.bts.test"] {
        let mut c = connect_with_origin(&d, Some(ok));
        assert_eq!(
            c.next_event(T)["event"],
            "pusher:connection_established",
            "{ok}"
        );
    }
    for bad in [Some("https://evil.example.com"), None] {
        let mut c = connect_with_origin(&d, bad);
        let (close, err) = c.expect_close(T);
        assert_eq!((close, err), (Some(4009), Some(4009)), "{bad:?}");
    }
}

#[test]
fn message_rate_limit_answers_4301_and_can_terminate() {
    let d = Daemon::builder()
        .env("REVERB_APP_RATE_LIMITING_ENABLED", "true")
        .env("REVERB_APP_RATE_LIMITING_MAX_ATTEMPTS", "5")
        .env("REVERB_APP_RATE_LIMITING_DECAY_SECONDS", "1")
        .start();
    let mut c = d.client();
    for _ in 0..7 {
        c.send_json(json!({"event":"pusher:ping","data":{}}));
    }
    let mut pongs = 0;
    let mut limited = 0;
    while let Got::Event(ev) = c.next(Duration::from_millis(300)) {
        match ev["event"].as_str().unwrap() {
            "pusher:pong" => pongs += 1,
            "pusher:error" => {
                assert_eq!(ev["data"]["code"], 4301);
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((pongs, limited), (5, 2));
    // A new window lets messages through again; the connection was kept.
    std::thread::sleep(Duration::from_millis(1100));
    c.send_json(json!({"event":"pusher:ping","data":{}}));
    c.expect_event("pusher:pong");

    let d = Daemon::builder()
        .env("REVERB_APP_RATE_LIMITING_ENABLED", "true")
        .env("REVERB_APP_RATE_LIMITING_MAX_ATTEMPTS", "2")
        .env("REVERB_APP_RATE_LIMIT_TERMINATE", "true")
        .start();
    let mut c = d.client();
    for _ in 0..3 {
        c.send_json(json!({"event":"pusher:ping","data":{}}));
    }
    assert_eq!(c.expect_close(T), (Some(4301), Some(4301)));
}
