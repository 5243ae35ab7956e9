//! Test harness: starts the real `bts-guru` binary on an ephemeral loopback port and talks to it
//! over real sockets: a WebSocket client (tungstenite's sync client) and a signed HTTP API client.
#![allow(dead_code)]

pub mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use serde_json::Value;
use sha2::Sha256;
use tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
use tungstenite::{Message, WebSocket};

pub const APP_ID: &str = "test-app";
pub const APP_KEY: &str = "test-key";
pub const APP_SECRET: &str = "test-secret";

/// A running daemon; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    /// Its working directory (holds `config.toml` when `server_toml` was given).
    pub dir: std::path::PathBuf,
    stderr_path: std::path::PathBuf,
    /// Everything the daemon printed on stdout, the `ready` line included.
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
}

pub struct DaemonBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    toml: Option<String>,
    program: Option<std::path::PathBuf>,
    nofile: Option<u64>,
}

impl DaemonBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.to_owned(), v.into()));
        self
    }
    /// Extra TOML appended to the `[server]` table of the generated config file.
    pub fn server_toml(mut self, t: &str) -> Self {
        self.toml = Some(t.to_owned());
        self
    }
    /// Listen on this address instead of 127.0.0.1 (the harness's credentials are not the
    /// development ones, so any address may be bound).
    pub fn host(mut self, host: &str) -> Self {
        self.args[1] = host.to_owned();
        self
    }
    /// Listen on this port instead of a free one (to start a second process beside a first).
    pub fn port(mut self, port: u16) -> Self {
        self.args[3] = port.to_string();
        self
    }
    /// Serve /metrics on this port.
    pub fn metrics_port(mut self, port: u16) -> Self {
        self.args[5] = port.to_string();
        self
    }
    pub fn shards(self, n: usize) -> Self {
        self.arg("--shards").arg(n.to_string())
    }
    /// No REVERB_APP_* in the daemon's environment (the app then comes from a file).
    pub fn without_app_env(mut self) -> Self {
        self.env.retain(|(k, _)| !k.starts_with("REVERB_APP_"));
        self
    }
    /// Run this binary instead of the one cargo built (to measure an older build the same way).
    pub fn program(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }
    /// Start the daemon with this open-files limit, soft and hard (through `sh -c 'ulimit -n'`,
    /// which may only lower the hard limit), so a test sees the same limit on every machine.
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }
    pub fn start(self) -> Daemon {
        Daemon::spawn(self)
    }
    /// Serve TLS with `cert` (`BTS_TLS_CERT`, `BTS_TLS_KEY`).
    pub fn tls(self, cert: &Cert) -> Self {
        self.env("BTS_TLS_CERT", cert.cert_path.to_string_lossy())
            .env("BTS_TLS_KEY", cert.key_path.to_string_lossy())
    }
    /// Start on `port`, or on a free port when `port` is 0 (a first process, then a second one
    /// beside it on the first one's port).
    pub fn start_on(self, port: u16) -> Daemon {
        if port == 0 {
            self.start()
        } else {
            self.port(port).start()
        }
    }
}

pub fn scratch_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bts-guru-test-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Daemon {
    /// A daemon with the test app (REVERB_APP_* env), 1 shard, on 127.0.0.1:0.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            args: vec![
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                "0".into(),
                "--metrics-port".into(),
                "0".into(),
            ],
            env: vec![
                ("REVERB_APP_ID".into(), APP_ID.into()),
                ("REVERB_APP_KEY".into(), APP_KEY.into()),
                ("REVERB_APP_SECRET".into(), APP_SECRET.into()),
            ],
            toml: None,
            program: None,
            nofile: None,
        }
    }

    pub fn start(shards: usize) -> Daemon {
        Daemon::builder().shards(shards).start()
    }

    fn spawn(b: DaemonBuilder) -> Daemon {
        let dir = scratch_dir();
        let mut args = b.args.clone();
        if let Some(t) = &b.toml {
            let path = dir.join("config.toml");
            std::fs::write(&path, format!("[server]\n{t}\n")).unwrap();
            args.push("--config".into());
            args.push(path.to_string_lossy().into_owned());
        }
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        // `program`, else BTS_TEST_BIN, runs another build (RELIABILITY.md's before/after figures).
        let program = b.program.clone().unwrap_or_else(|| {
            std::env::var_os("BTS_TEST_BIN")
                .map_or_else(|| env!("CARGO_BIN_EXE_bts-guru").into(), Into::into)
        });
        let mut cmd = match b.nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(&args)
            .current_dir(&dir)
            .env_remove("REVERB_SERVER_HOST")
            .env_remove("REVERB_SERVER_PORT")
            .env_remove("REDIS_URL")
            .env_remove("REDIS_HOST")
            .env_remove("REDIS_PREFIX")
            .env_remove("BTS_CONSOLE")
            .env_remove("BTS_CONSOLE_TOKEN")
            .env("BTS_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in &b.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn bts-guru");
        // The daemon prints exactly one line on stdout, `ready <addr>`, once every shard accepts.
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // Keep reading stdout, so anything printed later is seen (and never hits a closed pipe).
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(line.clone()));
        let sink = std::sync::Arc::clone(&stdout);
        std::thread::spawn(move || {
            let mut rest = String::new();
            while out.read_line(&mut rest).unwrap_or(0) > 0 {
                sink.lock().unwrap().push_str(&rest);
                rest.clear();
            }
        });
        let Some(addr) = line.trim().strip_prefix("ready ") else {
            let _ = child.wait();
            panic!(
                "daemon did not print `ready <addr>`; stdout {line:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        Daemon {
            addr: addr.parse().unwrap(),
            child,
            dir,
            stderr_path,
            stdout,
        }
    }

    /// Sends a signal (e.g. "TERM") to the daemon.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits up to `timeout` for the daemon to exit; its exit code (None: still running, or
    /// killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Resident set size of the daemon, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr, APP_KEY)
    }

    pub fn api(&self) -> Api {
        Api {
            addr: self.addr,
            app_id: APP_ID.into(),
            key: APP_KEY.into(),
            secret: APP_SECRET.into(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Keep a failing test's logs (bts-guru-test-<pid>-<nanos> in the temp directory) to look
        // at; clean up after a passing one, so test runs do not fill the temp directory.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A Pusher WebSocket client over a plain TcpStream.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub socket_id: String,
}

/// What the server sent, decoded.
#[derive(Debug)]
pub enum Got {
    Event(Value),
    Closed(Option<u16>),
    Timeout,
}

pub fn ws_connect(addr: SocketAddr, path: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let url = format!("ws://{addr}{path}");
    let (ws, resp) = tungstenite::client::client(url.as_str(), stream).expect("ws handshake");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

impl Client {
    pub fn connect(addr: SocketAddr, key: &str) -> Client {
        let ws = ws_connect(
            addr,
            &format!("/app/{key}?protocol=7&client=rust&version=0.1"),
        );
        Client::established(ws)
    }

    /// A client on an upgraded WebSocket: reads `pusher:connection_established` and keeps the
    /// socket id it names.
    pub fn established(ws: WebSocket<TcpStream>) -> Client {
        let mut c = Client {
            ws,
            socket_id: String::new(),
        };
        let ev = c.expect_event("pusher:connection_established");
        let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
        c.socket_id = data["socket_id"].as_str().unwrap().to_owned();
        assert!(data["activity_timeout"].as_u64().unwrap() > 0);
        c
    }

    pub fn set_timeout(&mut self, d: Duration) {
        self.ws.get_ref().set_read_timeout(Some(d)).unwrap();
    }

    pub fn send_json(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    pub fn subscribe(&mut self, channel: &str) {
        self.send_json(serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel}}));
        let ev = self.expect_event("pusher_internal:subscription_succeeded");
        assert_eq!(ev["channel"], channel);
    }

    /// Next server message (answering nothing itself), within `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Got {
        self.set_timeout(timeout);
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Got::Event(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(f)) => return Got::Closed(f.map(|f| u16::from(f.code))),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Got::Timeout
                }
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => return Got::Closed(None),
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    pub fn next_event(&mut self, timeout: Duration) -> Value {
        match self.next(timeout) {
            Got::Event(v) => v,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Reads until an event named `name` (skipping none): panics on anything else.
    pub fn expect_event(&mut self, name: &str) -> Value {
        let ev = self.next_event(Duration::from_secs(5));
        assert_eq!(ev["event"], name, "unexpected message {ev}");
        ev
    }

    /// Asserts nothing arrives within `d`.
    pub fn expect_silence(&mut self, d: Duration) {
        match self.next(d) {
            Got::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Reads until the server closes; returns the close code, and the pusher:error code if one
    /// came just before.
    pub fn expect_close(&mut self, timeout: Duration) -> (Option<u16>, Option<u64>) {
        let deadline = Instant::now() + timeout;
        let mut err_code = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "server did not close in {timeout:?}");
            match self.next(left) {
                Got::Event(v) if v["event"] == "pusher:error" => {
                    err_code = v["data"]["code"].as_u64()
                }
                Got::Event(_) => {}
                Got::Closed(code) => return (code, err_code),
                Got::Timeout => {}
            }
        }
    }

    /// Subscribes to a private (or encrypted) channel with a valid signature for this socket.
    pub fn subscribe_private(&mut self, channel: &str) {
        let auth = format!(
            "{APP_KEY}:{}",
            hmac_hex(APP_SECRET, &format!("{}:{channel}", self.socket_id))
        );
        self.send_json(
            serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth}}),
        );
        let ev = self.expect_event("pusher_internal:subscription_succeeded");
        assert_eq!(ev["channel"], channel);
    }

    /// Sends a presence subscribe signed for this socket; returns nothing (the caller reads).
    pub fn send_presence_subscribe(&mut self, channel: &str, user_id: &str, info: Value) {
        let data = serde_json::json!({"user_id": user_id, "user_info": info}).to_string();
        let auth = format!(
            "{APP_KEY}:{}",
            hmac_hex(APP_SECRET, &format!("{}:{channel}:{data}", self.socket_id))
        );
        self.send_json(serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth,"channel_data":data}}));
    }

    /// Joins a presence channel; returns the `presence` object of subscription_succeeded.
    pub fn join(&mut self, channel: &str, user_id: &str, info: Value) -> Value {
        self.send_presence_subscribe(channel, user_id, info);
        let ev = self.expect_event("pusher_internal:subscription_succeeded");
        assert_eq!(ev["channel"], channel);
        let data: Value = serde_json::from_str(ev["data"].as_str().unwrap()).unwrap();
        data["presence"].clone()
    }

    /// The shard this connection landed on (socket ids encode it: lo = n * shards + shard + 1).
    pub fn shard(&self, shards: u64) -> u64 {
        (self
            .socket_id
            .split_once('.')
            .unwrap()
            .1
            .parse::<u64>()
            .unwrap()
            - 1)
            % shards
    }

    /// Reads until the connection ends: `Some(code)` for a close frame, `None` for a reset or
    /// EOF without one.
    pub fn next_close_or_reset(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        self.set_timeout(Duration::from_millis(200));
        loop {
            assert!(
                Instant::now() < deadline,
                "connection did not end in {timeout:?}"
            );
            match self.ws.read() {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn close(mut self) {
        let _ = self.ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }));
        let _ = self.ws.flush();
    }
}

/// A Pusher HTTP API client that signs like the official SDKs.
pub struct Api {
    pub addr: SocketAddr,
    pub app_id: String,
    pub key: String,
    pub secret: String,
}

pub fn hmac_hex(secret: &str, msg: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(msg.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// `path?query&auth_signature=…` of `POST /apps/{app_id}/{endpoint}` with `body` at time `ts`,
/// signed as the Pusher SDKs sign it (this harness's own signer, independent of the daemon's).
pub fn signed_post(
    app_id: &str,
    key: &str,
    secret: &str,
    endpoint: &str,
    body: &[u8],
    ts: u64,
) -> String {
    let path = format!("/apps/{app_id}/{endpoint}");
    let md5 = hex::encode(Md5::digest(body));
    let query = format!("auth_key={key}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}");
    let sig = hmac_hex(secret, &format!("POST\n{path}\n{query}"));
    format!("{path}?{query}&auth_signature={sig}")
}

/// `signed_post` for the test app, now.
pub fn signed_events(body: &[u8]) -> String {
    signed_post(APP_ID, APP_KEY, APP_SECRET, "events", body, now_secs())
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Api {
    /// Signs and sends `POST path` with `body`; returns (status, body).
    pub fn post(&self, endpoint: &str, body: &str) -> (u16, Value) {
        self.post_at(endpoint, body, now_secs(), &self.secret.clone())
    }

    /// Like `post`, with a chosen timestamp and signing secret.
    pub fn post_at(&self, endpoint: &str, body: &str, ts: u64, secret: &str) -> (u16, Value) {
        let target = signed_post(
            &self.app_id,
            &self.key,
            secret,
            endpoint,
            body.as_bytes(),
            ts,
        );
        let (status, text) = http(self.addr, "POST", &target, body.as_bytes());
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Signed `GET /apps/{id}/{endpoint}` with extra query parameters (already URL-safe).
    pub fn get(&self, endpoint: &str, params: &[(&str, &str)]) -> (u16, Value) {
        let path = format!("/apps/{}/{endpoint}", self.app_id);
        let mut all: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.push(("auth_key".into(), self.key.clone()));
        all.push(("auth_timestamp".into(), now_secs().to_string()));
        all.push(("auth_version".into(), "1.0".into()));
        all.sort();
        let query: Vec<String> = all.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let query = query.join("&");
        let sig = hmac_hex(&self.secret, &format!("GET\n{path}\n{query}"));
        let (status, text) = http(
            self.addr,
            "GET",
            &format!("{path}?{query}&auth_signature={sig}"),
            b"",
        );
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn trigger(&self, channels: &[&str], event: &str, data: &str) -> (u16, Value) {
        let body = serde_json::json!({"name": event, "channels": channels, "data": data});
        self.post("events", &body.to_string())
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn http(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    http_over(&mut s, &addr.to_string(), method, target, body)
}

/// One HTTP/1.1 request with `Connection: close` over an open stream (plain or TLS); returns
/// (status, body).
pub fn http_over<S: Read + Write>(
    s: &mut S,
    host: &str,
    method: &str,
    target: &str,
    body: &[u8],
) -> (u16, String) {
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s.flush().unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A masked client frame built by hand, for sending what a well-behaved client never would.
pub fn raw_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    if masked {
        out.extend_from_slice(&mask);
    }
    let start = out.len();
    out.extend_from_slice(payload);
    if masked {
        for (i, b) in out[start..].iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    out
}

/// A throwaway redis-server on a free loopback port, without persistence; killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: std::path::PathBuf,
    /// `requirepass`, when the server needs one.
    password: Option<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    /// Starts on a chosen port (to restart a server on the port clients know).
    pub fn start_on(port: u16) -> RedisServer {
        Self::spawn(port, None)
    }

    /// Starts on a free port, requiring `password` (`requirepass`).
    pub fn start_with_password(password: &str) -> RedisServer {
        Self::spawn(free_port(), Some(password))
    }

    /// Starts on a free port with extra `redis-server` arguments (`--replicaof`, cluster mode).
    pub fn start_with_args(args: &[&str]) -> RedisServer {
        Self::spawn_with(free_port(), None, args)
    }

    fn spawn(port: u16, password: Option<&str>) -> RedisServer {
        Self::spawn_with(port, password, &[])
    }

    fn spawn_with(port: u16, password: Option<&str>, args: &[&str]) -> RedisServer {
        let dir = scratch_dir();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .args(args);
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed for these tests: run `bash tests/run.sh` (installs it) or `apt-get install redis-server`");
        let r = RedisServer {
            child,
            port,
            dir,
            password: password.map(str::to_owned),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis::Client::open(r.url().as_str())
            .and_then(|c| c.get_connection())
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    /// `redis://[:password@]127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url().as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Publishes like Laravel's RedisBroadcaster: one EVAL, one payload, every channel.
    pub fn laravel_broadcast(
        &self,
        prefix: &str,
        channels: &[&str],
        event: &str,
        data: Value,
        socket: Option<&str>,
    ) {
        let payload =
            serde_json::json!({"event": event, "data": data, "socket": socket}).to_string();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg("for i = 2, #ARGV do\n  redis.call('publish', ARGV[i], ARGV[1])\nend")
            .arg(0)
            .arg(payload);
        for ch in channels {
            cmd.arg(format!("{prefix}{ch}"));
        }
        let _: () = cmd.query(&mut self.conn()).unwrap();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The arguments every compat script takes first: `<ip> <port> <app id> <key> <secret>` of the
/// daemon at `addr` and the test app.
pub fn script_args(addr: SocketAddr) -> Vec<String> {
    vec![
        addr.ip().to_string(),
        addr.port().to_string(),
        APP_ID.into(),
        APP_KEY.into(),
        APP_SECRET.into(),
    ]
}

/// Runs `node tests/compat/<script> <ip> <port> <app id> <key> <secret>` against `d` and returns
/// the JSON summary line it printed; panics with node's output and the daemon's log tail when the
/// script fails, hangs past `deadline`, or the Node packages are missing.
pub fn run_compat_script(d: &Daemon, script: &str, deadline: Duration) -> Value {
    let args = script_args(d.addr);
    run_node_script(
        script,
        &args,
        &["pusher-js", "pusher", "laravel-echo"],
        deadline,
        &|| d.stderr(),
    )
}

/// Runs `node tests/compat/<script> <args>` (after checking that the `packages` it imports are
/// installed) and returns the JSON summary line it printed last, which must say `"ok": true`;
/// panics with node's output and the tail of the server's log (read by `server_log` once node is
/// done) otherwise, or when it runs past `deadline`.
pub fn run_node_script(
    script: &str,
    args: &[String],
    packages: &[&str],
    deadline: Duration,
    server_log: &dyn Fn() -> String,
) -> Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let compat = root.join("tests/compat");
    for pkg in packages {
        assert!(
            compat
                .join("node_modules")
                .join(pkg)
                .join("package.json")
                .is_file(),
            "tests/compat/node_modules/{pkg} is missing: run `npm ci --prefix tests/compat` \
             (needs node >= 20.19 and npm) before `cargo test`"
        );
    }
    let mut child = Command::new("node")
        .arg(format!("tests/compat/{script}"))
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("could not run `node` ({e}): install node >= 20.19, then `npm ci --prefix tests/compat`")
        });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    let log = server_log();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
    let report = format!(
        "--- node stdout ---\n{stdout}\n--- node stderr ---\n{stderr}\n--- daemon stderr (last 60 lines) ---\n{tail}"
    );
    let Some(status) = status else {
        panic!("{script} still running after {deadline:?}; killed\n{report}");
    };
    assert!(status.success(), "{script} failed ({status})\n{report}");
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("{script} printed no JSON summary line\n{report}"));
    assert_eq!(summary["ok"], true, "{report}");
    eprintln!("{script}: {}", stdout.trim_end());
    summary
}

/// `bts-guru demo` started with `args` after `demo` (and `global` before it) and `env`; killed
/// when dropped. The environment is hermetic: no REVERB_*, REDIS_* or BTS_* of whoever runs the
/// tests, and no `.env` (`--env-file /dev/null`).
pub struct Demo {
    pub child: Child,
    pub addr: SocketAddr,
    /// The `console <url>` line's URL.
    pub url: String,
    stderr_path: std::path::PathBuf,
}

impl Demo {
    pub fn start(global: &[&str], args: &[&str], env: &[(&str, &str)]) -> Demo {
        let (mut child, stderr_path) = Demo::spawn(global, args, env);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        let mut console = String::new();
        out.read_line(&mut ready).unwrap();
        out.read_line(&mut console).unwrap();
        let (Some(addr), Some(url)) = (
            ready.trim().strip_prefix("ready "),
            console.trim().strip_prefix("console "),
        ) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "demo did not print `ready <addr>` and `console <url>`; stdout {ready:?} {console:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        Demo {
            addr: addr.parse().unwrap(),
            url: url.to_owned(),
            child,
            stderr_path,
        }
    }

    /// Starts the demo without reading its output (for runs expected to fail).
    pub fn spawn(
        global: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (Child, std::path::PathBuf) {
        let dir = scratch_dir();
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bts-guru"));
        cmd.args(["--env-file", "/dev/null"])
            .args(global)
            .arg("demo")
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, _) in std::env::vars() {
            if ["REVERB_", "REDIS_", "BTS_", "METRICS_"]
                .iter()
                .any(|p| k.starts_with(p))
            {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        (cmd.spawn().expect("spawn bts-guru demo"), stderr_path)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The token in the console URL (as printed, percent-encoded).
    pub fn token(&self) -> &str {
        self.url.split_once("token=").map_or("", |(_, t)| t)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET with `Connection: close` and extra headers; returns (status, Content-Type, body).
pub fn http_get(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {:?}", String::from_utf8_lossy(&resp)));
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, resp[split + 4..].to_vec())
}

/// What one run of `bts-guru-bench` printed: its exit status, stdout, stderr, and the JSON line
/// it ends with (`Value::Null` when there is none).
pub struct BenchRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub json: Value,
}

impl BenchRun {
    /// What a failed assertion shows: the generator's output, and the tail of the daemon's log.
    pub fn context(&self, d: &Daemon) -> String {
        let log = d.stderr();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "stdout:\n{}\nstderr:\n{}\ndaemon stderr (tail):\n{}",
            self.stdout,
            self.stderr,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// How many JSON lines it printed (a run prints exactly one).
    pub fn json_lines(&self) -> usize {
        self.stdout.lines().filter(|l| l.starts_with('{')).count()
    }
}

/// Runs `bts-guru-bench` against `d` (its address, the test app's credentials, its pid for the
/// server's CPU and RSS; no `REVERB_APP_*` inherited) with `args` after the common ones.
pub fn run_bench(d: &Daemon, args: &[&str]) -> BenchRun {
    let out = Command::new(bench_bin())
        .args(["--host", "127.0.0.1", "--port", &d.addr.port().to_string()])
        .args(["--app-id", APP_ID, "--app-key", APP_KEY])
        .args(["--app-secret", APP_SECRET])
        .args(["--server-pid", &d.pid().to_string()])
        .args(args)
        .env_remove("REVERB_APP_ID")
        .env_remove("REVERB_APP_KEY")
        .env_remove("REVERB_APP_SECRET")
        .output()
        .expect("run bts-guru-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = stdout
        .lines()
        .rfind(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    BenchRun {
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout,
        json,
    }
}

/// The load generator, `bts-guru-bench`, beside the daemon's binary. It is its own package in the
/// workspace (benches/loadgen), so Cargo gives these tests no `CARGO_BIN_EXE_` for it: a plain
/// `cargo test --all-targets` at the root builds it (with its own tests), a run filtered to one
/// test file does not. Missing, or older than its sources, it panics naming the command.
pub fn bench_bin() -> std::path::PathBuf {
    let daemon = std::path::Path::new(env!("CARGO_BIN_EXE_bts-guru"));
    let bench = daemon.with_file_name(format!("bts-guru-bench{}", std::env::consts::EXE_SUFFIX));
    let release = if cfg!(debug_assertions) {
        ""
    } else {
        " --release"
    };
    let build = format!("cargo build -p bts-guru-bench{release}");
    let Ok(built) = std::fs::metadata(&bench).and_then(|m| m.modified()) else {
        panic!(
            "{} is missing: build it first with `{build}`",
            bench.display()
        );
    };
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/loadgen");
    if let Some(newer) = newer_file(&crate_dir, built) {
        panic!(
            "{} is older than {}: rebuild it with `{build}`",
            bench.display(),
            newer.display()
        );
    }
    bench
}

/// A file under `dir` (sources and manifests; not build output) modified after `than`.
fn newer_file(dir: &std::path::Path, than: SystemTime) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_dir() {
            if entry.file_name() != "target" {
                if let Some(p) = newer_file(&path, than) {
                    return Some(p);
                }
            }
        } else if meta.modified().is_ok_and(|m| m > than) {
            return Some(path);
        }
    }
    None
}

/// A free loopback port (bound, then released).
///
/// Picked below the kernel's ephemeral range (`ip_local_port_range`), never from it: the daemons
/// the tests start bind their WebSocket port with port 0, which the kernel takes from that range,
/// and every listener uses SO_REUSEPORT (zero-downtime restarts), so a port picked here, freed,
/// then handed by the kernel to another daemon's `--port 0` would be *shared* by the two
/// listeners and a client could reach the wrong one (a metrics listener answering 404 to a
/// WebSocket upgrade). Ports are handed out once per test process, round-robin from a start
/// that depends on the process id, and only if nothing is bound there now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // [10000, low): far from the well-known ports, below the ephemeral range.
    let (start, span) = if low > 12000 {
        (10_000, low - 10_000)
    } else {
        (1_024, low.saturating_sub(1_024).max(1))
    };
    let seed = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (start + (seed.wrapping_add(n)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET /metrics from the daemon's metrics listener on `port`.
pub fn scrape_metrics(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of one sample line (`name{labels} value`) in a scrape; 0 when absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// A self-signed certificate for localhost / 127.0.0.1, written as PEM files.
pub struct Cert {
    pub der: rustls::pki_types::CertificateDer<'static>,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
}

/// A fresh self-signed certificate for localhost / 127.0.0.1, written as `<name>.crt` and
/// `<name>.key` in `dir` (created if missing).
pub fn make_cert(dir: &std::path::Path, name: &str) -> Cert {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.key_pair.serialize_pem()).unwrap();
    Cert {
        der: ck.cert.der().clone(),
        cert_path,
        key_path,
    }
}

/// A rustls client configuration (ring) trusting exactly `cas`.
pub fn tls_client_config(
    cas: &[&rustls::pki_types::CertificateDer<'static>],
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add((*ca).clone()).unwrap();
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A TLS client for `localhost` over `sock`, trusting exactly `cas`; the handshake runs on first
/// use.
pub fn tls_client_over(
    sock: TcpStream,
    cas: &[&rustls::pki_types::CertificateDer<'static>],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls_client_config(cas), name).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Subscribes to a positioned channel, from `position` (`epoch:offset`) or without one, and
/// returns the position its `subscription_succeeded` carries.
pub fn subscribe_at(c: &mut Client, channel: &str, position: Option<&str>) -> String {
    let mut data = serde_json::json!({ "channel": channel });
    if let Some(p) = position {
        data["bts_position"] = p.into();
    }
    c.send_json(serde_json::json!({"event":"pusher:subscribe","data":data}));
    let ev = c.expect_event("pusher_internal:subscription_succeeded");
    assert_eq!(ev["channel"], channel);
    ev["bts_position"]
        .as_str()
        .expect("a positioned channel's subscription_succeeded has bts_position")
        .to_owned()
}

/// A position `epoch:offset` split into its epoch and offset.
pub fn split_position(p: &str) -> (String, u64) {
    let (e, o) = p
        .split_once(':')
        .unwrap_or_else(|| panic!("a position is epoch:offset, got {p:?}"));
    (e.to_owned(), o.parse().unwrap())
}

/// The raw text of the client's next message (5 s at most); panics on a close.
pub fn next_text(c: &mut Client) -> String {
    c.set_timeout(Duration::from_secs(5));
    loop {
        match c.ws.read().expect("read") {
            Message::Text(t) => return t.to_string(),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}
