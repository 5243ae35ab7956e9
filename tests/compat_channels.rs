//! Channel-type compatibility: private, presence, client events (whispers), user sign-in with
//! server-to-user events and terminate_connections, private-encrypted and cache channels, and the
//! HTTP API reads, all driven by the real JavaScript clients (Laravel Echo 2 with the 'reverb'
//! broadcaster, pusher-js 8) with every signature made by the official `pusher` Node SDK. The
//! checks live in tests/compat/channels.mjs; this test starts the daemon with two shards (so
//! presence and cache state cross shards), runs the script with node, and fails with node's output
//! when the script does.
//!
//! Needs node (v20+) and the pinned packages: `npm ci --prefix tests/compat`.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// channels.mjs gives up by itself after 20 s; this is only a backstop.
const NODE_DEADLINE: Duration = Duration::from_secs(45);

#[test]
fn private_presence_encrypted_cache_and_user_channels_work_with_echo_pusher_js_and_node_sdk() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compat = root.join("tests/compat");
    for pkg in ["pusher-js", "pusher", "laravel-echo"] {
        assert!(
            compat
                .join("node_modules")
                .join(pkg)
                .join("package.json")
                .is_file(),
            "tests/compat/node_modules/{pkg} is missing: run `npm ci --prefix tests/compat` \
             (needs node >= 20.19 and npm) before `cargo test`"
        );
    }

    let d = Daemon::start(2);
    let mut child = Command::new("node")
        .arg("tests/compat/channels.mjs")
        .arg(d.addr.ip().to_string())
        .arg(d.addr.port().to_string())
        .args([APP_ID, APP_KEY, APP_SECRET])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("could not run `node` ({e}): install node >= 20.19, then `npm ci --prefix tests/compat`")
        });

    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > NODE_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    let report = || {
        format!(
            "--- node stdout ---\n{stdout}\n--- node stderr ---\n{stderr}\n--- daemon stderr (last 60 lines) ---\n{}",
            tail(&d.stderr(), 60)
        )
    };

    let Some(status) = status else {
        panic!(
            "channels.mjs still running after {NODE_DEADLINE:?}; killed\n{}",
            report()
        );
    };
    assert!(
        status.success(),
        "channels.mjs failed ({status})\n{}",
        report()
    );

    let summary: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("channels.mjs printed no JSON summary line\n{}", report()));
    assert_eq!(summary["ok"], true, "{}", report());
    let checks = summary["checks"].as_array().map_or(0, Vec::len);
    assert_eq!(
        checks,
        11,
        "channels.mjs reported {checks} passed checks, expected 11\n{}",
        report()
    );
    eprintln!("channels.mjs: {}", stdout.trim_end());
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
