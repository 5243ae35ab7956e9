//! The debug console in a real browser: `bts-guru demo` runs, and headless Chromium (Debian's
//! `chromium` package, driven by playwright-core from tests/compat/console.mjs) opens the URL
//! the demo printed. The page must show live data within a few seconds: its own WebSocket
//! counted in the stats, events per second, a scoreboard that fills and changes, and a live tail
//! that fills (and follows another channel when told to). A screenshot is saved to
//! target/console.png (docs/console.png is a copy of one).
//!
//! Needs node, `npm ci --prefix tests/compat` and /usr/bin/chromium (or CHROMIUM=path); tests/run.sh
//! installs all three. A missing browser fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn chromium() -> PathBuf {
    let path =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(
        path.is_file(),
        "Chromium is needed for the console's browser test and {} does not exist: run \
         `bash tests/run.sh` (installs it) or `apt-get install chromium`, or set CHROMIUM to a \
         Chromium binary",
        path.display()
    );
    path
}

#[test]
fn console_shows_live_data_in_chromium() {
    let browser = chromium();
    eprintln!("browser: {}", browser.display());
    // target/tmp is where Cargo lets integration tests write; the screenshot goes beside it.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let shot = target.join("console.png");
    let _ = std::fs::remove_file(&shot);

    let metrics_port = free_port().to_string();
    // An explicit --metrics-port keeps the demo's metrics listener (for the delta count).
    let demo = Demo::start(
        &["--shards", "2"],
        &["--port", "0", "--metrics-port", &metrics_port],
        &[],
    );
    let summary = run_node_script(
        "console.mjs",
        &[demo.url.clone(), shot.to_string_lossy().into_owned()],
        &["playwright-core"],
        Duration::from_secs(90),
        &|| demo.stderr(),
    );
    assert!(
        summary["scoreboard_rows"].as_u64().unwrap() >= 1,
        "{summary}"
    );
    assert!(summary["tail_rows"].as_u64().unwrap() >= 5, "{summary}");
    assert!(summary["followed_rows"].as_u64().unwrap() >= 1, "{summary}");
    // Chromium offered permessage-deflate and the server accepted it keeping Chromium's
    // window (shared context): every frame the page decoded above (scoreboard, tail) came over
    // a compressing connection, some as delta frames (compressed against the channel's
    // previous message, which only a window kept across messages inflates).
    assert_eq!(
        summary["ws_extensions"][0], "permessage-deflate; client_no_context_takeover",
        "{summary}"
    );
    let metrics = scrape_metrics(metrics_port.parse().unwrap());
    let deltas = metric(&metrics, "bts_frames_delta_total");
    eprintln!("delta frames sent: {deltas}");
    assert!(deltas >= 1.0, "no delta frame reached the page: {deltas}");
    assert!(
        summary["ws_text_frames"].as_u64().unwrap() >= 5,
        "{summary}"
    );
    let png = std::fs::read(&shot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 20_000, "a blank page? {} bytes", png.len());
    eprintln!("screenshot: {}", shot.display());
}
