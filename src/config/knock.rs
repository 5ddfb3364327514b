//! `knock` on a listener: the port-knocking sequence that opens it to a
//! source, validated.

use super::Listener;
use super::raw::{RawListener, S};
use super::validate::Validator;
use std::net::SocketAddr;
use std::time::Duration;

pub const DEFAULT_KNOCK_WITHIN: Duration = Duration::from_secs(5);
pub const DEFAULT_KNOCK_OPEN_FOR: Duration = Duration::from_secs(30);
pub const DEFAULT_KNOCK_MAX_SOURCES: u32 = 10_000;
/// Longer sequences add nothing a scanner could not also try.
const MAX_SEQUENCE: usize = 16;

/// A listener that admits a source only after it knocked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knock {
    /// The knock ports, in order; bound on every address the listener
    /// listens on.
    pub sequence: Vec<u16>,
    /// The whole sequence must come within this of its first knock.
    pub within: Duration,
    /// How long a source that knocked is admitted.
    pub open_for: Duration,
    /// Sources tracked at once (knocking or admitted); past it the oldest
    /// is forgotten.
    pub max_sources: u32,
}

impl Listener {
    /// Every address this listener binds: its own, then the knock ports
    /// on each of its addresses' IPs (each once).
    pub fn all_addrs(&self) -> Vec<SocketAddr> {
        let mut out = self.addrs.clone();
        out.extend(self.knock_addrs());
        out
    }

    /// The knock ports, on each distinct IP the listener listens on.
    pub fn knock_addrs(&self) -> Vec<SocketAddr> {
        let Some(k) = &self.knock else {
            return Vec::new();
        };
        let mut ips = Vec::new();
        for a in &self.addrs {
            if !ips.contains(&a.ip()) {
                ips.push(a.ip());
            }
        }
        let mut out = Vec::new();
        for ip in ips {
            for &port in &k.sequence {
                let a = SocketAddr::new(ip, port);
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        out
    }
}

impl Validator<'_, '_> {
    pub(super) fn knock(&mut self, raw: &RawListener) -> Option<Knock> {
        let k = raw.knock.as_ref()?;
        let name = raw.name.get_ref();
        let r = k.get_ref();
        let sequence = self.knock_sequence(name, &r.sequence);
        if raw.proxy_protocol.is_some() {
            self.rep.error(
                k.span(),
                format!("listener `{name}`: `knock` and `proxy_protocol` cannot go together: knocks come from the TCP peer, which behind a load balancer is the balancer itself"),
                Some("knock on the load balancer, or remove one of them".into()),
            );
        }
        let within = self.duration(r.within.as_ref(), "knock.within", DEFAULT_KNOCK_WITHIN);
        let open_for = self.duration(
            r.open_for.as_ref(),
            "knock.open_for",
            DEFAULT_KNOCK_OPEN_FOR,
        );
        let max_sources = match &r.max_sources {
            Some(n) if *n.get_ref() == 0 => {
                self.rep.error(
                    n.span(),
                    format!("listener `{name}`: `knock.max_sources` must be at least 1"),
                    None,
                );
                DEFAULT_KNOCK_MAX_SOURCES
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_KNOCK_MAX_SOURCES,
        };
        Some(Knock {
            sequence,
            within,
            open_for,
            max_sources,
        })
    }

    fn knock_sequence(&mut self, listener: &str, raw: &S<Vec<S<u32>>>) -> Vec<u16> {
        let ports = raw.get_ref();
        if ports.is_empty() || ports.len() > MAX_SEQUENCE {
            self.rep.error(
                raw.span(),
                format!(
                    "listener `{listener}`: `knock.sequence` has {} ports; it needs 1 to {MAX_SEQUENCE}",
                    ports.len()
                ),
                Some("e.g. sequence = [7001, 7002, 7003]".into()),
            );
        }
        let mut out = Vec::new();
        for p in ports {
            match u16::try_from(*p.get_ref()) {
                Ok(port) if port != 0 => out.push(port),
                _ => self.rep.error(
                    p.span(),
                    format!(
                        "listener `{listener}`: knock port {} is not a port (1 to 65535)",
                        p.get_ref()
                    ),
                    None,
                ),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn with(extra: &str) -> Result<Config, String> {
        let text = format!(
            "[[group]]\nname = \"g\"\nbackends = [\"127.0.0.1:9\"]\n\n\
             [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:8000\", \"[::1]:8000\"]\nprimary = \"g\"\n{extra}\n\n\
             [[listener]]\nname = \"other\"\nlisten = [\"127.0.0.1:8100\"]\nprimary = \"g\"\n"
        );
        Config::parse(Path::new("k.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn knock_ports_are_bound_on_every_listen_ip_with_defaults() {
        let c = with("knock = { sequence = [7001, 7002] }").unwrap();
        let l = &c.listeners[0];
        let k = l.knock.as_ref().unwrap();
        assert_eq!(k.within, super::DEFAULT_KNOCK_WITHIN);
        assert_eq!(k.open_for, super::DEFAULT_KNOCK_OPEN_FOR);
        let addrs: Vec<String> = l.knock_addrs().iter().map(ToString::to_string).collect();
        assert_eq!(
            addrs,
            [
                "127.0.0.1:7001",
                "127.0.0.1:7002",
                "[::1]:7001",
                "[::1]:7002"
            ]
        );
    }

    #[test]
    fn mistakes_name_the_line_and_the_fix() {
        for (extra, want) in [
            ("knock = { sequence = [] }", "`knock.sequence` has 0 ports"),
            (
                "knock = { sequence = [7001, 70000] }",
                "knock port 70000 is not a port",
            ),
            (
                "knock = { sequence = [8100] }",
                "listeners `l` and `other` both claim port 8100 (127.0.0.1:8100 and 127.0.0.1:8100); 127.0.0.1:8100 is a knock port of `l`",
            ),
            (
                "knock = { sequence = [7001] }\nproxy_protocol = \"v1\"\nproxy_protocol_from = [\"10.0.0.1\"]",
                "`knock` and `proxy_protocol` cannot go together",
            ),
            (
                "knock = { sequence = [7001], max_sources = 0 }",
                "`knock.max_sources` must be at least 1",
            ),
            ("knock = { sequence = [7001], opn_for = \"1s\" }", "opn_for"),
        ] {
            let e = with(extra).unwrap_err();
            assert!(e.contains(want), "want {want:?} in:\n{e}");
        }
    }
}
