//! Publishing phases: every publisher thread's share of a phase's events at a paced rate,
//! what the server accepted (what the subscribers are owed), and waiting for the deliveries.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::publish::{run_publisher, PubPlan, PubResult, Sink};
use crate::report::{round1, round3};
use crate::stats::{new_hist, summary_us, Errors};
use crate::worker::{PubExpect, Shared, PUB_STRIDE};
use crate::{BenchError, Env, Result};

/// What one publishing phase did.
pub struct Published {
    pub results: Vec<PubResult>,
    pub elapsed: Duration,
    pub expected: Arc<Vec<PubExpect>>,
    /// Per channel: events accepted for it (all publishers).
    pub per_channel: Vec<u64>,
    pub planned: u64,
    pub rate: f64,
}

impl Published {
    pub fn sent(&self) -> u64 {
        self.results.iter().map(|r| r.sent).sum()
    }
    pub fn accepted(&self) -> u64 {
        self.results.iter().map(|r| r.accepted).sum()
    }
    pub fn errors(&self) -> Errors {
        let mut e = Errors::default();
        for r in &self.results {
            e.merge(&r.errors);
        }
        e
    }
    pub fn rtt(&self) -> Histogram<u64> {
        let mut h = new_hist();
        for r in &self.results {
            let _ = h.add(&r.rtt);
        }
        h
    }
    pub fn achieved_rate(&self) -> f64 {
        self.sent() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn max_lag(&self) -> Duration {
        self.results
            .iter()
            .map(|r| r.max_lag)
            .max()
            .unwrap_or_default()
    }
    pub fn reconnects(&self) -> u64 {
        self.results.iter().map(|r| r.reconnects).sum()
    }
    pub fn json(&self) -> Value {
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
pub fn publish_phase(
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
pub fn drain(shared: &Shared, target: u64, limit: Duration) -> Duration {
    let t = Instant::now();
    while shared.delivered.load(Relaxed) < target && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(1));
    }
    t.elapsed()
}

pub fn open_sinks(env: &Env, n: usize) -> Result<Vec<Sink>> {
    (0..n.max(1))
        .map(|_| Sink::open(&env.via, &env.creds).map_err(BenchError))
        .collect()
}
