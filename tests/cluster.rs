//! Cluster mode: several daemons sharing one Redis act as one server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);
const CH: &str = "presence-sports.football.leagues.premier-league.matches.12345";

fn node(redis: &RedisServer, shards: usize) -> Daemon {
    Daemon::builder()
        .env("REDIS_URL", redis.url())
        .env("REDIS_PREFIX", "laravel_database_")
        .env("REVERB_SCALING_ENABLED", "true")
        .shards(shards)
        .start()
}

fn up(d: &Daemon) -> Value {
    serde_json::from_str(&http(d.addr, "GET", "/up", b"").1).unwrap()
}

/// Starts `n` nodes and waits until each sees all the others.
fn cluster(redis: &RedisServer, n: usize) -> Vec<Daemon> {
    let nodes: Vec<Daemon> = (0..n).map(|i| node(redis, 1 + i % 2)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    for d in &nodes {
        while up(d)["cluster_nodes"] != n {
            assert!(Instant::now() < deadline, "cluster did not form: {}", up(d));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    nodes
}

fn data_of(ev: &Value) -> Value {
    serde_json::from_str(ev["data"].as_str().unwrap()).unwrap()
}

#[test]
fn http_publish_on_one_node_reaches_every_node_once_with_exclusion() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 3);
    let mut subs: Vec<Client> = nodes
        .iter()
        .map(|d| {
            let mut c = d.client();
            c.subscribe("sports.football");
            c
        })
        .collect();
    // A subscription made on B is visible to A's publish only through Redis: give the
    // subscriptions nothing to race (they are local to each node anyway).
    for i in 0..5 {
        let (s, _) = nodes[0].api().trigger(
            &["sports.football"],
            "match.update",
            &format!("{{\"seq\":{i}}}"),
        );
        assert_eq!(s, 200);
    }
    for c in &mut subs {
        for i in 0..5 {
            assert_eq!(c.next_event(T)["data"], format!("{{\"seq\":{i}}}"));
        }
        c.expect_silence(Duration::from_millis(300));
    }
    // socket_id exclusion across nodes: exclude the subscriber on node C.
    let except = subs[2].socket_id.clone();
    let body = json!({"name":"e","channel":"sports.football","data":"{}","socket_id":except});
    assert_eq!(nodes[1].api().post("events", &body.to_string()).0, 200);
    assert_eq!(subs[0].next_event(T)["event"], "e");
    assert_eq!(subs[1].next_event(T)["event"], "e");
    subs[2].expect_silence(Duration::from_millis(500));
    // Client events cross nodes too.
    let mut a = nodes[0].client();
    let mut b = nodes[1].client();
    a.subscribe_private("private-chat");
    b.subscribe_private("private-chat");
    a.send_json(json!({"event":"client-hi","channel":"private-chat","data":{"x":1}}));
    assert_eq!(b.next_event(T)["data"]["x"], 1);
    a.expect_silence(Duration::from_millis(300));
}

#[test]
fn presence_is_per_user_across_nodes_and_reads_are_cluster_wide() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 3);
    let mut observer = nodes[2].client();
    observer.join(CH, "observer", json!(null));
    let wait_count = |d: &Daemon, want: u64| {
        let deadline = Instant::now() + T;
        loop {
            let (_, v) = d.api().get(
                &format!("channels/{CH}"),
                &[("info", "user_count,subscription_count")],
            );
            if v["user_count"] == want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    };
    // Membership travels through Redis: once node A has heard of the observer (milliseconds),
    // a join there lists it. (Before that, the joiner would get member_added for it instead.)
    assert_eq!(wait_count(&nodes[0], 1)["user_count"], 1);
    let mut tab_a = nodes[0].client();
    let here = tab_a.join(CH, "7", json!({"name":"Ann"}));
    assert!(
        here["ids"].as_array().unwrap().contains(&json!("observer")),
        "{here}"
    );
    let added = observer.expect_event("pusher_internal:member_added");
    assert_eq!(
        data_of(&added),
        json!({"user_id":"7","user_info":{"name":"Ann"}})
    );
    // Same user on node B: no second member_added anywhere.
    assert_eq!(wait_count(&nodes[1], 2)["user_count"], 2);
    let mut tab_b = nodes[1].client();
    let here = tab_b.join(CH, "7", json!({"name":"Ann"}));
    assert_eq!(here["count"], 2, "{here}");
    observer.expect_silence(Duration::from_millis(500));
    // Reads from any node count every node.
    let v = wait_count(&nodes[1], 2);
    assert_eq!(
        v,
        json!({"occupied":true,"user_count":2,"subscription_count":3})
    );
    let (_, users) = nodes[2].api().get(&format!("channels/{CH}/users"), &[]);
    let mut ids: Vec<&str> = users["users"]
        .as_array()
        .unwrap_or_else(|| panic!("{users} {}", up(&nodes[2])))
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["7", "observer"]);
    let (_, conns) = nodes[0].api().get("connections", &[]);
    assert_eq!(conns["connections"], 3);
    // Closing one of the two tabs removes nobody; closing the other removes user 7 once.
    tab_a.close();
    observer.expect_silence(Duration::from_millis(700));
    tab_b.close();
    let removed = observer.expect_event("pusher_internal:member_removed");
    assert_eq!(data_of(&removed), json!({"user_id":"7"}));
    observer.expect_silence(Duration::from_millis(300));
}

#[test]
fn terminate_and_cache_reach_every_node() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 2);
    // Cache: published on A while nobody listens anywhere; a late subscriber on B gets it.
    assert_eq!(
        nodes[0]
            .api()
            .trigger(&["cache-score.1"], "match.update", r#"{"s":"1-0"}"#)
            .0,
        200
    );
    std::thread::sleep(Duration::from_millis(200));
    let mut late = nodes[1].client();
    late.subscribe("cache-score.1");
    assert_eq!(late.next_event(T)["data"], r#"{"s":"1-0"}"#);
    // terminate_connections on A closes the user's sockets on B.
    let mut c = nodes[1].client();
    let user_data = r#"{"id":"42"}"#;
    let sig = hmac_hex(APP_SECRET, &format!("{}::user::{user_data}", c.socket_id));
    c.send_json(json!({"event":"pusher:signin","data":{"auth":format!("{APP_KEY}:{sig}"),"user_data":user_data}}));
    c.expect_event("pusher:signin_success");
    assert_eq!(
        nodes[0].api().post("users/42/terminate_connections", "").0,
        200
    );
    assert_eq!(c.expect_close(T), (Some(4009), Some(4009)));
}

#[test]
fn a_killed_node_has_its_members_removed_within_the_bound() {
    let redis = RedisServer::start();
    let mut nodes = cluster(&redis, 2);
    let mut observer = nodes[0].client();
    observer.join(CH, "observer", json!(null));
    let mut doomed = nodes[1].client();
    doomed.join(CH, "9", json!(null));
    assert_eq!(
        observer.expect_event("pusher_internal:member_added")["event"],
        "pusher_internal:member_added"
    );
    // SIGKILL: no goodbye, no close frames.
    let killed = Instant::now();
    let victim = nodes.pop().unwrap();
    let mut child = victim;
    child.child.kill().unwrap();
    let removed = match observer.next(Duration::from_secs(20)) {
        Got::Event(ev) => ev,
        other => panic!(
            "observer got {other:?}; node 0 stderr:\n{}",
            nodes[0].stderr()
        ),
    };
    let took = killed.elapsed();
    assert_eq!(removed["event"], "pusher_internal:member_removed");
    assert_eq!(data_of(&removed)["user_id"], "9");
    eprintln!("cluster: dead node's member removed {took:?} after SIGKILL");
    assert!(took <= Duration::from_secs(15), "took {took:?}");
    drop(doomed);
}
