//! `bts-guru simulate`: a realistic live-sports feed for trying the daemon (or Reverb, or
//! Pusher) with real-looking traffic.
//!
//! N concurrent matches across football (premier-league, la-liga) and basketball (nba,
//! euroleague) go from `scheduled` through `live`, `half-time` (basketball: quarters, breaks and
//! overtime) to `finished`, with a ticking match clock, goals or baskets, cards and
//! substitutions. Each change is published as the original design's events:
//!
//! - `match.update` to `sports.{sport}`, `sports.{sport}.leagues.{league}`, the match channel
//!   and both teams' `sports.{sport}.teams.{id}`;
//! - `match.event` and `match.status` to the league channel and the match channel.
//!
//! The match channel is `sports.{sport}.leagues.{league}.matches.{id}`, or with `--cache` the
//! cache channel `cache-sports.…`, so that a viewer who subscribes late gets the current score
//! at once. Events go through the Pusher HTTP API (`--via http`, the default) or through Redis
//! as Laravel's `redis` broadcaster writes them (`--via redis`).
//!
//! `--seed` fixes the whole sequence of events (timestamps aside); the generator is the pure
//! [`Feed`], which the tests drive without a clock or a network.

mod feed;
mod payload;
mod rng;
mod script;
mod teams;
mod transport;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use crate::config::{Env, ProcessEnv, DEV_APP_ID, DEV_APP_KEY, DEV_APP_SECRET};

pub use feed::{Feed, FeedOptions, Fixture, Publish};
pub use payload::{
    MatchEvent, MatchStatus, MatchUpdate, Payload, TeamScore, EVENT_FIELDS, STATUS_FIELDS,
    TEAM_FIELDS, UPDATE_FIELDS,
};
pub use transport::{HttpSink, RedisSink, Sink, LARAVEL_SCRIPT};

/// How events reach the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// The Pusher HTTP API (POST /apps/{id}/events), signed with the app's key and secret.
    Http,
    /// Redis PUBLISH in Laravel's broadcaster format (the daemon consumes it with --redis).
    Redis,
}

/// `bts-guru simulate --rate`'s default: enough for the default 8 matches at `--speed 1`, so the
/// match clock keeps (nearly) the asked speed and no warning is printed.
pub const DEFAULT_RATE: f64 = 40.0;

/// Below this share of `--speed`, the simulator says its match clock runs slower than asked.
/// Even a rate that keeps up lands a little under 1: a tick that finds an event waiting
/// publishes it instead of moving the clock (8 matches at the defaults: 0.84 or more).
pub const SLOW_CLOCK: f64 = 0.75;

/// True when the match clock, `sim_minutes` after `secs` of real time, runs clearly slower than
/// `speed` match minutes per second.
pub fn clock_behind(sim_minutes: f64, secs: f64, speed: f64) -> bool {
    sim_minutes / secs.max(0.001) < SLOW_CLOCK * speed
}

/// Flags of `bts-guru simulate`.
#[derive(Clone, Debug, clap::Args)]
pub struct SimulateArgs {
    /// Number of concurrent matches (1 to 1000), spread over football and basketball leagues.
    #[arg(long, default_value_t = 8, value_parser = parse_matches)]
    pub matches: usize,
    /// Events published per second, overall (the default keeps up with 8 matches at --speed 1;
    /// more matches or a higher speed need more).
    #[arg(long, default_value_t = DEFAULT_RATE, value_parser = parse_positive)]
    pub rate: f64,
    /// Match minutes per real second (1: a football match takes about two minutes). The match
    /// clock moves on only while nothing else waits to be published, so with too low a --rate
    /// it runs slower, and the simulator says so.
    #[arg(long, default_value_t = 1.0, value_parser = parse_positive)]
    pub speed: f64,
    /// Seed for a repeatable run: the same seed and flags give the same events (default: drawn
    /// from the clock and printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many seconds (default: when every match has finished).
    #[arg(long, value_parser = parse_positive)]
    pub duration: Option<f64>,
    /// Publish match events on cache channels (`cache-sports.….matches.{id}`), so late viewers
    /// get the current score as soon as they subscribe.
    #[arg(long)]
    pub cache: bool,
    /// Where to publish: the daemon's HTTP API, or Redis as Laravel's broadcaster does.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// Host of the daemon's HTTP API.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port of the daemon's HTTP API.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// App id (default: REVERB_APP_ID, else the daemon's development app `bts-guru-dev`).
    #[arg(long)]
    pub app_id: Option<String>,
    /// App key (default: REVERB_APP_KEY, else `bts-guru-dev-key`).
    #[arg(long)]
    pub app_key: Option<String>,
    /// App secret (default: REVERB_APP_SECRET, else `bts-guru-dev-secret`).
    #[arg(long)]
    pub app_secret: Option<String>,
    /// A dotenv file to read REVERB_APP_* and REDIS_* from (default: ./.env when it exists).
    #[arg(long)]
    pub env_file: Option<PathBuf>,
    /// Redis to publish to with --via redis (default: REDIS_URL, else one built from REDIS_HOST,
    /// REDIS_PORT, REDIS_PASSWORD and REDIS_DB, else redis://127.0.0.1:6379).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Prefix of the Redis channel names (default: REDIS_PREFIX, else Laravel's
    /// `{APP_NAME}_database_`, i.e. `laravel_database_`).
    #[arg(long)]
    pub redis_prefix: Option<String>,
    /// Log every published event (default: status changes, goals, cards and substitutions).
    #[arg(long, short)]
    pub verbose: bool,
    /// Log only the start, errors and the final scores.
    #[arg(long, short, conflicts_with = "verbose")]
    pub quiet: bool,
}

pub(crate) fn parse_matches(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a number of matches from 1 to 1000, got {s:?}"
        )),
    }
}

pub(crate) fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 100_000.0 => Ok(x),
        _ => Err(format!("expected a positive number, got {s:?}")),
    }
}

impl SimulateArgs {
    /// Parses flags as they follow `bts-guru simulate` (for tests and embedding).
    pub fn from_args<I, T>(args: I) -> Result<SimulateArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        #[derive(clap::Parser)]
        #[command(name = "bts-guru simulate")]
        struct Wrapper {
            #[command(flatten)]
            args: SimulateArgs,
        }
        let argv =
            std::iter::once(OsString::from("simulate")).chain(args.into_iter().map(Into::into));
        <Wrapper as clap::Parser>::try_parse_from(argv).map(|w| w.args)
    }

    /// The feed these flags describe, with timestamps from `start_unix_ms`.
    pub fn feed_options(&self, seed: u64, start_unix_ms: u64) -> FeedOptions {
        FeedOptions {
            seed,
            matches: self.matches,
            rate: self.rate,
            speed: self.speed,
            cache: self.cache,
            start_unix_ms,
        }
    }
}

/// The sport channels (`sports.{sport}`): every `match.update` of that sport goes to one, so
/// they are what a scoreboard subscribes to.
pub fn sport_channels() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for league in &teams::LEAGUES {
        let name = format!("sports.{}", league.sport.slug());
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// Where the run publishes, resolved from flags, environment and `.env`.
struct Target {
    app_id: String,
    app_key: String,
    app_secret: String,
    redis_url: String,
    redis_prefix: String,
}

fn resolve(args: &SimulateArgs) -> anyhow::Result<Target> {
    let env = ProcessEnv::load(args.env_file.as_ref())?;
    let get = |name: &str| env.get(name).filter(|v| !v.trim().is_empty());
    let credentials = [
        (&args.app_id, "REVERB_APP_ID", DEV_APP_ID),
        (&args.app_key, "REVERB_APP_KEY", DEV_APP_KEY),
        (&args.app_secret, "REVERB_APP_SECRET", DEV_APP_SECRET),
    ]
    .map(|(flag, name, dev)| {
        flag.clone()
            .or_else(|| get(name))
            .unwrap_or_else(|| dev.to_owned())
    });
    let [app_id, app_key, app_secret] = credentials;
    if app_id.contains(['/', '?', '#', ' ']) {
        bail!("app id {app_id:?} cannot be used in a URL path");
    }
    // As the daemon builds it from Laravel's REDIS_* settings, on loopback by default.
    let redis_url = match args.redis_url.clone().or_else(|| get("REDIS_URL")) {
        Some(u) => u,
        None => crate::config::laravel_redis_url(&env, Some("127.0.0.1"))?.unwrap_or_default(),
    };
    // REDIS_PREFIX may be empty on purpose: read it raw, as the daemon does.
    let redis_prefix = match args
        .redis_prefix
        .clone()
        .or_else(|| env.get("REDIS_PREFIX"))
    {
        Some(p) => p,
        None => {
            crate::config::laravel_prefix(&env.get("APP_NAME").unwrap_or_else(|| "laravel".into()))
        }
    };
    Ok(Target {
        app_id,
        app_key,
        app_secret,
        redis_url,
        redis_prefix,
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `bts-guru simulate`: publishes until every match has finished or `--duration` is up.
/// Fails (with a message naming the target) when the daemon or Redis cannot be reached or
/// refuses an event.
pub fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    let target = resolve(args)?;
    let seed = args.seed.unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ u64::from(std::process::id()).rotate_left(32)
    });
    let mut sink: Box<dyn Sink> = match args.via {
        Via::Http => Box::new(HttpSink::connect(
            &args.host,
            args.port,
            &target.app_id,
            &target.app_key,
            &target.app_secret,
        )?),
        Via::Redis => Box::new(RedisSink::connect(&target.redis_url, &target.redis_prefix)?),
    };
    let start_unix_ms = unix_ms();
    let mut feed = Feed::new(&args.feed_options(seed, start_unix_ms));
    let fixtures = feed.fixtures();
    let to = match args.via {
        Via::Http => format!(
            "the HTTP API at {}:{} (app {})",
            args.host, args.port, target.app_id
        ),
        Via::Redis => format!(
            "Redis (prefix {:?}) for the daemon's redis ingest",
            target.redis_prefix
        ),
    };
    eprintln!(
        "simulate: {} matches, seed {seed}, {} events/s, {} match min/s, to {to}{}",
        args.matches,
        args.rate,
        args.speed,
        match args.duration {
            Some(d) => format!(", for {d} s"),
            None => ", until every match has finished".into(),
        }
    );
    if !args.quiet {
        for f in &fixtures {
            eprintln!(
                "simulate:   {} {}/{}: {} ({}) v {} ({}), kick-off in {:.0} match min, on {}",
                f.match_id,
                f.sport,
                f.league,
                f.home.1,
                f.home.0,
                f.away.1,
                f.away.0,
                f.kickoff_minutes,
                f.match_channel
            );
        }
    }
    let names: HashMap<u64, &'static str> =
        fixtures.iter().flat_map(|f| [f.home, f.away]).collect();
    let by_id: HashMap<u64, &Fixture> = fixtures.iter().map(|f| (f.match_id, f)).collect();

    let max_ticks = args.duration.map(|d| (d * args.rate).ceil() as u64);
    let started = Instant::now();
    let mut published = 0u64;
    let mut next_summary = Duration::from_secs(5);
    while !feed.done() && max_ticks.is_none_or(|m| feed.ticks() < m) {
        let due = Duration::from_secs_f64(feed.ticks() as f64 / args.rate);
        let elapsed = started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        let Some(p) = feed.tick() else { continue };
        sink.send(&p)
            .with_context(|| format!("stopped after {published} published event(s)"))?;
        published += 1;
        let secs = started.elapsed().as_secs_f64();
        if args.verbose {
            eprintln!(
                "simulate: [{secs:7.2}s] {} -> {}: {}",
                p.event(),
                p.channels.join(", "),
                p.payload.to_json()
            );
        } else if !args.quiet {
            if let Some(line) = describe(&p.payload, &by_id, &names) {
                eprintln!("simulate: [{secs:7.2}s] {line}");
            }
        }
        if !args.quiet && started.elapsed() >= next_summary {
            next_summary = started.elapsed() + Duration::from_secs(5);
            let [scheduled, live, half_time, finished] = feed.counts();
            let clock_speed = feed.sim_minutes() / secs.max(0.001);
            let behind = if clock_behind(feed.sim_minutes(), secs, args.speed) {
                format!(
                    " (slower than --speed {}: more happens than --rate {} can publish; raise \
                     --rate or lower --speed)",
                    args.speed, args.rate
                )
            } else {
                String::new()
            };
            eprintln!(
                "simulate: {secs:.0}s: {published} events published ({:.1}/s); {scheduled} \
                 scheduled, {live} live, {half_time} at half-time, {finished} finished; match \
                 clock at {clock_speed:.1} min/s{behind}",
                published as f64 / secs.max(0.001)
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "simulate: {} after {secs:.1}s: {published} events published",
        if feed.done() {
            "every match finished"
        } else {
            "stopped"
        }
    );
    for line in feed.scoreboard() {
        eprintln!("simulate:   {line}");
    }
    Ok(())
}

/// One log line for status changes and notable match events (not for baskets or clock updates).
fn describe(
    p: &Payload,
    fixtures: &HashMap<u64, &Fixture>,
    teams: &HashMap<u64, &'static str>,
) -> Option<String> {
    let f = fixtures.get(&p.match_id())?;
    let game = format!("{} {} v {}", f.match_id, f.home.1, f.away.1);
    match p {
        Payload::Status(s) => Some(format!("{game}: {} -> {}", s.previous_status, s.new_status)),
        Payload::Event(e) if e.event_type != "point" => {
            let team = teams.get(&e.team_id).copied().unwrap_or("?");
            let what = if e.event_type == "substitution" {
                e.description.clone()
            } else {
                format!("{}, {}", e.player_name, e.description)
            };
            Some(format!(
                "{game} {} {} ({team}): {what}; {}-{}",
                e.time, e.event_type, e.home_score, e.away_score
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sport_channels_cover_every_league_once() {
        assert_eq!(sport_channels(), ["sports.football", "sports.basketball"]);
    }

    #[test]
    fn defaults_and_flags_parse() {
        let a = SimulateArgs::from_args(Vec::<String>::new()).unwrap();
        assert_eq!((a.matches, a.rate, a.speed), (8, DEFAULT_RATE, 1.0));
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 8080));
        assert_eq!(a.via, Via::Http);
        assert!(a.seed.is_none() && a.duration.is_none() && !a.cache);
        let a = SimulateArgs::from_args([
            "--matches",
            "2",
            "--rate",
            "50",
            "--seed",
            "7",
            "--speed",
            "600",
            "--duration",
            "3",
            "--cache",
            "--via",
            "redis",
            "--redis-prefix",
            "",
        ])
        .unwrap();
        assert_eq!((a.matches, a.seed, a.duration), (2, Some(7), Some(3.0)));
        assert_eq!(a.redis_prefix.as_deref(), Some(""));
        assert!(SimulateArgs::from_args(["--matches", "0"]).is_err());
        assert!(SimulateArgs::from_args(["--rate", "-1"]).is_err());
        assert!(SimulateArgs::from_args(["--speed", "nan"]).is_err());
    }

    #[test]
    fn flags_beat_environment_and_dev_credentials_fill_in() {
        let a = SimulateArgs::from_args([
            "--app-id",
            "a",
            "--app-key",
            "k",
            "--app-secret",
            "s",
            "--redis-url",
            "redis://r:1/2",
            "--redis-prefix",
            "p_",
            "--env-file",
            "/dev/null",
        ])
        .unwrap();
        let t = resolve(&a).unwrap();
        assert_eq!(
            (t.app_id.as_str(), t.app_key.as_str(), t.app_secret.as_str()),
            ("a", "k", "s")
        );
        assert_eq!(
            (t.redis_url.as_str(), t.redis_prefix.as_str()),
            ("redis://r:1/2", "p_")
        );
    }

    #[test]
    fn unreachable_daemon_is_a_clear_error() {
        // A port nobody listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let a = SimulateArgs::from_args([
            "--port".to_string(),
            port.to_string(),
            "--env-file".into(),
            "/dev/null".into(),
            "--quiet".into(),
        ])
        .unwrap();
        let e = format!("{:#}", run(&a).unwrap_err());
        assert!(e.contains("cannot reach the daemon"), "{e}");
        assert!(e.contains(&port.to_string()), "{e}");
    }
}
