//! Passive ejection in the shell: every failure of a backend's own goes
//! through `backend_failed`, which counts it in the backend's window and
//! lets its group's `Ejections` (core) decide; a watcher logs each
//! ejected backend's return.

use super::state::{ListenerState, Routes};
use crate::core::stats::Signal;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A failure of `backend` of `routes` (the group as the connection saw
/// it), charged to it: recorded in its `signal` window and, where its
/// group ejects, maybe the one that takes it out of rotation.
pub(super) fn backend_failed(state: &ListenerState, (routes, b): (&Routes, usize), signal: Signal) {
    let now = state.clock.now();
    let tally = routes.extra(b);
    tally.stats.record_error(signal, now);
    let window = || {
        let connect = tally.stats.signal(Signal::Connect).snapshot(now);
        let exchange = tally.stats.signal(Signal::Exchange).snapshot(now);
        (
            connect.count + connect.errors,
            connect.errors + exchange.errors,
        )
    };
    if let Some(ej) = routes.on_failure(b, now, window) {
        tally.metrics.ejected();
        warn!(listener = %state.name, group = %routes.name, backend = %routes.addr(b),
            for_s = ej.for_.as_secs_f64(), times = ej.times, out = routes.ejected(now),
            "backend ejected for its own failures; it returns by itself");
    }
}

/// Ejects the backends of `routes` whose `exchange` p99 over the window
/// stands out from the group's median, where the group asks for it. Only
/// backends in rotation, taking connections, with `min_requests` samples
/// are judged.
fn eject_outliers(state: &ListenerState, routes: &Routes, now: Duration) {
    let Some(policy) = routes.ejections().map(|e| e.policy()) else {
        return;
    };
    let Some(factor) = policy.latency_factor else {
        return;
    };
    let p99: Vec<Option<Duration>> = (0..routes.backends().len())
        .map(|b| {
            let judged = routes.in_rotation(b, now) && routes.takes_new(b);
            let w = routes.extra(b).stats.signal(Signal::Exchange).snapshot(now);
            (judged && w.count >= policy.min_requests.max(1)).then_some(w.p99)
        })
        .collect();
    for b in crate::core::eject::latency_outliers(&p99, factor) {
        let all = || routes.members().iter().map(|m| &m.eject).collect();
        let Some(e) = routes.ejections() else { return };
        if let Some(ej) = e.eject(&routes.member(b).eject, all, now) {
            routes.extra(b).metrics.ejected();
            warn!(listener = %state.name, group = %routes.name, backend = %routes.addr(b),
                p99_ms = p99[b].unwrap_or_default().as_secs_f64() * 1e3, factor,
                for_s = ej.for_.as_secs_f64(), times = ej.times,
                "backend ejected as a latency outlier; it returns by itself");
        }
    }
}

/// How often ejected backends are checked for their return.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// How often groups that eject latency outliers are judged.
const OUTLIERS_EVERY: u64 = 4;

/// Logs each ejected backend's return (at most `WATCH_EVERY` late), and
/// once a second ejects latency outliers, for the units whose groups
/// eject.
pub(super) async fn watch_returns(state: Arc<ListenerState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    for round in 0u64.. {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = state.clock.now();
        // The current members: a backend removed while out is not reported.
        let table = state.router.table();
        if round % OUTLIERS_EVERY == 0 {
            for g in table.groups.iter() {
                eject_outliers(&state, g, now);
            }
        }
        for g in table.groups.iter().filter(|g| g.ejections().is_some()) {
            for m in g.members() {
                if m.eject.take_return(now) {
                    m.extra.metrics.returned();
                    info!(listener = %state.name, group = %g.name, backend = %m.addr, times = m.eject.times(), "ejected backend returns to rotation");
                }
            }
        }
    }
}
