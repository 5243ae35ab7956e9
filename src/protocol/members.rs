//! What presence `channel_data` and sign-in `user_data` carry.

use serde_json::Value;

/// A presence member as the auth endpoint described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceData {
    /// `user_id`, a string or a number in the JSON, always a string here (pusher-js keys members
    /// by string).
    pub user_id: String,
    /// `user_info` re-serialized as JSON, when present.
    pub user_info: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    #[error("channel_data is not a JSON object")]
    NotAnObject,
    #[error("channel_data needs user_id as a non-empty string or a number")]
    NoUserId,
    #[error("user_info is larger than this app allows")]
    InfoTooLarge,
    #[error("user_data needs id as a non-empty string")]
    NoId,
    #[error("watchlist must be an array of at most 100 user ids")]
    BadWatchlist,
}

/// Parses presence `channel_data`; `max_info` bounds the re-serialized `user_info`.
pub fn parse_channel_data(s: &str, max_info: usize) -> Result<PresenceData, MemberError> {
    let v: Value = serde_json::from_str(s).map_err(|_| MemberError::NotAnObject)?;
    let obj = v.as_object().ok_or(MemberError::NotAnObject)?;
    let user_id = match obj.get("user_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(MemberError::NoUserId),
    };
    let user_info = match obj.get("user_info") {
        None | Some(Value::Null) => None,
        Some(info) => {
            let json = info.to_string();
            if json.len() > max_info {
                return Err(MemberError::InfoTooLarge);
            }
            Some(json)
        }
    };
    Ok(PresenceData { user_id, user_info })
}

/// A signed-in user (`pusher:signin` `user_data`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserData {
    pub id: String,
    /// User ids whose online/offline changes this user is told about (at most 100).
    pub watchlist: Vec<String>,
}

pub fn parse_user_data(s: &str) -> Result<UserData, MemberError> {
    let v: Value = serde_json::from_str(s).map_err(|_| MemberError::NotAnObject)?;
    let obj = v.as_object().ok_or(MemberError::NotAnObject)?;
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(MemberError::NoId),
    };
    let watchlist = match obj.get("watchlist") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) if a.len() <= 100 => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(MemberError::BadWatchlist),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(MemberError::BadWatchlist),
    };
    Ok(UserData { id, watchlist })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_data() {
        let d = parse_channel_data(r#"{"user_id":42,"user_info":{"name":"Ann"}}"#, 100).unwrap();
        assert_eq!(d.user_id, "42");
        assert_eq!(d.user_info.as_deref(), Some(r#"{"name":"Ann"}"#));
        let d = parse_channel_data(r#"{"user_id":"u-1"}"#, 100).unwrap();
        assert_eq!((d.user_id.as_str(), d.user_info), ("u-1", None));
        assert_eq!(parse_channel_data("{}", 100), Err(MemberError::NoUserId));
        assert_eq!(
            parse_channel_data(r#"{"user_id":""}"#, 100),
            Err(MemberError::NoUserId)
        );
        assert_eq!(
            parse_channel_data("[1]", 100),
            Err(MemberError::NotAnObject)
        );
        assert_eq!(
            parse_channel_data("nope", 100),
            Err(MemberError::NotAnObject)
        );
        let big = format!(r#"{{"user_id":1,"user_info":"{}"}}"#, "x".repeat(200));
        assert_eq!(
            parse_channel_data(&big, 100),
            Err(MemberError::InfoTooLarge)
        );
    }

    #[test]
    fn user_data() {
        let u = parse_user_data(r#"{"id":"7","watchlist":["1",2]}"#).unwrap();
        assert_eq!(u.id, "7");
        assert_eq!(u.watchlist, vec!["1", "2"]);
        assert_eq!(parse_user_data(r#"{"name":"x"}"#), Err(MemberError::NoId));
        let many: Vec<String> = (0..101).map(|i| i.to_string()).collect();
        let s = serde_json::json!({"id":"1","watchlist":many}).to_string();
        assert_eq!(parse_user_data(&s), Err(MemberError::BadWatchlist));
    }
}
