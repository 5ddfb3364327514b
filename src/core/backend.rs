//! A backend as routing sees it (an address and a weight), and how a group
//! spreads connections over its backends. Defined here, in the core, so
//! routing never depends on the config layer; the config layer builds them.

use super::stats::Signal;
use std::net::SocketAddr;
use std::time::Duration;

/// One backend of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// How a group spreads connections across its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Smooth weighted round-robin (nginx's interleaving).
    #[default]
    RoundRobin,
    /// Fewest active connections relative to weight.
    LeastConnections,
    /// Consistent hashing on the client's address (Maglev): a client
    /// keeps its backend while backends come and go.
    SourceHash,
    /// Each backend's peak-EWMA latency × (active + 1), the better of two
    /// random draws.
    PeakEwma(EwmaSettings),
}

/// What `peak_ewma` measures a backend by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EwmaSettings {
    /// `Exchange` or `Connect`.
    pub signal: Signal,
    /// The time constant with which a lower latency pulls the cost down.
    pub decay: Duration,
    /// A backend's cost before its first sample.
    pub default_rtt: Duration,
}

/// linkerd2-proxy's defaults: a 10 s decay, 30 ms before the first sample.
pub const DEFAULT_EWMA_DECAY: Duration = Duration::from_secs(10);
pub const DEFAULT_EWMA_RTT: Duration = Duration::from_millis(30);

impl Default for EwmaSettings {
    fn default() -> Self {
        EwmaSettings {
            signal: Signal::Exchange,
            decay: DEFAULT_EWMA_DECAY,
            default_rtt: DEFAULT_EWMA_RTT,
        }
    }
}

impl Balance {
    pub const NAMES: [&'static str; 4] = [
        "round_robin",
        "least_connections",
        "source_hash",
        "peak_ewma",
    ];

    /// The balancer `name` (one of `NAMES`), `peak_ewma` with its
    /// default settings.
    pub fn from_name(name: &str) -> Option<Balance> {
        Some(match name {
            "round_robin" => Balance::RoundRobin,
            "least_connections" => Balance::LeastConnections,
            "source_hash" => Balance::SourceHash,
            "peak_ewma" => Balance::PeakEwma(EwmaSettings::default()),
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConnections => "least_connections",
            Balance::SourceHash => "source_hash",
            Balance::PeakEwma(_) => "peak_ewma",
        }
    }
}

/// `slow_start`: a backend that joins its group, returns from ejection or
/// probes up again takes `min_percent` of its weight at first and its
/// whole weight after `window`, growing linearly in between, so a cold
/// backend is not flooded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowStart {
    pub window: Duration,
    pub min_percent: u32,
}

impl SlowStart {
    pub const DEFAULT_MIN_PERCENT: u32 = 10;

    /// The share of its weight a backend whose ramp began at `from` has at
    /// `now`: from `min_percent` to 1.
    pub fn factor(&self, from: Duration, now: Duration) -> f64 {
        let elapsed = now.saturating_sub(from);
        if elapsed >= self.window || self.window.is_zero() {
            return 1.0;
        }
        let min = f64::from(self.min_percent.min(100)) / 100.0;
        min + (1.0 - min) * elapsed.as_secs_f64() / self.window.as_secs_f64()
    }
}
