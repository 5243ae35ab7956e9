//! The three event payloads, field for field as the original design shapes them
//! (`shared/spec/original-design.md`, "Event Types"), in the design's field order.

use serde::Serialize;

/// `match.update`: the whole state of one match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatchUpdate {
    pub match_id: u64,
    pub sport_id: &'static str,
    pub league_id: &'static str,
    pub status: &'static str,
    pub home_team: TeamScore,
    pub away_team: TeamScore,
    pub period: String,
    pub time: String,
    pub last_updated: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TeamScore {
    pub id: u64,
    pub name: &'static str,
    pub score: u32,
}

/// `match.event`: something that happened in a match (goal, card, substitution, point).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatchEvent {
    pub match_id: u64,
    pub event_id: u64,
    pub event_type: &'static str,
    pub team_id: u64,
    pub player_name: String,
    pub time: String,
    pub description: String,
    pub home_score: u32,
    pub away_score: u32,
    pub timestamp: String,
}

/// `match.status`: a change of status (scheduled → live → half-time → live → finished).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatchStatus {
    pub match_id: u64,
    pub previous_status: &'static str,
    pub new_status: &'static str,
    pub timestamp: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Payload {
    Update(MatchUpdate),
    Event(MatchEvent),
    Status(MatchStatus),
}

impl Payload {
    /// The event name clients bind to (`broadcastAs()` in the design).
    pub fn event_name(&self) -> &'static str {
        match self {
            Payload::Update(_) => "match.update",
            Payload::Event(_) => "match.event",
            Payload::Status(_) => "match.status",
        }
    }

    pub fn match_id(&self) -> u64 {
        match self {
            Payload::Update(u) => u.match_id,
            Payload::Event(e) => e.match_id,
            Payload::Status(s) => s.match_id,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("payloads always serialize")
    }
}

/// The field names of each event, as the design lists them (for tests and for consumers).
pub const UPDATE_FIELDS: &[&str] = &[
    "match_id",
    "sport_id",
    "league_id",
    "status",
    "home_team",
    "away_team",
    "period",
    "time",
    "last_updated",
];
pub const TEAM_FIELDS: &[&str] = &["id", "name", "score"];
pub const EVENT_FIELDS: &[&str] = &[
    "match_id",
    "event_id",
    "event_type",
    "team_id",
    "player_name",
    "time",
    "description",
    "home_score",
    "away_score",
    "timestamp",
];
pub const STATUS_FIELDS: &[&str] = &["match_id", "previous_status", "new_status", "timestamp"];

/// `MM:SS` of a match clock given in milliseconds (minutes may exceed 59: "75:00").
pub fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!("{:02}:{:02}", secs / 60, secs % 60)
}

/// ISO-8601 UTC with second precision, as Laravel's `toIso8601String()` of a UTC time
/// abbreviates it in the design ("2025-05-14T01:35:00Z").
pub fn iso8601(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_matches_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        // The design's example instant.
        assert_eq!(iso8601(1_747_186_500_000), "2025-05-14T01:35:00Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(4_102_444_799_999), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn clock_is_minutes_and_seconds() {
        assert_eq!(clock(0), "00:00");
        assert_eq!(clock(74 * 60_000 + 30_000), "74:30");
        assert_eq!(clock(91 * 60_000 + 5_999), "91:05");
    }
}
