//! A hostile client for issue 13 §1: it opens a Pusher connection with a tiny receive window,
//! never reads, and streams messages that each earn a reply (WebSocket pings, `pusher:ping`,
//! refused subscribes), so every reply the daemon makes piles up on the daemon's side. Shared by
//! `tests/hostile_client.rs` (its tests, and `measure_flood`, the measuring tool).
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What the flood sends, each earning one reply from the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// WebSocket ping control frames with the largest payload allowed (125 bytes): a pong each.
    Ping,
    /// `{"event":"pusher:ping"}`: a `pusher:pong` each.
    PusherPing,
    /// Subscribes to a private channel without a signature: a `pusher:error` each (or, with the
    /// app's rate limit on, a 4301 `pusher:error` each).
    Subscribe,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "ping" => Some(Kind::Ping),
            "pusher-ping" => Some(Kind::PusherPing),
            "subscribe" => Some(Kind::Subscribe),
            _ => None,
        }
    }

    /// One masked client frame (RFC 6455 §5.3: clients mask).
    pub fn frame(self) -> Vec<u8> {
        match self {
            Kind::Ping => masked(0x89, &[b'p'; 125]),
            Kind::PusherPing => masked(0x81, br#"{"event":"pusher:ping","data":{}}"#),
            Kind::Subscribe => masked(
                0x81,
                br#"{"event":"pusher:subscribe","data":{"channel":"private-flood"}}"#,
            ),
        }
    }
}

fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= 125);
    let mask = [0x3a, 0x5c, 0x71, 0x0e];
    let mut out = vec![first, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Connects with a 4 KiB receive buffer (set before connecting, so the window stays small) and
/// asks for the WebSocket upgrade. Nothing is ever read from the returned stream.
pub fn connect(addr: SocketAddr, key: &str) -> TcpStream {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect(&addr.into()).expect("connect");
    let mut s: TcpStream = sock.into();
    s.set_nodelay(true).expect("nodelay");
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    let head = format!(
        "GET /app/{key}?protocol=7&client=flood HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("upgrade request");
    s
}

/// How a flood ended.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes the daemon accepted.
    pub sent: u64,
    /// When a write failed (the daemon closed the connection), from the flood's start.
    pub closed: Option<Duration>,
    /// A write waited over 1.5 s for room: the daemon stopped reading.
    pub stalled: bool,
    pub elapsed: Duration,
}

/// Sends `kind` frames as fast as the daemon takes them, until `max_bytes` are sent, `limit` has
/// passed, or a write fails (the daemon closed the connection).
pub fn flood(s: &mut TcpStream, kind: Kind, max_bytes: u64, limit: Duration) -> Outcome {
    let frame = kind.frame();
    let batch: Vec<u8> = frame.repeat(64 * 1024 / frame.len());
    let start = Instant::now();
    let mut sent = 0u64;
    let mut stalled = false;
    while sent < max_bytes && start.elapsed() < limit {
        let t = Instant::now();
        let r = s.write(&batch);
        stalled |= t.elapsed() > Duration::from_millis(1500);
        match r {
            Ok(n) if n > 0 => sent += n as u64,
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                return Outcome {
                    sent,
                    closed: Some(start.elapsed()),
                    stalled,
                    elapsed: start.elapsed(),
                }
            }
        }
    }
    Outcome {
        sent,
        closed: None,
        stalled,
        elapsed: start.elapsed(),
    }
}

/// The most the kernel can buffer for one loopback connection in one direction: the sender's
/// largest send buffer plus the receiver's largest receive buffer (`tcp_wmem`, `tcp_rmem`).
pub fn kernel_buffers() -> u64 {
    let max = |f: &str| -> u64 {
        std::fs::read_to_string(f)
            .ok()
            .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
            .unwrap_or(8 << 20)
    };
    max("/proc/sys/net/ipv4/tcp_wmem") + max("/proc/sys/net/ipv4/tcp_rmem")
}

/// Resident set size of a process, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples `pid`'s RSS every 20 ms on a thread until the returned guard is finished; `finish`
/// gives the highest value seen.
pub struct RssPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssPeak {
    pub fn start(pid: u32) -> RssPeak {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak.max(rss_kib(pid))
        });
        RssPeak { stop, thread }
    }

    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("rss sampler")
    }
}
