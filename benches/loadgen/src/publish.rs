//! Publishing: the Pusher HTTP API (signed like the SDKs, one keep-alive connection per
//! publisher) or Laravel's Redis broadcaster format; the match.update payload; paced publisher
//! threads that remember which sequence numbers each channel was given.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::auth::Creds;
use crate::stats::{new_hist, now_ns, Errors};

/// A minimal HTTP/1.1 client over one keep-alive connection.
pub struct HttpClient {
    addr: SocketAddr,
    host: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    pub reconnects: u64,
}

impl HttpClient {
    pub fn new(addr: SocketAddr, host: String) -> HttpClient {
        HttpClient {
            addr,
            host,
            stream: None,
            buf: Vec::with_capacity(4096),
            reconnects: 0,
        }
    }

    fn connect(&mut self) -> Result<(), String> {
        let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .map_err(|e| format!("HTTP API: cannot connect to {}: {e}", self.addr))?;
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        self.stream = Some(s);
        Ok(())
    }

    /// Sends one request and reads its answer: (status, body). A reused connection that the
    /// server had closed (nothing read back) is reopened and the request sent once more.
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> Result<(u16, String), String> {
        let reused = self.stream.is_some();
        match self.try_request(method, target, body) {
            Ok(r) => Ok(r),
            Err((e, nothing_read)) => {
                self.stream = None;
                if reused && nothing_read {
                    self.reconnects += 1;
                    self.try_request(method, target, body).map_err(|(e, _)| {
                        self.stream = None;
                        e
                    })
                } else {
                    Err(e)
                }
            }
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> Result<(u16, String), (String, bool)> {
        if self.stream.is_none() {
            self.connect().map_err(|e| (e, false))?;
        }
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: keep-alive\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        let s = self.stream.as_mut().expect("connected above");
        s.write_all(&req)
            .map_err(|e| (format!("HTTP API: write failed: {e}"), true))?;
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        let head_len = loop {
            if let Some(end) = crate::wire::head_end(&self.buf) {
                break end;
            }
            let n = s.read(&mut chunk).map_err(|e| {
                (
                    format!("HTTP API: read failed: {e}"),
                    self.buf.is_empty() && e.kind() != std::io::ErrorKind::WouldBlock,
                )
            })?;
            if n == 0 {
                return Err((
                    "HTTP API: server closed the connection".into(),
                    self.buf.is_empty(),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if self.buf.len() > 64 << 10 {
                return Err(("HTTP API: response head too large".into(), false));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_len]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ("HTTP API: malformed status line".to_string(), false))?;
        let (mut len, mut chunked, mut close) = (None, false, false);
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.eq_ignore_ascii_case("chunked");
                } else if k.eq_ignore_ascii_case("connection") {
                    close = v.eq_ignore_ascii_case("close");
                }
            }
        }
        let mut body_bytes = self.buf[head_len..].to_vec();
        let read_more = |s: &mut TcpStream, into: &mut Vec<u8>| -> Result<bool, (String, bool)> {
            let mut chunk = [0u8; 8192];
            let n = s
                .read(&mut chunk)
                .map_err(|e| (format!("HTTP API: read failed: {e}"), false))?;
            into.extend_from_slice(&chunk[..n]);
            Ok(n > 0)
        };
        let body = if chunked {
            // Read until the terminating zero-length chunk, then decode.
            loop {
                if let Some(decoded) = decode_chunked(&body_bytes) {
                    break decoded;
                }
                if !read_more(s, &mut body_bytes)? {
                    return Err(("HTTP API: truncated chunked body".into(), false));
                }
            }
        } else if let Some(len) = len {
            while body_bytes.len() < len {
                if !read_more(s, &mut body_bytes)? {
                    return Err(("HTTP API: truncated body".into(), false));
                }
            }
            body_bytes.truncate(len);
            body_bytes
        } else {
            close = true;
            while read_more(s, &mut body_bytes)? {}
            body_bytes
        };
        if close {
            self.stream = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn decode_chunked(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let line_end = crate::wire::find(&b[i..], b"\r\n")? + i;
        let size_txt = std::str::from_utf8(&b[i..line_end]).ok()?;
        let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            return Some(out);
        }
        if b.len() < i + size + 2 {
            return None;
        }
        out.extend_from_slice(&b[i..i + size]);
        i += size + 2;
    }
}

/// Where events are published.
#[derive(Clone, Debug)]
pub enum Via {
    Http { addr: SocketAddr, host: String },
    Redis { url: String, prefix: String },
}

/// One publishing connection.
pub enum Sink {
    Http {
        client: HttpClient,
        creds: Creds,
        path: String,
    },
    Redis {
        conn: Box<redis::Connection>,
        prefix: String,
    },
}

const LARAVEL_EVAL: &str = "for i = 2, #ARGV do\n  redis.call('publish', ARGV[i], ARGV[1])\nend";

impl Sink {
    pub fn open(via: &Via, creds: &Creds) -> Result<Sink, String> {
        Ok(match via {
            Via::Http { addr, host } => Sink::Http {
                client: HttpClient::new(*addr, host.clone()),
                creds: creds.clone(),
                path: format!("/apps/{}/events", creds.app_id),
            },
            Via::Redis { url, prefix } => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| format!("Redis URL {url}: {e}"))?;
                let conn = client
                    .get_connection_with_timeout(Duration::from_secs(5))
                    .map_err(|e| format!("Redis {url}: cannot connect: {e}"))?;
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                Sink::Redis {
                    conn: Box::new(conn),
                    prefix: prefix.clone(),
                }
            }
        })
    }

    /// Publishes one event to `channels` with `data` (a JSON object's text).
    pub fn publish(&mut self, event: &str, channels: &[&str], data: &str) -> Result<(), String> {
        match self {
            Sink::Http {
                client,
                creds,
                path,
            } => {
                let body = serde_json::json!({"name": event, "channels": channels, "data": data})
                    .to_string();
                let target = creds.signed_target("POST", path, &[], body.as_bytes());
                let (status, text) = client.request("POST", &target, body.as_bytes())?;
                if status == 200 {
                    Ok(())
                } else {
                    Err(format!(
                        "HTTP API answered {status}: {}",
                        text.chars().take(200).collect::<String>()
                    ))
                }
            }
            Sink::Redis { conn, prefix } => {
                let payload = format!(
                    "{{\"event\":{},\"data\":{data},\"socket\":null}}",
                    serde_json::Value::String(event.to_owned())
                );
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(LARAVEL_EVAL).arg(0).arg(payload);
                for ch in channels {
                    cmd.arg(format!("{prefix}{ch}"));
                }
                cmd.query::<()>(conn.as_mut())
                    .map_err(|e| format!("Redis EVAL failed: {e}"))
            }
        }
    }

    pub fn reconnects(&self) -> u64 {
        match self {
            Sink::Http { client, .. } => client.reconnects,
            Sink::Redis { .. } => 0,
        }
    }
}

/// UTC `YYYY-MM-DDTHH:MM:SS.mmmZ` from nanoseconds since the epoch.
pub fn iso8601(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let ms = (ns / 1_000_000) % 1000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// The original design's match.update object, plus the fields the receivers check:
/// `publisher`, `seq` (per publisher) and `sent_ns` (CLOCK_REALTIME at send), last.
pub fn match_update(g: u64, league: u32, publisher: u32, seq: u64, sent_ns: u64) -> String {
    let match_id = 12_345 + (g % 50);
    let home = (g / 7) % 6;
    let away = (g / 11) % 5;
    let minute = (g % 90) + 1;
    format!(
        "{{\"match_id\":{match_id},\"sport_id\":1,\"league_id\":{league},\"status\":\"live\",\
         \"home_team\":{{\"id\":101,\"name\":\"Team A\",\"score\":{home}}},\
         \"away_team\":{{\"id\":102,\"name\":\"Team B\",\"score\":{away}}},\
         \"period\":\"{}\",\"time\":\"{minute}:00\",\"last_updated\":\"{}\",\
         \"publisher\":{publisher},\"seq\":{seq},\"sent_ns\":{sent_ns}}}",
        if minute > 45 { "2nd Half" } else { "1st Half" },
        iso8601(sent_ns)
    )
}

/// What one publisher thread does.
#[derive(Clone)]
pub struct PubPlan {
    pub publisher: u32,
    /// This publisher's position among `stride` publishers of the same phase.
    pub index: u64,
    pub stride: u64,
    /// Events in the whole phase (all publishers together).
    pub total_events: u64,
    /// Events per second, all publishers together.
    pub rate: f64,
    pub start: Instant,
    /// Stop sending, whatever is left, at this instant.
    pub give_up_at: Instant,
    pub event: String,
    pub channels: std::sync::Arc<Vec<String>>,
    pub channels_per_event: usize,
}

/// What it did.
pub struct PubResult {
    pub publisher: u32,
    pub sent: u64,
    pub accepted: u64,
    pub errors: Errors,
    /// Per channel: bitset of the sequence numbers accepted for it.
    pub by_channel: Vec<Vec<u64>>,
    pub rtt: Histogram<u64>,
    pub elapsed: Duration,
    /// The most this publisher fell behind its schedule.
    pub max_lag: Duration,
    pub reconnects: u64,
}

pub fn set_bit(bits: &mut Vec<u64>, i: u64) -> bool {
    let w = (i / 64) as usize;
    if bits.len() <= w {
        bits.resize(w + 1, 0);
    }
    let m = 1u64 << (i % 64);
    let was = bits[w] & m != 0;
    bits[w] |= m;
    was
}

/// Which channels global event `g` goes to.
pub fn channels_of(g: u64, k: usize, per_event: usize) -> impl Iterator<Item = usize> {
    let m = per_event.clamp(1, k.max(1)) as u64;
    let k = k.max(1) as u64;
    (0..m).map(move |t| ((g * m + t) % k) as usize)
}

/// Sends this publisher's share of the phase, paced against `start`.
pub fn run_publisher(sink: &mut Sink, plan: &PubPlan) -> PubResult {
    let k = plan.channels.len();
    let mut r = PubResult {
        publisher: plan.publisher,
        sent: 0,
        accepted: 0,
        errors: Errors::default(),
        by_channel: vec![Vec::new(); k],
        rtt: new_hist(),
        elapsed: Duration::ZERO,
        max_lag: Duration::ZERO,
        reconnects: 0,
    };
    let mut seq = 0u64;
    let mut names: Vec<&str> = Vec::with_capacity(plan.channels_per_event);
    let mut idx: Vec<usize> = Vec::with_capacity(plan.channels_per_event);
    let mut consecutive_errors = 0u32;
    loop {
        let g = seq * plan.stride + plan.index;
        if g >= plan.total_events {
            break;
        }
        let due = plan.start + Duration::from_secs_f64(g as f64 / plan.rate);
        let now = Instant::now();
        if now >= plan.give_up_at {
            r.errors
                .add("publisher ran out of time (server too slow to answer)");
            break;
        }
        if due > now {
            std::thread::sleep(due - now);
        } else {
            r.max_lag = r.max_lag.max(now - due);
        }
        idx.clear();
        idx.extend(channels_of(g, k, plan.channels_per_event));
        names.clear();
        names.extend(idx.iter().map(|&c| plan.channels[c].as_str()));
        let league = idx[0] as u32 + 1;
        let sent_ns = now_ns();
        let t = Instant::now();
        let data = match_update(g, league, plan.publisher, seq, sent_ns);
        let res = sink.publish(&plan.event, &names, &data);
        r.rtt.saturating_record(t.elapsed().as_nanos() as u64);
        r.sent += 1;
        match res {
            Ok(()) => {
                r.accepted += 1;
                for &c in &idx {
                    set_bit(&mut r.by_channel[c], seq);
                }
                consecutive_errors = 0;
            }
            Err(e) => {
                r.errors.add(e);
                consecutive_errors += 1;
                if consecutive_errors >= 20 {
                    r.errors
                        .add("publisher stopped after 20 consecutive failed publishes");
                    break;
                }
            }
        }
        seq += 1;
    }
    r.elapsed = plan.start.elapsed();
    r.reconnects = sink.reconnects();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            iso8601(1_709_251_199_123_000_000),
            "2024-02-29T23:59:59.123Z"
        );
    }

    #[test]
    fn payload_is_json_with_fields_last() {
        let d = match_update(7, 3, 2, 99, 1_700_000_000_000_000_000);
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["seq"], 99);
        assert_eq!(v["publisher"], 2);
        assert_eq!(v["home_team"]["name"], "Team A");
        assert_eq!(v["league_id"], 3);
    }

    #[test]
    fn channel_rotation() {
        let c: Vec<usize> = channels_of(4, 10, 3).collect();
        assert_eq!(c, vec![2, 3, 4]);
        let c: Vec<usize> = channels_of(4, 2, 5).collect();
        assert_eq!(c, vec![0, 1]);
        assert_eq!(channels_of(9, 1, 1).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn chunked() {
        assert_eq!(
            decode_chunked(b"2\r\n{}\r\n0\r\n\r\n").as_deref(),
            Some(&b"{}"[..])
        );
        assert_eq!(decode_chunked(b"2\r\n{"), None);
    }
}
