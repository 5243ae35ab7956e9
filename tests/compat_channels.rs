//! Client compatibility for every channel type: Laravel Echo 2 (`.private()` with an authorizer
//! signing through the official `pusher` SDK, `.join()` with here/joining/leaving, whispers),
//! pusher-js 8 (`signin()` + `sendToUser`, terminate, end-to-end encryption, cache channels) and
//! the SDK's channel reads. The checks live in tests/compat/channels.mjs.
//!
//! Needs node (v20.19+) and the pinned packages: `npm ci --prefix tests/compat`.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn private_presence_encrypted_cache_and_user_channels_work_with_echo_pusher_js_and_node_sdk() {
    let d = Daemon::start(2);
    // channels.mjs gives up by itself after 20 s; the deadline is only a backstop.
    let summary = run_compat_script(&d, "channels.mjs", Duration::from_secs(45));
    let checks = summary["checks"].as_array().map_or(0, Vec::len);
    assert_eq!(
        checks, 11,
        "channels.mjs reported {checks} passed checks: {summary}"
    );
}
