//! Graceful drain and zero-downtime restart: SIGTERM closes clients with 4200 spread over the
//! window while a new process on the same port takes the new connections; a second signal exits
//! at once.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn sigterm_drains_with_4200_spread_while_a_new_process_takes_over_the_port() {
    let old = Daemon::builder()
        .arg("--drain-secs")
        .arg("2")
        .shards(2)
        .start();
    let port = old.addr.port();
    let mut clients: Vec<Client> = (0..40).map(|_| old.client()).collect();
    for c in &mut clients {
        c.subscribe("sports.football");
    }
    // The new process binds the same port beside the old one (SO_REUSEPORT).
    let new = Daemon::builder().port(port).shards(2).start();
    assert_eq!(new.addr.port(), port);
    let (s, ready) = http(old.addr, "GET", "/ready", b"");
    assert_eq!((s, ready.as_str()), (200, r#"{"ready":true}"#));

    let mut old = old;
    let started = Instant::now();
    old.signal("TERM");
    // Every old client is closed with 4200 (reconnect at once), the closes spread over ~2 s.
    let mut closed_at = Vec::new();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let (close, err) = c.expect_close(Duration::from_secs(10));
                (close, err, Instant::now())
            })
        })
        .collect();
    for r in readers {
        let (close, err, at) = r.join().unwrap();
        assert_eq!((close, err), (Some(4200), Some(4200)));
        closed_at.push(at.duration_since(started));
    }
    closed_at.sort();
    let spread = closed_at[closed_at.len() - 1] - closed_at[0];
    assert!(
        spread >= Duration::from_millis(1500),
        "closes not spread: {closed_at:?}"
    );
    assert!(
        closed_at[closed_at.len() - 1] <= Duration::from_secs(8),
        "{closed_at:?}"
    );
    // Reconnecting clients land on the new process, which serves them.
    let mut again: Vec<Client> = (0..10).map(|_| new.client()).collect();
    for c in &mut again {
        c.subscribe("sports.football");
    }
    assert_eq!(new.api().trigger(&["sports.football"], "e", "{}").0, 200);
    for c in &mut again {
        assert_eq!(c.next_event(Duration::from_secs(5))["event"], "e");
    }
    // The old process exits 0 on its own.
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(Some(0)));
}

#[test]
fn readiness_turns_false_while_draining_and_a_second_signal_exits_at_once() {
    let mut d = Daemon::builder().arg("--drain-secs").arg("30").start();
    let mut c = d.client();
    c.subscribe("sports.football");
    // A fresh connection is refused once listeners close, so read readiness over a keep-alive
    // connection the daemon has already accepted and answered before the signal (a connection
    // still in the listen queue when the listener closes is reset by the kernel).
    use std::io::{BufRead, BufReader, Read, Write};
    let mut probe = std::net::TcpStream::connect(d.addr).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    probe
        .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(probe.try_clone().unwrap());
    let mut length = 0usize;
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    d.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    probe
        .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    reader.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(
        resp.ends_with(r#"{"ready":false,"draining":true}"#),
        "{resp}"
    );
    let t = Instant::now();
    d.signal("TERM");
    let code = d
        .wait_exit(Duration::from_secs(3))
        .expect("did not exit at once");
    assert_eq!(code, Some(1));
    assert!(t.elapsed() < Duration::from_secs(2));
}
