//! What the engine reads about one group at one evaluation. Built from the
//! same `GroupStats` by the live control loop and by the simulator.

use crate::core::stats::{Distribution, GroupStats, Signal};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct GroupInput {
    /// The policy's signal over the window; failures are connect failures
    /// plus the signal's own failures, ranked slower than any sample.
    pub latency: Distribution,
    /// The probe signal, for a group with too little traffic.
    pub probe: Distribution,
    /// Connect attempts in the window and how many failed.
    pub attempts: u64,
    pub failed: u64,
    pub active_connections: u64,
    pub new_connections_per_second: f64,
}

impl GroupInput {
    /// Reads `stats` at `now`. `window` is the stats window length (the
    /// rate's denominator, shortened at start-up), `active` the group's open
    /// connections.
    pub fn from_stats(
        stats: &GroupStats,
        signal: Signal,
        now: Duration,
        window: Duration,
        active: u64,
    ) -> Self {
        let connect = stats.distribution(Signal::Connect, now);
        let resets = stats.errors(Signal::Exchange, now);
        let mut latency = match signal {
            Signal::Connect => connect.clone(),
            s => stats.distribution(s, now),
        };
        if matches!(signal, Signal::FirstByte | Signal::Exchange) {
            // A connection that never got through is the slowest outcome.
            latency.failures += connect.failures;
        }
        let attempts = connect.total();
        let span = window.min(now).as_secs_f64().max(0.001);
        GroupInput {
            probe: stats.distribution(Signal::Probe, now),
            attempts,
            failed: connect.failures + resets,
            active_connections: active,
            new_connections_per_second: attempts as f64 / span,
            latency,
        }
    }

    /// Failed connections (refused, timed out, reset) over attempts.
    pub fn error_rate(&self) -> Option<f64> {
        (self.attempts > 0).then(|| (self.failed as f64 / self.attempts as f64).min(1.0))
    }
}
