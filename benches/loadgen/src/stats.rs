//! Measurements: latency histograms and what /proc says about the server (and about us).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Latencies are recorded in nanoseconds, 3 significant figures, up to 10 minutes.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

/// `{count, mean, p50, p90, p99, p999, p9999, max}` in microseconds (0.1 µs resolution).
pub fn summary_us(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "mean": us(h.mean() as u64),
        "p50": us(h.value_at_quantile(0.50)),
        "p90": us(h.value_at_quantile(0.90)),
        "p99": us(h.value_at_quantile(0.99)),
        "p999": us(h.value_at_quantile(0.999)),
        "p9999": us(h.value_at_quantile(0.9999)),
        "max": us(h.max()),
    })
}

/// `1.23 ms` / `456.7 µs` for the human table.
pub fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.2} s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} µs", ns as f64 / 1e3)
    }
}

/// One line: `p50 … p90 … p99 … p99.9 … p99.99 … max … (n=…)`.
pub fn fmt_hist(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  p99.99 {}  max {}  (n={})",
        fmt_ns(h.value_at_quantile(0.5)),
        fmt_ns(h.value_at_quantile(0.9)),
        fmt_ns(h.value_at_quantile(0.99)),
        fmt_ns(h.value_at_quantile(0.999)),
        fmt_ns(h.value_at_quantile(0.9999)),
        fmt_ns(h.max()),
        h.len()
    )
}

/// CPU time (user + system) and resident memory of a process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// utime + stime from /proc/PID/stat (clock ticks, usually 10 ms each), in ms.
    pub cpu_ms: f64,
    /// The sum of /proc/PID/task/*/schedstat run times (ns resolution), in ms, when readable.
    /// Threads that exited are missing from it.
    pub cpu_ms_fine: Option<f64>,
    pub rss_kib: u64,
}

/// CPU used between two samples, ms: the nanosecond-resolution per-thread sum when both samples
/// have it and it agrees with the clock-tick figure within two ticks (no thread exited in
/// between), else the clock-tick figure.
pub fn cpu_between(a: ProcSample, b: ProcSample) -> f64 {
    let coarse = b.cpu_ms - a.cpu_ms;
    match (a.cpu_ms_fine, b.cpu_ms_fine) {
        (Some(x), Some(y)) if (y - x) >= 0.0 && (y - x - coarse).abs() <= 20.0 + coarse * 0.05 => {
            y - x
        }
        _ => coarse,
    }
}

fn schedstat_ms(pid: &str) -> Option<f64> {
    let mut total_ns: u64 = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let t = t.ok()?;
        let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        total_ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total_ns as f64 / 1e6)
}

/// Reads `/proc/<pid>/stat` (utime + stime, clock ticks) and `/proc/<pid>/status` (VmRSS).
/// `pid` "self" reads this process.
pub fn proc_sample(pid: &str) -> Result<ProcSample, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("/proc/{pid}/stat: unexpected format"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let (utime, stime) = (ticks(11), ticks(12));
    let hz = crate::sys::clock_ticks() as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        cpu_ms: (utime + stime) as f64 * 1000.0 / hz,
        cpu_ms_fine: schedstat_ms(pid),
        rss_kib,
    })
}

/// Error messages with how often each happened.
#[derive(Default, Debug, Clone)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    pub fn add(&mut self, msg: impl Into<String>) {
        *self.0.entry(msg.into()).or_default() += 1;
    }
    pub fn merge(&mut self, other: &Errors) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.0
                .iter()
                .map(|(k, v)| json!({"error": k, "count": v}))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let s = proc_sample("self").unwrap();
        assert!(s.rss_kib > 0);
    }

    #[test]
    fn summary_has_percentiles() {
        let mut h = new_hist();
        for i in 1..=1000u64 {
            h.record(i * 1000).unwrap();
        }
        let s = summary_us(&h);
        assert_eq!(s["count"], 1000);
        assert!((s["p50"].as_f64().unwrap() - 500.0).abs() < 1.0);
        assert!((s["max"].as_f64().unwrap() - 1000.0).abs() < 1.0);
    }
}
