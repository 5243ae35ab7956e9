//! The node's history of positioned channels: per channel, the frames of its last events (as
//! bound by `ResumeBounds`: events, bytes, age), and node-wide, their total memory.
//!
//! One `Mutex` per 64th of the channels (by a hash of app and name). `append` assigns the next
//! position, records the positioned frame and runs the caller's broadcast *under that lock*, so
//! every shard's inbox receives a channel's events in offset order; `resume` answers a
//! subscribe under the same lock and runs the caller's push of the answer into its shard's own
//! inbox, so the answer sits in that inbox exactly between the events it covers and the ones it
//! does not. Only positioned channels ever take these locks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;

use super::{Position, FIELD};
use crate::config::ResumeBounds;
use crate::fanout::frame::SharedFrame;

/// Memory counted for each kept frame beyond its bytes (the deque slot, the `Bytes` header and
/// its shared allocation's header).
pub const FRAME_OVERHEAD: usize = 64;
/// Memory counted for each channel with a history beyond its name.
pub const CHANNEL_OVERHEAD: usize = 192;

const LOCKS: usize = 64;

/// One channel's run of offsets and its last frames.
#[derive(Debug)]
pub struct ChannelHistory {
    epoch: u64,
    /// The offset the next event gets (the first is 1).
    next: u64,
    /// Offsets `next - frames.len()` to `next - 1`, oldest first, with when they arrived.
    frames: VecDeque<(Bytes, Instant)>,
    /// Memory counted for this channel (overheads included).
    charge: usize,
    /// Frame bytes kept (for the per-channel byte bound).
    bytes: usize,
    /// The last append (or the creation): the memory bound drops the stalest channels first.
    last: Instant,
}

/// What a subscribe to a positioned channel is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The channel's position when the answer was taken: the subscription starts after it.
    pub head: Position,
    pub replay: Replay,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// The client gave no position: nothing to replay, nothing to report.
    Fresh,
    /// Exactly the events after the client's position, in order (possibly none).
    Recovered(Vec<Bytes>),
    /// The history cannot cover the gap (another epoch, older than what is kept, longer than
    /// a replay may be): nothing is replayed. `missed` when it is known (same epoch).
    Lost { missed: Option<u64> },
}

impl ChannelHistory {
    pub fn new(epoch: u64, now: Instant, name_len: usize) -> ChannelHistory {
        ChannelHistory {
            epoch,
            next: 1,
            frames: VecDeque::new(),
            charge: CHANNEL_OVERHEAD + name_len,
            bytes: 0,
            last: now,
        }
    }

    /// The position of the last event (offset 0: none yet).
    pub fn head(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.next - 1,
        }
    }

    /// The position the next event gets.
    pub fn next_position(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.next,
        }
    }

    /// The oldest offset still kept (`next` when none is).
    fn first(&self) -> u64 {
        self.next - self.frames.len() as u64
    }

    pub fn charge(&self) -> usize {
        self.charge
    }

    pub fn kept(&self) -> usize {
        self.frames.len()
    }

    /// Records the frame of offset `next_position()`, then trims to the bounds. Returns the
    /// change in `charge`.
    pub fn push(&mut self, frame: Bytes, now: Instant, b: &ResumeBounds) -> isize {
        let before = self.charge as isize;
        self.bytes += frame.len();
        self.charge += frame.len() + FRAME_OVERHEAD;
        self.frames.push_back((frame, now));
        self.next += 1;
        self.last = now;
        while self.frames.len() > b.events || (self.bytes > b.bytes && self.frames.len() > 1) {
            self.pop_front();
        }
        self.expire(now, b);
        self.charge as isize - before
    }

    /// Starts over at `epoch`, the next event getting `next`, nothing kept (a cluster node
    /// taking the positions Redis gave). Returns the change in `charge`.
    pub fn reset(&mut self, epoch: u64, next: u64) -> isize {
        let before = self.charge as isize;
        while !self.frames.is_empty() {
            self.pop_front();
        }
        self.epoch = epoch;
        self.next = next.max(1);
        self.charge as isize - before
    }

    /// Drops the frames older than the age bound. Returns the change in `charge`.
    pub fn expire(&mut self, now: Instant, b: &ResumeBounds) -> isize {
        let before = self.charge as isize;
        while self
            .frames
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) > b.age)
        {
            self.pop_front();
        }
        self.charge as isize - before
    }

    fn pop_front(&mut self) {
        if let Some((f, _)) = self.frames.pop_front() {
            self.bytes -= f.len();
            self.charge -= f.len() + FRAME_OVERHEAD;
        }
    }

    /// What a client that last saw `from` is owed (call `expire` first).
    pub fn since(&self, from: Option<Position>, max_replay: usize) -> Answer {
        let head = self.head();
        let replay = match from {
            None => Replay::Fresh,
            Some(p) if p.epoch != self.epoch || p.offset > head.offset => {
                Replay::Lost { missed: None }
            }
            Some(p) => {
                let missed = head.offset - p.offset;
                if p.offset + 1 < self.first() || missed > max_replay as u64 {
                    Replay::Lost {
                        missed: Some(missed),
                    }
                } else {
                    let skip = (p.offset + 1 - self.first()) as usize;
                    Replay::Recovered(
                        self.frames
                            .iter()
                            .skip(skip)
                            .map(|(f, _)| f.clone())
                            .collect(),
                    )
                }
            }
        };
        Answer { head, replay }
    }
}

/// One lock's share of the histories: by app slot, then channel name.
type Part = HashMap<usize, HashMap<Box<str>, ChannelHistory>>;

/// Every positioned channel's history on this node, and their memory together.
pub struct Histories {
    locks: Box<[Mutex<Part>]>,
    bounds: ResumeBounds,
    /// Memory counted for every history together (`bts_resume_history_bytes`).
    memory: AtomicUsize,
    /// Channels with a history (`bts_resume_channels`).
    channels: AtomicUsize,
    /// Channels whose history the memory bound dropped (`bts_resume_channels_dropped_total`).
    dropped: AtomicU64,
    /// Events given a position (`bts_resume_events_total`).
    appended: AtomicU64,
    shrinking: AtomicBool,
    /// Epochs: this process's random seed, mixed with a counter.
    seed: u64,
    epochs: AtomicU64,
}

impl Histories {
    pub fn new(bounds: ResumeBounds, seed: u64) -> Histories {
        Histories {
            locks: (0..LOCKS).map(|_| Mutex::default()).collect(),
            bounds,
            memory: AtomicUsize::new(0),
            channels: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            shrinking: AtomicBool::new(false),
            seed,
            epochs: AtomicU64::new(0),
        }
    }

    pub fn bounds(&self) -> &ResumeBounds {
        &self.bounds
    }

    /// A new epoch: never 0, and (for one seed) never the same twice.
    fn new_epoch(&self) -> u64 {
        let n = self.epochs.fetch_add(1, Ordering::Relaxed);
        // splitmix64 of seed + n
        let mut z = self
            .seed
            .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).max(1)
    }

    fn lock_of(app: usize, channel: &str) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ app as u64;
        for b in channel.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        (h % LOCKS as u64) as usize
    }

    /// Runs `f` on the channel's history (created when missing) under its lock; `f` returns the
    /// change in the history's charge and its own result.
    fn with<R>(
        &self,
        app: usize,
        channel: &str,
        now: Instant,
        f: impl FnOnce(&mut ChannelHistory) -> (isize, R),
    ) -> R {
        let mut map = self.locks[Self::lock_of(app, channel)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let chans = map.entry(app).or_default();
        let h = match chans.get_mut(channel) {
            Some(h) => h,
            None => {
                let h = ChannelHistory::new(self.new_epoch(), now, channel.len());
                self.memory.fetch_add(h.charge(), Ordering::Relaxed);
                self.channels.fetch_add(1, Ordering::Relaxed);
                chans.entry(channel.into()).or_insert(h)
            }
        };
        let expired = h.expire(now, &self.bounds);
        let (delta, r) = f(h);
        let delta = delta + expired;
        if delta >= 0 {
            self.memory.fetch_add(delta as usize, Ordering::Relaxed);
        } else {
            self.memory.fetch_sub((-delta) as usize, Ordering::Relaxed);
        }
        drop(map);
        r
    }

    /// Gives `frame` (an event for `channel`) the channel's next position, keeps the
    /// positioned frame, and runs `broadcast` with it while the channel is still locked, so
    /// that the order of offsets is the order every inbox receives them in.
    pub fn append<R>(
        &self,
        app: usize,
        channel: &str,
        frame: &SharedFrame,
        now: Instant,
        broadcast: impl FnOnce(SharedFrame) -> R,
    ) -> R {
        let r = self.with(app, channel, now, |h| {
            let pos = h.next_position().to_string();
            let framed = frame.with_member(FIELD, &pos);
            let delta = h.push(framed.bytes.clone(), now, &self.bounds);
            (delta, broadcast(framed))
        });
        self.appended.fetch_add(1, Ordering::Relaxed);
        if self.memory.load(Ordering::Relaxed) > self.bounds.memory {
            self.shrink();
        }
        r
    }

    /// Cluster mode: records `frame` at the position Redis gave it (`pos`) and runs
    /// `broadcast` with the positioned frame under the channel's lock, like `append`. An event
    /// already recorded (its offset not past the head, same epoch) is skipped (`None`). When
    /// `pos` does not follow the head (another epoch, a gap: this node started late or missed
    /// announcements), the history restarts at `pos`, first taking from `fill` what Redis kept
    /// before it: `(epoch, [(offset, frame)])`, oldest first.
    pub fn append_at<R>(
        &self,
        app: usize,
        channel: &str,
        pos: Position,
        frame: &SharedFrame,
        fill: impl FnOnce() -> Option<(u64, Vec<(u64, SharedFrame)>)>,
        broadcast: impl FnOnce(SharedFrame) -> R,
    ) -> Option<R> {
        let now = Instant::now();
        // Whether `pos` follows what this node holds: skip it, append it, or restart at it.
        let fits = |h: &ChannelHistory| {
            let head = h.head();
            if head.epoch == pos.epoch && pos.offset <= head.offset {
                Some(false)
            } else if head.epoch == pos.epoch && pos.offset == head.offset + 1 {
                Some(true)
            } else {
                None
            }
        };
        let mut broadcast = Some(broadcast);
        let mut deliver = |h: &mut ChannelHistory, mut delta: isize| {
            let framed = frame.with_member(FIELD, &pos.to_string());
            delta += h.push(framed.bytes.clone(), now, &self.bounds);
            let b = broadcast.take().expect("broadcast once");
            (delta, Some(b(framed)))
        };
        let first = self.with(app, channel, now, |h| match fits(h) {
            Some(false) => (0, Some(None)),
            Some(true) => {
                let (delta, r) = deliver(h, 0);
                (delta, Some(r))
            }
            None => (0, None),
        });
        let r = match first {
            Some(r) => r,
            None => {
                // A gap: read what Redis kept without holding the lock (a shard answering a
                // resume on this channel must not wait for Redis), then look again.
                let older = fill()
                    .filter(|(e, _)| *e == pos.epoch)
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                self.with(app, channel, now, |h| match fits(h) {
                    Some(false) => (0, None),
                    Some(true) => deliver(h, 0),
                    None => {
                        let delta = self.restart(h, pos, older, now);
                        deliver(h, delta)
                    }
                })
            }
        };
        self.appended.fetch_add(1, Ordering::Relaxed);
        if self.memory.load(Ordering::Relaxed) > self.bounds.memory {
            self.shrink();
        }
        r
    }

    /// The position of the last event this node holds of a channel (`None`: no history, or
    /// none yet).
    pub fn head_of(&self, app: usize, channel: &str) -> Option<Position> {
        let map = self.locks[Self::lock_of(app, channel)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.get(&app)?
            .get(channel)
            .map(ChannelHistory::head)
            .filter(|p| p.offset > 0)
    }

    /// Cluster mode, at start: takes a channel's history as Redis keeps it, unless this node's
    /// is already as far.
    pub fn load(
        &self,
        app: usize,
        channel: &str,
        epoch: u64,
        kept: Vec<(u64, SharedFrame)>,
        now: Instant,
    ) {
        let Some(last) = kept.last().map(|(o, _)| *o) else {
            return;
        };
        self.with(app, channel, now, |h| {
            let head = h.head();
            if head.epoch == epoch && head.offset >= last {
                return (0, ());
            }
            let pos = Position {
                epoch,
                offset: last + 1,
            };
            (self.restart(h, pos, kept, now), ())
        });
    }

    /// Restarts `h` so that its next event is `pos`, keeping the run of `older` that ends right
    /// before it. Returns the change in charge.
    fn restart(
        &self,
        h: &mut ChannelHistory,
        pos: Position,
        older: Vec<(u64, SharedFrame)>,
        now: Instant,
    ) -> isize {
        // The contiguous run ending at pos.offset - 1.
        let mut run: Vec<(u64, SharedFrame)> = Vec::new();
        for (o, f) in older.into_iter().rev() {
            let want = run.last().map_or(pos.offset - 1, |(p, _)| p - 1);
            if o == want && o >= 1 {
                run.push((o, f));
            } else if o < want {
                break;
            }
        }
        run.reverse();
        let start = run.first().map_or(pos.offset, |(o, _)| *o);
        let mut delta = h.reset(pos.epoch, start);
        for (o, f) in run {
            let p = Position {
                epoch: pos.epoch,
                offset: o,
            };
            delta += h.push(
                f.with_member(FIELD, &p.to_string()).bytes,
                now,
                &self.bounds,
            );
        }
        delta
    }

    /// Answers a subscribe that last saw `from` and runs `deliver` with the answer while the
    /// channel is still locked (no event can be appended between the two).
    pub fn resume<R>(
        &self,
        app: usize,
        channel: &str,
        from: Option<Position>,
        now: Instant,
        deliver: impl FnOnce(Answer) -> R,
    ) -> R {
        let r = self.with(app, channel, now, |h| {
            (0, deliver(h.since(from, self.bounds.max_replay)))
        });
        if self.memory.load(Ordering::Relaxed) > self.bounds.memory {
            self.shrink();
        }
        r
    }

    /// Over the memory bound: drops whole histories, the channels that went longest without an
    /// event first, until 90 % of the bound is left. A dropped channel starts a new epoch with
    /// its next event, so clients holding its old positions are answered `recovered: false`.
    /// One thread shrinks at a time; locks are taken one at a time.
    fn shrink(&self) {
        if self.shrinking.swap(true, Ordering::Acquire) {
            return;
        }
        let target = self.bounds.memory / 10 * 9;
        let mut stale: Vec<(Instant, usize, usize, Box<str>)> = Vec::new();
        for (i, lock) in self.locks.iter().enumerate() {
            let map = lock.lock().unwrap_or_else(|e| e.into_inner());
            for (app, chans) in map.iter() {
                for (name, h) in chans {
                    stale.push((h.last, i, *app, name.clone()));
                }
            }
        }
        stale.sort_by_key(|s| s.0);
        for (last, i, app, name) in stale {
            if self.memory.load(Ordering::Relaxed) <= target {
                break;
            }
            let mut map = self.locks[i].lock().unwrap_or_else(|e| e.into_inner());
            let Some(chans) = map.get_mut(&app) else {
                continue;
            };
            // Appended to since it was looked at: no longer the stalest.
            if chans.get(&*name).is_none_or(|h| h.last != last) {
                continue;
            }
            if let Some(h) = chans.remove(&*name) {
                self.memory.fetch_sub(h.charge(), Ordering::Relaxed);
                self.channels.fetch_sub(1, Ordering::Relaxed);
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.shrinking.store(false, Ordering::Release);
    }

    /// (memory counted, channels with a history, channels dropped by the memory bound, events
    /// positioned), for `/metrics`.
    pub fn stats(&self) -> (usize, usize, u64, u64) {
        (
            self.memory.load(Ordering::Relaxed),
            self.channels.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.appended.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
#[path = "history_tests.rs"]
mod tests;
