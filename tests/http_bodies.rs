//! HTTP request bodies over raw sockets: chunked coding (RFC 9112 §7.1) on the API, the body
//! limit on the decoded body, malformed chunking, request smuggling shapes (RFC 9112 §6.3),
//! `Expect: 100-continue`, the per-request deadline, and `Sec-WebSocket-Key` checks; plus the
//! same from real clients (Node's `http`, curl).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(5);

/// `path?query&auth_signature=…` for a signed POST of `body` to `/apps/{APP_ID}/{endpoint}`,
/// signed with `secret`.
fn signed_with(endpoint: &str, body: &[u8], secret: &str) -> String {
    signed_post(APP_ID, APP_KEY, secret, endpoint, body, now_secs())
}

fn signed(endpoint: &str, body: &[u8]) -> String {
    signed_with(endpoint, body, APP_SECRET)
}

/// The head of a chunked POST.
fn chunked_head(target: &str, extra: &str) -> String {
    format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n{extra}\r\n"
    )
}

/// `pieces` in chunked coding (sizes in upper-case hex), with an extension on each size line
/// and a trailer when asked.
fn chunked(pieces: &[&[u8]], decorate: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces.iter().filter(|p| !p.is_empty()) {
        out.extend(format!("{:X}", p.len()).bytes());
        if decorate {
            out.extend_from_slice(b";piece=\"x y\"");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    if decorate {
        out.extend_from_slice(b"X-Checksum: none\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn connect(d: &Daemon) -> TcpStream {
    let s = TcpStream::connect(d.addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

/// Reads one response (head, then a `Content-Length` body): status and body. `None` when the
/// connection ended or nothing came within the read timeout.
fn read_response(s: &mut TcpStream) -> Option<(u16, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The next response's status; panics when none comes.
fn status(s: &mut TcpStream) -> u16 {
    read_response(s).expect("no response").0
}

/// Reads (and drops) until the server closes the connection; panics if it does not within 5 s.
fn expect_closed(s: &mut TcpStream) {
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "connection not closed");
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed: {e}"),
        }
    }
}

/// Writes `bytes` one at a time, pausing between them so the server reads them separately.
fn write_slowly(s: &mut TcpStream, bytes: &[u8]) {
    for b in bytes {
        s.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn event(channel: &str, data: &str) -> String {
    json!({"name": "match.update", "channel": channel, "data": data}).to_string()
}

/// How a chunked body is cut into writes.
#[derive(Clone, Copy, Debug)]
enum Split {
    Whole,
    /// Framing byte by byte (inside sizes, extensions, every CRLF), data one write per chunk.
    Framing,
    /// Every byte on its own.
    Bytes,
}

#[test]
fn chunked_publishes_are_delivered_however_the_body_is_split() {
    let d = Daemon::start(1);
    let mut c = d.client();
    c.subscribe("sports.football");
    // One keep-alive connection for every request: each body must end exactly where it does.
    let mut s = connect(&d);
    let cases = [
        (Split::Whole, false),
        (Split::Whole, true),
        (Split::Framing, false),
        (Split::Framing, true),
        (Split::Bytes, true),
    ];
    for (i, (split, decorate)) in cases.into_iter().enumerate() {
        let body = event("sports.football", &format!("update {i} {}", "x".repeat(40)));
        let b = body.as_bytes();
        // Pieces of 1, 7 and 26 (`1A`) bytes, then the rest.
        let pieces = [&b[..1], &b[1..8], &b[8..34], &b[34..]];
        s.write_all(chunked_head(&signed("events", b), "").as_bytes())
            .unwrap();
        match split {
            Split::Whole => s.write_all(&chunked(&pieces, decorate)).unwrap(),
            Split::Bytes => write_slowly(&mut s, &chunked(&pieces, decorate)),
            Split::Framing => {
                for p in pieces {
                    let coded = chunked(&[p], decorate);
                    // `coded` is this piece's chunk, then the last chunk: send the first part.
                    let data_at = coded.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
                    write_slowly(&mut s, &coded[..data_at]);
                    s.write_all(p).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                    write_slowly(&mut s, b"\r\n");
                }
                let end: &[u8] = if decorate {
                    b"0;end\r\nX-Checksum: none\r\n\r\n"
                } else {
                    b"0\r\n\r\n"
                };
                write_slowly(&mut s, end);
            }
        }
        let (st, resp) = read_response(&mut s).expect("no response");
        assert_eq!(st, 200, "{split:?} {decorate}: {resp}");
        let ev = c.next_event(T);
        assert_eq!(ev["event"], "match.update");
        assert_eq!(
            ev["data"],
            format!("update {i} {}", "x".repeat(40)),
            "{split:?}"
        );
    }
    // Pipelined: two chunked publishes in one write, each answered in turn.
    let mut both = Vec::new();
    for i in 0..2 {
        let body = event("sports.football", &format!("pipelined {i}"));
        both.extend(chunked_head(&signed("events", body.as_bytes()), "").bytes());
        both.extend(chunked(&[body.as_bytes()], false));
    }
    s.write_all(&both).unwrap();
    for i in 0..2 {
        assert_eq!(status(&mut s), 200);
        assert_eq!(c.next_event(T)["data"], format!("pipelined {i}"));
    }
}

#[test]
fn chunked_batch_publish_is_delivered() {
    let d = Daemon::start(2);
    let mut a = d.client();
    a.subscribe("sports.football");
    let mut b = d.client();
    b.subscribe("sports.tennis");
    let body = json!({"batch": [
        {"name": "goal", "channel": "sports.football", "data": "1-0"},
        {"name": "ace", "channel": "sports.tennis", "data": "15-0"},
    ]})
    .to_string();
    let bytes = body.as_bytes();
    let mut s = connect(&d);
    s.write_all(chunked_head(&signed("batch_events", bytes), "").as_bytes())
        .unwrap();
    s.write_all(&chunked(&bytes.chunks(16).collect::<Vec<_>>(), false))
        .unwrap();
    assert_eq!(status(&mut s), 200);
    assert_eq!(a.next_event(T)["data"], "1-0");
    assert_eq!(b.next_event(T)["data"], "15-0");
}

#[test]
fn the_body_limit_applies_to_the_decoded_body() {
    let d = Daemon::builder()
        .env("REVERB_MAX_REQUEST_SIZE", "1000")
        .start();
    let mut c = d.client();
    c.subscribe("sports.football");
    // 900 bytes of body in 1-byte chunks: over 5 KB on the wire, under the limit decoded.
    let body = event("sports.football", &"y".repeat(830));
    assert!(body.len() < 1000);
    let bytes = body.as_bytes();
    let mut s = connect(&d);
    s.write_all(chunked_head(&signed("events", bytes), "").as_bytes())
        .unwrap();
    let coded = chunked(&bytes.chunks(1).collect::<Vec<_>>(), false);
    assert!(coded.len() > 5000);
    s.write_all(&coded).unwrap();
    assert_eq!(status(&mut s), 200);
    assert_eq!(c.next_event(T)["event"], "match.update");
}

#[test]
fn an_oversized_chunked_body_is_refused_before_it_is_all_sent() {
    let d = Daemon::builder()
        .env("REVERB_MAX_REQUEST_SIZE", "1000")
        .start();
    let mut c = d.client();
    c.subscribe("sports.football");
    // 512 bytes, then a chunk announcing 1 KiB more: refused at its size line. The client
    // sends nothing after it and still holds the rest of its body when it reads the answer.
    let mut s = connect(&d);
    s.write_all(chunked_head(&signed("events", b"{}"), "").as_bytes())
        .unwrap();
    s.write_all(b"200\r\n").unwrap();
    s.write_all(&[b'z'; 512]).unwrap();
    s.write_all(b"\r\n400\r\n").unwrap();
    let (st, body) = read_response(&mut s).expect("no answer before the body was sent");
    assert_eq!(st, 413, "{body}");
    assert!(body.contains("larger than 1000 bytes"), "{body}");
    expect_closed(&mut s);
    // One size line asking for far more than the limit, and one just over it.
    for size in ["ffffffff", "3E9"] {
        let mut s = connect(&d);
        s.write_all(chunked_head(&signed("events", b"{}"), "").as_bytes())
            .unwrap();
        s.write_all(format!("{size}\r\n").as_bytes()).unwrap();
        assert_eq!(status(&mut s), 413, "{size}");
        expect_closed(&mut s);
    }
    // Content-Length over the limit is refused as before, without reading the body.
    let mut s = connect(&d);
    write!(
        s,
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
        signed("events", b"{}")
    )
    .unwrap();
    assert_eq!(status(&mut s), 413);
    expect_closed(&mut s);
    c.expect_silence(Duration::from_millis(200));
    assert_eq!(
        d.api()
            .trigger(&["sports.football"], "after", "\"still fine\"")
            .0,
        200
    );
    assert_eq!(c.next_event(T)["event"], "after");
}

#[test]
fn malformed_chunked_bodies_are_400_and_closed() {
    let d = Daemon::start(1);
    let mut c = d.client();
    c.subscribe("sports.football");
    let good = event("sports.football", "never");
    let target = signed("events", good.as_bytes());
    let mut trailers = b"2\r\n{}\r\n0\r\n".to_vec();
    while trailers.len() < 16 * 1024 {
        trailers
            .extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let mut zeros = vec![b'0'; 64 * 1024];
    zeros.extend_from_slice(b"2\r\n{}\r\n0\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("bad hex", b"zz\r\n{}\r\n0\r\n\r\n".to_vec(), 400),
        ("0x prefix", b"0x2\r\n{}\r\n0\r\n\r\n".to_vec(), 400),
        ("negative", b"-2\r\n{}\r\n0\r\n\r\n".to_vec(), 400),
        ("space inside size", b"2 2\r\n{}\r\n0\r\n\r\n".to_vec(), 400),
        ("no CRLF after data", b"2\r\n{}XX0\r\n\r\n".to_vec(), 400),
        (
            "data longer than size",
            b"1\r\n{}\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        ("bare LF after size", b"2\n{}\r\n0\r\n\r\n".to_vec(), 400),
        ("bare LF after data", b"2\r\n{}\n0\r\n\r\n".to_vec(), 400),
        ("bare CR", b"2\r{}\r\n0\r\n\r\n".to_vec(), 400),
        ("size overflow", b"10000000000000000\r\n".to_vec(), 400),
        (
            "obs-fold trailer",
            b"0\r\nX-A: 1\r\n b\r\n\r\n".to_vec(),
            400,
        ),
        ("64 KiB size line", zeros, 400),
        ("16 KiB of trailers", trailers, 431),
    ];
    for (what, body, want) in cases {
        let mut s = connect(&d);
        s.write_all(chunked_head(&target, "").as_bytes()).unwrap();
        // The server may close while a long body is still being written.
        let _ = s.write_all(&body);
        let (st, resp) = read_response(&mut s).unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(st, want, "{what}: {resp}");
        expect_closed(&mut s);
    }
    // A body that ends early: the client stops sending (half-close) mid-chunk.
    let mut s = connect(&d);
    s.write_all(chunked_head(&target, "").as_bytes()).unwrap();
    s.write_all(b"5\r\nab").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (st, resp) = read_response(&mut s).expect("no answer to a truncated body");
    assert_eq!(st, 400, "{resp}");
    assert!(resp.contains("ended early"), "{resp}");
    expect_closed(&mut s);
    c.expect_silence(Duration::from_millis(200));
    assert_eq!(d.api().trigger(&["sports.football"], "after", "1").0, 200);
    assert_eq!(c.next_event(T)["event"], "after");
}

#[test]
fn request_smuggling_shapes_are_400_and_closed() {
    let d = Daemon::start(1);
    let mut c = d.client();
    c.subscribe("sports.football");
    // Each request carries a validly signed publish: if any framing were accepted, the event
    // (or a second, smuggled request) would reach the subscriber.
    let body = event("sports.football", "smuggled");
    let b = body.as_bytes();
    let target = signed("events", b);
    let n = b.len();
    let coded = String::from_utf8(chunked(&[b], false)).unwrap();
    let plain = |headers: &str| format!("POST {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n");
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            plain(&format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked",
                coded.len()
            )) + &coded,
        ),
        (
            "Transfer-Encoding and Content-Length",
            plain(&format!("Transfer-Encoding: chunked\r\nContent-Length: {n}")) + &coded,
        ),
        (
            "gzip, chunked",
            plain("Transfer-Encoding: gzip, chunked") + &coded,
        ),
        (
            "chunked, gzip",
            plain("Transfer-Encoding: chunked, gzip") + &coded,
        ),
        ("identity", plain("Transfer-Encoding: identity") + &body),
        ("xchunked", plain("Transfer-Encoding: xchunked") + &coded),
        (
            "two Transfer-Encoding",
            plain("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked") + &coded,
        ),
        (
            "two equal Content-Length",
            plain(&format!("Content-Length: {n}\r\nContent-Length: {n}")) + &body,
        ),
        (
            "two different Content-Length",
            plain(&format!("Content-Length: {n}\r\nContent-Length: 0")) + &body,
        ),
        (
            "Content-Length: +n",
            plain(&format!("Content-Length: +{n}")) + &body,
        ),
        ("Content-Length: -1", plain("Content-Length: -1") + &body),
        (
            "Content-Length: n n",
            plain(&format!("Content-Length:  {n} {n}")) + &body,
        ),
        (
            "Content-Length: n, n",
            plain(&format!("Content-Length: {n}, {n}")) + &body,
        ),
        ("Content-Length: abc", plain("Content-Length: abc") + &body),
        (
            "Content-Length overflow",
            plain("Content-Length: 184467440737095516160") + &body,
        ),
        (
            "bare LF line endings",
            format!("POST {target} HTTP/1.1\nHost: x\nContent-Length: {n}\n\n{body}"),
        ),
        (
            "one bare LF",
            format!("POST {target} HTTP/1.1\r\nHost: x\nContent-Length: {n}\r\n\r\n{body}"),
        ),
        (
            "obs-fold",
            plain(&format!("X-Folded: a\r\n b\r\nContent-Length: {n}")) + &body,
        ),
        (
            "space before colon",
            plain(&format!("Content-Length : {n}")) + &body,
        ),
        (
            "HTTP/2.0",
            format!("POST {target} HTTP/2.0\r\nHost: x\r\nContent-Length: {n}\r\n\r\n{body}"),
        ),
        (
            "HTTP/1.2",
            format!("POST {target} HTTP/1.2\r\nHost: x\r\nContent-Length: {n}\r\n\r\n{body}"),
        ),
        (
            "HTTP/1.0 chunked",
            format!("POST {target} HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{coded}"),
        ),
        (
            "upgrade with a body",
            format!(
                "GET /app/{APP_KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: {n}\r\n\r\n{body}"
            ),
        ),
    ];
    for (what, raw) in cases {
        let mut s = connect(&d);
        s.write_all(raw.as_bytes()).unwrap();
        let (st, resp) = read_response(&mut s).unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(st, 400, "{what}: {resp}");
        expect_closed(&mut s);
    }
    c.expect_silence(Duration::from_millis(300));
    assert_eq!(d.api().trigger(&["sports.football"], "after", "1").0, 200);
    assert_eq!(c.next_event(T)["event"], "after");
}

/// Sends `bytes` one every `every` until the server answers; what it answered, and when.
fn trickle(s: &mut TcpStream, bytes: &[u8], every: Duration) -> (String, Duration) {
    let started = Instant::now();
    s.set_read_timeout(Some(every)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(30) {
        if i < bytes.len() && s.write_all(&bytes[i..i + 1]).is_ok() {
            i += 1;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !got.is_empty() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_trickled_body_is_cut_off_with_408() {
    let d = Daemon::builder()
        .server_toml("handshake_timeout_secs = 1")
        .start();
    let body = event("sports.football", &"z".repeat(200));
    let b = body.as_bytes();
    let target = signed("events", b);
    // Content-Length: the head arrives at once, then one body byte every 100 ms (each read is
    // quick; the body would take 20 s).
    let mut s = connect(&d);
    write!(
        s,
        "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        b.len()
    )
    .unwrap();
    let (got, took) = trickle(&mut s, b, Duration::from_millis(100));
    assert!(got.starts_with("HTTP/1.1 408 "), "{got:?} after {took:?}");
    assert!(took < Duration::from_secs(6), "408 only after {took:?}");
    expect_closed(&mut s);
    // Chunked, the same.
    let mut s = connect(&d);
    s.write_all(chunked_head(&target, "").as_bytes()).unwrap();
    let coded = chunked(&b.chunks(10).collect::<Vec<_>>(), false);
    let (got, took) = trickle(&mut s, &coded, Duration::from_millis(100));
    assert!(got.starts_with("HTTP/1.1 408 "), "{got:?} after {took:?}");
    assert!(took < Duration::from_secs(6), "408 only after {took:?}");
    expect_closed(&mut s);
}

#[test]
fn each_keep_alive_request_gets_a_fresh_deadline_and_idle_connections_are_closed() {
    let d = Daemon::builder()
        .server_toml("handshake_timeout_secs = 3")
        .start();
    let mut s = connect(&d);
    let first = event("sports.football", "first");
    write!(
        s,
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{first}",
        signed("events", first.as_bytes()),
        first.len()
    )
    .unwrap();
    assert_eq!(status(&mut s), 200);
    // Idle for half the timeout, then a request that takes 2 s to send: it ends 3.5 s after
    // the first answer, but within 3 s of its own first byte.
    std::thread::sleep(Duration::from_millis(1500));
    let second = event("sports.football", "second");
    let mut raw = chunked_head(&signed("events", second.as_bytes()), "").into_bytes();
    raw.extend(chunked(&[second.as_bytes()], false));
    let pieces: Vec<&[u8]> = raw.chunks(raw.len().div_ceil(10)).collect();
    for p in &pieces {
        s.write_all(p).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let (st, resp) = read_response(&mut s).expect("no answer to the second request");
    assert_eq!(st, 200, "{resp}");
    // Then nothing: the idle connection is closed (silently: no request to answer).
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        matches!(s.read(&mut buf), Ok(0)),
        "idle connection not closed"
    );
    assert!(started.elapsed() < Duration::from_secs(12));
}

#[test]
fn expect_100_continue_gets_the_final_answer_at_once_when_refused() {
    let d = Daemon::builder()
        .env("REVERB_MAX_REQUEST_SIZE", "1000")
        .start();
    let mut c = d.client();
    c.subscribe("sports.football");
    let body = event("sports.football", "expected");
    let b = body.as_bytes();
    let n = b.len();
    let stale = signed_post(APP_ID, APP_KEY, APP_SECRET, "events", b, now_secs() - 3600);
    // None of these is worth its body: the answer comes without it, and no `100 Continue`.
    let cases = [
        (
            "unknown app",
            "/apps/nope/events?auth_key=x".to_owned(),
            404,
            "",
        ),
        ("unknown path", "/nowhere".to_owned(), 404, ""),
        ("wrong method", format!("/apps/{APP_ID}/events"), 405, "PUT"),
        (
            "bad signature",
            signed_with("events", b, "not-the-secret"),
            401,
            "",
        ),
        ("stale timestamp", stale, 401, ""),
        ("no signature", format!("/apps/{APP_ID}/events"), 401, ""),
    ];
    for (what, target, want, method) in cases {
        let method = if method.is_empty() { "POST" } else { method };
        for framing in [
            format!("Content-Length: {n}"),
            "Transfer-Encoding: chunked".into(),
        ] {
            let mut s = connect(&d);
            write!(
                s,
                "{method} {target} HTTP/1.1\r\nHost: x\r\n{framing}\r\nExpect: 100-continue\r\n\r\n"
            )
            .unwrap();
            let (st, resp) = read_response(&mut s).unwrap_or_else(|| panic!("{what}: no answer"));
            assert_eq!(st, want, "{what}, {framing}: {resp}");
            expect_closed(&mut s);
        }
    }
    let mut s = connect(&d);
    write!(
        s,
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
        signed("events", b)
    )
    .unwrap();
    assert_eq!(status(&mut s), 413);
    // A good one, chunked: 100 Continue, then the body, then 200 and the event.
    let mut s = connect(&d);
    s.write_all(chunked_head(&signed("events", b), "Expect: 100-continue\r\n").as_bytes())
        .unwrap();
    assert_eq!(status(&mut s), 100);
    s.write_all(&chunked(&[&b[..10], &b[10..]], false)).unwrap();
    assert_eq!(status(&mut s), 200);
    assert_eq!(c.next_event(T)["data"], "expected");
    c.expect_silence(Duration::from_millis(200));
}

#[test]
fn bad_websocket_keys_are_400() {
    let d = Daemon::start(1);
    let key_of = |bytes: usize| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(vec![7u8; bytes])
    };
    for key in [
        String::new(),
        "abc".into(),
        "not base64 at all!!!!!==".into(),
        key_of(15),
        key_of(17),
        key_of(16).trim_end_matches('=').to_owned(),
    ] {
        let mut s = connect(&d);
        write!(
            s,
            "GET /app/{APP_KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let (st, resp) = read_response(&mut s).unwrap_or_else(|| panic!("{key:?}: no answer"));
        assert_eq!(st, 400, "{key:?}: {resp}");
        expect_closed(&mut s);
    }
    // A 16-byte key upgrades.
    let mut s = connect(&d);
    write!(
        s,
        "GET /app/{APP_KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        key_of(16)
    )
    .unwrap();
    assert_eq!(status(&mut s), 101);
}

/// Runs curl with `args`; its `-v` log and the `-w` line (status and total time).
fn curl(args: &[&str]) -> (String, u16, f64) {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-v",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("could not run curl ({e}): install it (`bash tests/run.sh` does)")
        });
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let w = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, time) = w.split_once(' ').unwrap_or_else(|| panic!("{w}\n{log}"));
    (log, code.parse().unwrap(), time.trim().parse().unwrap())
}

#[test]
fn curl_uploads_with_expect_and_chunked_are_answered_at_once() {
    let d = Daemon::builder()
        .env("REVERB_MAX_REQUEST_SIZE", "100000")
        .start();
    let mut c = d.client();
    c.subscribe("sports.football");
    let dir = std::env::temp_dir().join(format!("bts-guru-curl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, chunked) in [false, true].into_iter().enumerate() {
        let body = event("sports.football", &format!("curl {i} {}", "c".repeat(2000)));
        assert!(body.len() > 2048);
        let file = dir.join(format!("body{i}.json"));
        std::fs::write(&file, &body).unwrap();
        let url = format!("http://{}{}", d.addr, signed("events", body.as_bytes()));
        let data = format!("@{}", file.display());
        // curl 7.x sent `Expect: 100-continue` by itself for bodies over 1 KiB, curl 8 only over
        // 1 MiB: ask for it, so both wait for our 100 (up to 1 s) before sending the body.
        let mut args = vec![
            "-H",
            "Content-Type: application/json",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &data,
        ];
        if chunked {
            args.extend(["-H", "Transfer-Encoding: chunked"]);
        }
        args.push(&url);
        let (log, code, took) = curl(&args);
        assert_eq!(code, 200, "{log}");
        assert!(log.contains("> Expect: 100-continue"), "{log}");
        assert!(log.contains("< HTTP/1.1 100 Continue"), "{log}");
        if chunked {
            assert!(log.contains("> Transfer-Encoding: chunked"), "{log}");
        }
        // A server that never answered the expectation shows as curl's own 1 s wait.
        assert!(took < 0.9, "curl took {took} s\n{log}");
        let ev = c.next_event(T);
        assert_eq!(
            ev["data"],
            format!("curl {i} {}", "c".repeat(2000)),
            "chunked: {chunked}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn node_http_sends_chunked_bodies_that_are_accepted() {
    let d = Daemon::start(2);
    let mut c = d.client();
    c.subscribe("sports.football");
    let summary = run_compat_script(&d, "http_chunked.mjs", Duration::from_secs(40));
    assert_eq!(summary["publish"], 200, "{summary}");
    assert_eq!(summary["batch"], 200, "{summary}");
    assert_eq!(summary["bad_signature"], 401, "{summary}");
    let mut got: Vec<String> = (0..3)
        .map(|_| c.next_event(T)["data"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    assert_eq!(got, ["node batch 1", "node batch 2", "node chunked"]);
    c.expect_silence(Duration::from_millis(300));
}
