//! `portshift run` as a process: bind, optionally record a trace, reload
//! on SIGHUP, serve until SIGINT/SIGTERM, drain, and log each listener's
//! totals.

use super::{DrainReport, Proxy, StartError};
use crate::config::Config;
use crate::trace::TraceWriter;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::Signal;
use tracing::info;

/// Why `run` could not serve; nothing was left running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot create trace file {path}: {source}")]
    Trace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Serves `config` until SIGINT or SIGTERM; `hup` (installed by the caller
/// before the config was read) triggers reloads.
pub async fn run(
    config: Config,
    record: Option<PathBuf>,
    mut hup: Signal,
) -> Result<DrainReport, RunError> {
    let proxy = Proxy::bind(&config)?;
    if let Some(path) = record {
        let writer = TraceWriter::create(&path).map_err(|source| RunError::Trace {
            path: path.clone(),
            source,
        })?;
        proxy.handle().set_trace(Arc::new(writer));
        info!(path = %path.display(), "recording a trace of every connection");
    }
    let handle = proxy.handle();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading the config");
            // The outcome is logged, counted and shown in /status.
            let _ = handle.reload().await;
        }
    });
    // The listeners in force when the signal comes (after any reloads)
    // are the ones whose totals are logged.
    let (at_stop, stopped) = tokio::sync::oneshot::channel();
    let handle = proxy.handle();
    let shutdown = async move {
        crate::signals::shutdown().await;
        let _ = at_stop.send(handle.listeners());
    };
    let report = proxy.serve(shutdown).await;
    for (state, _) in stopped.await.unwrap_or_default() {
        log_totals(&state);
    }
    info!(cut = report.cut, "stopped");
    Ok(report)
}

fn log_totals(s: &super::ListenerState) {
    let c = s.outcomes.snapshot();
    info!(
        listener = %s.name,
        accepted = c.accepted,
        denied = c.denied,
        connected = c.connected,
        connect_refused = c.connect_refused,
        connect_timeout = c.connect_timeout,
        no_backend = c.no_backend,
        local_error = c.local_error,
        idle_timeout = c.idle_timeout,
        reset = c.reset,
        client_reset = c.client_reset,
        bytes_up = c.bytes_up,
        bytes_down = c.bytes_down,
        "listener totals"
    );
}
