//! The node-wide part of admission (in `node::Shared`): the socket budget, the count of open
//! client sockets, the optional per-IP cap's table, and the refusal counters. The per-shard
//! fairness ranking and the accept-time decisions are `shard::admission`'s.
//!
//! Touched on accept, attribution and close only, never per event: the open count is one
//! atomic, the per-IP table 64 mutexes used only when a cap is configured.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

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

/// The node-wide part (in `node::Shared`).
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

    /// Counts a socket just accepted; the count with it.
    pub fn add_open(&self) -> usize {
        self.open.fetch_add(1, Relaxed) + 1
    }

    /// A socket counted by `add_open` closed.
    pub fn remove_open(&self) {
        self.open.fetch_sub(1, Relaxed);
    }

    /// Sockets beyond the budget that may still be admitted by making room.
    pub fn headroom(&self) -> usize {
        self.headroom.load(Relaxed)
    }

    fn bucket(&self, key: &AddrKey) -> &Mutex<HashMap<AddrKey, u32>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        &self.table[h as usize % self.table.len()]
    }

    /// Counts one more connection for `key` unless it is at the per-IP cap.
    pub fn try_add_ip(&self, key: AddrKey) -> bool {
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

    /// A socket counted by `try_add_ip` closed.
    pub fn remove_ip(&self, key: AddrKey) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
