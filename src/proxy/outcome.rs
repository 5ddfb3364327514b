//! Per-listener outcome counters. A data-path failure is not an error that
//! travels up: it is counted here, and the listener carries on.

use crate::core::blame::Blame;
use crate::core::turns::Side;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters, bumped from the accept and connection tasks.
#[derive(Debug, Default)]
pub struct Outcomes {
    accepted: AtomicU64,
    denied: AtomicU64,
    accept_errors: AtomicU64,
    connected: AtomicU64,
    connect_refused: AtomicU64,
    connect_timeout: AtomicU64,
    connect_other: AtomicU64,
    connect_local: AtomicU64,
    retried: AtomicU64,
    no_backend: AtomicU64,
    local_error: AtomicU64,
    closed: AtomicU64,
    idle_timeout: AtomicU64,
    reset: AtomicU64,
    client_reset: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// Shared with the listener a reload replaces (see `Occupancy`).
    active: std::sync::Arc<AtomicU64>,
}

/// How one upstream connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    Timeout,
    /// Any other failure of the backend's (unreachable, reset).
    Other,
    /// portshift could not make the attempt (no descriptor, memory or
    /// local port): not the backend's fault, never in its statistics.
    Local,
}

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with EOF; `first` closed its side first.
    Closed { first: Side },
    /// No byte either way for the idle timeout.
    IdleTimeout,
    /// A read or write failed (reset, broken pipe), and whose fault it was.
    Failed(Blame),
}

impl End {
    /// The side that ended the connection: the first to close, the one
    /// that failed, or portshift itself (idle timeout, own resources).
    pub fn ended_by(self) -> Blame {
        match self {
            End::Closed {
                first: Side::Client,
            } => Blame::Client,
            End::Closed {
                first: Side::Upstream,
            } => Blame::Upstream,
            End::IdleTimeout => Blame::Local,
            End::Failed(blame) => blame,
        }
    }

    /// The outcome's name in traces: `closed`, `idle_timeout`, `reset`
    /// (the backend's), `client_reset` or `local_error`.
    pub fn name(self) -> &'static str {
        match self {
            End::Closed { .. } => "closed",
            End::IdleTimeout => "idle_timeout",
            End::Failed(Blame::Upstream) => "reset",
            End::Failed(Blame::Client) => "client_reset",
            End::Failed(Blame::Local) => "local_error",
        }
    }
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    pub accepted: u64,
    pub denied: u64,
    pub accept_errors: u64,
    pub connected: u64,
    pub connect_refused: u64,
    pub connect_timeout: u64,
    pub connect_other: u64,
    /// Upstream attempts portshift could not make (its own resources).
    pub connect_local: u64,
    /// Upstream attempts that failed and were followed by another attempt.
    pub retried: u64,
    /// Client connections closed because every attempt failed at the
    /// backends.
    pub no_backend: u64,
    /// Client connections closed because portshift ran out of something
    /// (descriptors, memory, local ports), before or after connecting.
    pub local_error: u64,
    pub closed: u64,
    pub idle_timeout: u64,
    /// Connections the backend reset or broke mid-stream.
    pub reset: u64,
    /// Connections the client reset or abandoned mid-stream.
    pub client_reset: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub active: u64,
}

// === impl Outcomes ===

impl Outcomes {
    /// Counters starting at zero, with `open` as the count of open client
    /// connections (carried over by a reload).
    pub fn with_open(open: std::sync::Arc<AtomicU64>) -> Self {
        Outcomes {
            active: open,
            ..Outcomes::default()
        }
    }

    /// The shared count of open client connections.
    pub fn open_handle(&self) -> std::sync::Arc<AtomicU64> {
        std::sync::Arc::clone(&self.active)
    }

    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }
    /// Client connections open right now.
    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    pub fn denied(&self) {
        self.denied.fetch_add(1, Relaxed);
    }
    pub fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
    }
    pub fn connected(&self) {
        self.connected.fetch_add(1, Relaxed);
    }
    pub fn retried(&self) {
        self.retried.fetch_add(1, Relaxed);
    }
    pub fn no_backend(&self) {
        self.no_backend.fetch_add(1, Relaxed);
    }
    /// A client closed because of portshift's own resources, before any
    /// backend carried it.
    pub fn local_error(&self) {
        self.local_error.fetch_add(1, Relaxed);
    }

    pub fn connect_failed(&self, why: ConnectFailure) {
        let c = match why {
            ConnectFailure::Refused => &self.connect_refused,
            ConnectFailure::Timeout => &self.connect_timeout,
            ConnectFailure::Other => &self.connect_other,
            ConnectFailure::Local => &self.connect_local,
        };
        c.fetch_add(1, Relaxed);
    }

    pub fn ended(&self, end: End, bytes_up: u64, bytes_down: u64) {
        let c = match end {
            End::Closed { .. } => &self.closed,
            End::IdleTimeout => &self.idle_timeout,
            End::Failed(Blame::Upstream) => &self.reset,
            End::Failed(Blame::Client) => &self.client_reset,
            End::Failed(Blame::Local) => &self.local_error,
        };
        c.fetch_add(1, Relaxed);
        self.bytes_up.fetch_add(bytes_up, Relaxed);
        self.bytes_down.fetch_add(bytes_down, Relaxed);
    }

    /// Takes a place for one more client connection, unless `max` are
    /// open already. One atomic step, so a burst of accepts can never get
    /// past the limit between checking and counting.
    pub fn try_open(&self, max: Option<u32>) -> bool {
        let max = max.map_or(u64::MAX, u64::from);
        self.active
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok()
    }

    /// Gives back the place `try_open` took.
    pub fn close_one(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    pub fn snapshot(&self) -> OutcomeCounts {
        let g = |c: &AtomicU64| c.load(Relaxed);
        OutcomeCounts {
            accepted: g(&self.accepted),
            denied: g(&self.denied),
            accept_errors: g(&self.accept_errors),
            connected: g(&self.connected),
            connect_refused: g(&self.connect_refused),
            connect_timeout: g(&self.connect_timeout),
            connect_other: g(&self.connect_other),
            connect_local: g(&self.connect_local),
            retried: g(&self.retried),
            no_backend: g(&self.no_backend),
            local_error: g(&self.local_error),
            closed: g(&self.closed),
            idle_timeout: g(&self.idle_timeout),
            reset: g(&self.reset),
            client_reset: g(&self.client_reset),
            bytes_up: g(&self.bytes_up),
            bytes_down: g(&self.bytes_down),
            active: g(&self.active),
        }
    }
}
