//! Shared-context compression's memory: per (app, channel), the last compressed message's tag
//! and plain payload, the dictionary its successor's delta frame is compressed against
//! (`fanout::frame::SharedFrame::framed_with`). Touched once per compressed event (never per
//! subscriber), under one of `LOCKS` mutexes chosen by a hash of the channel.
//!
//! Bounded: at most `MAX_CHANNELS` channels are remembered (per lock, `MAX_CHANNELS / LOCKS`;
//! a new channel in a full part first drops channels idle for `IDLE`, then the least recently
//! used one), and a payload over `MAX_PAYLOAD` bytes is never kept (its successor goes
//! independent). So at most `MAX_CHANNELS * MAX_PAYLOAD` (128 MiB) plus keys, and in practice
//! the payloads of the channels that publish compressed events.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Mutexes the channels are spread over.
const LOCKS: usize = 64;
/// Channels remembered, all apps together.
pub const MAX_CHANNELS: usize = 16_384;
/// Largest payload kept as a dictionary (bytes).
pub const MAX_PAYLOAD: usize = 8 << 10;
/// A channel without a compressed event for this long is the first dropped to make room.
pub const IDLE: Duration = Duration::from_secs(60);

struct Entry {
    tag: u64,
    payload: Bytes,
    used: Instant,
}

#[derive(Default)]
struct Part {
    /// Per app slot, per channel.
    apps: HashMap<usize, HashMap<Box<str>, Entry>>,
    len: usize,
}

/// Every channel's last compressed message, and the node's tag counter.
pub struct Contexts {
    next: AtomicU64,
    locks: Box<[Mutex<Part>]>,
}

impl Default for Contexts {
    fn default() -> Self {
        Contexts {
            // 0 means "none" to connections (`Conn::last_tag`).
            next: AtomicU64::new(1),
            locks: (0..LOCKS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Contexts {
    /// A new tag, unique on this node.
    pub fn next_tag(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes (`tag`, `payload`) the channel's last compressed message; returns the one it
    /// replaces, if remembered.
    pub fn swap(
        &self,
        app: usize,
        channel: &str,
        tag: u64,
        payload: Bytes,
        now: Instant,
    ) -> Option<(u64, Bytes)> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (app, channel).hash(&mut h);
        let lock = &self.locks[h.finish() as usize % LOCKS];
        let mut part = lock.lock().unwrap_or_else(|e| e.into_inner());
        let keep = payload.len() <= MAX_PAYLOAD;
        if let Some(e) = part.apps.get_mut(&app).and_then(|m| m.get_mut(channel)) {
            let prev = (e.tag, std::mem::replace(&mut e.payload, payload));
            e.tag = tag;
            e.used = now;
            if !keep {
                part.apps.get_mut(&app).map(|m| m.remove(channel));
                part.len -= 1;
            }
            return Some(prev);
        }
        if !keep {
            return None;
        }
        if part.len >= MAX_CHANNELS / LOCKS {
            part.make_room(now);
        }
        part.apps.entry(app).or_default().insert(
            channel.into(),
            Entry {
                tag,
                payload,
                used: now,
            },
        );
        part.len += 1;
        None
    }

    /// Channels remembered (tests, metrics).
    pub fn len(&self) -> usize {
        self.locks
            .iter()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Part {
    /// Drops idle channels, or if none is, the least recently used one.
    fn make_room(&mut self, now: Instant) {
        let mut dropped = 0;
        for m in self.apps.values_mut() {
            let before = m.len();
            m.retain(|_, e| now.duration_since(e.used) < IDLE);
            dropped += before - m.len();
        }
        if dropped == 0 {
            let oldest = self
                .apps
                .iter()
                .flat_map(|(a, m)| m.iter().map(move |(c, e)| (e.used, *a, c.clone())))
                .min_by_key(|(used, _, _)| *used);
            if let Some((_, app, channel)) = oldest {
                if let Some(m) = self.apps.get_mut(&app) {
                    m.remove(&channel);
                }
                dropped = 1;
            }
        }
        self.apps.retain(|_, m| !m.is_empty());
        self.len -= dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_channel_gets_its_predecessor_and_the_map_stays_bounded() {
        let c = Contexts::default();
        let now = Instant::now();
        let t1 = c.next_tag();
        assert_eq!(c.swap(0, "a", t1, Bytes::from_static(b"1"), now), None);
        assert_eq!(
            c.swap(1, "a", c.next_tag(), Bytes::from_static(b"x"), now),
            None
        );
        let t2 = c.next_tag();
        assert_eq!(
            c.swap(0, "a", t2, Bytes::from_static(b"2"), now),
            Some((t1, Bytes::from_static(b"1")))
        );
        // Too big to keep: the successor has no predecessor.
        let big = Bytes::from(vec![b'x'; MAX_PAYLOAD + 1]);
        assert!(c.swap(0, "a", c.next_tag(), big.clone(), now).is_some());
        assert_eq!(
            c.swap(0, "a", c.next_tag(), Bytes::from_static(b"3"), now),
            None
        );
        for i in 0..3 * MAX_CHANNELS {
            c.swap(
                2,
                &format!("ch{i}"),
                c.next_tag(),
                Bytes::from_static(b"p"),
                now,
            );
        }
        assert!(c.len() <= MAX_CHANNELS, "{}", c.len());
    }
}
