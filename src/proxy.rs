//! Who a connection really comes from when a load balancer stands in front: the PROXY protocol
//! header (v1 text and v2 binary, HAProxy's `proxy-protocol.txt`), the trusted-proxy address
//! list, and the client address in `X-Forwarded-For`.
//!
//! Pure: no I/O, no clock. `shard::accept` reads the bytes and decides what to believe; this
//! module only parses and never trusts an address by itself: callers check the peer against a
//! [`Trusted`] list before using anything parsed here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature (proxy-protocol.txt §2.2): no HTTP request or TLS record starts this way.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 prefix (§2.1).
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 line, CRLF included (§2.1: "107 characters").
pub const V1_MAX: usize = 107;
/// Longest v2 header accepted, signature and TLVs included. The format allows 16 + 65,535 bytes;
/// real load balancers send a few dozen bytes of TLVs (AWS: the VPC endpoint id), so a header
/// beyond this is refused rather than buffered.
pub const V2_MAX: usize = 4096;

/// A complete header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The client's address as the proxy saw it; `None` when the header carries none (v1
    /// `UNKNOWN`, v2 `LOCAL` such as a health check, or an address family other than TCP over
    /// IPv4/IPv6): the spec says to use the connection's own address then.
    pub source: Option<SocketAddr>,
    /// Bytes the header took; the connection's own data starts after them.
    pub len: usize,
}

/// What the bytes at the start of a connection are so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header.
    Header(Header),
    /// The start of a header; `need` is its full length once known (v2 after 16 bytes).
    Incomplete { need: Option<usize> },
    /// Not a PROXY header at all (an HTTP request, a TLS handshake...).
    NotProxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed PROXY protocol v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY protocol v2 header: {0}")]
    V2(&'static str),
}

/// Parses a PROXY header from the front of `buf` (v1 or v2, told apart by their signatures).
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if is_prefix_of(buf, &V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if is_prefix_of(buf, V1_PREFIX) {
        return parse_v1(buf);
    }
    Ok(Parsed::NotProxy)
}

/// `buf` and `sig` agree on their common length (so `buf` may be, or may become, `sig...`).
fn is_prefix_of(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    !buf.is_empty() && buf[..n] == sig[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::V1("no CRLF within 107 bytes"));
        }
        if window
            .iter()
            .any(|&b| !(0x20..0x7f).contains(&b) && b != b'\r')
        {
            return Err(ProxyError::V1("not printable ASCII"));
        }
        return Ok(Parsed::Incomplete { need: None });
    };
    let line =
        std::str::from_utf8(&buf[V1_PREFIX.len()..end]).map_err(|_| ProxyError::V1("not ASCII"))?;
    let len = end + 2;
    let mut parts = line.split(' ');
    let proto = parts.next().unwrap_or_default();
    if proto == "UNKNOWN" {
        // §2.1: the receiver must ignore anything after UNKNOWN.
        return Ok(Parsed::Header(Header { source: None, len }));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::V1("expected 4 fields after the protocol"));
    };
    // The destination is validated but not used: it is this server.
    let (src, _dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (
            src.parse::<Ipv4Addr>()
                .map_err(|_| ProxyError::V1("bad IPv4 source"))?
                .into(),
            dst.parse::<Ipv4Addr>()
                .map_err(|_| ProxyError::V1("bad IPv4 destination"))?
                .into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>()
                .map_err(|_| ProxyError::V1("bad IPv6 source"))?
                .into(),
            dst.parse::<Ipv6Addr>()
                .map_err(|_| ProxyError::V1("bad IPv6 destination"))?
                .into(),
        ),
        _ => return Err(ProxyError::V1("protocol must be TCP4, TCP6 or UNKNOWN")),
    };
    let sport = port(sport).ok_or(ProxyError::V1("bad source port"))?;
    port(dport).ok_or(ProxyError::V1("bad destination port"))?;
    Ok(Parsed::Header(Header {
        source: Some(SocketAddr::new(src, sport)),
        len,
    }))
}

/// A decimal port: digits only (no sign, no spaces), at most 65535.
fn port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete { need: None });
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ProxyError::V2("command is neither LOCAL nor PROXY")),
    };
    let fam = buf[13];
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > V2_MAX {
        return Err(ProxyError::V2("longer than 4096 bytes"));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete { need: Some(len) });
    }
    let addr = &buf[16..len];
    // §2.2: the address block's size is fixed by the family; TLVs may follow it.
    let source = match fam {
        // TCP over IPv4 / IPv6.
        0x11 => {
            let a = addr
                .get(..12)
                .ok_or(ProxyError::V2("IPv4 address block shorter than 12 bytes"))?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        0x21 => {
            let a = addr
                .get(..36)
                .ok_or(ProxyError::V2("IPv6 address block shorter than 36 bytes"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // UNSPEC, UDP, UNIX sockets: no TCP client address to use.
        _ => None,
    };
    Ok(Parsed::Header(Header {
        // §2.2: for LOCAL the receiver must ignore the address block.
        source: if local { None } else { source },
        len,
    }))
}

/// A v1 header line for `source` (what a load balancer sends); for tests and tools.
pub fn v1_line(source: SocketAddr, dest: SocketAddr) -> String {
    let proto = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        source.ip(),
        dest.ip(),
        source.port(),
        dest.port()
    )
}

/// A v2 PROXY header for `source` (what a load balancer sends); for tests and tools. Both
/// addresses must be of the same family.
pub fn v2_header(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source, dest) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&dest.port().to_be_bytes());
    out
}

/// An address or network (`10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let s = s.trim();
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { net: ip, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a dual-stack listener reports for an
/// IPv4 client) as the IPv4 address they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The load balancers whose PROXY headers and `X-Forwarded-For` are believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trusted(pub Vec<Cidr>);

impl Trusted {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client behind `hop` (an address a trusted proxy connected from, or that a PROXY
    /// header named) given the `X-Forwarded-For` value: walking right to left, the first
    /// address that is not a trusted proxy. Entries left of it were written by the client
    /// itself and are ignored (anyone can send `X-Forwarded-For: 1.2.3.4`). `hop` itself when it
    /// is not trusted, when there is no header, or when an entry does not parse (what a trusted
    /// proxy appended is well-formed; anything else ends the chain of trust).
    pub fn client(&self, hop: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let mut client = canonical(hop);
        if !self.contains(client) {
            return client;
        }
        let Some(xff) = forwarded_for else {
            return client;
        };
        for entry in xff.rsplit(',') {
            let Some(ip) = forwarded_ip(entry) else {
                return client;
            };
            client = canonical(ip);
            if !self.contains(client) {
                return client;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: `192.0.2.1`, `2001:db8::1`, `192.0.2.1:5000` or
/// `[2001:db8::1]:5000` (some proxies append the port).
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(ip);
    }
    e.parse::<SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn header(buf: &[u8]) -> Header {
        match parse(buf) {
            Ok(Parsed::Header(h)) => h,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn v1_lines() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n",
                Some("203.0.113.7:51000"),
            ),
            (
                "PROXY TCP6 2001:db8::7 2001:db8::1 4000 80\r\n",
                Some("[2001:db8::7]:4000"),
            ),
            ("PROXY UNKNOWN\r\n", None),
            (
                "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
                None,
            ),
        ];
        for (line, want) in cases {
            let mut buf = line.as_bytes().to_vec();
            buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let h = header(&buf);
            assert_eq!(h.source, want.map(sa), "{line}");
            assert_eq!(h.len, line.len(), "{line}");
        }
    }

    #[test]
    fn v1_refusals() {
        let bad = [
            "PROXY TCP4 203.0.113.7 10.0.0.1 51000\r\n",
            "PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            "PROXY TCP6 203.0.113.7 10.0.0.1 1 2\r\n",
            "PROXY TCP4 203.0.113.7 10.0.0.1 +1 2\r\n",
            "PROXY TCP4 203.0.113.7 10.0.0.1 65536 2\r\n",
            "PROXY TCP4 203.0.113.7  10.0.0.1 1 2\r\n",
            "PROXY UDP4 203.0.113.7 10.0.0.1 1 2\r\n",
            "PROXY TCP4 203.0.113.7 10.0.0.1 1 2 3\r\n",
        ];
        for line in bad {
            assert!(
                matches!(parse(line.as_bytes()), Err(ProxyError::V1(_))),
                "{line}"
            );
        }
        // No CRLF within 107 bytes.
        let long = format!("PROXY TCP4 {}", "1".repeat(120));
        assert!(parse(long.as_bytes()).is_err());
        // A control character before the CRLF arrived.
        assert!(parse(b"PROXY TCP4 \x00").is_err());
    }

    #[test]
    fn v2_headers() {
        let src = sa("203.0.113.7:51000");
        let dst = sa("10.0.0.1:443");
        let h = v2_header(src, dst);
        assert_eq!(h.len(), 28);
        assert_eq!(
            header(&h),
            Header {
                source: Some(src),
                len: 28
            }
        );

        let src6 = sa("[2001:db8::7]:4000");
        let h6 = v2_header(src6, sa("[2001:db8::1]:80"));
        assert_eq!(
            header(&h6),
            Header {
                source: Some(src6),
                len: 52
            }
        );

        // TLVs after the addresses (length covers them) are skipped.
        let mut tlv = v2_header(src, dst);
        tlv[14..16].copy_from_slice(&(12u16 + 7).to_be_bytes());
        tlv.extend_from_slice(&[0xEA, 0, 4, b'v', b'p', b'c', b'e']);
        tlv.extend_from_slice(b"GET /");
        assert_eq!(
            header(&tlv),
            Header {
                source: Some(src),
                len: 35
            }
        );

        // LOCAL (a health check from the proxy itself): no address, whatever the block says.
        let mut local = v2_header(src, dst);
        local[12] = 0x20;
        assert_eq!(
            header(&local),
            Header {
                source: None,
                len: 28
            }
        );

        // UNSPEC family: no address.
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 0]);
        assert_eq!(
            header(&unspec),
            Header {
                source: None,
                len: 16
            }
        );
    }

    #[test]
    fn v2_refusals() {
        let h = v2_header(sa("203.0.113.7:1"), sa("10.0.0.1:2"));
        let mut v1 = h.clone();
        v1[12] = 0x11;
        assert!(parse(&v1).is_err(), "version 1 in the binary format");
        let mut cmd = h.clone();
        cmd[12] = 0x22;
        assert!(parse(&cmd).is_err(), "command 2");
        let mut short = h.clone();
        short[14..16].copy_from_slice(&8u16.to_be_bytes());
        short.truncate(24);
        assert!(parse(&short).is_err(), "IPv4 block of 8 bytes");
        let mut huge = h;
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(parse(&huge).is_err(), "65,535 bytes of TLVs");
    }

    #[test]
    fn incomplete_and_not_proxy() {
        let h = v2_header(sa("203.0.113.7:1"), sa("10.0.0.1:2"));
        assert_eq!(parse(&h[..5]), Ok(Parsed::Incomplete { need: None }));
        assert_eq!(parse(&h[..20]), Ok(Parsed::Incomplete { need: Some(28) }));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete { need: None }));
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4"),
            Ok(Parsed::Incomplete { need: None })
        );
        for not in [
            &b"GET /app/key HTTP/1.1\r\n"[..],
            b"POST /apps/1/events",
            b"PUT",
            b"\x16\x03\x01\x02\x00",
            b"\r\n\r\nGET",
        ] {
            assert_eq!(parse(not), Ok(Parsed::NotProxy), "{not:?}");
        }
        assert_eq!(parse(b""), Ok(Parsed::NotProxy));
    }

    #[test]
    fn cidrs() {
        let c = |s: &str| Cidr::parse(s).unwrap_or_else(|| panic!("{s}"));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!c("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(c("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(c("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!c("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(c("::/0").contains(ip("::1")));
        // A dual-stack listener reports IPv4 clients as mapped IPv6.
        assert!(c("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        for bad in [
            "10.0.0.0/33",
            "2001:db8::/129",
            "example.com",
            "10.0.0.0/x",
            "",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn forwarded_for_takes_the_rightmost_untrusted_address() {
        let t = Trusted(vec![
            Cidr::parse("10.0.0.0/8").unwrap(),
            Cidr::parse("127.0.0.5").unwrap(),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let lb = ip("127.0.0.5");
        let cases: &[(IpAddr, Option<&str>, &str)] = &[
            // Not from a trusted proxy: the header is the client's own claim.
            (ip("198.51.100.1"), Some("203.0.113.9"), "198.51.100.1"),
            (lb, None, "127.0.0.5"),
            (lb, Some("203.0.113.9"), "203.0.113.9"),
            // A forged entry on the left is ignored.
            (lb, Some("1.1.1.1, 203.0.113.9"), "203.0.113.9"),
            // Two trusted hops, then the client.
            (lb, Some("6.6.6.6,203.0.113.9, 10.1.1.1"), "203.0.113.9"),
            (lb, Some("203.0.113.9:5000"), "203.0.113.9"),
            (lb, Some("[2001:db8::9]:5000"), "2001:db8::9"),
            // Every entry trusted: the left-most one.
            (lb, Some("10.0.0.2, 10.0.0.3"), "10.0.0.2"),
            // Garbage from the right ends the chain at the last trusted hop.
            (lb, Some("203.0.113.9, bogus"), "127.0.0.5"),
            (lb, Some("203.0.113.9, unknown, 10.0.0.9"), "10.0.0.9"),
        ];
        for (hop, xff, want) in cases {
            assert_eq!(t.client(*hop, *xff), ip(want), "{hop} {xff:?}");
        }
    }

    #[test]
    fn fuzz_seeds_are_the_headers_they_claim() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/proxy_header");
        let seed = |n: u8| std::fs::read(dir.join(format!("seed-{n}"))).unwrap();
        let want = [
            Some("203.0.113.7:51000"),
            Some("[2001:db8::7]:4000"),
            None,
            Some("203.0.113.7:51000"),
            Some("[2001:db8::7]:4000"),
            None,
        ];
        for (n, want) in want.iter().enumerate() {
            assert_eq!(header(&seed(n as u8)).source, want.map(sa), "seed-{n}");
        }
        assert_eq!(parse(&seed(6)), Ok(Parsed::NotProxy));
    }

    proptest! {
        /// Whatever the bytes, parsing never panics, and a header found is within the input.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Parsed::Header(h)) = parse(&bytes) {
                prop_assert!(h.len <= bytes.len());
            }
        }

        /// Any prefix of a valid header is Incomplete, the whole header parses to the same
        /// result whatever follows it, and the address round-trips.
        #[test]
        fn prefixes_and_suffixes(
            v4 in any::<[u8; 4]>(),
            v6 in any::<[u8; 16]>(),
            port in any::<u16>(),
            six in any::<bool>(),
            binary in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let ip: IpAddr = if six { Ipv6Addr::from(v6).into() } else { Ipv4Addr::from(v4).into() };
            let dst_ip: IpAddr = if six { Ipv6Addr::LOCALHOST.into() } else { Ipv4Addr::LOCALHOST.into() };
            let src = SocketAddr::new(ip, port);
            let dst = SocketAddr::new(dst_ip, 443);
            let h = if binary { v2_header(src, dst) } else { v1_line(src, dst).into_bytes() };
            for cut in 1..h.len() {
                let incomplete = matches!(parse(&h[..cut]), Ok(Parsed::Incomplete { .. }));
                prop_assert!(incomplete, "cut at {}", cut);
            }
            let mut with_tail = h.clone();
            with_tail.extend_from_slice(&tail);
            prop_assert_eq!(parse(&with_tail), Ok(Parsed::Header(Header { source: Some(src), len: h.len() })));
        }
    }
}
