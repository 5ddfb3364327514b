//! Every metric name and every `metrics::` call in one place.
//!
//! One Prometheus recorder per process, installed on first use. Handles are
//! registered once per listener/group/backend when a proxy is built, so the
//! data path only bumps atomics: no name lookups, no label hashing, nothing
//! emitted per packet. Labels stay low-cardinality: listener, group,
//! backend, signal, kind; never a client address.

pub mod fleet;
mod histogram;

pub use histogram::LATENCY_BUCKETS;

use crate::core::stats::Signal;
use metrics::{Counter, Gauge, Label};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub const LATENCY: &str = "portshift_latency_seconds";
pub const CONNECTIONS: &str = "portshift_connections_total";
pub const ACTIVE: &str = "portshift_active_connections";
pub const ERRORS: &str = "portshift_errors_total";
pub const BYTES: &str = "portshift_transferred_bytes_total";
pub const PROBE_UP: &str = "portshift_probe_up";
pub const ACCEPTED: &str = "portshift_accepted_connections_total";
pub const DENIED: &str = "portshift_denied_connections_total";
pub const CONNECT_ERRNO: &str = "portshift_upstream_connect_errors_total";
pub const BUILD_INFO: &str = "portshift_build_info";
pub const ROUTE_WEIGHT: &str = "portshift_route_weight";
pub const DECISIONS: &str = "portshift_decisions_total";
pub const POLICY_STATE: &str = "portshift_policy_state";
pub const ROUTE_PINNED: &str = "portshift_route_pinned";
pub const POLICY_PAUSED: &str = "portshift_policy_paused";
pub const RELOADS: &str = "portshift_config_reloads_total";
pub const ADMIN_REJECTED: &str = "portshift_admin_rejected_total";
pub const PROXY_PROTOCOL_REJECTED: &str = "portshift_proxy_protocol_rejected_total";
pub const ACCESS_LOG_DROPPED: &str = "portshift_access_log_dropped_total";
pub const KNOCKS: &str = "portshift_knocks_total";
pub const SNI_REJECTED: &str = "portshift_sni_rejected_total";
pub const TLS_REJECTED: &str = "portshift_tls_rejected_total";
pub const EJECTIONS: &str = "portshift_ejections_total";
pub const EJECTED: &str = "portshift_backend_ejected";
pub const DISCOVERY_ERRORS: &str = "portshift_discovery_errors_total";
pub const DISCOVERY_UPDATES: &str = "portshift_discovery_updates_total";
pub const DISCOVERY_BACKENDS: &str = "portshift_discovery_backends";

/// Whose series: a listener's own, or one of its routes' (with a `route`
/// label; a listener without routes has none, so its series are as they
/// always were).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub listener: String,
    pub route: Option<String>,
}

impl Unit {
    pub fn listener(name: &str) -> Unit {
        Unit {
            listener: name.to_owned(),
            route: None,
        }
    }

    fn labels(&self) -> Vec<Label> {
        let mut out = vec![Label::new("listener", self.listener.clone())];
        if let Some(r) = &self.route {
            out.push(Label::new("route", r.clone()));
        }
        out
    }

    /// The unit's labels and then `more`.
    fn with(&self, more: &[(&'static str, String)]) -> Vec<Label> {
        let mut out = self.labels();
        out.extend(more.iter().map(|(k, v)| Label::new(*k, v.clone())));
        out
    }
}

/// Per-backend outcome kinds counted in `portshift_errors_total{kind}`.
/// Only the backend's own failures (connect_*, reset, probe_failure) are
/// in its latency window and the policy's error rate; `client_reset` is
/// counted beside them so an operator sees who abandons which service,
/// and never moves traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    ConnectRefused,
    ConnectTimeout,
    ConnectError,
    Reset,
    ClientReset,
    IdleTimeout,
    ProbeFailure,
    /// The backend's TLS handshake failed (no TLS, a certificate that
    /// does not chain to the group's CA or carry its name).
    TlsHandshake,
}

impl ErrorKind {
    const ALL: [ErrorKind; 8] = [
        ErrorKind::ConnectRefused,
        ErrorKind::ConnectTimeout,
        ErrorKind::ConnectError,
        ErrorKind::Reset,
        ErrorKind::ClientReset,
        ErrorKind::IdleTimeout,
        ErrorKind::ProbeFailure,
        ErrorKind::TlsHandshake,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::ConnectError => "connect_error",
            ErrorKind::Reset => "reset",
            ErrorKind::ClientReset => "client_reset",
            ErrorKind::IdleTimeout => "idle_timeout",
            ErrorKind::ProbeFailure => "probe_failure",
            ErrorKind::TlsHandshake => "tls_handshake",
        }
    }
}

/// Everything `/metrics` serves: the exporter's counters and gauges, then
/// the latency histograms kept in `histogram`.
pub fn render() -> String {
    let mut out = prometheus().render();
    histogram::render(&mut out);
    out
}

/// The process's Prometheus handle; installs the recorder on first call.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first, which this
        // crate never does; then metrics go there and /metrics is empty.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => env!("PORTSHIFT_COMMIT")).set(1.0);
        // Series that exist from the start: increase() cannot see the first
        // event of a counter that appears with it.
        for result in ["ok", "error"] {
            metrics::counter!(RELOADS, "result" => result).increment(0);
        }
        handle
    })
}

fn describe() {
    use metrics::Unit;
    fleet::describe();
    metrics::describe_counter!(
        DISCOVERY_ERRORS,
        "Reads of a group's discovered source that failed (a name that did not resolve, a discovery file missing, malformed or empty); the group keeps the source's last good answer"
    );
    metrics::describe_counter!(
        DISCOVERY_UPDATES,
        "Changes of a group's membership from its discovered sources"
    );
    metrics::describe_gauge!(
        DISCOVERY_BACKENDS,
        "Backends a group's sources give it now, before the admin API's overrides"
    );
    metrics::describe_counter!(CONNECTIONS, "Proxied connections established to a backend");
    metrics::describe_gauge!(ACTIVE, "Proxied connections currently open to a backend");
    metrics::describe_counter!(
        ERRORS,
        "Failed outcomes by kind. The backend's: connect_refused, connect_timeout, connect_error, tls_handshake, reset, probe_failure. The client's: client_reset. portshift's own (group and backend empty): local_error, accept_error. Also idle_timeout, first_byte_timeout, no_backend"
    );
    metrics::describe_counter!(
        BYTES,
        Unit::Bytes,
        "Bytes proxied, by direction (to_backend, to_client)"
    );
    metrics::describe_gauge!(
        PROBE_UP,
        "1 when the backend's active probe says up, 0 when down"
    );
    metrics::describe_counter!(
        ACCEPTED,
        "Client connections accepted by a listener (after the ACL)"
    );
    metrics::describe_counter!(
        DENIED,
        "Client connections closed at accept, by reason: acl, knock (the source has not knocked), max_connections, max_connections_per_source"
    );
    metrics::describe_counter!(
        CONNECT_ERRNO,
        "Failed upstream connects by errno (ECONNREFUSED, ETIMEDOUT, EADDRNOTAVAIL for exhausted local ports, ...)"
    );
    metrics::describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs"
    );
    metrics::describe_gauge!(
        ROUTE_WEIGHT,
        "Share of new connections routed to a group, 0 to 1"
    );
    metrics::describe_counter!(
        DECISIONS,
        "Policy decisions that moved (or in dry-run would move) traffic, by action and rule"
    );
    metrics::describe_gauge!(
        POLICY_STATE,
        "1 for the listener's current policy state, 0 for the others"
    );
    metrics::describe_gauge!(
        ROUTE_PINNED,
        "1 while an operator pin holds the listener's weights"
    );
    metrics::describe_gauge!(
        POLICY_PAUSED,
        "1 while the listener's policy is paused by an operator"
    );
    metrics::describe_counter!(
        ADMIN_REJECTED,
        "Admin connections closed at accept (reason max_connections or descriptors) and admin calls refused for a missing or wrong token (unauthorized)"
    );
    metrics::describe_counter!(
        PROXY_PROTOCOL_REJECTED,
        "Connections to a proxy_protocol listener closed before their header was taken, by reason: untrusted (peer not in proxy_protocol_from), missing, wrong_version, malformed, oversized, timeout, closed"
    );
    metrics::describe_counter!(
        KNOCKS,
        "Connections to a listener's knock ports, by result: progress (the next port of the sequence), opened (the last: the source is admitted), reset (out of order or too slow)"
    );
    metrics::describe_counter!(
        SNI_REJECTED,
        "Connections to a routed listener closed before a route was picked, by reason: not_tls, malformed, oversized, timeout, closed (the ClientHello), no_match (no route takes the server name, or none was sent, and the listener has no primary)"
    );
    metrics::describe_counter!(
        EJECTIONS,
        "Times a backend was taken out of rotation for its own failures (passive ejection)"
    );
    metrics::describe_gauge!(
        EJECTED,
        "1 while a backend is ejected, 0 once it has returned"
    );
    metrics::describe_counter!(
        TLS_REJECTED,
        "Connections to a listener that terminates TLS closed before the handshake completed, by reason: timeout, closed, handshake_failed"
    );
    metrics::describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access-log lines dropped because the writer's queue was full (a disk slower than the connections)"
    );
    metrics::describe_counter!(
        RELOADS,
        "Config reloads (SIGHUP or POST /reload) by result: ok or error"
    );
}

/// A listener's own counters (not tied to a backend).
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub denied_acl: Counter,
    pub denied_max: Counter,
    pub denied_per_source: Counter,
    pub denied_knock: Counter,
    pub first_byte_timeout: Counter,
    pub no_backend: Counter,
    pub accept_error: Counter,
    /// portshift's own resources failed a connection (descriptors,
    /// memory, local ports): never a backend's fault.
    pub local_error: Counter,
}

impl ListenerMetrics {
    pub fn new(unit: &Unit) -> Self {
        prometheus();
        let err = |kind: &'static str| {
            let labels = unit.with(&[
                ("group", String::new()),
                ("backend", String::new()),
                ("kind", kind.to_owned()),
            ]);
            metrics::counter!(ERRORS, labels)
        };
        let denied = |reason: &'static str| {
            metrics::counter!(DENIED, unit.with(&[("reason", reason.to_owned())]))
        };
        ListenerMetrics {
            accepted: metrics::counter!(ACCEPTED, unit.labels()),
            denied_acl: denied("acl"),
            denied_max: denied("max_connections"),
            denied_per_source: denied("max_connections_per_source"),
            denied_knock: denied("knock"),
            first_byte_timeout: err("first_byte_timeout"),
            no_backend: err("no_backend"),
            accept_error: err("accept_error"),
            local_error: err("local_error"),
        }
    }
}

/// One backend's handles, registered once.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub connections: Counter,
    pub active: Gauge,
    pub to_backend: Counter,
    pub to_client: Counter,
    pub probe_up: Gauge,
    ejections: Counter,
    ejected: Gauge,
    latency: Arc<histogram::BackendSeries>,
    errors: [Counter; 8],
}

impl BackendMetrics {
    pub fn new(unit: &Unit, group: &str, backend: &str) -> Self {
        prometheus();
        let labels = unit.with(&[("group", group.to_owned()), ("backend", backend.to_owned())]);
        let with = |k: &'static str, v: &'static str| {
            let mut l = labels.clone();
            l.push(Label::new(k, v));
            l
        };
        BackendMetrics {
            connections: metrics::counter!(CONNECTIONS, labels.clone()),
            active: metrics::gauge!(ACTIVE, labels.clone()),
            to_backend: metrics::counter!(BYTES, with("direction", "to_backend")),
            to_client: metrics::counter!(BYTES, with("direction", "to_client")),
            probe_up: metrics::gauge!(PROBE_UP, labels.clone()),
            ejections: metrics::counter!(EJECTIONS, labels.clone()),
            ejected: metrics::gauge!(EJECTED, labels.clone()),
            latency: histogram::backend_series(unit, group, backend),
            errors: ErrorKind::ALL.map(|k| metrics::counter!(ERRORS, with("kind", k.name()))),
        }
    }

    pub fn latency(&self, signal: Signal, d: Duration) {
        self.latency[signal.index()].record(d);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].increment(1);
    }

    /// The backend was ejected for its own failures.
    pub fn ejected(&self) {
        self.ejections.increment(1);
        self.ejected.set(1.0);
    }

    /// An ejected backend is back in rotation.
    pub fn returned(&self) {
        self.ejected.set(0.0);
    }
}

/// A listener's (or route's) routing and policy gauges.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    unit: Unit,
    weights: Vec<Gauge>,
}

impl RouteMetrics {
    pub fn new(unit: &Unit, groups: &[String]) -> Self {
        prometheus();
        let weights = groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let role = if i == 0 { "primary" } else { "backup" };
                let labels = unit.with(&[("group", g.clone()), ("role", role.to_owned())]);
                metrics::gauge!(ROUTE_WEIGHT, labels)
            })
            .collect();
        RouteMetrics {
            unit: unit.clone(),
            weights,
        }
    }

    /// Publishes the weights in force (basis points) as ratios.
    pub fn weights(&self, bp: &[u16]) {
        for (g, &w) in self.weights.iter().zip(bp) {
            g.set(f64::from(w) / 10_000.0);
        }
    }

    /// Registers, at zero, every decision series a policy can produce, so
    /// the first real decision shows up in increase() and in annotations.
    pub fn register_decisions(&self, rules: &[(&str, crate::core::policy::Rule)], dry_run: bool) {
        for (action, rule) in rules {
            self.decisions(action, rule.label().to_owned(), dry_run)
                .increment(0);
        }
    }

    /// Counts one decision that moved traffic (`would_` prefix in dry-run).
    pub fn decision(&self, action: &str, rule: &str, dry_run: bool) {
        self.decisions(action, rule.to_owned(), dry_run)
            .increment(1);
    }

    fn decisions(&self, action: &str, rule: String, dry_run: bool) -> Counter {
        let action = if dry_run {
            format!("would_{action}")
        } else {
            action.to_owned()
        };
        metrics::counter!(
            DECISIONS,
            self.unit.with(&[("action", action), ("rule", rule)])
        )
    }

    /// Whether an operator pin or pause holds the listener.
    pub fn steering(&self, pinned: bool, paused: bool) {
        let b = |x: bool| if x { 1.0 } else { 0.0 };
        metrics::gauge!(ROUTE_PINNED, self.unit.labels()).set(b(pinned));
        metrics::gauge!(POLICY_PAUSED, self.unit.labels()).set(b(paused));
    }

    /// Sets the state gauge: 1 for `current`, 0 for every other of `all`.
    pub fn state(&self, current: &str, all: &[&'static str]) {
        for s in all {
            let v = if *s == current { 1.0 } else { 0.0 };
            metrics::gauge!(POLICY_STATE, self.unit.with(&[("state", (*s).to_owned())])).set(v);
        }
    }
}

/// The admin refusal reasons, registered at zero so the first refusal
/// shows in increase().
const ADMIN_REJECTED_REASONS: [&str; 3] = ["max_connections", "descriptors", "unauthorized"];

pub fn register_admin_rejections() {
    prometheus();
    for reason in ADMIN_REJECTED_REASONS {
        metrics::counter!(ADMIN_REJECTED, "reason" => reason).increment(0);
    }
}

/// Counts one refused admin connection or call: `max_connections` or
/// `descriptors` at accept, `unauthorized` for a missing or wrong token.
pub fn admin_rejected(reason: &'static str) {
    metrics::counter!(ADMIN_REJECTED, "reason" => reason).increment(1);
}

/// Counts one config reload by result.
pub fn reload(ok: bool) {
    prometheus();
    metrics::counter!(RELOADS, "result" => if ok { "ok" } else { "error" }).increment(1);
}

/// A listener's counter of connections refused for their PROXY protocol
/// header, for one reason.
pub fn proxy_protocol_rejected(listener: &str, reason: &'static str) -> Counter {
    prometheus();
    metrics::counter!(PROXY_PROTOCOL_REJECTED, "listener" => listener.to_owned(), "reason" => reason)
}

/// A listener's counter of knocks with one result.
pub fn knocks(listener: &str, result: &'static str) -> Counter {
    prometheus();
    metrics::counter!(KNOCKS, "listener" => listener.to_owned(), "result" => result)
}

/// A failed read of one of a group's discovered sources.
pub fn discovery_error(group: &str, source: &str) {
    prometheus();
    metrics::counter!(DISCOVERY_ERRORS, "group" => group.to_owned(), "source" => source.to_owned())
        .increment(1);
}

/// A group's membership changed from its sources, which now give it
/// `backends`.
pub fn discovery_update(group: &str, backends: usize, changed: bool) {
    prometheus();
    if changed {
        metrics::counter!(DISCOVERY_UPDATES, "group" => group.to_owned()).increment(1);
    }
    metrics::gauge!(DISCOVERY_BACKENDS, "group" => group.to_owned()).set(backends as f64);
}

/// A listener's counter of access-log lines dropped for a full queue.
pub fn access_log_dropped(listener: &str) -> Counter {
    prometheus();
    metrics::counter!(ACCESS_LOG_DROPPED, "listener" => listener.to_owned())
}

/// Counts one failed upstream connect by its errno name.
pub fn connect_errno(unit: &Unit, errno: &'static str) {
    metrics::counter!(CONNECT_ERRNO, unit.with(&[("errno", errno.to_owned())])).increment(1);
}

/// A TLS listener's counter of client handshakes that did not complete,
/// for one reason.
pub fn tls_rejected(listener: &str, reason: &'static str) -> Counter {
    prometheus();
    metrics::counter!(TLS_REJECTED, "listener" => listener.to_owned(), "reason" => reason)
}

/// A routed listener's counter of connections closed before a route was
/// picked, for one reason.
pub fn sni_rejected(listener: &str, reason: &'static str) -> Counter {
    prometheus();
    metrics::counter!(SNI_REJECTED, "listener" => listener.to_owned(), "reason" => reason)
}

/// The symbolic name of an OS error, for the errno label.
pub fn errno_name(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(111) => "ECONNREFUSED",
        Some(110) => "ETIMEDOUT",
        Some(99) => "EADDRNOTAVAIL",
        Some(98) => "EADDRINUSE",
        Some(101) => "ENETUNREACH",
        Some(113) => "EHOSTUNREACH",
        Some(104) => "ECONNRESET",
        Some(24) => "EMFILE",
        Some(23) => "ENFILE",
        Some(13) => "EACCES",
        Some(1) => "EPERM",
        Some(105) => "ENOBUFS",
        Some(_) => "other",
        None => "unknown",
    }
}
