//! The new process's side: it asks the running process for its sockets
//! and state, binds its own config with them, and, once it accepts, tells
//! the old process to drain. Until then the old process serves untouched;
//! a failure here is reported to it (`Abort`) and ends this process.

use super::carry::ListenerHandover;
use super::wire::{Conn, Message, PROTOCOL, SocketOffer};
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long each step may take: the old process answers at once unless it
/// is wedged, and then this one should not wait on it.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a new process could not take over; the old one serves on.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(
        "no running portshift offers upgrades on {} (is it running, with the same `upgrade_socket`?)",
        path.display()
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the running portshift refused the upgrade: {0}")]
    Refused(String),
    #[error("the upgrade conversation with the running portshift failed")]
    Io(#[from] io::Error),
}

/// The old process's sockets and state, received, not yet in use.
pub struct Takeover {
    conn: Conn,
    pub old_pid: u32,
    pub old_version: String,
    /// Listening sockets by bound address, for the listeners (and the
    /// admin API) to take instead of binding.
    pub sockets: HashMap<SocketAddr, TcpListener>,
    pub listeners: Vec<ListenerHandover>,
    started: Instant,
}

/// How the handoff ended, for the log.
#[derive(Debug, Clone, Copy)]
pub struct HandedOver {
    pub old_pid: u32,
    /// Connections the old process still serves, draining.
    pub in_flight: usize,
    /// From connecting to the old process's confirmation that it drains.
    pub took: Duration,
}

impl Takeover {
    /// Connects to the running process on `path` and receives its sockets
    /// and state. Blocking: run it off the async threads.
    pub fn connect(path: &Path) -> Result<Takeover, TakeoverError> {
        let started = Instant::now();
        let stream = UnixStream::connect(path).map_err(|source| TakeoverError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let mut conn = Conn::new(stream, STEP_TIMEOUT)?;
        conn.send(&Message::Hello {
            protocol: PROTOCOL,
            version: super::version(),
            pid: std::process::id(),
        })?;
        let (old_version, old_pid, offers, listeners) = match conn.recv()? {
            Message::Offer {
                version,
                pid,
                sockets,
                listeners,
            } => (version, pid, sockets, listeners),
            Message::Refused { reason } => return Err(TakeoverError::Refused(reason)),
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("an unexpected message: {other:?}"),
                )
                .into());
            }
        };
        conn.send(&Message::SendSockets)?;
        let fds = conn.recv_fds(offers.len())?;
        let sockets = by_address(&offers, fds)?;
        info!(old_pid, %old_version, sockets = sockets.len(), listeners = listeners.len(), "binary upgrade: received the running process's sockets and state");
        Ok(Takeover {
            conn,
            old_pid,
            old_version,
            sockets,
            listeners,
            started,
        })
    }

    /// Tells the old process this one gives up (it serves on unchanged).
    pub fn abort(mut self, reason: &str) {
        let _ = self.conn.send(&Message::Abort {
            reason: reason.to_owned(),
        });
    }

    /// Tells the old process this one accepts, and waits for it to confirm
    /// that it stopped accepting. Blocking.
    pub fn accepting(mut self) -> Result<HandedOver, TakeoverError> {
        self.conn.send(&Message::Accepting)?;
        match self.conn.recv()? {
            Message::Draining { in_flight } => Ok(HandedOver {
                old_pid: self.old_pid,
                in_flight,
                took: self.started.elapsed(),
            }),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an unexpected message: {other:?}"),
            )
            .into()),
        }
    }
}

/// Pairs each received descriptor with its offer, checking that it is the
/// listening TCP socket the offer says.
fn by_address(
    offers: &[SocketOffer],
    fds: Vec<std::os::fd::OwnedFd>,
) -> io::Result<HashMap<SocketAddr, TcpListener>> {
    let mut out = HashMap::new();
    for (offer, fd) in offers.iter().zip(fds) {
        let socket = TcpListener::from(fd);
        match socket.local_addr() {
            Ok(a) if a == offer.addr => {
                out.insert(a, socket);
            }
            Ok(a) => {
                warn!(listener = %offer.listener, offered = %offer.addr, bound = %a, "a passed socket is bound elsewhere than offered; ignored")
            }
            Err(e) => {
                warn!(listener = %offer.listener, addr = %offer.addr, error = %e, "a passed descriptor is not a TCP socket; ignored")
            }
        }
    }
    Ok(out)
}
