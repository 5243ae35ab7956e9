//! Pusher-compatible webhooks: `{"time_ms":…,"events":[…]}` POSTed to each app's endpoints,
//! signed with `X-Pusher-Key` and `X-Pusher-Signature` (hex HMAC-SHA256 of the body under the app
//! secret), on a thread of their own so a slow endpoint never blocks a shard.
//!
//! - `channel_vacated` and `member_removed` wait `HOLD` (3 s, like Pusher) and are dropped, with
//!   the `channel_occupied` / `member_added` that cancels them, if the channel or user comes back
//!   meanwhile: a page reload does not produce a vacated/occupied pair.
//! - Events due at the same moment for the same app go out together, at most `MAX_BATCH` to a
//!   request.
//! - Failures (network errors, non-2xx) are retried with exponential backoff from 1 s, for up to
//!   5 minutes, then dropped and counted.
//! - Two classes, each with its own hand-off queue, hold-back set and retry budget: occupancy
//!   (`channel_occupied`, `channel_vacated`, `subscription_count`), which any anonymous socket can
//!   cause by subscribing to fresh public channels, and the rest (members, client events, cache
//!   misses). The second is taken in and sent first, and a round sends at most two occupancy
//!   requests (a retry and a batch), so occupancy churn can delay it by two requests at most
//!   and can never make it be dropped.
//! - Bounded everywhere: each class's queue, held events and retried events hold at most the
//!   configured capacity (`server.webhook_queue_capacity`); overflow is dropped and counted per
//!   event type (`Webhooks::dropped_by_type`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Select, Sender};
use serde_json::{json, Value};

use crate::config::{App, WEBHOOK_EVENTS};
use crate::protocol::auth;

pub const HOLD: Duration = Duration::from_secs(3);
/// Default capacity of each class's queue, held set and retry budget.
pub const DEFAULT_CAPACITY: usize = crate::config::DEFAULT_WEBHOOK_QUEUE_CAPACITY;
/// Most events in one request: a flood of occupancy changes becomes several bounded requests,
/// not one body of megabytes.
const MAX_BATCH: usize = 1_000;
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);

/// Which queue an event travels in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// `member_added`, `member_removed`, `client_event`, `cache_miss`: taken in and sent first.
    Priority = 0,
    /// `channel_occupied`, `channel_vacated`, `subscription_count`: what channel churn causes.
    Occupancy = 1,
}

const CLASSES: [Class; 2] = [Class::Priority, Class::Occupancy];

impl Class {
    pub fn of(name: &str) -> Class {
        match name {
            "channel_occupied" | "channel_vacated" | "subscription_count" => Class::Occupancy,
            _ => Class::Priority,
        }
    }
}

/// One webhook event for one app.
#[derive(Debug)]
pub struct Hook {
    pub app: usize,
    /// The event object (`{"name":…, "channel":…, …}`).
    pub event: Value,
}

/// The shards' side: a bounded hand-off per class to the sender thread, and the counters.
pub struct Webhooks {
    tx: [Sender<Hook>; 2],
    rx: std::sync::Mutex<Option<[Receiver<Hook>; 2]>>,
    /// Bound of each class's queue, held set and retried events.
    capacity: usize,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    /// Events dropped: queue full, too many held or retried, or retries exhausted.
    pub dropped: AtomicU64,
    /// The same, by event type (in `config::WEBHOOK_EVENTS` order).
    pub dropped_by_type: [AtomicU64; WEBHOOK_EVENTS.len()],
}

impl Default for Webhooks {
    fn default() -> Self {
        Webhooks::new(DEFAULT_CAPACITY)
    }
}

impl Webhooks {
    pub fn new(capacity: usize) -> Webhooks {
        let capacity = capacity.max(1);
        let (ptx, prx) = crossbeam_channel::bounded(capacity);
        let (otx, orx) = crossbeam_channel::bounded(capacity);
        Webhooks {
            tx: [ptx, otx],
            rx: std::sync::Mutex::new(Some([prx, orx])),
            capacity,
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dropped_by_type: Default::default(),
        }
    }

    /// Queues an event in its class's queue; never blocks.
    pub fn emit(&self, app: usize, event: Value) {
        let class = Class::of(event["name"].as_str().unwrap_or_default());
        if let Err(e) = self.tx[class as usize].try_send(Hook { app, event }) {
            self.count_dropped(&e.into_inner().event);
        }
    }

    fn count_dropped(&self, event: &Value) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        let name = event["name"].as_str().unwrap_or_default();
        if let Some(i) = WEBHOOK_EVENTS.iter().position(|e| *e == name) {
            self.dropped_by_type[i].fetch_add(1, Ordering::Relaxed);
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

/// What cancels what: a held `channel_vacated` / `member_removed` (`true`) and the event that
/// undoes it (`false`), under one key per app and channel (and user).
fn key(app: usize, ev: &Value) -> Option<(bool, String)> {
    let name = ev["name"].as_str()?;
    let ch = ev["channel"].as_str().unwrap_or_default();
    let user = ev["user_id"].as_str().unwrap_or_default();
    match name {
        "channel_vacated" => Some((true, format!("{app}:c:{ch}"))),
        "channel_occupied" => Some((false, format!("{app}:c:{ch}"))),
        "member_removed" => Some((true, format!("{app}:m:{ch}:{user}"))),
        "member_added" => Some((false, format!("{app}:m:{ch}:{user}"))),
        _ => None,
    }
}

/// A request that failed, waiting to be sent again to the same endpoint.
struct Retry {
    due: Instant,
    app: usize,
    target: usize,
    events: Vec<Value>,
    first_try: Instant,
    backoff: Duration,
}

/// One class's events on the sender thread. Every collection is bounded by `capacity`.
struct Lane {
    /// Held vacated / removed events by cancellation key: (due, sequence number, the hook).
    held: HashMap<String, (Instant, u64, Hook)>,
    /// Held keys in due order (every hold lasts `HOLD`, so arrival order is due order); an entry
    /// whose sequence number no longer matches `held` was cancelled. Compacted when it grows
    /// past twice the bound.
    order: VecDeque<(Instant, String, u64)>,
    /// Events due now, in arrival order.
    ready: Vec<Hook>,
    retries: Vec<Retry>,
    /// Events inside `retries`.
    retrying: usize,
}

/// The sender thread's state: one lane per class.
struct Outbox<'a> {
    hooks: &'a Webhooks,
    lanes: [Lane; 2],
    seq: u64,
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

fn run(table: &crate::apps::Apps, hooks: &Webhooks, rx: &[Receiver<Hook>; 2]) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut s = Outbox {
        hooks,
        lanes: [Lane::new(), Lane::new()],
        seq: 0,
    };
    loop {
        let wait = s.next_due().map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        let mut sel = Select::new();
        for r in rx {
            sel.recv(r);
        }
        // Only waits: the hooks are taken below, priority first.
        let _ = sel.ready_timeout(wait);
        let mut gone = 0;
        for class in CLASSES {
            // At most one queue's worth per round, so a constant flood cannot keep the thread
            // taking in forever without sending.
            for _ in 0..hooks.capacity {
                match rx[class as usize].try_recv() {
                    Ok(hook) => s.accept(class, hook),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        gone += 1;
                        break;
                    }
                }
            }
        }
        if gone == CLASSES.len() {
            // The server is going away.
            return;
        }
        let set = table.current();
        for class in CLASSES {
            s.send_due(&agent, &set, class);
        }
    }
}

impl Lane {
    fn new() -> Lane {
        Lane {
            held: HashMap::new(),
            order: VecDeque::new(),
            ready: Vec::new(),
            retries: Vec::new(),
            retrying: 0,
        }
    }
}

impl Outbox<'_> {
    /// The earliest moment something held or retried is due (now, while events wait in
    /// `ready`).
    fn next_due(&self) -> Option<Instant> {
        let ready = self.lanes.iter().any(|l| !l.ready.is_empty());
        if ready {
            return Some(Instant::now());
        }
        self.lanes
            .iter()
            .flat_map(|l| {
                l.order
                    .front()
                    .map(|(due, _, _)| *due)
                    .into_iter()
                    .chain(l.retries.iter().map(|r| r.due))
            })
            .min()
    }

    fn accept(&mut self, class: Class, hook: Hook) {
        let cap = self.hooks.capacity;
        let lane = &mut self.lanes[class as usize];
        match key(hook.app, &hook.event) {
            // An occupied/added that undoes a held vacated/removed: drop both.
            Some((false, k)) if lane.held.remove(&k).is_some() => return,
            Some((true, k)) => {
                if lane.held.len() >= cap && !lane.held.contains_key(&k) {
                    self.hooks.count_dropped(&hook.event);
                    return;
                }
                self.seq += 1;
                let due = Instant::now() + HOLD;
                lane.order.push_back((due, k.clone(), self.seq));
                lane.held.insert(k, (due, self.seq, hook));
                if lane.order.len() > 2 * cap {
                    let held = &lane.held;
                    lane.order
                        .retain(|(_, k, seq)| held.get(k).is_some_and(|h| h.1 == *seq));
                }
                return;
            }
            _ => {}
        }
        if lane.ready.len() >= cap {
            self.hooks.count_dropped(&hook.event);
            return;
        }
        lane.ready.push(hook);
    }

    /// Sends what is due in one class: retries first (they are older), then fresh events,
    /// batched per app. An occupancy round sends at most one retry and one batch of fresh
    /// events (per app and endpoint), then the thread goes back to take in and send the other
    /// class: however much occupancy is waiting, a member or client event waits for at most
    /// two requests.
    fn send_due(&mut self, agent: &ureq::Agent, apps: &crate::apps::AppSet, class: Class) {
        let now = Instant::now();
        let cap = self.hooks.capacity;
        let lane = &mut self.lanes[class as usize];
        while let Some((due, _, _)) = lane.order.front() {
            if *due > now {
                break;
            }
            let Some((_, k, seq)) = lane.order.pop_front() else {
                break;
            };
            if lane.held.get(&k).is_some_and(|h| h.1 == seq) {
                if let Some((_, _, hook)) = lane.held.remove(&k) {
                    if lane.ready.len() >= cap {
                        self.hooks.count_dropped(&hook.event);
                    } else {
                        lane.ready.push(hook);
                    }
                }
            }
        }
        let (retries, fresh) = match class {
            Class::Priority => (usize::MAX, usize::MAX),
            Class::Occupancy => (1, MAX_BATCH),
        };
        let mut due = Vec::new();
        for r in std::mem::take(&mut lane.retries) {
            if r.due <= now && due.len() < retries {
                due.push(r);
            } else {
                lane.retries.push(r);
            }
        }
        lane.retrying = lane.retries.iter().map(|r| r.events.len()).sum();
        let fresh: Vec<Hook> = lane.ready.drain(..lane.ready.len().min(fresh)).collect();
        for r in due {
            self.deliver(agent, apps, class, r);
        }
        // Per app, in arrival order.
        let mut by_app: Vec<(usize, Vec<Value>)> = Vec::new();
        for hook in fresh {
            match by_app.iter_mut().find(|(a, _)| *a == hook.app) {
                Some((_, evs)) => evs.push(hook.event),
                None => by_app.push((hook.app, vec![hook.event])),
            }
        }
        for (app, events) in by_app {
            if !apps.is_live(app) {
                continue;
            }
            for (t, target) in apps.get(app).webhooks.iter().enumerate() {
                let wanted: Vec<Value> = events
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
                for batch in wanted.chunks(MAX_BATCH) {
                    let retry = Retry {
                        due: now,
                        app,
                        target: t,
                        events: batch.to_vec(),
                        first_try: Instant::now(),
                        backoff: Duration::from_secs(1),
                    };
                    self.deliver(agent, apps, class, retry);
                }
            }
        }
    }

    /// One request; on failure, queued for a retry when its class has room, else dropped.
    fn deliver(&mut self, agent: &ureq::Agent, apps: &crate::apps::AppSet, class: Class, r: Retry) {
        if !apps.is_live(r.app) {
            return;
        }
        let a = apps.get(r.app);
        let Some(url) = a.webhooks.get(r.target).map(|t| t.url.as_str()) else {
            // A reload removed the endpoint (or the app) since the first try.
            return;
        };
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let body = json!({ "time_ms": time_ms, "events": r.events }).to_string();
        let signature = auth::sign(&a.secret, body.as_bytes());
        let result = agent
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Pusher-Key", &a.key)
            .header("X-Pusher-Signature", &signature)
            .send(body.as_bytes());
        let hooks = self.hooks;
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
                let lane = &mut self.lanes[class as usize];
                if r.first_try.elapsed() + r.backoff > GIVE_UP_AFTER
                    || lane.retrying + r.events.len() > hooks.capacity
                {
                    for e in &r.events {
                        hooks.count_dropped(e);
                    }
                    tracing::warn!(%url, %why, events = r.events.len(), "webhook dropped after retries");
                    return;
                }
                tracing::debug!(%url, %why, backoff = ?r.backoff, "webhook failed; retrying");
                lane.retrying += r.events.len();
                lane.retries.push(Retry {
                    due: Instant::now() + r.backoff,
                    backoff: (r.backoff * 2).min(Duration::from_secs(60)),
                    ..r
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(app: usize, ev: Value) -> Hook {
        Hook { app, event: ev }
    }

    #[test]
    fn classes() {
        for name in WEBHOOK_EVENTS {
            let want = matches!(
                name,
                "channel_occupied" | "channel_vacated" | "subscription_count"
            );
            assert_eq!(Class::of(name) == Class::Occupancy, want, "{name}");
        }
    }

    #[test]
    fn held_events_are_cancelled_and_every_collection_is_bounded() {
        let hooks = Webhooks::new(4);
        let mut s = Outbox {
            hooks: &hooks,
            lanes: [Lane::new(), Lane::new()],
            seq: 0,
        };
        let occ = Class::Occupancy;
        // A vacated, undone by an occupied: both gone.
        s.accept(
            occ,
            hook(0, json!({"name":"channel_vacated","channel":"a"})),
        );
        s.accept(
            occ,
            hook(0, json!({"name":"channel_occupied","channel":"a"})),
        );
        assert!(s.lanes[1].held.is_empty() && s.lanes[1].ready.is_empty());
        // The same channel in another app is another key.
        s.accept(
            occ,
            hook(0, json!({"name":"channel_vacated","channel":"a"})),
        );
        s.accept(
            occ,
            hook(1, json!({"name":"channel_occupied","channel":"a"})),
        );
        assert_eq!((s.lanes[1].held.len(), s.lanes[1].ready.len()), (1, 1));
        // Churn over unique channels: held and ready stop at the bound, the rest is counted.
        for i in 0..100 {
            let ch = format!("churn-{i}");
            s.accept(
                occ,
                hook(0, json!({"name":"channel_occupied","channel":ch})),
            );
            s.accept(occ, hook(0, json!({"name":"channel_vacated","channel":ch})));
            assert!(s.lanes[1].order.len() <= 8);
        }
        assert_eq!((s.lanes[1].held.len(), s.lanes[1].ready.len()), (4, 4));
        let by = |name: &str| {
            hooks.dropped_by_type[WEBHOOK_EVENTS.iter().position(|e| *e == name).unwrap()]
                .load(Ordering::Relaxed)
        };
        assert_eq!((by("channel_occupied"), by("channel_vacated")), (97, 97));
        // The other class is untouched by it.
        s.accept(
            Class::Priority,
            hook(
                0,
                json!({"name":"member_added","channel":"presence-x","user_id":"1"}),
            ),
        );
        assert_eq!(s.lanes[0].ready.len(), 1);
        assert_eq!(by("member_added"), 0);
    }

    #[test]
    fn a_full_queue_counts_by_type() {
        let hooks = Webhooks::new(2);
        for _ in 0..5 {
            hooks.emit(0, json!({"name":"subscription_count","channel":"c"}));
        }
        hooks.emit(
            0,
            json!({"name":"member_added","channel":"presence-c","user_id":"u"}),
        );
        let i = WEBHOOK_EVENTS
            .iter()
            .position(|e| *e == "subscription_count")
            .unwrap();
        assert_eq!(hooks.dropped_by_type[i].load(Ordering::Relaxed), 3);
        assert_eq!(hooks.dropped.load(Ordering::Relaxed), 3);
    }
}
