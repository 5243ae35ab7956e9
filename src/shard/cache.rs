//! Last event of each cache channel, kept on every shard (every shard sees every broadcast, so
//! no shard has to ask another), for `ttl` after it was published, whether or not anyone is
//! subscribed. Bounded: at most `max` channels; a new channel over the bound first evicts the
//! entries that expired, then the one that expires soonest.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::outqueue::Frame;

/// One app's cached channels: channel -> (its last frame, expiry).
type AppCache = HashMap<Rc<str>, (Rc<Frame>, Instant)>;

pub struct CacheStore {
    /// Per app.
    apps: Vec<AppCache>,
    max: usize,
}

impl CacheStore {
    /// Makes room for apps up to slot `apps - 1` (a reload added some).
    pub fn ensure_apps(&mut self, apps: usize) {
        while self.apps.len() < apps {
            self.apps.push(HashMap::new());
        }
    }

    pub fn new(apps: usize, max: usize) -> CacheStore {
        CacheStore {
            apps: (0..apps).map(|_| HashMap::new()).collect(),
            max,
        }
    }

    pub fn put(
        &mut self,
        app: usize,
        channel: &str,
        frame: Rc<Frame>,
        now: Instant,
        ttl: Duration,
    ) {
        let total: usize = self.apps.iter().map(HashMap::len).sum();
        let map = &mut self.apps[app];
        if let Some(entry) = map.get_mut(channel) {
            *entry = (frame, now + ttl);
            return;
        }
        if total >= self.max {
            self.purge(now);
            if self.apps.iter().map(HashMap::len).sum::<usize>() >= self.max {
                self.evict_soonest();
            }
        }
        self.apps[app].insert(Rc::from(channel), (frame, now + ttl));
    }

    /// The cached frame, if one is there and fresh.
    pub fn get(&self, app: usize, channel: &str, now: Instant) -> Option<&Rc<Frame>> {
        match self.apps.get(app)?.get(channel) {
            Some((frame, expires)) if *expires > now => Some(frame),
            _ => None,
        }
    }

    /// Seconds left before the cached event expires.
    pub fn ttl_left(&self, app: usize, channel: &str, now: Instant) -> Option<u64> {
        let (_, expires) = self.apps.get(app)?.get(channel)?;
        (*expires > now).then(|| expires.duration_since(now).as_secs())
    }

    pub fn purge(&mut self, now: Instant) {
        for map in &mut self.apps {
            map.retain(|_, (_, expires)| *expires > now);
        }
    }

    fn evict_soonest(&mut self) {
        let victim = self
            .apps
            .iter()
            .enumerate()
            .flat_map(|(a, m)| m.iter().map(move |(c, (_, e))| (*e, a, Rc::clone(c))))
            .min_by_key(|(e, _, _)| *e);
        if let Some((_, app, channel)) = victim {
            self.apps[app].remove(&channel);
        }
    }

    pub fn len(&self) -> usize {
        self.apps.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn f(b: &'static [u8]) -> Rc<Frame> {
        Rc::new(Frame::plain(Bytes::from_static(b)))
    }

    #[test]
    fn ttl_and_bound() {
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut c = CacheStore::new(2, 2);
        c.put(0, "cache-a", f(b"1"), now, ttl);
        c.put(0, "cache-a", f(b"2"), now, ttl);
        assert_eq!(
            c.get(0, "cache-a", now).map(|b| b.plain_bytes()),
            Some(&b"2"[..])
        );
        assert!(c.get(1, "cache-a", now).is_none());
        c.put(1, "cache-b", f(b"3"), now + Duration::from_secs(1), ttl);
        // Full: the entry expiring soonest (cache-a) makes room.
        c.put(1, "cache-c", f(b"4"), now + Duration::from_secs(2), ttl);
        assert_eq!(c.len(), 2);
        assert!(c.get(0, "cache-a", now).is_none());
        assert!(c.get(1, "cache-b", now + Duration::from_secs(2)).is_some());
        assert!(c.get(1, "cache-b", now + Duration::from_secs(11)).is_none());
        c.purge(now + Duration::from_secs(20));
        assert!(c.is_empty());
    }
}
