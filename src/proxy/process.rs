//! `portshift run` as a process: bind (or take over the running process's
//! sockets in a binary upgrade), optionally record a trace, reload on
//! SIGHUP, start a successor on SIGUSR2, serve until SIGINT/SIGTERM or a
//! successor takes over, drain, and log each listener's totals.

use super::upgrade::{self, Takeover, TakeoverError};
use super::{DrainReport, Proxy, ProxyHandle, StartError};
use crate::access_log::AccessLog;
use crate::config::Config;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why `run` could not serve; nothing was left running (in an upgrade,
/// the old process serves on).
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
    #[error("binary upgrade: the running process serves on unchanged")]
    Takeover(#[from] TakeoverError),
    #[error("binary upgrade: {0}; the running process serves on unchanged")]
    TakeoverStart(StartError),
}

/// How `run` runs.
pub struct RunOptions {
    /// Record every connection to this trace file.
    pub record: Option<PathBuf>,
    /// Take the sockets and state over from the running process.
    pub upgrade: bool,
    /// SIGHUP (reload) and SIGUSR2 (binary upgrade), installed by the
    /// caller before the config was read.
    pub hup: Signal,
    pub usr2: Signal,
}

/// Serves `config` until SIGINT or SIGTERM, or until a new binary takes
/// over; SIGHUP reloads, SIGUSR2 starts a successor.
pub async fn run(config: Config, opts: RunOptions) -> Result<DrainReport, RunError> {
    let socket = upgrade::socket_path(config.upgrade_socket.as_deref());
    let takeover = if opts.upgrade {
        let path = socket.clone();
        Some(
            tokio::task::spawn_blocking(move || Takeover::connect(&path))
                .await
                .expect("the takeover does not panic")?,
        )
    } else {
        None
    };
    let (mut proxy, takeover) = match takeover {
        None => (Proxy::bind(&config)?, None),
        Some(mut t) => {
            let sockets = std::mem::take(&mut t.sockets);
            let proxy = match Proxy::bind_with(&config, sockets) {
                Ok(p) => {
                    for l in std::mem::take(&mut t.listeners) {
                        match p.listener(&l.listener) {
                            Some(s) => l.apply(&s),
                            None => {
                                info!(listener = %l.listener, "not in the new config; its state is dropped")
                            }
                        }
                    }
                    p
                }
                Err(e) => {
                    t.abort(&e.to_string());
                    return Err(RunError::TakeoverStart(e));
                }
            };
            (proxy, Some(t))
        }
    };
    if let Some(path) = opts.record {
        let writer = AccessLog::create(&path).map_err(|source| RunError::Trace {
            path: path.clone(),
            source,
        })?;
        proxy.handle().set_trace(Arc::new(writer));
        info!(path = %path.display(), "recording every connection (access-log lines, replayable by portshift sim)");
    }
    let upgraded = CancellationToken::new();
    let offering = CancellationToken::new();
    let handle = proxy.handle();
    // Tracked, so the socket file is gone before the process exits.
    let offers = tokio_util::task::TaskTracker::new();
    let offer = {
        let (handle, upgraded, offering) = (handle.clone(), upgraded.clone(), offering.clone());
        let offers = offers.clone();
        move || {
            offers.spawn(upgrade::serve(socket, handle, upgraded, offering));
        }
    };
    match takeover {
        // Offers upgrades itself once the old process confirms its drain.
        Some(t) => proxy.when_accepting(move || {
            tokio::spawn(async move {
                match tokio::task::spawn_blocking(move || t.accepting()).await {
                    Ok(Ok(h)) => info!(old_pid = h.old_pid, old_in_flight = h.in_flight, took_ms = h.took.as_millis() as u64, "binary upgrade complete: accepting here; the old process drains"),
                    Ok(Err(e)) => warn!(error = %e, "binary upgrade: the old process did not confirm its drain"),
                    Err(_) => {}
                }
                offer();
            });
        }),
        None => offer(),
    }
    spawn_signals(&handle, opts.hup, opts.usr2);
    // The listeners in force when the signal comes (after any reloads)
    // are the ones whose totals are logged.
    let (at_stop, stopped) = tokio::sync::oneshot::channel();
    let no_more_offers = offering.clone();
    let shutdown = async move {
        tokio::select! {
            () = crate::signals::shutdown() => {}
            () = upgraded.cancelled() => info!("handed over to the new binary"),
        }
        // A draining process has nothing to hand over.
        no_more_offers.cancel();
        let _ = at_stop.send(handle.listeners());
    };
    let report = proxy.serve(shutdown).await;
    offering.cancel();
    offers.close();
    offers.wait().await;
    for (state, _) in stopped.await.unwrap_or_default() {
        log_totals(&state);
    }
    info!(cut = report.cut, "stopped");
    Ok(report)
}

/// SIGHUP reloads; SIGUSR2 starts a successor binary.
fn spawn_signals(handle: &ProxyHandle, mut hup: Signal, mut usr2: Signal) {
    let handle = handle.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading the config");
            // The outcome is logged, counted and shown in /status.
            let _ = handle.reload().await;
        }
    });
    tokio::spawn(async move {
        while usr2.recv().await.is_some() {
            info!("SIGUSR2: starting a new binary to take over");
            upgrade::spawn_successor();
        }
    });
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
