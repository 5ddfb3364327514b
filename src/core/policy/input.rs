//! What the engine reads about one group at one evaluation. Built from the
//! same `GroupStats` by the live control loop and by the simulator.

use crate::core::stats::{Distribution, GroupStats, Signal};
use hdrhistogram::Histogram;
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

    /// Adds another instance's input for the same group, as if one proxy
    /// had seen both instances' traffic: histograms add bucket by bucket,
    /// so every quantile of the sum is the quantile one window fed all the
    /// samples would give; counts, open connections and rates add.
    pub fn merge(&mut self, other: &GroupInput) {
        merge_distribution(&mut self.latency, &other.latency);
        merge_distribution(&mut self.probe, &other.probe);
        self.attempts += other.attempts;
        self.failed += other.failed;
        self.active_connections += other.active_connections;
        self.new_connections_per_second += other.new_connections_per_second;
    }

    /// Failed connections (refused, timed out, reset) over attempts.
    pub fn error_rate(&self) -> Option<f64> {
        (self.attempts > 0).then(|| (self.failed as f64 / self.attempts as f64).min(1.0))
    }
}

fn merge_distribution(into: &mut Distribution, from: &Distribution) {
    add_histogram(&mut into.hist, &from.hist);
    into.failures += from.failures;
}

/// Adds `from` into `into`. Both come from `new_histogram` (same range and
/// precision), so a value outside `into`'s range cannot occur; a histogram
/// that arrived from elsewhere with another range is added sample by
/// sample, clamped into range, rather than dropped.
fn add_histogram(into: &mut Histogram<u32>, from: &Histogram<u32>) {
    if into.add(from).is_ok() {
        return;
    }
    for v in from.iter_recorded() {
        let value = v.value_iterated_to().clamp(into.low(), into.high());
        let _ = into.record_n(value, v.count_at_value());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::stats::{GroupStats, WindowConfig};
    use std::time::Duration;

    /// Three instances each see a third of the traffic; their inputs,
    /// merged, say exactly what one instance fed all of it says.
    #[test]
    fn merged_inputs_equal_one_window_fed_every_sample() {
        let cfg = WindowConfig::default();
        let whole = GroupStats::new("g", 2, cfg, 1);
        let parts: Vec<GroupStats> = (0..3).map(|_| GroupStats::new("g", 2, cfg, 1)).collect();
        let now = Duration::from_secs(5);
        for i in 0..3000u64 {
            // A long tail: every 50th sample is slow, and one member gets
            // most of them, as a member behind an unlucky ECMP hash would.
            let latency = Duration::from_micros(if i % 50 == 0 {
                300_000 + i
            } else {
                2_000 + i % 700
            });
            let member = if i % 50 == 0 { 0 } else { (i % 3) as usize };
            let at = Duration::from_millis(i);
            let backend = (i % 2) as usize;
            for g in [&whole, &parts[member]] {
                g.backends[backend].record(Signal::Connect, at, Duration::from_micros(300));
                g.backends[backend].record(Signal::Exchange, at, latency);
                if i % 97 == 0 {
                    g.backends[backend].record_error(Signal::Connect, at);
                }
            }
        }
        let window = Duration::from_secs(10);
        let input = |g: &GroupStats| GroupInput::from_stats(g, Signal::Exchange, now, window, 4);
        let want = input(&whole);
        let mut got = input(&parts[0]);
        for p in &parts[1..] {
            got.merge(&input(p));
        }
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(got.latency.quantile(q), want.latency.quantile(q), "q {q}");
        }
        assert_eq!(got.latency.hist, want.latency.hist);
        assert_eq!(got.latency.failures, want.latency.failures);
        assert_eq!((got.attempts, got.failed), (want.attempts, want.failed));
        assert_eq!(got.active_connections, 12);
        assert!((got.new_connections_per_second - want.new_connections_per_second).abs() < 1e-9);
        assert_eq!(got.error_rate(), want.error_rate());
    }
}
