//! Backends that move: a group's names, SRV records and discovery files,
//! read at start (a group none of whose sources gives a backend stops the
//! start, naming it) and then by one task per group: names again every
//! `resolve_every` or when their TTL runs out (never more often than
//! once a second), files when they change (inotify, polled where that
//! fails) and every `resolve_every`. A source that fails keeps its last
//! good answer, logged and counted. A change of the group's backends goes
//! to every routing unit that uses the group, through `reshape`, on top of
//! the admin API's overrides.

use super::runtime::Shared;
use crate::config::discovery::{Dns, MIN_RESOLVE_EVERY, Source, parse_backends_file};
use crate::config::{Config, Group};
use crate::core::backend::Backend;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The backends each group with discovered sources has now, by group
/// name: its listed addresses and its sources' answers.
pub type Discovered = HashMap<String, Vec<Backend>>;

/// Each source's latest good answer (`None`: none yet), by group name: what
/// a group's reading task starts from, so a source that fails at its first
/// read keeps what it gave at start.
pub type Answers = HashMap<String, Vec<Option<Answer>>>;

/// What the first read of every group's sources found, and each source
/// that failed (as warnings).
pub type Initial = (Discovered, Answers, Vec<String>);

/// A source's answer, and how long it holds (a DNS answer's TTL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub backends: Vec<Backend>,
    pub valid_for: Option<Duration>,
}

/// The resolver for backend names: `[dns] servers`, or the system's.
pub fn resolver(dns: Option<&Dns>) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = match dns {
        None => TokioResolver::builder(provider)
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?,
        Some(d) => {
            let servers = d.servers.iter().map(|s| {
                let mut c = NameServerConfig::udp_and_tcp(s.ip());
                for conn in &mut c.connections {
                    conn.port = s.port();
                }
                c
            });
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers.collect()),
                provider,
            )
        }
    };
    let opts = builder.options_mut();
    opts.timeout = dns.map_or(crate::config::discovery::DEFAULT_DNS_TIMEOUT, |d| d.timeout);
    opts.attempts = 2;
    builder
        .build()
        .map_err(|e| format!("cannot build the resolver: {e}"))
}

/// Reads one source now.
pub async fn read(resolver: &TokioResolver, source: &Source) -> Result<Answer, String> {
    match source {
        Source::File { path } => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
            let backends = parse_backends_file(&text).map_err(|e| e.to_string())?;
            Ok(Answer {
                backends,
                valid_for: None,
            })
        }
        Source::Host { host, port, weight } => {
            let found = resolver
                .lookup_ip(host.as_str())
                .await
                .map_err(|e| e.to_string())?;
            let valid_for = found
                .valid_until()
                .saturating_duration_since(Instant::now());
            let mut backends: Vec<Backend> = Vec::new();
            for ip in found.iter() {
                let addr = SocketAddr::new(ip, *port);
                if !backends.iter().any(|b| b.addr == addr) {
                    backends.push(Backend {
                        addr,
                        weight: *weight,
                    });
                }
            }
            answered(backends, valid_for)
        }
        Source::Srv { name } => srv(resolver, name).await,
    }
}

/// An answer with at least one address, in address order (so the same
/// records in another order are the same answer).
fn answered(mut backends: Vec<Backend>, valid_for: Duration) -> Result<Answer, String> {
    backends.sort_by_key(|b| b.addr);
    if backends.is_empty() {
        return Err("the answer has no address".into());
    }
    Ok(Answer {
        backends,
        valid_for: Some(valid_for),
    })
}

/// The targets of an SRV record's lowest priority (the ones a client
/// must try first), each address of each target at the record's port
/// with its weight (at least 1, at most the largest backend weight).
async fn srv(resolver: &TokioResolver, name: &str) -> Result<Answer, String> {
    let found = resolver.srv_lookup(name).await.map_err(|e| e.to_string())?;
    let mut valid_for = found
        .valid_until()
        .saturating_duration_since(Instant::now());
    let records: Vec<_> = found
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let Some(first) = records.iter().map(|s| s.priority).min() else {
        return Err("the answer has no SRV record".into());
    };
    let mut backends: Vec<Backend> = Vec::new();
    for s in records.iter().filter(|s| s.priority == first) {
        let target = s.target.to_string();
        let ips = resolver
            .lookup_ip(target.as_str())
            .await
            .map_err(|e| format!("target {target}: {e}"))?;
        valid_for = valid_for.min(ips.valid_until().saturating_duration_since(Instant::now()));
        let weight = u32::from(s.weight).clamp(1, crate::config::MAX_BACKEND_WEIGHT);
        for ip in ips.iter() {
            let addr = SocketAddr::new(ip, s.port);
            if !backends.iter().any(|b| b.addr == addr) {
                backends.push(Backend { addr, weight });
            }
        }
    }
    answered(backends, valid_for)
}

/// A group's backends: its listed addresses, then each source's latest
/// good answer (an address given twice keeps its first weight).
fn combine(group: &Group, answers: &[Option<Answer>]) -> Vec<Backend> {
    let mut out = group.backends.clone();
    for b in answers.iter().flatten().flat_map(|a| &a.backends) {
        if !out.iter().any(|o| o.addr == b.addr) {
            out.push(*b);
        }
    }
    out
}

/// Why a start could not find backends for every group.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct Unresolved(pub Vec<String>);

/// Reads every source of `group` once into `answers` (one per source): a
/// source that fails keeps what it held there, and `failed` hears why.
async fn read_into(
    resolver: &TokioResolver,
    group: &Group,
    answers: &mut [Option<Answer>],
    mut failed: impl FnMut(&Source, String),
) {
    for (s, slot) in group.discover.iter().zip(answers.iter_mut()) {
        match read(resolver, s).await {
            Ok(a) => *slot = Some(a),
            Err(e) => failed(s, e),
        }
    }
}

/// Every group with sources read once, at start or by `check`: each
/// group's backends, and each source that failed (as warnings). Fails
/// naming the groups left with no backend of weight above 0. Runs on a
/// thread of its own, so it can be called from inside a runtime or not.
pub fn initial(config: &Config) -> Result<Initial, Unresolved> {
    let groups: Vec<Group> = config
        .groups
        .iter()
        .filter(|g| !g.discover.is_empty())
        .cloned()
        .collect();
    if groups.is_empty() {
        return Ok((Discovered::new(), Answers::new(), Vec::new()));
    }
    let dns = config.dns.clone();
    let run = move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Unresolved(vec![format!("cannot start the resolver: {e}")]))?;
        rt.block_on(initial_async(dns.as_ref(), &groups))
    };
    std::thread::scope(|s| s.spawn(run).join())
        .unwrap_or_else(|_| Err(Unresolved(vec!["the resolver thread panicked".into()])))
}

async fn initial_async(dns: Option<&Dns>, groups: &[Group]) -> Result<Initial, Unresolved> {
    let resolver = resolver(dns).map_err(|e| Unresolved(vec![e]))?;
    let mut found = Discovered::new();
    let mut all_answers = Answers::new();
    let mut warnings = Vec::new();
    let mut empty = Vec::new();
    for g in groups {
        let mut answers = vec![None; g.discover.len()];
        let mut failed = Vec::new();
        read_into(&resolver, g, &mut answers, |s, e| {
            failed.push(format!("{s}: {e}"))
        })
        .await;
        let backends = combine(g, &answers);
        for f in &failed {
            warnings.push(format!("group `{}`: {f}", g.name));
        }
        if backends.iter().all(|b| b.weight == 0) {
            empty.push(format!(
                "group `{}` has no backend: {}",
                g.name,
                if failed.is_empty() {
                    "its sources list none with a weight".to_owned()
                } else {
                    failed.join(", ")
                }
            ));
        }
        found.insert(g.name.clone(), backends);
        all_answers.insert(g.name.clone(), answers);
    }
    if empty.is_empty() {
        Ok((found, all_answers, warnings))
    } else {
        Err(Unresolved(empty))
    }
}

/// Starts a task per group with sources, reading them from now on, until
/// `stop`. `answers`: each source's answer at start, kept until a read
/// gives a better one.
pub(super) fn watch_all(
    shared: &Arc<Shared>,
    (config, answers): (&Config, &Answers),
    stop: &CancellationToken,
) {
    let resolver = match resolver(config.dns.as_ref()) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            warn!(error = %e, "discovered backends will not be read again");
            return;
        }
    };
    for g in config.groups.iter().filter(|g| !g.discover.is_empty()) {
        let start = answers.get(&g.name).cloned().unwrap_or_default();
        let task = watch(
            Arc::clone(shared),
            (g.clone(), start),
            Arc::clone(&resolver),
            stop.clone(),
        );
        shared.background.spawn(task);
    }
}

/// How long until a group's sources are read again: `resolve_every`, or
/// sooner when a DNS answer's TTL runs out (never under a second).
fn next_read(group: &Group, answers: &[Option<Answer>]) -> Duration {
    let ttl = answers.iter().flatten().filter_map(|a| a.valid_for).min();
    ttl.map_or(group.resolve_every, |t| {
        t.max(MIN_RESOLVE_EVERY).min(group.resolve_every)
    })
}

async fn watch(
    shared: Arc<Shared>,
    (group, start): (Group, Vec<Option<Answer>>),
    resolver: Arc<TokioResolver>,
    stop: CancellationToken,
) {
    let (tx, mut changed) = tokio::sync::mpsc::unbounded_channel();
    let _watching = watch_files(&group, tx);
    let mut answers = start;
    answers.resize(group.discover.len(), None);
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            Some(()) = changed.recv() => {
                // A writer may take several events: let it finish.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while changed.try_recv().is_ok() {}
            }
        }
        read_into(&resolver, &group, &mut answers, |s, e| {
            crate::telemetry::discovery_error(&group.name, &s.to_string());
            warn!(group = %group.name, source = %s, error = %e, "a discovered source failed; the group keeps its last good answer");
        })
        .await;
        wait = next_read(&group, &answers);
        let backends = combine(&group, &answers);
        if backends.iter().all(|b| b.weight == 0) {
            warn!(group = %group.name, "the group's sources give no backend with a weight; it keeps the backends it has");
            continue;
        }
        // A reload may have replaced this task while it read.
        if stop.is_cancelled() {
            return;
        }
        shared.discovered(&group.name, backends);
    }
}

/// Watches the folders of `group`'s discovery files (a file replaced by a
/// rename is seen too), sending on `tx` when one of the files changes.
/// Where inotify cannot be had, polls every second. The watcher lives as
/// long as the returned value.
fn watch_files(
    group: &Group,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> Option<Box<dyn notify::Watcher + Send>> {
    use notify::Watcher;
    let files: Vec<std::path::PathBuf> = group
        .discover
        .iter()
        .filter_map(|s| match s {
            Source::File { path } => Some(path.clone()),
            _ => None,
        })
        .collect();
    if files.is_empty() {
        return None;
    }
    let names: Vec<_> = files
        .iter()
        .filter_map(|f| f.file_name().map(ToOwned::to_owned))
        .collect();
    let handler = move |event: notify::Result<notify::Event>| {
        let ours = event.is_ok_and(|e| {
            e.paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.iter().any(|m| m == n)))
        });
        if ours {
            let _ = tx.send(());
        }
    };
    let mut watcher: Box<dyn Watcher + Send> = match notify::recommended_watcher(handler.clone()) {
        Ok(w) => Box::new(w),
        Err(e) => {
            warn!(group = %group.name, error = %e, "cannot watch discovery files; polling them every second");
            let poll = notify::Config::default().with_poll_interval(Duration::from_secs(1));
            Box::new(notify::PollWatcher::new(handler, poll).ok()?)
        }
    };
    for f in &files {
        let dir = f
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            warn!(group = %group.name, file = %f.display(), error = %e, "cannot watch a discovery file's folder; it is read every resolve_every");
        }
    }
    info!(group = %group.name, files = files.len(), "watching discovery files");
    Some(watcher)
}
