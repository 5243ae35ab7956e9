//! `bts-guru simulate` against a real daemon: what viewers on a league channel and on a match
//! channel receive (the design's three events, field for field), that scores never go down, that
//! a seed fixes the sequence, cache channels for late viewers, Laravel's Redis format, and the
//! errors for an unreachable daemon or a wrong secret.
//!
//! The subcommand is run through the binary when it has one (`bts-guru simulate --help`
//! succeeds), else in-process through `bts_guru::simulate::run` with the same flags.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bts_guru::simulate::{
    self, Feed, Publish, SimulateArgs, EVENT_FIELDS, STATUS_FIELDS, TEAM_FIELDS, UPDATE_FIELDS,
};
use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_bts-guru");

/// Whether the binary has the `simulate` subcommand.
fn binary_has_simulate() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new(BIN)
            .args(["simulate", "--help"])
            .stdin(Stdio::null())
            .output()
            .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--matches"))
            .unwrap_or(false)
    })
}

/// Runs `bts-guru simulate <args>` as app (id, key, secret) given the way the daemon reads them
/// (REVERB_APP_* in the environment); Err(stderr or the error) when it fails.
fn simulate(args: &[String], app: (&str, &str, &str)) -> Result<(), String> {
    let mut args = args.to_vec();
    // Hermetic: no ./.env of whoever runs the tests.
    args.extend(["--env-file".to_owned(), "/dev/null".to_owned()]);
    if binary_has_simulate() {
        let out = Command::new(BIN)
            .arg("simulate")
            .args(&args)
            .env("REVERB_APP_ID", app.0)
            .env("REVERB_APP_KEY", app.1)
            .env("REVERB_APP_SECRET", app.2)
            .env_remove("REDIS_URL")
            .env_remove("REDIS_PREFIX")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .expect("run bts-guru simulate");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}: {stderr}", out.status))
        }
    } else {
        args.extend([
            "--app-id".to_owned(),
            app.0.to_owned(),
            "--app-key".to_owned(),
            app.1.to_owned(),
            "--app-secret".to_owned(),
            app.2.to_owned(),
        ]);
        let parsed = SimulateArgs::from_args(&args).map_err(|e| e.to_string())?;
        simulate::run(&parsed).map_err(|e| format!("{e:#}"))
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// What the run with these flags publishes, in order (timestamps from an arbitrary start).
fn predicted(args: &[String], seed: u64) -> Vec<Publish> {
    let a = SimulateArgs::from_args(args).unwrap();
    let mut feed = Feed::new(&a.feed_options(seed, 0));
    let ticks = a.duration.map(|d| (d * a.rate).ceil() as u64);
    let mut out = Vec::new();
    while !feed.done() && ticks.is_none_or(|t| feed.ticks() < t) {
        out.extend(feed.tick());
    }
    out
}

/// A payload without its wall-clock fields, for comparing runs.
fn timeless(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    o.remove("timestamp");
    o.remove("last_updated");
    v
}

/// The (event, data) of every publish that goes to `channel`, timestamps left out.
fn on_channel(publishes: &[Publish], channel: &str) -> Vec<(String, Value)> {
    publishes
        .iter()
        .filter(|p| p.channels.iter().any(|c| c == channel))
        .map(|p| {
            let data: Value = serde_json::from_str(&p.payload.to_json()).unwrap();
            (p.event().to_owned(), timeless(data))
        })
        .collect()
}

/// Every event the client has been sent, until `quiet` passes without one.
fn drain(c: &mut Client, channel: &str, quiet: Duration) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    loop {
        match c.next(quiet) {
            Got::Event(ev) => {
                assert_eq!(ev["channel"], channel, "{ev}");
                let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
                out.push((ev["event"].as_str().unwrap().to_owned(), data));
            }
            Got::Timeout => return out,
            Got::Closed(code) => panic!("connection closed ({code:?})"),
        }
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort();
    k
}

fn sorted(fields: &[&'static str]) -> Vec<&'static str> {
    let mut f = fields.to_vec();
    f.sort();
    f
}

fn is_iso8601(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 20
        && s.ends_with('Z')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s.chars()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19].contains(&i) || c.is_ascii_digit())
}

fn is_clock(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 5 && b[2] == b':' && s.chars().filter(char::is_ascii_digit).count() == 4
}

/// Checks every event against the design's shapes and the match's story so far: statuses only
/// make valid transitions, updates agree with the last status, scores never go down.
fn check_story(events: &[(String, Value)]) {
    let mut status: HashMap<u64, String> = HashMap::new();
    let mut score: HashMap<u64, (u64, u64)> = HashMap::new();
    for (name, data) in events {
        let id = data["match_id"].as_u64().expect("match_id is a number");
        let current = status
            .get(&id)
            .map_or("scheduled", String::as_str)
            .to_owned();
        let scores = match name.as_str() {
            "match.update" => {
                assert_eq!(keys(data), sorted(UPDATE_FIELDS), "{data}");
                for team in ["home_team", "away_team"] {
                    assert_eq!(keys(&data[team]), sorted(TEAM_FIELDS), "{data}");
                    assert!(data[team]["id"].is_u64() && data[team]["name"].is_string());
                }
                assert!(["football", "basketball"].contains(&data["sport_id"].as_str().unwrap()));
                assert!(data["league_id"].is_string() && data["period"].is_string());
                assert!(is_clock(data["time"].as_str().unwrap()), "{data}");
                assert!(is_iso8601(data["last_updated"].as_str().unwrap()), "{data}");
                assert_eq!(data["status"], current.as_str(), "update disagrees: {data}");
                (
                    data["home_team"]["score"].as_u64().unwrap(),
                    data["away_team"]["score"].as_u64().unwrap(),
                )
            }
            "match.event" => {
                assert_eq!(keys(data), sorted(EVENT_FIELDS), "{data}");
                let t = data["event_type"].as_str().unwrap();
                assert!(
                    ["goal", "card", "substitution", "point"].contains(&t),
                    "{data}"
                );
                assert!(data["event_id"].is_u64() && data["team_id"].is_u64());
                assert!(!data["player_name"].as_str().unwrap().is_empty());
                assert!(!data["description"].as_str().unwrap().is_empty());
                assert!(is_clock(data["time"].as_str().unwrap()), "{data}");
                assert!(is_iso8601(data["timestamp"].as_str().unwrap()), "{data}");
                assert_eq!(current, "live", "an event outside play: {data}");
                (
                    data["home_score"].as_u64().unwrap(),
                    data["away_score"].as_u64().unwrap(),
                )
            }
            "match.status" => {
                assert_eq!(keys(data), sorted(STATUS_FIELDS), "{data}");
                assert!(is_iso8601(data["timestamp"].as_str().unwrap()), "{data}");
                assert_eq!(data["previous_status"], current.as_str(), "{data}");
                let next = data["new_status"].as_str().unwrap();
                let ok = matches!(
                    (current.as_str(), next),
                    ("scheduled", "live")
                        | ("live", "half-time")
                        | ("half-time", "live")
                        | ("live", "finished")
                );
                assert!(ok, "{current} -> {next}");
                status.insert(id, next.to_owned());
                continue;
            }
            other => panic!("unexpected event {other}"),
        };
        let before = score.insert(id, scores).unwrap_or((0, 0));
        assert!(
            scores.0 >= before.0 && scores.1 >= before.1,
            "score went down in {id}: {before:?} -> {scores:?}"
        );
    }
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    let mut n: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    n.sort();
    n.dedup();
    n
}

#[test]
fn league_and_match_viewers_get_the_designs_events_in_the_seeded_order() {
    let d = Daemon::start(1);
    let flags = args(&[
        "--host",
        "127.0.0.1",
        "--port",
        &d.addr.port().to_string(),
        "--matches",
        "2",
        "--rate",
        "50",
        "--seed",
        "7",
        "--speed",
        "600",
        "--duration",
        "3",
    ]);
    let expect = predicted(&flags, 7);
    let a = SimulateArgs::from_args(&flags).unwrap();
    let fixtures = Feed::new(&a.feed_options(7, 0)).fixtures();
    assert_eq!(fixtures.len(), 2);
    let watched = &fixtures[0];
    let mut league = d.client();
    league.subscribe(&watched.league_channel);
    let mut game = d.client();
    game.subscribe(&watched.match_channel);

    let started = Instant::now();
    simulate(&flags, (APP_ID, APP_KEY, APP_SECRET)).expect("simulate runs");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(20),
        "--duration 3 took {took:?}"
    );

    let got_league = drain(
        &mut league,
        &watched.league_channel,
        Duration::from_millis(500),
    );
    let got_game = drain(
        &mut game,
        &watched.match_channel,
        Duration::from_millis(500),
    );
    for got in [&got_league, &got_game] {
        assert_eq!(
            names(got),
            ["match.event", "match.status", "match.update"],
            "all three events arrive"
        );
        check_story(got);
    }
    assert!(got_game
        .iter()
        .all(|(_, d)| d["match_id"] == watched.match_id));
    assert!(got_league
        .iter()
        .filter(|(e, _)| e == "match.update")
        .all(|(_, d)| d["league_id"] == watched.league));

    // Exactly what the seed says, in order, nothing lost or added.
    let strip = |v: &[(String, Value)]| -> Vec<(String, Value)> {
        v.iter()
            .map(|(e, d)| (e.clone(), timeless(d.clone())))
            .collect()
    };
    assert_eq!(
        strip(&got_game),
        on_channel(&expect, &watched.match_channel)
    );
    assert_eq!(
        strip(&got_league),
        on_channel(&expect, &watched.league_channel)
    );
}

#[test]
fn same_seed_same_first_events_other_seed_other_events() {
    let flags = |seed: &str| args(&["--matches", "6", "--rate", "20", "--seed", seed]);
    let first = |seed: u64, s: &str| -> Vec<(String, Value)> {
        let p = predicted(&flags(s), seed);
        assert!(p.len() > 300, "{}", p.len());
        p[..300]
            .iter()
            .map(|p| {
                let data: Value = serde_json::from_str(&p.payload.to_json()).unwrap();
                (format!("{} {:?}", p.event(), p.channels), timeless(data))
            })
            .collect()
    };
    assert_eq!(first(7, "7"), first(7, "7"));
    assert_ne!(first(7, "7"), first(8, "8"));
}

#[test]
fn cache_channel_gives_a_late_viewer_the_final_score() {
    let d = Daemon::start(1);
    let flags = args(&[
        "--port",
        &d.addr.port().to_string(),
        "--matches",
        "2",
        "--rate",
        "400",
        "--seed",
        "11",
        "--speed",
        "600",
        "--cache",
        "--quiet",
    ]);
    let expect = predicted(&flags, 11);
    simulate(&flags, (APP_ID, APP_KEY, APP_SECRET)).expect("simulate runs to the end");
    let a = SimulateArgs::from_args(&flags).unwrap();
    for f in Feed::new(&a.feed_options(11, 0)).fixtures() {
        assert!(
            f.match_channel.starts_with("cache-sports."),
            "{}",
            f.match_channel
        );
        let last = on_channel(&expect, &f.match_channel).pop().unwrap();
        assert_eq!(last.0, "match.update");
        assert_eq!(last.1["status"], "finished");
        // Subscribing after the match ended: the cached last event comes right away.
        let mut late = d.client();
        late.subscribe(&f.match_channel);
        let ev = late.next_event(Duration::from_secs(5));
        assert_eq!(ev["event"], "match.update", "{ev}");
        let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
        assert_eq!(timeless(data), last.1);
    }
}

#[test]
fn redis_in_laravels_format_reaches_viewers_through_the_ingest() {
    let redis = RedisServer::start();
    let d = Daemon::builder()
        .env("REDIS_URL", redis.url())
        .env("REDIS_PREFIX", "laravel_database_")
        .shards(1)
        .start();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http(d.addr, "GET", "/up", b"");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if v["redis"] == "connected" {
            break;
        }
        assert!(Instant::now() < deadline, "ingest never connected: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let flags = args(&[
        "--via",
        "redis",
        "--redis-url",
        &redis.url(),
        "--redis-prefix",
        "laravel_database_",
        "--matches",
        "2",
        "--rate",
        "100",
        "--seed",
        "3",
        "--speed",
        "600",
        "--duration",
        "1",
        "--quiet",
    ]);
    let expect = predicted(&flags, 3);
    let a = SimulateArgs::from_args(&flags).unwrap();
    let fixtures = Feed::new(&a.feed_options(3, 0)).fixtures();
    let mut game = d.client();
    game.subscribe(&fixtures[1].match_channel);
    let sport = format!("sports.{}", fixtures[1].sport);
    let mut sport_viewer = d.client();
    sport_viewer.subscribe(&sport);
    // The app's credentials do not matter on this path.
    simulate(&flags, ("unused", "unused", "unused")).expect("simulate publishes to Redis");
    let got = drain(
        &mut game,
        &fixtures[1].match_channel,
        Duration::from_millis(500),
    );
    check_story(&got);
    let got: Vec<(String, Value)> = got.into_iter().map(|(e, d)| (e, timeless(d))).collect();
    assert_eq!(got, on_channel(&expect, &fixtures[1].match_channel));
    let got = drain(&mut sport_viewer, &sport, Duration::from_millis(300));
    assert_eq!(names(&got), ["match.update"]);
    assert_eq!(got.len(), on_channel(&expect, &sport).len());
}

#[test]
fn unreachable_daemon_or_wrong_secret_fails_clearly() {
    let port = free_port();
    let e = simulate(
        &args(&["--port", &port.to_string(), "--duration", "1", "--quiet"]),
        (APP_ID, APP_KEY, APP_SECRET),
    )
    .unwrap_err();
    assert!(e.contains("cannot reach the daemon"), "{e}");
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");

    let d = Daemon::start(1);
    let e = simulate(
        &args(&[
            "--port",
            &d.addr.port().to_string(),
            "--duration",
            "1",
            "--quiet",
        ]),
        (APP_ID, APP_KEY, "not-the-secret"),
    )
    .unwrap_err();
    assert!(e.contains("answered 401"), "{e}");
    assert!(e.contains("REVERB_APP_SECRET"), "{e}");

    let e = simulate(
        &args(&[
            "--via",
            "redis",
            "--redis-url",
            &format!("redis://127.0.0.1:{}/0", free_port()),
            "--duration",
            "1",
            "--quiet",
        ]),
        (APP_ID, APP_KEY, APP_SECRET),
    )
    .unwrap_err();
    assert!(e.contains("cannot reach Redis"), "{e}");
}
