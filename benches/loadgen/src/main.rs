//! `bts-guru-bench`: a load generator for any Pusher-protocol-7 server (bts-guru, Reverb,
//! Soketi, Sockudo, Pusher) given its host, port and app credentials.
//!
//! Plain std threads, no async runtime: a few client threads each drive thousands of
//! non-blocking WebSocket connections through one epoll instance ([`worker`]), spread over
//! several loopback source addresses so ephemeral ports never run out; publisher threads send
//! paced events through the HTTP API or Laravel's Redis format ([`publish`]). Every delivery
//! is checked (latency from its `sent_ns`, loss, duplicates, order per channel per publisher);
//! the server's CPU and RSS come from /proc ([`stats`]). Output: a table on stdout, then exactly
//! one JSON line, and optionally an SVG percentile plot ([`svg`]).
//!
//! Scenarios ([`scenario`]): `fanout`, `idle`, `churn`, `presence`, `max`, and the long `soak`
//! ([`soak`]). See `bts-guru-bench --help`.

mod auth;
mod client;
mod pace;
mod publish;
mod report;
mod scenario;
mod soak;
mod stats;
mod svg;
mod sys;
mod wire;
mod worker;

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};

/// Exit status: the run finished and every check passed.
pub const EXIT_OK: i32 = 0;
/// The run finished but a check failed (loss, duplicates, reorders, errors).
pub const EXIT_CHECKS_FAILED: i32 = 1;
/// The run could not be done (bad arguments, server unreachable, credentials refused...).
pub const EXIT_SETUP: i32 = 2;
/// The hard overall timeout fired.
pub const EXIT_TIMEOUT: i32 = 3;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "bts-guru-bench",
    version,
    about = "Load generator for Pusher-protocol WebSocket servers (bts-guru, Reverb, Soketi, Sockudo, Pusher)",
    long_about = "Load generator for Pusher-protocol WebSocket servers (bts-guru, Reverb, Soketi, \
Sockudo, Pusher).\n\nPrints a table, then exactly one JSON line with every figure. Exit status: 0 \
all checks passed, 1 the run finished but a check failed (loss, duplicates, reorders, errors), \
2 the run could not be done (e.g. cannot connect), 3 the hard timeout fired."
)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct Common {
    /// Server host (WebSocket and, unless --api-host, HTTP API).
    #[arg(long, global = true, default_value = "127.0.0.1")]
    pub host: String,
    /// Server port.
    #[arg(long, global = true, default_value_t = 8080)]
    pub port: u16,
    /// HTTP API host, if not --host.
    #[arg(long, global = true)]
    pub api_host: Option<String>,
    /// HTTP API port, if not --port.
    #[arg(long, global = true)]
    pub api_port: Option<u16>,
    /// App id.
    #[arg(
        long,
        global = true,
        env = "REVERB_APP_ID",
        default_value = "bts-guru-dev"
    )]
    pub app_id: String,
    /// App key.
    #[arg(
        long,
        global = true,
        env = "REVERB_APP_KEY",
        default_value = "bts-guru-dev-key"
    )]
    pub app_key: String,
    /// App secret (signs HTTP API requests and private/presence subscriptions).
    #[arg(
        long,
        global = true,
        env = "REVERB_APP_SECRET",
        default_value = "bts-guru-dev-secret",
        hide_env_values = true
    )]
    pub app_secret: String,
    /// How events are published.
    #[arg(long, global = true, value_enum, default_value_t = ViaKind::Http)]
    pub via: ViaKind,
    /// Redis for --via redis.
    #[arg(long, global = true, default_value = "redis://127.0.0.1:6379/0")]
    pub redis_url: String,
    /// Key prefix for --via redis (Laravel's REDIS_PREFIX).
    #[arg(long, global = true, default_value = "laravel_database_")]
    pub redis_prefix: String,
    /// PID of the server process, to read its CPU time and RSS from /proc (same machine).
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Write a latency percentile plot (SVG) here.
    #[arg(long, global = true)]
    pub svg: Option<PathBuf>,
    /// Client threads (each drives many connections through one epoll).
    #[arg(long, global = true, default_value_t = 2)]
    pub threads: usize,
    /// Spread connections over this many source addresses 127.0.0.2.. (loopback targets only;
    /// 0: let the kernel choose).
    #[arg(long, global = true, default_value_t = 8)]
    pub source_addrs: usize,
    /// Handshakes in flight at once, all threads together.
    #[arg(long, global = true, default_value_t = 512)]
    pub connect_concurrency: usize,
    /// New connections per second, all threads together (0: as fast as the concurrency allows).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Per connection: seconds allowed from connect to ready (subscribed).
    #[arg(long, global = true, default_value_t = 15.0)]
    pub connect_timeout_s: f64,
    /// Event name published and expected.
    #[arg(long, global = true, default_value = "match.update")]
    pub event: String,
    /// Hard limit for the whole run, seconds (default: the scenario's estimate + 120).
    #[arg(long, global = true)]
    pub timeout_s: Option<f64>,
    /// Print only the JSON line on stdout.
    #[arg(long, global = true)]
    pub json_only: bool,
    /// Largest server frame accepted, bytes.
    #[arg(long, global = true, default_value_t = 1 << 20)]
    pub max_frame: usize,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViaKind {
    /// The Pusher HTTP API (POST /apps/{id}/events, signed).
    Http,
    /// Laravel's Redis broadcaster format (EVAL publishing to <prefix><channel>).
    Redis,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// C subscribers over K channels; publish R events/s for D seconds; check every delivery.
    Fanout(FanoutArgs),
    /// Open C connections and hold them; report the server's RSS delta per connection.
    Idle(IdleArgs),
    /// Connect, subscribe and disconnect (close handshake) at a target rate for D seconds.
    Churn(ChurnArgs),
    /// Join/leave storm on one presence channel (channel_data signed with the secret).
    Presence(PresenceArgs),
    /// Raise the event rate stepwise until loss or p99 over the limit; report the best step.
    Max(MaxArgs),
    /// Long run: C connections churning (connects and disconnects, subscribes and unsubscribes
    /// over public, private and presence channels) while events are published at a steady
    /// rate; checks server RSS and fds, every delivery, and presence counts at the end.
    Soak(SoakArgs),
}

#[derive(ClapArgs, Debug, Clone)]
pub struct FanoutArgs {
    /// Subscribing connections.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub connections: usize,
    /// Channels; connection i subscribes to channel i mod K.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub channels: usize,
    /// Events per second, all publishers together.
    #[arg(short = 'r', long, default_value_t = 10.0)]
    pub rate: f64,
    /// Publishing time, seconds.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,
    /// Channels each event is published to (rotating over the K channels).
    #[arg(long, default_value_t = 1)]
    pub channels_per_event: usize,
    /// Publisher threads (one connection each), sharing the rate.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Subscribe to private- channels (signed auth).
    #[arg(long)]
    pub private: bool,
    /// Channel names are <prefix><i>.
    #[arg(long, default_value = "sports.football.leagues.l")]
    pub channel_prefix: String,
    /// After publishing, wait at most this long for outstanding deliveries, ms.
    #[arg(long, default_value_t = 5000)]
    pub drain_ms: u64,
    /// Pause between the last subscription and the first publish, ms.
    #[arg(long, default_value_t = 500)]
    pub settle_ms: u64,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct IdleArgs {
    /// Connections to open and hold.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub connections: usize,
    /// Also subscribe each connection to one of K channels (0: no subscription).
    #[arg(short = 'k', long, default_value_t = 0)]
    pub channels: usize,
    /// Wait this long after the last connection is ready before reading the RSS, ms.
    #[arg(long, default_value_t = 1500)]
    pub settle_ms: u64,
    /// Then hold the connections this many seconds more (RSS read again at the end).
    #[arg(long, default_value_t = 0.0)]
    pub hold_s: f64,
    /// Channel names are <prefix><i>.
    #[arg(long, default_value = "sports.football.leagues.l")]
    pub channel_prefix: String,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct ChurnArgs {
    /// New connections per second.
    #[arg(short = 'r', long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds to keep opening connections.
    #[arg(short = 'd', long, default_value_t = 5.0)]
    pub duration: f64,
    /// Each connection stays this long after subscribing, ms.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Each connection subscribes to one of K channels (0: none, close after connecting).
    #[arg(short = 'k', long, default_value_t = 10)]
    pub channels: usize,
    /// Wait this long after the last close before reading the server's RSS, ms.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Channel names are <prefix><i>.
    #[arg(long, default_value = "sports.football.leagues.l")]
    pub channel_prefix: String,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct PresenceArgs {
    /// Members (one connection and user each).
    #[arg(short = 'm', long, default_value_t = 200)]
    pub members: usize,
    /// Joins (and leaves) per second, all threads together (0: all at once).
    #[arg(short = 'r', long, default_value_t = 0.0)]
    pub rate: f64,
    /// Fraction of the members that leave (unsubscribe) after everyone joined.
    #[arg(long, default_value_t = 0.5)]
    pub leave_fraction: f64,
    /// Presence channel (default presence-bench.<random>).
    #[arg(long)]
    pub channel: Option<String>,
    /// Wait at most this long for every member to know every other one, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub settle_timeout_s: f64,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct MaxArgs {
    /// Subscribing connections.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub connections: usize,
    /// Channels; connection i subscribes to channel i mod K.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub channels: usize,
    /// Events per second of the first step.
    #[arg(long, default_value_t = 100.0)]
    pub start_rate: f64,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 1.5)]
    pub step_factor: f64,
    /// Seconds per step.
    #[arg(long, default_value_t = 5.0)]
    pub step_s: f64,
    /// Most steps.
    #[arg(long, default_value_t = 15)]
    pub max_steps: usize,
    /// Stop before a step over this rate (events/s).
    #[arg(long, default_value_t = 1_000_000.0)]
    pub max_rate: f64,
    /// A step passes when its p99 is at most this (and nothing is lost), ms.
    #[arg(long, default_value_t = 50.0)]
    pub p99_ms: f64,
    /// Publisher threads (one connection each), sharing the rate.
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Channels each event is published to.
    #[arg(long, default_value_t = 1)]
    pub channels_per_event: usize,
    /// After each step, wait at most this long for outstanding deliveries, ms.
    #[arg(long, default_value_t = 3000)]
    pub drain_ms: u64,
    /// Channel names are <prefix><i>.
    #[arg(long, default_value = "sports.football.leagues.l")]
    pub channel_prefix: String,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct SoakArgs {
    /// Connections held open (the population churns, its size stays).
    #[arg(short = 'c', long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connections closed and replaced by new ones per second, once all are open.
    #[arg(long, default_value_t = 500.0)]
    pub churn_rate: f64,
    /// Subscribe and unsubscribe operations per second, all connections together.
    #[arg(long, default_value_t = 500.0)]
    pub sub_rate: f64,
    /// Events per second published, all channels together (one channel per event).
    #[arg(short = 'r', long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds from the first connection to the end of the churn, warm-up included.
    #[arg(short = 'd', long, default_value_t = 1800.0)]
    pub duration: f64,
    /// Seconds of warm-up (the ramp included); RSS and fds are compared from its end.
    #[arg(long, default_value_t = 120.0)]
    pub warmup: f64,
    /// New connections per second while ramping up to --connections.
    #[arg(long, default_value_t = 1000.0)]
    pub ramp_rate: f64,
    /// Public channels.
    #[arg(long, default_value_t = 20)]
    pub public_channels: usize,
    /// Private channels (subscriptions signed with the app secret).
    #[arg(long, default_value_t = 20)]
    pub private_channels: usize,
    /// Presence channels (channel_data signed with the app secret).
    #[arg(long, default_value_t = 20)]
    pub presence_channels: usize,
    /// Most users the generator puts in one presence channel (the server's limit is 100).
    #[arg(long, default_value_t = 90)]
    pub presence_max_members: usize,
    /// Distinct presence users; connections pick one at random, so a user may have several
    /// sockets in a channel (default: connections / 4).
    #[arg(long)]
    pub users: Option<usize>,
    /// Most channels one connection is subscribed to at a time.
    #[arg(long, default_value_t = 3)]
    pub max_subs: usize,
    /// Connections that stay the whole run, subscribed to one channel of each kind.
    #[arg(long, default_value_t = 100)]
    pub steady: usize,
    /// Fraction of the disconnects that drop TCP without a WebSocket close frame.
    #[arg(long, default_value_t = 0.1)]
    pub abrupt_fraction: f64,
    /// Largest RSS growth allowed after the warm-up, percent, by the least-squares trend of the
    /// per-second samples from the end of the warm-up to the end.
    #[arg(long, default_value_t = 2.0)]
    pub max_rss_growth_pct: f64,
    /// How long a subscriber may take to receive every event it is owed before unsubscribing
    /// or at the end (else those events count as missing), seconds.
    #[arg(long, default_value_t = 30.0)]
    pub catch_up_s: f64,
    /// Publisher threads (one HTTP connection each; each owns every P-th channel).
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Seconds between progress lines on stderr.
    #[arg(long, default_value_t = 10.0)]
    pub progress_s: f64,
    /// Channel names start with this (a random suffix keeps runs apart).
    #[arg(long, default_value = "soak")]
    pub channel_prefix: String,
}

/// Why a run could not be done.
#[derive(Debug)]
pub struct BenchError(pub String);

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

impl From<String> for BenchError {
    fn from(s: String) -> Self {
        BenchError(s)
    }
}

impl From<&str> for BenchError {
    fn from(s: &str) -> Self {
        BenchError(s.to_owned())
    }
}

pub type Result<T> = std::result::Result<T, BenchError>;

/// Runs one scenario; prints the table and the JSON line; exits with the status.
fn main() {
    let args = Args::parse();
    std::process::exit(scenario::run(args));
}
