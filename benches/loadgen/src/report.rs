//! What a run prints: a table for people, then exactly one JSON line with every figure.

use std::io::Write;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

pub struct Report {
    pub title: String,
    pub json: Map<String, Value>,
    rows: Vec<(String, String)>,
    pub problems: Vec<String>,
    /// Latency series for the SVG plot (values in ns).
    pub plots: Vec<(String, Histogram<u64>)>,
}

impl Report {
    pub fn new(scenario: &str, title: String) -> Report {
        let mut json = Map::new();
        json.insert("tool".into(), json!("bts-guru-bench"));
        json.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        json.insert("scenario".into(), json!(scenario));
        Report {
            title,
            json,
            rows: Vec::new(),
            problems: Vec::new(),
            plots: Vec::new(),
        }
    }

    pub fn set(&mut self, key: &str, v: Value) {
        self.json.insert(key.to_owned(), v);
    }

    pub fn row(&mut self, k: impl Into<String>, v: impl Into<String>) {
        self.rows.push((k.into(), v.into()));
    }

    pub fn problem(&mut self, p: impl Into<String>) {
        self.problems.push(p.into());
    }

    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The table (unless `json_only`), then the JSON line, on stdout.
    pub fn print(&mut self, json_only: bool) {
        let ok = self.ok();
        self.json.insert("ok".into(), json!(ok));
        self.json.insert("problems".into(), json!(self.problems));
        let mut out = String::new();
        if !json_only {
            out.push_str(&format!("== {} ==\n", self.title));
            let w = self
                .rows
                .iter()
                .map(|r| r.0.chars().count())
                .max()
                .unwrap_or(0);
            for (k, v) in &self.rows {
                if k.is_empty() {
                    out.push_str(&format!("-- {v}\n"));
                } else {
                    out.push_str(&format!("  {k:<w$}  {v}\n"));
                }
            }
            if ok {
                out.push_str("RESULT: ok\n");
            } else {
                out.push_str("RESULT: FAILED\n");
                for p in &self.problems {
                    out.push_str(&format!("  - {p}\n"));
                }
            }
        }
        out.push_str(&Value::Object(self.json.clone()).to_string());
        out.push('\n');
        let mut so = std::io::stdout().lock();
        let _ = so.write_all(out.as_bytes());
        let _ = so.flush();
    }
}

/// The one JSON line for a run that could not be done.
pub fn print_error(scenario: &str, err: &str, exit: i32) {
    let line = json!({
        "tool": "bts-guru-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "scenario": scenario,
        "ok": false,
        "error": err,
        "exit": exit,
    });
    let mut so = std::io::stdout().lock();
    let _ = writeln!(so, "{line}");
    let _ = so.flush();
}

/// `12,345` style thousands separators for the table.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1000), "1,000");
        assert_eq!(super::thousands(1234567), "1,234,567");
    }
}
