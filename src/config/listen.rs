//! Listen addresses: `ip:port`, `[v6]:port`, and port ranges `ip:first-last`.

use std::net::{IpAddr, SocketAddr};

/// The most ports one range may claim; a typo like `8000-80000` should be an
/// error, not 72,000 sockets.
pub const MAX_RANGE_PORTS: u32 = 1024;

/// Parses one `listen` entry into the socket addresses it stands for.
pub fn parse_listen(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let (host, ports) = text.rsplit_once(':').ok_or_else(|| {
        format!("`{text}` is not an address: expected `ip:port`, `[ipv6]:port` or `ip:first-last`")
    })?;
    let ip = parse_host(host)
        .ok_or_else(|| format!("`{host}` is not an IP address (hostnames are not resolved; use e.g. 127.0.0.1 or [::1])"))?;
    let (first, last) = ports
        .split_once('-')
        .ok_or_else(|| format!("`{ports}` is not a port (0-65535) or a range `first-last`"))?;
    let first: u16 = first
        .trim()
        .parse()
        .map_err(|_| format!("`{first}` is not a port number (1-65535)"))?;
    let last: u16 = last
        .trim()
        .parse()
        .map_err(|_| format!("`{last}` is not a port number (1-65535)"))?;
    if first == 0 || first > last {
        return Err(format!(
            "port range `{ports}` is empty or reversed: write it low-high, e.g. `8000-8010`"
        ));
    }
    let count = u32::from(last) - u32::from(first) + 1;
    if count > MAX_RANGE_PORTS {
        return Err(format!(
            "port range `{ports}` spans {count} ports; at most {MAX_RANGE_PORTS} per range"
        ));
    }
    Ok((first..=last).map(|p| SocketAddr::new(ip, p)).collect())
}

fn parse_host(host: &str) -> Option<IpAddr> {
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    inner.parse().ok()
}

/// True when binding both addresses on one host would collide: same port, and
/// the same IP or a wildcard of the same family (v6 sockets are bound
/// v6-only, so `[::]` and `0.0.0.0` do not collide). Port 0 never collides:
/// the OS picks a free port.
pub fn addrs_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 || a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_v6_and_range() {
        assert_eq!(parse_listen("127.0.0.1:80").unwrap().len(), 1);
        assert_eq!(parse_listen("[::1]:80").unwrap()[0].port(), 80);
        let r = parse_listen("127.0.0.1:8000-8010").unwrap();
        assert_eq!((r.len(), r[0].port(), r[10].port()), (11, 8000, 8010));
        assert_eq!(parse_listen("[::1]:9000-9001").unwrap().len(), 2);
    }

    #[test]
    fn rejects_bad_listen_entries_with_reason() {
        assert!(
            parse_listen("localhost:80")
                .unwrap_err()
                .contains("not an IP")
        );
        assert!(
            parse_listen("127.0.0.1:90-80")
                .unwrap_err()
                .contains("reversed")
        );
        assert!(
            parse_listen("127.0.0.1:1-5000")
                .unwrap_err()
                .contains("at most")
        );
        assert!(
            parse_listen("127.0.0.1")
                .unwrap_err()
                .contains("not an address")
        );
    }

    #[test]
    fn wildcard_collides_with_specific_same_family_only() {
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(addrs_collide(p("0.0.0.0:80"), p("127.0.0.1:80")));
        assert!(!addrs_collide(p("[::]:80"), p("127.0.0.1:80")));
        assert!(!addrs_collide(p("127.0.0.1:0"), p("127.0.0.1:0")));
        assert!(!addrs_collide(p("127.0.0.1:80"), p("127.0.0.2:80")));
    }
}
