//! What `portshift check` prints: a validated config (listeners → groups →
//! backends, with weights, limits and socket options) and each policy, in
//! a few lines each.

use super::{Config, Group, Listener, Probe, SocketOptions};
use crate::core::policy::{Counting, Mode, Policy, Quantile};
use ipnet::IpNet;
use std::fmt::Write;
use std::time::Duration;

/// A duration as a person writes it (`1m 30s`).
pub(super) fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Config {
    /// What would run, for `portshift check`: listeners -> groups ->
    /// backends, with weights and policy.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for l in &self.listeners {
            listener(&mut out, l);
            for (i, &g) in l.groups.iter().enumerate() {
                group(&mut out, self.group(g), i == 0);
            }
            if !l.routes.is_empty() {
                let default = if l.groups.is_empty() {
                    "closed (no primary)"
                } else {
                    "the listener's groups above"
                };
                let _ = writeln!(
                    out,
                    "  routes   by TLS server name (ClientHello within {}, passed through unread); no match: {default}",
                    duration(l.client_hello_timeout)
                );
            }
            for r in &l.routes {
                let names: Vec<String> = r.sni.iter().map(ToString::to_string).collect();
                let policy = r.policy.as_ref().map_or("none".to_string(), |p| {
                    format!("{} ({})", p.name, p.path.display())
                });
                let _ = writeln!(
                    out,
                    "  route {}/{}  sni {}; policy {policy}",
                    l.name,
                    r.name,
                    names.join(", ")
                );
                for (i, &g) in r.groups.iter().enumerate() {
                    group(&mut out, self.group(g), i == 0);
                }
            }
        }
        if let Some(a) = &self.admin {
            let _ = writeln!(out, "admin: http://{}/metrics", a.listen);
        }
        if let Some(f) = &self.fleet {
            let _ = writeln!(
                out,
                "fleet `{}` as member `{}` on etcd {}: lease {}, decides alone after {} without fresh fleet weights; inputs from {}",
                f.name,
                f.member.as_deref().unwrap_or("(hostname and admin port)"),
                f.etcd.join(", "),
                duration(f.lease_ttl),
                duration(f.stale_after),
                match &f.signal {
                    super::FleetSignal::Members => "every member's windows, merged".to_owned(),
                    super::FleetSignal::Prometheus { url, .. } => format!("Prometheus at {url}"),
                }
            );
        }
        let _ = writeln!(
            out,
            "stats window: {} in {} sub-windows",
            duration(self.stats.span()),
            self.stats.slots
        );
        let _ = write!(
            out,
            "drain timeout on shutdown: {}",
            duration(self.drain_timeout)
        );
        out
    }
}

/// A listener's own lines: addresses, policy, connect, ACL, copy, limits,
/// socket options.
fn listener(out: &mut String, l: &Listener) {
    let _ = writeln!(out, "listener {}", l.name);
    let n = l.addrs.len();
    let plural = if n == 1 { "" } else { "s" };
    let _ = writeln!(
        out,
        "  listen   {}  ({n} socket{plural})",
        l.listen.join(", ")
    );
    let policy = l
        .policy
        .as_ref()
        .map_or("none (all traffic stays on the primary)".to_string(), |p| {
            format!("{} ({})", p.name, p.path.display())
        });
    let _ = writeln!(out, "  policy   {policy}");
    if let Some(p) = &l.policy {
        for line in policy_lines(&p.policy) {
            let _ = writeln!(out, "           {line}");
        }
    }
    let _ = writeln!(
        out,
        "  connect  timeout {}, up to {} attempts; idle timeout {}",
        duration(l.connect_timeout),
        l.connect_attempts,
        duration(l.idle_timeout)
    );
    let acl = |nets: &[IpNet]| {
        let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
        list.join(", ")
    };
    let allow = l.acl.allow.as_deref().map_or("any source".to_string(), acl);
    let deny = if l.acl.deny.is_empty() {
        String::new()
    } else {
        format!("; deny {}", acl(&l.acl.deny))
    };
    let _ = writeln!(out, "  allow    {allow}{deny}");
    if let Some(pp) = &l.proxy_protocol {
        let versions = match pp.versions {
            super::ProxyVersions::V1 => "v1",
            super::ProxyVersions::V2 => "v2",
            super::ProxyVersions::Any => "v1 or v2",
        };
        let _ = writeln!(
            out,
            "  header   PROXY protocol {versions} from {} only, within {}; the client it names is the client",
            acl(&pp.from),
            duration(pp.timeout)
        );
    }
    if let Some(t) = &l.tls {
        let _ = writeln!(
            out,
            "  tls      terminated: certificate {}, key {}; handshake within {}",
            t.cert.display(),
            t.key.display(),
            duration(t.handshake_timeout)
        );
    }
    if let Some(k) = &l.knock {
        let ports: Vec<String> = k.sequence.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  knock    ports {} in order within {}, then open for {} (at most {} sources tracked)",
            ports.join(", "),
            duration(k.within),
            duration(k.open_for),
            k.max_sources
        );
    }
    let _ = writeln!(out, "  copy     {}", copy_mode(l));
    let lim = |v: Option<u32>| v.map_or("unlimited".to_string(), |n| n.to_string());
    let first = l.first_byte_timeout.map_or("off".to_string(), duration);
    let _ = writeln!(
        out,
        "  limits   {} connections, {} per source; first byte from client within: {first}",
        lim(l.limits.max_connections),
        lim(l.limits.max_connections_per_source)
    );
    let _ = writeln!(out, "  socket   {}", socket(&l.socket));
}

fn copy_mode(l: &Listener) -> String {
    let copy = match (l.splice, l.retry_on_early_reset) {
        (true, false) => "splice(2) for bulk flows, a 16 KiB buffer otherwise",
        (true, true) => "16 KiB buffer (splice is off: retry_on_early_reset keeps the bytes)",
        (false, _) => "16 KiB buffer (splice off)",
    };
    let retry = if l.retry_on_early_reset {
        "; an early reset is retried on the next backend"
    } else {
        ""
    };
    format!("{copy}{retry}")
}

fn socket(s: &SocketOptions) -> String {
    let ka = s.keepalive.map_or("off".to_string(), |k| {
        let (t, i) = (duration(k.time), duration(k.interval));
        format!("after {t} every {i} x{}", k.count)
    });
    let buf = |v: Option<u32>| v.map_or("system default".to_string(), |n| format!("{n} bytes"));
    format!(
        "backlog {}, nodelay {}, keepalive {ka}, send buffer {}, receive buffer {}",
        s.backlog,
        s.nodelay,
        buf(s.send_buffer),
        buf(s.recv_buffer)
    )
}

/// A group's lines under its listener: role and share, probe, backends.
fn group(out: &mut String, group: &Group, primary: bool) {
    let (role, share) = if primary {
        ("primary", "100.00%")
    } else {
        ("backup ", "  0.00%")
    };
    let _ = writeln!(
        out,
        "  {role}  {:<20} {share} of new connections  [{}]",
        group.name,
        group.balance.name()
    );
    if let Some(v) = group.send_proxy_protocol {
        let v = if v == super::ProxyVersion::V1 {
            "v1"
        } else {
            "v2"
        };
        let _ = writeln!(
            out,
            "    sends a PROXY protocol {v} header naming the client"
        );
    }
    if let Some(t) = &group.tls {
        let ca =
            t.ca.as_ref()
                .map_or("the system's CA bundle".to_owned(), |p| {
                    p.display().to_string()
                });
        let name = t
            .server_name
            .as_ref()
            .map_or("each backend's IP address".to_owned(), |n| {
                n.to_str().into_owned()
            });
        let _ = writeln!(
            out,
            "    speaks TLS to its backends: certificates chain to {ca}, name {name}"
        );
    }
    if let Some(p) = &group.probe {
        let _ = writeln!(out, "    probe {}", probe(p));
    }
    let total: u32 = group.backends.iter().map(|b| b.weight).sum();
    for b in &group.backends {
        let pct = f64::from(b.weight) * 100.0 / f64::from(total.max(1));
        let _ = writeln!(
            out,
            "    -> {:<24} weight {:<4} ({pct:.1}% of the group)",
            b.addr.to_string(),
            b.weight
        );
    }
    for s in &group.discover {
        let _ = writeln!(
            out,
            "    -> {s} (read at start, then every {})",
            humantime::format_duration(group.resolve_every)
        );
    }
}

fn probe(p: &Probe) -> String {
    let bytes = |what: &str, b: &Option<Vec<u8>>| {
        b.as_ref().map_or(String::new(), |s| {
            format!(", {what} {:?}", String::from_utf8_lossy(s))
        })
    };
    format!(
        "every {}, timeout {}, rise {}, fall {}{}{}",
        duration(p.interval),
        duration(p.timeout),
        p.rise,
        p.fall,
        bytes("send", &p.send),
        bytes("expect", &p.expect),
    )
}

fn pct(bp: u32) -> String {
    format!("{}%", f64::from(bp) / 100.0)
}

fn bars(v: &[(Quantile, Duration)], op: &str) -> Vec<String> {
    v.iter()
        .map(|(q, d)| format!("{} {op} {}", q.name(), duration(*d)))
        .collect()
}

/// What a policy will do, in a few lines, for `portshift check`.
pub fn policy_lines(p: &Policy) -> Vec<String> {
    let window = p
        .window
        .map_or("the [stats] window".to_string(), |w| duration(w.span()));
    let dry = if p.dry_run {
        "; DRY RUN: decisions are reported, weights untouched"
    } else {
        ""
    };
    let mut out = vec![format!(
        "every {} on `{}` over {window}, at least {} samples{dry}",
        duration(p.interval),
        p.signal.name(),
        p.min_samples,
    )];
    let trip = trip_rules(p);
    let counting = match p.counting {
        Counting::Consecutive(n) => format!("{n} bad evaluations in a row"),
        Counting::BadOfLast { bad, of } => format!("{bad} bad of the last {of} evaluations"),
    };
    match &p.mode {
        Mode::Failover { shift, recover } => {
            out.push(format!("trip     {trip}, {counting}"));
            out.push(format!(
                "shift    {} per step to the first healthy backup, every {} at most, up to {}",
                pct(shift.step_bp),
                duration(shift.cooldown),
                pct(shift.max_bp)
            ));
            let mut bar = bars(&recover.below, "<");
            if let Some(e) = recover.error_rate_below {
                bar.push(format!("error rate < {e}"));
            }
            out.push(format!(
                "recover  {} held {}, then {} per step every {}",
                bar.join(" and "),
                duration(recover.hold),
                pct(recover.step_bp),
                duration(recover.cooldown)
            ));
        }
        Mode::Canary(c) => {
            let steps: Vec<String> = c.steps_bp.iter().map(|&s| pct(s)).collect();
            out.push(format!(
                "canary   steps {} each held {}",
                steps.join(" -> "),
                duration(c.hold)
            ));
            out.push(format!(
                "rollback when {} > {} x baseline or errors > baseline + {}, or {trip}; {counting}",
                c.quantile.name(),
                c.max_ratio,
                c.max_error_rate_increase
            ));
        }
    }
    out
}

/// The trip conditions, joined with "or" ("none" without any).
fn trip_rules(p: &Policy) -> String {
    let mut trip = bars(&p.trip.above, ">");
    if let Some(e) = p.trip.error_rate_above {
        trip.push(format!("error rate > {e}"));
    }
    if let Some(k) = p.trip.worse_than_backup {
        let q = p.trip.relative_quantile.unwrap_or(Quantile::P99).name();
        trip.push(format!("{q} > {k} x backup's"));
    }
    if let Some(n) = p.trip.active_connections_above {
        trip.push(format!("active connections > {n}"));
    }
    if let Some(n) = p.trip.new_connections_per_second_above {
        trip.push(format!("new connections/s > {n}"));
    }
    if trip.is_empty() {
        "none".to_string()
    } else {
        trip.join(" or ")
    }
}
