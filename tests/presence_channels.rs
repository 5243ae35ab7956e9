//! Presence channels: membership per user across shards, member_added / member_removed once per
//! user and never to the socket that caused them, limits, and counts exact under churn.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CH: &str = "presence-sports.football.leagues.premier-league.matches.12345";

/// Connects until it has a client on each of two shards.
fn one_per_shard(d: &Daemon) -> (Client, Client) {
    let mut on = [None, None];
    while on.iter().any(Option::is_none) {
        let c = d.client();
        let s = c.shard(2) as usize;
        if on[s].is_none() {
            on[s] = Some(c);
        }
    }
    let [a, b] = on;
    (a.unwrap(), b.unwrap())
}

fn event_data(ev: &Value) -> Value {
    serde_json::from_str(ev["data"].as_str().unwrap()).unwrap()
}

#[test]
fn same_user_on_two_shards_is_one_member() {
    let d = Daemon::start(2);
    let (mut watcher, _) = one_per_shard(&d);
    let here = watcher.join(CH, "watcher", json!({"name":"W"}));
    assert_eq!(here["count"], 1);
    assert_eq!(here["ids"], json!(["watcher"]));

    // User 7 opens a tab on each shard.
    let (mut tab1, mut tab2) = one_per_shard(&d);
    let here = tab1.join(CH, "7", json!({"name":"Ann"}));
    assert_eq!(here["count"], 2);
    assert_eq!(here["hash"]["7"]["name"], "Ann");
    assert_eq!(here["hash"]["watcher"]["name"], "W");
    let added = watcher.expect_event("pusher_internal:member_added");
    assert_eq!(added["channel"], CH);
    assert_eq!(
        event_data(&added),
        json!({"user_id":"7","user_info":{"name":"Ann"}})
    );
    // The joining socket is not told about itself.
    tab1.expect_silence(Duration::from_millis(300));

    // The second tab of the same user: a member already, nobody is told.
    let here = tab2.join(CH, "7", json!({"name":"Ann"}));
    assert_eq!(here["count"], 2);
    watcher.expect_silence(Duration::from_millis(300));
    tab1.expect_silence(Duration::from_millis(100));

    // Closing one of two tabs removes nobody.
    tab1.close();
    watcher.expect_silence(Duration::from_millis(500));
    let (s, users) = d.api().get(&format!("channels/{CH}/users"), &[]);
    assert_eq!(s, 200);
    let mut ids: Vec<String> = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["7", "watcher"]);

    // Closing the last tab removes the user, once.
    tab2.close();
    let removed = watcher.expect_event("pusher_internal:member_removed");
    assert_eq!(event_data(&removed), json!({"user_id":"7"}));
    watcher.expect_silence(Duration::from_millis(300));
}

#[test]
fn unsubscribe_leaves_and_numeric_user_ids_are_strings() {
    let d = Daemon::start(2);
    let mut a = d.client();
    let mut b = d.client();
    a.join(CH, "1", json!(null));
    // A numeric user_id in channel_data is a string member id.
    let data = json!({"user_id": 2}).to_string();
    let auth = format!(
        "{APP_KEY}:{}",
        hmac_hex(APP_SECRET, &format!("{}:{CH}:{data}", b.socket_id))
    );
    b.send_json(
        json!({"event":"pusher:subscribe","data":{"channel":CH,"auth":auth,"channel_data":data}}),
    );
    let ok = b.expect_event("pusher_internal:subscription_succeeded");
    assert_eq!(event_data(&ok)["presence"]["ids"], json!(["1", "2"]));
    assert_eq!(
        event_data(&a.expect_event("pusher_internal:member_added"))["user_id"],
        "2"
    );
    b.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":CH}}));
    assert_eq!(
        event_data(&a.expect_event("pusher_internal:member_removed"))["user_id"],
        "2"
    );
}

#[test]
fn presence_refusals_keep_the_connection() {
    let d = Daemon::builder()
        .server_toml("[[apps]]\nid = \"test-app\"\nkey = \"test-key\"\nsecret = \"test-secret\"\nmax_presence_members = 2\nmax_user_info = 64")
        .start();
    let mut c = d.client();
    // Bad signature.
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":CH,"auth":format!("{APP_KEY}:00"),"channel_data":"{\"user_id\":\"1\"}"}}));
    assert_eq!(c.expect_event("pusher:error")["data"]["code"], 4009);
    // Missing channel_data.
    let auth = format!(
        "{APP_KEY}:{}",
        hmac_hex(APP_SECRET, &format!("{}:{CH}", c.socket_id))
    );
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":CH,"auth":auth}}));
    assert_eq!(c.expect_event("pusher:error")["data"]["code"], 4009);
    // Signed for another socket.
    let other = d.client();
    let data = r#"{"user_id":"1"}"#;
    let stolen = format!(
        "{APP_KEY}:{}",
        hmac_hex(APP_SECRET, &format!("{}:{CH}:{data}", other.socket_id))
    );
    c.send_json(
        json!({"event":"pusher:subscribe","data":{"channel":CH,"auth":stolen,"channel_data":data}}),
    );
    assert_eq!(c.expect_event("pusher:error")["data"]["code"], 4009);
    // No user_id, and user_info over the limit: subscription_error, connection kept.
    c.send_presence_subscribe(CH, "", json!(null));
    let ev = c.expect_event("pusher:subscription_error");
    assert_eq!(ev["channel"], CH);
    c.send_presence_subscribe(CH, "9", json!({"bio": "x".repeat(100)}));
    assert!(c.expect_event("pusher:subscription_error")["data"]["error"]
        .as_str()
        .unwrap()
        .contains("user_info"));
    // Member limit: two users fit, a third is refused, another socket of a member is not.
    let mut u1 = d.client();
    let mut u2 = d.client();
    let mut u3 = d.client();
    let mut u1b = d.client();
    u1.join(CH, "1", json!(null));
    u2.join(CH, "2", json!(null));
    u3.send_presence_subscribe(CH, "3", json!(null));
    let full = u3.expect_event("pusher:subscription_error");
    assert_eq!(full["data"]["status"], 403);
    assert_eq!(u1b.join(CH, "1", json!(null))["count"], 2);
    c.send_json(json!({"event":"pusher:ping","data":{}}));
    c.expect_event("pusher:pong");
}

#[test]
fn counts_stay_exact_under_churn_across_shards() {
    let d = Daemon::builder()
        .server_toml("[[apps]]\nid = \"test-app\"\nkey = \"test-key\"\nsecret = \"test-secret\"\nmax_presence_members = 1000")
        .shards(2)
        .start();
    let mut observer = d.client();
    observer.join(CH, "observer", json!(null));
    // 1,500 sockets of 500 users join (on both shards); a third leave by closing, a third vanish without a close
    // frame (TCP dropped), a third stay.
    let mut clients = Vec::new();
    for i in 0..1500 {
        let mut c = d.client();
        c.join(CH, &format!("u{}", i % 500), json!({"i": i % 500}));
        clients.push(c);
    }
    let (s, ch) = d.api().get(
        &format!("channels/{CH}"),
        &[("info", "user_count,subscription_count")],
    );
    assert_eq!(s, 200);
    assert_eq!(ch["user_count"], 501);
    assert_eq!(ch["subscription_count"], 1501);
    let mut stay = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match i % 3 {
            0 => c.close(),
            1 => drop(c), // no close frame: the socket just goes away
            _ => stay.push(c),
        }
    }
    // User u(k) had sockets k, k+500 and k+1000; exactly one of them has i % 3 == 2 (500 is
    // 2 mod 3, so the three residues differ) and stays. So all 500 users remain.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, ch) = d.api().get(
            &format!("channels/{CH}"),
            &[("info", "user_count,subscription_count")],
        );
        if ch["subscription_count"] == 501 || std::time::Instant::now() > deadline {
            assert_eq!(ch["subscription_count"], 501, "{ch}");
            assert_eq!(ch["user_count"], 501, "{ch}");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nobody was removed, so the observer saw 500 member_added and no member_removed.
    let mut added = 0;
    loop {
        match observer.next(Duration::from_millis(300)) {
            Got::Event(ev) if ev["event"] == "pusher_internal:member_added" => added += 1,
            Got::Event(ev) => panic!("unexpected {ev}"),
            Got::Timeout => break,
            Got::Closed(c) => panic!("observer closed {c:?}"),
        }
    }
    assert_eq!(added, 500);
    drop(stay);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, ch) = d
            .api()
            .get(&format!("channels/{CH}"), &[("info", "user_count")]);
        if ch["user_count"] == 1 || std::time::Instant::now() > deadline {
            assert_eq!(ch["user_count"], 1, "{ch}");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
