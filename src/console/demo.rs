//! `bts-guru demo`: the daemon with the console on, fed by the simulator through its own HTTP
//! API, in one process that needs nothing else installed.
//!
//! It resolves its configuration exactly as the daemon does (flags, before or after `demo`,
//! REVERB_* environment, `.env`, `--config`), so it can run beside a real deployment with that deployment's apps, but it stays
//! on its own: it never joins a cluster, sends no webhooks, opens no /metrics listener unless
//! `--metrics-port` is given, drains in one second, and refuses a port another process already
//! listens on (with SO_REUSEPORT it would otherwise share that port and take some of a running
//! daemon's clients).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{App, Cli, Config};
use crate::simulate::{self, SimulateArgs, Via};

/// `bts-guru demo`: the simulator's flags and every flag of the daemon (which may also come
/// before `demo`; those after it win).
#[derive(Clone, Debug, clap::Args)]
pub struct DemoCommand {
    #[command(flatten)]
    pub args: DemoArgs,
    #[command(flatten)]
    pub daemon: Cli,
}

/// The demo's own flags: the simulated feed.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Concurrent simulated matches per round (1 to 1000).
    #[arg(long, default_value_t = 8, value_parser = simulate::parse_matches)]
    pub matches: usize,
    /// Events published per second (the default keeps up with 8 matches at --speed 2).
    #[arg(long, default_value_t = 2.0 * simulate::DEFAULT_RATE, value_parser = simulate::parse_positive)]
    pub rate: f64,
    /// Match minutes per real second (2: a football match takes about a minute).
    #[arg(long, default_value_t = 2.0, value_parser = simulate::parse_positive)]
    pub speed: f64,
    /// Seed of the first round (the next rounds use the following seeds); default: drawn.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl DemoArgs {
    /// What the demo forces on the daemon's settings: the console on, never a cluster node, no
    /// /metrics listener unless a port was given, and a one-second drain on Ctrl-C unless
    /// --drain-secs says otherwise (nobody needs ten seconds to reconnect to a demo).
    pub fn apply(&self, cli: &mut Cli) {
        cli.console = true;
        cli.standalone = true;
        if cli.metrics_port.is_none() {
            cli.no_metrics = true;
        }
        cli.drain_secs.get_or_insert(1);
    }
}

/// What the demo changes after resolution: no webhooks, so the simulated channels never reach a
/// real application's webhook endpoint.
pub fn adjust(cfg: &mut Config) {
    for app in &mut cfg.apps {
        app.webhooks.clear();
    }
}

/// Fails when something already listens on `addr`'s port. A plain bind (without SO_REUSEPORT)
/// conflicts with any listener, including a running bts-guru's SO_REUSEPORT ones.
pub fn check_port_free(addr: SocketAddr) -> Result<(), String> {
    if addr.port() == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "cannot use {addr} for the demo: {e} (is a bts-guru or Reverb already running \
             there? pick another port with `bts-guru demo --port N`)"
        )),
    }
}

/// The token that opens the console: BTS_CONSOLE_TOKEN, else the first app's secret.
pub fn console_token(cfg: &Config) -> &str {
    cfg.console
        .as_ref()
        .and_then(|c| c.token.as_deref())
        .unwrap_or(&cfg.apps[0].secret)
}

/// The simulator's flags for round `round` against the daemon at `addr` as `app`.
pub fn feed_args(
    args: &DemoArgs,
    round: u64,
    addr: SocketAddr,
    app: &App,
    env_file: Option<PathBuf>,
) -> SimulateArgs {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => IpAddr::from([127, 0, 0, 1]),
        ip if ip.is_unspecified() => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SimulateArgs {
        matches: args.matches,
        rate: args.rate,
        speed: args.speed,
        seed: args.seed.map(|s| s.wrapping_add(round)),
        duration: None,
        cache: false,
        via: Via::Http,
        host: ip.to_string(),
        port: addr.port(),
        app_id: Some(app.id.clone()),
        app_key: Some(app.key.clone()),
        app_secret: Some(app.secret.clone()),
        env_file,
        redis_url: None,
        redis_prefix: None,
        verbose: false,
        quiet: false,
    }
}

/// Runs the simulator against the daemon on a thread of its own, one round of matches after
/// another (a new draw each round), for as long as the process lives. A round that fails (the
/// daemon draining, say) is retried after a second.
pub fn spawn_feed(
    args: DemoArgs,
    addr: SocketAddr,
    app: App,
    env_file: Option<PathBuf>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("bts-demo-feed".into())
        .spawn(move || {
            let mut round = 0u64;
            loop {
                let sim = feed_args(&args, round, addr, &app, env_file.clone());
                match simulate::run(&sim) {
                    Ok(()) => {
                        eprintln!("demo: round {} over; a new round starts", round + 1);
                        // Long enough to read the final scores.
                        std::thread::sleep(Duration::from_secs(3));
                    }
                    Err(e) => {
                        eprintln!("demo: simulator: {e:#}; retrying in 1 s");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                round += 1;
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_refused_by_name() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let err = check_port_free(addr).unwrap_err();
        assert!(
            err.contains(&addr.to_string()) && err.contains("--port"),
            "{err}"
        );
        assert!(check_port_free("127.0.0.1:0".parse().unwrap()).is_ok());
    }

    #[test]
    fn the_feed_targets_the_daemon_as_its_app() {
        let cfg = Config::from_parts(
            &Cli::default(),
            &std::collections::HashMap::new(),
            Default::default(),
            vec![0],
        )
        .unwrap();
        let d = DemoArgs {
            matches: 4,
            rate: 10.0,
            speed: 2.0,
            seed: Some(7),
        };
        let a = feed_args(&d, 2, "0.0.0.0:8123".parse().unwrap(), &cfg.apps[0], None);
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 8123));
        assert_eq!((a.seed, a.matches, a.via), (Some(9), 4, Via::Http));
        assert_eq!(a.app_secret.as_deref(), Some(cfg.apps[0].secret.as_str()));
        assert_eq!(console_token(&cfg), crate::config::DEV_APP_SECRET);
    }
}
