//! The running proxy: its listeners as they are now, serving, and hot
//! reload. A reload validates the new file first and changes nothing if it
//! is bad; otherwise unchanged listeners keep running untouched, changed
//! ones restart on the sockets they keep (no port is closed and reopened),
//! new ones bind, removed ones stop accepting while their established
//! connections finish.

use super::audit::AuditLog;
use super::clock::Clock;
use super::proxy_protocol::Rejected;
use super::routed::Routed;
use super::state::{ListenerState, Occupancy, TraceSlot};
use super::{BindError, StartError, bind_one, connection, control, probe};
use crate::access_log::AccessLog;
use crate::config::{Config, Group, Listener};
use crate::core::stats::WindowConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Pause after an accept error such as EMFILE, so a full fd table does not
/// spin a core while connections close and free descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Everything a listener is built from; equal specs mean nothing to do on
/// reload.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ListenerSpec {
    listener: Listener,
    pub(super) groups: Vec<Group>,
    stats: WindowConfig,
}

impl ListenerSpec {
    fn of(config: &Config, l: &Listener) -> Self {
        ListenerSpec {
            listener: l.clone(),
            groups: l
                .all_groups()
                .iter()
                .map(|&g| config.group(g).clone())
                .collect(),
            stats: config.stats,
        }
    }
}

struct BoundSocket {
    /// As written in the config (port 0 stays 0), the key for reuse.
    configured: SocketAddr,
    local: SocketAddr,
    /// Shared with its accept loop, so a binary upgrade can duplicate the
    /// descriptor at hand-over time (keeping a duplicate all along would
    /// double the descriptors a listener holds).
    listener: Arc<TcpListener>,
    /// Its accept loop, once serving; the loop drops its share when
    /// cancelled, and the socket, still bound, can be reused on reload.
    accepting: Option<JoinHandle<()>>,
    /// A knock port: connections to it only move a source's knock
    /// sequence, and are closed at once.
    knock: bool,
}

pub(super) struct Running {
    pub(super) state: Arc<ListenerState>,
    pub(super) spec: ListenerSpec,
    /// Stops this listener's accept loops, probes and policy loop.
    token: CancellationToken,
    sockets: Vec<BoundSocket>,
}

impl Running {
    /// The listener's own state, then its routes' units.
    pub(super) fn units(&self) -> impl Iterator<Item = &Arc<ListenerState>> {
        let routes = self.state.routed.get().map_or(&[][..], |r| &r.units[..]);
        std::iter::once(&self.state).chain(routes)
    }
}

/// Why a reload changed nothing; the running config stays as it was.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file (or a policy or token it names) is not valid.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A new address could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot open audit log {}: {source}", path.display())]
    AuditLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open access log {}: {source}", path.display())]
    AccessLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The new file leaves the admin plane without a token while it keeps
    /// serving on a non-loopback address (the address changes only on
    /// restart).
    #[error(
        "the admin plane keeps serving on {addr} until a restart, which is not loopback, and the new config has no token for it; keep `token_file` or `token_env` until the restart"
    )]
    AdminWithoutToken { addr: SocketAddr },
    #[error("the proxy is shutting down")]
    ShuttingDown,
    /// A group none of whose backends resolved or was found.
    #[error("{0}")]
    Discovery(#[from] super::discovery::Unresolved),
}

/// The last reload's time and result (the error as its message).
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub at: SystemTime,
    pub result: Result<ReloadReport, String>,
}

/// What a successful reload changed, by listener name.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Settings that changed in the file but apply only after a restart
    /// (`admin.listen`: the admin socket is not moved while it serves;
    /// `fleet`: a member's lease and election last its life).
    pub restart_required: Vec<String>,
    /// `{unit}/{group}`: groups whose backend overrides (made through the
    /// admin API) the reload dropped, because it redefines the group.
    /// Overrides of a group it leaves as it was are kept.
    pub overrides_dropped: Vec<String>,
}

/// The admin settings a reload cannot apply: the admin plane's own socket,
/// bound at start (`bound`). The token and the limits apply at once.
fn restart_required(bound: Option<SocketAddr>, new: Option<&crate::config::Admin>) -> Vec<String> {
    match (bound, new.map(|a| a.listen)) {
        (a, b) if a == b => Vec::new(),
        (Some(_), Some(_)) => vec!["admin.listen".to_owned()],
        _ => vec!["admin".to_owned()],
    }
}

pub(crate) struct Shared {
    pub clock: Clock,
    pub config: Mutex<Config>,
    listeners: Mutex<Vec<Running>>,
    pub conns: TaskTracker,
    pub background: TaskTracker,
    pub stop: CancellationToken,
    pub audit: Arc<AuditLog>,
    /// Swapped whole by a reload: from then on only the new token works.
    pub admin_token: arc_swap::ArcSwapOption<crate::config::AdminToken>,
    /// The admin address bound at start, which a reload never moves: what
    /// decides whether the admin plane may go without a token.
    admin_bound: Option<SocketAddr>,
    /// Refused admin calls are logged and audited once a second.
    pub unauthorized_log: super::throttle::OncePerSecond,
    pub trace: TraceSlot,
    reload_lock: tokio::sync::Mutex<()>,
    serving: AtomicBool,
    pub last_reload: Mutex<Option<ReloadOutcome>>,
    /// Set once, before the listeners start, in fleet mode.
    pub fleet: std::sync::OnceLock<Arc<super::fleet::Fleet>>,
    /// The admin API's socket, duplicated, to pass to a new binary.
    pub admin_fd: std::sync::OnceLock<(SocketAddr, OwnedFd)>,
    /// A new binary took over: the drain that follows is not the unit
    /// stopping, so systemd must not hear STOPPING=1 from this process.
    pub handed_over: AtomicBool,
    /// Every open access log by path, shared by the listeners naming it.
    access_logs: Mutex<HashMap<PathBuf, Arc<AccessLog>>>,
    /// What the groups with discovered sources have now: a listener that
    /// starts (or restarts on a reload) starts from it.
    found: Mutex<super::discovery::Discovered>,
    /// Each discovered source's answer from the latest start or reload,
    /// which the reading tasks start from.
    answers: Mutex<super::discovery::Answers>,
    /// Stops the tasks that read discovered sources (restarted by a
    /// reload).
    discovering: Mutex<CancellationToken>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl Shared ===

impl Shared {
    /// Binds every listener (all or nothing) without accepting yet. An
    /// address among `passed` (sockets from systemd's socket activation)
    /// is taken from there instead of bound.
    pub fn bind(
        config: &Config,
        passed: &mut HashMap<SocketAddr, std::net::TcpListener>,
    ) -> Result<Shared, StartError> {
        let clock = Clock::start();
        let mut bound: HashMap<SocketAddr, Vec<TcpListener>> = HashMap::new();
        for l in &config.listeners {
            for addr in l.all_addrs() {
                let socket = match passed.remove(&addr) {
                    Some(s) => take_passed(l, addr, s)?,
                    None => bind_for(l, addr)?,
                };
                bound.entry(addr).or_default().push(socket);
            }
        }
        let audit =
            AuditLog::open(config.audit_log.as_deref()).map_err(|source| StartError::AuditLog {
                path: config.audit_log.clone().unwrap_or_default(),
                source,
            })?;
        let trace = TraceSlot::default();
        let files = open_access_logs(config, &HashMap::new())
            .map_err(|(path, source)| StartError::AccessLog { path, source })?;
        let (found, answers, unresolved) = super::discovery::initial(config)?;
        for w in unresolved {
            warn!("{w}; the group starts without it");
        }
        let sinks = Sinks {
            trace: &trace,
            files: &files,
            found: &found,
        };
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                new_running(
                    config,
                    l,
                    clock,
                    &sinks,
                    CancellationToken::new(),
                    &mut bound,
                    None,
                )
            })
            .collect();
        Ok(Shared {
            clock,
            config: Mutex::new(config.clone()),
            listeners: Mutex::new(listeners),
            conns: TaskTracker::new(),
            background: TaskTracker::new(),
            stop: CancellationToken::new(),
            audit: Arc::new(audit),
            admin_token: arc_swap::ArcSwapOption::from_pointee(
                config.admin.as_ref().and_then(|a| a.token.clone()),
            ),
            unauthorized_log: super::throttle::OncePerSecond::new(),
            admin_bound: config.admin.as_ref().map(|a| a.listen),
            trace,
            reload_lock: tokio::sync::Mutex::new(()),
            serving: AtomicBool::new(false),
            last_reload: Mutex::new(None),
            fleet: std::sync::OnceLock::new(),
            admin_fd: std::sync::OnceLock::new(),
            handed_over: AtomicBool::new(false),
            access_logs: Mutex::new(files),
            found: Mutex::new(found),
            answers: Mutex::new(answers),
            discovering: Mutex::new(CancellationToken::new()),
        })
    }

    /// Starts every listener's accept loops, probes and policy loop.
    pub fn start(self: &Arc<Self>) {
        self.serving.store(true, Relaxed);
        self.discover(&lock(&self.config));
        let mut listeners = lock(&self.listeners);
        for r in listeners.iter_mut() {
            r.token = self.stop.child_token();
            self.start_running(r);
        }
    }

    fn start_running(&self, r: &mut Running) {
        for unit in r.units() {
            self.start_unit(unit, &r.token);
        }
        for s in r.sockets.iter_mut().filter(|s| s.accepting.is_none()) {
            let (listener, state, token) = (
                Arc::clone(&s.listener),
                Arc::clone(&r.state),
                r.token.clone(),
            );
            if s.knock {
                info!(listener = %r.state.name, addr = %s.local, "knock port listening");
                s.accepting = Some(tokio::spawn(knock_loop(listener, state, token)));
                continue;
            }
            info!(listener = %r.state.name, addr = %s.local, "listening");
            connection::prepare_listener(&s.listener, &r.state.socket);
            let task = accept_loop(listener, state, self.conns.clone(), token);
            s.accepting = Some(tokio::spawn(task));
        }
    }

    /// A routing unit's probes and policy loop (a listener's own, or a
    /// route's).
    fn start_unit(&self, unit: &Arc<ListenerState>, token: &CancellationToken) {
        // Kept for the backends that join later (a unit starts once).
        let _ = unit.tasks.set((self.background.clone(), token.clone()));
        probe::spawn_all(unit, &self.background, token);
        if unit
            .router
            .table()
            .groups
            .iter()
            .any(|g| g.ejections().is_some())
        {
            let watch = super::eject::watch_returns(Arc::clone(unit), token.clone());
            self.background.spawn(watch);
        }
        let fleet = self.fleet.get().cloned();
        if let Some(f) = &fleet {
            f.apply_known(unit);
        }
        if let Some(policy) = unit.policy() {
            self.background.spawn(control::run(
                Arc::clone(unit),
                policy.clone(),
                Arc::clone(&self.audit),
                fleet,
                token.clone(),
            ));
        }
    }

    /// (Re)starts the tasks that read the groups' discovered sources.
    fn discover(self: &Arc<Self>, config: &Config) {
        let token = self.stop.child_token();
        std::mem::replace(&mut *lock(&self.discovering), token.clone()).cancel();
        let answers = lock(&self.answers).clone();
        super::discovery::watch_all(self, (config, &answers), &token);
    }

    /// A group's discovered sources give it `backends` now: every routing
    /// unit using the group whose source differs takes them, on top of its
    /// overrides.
    pub(super) fn discovered(&self, group: &str, backends: Vec<crate::core::backend::Backend>) {
        let changed = lock(&self.found)
            .insert(group.to_owned(), backends.clone())
            .as_ref()
            != Some(&backends);
        crate::telemetry::discovery_update(group, backends.len(), changed);
        for (unit, _) in self.listeners() {
            let Some(gi) = unit.group_names().iter().position(|n| n == group) else {
                continue;
            };
            if unit.membership(gi).source == backends {
                continue;
            }
            let applied = unit.reshape(gi, "discovery", |m| {
                *m = m.with_source(backends.clone());
                Ok(())
            });
            if let Err(e) = applied {
                warn!(unit = %unit.name, group, error = %e, "discovered backends not applied");
            }
        }
    }

    /// Every listener's name and bound addresses (not its knock ports).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.listeners)
            .iter()
            .flat_map(|r| {
                r.sockets
                    .iter()
                    .filter(|s| !s.knock)
                    .map(|s| (r.state.name.clone(), s.local))
            })
            .collect()
    }

    /// A listener, or a route's unit by `{listener}/{route}`.
    pub fn listener(&self, name: &str) -> Option<Arc<ListenerState>> {
        lock(&self.listeners)
            .iter()
            .flat_map(Running::units)
            .find(|s| s.name == name)
            .map(Arc::clone)
    }

    /// Every listener with its bound addresses, each followed by its
    /// routes' units (which bind nothing).
    pub fn listeners(&self) -> Vec<(Arc<ListenerState>, Vec<SocketAddr>)> {
        lock(&self.listeners)
            .iter()
            .flat_map(|r| {
                let addrs: Vec<SocketAddr> = r
                    .sockets
                    .iter()
                    .filter(|s| !s.knock)
                    .map(|s| s.local)
                    .collect();
                r.units().map(move |u| {
                    let own = if Arc::ptr_eq(u, &r.state) {
                        addrs.clone()
                    } else {
                        Vec::new()
                    };
                    (Arc::clone(u), own)
                })
            })
            .collect()
    }

    /// Every listening socket a new binary may take over: the admin API's
    /// (as listener `admin`) and every listener's with a fixed port (port
    /// 0 means any free port, which the new process picks afresh).
    pub fn handover_sockets(&self) -> Vec<(String, SocketAddr, std::io::Result<OwnedFd>)> {
        let mut out = Vec::new();
        if let Some((addr, fd)) = self.admin_fd.get() {
            out.push(("admin".to_owned(), *addr, fd.try_clone()));
        }
        for r in lock(&self.listeners).iter() {
            for s in r.sockets.iter().filter(|s| s.configured.port() != 0) {
                let fd = s.listener.as_fd().try_clone_to_owned();
                out.push((r.state.name.clone(), s.local, fd));
            }
        }
        out
    }

    /// Holds off reloads while a binary upgrade hands over (from a
    /// blocking thread).
    pub fn hold_reloads(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reload_lock.blocking_lock()
    }

    /// Stops every accept loop and closes every listening socket.
    pub async fn close_listeners(&self) {
        let all = std::mem::take(&mut *lock(&self.listeners));
        for r in all {
            drop(stop_running(r).await);
        }
    }

    /// Re-reads the config file and applies the difference; a bad file
    /// changes nothing. Serialized: one reload at a time.
    pub async fn reload(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        // In its own task: the caller (an admin connection that times out, a
        // dropped future) cannot cancel a reload halfway through its commit.
        let shared = Arc::clone(self);
        match tokio::spawn(async move { shared.reload_serialized().await }).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(ReloadError::ShuttingDown),
        }
    }

    async fn reload_serialized(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        let _one = self.reload_lock.lock().await;
        crate::systemd::reloading();
        // SIGHUP after logrotate: whatever the new file says, lines go to
        // fresh files at the same paths from now on.
        for log in lock(&self.access_logs).values() {
            log.reopen();
        }
        if let Some(t) = self.trace.load().as_ref() {
            t.reopen();
        }
        let result = self.reload_inner().await;
        crate::systemd::reloaded(result.is_ok());
        crate::telemetry::reload(result.is_ok());
        match &result {
            Ok(r) => {
                info!(added = ?r.added, changed = ?r.changed, removed = ?r.removed, "config reloaded")
            }
            Err(e) => warn!(error = %e, "config reload failed; the running config is unchanged"),
        }
        *lock(&self.last_reload) = Some(ReloadOutcome {
            at: SystemTime::now(),
            result: result
                .as_ref()
                .map(Clone::clone)
                .map_err(ToString::to_string),
        });
        result
    }

    async fn reload_inner(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        let path: PathBuf = lock(&self.config).path.clone();
        let new = Config::load(&path)?;
        let resolving = new.clone();
        let (found, answers, unresolved) =
            tokio::task::spawn_blocking(move || super::discovery::initial(&resolving))
                .await
                .map_err(|_| ReloadError::ShuttingDown)??;
        for w in unresolved {
            warn!("{w}; the group goes on without it");
        }
        // Plan and bind without touching anything running; then commit.
        let mut plan = self.plan_reload(&new)?;
        let files = open_access_logs(&new, &lock(&self.access_logs))
            .map_err(|(path, source)| ReloadError::AccessLog { path, source })?;
        self.audit
            .reopen(new.audit_log.as_deref())
            .map_err(|source| ReloadError::AuditLog {
                path: new.audit_log.clone().unwrap_or_default(),
                source,
            })?;
        // The old reading tasks stop before the new listeners are built
        // from what this reload read.
        lock(&self.discovering).cancel();
        *lock(&self.found) = found;
        *lock(&self.answers) = answers;
        plan.report.overrides_dropped = self
            .commit_reload(&new, &plan.keep, &mut plan.fresh, &files)
            .await;
        if self.serving.load(Relaxed) {
            self.discover(&new);
        }
        // Files no listener names any more are closed (their queued lines
        // written) as the last listener holding one goes.
        *lock(&self.access_logs) = files;
        // The new token (read and checked when the file was loaded) takes
        // over at once: the old one is refused from the next call on.
        self.admin_token.store(
            new.admin
                .as_ref()
                .and_then(|a| a.token.clone())
                .map(Arc::new),
        );
        if !plan.report.restart_required.is_empty() {
            warn!(keys = ?plan.report.restart_required, "these settings take effect on restart only");
        }
        *lock(&self.config) = new;
        Ok(plan.report)
    }

    /// What a reload to `new` would do, and the sockets it must bind fresh
    /// (bound here, so a port that cannot be had fails the reload before
    /// anything changes). Running listeners are not touched.
    fn plan_reload(&self, new: &Config) -> Result<ReloadPlan, ReloadError> {
        let old: Vec<(String, ListenerSpec, Vec<SocketAddr>)> = lock(&self.listeners)
            .iter()
            .map(|r| {
                let addrs = r.sockets.iter().map(|s| s.configured).collect();
                (r.state.name.clone(), r.spec.clone(), addrs)
            })
            .collect();
        let no_token = new.admin.as_ref().is_none_or(|a| a.token.is_none());
        if let Some(addr) = self.admin_bound
            && no_token
            && !addr.ip().is_loopback()
        {
            // The file may say loopback (or no admin at all), but the socket
            // still serving is this one: it must keep a token.
            return Err(ReloadError::AdminWithoutToken { addr });
        }
        let mut report = ReloadReport {
            restart_required: restart_required(self.admin_bound, new.admin.as_ref()),
            ..ReloadReport::default()
        };
        // A member keeps its lease, election and watch for its life: a
        // changed [fleet] applies at the next start.
        if lock(&self.config).fleet != new.fleet {
            report.restart_required.push("fleet".to_owned());
        }
        // The upgrade socket is bound once, at start.
        if lock(&self.config).upgrade_socket != new.upgrade_socket {
            report.restart_required.push("upgrade_socket".to_owned());
        }
        let mut keep = Vec::new();
        for l in &new.listeners {
            let spec = ListenerSpec::of(new, l);
            match old.iter().find(|(n, _, _)| *n == l.name) {
                Some((_, s, _)) if *s == spec => {
                    keep.push(l.name.clone());
                    report.unchanged.push(l.name.clone());
                }
                Some(_) => report.changed.push(l.name.clone()),
                None => report.added.push(l.name.clone()),
            }
        }
        report.removed = old
            .iter()
            .filter(|(n, _, _)| !new.listeners.iter().any(|l| l.name == *n))
            .map(|(n, _, _)| n.clone())
            .collect();
        let fresh = bind_fresh(new, &keep, &old)?;
        Ok(ReloadPlan {
            report,
            keep,
            fresh,
        })
    }

    /// Stops what changes, hands its sockets over, starts the new. Cannot
    /// fail: everything it needs was bound or opened before. Returns the
    /// groups whose overrides it dropped.
    async fn commit_reload(
        &self,
        new: &Config,
        keep: &[String],
        fresh: &mut HashMap<SocketAddr, Vec<TcpListener>>,
        files: &HashMap<PathBuf, Arc<AccessLog>>,
    ) -> Vec<String> {
        let current = std::mem::take(&mut *lock(&self.listeners));
        let (mut kept, gone): (Vec<Running>, Vec<Running>) = current
            .into_iter()
            .partition(|r| keep.contains(&r.state.name));
        // A changed listener keeps counting the connections it accepted
        // before: its limits hold across the reload.
        let mut occupancy: HashMap<String, Occupancy> = gone
            .iter()
            .map(|r| (r.state.name.clone(), r.state.occupancy()))
            .collect();
        let overridden: Vec<super::members::Overridden> = gone
            .iter()
            .flat_map(super::members::Overridden::of)
            .collect();
        let mut dropped = Vec::new();
        for r in gone {
            for (addr, socket) in stop_running(r).await {
                // Port 0 means "any free port": never handed over.
                if addr.port() != 0 {
                    fresh.entry(addr).or_default().push(socket);
                }
            }
        }
        let serving = self.serving.load(Relaxed);
        let mut next = Vec::new();
        for l in &new.listeners {
            if let Some(i) = kept.iter().position(|r| r.state.name == l.name) {
                next.push(kept.remove(i));
                continue;
            }
            let token = self.stop.child_token();
            let carried = occupancy.remove(&l.name);
            let found = lock(&self.found).clone();
            let sinks = Sinks {
                trace: &self.trace,
                files,
                found: &found,
            };
            let mut r = new_running(new, l, self.clock, &sinks, token, fresh, carried);
            for unit in r.units() {
                dropped.extend(super::members::carry_over(unit, &overridden, new));
            }
            if serving {
                self.start_running(&mut r);
            }
            next.push(r);
        }
        for (addr, sockets) in fresh.drain() {
            if !sockets.is_empty() {
                info!(%addr, "stopped listening");
            }
        }
        *lock(&self.listeners) = next;
        dropped
    }
}

/// A reload's plan: what it reports, the listeners it keeps untouched, and
/// the sockets bound for the ones it starts.
struct ReloadPlan {
    report: ReloadReport,
    keep: Vec<String>,
    fresh: HashMap<SocketAddr, Vec<TcpListener>>,
}

/// Binds every address of the listeners `new` starts that no stopping
/// listener hands over (the same configured address, not port 0).
fn bind_fresh(
    new: &Config,
    keep: &[String],
    old: &[(String, ListenerSpec, Vec<SocketAddr>)],
) -> Result<HashMap<SocketAddr, Vec<TcpListener>>, BindError> {
    let mut handed_over: HashMap<SocketAddr, usize> = HashMap::new();
    for (_, _, addrs) in old.iter().filter(|(n, _, _)| !keep.contains(n)) {
        for a in addrs.iter().filter(|a| a.port() != 0) {
            *handed_over.entry(*a).or_default() += 1;
        }
    }
    let mut fresh: HashMap<SocketAddr, Vec<TcpListener>> = HashMap::new();
    for l in new.listeners.iter().filter(|l| !keep.contains(&l.name)) {
        for addr in l.all_addrs() {
            match handed_over.get_mut(&addr) {
                Some(n) if *n > 0 => *n -= 1,
                _ => fresh.entry(addr).or_default().push(bind_for(l, addr)?),
            }
        }
    }
    Ok(fresh)
}

/// A socket systemd passed for listener `l`'s `addr`, made ready for
/// tokio; its backlog is the socket unit's.
fn take_passed(
    l: &Listener,
    addr: SocketAddr,
    s: std::net::TcpListener,
) -> Result<TcpListener, BindError> {
    info!(listener = %l.name, %addr, "taking a passed socket instead of binding (socket activation or a binary upgrade)");
    s.set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(s))
        .map_err(|source| BindError {
            listener: l.name.clone(),
            addr,
            port: addr.port(),
            source,
        })
}

/// Binds one of listener `l`'s addresses, with its backlog; a failure
/// names the listener and the port.
fn bind_for(l: &Listener, addr: SocketAddr) -> Result<TcpListener, BindError> {
    bind_one(addr, l.socket.backlog).map_err(|source| BindError {
        listener: l.name.clone(),
        addr,
        port: addr.port(),
        source,
    })
}

/// Where a listener's finished connections go.
struct Sinks<'a> {
    trace: &'a TraceSlot,
    files: &'a HashMap<PathBuf, Arc<AccessLog>>,
    /// What the groups with discovered sources have now.
    found: &'a super::discovery::Discovered,
}

/// Every access log `config` names: the one already open at a path is
/// kept (its queue and thread too), the others opened for appending.
fn open_access_logs(
    config: &Config,
    open: &HashMap<PathBuf, Arc<AccessLog>>,
) -> Result<HashMap<PathBuf, Arc<AccessLog>>, (PathBuf, std::io::Error)> {
    let mut out = HashMap::new();
    for path in config
        .listeners
        .iter()
        .filter_map(|l| l.access_log.as_ref())
    {
        if out.contains_key(path) {
            continue;
        }
        let log = match open.get(path) {
            Some(log) => Arc::clone(log),
            None => Arc::new(AccessLog::append(path).map_err(|e| (path.clone(), e))?),
        };
        out.insert(path.clone(), log);
    }
    Ok(out)
}

/// A listener's running parts, taking its sockets from `bound`.
fn new_running(
    config: &Config,
    l: &Listener,
    clock: Clock,
    sinks: &Sinks<'_>,
    token: CancellationToken,
    bound: &mut HashMap<SocketAddr, Vec<TcpListener>>,
    occupancy: Option<Occupancy>,
) -> Running {
    let own = l.addrs.len();
    let sockets = l
        .all_addrs()
        .into_iter()
        .enumerate()
        .map(|(i, configured)| {
            let socket = bound
                .get_mut(&configured)
                .and_then(Vec::pop)
                .expect("every address of the listener was bound or handed over");
            // A handed-over socket takes the new backlog: listen() again
            // only resizes the queue of a listening socket.
            let _ = socket2::SockRef::from(&socket)
                .listen(l.socket.backlog.min(i32::MAX as u32) as i32);
            let local = socket.local_addr().unwrap_or(configured);
            BoundSocket {
                configured,
                local,
                listener: Arc::new(socket),
                accepting: None,
                knock: i >= own,
            }
        })
        .collect();
    let access_log = l.access_log.as_ref().and_then(|p| sinks.files.get(p));
    let state = |l: &Listener, occupancy: &Occupancy| {
        Arc::new(ListenerState::new(
            config,
            l,
            clock,
            (Arc::clone(sinks.trace), access_log.cloned()),
            occupancy,
            sinks.found,
        ))
    };
    let front = state(l, &occupancy.unwrap_or_default());
    if !l.routes.is_empty() {
        // Routes admit nothing themselves: the listener's limits count
        // every connection once, at its door.
        let units = l
            .routes
            .iter()
            .map(|r| state(&l.unit(r), &Occupancy::default()))
            .collect();
        let _ = front.routed.set(Routed::new(l, units));
    }
    Running {
        state: front,
        spec: ListenerSpec::of(config, l),
        token,
        sockets,
    }
}

/// Stops a listener's loops and returns its sockets, still bound.
async fn stop_running(r: Running) -> Vec<(SocketAddr, TcpListener)> {
    r.token.cancel();
    let mut out = Vec::new();
    for s in r.sockets {
        if let Some(h) = s.accepting {
            let _ = h.await;
        }
        // The loop has ended and dropped its share.
        if let Ok(l) = Arc::try_unwrap(s.listener) {
            out.push((s.configured, l));
        }
    }
    out
}

/// A knock port: every connection is one knock, then reset at once (no
/// byte is read or sent, so to a scanner it looks like nothing is there).
async fn knock_loop(
    listener: Arc<TcpListener>,
    state: Arc<ListenerState>,
    stop: CancellationToken,
) {
    let port = listener.local_addr().map_or(0, |a| a.port());
    let s = Arc::clone(&state);
    accept_until(&listener, &state, stop, |sock, peer| {
        // Counted before the reset reaches the source, so its next knock
        // always finds this one.
        s.note_knock(peer, port);
        let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
    })
    .await;
}

async fn accept_loop(
    listener: Arc<TcpListener>,
    state: Arc<ListenerState>,
    conns: TaskTracker,
    stop: CancellationToken,
) {
    let s = Arc::clone(&state);
    accept_until(&listener, &state, stop, |client, peer| {
        if s.proxy_protocol.is_some() {
            if s.trusts_proxy(peer.ip()) {
                conns.spawn(connection::handle_behind_proxy(
                    Arc::clone(&s),
                    client,
                    peer,
                ));
            } else {
                drop(client);
                s.note_proxy_rejected(peer, Rejected::Untrusted);
            }
            return;
        }
        match s.admit(peer.ip()) {
            Ok(slot) => {
                s.outcomes.accepted();
                s.listener_metrics.accepted.increment(1);
                let peer = connection::Peer::direct(peer);
                conns.spawn(connection::admitted(Arc::clone(&s), client, slot, peer));
            }
            Err(reason) => {
                // Closed here, before any backend is touched.
                drop(client);
                s.outcomes.denied();
                s.note_denied(peer, reason);
            }
        }
    })
    .await;
}

/// Accepts until `stop`, handing each connection to `on_accept`; a failed
/// accept (EMFILE, ENFILE and friends) is counted and backed off from, and
/// the listener survives it.
async fn accept_until(
    listener: &TcpListener,
    state: &ListenerState,
    stop: CancellationToken,
    mut on_accept: impl FnMut(tokio::net::TcpStream, SocketAddr),
) {
    // One cancellation future for the loop's life: making one per accept
    // would add and remove a waiter under the token's lock every time.
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut cancelled => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => on_accept(sock, peer),
            Err(e) => {
                state.note_accept_error(&e);
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}
