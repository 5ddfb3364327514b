//! One listener's run-time state, shared by its accept loops, connection
//! tasks, probes, policy loop and the admin API.

use super::clock::Clock;
use super::decisions::RecentDecisions;
use super::outcome::Outcomes;
use super::proxy_protocol::Rejected;
use super::throttle::OncePerSecond;
use crate::access_log::{AccessLog, AccessRecord};
use crate::config::{
    Acl, Config, Limits, Listener, Probe, ProxyProtocolAccept, ProxyVersion, SocketOptions,
};
use crate::core::knock::{Knocked, Knocks};
use crate::core::policy::{GroupInput, Policy};
use crate::core::routes::{GroupRoutes, RouteTable, Router, Weights, WeightsError};
use crate::core::stats::{BackendStats, GroupStats, Signal, Snapshot, WindowConfig};
use crate::telemetry::{BackendMetrics, ListenerMetrics, RouteMetrics, Unit};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The recording every listener writes to (`run --record`), settable while
/// running; an access log of its own.
pub type TraceSlot = Arc<arc_swap::ArcSwapOption<AccessLog>>;

#[derive(Debug)]
pub struct ListenerState {
    /// The listener's name, or `{listener}/{route}` for a route's unit.
    pub name: String,
    /// Its metrics' labels: the listener, and the route for a route's unit.
    pub unit: Unit,
    pub router: Router<Tally>,
    pub outcomes: Outcomes,
    pub clock: Clock,
    /// The policy loop's latest decisions and state.
    pub decisions: RecentDecisions,
    /// The stats window backends that join later record in.
    window_config: WindowConfig,
    /// Per group: its source's backends and the operator's overrides.
    /// Held while a membership change is applied, so changes go one at a
    /// time.
    memberships: Mutex<Vec<super::members::Membership>>,
    /// Where the unit's background tasks run and what stops them, once it
    /// has started: a backend that joins gets its probe there.
    pub(super) tasks: std::sync::OnceLock<(
        tokio_util::task::TaskTracker,
        tokio_util::sync::CancellationToken,
    )>,
    pub(super) listener_metrics: ListenerMetrics,
    pub(super) route_metrics: RouteMetrics,
    pub(super) probes: Vec<Option<Probe>>,
    pub(super) policy: Option<Policy>,
    /// Length of the stats window, the denominator of connection rates.
    window: Duration,
    pub(super) acl: Acl,
    pub(super) connect_timeout: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) connect_attempts: usize,
    /// `[stats] record`: off skips every latency sample on the data path.
    pub(super) record_latency: bool,
    pub(super) retry_on_early_reset: bool,
    pub(super) splice: bool,
    /// An operator's pinned weights; while set, the policy is suspended.
    pin: Mutex<Option<Weights>>,
    paused: AtomicBool,
    /// Where finished connections are recorded (`run --record`), shared by
    /// every listener.
    pub(super) trace: TraceSlot,
    /// This listener's `access_log`, shared with the others that name the
    /// same file.
    pub(super) access_log: Option<Arc<AccessLog>>,
    access_log_dropped: metrics::Counter,
    /// Bumped by every pin and release, so the policy loop knows to take
    /// the weights in force as its own again.
    steering: AtomicU64,
    pub(super) limits: Limits,
    pub(super) first_byte_timeout: Option<Duration>,
    pub(super) socket: SocketOptions,
    /// Open connections per source address, kept only with a per-source
    /// limit.
    sources: Arc<Mutex<HashMap<IpAddr, u32>>>,
    /// Refused connections are logged once a second, not once a connection.
    denied_log: OncePerSecond,
    /// What a binary upgrade hands over, and its freeze of the policy.
    pub(super) carried: super::upgrade::Carried,
    /// Behind load balancers: the header to take, from whom.
    pub(super) proxy_protocol: Option<ProxyProtocolAccept>,
    /// Per group: the header its backends are sent, if any.
    pub(super) send_proxy_protocol: Vec<Option<ProxyVersion>>,
    /// Per `Rejected::ALL` reason (empty without `proxy_protocol`).
    proxy_rejected: Vec<metrics::Counter>,
    /// Port knocking: who knocked how far, who is let in.
    pub(super) knock: Option<KnockGate>,
    /// Terminate TLS, and the counters of handshakes refused (per
    /// `tls::Refused::ALL`).
    pub(super) tls: Option<crate::config::TlsTerminate>,
    pub(super) tls_rejected: Vec<metrics::Counter>,
    /// Per group: TLS to its backends, if any.
    pub(super) tls_to: Vec<Option<crate::config::TlsOriginate>>,
    /// A listener with routes: how a connection is given to one. Set once,
    /// as the listener is built, with the routes' own states.
    pub(super) routed: std::sync::OnceLock<super::routed::Routed>,
}

/// A connection refused at one of the edge's checks: its counter, the
/// metric's reason, the access log's outcome, and which check it failed.
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a> {
    pub counter: Option<&'a metrics::Counter>,
    pub reason: &'static str,
    pub outcome: &'static str,
    pub check: &'static str,
}

/// A listener's knock state and its counters.
#[derive(Debug)]
pub struct KnockGate {
    state: Mutex<Knocks>,
    /// Per `Knocked::ALL`.
    counted: Vec<metrics::Counter>,
    opened_log: OncePerSecond,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Acl,
    /// A knock listener, and the source has not knocked (or its opening
    /// ran out).
    Knock,
    MaxConnections,
    MaxPerSource,
}

/// Who holds a listener's places: open client connections, and per source
/// with a per-source limit. Shared by the listener states that a reload
/// puts under one name, so connections accepted before the reload still
/// count against the limits after it.
#[derive(Debug, Clone, Default)]
pub struct Occupancy {
    open: Arc<AtomicU64>,
    per_source: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl ListenerState {
    /// This listener's places, for the listener that replaces it.
    pub(super) fn occupancy(&self) -> Occupancy {
        Occupancy {
            open: self.outcomes.open_handle(),
            per_source: Arc::clone(&self.sources),
        }
    }
}

/// A client connection's place under the listener's limits, taken at
/// admission and given back when the connection ends: the listener's
/// count of open connections and, with a per-source limit, its source's.
#[derive(Debug)]
pub struct Admission {
    state: Arc<ListenerState>,
    source: Option<IpAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.outcomes.close_one();
        let Some(ip) = self.source else {
            return;
        };
        let mut m = self.state.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// What the proxy keeps per backend, with the backend (see
/// `core::routes::Member`): its latency windows and its metric handles.
#[derive(Debug)]
pub struct Tally {
    pub stats: Arc<BackendStats>,
    pub metrics: BackendMetrics,
}

/// A group's backends as the proxy routes them.
pub type Routes = GroupRoutes<Tally>;
pub type Table = RouteTable<Tally>;

/// A group's backends at start: what its sources found, or those listed.
fn source_of(
    g: &crate::config::Group,
    found: &super::discovery::Discovered,
) -> Vec<crate::core::backend::Backend> {
    found
        .get(&g.name)
        .cloned()
        .unwrap_or_else(|| g.backends.clone())
}

/// Stats shards: one per thread that may record. Asked once: the answer
/// reads the affinity mask and cgroup files, and every backend that joins
/// needs it.
fn shards() -> usize {
    static SHARDS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SHARDS.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

impl Tally {
    pub fn new(unit: &Unit, group: &str, addr: SocketAddr, window: WindowConfig) -> Self {
        Tally {
            stats: Arc::new(BackendStats::new(window, shards())),
            metrics: BackendMetrics::new(unit, group, &addr.to_string()),
        }
    }
}

/// One group's windowed view, for the policy loop, tests and status.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupView {
    pub name: String,
    pub weight_bp: u16,
    /// Indexed by `Signal::index()`.
    pub signals: [Snapshot; 4],
}

// === impl ListenerState ===

impl ListenerState {
    /// `occupancy`: the listener's open connections, carried over from the
    /// listener it replaces on a reload, so its limits count them too.
    /// `found`: the backends of the groups with discovered sources.
    pub(super) fn new(
        config: &Config,
        l: &Listener,
        clock: Clock,
        (trace, access_log): (TraceSlot, Option<Arc<AccessLog>>),
        occupancy: &Occupancy,
        found: &super::discovery::Discovered,
    ) -> Self {
        let groups: Vec<_> = l.groups.iter().map(|&g| config.group(g)).collect();
        let policy = l.policy.as_ref().map(|p| p.policy.clone());
        // A policy may read its own window; otherwise the config's.
        let window = policy
            .as_ref()
            .and_then(|p| p.window)
            .unwrap_or(config.stats);
        let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
        let unit = match &l.unit_of {
            Some(u) => Unit {
                listener: u.listener.clone(),
                route: Some(u.route.clone()),
            },
            None => Unit::listener(&l.name),
        };
        let route_metrics = RouteMetrics::new(&unit, &names);
        route_metrics.weights(Weights::all_on_first(groups.len()).as_slice());
        route_metrics.steering(false, false);
        ListenerState {
            name: l.name.clone(),
            router: Router::new(
                groups
                    .iter()
                    .map(|g| {
                        let tally = |b: &crate::core::backend::Backend| {
                            Tally::new(&unit, &g.name, b.addr, window)
                        };
                        let routes =
                            GroupRoutes::build(&g.name, source_of(g, found), g.balance, tally);
                        Arc::new(routes.with_ejection(g.eject).with_slow_start(g.slow_start))
                    })
                    .collect(),
            ),
            outcomes: Outcomes::with_open(Arc::clone(&occupancy.open)),
            clock,
            decisions: RecentDecisions::default(),
            window_config: window,
            memberships: Mutex::new(
                groups
                    .iter()
                    .map(|g| super::members::Membership::of(source_of(g, found)))
                    .collect(),
            ),
            tasks: std::sync::OnceLock::new(),
            listener_metrics: ListenerMetrics::new(&unit),
            route_metrics,
            probes: groups.iter().map(|g| g.probe.clone()).collect(),
            policy,
            window: window.span(),
            acl: l.acl.clone(),
            connect_timeout: l.connect_timeout,
            idle_timeout: l.idle_timeout,
            connect_attempts: l.connect_attempts as usize,
            record_latency: config.record_latency,
            retry_on_early_reset: l.retry_on_early_reset,
            splice: l.splice,
            pin: Mutex::new(None),
            paused: AtomicBool::new(false),
            trace,
            limits: l.limits,
            first_byte_timeout: l.first_byte_timeout,
            socket: l.socket,
            sources: Arc::clone(&occupancy.per_source),
            denied_log: OncePerSecond::default(),
            steering: AtomicU64::new(0),
            carried: super::upgrade::Carried::default(),
            proxy_rejected: match &l.proxy_protocol {
                Some(_) => Rejected::ALL
                    .iter()
                    .map(|r| crate::telemetry::proxy_protocol_rejected(&l.name, r.name()))
                    .collect(),
                None => Vec::new(),
            },
            proxy_protocol: l.proxy_protocol.clone(),
            knock: l.knock.as_ref().map(|k| KnockGate {
                state: Mutex::new(Knocks::new(
                    k.sequence.clone(),
                    k.within,
                    k.open_for,
                    k.max_sources as usize,
                )),
                counted: Knocked::ALL
                    .iter()
                    .map(|r| crate::telemetry::knocks(&l.name, r.name()))
                    .collect(),
                opened_log: OncePerSecond::default(),
            }),
            access_log,
            access_log_dropped: crate::telemetry::access_log_dropped(&unit.listener),
            send_proxy_protocol: groups.iter().map(|g| g.send_proxy_protocol).collect(),
            routed: std::sync::OnceLock::new(),
            tls_rejected: match &l.tls {
                Some(_) => super::tls::Refused::ALL
                    .iter()
                    .map(|r| crate::telemetry::tls_rejected(&l.name, r.name()))
                    .collect(),
                None => Vec::new(),
            },
            tls: l.tls.clone(),
            tls_to: groups.iter().map(|g| g.tls.clone()).collect(),
            unit,
        }
    }

    /// The route's name, for a route's unit.
    pub fn route(&self) -> Option<&str> {
        self.unit.route.as_deref()
    }

    /// Decides at accept: the ACL, then the listener's and the source's
    /// connection limits. Established connections are never affected. The
    /// places are taken here, at once, not later in the connection's task:
    /// a burst of accepts sees every place taken before it.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Denied> {
        if !self.acl.admits(ip) {
            return Err(Denied::Acl);
        }
        if let Some(k) = &self.knock
            && !lock(&k.state).admits(crate::config::canonical_ip(ip), self.clock.now())
        {
            return Err(Denied::Knock);
        }
        if !self.outcomes.try_open(self.limits.max_connections) {
            return Err(Denied::MaxConnections);
        }
        // From here, dropping the admission gives the place back.
        let mut admission = Admission {
            state: Arc::clone(self),
            source: None,
        };
        let Some(max) = self.limits.max_connections_per_source else {
            return Ok(admission);
        };
        let mut m = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            drop(m);
            return Err(Denied::MaxPerSource);
        }
        *n += 1;
        admission.source = Some(ip);
        Ok(admission)
    }

    /// Counts a refused connection and logs it, at most once a second.
    pub(super) fn note_denied(&self, peer: SocketAddr, why: Denied) {
        let (counter, reason) = match why {
            Denied::Acl => (&self.listener_metrics.denied_acl, "acl"),
            Denied::Knock => (&self.listener_metrics.denied_knock, "knock"),
            Denied::MaxConnections => (&self.listener_metrics.denied_max, "max_connections"),
            Denied::MaxPerSource => (
                &self.listener_metrics.denied_per_source,
                "max_connections_per_source",
            ),
        };
        counter.increment(1);
        if let Some(held) = self.denied_log.allow(self.clock.now()) {
            tracing::warn!(listener = %self.name, %peer, reason, not_logged = held, "connection refused at accept (logged at most once a second)");
        }
        if self.logs_connections() {
            self.log_refused(
                peer,
                match why {
                    Denied::Acl => "denied_acl",
                    Denied::Knock => "denied_knock",
                    Denied::MaxConnections => "denied_max_connections",
                    Denied::MaxPerSource => "denied_max_connections_per_source",
                },
            );
        }
    }

    /// The access-log line of a connection closed before any backend was
    /// tried: who, when, and why (`outcome`).
    fn log_refused(&self, peer: SocketAddr, outcome: &'static str) {
        let now = self.clock.now();
        self.log_connection(&AccessRecord {
            time: self.clock.wall(now),
            t_s: now,
            listener: &self.name,
            route: None,
            client: peer,
            group: "",
            backend: "",
            connect_ms: None,
            first_byte_ms: None,
            total_ms: None,
            bytes_to_backend: 0,
            bytes_to_client: 0,
            outcome,
            ended_by: "local",
        });
    }

    /// Whether connections are logged as they end at all (then their
    /// records are worth building).
    pub(super) fn logs_connections(&self) -> bool {
        self.access_log.is_some() || self.trace.load().is_some()
    }

    /// Writes one finished connection to the access log and the recording,
    /// whichever are on; a line the writer had no room for is counted.
    pub(super) fn log_connection(&self, r: &AccessRecord<'_>) {
        let trace = self.trace.load();
        let logs = self.access_log.iter().chain(trace.as_ref());
        let Ok(mut line) = serde_json::to_string(r) else {
            return;
        };
        line.push('\n');
        for log in logs {
            if !log.write_line(line.clone()) {
                self.access_log_dropped.increment(1);
            }
        }
    }

    /// A connection to knock port `port`: the sequence moves on (or
    /// starts over), counted; an opening is logged.
    pub(super) fn note_knock(&self, peer: SocketAddr, port: u16) {
        let Some(k) = &self.knock else { return };
        let ip = crate::config::canonical_ip(peer.ip());
        let result = lock(&k.state).knock(ip, port, self.clock.now());
        if let Some(c) = Knocked::ALL.iter().position(|&r| r == result) {
            k.counted[c].increment(1);
        }
        match result {
            Knocked::Opened => {
                if let Some(held) = k.opened_log.allow(self.clock.now()) {
                    tracing::info!(listener = %self.name, source = %ip, not_logged = held, "knock sequence complete: the source is admitted (logged at most once a second)");
                }
            }
            r => {
                tracing::debug!(listener = %self.name, source = %ip, port, result = r.name(), "knock")
            }
        }
    }

    /// Counts a client whose TLS handshake did not complete and logs it,
    /// at most once a second.
    pub(super) fn note_tls_rejected(&self, peer: SocketAddr, why: super::tls::Refused) {
        let i = super::tls::Refused::ALL.iter().position(|&r| r == why);
        self.note_refused(
            peer,
            Refusal {
                counter: i.and_then(|i| self.tls_rejected.get(i)),
                reason: why.name(),
                outcome: why.outcome(),
                check: "TLS handshake",
            },
        );
    }

    /// Counts a connection closed at one of the edge's checks, before any
    /// backend was tried; logs it at most once a second, and writes it to
    /// the access log.
    pub(super) fn note_refused(&self, peer: SocketAddr, r: Refusal<'_>) {
        self.outcomes.denied();
        if let Some(c) = r.counter {
            c.increment(1);
        }
        if let Some(held) = self.denied_log.allow(self.clock.now()) {
            tracing::warn!(listener = %self.name, %peer, check = r.check, reason = r.reason, not_logged = held, "connection closed before any backend (logged at most once a second)");
        }
        if self.logs_connections() {
            self.log_refused(peer, r.outcome);
        }
    }

    /// Whether `peer` may send this listener a PROXY protocol header.
    pub(super) fn trusts_proxy(&self, peer: IpAddr) -> bool {
        self.proxy_protocol.as_ref().is_some_and(|p| p.trusts(peer))
    }

    /// Counts a connection closed for its PROXY protocol header (or for
    /// coming from a peer not trusted to send one) and logs it, at most
    /// once a second.
    pub(super) fn note_proxy_rejected(&self, peer: SocketAddr, why: Rejected) {
        let i = Rejected::ALL.iter().position(|&r| r == why);
        self.note_refused(
            peer,
            Refusal {
                counter: i.and_then(|i| self.proxy_rejected.get(i)),
                reason: why.name(),
                outcome: why.outcome(),
                check: "PROXY protocol header",
            },
        );
    }

    /// Counts a failed accept (EMFILE and the like) and logs it, at most
    /// once a second for the whole process: with many ports, each backing
    /// off 50 ms, a full fd table would otherwise write a thousand lines a
    /// second.
    pub(super) fn note_accept_error(&self, e: &std::io::Error) {
        static LOG: OncePerSecond = OncePerSecond::new();
        self.outcomes.accept_error();
        self.listener_metrics.accept_error.increment(1);
        if let Some(held) = LOG.allow(self.clock.now()) {
            tracing::warn!(listener = %self.name, error = %e, not_logged = held, "accept failed; backing off (logged at most once a second)");
        }
    }

    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    /// The length of the stats window the policy reads.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Group names, primary first.
    pub fn group_names(&self) -> Vec<String> {
        self.router
            .table()
            .groups
            .iter()
            .map(|g| g.name.clone())
            .collect()
    }

    /// How many groups this unit routes to (0: a listener whose routes
    /// take every connection).
    pub fn group_count(&self) -> usize {
        self.router.table().groups.len()
    }

    /// Every group's membership, locked.
    pub(super) fn memberships(&self) -> std::sync::MutexGuard<'_, Vec<super::members::Membership>> {
        lock(&self.memberships)
    }

    /// The stats window a backend that joins records in.
    pub(super) fn window_config(&self) -> WindowConfig {
        self.window_config
    }

    /// Every group's stats over its current members.
    fn group_stats(table: &Table) -> impl Iterator<Item = (GroupStats, &Arc<Routes>)> {
        table.groups.iter().map(|g| {
            let stats = GroupStats {
                name: g.name.clone(),
                backends: g
                    .members()
                    .iter()
                    .map(|m| Arc::clone(&m.extra.stats))
                    .collect(),
            };
            (stats, g)
        })
    }

    /// Every group's windowed latency and errors at this moment.
    pub fn view(&self) -> Vec<GroupView> {
        let now = self.clock.now();
        let table = self.router.table();
        Self::group_stats(&table)
            .zip(table.weights.as_slice())
            .map(|((g, _), &w)| GroupView {
                name: g.name.clone(),
                weight_bp: w,
                signals: Signal::ALL.map(|s| g.snapshot(s, now)),
            })
            .collect()
    }

    /// What the policy engine reads at `now`: one input per group.
    pub fn policy_inputs(&self, signal: Signal, now: Duration) -> Vec<GroupInput> {
        let table = self.router.table();
        Self::group_stats(&table)
            .map(|(stats, routes)| {
                let active = routes.members().iter().map(|m| u64::from(m.active())).sum();
                GroupInput::from_stats(&stats, signal, now, self.window, active)
            })
            .collect()
    }

    /// One backend's window for `signal` at this moment.
    pub fn backend_snapshot(&self, group: usize, backend: usize, signal: Signal) -> Snapshot {
        let table = self.router.table();
        let stats = &table.groups[group].extra(backend).stats;
        stats.signal(signal).snapshot(self.clock.now())
    }

    /// Pins the weights: they apply to the next connection and the policy
    /// is suspended until `release`.
    pub fn pin(&self, weights: Weights) -> Result<(), WeightsError> {
        self.router.publish(weights.clone())?;
        *self.pin.lock().unwrap_or_else(|p| p.into_inner()) = Some(weights);
        self.steering.fetch_add(1, Relaxed);
        self.route_metrics.weights(self.router.weights().as_slice());
        self.route_metrics.steering(true, self.is_paused());
        Ok(())
    }

    /// Releases a pin. A policy resumes from the weights in force; without
    /// a policy, all traffic returns to the primary. False when nothing was
    /// pinned.
    pub fn release(&self) -> bool {
        let was = self
            .pin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some();
        if was && self.policy.is_none() {
            let all = Weights::all_on_first(self.group_count());
            self.router.publish(all).expect("one weight per group");
            self.route_metrics.weights(self.router.weights().as_slice());
        }
        self.steering.fetch_add(1, Relaxed);
        self.route_metrics.steering(false, self.is_paused());
        was
    }

    pub fn pinned(&self) -> Option<Weights> {
        self.pin.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Relaxed);
        self.route_metrics.steering(self.pinned().is_some(), paused);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Relaxed)
    }

    /// Changes each time an operator pins or releases.
    pub(super) fn steering_generation(&self) -> u64 {
        self.steering.load(Relaxed)
    }
}
