//! Channel names and kinds.

use std::fmt;

/// Longest channel name accepted (sockudo, Soketi and Reverb deployments use 200).
pub const MAX_CHANNEL_NAME: usize = 200;

/// What a channel's name prefix makes it. Order of checks matters: `private-encrypted-` is a
/// `private-` prefix too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    Private,
    Presence,
    PrivateEncrypted,
}

impl ChannelKind {
    pub fn of(name: &str) -> ChannelKind {
        if name.starts_with("private-encrypted-") {
            ChannelKind::PrivateEncrypted
        } else if name.starts_with("private-") {
            ChannelKind::Private
        } else if name.starts_with("presence-") {
            ChannelKind::Presence
        } else {
            ChannelKind::Public
        }
    }

    /// Do client events go through on this kind (only private and presence; never encrypted)?
    pub fn allows_client_events(self) -> bool {
        matches!(self, ChannelKind::Private | ChannelKind::Presence)
    }

    /// Does subscribing need an `auth` signature?
    pub fn needs_auth(self) -> bool {
        !matches!(self, ChannelKind::Public)
    }
}

/// Cache channels keep their last event for late subscribers: `cache-*`, `private-cache-*`,
/// `presence-cache-*` and `private-encrypted-cache-*`.
pub fn is_cache(name: &str) -> bool {
    [
        "cache-",
        "private-cache-",
        "presence-cache-",
        "private-encrypted-cache-",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// The user id a `#server-to-user-<id>` channel belongs to.
pub fn server_to_user_id(name: &str) -> Option<&str> {
    name.strip_prefix("#server-to-user-")
        .filter(|id| !id.is_empty())
}

/// A validated channel name: 1..=200 bytes of `[A-Za-z0-9_\-=@,.;]`, as the Pusher SDKs validate
/// (`^#?[-a-zA-Z0-9_=@,.;]+$`), led by `#` only as `#server-to-user-<id>`: Pusher reserves the
/// `#` prefix for its own channels, and any other `#` name would be an unauthenticated public
/// channel in the reserved namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChannelName(String);

/// Why a channel name was refused; the text goes to the client verbatim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than 200 characters")]
    TooLong,
    #[error("channel name may only contain A-Z, a-z, 0-9, '_', '-', '=', '@', ',', '.' and ';'")]
    BadChar,
    #[error(
        "channel names starting with '#' are reserved; the only one is #server-to-user-<user id>"
    )]
    Reserved,
}

impl ChannelName {
    pub fn parse(s: &str) -> Result<ChannelName, ChannelNameError> {
        validate(s)?;
        Ok(ChannelName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn kind(&self) -> ChannelKind {
        ChannelKind::of(&self.0)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates without allocating.
pub fn validate(s: &str) -> Result<(), ChannelNameError> {
    if s.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if s.len() > MAX_CHANNEL_NAME {
        return Err(ChannelNameError::TooLong);
    }
    let body = s.strip_prefix('#').unwrap_or(s);
    if body.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if !body.bytes().all(is_channel_byte) {
        return Err(ChannelNameError::BadChar);
    }
    if body.len() < s.len() && server_to_user_id(s).is_none() {
        return Err(ChannelNameError::Reserved);
    }
    Ok(())
}

fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'@' | b',' | b'.' | b';')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let ok = [
            "sports.football",
            "sports.football.leagues.premier-league.matches.12345",
            "private-sports.basketball.leagues.nba.matches.12345",
            "presence-x",
            "a=b@c,d;e_f-g",
            "#server-to-user-42",
        ];
        for n in ok {
            assert_eq!(validate(n), Ok(()), "{n}");
        }
        assert_eq!(validate(""), Err(ChannelNameError::Empty));
        assert_eq!(validate("#"), Err(ChannelNameError::Empty));
        assert_eq!(validate("a b"), Err(ChannelNameError::BadChar));
        assert_eq!(validate("a/b"), Err(ChannelNameError::BadChar));
        assert_eq!(validate("é"), Err(ChannelNameError::BadChar));
        for reserved in [
            "#foo",
            "#server-to-user-",
            "#server-to-user",
            "#private-x",
            "#cache-x",
        ] {
            assert_eq!(
                validate(reserved),
                Err(ChannelNameError::Reserved),
                "{reserved}"
            );
        }
        assert_eq!(validate(&"a".repeat(200)), Ok(()));
        assert_eq!(validate(&"a".repeat(201)), Err(ChannelNameError::TooLong));
    }

    #[test]
    fn cache_and_server_to_user() {
        for c in [
            "cache-a",
            "private-cache-a",
            "presence-cache-a",
            "private-encrypted-cache-a",
        ] {
            assert!(is_cache(c), "{c}");
        }
        for c in ["a", "private-a", "cachex", "sports.cache-a"] {
            assert!(!is_cache(c), "{c}");
        }
        assert_eq!(server_to_user_id("#server-to-user-42"), Some("42"));
        assert_eq!(server_to_user_id("#server-to-user-"), None);
        assert_eq!(server_to_user_id("server-to-user-42"), None);
    }

    #[test]
    fn kinds() {
        assert_eq!(ChannelKind::of("sports.x"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("private-x"), ChannelKind::Private);
        assert_eq!(
            ChannelKind::of("private-encrypted-x"),
            ChannelKind::PrivateEncrypted
        );
        assert_eq!(ChannelKind::of("presence-x"), ChannelKind::Presence);
    }
}
