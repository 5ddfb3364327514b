//! Passive ejection in the shell: every failure of a backend's own goes
//! through `backend_failed`, which counts it in the backend's window and
//! lets its group's `Ejections` (core) decide; a watcher logs each
//! ejected backend's return.

use super::state::ListenerState;
use crate::core::routes::Attempt;
use crate::core::stats::Signal;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A failure of the backend of `attempt`, charged to it: recorded in its
/// `signal` window and, where its group ejects, maybe the one that takes
/// it out of rotation.
pub(super) fn backend_failed(state: &ListenerState, attempt: Attempt, signal: Signal) {
    let now = state.clock.now();
    let stats = &state.stats[attempt.group].backends[attempt.backend];
    stats.record_error(signal, now);
    let table = state.router.table();
    let routes = &table.groups[attempt.group];
    let Some(e) = routes.ejections() else {
        return;
    };
    let window = || {
        let connect = stats.signal(Signal::Connect).snapshot(now);
        let exchange = stats.signal(Signal::Exchange).snapshot(now);
        (
            connect.count + connect.errors,
            connect.errors + exchange.errors,
        )
    };
    if let Some(ej) = e.on_failure(attempt.backend, now, window) {
        state.metrics[attempt.group][attempt.backend].ejected();
        warn!(listener = %state.name, group = %routes.name, backend = %routes.addr(attempt.backend),
            for_s = ej.for_.as_secs_f64(), times = ej.times, out = e.out(now),
            "backend ejected for its own failures; it returns by itself");
    }
}

/// How often ejected backends are checked for their return.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Logs each ejected backend's return (at most `WATCH_EVERY` late), for
/// the units whose groups eject.
pub(super) async fn watch_returns(state: Arc<ListenerState>, stop: CancellationToken) {
    let table = state.router.table();
    let mut out: Vec<Vec<Option<Duration>>> = table
        .groups
        .iter()
        .map(|g| vec![None; g.backends().len()])
        .collect();
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = state.clock.now();
        for (gi, g) in table.groups.iter().enumerate() {
            let Some(e) = g.ejections() else { continue };
            for (b, was) in out[gi].iter_mut().enumerate() {
                let until = e.ejected_until(b).filter(|_| e.is_ejected(b, now));
                if was.is_some() && until.is_none() {
                    state.metrics[gi][b].returned();
                    info!(listener = %state.name, group = %g.name, backend = %g.addr(b), times = e.times(b), "ejected backend returns to rotation");
                }
                *was = until;
            }
        }
    }
}
