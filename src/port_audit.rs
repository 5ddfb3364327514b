//! `portshift audit`: the least-exposure check of a host's ports. For
//! every configured listener: where it binds, whom its ACL admits, whether
//! TLS is terminated, and (from the running instance's `/status`) what it
//! carried; every socket listening on the host that no listener owns, with
//! its process; and well-known sensitive ports reachable without an ACL.
//! What should be acted on is a finding; any finding makes the exit code 1.

use crate::config::{Config, Listener};
use crate::http_client::HttpClient;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

/// Ports that should never face a network without an ACL in front.
const SENSITIVE: [(u16, &str); 12] = [
    (22, "ssh"),
    (23, "telnet"),
    (2379, "etcd"),
    (3306, "mysql"),
    (5432, "postgresql"),
    (5672, "amqp"),
    (6379, "redis"),
    (9092, "kafka"),
    (9200, "elasticsearch"),
    (11211, "memcached"),
    (27017, "mongodb"),
    (1433, "mssql"),
];

fn sensitive(port: u16) -> Option<&'static str> {
    SENSITIVE.iter().find(|(p, _)| *p == port).map(|(_, n)| *n)
}

#[derive(Debug, Clone)]
pub struct ListenerAudit {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
    pub acl: String,
    pub admits_everyone: bool,
    pub tls: &'static str,
    /// From the running instance: connections accepted since it started,
    /// and established over the stats window.
    pub accepted_since_start: Option<u64>,
    pub window_connections: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct HostSocket {
    pub addr: SocketAddr,
    pub owner: Option<(u32, String)>,
    pub service: Option<&'static str>,
}

#[derive(Debug, Clone)]
pub struct Audit {
    pub listeners: Vec<ListenerAudit>,
    /// Listening sockets on the host that no portshift listener owns.
    pub host: Vec<HostSocket>,
    /// The admin API's answer, or why there is none.
    pub running: Result<(), String>,
    pub findings: Vec<String>,
}

fn acl_text(l: &Listener) -> (String, bool) {
    let deny: Vec<String> = l.acl.deny.iter().map(|n| n.to_string()).collect();
    match &l.acl.allow {
        None if deny.is_empty() => ("admits everyone".to_owned(), true),
        None => (format!("admits everyone but {}", deny.join(", ")), true),
        Some(allow) => {
            let allow: Vec<String> = allow.iter().map(|n| n.to_string()).collect();
            let but = if deny.is_empty() {
                String::new()
            } else {
                format!(", denies {}", deny.join(", "))
            };
            (format!("admits {}{but}", allow.join(", ")), false)
        }
    }
}

/// `GET /status` of the running instance.
fn status(admin: &str, token: Option<&str>) -> Result<Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{}/status", admin.trim_end_matches('/'));
    rt.block_on(HttpClient::default().json(
        hyper::Method::GET,
        &url,
        None,
        token,
        Duration::from_secs(5),
    ))
    .map_err(|e| format!("{url}: {e}"))
}

/// Audits `config` on this host; `admin` is the running instance's admin
/// URL (`http://host:port`), if it should be asked.
pub fn run(config: &Config, admin: Option<&str>, token: Option<&str>) -> Audit {
    let status = admin.map(|url| status(url, token));
    let mut a = Audit {
        listeners: Vec::new(),
        host: Vec::new(),
        running: match &status {
            None => Err("not asked (no --admin and no [admin] in the config)".to_owned()),
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.clone()),
        },
        findings: Vec::new(),
    };
    let live = status.and_then(Result::ok);
    for l in &config.listeners {
        a.listeners.push(listener(l, live.as_ref()));
    }
    let owned: Vec<SocketAddr> = config
        .listeners
        .iter()
        .flat_map(|l| l.addrs.iter().copied())
        .chain(config.admin.as_ref().map(|a| a.listen))
        .collect();
    for (addr, owner) in crate::diagnose::listening_sockets() {
        let ours = owned.contains(&addr) || owner.as_ref().is_some_and(|(_, c)| c == "portshift");
        if !ours && !a.host.iter().any(|h| h.addr == addr) {
            a.host.push(HostSocket {
                addr,
                service: sensitive(addr.port()),
                owner,
            });
        }
    }
    a.host.sort_by_key(|h| (h.addr.port(), h.addr));
    a.findings = findings(&a, live.as_ref());
    a
}

fn listener(l: &Listener, live: Option<&Value>) -> ListenerAudit {
    let (acl, admits_everyone) = acl_text(l);
    let s = live.and_then(|v| {
        v["listeners"]
            .as_array()?
            .iter()
            .find(|x| x["name"] == l.name.as_str())
            .cloned()
    });
    ListenerAudit {
        name: l.name.clone(),
        addrs: l.addrs.clone(),
        acl,
        admits_everyone,
        tls: match (&l.tls, l.routes.is_empty()) {
            (Some(_), _) => "terminated by portshift (tls = { cert, key })",
            (None, false) => "passed through, routed by server name",
            (None, true) => "passed through (portshift does not terminate TLS)",
        },
        accepted_since_start: s
            .as_ref()
            .and_then(|s| s["connections"]["accepted"].as_u64()),
        window_connections: s.as_ref().map(|s| {
            s["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g["latency"]["connect"]["count"].as_u64())
                .sum()
        }),
    }
}

fn findings(a: &Audit, live: Option<&Value>) -> Vec<String> {
    let mut out = Vec::new();
    for l in &a.listeners {
        for addr in &l.addrs {
            if let Some(svc) = sensitive(addr.port())
                && l.admits_everyone
                && !addr.ip().is_loopback()
            {
                out.push(format!(
                    "listener `{}` serves {svc}'s port {} on {addr} and admits everyone: add `allow` with the clients that need it",
                    l.name,
                    addr.port()
                ));
            }
        }
        if l.accepted_since_start == Some(0) {
            let uptime = live.and_then(|v| v["uptime_s"].as_f64()).unwrap_or(0.0);
            out.push(format!(
                "listener `{}` has carried no connection since the instance started ({uptime:.0} s ago): close it if nobody uses it",
                l.name
            ));
        }
    }
    for h in &a.host {
        if let Some(svc) = h.service
            && !h.addr.ip().is_loopback()
        {
            let who = h
                .owner
                .as_ref()
                .map_or("an unknown process".to_owned(), |(p, c)| {
                    format!("pid {p} ({c})")
                });
            out.push(format!(
                "{svc}'s port {} listens on {} ({who}) with no portshift listener, so no portshift ACL, in front",
                h.addr.port(),
                h.addr
            ));
        }
    }
    out
}

/// The audit as text.
pub fn render(a: &Audit) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "listeners");
    for l in &a.listeners {
        let addrs: Vec<String> = l.addrs.iter().map(|a| a.to_string()).collect();
        let traffic = match (l.accepted_since_start, l.window_connections) {
            (Some(n), Some(w)) => format!("{n} accepted since start, {w} in the stats window"),
            _ => "traffic unknown (instance not asked)".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {:<16} {}\n  {:<16} {}; TLS {}; {traffic}",
            l.name,
            addrs.join(", "),
            "",
            l.acl,
            l.tls
        );
    }
    if let Err(why) = &a.running {
        let _ = writeln!(out, "running instance: {why}");
    }
    let _ = writeln!(out, "other listening sockets on this host");
    for h in &a.host {
        let who = h
            .owner
            .as_ref()
            .map_or("owner unknown".to_owned(), |(p, c)| format!("pid {p} {c}"));
        let svc = h.service.map_or(String::new(), |s| format!("  [{s}]"));
        let _ = writeln!(out, "  {:<28} {who}{svc}", h.addr.to_string());
    }
    if a.findings.is_empty() {
        let _ = writeln!(out, "findings: none");
    } else {
        let _ = writeln!(out, "findings ({}):", a.findings.len());
        for f in &a.findings {
            let _ = writeln!(out, "  - {f}");
        }
    }
    out
}

/// The audit as the `--json` document.
pub fn json(a: &Audit) -> Value {
    json!({
        "listeners": a.listeners.iter().map(|l| json!({
            "name": l.name,
            "listen": l.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "acl": l.acl,
            "admits_everyone": l.admits_everyone,
            "tls": l.tls,
            "accepted_since_start": l.accepted_since_start,
            "window_connections": l.window_connections,
        })).collect::<Vec<_>>(),
        "running": match &a.running { Ok(()) => Value::Bool(true), Err(e) => json!({ "error": e }) },
        "host_sockets": a.host.iter().map(|h| json!({
            "addr": h.addr.to_string(),
            "pid": h.owner.as_ref().map(|o| o.0),
            "command": h.owner.as_ref().map(|o| o.1.clone()),
            "sensitive": h.service,
        })).collect::<Vec<_>>(),
        "findings": a.findings,
    })
}
