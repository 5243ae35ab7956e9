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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::{ConnId, Shard};
use crate::protocol::PusherError;

/// One host, as far as counting goes: an IPv4 address, or the /64 of an IPv6 address
/// (IPv4-mapped IPv6 addresses count as the IPv4 address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddrKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl AddrKey {
    pub fn of(ip: IpAddr) -> AddrKey {
        match crate::proxy::canonical(ip) {
            IpAddr::V4(v4) => AddrKey::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut p = [0u8; 8];
                p.copy_from_slice(&v6.octets()[..8]);
                AddrKey::V6(p)
            }
        }
    }
}

impl std::fmt::Display for AddrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddrKey::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(*o)),
            AddrKey::V6(p) => {
                let mut o = [0u8; 16];
                o[..8].copy_from_slice(p);
                write!(f, "{}/64", std::net::Ipv6Addr::from(o))
            }
        }
    }
}

/// Why a connection was not let in (or was let go).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The socket budget is spent and this address holds the most connections (or nobody can
    /// make room).
    Descriptors,
    /// The address is at `max_connections_per_ip`.
    PerIp,
}

impl Refusal {
    /// The answer written before closing a refused socket that has not spoken HTTP yet (it may
    /// be a browser's WebSocket handshake, so an HTTP status is what it can understand).
    pub fn http_response(self) -> &'static [u8] {
        match self {
            Refusal::Descriptors => {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 32\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{\"error\":\"too many connections\"}"
            }
            Refusal::PerIp => {
                b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: 50\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{\"error\":\"too many connections from this address\"}"
            }
        }
    }

    /// The Pusher error for a WebSocket that is already upgraded: 4100, so clients back off.
    pub fn pusher_error(self) -> PusherError {
        PusherError::OverCapacity
    }

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Descriptors => "descriptors",
            Refusal::PerIp => "per_ip",
        }
    }
}

/// Shards of the per-IP table's lock: accept on one shard rarely waits for another.
const TABLE_SHARDS: usize = 64;

/// The node-wide part (in `Shared`).
pub struct Admission {
    /// Client sockets open now, all shards, every phase (HTTP, upgraded, closing).
    open: AtomicUsize,
    /// Most client sockets: the open-files limit less the reserve and the daemon's own
    /// descriptors (set at start once they are open).
    budget: AtomicUsize,
    /// Beyond `budget + headroom` nothing is admitted, not even by making room: the
    /// connections being closed to make room still hold their descriptors. Half the reserve.
    headroom: AtomicUsize,
    per_ip: Option<u32>,
    table: Box<[Mutex<HashMap<AddrKey, u32>>]>,
    /// Refused at accept (or attribution): by the socket budget, by the per-IP cap.
    pub refused_descriptors: AtomicU64,
    pub refused_per_ip: AtomicU64,
    /// PROXY protocol headers refused (untrusted sender, missing or malformed).
    pub refused_proxy: AtomicU64,
    /// Connections closed to make room for a newcomer from another address.
    pub evicted: AtomicU64,
    /// `accept` failures (EMFILE and friends).
    pub accept_errors: AtomicU64,
}

impl Admission {
    pub fn new(reserve: usize, per_ip: Option<u32>) -> Admission {
        Admission {
            open: AtomicUsize::new(0),
            budget: AtomicUsize::new(usize::MAX),
            headroom: AtomicUsize::new((reserve / 2).max(1)),
            per_ip,
            table: (0..if per_ip.is_some() { TABLE_SHARDS } else { 0 })
                .map(|_| Mutex::default())
                .collect(),
            refused_descriptors: AtomicU64::new(0),
            refused_per_ip: AtomicU64::new(0),
            refused_proxy: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
        }
    }

    /// Sets the socket budget and the reserve kept beyond it (at start, once the open-files
    /// limit is known).
    pub fn set_budget(&self, budget: usize, reserve: usize) {
        self.budget.store(budget, Relaxed);
        self.headroom.store((reserve / 2).max(1), Relaxed);
    }

    pub fn budget(&self) -> usize {
        self.budget.load(Relaxed)
    }

    /// Client sockets open now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    fn bucket(&self, key: &AddrKey) -> &Mutex<HashMap<AddrKey, u32>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        &self.table[h as usize % self.table.len()]
    }

    /// Counts one more connection for `key` unless it is at the per-IP cap.
    fn try_add_ip(&self, key: AddrKey) -> bool {
        let Some(cap) = self.per_ip else {
            return true;
        };
        let mut t = self.bucket(&key).lock().unwrap_or_else(|e| e.into_inner());
        let n = t.entry(key).or_insert(0);
        if *n >= cap {
            if *n == 0 {
                t.remove(&key);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn remove_ip(&self, key: AddrKey) {
        if self.per_ip.is_none() {
            return;
        }
        let mut t = self.bucket(&key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = t.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                t.remove(&key);
            }
        }
    }

    /// Connections `key` holds on the whole node (0 without a per-IP cap: not counted then).
    pub fn ip_count(&self, key: AddrKey) -> u32 {
        if self.per_ip.is_none() {
            return 0;
        }
        let t = self.bucket(&key).lock().unwrap_or_else(|e| e.into_inner());
        t.get(&key).copied().unwrap_or(0)
    }
}

impl Admission {
    /// Its part of the Prometheus scrape.
    pub fn render(&self, o: &mut String) {
        use std::fmt::Write as _;
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            o,
            "bts_sockets_open",
            "gauge",
            "Client sockets open, every phase (HTTP, WebSocket, closing).",
        );
        let _ = writeln!(o, "bts_sockets_open {}", self.open());
        family(
            o,
            "bts_sockets_limit",
            "gauge",
            "Most client sockets: the open-files limit less fd_reserve and the daemon's own.",
        );
        let _ = writeln!(o, "bts_sockets_limit {}", self.budget());
        family(
            o,
            "bts_connections_refused_total",
            "counter",
            "Sockets refused: socket budget spent (descriptors), per-IP cap (per_ip), PROXY \
             protocol header missing, malformed or from an untrusted address (proxy).",
        );
        for (reason, n) in [
            ("descriptors", &self.refused_descriptors),
            ("per_ip", &self.refused_per_ip),
            ("proxy", &self.refused_proxy),
        ] {
            let _ = writeln!(
                o,
                "bts_connections_refused_total{{reason=\"{reason}\"}} {}",
                n.load(Relaxed)
            );
        }
        family(
            o,
            "bts_connections_evicted_total",
            "counter",
            "Connections of the address holding the most closed to make room for another address.",
        );
        let _ = writeln!(
            o,
            "bts_connections_evicted_total {}",
            self.evicted.load(Relaxed)
        );
        family(
            o,
            "bts_accept_errors_total",
            "counter",
            "accept() failures (EMFILE: out of descriptors).",
        );
        let _ = writeln!(
            o,
            "bts_accept_errors_total {}",
            self.accept_errors.load(Relaxed)
        );
    }
}

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
        adm.open.fetch_sub(1, Relaxed);
    }
}

/// Admits a socket just accepted from `peer`, or says why not. `trusted`: the peer is a listed
/// load balancer, whose sockets are counted against the client it names later
/// ([`Ticket::attribute`]). With the ticket: whether a connection of another address was
/// closed to make room.
pub fn admit(shard: &Rc<Shard>, peer: IpAddr, trusted: bool) -> Result<(Ticket, bool), Refusal> {
    let adm = &shard.shared.admission;
    let n = adm.open.fetch_add(1, Relaxed) + 1;
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
    if n > budget.saturating_add(adm.headroom.load(Relaxed)) {
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn keys_group_ipv6_by_64_and_unmap_ipv4() {
        assert_eq!(AddrKey::of(ip("192.0.2.1")), AddrKey::V4([192, 0, 2, 1]));
        assert_eq!(
            AddrKey::of(ip("::ffff:192.0.2.1")),
            AddrKey::of(ip("192.0.2.1"))
        );
        assert_eq!(
            AddrKey::of(ip("2001:db8:1:2:aaaa::1")),
            AddrKey::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            AddrKey::of(ip("2001:db8:1:2::1")),
            AddrKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            AddrKey::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(AddrKey::of(ip("192.0.2.1")).to_string(), "192.0.2.1");
    }

    #[test]
    fn per_ip_table_caps_and_forgets() {
        let a = Admission::new(256, Some(2));
        let k = AddrKey::of(ip("192.0.2.1"));
        assert!(a.try_add_ip(k));
        assert!(a.try_add_ip(k));
        assert!(!a.try_add_ip(k));
        assert_eq!(a.ip_count(k), 2);
        a.remove_ip(k);
        assert!(a.try_add_ip(k));
        a.remove_ip(k);
        a.remove_ip(k);
        assert_eq!(a.ip_count(k), 0);
        let entries: usize = a.table.iter().map(|t| t.lock().unwrap().len()).sum();
        assert_eq!(entries, 0, "an address without connections has no entry");
        // No cap: nothing counted, nothing stored.
        let off = Admission::new(256, None);
        for _ in 0..10 {
            assert!(off.try_add_ip(k));
        }
        assert!(off.table.is_empty());
    }

    #[test]
    fn the_refusal_answers_are_well_formed_http() {
        for r in [Refusal::Descriptors, Refusal::PerIp] {
            let text = std::str::from_utf8(r.http_response()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, body.len(), "{text}");
            let json = body.trim_end();
            assert!(
                serde_json::from_str::<serde_json::Value>(json).is_ok(),
                "{json}"
            );
        }
    }

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
