//! Where the events go: the daemon's Pusher HTTP API (signed like the official SDKs, one
//! keep-alive HTTP/1.1 connection on a std `TcpStream`), or Redis in the format Laravel's
//! `redis` broadcaster publishes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};

use super::feed::Publish;
use crate::protocol::auth;

/// Largest number of channels one Pusher event may name.
pub const MAX_CHANNELS: usize = 100;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub trait Sink {
    fn send(&mut self, p: &Publish) -> anyhow::Result<()>;
}

/// The Pusher HTTP API: `POST /apps/{id}/events` with `{"name","channels","data"}`.
pub struct HttpSink {
    host: String,
    port: u16,
    app_id: String,
    key: String,
    secret: String,
    conn: Option<BufReader<TcpStream>>,
}

impl HttpSink {
    /// Connects now, so that an unreachable daemon fails the run before anything else.
    pub fn connect(
        host: &str,
        port: u16,
        app_id: &str,
        key: &str,
        secret: &str,
    ) -> anyhow::Result<HttpSink> {
        let mut sink = HttpSink {
            host: host.to_owned(),
            port,
            app_id: app_id.to_owned(),
            key: key.to_owned(),
            secret: secret.to_owned(),
            conn: None,
        };
        sink.conn = Some(sink.open()?);
        Ok(sink)
    }

    fn open(&self) -> anyhow::Result<BufReader<TcpStream>> {
        let target = format!("{}:{}", self.host, self.port);
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {target}"))?
            .collect();
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    return Ok(BufReader::new(s));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => anyhow!(
                "cannot reach the daemon's HTTP API at {target}: {e} (is `bts-guru` running \
                 there? see --host/--port)"
            ),
            None => anyhow!("{target} resolves to no address"),
        })
    }

    /// The request for one event, signed as the Pusher SDKs sign it.
    pub fn request(&self, p: &Publish, unix_secs: u64) -> Vec<u8> {
        let body = serde_json::json!({
            "name": p.event(),
            "channels": p.channels,
            "data": p.payload.to_json(),
        })
        .to_string();
        let path = format!("/apps/{}/events", self.app_id);
        let query = auth::sign_api_request(
            &self.key,
            &self.secret,
            "POST",
            &path,
            &[],
            body.as_bytes(),
            unix_secs,
        );
        let mut req = format!(
            "POST {path}?{query} HTTP/1.1\r\nHost: {}:{}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             User-Agent: bts-guru-simulate\r\n\r\n",
            self.host,
            self.port,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body.as_bytes());
        req
    }

    /// Sends on the open connection and reads the answer: (status, body, server closes).
    fn exchange(
        conn: &mut BufReader<TcpStream>,
        req: &[u8],
    ) -> std::io::Result<(u16, String, bool)> {
        conn.get_mut().write_all(req)?;
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not an HTTP response: {:?}", line.trim_end()),
                )
            })?;
        let mut len = 0usize;
        let mut close = line.starts_with("HTTP/1.0");
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    len = value.parse().map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "bad Content-Length")
                    })?;
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                }
            }
        }
        let mut body = vec![0; len];
        conn.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned(), close))
    }
}

impl Sink for HttpSink {
    fn send(&mut self, p: &Publish) -> anyhow::Result<()> {
        if p.channels.len() > MAX_CHANNELS {
            bail!("an event may name at most {MAX_CHANNELS} channels");
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let req = self.request(p, now);
        // A kept-alive connection may have been closed by the server meanwhile: one retry on a
        // fresh connection.
        let fresh = self.conn.is_none();
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => self.open()?,
        };
        let answer = match HttpSink::exchange(&mut conn, &req) {
            Ok(a) => a,
            Err(_) if !fresh => {
                conn = self.open()?;
                HttpSink::exchange(&mut conn, &req)
                    .with_context(|| format!("publishing to {}:{} failed", self.host, self.port))?
            }
            Err(e) => {
                return Err(anyhow!(e))
                    .with_context(|| format!("publishing to {}:{} failed", self.host, self.port))
            }
        };
        let (status, body, close) = answer;
        if !close {
            self.conn = Some(conn);
        }
        if !(200..300).contains(&status) {
            let hint = match status {
                401 | 403 => {
                    " (check that REVERB_APP_ID, REVERB_APP_KEY and REVERB_APP_SECRET, or \
                     --app-id/--app-key/--app-secret, match the daemon's app)"
                }
                404 => " (no such app on the daemon: check REVERB_APP_ID / --app-id)",
                413 => " (event too large for the daemon's REVERB_MAX_REQUEST_SIZE)",
                _ => "",
            };
            bail!(
                "the daemon at {}:{} answered {status} to {}: {}{hint}",
                self.host,
                self.port,
                p.event(),
                body.trim()
            );
        }
        Ok(())
    }
}

/// Laravel's `RedisBroadcaster`: one EVAL publishing `{"event","data","socket"}` to every
/// (prefixed) channel.
pub struct RedisSink {
    conn: redis::Connection,
    prefix: String,
    url: String,
}

/// The script Laravel's `RedisBroadcaster::broadcast` runs.
pub const LARAVEL_SCRIPT: &str =
    "for i = 2, #ARGV do\n  redis.call('publish', ARGV[i], ARGV[1])\nend";

impl RedisSink {
    pub fn connect(url: &str, prefix: &str) -> anyhow::Result<RedisSink> {
        let shown = redact(url);
        // The redis crate's errors repeat their source in their text: show them alone.
        let client = redis::Client::open(url).map_err(|e| anyhow!("bad Redis URL {shown}: {e}"))?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(3))
            .map_err(|e| anyhow!("cannot reach Redis at {shown}: {e}"))?;
        let _: () = redis::cmd("PING")
            .query(&mut conn)
            .map_err(|e| anyhow!("Redis at {shown} does not answer PING: {e}"))?;
        Ok(RedisSink {
            conn,
            prefix: prefix.to_owned(),
            url: shown,
        })
    }

    /// Laravel's payload: `{"event":E,"data":{...},"socket":null}`.
    pub fn payload(p: &Publish) -> String {
        serde_json::json!({"event": p.event(), "data": &p.payload, "socket": null}).to_string()
    }
}

impl Sink for RedisSink {
    fn send(&mut self, p: &Publish) -> anyhow::Result<()> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LARAVEL_SCRIPT).arg(0).arg(RedisSink::payload(p));
        for ch in &p.channels {
            cmd.arg(format!("{}{ch}", self.prefix));
        }
        let _: () = cmd
            .query(&mut self.conn)
            .map_err(|e| anyhow!("publishing to Redis at {} failed: {e}", self.url))?;
        Ok(())
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::payload::{MatchStatus, Payload};
    use super::*;

    fn publish() -> Publish {
        Publish {
            channels: vec![
                "sports.football.leagues.premier-league".into(),
                "sports.football.leagues.premier-league.matches.12345".into(),
            ],
            payload: Payload::Status(MatchStatus {
                match_id: 12345,
                previous_status: "scheduled",
                new_status: "live",
                timestamp: "2025-05-14T01:00:00Z".into(),
            }),
        }
    }

    #[test]
    fn request_is_signed_like_the_sdks() {
        let sink = HttpSink {
            host: "127.0.0.1".into(),
            port: 8080,
            app_id: "123".into(),
            key: "k".into(),
            secret: "s".into(),
            conn: None,
        };
        let req = String::from_utf8(sink.request(&publish(), 1_700_000_000)).unwrap();
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["name"], "match.status");
        assert_eq!(v["channels"].as_array().unwrap().len(), 2);
        let data: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["new_status"], "live");
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        let target = head.lines().next().unwrap().split(' ').nth(1).unwrap();
        let (path, query) = target.split_once('?').unwrap();
        assert_eq!(path, "/apps/123/events");
        let md5 = auth::body_md5(body.as_bytes());
        let signed =
            format!("auth_key=k&auth_timestamp=1700000000&auth_version=1.0&body_md5={md5}");
        let expect = format!(
            "{signed}&auth_signature={}",
            auth::sign("s", format!("POST\n/apps/123/events\n{signed}").as_bytes())
        );
        assert_eq!(query, expect);
    }

    #[test]
    fn redis_payload_is_laravels() {
        let v: serde_json::Value = serde_json::from_str(&RedisSink::payload(&publish())).unwrap();
        assert_eq!(v["event"], "match.status");
        assert_eq!(v["data"]["match_id"], 12345);
        assert!(v["socket"].is_null());
        assert_eq!(v.as_object().unwrap().len(), 3);
    }

    #[test]
    fn redis_urls_are_redacted() {
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("redis://u:pw@h"), "redis://u:***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
