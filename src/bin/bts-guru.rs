//! The bts-guru daemon: flags and environment, logging, then `bts_guru::run`.
//!
//! The global allocator is mimalloc (see `sys::Allocator` for the one exception).
//! stdout carries exactly one line, `ready <addr>`, once every shard accepts (`demo` adds a
//! second, `console <url>`); logs go to stderr.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use bts_guru::config::{Cli, Config, ProcessEnv, DEV_APP_ID, DEV_APP_KEY, DEV_APP_SECRET};
use bts_guru::console::demo;
use bts_guru::doctor;

/// The command line: the daemon's flags and an optional subcommand. `demo` takes the daemon's
/// flags after it too (`bts-guru demo --config c.toml`), and those win over the ones before it.
#[derive(Debug, Parser)]
#[command(
    name = "bts-guru",
    version,
    about = "Pusher-protocol WebSocket broadcast server"
)]
pub struct Invocation {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub cli: Cli,
}

impl Invocation {
    /// The daemon's flags as they apply (for `demo`: its own over those before it, then what
    /// the demo forces, see `DemoArgs::apply`), and the subcommand.
    pub fn into_parts(self) -> (Cli, Option<Command>) {
        let Invocation { command, mut cli } = self;
        if let Some(Command::Demo(d)) = &command {
            cli = cli.overlay(d.daemon.clone());
            d.args.apply(&mut cli);
        }
        (cli, command)
    }
}

/// Subcommands; without one, the daemon runs.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check this host against a tuning profile and the daemon's needs; exits 1 on a failure.
    Doctor {
        /// `large` or `high-connections` (tuning/high-connections.conf), `small` (tuning/sysctl-small.conf), `low-latency`
        /// (tuning/low-latency.conf, an overlay) or a file path.
        #[arg(long, default_value = "large")]
        profile: String,
    },
    /// Publish a simulated live-sports feed (matches, scores, events) to a daemon or to Redis.
    Simulate(Box<bts_guru::simulate::SimulateArgs>),
    /// Run the daemon with the debug console and a simulated feed, and print the console's URL.
    /// Takes every daemon flag (--config, --env-file, --host, --port, ...) after `demo` too.
    Demo(Box<demo::DemoCommand>),
}

#[global_allocator]
static GLOBAL: bts_guru::sys::Allocator = bts_guru::sys::Allocator;

fn main() -> ExitCode {
    // Before the allocator maps its arenas (see `sys::disable_transparent_huge_pages`).
    if std::env::var_os("BTS_HUGE_PAGES").is_none_or(|v| v != "1") {
        bts_guru::sys::disable_transparent_huge_pages();
    }
    let (cli, command) = Invocation::parse().into_parts();
    // Before logging and the daemon's configuration: the simulator is a client of its own.
    if let Some(Command::Simulate(args)) = &command {
        return match bts_guru::simulate::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bts-guru simulate: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let demo = match &command {
        Some(Command::Demo(d)) => Some(d.args.clone()),
        _ => None,
    };
    // Non-blocking writer: a slow stderr never stalls a shard's reactor.
    let (writer, _guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_env("BTS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter)
        .with_ansi(false);
    if cli.log_format.as_deref() == Some("json") {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }

    let mut cfg =
        match ProcessEnv::load(cli.env_file.as_ref()).and_then(|env| Config::resolve(&cli, &env)) {
            Ok(cfg) => cfg,
            Err(e) => return fail(&format!("configuration error: {e}")),
        };
    if let Some(Command::Doctor { profile }) = &command {
        return doctor(profile, cfg.shards());
    }
    if demo.is_some() {
        demo::adjust(&mut cfg);
        if let Err(e) = demo::check_port_free(cfg.listen) {
            return fail(&e);
        }
    }
    if cfg.dev_credentials {
        tracing::warn!(
            app_id = DEV_APP_ID,
            app_key = DEV_APP_KEY,
            app_secret = DEV_APP_SECRET,
            "no app configured: using the built-in development credentials (set REVERB_APP_ID, \
             REVERB_APP_KEY and REVERB_APP_SECRET for real use)"
        );
    }
    for app in &cfg.apps {
        tracing::info!(
            app_id = %app.id,
            app_key = %app.key,
            max_message_size = app.max_message_size,
            activity_timeout = app.activity_timeout,
            "app"
        );
    }
    let running = match bts_guru::run(cfg) {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    let pid_file = match running.shared.cfg.pid_file.as_deref().map(PidFile::write) {
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return fail(&e),
        None => None,
    };
    let pid_file2 = pid_file.clone();
    let window = running.shared.cfg.drain_window;
    let shared = std::sync::Arc::clone(&running.shared);
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
    };
    std::thread::Builder::new()
        .name("bts-signals".into())
        .spawn(move || {
            // First SIGTERM/SIGINT: graceful drain, then exit 0. A second one: exit at once.
            let mut draining = false;
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    if !draining {
                        reload(&shared);
                    }
                    continue;
                }
                if draining {
                    eprintln!("bts-guru: second signal ({sig}), exiting now");
                    PidFile::remove(&pid_file2);
                    std::process::exit(1);
                }
                draining = true;
                eprintln!(
                    "bts-guru: signal {sig}: draining over {window:?} (send again to exit at once)"
                );
                let shared = std::sync::Arc::clone(&shared);
                let pid_file = pid_file2.clone();
                std::thread::spawn(move || {
                    bts_guru::drain(&shared, window);
                    PidFile::remove(&pid_file);
                    eprintln!("bts-guru: drained, exiting");
                    std::process::exit(0);
                });
            }
        })
        .expect("spawn the signal thread");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {}", running.addr);
    let cfg = &running.shared.cfg;
    if let Some(d) = demo {
        let url = bts_guru::console::url(running.addr, demo::console_token(cfg));
        let _ = writeln!(out, "console {url}");
        let _ = out.flush();
        eprintln!("bts-guru demo: open {url} in a browser (Ctrl-C stops)");
        if let Err(e) = demo::spawn_feed(d, running.addr, cfg.apps[0].clone(), cli.env_file) {
            return fail(&format!("cannot start the simulator thread: {e}"));
        }
    } else if cfg.console.is_some() {
        tracing::info!(
            "debug console at http://{}/console (token: BTS_CONSOLE_TOKEN, else the app secret)",
            running.addr
        );
    }
    let _ = out.flush();
    drop(out);
    running.wait();
    PidFile::remove(&pid_file);
    ExitCode::SUCCESS
}

/// `--pid-file`: this process's id, for `kill -HUP "$(cat FILE)"`.
#[derive(Clone)]
struct PidFile(std::path::PathBuf);

impl PidFile {
    /// Writes the id through a temporary file and a rename, so a reader never sees half of it.
    /// A process started beside a draining one replaces the old one's file.
    fn write(path: &std::path::Path) -> Result<PidFile, String> {
        let pid = std::process::id();
        let name = path
            .file_name()
            .map_or_else(Default::default, |n| n.to_string_lossy());
        let tmp = path.with_file_name(format!(".{name}.{pid}.tmp"));
        std::fs::write(&tmp, format!("{pid}\n"))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("cannot write the pid file {}: {e}", path.display())
            })?;
        Ok(PidFile(path.to_owned()))
    }

    /// Removes the file on exit, unless a newer process has written its own id there since.
    fn remove(file: &Option<PidFile>) {
        let Some(PidFile(path)) = file else {
            return;
        };
        let ours =
            std::fs::read_to_string(path).is_ok_and(|t| t.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// SIGHUP: re-reads the flags' files (`--config`, `--env-file` / `.env`) and applies what can
/// change without a restart: apps and the TLS certificate.
fn reload(shared: &bts_guru::node::Shared) {
    let cfg = Invocation::try_parse()
        .map_err(|e| e.to_string())
        .and_then(|inv| {
            let (cli, _) = inv.into_parts();
            ProcessEnv::load(cli.env_file.as_ref())
                .and_then(|env| Config::resolve(&cli, &env))
                .map_err(|e| e.to_string())
        });
    let cfg = match cfg {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::error!("reload refused: configuration error: {e} (nothing was changed)");
            return;
        }
    };
    match bts_guru::reload(shared, &cfg) {
        Ok(done) => {
            tracing::info!(
                added = ?done.apps.added,
                changed = ?done.apps.changed,
                removed = ?done.apps.removed,
                tls_reloaded = done.tls,
                "configuration reloaded"
            );
            if !done.needs_restart.is_empty() {
                tracing::warn!(
                    settings = ?done.needs_restart,
                    "reload: these settings changed but need a restart; still running with the old values"
                );
            }
        }
        Err(e) => tracing::error!("reload refused: {e}"),
    }
}

/// `bts-guru doctor`: prints the checks on stdout; exit 1 when one fails.
fn doctor(profile: &str, shards: usize) -> ExitCode {
    let text = match profile {
        "large" | "high-connections" => doctor::LARGE.to_owned(),
        "small" => doctor::SMALL.to_owned(),
        "low-latency" => doctor::LOW_LATENCY.to_owned(),
        path => match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => return fail(&format!("cannot read profile {path}: {e}")),
        },
    };
    let (soft, hard) = bts_guru::sys::nofile_limits().unwrap_or((0, 0));
    let host = doctor::Host {
        sysctl: &doctor::read_sysctl,
        nofile_soft: Some(soft),
        nofile_hard: Some(hard),
        memlock: bts_guru::sys::memlock_limit(),
        cap_ipc_lock: bts_guru::sys::has_cap_ipc_lock(),
        cpus: bts_guru::config::available_cpus().len(),
    };
    let findings = doctor::check(&text, &host, shards);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "bts-guru doctor: profile {profile}, {shards} shard(s)\n"
    );
    match doctor::report(&findings, &mut out) {
        doctor::Level::Fail => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}

/// One clear line on stderr and a non-zero exit. Written directly: the log writer is
/// asynchronous and may not flush before exit.
fn fail(msg: &str) -> ExitCode {
    eprintln!("bts-guru: {msg}");
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use demo::DemoArgs;
    use std::net::IpAddr;

    fn parse(argv: &[&str]) -> (Cli, DemoArgs) {
        let inv =
            Invocation::try_parse_from(std::iter::once("bts-guru").chain(argv.iter().copied()))
                .unwrap();
        let (cli, command) = inv.into_parts();
        let Some(Command::Demo(d)) = command else {
            panic!("demo subcommand")
        };
        (cli, d.args)
    }

    #[test]
    fn demo_flags_override_the_daemons_and_turn_the_console_on() {
        let (c, d) = parse(&["--port", "1", "--shards", "2", "demo", "--port", "9000"]);
        assert_eq!((d.matches, d.rate, d.speed, d.seed), (8, 80.0, 2.0, None));
        assert_eq!((c.port, c.shards, c.host), (Some(9000), Some(2), None));
        assert!(c.console && c.standalone && c.no_metrics);
        assert_eq!(c.drain_secs, Some(1));
        let (c, _) = parse(&["--metrics-port", "0", "--drain-secs", "5", "demo"]);
        assert!(
            !c.no_metrics,
            "an explicit --metrics-port keeps the listener"
        );
        assert_eq!(c.drain_secs, Some(5));
        assert_eq!(c.port, None, "the daemon's default port then applies");
    }

    #[test]
    fn every_daemon_flag_is_taken_after_demo_too() {
        let (c, d) = parse(&[
            "--log-format",
            "json",
            "--allow-dev-credentials",
            "demo",
            "--config",
            "c.toml",
            "--env-file",
            "x.env",
            "--host",
            "0.0.0.0",
            "--shards",
            "3",
            "--metrics-port",
            "9700",
            "--drain-secs",
            "4",
            "--matches",
            "2",
        ]);
        assert_eq!(c.config.as_deref(), Some(std::path::Path::new("c.toml")));
        assert_eq!(c.env_file.as_deref(), Some(std::path::Path::new("x.env")));
        assert_eq!(c.host, Some(IpAddr::from([0, 0, 0, 0])));
        assert_eq!(
            (c.shards, c.metrics_port, c.drain_secs),
            (Some(3), Some(9700), Some(4))
        );
        assert!(c.allow_dev_credentials && !c.no_metrics);
        assert_eq!(c.log_format.as_deref(), Some("json"));
        assert_eq!(d.matches, 2);
    }
}
