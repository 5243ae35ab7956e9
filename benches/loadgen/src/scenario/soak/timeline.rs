//! The server over the run, sampled every second: its RSS and open files, beside the
//! generator's open connections and deliveries; and what the RSS samples say about growth.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::plan::{Board, SoakArgs};
use crate::report::thousands;
use crate::stats::proc_sample;

/// One second of the run.
#[derive(Clone, Copy)]
pub struct Sample {
    /// Seconds since the run started.
    pub at: f64,
    pub rss_kib: u64,
    pub fds: u64,
    /// Connections the generator holds open.
    pub live: u64,
    /// Deliveries counted so far.
    pub deliveries: u64,
}

/// The server's open files (`/proc/PID/fd`).
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The samples of a run, and the two moments the checks hang on.
pub struct Timeline {
    pub pid: u32,
    t0: Instant,
    pub samples: Vec<Sample>,
    /// When the population first reached `--connections`.
    pub full_at: Option<f64>,
    /// The first sample at or after the end of the warm-up.
    pub warm: Option<Sample>,
    last_progress: Instant,
}

impl Timeline {
    /// Starts the clock.
    pub fn new(pid: u32) -> Timeline {
        let t0 = Instant::now();
        Timeline {
            pid,
            t0,
            samples: Vec::new(),
            full_at: None,
            warm: None,
            last_progress: t0,
        }
    }

    /// The server now (None: it went away).
    pub fn sample_now(&self, board: &Board) -> Option<Sample> {
        Some(Sample {
            at: self.t0.elapsed().as_secs_f64(),
            rss_kib: proc_sample(&self.pid.to_string()).ok()?.rss_kib,
            fds: fd_count(self.pid)?,
            live: board.live.load(Relaxed),
            deliveries: board.deliveries.load(Relaxed),
        })
    }

    /// Takes this second's sample and keeps it, notes when the population was first full and
    /// the end of the warm-up, and prints a progress line every `--progress-s`.
    pub fn tick(&mut self, board: &Board, a: &SoakArgs) -> Option<Sample> {
        let s = self.sample_now(board)?;
        self.samples.push(s);
        if self.full_at.is_none() && s.live >= a.connections as u64 {
            self.full_at = Some(s.at);
        }
        if self.warm.is_none() && s.at >= a.warmup {
            self.warm = Some(s);
        }
        if self.last_progress.elapsed().as_secs_f64() >= a.progress_s {
            self.last_progress = Instant::now();
            self.progress(s, board, a.progress_s);
        }
        Some(s)
    }

    fn progress(&self, s: Sample, board: &Board, every: f64) {
        let prev = self
            .samples
            .iter()
            .rev()
            .find(|p| s.at - p.at >= every * 0.9)
            .copied()
            .unwrap_or(self.samples[0]);
        eprintln!(
            "bts-guru-bench: soak {:>6.0} s: {} open, {} connects, {} disconnects, {} \
             subscription changes, {:.0} deliveries/s, server RSS {} KiB, {} fds, {} problems",
            s.at,
            s.live,
            board.connects.load(Relaxed),
            board.disconnects.load(Relaxed),
            board.sub_ops.load(Relaxed),
            (s.deliveries - prev.deliveries) as f64 / (s.at - prev.at).max(1e-9),
            thousands(s.rss_kib),
            s.fds,
            board.troubles.load(Relaxed)
        );
    }

    /// Sleeps until the next whole second after sample `s`.
    pub fn sleep_past(&self, s: Sample) {
        let next = self.t0 + Duration::from_secs_f64((s.at + 1.0).floor());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }

    /// The latest sample.
    pub fn last(&self) -> Sample {
        *self.samples.last().expect("at least one sample")
    }
}

/// The mean RSS of the samples taken in `[from, to]`.
pub fn mean_rss(samples: &[Sample], from: f64, to: f64) -> Option<f64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.at >= from && s.at <= to)
        .map(|s| s.rss_kib as f64)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Least-squares line through the RSS samples taken in `[from, to]`: the growth it implies over
/// that span, as a percentage of the line's value at `from`. A leak is sustained growth, which
/// this measures; a one-off step (a structure reaching its steady size a little after the
/// warm-up) or the allocator's swings move it far less than they move two short windows.
pub fn rss_trend_pct(samples: &[Sample], from: f64, to: f64) -> Option<f64> {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.at >= from && s.at <= to)
        .map(|s| (s.at, s.rss_kib as f64))
        .collect();
    if pts.len() < 3 {
        return None;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let slope = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx;
    let (first, last) = (pts[0].0, pts[pts.len() - 1].0);
    let at_first = my - slope * (mx - first);
    (at_first > 0.0).then(|| slope * (last - first) / at_first * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss(points: &[(f64, u64)]) -> Vec<Sample> {
        points
            .iter()
            .map(|&(at, rss_kib)| Sample {
                at,
                rss_kib,
                fds: 0,
                live: 0,
                deliveries: 0,
            })
            .collect()
    }

    #[test]
    fn rss_trend_sees_sustained_growth_and_not_swings_or_an_early_step() {
        // A leak: +10 % over the span, under allocator swings of +-3 %.
        let leak: Vec<_> = (0..=100)
            .map(|i| {
                let swing = if i % 7 < 3 { 1030 } else { 970 };
                (i as f64, (100_000 + 100 * i) * swing / 1000)
            })
            .collect();
        let g = rss_trend_pct(&rss(&leak), 0.0, 100.0).unwrap();
        assert!((8.0..12.0).contains(&g), "{g}");
        // Flat with the same swings: near zero.
        let flat: Vec<_> = (0..=100)
            .map(|i| (i as f64, if i % 7 < 3 { 103_000 } else { 97_000 }))
            .collect();
        assert!(rss_trend_pct(&rss(&flat), 0.0, 100.0).unwrap().abs() < 1.0);
        // A one-off 2.2 % step early on, flat after it (the 15:08 soak's shape): well under the
        // 2 % bound, where two 10 s windows read +2.2 %.
        let step: Vec<_> = (0..=168)
            .map(|i| (i as f64 * 10.0, if i < 10 { 41_260 } else { 42_180 }))
            .collect();
        let g = rss_trend_pct(&rss(&step), 0.0, 1680.0).unwrap();
        assert!((0.0..1.5).contains(&g), "{g}");
        assert_eq!(rss_trend_pct(&rss(&step[..2]), 0.0, 1680.0), None);
    }
}
