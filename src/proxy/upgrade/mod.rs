//! Zero-downtime binary upgrade: the running process hands its listening
//! sockets (SCM_RIGHTS) and its policy state (JSON) to a new process over
//! a Unix socket, and drains only once the new one accepts. The listening
//! sockets are never closed, so no connection is refused: those queued in
//! the kernel during the handoff are accepted by whichever process holds
//! them, and in the end by the new one.
//!
//! Started either way round: `portshift run --upgrade` connects to the
//! running process, or SIGUSR2 to the running process starts its own
//! successor (the binary now at the path it was started from, with the
//! same arguments plus `--upgrade`), which keeps it inside a systemd unit's
//! cgroup.

mod carry;
mod offer;
mod take;
mod wire;

pub use carry::{Carried, ListenerHandover};
pub use offer::serve;
pub use take::{HandedOver, Takeover, TakeoverError};

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use tokio::net::UnixListener;
use tracing::{info, warn};

/// This build, as the other side logs it.
fn version() -> String {
    format!(
        "{} (commit {})",
        env!("CARGO_PKG_VERSION"),
        env!("PORTSHIFT_COMMIT")
    )
}

/// Where the upgrade socket is: `upgrade_socket` from the config, else
/// the systemd unit's runtime directory, else `/run/portshift` (root) or
/// `$XDG_RUNTIME_DIR/portshift`, else a folder of this user's under the
/// temporary directory.
pub fn socket_path(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_owned();
    }
    let folder = if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several, separated by colons: the first is ours.
        let d = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        PathBuf::from(d)
    } else if rustix::process::getuid().is_root() {
        PathBuf::from("/run/portshift")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("portshift")
    } else {
        std::env::temp_dir().join(format!("portshift-{}", rustix::process::getuid().as_raw()))
    };
    folder.join("upgrade.sock")
}

/// Binds the upgrade socket at `path`, readable and writable by this user
/// only. A leftover file from a process that is gone is replaced; one a
/// live process answers on is not.
fn listen(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process offers upgrades there",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The peer's pid, when it runs as this user (or root): the file's mode
/// already says so, but a connection made before the mode was set would
/// otherwise slip through.
fn peer_allowed(stream: &UnixStream) -> Result<u32, String> {
    let cred = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let me = rustix::process::getuid();
    if cred.uid != me && !cred.uid.is_root() {
        return Err(format!(
            "uid {} is neither this process's ({}) nor root",
            cred.uid.as_raw(),
            me.as_raw()
        ));
    }
    Ok(cred.pid.as_raw_nonzero().get() as u32)
}

/// SIGUSR2: starts this process's successor, which then takes over
/// through the upgrade socket. Its exit is logged (a successor that fails
/// leaves this process serving).
pub fn spawn_successor() {
    let mut args = std::env::args_os();
    let Some(program) = args.next() else {
        warn!(
            "SIGUSR2: this process's own command line is unknown; run `portshift run --upgrade` instead"
        );
        return;
    };
    let mut args: Vec<_> = args.collect();
    if !args.iter().any(|a| a == "--upgrade") {
        args.push("--upgrade".into());
    }
    let mut command = std::process::Command::new(&program);
    command
        .args(&args)
        // The watchdog belongs to whichever process systemd names main:
        // the successor pings it once it is.
        .env_remove("WATCHDOG_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    match command.spawn() {
        Ok(mut child) => {
            let pid = child.id();
            info!(pid, program = %program.to_string_lossy(), "SIGUSR2: started the successor");
            std::thread::spawn(move || match child.wait() {
                Ok(s) if s.success() => info!(pid, "the successor exited"),
                Ok(s) => warn!(pid, status = %s, "the successor failed; this process serves on"),
                Err(e) => warn!(pid, error = %e, "cannot wait for the successor"),
            });
        }
        Err(e) => {
            warn!(program = %program.to_string_lossy(), error = %e, "SIGUSR2: cannot start the successor; this process serves on")
        }
    }
}
