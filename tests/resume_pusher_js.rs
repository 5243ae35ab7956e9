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
