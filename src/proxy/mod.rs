//! The tokio shell: binds every listener (all or nothing), accepts, applies
//! the ACL, asks the route table where to go, connects upstream with
//! retries, and copies bytes until the connection ends. On shutdown it stops
//! accepting and drains in-flight connections up to a deadline.

mod admin;
mod audit;
mod connection;
mod control;
mod copy;
mod outcome;
mod probe;

pub use control::RecentDecisions;
pub use copy::{BUFFER_BYTES, Copied};
pub use outcome::{ConnectFailure, End, OutcomeCounts, Outcomes};

use crate::config::{Acl, Config, Listener, Probe};
use crate::core::policy::{GroupInput, Policy};
use crate::core::routes::{GroupRoutes, Router};
use crate::core::stats::{GroupStats, Signal, Snapshot};
use crate::telemetry::{BackendMetrics, ListenerMetrics, RouteMetrics};
use audit::AuditLog;
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Accept queue length: the kernel's default cap (somaxconn) on current
/// Linux, so bursts of new connections queue rather than get dropped.
pub const LISTEN_BACKLOG: i32 = 4096;
/// Pause after an accept error such as EMFILE, so a full fd table does not
/// spin a core while connections close and free descriptors.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

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

/// The shell's one clock: time since the proxy started, the `now` that the
/// pure core takes as an argument.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    pub fn start() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    pub fn now(&self) -> Duration {
        self.base.elapsed()
    }
}

/// What one listener needs at run time, shared by its accept loops,
/// connection tasks and probes.
#[derive(Debug)]
pub struct ListenerState {
    pub name: String,
    pub router: Router,
    pub outcomes: Outcomes,
    pub clock: Clock,
    /// The policy loop's latest decisions and state.
    pub decisions: RecentDecisions,
    /// Per group (same order as the router's groups), per backend.
    pub stats: Vec<GroupStats>,
    metrics: Vec<Vec<BackendMetrics>>,
    listener_metrics: ListenerMetrics,
    route_metrics: RouteMetrics,
    probes: Vec<Option<Probe>>,
    policy: Option<Policy>,
    /// Length of the stats window, the denominator of connection rates.
    window: Duration,
    acl: Acl,
    connect_timeout: Duration,
    idle_timeout: Duration,
    connect_attempts: usize,
}

/// One group's windowed view, for the policy loop, tests and status.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupView {
    pub name: String,
    pub weight_bp: u16,
    /// Indexed by `Signal::index()`.
    pub signals: [Snapshot; 4],
}

impl ListenerState {
    fn new(config: &Config, l: &Listener, clock: Clock) -> Self {
        let shards = std::thread::available_parallelism().map_or(2, |n| n.get());
        let groups: Vec<_> = l.groups.iter().map(|&g| config.group(g)).collect();
        let policy = l.policy.as_ref().map(|p| p.policy.clone());
        // A policy may read its own window; otherwise the config's.
        let window = policy
            .as_ref()
            .and_then(|p| p.window)
            .unwrap_or(config.stats);
        let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
        let route_metrics = RouteMetrics::new(&l.name, &names);
        route_metrics.weights(crate::core::routes::Weights::all_on_first(groups.len()).as_slice());
        ListenerState {
            name: l.name.clone(),
            router: Router::new(
                groups
                    .iter()
                    .map(|g| Arc::new(GroupRoutes::new(&g.name, g.backends.clone(), g.balance)))
                    .collect(),
            ),
            outcomes: Outcomes::default(),
            clock,
            decisions: RecentDecisions::default(),
            stats: groups
                .iter()
                .map(|g| GroupStats::new(&g.name, g.backends.len(), window, shards))
                .collect(),
            metrics: groups
                .iter()
                .map(|g| {
                    g.backends
                        .iter()
                        .map(|b| BackendMetrics::new(&l.name, &g.name, &b.addr.to_string()))
                        .collect()
                })
                .collect(),
            listener_metrics: ListenerMetrics::new(&l.name),
            route_metrics,
            probes: groups.iter().map(|g| g.probe.clone()).collect(),
            policy,
            window: window.span(),
            acl: l.acl.clone(),
            connect_timeout: l.connect_timeout,
            idle_timeout: l.idle_timeout,
            connect_attempts: l.connect_attempts as usize,
        }
    }

    /// Every group's windowed latency and errors at this moment.
    pub fn view(&self) -> Vec<GroupView> {
        let now = self.clock.now();
        let weights = self.router.weights();
        self.stats
            .iter()
            .zip(weights.as_slice())
            .map(|(g, &w)| GroupView {
                name: g.name.clone(),
                weight_bp: w,
                signals: Signal::ALL.map(|s| g.snapshot(s, now)),
            })
            .collect()
    }

    /// What the policy engine reads at `now`: one input per group.
    pub fn policy_inputs(&self, signal: Signal, now: Duration) -> Vec<GroupInput> {
        let table = self.router.table();
        self.stats
            .iter()
            .zip(table.groups.iter())
            .map(|(stats, routes)| {
                let active = (0..routes.backends().len())
                    .map(|b| u64::from(routes.active(b)))
                    .sum();
                GroupInput::from_stats(stats, signal, now, self.window, active)
            })
            .collect()
    }

    /// One backend's window for `signal` at this moment.
    pub fn backend_snapshot(&self, group: usize, backend: usize, signal: Signal) -> Snapshot {
        self.stats[group].backends[backend]
            .signal(signal)
            .snapshot(self.clock.now())
    }
}

/// Every listener bound and ready to serve.
pub struct Proxy {
    listeners: Vec<(Arc<ListenerState>, Vec<TcpListener>)>,
    admin: Option<TcpListener>,
    audit: Option<Arc<AuditLog>>,
    drain_timeout: Duration,
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open at the drain deadline, closed by exiting.
    pub cut: usize,
}

// === impl Proxy ===

impl Proxy {
    /// Binds every address of every listener; on the first failure closes
    /// what was bound and reports which listener and port failed. Must run
    /// inside a tokio runtime.
    pub fn bind(config: &Config) -> Result<Proxy, StartError> {
        let clock = Clock::start();
        let admin = match config.admin {
            None => None,
            Some(a) => Some(bind_one(a.listen).map_err(|source| BindError {
                listener: "admin".into(),
                addr: a.listen,
                port: a.listen.port(),
                source,
            })?),
        };
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let mut sockets = Vec::new();
            for &addr in &l.addrs {
                let socket = bind_one(addr).map_err(|source| BindError {
                    listener: l.name.clone(),
                    addr,
                    port: addr.port(),
                    source,
                })?;
                sockets.push(socket);
            }
            listeners.push((Arc::new(ListenerState::new(config, l, clock)), sockets));
        }
        let audit = match &config.audit_log {
            None => None,
            Some(path) => Some(Arc::new(AuditLog::open(path).map_err(|source| {
                StartError::AuditLog {
                    path: path.clone(),
                    source,
                }
            })?)),
        };
        Ok(Proxy {
            listeners,
            admin,
            audit,
            drain_timeout: config.drain_timeout,
        })
    }

    /// Each listener's name with the addresses it actually bound (port 0 in
    /// the config becomes the port the OS chose).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .flat_map(|(s, socks)| {
                socks
                    .iter()
                    .filter_map(move |l| Some((s.name.clone(), l.local_addr().ok()?)))
            })
            .collect()
    }

    /// The admin address actually bound, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Shared state of the listener named `name`: its router (to publish
    /// weights) and its outcome counters.
    pub fn listener(&self, name: &str) -> Option<Arc<ListenerState>> {
        self.listeners
            .iter()
            .find(|(s, _)| s.name == name)
            .map(|(s, _)| Arc::clone(s))
    }

    /// Serves until `shutdown` completes, then stops accepting and waits for
    /// in-flight connections up to the drain timeout.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> DrainReport {
        let stop = CancellationToken::new();
        let conns = TaskTracker::new();
        let accepts = TaskTracker::new();
        let background = TaskTracker::new();
        if let Some(admin) = self.admin {
            if let Ok(addr) = admin.local_addr() {
                info!(%addr, "admin listening: /metrics");
            }
            background.spawn(admin::serve(admin, stop.clone()));
        }
        for (state, _) in &self.listeners {
            probe::spawn_all(state, &background, &stop);
            if let Some(policy) = &state.policy {
                background.spawn(control::run(
                    Arc::clone(state),
                    policy.clone(),
                    self.audit.clone(),
                    stop.clone(),
                ));
            }
        }
        for (state, sockets) in self.listeners {
            for socket in sockets {
                if let Ok(addr) = socket.local_addr() {
                    info!(listener = %state.name, %addr, "listening");
                }
                accepts.spawn(accept_loop(
                    socket,
                    Arc::clone(&state),
                    conns.clone(),
                    stop.clone(),
                ));
            }
        }
        accepts.close();
        shutdown.await;
        stop.cancel();
        accepts.wait().await;
        background.close();
        background.wait().await;
        conns.close();
        info!(in_flight = conns.len(), deadline = ?self.drain_timeout, "stopped accepting; draining");
        if tokio::time::timeout(self.drain_timeout, conns.wait())
            .await
            .is_ok()
        {
            info!("drained");
            return DrainReport { cut: 0 };
        }
        let cut = conns.len();
        warn!(cut, "drain deadline passed; closing remaining connections");
        DrainReport { cut }
    }
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // `[::]` and `0.0.0.0` are separate listeners, as validation assumes.
        socket.set_only_v6(true)?;
    }
    // Rebinding right after a restart must not fail on TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<ListenerState>,
    conns: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                if !state.acl.admits(peer.ip()) {
                    state.outcomes.denied();
                    state.listener_metrics.denied.increment(1);
                    tracing::debug!(listener = %state.name, %peer, "source denied by acl");
                    continue;
                }
                state.outcomes.accepted();
                state.listener_metrics.accepted.increment(1);
                conns.spawn(connection::handle(Arc::clone(&state), client));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: the listener survives, backs off.
                state.outcomes.accept_error();
                state.listener_metrics.accept_error.increment(1);
                warn!(listener = %state.name, error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}
