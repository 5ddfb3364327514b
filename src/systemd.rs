//! systemd integration, all of it a no-op outside systemd:
//!
//! - the notify protocol (`Type=notify`, `NOTIFY_SOCKET`): `READY=1` once
//!   every listener is bound and accepting, `RELOADING=1` … `READY=1`
//!   around a reload, `STOPPING=1` when draining begins, and `WATCHDOG=1`
//!   at half of `WatchdogSec` when the unit sets it;
//! - socket activation (`LISTEN_FDS`, `LISTEN_PID`): listening TCP sockets
//!   passed by systemd, by their bound address, for listeners (and the
//!   admin API) to take instead of binding.

use sd_notify::NotifyState;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;
use tracing::{debug, info, warn};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "systemd notification not sent");
    }
}

/// Every listener is bound and accepting.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// A reload begins (systemd 253 and later also want the clock with it).
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// The reload ended (applied or refused): serving again.
pub fn reloaded(ok: bool) {
    let status = if ok {
        "serving"
    } else {
        "serving; the last reload was refused"
    };
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A binary upgrade's successor, `pid`, is the service's main process
/// from now on (this one drains and exits).
pub fn main_pid(pid: u32) {
    send(&[
        NotifyState::MainPid(pid),
        NotifyState::Status("handed over to a new binary; draining"),
    ]);
}

/// Draining begins.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// How often to ping the watchdog: half of `WatchdogSec`, if the unit set
/// one for this process.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The listening TCP sockets systemd passed to this process, by the
/// address each is bound to. Other kinds of passed descriptors are logged
/// and left alone.
pub fn passed_listeners() -> HashMap<SocketAddr, TcpListener> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = HashMap::new();
    for i in 0..fds.len() {
        match fds.take_tcp_listener(i) {
            Ok(Some(l)) => match l.local_addr() {
                Ok(addr) => {
                    info!(%addr, fd = 3 + i, "socket activation: a listening socket was passed");
                    out.insert(addr, l);
                }
                Err(e) => {
                    warn!(fd = 3 + i, error = %e, "socket activation: a passed socket has no address; ignored")
                }
            },
            Ok(None) => {}
            Err(e) => {
                warn!(fd = 3 + i, error = %e, "socket activation: a passed descriptor is not a listening TCP socket; ignored")
            }
        }
    }
    out
}
