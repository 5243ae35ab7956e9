//! Positioned channels across a cluster: the positions and the history come from Redis, so a
//! viewer resumes on any node, a node started later loads the history, and Laravel's events
//! (plain PUBLISH, received by every node) enter the history exactly once even when a node is
//! killed with SIGKILL while they flow.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PREFIX: &str = "laravel_database_";

fn node(redis: &RedisServer) -> Daemon {
    Daemon::builder()
        .env("REDIS_URL", redis.url())
        .env("REDIS_PREFIX", PREFIX)
        .env("REVERB_SCALING_ENABLED", "true")
        .env("BTS_APP_RESUME", "sports.*")
        .shards(2)
        .start()
}

fn up(d: &Daemon) -> Value {
    serde_json::from_str(&http(d.addr, "GET", "/up", b"").1).unwrap()
}

fn wait_cluster(nodes: &[&Daemon]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for d in nodes {
        while up(d)["cluster_nodes"] != nodes.len() {
            assert!(Instant::now() < deadline, "cluster did not form: {}", up(d));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn offset(p: &str) -> u64 {
    split_position(p).1
}

#[test]
fn positions_are_the_same_on_every_node_and_a_viewer_resumes_on_another() {
    let redis = RedisServer::start();
    let a = node(&redis);
    let b = node(&redis);
    wait_cluster(&[&a, &b]);
    let ch = "sports.match-9";
    let mut on_a = a.client();
    let mut on_b = b.client();
    subscribe_at(&mut on_a, ch, None);
    subscribe_at(&mut on_b, ch, None);
    // Publishes through different nodes are ordered by Redis (each node's appends leave in
    // its own order): whatever the order, every node gives each event the same position.
    let mut last = String::new();
    for i in 1..=3 {
        let api = if i % 2 == 0 { a.api() } else { b.api() };
        assert_eq!(api.trigger(&[ch], "goal", &format!("g{i}")).0, 200);
        let x = next_text(&mut on_a);
        let y = next_text(&mut on_b);
        assert_eq!(x, y, "both nodes send the same bytes, position included");
        let v: Value = serde_json::from_str(&x).unwrap();
        last = v["bts_position"].as_str().unwrap().to_owned();
        assert_eq!(offset(&last), i);
    }
    // The viewer on A drops; four events go by (published on both nodes).
    on_a.close();
    for i in 4..=7 {
        let api = if i % 2 == 0 { a.api() } else { b.api() };
        assert_eq!(api.trigger(&[ch], "goal", &format!("g{i}")).0, 200);
    }
    // What B's viewer saw live, by offset: the replay elsewhere must be exactly this.
    let mut live = vec![];
    for _ in 4..=7 {
        let v: Value = serde_json::from_str(&next_text(&mut on_b)).unwrap();
        live.push((
            v["data"].as_str().unwrap().to_owned(),
            offset(v["bts_position"].as_str().unwrap()),
        ));
    }
    let mut names: Vec<&str> = live.iter().map(|(d, _)| d.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["g4", "g5", "g6", "g7"]);
    assert_eq!(live.iter().map(|l| l.1).collect::<Vec<_>>(), [4, 5, 6, 7]);
    let replay_of = |c: &mut Client| -> Vec<(String, u64)> {
        (4..=7)
            .map(|_| {
                let v = c.next_event(Duration::from_secs(5));
                (
                    v["data"].as_str().unwrap().to_owned(),
                    offset(v["bts_position"].as_str().unwrap()),
                )
            })
            .collect()
    };
    // It reconnects to B.
    let mut again = b.client();
    let head = subscribe_at(&mut again, ch, Some(&last));
    assert_eq!(offset(&head), 7);
    assert_eq!(replay_of(&mut again), live);
    let rec = again.expect_event("bts:recovered");
    assert_eq!(rec["data"], r#"{"recovered":true,"missed":4}"#);

    // A node started now loads the history from Redis: a viewer resumes there at once.
    let c = node(&redis);
    wait_cluster(&[&a, &b, &c]);
    let mut on_c = c.client();
    subscribe_at(&mut on_c, ch, Some(&last));
    assert_eq!(replay_of(&mut on_c), live);
    assert_eq!(
        on_c.expect_event("bts:recovered")["data"],
        r#"{"recovered":true,"missed":4}"#
    );
    assert_eq!(b.api().trigger(&[ch], "goal", "g8").0, 200);
    for cl in [&mut again, &mut on_c, &mut on_b] {
        let v = cl.next_event(Duration::from_secs(5));
        assert_eq!(
            (
                v["data"].as_str(),
                offset(v["bts_position"].as_str().unwrap())
            ),
            (Some("g8"), 8)
        );
    }
}

#[test]
fn laravel_events_enter_the_history_once_while_a_node_is_killed() {
    let redis = RedisServer::start();
    let mut a = node(&redis);
    let b = node(&redis);
    wait_cluster(&[&a, &b]);
    let ch = "sports.laravel";
    let mut viewer = b.client();
    subscribe_at(&mut viewer, ch, None);
    let total = 300u64;
    let publisher = {
        let url = redis.url();
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            for i in 1..=total {
                let payload =
                    json!({"event": "goal", "data": {"n": i}, "socket": null}).to_string();
                let _: i64 = redis::cmd("PUBLISH")
                    .arg(format!("{PREFIX}{ch}"))
                    .arg(payload)
                    .query(&mut conn)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Kill A (SIGKILL) while it appends.
    std::thread::sleep(Duration::from_millis(150));
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5));
    publisher.join().unwrap();
    let mut got = vec![];
    while got.len() < total as usize {
        let v = viewer.next_event(Duration::from_secs(5));
        let data: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        got.push((
            data["n"].as_u64().unwrap(),
            offset(v["bts_position"].as_str().unwrap()),
        ));
    }
    let want: Vec<(u64, u64)> = (1..=total).map(|i| (i, i)).collect();
    assert_eq!(
        got, want,
        "every Laravel event once, in order, offsets 1..N"
    );
    viewer.expect_silence(Duration::from_millis(300));
    // The history in Redis: the same, once each.
    let mut conn = redis.conn();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("bts:resume:{{{APP_ID}:{ch}}}:s"))
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    let offsets: Vec<u64> = entries
        .iter()
        .map(|(_, f)| f.iter().find(|(k, _)| k == "o").unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(offsets, (1..=total).collect::<Vec<_>>());
}
