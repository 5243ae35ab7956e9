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
    let mut msg = String::with_capacity(socket_id.len() + channel.len() + 2);
    msg.push_str(socket_id);
    msg.push(':');
    msg.push_str(channel);
    if let Some(data) = channel_data {
        msg.push(':');
        msg.push_str(data);
    }
    verify(secret, msg.as_bytes(), sig)
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
}
