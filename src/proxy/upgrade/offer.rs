//! The running process's side: it listens on the upgrade socket and, when
//! a new process asks, freezes its policy loops, offers its listening
//! sockets and state, passes the sockets, and waits. Only when the new
//! process says it accepts does this one stop accepting and drain; if the
//! new one gives up or goes away first, this one unfreezes and serves on
//! as if nothing happened.

use super::carry::ListenerHandover;
use super::wire::{Conn, Message, PROTOCOL, SocketOffer};
use crate::proxy::ProxyHandle;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long each step of the conversation may take before this process
/// gives up on the new one and serves on.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new process may take to bind and start accepting (it may
/// first join a fleet).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Offers this process's sockets on `path` until a handoff succeeds, then
/// cancels `upgraded` (which starts the drain) and stops offering. Returns
/// at once, with a warning, when the socket cannot be had.
pub async fn serve(
    path: PathBuf,
    handle: ProxyHandle,
    upgraded: CancellationToken,
    stop: CancellationToken,
) {
    let listener = match super::listen(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "binary upgrades are not offered: the upgrade socket cannot be had (set `upgrade_socket` to a path of this instance's own)");
            return;
        }
    };
    info!(path = %path.display(), "offering binary upgrades (portshift run --upgrade, or SIGUSR2)");
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        // The conversation runs on a blocking thread.
        let stream = match accepted
            .and_then(|(s, _)| s.into_std())
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "upgrade socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let h = handle.clone();
        let p = path.clone();
        let done = tokio::task::spawn_blocking(move || hand_over(stream, &h, &p)).await;
        if matches!(done, Ok(true)) {
            upgraded.cancel();
            return;
        }
    }
    drop(listener);
    remove(&path);
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), error = %e, "cannot remove the upgrade socket");
    }
}

/// One new process's attempt; true when it took over. Reloads wait while
/// it runs, so the sockets and state on offer stay those in force.
fn hand_over(stream: UnixStream, handle: &ProxyHandle, path: &Path) -> bool {
    let _no_reload = handle.shared.hold_reloads();
    let started = Instant::now();
    let peer = match super::peer_allowed(&stream) {
        Ok(pid) => pid,
        Err(why) => {
            warn!(%why, "upgrade socket: a connection was refused");
            return false;
        }
    };
    let listeners = handle.listeners();
    let result =
        Conn::new(stream, STEP_TIMEOUT).and_then(|mut conn| converse(&mut conn, handle, path));
    match result {
        Ok(Some(new_pid)) => {
            // The new process accepts (and the socket file is gone):
            // stop offering, start the drain.
            handle
                .shared
                .handed_over
                .store(true, std::sync::atomic::Ordering::Relaxed);
            crate::systemd::main_pid(new_pid);
            info!(
                new_pid,
                peer,
                took_ms = started.elapsed().as_millis() as u64,
                "binary upgrade: the new process accepts; this one stops accepting and drains"
            );
            true
        }
        Ok(None) => {
            for (s, _) in &listeners {
                s.carried.freeze(false);
            }
            false
        }
        Err(e) => {
            warn!(peer, error = %e, "binary upgrade abandoned: the new process went away before accepting; serving on unchanged");
            for (s, _) in &listeners {
                s.carried.freeze(false);
            }
            false
        }
    }
}

/// The conversation: `Some(pid)` of a new process that accepts, `None`
/// when it gave up (with its reason logged).
fn converse(conn: &mut Conn, handle: &ProxyHandle, path: &Path) -> io::Result<Option<u32>> {
    let hello = match conn.recv() {
        // Connected and went: another instance checking whether this
        // socket is alive before it binds its own. Nothing to thaw.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            debug!("upgrade socket: a liveness check");
            return Ok(None);
        }
        other => other?,
    };
    let new_pid = match hello {
        Message::Hello {
            protocol,
            pid,
            version,
        } if protocol == PROTOCOL => {
            info!(new_pid = pid, %version, "binary upgrade requested");
            pid
        }
        Message::Hello { protocol, .. } => {
            let reason = format!(
                "this process speaks upgrade protocol {PROTOCOL}, the new one {protocol}; stop and start instead"
            );
            conn.send(&Message::Refused {
                reason: reason.clone(),
            })?;
            warn!(%reason, "binary upgrade refused");
            return Ok(None);
        }
        other => return Err(unexpected(&other)),
    };
    // From the state on offer to the end of the conversation, the policy
    // loops stand still: what the new process takes is what is in force.
    for (s, _) in &handle.listeners() {
        s.carried.freeze(true);
    }
    let (offers, fds) = sockets(handle);
    conn.send(&Message::Offer {
        version: super::version(),
        pid: std::process::id(),
        sockets: offers,
        listeners: handle
            .listeners()
            .iter()
            .map(|(s, _)| ListenerHandover::of(s))
            .collect(),
    })?;
    match conn.recv()? {
        Message::SendSockets => {}
        Message::Abort { reason } => return Ok(gave_up(&reason)),
        other => return Err(unexpected(&other)),
    }
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    conn.send_fds(&borrowed)?;
    conn.set_timeout(START_TIMEOUT)?;
    match conn.recv()? {
        Message::Accepting => {}
        Message::Abort { reason } => return Ok(gave_up(&reason)),
        other => return Err(unexpected(&other)),
    }
    // Stop accepting (listeners and the admin API) before saying so: once
    // the new process hears `Draining`, it alone takes new connections.
    // From here the hand-over is done whatever happens to this message:
    // the new process said it accepts. The socket file goes first: the
    // new process offers upgrades at the same path once it hears back.
    remove(path);
    handle.shared.stop.cancel();
    if let Err(e) = conn.send(&Message::Draining {
        in_flight: handle.shared.conns.len(),
    }) {
        warn!(error = %e, "binary upgrade: the new process accepts, but did not take the drain confirmation");
    }
    Ok(Some(new_pid))
}

fn gave_up(reason: &str) -> Option<u32> {
    warn!(%reason, "binary upgrade abandoned by the new process; serving on unchanged");
    None
}

fn unexpected(m: &Message) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("an unexpected message: {m:?}"),
    )
}

/// Every socket on offer, the admin API's first, with a duplicate of each
/// descriptor to pass.
fn sockets(handle: &ProxyHandle) -> (Vec<SocketOffer>, Vec<OwnedFd>) {
    let mut offers = Vec::new();
    let mut fds = Vec::new();
    for (listener, addr, fd) in handle.shared.handover_sockets() {
        match fd {
            Ok(fd) => {
                offers.push(SocketOffer { listener, addr });
                fds.push(fd);
            }
            Err(e) => {
                warn!(%listener, %addr, error = %e, "cannot duplicate a listening socket; the new process binds it afresh")
            }
        }
    }
    (offers, fds)
}
