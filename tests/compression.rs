//! permessage-deflate (RFC 7692) against the real daemon, from a raw Rust client that reads the
//! wire itself: what each offer is answered, RSV1 on broadcast frames (compressed once, the same
//! JSON as plain subscribers get), compressed client messages, a decompression bomb (1009 for
//! it, nothing for anyone else), compression turned off for the server or for one app, cached
//! frames and Redis-ingested events. Inflating here uses flate2 directly, as RFC 7692 §7.2.2
//! says: append `00 00 ff ff`, inflate raw DEFLATE.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};

const ACCEPT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
const ACCEPT_15: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15";
/// Shared-context mode (the default): the client keeps its window across server messages.
const ACCEPT_CTX: &str = "permessage-deflate; client_no_context_takeover";
const ACCEPT_CTX_15: &str =
    "permessage-deflate; client_no_context_takeover; server_max_window_bits=15";

/// The original design's `match.update` payload (the load harness's too).
const MATCH_UPDATE: &str = r#"{"match_id":12345,"sport_id":"football","league_id":"premier-league","status":"live","home_team":{"id":101,"name":"Team A","score":2},"away_team":{"id":102,"name":"Team B","score":1},"period":"2nd Half","time":"75:00","last_updated":"2025-05-14T01:35:00Z"}"#;

/// A frame as it came off the wire.
#[derive(Debug)]
struct Frame {
    first: u8,
    payload: Vec<u8>,
    /// RSV1 set: the payload inflated (by the connection's inflater when the server keeps
    /// context, else on its own).
    inflated: Option<Vec<u8>>,
}

impl Frame {
    fn rsv1(&self) -> bool {
        self.first & 0x40 != 0
    }
    fn opcode(&self) -> u8 {
        self.first & 0x0f
    }
    /// The message's text: inflated when RSV1 is set.
    fn text(&self) -> String {
        if let Some(text) = &self.inflated {
            String::from_utf8(text.clone()).unwrap()
        } else {
            String::from_utf8(self.payload.clone()).unwrap()
        }
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.text()).unwrap()
    }
}

fn inflate(data: &[u8]) -> Vec<u8> {
    inflate_with(&mut Decompress::new(false), data)
}

/// Inflates one message with `d`, which keeps its window from the messages before.
fn inflate_with(d: &mut Decompress, data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(data.len() * 8 + 1024);
    let start = d.total_in();
    loop {
        let before = (d.total_in() - start) as usize;
        d.decompress_vec(&input[before..], &mut out, FlushDecompress::Sync)
            .expect("valid DEFLATE from the server");
        if (d.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// Raw DEFLATE, sync-flushed, trailer removed: a compressed message as a client sends it.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    loop {
        let before = c.total_in() as usize;
        c.compress_vec(&data[before..], &mut out, FlushCompress::Sync)
            .unwrap();
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

trait Stream: Read + Write {}
impl<S: Read + Write> Stream for S {}

/// A client speaking WebSocket by hand, so the test sees each frame's RSV1.
struct Raw {
    s: Box<dyn Stream>,
    /// The TCP socket under `s` (read timeouts).
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The `Sec-WebSocket-Extensions` the server answered, if any.
    extensions: Option<String>,
    /// The answer has no `server_no_context_takeover`: one inflater for the whole connection,
    /// as browsers keep (a delta the server got wrong corrupts what follows).
    context: Option<Decompress>,
    socket_id: String,
}

impl Raw {
    fn connect(addr: SocketAddr, offer: Option<&str>) -> Raw {
        Raw::connect_key(addr, APP_KEY, offer)
    }

    fn connect_key(addr: SocketAddr, key: &str, offer: Option<&str>) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tcp = s.try_clone().unwrap();
        Raw::upgrade(Box::new(s), tcp, key, offer)
    }

    /// The WebSocket upgrade over `s` (plain TCP or TLS over `tcp`).
    fn upgrade(mut s: Box<dyn Stream>, tcp: TcpStream, key: &str, offer: Option<&str>) -> Raw {
        let ext = offer.map_or(String::new(), |o| {
            format!("Sec-WebSocket-Extensions: {o}\r\n")
        });
        write!(
            s,
            "GET /app/{key}?protocol=7&client=rust&version=0.1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
        )
        .unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| v.trim().to_owned())
        });
        buf.drain(..head_end);
        let context = extensions
            .as_deref()
            .filter(|e| !e.contains("server_no_context_takeover"))
            .map(|_| Decompress::new(false));
        let mut r = Raw {
            s,
            tcp,
            buf,
            context,
            extensions,
            socket_id: String::new(),
        };
        let f = r
            .frame(Duration::from_secs(5))
            .expect("connection_established");
        assert!(!f.rsv1(), "a short reply goes uncompressed");
        let ev = f.json();
        assert_eq!(ev["event"], "pusher:connection_established");
        let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
        r.socket_id = data["socket_id"].as_str().unwrap().to_owned();
        r
    }

    /// The next frame, or `None` at timeout or end of stream.
    fn frame(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((mut f, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                if f.rsv1() {
                    f.inflated = Some(match &mut self.context {
                        Some(d) => inflate_with(d, &f.payload),
                        None => inflate(&f.payload),
                    });
                }
                return Some(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.tcp.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(_) => return None,
            }
        }
    }

    /// The next text frame (pings and pongs skipped).
    fn text_frame(&mut self) -> Frame {
        loop {
            let f = self.frame(Duration::from_secs(5)).expect("a frame");
            if f.opcode() == 0x1 || f.opcode() == 0x8 {
                return f;
            }
        }
    }

    fn send(&mut self, first: u8, payload: &[u8]) {
        self.s.write_all(&raw_frame(first, payload, true)).unwrap();
    }

    fn send_json(&mut self, v: &Value, compressed: bool) {
        if compressed {
            self.send(0xC1, &deflate(v.to_string().as_bytes()));
        } else {
            self.send(0x81, v.to_string().as_bytes());
        }
    }

    fn subscribe(&mut self, channel: &str, compressed: bool) {
        let auth = format!(
            "{APP_KEY}:{}",
            hmac_hex(APP_SECRET, &format!("{}:{channel}", self.socket_id))
        );
        self.send_json(
            &json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth}}),
            compressed,
        );
        let ev = self.text_frame().json();
        assert_eq!(
            ev["event"], "pusher_internal:subscription_succeeded",
            "{ev}"
        );
        assert_eq!(ev["channel"], channel);
    }

    /// Reads until a close frame; its code.
    fn close_code(&mut self) -> Option<u16> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.frame(Duration::from_secs(5)) {
                Some(f) if f.opcode() == 0x8 => {
                    return f.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]))
                }
                Some(_) => {}
                None => return None,
            }
        }
        None
    }
}

/// One unmasked server frame at the front of `buf`: (frame, bytes used).
fn parse(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
    let (len, at) = match buf[1] & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    Some((
        Frame {
            first: buf[0],
            payload,
            inflated: None,
        },
        at + len,
    ))
}

#[test]
fn each_offer_gets_a_correct_answer_or_a_clean_refusal() {
    let d = Daemon::start(1);
    // Shared context is on by default: only an offer demanding server_no_context_takeover
    // gets it.
    let cases: [(Option<&str>, Option<&str>); 13] = [
        (None, None),
        (Some("permessage-deflate"), Some(ACCEPT_CTX)),
        // What Chromium, Firefox and Node's ws send.
        (
            Some("permessage-deflate; client_max_window_bits"),
            Some(ACCEPT_CTX),
        ),
        (
            Some("permessage-deflate; client_max_window_bits=10"),
            Some(ACCEPT_CTX),
        ),
        (
            Some("permessage-deflate; server_no_context_takeover"),
            Some(ACCEPT),
        ),
        (
            Some("permessage-deflate; server_max_window_bits=15"),
            Some(ACCEPT_CTX_15),
        ),
        (
            Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=15"),
            Some(ACCEPT_15),
        ),
        // A window under 15 cannot be honoured by frames compressed once for everyone.
        (Some("permessage-deflate; server_max_window_bits=10"), None),
        (
            Some("permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits"),
            Some(ACCEPT_CTX),
        ),
        (Some("permessage-deflate; bogus"), None),
        (Some("permessage-deflate; client_max_window_bits=99"), None),
        (Some("x-webkit-deflate-frame"), None),
        (Some(";;, =,garbage\"\""), None),
    ];
    for (offer, want) in cases {
        let mut c = Raw::connect(d.addr, offer);
        assert_eq!(c.extensions.as_deref(), want, "offer {offer:?}");
        // The session works either way, and a refused offer means RSV1 is a protocol error.
        c.subscribe("ok", false);
        if want.is_none() {
            c.send(0xC1, &deflate(b"{}"));
            assert_eq!(c.close_code(), Some(1002), "offer {offer:?}");
        }
    }
}

#[test]
fn broadcasts_are_compressed_once_for_compressing_subscribers_only() {
    let d = Daemon::start(2);
    let api = d.api();
    // Several of each kind, so both shards have some.
    let mut zipped: Vec<Raw> = (0..4)
        .map(|_| Raw::connect(d.addr, Some("permessage-deflate; client_max_window_bits")))
        .collect();
    let mut plain: Vec<Raw> = (0..4).map(|_| Raw::connect(d.addr, None)).collect();
    for c in zipped.iter_mut().chain(plain.iter_mut()) {
        c.subscribe("match.1", false);
    }
    let (st, _) = api.trigger(&["match.1"], "match.update", MATCH_UPDATE);
    assert_eq!(st, 200);
    let (st, _) = api.trigger(&["match.1"], "tick", "1");
    assert_eq!(st, 200);
    let mut wire = Vec::new();
    for c in &mut plain {
        let big = c.text_frame();
        assert_eq!(big.first, 0x81, "plain subscribers never see RSV1");
        let small = c.text_frame();
        assert_eq!(small.first, 0x81);
        wire.push((big.payload.clone(), small.payload.clone()));
    }
    let mut compressed_sizes = Vec::new();
    for c in &mut zipped {
        let big = c.text_frame();
        assert_eq!(
            big.first, 0xC1,
            "a large event is compressed (RSV1, FIN, text)"
        );
        assert_eq!(
            big.text().as_bytes(),
            &wire[0].0[..],
            "same JSON as plain subscribers"
        );
        compressed_sizes.push(big.payload.clone());
        // Below the threshold: sent as is, RSV1 clear.
        let small = c.text_frame();
        assert_eq!(small.first, 0x81);
        assert_eq!(small.payload, wire[0].1);
    }
    // Compressed once: every compressing subscriber got the same bytes.
    assert!(compressed_sizes.windows(2).all(|w| w[0] == w[1]));
    let ratio = compressed_sizes[0].len() as f64 / wire[0].0.len() as f64;
    assert!(
        ratio < 0.8,
        "match.update compressed to {ratio:.2} of its size"
    );
    let ev: Value = serde_json::from_slice(&wire[0].0).unwrap();
    assert_eq!(ev["data"], MATCH_UPDATE);
}

#[test]
fn compressed_client_messages_are_inflated_and_a_bomb_is_closed_1009() {
    let d = Daemon::builder()
        .env("REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM", "all")
        .start();
    let api = d.api();
    let offer = Some("permessage-deflate; client_max_window_bits");
    let mut watcher = Raw::connect(d.addr, offer);
    watcher.subscribe("private-match.1", false);
    let mut c = Raw::connect(d.addr, offer);
    // A compressed subscribe, in one frame and in fragments (RSV1 on the first only).
    c.subscribe("private-match.1", true);
    let msg = deflate(
        json!({"event":"pusher:subscribe","data":{"channel":"match.2"}})
            .to_string()
            .as_bytes(),
    );
    let (a, b) = msg.split_at(msg.len() / 2);
    c.send(0x41, a);
    c.send(0x80, b);
    let ev = c.text_frame().json();
    assert_eq!(ev["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(ev["channel"], "match.2");
    // A compressed client event reaches the other subscriber.
    c.send_json(
        &json!({"event":"client-typing","channel":"private-match.1","data":{"x":"y".repeat(300)}}),
        true,
    );
    let ev = watcher.text_frame().json();
    assert_eq!(ev["event"], "client-typing");
    // A bomb: 9 KB on the wire (under the 10,000-byte limit), 8 MB inflated.
    let bomb = deflate(&vec![b' '; 8 << 20]);
    assert!(bomb.len() < 10_000, "{}", bomb.len());
    let mut bomber = Raw::connect(d.addr, offer);
    bomber.send(0xC1, &bomb);
    assert_eq!(bomber.close_code(), Some(1009));
    // Corrupt DEFLATE: 1007.
    let mut broken = Raw::connect(d.addr, offer);
    broken.send(0xC1, &[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(broken.close_code(), Some(1007));
    // Nobody else was disturbed.
    let (st, _) = api.trigger(&["private-match.1"], "match.update", MATCH_UPDATE);
    assert_eq!(st, 200);
    for w in [&mut watcher, &mut c] {
        let ev = w.text_frame().json();
        assert_eq!(ev["event"], "match.update");
        assert_eq!(ev["data"], MATCH_UPDATE);
    }
}

#[test]
fn compression_off_for_the_server_is_todays_behaviour() {
    let d = Daemon::builder().env("BTS_COMPRESSION", "false").start();
    let mut c = Raw::connect(d.addr, Some("permessage-deflate; client_max_window_bits"));
    assert_eq!(c.extensions, None);
    c.subscribe("match.1", false);
    let (st, _) = d.api().trigger(&["match.1"], "match.update", MATCH_UPDATE);
    assert_eq!(st, 200);
    assert_eq!(c.text_frame().first, 0x81);
    c.send(0xC1, &deflate(b"{}"));
    assert_eq!(c.close_code(), Some(1002));
}

#[test]
fn compression_off_for_one_app_and_the_threshold_from_toml() {
    let toml = format!(
        "compression_threshold = 4000\n\
         [[apps]]\nid = \"{APP_ID}\"\nkey = \"{APP_KEY}\"\nsecret = \"{APP_SECRET}\"\n\
         [[apps]]\nid = \"quiet\"\nkey = \"quiet-key\"\nsecret = \"quiet-secret\"\ncompression = false\n"
    );
    let d = Daemon::builder()
        .without_app_env()
        .server_toml(&toml)
        .start();
    let offer = Some("permessage-deflate");
    let quiet = Raw::connect_key(d.addr, "quiet-key", offer);
    assert_eq!(quiet.extensions, None);
    let mut c = Raw::connect(d.addr, offer);
    assert_eq!(c.extensions.as_deref(), Some(ACCEPT_CTX));
    c.subscribe("match.1", false);
    // Under the 4,000-byte threshold: plain.
    d.api().trigger(&["match.1"], "match.update", MATCH_UPDATE);
    assert_eq!(c.text_frame().first, 0x81);
    let big = MATCH_UPDATE.repeat(20);
    d.api().trigger(&["match.1"], "match.update", &big);
    let f = c.text_frame();
    assert_eq!(f.first, 0xC1);
    assert_eq!(f.json()["data"], big);
}

#[test]
fn cached_frames_and_redis_events_are_compressed_too() {
    let redis = RedisServer::start();
    let d = Daemon::builder()
        .env("REDIS_URL", redis.url())
        .env("REDIS_PREFIX", "p_")
        .start();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http(d.addr, "GET", "/up", b"");
        if serde_json::from_str::<Value>(&body).unwrap()["redis"] == "connected" {
            break;
        }
        assert!(Instant::now() < deadline, "ingest never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let offer = Some("permessage-deflate; client_max_window_bits");
    // A cache channel's last event, published before anyone subscribed.
    let (st, _) = d
        .api()
        .trigger(&["cache-match.1"], "match.update", MATCH_UPDATE);
    assert_eq!(st, 200);
    let mut c = Raw::connect(d.addr, offer);
    c.subscribe("cache-match.1", false);
    let cached = c.text_frame();
    assert_eq!(cached.first, 0xC1);
    assert_eq!(cached.json()["data"], MATCH_UPDATE);
    // Laravel's broadcaster through Redis.
    c.subscribe("match.1", false);
    let data: Value = serde_json::from_str(MATCH_UPDATE).unwrap();
    redis.laravel_broadcast("p_", &["match.1"], "match.update", data.clone(), None);
    let f = c.text_frame();
    assert_eq!(f.first, 0xC1);
    let ev = f.json();
    assert_eq!(ev["event"], "match.update");
    assert_eq!(
        serde_json::from_str::<Value>(ev["data"].as_str().unwrap()).unwrap(),
        data
    );
}

#[test]
fn tls_subscribers_get_the_compressed_bytes_sealed() {
    let dir = std::env::temp_dir().join(format!("bts-guru-deflate-tls-{}", std::process::id()));
    let cert = make_cert(&dir, "c");
    let d = Daemon::builder().tls(&cert).start();
    let sock = TcpStream::connect(d.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tcp = sock.try_clone().unwrap();
    let tls = tls_client_over(sock, &[&cert.der]);
    let mut c = Raw::upgrade(
        Box::new(tls),
        tcp,
        APP_KEY,
        Some("permessage-deflate; client_max_window_bits"),
    );
    assert_eq!(c.extensions.as_deref(), Some(ACCEPT_CTX));
    c.subscribe("match.1", true);
    let (st, _) = d.api().trigger(&["match.1"], "match.update", MATCH_UPDATE);
    assert_eq!(st, 200);
    let f = c.text_frame();
    assert_eq!(f.first, 0xC1);
    assert_eq!(f.json()["data"], MATCH_UPDATE);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The original `match.update` with a sequence number and a changing score and clock.
fn update(seq: u64) -> String {
    format!(
        r#"{{"seq":{seq},"match_id":12345,"sport_id":"football","league_id":"premier-league","status":"live","home_team":{{"id":101,"name":"Team A","score":{}}},"away_team":{{"id":102,"name":"Team B","score":1}},"period":"2nd Half","time":"{}:00","last_updated":"2025-05-14T01:35:00Z"}}"#,
        seq % 5,
        60 + seq % 30
    )
}

/// What a test published: data → (event, channel), each data unique (its `seq`).
#[derive(Default)]
struct Published {
    by_data: std::collections::HashMap<String, (String, String)>,
    seq: u64,
}

impl Published {
    fn next(&mut self, event: &str, channel: &str) -> Value {
        self.seq += 1;
        let data = update(self.seq);
        self.by_data
            .insert(data.clone(), (event.into(), channel.into()));
        json!({"name": event, "channel": channel, "channels": [channel], "data": data})
    }
}

/// Reads `c` until the `match.event` whose data is `{"done":marker}`; checks every event
/// against `published` (exact data, its event and channel) and returns them in order.
fn read_until_marker(
    c: &mut Raw,
    published: &Published,
    marker: u64,
) -> Vec<(String, String, Value)> {
    let mut got = Vec::new();
    loop {
        let f = c.text_frame();
        assert_eq!(f.opcode(), 0x1, "closed: {:?}", f.payload);
        let text = f.text();
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("a message inflated to garbage ({e}): {text:?}"));
        let event = v["event"].as_str().unwrap().to_owned();
        if event.starts_with("pusher") || event.starts_with("bts:") {
            continue;
        }
        let data = v["data"].as_str().unwrap();
        if data == format!("{{\"done\":{marker}}}") {
            return got;
        }
        let (e, ch) = published
            .by_data
            .get(data)
            .unwrap_or_else(|| panic!("not what was published: {text}"));
        assert_eq!(
            (e.as_str(), v["channel"].as_str().unwrap()),
            (event.as_str(), ch.as_str())
        );
        got.push((event, ch.clone(), v));
    }
}

/// Shared-context compression (delta frames) over mixed traffic, read by a raw client with one
/// inflater kept for the whole connection, as browsers and `ws` keep it: two channels
/// interleaved, a positioned channel, events excluding this socket, batches that make
/// conflation drop queued frames (their deltas must be resent independent), a cache channel's
/// stored frame, a resume replay (plain) in between. Every message must inflate to exactly
/// what was published: a delta sent to a client whose window does not end with its
/// predecessor inflates to garbage or fails. And deltas were really sent.
#[test]
fn shared_context_deltas_inflate_exactly_over_mixed_traffic() {
    let mport = free_port();
    let d = Daemon::builder()
        .metrics_port(mport)
        .env("BTS_APP_CONFLATE", "match.update")
        .env("BTS_CONFLATION_THRESHOLD", "1")
        .env("BTS_APP_RESUME", "sports.*")
        .shards(2)
        .start();
    let api = d.api();
    let offer = Some("permessage-deflate; client_max_window_bits");
    let mut c = Raw::connect(d.addr, offer);
    assert_eq!(c.extensions.as_deref(), Some(ACCEPT_CTX));
    // An independent-only client beside it gets the same events.
    let mut indep = Raw::connect(
        d.addr,
        Some("permessage-deflate; server_no_context_takeover"),
    );
    assert_eq!(indep.extensions.as_deref(), Some(ACCEPT));
    for ch in ["match.1", "match.2", "sports.1"] {
        c.subscribe(ch, false);
        indep.subscribe(ch, false);
    }
    let mut p = Published::default();
    let mut events_for_c = Vec::new();
    let mut excluded = Vec::new();
    let mut last_sports = String::new();
    let post = |body: Value| {
        let (st, b) = api.post("events", &body.to_string());
        assert_eq!(st, 200, "{b}");
    };
    for round in 0..30u64 {
        for ch in ["match.1", "match.2", "sports.1"] {
            post(p.next("match.update", ch));
        }
        if round % 3 == 0 {
            let ev = p.next("match.event", "match.1");
            events_for_c.push(ev["data"].as_str().unwrap().to_owned());
            post(ev);
        }
        if round % 5 == 2 {
            let mut ev = p.next("match.update", "match.1");
            ev["socket_id"] = c.socket_id.clone().into();
            excluded.push(ev["data"].as_str().unwrap().to_owned());
            post(ev);
        }
        if round % 4 == 1 {
            // One burst: updates superseded while queued (conflated), and a match.event
            // compressed against an update that conflation then drops.
            let mut batch = Vec::new();
            for (e, ch) in [
                ("match.update", "match.1"),
                ("match.event", "match.1"),
                ("match.update", "match.1"),
                ("match.update", "match.2"),
                ("match.update", "match.1"),
                ("match.update", "match.2"),
            ] {
                let mut ev = p.next(e, ch);
                if e == "match.event" {
                    events_for_c.push(ev["data"].as_str().unwrap().to_owned());
                }
                ev.as_object_mut().unwrap().remove("channels");
                batch.push(ev);
            }
            let (st, b) = api.post("batch_events", &json!({ "batch": batch }).to_string());
            assert_eq!(st, 200, "{b}");
        }
    }
    post(json!({"name":"match.event","channels":["match.1"],"data":json!({"done":1}).to_string()}));
    let got = read_until_marker(&mut c, &p, 1);
    let other = read_until_marker(&mut indep, &p, 1);
    for (who, got) in [("context", &got), ("independent", &other)] {
        let evs: Vec<&str> = got
            .iter()
            .filter(|(e, _, _)| e == "match.event")
            .map(|(_, _, v)| v["data"].as_str().unwrap())
            .collect();
        assert_eq!(evs, events_for_c, "{who}: every match.event, in order");
    }
    assert!(got
        .iter()
        .all(|(_, _, v)| !excluded.iter().any(|x| v["data"] == **x)));
    for (_, ch, v) in &got {
        if ch == "sports.1" {
            last_sports = v["bts_position"].as_str().unwrap().to_owned();
        }
    }
    // A cache channel's stored frame: compressed against a predecessor this client never had.
    post(p.next("match.update", "cache-match.1"));
    post(p.next("match.update", "cache-match.1"));
    c.subscribe("cache-match.1", false);
    let cached = c.text_frame();
    assert_eq!(
        p.by_data[cached.json()["data"].as_str().unwrap()].1,
        "cache-match.1"
    );
    // A resume replay (plain frames) between compressed ones.
    c.send_json(
        &json!({"event":"pusher:unsubscribe","data":{"channel":"sports.1"}}),
        false,
    );
    for _ in 0..3 {
        post(p.next("match.update", "sports.1"));
        post(p.next("match.update", "match.1"));
    }
    c.send_json(
        &json!({"event":"pusher:subscribe","data":{"channel":"sports.1","bts_position":last_sports}}),
        false,
    );
    for _ in 0..5 {
        post(p.next("match.update", "sports.1"));
        post(p.next("match.update", "match.2"));
    }
    post(json!({"name":"match.event","channels":["match.1"],"data":json!({"done":2}).to_string()}));
    let after = read_until_marker(&mut c, &p, 2);
    // The replay (3 missed, plain) then live ones (conflatable like any match.update: the
    // newest always arrives).
    let offset = |p: &str| p.rsplit_once(':').unwrap().1.parse::<u64>().unwrap();
    let from = offset(&last_sports);
    let sports: Vec<u64> = after
        .iter()
        .filter(|(_, ch, _)| ch == "sports.1")
        .map(|(_, _, v)| offset(v["bts_position"].as_str().unwrap()))
        .collect();
    assert_eq!(sports[..3], [from + 1, from + 2, from + 3], "{sports:?}");
    assert_eq!(sports.last(), Some(&(from + 8)), "{sports:?}");
    assert!(sports.windows(2).all(|w| w[0] < w[1]), "{sports:?}");
    let text = scrape_metrics(mport);
    let deltas = metric(&text, "bts_frames_delta_total");
    let conflated = metric(&text, "bts_frames_conflated_total");
    assert!(deltas >= 20.0, "deltas sent: {deltas}");
    assert!(conflated > 0.0, "conflation happened: {conflated}");
}

#[test]
fn compression_context_off_answers_server_no_context_takeover() {
    for toml in [false, true] {
        let mut b = Daemon::builder().metrics_port(free_port());
        b = if toml {
            b.server_toml("compression_context = false")
        } else {
            b.env("BTS_COMPRESSION_CONTEXT", "false")
        };
        let d = b.start();
        let mut c = Raw::connect(d.addr, Some("permessage-deflate; client_max_window_bits"));
        assert_eq!(c.extensions.as_deref(), Some(ACCEPT), "toml: {toml}");
        c.subscribe("match.1", false);
        for i in 0..3 {
            d.api().trigger(&["match.1"], "match.update", &update(i));
        }
        // Each compressed on its own: this client inflates each without context.
        for i in 0..3 {
            let f = c.text_frame();
            assert_eq!(f.first, 0xC1);
            assert_eq!(f.json()["data"], update(i));
        }
    }
}
