//! One match's whole story, drawn up front from the seed: when it kicks off, its periods and
//! breaks, and every goal, card, substitution or basket with its scorer and match clock. The
//! feed then plays these scripts back against a simulated clock, so the story of a match does
//! not depend on the publishing rate.

use super::rng::Rng;
use super::teams::{League, Sport, Team};

const MIN: u64 = 60_000;
const SEC: u64 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Scheduled,
    Live,
    HalfTime,
    Finished,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Live => "live",
            Status::HalfTime => "half-time",
            Status::Finished => "finished",
        }
    }

    /// The transitions a match may make (a period change inside `live` is not a transition).
    pub fn may_become(self, next: Status) -> bool {
        matches!(
            (self, next),
            (Status::Scheduled, Status::Live)
                | (Status::Live, Status::HalfTime)
                | (Status::HalfTime, Status::Live)
                | (Status::Live, Status::Finished)
        )
    }
}

/// How the match clock moves during a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// Football: counts up from `start_ms`.
    Up,
    /// Basketball: counts down from `start_ms` (the period's length) to 00:00.
    Down,
    /// Breaks, half-time, before and after the match.
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Home,
    Away,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A new phase: status (maybe unchanged), period label, and the clock from here on.
    Phase {
        status: Status,
        period: String,
        clock_ms: u64,
        clock: Clock,
    },
    /// Something that happened: `event_type` is `goal`, `card`, `substitution` or `point`.
    Event {
        event_type: &'static str,
        side: Side,
        player: String,
        description: String,
        /// What it adds to `side`'s score.
        points: u32,
        /// The match clock when it happened.
        clock_ms: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scripted {
    /// Simulated milliseconds after kick-off.
    pub at_ms: u64,
    pub action: Action,
}

/// The phase a match is in before kick-off.
pub fn pre_match(league: &League) -> (String, u64) {
    match league.sport {
        Sport::Football => ("Not Started".to_owned(), 0),
        Sport::Basketball => ("Not Started".to_owned(), league.period_minutes * MIN),
    }
}

pub fn draw(rng: &mut Rng, league: &League, home: &Team, away: &Team) -> Vec<Scripted> {
    let mut script = match league.sport {
        Sport::Football => football(rng, league, home, away),
        Sport::Basketball => basketball(rng, league, home, away),
    };
    // Stable: phase changes drawn before events at the same instant stay first.
    script.sort_by_key(|s| s.at_ms);
    script
}

fn phase(at_ms: u64, status: Status, period: &str, clock_ms: u64, clock: Clock) -> Scripted {
    Scripted {
        at_ms,
        action: Action::Phase {
            status,
            period: period.to_owned(),
            clock_ms,
            clock,
        },
    }
}

/// Players on the pitch or court, those left on the bench, and who has been booked.
struct Lineup {
    on: Vec<String>,
    bench: Vec<String>,
    booked: Vec<String>,
}

impl Lineup {
    fn new(team: &Team, starters: usize) -> Lineup {
        Lineup {
            on: team.squad[..starters].to_vec(),
            bench: team.squad[starters..].to_vec(),
            booked: Vec::new(),
        }
    }

    /// Anyone on the pitch but the goalkeeper (index 0 while he plays), if anyone.
    fn outfield(&self, rng: &mut Rng) -> Option<String> {
        if self.on.len() < 2 {
            return None;
        }
        Some(self.on[1 + rng.below(self.on.len() as u64 - 1) as usize].clone())
    }
}

#[derive(Clone, Copy)]
enum Raw {
    Goal,
    Yellow,
    Red,
    Sub { injury: bool },
}

const GOAL_KINDS: &[&str] = &[
    "Right-footed shot from the centre of the box",
    "Left-footed shot from outside the box",
    "Header from a corner",
    "Goal from penalty kick",
    "Tap-in after a rebound",
    "Free kick into the top corner",
    "Finish on the counter-attack",
    "Volley from the edge of the box",
];
const YELLOW_REASONS: &[&str] = &[
    "a late tackle",
    "dissent",
    "time-wasting",
    "a tactical foul",
    "a high boot",
    "pulling a shirt",
];
const RED_REASONS: &[&str] = &[
    "serious foul play",
    "denying an obvious goal-scoring opportunity",
    "violent conduct",
];

fn football(rng: &mut Rng, league: &League, home: &Team, away: &Team) -> Vec<Scripted> {
    let half = league.period_minutes * MIN;
    let stoppage1 = rng.range(1, 4) * MIN + rng.below(60) * SEC;
    let stoppage2 = rng.range(2, 6) * MIN + rng.below(60) * SEC;
    let h1_len = half + stoppage1;
    let h2_start = h1_len + 15 * MIN;
    let h2_len = half + stoppage2;
    let end = h2_start + h2_len;
    let mut out = vec![
        phase(0, Status::Live, "1st Half", 0, Clock::Up),
        phase(h1_len, Status::HalfTime, "Half Time", half, Clock::Stopped),
        phase(h2_start, Status::Live, "2nd Half", half, Clock::Up),
        phase(end, Status::Finished, "Full Time", 2 * half, Clock::Stopped),
    ];
    // Match clock of a moment in play, and when it happens (ms after kick-off).
    let in_play = |rng: &mut Rng| -> (u64, u64) {
        let u = rng.range(SEC, h1_len + h2_len - 2 * SEC);
        if u < h1_len {
            (u, u)
        } else {
            let into = (u - h1_len).max(SEC);
            (half + into, h2_start + into)
        }
    };
    let strength = [
        1.1 * (0.7 + 0.6 * rng.unit()),
        0.95 * (0.7 + 0.6 * rng.unit()),
    ];
    let mut raw: Vec<(u64, u64, usize, Raw)> = Vec::new(); // (at, clock, side, what)
    for (side, strength) in strength.iter().enumerate() {
        for _ in 0..rng.poisson(league.mean_score * strength) {
            let (clock, at) = in_play(rng);
            raw.push((at, clock, side, Raw::Goal));
        }
        for _ in 0..rng.poisson(1.7) {
            let (clock, at) = in_play(rng);
            raw.push((at, clock, side, Raw::Yellow));
        }
        if rng.chance(0.06) {
            let (clock, at) = in_play(rng);
            raw.push((at, clock, side, Raw::Red));
        }
        // Up to five substitutions in at most three windows of the second half (or at the
        // restart), now and then one forced by an injury in the first.
        let subs = rng.range(3, 5);
        let windows: Vec<u64> = (0..rng.range(1, 3))
            .map(|_| {
                if rng.chance(0.15) {
                    0
                } else {
                    rng.range(10, 43) * MIN + rng.below(60) * SEC
                }
            })
            .collect();
        for _ in 0..subs {
            let into = *rng.pick(&windows);
            raw.push((
                h2_start + into + SEC,
                half + into + SEC,
                side,
                Raw::Sub { injury: false },
            ));
        }
        if rng.chance(0.1) {
            let clock = rng.range(5, 40) * MIN + rng.below(60) * SEC;
            raw.push((clock, clock, side, Raw::Sub { injury: true }));
        }
    }
    raw.sort_by_key(|r| (r.0, r.2));

    let mut lineups = [
        Lineup::new(home, league.starters()),
        Lineup::new(away, league.starters()),
    ];
    for (at, clock_ms, side, what) in raw {
        let s = if side == 0 { Side::Home } else { Side::Away };
        let event = match what {
            Raw::Goal => {
                let Some(scorer) = lineups[side].outfield(rng) else {
                    continue;
                };
                let mut description = rng.pick(GOAL_KINDS).to_string();
                if !description.contains("penalty") && rng.chance(0.65) {
                    if let Some(assist) = lineups[side].outfield(rng).filter(|a| *a != scorer) {
                        description.push_str(&format!(", assisted by {assist}"));
                    }
                }
                ("goal", scorer, description, 1)
            }
            Raw::Yellow | Raw::Red => {
                let Some(player) = lineups[side].outfield(rng) else {
                    continue;
                };
                let lineup = &mut lineups[side];
                let description = if matches!(what, Raw::Red) {
                    format!("Red card for {}", rng.pick(RED_REASONS))
                } else if lineup.booked.contains(&player) {
                    format!(
                        "Second yellow card for {}: sent off",
                        rng.pick(YELLOW_REASONS)
                    )
                } else {
                    lineup.booked.push(player.clone());
                    format!("Yellow card for {}", rng.pick(YELLOW_REASONS))
                };
                if !description.starts_with("Yellow") {
                    lineup.on.retain(|p| *p != player);
                }
                ("card", player, description, 0)
            }
            Raw::Sub { injury } => {
                let lineup = &mut lineups[side];
                if lineup.bench.is_empty() {
                    continue;
                }
                let Some(off) = lineup.outfield(rng) else {
                    continue;
                };
                let on = lineup
                    .bench
                    .remove(rng.below(lineup.bench.len() as u64) as usize);
                let slot = lineup
                    .on
                    .iter()
                    .position(|p| *p == off)
                    .expect("on the pitch");
                lineup.on[slot] = on.clone();
                let description = if injury {
                    format!("{on} replaces the injured {off}")
                } else {
                    format!("{on} replaces {off}")
                };
                ("substitution", on, description, 0)
            }
        };
        let (event_type, player, description, points) = event;
        out.push(Scripted {
            at_ms: at,
            action: Action::Event {
                event_type,
                side: s,
                player,
                description,
                points,
                clock_ms,
            },
        });
    }
    out
}

const TWO: &[&str] = &[
    "Layup",
    "Dunk",
    "Jump shot",
    "Floater in the lane",
    "Alley-oop dunk",
    "Mid-range jumper",
    "Putback after an offensive rebound",
    "Turnaround fadeaway",
];
const THREE: &[&str] = &[
    "Three-pointer from the corner",
    "Pull-up three",
    "Step-back three",
    "Three-pointer from the top of the key",
];

fn basketball(rng: &mut Rng, league: &League, home: &Team, away: &Team) -> Vec<Scripted> {
    let quarter = league.period_minutes * MIN;
    let overtime = 5 * MIN;
    // Mean points per scoring play, with the weights below: 0.2*1 + 0.55*2 + 0.25*3.
    let per_play = 2.05;
    let strength = [
        1.02 * (0.92 + 0.16 * rng.unit()),
        0.98 * (0.92 + 0.16 * rng.unit()),
    ];
    let mut out = Vec::new();
    let mut score = [0u32; 2];
    let mut at = 0;
    let mut period = 1u32;
    loop {
        let (label, len) = if period <= 4 {
            (format!("Q{period}"), quarter)
        } else if period == 5 {
            ("OT".to_owned(), overtime)
        } else {
            (format!("OT{}", period - 4), overtime)
        };
        out.push(phase(at, Status::Live, &label, len, Clock::Down));
        let mut plays: Vec<(u64, usize)> = Vec::new();
        for (side, strength) in strength.iter().enumerate() {
            let per_game = league.mean_score * strength / per_play;
            let mean_gap = (4 * quarter) as f64 / per_game;
            // Possessions alternate: gaps between baskets vary less than a Poisson process
            // would, so scores spread like real ones (about +-12 points).
            let mut t = mean_gap * rng.unit();
            while (t as u64) < len - SEC {
                plays.push(((t as u64).max(SEC), side));
                t += mean_gap * (0.3 + 1.4 * rng.unit());
            }
        }
        plays.sort();
        let lineups = [home, away];
        for (elapsed, side) in plays {
            let points = [1, 2, 3][rng.weighted(&[20, 55, 25])];
            let team = lineups[side];
            // Starters take most of the shots.
            let weights: Vec<u32> = (0..team.squad.len())
                .map(|i| if i < league.starters() { 6 } else { 2 })
                .collect();
            let player = team.squad[rng.weighted(&weights)].clone();
            let description = match points {
                1 => format!("Free throw ({} of 2)", rng.range(1, 2)),
                2 => rng.pick(TWO).to_string(),
                _ => rng.pick(THREE).to_string(),
            };
            score[side] += points;
            out.push(Scripted {
                at_ms: at + elapsed,
                action: Action::Event {
                    event_type: "point",
                    side: if side == 0 { Side::Home } else { Side::Away },
                    player,
                    description,
                    points,
                    clock_ms: len - elapsed,
                },
            });
        }
        at += len;
        let decided = period >= 4 && score[0] != score[1];
        if decided || period >= 12 {
            let last = if period > 4 { "Final/OT" } else { "Final" };
            if score[0] == score[1] {
                // Twelve periods without a winner: a last free throw settles it.
                out.push(Scripted {
                    at_ms: at - 1,
                    action: Action::Event {
                        event_type: "point",
                        side: Side::Home,
                        player: home.squad[0].clone(),
                        description: "Free throw (1 of 1) at the buzzer".to_owned(),
                        points: 1,
                        clock_ms: 0,
                    },
                });
            }
            out.push(phase(at, Status::Finished, last, 0, Clock::Stopped));
            return out;
        }
        if period == 2 {
            out.push(phase(at, Status::HalfTime, "Half Time", 0, Clock::Stopped));
            at += 15 * MIN;
        } else {
            let ended = format!("End of {label}");
            out.push(phase(at, Status::Live, &ended, 0, Clock::Stopped));
            at += 2 * MIN;
        }
        period += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::teams::LEAGUES;
    use super::*;

    fn scripts(seed: u64) -> Vec<(usize, Vec<Scripted>)> {
        let mut out = Vec::new();
        for (li, league) in LEAGUES.iter().enumerate() {
            for m in 0..20u64 {
                let mut rng = Rng::new(seed ^ (m << 8) ^ li as u64);
                let home = league.team((m % 6) as usize, seed);
                let away = league.team((m % 6 + 6) as usize, seed);
                out.push((li, draw(&mut rng, league, &home, &away)));
            }
        }
        out
    }

    #[test]
    fn every_script_is_a_valid_match() {
        for seed in [1, 7, 42] {
            for (li, script) in scripts(seed) {
                let league = &LEAGUES[li];
                let mut status = Status::Scheduled;
                let mut last_at = 0;
                let mut score = [0u32; 2];
                for s in &script {
                    assert!(s.at_ms >= last_at, "out of order");
                    last_at = s.at_ms;
                    match &s.action {
                        Action::Phase { status: next, .. } => {
                            if *next != status {
                                assert!(status.may_become(*next), "{status:?} -> {next:?}");
                                status = *next;
                            }
                        }
                        Action::Event { points, side, .. } => {
                            assert_eq!(status, Status::Live, "event outside play");
                            score[*side as usize] += points;
                        }
                    }
                }
                assert_eq!(status, Status::Finished);
                if league.sport == Sport::Basketball {
                    assert_ne!(score[0], score[1], "basketball has no draws");
                    assert!(score[0] > 40 && score[1] > 40, "{score:?}");
                } else {
                    assert!(score[0] < 12 && score[1] < 12, "{score:?}");
                }
            }
        }
    }

    #[test]
    fn no_substitute_comes_on_twice_and_sent_off_players_stay_off() {
        for (li, script) in scripts(9) {
            if LEAGUES[li].sport != Sport::Football {
                continue;
            }
            let mut came_on = Vec::new();
            let mut sent_off = Vec::new();
            for s in &script {
                if let Action::Event {
                    event_type,
                    side,
                    player,
                    description,
                    ..
                } = &s.action
                {
                    let who = (*side, player.clone());
                    assert!(!sent_off.contains(&who), "{player} acts after a red card");
                    if *event_type == "substitution" {
                        assert!(!came_on.contains(&who), "{player} came on twice");
                        came_on.push(who.clone());
                    }
                    if *event_type == "card" && !description.starts_with("Yellow") {
                        sent_off.push(who);
                    }
                }
            }
        }
    }
}
