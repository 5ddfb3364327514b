//! `[fleet]`: the instances that share one decision per listener, on etcd.

use super::raw::{RawFleet, S};
use super::validate::Validator;
use super::{Admin, TokenSource};
use std::net::SocketAddr;
use std::time::Duration;

pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(15);

/// A validated `[fleet]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// Instances with the same name and etcd share decisions.
    pub name: String,
    /// This instance's id; `None`: the hostname and the admin port, chosen
    /// once the admin socket is bound.
    pub member: Option<String>,
    /// etcd endpoints as `host:port` (the client URLs, scheme removed).
    pub etcd: Vec<String>,
    /// Membership and leadership lease, whole seconds (etcd's unit).
    pub lease_ttl: Duration,
    pub signal: FleetSignal,
    /// Fleet weights older than this: decide locally.
    pub stale_after: Duration,
    /// Where the other members reach this one's admin API; `None`: the
    /// admin address as bound.
    pub advertise: Option<SocketAddr>,
    /// The admin token, kept whole (not as a digest) because members send
    /// it when they read each other's windows.
    pub token: Option<MemberToken>,
}

/// Where the leader's inputs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetSignal {
    /// Every member's windows, read from its admin API and merged exactly.
    Members,
    /// PromQL over every member's counters, from the Prometheus at `url`
    /// (`http://host:port`); `selector`: extra label matchers that pick
    /// this fleet's series.
    Prometheus {
        url: String,
        selector: Option<String>,
    },
}

/// The bearer token members present to each other.
#[derive(Clone, PartialEq, Eq)]
pub struct MemberToken(pub String);

impl std::fmt::Debug for MemberToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemberToken(..)")
    }
}

/// Names that go into etcd keys and metric labels.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Validator<'_, '_> {
    pub(super) fn fleet(&mut self, raw: &S<RawFleet>, admin: Option<&Admin>) -> Option<Fleet> {
        let f = raw.get_ref();
        let Some(admin) = admin else {
            self.rep.error(
                raw.span(),
                "fleet: members read each other's windows through the admin API, and there is no [admin] section",
                Some("add [admin] with `listen` (and a token if it is not on loopback)".into()),
            );
            return None;
        };
        self.fleet_name(&f.name, "name");
        if let Some(m) = &f.member {
            self.fleet_name(m, "member");
        }
        let etcd = self.etcd_endpoints(f);
        let lease_ttl = self.duration(f.lease_ttl.as_ref(), "fleet.lease_ttl", DEFAULT_LEASE_TTL);
        if let Some(raw_ttl) = &f.lease_ttl
            && (lease_ttl.subsec_nanos() != 0 || !(2..=600).contains(&lease_ttl.as_secs()))
        {
            self.rep.error(
                raw_ttl.span(),
                "`fleet.lease_ttl` must be whole seconds from 2s to 600s (etcd's leases count in seconds)",
                Some("the default, 5s, moves leadership within about 5 s of a member's death".into()),
            );
        }
        let stale_after = self.duration(
            f.stale_after.as_ref(),
            "fleet.stale_after",
            DEFAULT_STALE_AFTER,
        );
        if stale_after < lease_ttl {
            let span = f.stale_after.as_ref().map_or(raw.span(), |s| s.span());
            self.rep.error(
                span,
                format!(
                    "`fleet.stale_after` ({}) is shorter than `fleet.lease_ttl` ({}): members would decide alone during every change of leader",
                    humantime::format_duration(stale_after),
                    humantime::format_duration(lease_ttl)
                ),
                Some("make it at least the lease TTL; the default is three times it".into()),
            );
        }
        let signal = self.fleet_signal(f);
        let advertise = self.advertise(f, admin);
        Some(Fleet {
            name: f.name.get_ref().clone(),
            member: f.member.as_ref().map(|m| m.get_ref().clone()),
            etcd,
            lease_ttl,
            signal,
            stale_after,
            advertise,
            token: admin
                .token
                .as_ref()
                .and_then(|t| self.member_token(&t.source)),
        })
    }

    fn fleet_name(&mut self, s: &S<String>, key: &str) {
        if !valid_name(s.get_ref()) {
            self.rep.error(
                s.span(),
                format!(
                    "fleet: `{key}` is `{}`; it must be 1 to 64 letters, digits, `-`, `_` or `.`",
                    s.get_ref()
                ),
                Some("it becomes part of etcd keys and metric labels".into()),
            );
        }
    }

    fn etcd_endpoints(&mut self, f: &RawFleet) -> Vec<String> {
        if f.etcd.get_ref().is_empty() {
            self.rep.error(
                f.etcd.span(),
                "fleet: `etcd` lists no endpoint",
                Some("write e.g. etcd = [\"http://127.0.0.1:2379\"]".into()),
            );
        }
        let mut out = Vec::new();
        for e in f.etcd.get_ref() {
            match endpoint(e.get_ref()) {
                Ok(authority) => out.push(authority),
                Err((why, hint)) => self.rep.error(
                    e.span(),
                    format!("fleet: etcd endpoint `{}` {why}", e.get_ref()),
                    Some(hint.into()),
                ),
            }
        }
        out
    }

    fn fleet_signal(&mut self, f: &RawFleet) -> FleetSignal {
        let signal = f.signal.as_ref().map(|s| (s.get_ref().as_str(), s.span()));
        match signal {
            None | Some(("members", _)) => {
                for (key, raw) in [
                    ("prometheus", &f.prometheus),
                    ("prometheus_selector", &f.prometheus_selector),
                ] {
                    if let Some(p) = raw {
                        self.rep.error(
                            p.span(),
                            format!("fleet: `{key}` is read only with signal = \"prometheus\""),
                            Some("remove it, or set signal = \"prometheus\"".into()),
                        );
                    }
                }
                FleetSignal::Members
            }
            Some(("prometheus", span)) => {
                let url = match &f.prometheus {
                    None => {
                        self.rep.error(
                            span,
                            "fleet: signal = \"prometheus\" needs `prometheus`, the Prometheus that scrapes every member",
                            Some("add e.g. prometheus = \"http://127.0.0.1:9090\"".into()),
                        );
                        String::new()
                    }
                    Some(p) => match endpoint(p.get_ref()) {
                        Ok(authority) => format!("http://{authority}"),
                        Err((why, hint)) => {
                            self.rep.error(
                                p.span(),
                                format!("fleet: prometheus `{}` {why}", p.get_ref()),
                                Some(hint.replace("2379", "9090")),
                            );
                            String::new()
                        }
                    },
                };
                let selector = f.prometheus_selector.as_ref().and_then(|s| {
                    let text = s.get_ref();
                    if text.contains(['{', '}']) || !text.contains('=') {
                        self.rep.error(
                            s.span(),
                            format!("fleet: `prometheus_selector` is `{text}`; it must be label matchers without braces"),
                            Some("write e.g. 'job=\"portshift-edge\"'".into()),
                        );
                        return None;
                    }
                    Some(text.clone())
                });
                FleetSignal::Prometheus { url, selector }
            }
            Some((other, span)) => {
                self.rep.error(
                    span,
                    format!("fleet: unknown signal `{other}`"),
                    Some("write \"members\" or \"prometheus\"".into()),
                );
                FleetSignal::Members
            }
        }
    }

    fn advertise(&mut self, f: &RawFleet, admin: &Admin) -> Option<SocketAddr> {
        match &f.advertise {
            Some(a) => match a.get_ref().parse::<SocketAddr>() {
                Ok(addr) if !addr.ip().is_unspecified() && addr.port() != 0 => Some(addr),
                _ => {
                    self.rep.error(
                        a.span(),
                        format!("fleet: `advertise` is `{}`; it must be the `ip:port` other members reach this admin API on", a.get_ref()),
                        Some("write e.g. \"10.0.0.5:9900\"".into()),
                    );
                    None
                }
            },
            None if admin.listen.ip().is_unspecified() => {
                self.rep.error(
                    f.name.span(),
                    format!("fleet: the admin API listens on {}, which is no address another member can reach", admin.listen),
                    Some("set `advertise` to this instance's reachable `ip:port` of the admin API".into()),
                );
                None
            }
            None => None,
        }
    }

    fn member_token(&mut self, source: &TokenSource) -> Option<MemberToken> {
        let text = match source {
            TokenSource::File(p) => std::fs::read_to_string(p).ok()?,
            TokenSource::Env(v) => std::env::var(v).ok()?,
        };
        Some(MemberToken(text.trim().to_owned()))
    }
}

/// `http://host:port[/]` as `host:port`; or why not, with the fix.
fn endpoint(url: &str) -> Result<String, (&'static str, &'static str)> {
    if url.starts_with("https://") {
        return Err((
            "uses TLS, which portshift does not speak to etcd yet",
            "reach etcd over http on loopback or a private network (a local etcd proxy or gateway can carry TLS beyond it)",
        ));
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err((
            "is not an http:// URL",
            "write e.g. \"http://127.0.0.1:2379\"",
        ));
    };
    let authority = rest.trim_end_matches('/');
    let port_ok = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || authority.contains('/') {
        return Err((
            "has no host and port",
            "write e.g. \"http://127.0.0.1:2379\"",
        ));
    }
    Ok(authority.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint("http://127.0.0.1:2379"),
            Ok("127.0.0.1:2379".into())
        );
        assert_eq!(
            endpoint("http://etcd-1.internal:2379/"),
            Ok("etcd-1.internal:2379".into())
        );
        assert_eq!(endpoint("http://[::1]:2379"), Ok("[::1]:2379".into()));
        assert!(endpoint("https://127.0.0.1:2379").is_err());
        assert!(endpoint("127.0.0.1:2379").is_err());
        assert!(endpoint("http://127.0.0.1").is_err());
        assert!(endpoint("http://127.0.0.1:2379/v3").is_err());
        assert!(valid_name("edge-a.1_x") && !valid_name("") && !valid_name("a/b"));
    }
}
