//! The feed: N matches played back against a simulated clock, turned into the events to publish
//! and the channels each goes to. Pure and deterministic: no I/O, no clock of its own (the caller
//! gives the wall-clock start used for timestamps), so a seed fixes the whole sequence.
//!
//! Time advances in ticks, one per publishing slot (`1/rate` s of real time). At each tick the
//! feed publishes at most one event: the oldest one waiting, or else a clock update for the next
//! live match in turn. The simulated clock moves on by `speed` match minutes per real second,
//! but only in ticks that find nothing waiting, so a burst (many baskets at once) delays the
//! story instead of letting published clocks fall behind it.

use std::collections::VecDeque;

use super::payload::{self, MatchEvent, MatchStatus, MatchUpdate, Payload, TeamScore};
use super::rng::Rng;
use super::script::{self, Action, Clock, Scripted, Side, Status};
use super::teams::{League, Team, LEAGUES};

/// What decides a run's sequence of events.
#[derive(Clone, Debug, PartialEq)]
pub struct FeedOptions {
    pub seed: u64,
    pub matches: usize,
    /// Events per second, overall.
    pub rate: f64,
    /// Match minutes per real second.
    pub speed: f64,
    /// Use `cache-` match channels.
    pub cache: bool,
    /// Wall-clock start (Unix ms), for `timestamp` and `last_updated`.
    pub start_unix_ms: u64,
}

/// One event to publish, to several channels at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub channels: Vec<String>,
    pub payload: Payload,
}

impl Publish {
    pub fn event(&self) -> &'static str {
        self.payload.event_name()
    }
}

/// A match as scheduled: what a viewer needs to know to subscribe.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub match_id: u64,
    pub sport: &'static str,
    pub league: &'static str,
    pub home: (u64, &'static str),
    pub away: (u64, &'static str),
    /// Simulated minutes from the start of the run to kick-off.
    pub kickoff_minutes: f64,
    /// `sports.{sport}.leagues.{league}`.
    pub league_channel: String,
    /// `[cache-]sports.{sport}.leagues.{league}.matches.{id}`.
    pub match_channel: String,
}

struct Match {
    id: u64,
    league: &'static League,
    home: Team,
    away: Team,
    kickoff_ms: u64,
    script: Vec<Scripted>,
    status: Status,
    period: String,
    clock: Clock,
    /// Match clock at `phase_start_ms`.
    clock_ms: u64,
    /// Simulated time the current phase began.
    phase_start_ms: u64,
    score: [u32; 2],
    match_channel: String,
}

impl Match {
    fn sport(&self) -> &'static str {
        self.league.sport.slug()
    }

    fn league_channel(&self) -> String {
        format!("sports.{}.leagues.{}", self.sport(), self.league.slug)
    }

    /// The match clock at simulated time `sim_ms`.
    fn clock_at(&self, sim_ms: u64) -> u64 {
        let elapsed = sim_ms.saturating_sub(self.phase_start_ms);
        match self.clock {
            Clock::Up => self.clock_ms + elapsed,
            Clock::Down => self.clock_ms.saturating_sub(elapsed),
            Clock::Stopped => self.clock_ms,
        }
    }

    fn team_score(team: &Team, score: u32) -> TeamScore {
        TeamScore {
            id: team.id,
            name: team.name,
            score,
        }
    }

    fn update(&self, sim_ms: u64, now: &str) -> Publish {
        let sport = self.sport();
        Publish {
            channels: vec![
                format!("sports.{sport}"),
                self.league_channel(),
                self.match_channel.clone(),
                format!("sports.{sport}.teams.{}", self.home.id),
                format!("sports.{sport}.teams.{}", self.away.id),
            ],
            payload: Payload::Update(MatchUpdate {
                match_id: self.id,
                sport_id: sport,
                league_id: self.league.slug,
                status: self.status.as_str(),
                home_team: Match::team_score(&self.home, self.score[0]),
                away_team: Match::team_score(&self.away, self.score[1]),
                period: self.period.clone(),
                time: payload::clock(self.clock_at(sim_ms)),
                last_updated: now.to_owned(),
            }),
        }
    }

    /// `match.event` and `match.status` go to the league and the match channel.
    fn narrow(&self, payload: Payload) -> Publish {
        Publish {
            channels: vec![self.league_channel(), self.match_channel.clone()],
            payload,
        }
    }
}

pub struct Feed {
    matches: Vec<Match>,
    /// Every scripted action of every match, by simulated time: (at, match, action).
    timeline: Vec<(u64, usize, usize)>,
    cursor: usize,
    pending: VecDeque<Publish>,
    sim_ms: f64,
    step_ms: f64,
    tick: u64,
    rate: f64,
    start_unix_ms: u64,
    round_robin: usize,
    next_event_id: u64,
}

impl Feed {
    pub fn new(opts: &FeedOptions) -> Feed {
        let mut rng = Rng::new(opts.seed);
        // Alternate sports so that even two matches show both; which league first is drawn.
        let football = if rng.chance(0.5) { [0, 1] } else { [1, 0] };
        let basketball = if rng.chance(0.5) { [2, 3] } else { [3, 2] };
        let order = [football[0], basketball[0], football[1], basketball[1]];
        let mut pools: Vec<Vec<usize>> = vec![Vec::new(); LEAGUES.len()];
        let mut ids = Vec::with_capacity(opts.matches);
        let mut matches = Vec::with_capacity(opts.matches);
        for i in 0..opts.matches {
            let league = &LEAGUES[order[i % order.len()]];
            let pool = &mut pools[order[i % order.len()]];
            let mut pair = [0usize; 2];
            for slot in &mut pair {
                if pool.is_empty() {
                    // Every team plays once before any plays twice.
                    let mut teams: Vec<usize> = (0..league.teams.len()).collect();
                    for j in (1..teams.len()).rev() {
                        teams.swap(j, rng.below(j as u64 + 1) as usize);
                    }
                    *pool = teams;
                }
                *slot = pool.pop().expect("refilled");
            }
            if pair[0] == pair[1] {
                pair[1] = (pair[1] + 1) % league.teams.len();
            }
            let id = loop {
                let id = rng.range(10_000, 99_999);
                if !ids.contains(&id) {
                    break id;
                }
            };
            ids.push(id);
            let kickoff_ms = rng.range(60, 600) * 1000;
            let home = league.team(pair[0], opts.seed);
            let away = league.team(pair[1], opts.seed);
            let mut match_rng = Rng::derive(opts.seed, id);
            let script = script::draw(&mut match_rng, league, &home, &away);
            let (period, clock_ms) = script::pre_match(league);
            let match_channel = format!(
                "{}sports.{}.leagues.{}.matches.{id}",
                if opts.cache { "cache-" } else { "" },
                league.sport.slug(),
                league.slug
            );
            matches.push(Match {
                id,
                league,
                home,
                away,
                kickoff_ms,
                script,
                status: Status::Scheduled,
                period,
                clock: Clock::Stopped,
                clock_ms,
                phase_start_ms: 0,
                score: [0, 0],
                match_channel,
            });
        }
        let mut timeline: Vec<(u64, usize, usize)> = matches
            .iter()
            .enumerate()
            .flat_map(|(m, mt)| {
                mt.script
                    .iter()
                    .enumerate()
                    .map(move |(a, s)| (mt.kickoff_ms + s.at_ms, m, a))
            })
            .collect();
        timeline.sort();
        Feed {
            matches,
            timeline,
            cursor: 0,
            pending: VecDeque::new(),
            sim_ms: 0.0,
            step_ms: opts.speed * 60_000.0 / opts.rate,
            tick: 0,
            rate: opts.rate,
            start_unix_ms: opts.start_unix_ms,
            round_robin: 0,
            next_event_id: 60_000 + rng.below(10_000),
        }
    }

    pub fn fixtures(&self) -> Vec<Fixture> {
        self.matches
            .iter()
            .map(|m| Fixture {
                match_id: m.id,
                sport: m.sport(),
                league: m.league.slug,
                home: (m.home.id, m.home.name),
                away: (m.away.id, m.away.name),
                kickoff_minutes: m.kickoff_ms as f64 / 60_000.0,
                league_channel: m.league_channel(),
                match_channel: m.match_channel.clone(),
            })
            .collect()
    }

    /// Wall-clock time (Unix ms) of tick `n` when the run keeps its pace.
    pub fn tick_unix_ms(&self, n: u64) -> u64 {
        self.start_unix_ms + (n as f64 * 1000.0 / self.rate) as u64
    }

    /// Simulated minutes since the start of the run.
    pub fn sim_minutes(&self) -> f64 {
        self.sim_ms / 60_000.0
    }

    /// Ticks taken so far.
    pub fn ticks(&self) -> u64 {
        self.tick
    }

    /// True once every match has finished and everything about it was handed out.
    pub fn done(&self) -> bool {
        self.cursor == self.timeline.len() && self.pending.is_empty()
    }

    /// Matches per status: scheduled, live, half-time, finished.
    pub fn counts(&self) -> [usize; 4] {
        let mut c = [0; 4];
        for m in &self.matches {
            c[m.status as usize] += 1;
        }
        c
    }

    /// Final (or current) score lines, one per match.
    pub fn scoreboard(&self) -> Vec<String> {
        let sim = self.sim_ms as u64;
        self.matches
            .iter()
            .map(|m| {
                format!(
                    "{} {}/{}: {} {}-{} {} ({}, {} {})",
                    m.id,
                    m.sport(),
                    m.league.slug,
                    m.home.name,
                    m.score[0],
                    m.score[1],
                    m.away.name,
                    m.status.as_str(),
                    m.period,
                    payload::clock(m.clock_at(sim)),
                )
            })
            .collect()
    }

    /// The next tick: the event to publish in it, if any (`None`: nothing is live and nothing
    /// waits, e.g. before the first kick-off).
    pub fn tick(&mut self) -> Option<Publish> {
        let now = payload::iso8601(self.tick_unix_ms(self.tick));
        if self.tick == 0 {
            for m in &self.matches {
                self.pending.push_back(m.update(0, &now));
            }
        } else if self.pending.is_empty() {
            self.sim_ms += self.step_ms;
            self.advance(&now);
        }
        self.tick += 1;
        if let Some(p) = self.pending.pop_front() {
            return Some(p);
        }
        // A clock update for the next match whose clock runs.
        let n = self.matches.len();
        for k in 0..n {
            let i = (self.round_robin + k) % n;
            let m = &self.matches[i];
            if m.status == Status::Live && m.clock != Clock::Stopped {
                self.round_robin = i + 1;
                return Some(m.update(self.sim_ms as u64, &now));
            }
        }
        None
    }

    /// Plays every scripted action up to the simulated clock, in order.
    fn advance(&mut self, now: &str) {
        let sim = self.sim_ms as u64;
        while let Some(&(at, mi, ai)) = self.timeline.get(self.cursor) {
            if at > sim {
                break;
            }
            self.cursor += 1;
            let m = &mut self.matches[mi];
            match m.script[ai].action.clone() {
                Action::Phase {
                    status,
                    period,
                    clock_ms,
                    clock,
                } => {
                    let previous = m.status;
                    debug_assert!(previous == status || previous.may_become(status));
                    m.status = status;
                    m.period = period;
                    m.clock = clock;
                    m.clock_ms = clock_ms;
                    m.phase_start_ms = at;
                    if previous != status {
                        let p = m.narrow(Payload::Status(MatchStatus {
                            match_id: m.id,
                            previous_status: previous.as_str(),
                            new_status: status.as_str(),
                            timestamp: now.to_owned(),
                        }));
                        self.pending.push_back(p);
                    }
                }
                Action::Event {
                    event_type,
                    side,
                    player,
                    description,
                    points,
                    clock_ms,
                } => {
                    let team_id = match side {
                        Side::Home => m.home.id,
                        Side::Away => m.away.id,
                    };
                    m.score[side as usize] += points;
                    let p = m.narrow(Payload::Event(MatchEvent {
                        match_id: m.id,
                        event_id: self.next_event_id,
                        event_type,
                        team_id,
                        player_name: player,
                        time: payload::clock(clock_ms),
                        description,
                        home_score: m.score[0],
                        away_score: m.score[1],
                        timestamp: now.to_owned(),
                    }));
                    self.next_event_id += 1;
                    self.pending.push_back(p);
                }
            }
            // The match's state as of this action; an older update still waiting is dropped
            // (this one says everything it said, later).
            let m = &self.matches[mi];
            let id = m.id;
            let update = m.update(at, now);
            self.pending
                .retain(|p| !matches!(&p.payload, Payload::Update(u) if u.match_id == id));
            self.pending.push_back(update);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// What `--help` promises at the defaults of `simulate` (8 matches, --speed 1) and `demo`
    /// (--speed 2, twice the rate): a football match takes about two minutes, or one, and the
    /// match clock never runs slow enough for the simulator's warning.
    #[test]
    fn the_defaults_keep_the_promised_pace_without_a_warning() {
        use crate::simulate::{clock_behind, DEFAULT_RATE};
        for (speed, rate, minutes) in [(1.0, DEFAULT_RATE, 2.0), (2.0, 2.0 * DEFAULT_RATE, 1.0)] {
            for seed in 0..5 {
                let o = FeedOptions {
                    rate,
                    speed,
                    matches: 8,
                    ..opts(seed, 8)
                };
                let mut f = Feed::new(&o);
                let mut kicked_off: Vec<Option<f64>> = vec![None; 8];
                let mut next_check = 5.0;
                while !f.done() {
                    f.tick();
                    let secs = f.ticks() as f64 / rate;
                    if secs >= next_check {
                        // As the simulator checks it, every 5 s.
                        next_check += 5.0;
                        assert!(
                            !clock_behind(f.sim_minutes(), secs, speed),
                            "speed {speed}, seed {seed}: clock at {:.2} min/s after {secs} s",
                            f.sim_minutes() / secs
                        );
                    }
                    for (i, m) in f.matches.iter().enumerate() {
                        if m.status != Status::Scheduled && kicked_off[i].is_none() {
                            kicked_off[i] = Some(secs);
                        }
                        if m.status == Status::Finished && m.league.sport.slug() == "football" {
                            if let Some(start) = kicked_off[i].filter(|s| *s >= 0.0) {
                                let took = (secs - start) / 60.0;
                                assert!(
                                    (0.8 * minutes..1.25 * minutes).contains(&took),
                                    "speed {speed}, seed {seed}: a football match took {took:.2} min"
                                );
                                kicked_off[i] = Some(-1.0);
                            }
                        }
                    }
                }
            }
        }
    }

    pub(crate) fn opts(seed: u64, matches: usize) -> FeedOptions {
        FeedOptions {
            seed,
            matches,
            rate: 50.0,
            speed: 60.0,
            cache: false,
            start_unix_ms: 1_747_184_400_000,
        }
    }

    fn run(o: &FeedOptions, max_ticks: u64) -> Vec<Publish> {
        let mut f = Feed::new(o);
        let mut out = Vec::new();
        while !f.done() && f.ticks() < max_ticks {
            if let Some(p) = f.tick() {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn same_seed_same_events() {
        let a = run(&opts(7, 8), 5_000);
        let b = run(&opts(7, 8), 5_000);
        assert!(a.len() > 500, "{}", a.len());
        assert_eq!(a, b);
        let c = run(&opts(8, 8), 5_000);
        assert_ne!(a[..50], c[..50]);
    }

    #[test]
    fn runs_to_the_end_with_valid_transitions_and_scores_that_never_drop() {
        for seed in [1, 2, 3, 7, 1234] {
            let o = opts(seed, 12);
            let mut f = Feed::new(&o);
            let mut status: std::collections::HashMap<u64, String> = Default::default();
            let mut scores: std::collections::HashMap<u64, (u64, u64)> = Default::default();
            let mut seen = [0usize; 3];
            let mut guard = 0;
            while !f.done() {
                guard += 1;
                assert!(guard < 200_000, "never finishes");
                let Some(p) = f.tick() else { continue };
                let v: Value = serde_json::from_str(&p.payload.to_json()).unwrap();
                let id = v["match_id"].as_u64().unwrap();
                let (h, a) = match p.event() {
                    "match.update" => {
                        seen[0] += 1;
                        let s = status.get(&id).map_or("scheduled", String::as_str);
                        assert_eq!(v["status"], s, "update disagrees with the last status");
                        (
                            v["home_team"]["score"].as_u64().unwrap(),
                            v["away_team"]["score"].as_u64().unwrap(),
                        )
                    }
                    "match.event" => {
                        seen[1] += 1;
                        assert_eq!(status.get(&id).map(String::as_str), Some("live"));
                        (
                            v["home_score"].as_u64().unwrap(),
                            v["away_score"].as_u64().unwrap(),
                        )
                    }
                    _ => {
                        seen[2] += 1;
                        let prev = status.get(&id).map_or("scheduled", String::as_str);
                        assert_eq!(v["previous_status"], prev);
                        let to = |s: &str| match s {
                            "scheduled" => Status::Scheduled,
                            "live" => Status::Live,
                            "half-time" => Status::HalfTime,
                            "finished" => Status::Finished,
                            other => panic!("unknown status {other}"),
                        };
                        let next = v["new_status"].as_str().unwrap();
                        assert!(to(prev).may_become(to(next)), "{prev} -> {next}");
                        status.insert(id, next.to_owned());
                        continue;
                    }
                };
                let before = scores.insert(id, (h, a)).unwrap_or((0, 0));
                assert!(
                    h >= before.0 && a >= before.1,
                    "score went down: {before:?} -> {h}-{a}"
                );
            }
            assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
            assert_eq!(f.counts(), [0, 0, 0, 12]);
            assert!(status.values().all(|s| *s == "finished"));
        }
    }

    #[test]
    fn payloads_have_exactly_the_design_fields_and_go_to_the_hierarchy() {
        let o = FeedOptions {
            cache: true,
            ..opts(5, 4)
        };
        let mut f = Feed::new(&o);
        let fixtures = f.fixtures();
        let mut checked = [false; 3];
        while !f.done() {
            let Some(p) = f.tick() else { continue };
            let v: Value = serde_json::from_str(&p.payload.to_json()).unwrap();
            let keys =
                |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
            let sorted = |fields: &[&str]| -> Vec<String> {
                let mut f: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
                f.sort();
                f
            };
            let fx = fixtures
                .iter()
                .find(|x| x.match_id == p.payload.match_id())
                .unwrap();
            assert!(fx.match_channel.starts_with("cache-sports."));
            match p.event() {
                "match.update" => {
                    checked[0] = true;
                    assert_eq!(keys(&v), sorted(payload::UPDATE_FIELDS));
                    assert_eq!(keys(&v["home_team"]), sorted(payload::TEAM_FIELDS));
                    assert_eq!(keys(&v["away_team"]), sorted(payload::TEAM_FIELDS));
                    assert_eq!(v["sport_id"], fx.sport);
                    assert_eq!(v["league_id"], fx.league);
                    assert_eq!(v["home_team"]["id"], fx.home.0);
                    let time = v["time"].as_str().unwrap();
                    assert!(time.len() == 5 && time.as_bytes()[2] == b':', "{time}");
                    assert!(v["last_updated"].as_str().unwrap().ends_with('Z'));
                    assert_eq!(
                        p.channels,
                        vec![
                            format!("sports.{}", fx.sport),
                            fx.league_channel.clone(),
                            fx.match_channel.clone(),
                            format!("sports.{}.teams.{}", fx.sport, fx.home.0),
                            format!("sports.{}.teams.{}", fx.sport, fx.away.0),
                        ]
                    );
                }
                "match.event" => {
                    checked[1] = true;
                    assert_eq!(keys(&v), sorted(payload::EVENT_FIELDS));
                    let t = v["event_type"].as_str().unwrap();
                    assert!(
                        ["goal", "card", "substitution", "point"].contains(&t),
                        "{t}"
                    );
                    let team = v["team_id"].as_u64().unwrap();
                    assert!(team == fx.home.0 || team == fx.away.0);
                    assert_eq!(
                        p.channels,
                        vec![fx.league_channel.clone(), fx.match_channel.clone()]
                    );
                }
                "match.status" => {
                    checked[2] = true;
                    assert_eq!(keys(&v), sorted(payload::STATUS_FIELDS));
                    assert_eq!(
                        p.channels,
                        vec![fx.league_channel.clone(), fx.match_channel.clone()]
                    );
                }
                other => panic!("unexpected event {other}"),
            }
        }
        assert_eq!(checked, [true; 3]);
    }

    #[test]
    fn fixtures_cover_both_sports_and_ids_are_unique() {
        let f = Feed::new(&opts(7, 2));
        let fx = f.fixtures();
        assert_eq!(fx.len(), 2);
        let mut sports: Vec<&str> = fx.iter().map(|x| x.sport).collect();
        sports.sort();
        assert_eq!(sports, ["basketball", "football"]);
        let f = Feed::new(&opts(7, 300));
        let mut ids: Vec<u64> = f.fixtures().iter().map(|x| x.match_id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 300);
        for x in f.fixtures() {
            assert_ne!(x.home.0, x.away.0);
        }
    }

    #[test]
    fn first_ticks_announce_every_fixture_as_scheduled() {
        let mut f = Feed::new(&opts(11, 5));
        for _ in 0..5 {
            let p = f.tick().unwrap();
            match p.payload {
                Payload::Update(u) => {
                    assert_eq!(u.status, "scheduled");
                    assert_eq!((u.home_team.score, u.away_team.score), (0, 0));
                    assert_eq!(u.last_updated, "2025-05-14T01:00:00Z");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
