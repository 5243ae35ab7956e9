//! An app's credentials and what the load generator signs with them: HTTP API requests and
//! private and presence subscriptions, both through the daemon's `protocol::auth` (the one
//! signer, which its verifier's tests round-trip), so any Pusher server accepts them.

use std::time::{SystemTime, UNIX_EPOCH};

use bts_guru::protocol::auth;
use serde_json::json;

/// An app's credentials.
#[derive(Clone, Debug)]
pub struct Creds {
    pub app_id: String,
    pub key: String,
    pub secret: String,
}

impl Creds {
    /// `path?query` for an HTTP API request signed like the Pusher SDKs sign it, now.
    pub fn signed_target(
        &self,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
        body: &[u8],
    ) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let query =
            auth::sign_api_request(&self.key, &self.secret, method, path, params, body, now);
        format!("{path}?{query}")
    }

    /// The `pusher:subscribe` message for `channel`, with the `auth` an app's auth endpoint
    /// would sign for a `private-` or `presence-` channel (and, for presence, `channel_data`).
    pub fn subscribe_message(
        &self,
        socket_id: &str,
        channel: &str,
        channel_data: Option<&str>,
    ) -> String {
        if !channel.starts_with("private-") && !channel.starts_with("presence-") {
            return json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string();
        }
        let auth =
            auth::sign_channel_auth(&self.key, &self.secret, socket_id, channel, channel_data);
        match channel_data {
            Some(data) => json!({"event": "pusher:subscribe",
                "data": {"channel": channel, "auth": auth, "channel_data": data}}),
            None => {
                json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}})
            }
        }
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Creds {
        Creds {
            app_id: "1".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        }
    }

    #[test]
    fn subscriptions_are_signed_only_where_the_channel_needs_it() {
        let c = creds();
        let public: serde_json::Value =
            serde_json::from_str(&c.subscribe_message("1.2", "sports", None)).unwrap();
        assert_eq!(
            public,
            json!({"event": "pusher:subscribe", "data": {"channel": "sports"}})
        );
        // Pusher's documented private-channel example.
        let private: serde_json::Value =
            serde_json::from_str(&c.subscribe_message("1234.1234", "private-foobar", None))
                .unwrap();
        assert_eq!(
            private["data"]["auth"],
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let data = r#"{"user_id":"u1"}"#;
        let presence: serde_json::Value =
            serde_json::from_str(&c.subscribe_message("1.2", "presence-x", Some(data))).unwrap();
        assert_eq!(presence["data"]["channel_data"], data);
        assert!(auth::verify_channel_auth(
            &c.key,
            &c.secret,
            "1.2",
            "presence-x",
            Some(data),
            presence["data"]["auth"].as_str().unwrap()
        ));
    }

    #[test]
    fn api_targets_carry_the_path_and_a_signed_query() {
        let t = creds().signed_target("GET", "/apps/1/channels/c", &[("info", "user_count")], b"");
        let (path, query) = t.split_once('?').unwrap();
        assert_eq!(path, "/apps/1/channels/c");
        assert!(
            query.starts_with("auth_key=278d425bdf160c739803&auth_timestamp="),
            "{query}"
        );
        assert!(
            query.contains("&info=user_count&auth_signature="),
            "{query}"
        );
    }
}
