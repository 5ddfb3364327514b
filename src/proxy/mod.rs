//! The tokio shell: binds every listener (all or nothing), accepts, applies
//! the ACL, asks the route table where to go, connects upstream with
//! retries, and copies bytes until the connection ends. On shutdown it stops
//! accepting and drains in-flight connections up to a deadline. The admin
//! API and hot reload act on the running proxy through a `ProxyHandle`.

mod admin;
mod audit;
mod clock;
mod connection;
mod control;
mod copy;
mod decisions;
pub mod discovery;
mod eject;
pub mod fleet;
mod members;
mod outcome;
mod probe;
mod process;
mod proxy_protocol;
mod routed;
mod runtime;
pub mod sni;
mod state;
mod throttle;
pub mod tls;
pub mod upgrade;

pub use clock::Clock;
pub use copy::{BUFFER_BYTES, Copied};
pub use decisions::RecentDecisions;
pub use outcome::{ConnectFailure, End, OutcomeCounts, Outcomes};
pub use process::{RunError, RunOptions, run};
pub use runtime::{ReloadError, ReloadOutcome, ReloadReport};
pub use state::{GroupView, ListenerState};

use crate::config::Config;
use runtime::Shared;
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Accept queue length: the kernel's default cap (somaxconn) on current
/// Linux, so bursts of new connections queue rather than get dropped.
pub const LISTEN_BACKLOG: u32 = crate::config::DEFAULT_BACKLOG;
/// Why the proxy could not start; nothing was left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot open audit log {path}: {source}")]
    AuditLog {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open access log {path}: {source}")]
    AccessLog {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    /// A group none of whose backends resolved or was found.
    #[error("{0}")]
    Discovery(#[from] discovery::Unresolved),
}

/// A listener that could not be bound; nothing else was left running.
#[derive(Debug, thiserror::Error)]
#[error(
    "listener `{listener}`: cannot bind {addr} (port {port}): {source}{}",
    bind_hint(source)
)]
pub struct BindError {
    pub listener: String,
    pub addr: SocketAddr,
    pub port: u16,
    #[source]
    pub source: io::Error,
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => "; another process holds this port (find it with `ss -ltnp`)",
        io::ErrorKind::PermissionDenied => "; ports below 1024 need root or CAP_NET_BIND_SERVICE",
        io::ErrorKind::AddrNotAvailable => "; this machine has no such address",
        _ => "",
    }
}

/// Every listener bound and ready to serve.
pub struct Proxy {
    shared: Arc<Shared>,
    admin: Option<TcpListener>,
    /// Run once every listener accepts (a binary upgrade's signal to the
    /// old process).
    on_accepting: Option<Box<dyn FnOnce() + Send>>,
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open at the drain deadline, closed by exiting.
    pub cut: usize,
}

/// A clonable handle on the running proxy: listeners, reload, audit.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

// === impl Proxy ===

impl Proxy {
    /// Binds every address of every listener (and the admin address); on
    /// the first failure closes what was bound and reports which listener
    /// and port failed. Must run inside a tokio runtime.
    pub fn bind(config: &Config) -> Result<Proxy, StartError> {
        Proxy::bind_with(config, std::collections::HashMap::new())
    }

    /// As `bind`, taking the sockets in `inherited` (from the process a
    /// binary upgrade replaces) by address, as those systemd passes.
    pub fn bind_with(
        config: &Config,
        inherited: std::collections::HashMap<SocketAddr, std::net::TcpListener>,
    ) -> Result<Proxy, StartError> {
        // Sockets systemd passed (socket activation), taken once.
        let mut passed = crate::systemd::passed_listeners();
        passed.extend(inherited);
        let admin = match &config.admin {
            None => None,
            Some(a) => Some(admin_socket(a.listen, &mut passed)?),
        };
        let shared = Arc::new(Shared::bind(config, &mut passed)?);
        if let Some(a) = &admin
            && let (Ok(addr), Ok(fd)) = (a.local_addr(), a.as_fd().try_clone_to_owned())
        {
            let _ = shared.admin_fd.set((addr, fd));
        }
        for addr in passed.keys() {
            warn!(%addr, "a passed socket matches no listener; it is closed");
        }
        Ok(Proxy {
            shared,
            admin,
            on_accepting: None,
        })
    }

    /// Runs `f` once every listener accepts, in `serve`.
    pub fn when_accepting(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_accepting = Some(Box::new(f));
    }

    /// Each listener's name with the addresses it actually bound (port 0 in
    /// the config becomes the port the OS chose).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.shared.local_addrs()
    }

    /// The admin address actually bound, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Shared state of the listener named `name`.
    pub fn listener(&self, name: &str) -> Option<Arc<ListenerState>> {
        self.shared.listener(name)
    }

    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serves until `shutdown` completes, then stops accepting and waits for
    /// in-flight connections up to the drain timeout.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> DrainReport {
        let shared = self.shared;
        let fleet = shared
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fleet
            .clone();
        if let (Some(cfg), Some(admin)) =
            (fleet, self.admin.as_ref().and_then(|a| a.local_addr().ok()))
        {
            let fleet = fleet::Fleet::join(&shared, cfg, admin).await;
            let _ = shared.fleet.set(fleet);
        }
        shared.start();
        shared.background.spawn(anchor_timers(shared.stop.clone()));
        if let Some(admin) = self.admin {
            if let Ok(addr) = admin.local_addr() {
                info!(%addr, "admin listening: /metrics, /status, /routes, /reload");
            }
            let handle = ProxyHandle {
                shared: Arc::clone(&shared),
            };
            shared
                .background
                .spawn(admin::serve(admin, handle, shared.stop.clone()));
        }
        if let Some(f) = self.on_accepting {
            f();
        }
        crate::systemd::ready();
        if let Some(period) = crate::systemd::watchdog_period() {
            shared
                .background
                .spawn(watchdog(period, shared.stop.clone()));
        }
        shutdown.await;
        // After a hand-over the unit lives on in the new process, which
        // is already its MAINPID; STOPPING=1 from here would stop it.
        if !shared
            .handed_over
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            crate::systemd::stopping();
        }
        shared.stop.cancel();
        shared.close_listeners().await;
        shared.background.close();
        shared.background.wait().await;
        shared.conns.close();
        let drain_timeout = shared
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain_timeout;
        info!(in_flight = shared.conns.len(), deadline = ?drain_timeout, "stopped accepting; draining");
        if tokio::time::timeout(drain_timeout, shared.conns.wait())
            .await
            .is_ok()
        {
            info!("drained");
            return DrainReport { cut: 0 };
        }
        let cut = shared.conns.len();
        warn!(cut, "drain deadline passed; closing remaining connections");
        DrainReport { cut }
    }
}

/// The admin API's socket: passed by systemd, or bound.
fn admin_socket(
    addr: SocketAddr,
    passed: &mut std::collections::HashMap<SocketAddr, std::net::TcpListener>,
) -> Result<TcpListener, BindError> {
    let error = |source| BindError {
        listener: "admin".into(),
        addr,
        port: addr.port(),
        source,
    };
    match passed.remove(&addr) {
        Some(s) => {
            info!(%addr, "the admin API takes a passed socket (socket activation or a binary upgrade)");
            s.set_nonblocking(true).map_err(error)?;
            TcpListener::from_std(s).map_err(error)
        }
        None => bind_one(addr, LISTEN_BACKLOG).map_err(error),
    }
}

/// How far ahead the timer anchor keeps a timer pending: below any connect
/// timeout worth setting, long enough to cost nothing (ten wake-ups a
/// second, a few microseconds each).
const TIMER_ANCHOR_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// Keeps a timer pending at most `TIMER_ANCHOR_PERIOD` ahead, for the
/// proxy's life. tokio's time driver wakes its own thread (an eventfd
/// write, then one more `epoll_wait`) whenever a timer is registered that
/// expires before the driver's planned wake-up, or when no timer was
/// pending at all. Every connection registers a connect timeout and an
/// idle timer, so without the anchor that cost two syscalls of about
/// twenty-five per short connection (`benches/counts.sh`); with it, only a
/// connect timeout shorter than the period still does.
async fn anchor_timers(stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(TIMER_ANCHOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        tokio::select! {
            biased;
            () = &mut cancelled => return,
            _ = tick.tick() => {}
        }
    }
}

/// Pings systemd's watchdog every `period` while the proxy runs: from the
/// runtime itself, so a wedged runtime stops the pings.
async fn watchdog(period: std::time::Duration, stop: tokio_util::sync::CancellationToken) {
    info!(?period, "pinging the systemd watchdog");
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => crate::systemd::watchdog(),
        }
    }
}

// === impl ProxyHandle ===

impl ProxyHandle {
    /// Re-reads the config file and applies it; a bad file changes nothing.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.shared.reload().await
    }

    pub fn listener(&self, name: &str) -> Option<Arc<ListenerState>> {
        self.shared.listener(name)
    }

    /// Every listener with the addresses it listens on, in config order.
    pub fn listeners(&self) -> Vec<(Arc<ListenerState>, Vec<SocketAddr>)> {
        self.shared.listeners()
    }

    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        self.shared
            .last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records every connection that ends from now on to `trace`.
    pub fn set_trace(&self, trace: Arc<crate::access_log::AccessLog>) {
        self.shared.trace.store(Some(trace));
    }

    /// Writes one record to the audit log (if configured).
    pub fn audit(&self, record: &serde_json::Value) {
        self.shared.audit.append(record);
    }

    /// The admin token in force: a reload may replace it.
    pub(crate) fn admin_token(&self) -> Option<Arc<crate::config::AdminToken>> {
        self.shared.admin_token.load_full()
    }

    /// `Some(held back)` when a refused admin call may be logged now.
    pub(crate) fn log_unauthorized(&self) -> Option<u64> {
        self.shared.unauthorized_log.allow(self.shared.clock.now())
    }

    /// The admin plane's limits in force (a reload may change them).
    pub(crate) fn admin_limits(&self) -> crate::config::AdminLimits {
        self.shared
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admin
            .as_ref()
            .map(|a| a.limits)
            .unwrap_or_default()
    }

    /// This member's fleet, in fleet mode.
    pub fn fleet(&self) -> Option<Arc<fleet::Fleet>> {
        self.shared.fleet.get().cloned()
    }

    pub(crate) fn uptime(&self) -> std::time::Duration {
        self.shared.clock.now()
    }
}

pub(crate) fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // `[::]` and `0.0.0.0` are separate listeners, as validation assumes.
        socket.set_only_v6(true)?;
    }
    // Rebinding right after a restart must not fail on TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    TcpListener::from_std(socket.into())
}
