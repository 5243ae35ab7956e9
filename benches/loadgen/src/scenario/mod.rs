//! The scenarios, one file each, and the steps they share: the preflight check of the target,
//! starting the client threads and opening their connections, asking the server how many it
//! counts. Publishing phases are in [`phase`], the report rows several scenarios print in
//! [`rows`].

pub mod churn;
pub mod fanout;
pub mod idle;
pub mod max;
mod phase;
pub mod presence;
pub mod reconnect;
mod rows;
pub mod soak;

use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::publish::{match_update, Sink};
use crate::stats::now_ns;
use crate::worker::{ChurnPlan, PresenceSetup, Setup, Shared, Spec, Workers};
use crate::{BenchError, Env, Result};

/// What the client threads of a run share: the target, the channels (connection `i`
/// subscribes to `channels[spec.channel]`) and the presence channel of a presence run.
pub fn setup_for(env: &Env, channels: Vec<String>, presence: Option<PresenceSetup>) -> Arc<Setup> {
    let lookup = channels
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_bytes().to_vec().into_boxed_slice(), i as u32))
        .collect();
    Arc::new(Setup {
        target: env.target(),
        creds: env.creds.clone(),
        event: env.c.event.clone(),
        channels: Arc::new(channels),
        lookup,
        presence,
        shared: Arc::new(Shared::default()),
    })
}

/// Starts the client threads for `n_conns` connections (no more threads than connections).
pub fn spawn(
    env: &Env,
    setup: &Arc<Setup>,
    n_conns: usize,
    churn: Option<ChurnPlan>,
) -> Result<Workers> {
    let threads = env.threads.min(n_conns.max(1)).max(1);
    Ok(Workers::spawn(
        setup,
        threads,
        env.c.connect_concurrency,
        env.c.connect_rate,
        churn,
    )?)
}

/// How opening the connections went.
pub struct Connected {
    pub ready: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

/// Waits until `want` connections are ready or failed; prints progress to stderr.
pub fn wait_connected(shared: &Shared, want: u64, what: &str, limit: Duration) -> Connected {
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

pub fn connect_limit(env: &Env, n: usize) -> Duration {
    let rate = if env.c.connect_rate > 0.0 {
        env.c.connect_rate
    } else {
        300.0
    };
    Duration::from_secs_f64(n as f64 / rate + env.c.connect_timeout_s + 5.0)
}

/// Opens `n` connections, connection `i` subscribed to channel `i % channels`, and waits until
/// all are subscribed; fails with the threads stopped when some never get there.
pub fn open_subscribed(
    env: &Env,
    setup: &Arc<Setup>,
    n: usize,
    channels: usize,
) -> Result<(Workers, Connected)> {
    let workers = spawn(env, setup, n, None)?;
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
pub fn connect_failure(workers: Workers, c: &Connected, want: u64) -> BenchError {
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
pub fn preflight(env: &Env, probe: bool) -> Result<()> {
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
        let data = match_update(0, 0, u32::MAX, 0, now_ns());
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
pub fn server_connections(env: &Env) -> Option<u64> {
    let mut http = env.api_client().ok()?;
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

/// `<prefix>0`, `<prefix>1`, … (`private-` in front when asked and not already there).
pub fn channel_names(prefix: &str, k: usize, private: bool) -> Vec<String> {
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
