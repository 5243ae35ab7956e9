//! HMAC-SHA256 signatures: channel `auth` tokens and Pusher HTTP API request signing.
//!
//! Every comparison of a signature is constant-time (`Mac::verify_slice`), so response timing
//! tells an attacker nothing about how many leading bytes were right.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Lowercase hex HMAC-SHA256 of `msg` under `secret`, as Pusher signs everything.
pub fn sign(secret: &str, msg: &[u8]) -> String {
    hex::encode(mac(secret, msg).finalize().into_bytes())
}

fn mac(secret: &str, msg: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    m.update(msg);
    m
}

/// Constant-time check that `hex_sig` is the signature of `msg`. Malformed hex is a mismatch.
pub fn verify(secret: &str, msg: &[u8], hex_sig: &str) -> bool {
    let Ok(raw) = hex::decode(hex_sig) else {
        return false;
    };
    mac(secret, msg).verify_slice(&raw).is_ok()
}

/// What a private or presence channel `auth` signs: `socket_id:channel`, then `:channel_data`
/// for a presence channel.
fn channel_auth_message(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    let data_len = channel_data.map_or(0, |d| d.len() + 1);
    let mut msg = String::with_capacity(socket_id.len() + channel.len() + 1 + data_len);
    msg.push_str(socket_id);
    msg.push(':');
    msg.push_str(channel);
    if let Some(data) = channel_data {
        msg.push(':');
        msg.push_str(data);
    }
    msg
}

/// Verifies a private channel `auth` (`"<key>:<hex hmac(socket_id:channel)>"`). Like Reverb, only
/// the part after the first `:` is checked, but the key part must name this app when present.
pub fn verify_channel_auth(
    app_key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let Some((key, sig)) = auth.split_once(':') else {
        return false;
    };
    if key != app_key {
        return false;
    }
    let msg = channel_auth_message(socket_id, channel, channel_data);
    verify(secret, msg.as_bytes(), sig)
}

/// The `auth` a client sends to subscribe to a private or presence channel, as an app's auth
/// endpoint signs it (`"<key>:<hex signature>"`): what [`verify_channel_auth`] accepts. For
/// clients of the server (the load generator).
pub fn sign_channel_auth(
    app_key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let msg = channel_auth_message(socket_id, channel, channel_data);
    format!("{app_key}:{}", sign(secret, msg.as_bytes()))
}

/// Lowercase hex MD5 of an HTTP body (`body_md5`).
pub fn body_md5(body: &[u8]) -> String {
    hex::encode(Md5::digest(body))
}

/// Why an HTTP API request's signature was refused (all are answered 401).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiAuthError {
    #[error("missing auth_key, auth_timestamp, auth_version or auth_signature")]
    MissingParam,
    #[error("auth_key does not match the app")]
    WrongKey,
    #[error("auth_version must be 1.0")]
    BadVersion,
    #[error("auth_timestamp is not within 600 seconds of the server's clock")]
    StaleTimestamp,
    #[error("body_md5 does not match the body")]
    BodyMd5Mismatch,
    #[error("invalid auth_signature")]
    BadSignature,
}

/// Largest accepted distance between `auth_timestamp` and the server clock (Pusher: 600 s).
pub const TIMESTAMP_WINDOW_SECS: u64 = 600;

/// The string Pusher signs for an HTTP API request: `METHOD\npath\nquery`, where `query` is every
/// parameter but `auth_signature`, keys lowercased and sorted, joined as `k=v` with `&`, values
/// URL-decoded (`pusher-http-php build_auth_query_params`, Reverb `Controller::verifySignature`).
pub fn api_string_to_sign(method: &str, path: &str, params: &[(String, String)]) -> String {
    let mut kv: Vec<(String, &str)> = params
        .iter()
        .filter(|(k, _)| k != "auth_signature")
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    kv.sort();
    let query: Vec<String> = kv.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{method}\n{path}\n{}", query.join("&"))
}

/// The query string of an HTTP API request signed as the Pusher SDKs sign it: `params` (the
/// request's own, e.g. `info`), `auth_key`, `auth_timestamp`, `auth_version` and, when there is
/// a body, `body_md5`, in the order they are signed, then `auth_signature`: what
/// [`verify_api_request`] accepts. Values are signed as given and sent percent-encoded
/// (`application/x-www-form-urlencoded`, as the server decodes them). For clients of the server
/// (the simulator, the load generator); `now_secs` is the client's Unix time.
pub fn sign_api_request(
    app_key: &str,
    secret: &str,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: &[u8],
    now_secs: u64,
) -> String {
    let mut all: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
        .collect();
    all.push(("auth_key".into(), app_key.to_owned()));
    all.push(("auth_timestamp".into(), now_secs.to_string()));
    all.push(("auth_version".into(), "1.0".into()));
    if !body.is_empty() {
        all.push(("body_md5".into(), body_md5(body)));
    }
    all.sort();
    let signature = sign(secret, api_string_to_sign(method, path, &all).as_bytes());
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&all)
        .append_pair("auth_signature", &signature)
        .finish()
}

/// Checks an HTTP API request's `auth_*` parameters against the app's key and secret.
/// `params` are the decoded query parameters, `now_secs` the server's Unix time.
pub fn verify_api_request(
    app_key: &str,
    secret: &str,
    method: &str,
    path: &str,
    params: &[(String, String)],
    body: &[u8],
    now_secs: u64,
) -> Result<(), ApiAuthError> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let (Some(key), Some(ts), Some(version), Some(sig)) = (
        get("auth_key"),
        get("auth_timestamp"),
        get("auth_version"),
        get("auth_signature"),
    ) else {
        return Err(ApiAuthError::MissingParam);
    };
    if key != app_key {
        return Err(ApiAuthError::WrongKey);
    }
    if version != "1.0" {
        return Err(ApiAuthError::BadVersion);
    }
    let ts: u64 = ts.parse().map_err(|_| ApiAuthError::StaleTimestamp)?;
    if ts.abs_diff(now_secs) > TIMESTAMP_WINDOW_SECS {
        return Err(ApiAuthError::StaleTimestamp);
    }
    if !body.is_empty() {
        match get("body_md5") {
            Some(md5) if md5.eq_ignore_ascii_case(&body_md5(body)) => {}
            _ => return Err(ApiAuthError::BodyMd5Mismatch),
        }
    }
    let to_sign = api_string_to_sign(method, path, params);
    if verify(secret, to_sign.as_bytes(), sig) {
        Ok(())
    } else {
        Err(ApiAuthError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Pusher's documented example (pusher.com "Generating the authentication signature").
    #[test]
    fn pusher_docs_private_channel_example() {
        let sig = sign("7ad3773142a6692b25b8", b"1234.1234:private-foobar");
        assert_eq!(
            sig,
            "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        assert!(verify_channel_auth(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "1234.1234",
            "private-foobar",
            None,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        ));
        assert!(!verify_channel_auth(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "1234.1235",
            "private-foobar",
            None,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        ));
    }

    // Pusher's documented HTTP API example ("Worked authentication example").
    #[test]
    fn pusher_docs_api_example() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(body_md5(body), "ec365a775a4cd0599faeb73354201b6f");
        let params: Vec<(String, String)> = [
            ("auth_key", "278d425bdf160c739803"),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
            (
                "auth_signature",
                "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r = verify_api_request(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "POST",
            "/apps/3/events",
            &params,
            body,
            1353088179,
        );
        assert_eq!(r, Ok(()));
        let stale = verify_api_request(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "POST",
            "/apps/3/events",
            &params,
            body,
            1353088179 + 601,
        );
        assert_eq!(stale, Err(ApiAuthError::StaleTimestamp));
        let tampered = verify_api_request(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "POST",
            "/apps/3/events",
            &params,
            b"{}",
            1353088179,
        );
        assert_eq!(tampered, Err(ApiAuthError::BodyMd5Mismatch));
    }

    /// The query string's parameters, decoded as the server decodes them.
    fn decoded(query: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    // The signer writes the documented example's signature, in the SDKs' order.
    #[test]
    fn signing_the_pusher_docs_api_example() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let query = sign_api_request(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "POST",
            "/apps/3/events",
            &[],
            body,
            1353088179,
        );
        assert_eq!(
            query,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    // What the signer writes, the verifier accepts: with and without a body, with parameters
    // that need encoding; and it refuses the same request under another secret, method, path,
    // parameter value or body.
    #[test]
    fn signed_api_requests_round_trip_through_the_verifier() {
        let (key, secret, now) = ("app-key", "app-secret", 1_700_000_000);
        let params = [
            ("info", "user_count,subscription_count"),
            ("filter_by_prefix", "presence- a&b"),
        ];
        let get = decoded(&sign_api_request(
            key,
            secret,
            "GET",
            "/apps/1/channels",
            &params,
            b"",
            now,
        ));
        assert!(get.iter().all(|(k, _)| k != "body_md5"));
        assert!(get.contains(&("filter_by_prefix".into(), "presence- a&b".into())));
        let check = |method, path, params: &[(String, String)], body: &[u8], secret| {
            verify_api_request(key, secret, method, path, params, body, now + 5)
        };
        assert_eq!(check("GET", "/apps/1/channels", &get, b"", secret), Ok(()));
        assert_eq!(
            check("GET", "/apps/1/channels", &get, b"", "other"),
            Err(ApiAuthError::BadSignature)
        );
        assert_eq!(
            check("POST", "/apps/1/channels", &get, b"", secret),
            Err(ApiAuthError::BadSignature)
        );
        assert_eq!(
            check("GET", "/apps/2/channels", &get, b"", secret),
            Err(ApiAuthError::BadSignature)
        );
        let mut changed = get.clone();
        changed.iter_mut().find(|(k, _)| k == "info").unwrap().1 = "user_count".into();
        assert_eq!(
            check("GET", "/apps/1/channels", &changed, b"", secret),
            Err(ApiAuthError::BadSignature)
        );

        let body = br#"{"name":"e","channels":["c"],"data":"{}"}"#;
        let post = decoded(&sign_api_request(
            key,
            secret,
            "POST",
            "/apps/1/events",
            &[],
            body,
            now,
        ));
        assert_eq!(check("POST", "/apps/1/events", &post, body, secret), Ok(()));
        assert_eq!(
            check("POST", "/apps/1/events", &post, b"{}", secret),
            Err(ApiAuthError::BodyMd5Mismatch)
        );
        assert_eq!(post.last().map(|(k, _)| k.as_str()), Some("auth_signature"));
    }

    // What a client signs for a channel, the verifier accepts, and only for that socket,
    // channel and member data.
    #[test]
    fn signed_channel_auth_round_trips_through_the_verifier() {
        let (key, secret) = ("278d425bdf160c739803", "7ad3773142a6692b25b8");
        let auth = sign_channel_auth(key, secret, "1234.1234", "private-foobar", None);
        assert_eq!(
            auth,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let data = r#"{"user_id":"u1"}"#;
        let pres = sign_channel_auth(key, secret, "1.2", "presence-x", Some(data));
        assert!(verify_channel_auth(
            key,
            secret,
            "1.2",
            "presence-x",
            Some(data),
            &pres
        ));
        assert!(!verify_channel_auth(
            key,
            secret,
            "1.3",
            "presence-x",
            Some(data),
            &pres
        ));
        assert!(!verify_channel_auth(
            key,
            secret,
            "1.2",
            "presence-y",
            Some(data),
            &pres
        ));
        assert!(!verify_channel_auth(
            key,
            secret,
            "1.2",
            "presence-x",
            Some("{}"),
            &pres
        ));
        assert!(!verify_channel_auth(
            key,
            secret,
            "1.2",
            "presence-x",
            None,
            &pres
        ));
    }
}
