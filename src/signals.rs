//! The process signals the long-running commands obey.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown() {
    let mut term =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

/// The SIGHUP stream. SIGHUP's default action ends the process, and an
/// operator or a config-management run may send one at any moment, so
/// `run` installs this before it reads the config or binds anything.
pub fn hangup() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}

/// The SIGUSR2 stream: a binary upgrade. Installed as early as SIGHUP, for
/// the same reason (its default action ends the process).
pub fn upgrade() -> std::io::Result<Signal> {
    signal(SignalKind::user_defined2())
}
