//! Resume with the real clients: pusher-js 8 and Laravel Echo 2 in Node load the script the
//! daemon serves (`/bts-guru/resume.js`, `/bts-guru/resume.mjs`) and recover what they missed
//! across a cut socket and a `disconnect()`/`connect()`; a gap longer than the history is
//! reported `recovered: false` with no partial replay; a stock client sees plain events. The
//! checks live in tests/compat/resume.mjs.
//!
//! Needs node (v20.19+) and the pinned packages: `npm ci --prefix tests/compat`.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn pusher_js_and_echo_resume_through_the_served_script() {
    let d = Daemon::builder()
        .env("BTS_APP_RESUME", "sports.*")
        .env("BTS_RESUME_HISTORY_EVENTS", "20")
        .shards(2)
        .start();
    let summary = run_compat_script(&d, "resume.mjs", Duration::from_secs(60));
    eprintln!("{summary}");
    assert_eq!(summary["socket_cut"]["missed"], 5, "{summary}");
    assert_eq!(summary["long_gap"]["recovered"], false, "{summary}");
}

/// A drain: process A (SIGTERM, 4200) hands the client to process B on the same port; in
/// cluster mode B has the history from Redis, so the client recovers what it missed while away.
#[test]
fn pusher_js_resumes_across_a_drain_to_a_new_process() {
    let redis = RedisServer::start();
    let start = |port: u16| {
        Daemon::builder()
            .env("REDIS_URL", redis.url())
            .env("REVERB_SCALING_ENABLED", "true")
            .env("BTS_APP_RESUME", "sports.*")
            .arg("--drain-secs")
            .arg("1")
            .shards(2)
            .start_on(port)
    };
    let mut a = start(0);
    let addr = a.addr;
    let marker = std::env::temp_dir().join(format!("bts-resume-drain-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let mut args = script_args(addr);
    args.push(marker.display().to_string());
    let node = std::thread::spawn(move || {
        run_node_script(
            "resume_drain.mjs",
            &args,
            &["pusher-js", "pusher"],
            Duration::from_secs(60),
            &String::new,
        )
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the client never got ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _b = start(addr.port());
    a.signal("TERM");
    let summary = node.join().unwrap();
    assert_eq!(summary["drain"]["recovered"], true, "{summary}");
    assert_eq!(a.wait_exit(Duration::from_secs(10)), Some(Some(0)));
    let _ = std::fs::remove_file(&marker);
}
