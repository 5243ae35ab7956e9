//! The soak's publishers: each owns every P-th channel and publishes its events one at a
//! time, in sequence order, over one connection, recording on the board how far each channel's
//! publishing began and what the server accepted.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::plan::{Board, Plan};
use crate::publish::{match_update, Sink};
use crate::stats::{new_hist, now_ns, Errors};

/// What one publisher did.
pub struct PubOut {
    pub sent: u64,
    pub accepted: u64,
    pub errors: Errors,
    pub rtt: Histogram<u64>,
    pub max_lag: Duration,
}

/// Publishes one event at a time, in turn to each channel it owns, at `rate` per second,
/// until told to stop. Each channel's sequence numbers go out in order over one connection.
pub fn publisher(
    mut sink: Sink,
    owned: Vec<u32>,
    rate: f64,
    plan: Arc<Plan>,
    board: Arc<Board>,
) -> PubOut {
    let mut out = PubOut {
        sent: 0,
        accepted: 0,
        errors: Errors::default(),
        rtt: new_hist(),
        max_lag: Duration::ZERO,
    };
    if owned.is_empty() || rate <= 0.0 {
        return out;
    }
    let mut next = vec![0u64; plan.channels.len()];
    let start = Instant::now();
    let mut n = 0u64;
    let mut consecutive_errors = 0;
    while !board.stop_publish.load(Relaxed) {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        out.max_lag = out.max_lag.max(now - due);
        let c = owned[(n % owned.len() as u64) as usize] as usize;
        let seq = next[c];
        next[c] += 1;
        board.started[c].store(seq + 1, SeqCst);
        let data = match_update(n, c as u32 + 1, c as u32, seq, now_ns());
        let t = Instant::now();
        let res = sink.publish(&plan.event, &[plan.channels[c].as_str()], &data);
        out.rtt.saturating_record(t.elapsed().as_nanos() as u64);
        out.sent += 1;
        match res {
            Ok(()) => {
                out.accepted += 1;
                board.answered[c].fetch_max(seq + 1, SeqCst);
                consecutive_errors = 0;
            }
            Err(e) => {
                out.errors.add(e);
                board.troubles.fetch_add(1, Relaxed);
                consecutive_errors += 1;
                if consecutive_errors >= 20 {
                    out.errors
                        .add("publisher stopped after 20 consecutive failed publishes");
                    break;
                }
            }
        }
        n += 1;
    }
    out
}
