//! A subscriber gets exactly what the HTTP API publishes, once, in order.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

#[test]
fn connection_established_carries_socket_id_and_activity_timeout() {
    let d = Daemon::start(1);
    let mut ws = ws_connect(
        d.addr,
        &format!("/app/{APP_KEY}?protocol=7&client=js&version=8.4.0&flash=false"),
    );
    let msg = ws.read().unwrap();
    let v: serde_json::Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!(v["event"], "pusher:connection_established");
    let data: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
    let sid = data["socket_id"].as_str().unwrap();
    let (a, b) = sid.split_once('.').unwrap();
    assert!(
        !a.is_empty() && a.bytes().all(|c| c.is_ascii_digit()),
        "{sid}"
    );
    assert!(
        !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit()),
        "{sid}"
    );
    assert_eq!(data["activity_timeout"], 30);
}

#[test]
fn subscribe_then_http_publish_delivers_exact_payload_once() {
    let d = Daemon::start(1);
    let mut c = d.client();
    c.subscribe("sports.football.leagues.premier-league");
    let data =
        json!({"match_id":12345,"home_team":{"id":101,"name":"Team A","score":2},"time":"75:00"})
            .to_string();
    let (status, body) = d.api().trigger(
        &["sports.football.leagues.premier-league"],
        "match.update",
        &data,
    );
    assert_eq!((status, body), (200, json!({})));
    let ev = c.next_event(T);
    assert_eq!(
        ev,
        json!({"event":"match.update","channel":"sports.football.leagues.premier-league","data":data})
    );
    c.expect_silence(Duration::from_millis(300));
}

#[test]
fn one_event_to_three_channels_reaches_each_subscriber_once() {
    let d = Daemon::start(2);
    let channels = [
        "sports.football",
        "sports.football.leagues.premier-league",
        "sports.football.leagues.premier-league.matches.12345",
    ];
    let mut clients: Vec<Client> = channels
        .iter()
        .map(|ch| {
            let mut c = d.client();
            c.subscribe(ch);
            c
        })
        .collect();
    // One more client on all three gets the event three times, once per channel.
    let mut all = d.client();
    for ch in channels {
        all.subscribe(ch);
    }
    let (status, _) = d
        .api()
        .trigger(&channels, "match.update", r#"{"match_id":12345}"#);
    assert_eq!(status, 200);
    for (c, ch) in clients.iter_mut().zip(channels) {
        let ev = c.next_event(T);
        assert_eq!(ev["channel"], ch);
        assert_eq!(ev["event"], "match.update");
        c.expect_silence(Duration::from_millis(200));
    }
    let mut got: Vec<String> = (0..3)
        .map(|_| all.next_event(T)["channel"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    let mut want: Vec<String> = channels.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
    all.expect_silence(Duration::from_millis(200));
}

#[test]
fn batch_of_ten_arrives_in_order() {
    let d = Daemon::start(2);
    let mut c = d.client();
    c.subscribe("sports.basketball.leagues.nba");
    let batch: Vec<_> = (0..10)
        .map(|i| json!({"channel":"sports.basketball.leagues.nba","name":"match.event","data":format!("{{\"seq\":{i}}}")}))
        .collect();
    let (status, body) = d
        .api()
        .post("batch_events", &json!({ "batch": batch }).to_string());
    assert_eq!(status, 200);
    assert_eq!(body, json!({"batch":[{},{},{},{},{},{},{},{},{},{}]}));
    for i in 0..10 {
        let ev = c.next_event(T);
        assert_eq!(ev["data"], format!("{{\"seq\":{i}}}"));
    }
    c.expect_silence(Duration::from_millis(200));
}

#[test]
fn socket_id_exclusion_skips_only_the_sender() {
    let d = Daemon::start(2);
    let mut sender = d.client();
    let mut other = d.client();
    sender.subscribe("sports.football");
    other.subscribe("sports.football");
    let body = json!({"name":"match.update","channel":"sports.football","data":"{}","socket_id":sender.socket_id});
    assert_eq!(d.api().post("events", &body.to_string()).0, 200);
    assert_eq!(other.next_event(T)["event"], "match.update");
    sender.expect_silence(Duration::from_millis(300));
}

#[test]
fn unsubscribe_stops_delivery() {
    let d = Daemon::start(1);
    let mut c = d.client();
    c.subscribe("sports.football");
    c.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"sports.football"}}));
    // A ping round-trip proves the unsubscribe was processed before we publish.
    c.send_json(json!({"event":"pusher:ping","data":{}}));
    c.expect_event("pusher:pong");
    assert_eq!(
        d.api()
            .trigger(&["sports.football"], "match.update", "{}")
            .0,
        200
    );
    c.expect_silence(Duration::from_millis(300));
}

#[test]
fn two_shards_both_hold_connections_and_all_receive() {
    let d = Daemon::start(2);
    let mut clients: Vec<Client> = (0..64).map(|_| d.client()).collect();
    for c in &mut clients {
        c.subscribe("sports.football.leagues.premier-league");
    }
    // Socket ids encode the shard: the low half is counter * shards + shard + 1.
    let mut per_shard = [0usize; 2];
    for c in &clients {
        let lo: u64 = c.socket_id.split_once('.').unwrap().1.parse().unwrap();
        per_shard[((lo - 1) % 2) as usize] += 1;
    }
    assert!(per_shard[0] > 0 && per_shard[1] > 0, "{per_shard:?}");
    for i in 0..5 {
        let (status, _) = d.api().trigger(
            &["sports.football.leagues.premier-league"],
            "match.update",
            &format!("{{\"seq\":{i}}}"),
        );
        assert_eq!(status, 200);
    }
    for c in &mut clients {
        for i in 0..5 {
            assert_eq!(c.next_event(T)["data"], format!("{{\"seq\":{i}}}"));
        }
    }
}

#[test]
fn pusher_ping_gets_pong() {
    let d = Daemon::start(1);
    let mut c = d.client();
    c.send_json(json!({"event":"pusher:ping","data":{}}));
    let ev = c.expect_event("pusher:pong");
    assert_eq!(ev["data"], "{}");
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    use std::io::{Read, Write};
    let d = Daemon::start(1);
    let mut c = d.client();
    c.subscribe("sports.football");
    let body = json!({"name":"match.update","channel":"sports.football","data":"x".repeat(2000)})
        .to_string();
    // Sign like Api::post does, but send the head alone first, as curl does for bodies > 1 KiB.
    let target = signed_events(body.as_bytes());
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200 OK"), "{rest}");
    assert_eq!(c.next_event(T)["event"], "match.update");
}
