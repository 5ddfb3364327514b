//! The PROXY protocol settings: a listener that takes the header from its
//! outer load balancers (`proxy_protocol`, `proxy_protocol_from`,
//! `proxy_protocol_timeout`) and a group whose backends are sent one
//! (`send_proxy_protocol`).

use super::diagnostic::did_you_mean;
use super::raw::{RawListener, S};
use super::validate::Validator;
use ipnet::IpNet;
use std::net::IpAddr;
use std::time::Duration;

/// How long a client may take to send its whole header by default; a
/// load balancer sends it at once, so only a stray client takes longer.
pub const DEFAULT_PROXY_PROTOCOL_TIMEOUT: Duration = Duration::from_secs(3);

/// Which header versions a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersions {
    V1,
    V2,
    Any,
}

/// The header version sent to a group's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

impl ProxyVersion {
    pub const NAMES: &[&str] = &["v1", "v2"];

    pub fn parse(s: &str) -> Option<ProxyVersion> {
        match s {
            "v1" => Some(ProxyVersion::V1),
            "v2" => Some(ProxyVersion::V2),
            _ => None,
        }
    }
}

/// A listener behind load balancers that speak the PROXY protocol: every
/// connection must come from one of them and start with a header, whose
/// source address is the client from then on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocolAccept {
    pub versions: ProxyVersions,
    /// The peers allowed to send the header; any other is closed at accept.
    pub from: Vec<IpNet>,
    /// The time allowed for the whole header to arrive.
    pub timeout: Duration,
}

impl ProxyProtocolAccept {
    /// Whether `peer` (the TCP peer, before any header) is one of the
    /// trusted load balancers.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let ip = super::canonical_ip(peer);
        self.from.iter().any(|n| n.contains(&ip))
    }
}

impl Validator<'_, '_> {
    pub(super) fn proxy_protocol(&mut self, raw: &RawListener) -> Option<ProxyProtocolAccept> {
        let name = raw.name.get_ref();
        let Some(mode) = &raw.proxy_protocol else {
            for (key, set) in [
                ("proxy_protocol_from", raw.proxy_protocol_from.is_some()),
                (
                    "proxy_protocol_timeout",
                    raw.proxy_protocol_timeout.is_some(),
                ),
            ] {
                if set {
                    self.rep.error(
                        raw.name.span(),
                        format!("listener `{name}`: `{key}` is set but `proxy_protocol` is not"),
                        Some("add proxy_protocol = \"v1\", \"v2\" or \"any\", or remove it".into()),
                    );
                }
            }
            return None;
        };
        let versions = match mode.get_ref().as_str() {
            "v1" => ProxyVersions::V1,
            "v2" => ProxyVersions::V2,
            "any" => ProxyVersions::Any,
            other => {
                self.rep.error(
                    mode.span(),
                    format!("listener `{name}`: unknown proxy_protocol `{other}`"),
                    did_you_mean(other, ["v1", "v2", "any"]),
                );
                ProxyVersions::Any
            }
        };
        let from = match &raw.proxy_protocol_from {
            Some(list) if !list.is_empty() => self.cidrs(name, list, "proxy_protocol_from"),
            _ => {
                self.rep.error(
                    mode.span(),
                    format!(
                        "listener `{name}`: `proxy_protocol` needs `proxy_protocol_from`, the load balancers allowed to send the header (anyone else could claim any client address)"
                    ),
                    Some("add e.g. proxy_protocol_from = [\"10.0.0.0/8\"]".into()),
                );
                Vec::new()
            }
        };
        let timeout = self.duration(
            raw.proxy_protocol_timeout.as_ref(),
            "proxy_protocol_timeout",
            DEFAULT_PROXY_PROTOCOL_TIMEOUT,
        );
        Some(ProxyProtocolAccept {
            versions,
            from,
            timeout,
        })
    }

    pub(super) fn send_proxy_protocol(
        &mut self,
        group: &str,
        raw: Option<&S<String>>,
    ) -> Option<ProxyVersion> {
        let raw = raw?;
        let v = ProxyVersion::parse(raw.get_ref());
        if v.is_none() {
            self.rep.error(
                raw.span(),
                format!(
                    "group `{group}`: unknown send_proxy_protocol `{}`",
                    raw.get_ref()
                ),
                did_you_mean(raw.get_ref(), ProxyVersion::NAMES.iter().copied()),
            );
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ProxyVersion, ProxyVersions};
    use std::path::Path;

    fn with(listener: &str, group: &str) -> Result<Config, String> {
        let text = format!(
            "[[group]]\nname = \"g\"\nbackends = [\"127.0.0.1:9\"]\n{group}\n\n\
             [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n{listener}\n"
        );
        Config::parse(Path::new("pp.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn settings_are_read_with_defaults() {
        let c = with(
            "proxy_protocol = \"any\"\nproxy_protocol_from = [\"10.0.0.0/8\", \"::1\"]",
            "send_proxy_protocol = \"v2\"",
        )
        .unwrap();
        let pp = c.listeners[0].proxy_protocol.as_ref().unwrap();
        assert_eq!(pp.versions, ProxyVersions::Any);
        assert_eq!(pp.timeout, super::DEFAULT_PROXY_PROTOCOL_TIMEOUT);
        assert!(pp.trusts("10.1.2.3".parse().unwrap()));
        assert!(
            pp.trusts("::ffff:10.1.2.3".parse().unwrap()),
            "v4-mapped is v4"
        );
        assert!(pp.trusts("::1".parse().unwrap()));
        assert!(!pp.trusts("192.0.2.1".parse().unwrap()));
        assert_eq!(c.groups[0].send_proxy_protocol, Some(ProxyVersion::V2));
    }

    #[test]
    fn mistakes_name_the_line_and_the_fix() {
        for (listener, group, want) in [
            (
                "proxy_protocol = \"v1\"",
                "",
                "pp.toml:10:18: error: listener `l`: `proxy_protocol` needs `proxy_protocol_from`",
            ),
            (
                "proxy_protocol = \"v3\"\nproxy_protocol_from = [\"127.0.0.1\"]",
                "",
                "unknown proxy_protocol `v3`",
            ),
            (
                "proxy_protocol_from = [\"127.0.0.1\"]",
                "",
                "`proxy_protocol_from` is set but `proxy_protocol` is not",
            ),
            (
                "proxy_protocol = \"v2\"\nproxy_protocol_from = [\"10.0.0.300\"]",
                "",
                "`10.0.0.300` in `proxy_protocol_from` is not a CIDR or IP address",
            ),
            ("", "send_proxy_protocol = \"v2 \"", "did you mean `v2`?"),
        ] {
            let e = with(listener, group).unwrap_err();
            assert!(e.contains(want), "want {want:?} in:\n{e}");
        }
    }
}
