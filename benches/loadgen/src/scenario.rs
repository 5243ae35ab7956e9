//! The scenarios: set up connections through the client threads, publish, wait, collect, and
//! turn what was measured into a [`Report`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::auth::Creds;
use super::client::Target;
use super::publish::{run_publisher, HttpClient, PubPlan, PubResult, Sink, Via};
use super::report::{print_error, round1, round3, thousands, Report};
use super::stats::{fmt_hist, new_hist, proc_sample, summary_us, Errors, ProcSample};
use super::worker::{
    ChurnPlan, Cmd, PhaseStats, PresenceSetup, PubExpect, Setup, Shared, Spec, Worker,
    WorkerResult, PUB_STRIDE,
};
use super::{
    Args, BenchError, ChurnArgs, Common, FanoutArgs, IdleArgs, MaxArgs, PresenceArgs, Result,
    Scenario, ViaKind, EXIT_CHECKS_FAILED, EXIT_OK, EXIT_SETUP, EXIT_TIMEOUT,
};

fn scenario_name(s: &Scenario) -> &'static str {
    match s {
        Scenario::Fanout(_) => "fanout",
        Scenario::Idle(_) => "idle",
        Scenario::Churn(_) => "churn",
        Scenario::Presence(_) => "presence",
        Scenario::Max(_) => "max",
        Scenario::Soak(_) => "soak",
    }
}

/// A generous guess of how long a scenario takes, seconds (the hard timeout adds 120 to it).
fn estimate_secs(args: &Args) -> f64 {
    let c = &args.common;
    let connect = |n: usize| {
        let rate = if c.connect_rate > 0.0 {
            c.connect_rate
        } else {
            500.0
        };
        n as f64 / rate + c.connect_timeout_s
    };
    match &args.scenario {
        Scenario::Fanout(a) => {
            connect(a.connections)
                + a.duration
                + a.drain_ms as f64 / 1000.0
                + a.settle_ms as f64 / 1000.0
        }
        Scenario::Idle(a) => connect(a.connections) + a.settle_ms as f64 / 1000.0 + a.hold_s,
        Scenario::Churn(a) => a.duration + a.hold_ms as f64 / 1000.0 + c.connect_timeout_s + 10.0,
        Scenario::Presence(a) => {
            let storm = if a.rate > 0.0 {
                2.0 * a.members as f64 / a.rate
            } else {
                0.0
            };
            connect(a.members) + storm + 2.0 * a.settle_timeout_s
        }
        Scenario::Max(a) => {
            connect(a.connections)
                + a.max_steps as f64 * (a.step_s + a.drain_ms as f64 / 1000.0 + 2.0)
        }
        Scenario::Soak(a) => super::soak::estimate_secs(a),
    }
}

/// Runs the scenario named by `args`, prints its report, returns the exit status.
pub fn run(args: Args) -> i32 {
    let name = scenario_name(&args.scenario);
    let hard = args
        .common
        .timeout_s
        .unwrap_or_else(|| estimate_secs(&args) + 120.0);
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
    let result = Env::new(&args.common).and_then(|env| match &args.scenario {
        Scenario::Fanout(a) => fanout(&env, a),
        Scenario::Idle(a) => idle(&env, a),
        Scenario::Churn(a) => churn(&env, a),
        Scenario::Presence(a) => presence(&env, a),
        Scenario::Max(a) => max(&env, a),
        Scenario::Soak(a) => super::soak::soak(&env, a),
    });
    match result {
        Ok(mut report) => {
            if let Some(path) = &args.common.svg {
                let series: Vec<(String, &Histogram<u64>)> =
                    report.plots.iter().map(|(l, h)| (l.clone(), h)).collect();
                let svg =
                    super::svg::percentile_plot(&report.title, &plot_subtitle(&report), &series);
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
    let when = super::publish::iso8601(super::stats::now_ns());
    let server = r
        .json
        .get("target")
        .and_then(|t| t.get("ws"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    format!("{server}   {}", &when[..19])
}

/// What every scenario needs: where the server is, how to publish, how to watch it.
pub(super) struct Env {
    pub(super) c: Common,
    pub(super) addr: SocketAddr,
    pub(super) host_header: String,
    pub(super) via: Via,
    pub(super) creds: Creds,
    pub(super) sources: Vec<IpAddr>,
    pub(super) threads: usize,
    pub(super) nonce: String,
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
        super::sys::raise_nofile();
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
                super::stats::now_ns() ^ ((std::process::id() as u64) << 40)
            ),
        })
    }

    pub(super) fn ws_path(&self) -> String {
        format!(
            "/app/{}?protocol=7&client=bts-guru-bench&version={}&flash=false",
            self.c.app_key,
            env!("CARGO_PKG_VERSION")
        )
    }

    /// Where every WebSocket connection goes, and how.
    pub(super) fn target(&self) -> Target {
        Target {
            addr: self.addr,
            host_header: self.host_header.clone(),
            path: self.ws_path(),
            sources: self.sources.clone(),
            connect_timeout: Duration::from_secs_f64(self.c.connect_timeout_s.max(0.1)),
            max_frame: self.c.max_frame,
        }
    }

    fn server(&self) -> Option<ProcSample> {
        self.c
            .server_pid
            .and_then(|p| proc_sample(&p.to_string()).ok())
    }

    /// Checks the open-files limit can take `n` connections (plus some slack).
    pub(super) fn check_fds(&self, n: usize) -> Result<()> {
        let limit = super::sys::raise_nofile();
        if (n as u64) + 64 > limit {
            return Err(BenchError(format!(
                "{n} connections need more open files than this process may have ({limit}); \
                 raise `ulimit -n` or use fewer connections"
            )));
        }
        Ok(())
    }

    pub(super) fn target_json(&self) -> Value {
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

    fn via_name(&self) -> &'static str {
        match self.via {
            Via::Http { .. } => "http",
            Via::Redis { .. } => "redis",
        }
    }

    fn setup(&self, channels: Vec<String>, presence: Option<PresenceSetup>) -> Arc<Setup> {
        let lookup = channels
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_bytes().to_vec().into_boxed_slice(), i as u32))
            .collect();
        Arc::new(Setup {
            target: self.target(),
            creds: self.creds.clone(),
            event: self.c.event.clone(),
            channels: Arc::new(channels),
            lookup,
            presence,
            shared: Arc::new(Shared::default()),
        })
    }

    fn spawn(
        &self,
        setup: &Arc<Setup>,
        n_conns: usize,
        churn: Option<ChurnPlan>,
    ) -> Result<Workers> {
        let n = self.threads.min(n_conns.max(1)).max(1);
        let per_inflight = self.c.connect_concurrency.div_ceil(n).max(1);
        let per_rate = self.c.connect_rate / n as f64;
        let mut txs = Vec::new();
        let mut handles = Vec::new();
        for i in 0..n {
            let plan = churn.map(|mut c| {
                c.rate /= n as f64;
                c.index = i as u32;
                c.stride = n as u32;
                c
            });
            let w = Worker::new(setup.clone(), i, per_inflight, per_rate, plan)
                .map_err(|e| format!("cannot create epoll instance: {e}"))?;
            let (tx, rx) = crossbeam_channel::unbounded();
            let h = std::thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn(move || w.run(rx))
                .map_err(|e| format!("cannot start a client thread: {e}"))?;
            txs.push(tx);
            handles.push(h);
        }
        Ok(Workers { txs, handles })
    }
}

struct Workers {
    txs: Vec<Sender<Cmd>>,
    handles: Vec<JoinHandle<WorkerResult>>,
}

impl Workers {
    /// Spec `i` goes to thread `i % threads`.
    fn open(&self, specs: Vec<Spec>) {
        let n = self.txs.len();
        let mut per: Vec<Vec<Spec>> = vec![Vec::new(); n];
        for (i, s) in specs.into_iter().enumerate() {
            per[i % n].push(s);
        }
        for (tx, s) in self.txs.iter().zip(per) {
            let _ = tx.send(Cmd::Open(s));
        }
    }

    fn snapshot(&self, phase: u32, expected: Arc<Vec<PubExpect>>) -> PhaseStats {
        let (rtx, rrx) = crossbeam_channel::unbounded();
        for tx in &self.txs {
            let _ = tx.send(Cmd::Snapshot {
                phase,
                expected: expected.clone(),
                reply: rtx.clone(),
            });
        }
        drop(rtx);
        let mut total = PhaseStats::new();
        for st in rrx.iter() {
            total.merge(&st);
        }
        total
    }

    fn stop(self) -> WorkerResult {
        for tx in &self.txs {
            let _ = tx.send(Cmd::Stop);
        }
        let mut all: Option<WorkerResult> = None;
        for h in self.handles {
            let Ok(r) = h.join() else {
                continue;
            };
            match all.as_mut() {
                None => all = Some(r),
                Some(a) => merge(a, &r),
            }
        }
        all.expect("at least one client thread")
    }
}

fn merge(a: &mut WorkerResult, b: &WorkerResult) {
    let _ = a.establish.add(&b.establish);
    let _ = a.handshake.add(&b.handshake);
    a.errors.merge(&b.errors);
    for (k, v) in &b.server_closes {
        *a.server_closes.entry(k.clone()).or_default() += v;
    }
    a.malformed += b.malformed;
    a.other_events += b.other_events;
    a.pings_answered += b.pings_answered;
    let _ = a.churn_cycle.add(&b.churn_cycle);
    a.churn_deferred += b.churn_deferred;
    let _ = a.presence_join.add(&b.presence_join);
    let _ = a.presence_added.add(&b.presence_added);
    let _ = a.presence_removed.add(&b.presence_removed);
    a.presence_dup_added += b.presence_dup_added;
    a.presence_unknown_removed += b.presence_unknown_removed;
    a.presence_self_events += b.presence_self_events;
    a.presence_foreign += b.presence_foreign;
    a.presence_after_leave += b.presence_after_leave;
    a.presence_early += b.presence_early;
}

struct Connected {
    ready: u64,
    failed: u64,
    elapsed: Duration,
}

/// Waits until `want` connections are ready or failed; prints progress to stderr.
fn wait_connected(shared: &Shared, want: u64, what: &str, limit: Duration) -> Connected {
    let t = Instant::now();
    let mut last_print = t;
    loop {
        let (r, f) = (shared.ready.load(Relaxed), shared.failed.load(Relaxed));
        if r + f >= want || t.elapsed() > limit {
            return Connected {
                ready: r,
                failed: f,
                elapsed: t.elapsed(),
            };
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!("bts-guru-bench: {what}: {r} ready, {f} failed of {want}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn connect_limit(env: &Env, n: usize) -> Duration {
    let rate = if env.c.connect_rate > 0.0 {
        env.c.connect_rate
    } else {
        300.0
    };
    Duration::from_secs_f64(n as f64 / rate + env.c.connect_timeout_s + 5.0)
}

/// Opens `n` connections, connection `i` subscribed to channel `i % channels`, and waits until
/// all are subscribed; fails with the threads stopped when some never get there.
fn open_subscribed(
    env: &Env,
    setup: &Arc<Setup>,
    n: usize,
    channels: usize,
) -> Result<(Workers, Connected)> {
    let workers = env.spawn(setup, n, None)?;
    workers.open(
        (0..n as u32)
            .map(|i| Spec {
                id: i,
                channel: Some(i % channels as u32),
            })
            .collect(),
    );
    let want = n as u64;
    let con = wait_connected(&setup.shared, want, "subscribing", connect_limit(env, n));
    if con.ready < want {
        return Err(connect_failure(workers, &con, want));
    }
    Ok((workers, con))
}

/// Stops the threads and turns connection failures into one clear error.
fn connect_failure(workers: Workers, c: &Connected, want: u64) -> BenchError {
    let res = workers.stop();
    let mut msg = if c.ready + c.failed < want {
        format!(
            "only {} of {want} connections were ready after {:.1} s ({} failed)",
            c.ready,
            c.elapsed.as_secs_f64(),
            c.failed
        )
    } else {
        format!("{} of {want} connections failed", c.failed)
    };
    let mut errs: Vec<(&String, &u64)> = res.errors.0.iter().collect();
    errs.sort_by(|a, b| b.1.cmp(a.1));
    for (e, n) in errs.iter().take(5) {
        msg.push_str(&format!("; {n}x {e}"));
    }
    BenchError(msg)
}

/// One WebSocket connection with tungstenite's blocking client: checks the server answers, the
/// key is accepted and (when `probe` is set) that an event published by us arrives.
pub(super) fn preflight(env: &Env, probe: bool) -> Result<()> {
    let stream = TcpStream::connect_timeout(&env.addr, Duration::from_secs(3)).map_err(|e| {
        format!(
            "cannot connect to {}: {e} (is the server running on {}:{}?)",
            env.addr, env.c.host, env.c.port
        )
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let url = format!("ws://{}{}", env.host_header, env.ws_path());
    let (mut ws, _) = tungstenite::client::client(url.as_str(), stream)
        .map_err(|e| format!("WebSocket handshake with {url} failed: {e}"))?;
    let first = read_json(&mut ws).map_err(|e| format!("{url}: {e}"))?;
    match first["event"].as_str() {
        Some("pusher:connection_established") => {}
        Some("pusher:error") => {
            return Err(BenchError(format!(
                "the server refused app key {:?}: {}",
                env.c.app_key, first["data"]
            )))
        }
        _ => {
            return Err(BenchError(format!(
                "{url}: expected pusher:connection_established, got {first}"
            )))
        }
    }
    if probe {
        let channel = format!("bench-preflight.{}", env.nonce);
        let sub = json!({"event":"pusher:subscribe","data":{"channel": channel}}).to_string();
        ws.send(tungstenite::Message::text(sub))
            .map_err(|e| format!("preflight subscribe: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = read_json(&mut ws).map_err(|e| format!("preflight subscribe: {e}"))?;
            if m["event"] == "pusher_internal:subscription_succeeded" {
                break;
            }
            if Instant::now() > deadline {
                return Err("preflight: no subscription_succeeded".into());
            }
        }
        let mut sink = Sink::open(&env.via, &env.creds)?;
        let data = super::publish::match_update(0, 0, u32::MAX, 0, super::stats::now_ns());
        sink.publish(&env.c.event, &[&channel], &data)
            .map_err(|e| format!("publishing through {} failed: {e}", env.via_name()))?;
        loop {
            match read_json(&mut ws) {
                Ok(m) if m["event"] == env.c.event.as_str() && m["channel"] == channel.as_str() => {
                    break
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(BenchError(format!(
                        "an event published through {} did not arrive on {channel} within 5 s \
                         ({e}){}",
                        env.via_name(),
                        if env.via_name() == "redis" {
                            "; is the server consuming this Redis with this prefix (REDIS_URL, REDIS_PREFIX)?"
                        } else {
                            ""
                        }
                    )))
                }
            }
            if Instant::now() > deadline {
                return Err(BenchError(format!(
                    "an event published through {} did not arrive within 5 s",
                    env.via_name()
                )));
            }
        }
    }
    let _ = ws.close(None);
    let _ = ws.flush();
    Ok(())
}

fn read_json(ws: &mut tungstenite::WebSocket<TcpStream>) -> std::result::Result<Value, String> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                return serde_json::from_str(t.as_str()).map_err(|e| format!("bad JSON: {e}"))
            }
            Ok(tungstenite::Message::Close(f)) => {
                return Err(format!(
                    "the server closed the connection{}",
                    f.map(|f| format!(" with code {} ({})", u16::from(f.code), f.reason))
                        .unwrap_or_default()
                ))
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out waiting for the server".into())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `GET /apps/{id}/connections` (Reverb and bts-guru have it; Pusher does not).
pub(super) fn server_connections(env: &Env) -> Option<u64> {
    let api_host = env.c.api_host.clone().unwrap_or_else(|| env.c.host.clone());
    let api_port = env.c.api_port.unwrap_or(env.c.port);
    let addr = resolve(&api_host, api_port).ok()?;
    let mut http = HttpClient::new(addr, format!("{api_host}:{api_port}"));
    let target = env.creds.signed_target(
        "GET",
        &format!("/apps/{}/connections", env.c.app_id),
        &[],
        b"",
    );
    let (status, body) = http.request("GET", &target, b"").ok()?;
    if status != 200 {
        return None;
    }
    serde_json::from_str::<Value>(&body).ok()?["connections"].as_u64()
}

fn channel_names(prefix: &str, k: usize, private: bool) -> Vec<String> {
    (0..k)
        .map(|i| {
            if private && !prefix.starts_with("private-") {
                format!("private-{prefix}{i}")
            } else {
                format!("{prefix}{i}")
            }
        })
        .collect()
}

struct Published {
    results: Vec<PubResult>,
    elapsed: Duration,
    expected: Arc<Vec<PubExpect>>,
    /// Per channel: events accepted for it (all publishers).
    per_channel: Vec<u64>,
    planned: u64,
    rate: f64,
}

impl Published {
    fn sent(&self) -> u64 {
        self.results.iter().map(|r| r.sent).sum()
    }
    fn accepted(&self) -> u64 {
        self.results.iter().map(|r| r.accepted).sum()
    }
    fn errors(&self) -> Errors {
        let mut e = Errors::default();
        for r in &self.results {
            e.merge(&r.errors);
        }
        e
    }
    fn rtt(&self) -> Histogram<u64> {
        let mut h = new_hist();
        for r in &self.results {
            let _ = h.add(&r.rtt);
        }
        h
    }
    fn achieved_rate(&self) -> f64 {
        self.sent() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn max_lag(&self) -> Duration {
        self.results
            .iter()
            .map(|r| r.max_lag)
            .max()
            .unwrap_or_default()
    }
    fn reconnects(&self) -> u64 {
        self.results.iter().map(|r| r.reconnects).sum()
    }
    fn json(&self) -> Value {
        json!({
            "events_planned": self.planned,
            "sent": self.sent(),
            "accepted": self.accepted(),
            "errors": self.errors().total(),
            "target_rate": self.rate,
            "achieved_rate": round1(self.achieved_rate()),
            "seconds": round3(self.elapsed.as_secs_f64()),
            "max_lag_ms": round3(self.max_lag().as_secs_f64() * 1000.0),
            "rtt_us": summary_us(&self.rtt()),
            "reconnects": self.reconnects(),
            "publishers": self.results.len(),
        })
    }
}

/// Publishes `total` events at `rate` with one thread per sink; phase `phase`.
fn publish_phase(
    env: &Env,
    sinks: &mut [Sink],
    channels: &Arc<Vec<String>>,
    phase: u32,
    rate: f64,
    total: u64,
    per_event: usize,
) -> Published {
    let start = Instant::now() + Duration::from_millis(20);
    let give_up_at = start + Duration::from_secs_f64(total as f64 / rate + 30.0);
    let stride = sinks.len() as u64;
    let results: Vec<PubResult> = std::thread::scope(|s| {
        let hs: Vec<_> = sinks
            .iter_mut()
            .enumerate()
            .map(|(p, sink)| {
                let plan = PubPlan {
                    publisher: (phase as u64 * PUB_STRIDE + p as u64) as u32,
                    index: p as u64,
                    stride,
                    total_events: total,
                    rate,
                    start,
                    give_up_at,
                    event: env.c.event.clone(),
                    channels: channels.clone(),
                    channels_per_event: per_event,
                };
                s.spawn(move || run_publisher(sink, &plan))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("publisher thread"))
            .collect()
    });
    let elapsed = start.elapsed();
    let mut per_channel = vec![0u64; channels.len()];
    let expected: Vec<PubExpect> = results
        .iter()
        .map(|r| {
            for (c, bits) in r.by_channel.iter().enumerate() {
                per_channel[c] += bits.iter().map(|w| w.count_ones() as u64).sum::<u64>();
            }
            PubExpect {
                publisher: r.publisher,
                by_channel: r.by_channel.clone(),
            }
        })
        .collect();
    Published {
        results,
        elapsed,
        expected: Arc::new(expected),
        per_channel,
        planned: total,
        rate,
    }
}

/// Waits until `target` deliveries were counted, at most `limit`; returns how long it waited.
fn drain(shared: &Shared, target: u64, limit: Duration) -> Duration {
    let t = Instant::now();
    while shared.delivered.load(Relaxed) < target && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(1));
    }
    t.elapsed()
}

fn open_sinks(env: &Env, n: usize) -> Result<Vec<Sink>> {
    (0..n.max(1))
        .map(|_| Sink::open(&env.via, &env.creds).map_err(BenchError))
        .collect()
}

fn cpu_delta(a: Option<ProcSample>, b: Option<ProcSample>) -> Option<f64> {
    Some(super::stats::cpu_between(a?, b?))
}

fn opt_round(v: Option<f64>) -> Value {
    v.map(|v| json!(round3(v))).unwrap_or(Value::Null)
}

fn self_cpu() -> Option<ProcSample> {
    proc_sample("self").ok()
}

fn worker_json(r: &WorkerResult) -> Value {
    json!({
        "malformed": r.malformed,
        "other_events": r.other_events,
        "pings_answered": r.pings_answered,
        "server_closes": r.server_closes,
    })
}

fn errors_into(report: &mut Report, r: &WorkerResult, extra: &Errors) {
    let mut all = r.errors.clone();
    all.merge(extra);
    report.set("errors", all.to_json());
    if !all.is_empty() {
        let mut v: Vec<(&String, &u64)> = all.0.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        for (e, n) in v.iter().take(8) {
            report.row("error", format!("{n}x {e}"));
        }
    }
}

fn connect_rows(
    report: &mut Report,
    requested: usize,
    c: &Connected,
    r: &WorkerResult,
    what: &str,
) {
    let rate = c.ready as f64 / c.elapsed.as_secs_f64().max(1e-9);
    report.row(
        "connections",
        format!(
            "{} ready, {} failed of {} in {:.2} s ({}/s)",
            thousands(c.ready),
            c.failed,
            thousands(requested as u64),
            c.elapsed.as_secs_f64(),
            thousands(rate as u64)
        ),
    );
    report.row(format!("establish ({what})"), fmt_hist(&r.establish));
    report.set(
        "connect",
        json!({
            "requested": requested,
            "ready": c.ready,
            "failed": c.failed,
            "seconds": round3(c.elapsed.as_secs_f64()),
            "per_s": round1(rate),
            "establish_us": summary_us(&r.establish),
            "handshake_us": summary_us(&r.handshake),
            "establish_means": what,
        }),
    );
}

pub(super) fn title(env: &Env, what: &str) -> String {
    format!(
        "bts-guru-bench {what} against ws://{} (app {}, publish via {})",
        env.host_header,
        env.c.app_id,
        env.via_name()
    )
}

// ---------------------------------------------------------------------------------------------

fn fanout(env: &Env, a: &FanoutArgs) -> Result<Report> {
    if a.connections == 0 || a.channels == 0 || a.rate <= 0.0 || a.duration <= 0.0 {
        return Err("fanout needs --connections, --channels, --rate and --duration above 0".into());
    }
    env.check_fds(a.connections)?;
    let channels = channel_names(&a.channel_prefix, a.channels, a.private);
    preflight(env, true)?;
    let mut sinks = open_sinks(env, a.publishers)?;
    let s0 = env.server();
    let setup = env.setup(channels, None);
    let channels = setup.channels.clone();
    let (workers, con) = open_subscribed(env, &setup, a.connections, a.channels)?;
    let s1 = env.server();
    std::thread::sleep(Duration::from_millis(a.settle_ms));
    let (s2, g2) = (env.server(), self_cpu());
    let total = (a.rate * a.duration).round().max(1.0) as u64;
    eprintln!(
        "bts-guru-bench: {} subscribers ready; publishing {total} events at {}/s",
        con.ready, a.rate
    );
    let published = publish_phase(
        env,
        &mut sinks,
        &channels,
        0,
        a.rate,
        total,
        a.channels_per_event,
    );
    let mut subs = vec![0u64; a.channels];
    for i in 0..a.connections {
        subs[i % a.channels] += 1;
    }
    let expected_deliveries: u64 = published
        .per_channel
        .iter()
        .zip(&subs)
        .map(|(e, s)| e * s)
        .sum();
    let drained = drain(
        &setup.shared,
        expected_deliveries,
        Duration::from_millis(a.drain_ms),
    );
    let (s3, g3) = (env.server(), self_cpu());
    let ps = workers.snapshot(0, published.expected.clone());
    let res = workers.stop();
    let s4 = env.server();

    let mut r = Report::new("fanout", title(env, "fanout"));
    r.set("target", env.target_json());
    r.set(
        "params",
        json!({
            "connections": a.connections, "channels": a.channels, "rate": a.rate,
            "duration_s": a.duration, "channels_per_event": a.channels_per_event,
            "publishers": a.publishers, "private": a.private, "threads": env.threads,
            "source_addrs": env.sources.len(), "event": env.c.event,
        }),
    );
    r.row(
        "params",
        format!(
            "{} connections over {} channels, {}/s for {} s, {} channel(s)/event, {} publisher(s)",
            thousands(a.connections as u64),
            a.channels,
            a.rate,
            a.duration,
            a.channels_per_event,
            a.publishers
        ),
    );
    connect_rows(
        &mut r,
        a.connections,
        &con,
        &res,
        "connect → subscription_succeeded",
    );
    publish_rows(&mut r, &published);
    let window = published.elapsed + drained;
    delivery_rows(&mut r, &ps, expected_deliveries, published.elapsed, drained);
    let cpu_pub = cpu_delta(s2, s3);
    server_rows(
        &mut r,
        env,
        &[s0, s1, s3, s4],
        cpu_delta(s0, s1),
        cpu_pub,
        window,
        ps.received,
        a.connections as u64,
    );
    gen_rows(&mut r, cpu_delta(g2, g3), window);
    r.set("other", worker_json(&res));
    errors_into(&mut r, &res, &published.errors());
    checks(&mut r, &ps, &published, &res);
    r.plots.push((
        format!("{} subs × {}/s", thousands(a.connections as u64), a.rate),
        ps.latency.clone(),
    ));
    Ok(r)
}

fn publish_rows(r: &mut Report, p: &Published) {
    r.row(
        "published",
        format!(
            "{} of {} events sent, {} accepted, {} errors; {:.1}/s achieved (target {}/s), \
             max lag {:.1} ms",
            thousands(p.sent()),
            thousands(p.planned),
            thousands(p.accepted()),
            p.errors().total(),
            p.achieved_rate(),
            p.rate,
            p.max_lag().as_secs_f64() * 1000.0
        ),
    );
    r.row("publish round trip", fmt_hist(&p.rtt()));
    r.set("publish", p.json());
}

fn delivery_rows(
    r: &mut Report,
    ps: &PhaseStats,
    expected: u64,
    publish: Duration,
    drained: Duration,
) {
    let per_s = ps.received as f64 / publish.as_secs_f64().max(1e-9);
    r.row(
        "deliveries",
        format!(
            "{} expected, {} received, {} missing, {} duplicates, {} reordered, {} unexpected",
            thousands(ps.expected),
            thousands(ps.received),
            ps.missing,
            ps.duplicates,
            ps.reordered,
            ps.unexpected
        ),
    );
    r.row(
        "throughput",
        format!(
            "{} deliveries/s (drain {:.0} ms after the last publish)",
            thousands(per_s as u64),
            drained.as_secs_f64() * 1000.0
        ),
    );
    r.row("latency publish→receive", fmt_hist(&ps.latency));
    r.set(
        "deliveries",
        json!({
            "expected": ps.expected,
            "expected_by_publishers": expected,
            "received": ps.received,
            "missing": ps.missing,
            "duplicates": ps.duplicates,
            "reordered": ps.reordered,
            "unexpected": ps.unexpected,
            "lost_subscribers": ps.lost_subscribers,
            "per_s": round1(per_s),
            "drain_ms": round1(drained.as_secs_f64() * 1000.0),
        }),
    );
    r.set("latency_us", summary_us(&ps.latency));
}

/// `samples`: before connecting, connected, after publishing, after disconnecting.
#[allow(clippy::too_many_arguments)]
fn server_rows(
    r: &mut Report,
    env: &Env,
    samples: &[Option<ProcSample>; 4],
    cpu_connect: Option<f64>,
    cpu_publish: Option<f64>,
    window: Duration,
    deliveries: u64,
    conns: u64,
) {
    let [s0, s1, s2, s3] = *samples;
    let per_1000 = cpu_publish
        .filter(|_| deliveries > 0)
        .map(|c| c / (deliveries as f64 / 1000.0));
    let util = cpu_publish.map(|c| c / window.as_secs_f64().max(1e-9) / 1000.0);
    let rss_per_conn = match (s0, s1) {
        (Some(a), Some(b)) if conns > 0 => {
            Some((b.rss_kib as f64 - a.rss_kib as f64) * 1024.0 / conns as f64)
        }
        _ => None,
    };
    if env.c.server_pid.is_some() {
        r.row(
            "server CPU",
            format!(
                "{:.0} ms connecting; {:.0} ms while publishing = {:.3} ms per 1,000 deliveries \
                 ({:.0}% of one core)",
                cpu_connect.unwrap_or(f64::NAN),
                cpu_publish.unwrap_or(f64::NAN),
                per_1000.unwrap_or(f64::NAN),
                util.unwrap_or(f64::NAN) * 100.0
            ),
        );
        r.row(
            "server RSS",
            format!(
                "{} KiB before, {} KiB connected, {} KiB after publishing, {} KiB after closing \
                 ({:.0} B per connection)",
                fmt_kib(s0),
                fmt_kib(s1),
                fmt_kib(s2),
                fmt_kib(s3),
                rss_per_conn.unwrap_or(f64::NAN)
            ),
        );
    } else {
        r.row("server CPU/RSS", "not measured (pass --server-pid)");
    }
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "cpu_ms_connect": opt_round(cpu_connect),
            "cpu_ms_publish": opt_round(cpu_publish),
            "cpu_ms_per_1000_deliveries": opt_round(per_1000),
            "cpu_cores_publish": opt_round(util),
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_connected": s1.map(|s| s.rss_kib),
            "rss_kib_after_publish": s2.map(|s| s.rss_kib),
            "rss_kib_after_close": s3.map(|s| s.rss_kib),
            "rss_bytes_per_connection": opt_round(rss_per_conn),
        }),
    );
}

fn fmt_kib(s: Option<ProcSample>) -> String {
    s.map(|s| thousands(s.rss_kib))
        .unwrap_or_else(|| "?".into())
}

fn gen_rows(r: &mut Report, cpu: Option<f64>, window: Duration) {
    let util = cpu.map(|c| c / window.as_secs_f64().max(1e-9) / 1000.0);
    r.row(
        "generator CPU",
        format!(
            "{:.0} ms while publishing ({:.0}% of one core)",
            cpu.unwrap_or(f64::NAN),
            util.unwrap_or(f64::NAN) * 100.0
        ),
    );
    r.set(
        "generator",
        json!({"cpu_ms_publish": opt_round(cpu), "cpu_cores_publish": opt_round(util)}),
    );
}

fn checks(r: &mut Report, ps: &PhaseStats, p: &Published, res: &WorkerResult) {
    if ps.missing > 0 {
        r.problem(format!("{} deliveries missing", ps.missing));
    }
    if ps.duplicates > 0 {
        r.problem(format!("{} duplicate deliveries", ps.duplicates));
    }
    if ps.reordered > 0 {
        r.problem(format!("{} deliveries out of order", ps.reordered));
    }
    if ps.unexpected > 0 {
        r.problem(format!(
            "{} unexpected deliveries (not published, or on a channel not subscribed)",
            ps.unexpected
        ));
    }
    if ps.lost_subscribers > 0 {
        r.problem(format!("{} subscribers disconnected", ps.lost_subscribers));
    }
    if p.errors().total() > 0 {
        r.problem(format!("{} publish errors", p.errors().total()));
    }
    if p.accepted() == 0 {
        r.problem("nothing was published");
    }
    if res.malformed > 0 {
        r.problem(format!("{} malformed messages", res.malformed));
    }
    if !res.errors.is_empty() {
        r.problem(format!("{} connection errors", res.errors.total()));
    }
}

// ---------------------------------------------------------------------------------------------

fn idle(env: &Env, a: &IdleArgs) -> Result<Report> {
    if a.connections == 0 {
        return Err("idle needs --connections above 0".into());
    }
    env.check_fds(a.connections)?;
    preflight(env, false)?;
    let channels = channel_names(&a.channel_prefix, a.channels, false);
    // Let the preflight connection go away before the baseline.
    std::thread::sleep(Duration::from_millis(200));
    let s0 = env.server();
    let setup = env.setup(channels, None);
    let workers = env.spawn(&setup, a.connections, None)?;
    workers.open(
        (0..a.connections as u32)
            .map(|i| Spec {
                id: i,
                channel: (a.channels > 0).then(|| i % a.channels as u32),
            })
            .collect(),
    );
    let want = a.connections as u64;
    let con = wait_connected(
        &setup.shared,
        want,
        "connecting",
        connect_limit(env, a.connections),
    );
    if con.ready < want {
        return Err(connect_failure(workers, &con, want));
    }
    let s_ready = env.server();
    std::thread::sleep(Duration::from_millis(a.settle_ms));
    let s1 = env.server();
    let api_count = server_connections(env);
    if a.hold_s > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(a.hold_s));
    }
    let s2 = env.server();
    let disconnects = setup.shared.disconnects.load(Relaxed);
    let res = workers.stop();
    std::thread::sleep(Duration::from_millis(a.settle_ms.min(2000)));
    let s3 = env.server();

    let mut r = Report::new("idle", title(env, "idle"));
    r.set("target", env.target_json());
    r.set(
        "params",
        json!({"connections": a.connections, "channels": a.channels, "settle_ms": a.settle_ms,
               "hold_s": a.hold_s, "threads": env.threads, "source_addrs": env.sources.len(),
               "connect_concurrency": env.c.connect_concurrency, "connect_rate": env.c.connect_rate}),
    );
    let what = if a.channels > 0 {
        "connect → subscription_succeeded"
    } else {
        "connect → connection_established"
    };
    connect_rows(&mut r, a.connections, &con, &res, what);
    let per_conn = |b: Option<ProcSample>| match (s0, b) {
        (Some(x), Some(y)) => {
            Some((y.rss_kib as f64 - x.rss_kib as f64) * 1024.0 / con.ready as f64)
        }
        _ => None,
    };
    if env.c.server_pid.is_some() {
        r.row(
            "server RSS",
            format!(
                "{} KiB before, {} KiB when all were ready, {} KiB after {} ms settle, {} KiB at the \
                 end, {} KiB after closing",
                fmt_kib(s0),
                fmt_kib(s_ready),
                fmt_kib(s1),
                a.settle_ms,
                fmt_kib(s2),
                fmt_kib(s3)
            ),
        );
        r.row(
            "RSS per connection",
            format!(
                "{:.0} B ({:.2} KiB) after settle; {:.0} B at the end",
                per_conn(s1).unwrap_or(f64::NAN),
                per_conn(s1).unwrap_or(f64::NAN) / 1024.0,
                per_conn(s2).unwrap_or(f64::NAN)
            ),
        );
        r.row(
            "server CPU",
            format!(
                "{:.0} ms for {} connections = {:.3} ms per 1,000 connections",
                cpu_delta(s0, s_ready).unwrap_or(f64::NAN),
                con.ready,
                cpu_delta(s0, s_ready).unwrap_or(f64::NAN) / (con.ready as f64 / 1000.0)
            ),
        );
    } else {
        r.row("server CPU/RSS", "not measured (pass --server-pid)");
    }
    if let Some(n) = api_count {
        r.row(
            "server says",
            format!("{n} connections (GET /apps/{{id}}/connections)"),
        );
    }
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_ready": s_ready.map(|s| s.rss_kib),
            "rss_kib_settled": s1.map(|s| s.rss_kib),
            "rss_kib_end": s2.map(|s| s.rss_kib),
            "rss_kib_after_close": s3.map(|s| s.rss_kib),
            "rss_bytes_per_connection": opt_round(per_conn(s1)),
            "rss_bytes_per_connection_end": opt_round(per_conn(s2)),
            "cpu_ms_connect": opt_round(cpu_delta(s0, s_ready)),
            "cpu_ms_per_1000_connections": opt_round(cpu_delta(s0, s_ready).map(|c| c / (con.ready as f64 / 1000.0))),
            "connections_reported": api_count,
        }),
    );
    r.set("other", worker_json(&res));
    errors_into(&mut r, &res, &Errors::default());
    if disconnects > 0 {
        r.problem(format!("{disconnects} connections dropped while idle"));
    }
    if !res.errors.is_empty() {
        r.problem(format!("{} connection errors", res.errors.total()));
    }
    if let Some(n) = api_count {
        if n < con.ready {
            r.problem(format!(
                "the server reports {n} connections, {} are open",
                con.ready
            ));
        }
    }
    r.plots
        .push((format!("{} x establish", con.ready), res.establish.clone()));
    Ok(r)
}

// ---------------------------------------------------------------------------------------------

fn churn(env: &Env, a: &ChurnArgs) -> Result<Report> {
    if a.rate <= 0.0 || a.duration <= 0.0 {
        return Err("churn needs --rate and --duration above 0".into());
    }
    preflight(env, false)?;
    std::thread::sleep(Duration::from_millis(200));
    let channels = channel_names(&a.channel_prefix, a.channels, false);
    let s0 = env.server();
    let before_conns = server_connections(env);
    let setup = env.setup(channels, None);
    let start = Instant::now() + Duration::from_millis(20);
    let until = start + Duration::from_secs_f64(a.duration);
    let plan = ChurnPlan {
        rate: a.rate,
        start,
        until,
        hold: Duration::from_millis(a.hold_ms),
        channels: a.channels as u32,
        index: 0,
        stride: 1,
    };
    let workers = env.spawn(&setup, usize::MAX, Some(plan))?;
    let sh = setup.shared.clone();
    let limit = until
        + Duration::from_millis(a.hold_ms)
        + Duration::from_secs_f64(env.c.connect_timeout_s)
        + Duration::from_secs(8);
    let mut last = Instant::now();
    loop {
        let started = sh.churn_started.load(Relaxed);
        let done = sh.churn_completed.load(Relaxed) + sh.churn_failed.load(Relaxed);
        if Instant::now() >= until && done >= started {
            break;
        }
        if Instant::now() > limit {
            break;
        }
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            eprintln!("bts-guru-bench: churn: {started} started, {done} finished");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let finished_at = start.elapsed();
    let s1 = env.server();
    std::thread::sleep(Duration::from_millis(a.settle_ms));
    let s2 = env.server();
    let after_conns = server_connections(env);
    let started = sh.churn_started.load(Relaxed);
    let completed = sh.churn_completed.load(Relaxed);
    let failed = sh.churn_failed.load(Relaxed);
    let res = workers.stop();

    let mut r = Report::new("churn", title(env, "churn"));
    r.set("target", env.target_json());
    r.set(
        "params",
        json!({"rate": a.rate, "duration_s": a.duration, "hold_ms": a.hold_ms,
               "channels": a.channels, "threads": env.threads, "source_addrs": env.sources.len(),
               "connect_concurrency": env.c.connect_concurrency}),
    );
    let achieved = started as f64 / a.duration;
    r.row(
        "cycles",
        format!(
            "{} started ({:.1}/s, target {}/s), {} completed, {} failed, {} started over 50 ms \
             late; all done after {:.2} s",
            thousands(started),
            achieved,
            a.rate,
            thousands(completed),
            failed,
            res.churn_deferred,
            finished_at.as_secs_f64()
        ),
    );
    let what = if a.channels > 0 {
        "connect → subscription_succeeded"
    } else {
        "connect → connection_established"
    };
    r.row(format!("establish ({what})"), fmt_hist(&res.establish));
    r.row("cycle (connect → closed)", fmt_hist(&res.churn_cycle));
    let cpu = cpu_delta(s0, s1);
    let per_1000 = cpu
        .filter(|_| completed > 0)
        .map(|c| c / (completed as f64 / 1000.0));
    if env.c.server_pid.is_some() {
        r.row(
            "server CPU",
            format!(
                "{:.0} ms = {:.1} ms per 1,000 connection cycles ({:.0}% of one core)",
                cpu.unwrap_or(f64::NAN),
                per_1000.unwrap_or(f64::NAN),
                cpu.unwrap_or(f64::NAN) / finished_at.as_secs_f64() / 10.0
            ),
        );
        r.row(
            "server RSS",
            format!(
                "{} KiB before, {} KiB when done, {} KiB after {} ms ({:+} KiB)",
                fmt_kib(s0),
                fmt_kib(s1),
                fmt_kib(s2),
                a.settle_ms,
                match (s0, s2) {
                    (Some(x), Some(y)) => y.rss_kib as i64 - x.rss_kib as i64,
                    _ => 0,
                }
            ),
        );
    } else {
        r.row("server CPU/RSS", "not measured (pass --server-pid)");
    }
    if let Some(n) = after_conns {
        r.row(
            "server says",
            format!(
                "{} connections before, {n} after (GET /apps/{{id}}/connections)",
                before_conns
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "?".into())
            ),
        );
    }
    r.set(
        "cycles",
        json!({
            "started": started, "completed": completed, "failed": failed,
            "started_late": res.churn_deferred, "per_s": round1(achieved),
            "seconds": round3(finished_at.as_secs_f64()),
            "establish_us": summary_us(&res.establish),
            "handshake_us": summary_us(&res.handshake),
            "cycle_us": summary_us(&res.churn_cycle),
        }),
    );
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "cpu_ms": opt_round(cpu),
            "cpu_ms_per_1000_connections": opt_round(per_1000),
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_done": s1.map(|s| s.rss_kib),
            "rss_kib_settled": s2.map(|s| s.rss_kib),
            "connections_before": before_conns,
            "connections_after": after_conns,
        }),
    );
    r.set("other", worker_json(&res));
    errors_into(&mut r, &res, &Errors::default());
    if failed > 0 {
        r.problem(format!("{failed} connection cycles failed"));
    }
    if completed + failed < started {
        r.problem(format!(
            "{} cycles did not finish",
            started - completed - failed
        ));
    }
    if achieved < a.rate * 0.9 {
        r.problem(format!(
            "achieved {achieved:.1} connections/s of {}/s (raise --connect-concurrency?)",
            a.rate
        ));
    }
    if let (Some(b), Some(n)) = (before_conns, after_conns) {
        if n > b {
            r.problem(format!(
                "the server still counts {} connections more than before",
                n - b
            ));
        }
    }
    r.plots.push(("establish".into(), res.establish.clone()));
    r.plots
        .push(("connect → closed".into(), res.churn_cycle.clone()));
    Ok(r)
}

// ---------------------------------------------------------------------------------------------

fn presence(env: &Env, a: &PresenceArgs) -> Result<Report> {
    let n = a.members;
    if n < 2 {
        return Err("presence needs at least 2 --members".into());
    }
    if !(0.0..=1.0).contains(&a.leave_fraction) {
        return Err("--leave-fraction must be within 0..1".into());
    }
    env.check_fds(n)?;
    preflight(env, false)?;
    let channel = a
        .channel
        .clone()
        .unwrap_or_else(|| format!("presence-bench.{}", env.nonce));
    if !channel.starts_with("presence-") {
        return Err(BenchError(format!(
            "{channel:?} is not a presence channel (presence-...)"
        )));
    }
    let pres = PresenceSetup {
        channel: channel.clone(),
        join_sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
        leave_sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
    };
    let setup = env.setup(Vec::new(), Some(pres));
    let sh = setup.shared.clone();
    let workers = env.spawn(&setup, n, None)?;
    let w = workers.txs.len();
    workers.open(
        (0..n as u32)
            .map(|i| Spec {
                id: i,
                channel: None,
            })
            .collect(),
    );
    let con = wait_connected(&sh, n as u64, "connecting", connect_limit(env, n));
    if con.ready < n as u64 {
        return Err(connect_failure(workers, &con, n as u64));
    }
    let s0 = env.server();
    // Join storm.
    let per_rate = a.rate / w as f64;
    let t_join = Instant::now();
    for (wi, tx) in workers.txs.iter().enumerate() {
        let ids: Vec<u32> = (0..n as u32).filter(|i| *i as usize % w == wi).collect();
        let _ = tx.send(Cmd::Join {
            ids,
            rate: per_rate,
        });
    }
    let settle = Duration::from_secs_f64(a.settle_timeout_s)
        + Duration::from_secs_f64(if a.rate > 0.0 { n as f64 / a.rate } else { 0.0 });
    let known_target = |j: u64| (j * j.saturating_sub(1)) as i64;
    let mut join_done = None;
    loop {
        let joined = sh.joined.load(Relaxed);
        let jf = sh.join_failed.load(Relaxed);
        if joined + jf >= n as u64 && join_done.is_none() {
            join_done = Some(t_join.elapsed());
        }
        if joined + jf >= n as u64 && sh.presence_known.load(Relaxed) >= known_target(joined) {
            break;
        }
        if t_join.elapsed() > settle {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let join_elapsed = t_join.elapsed();
    let joined = sh.joined.load(Relaxed);
    let join_failed = sh.join_failed.load(Relaxed);
    let known_after_join = sh.presence_known.load(Relaxed);
    let s1 = env.server();
    // Leave storm: an evenly spread `leave_fraction` of the members unsubscribe.
    let leaving: Vec<u32> = (0..n as u32)
        .filter(|&i| {
            ((i as f64 + 1.0) * a.leave_fraction).floor() > (i as f64 * a.leave_fraction).floor()
        })
        .collect();
    let l = leaving.len() as u64;
    let t_leave = Instant::now();
    for (wi, tx) in workers.txs.iter().enumerate() {
        let ids: Vec<u32> = leaving
            .iter()
            .copied()
            .filter(|i| *i as usize % w == wi)
            .collect();
        let _ = tx.send(Cmd::Leave {
            ids,
            rate: per_rate,
        });
    }
    let settle = Duration::from_secs_f64(a.settle_timeout_s)
        + Duration::from_secs_f64(if a.rate > 0.0 { l as f64 / a.rate } else { 0.0 });
    loop {
        let (left, skipped) = (sh.left.load(Relaxed), sh.leave_skipped.load(Relaxed));
        let remaining = joined.saturating_sub(left);
        if left + skipped >= l && sh.presence_known.load(Relaxed) <= known_target(remaining) {
            break;
        }
        if t_leave.elapsed() > settle {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let leave_elapsed = t_leave.elapsed();
    let l = sh.left.load(Relaxed);
    let remaining = joined.saturating_sub(l);
    // Late or duplicate events would show up here.
    std::thread::sleep(Duration::from_millis(300));
    let known_after_leave = sh.presence_known.load(Relaxed);
    let s2 = env.server();
    let res = workers.stop();

    let mut r = Report::new("presence", title(env, "presence"));
    r.set("target", env.target_json());
    r.set(
        "params",
        json!({"members": n, "rate": a.rate, "leave_fraction": a.leave_fraction,
               "channel": channel, "threads": env.threads}),
    );
    connect_rows(&mut r, n, &con, &res, "connect → connection_established");
    r.row(
        "joins",
        format!(
            "{joined} joined, {join_failed} refused, in {:.3} s (all acknowledged after {:.3} s)",
            join_elapsed.as_secs_f64(),
            join_done.unwrap_or(join_elapsed).as_secs_f64()
        ),
    );
    r.row("join (subscribe → succeeded)", fmt_hist(&res.presence_join));
    r.row("member_added propagation", fmt_hist(&res.presence_added));
    r.row(
        "membership after joins",
        format!(
            "{known_after_join} of {} (member, other member) pairs known",
            known_target(joined)
        ),
    );
    r.row(
        "leaves",
        format!("{l} left in {:.3} s", leave_elapsed.as_secs_f64()),
    );
    r.row(
        "member_removed propagation",
        fmt_hist(&res.presence_removed),
    );
    r.row(
        "membership after leaves",
        format!(
            "{known_after_leave} of {} pairs known",
            known_target(remaining)
        ),
    );
    r.row(
        "anomalies",
        format!(
            "{} duplicate member_added, {} member_removed for unknown members, {} events about \
             oneself, {} foreign members, {} events before joining",
            res.presence_dup_added,
            res.presence_unknown_removed,
            res.presence_self_events,
            res.presence_foreign,
            res.presence_early
        ),
    );
    let cpu = cpu_delta(s0, s2);
    if env.c.server_pid.is_some() {
        r.row(
            "server CPU",
            format!(
                "{:.0} ms for the join storm, {:.0} ms for the leaves",
                cpu_delta(s0, s1).unwrap_or(f64::NAN),
                cpu_delta(s1, s2).unwrap_or(f64::NAN)
            ),
        );
    }
    r.set(
        "presence",
        json!({
            "joined": joined, "join_failed": join_failed,
            "join_seconds": round3(join_elapsed.as_secs_f64()),
            "joins_per_s": round1(joined as f64 / join_done.unwrap_or(join_elapsed).as_secs_f64().max(1e-9)),
            "join_us": summary_us(&res.presence_join),
            "member_added_us": summary_us(&res.presence_added),
            "known_after_join": known_after_join, "known_expected_after_join": known_target(joined),
            "left": l, "leave_seconds": round3(leave_elapsed.as_secs_f64()),
            "member_removed_us": summary_us(&res.presence_removed),
            "known_after_leave": known_after_leave,
            "known_expected_after_leave": known_target(remaining),
            "duplicate_member_added": res.presence_dup_added,
            "unknown_member_removed": res.presence_unknown_removed,
            "self_events": res.presence_self_events,
            "foreign_members": res.presence_foreign,
            "events_before_join": res.presence_early,
            "events_after_leave": res.presence_after_leave,
        }),
    );
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "cpu_ms_join": opt_round(cpu_delta(s0, s1)),
            "cpu_ms_leave": opt_round(cpu_delta(s1, s2)),
            "cpu_ms": opt_round(cpu),
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_after": s2.map(|s| s.rss_kib),
        }),
    );
    r.set("latency_us", summary_us(&res.presence_added));
    r.set("other", worker_json(&res));
    errors_into(&mut r, &res, &Errors::default());
    if join_failed > 0 {
        r.problem(format!("{join_failed} joins refused or failed"));
    }
    if known_after_join != known_target(joined) {
        r.problem(format!(
            "after the joins members knew {known_after_join} of {} other members",
            known_target(joined)
        ));
    }
    if known_after_leave != known_target(remaining) {
        r.problem(format!(
            "after the leaves members knew {known_after_leave}, expected {}",
            known_target(remaining)
        ));
    }
    for (what, v) in [
        ("duplicate member_added", res.presence_dup_added),
        (
            "member_removed for unknown members",
            res.presence_unknown_removed,
        ),
        (
            "presence events about the receiving member itself",
            res.presence_self_events,
        ),
        (
            "presence events before subscription_succeeded",
            res.presence_early,
        ),
    ] {
        if v > 0 {
            r.problem(format!("{v} {what}"));
        }
    }
    if res.errors.total() > join_failed {
        r.problem(format!("{} errors", res.errors.total()));
    }
    r.plots.push((
        "join (subscribe → succeeded)".into(),
        res.presence_join.clone(),
    ));
    r.plots
        .push(("member_added".into(), res.presence_added.clone()));
    r.plots
        .push(("member_removed".into(), res.presence_removed.clone()));
    Ok(r)
}

// ---------------------------------------------------------------------------------------------

fn max(env: &Env, a: &MaxArgs) -> Result<Report> {
    if a.connections == 0 || a.channels == 0 || a.start_rate <= 0.0 || a.step_factor <= 1.0 {
        return Err(
            "max needs --connections, --channels, --start-rate above 0 and --step-factor above 1"
                .into(),
        );
    }
    env.check_fds(a.connections)?;
    let channels = channel_names(&a.channel_prefix, a.channels, false);
    preflight(env, true)?;
    let mut sinks = open_sinks(env, a.publishers)?;
    let s0 = env.server();
    let setup = env.setup(channels, None);
    let channels = setup.channels.clone();
    let (workers, con) = open_subscribed(env, &setup, a.connections, a.channels)?;
    let s1 = env.server();
    let mut subs = vec![0u64; a.channels];
    for i in 0..a.connections {
        subs[i % a.channels] += 1;
    }
    let mut r = Report::new("max", title(env, "max"));
    let mut steps = Vec::new();
    let mut best: Option<Value> = None;
    let mut stop_reason = String::from("reached --max-steps / --max-rate without failing");
    let mut rate = a.start_rate;
    let mut delivered_before = 0u64;
    let mut pub_errors = Errors::default();
    for step in 0..a.max_steps {
        if rate > a.max_rate {
            break;
        }
        let total = (rate * a.step_s).round().max(1.0) as u64;
        eprintln!(
            "bts-guru-bench: max: step {step}: {rate:.0} events/s for {} s",
            a.step_s
        );
        let (c0, g0) = (env.server(), self_cpu());
        let p = publish_phase(
            env,
            &mut sinks,
            &channels,
            step as u32,
            rate,
            total,
            a.channels_per_event,
        );
        let expected: u64 = p.per_channel.iter().zip(&subs).map(|(e, s)| e * s).sum();
        let drained = drain(
            &setup.shared,
            delivered_before + expected,
            Duration::from_millis(a.drain_ms),
        );
        let (c1, g1) = (env.server(), self_cpu());
        let ps = workers.snapshot(step as u32, p.expected.clone());
        delivered_before = setup.shared.delivered.load(Relaxed);
        pub_errors.merge(&p.errors());
        let secs = p.elapsed.as_secs_f64().max(1e-9);
        let per_s = ps.received as f64 / secs;
        let p99_ms = ps.latency.value_at_quantile(0.99) as f64 / 1e6;
        let cpu = cpu_delta(c0, c1);
        let mut fail = Vec::new();
        if ps.missing > 0 {
            fail.push(format!("{} missing", ps.missing));
        }
        if ps.duplicates > 0 || ps.reordered > 0 || ps.unexpected > 0 {
            fail.push(format!(
                "{} duplicates, {} reordered, {} unexpected",
                ps.duplicates, ps.reordered, ps.unexpected
            ));
        }
        if ps.lost_subscribers > 0 {
            fail.push(format!("{} subscribers lost", ps.lost_subscribers));
        }
        if p.errors().total() > 0 {
            fail.push(format!("{} publish errors", p.errors().total()));
        }
        if p99_ms > a.p99_ms {
            fail.push(format!("p99 {p99_ms:.2} ms > {} ms", a.p99_ms));
        }
        if p.achieved_rate() < 0.95 * rate {
            let cores = |c: Option<f64>| {
                c.map(|c| format!("{:.0}%", c / (secs + drained.as_secs_f64()) / 10.0))
                    .unwrap_or_else(|| "?".into())
            };
            fail.push(format!(
                "publishers achieved only {:.0}/s of {rate:.0}/s (publish round trip p50 {:.0} µs; \
                 server CPU {}, generator CPU {} of one core: a saturated server answers \
                 publishes late, otherwise try more --publishers)",
                p.achieved_rate(),
                p.rtt().value_at_quantile(0.5) as f64 / 1e3,
                cores(cpu),
                cores(cpu_delta(g0, g1)),
            ));
        }
        let pass = fail.is_empty();
        let row = json!({
            "step": step, "rate": round1(rate), "achieved_rate": round1(p.achieved_rate()),
            "deliveries": ps.received, "expected": ps.expected, "missing": ps.missing,
            "duplicates": ps.duplicates, "reordered": ps.reordered, "unexpected": ps.unexpected,
            "deliveries_per_s": round1(per_s), "latency_us": summary_us(&ps.latency),
            "publish_rtt_us": summary_us(&p.rtt()),
            "server_cpu_ms": opt_round(cpu),
            "server_cpu_cores": opt_round(cpu.map(|c| c / (secs + drained.as_secs_f64()) / 1000.0)),
            "server_cpu_ms_per_1000_deliveries": opt_round(cpu.filter(|_| ps.received > 0).map(|c| c / (ps.received as f64 / 1000.0))),
            "generator_cpu_cores": opt_round(cpu_delta(g0, g1).map(|c| c / (secs + drained.as_secs_f64()) / 1000.0)),
            "drain_ms": round1(drained.as_secs_f64() * 1000.0),
            "pass": pass, "fail_reasons": fail,
        });
        r.row(
            format!("step {step:>2} {:>9.0} ev/s", rate),
            format!(
                "{} {} deliveries/s, p50 {:.2} ms p99 {:.2} ms max {:.2} ms, server {:.0}% CPU{}",
                if pass { "PASS" } else { "FAIL" },
                thousands(per_s as u64),
                ps.latency.value_at_quantile(0.5) as f64 / 1e6,
                p99_ms,
                ps.latency.max() as f64 / 1e6,
                cpu.map(|c| c / (secs + drained.as_secs_f64()) / 10.0)
                    .unwrap_or(f64::NAN),
                if pass {
                    String::new()
                } else {
                    format!(": {}", fail.join("; "))
                }
            ),
        );
        r.plots.push((
            format!("{rate:.0} ev/s{}", if pass { "" } else { " (fail)" }),
            ps.latency.clone(),
        ));
        steps.push(row.clone());
        if !pass {
            stop_reason = format!(
                "step {step} at {rate:.0} events/s failed: {}",
                fail.join("; ")
            );
            break;
        }
        best = Some(row);
        rate *= a.step_factor;
    }
    let res = workers.stop();
    r.set("target", env.target_json());
    r.set(
        "params",
        json!({"connections": a.connections, "channels": a.channels, "start_rate": a.start_rate,
               "step_factor": a.step_factor, "step_s": a.step_s, "p99_ms": a.p99_ms,
               "publishers": a.publishers, "channels_per_event": a.channels_per_event,
               "threads": env.threads}),
    );
    connect_rows(
        &mut r,
        a.connections,
        &con,
        &res,
        "connect → subscription_succeeded",
    );
    r.set("steps", Value::Array(steps));
    r.set("stop_reason", json!(stop_reason));
    match &best {
        Some(b) => {
            r.row(
                "best passing step",
                format!(
                    "{} events/s = {} deliveries/s (p99 {} µs)",
                    b["rate"], b["deliveries_per_s"], b["latency_us"]["p99"]
                ),
            );
            r.set("best", b.clone());
            r.set("max_deliveries_per_s", b["deliveries_per_s"].clone());
            r.set("latency_us", b["latency_us"].clone());
        }
        None => {
            r.set("best", Value::Null);
            r.set("max_deliveries_per_s", Value::Null);
            r.problem("even the first step failed (lower --start-rate)");
        }
    }
    r.row("stopped because", stop_reason.clone());
    r.set(
        "server",
        json!({
            "pid": env.c.server_pid,
            "cpu_ms_connect": opt_round(cpu_delta(s0, s1)),
            "rss_kib_before": s0.map(|s| s.rss_kib),
            "rss_kib_connected": s1.map(|s| s.rss_kib),
        }),
    );
    r.set("other", worker_json(&res));
    errors_into(&mut r, &res, &pub_errors);
    Ok(r)
}
