//! Client events, encrypted channels, cache channels, user sign-in and server-to-user channels,
//! subscription_count, and the HTTP API reads.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

fn app_toml(extra: &str) -> String {
    format!("[[apps]]\nid = \"test-app\"\nkey = \"test-key\"\nsecret = \"test-secret\"\n{extra}")
}

#[test]
fn client_events_reach_other_members_only() {
    let d = Daemon::start(2);
    let ch = "private-sports.basketball.leagues.nba.matches.12345";
    let mut a = d.client();
    let mut b = d.client();
    let mut outsider = d.client();
    a.subscribe_private(ch);
    b.subscribe_private(ch);
    a.send_json(json!({"event":"client-typing","channel":ch,"data":{"who":"a"}}));
    let ev = b.next_event(T);
    assert_eq!(
        ev,
        json!({"event":"client-typing","channel":ch,"data":{"who":"a"}})
    );
    a.expect_silence(Duration::from_millis(300)); // never echoed
                                                  // Not subscribed: refused with 4009, nothing delivered.
    outsider.send_json(json!({"event":"client-typing","channel":ch,"data":{}}));
    assert_eq!(outsider.expect_event("pusher:error")["data"]["code"], 4009);
    // Public channel: refused.
    a.subscribe("sports.football");
    a.send_json(json!({"event":"client-x","channel":"sports.football","data":{}}));
    assert_eq!(a.expect_event("pusher:error")["data"]["code"], 4009);
    b.expect_silence(Duration::from_millis(300));
}

#[test]
fn client_events_carry_user_id_on_presence_channels() {
    let d = Daemon::start(2);
    let ch = "presence-match.1";
    let mut a = d.client();
    let mut b = d.client();
    a.join(ch, "alice", json!(null));
    b.join(ch, "bob", json!(null));
    a.expect_event("pusher_internal:member_added");
    a.send_json(json!({"event":"client-cheer","channel":ch,"data":{"n":1}}));
    let ev = b.next_event(T);
    assert_eq!(ev["user_id"], "alice");
    assert_eq!(ev["data"]["n"], 1);
}

#[test]
fn client_events_are_rate_limited_with_4301() {
    let d = Daemon::builder()
        .server_toml(&app_toml("client_events_per_second = 5"))
        .start();
    let ch = "private-x";
    let mut a = d.client();
    let mut b = d.client();
    a.subscribe_private(ch);
    b.subscribe_private(ch);
    for i in 0..8 {
        a.send_json(json!({"event":"client-n","channel":ch,"data":{"i":i}}));
    }
    let mut rejected = 0;
    loop {
        match a.next(Duration::from_millis(300)) {
            Got::Event(ev) if ev["event"] == "pusher:error" => {
                assert_eq!(ev["data"]["code"], 4301);
                rejected += 1;
            }
            Got::Timeout => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut delivered = 0;
    while let Got::Event(_) = b.next(Duration::from_millis(300)) {
        delivered += 1;
    }
    // A burst of 8 against a bucket of 5 refilling at 5/s: 5 pass at once, and at most one more
    // if the machine was slow enough for a token to refill meanwhile.
    assert_eq!(delivered + rejected, 8);
    assert!(
        (5..=6).contains(&delivered),
        "{delivered} delivered, {rejected} rejected"
    );
    // The connection is kept and the bucket refills.
    std::thread::sleep(Duration::from_millis(500));
    a.send_json(json!({"event":"client-n","channel":ch,"data":{}}));
    assert_eq!(b.next_event(T)["event"], "client-n");
}

#[test]
fn client_events_can_be_disabled() {
    let d = Daemon::builder()
        .env("REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM", "none")
        .start();
    let mut a = d.client();
    a.subscribe_private("private-x");
    a.send_json(json!({"event":"client-n","channel":"private-x","data":{}}));
    assert_eq!(a.expect_event("pusher:error")["data"]["code"], 4301);
}

#[test]
fn encrypted_channels_relay_untouched_and_refuse_client_events_and_mixing() {
    let d = Daemon::start(1);
    let ch = "private-encrypted-sports.odds";
    let mut a = d.client();
    a.subscribe_private(ch);
    let cipher = r#"{"nonce":"bm9uY2U=","ciphertext":"Y2lwaGVy"}"#;
    assert_eq!(d.api().trigger(&[ch], "odds.update", cipher).0, 200);
    assert_eq!(a.next_event(T)["data"], cipher);
    a.send_json(json!({"event":"client-x","channel":ch,"data":{}}));
    assert_eq!(a.expect_event("pusher:error")["data"]["code"], 4009);
    let (s, body) = d.api().trigger(&[ch, "sports.football"], "e", "{}");
    assert_eq!(s, 400, "{body}");
    // Without a signature the channel is refused like a private one.
    let mut b = d.client();
    b.send_json(json!({"event":"pusher:subscribe","data":{"channel":ch}}));
    assert_eq!(b.expect_event("pusher:error")["data"]["code"], 4009);
}

#[test]
fn cache_channels_give_late_subscribers_the_last_event() {
    let d = Daemon::start(2);
    let ch = "cache-sports.football.leagues.premier-league.matches.12345";
    // Published while nobody is subscribed.
    assert_eq!(
        d.api()
            .trigger(&[ch], "match.update", r#"{"score":"1-0"}"#)
            .0,
        200
    );
    assert_eq!(
        d.api()
            .trigger(&[ch], "match.update", r#"{"score":"2-0"}"#)
            .0,
        200
    );
    for _ in 0..4 {
        let mut late = d.client();
        late.subscribe(ch);
        let ev = late.next_event(T);
        assert_eq!(ev["event"], "match.update");
        assert_eq!(ev["data"], r#"{"score":"2-0"}"#);
    }
    let mut miss = d.client();
    miss.subscribe("cache-sports.tennis");
    let ev = miss.expect_event("pusher:cache_miss");
    assert_eq!(ev["channel"], "cache-sports.tennis");
    // And the HTTP API reports the cached event.
    let (s, info) = d.api().get(&format!("channels/{ch}"), &[("info", "cache")]);
    assert_eq!(s, 200);
    assert_eq!(info["cache"]["data"], r#"{"score":"2-0"}"#);
    assert!(info["cache"]["ttl"].as_u64().unwrap() > 1700);
}

#[test]
fn cache_entries_expire_after_the_ttl() {
    let d = Daemon::builder()
        .server_toml(&app_toml("cache_ttl_secs = 1"))
        .start();
    assert_eq!(d.api().trigger(&["cache-a"], "e", "{}").0, 200);
    std::thread::sleep(Duration::from_millis(1300));
    let mut c = d.client();
    c.subscribe("cache-a");
    c.expect_event("pusher:cache_miss");
}

fn signin(c: &mut Client, user_data: &str, secret: &str) {
    let sig = hmac_hex(secret, &format!("{}::user::{user_data}", c.socket_id));
    c.send_json(json!({"event":"pusher:signin","data":{"auth":format!("{APP_KEY}:{sig}"),"user_data":user_data}}));
}

#[test]
fn signin_server_to_user_and_terminate() {
    let d = Daemon::start(2);
    let user_data = r#"{"id":"42","user_info":{"name":"Ann"}}"#;
    let mut tabs: Vec<Client> = (0..3).map(|_| d.client()).collect();
    for t in &mut tabs {
        signin(t, user_data, APP_SECRET);
        let ok = t.expect_event("pusher:signin_success");
        let data: Value = serde_json::from_str(ok["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["user_data"], user_data);
        t.subscribe("#server-to-user-42");
    }
    // Another user may not listen to user 42's channel.
    let mut other = d.client();
    signin(&mut other, r#"{"id":"7"}"#, APP_SECRET);
    other.expect_event("pusher:signin_success");
    other.send_json(json!({"event":"pusher:subscribe","data":{"channel":"#server-to-user-42"}}));
    assert_eq!(other.expect_event("pusher:error")["data"]["code"], 4009);
    let mut anonymous = d.client();
    anonymous
        .send_json(json!({"event":"pusher:subscribe","data":{"channel":"#server-to-user-42"}}));
    assert_eq!(anonymous.expect_event("pusher:error")["data"]["code"], 4009);

    assert_eq!(
        d.api()
            .trigger(&["#server-to-user-42"], "score.alert", "{}")
            .0,
        200
    );
    for t in &mut tabs {
        assert_eq!(t.next_event(T)["event"], "score.alert");
    }
    other.expect_silence(Duration::from_millis(200));

    let (s, _) = d.api().post("users/42/terminate_connections", "");
    assert_eq!(s, 200);
    for t in &mut tabs {
        assert_eq!(t.expect_close(T), (Some(4009), Some(4009)));
    }
    other.send_json(json!({"event":"pusher:ping","data":{}}));
    other.expect_event("pusher:pong");
}

#[test]
fn bad_signin_closes_with_4009() {
    let d = Daemon::start(1);
    let mut c = d.client();
    signin(&mut c, r#"{"id":"42"}"#, "wrong-secret");
    assert_eq!(c.expect_close(T), (Some(4009), Some(4009)));
    let mut c = d.client();
    signin(&mut c, r#"{"name":"no id"}"#, APP_SECRET);
    assert_eq!(c.expect_close(T), (Some(4009), Some(4009)));
}

#[test]
fn subscription_count_events_when_enabled() {
    let d = Daemon::builder()
        .server_toml(&app_toml("subscription_count = true"))
        .shards(2)
        .start();
    let mut a = d.client();
    a.subscribe("sports.football");
    let count = |ev: &Value| -> u64 {
        assert_eq!(ev["event"], "pusher_internal:subscription_count");
        let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
        data["subscription_count"].as_u64().unwrap()
    };
    assert_eq!(count(&a.next_event(T)), 1);
    let mut b = d.client();
    b.subscribe("sports.football");
    assert_eq!(count(&a.next_event(T)), 2);
    assert_eq!(count(&b.next_event(T)), 2);
    b.close();
    assert_eq!(count(&a.next_event(T)), 1);
}

#[test]
fn http_api_reads_count_across_shards() {
    let d = Daemon::start(2);
    let mut clients: Vec<Client> = (0..10).map(|_| d.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.subscribe("sports.football");
        if i < 4 {
            c.subscribe("sports.football.leagues.premier-league");
        }
        if i < 6 {
            c.join("presence-match.9", &format!("u{}", i % 3), json!(null));
        }
    }
    let api = d.api();
    let (s, v) = api.get("channels", &[("info", "subscription_count")]);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["channels"]["sports.football"]["subscription_count"], 10);
    assert_eq!(
        v["channels"]["sports.football.leagues.premier-league"]["subscription_count"],
        4
    );
    let (_, v) = api.get("channels", &[("filter_by_prefix", "sports.football.")]);
    assert_eq!(
        v,
        json!({"channels":{"sports.football.leagues.premier-league":{}}})
    );
    let (_, v) = api.get(
        "channels",
        &[("filter_by_prefix", "presence-"), ("info", "user_count")],
    );
    assert_eq!(v, json!({"channels":{"presence-match.9":{"user_count":3}}}));
    let (s, _) = api.get("channels", &[("info", "user_count")]);
    assert_eq!(s, 400);
    let (_, v) = api.get(
        "channels/presence-match.9",
        &[("info", "user_count,subscription_count")],
    );
    assert_eq!(
        v,
        json!({"occupied":true,"user_count":3,"subscription_count":6})
    );
    let (_, v) = api.get("channels/sports.nothing", &[]);
    assert_eq!(v, json!({"occupied":false}));
    let (_, v) = api.get("channels/presence-match.9/users", &[]);
    let mut ids: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["u0", "u1", "u2"]);
    let (s, _) = api.get("channels/sports.football/users", &[]);
    assert_eq!(s, 400);
    let (_, v) = api.get("connections", &[]);
    assert_eq!(v, json!({"connections": 10}));
    // `info` on a publish.
    let body = json!({"name":"e","channels":["sports.football","presence-match.9"],"data":"{}","info":"subscription_count,user_count"});
    let (s, v) = api.post("events", &body.to_string());
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!({"channels":{"sports.football":{"subscription_count":10},"presence-match.9":{"subscription_count":6,"user_count":3}}})
    );
    // Reads are signed like writes.
    let (s, _) = http(d.addr, "GET", "/apps/test-app/channels", b"");
    assert_eq!(s, 401);
}

#[test]
fn watchlist_online_and_offline_per_user() {
    let d = Daemon::start(2);
    let events = |c: &mut Client| -> Vec<(String, String)> {
        let mut out = Vec::new();
        while let Got::Event(ev) = c.next(Duration::from_millis(300)) {
            assert_eq!(ev["event"], "pusher_internal:watchlist_events", "{ev}");
            let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
            for e in data["events"].as_array().unwrap() {
                for u in e["user_ids"].as_array().unwrap() {
                    out.push((
                        e["name"].as_str().unwrap().to_owned(),
                        u.as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
        out
    };
    let mut a = d.client();
    signin(&mut a, r#"{"id":"a","watchlist":["b","c"]}"#, APP_SECRET);
    a.expect_event("pusher:signin_success");
    assert_eq!(events(&mut a), vec![]);
    let mut b1 = d.client();
    signin(&mut b1, r#"{"id":"b"}"#, APP_SECRET);
    b1.expect_event("pusher:signin_success");
    assert_eq!(events(&mut a), vec![("online".into(), "b".into())]);
    let mut b2 = d.client();
    signin(&mut b2, r#"{"id":"b"}"#, APP_SECRET);
    b2.expect_event("pusher:signin_success");
    assert_eq!(events(&mut a), vec![]);
    // A late watcher hears at once that b is online.
    let mut late = d.client();
    signin(&mut late, r#"{"id":"z","watchlist":["b"]}"#, APP_SECRET);
    late.expect_event("pusher:signin_success");
    assert_eq!(events(&mut late), vec![("online".into(), "b".into())]);
    b1.close();
    assert_eq!(events(&mut a), vec![]);
    b2.close();
    assert_eq!(events(&mut a), vec![("offline".into(), "b".into())]);
    assert_eq!(events(&mut late), vec![("offline".into(), "b".into())]);
}
