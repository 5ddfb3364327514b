//! The route table: which port group and which backend a new connection goes
//! to. Group weights are basis points (0..=10000, summing to 10000); the
//! table is an immutable value that the control loop replaces whole through
//! [`Router::publish`], so the accept path reads it without a lock and a
//! change applies to the very next connection. Established connections never
//! look at it again, so a weight change cuts nobody.

use crate::core::backend::{Backend, Balance};
use crate::core::eject::{EjectPolicy, Ejections};
use crate::core::ewma::{PeakEwma, p2c, spread};
use crate::core::maglev::Maglev;
use crate::core::stats::Signal;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// All the traffic, in basis points.
pub const TOTAL_BP: u32 = 10_000;

/// Group weights in basis points; the sum is always [`TOTAL_BP`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights(Vec<u16>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    #[error("weights sum to {0} basis points; they must sum to 10000")]
    BadSum(u32),
    #[error("{got} weights for {want} groups")]
    WrongLength { got: usize, want: usize },
    #[error("no groups to weigh")]
    Empty,
}

// === impl Weights ===

impl Weights {
    pub fn new(bp: Vec<u16>) -> Result<Self, WeightsError> {
        if bp.is_empty() {
            return Err(WeightsError::Empty);
        }
        let sum: u32 = bp.iter().map(|&w| u32::from(w)).sum();
        if sum != TOTAL_BP {
            return Err(WeightsError::BadSum(sum));
        }
        Ok(Weights(bp))
    }

    /// Everything on the first group (the primary), as at start. With no
    /// groups (a listener whose routes take every connection), nothing:
    /// such a table is never planned.
    pub fn all_on_first(groups: usize) -> Self {
        let mut bp = vec![0; groups];
        if let Some(first) = bp.first_mut() {
            *first = TOTAL_BP as u16;
        }
        Weights(bp)
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.0
    }

    /// The group for connection number `ticket`. Tickets are mapped through
    /// a golden-ratio Weyl sequence onto 0..10000, which spreads consecutive
    /// tickets evenly: over n connections each group's share is within a few
    /// connections of its weight, with no randomness and no shared state.
    pub fn pick(&self, ticket: u64) -> usize {
        let frac = ticket.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        let point = ((frac * u64::from(TOTAL_BP)) >> 32) as u32;
        let mut acc = 0u32;
        for (i, &w) in self.0.iter().enumerate() {
            acc += u32::from(w);
            if point < acc {
                return i;
            }
        }
        unreachable!("weights sum to {TOTAL_BP} and point < {TOTAL_BP}")
    }
}

/// One group's backends and the counters its balancer needs. Shared between
/// successive route tables so a weight change keeps round-robin position and
/// active counts.
#[derive(Debug)]
pub struct GroupRoutes {
    pub name: String,
    backends: Vec<Backend>,
    balance: Balance,
    /// Smooth weighted round-robin order over backend indexes.
    schedule: Vec<u32>,
    next: AtomicU64,
    active: Vec<AtomicU32>,
    /// What the active probe says; backends start up, and without a probe
    /// they stay up.
    up: Vec<AtomicBool>,
    /// `source_hash`: the lookup table.
    maglev: Option<Maglev>,
    /// `peak_ewma`: each backend's cost (empty otherwise).
    ewma: Vec<PeakEwma>,
    /// Passive ejection, when the group configures it.
    ejections: Option<Ejections>,
}

// === impl GroupRoutes ===

impl GroupRoutes {
    pub fn new(name: impl Into<String>, backends: Vec<Backend>, balance: Balance) -> Self {
        let schedule = smooth_wrr_schedule(&backends.iter().map(|b| b.weight).collect::<Vec<_>>());
        assert!(
            !schedule.is_empty(),
            "a group has at least one backend with weight > 0"
        );
        let maglev = match balance {
            Balance::SourceHash => Maglev::new(&backends),
            _ => None,
        };
        let ewma = match balance {
            Balance::PeakEwma(e) => backends
                .iter()
                .map(|_| PeakEwma::new(e.default_rtt))
                .collect(),
            _ => Vec::new(),
        };
        GroupRoutes {
            name: name.into(),
            active: backends.iter().map(|_| AtomicU32::new(0)).collect(),
            up: backends.iter().map(|_| AtomicBool::new(true)).collect(),
            maglev,
            ewma,
            ejections: None,
            backends,
            balance,
            schedule,
            next: AtomicU64::new(0),
        }
    }

    /// The same group, ejecting failing backends under `policy`.
    pub fn with_ejection(mut self, policy: Option<EjectPolicy>) -> Self {
        self.ejections = policy.map(|p| Ejections::new(p, self.backends.len()));
        self
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Passive ejection's state, if the group ejects.
    pub fn ejections(&self) -> Option<&Ejections> {
        self.ejections.as_ref()
    }

    /// Whether `backend` is in rotation at `now`: up by its probe and not
    /// ejected.
    pub fn in_rotation(&self, backend: usize, now: Duration) -> bool {
        self.is_up(backend)
            && self
                .ejections
                .as_ref()
                .is_none_or(|e| !e.is_ejected(backend, now))
    }

    pub fn addr(&self, backend: usize) -> SocketAddr {
        self.backends[backend].addr
    }

    /// The backend the next connection should try first; `key` is the
    /// hash of its client's address (read by `source_hash` only).
    pub fn next_backend(&self, key: u64) -> usize {
        self.choose(self.next.fetch_add(1, Ordering::Relaxed), key)
    }

    /// The backend `next_backend` would return, without taking the turn:
    /// for fallback attempts that may never be made.
    pub fn peek_backend(&self, key: u64) -> usize {
        self.choose(self.next.load(Ordering::Relaxed), key)
    }

    fn choose(&self, n: u64, key: u64) -> usize {
        match self.balance {
            Balance::RoundRobin => {
                self.schedule[(n % self.schedule.len() as u64) as usize] as usize
            }
            Balance::LeastConnections => {
                let (active, weights) = self.loads();
                least_connections(&active, &weights, n)
            }
            Balance::SourceHash => self.maglev.as_ref().map_or(0, |m| m.lookup(key)),
            Balance::PeakEwma(_) => {
                let costs: Vec<f64> = self.ewma.iter().map(PeakEwma::cost).collect();
                let (active, weights) = self.loads();
                p2c(&costs, &active, &weights, spread(n))
            }
        }
    }

    /// Each backend's open connections and weight, for the balancers that
    /// weigh load.
    fn loads(&self) -> (Vec<u32>, Vec<u32>) {
        let active = self
            .active
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let weights = self.backends.iter().map(|b| b.weight).collect();
        (active, weights)
    }

    /// Counts a live connection to `backend` until the guard drops.
    pub fn track(self: &Arc<Self>, backend: usize) -> ActiveGuard {
        self.active[backend].fetch_add(1, Ordering::Relaxed);
        ActiveGuard {
            group: Arc::clone(self),
            backend,
        }
    }

    /// Counts one more (or one fewer) open connection to `backend`, for
    /// a caller that cannot hold a guard across events (the simulator).
    pub fn opened(&self, backend: usize, open: bool) {
        if open {
            self.active[backend].fetch_add(1, Ordering::Relaxed);
        } else {
            self.active[backend].fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn active(&self, backend: usize) -> u32 {
        self.active[backend].load(Ordering::Relaxed)
    }

    /// A latency sample of `signal` from `backend` at `now`: `peak_ewma`
    /// balances on it when it is the signal it reads.
    pub fn observe(&self, backend: usize, signal: Signal, rtt: Duration, now: Duration) {
        if let Balance::PeakEwma(e) = self.balance
            && e.signal == signal
        {
            self.ewma[backend].observe(rtt, now, e.decay);
        }
    }

    /// `peak_ewma`'s cost of `backend` in microseconds, if it balances so.
    pub fn ewma_cost(&self, backend: usize) -> Option<f64> {
        self.ewma.get(backend).map(PeakEwma::cost)
    }

    /// Marks a backend up or down (from its probe). Down backends are tried
    /// only after every up choice.
    pub fn set_up(&self, backend: usize, up: bool) {
        self.up[backend].store(up, Ordering::Relaxed);
    }

    pub fn is_up(&self, backend: usize) -> bool {
        self.up[backend].load(Ordering::Relaxed)
    }
}

/// Decrements a backend's active count when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard {
    group: Arc<GroupRoutes>,
    backend: usize,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.group.active[self.backend].fetch_sub(1, Ordering::Relaxed);
    }
}

/// nginx's smooth weighted round-robin, unrolled once into a fixed order so
/// the hot path is one atomic increment. Weights 5,1,1 give a a b a c a a.
fn smooth_wrr_schedule(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
    if divisor == 0 {
        return Vec::new();
    }
    let reduced: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = reduced.iter().sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(&reduced) {
                *c += w;
            }
            let best = (0..current.len())
                .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
                .expect("weights is not empty");
            current[best] -= total;
            best as u32
        })
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The backend with the fewest active connections per unit of weight; ties
/// go round-robin from `rotation` so equal backends share evenly.
pub fn least_connections(active: &[u32], weights: &[u32], rotation: u64) -> usize {
    let n = active.len();
    let start = (rotation % n as u64) as usize;
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if weights[i] == 0 {
            continue;
        }
        // active[i]/w[i] < active[b]/w[b], without division.
        let better = best.is_none_or(|b| {
            u64::from(active[i]) * u64::from(weights[b])
                < u64::from(active[b]) * u64::from(weights[i])
        });
        if better {
            best = Some(i);
        }
    }
    best.expect("a group has at least one backend with weight > 0")
}

/// An immutable routing decision table for one listener.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// The primary first, then backups in order.
    pub groups: Arc<[Arc<GroupRoutes>]>,
    pub weights: Weights,
}

/// One upstream connect attempt: group index and backend index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub group: usize,
    pub backend: usize,
}

// === impl RouteTable ===

impl RouteTable {
    /// Where connection `ticket` goes, in the order to try: the weighted
    /// group's chosen backend, that group's other backends, then the first
    /// choice of each other group (primary first); backends a probe marked
    /// down come after all of those. At most `max` attempts; weight-0
    /// backends are never tried.
    /// `key`: the hash of the client's address, for `source_hash`;
    /// backends ejected at `now` come last, with those probed down.
    pub fn plan(&self, ticket: u64, max: usize, key: u64, now: Duration) -> Vec<Attempt> {
        let mut plan = Vec::with_capacity(max);
        self.plan_into(ticket, max, (key, now), &mut plan);
        plan
    }

    /// As `plan`, into a reused buffer: no allocation on the hot path.
    pub fn plan_into(
        &self,
        ticket: u64,
        max: usize,
        (key, now): (u64, Duration),
        plan: &mut Vec<Attempt>,
    ) {
        plan.clear();
        let first_group = self.weights.pick(ticket);
        // Allocates only when some backend is probed down.
        let mut down = Vec::new();
        let mut push = |group: usize, backend: usize| {
            let a = Attempt { group, backend };
            if self.groups[group].in_rotation(backend, now) {
                plan.push(a);
            } else {
                down.push(a);
            }
        };
        let g = &self.groups[first_group];
        let first = g.next_backend(key);
        let n = g.backends().len();
        for k in 0..n {
            let b = (first + k) % n;
            if g.backends()[b].weight > 0 {
                push(first_group, b);
            }
        }
        for (gi, g) in self.groups.iter().enumerate() {
            if gi != first_group {
                push(gi, g.peek_backend(key));
            }
        }
        plan.extend(down);
        plan.truncate(max);
    }
}

/// Holds a listener's current route table; the control loop publishes new
/// weights, the accept path loads the table without locking.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<RouteTable>,
    tickets: AtomicU64,
}

// === impl Router ===

impl Router {
    /// A router with everything on the primary (the first group).
    pub fn new(groups: Vec<Arc<GroupRoutes>>) -> Self {
        let weights = Weights::all_on_first(groups.len());
        Router {
            table: ArcSwap::from_pointee(RouteTable {
                groups: groups.into(),
                weights,
            }),
            tickets: AtomicU64::new(0),
        }
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    pub fn weights(&self) -> Weights {
        self.table.load().weights.clone()
    }

    /// Replaces the weights; the very next connection uses them.
    pub fn publish(&self, weights: Weights) -> Result<(), WeightsError> {
        let current = self.table.load_full();
        let want = current.groups.len();
        if weights.as_slice().len() != want {
            return Err(WeightsError::WrongLength {
                got: weights.as_slice().len(),
                want,
            });
        }
        self.table.store(Arc::new(RouteTable {
            groups: Arc::clone(&current.groups),
            weights,
        }));
        Ok(())
    }

    /// The plan for the next new connection, from client `key` (the hash
    /// of its address; see `client_key`).
    pub fn plan_next(
        &self,
        max_attempts: usize,
        key: u64,
        now: Duration,
    ) -> (Arc<RouteTable>, Vec<Attempt>) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let table = self.table.load_full();
        let plan = table.plan(ticket, max_attempts, key, now);
        (table, plan)
    }

    /// The plan for the next new connection, into a reused buffer.
    pub fn plan_next_into(
        &self,
        max_attempts: usize,
        (key, now): (u64, Duration),
        out: &mut Vec<Attempt>,
    ) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        self.table
            .load()
            .plan_into(ticket, max_attempts, (key, now), out);
    }
}

/// The `source_hash` key of a client address: its bytes hashed, the same
/// on every instance and build.
pub fn client_key(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(v4) => super::maglev::fnv1a(&v4.octets(), 0),
        std::net::IpAddr::V6(v6) => super::maglev::fnv1a(&v6.octets(), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Backend {
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                weight,
            })
            .collect()
    }

    #[test]
    fn smooth_wrr_interleaves_like_nginx() {
        assert_eq!(smooth_wrr_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr_schedule(&[2, 2]), vec![0, 1]);
        assert_eq!(smooth_wrr_schedule(&[0, 3]), vec![1]);
    }

    #[test]
    fn weights_must_sum_to_total() {
        assert_eq!(
            Weights::new(vec![5000, 4000]),
            Err(WeightsError::BadSum(9000))
        );
        assert!(Weights::new(vec![9000, 1000]).is_ok());
    }

    #[test]
    fn group_share_tracks_weight_closely() {
        for split in [[9000u16, 1000], [7000, 3000], [5000, 5000], [100, 9900]] {
            let w = Weights::new(split.to_vec()).unwrap();
            let n = 10_000u64;
            let second = (0..n).filter(|&t| w.pick(t) == 1).count() as i64;
            let want = i64::from(split[1]);
            assert!((second - want).abs() <= 20, "{split:?}: {second} of {n}");
        }
    }

    #[test]
    fn zero_weight_group_gets_nothing() {
        let w = Weights::all_on_first(3);
        assert!((0..10_000).all(|t| w.pick(t) == 0));
    }

    #[test]
    fn least_connections_prefers_idle_then_weight() {
        assert_eq!(least_connections(&[3, 1, 2], &[1, 1, 1], 0), 1);
        // 4 active at weight 4 beats 2 active at weight 1.
        assert_eq!(least_connections(&[4, 2], &[4, 1], 0), 0);
        // Ties rotate.
        assert_eq!(least_connections(&[0, 0], &[1, 1], 1), 1);
        assert_eq!(least_connections(&[0, 0], &[0, 1], 0), 1);
    }

    #[test]
    fn plan_tries_rest_of_group_then_other_groups() {
        let primary = Arc::new(GroupRoutes::new(
            "p",
            backends(&[1, 1]),
            Balance::RoundRobin,
        ));
        let backup = Arc::new(GroupRoutes::new("b", backends(&[1]), Balance::RoundRobin));
        let router = Router::new(vec![primary, backup]);
        let (_, plan) = router.plan_next(8, 0, Duration::ZERO);
        let groups: Vec<usize> = plan.iter().map(|a| a.group).collect();
        assert_eq!(groups, vec![0, 0, 1]);
        assert_ne!(plan[0].backend, plan[1].backend);
        assert_eq!(router.plan_next(2, 0, Duration::ZERO).1.len(), 2);
    }

    #[test]
    fn probed_down_backends_are_tried_last() {
        let primary = Arc::new(GroupRoutes::new(
            "p",
            backends(&[1, 1]),
            Balance::RoundRobin,
        ));
        let backup = Arc::new(GroupRoutes::new("b", backends(&[1]), Balance::RoundRobin));
        primary.set_up(0, false);
        let router = Router::new(vec![primary, backup]);
        for _ in 0..4 {
            let plan = router.plan_next(8, 0, Duration::ZERO).1;
            let order: Vec<(usize, usize)> = plan.iter().map(|a| (a.group, a.backend)).collect();
            assert_eq!(order, vec![(0, 1), (1, 0), (0, 0)]);
        }
    }

    /// Several backends down: they follow every one that is up, in the
    /// order they would have been tried.
    #[test]
    fn down_backends_keep_their_order_after_the_up_ones() {
        let primary = Arc::new(GroupRoutes::new(
            "p",
            backends(&[1, 1, 1, 1]),
            Balance::RoundRobin,
        ));
        let backup = Arc::new(GroupRoutes::new("b", backends(&[1]), Balance::RoundRobin));
        primary.set_up(0, false);
        primary.set_up(1, false);
        let router = Router::new(vec![primary, backup]);
        let order = |max| -> Vec<(usize, usize)> {
            let plan = router.plan_next(max, 0, Duration::ZERO).1;
            plan.iter().map(|a| (a.group, a.backend)).collect()
        };
        assert_eq!(order(8), vec![(0, 2), (0, 3), (1, 0), (0, 0), (0, 1)]);
        // The next turn starts at backend 1: 2, 3, then the backup, then 1, 0.
        assert_eq!(order(4), vec![(0, 2), (0, 3), (1, 0), (0, 1)]);
    }

    #[test]
    fn publish_rejects_wrong_length_and_applies_next() {
        let g = || Arc::new(GroupRoutes::new("g", backends(&[1]), Balance::RoundRobin));
        let router = Router::new(vec![g(), g()]);
        assert!(router.publish(Weights::new(vec![10_000]).unwrap()).is_err());
        router
            .publish(Weights::new(vec![0, 10_000]).unwrap())
            .unwrap();
        assert_eq!(router.plan_next(1, 0, Duration::ZERO).1[0].group, 1);
    }

    #[test]
    fn active_guard_counts_live_connections() {
        let g = Arc::new(GroupRoutes::new(
            "g",
            backends(&[1]),
            Balance::LeastConnections,
        ));
        let guard = g.track(0);
        assert_eq!(g.active(0), 1);
        drop(guard);
        assert_eq!(g.active(0), 0);
    }

    /// `source_hash`: every connection of one client starts on the same
    /// backend, and clients spread over all of them.
    #[test]
    fn source_hash_plans_start_on_the_clients_backend() {
        let g = Arc::new(GroupRoutes::new(
            "g",
            backends(&[1, 1, 1, 1]),
            Balance::SourceHash,
        ));
        let router = Router::new(vec![g]);
        let mut used = std::collections::HashSet::new();
        for client in 0..100u8 {
            let key = client_key(std::net::IpAddr::from([10, 0, 0, client]));
            let first = router.plan_next(4, key, Duration::ZERO).1[0];
            for _ in 0..5 {
                assert_eq!(
                    router.plan_next(4, key, Duration::ZERO).1[0],
                    first,
                    "client {client}"
                );
            }
            assert_eq!(
                router.plan_next(4, key, Duration::ZERO).1.len(),
                4,
                "then the others"
            );
            used.insert(first.backend);
        }
        assert_eq!(used.len(), 4);
    }

    /// `peak_ewma` reads the signal it is set to, and moves away from a
    /// backend whose samples turn slow.
    #[test]
    fn peak_ewma_reads_its_signal_and_avoids_the_slow_backend() {
        let settings = crate::core::backend::EwmaSettings::default();
        let g = Arc::new(GroupRoutes::new(
            "g",
            backends(&[1, 1]),
            Balance::PeakEwma(settings),
        ));
        let ms = Duration::from_millis;
        g.observe(1, Signal::Connect, ms(500), ms(1));
        assert_eq!(g.ewma_cost(1), Some(30_000.0), "connect is not its signal");
        g.observe(1, Signal::Exchange, ms(500), ms(1));
        g.observe(0, Signal::Exchange, ms(5), ms(1));
        let router = Router::new(vec![g]);
        assert!((0..100).all(|_| router.plan_next(2, 0, Duration::ZERO).1[0].backend == 0));
    }
}
