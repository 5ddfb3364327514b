//! `portshift diagnose`: the four-step check for "the port does not
//! answer", printed as a checklist with a verdict per step:
//!
//! 1. bound: does portshift hold each listen address, or does someone
//!    else (the outage where a new service took port 8080)?
//! 2. acl: would the listener admit a given source address?
//! 3. reach: does each backend accept a TCP connection, and how fast?
//! 4. answer: does each backend answer its probe (send/expect), where one
//!    is configured?
//!
//! With `[fleet]`, first: does each etcd endpoint answer, who are the
//! fleet's members and its leader, and is this member among them?

use crate::config::{Config, Listener, Probe};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Fail,
    Skip,
}

/// One line of the checklist.
#[derive(Debug, Clone)]
pub struct Check {
    pub listener: String,
    pub step: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

/// Why `diagnose` could not run.
#[derive(Debug, thiserror::Error)]
pub enum DiagnoseError {
    #[error("no listener `{name}` in {}; known: {}", path.display(), known.join(", "))]
    NoListener {
        name: String,
        path: std::path::PathBuf,
        known: Vec<String>,
    },
}

/// Runs every step for `listener` (or all listeners) as seen from `source`.
pub fn run(
    config: &Config,
    listener: Option<&str>,
    source: IpAddr,
) -> Result<Vec<Check>, DiagnoseError> {
    let listeners: Vec<&Listener> = match listener {
        Some(name) => vec![
            config
                .listener(name)
                .ok_or_else(|| DiagnoseError::NoListener {
                    name: name.to_owned(),
                    path: config.path.clone(),
                    known: config.listeners.iter().map(|l| l.name.clone()).collect(),
                })?,
        ],
        None => config.listeners.iter().collect(),
    };
    let sockets = listening_sockets();
    let mut out = config.fleet.as_ref().map(fleet_checks).unwrap_or_default();
    for l in listeners {
        let mut check = |step, verdict, detail: String| {
            out.push(Check {
                listener: l.name.clone(),
                step,
                verdict,
                detail,
            })
        };
        for &addr in &l.addrs {
            let (v, d) = bound(addr, &sockets);
            check("bound", v, d);
        }
        let (v, d) = if l.acl.admits(source) {
            (Verdict::Ok, format!("source {source} is admitted"))
        } else {
            (
                Verdict::Fail,
                format!("source {source} is refused by the listener's allow/deny lists"),
            )
        };
        check("acl", v, d);
        for g in l.all_groups() {
            let group = config.group(g);
            for b in &group.backends {
                let (v, d) = reach(b.addr, l.connect_timeout);
                check(
                    "reach",
                    v,
                    format!("group `{}` backend {}: {d}", group.name, b.addr),
                );
                let (v, d) = match &group.probe {
                    Some(p) if p.send.is_some() || p.expect.is_some() => answer(b.addr, p),
                    _ => (
                        Verdict::Skip,
                        "no probe with send/expect configured for this group".into(),
                    ),
                };
                check(
                    "answer",
                    v,
                    format!("group `{}` backend {}: {d}", group.name, b.addr),
                );
            }
        }
    }
    Ok(out)
}

/// The fleet's checks: every etcd endpoint answers and shows the fleet;
/// this member is registered in it (when its id is known).
fn fleet_checks(f: &crate::config::Fleet) -> Vec<Check> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    let prefix = format!("/portshift/fleet/{}/", f.name);
    let check = |step, verdict, detail| Check {
        listener: format!("fleet `{}`", f.name),
        step,
        verdict,
        detail,
    };
    let mut out = Vec::new();
    let mut members: Option<Vec<String>> = None;
    for endpoint in &f.etcd {
        let etcd = crate::etcd::Etcd::new(std::slice::from_ref(endpoint));
        match rt.block_on(etcd.range_prefix(&prefix)) {
            Err(e) => out.push(check("etcd", Verdict::Fail, format!("{e}"))),
            Ok((rev, kvs)) => {
                let names: Vec<String> = kvs
                    .iter()
                    .filter_map(|kv| {
                        kv.key
                            .strip_prefix(&format!("{prefix}members/"))
                            .map(str::to_owned)
                    })
                    .collect();
                let leader = kvs
                    .iter()
                    .filter(|kv| kv.key.starts_with(&format!("{prefix}election/")))
                    .min_by_key(|kv| kv.create_revision)
                    .map_or("none".to_owned(), |kv| {
                        String::from_utf8_lossy(&kv.value).into_owned()
                    });
                out.push(check(
                    "etcd",
                    Verdict::Ok,
                    format!(
                        "{endpoint} answers at revision {rev}: {} member(s) [{}], leader {leader}",
                        names.len(),
                        names.join(", ")
                    ),
                ));
                members.get_or_insert(names);
            }
        }
    }
    let (v, d) = match (&f.member, members) {
        (_, None) => (
            Verdict::Fail,
            "no etcd endpoint answered, so no member can join".to_owned(),
        ),
        (None, Some(_)) => (
            Verdict::Skip,
            "`member` is not set (hostname and admin port are chosen at start)".to_owned(),
        ),
        (Some(m), Some(names)) if names.contains(m) => (
            Verdict::Ok,
            format!("member `{m}` is registered in the fleet"),
        ),
        (Some(m), Some(_)) => (
            Verdict::Fail,
            format!("member `{m}` is not registered: not running, or it cannot reach etcd"),
        ),
    };
    out.push(check("member", v, d));
    out
}

/// The checklist as text, with a closing verdict line.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    let mut current = "";
    for c in checks {
        if c.listener != current {
            current = &c.listener;
            let _ = writeln!(out, "listener {current}");
        }
        let tag = match c.verdict {
            Verdict::Ok => "[ok]  ",
            Verdict::Fail => "[FAIL]",
            Verdict::Skip => "[skip]",
        };
        let _ = writeln!(out, "  {tag} {:<6} {}", c.step, c.detail);
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    let _ = writeln!(out, "verdict: {failed} of {} checks failed", checks.len());
    out
}

/// Whether `addr` is listened on, and by which process.
fn bound(addr: SocketAddr, sockets: &[(SocketAddr, Option<(u32, String)>)]) -> (Verdict, String) {
    if addr.port() == 0 {
        return (
            Verdict::Skip,
            format!("{addr}: port 0 lets the OS choose; nothing to check"),
        );
    }
    let holder = sockets.iter().find(|(a, _)| {
        a.port() == addr.port()
            && a.is_ipv4() == addr.is_ipv4()
            && (a.ip() == addr.ip() || a.ip().is_unspecified())
    });
    match holder {
        None => (
            Verdict::Fail,
            format!("{addr}: nothing listens here (is portshift running with this config?)"),
        ),
        Some((a, Some((pid, comm)))) if comm == "portshift" => (
            Verdict::Ok,
            format!("{addr}: listened on by portshift (pid {pid}, socket {a})"),
        ),
        Some((a, Some((pid, comm)))) => (
            Verdict::Fail,
            format!(
                "{addr}: held by pid {pid} ({comm}) on {a}, not by portshift: traffic to this port goes to another service"
            ),
        ),
        Some((a, None)) => (
            Verdict::Fail,
            format!(
                "{addr}: something listens on {a}, but its process is not visible (run as root to see it)"
            ),
        ),
    }
}

fn reach(addr: SocketAddr, timeout: Duration) -> (Verdict, String) {
    let started = Instant::now();
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => (
            Verdict::Ok,
            format!(
                "connects in {:.2}ms",
                started.elapsed().as_secs_f64() * 1000.0
            ),
        ),
        Err(e) => (
            Verdict::Fail,
            format!("cannot connect: {e} ({})", crate::telemetry::errno_name(&e)),
        ),
    }
}

fn answer(addr: SocketAddr, p: &Probe) -> (Verdict, String) {
    let started = Instant::now();
    let result = (|| -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, p.timeout)?;
        s.set_read_timeout(Some(p.timeout))?;
        s.set_write_timeout(Some(p.timeout))?;
        if let Some(send) = &p.send {
            s.write_all(send)?;
        }
        let mut got = vec![0u8; p.expect.as_ref().map_or(0, Vec::len)];
        s.read_exact(&mut got)?;
        Ok(got)
    })();
    let took = started.elapsed().as_secs_f64() * 1000.0;
    match (result, &p.expect) {
        (Ok(got), Some(want)) if &got == want => {
            (Verdict::Ok, format!("answers as expected in {took:.1}ms"))
        }
        (Ok(got), Some(want)) => (
            Verdict::Fail,
            format!(
                "answers {:?}, expected {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(want)
            ),
        ),
        (Ok(_), None) => (
            Verdict::Ok,
            format!("accepted the probe bytes in {took:.1}ms"),
        ),
        (Err(e), _) => (
            Verdict::Fail,
            format!("probe failed after {took:.1}ms: {e}"),
        ),
    }
}

/// Every listening TCP socket on this machine with its owner, from /proc.
pub(crate) fn listening_sockets() -> Vec<(SocketAddr, Option<(u32, String)>)> {
    let mut sockets = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (field 9)
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            if let Some(addr) = parse_proc_addr(f[1], v6) {
                sockets.push((addr, f[9].parse::<u64>().ok()));
            }
        }
    }
    let owners = socket_owners();
    sockets
        .into_iter()
        .map(|(a, inode)| {
            (
                a,
                inode.and_then(|i| {
                    owners
                        .iter()
                        .find(|(n, _, _)| *n == i)
                        .map(|(_, p, c)| (*p, c.clone()))
                }),
            )
        })
        .collect()
}

/// `0100007F:1F90` (v4) or 32 hex digits (v6) and a hex port.
fn parse_proc_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: IpAddr = if v6 {
        let mut bytes = [0u8; 16];
        for (i, chunk) in bytes.chunks_mut(4).enumerate() {
            let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(bytes)
    } else {
        IpAddr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes())
    };
    Some(SocketAddr::new(ip, port))
}

/// (socket inode, pid, command name) for every socket fd we can see.
fn socket_owners() -> Vec<(u64, u32, String)> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(p.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse().ok())
            {
                out.push((inode, pid, comm.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90", false),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050", true),
            Some("[::1]:80".parse().unwrap())
        );
    }
}
