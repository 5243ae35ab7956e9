//! What a soak run was asked to do ([`SoakArgs`]), what every thread knows from the start
//! ([`Plan`]: the channels by kind, the users, the limits) and what they share while it runs
//! ([`Board`]: how far each channel's publishing got, the presence book, the counters).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;
use std::time::Duration;

use clap::Args as ClapArgs;

use crate::auth::Creds;
use crate::client::Target;
use crate::Env;

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Public,
    Private,
    Presence,
}

/// What every thread knows and nobody changes.
pub struct Plan {
    pub target: Target,
    pub creds: Creds,
    pub event: String,
    pub channels: Vec<String>,
    pub kinds: Vec<Kind>,
    pub lookup: HashMap<Box<[u8]>, u32>,
    /// Channel index → its slot in the presence book (presence channels only).
    pub pres_slot: Vec<Option<usize>>,
    pub public: Vec<u32>,
    pub private: Vec<u32>,
    pub presence: Vec<u32>,
    pub users: u32,
    pub presence_cap: usize,
    pub max_subs: usize,
    pub abrupt_fraction: f64,
    pub catch_up: Duration,
}

/// What the threads share while running.
pub struct Board {
    /// Per channel: sequence numbers whose publish has begun (the next one to begin).
    pub started: Vec<AtomicU64>,
    /// Per channel: one past the highest sequence number the server accepted.
    pub answered: Vec<AtomicU64>,
    /// Per presence channel: user → sockets subscribed (as far as the generator has sent).
    pub book: Mutex<Vec<HashMap<u32, u32>>>,
    pub stop_churn: AtomicBool,
    pub stop_publish: AtomicBool,
    pub live: AtomicU64,
    pub deliveries: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub sub_ops: AtomicU64,
    pub troubles: AtomicU64,
}

impl Board {
    /// Nothing published, nobody connected, for `channels` channels of which `presence` are
    /// presence channels.
    pub fn new(channels: usize, presence: usize) -> Board {
        Board {
            started: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            answered: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            book: Mutex::new(vec![HashMap::new(); presence]),
            stop_churn: AtomicBool::new(false),
            stop_publish: AtomicBool::new(false),
            live: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            sub_ops: AtomicU64::new(0),
            troubles: AtomicU64::new(0),
        }
    }
}

/// The channels (public, private, presence; named apart from other runs by the env's nonce)
/// and the limits every thread works within.
pub fn build_plan(env: &Env, a: &SoakArgs) -> Plan {
    let nonce = &env.nonce[env.nonce.len().saturating_sub(8)..];
    let mut channels = Vec::new();
    let mut kinds = Vec::new();
    let (mut public, mut private, mut presence) = (Vec::new(), Vec::new(), Vec::new());
    let mut pres_slot = Vec::new();
    for i in 0..a.public_channels {
        public.push(channels.len() as u32);
        channels.push(format!("{}.{nonce}.public.{i}", a.channel_prefix));
        kinds.push(Kind::Public);
        pres_slot.push(None);
    }
    for i in 0..a.private_channels {
        private.push(channels.len() as u32);
        channels.push(format!("private-{}.{nonce}.{i}", a.channel_prefix));
        kinds.push(Kind::Private);
        pres_slot.push(None);
    }
    for i in 0..a.presence_channels {
        presence.push(channels.len() as u32);
        channels.push(format!("presence-{}.{nonce}.{i}", a.channel_prefix));
        kinds.push(Kind::Presence);
        pres_slot.push(Some(i));
    }
    let lookup = channels
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_bytes().to_vec().into_boxed_slice(), i as u32))
        .collect();
    Plan {
        target: env.target(),
        creds: env.creds.clone(),
        event: env.c.event.clone(),
        channels,
        kinds,
        lookup,
        pres_slot,
        public,
        private,
        presence,
        users: a
            .users
            .unwrap_or(a.connections / 4)
            .clamp(1, u32::MAX as usize / 4) as u32,
        presence_cap: a.presence_max_members.max(1),
        max_subs: a.max_subs.max(1),
        abrupt_fraction: a.abrupt_fraction.clamp(0.0, 1.0),
        catch_up: Duration::from_secs_f64(a.catch_up_s.max(0.1)),
    }
}
