//! Client compatibility: the real JavaScript clients a Laravel app uses (pusher-js 8 with Laravel
//! Echo's 'reverb' options, Laravel Echo 2 itself, and the official `pusher` Node server SDK) talk
//! to the daemon. The checks live in tests/compat/compat.mjs; this test starts the daemon, runs the
//! script with node, and fails with node's output when the script does.
//!
//! Needs node (v20.19+) and the pinned packages: `npm ci --prefix tests/compat`.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn pusher_js_echo_and_node_sdk_interoperate() {
    let d = Daemon::start(2);
    // compat.mjs gives up by itself after 15 s; the deadline is only a backstop.
    let summary = run_compat_script(&d, "compat.mjs", Duration::from_secs(40));
    assert_eq!(summary["echo"], "ok", "{summary}");
}

/// pusher-js over `ws` (which offers permessage-deflate as browsers do) receives compressed
/// frames (RSV1 on the wire) and decodes them; a pusher-js client that offers nothing gets the
/// same events uncompressed; a client event ws compresses reaches the other client intact.
#[test]
fn pusher_js_over_ws_negotiates_permessage_deflate() {
    let d = Daemon::start(2);
    let args = script_args(d.addr);
    let summary = run_node_script(
        "deflate.mjs",
        &args,
        &["pusher-js", "pusher", "ws"],
        Duration::from_secs(40),
        &|| d.stderr(),
    );
    assert_eq!(
        summary["wire_first_bytes"],
        serde_json::json!(["0xc1", "0x81"]),
        "{summary}"
    );
}
