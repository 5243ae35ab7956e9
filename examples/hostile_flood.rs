//! Measures a hostile client against a running daemon (issue 13 §1): one connection with a 4 KiB
//! receive window that never reads floods messages that each earn a reply, while the daemon's
//! RSS is sampled from /proc. RELIABILITY.md ("Hostile client") records its figures.
//!
//! ```text
//! cargo run --example hostile_flood -- ADDR DAEMON_PID ping|pusher-ping|subscribe [SECS] [APP_KEY]
//! ```

#[path = "../tests/common/flood.rs"]
mod flood;

use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: hostile_flood ADDR DAEMON_PID ping|pusher-ping|subscribe [SECS=5] [APP_KEY=test-key]";
    let (Some(addr), Some(pid), Some(kind)) = (
        args.first().and_then(|a| a.parse().ok()),
        args.get(1).and_then(|p| p.parse::<u32>().ok()),
        args.get(2).and_then(|k| flood::Kind::parse(k)),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let secs: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let key = args.get(4).map_or("test-key", String::as_str);

    let before = flood::rss_kib(pid);
    let peak = flood::RssPeak::start(pid);
    let mut s = flood::connect(addr, key);
    let out = flood::flood(&mut s, kind, u64::MAX, Duration::from_secs_f64(secs));
    let peak = peak.finish();
    let at_end = flood::rss_kib(pid);
    drop(s);
    std::thread::sleep(Duration::from_secs(2));
    let after = flood::rss_kib(pid);
    let closed = match out.closed {
        Some(t) => format!("closed by the daemon after {:.1} s", t.as_secs_f64()),
        None => "still open".to_owned(),
    };
    println!(
        "{kind:?}: sent {:.1} MB in {:.1} s, {closed}; daemon RSS {before} KiB before, peak \
         {peak} KiB (+{} KiB), {at_end} KiB at the end, {after} KiB 2 s after the client left",
        out.sent as f64 / 1e6,
        out.elapsed.as_secs_f64(),
        peak.saturating_sub(before),
    );
}
