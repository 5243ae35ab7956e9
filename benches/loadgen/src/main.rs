//! `bts-guru-bench`: a load generator for any Pusher-protocol-7 server (bts-guru, Reverb,
//! Soketi, Sockudo, Pusher) given its host, port and app credentials.
//!
//! Plain std threads, no async runtime: a few client threads each drive thousands of
//! non-blocking WebSocket connections through one epoll instance ([`client`], driven for the
//! short scenarios by [`worker`]), spread over several loopback source addresses so ephemeral
//! ports never run out; publisher threads send paced events through the HTTP API or Laravel's
//! Redis format ([`publish`]). Every delivery is checked (latency from its `sent_ns`, loss,
//! duplicates, order per channel per publisher); the server's CPU and RSS come from /proc
//! ([`stats`]). Output: a table on stdout, then exactly one JSON line ([`report`]), and
//! optionally an SVG percentile plot ([`svg`]).
//!
//! This file is the root: the command line, the environment every scenario runs in ([`Env`]:
//! the target server, how to publish, the client threads' settings) and the dispatch to the
//! scenarios ([`scenario`], one file each: `fanout`, `idle`, `churn`, `presence`, `max`, and
//! the long `soak`). See `bts-guru-bench --help`.
//!
//! Modules, low to high (each uses only those before it): [`sys`] (the only `unsafe`: epoll,
//! socket options, rlimits), [`pace`], [`stats`], [`report`], [`svg`], [`wire`] (RFC 6455's
//! client side and the scanners of Pusher messages), [`auth`] (credentials and signing),
//! [`publish`], [`client`], [`worker`], [`scenario`].

mod auth;
mod client;
mod pace;
mod publish;
mod report;
mod scenario;
mod stats;
mod svg;
mod sys;
mod wire;
mod worker;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use auth::Creds;
use client::Target;
use publish::{HttpClient, Via};
use report::{print_error, Report};
use stats::{proc_sample, ProcSample};

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
    /// Offer permessage-deflate on every WebSocket (`permessage-deflate; client_max_window_bits`,
    /// as browsers do) and inflate compressed messages before checking them.
    #[arg(long, global = true)]
    pub deflate: bool,
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
    Fanout(scenario::fanout::FanoutArgs),
    /// Open C connections and hold them; report the server's RSS delta per connection.
    Idle(scenario::idle::IdleArgs),
    /// Connect, subscribe and disconnect (close handshake) at a target rate for D seconds.
    Churn(scenario::churn::ChurnArgs),
    /// Join/leave storm on one presence channel (channel_data signed with the secret).
    Presence(scenario::presence::PresenceArgs),
    /// Raise the event rate stepwise until loss or p99 over the limit; report the best step.
    Max(scenario::max::MaxArgs),
    /// Long run: C connections churning (connects and disconnects, subscribes and unsubscribes
    /// over public, private and presence channels) while events are published at a steady
    /// rate; checks server RSS and fds, every delivery, and presence counts at the end.
    Soak(scenario::soak::SoakArgs),
    /// C viewers on positioned channels (bts-guru's `resume`), a fraction dropped and
    /// reconnected every second while events flow: no loss, duplicate or reordering at any
    /// viewer; resume latency and server CPU.
    Reconnect(scenario::reconnect::ReconnectArgs),
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
    std::process::exit(run(args));
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout(_) => "fanout",
            Scenario::Idle(_) => "idle",
            Scenario::Churn(_) => "churn",
            Scenario::Presence(_) => "presence",
            Scenario::Max(_) => "max",
            Scenario::Soak(_) => "soak",
            Scenario::Reconnect(_) => "reconnect",
        }
    }

    /// A generous guess of how long the run takes, seconds (the hard timeout adds 120 to it).
    fn estimate_secs(&self, c: &Common) -> f64 {
        match self {
            Scenario::Fanout(a) => scenario::fanout::estimate_secs(c, a),
            Scenario::Idle(a) => scenario::idle::estimate_secs(c, a),
            Scenario::Churn(a) => scenario::churn::estimate_secs(c, a),
            Scenario::Presence(a) => scenario::presence::estimate_secs(c, a),
            Scenario::Max(a) => scenario::max::estimate_secs(c, a),
            Scenario::Soak(a) => scenario::soak::estimate_secs(a),
            Scenario::Reconnect(a) => scenario::reconnect::estimate_secs(c, a),
        }
    }

    fn run(&self, env: &Env) -> Result<Report> {
        match self {
            Scenario::Fanout(a) => scenario::fanout::run(env, a),
            Scenario::Idle(a) => scenario::idle::run(env, a),
            Scenario::Churn(a) => scenario::churn::run(env, a),
            Scenario::Presence(a) => scenario::presence::run(env, a),
            Scenario::Max(a) => scenario::max::run(env, a),
            Scenario::Soak(a) => scenario::soak::run(env, a),
            Scenario::Reconnect(a) => scenario::reconnect::run(env, a),
        }
    }
}

impl Common {
    /// Seconds to open `n` connections at the connect rate (500/s when unpaced), with the
    /// connect timeout on top: the scenarios' estimates start from it.
    fn connect_secs(&self, n: usize) -> f64 {
        let rate = if self.connect_rate > 0.0 {
            self.connect_rate
        } else {
            500.0
        };
        n as f64 / rate + self.connect_timeout_s
    }
}

/// Runs the scenario named by `args`, prints its report, returns the exit status.
fn run(args: Args) -> i32 {
    let name = args.scenario.name();
    let hard = args
        .common
        .timeout_s
        .unwrap_or_else(|| args.scenario.estimate_secs(&args.common) + 120.0);
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(hard.max(1.0)));
            let msg =
                format!("hard timeout: the run did not finish within {hard:.0} s (--timeout-s)");
            eprintln!("bts-guru-bench: {msg}");
            print_error(name, &msg, EXIT_TIMEOUT);
            std::process::exit(EXIT_TIMEOUT);
        })
        .expect("spawn watchdog");
    let result = Env::new(&args.common).and_then(|env| args.scenario.run(&env));
    match result {
        Ok(mut report) => {
            if let Some(path) = &args.common.svg {
                let series: Vec<(String, &Histogram<u64>)> =
                    report.plots.iter().map(|(l, h)| (l.clone(), h)).collect();
                let svg = svg::percentile_plot(&report.title, &plot_subtitle(&report), &series);
                match std::fs::write(path, svg) {
                    Ok(()) => report.set("svg", json!(path.display().to_string())),
                    Err(e) => report.problem(format!("cannot write {}: {e}", path.display())),
                }
            }
            report.print(args.common.json_only);
            if report.ok() {
                EXIT_OK
            } else {
                EXIT_CHECKS_FAILED
            }
        }
        Err(e) => {
            eprintln!("bts-guru-bench: {e}");
            print_error(name, &e.0, EXIT_SETUP);
            EXIT_SETUP
        }
    }
}

fn plot_subtitle(r: &Report) -> String {
    let when = publish::iso8601(stats::now_ns());
    let server = r
        .json
        .get("target")
        .and_then(|t| t.get("ws"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    format!("{server}   {}", &when[..19])
}

/// What every scenario needs: where the server is, how to publish, how to watch it.
pub struct Env {
    pub c: Common,
    pub addr: SocketAddr,
    pub host_header: String,
    pub via: Via,
    pub creds: Creds,
    pub sources: Vec<IpAddr>,
    pub threads: usize,
    pub nonce: String,
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}:{port}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| BenchError(format!("{host}:{port} resolves to no address")))
}

impl Env {
    fn new(c: &Common) -> Result<Env> {
        let addr = resolve(&c.host, c.port)?;
        let api_host = c.api_host.clone().unwrap_or_else(|| c.host.clone());
        let api_port = c.api_port.unwrap_or(c.port);
        let via = match c.via {
            ViaKind::Http => Via::Http {
                addr: resolve(&api_host, api_port)?,
                host: format!("{api_host}:{api_port}"),
            },
            ViaKind::Redis => Via::Redis {
                url: c.redis_url.clone(),
                prefix: c.redis_prefix.clone(),
            },
        };
        if let Some(pid) = c.server_pid {
            proc_sample(&pid.to_string()).map_err(|e| {
                format!("--server-pid {pid}: {e} (the server must run on this machine)")
            })?;
        }
        if c.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        sys::raise_nofile();
        let sources = match addr.ip() {
            IpAddr::V4(ip) if ip.is_loopback() && c.source_addrs > 0 => {
                (0..c.source_addrs.min(250))
                    .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(Env {
            c: c.clone(),
            addr,
            host_header: format!("{}:{}", c.host, c.port),
            via,
            creds: Creds {
                app_id: c.app_id.clone(),
                key: c.app_key.clone(),
                secret: c.app_secret.clone(),
            },
            sources,
            threads: c.threads,
            nonce: format!(
                "{:x}",
                stats::now_ns() ^ ((std::process::id() as u64) << 40)
            ),
        })
    }

    pub fn ws_path(&self) -> String {
        format!(
            "/app/{}?protocol=7&client=bts-guru-bench&version={}&flash=false",
            self.c.app_key,
            env!("CARGO_PKG_VERSION")
        )
    }

    /// Where every WebSocket connection goes, and how.
    pub fn target(&self) -> Target {
        Target {
            addr: self.addr,
            host_header: self.host_header.clone(),
            path: self.ws_path(),
            sources: self.sources.clone(),
            connect_timeout: Duration::from_secs_f64(self.c.connect_timeout_s.max(0.1)),
            max_frame: self.c.max_frame,
            deflate: self.c.deflate,
        }
    }

    /// The server's CPU time and RSS now (with --server-pid).
    pub fn server(&self) -> Option<ProcSample> {
        self.c
            .server_pid
            .and_then(|p| proc_sample(&p.to_string()).ok())
    }

    /// Checks the open-files limit can take `n` connections (plus some slack).
    pub fn check_fds(&self, n: usize) -> Result<()> {
        let limit = sys::raise_nofile();
        if (n as u64) + 64 > limit {
            return Err(BenchError(format!(
                "{n} connections need more open files than this process may have ({limit}); \
                 raise `ulimit -n` or use fewer connections"
            )));
        }
        Ok(())
    }

    pub fn target_json(&self) -> Value {
        json!({
            "host": self.c.host,
            "port": self.c.port,
            "ws": format!("ws://{}/app/{}", self.host_header, self.c.app_key),
            "app_id": self.c.app_id,
            "via": match &self.via {
                Via::Http { host, .. } => format!("http://{host}"),
                Via::Redis { url, prefix } => format!("redis {url} prefix {prefix:?}"),
            },
            "server_pid": self.c.server_pid,
            "cpu_source": "sum of /proc/PID/task/*/schedstat (ns) when it agrees with utime+stime \
                           of /proc/PID/stat within 2 ticks, else utime+stime (clock ticks)",
        })
    }

    pub fn via_name(&self) -> &'static str {
        match self.via {
            Via::Http { .. } => "http",
            Via::Redis { .. } => "redis",
        }
    }

    /// A client of the target's HTTP API (`--api-host`/`--api-port`, else the WebSocket's).
    pub fn api_client(&self) -> Result<HttpClient> {
        let host = self.c.api_host.as_deref().unwrap_or(&self.c.host);
        let port = self.c.api_port.unwrap_or(self.c.port);
        Ok(HttpClient::new(
            resolve(host, port)?,
            format!("{host}:{port}"),
        ))
    }

    /// A scenario's report, titled `bts-guru-bench SCENARIO against ws://…`, with the target.
    pub fn report(&self, scenario: &str) -> Report {
        let title = format!(
            "bts-guru-bench {scenario} against ws://{} (app {}, publish via {})",
            self.host_header,
            self.c.app_id,
            self.via_name()
        );
        let mut r = Report::new(scenario, title);
        r.set("target", self.target_json());
        r
    }
}
