//! Pusher socket ids: `<digits>.<digits>`.

use std::fmt;

/// A connection's Pusher `socket_id`, kept as two integers so that `socket_id` exclusion during
/// fan-out is an integer compare, not a string compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketId {
    pub hi: u64,
    pub lo: u64,
}

impl SocketId {
    /// Parses `^\d+\.\d+$` (what `pusher-http-php validate_socket_id` accepts), each half at most
    /// 19 digits so it fits a u64.
    pub fn parse(s: &str) -> Option<SocketId> {
        let (a, b) = s.split_once('.')?;
        Some(SocketId {
            hi: parse_digits(a)?,
            lo: parse_digits(b)?,
        })
    }
}

fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.hi, self.lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = SocketId::parse("123.456").unwrap();
        assert_eq!(id, SocketId { hi: 123, lo: 456 });
        assert_eq!(id.to_string(), "123.456");
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "1.2.3",
            "a.1",
            "1.-2",
            " 1.2",
            "99999999999999999999.1",
        ] {
            assert_eq!(SocketId::parse(bad), None, "{bad}");
        }
    }
}
