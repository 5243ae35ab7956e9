//! Who may hold one of the node's sockets: the socket budget (the open-files limit less a
//! reserve kept for `/up`, `/ready`, metrics, webhooks and Redis), the per-address counts, the
//! optional per-IP cap, and the fairness rule near the budget: the address holding the most
//! connections is refused first, and a newcomer from any other address takes the place of one of
//! that address's connections, so one host cannot lock everyone else out.
//!
//! Every accepted socket is counted from `accept` to its close, the HTTP phase included (a
//! [`Ticket`]). Touched on accept, attribution (PROXY header / X-Forwarded-For) and close only,
//! never per event: the node-wide socket count is one atomic, the per-IP cap a mutex-sharded
//! table used only when a cap is configured, and the fairness ranking is per shard
//! (SO_REUSEPORT spreads each address's connections over every shard by hash, so each shard's
//! top address is the node's). Memory is bounded by the sockets themselves: an address has an
//! entry only while it holds a connection, and IPv6 addresses are grouped by /64 (what one host
//! is usually given), so a host cycling through its addresses is still one entry.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::{ConnId, Shard};
pub use crate::node::admission::{AddrKey, Admission, Refusal};
use crate::protocol::PusherError;

/// A socket's entry in its shard's `Local`: slot index and generation, so a stale one never
/// names the socket that reused the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    idx: u32,
    gen: u32,
}

/// One admitted socket, as the shard's fairness ranking sees it. Entries live in one vector per
/// shard (no allocation per socket: an idle connection's share is this entry and 4 bytes in its
/// address's list).
struct Entry {
    gen: u32,
    /// Its position in its address's list, while `key` is set.
    pos: u32,
    /// The address it counts against; `None` while unattributed (from a trusted proxy, before
    /// its PROXY header or X-Forwarded-For names the client) and once unlisted.
    key: Option<AddrKey>,
    in_use: bool,
    evicted: bool,
    /// The HTTP phase's task, woken to end it when evicted.
    waker: Option<Waker>,
    /// The upgraded connection, closed with 4100 when evicted.
    conn: Option<ConnId>,
}

/// A shard's view: its admitted sockets by address, and the addresses ranked by how many they
/// hold here. Invariant: `ranking` holds `(n, key)` exactly for the keys of `by_key`, `n` being
/// the length of their list, and every listed entry's `key` and `pos` say where it is.
#[derive(Default)]
pub struct Local {
    entries: Vec<Entry>,
    free: Vec<u32>,
    by_key: HashMap<AddrKey, Vec<u32>>,
    ranking: BTreeSet<(usize, AddrKey)>,
    /// Refusals and evictions since the last log line (one line per `LOG_EVERY`).
    log: LogLimiter,
}

impl Local {
    /// A new, unattributed entry.
    pub fn open(&mut self) -> Slot {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Entry {
                    gen: 0,
                    pos: 0,
                    key: None,
                    in_use: false,
                    evicted: false,
                    waker: None,
                    conn: None,
                });
                (self.entries.len() - 1) as u32
            }
        };
        let e = &mut self.entries[idx as usize];
        e.gen = e.gen.wrapping_add(1);
        e.in_use = true;
        e.evicted = false;
        Slot { idx, gen: e.gen }
    }

    fn entry(&self, s: Slot) -> Option<&Entry> {
        self.entries
            .get(s.idx as usize)
            .filter(|e| e.in_use && e.gen == s.gen)
    }

    fn entry_mut(&mut self, s: Slot) -> Option<&mut Entry> {
        self.entries
            .get_mut(s.idx as usize)
            .filter(|e| e.in_use && e.gen == s.gen)
    }

    /// Unlists and frees `s` (its socket closed); returns the key it was listed under.
    pub fn close(&mut self, s: Slot) -> Option<AddrKey> {
        let key = self.unlist(s);
        if let Some(e) = self.entry_mut(s) {
            e.in_use = false;
            e.waker = None;
            e.conn = None;
            self.free.push(s.idx);
        }
        key
    }

    /// Connections `key` holds on this shard.
    pub fn count(&self, key: AddrKey) -> usize {
        self.by_key.get(&key).map_or(0, Vec::len)
    }

    /// The address holding the most connections on this shard, and how many.
    pub fn top(&self) -> Option<(usize, AddrKey)> {
        self.ranking.last().copied()
    }

    fn rerank(&mut self, key: AddrKey, from: usize, to: usize) {
        if from > 0 {
            self.ranking.remove(&(from, key));
        }
        if to > 0 {
            self.ranking.insert((to, key));
        }
    }

    /// Lists `s` under `key` (if it is in use and not listed yet).
    pub fn list(&mut self, s: Slot, key: AddrKey) {
        if self.entry(s).is_none_or(|e| e.key.is_some()) {
            return;
        }
        let list = self.by_key.entry(key).or_default();
        list.push(s.idx);
        let n = list.len();
        let e = &mut self.entries[s.idx as usize];
        e.key = Some(key);
        e.pos = (n - 1) as u32;
        self.rerank(key, n - 1, n);
    }

    /// Unlists `s`; returns the key it was listed under.
    pub fn unlist(&mut self, s: Slot) -> Option<AddrKey> {
        let e = self.entry_mut(s)?;
        let key = e.key.take()?;
        let pos = e.pos as usize;
        let list = self.by_key.get_mut(&key)?;
        list.swap_remove(pos);
        if let Some(&moved) = list.get(pos) {
            self.entries[moved as usize].pos = pos as u32;
        }
        let n = list.len();
        if n == 0 {
            self.by_key.remove(&key);
        }
        self.rerank(key, n + 1, n);
        Some(key)
    }

    /// Unlists and returns the newest connection of `key`.
    pub fn pop(&mut self, key: AddrKey) -> Option<Slot> {
        let idx = *self.by_key.get(&key)?.last()?;
        let s = Slot {
            idx,
            gen: self.entries[idx as usize].gen,
        };
        self.unlist(s);
        Some(s)
    }

    pub fn key_of(&self, s: Slot) -> Option<AddrKey> {
        self.entry(s)?.key
    }

    pub fn is_evicted(&self, s: Slot) -> bool {
        self.entry(s).is_some_and(|e| e.evicted)
    }

    pub fn set_conn(&mut self, s: Slot, id: ConnId) {
        if let Some(e) = self.entry_mut(s) {
            e.conn = Some(id);
            e.waker = None;
        }
    }

    /// Marks `s` evicted; what to end: its waiting HTTP-phase task, its upgraded connection.
    fn mark_evicted(&mut self, s: Slot) -> (Option<Waker>, Option<ConnId>) {
        match self.entry_mut(s) {
            Some(e) => {
                e.evicted = true;
                (e.waker.take(), e.conn)
            }
            None => (None, None),
        }
    }

    fn poll_evicted(&mut self, s: Slot, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let Some(e) = self.entry_mut(s) else {
            return Poll::Ready(());
        };
        if e.evicted {
            return Poll::Ready(());
        }
        if !e.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            e.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The fairness rule, over the budget: the address one of whose connections should make
    /// room for a newcomer from `key` (`None`: not known yet, from a trusted proxy), or `None`
    /// when the newcomer is the one to refuse. Room is made only by an address holding at least
    /// two more than the newcomer's would, so the address holding the most is refused first
    /// (its own newcomers too), and among equals nobody is closed for a newcomer.
    pub fn make_room_for(&self, key: Option<AddrKey>) -> Option<AddrKey> {
        let mine = key.map_or(0, |k| self.count(k));
        let (top_n, top) = self.top()?;
        (mine + 1 < top_n && Some(top) != key).then_some(top)
    }

    /// For a socket already admitted and now attributed to `key` over the budget: `false` when
    /// that address would hold the most connections here, so it is refused.
    pub fn may_attribute(&self, key: AddrKey) -> bool {
        let mine = self.count(key);
        self.top().is_some_and(|(top_n, _)| mine < top_n)
    }

    /// Addresses with at least one connection here.
    pub fn addresses(&self) -> usize {
        self.by_key.len()
    }
}

/// Resolves when the socket in `slot` is chosen to make room (or is gone); the HTTP phase races
/// it, so an evicted connection ends, and its descriptor closes, at its task's next turn.
pub async fn evicted(shard: &Shard, slot: Slot) {
    std::future::poll_fn(|cx| shard.admission.borrow_mut().poll_evicted(slot, cx)).await;
}

/// One log line per `LOG_EVERY` at most, however hard the node is pressed: counts in between.
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct LogLimiter {
    last: Option<Instant>,
    refused: u64,
    evicted: u64,
}

/// `accept` failures (EMFILE and friends come every few milliseconds while they last): counted,
/// and reported at most once per `LOG_EVERY`.
#[derive(Default)]
pub struct AcceptErrors {
    last: Option<Instant>,
    since: u64,
}

impl AcceptErrors {
    /// Counts one failure; `Some(failures since the last report)` when a line is due.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// A socket's place in the budget, from accept to close (dropping it gives the place back).
pub struct Ticket {
    shard: Rc<Shard>,
    slot: Slot,
}

impl Ticket {
    pub fn slot(&self) -> Slot {
        self.slot
    }

    pub fn is_evicted(&self) -> bool {
        self.shard.admission.borrow().is_evicted(self.slot)
    }

    /// Still waiting for a PROXY header or X-Forwarded-For to say who the client is.
    pub fn unattributed(&self) -> bool {
        let local = self.shard.admission.borrow();
        local.key_of(self.slot).is_none() && !local.is_evicted(self.slot)
    }

    /// The upgraded connection this socket now carries (closed with 4100 if evicted).
    pub fn set_conn(&self, id: ConnId) {
        self.shard.admission.borrow_mut().set_conn(self.slot, id);
    }

    /// Counts an unattributed socket (from a trusted proxy) against `client`, the address its
    /// PROXY header or X-Forwarded-For named. A client that is itself a trusted proxy stays
    /// unattributed. Over the budget, the address holding the most is refused.
    pub fn attribute(&self, client: IpAddr) -> Result<(), Refusal> {
        let shared = &self.shard.shared;
        if self.is_evicted() || shared.cfg.trusted_proxies.contains(client) {
            return Ok(());
        }
        let key = AddrKey::of(client);
        let adm = &shared.admission;
        if !adm.try_add_ip(key) {
            adm.refused_per_ip.fetch_add(1, Relaxed);
            return Err(Refusal::PerIp);
        }
        let mut local = self.shard.admission.borrow_mut();
        if adm.open() > adm.budget() && !local.may_attribute(key) {
            drop(local);
            adm.remove_ip(key);
            adm.refused_descriptors.fetch_add(1, Relaxed);
            return Err(Refusal::Descriptors);
        }
        local.list(self.slot, key);
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let key = self.shard.admission.borrow_mut().close(self.slot);
        let adm = &self.shard.shared.admission;
        if let Some(key) = key {
            adm.remove_ip(key);
        }
        adm.remove_open();
    }
}

/// Admits a socket just accepted from `peer`, or says why not. `trusted`: the peer is a listed
/// load balancer, whose sockets are counted against the client it names later
/// ([`Ticket::attribute`]). With the ticket: whether a connection of another address was
/// closed to make room.
pub fn admit(shard: &Rc<Shard>, peer: IpAddr, trusted: bool) -> Result<(Ticket, bool), Refusal> {
    let adm = &shard.shared.admission;
    let n = adm.add_open();
    let budget = adm.budget();
    let slot = {
        let mut local = shard.admission.borrow_mut();
        if local.entries.capacity() == 0 {
            // Room for this shard's share of the budget at once (address space only until
            // used): growing the vector by copies under a burst of connections would leave
            // freed blocks behind.
            let share = budget / shard.shared.cfg.shards().max(1);
            local.entries.reserve(share.saturating_add(64).min(1 << 16));
        }
        local.open()
    };
    // From here on, dropping the ticket undoes the count.
    let ticket = Ticket {
        shard: Rc::clone(shard),
        slot,
    };
    let refuse = |r: Refusal| {
        let counter = match r {
            Refusal::Descriptors => &adm.refused_descriptors,
            Refusal::PerIp => &adm.refused_per_ip,
        };
        counter.fetch_add(1, Relaxed);
        shard.admission.borrow_mut().log.refused += 1;
        Err(r)
    };
    if n > budget.saturating_add(adm.headroom()) {
        return refuse(Refusal::Descriptors);
    }
    let key = (!trusted).then(|| AddrKey::of(peer));
    if let Some(key) = key {
        if !adm.try_add_ip(key) {
            return refuse(Refusal::PerIp);
        }
    }
    let victim = {
        let mut local = shard.admission.borrow_mut();
        let victim = if n > budget {
            match local.make_room_for(key) {
                Some(top) => local.pop(top).map(|v| (v, top)),
                None => {
                    drop(local);
                    if let Some(key) = key {
                        adm.remove_ip(key);
                    }
                    return refuse(Refusal::Descriptors);
                }
            }
        } else {
            None
        };
        if let Some(key) = key {
            local.list(ticket.slot, key);
        }
        victim
    };
    let Some((victim, top)) = victim else {
        return Ok((ticket, false));
    };
    adm.remove_ip(top);
    evict(shard, victim);
    adm.evicted.fetch_add(1, Relaxed);
    shard.admission.borrow_mut().log.evicted += 1;
    log_pressure(shard, Some(top), None);
    Ok((ticket, true))
}

/// Ends an evicted connection at its task's next turn: the HTTP phase is dropped (its race
/// with [`evicted`]); an upgraded connection gets `pusher:error` and close 4100 (clients back
/// off before reconnecting) as far as its socket takes them now, and ends without waiting for
/// the close handshake, since its descriptor is wanted.
fn evict(shard: &Shard, victim: Slot) {
    let (waker, conn) = shard.admission.borrow_mut().mark_evicted(victim);
    if let Some(w) = waker {
        w.wake();
    }
    if let Some(conn) = conn.and_then(|id| shard.conn(id)) {
        conn.close_pusher(PusherError::OverCapacity);
        let _ = conn.flush();
        conn.mark_dead();
    }
}

/// The pressure log line: at most one per `LOG_EVERY` per shard, with the counts since the last.
fn log_pressure(shard: &Shard, top: Option<AddrKey>, why: Option<Refusal>) {
    let mut local = shard.admission.borrow_mut();
    let now = Instant::now();
    if local
        .log
        .last
        .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
    {
        return;
    }
    let (refused, evicted) = (local.log.refused, local.log.evicted);
    local.log = LogLimiter {
        last: Some(now),
        ..LogLimiter::default()
    };
    let top = top.or_else(|| local.top().map(|(_, k)| k));
    let top_holds = top.map_or(0, |k| local.count(k));
    drop(local);
    let adm = &shard.shared.admission;
    tracing::warn!(
        shard = shard.id,
        open = adm.open(),
        budget = adm.budget(),
        top = %top.map_or_else(String::new, |k| k.to_string()),
        top_holds,
        reason = why.map_or("descriptors", Refusal::label),
        refused,
        evicted,
        "connections refused, or closed to make room, to keep descriptors for everyone: the \
         address holding the most goes first (counts since the last such line)"
    );
}

/// Writes the refusal's HTTP answer and closes a socket that was not admitted, at once (holding
/// it open while the client reads would spend the descriptors the refusal is saving).
pub fn refuse_socket(shard: &Shard, fd: std::os::fd::RawFd, why: Refusal) {
    crate::sys::refuse_now(fd, why.http_response());
    log_pressure(shard, None, Some(why));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accept_failures_are_reported_once_per_ten_seconds() {
        let mut e = AcceptErrors::default();
        let t0 = Instant::now();
        assert_eq!(e.note(t0), Some(1));
        // Every 50 ms for 25 s, as a shard out of descriptors retries.
        let lines: Vec<u64> = (1..=500)
            .filter_map(|i| e.note(t0 + Duration::from_millis(50 * i)))
            .collect();
        assert_eq!(
            lines,
            vec![200, 200],
            "one line per 10 s, each with its count"
        );
    }

    #[test]
    fn the_address_holding_the_most_makes_room() {
        let key = |a: u8| AddrKey::V4([10, 0, 0, a]);
        let mut local = Local::default();
        let list = |local: &mut Local, a: u8, n: usize| {
            for _ in 0..n {
                let s = local.open();
                local.list(s, key(a));
            }
        };
        assert_eq!(local.make_room_for(Some(key(1))), None, "nobody to close");
        // One attacker with 100, viewers with one each.
        list(&mut local, 1, 100);
        list(&mut local, 2, 1);
        list(&mut local, 3, 1);
        assert_eq!(local.make_room_for(Some(key(2))), Some(key(1)));
        assert_eq!(local.make_room_for(Some(key(9))), Some(key(1)));
        assert_eq!(
            local.make_room_for(None),
            Some(key(1)),
            "unattributed newcomer"
        );
        assert_eq!(
            local.make_room_for(Some(key(1))),
            None,
            "the attacker's own newcomer"
        );
        assert!(local.may_attribute(key(2)));
        assert!(!local.may_attribute(key(1)));
        // Among equals nobody is closed for a newcomer.
        let mut equals = Local::default();
        for a in 0..50 {
            list(&mut equals, a, 1);
        }
        assert_eq!(equals.make_room_for(Some(key(200))), None);
        assert_eq!(equals.make_room_for(None), None);
        // Two tabs against none: one tab makes room.
        list(&mut equals, 7, 1);
        assert_eq!(equals.make_room_for(Some(key(200))), Some(key(7)));
        assert_eq!(
            equals.make_room_for(Some(key(8))),
            None,
            "1 + 1 is not below 2"
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8),
        Remove(usize),
        PopTop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6).prop_map(Op::Insert),
            any::<usize>().prop_map(Op::Remove),
            Just(Op::PopTop),
        ]
    }

    proptest! {
        /// The ranking always names an address holding the most, counts match a naive model,
        /// and slots are reused without a stale one reaching the new socket.
        #[test]
        fn ranking_matches_a_naive_model(ops in proptest::collection::vec(op(), 0..300)) {
            let mut local = Local::default();
            let mut live: Vec<(u8, Slot)> = Vec::new();
            let mut stale: Vec<Slot> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(a) => {
                        let s = local.open();
                        local.list(s, AddrKey::V4([10, 0, 0, a]));
                        live.push((a, s));
                    }
                    Op::Remove(i) if !live.is_empty() => {
                        let (a, s) = live.swap_remove(i % live.len());
                        prop_assert_eq!(local.close(s), Some(AddrKey::V4([10, 0, 0, a])));
                        prop_assert_eq!(local.close(s), None, "closed twice");
                        stale.push(s);
                    }
                    Op::Remove(_) => {}
                    Op::PopTop => {
                        if let Some((n, key)) = local.top() {
                            let s = local.pop(key).unwrap();
                            prop_assert_eq!(local.key_of(s), None);
                            let i = live.iter().position(|(_, l)| *l == s).unwrap();
                            let (a, _) = live.swap_remove(i);
                            prop_assert_eq!(AddrKey::V4([10, 0, 0, a]), key);
                            prop_assert_eq!(local.count(key), n - 1);
                            // Its socket closes later: nothing left to unlist.
                            prop_assert_eq!(local.close(s), None);
                            stale.push(s);
                        }
                    }
                }
                for s in &stale {
                    prop_assert_eq!(local.key_of(*s), None);
                    prop_assert!(!local.is_evicted(*s));
                }
                let mut model: HashMap<u8, usize> = HashMap::new();
                for (a, s) in &live {
                    *model.entry(*a).or_default() += 1;
                    prop_assert_eq!(local.key_of(*s), Some(AddrKey::V4([10, 0, 0, *a])));
                }
                for a in 0..6u8 {
                    prop_assert_eq!(local.count(AddrKey::V4([10, 0, 0, a])), model.get(&a).copied().unwrap_or(0));
                }
                prop_assert_eq!(local.addresses(), model.len());
                let most = model.values().copied().max();
                prop_assert_eq!(local.top().map(|(n, _)| n), most);
                for (key, list) in &local.by_key {
                    for (i, &idx) in list.iter().enumerate() {
                        let e = &local.entries[idx as usize];
                        prop_assert_eq!(e.pos as usize, i);
                        prop_assert_eq!(e.key, Some(*key));
                    }
                }
                prop_assert_eq!(local.entries.iter().filter(|e| e.in_use).count(), live.len());
            }
        }
    }
}
