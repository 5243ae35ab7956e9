//! Pacing for the threads that act at a rate (connects, churn, subscription changes, joins,
//! publishes): intervals, how far a late sender may catch up, and epoll timeouts.

use std::time::{Duration, Instant};

/// The interval between actions at `rate` per second (None: no pacing).
pub fn interval(rate: f64) -> Option<Duration> {
    (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate))
}

/// Paced senders catch up at most 100 ms of backlog in one burst.
pub fn catch_up_floor(now: Instant) -> Instant {
    now.checked_sub(Duration::from_millis(100)).unwrap_or(now)
}

/// Milliseconds from `now` to `until` for `epoll_wait`, rounded up (0: due now).
pub fn wait_ms(now: Instant, until: Instant) -> i32 {
    let d = until.saturating_duration_since(now);
    if d.is_zero() {
        0
    } else {
        (d.as_micros().div_ceil(1000) as i32).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_round_up_to_whole_milliseconds() {
        let now = Instant::now();
        assert_eq!(wait_ms(now, now), 0);
        assert_eq!(wait_ms(now, now - Duration::from_millis(5)), 0);
        assert_eq!(wait_ms(now, now + Duration::from_micros(1)), 1);
        assert_eq!(wait_ms(now, now + Duration::from_micros(2001)), 3);
        assert_eq!(interval(0.0), None);
        assert_eq!(interval(4.0), Some(Duration::from_millis(250)));
    }
}
