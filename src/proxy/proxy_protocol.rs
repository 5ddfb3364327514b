//! The PROXY protocol on both sides of a connection: reading the header a
//! trusted load balancer puts before its client's bytes, and writing one
//! before ours to backends that want it. The wire format is the `ppp`
//! crate's; this module decides how much to read and what to trust.

use crate::config::{ProxyVersion, ProxyVersions};
use ppp::v2::{Command, Protocol};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The largest header taken. A v1 header is at most 107 bytes; v2 may
/// carry TLVs (a cloud load balancer's endpoint id, TLS details), which
/// stay far below this.
pub const MAX_HEADER: usize = 4096;

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
const V1_MAX: usize = 107;

/// The client and the address it connected to, as the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

// Both versions carry the addresses in `ppp`'s one pair of types.
impl From<ppp::v1::IPv4> for Addresses {
    fn from(a: ppp::v1::IPv4) -> Self {
        Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }
    }
}

impl From<ppp::v1::IPv6> for Addresses {
    fn from(a: ppp::v1::IPv6) -> Self {
        Addresses {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        }
    }
}

/// Why a connection was closed before its header was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The TCP peer is not among `proxy_protocol_from`.
    Untrusted,
    /// The bytes do not start with a header at all.
    Missing,
    /// A header of the version the listener does not take.
    WrongVersion,
    /// A header that does not parse.
    Malformed,
    /// Longer than `MAX_HEADER` (or a v1 line longer than 107 bytes).
    Oversized,
    /// Not all there within `proxy_protocol_timeout`.
    Timeout,
    /// The peer closed (or reset) before the header was complete.
    Closed,
}

impl Rejected {
    pub const ALL: [Rejected; 7] = [
        Rejected::Untrusted,
        Rejected::Missing,
        Rejected::WrongVersion,
        Rejected::Malformed,
        Rejected::Oversized,
        Rejected::Timeout,
        Rejected::Closed,
    ];

    /// The access log's `outcome` for a connection closed for this.
    pub fn outcome(self) -> &'static str {
        match self {
            Rejected::Untrusted => "proxy_header_untrusted",
            Rejected::Missing => "proxy_header_missing",
            Rejected::WrongVersion => "proxy_header_wrong_version",
            Rejected::Malformed => "proxy_header_malformed",
            Rejected::Oversized => "proxy_header_oversized",
            Rejected::Timeout => "proxy_header_timeout",
            Rejected::Closed => "proxy_header_closed",
        }
    }

    /// The `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Rejected::Untrusted => "untrusted",
            Rejected::Missing => "missing",
            Rejected::WrongVersion => "wrong_version",
            Rejected::Malformed => "malformed",
            Rejected::Oversized => "oversized",
            Rejected::Timeout => "timeout",
            Rejected::Closed => "closed",
        }
    }
}

/// What the bytes so far amount to.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A whole header of `len` bytes; `None` for a LOCAL (v2) or UNKNOWN
    /// (v1) one, whose connection speaks for itself (a health check).
    Header {
        len: usize,
        addrs: Option<Addresses>,
    },
    Incomplete,
    Rejected(Rejected),
}

/// Reads the header off `stream`, consuming exactly its bytes, within
/// `timeout`. Ok(None): a LOCAL or UNKNOWN header.
pub async fn read_header(
    stream: &mut TcpStream,
    versions: ProxyVersions,
    timeout: Duration,
) -> Result<Option<Addresses>, Rejected> {
    match tokio::time::timeout(timeout, read(stream, versions)).await {
        Ok(r) => r,
        Err(_) => Err(Rejected::Timeout),
    }
}

/// Peeks, so no byte past the header is taken from the client. A header
/// split over segments is consumed as far as it has come (the next peek
/// then waits for more instead of spinning on the same bytes).
async fn read(
    stream: &mut TcpStream,
    versions: ProxyVersions,
) -> Result<Option<Addresses>, Rejected> {
    let mut taken: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 512];
    loop {
        let room = (MAX_HEADER - taken.len()).min(buf.len());
        let n = stream
            .peek(&mut buf[..room])
            .await
            .map_err(|_| Rejected::Closed)?;
        if n == 0 {
            return Err(Rejected::Closed);
        }
        let parsed = if taken.is_empty() {
            parse(&buf[..n], versions)
        } else {
            let mut all = taken.clone();
            all.extend_from_slice(&buf[..n]);
            parse(&all, versions)
        };
        match parsed {
            Parsed::Header { len, addrs } => {
                let rest = len - taken.len();
                stream
                    .read_exact(&mut buf[..rest])
                    .await
                    .map_err(|_| Rejected::Closed)?;
                return Ok(addrs);
            }
            Parsed::Rejected(r) => return Err(r),
            Parsed::Incomplete if taken.len() + n >= MAX_HEADER => return Err(Rejected::Oversized),
            Parsed::Incomplete => {
                stream
                    .read_exact(&mut buf[..n])
                    .await
                    .map_err(|_| Rejected::Closed)?;
                taken.extend_from_slice(&buf[..n]);
                if n == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
            }
        }
    }
}

fn parse(bytes: &[u8], versions: ProxyVersions) -> Parsed {
    let starts = |sig: &[u8]| {
        let k = bytes.len().min(sig.len());
        bytes[..k] == sig[..k]
    };
    if starts(V2_SIGNATURE) {
        if versions == ProxyVersions::V1 {
            return Parsed::Rejected(Rejected::WrongVersion);
        }
        parse_v2(bytes)
    } else if starts(V1_PREFIX) {
        if versions == ProxyVersions::V2 {
            return Parsed::Rejected(Rejected::WrongVersion);
        }
        parse_v1(bytes)
    } else {
        Parsed::Rejected(Rejected::Missing)
    }
}

fn parse_v1(bytes: &[u8]) -> Parsed {
    let Some(cr) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() >= V1_MAX {
            Parsed::Rejected(Rejected::Oversized)
        } else {
            Parsed::Incomplete
        };
    };
    let line = &bytes[..cr + 2];
    if line.len() > V1_MAX {
        return Parsed::Rejected(Rejected::Oversized);
    }
    match ppp::v1::Header::try_from(line) {
        Ok(h) => Parsed::Header {
            len: line.len(),
            addrs: match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(a.into()),
                ppp::v1::Addresses::Tcp6(a) => Some(a.into()),
                ppp::v1::Addresses::Unknown => None,
            },
        },
        Err(_) => Parsed::Rejected(Rejected::Malformed),
    }
}

fn parse_v2(bytes: &[u8]) -> Parsed {
    match ppp::v2::Header::try_from(bytes) {
        Ok(h) => Parsed::Header {
            len: h.len(),
            addrs: v2_addresses(&h),
        },
        Err(ppp::v2::ParseError::Partial(_, need)) if 16 + need > MAX_HEADER => {
            Parsed::Rejected(Rejected::Oversized)
        }
        Err(ppp::v2::ParseError::Incomplete(_) | ppp::v2::ParseError::Partial(..)) => {
            Parsed::Incomplete
        }
        Err(_) => Parsed::Rejected(Rejected::Malformed),
    }
}

/// A PROXY command over TCP names the client; LOCAL, UDP and Unix
/// sockets leave the connection's own addresses in force.
fn v2_addresses(h: &ppp::v2::Header<'_>) -> Option<Addresses> {
    if h.command != Command::Proxy || h.protocol != Protocol::Stream {
        return None;
    }
    match h.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(a.into()),
        ppp::v2::Addresses::IPv6(a) => Some(a.into()),
        _ => None,
    }
}

/// The header to send a backend for a client at `a.source` that
/// connected to `a.destination`. Mixed families (an IPv4 client reaching
/// an IPv6 listener) are sent with both sides in IPv6, as the v4-mapped
/// form, which both versions can carry.
pub fn encode(version: ProxyVersion, a: Addresses) -> Vec<u8> {
    let (source, destination) = same_family(a.source, a.destination);
    match version {
        ProxyVersion::V1 => {
            // Its Display is the whole line, "PROXY ... \r\n".
            ppp::v1::Addresses::from((source, destination))
                .to_string()
                .into_bytes()
        }
        ProxyVersion::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | Command::Proxy,
            Protocol::Stream,
            (source, destination),
        )
        .build()
        .expect("a header without TLVs always fits"),
    }
}

/// The header for a connection of portshift's own (a probe): v2 LOCAL,
/// v1 UNKNOWN; the backend takes the connection's own addresses.
pub fn local(version: ProxyVersion) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::Unknown.to_string().into_bytes(),
        ProxyVersion::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | Command::Local,
            Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .expect("an empty header always fits"),
    }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let six = |s: SocketAddr| match s {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (six(a), six(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(s: &str, d: &str) -> Addresses {
        Addresses {
            source: s.parse().unwrap(),
            destination: d.parse().unwrap(),
        }
    }

    #[test]
    fn what_is_encoded_parses_back_whole_in_both_versions_and_families() {
        for a in [
            addrs("203.0.113.7:51234", "10.0.0.1:443"),
            addrs("[2001:db8::7]:51234", "[2001:db8::1]:443"),
        ] {
            for v in [ProxyVersion::V1, ProxyVersion::V2] {
                let mut wire = encode(v, a);
                let len = wire.len();
                wire.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(
                    parse(&wire, ProxyVersions::Any),
                    Parsed::Header {
                        len,
                        addrs: Some(a)
                    },
                    "{v:?} {a:?}"
                );
            }
        }
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete_never_wrong() {
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            let wire = encode(v, addrs("[2001:db8::7]:1", "[2001:db8::1]:2"));
            for k in 1..wire.len() {
                assert_eq!(
                    parse(&wire[..k], ProxyVersions::Any),
                    Parsed::Incomplete,
                    "{v:?} {k}"
                );
            }
        }
    }

    #[test]
    fn local_and_unknown_headers_leave_the_connection_as_it_is() {
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            let wire = local(v);
            assert_eq!(
                parse(&wire, ProxyVersions::Any),
                Parsed::Header {
                    len: wire.len(),
                    addrs: None
                }
            );
        }
    }

    #[test]
    fn bad_headers_are_rejected_by_reason() {
        let v1 = encode(ProxyVersion::V1, addrs("1.2.3.4:5", "6.7.8.9:10"));
        let v2 = encode(ProxyVersion::V2, addrs("1.2.3.4:5", "6.7.8.9:10"));
        let cases: Vec<(Vec<u8>, ProxyVersions, Rejected)> = vec![
            (
                b"GET / HTTP/1.1\r\n".to_vec(),
                ProxyVersions::Any,
                Rejected::Missing,
            ),
            (v1.clone(), ProxyVersions::V2, Rejected::WrongVersion),
            (v2.clone(), ProxyVersions::V1, Rejected::WrongVersion),
            (
                b"PROXY TCP4 1.2.3.999 6.7.8.9 5 10\r\n".to_vec(),
                ProxyVersions::Any,
                Rejected::Malformed,
            ),
            (
                b"PROXY TCP9 x\r\n".to_vec(),
                ProxyVersions::V1,
                Rejected::Malformed,
            ),
            (
                [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat(),
                ProxyVersions::Any,
                Rejected::Oversized,
            ),
            // Version nibble 3.
            (
                [V2_SIGNATURE, &[0x31, 0x11, 0, 12], &[0; 12]].concat(),
                ProxyVersions::Any,
                Rejected::Malformed,
            ),
            // Announces 60000 bytes.
            (
                [V2_SIGNATURE, &[0x21, 0x11, 0xea, 0x60]].concat(),
                ProxyVersions::Any,
                Rejected::Oversized,
            ),
        ];
        for (wire, versions, want) in cases {
            assert_eq!(
                parse(&wire, versions),
                Parsed::Rejected(want),
                "{:?}",
                String::from_utf8_lossy(&wire)
            );
        }
    }

    #[test]
    fn an_ipv4_client_of_an_ipv6_listener_is_sent_v4_mapped() {
        let a = addrs("192.0.2.1:1000", "[2001:db8::1]:443");
        let wire = encode(ProxyVersion::V1, a);
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1000 443\r\n"
        );
    }
}
