//! The tokio shell: binds every listener (all or nothing), accepts, applies
//! the ACL, asks the route table where to go, connects upstream with
//! retries, and copies bytes until the connection ends. On shutdown it stops
//! accepting and drains in-flight connections up to a deadline.

mod connection;
mod copy;
mod outcome;

pub use copy::{BUFFER_BYTES, Copied};
pub use outcome::{ConnectFailure, End, OutcomeCounts, Outcomes};

use crate::config::{Acl, Config, Listener};
use crate::core::routes::{GroupRoutes, Router};
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
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

/// What one listener needs at run time, shared by its accept loops and
/// connection tasks.
#[derive(Debug)]
pub struct ListenerState {
    pub name: String,
    pub router: Router,
    pub outcomes: Outcomes,
    acl: Acl,
    connect_timeout: Duration,
    idle_timeout: Duration,
    connect_attempts: usize,
}

impl ListenerState {
    fn new(config: &Config, l: &Listener) -> Self {
        let groups = l
            .groups
            .iter()
            .map(|&g| {
                let g = config.group(g);
                Arc::new(GroupRoutes::new(&g.name, g.backends.clone(), g.balance))
            })
            .collect();
        ListenerState {
            name: l.name.clone(),
            router: Router::new(groups),
            outcomes: Outcomes::default(),
            acl: l.acl.clone(),
            connect_timeout: l.connect_timeout,
            idle_timeout: l.idle_timeout,
            connect_attempts: l.connect_attempts as usize,
        }
    }
}

/// Every listener bound and ready to serve.
pub struct Proxy {
    listeners: Vec<(Arc<ListenerState>, Vec<TcpListener>)>,
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
    pub fn bind(config: &Config) -> Result<Proxy, BindError> {
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
            listeners.push((Arc::new(ListenerState::new(config, l)), sockets));
        }
        Ok(Proxy {
            listeners,
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
                    tracing::debug!(listener = %state.name, %peer, "source denied by acl");
                    continue;
                }
                state.outcomes.accepted();
                conns.spawn(connection::handle(Arc::clone(&state), client));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: the listener survives, backs off.
                state.outcomes.accept_error();
                warn!(listener = %state.name, error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}
