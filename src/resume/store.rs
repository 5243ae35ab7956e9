//! Positioned channels across a cluster: the order and the history live in Redis, so every
//! node gives an event the same position and any node can replay it. Every Redis call of this
//! feature is built here (a function per command taking the connection); the callers run them
//! on connections from `redis_conn` (`Keyed`: the channel's keys' primary, which follows a
//! Sentinel failover and, on a Redis Cluster, is the primary of the keys' slot).
//!
//! Per positioned channel, two keys with one hash tag (one Redis Cluster slot):
//! - `bts:resume:{<app>:<channel>}:m`, a hash: `e`, the epoch (16 hex digits, set by the first
//!   append; a Redis that lost the key starts a new one), and `n`, the last offset;
//! - `bts:resume:{<app>:<channel>}:s`, a stream of the channel's last events (`o` offset, `j`
//!   the event JSON without its position, `x` the excluded socket id, `k` cache), trimmed to
//!   about `resume_history_events` entries.
//!
//! [`APPEND`] is one script: optionally claim an idempotency key (`SET NX EX`), take the next
//! offset, `XADD` with `MAXLEN ~`, and `PUBLISH` the positioned event on the cluster's resume
//! channel (`<cluster channel>:resume`). Redis runs a script atomically, so the offsets and
//! the announcements are in one order, which every node (the appending one too) delivers in.

use crate::resume::Position;

/// The append script. KEYS: meta, stream, idempotency key (empty: none). ARGV: event JSON,
/// max stream length, epoch candidate (hex), resume pub/sub channel, app id, channel, except
/// socket id (empty: none), cache (`0`/`1`), idempotency key lifetime in seconds, the
/// replication id of the node it runs on (empty: not checked).
///
/// The epoch changes (and the stream is emptied) when the channel has none, or when its
/// history was written by another replication history than the node's (`r`): a replica
/// promoted by a failover, or a server restarted without its replication state, may have lost
/// the last appends (Redis replicates and persists asynchronously), so the offsets after what
/// it kept may already have been given to events the nodes delivered. A new epoch makes those
/// offsets unambiguous: resuming clients of the old one are told `recovered: false`.
pub const APPEND: &str = r#"
if KEYS[3] ~= '' then
  if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[9])) then
    return false
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if (not epoch) or (ARGV[10] ~= '' and redis.call('HGET', KEYS[1], 'r') ~= ARGV[10]) then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[1], 'e', epoch, 'r', ARGV[10])
  redis.call('DEL', KEYS[2])
end
local off = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'o', off, 'j', ARGV[1], 'x', ARGV[7], 'k', ARGV[8])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. '\31' .. ARGV[6] .. '\31' .. epoch .. '\31' .. off .. '\31' .. ARGV[7] .. '\31' .. ARGV[8] .. '\31' .. ARGV[1])
return {epoch, off}
"#;

/// How long an idempotency key lives, seconds (a Laravel event's, offered by every node; an
/// HTTP or client event's, sent again after a lost connection).
pub const DEDUPE_SECS: u64 = 120;

/// Key prefix of this feature's keys.
const PREFIX: &str = "bts:resume:";

/// The keys of a channel: (meta hash, stream).
pub fn keys(app_id: &str, channel: &str) -> (String, String) {
    let tag = format!("{PREFIX}{{{app_id}:{channel}}}");
    (format!("{tag}:m"), format!("{tag}:s"))
}

/// The idempotency key of an offered Laravel event.
pub fn dedupe_key(app_id: &str, channel: &str, id: &str) -> String {
    format!("{PREFIX}{{{app_id}:{channel}}}:d:{id}")
}

/// The pub/sub channel positioned events are announced on.
pub fn announce_channel(cluster_channel: &str) -> String {
    format!("{cluster_channel}:resume")
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    pub app_id: String,
    pub channel: String,
    /// The Pusher event JSON, without a position.
    pub json: String,
    pub except: Option<String>,
    pub cache: bool,
    /// For events every node offers (Laravel's): the same id on every node, so one appends.
    pub dedupe: Option<String>,
}

/// The [`APPEND`] command for `a`, run on a node whose replication id is `replid`.
pub fn append_cmd(
    a: &Append,
    max_len: usize,
    epoch_candidate: u64,
    announce: &str,
    replid: &str,
) -> redis::Cmd {
    let (meta, stream) = keys(&a.app_id, &a.channel);
    let dedupe = a
        .dedupe
        .as_deref()
        .map(|id| dedupe_key(&a.app_id, &a.channel, id))
        .unwrap_or_default();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(APPEND)
        .arg(3)
        .arg(meta)
        .arg(stream)
        .arg(dedupe)
        .arg(&a.json)
        .arg(max_len)
        .arg(format!("{epoch_candidate:016x}"))
        .arg(announce)
        .arg(&a.app_id)
        .arg(&a.channel)
        .arg(a.except.as_deref().unwrap_or(""))
        .arg(if a.cache { "1" } else { "0" })
        .arg(DEDUPE_SECS)
        .arg(replid);
    cmd
}

/// What [`APPEND`] answered: the position the event got, or `None` when it was appended
/// before (its idempotency key was taken: by another node, or by an earlier try).
pub fn appended(v: &redis::Value) -> Option<Position> {
    let (e, o): (String, u64) = redis::from_redis_value(v.clone()).ok()?;
    Some(Position {
        epoch: u64::from_str_radix(&e, 16).ok()?,
        offset: o,
    })
}

/// A positioned event as announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced<'a> {
    pub app_id: &'a str,
    pub channel: &'a str,
    pub position: Position,
    pub except: Option<&'a str>,
    pub cache: bool,
    pub json: &'a str,
}

/// Parses an announcement (`app␟channel␟epoch␟offset␟except␟cache␟json`).
pub fn decode(payload: &[u8]) -> Option<Announced<'_>> {
    let s = std::str::from_utf8(payload).ok()?;
    let mut it = s.splitn(7, '\u{1f}');
    let app_id = it.next()?;
    let channel = it.next()?;
    let epoch = u64::from_str_radix(it.next()?, 16).ok()?;
    let offset = it.next()?.parse().ok()?;
    let except = Some(it.next()?).filter(|x| !x.is_empty());
    let cache = it.next()? == "1";
    let json = it.next()?;
    Some(Announced {
        app_id,
        channel,
        position: Position { epoch, offset },
        except,
        cache,
        json,
    })
}

/// One kept event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub offset: u64,
    /// The event JSON, without its position.
    pub json: String,
    /// The excluded socket id.
    pub except: Option<String>,
    pub cache: bool,
}

/// A channel's history as Redis keeps it: its epoch and its last events, oldest first. `None`
/// when Redis has none.
pub fn history(
    conn: &mut redis::Connection,
    app_id: &str,
    channel: &str,
) -> redis::RedisResult<Option<(u64, Vec<Kept>)>> {
    let (meta, stream) = keys(app_id, channel);
    let epoch: Option<String> = redis::cmd("HGET").arg(&meta).arg("e").query(conn)?;
    let Some(epoch) = epoch.and_then(|e| u64::from_str_radix(&e, 16).ok()) else {
        return Ok(None);
    };
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query(conn)?;
    let mut kept = Vec::with_capacity(entries.len());
    for (_, fields) in entries {
        let mut off = None;
        let mut json = None;
        let mut except = None;
        let mut cache = false;
        for (k, v) in fields {
            match k.as_str() {
                "o" => off = v.parse().ok(),
                "j" => json = Some(v),
                "x" => except = Some(v).filter(|x| !x.is_empty()),
                "k" => cache = v == "1",
                _ => {}
            }
        }
        if let (Some(offset), Some(json)) = (off, json) {
            kept.push(Kept {
                offset,
                json,
                except,
                cache,
            });
        }
    }
    Ok(Some((epoch, kept)))
}

/// Every positioned channel Redis has a history of: (app id, channel).
pub fn channels(conn: &mut redis::Connection) -> redis::RedisResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{PREFIX}{{*}}:m"))
            .arg("COUNT")
            .arg(1000)
            .query(conn)?;
        for k in keys {
            let inner = k
                .strip_prefix(PREFIX)
                .and_then(|k| k.strip_prefix('{'))
                .and_then(|k| k.strip_suffix("}:m"));
            if let Some((app, channel)) = inner.and_then(|i| i.rsplit_once(':')) {
                out.push((app.to_owned(), channel.to_owned()));
            }
        }
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip_the_script_format() {
        let raw = "app-1\u{1f}sports.a\u{1f}00000000000000ff\u{1f}42\u{1f}\u{1f}0\u{1f}{\"event\":\"e\",\"data\":\"a\u{1f}b\"}";
        let a = decode(raw.as_bytes()).unwrap();
        assert_eq!(
            a,
            Announced {
                app_id: "app-1",
                channel: "sports.a",
                position: Position {
                    epoch: 255,
                    offset: 42
                },
                except: None,
                cache: false,
                json: "{\"event\":\"e\",\"data\":\"a\u{1f}b\"}",
            }
        );
        assert_eq!(decode(b"a\x1fb\x1fzz\x1f1\x1f\x1f0\x1f{}"), None);
        assert_eq!(keys("1", "sports.a").0, "bts:resume:{1:sports.a}:m");
    }
}
