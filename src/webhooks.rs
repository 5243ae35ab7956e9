//! Pusher-compatible webhooks: `{"time_ms":…,"events":[…]}` POSTed to each app's endpoints,
//! signed with `X-Pusher-Key` and `X-Pusher-Signature` (hex HMAC-SHA256 of the body under the app
//! secret), on a thread of their own so a slow endpoint never blocks a shard.
//!
//! - `channel_vacated` and `member_removed` wait `HOLD` (3 s, like Pusher) and are dropped, with
//!   the `channel_occupied` / `member_added` that cancels them, if the channel or user comes back
//!   meanwhile: a page reload does not produce a vacated/occupied pair.
//! - Events due at the same moment for the same app go out in one request (batching).
//! - Failures (network errors, non-2xx) are retried with exponential backoff from 1 s, for up to
//!   5 minutes, then dropped and counted.
//! - Bounded everywhere: the hand-off channel (`QUEUE`), and the held and retry sets
//!   (`MAX_PENDING`); overflow is dropped and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde_json::{json, Value};

use crate::config::App;
use crate::protocol::auth;

pub const HOLD: Duration = Duration::from_secs(3);
const QUEUE: usize = 16_384;
const MAX_PENDING: usize = 16_384;
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);

/// One webhook event for one app.
#[derive(Debug)]
pub struct Hook {
    pub app: usize,
    /// The event object (`{"name":…, "channel":…, …}`).
    pub event: Value,
}

/// The shards' side: a bounded hand-off to the sender thread.
pub struct Webhooks {
    tx: Sender<Hook>,
    rx: std::sync::Mutex<Option<Receiver<Hook>>>,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    /// Dropped: queue full, too many pending, or retries exhausted.
    pub dropped: AtomicU64,
}

impl Default for Webhooks {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        Webhooks {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

impl Webhooks {
    /// Queues an event; never blocks.
    pub fn emit(&self, app: usize, event: Value) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Hook { app, event })
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Does any endpoint of `app` want `name`?
pub fn wanted(app: &App, name: &str) -> bool {
    app.webhooks.iter().any(|w| {
        w.event_types
            .as_ref()
            .is_none_or(|t| t.iter().any(|e| e == name))
    })
}

/// What cancels what: a held `channel_vacated` / `member_removed` and the event that undoes it.
fn key(ev: &Value) -> Option<(bool, String)> {
    let name = ev["name"].as_str()?;
    let ch = ev["channel"].as_str().unwrap_or_default();
    let user = ev["user_id"].as_str().unwrap_or_default();
    match name {
        "channel_vacated" => Some((true, format!("c:{ch}"))),
        "channel_occupied" => Some((false, format!("c:{ch}"))),
        "member_removed" => Some((true, format!("m:{ch}:{user}"))),
        "member_added" => Some((false, format!("m:{ch}:{user}"))),
        _ => None,
    }
}

struct Pending {
    due: Instant,
    app: usize,
    events: Vec<Value>,
    /// For held events: the cancellation key.
    key: Option<String>,
    /// For retries: which endpoint, since when, and the next delay.
    target: Option<usize>,
    first_try: Instant,
    backoff: Duration,
}

/// Starts the sender thread. It reads the current app table (`apps`) for every delivery, so a
/// reload's new endpoints and secrets apply to the next request.
pub fn spawn(
    apps: Arc<crate::apps::Apps>,
    hooks: Arc<Webhooks>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let Some(rx) = hooks.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return Err(std::io::Error::other("webhook sender already started"));
    };
    std::thread::Builder::new()
        .name("bts-webhooks".into())
        .spawn(move || run(&apps, &hooks, &rx))
}

fn run(table: &crate::apps::Apps, hooks: &Webhooks, rx: &Receiver<Hook>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut pending: Vec<Pending> = Vec::new();
    loop {
        let now = Instant::now();
        let wait = pending
            .iter()
            .map(|p| p.due.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok(hook) => accept(hooks, &mut pending, hook),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        // Take in whatever else is already queued, then send what is due.
        while let Ok(hook) = rx.try_recv() {
            accept(hooks, &mut pending, hook);
        }
        let now = Instant::now();
        let (due, later): (Vec<Pending>, Vec<Pending>) =
            pending.into_iter().partition(|p| p.due <= now);
        pending = later;
        let set = table.current();
        let apps = &*set;
        // Batch fresh events per app (retries keep their own target).
        let mut fresh: Vec<(usize, Vec<Value>)> = Vec::new();
        for p in due {
            match p.target {
                Some(t) => deliver(
                    &agent,
                    apps,
                    hooks,
                    &mut pending,
                    p.app,
                    t,
                    p.events,
                    p.first_try,
                    p.backoff,
                ),
                None => match fresh.iter_mut().find(|(a, _)| *a == p.app) {
                    Some((_, evs)) => evs.extend(p.events),
                    None => fresh.push((p.app, p.events)),
                },
            }
        }
        for (app, events) in fresh {
            if !apps.is_live(app) {
                continue;
            }
            for t in 0..apps.get(app).webhooks.len() {
                let target = &apps.get(app).webhooks[t];
                let events: Vec<Value> = events
                    .iter()
                    .filter(|e| {
                        let name = e["name"].as_str().unwrap_or_default();
                        target
                            .event_types
                            .as_ref()
                            .is_none_or(|ts| ts.iter().any(|x| x == name))
                    })
                    .cloned()
                    .collect();
                if !events.is_empty() {
                    deliver(
                        &agent,
                        apps,
                        hooks,
                        &mut pending,
                        app,
                        t,
                        events,
                        Instant::now(),
                        Duration::from_secs(1),
                    );
                }
            }
        }
    }
}

fn accept(hooks: &Webhooks, pending: &mut Vec<Pending>, hook: Hook) {
    let now = Instant::now();
    let k = key(&hook.event);
    if let Some((false, k)) = &k {
        // An occupied/added that undoes a held vacated/removed: drop both.
        if let Some(i) = pending
            .iter()
            .position(|p| p.key.as_deref() == Some(k.as_str()))
        {
            pending.swap_remove(i);
            return;
        }
    }
    if pending.len() >= MAX_PENDING {
        hooks.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let (due, key) = match k {
        Some((true, k)) => (now + HOLD, Some(k)),
        _ => (now, None),
    };
    pending.push(Pending {
        due,
        app: hook.app,
        events: vec![hook.event],
        key,
        target: None,
        first_try: now,
        backoff: Duration::from_secs(1),
    });
}

#[allow(clippy::too_many_arguments)]
fn deliver(
    agent: &ureq::Agent,
    apps: &crate::apps::AppSet,
    hooks: &Webhooks,
    pending: &mut Vec<Pending>,
    app: usize,
    target: usize,
    events: Vec<Value>,
    first_try: Instant,
    backoff: Duration,
) {
    if !apps.is_live(app) {
        return;
    }
    let a = apps.get(app);
    let Some(url) = a.webhooks.get(target).map(|t| t.url.as_str()) else {
        // A reload removed the endpoint (or the app) since the first try.
        return;
    };
    let time_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let body = json!({ "time_ms": time_ms, "events": events }).to_string();
    let signature = auth::sign(&a.secret, body.as_bytes());
    let result = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Pusher-Key", &a.key)
        .header("X-Pusher-Signature", &signature)
        .send(body.as_bytes());
    match result {
        Ok(resp) if resp.status().is_success() => {
            hooks.sent.fetch_add(1, Ordering::Relaxed);
        }
        outcome => {
            hooks.failed.fetch_add(1, Ordering::Relaxed);
            let why = match outcome {
                Ok(resp) => format!("HTTP {}", resp.status()),
                Err(e) => e.to_string(),
            };
            if first_try.elapsed() + backoff > GIVE_UP_AFTER || pending.len() >= MAX_PENDING {
                hooks.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%url, %why, "webhook dropped after retries");
                return;
            }
            tracing::debug!(%url, %why, ?backoff, "webhook failed; retrying");
            pending.push(Pending {
                due: Instant::now() + backoff,
                app,
                events,
                key: None,
                target: Some(target),
                first_try,
                backoff: (backoff * 2).min(Duration::from_secs(60)),
            });
        }
    }
}
