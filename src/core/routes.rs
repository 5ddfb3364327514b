//! The route table: which port group and which backend a new connection goes
//! to. Group weights are basis points (0..=10000, summing to 10000); the
//! table is an immutable value that the control loop replaces whole through
//! [`Router::publish`], so the accept path reads it without a lock and a
//! change applies to the very next connection. Established connections never
//! look at it again, so a weight change cuts nobody.

use crate::core::backend::{Backend, Balance, SlowStart};
use crate::core::eject::{self, EjectPolicy, EjectState, Ejected, Ejections};
use crate::core::ewma::{Load, PeakEwma, p2c_by, spread};
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

/// One backend of a group and what is kept about it for as long as it
/// stays a member: its open connections, probe health, drain, latency
/// cost, ejection state, when its slow start began, and the caller's own
/// per-backend state (`extra`: the proxy keeps its stats and metrics
/// there). Shared by every route table the backend is in, so a change of
/// its group's membership keeps all of it for the backends that stay.
#[derive(Debug)]
pub struct Member<X = ()> {
    pub addr: SocketAddr,
    active: AtomicU32,
    /// What the active probe says; backends start up, and without a probe
    /// they stay up.
    up: AtomicBool,
    /// No new connections; established ones finish.
    draining: AtomicBool,
    /// `peak_ewma`'s cost (kept whatever the balancer: cheap, and ready
    /// if it changes).
    ewma: PeakEwma,
    pub eject: EjectState,
    /// When its slow start began, microseconds on the caller's clock; 0:
    /// a founding member, never ramped.
    ramp_from_us: AtomicU64,
    pub extra: X,
}

impl<X> Member<X> {
    /// A backend that joins a group balanced by `balance` at `joined`
    /// (`None`: with its group, at start).
    fn new(addr: SocketAddr, extra: X, joined: Option<Duration>, balance: Balance) -> Self {
        let rtt = match balance {
            Balance::PeakEwma(e) => e.default_rtt,
            _ => crate::core::backend::DEFAULT_EWMA_RTT,
        };
        Member {
            addr,
            active: AtomicU32::new(0),
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            ewma: PeakEwma::new(rtt),
            eject: EjectState::default(),
            ramp_from_us: AtomicU64::new(joined.map_or(0, stamp)),
            extra,
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks it up or down (from its probe) at `now`; coming back up
    /// starts its slow start.
    pub fn set_up(&self, up: bool, now: Duration) {
        let was = self.up.swap(up, Ordering::Relaxed);
        if up && !was {
            self.ramp_from_us.store(stamp(now), Ordering::Relaxed);
        }
    }

    /// When its latest slow start began: it joined, probed up again, or
    /// returned from ejection, whichever was last.
    /// `None` for a founding member that never came back from anything.
    pub fn ramp_from(&self) -> Option<Duration> {
        let own = match self.ramp_from_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        };
        own.max(self.eject.ejected_until())
    }

    /// The share of its weight it has at `now` under `slow_start`.
    pub fn ramp(&self, s: SlowStart, now: Duration) -> f64 {
        self.ramp_from().map_or(1.0, |from| s.factor(from, now))
    }
}

/// Microseconds on the caller's clock, at least 1 (0 means never).
fn stamp(t: Duration) -> u64 {
    t.as_micros().max(1) as u64
}

/// One group's backends and the state its balancer needs. A membership
/// change builds a new one (`reshaped`) sharing the members that stay.
#[derive(Debug)]
pub struct GroupRoutes<X = ()> {
    pub name: String,
    backends: Vec<Backend>,
    members: Vec<Arc<Member<X>>>,
    balance: Balance,
    /// Smooth weighted round-robin order over backend indexes.
    schedule: Vec<u32>,
    next: AtomicU64,
    /// `source_hash`: the lookup table.
    maglev: Option<Maglev>,
    /// Passive ejection, when the group configures it: shared by every
    /// membership of the group, so it decides one ejection at a time.
    ejections: Option<Arc<Ejections>>,
    slow_start: Option<SlowStart>,
    /// Whether any backend drains (round-robin then draws by weight).
    draining: AtomicBool,
}

/// Why a group cannot have the backends asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("a group needs at least one backend with a weight above 0")]
    NoWeight,
    #[error("backend {0} is listed twice")]
    Duplicate(SocketAddr),
}

// === impl GroupRoutes ===

impl GroupRoutes {
    /// A group of founding members with no state of the caller's.
    pub fn new(name: impl Into<String>, backends: Vec<Backend>, balance: Balance) -> Self {
        GroupRoutes::build(name, backends, balance, |_| ())
    }
}

impl<X> GroupRoutes<X> {
    /// A group of founding members; `extra` makes each one's state.
    pub fn build(
        name: impl Into<String>,
        backends: Vec<Backend>,
        balance: Balance,
        mut extra: impl FnMut(&Backend) -> X,
    ) -> Self {
        check_membership(&backends).expect("a configured group has a backend with a weight");
        let members = backends
            .iter()
            .map(|b| Arc::new(Member::new(b.addr, extra(b), None, balance)))
            .collect();
        GroupRoutes::with_members(name.into(), backends, members, balance)
    }

    /// The group over `members` (one per backend, checked by the caller).
    fn with_members(
        name: String,
        backends: Vec<Backend>,
        members: Vec<Arc<Member<X>>>,
        balance: Balance,
    ) -> Self {
        let schedule = smooth_wrr_schedule(&backends.iter().map(|b| b.weight).collect::<Vec<_>>());
        let maglev = match balance {
            Balance::SourceHash => Maglev::new(&backends),
            _ => None,
        };
        GroupRoutes {
            name,
            backends,
            members,
            balance,
            schedule,
            next: AtomicU64::new(0),
            maglev,
            ejections: None,
            slow_start: None,
            draining: AtomicBool::new(false),
        }
    }

    /// The same group, ejecting failing backends under `policy`.
    pub fn with_ejection(mut self, policy: Option<EjectPolicy>) -> Self {
        self.ejections = policy.map(|p| Arc::new(Ejections::new(p)));
        self
    }

    /// The same group, ramping new and returning backends up.
    pub fn with_slow_start(mut self, slow_start: Option<SlowStart>) -> Self {
        self.slow_start = slow_start;
        self
    }

    /// This group with `backends` instead: those already members keep
    /// their state; new ones join at `now` (and ramp up under slow start),
    /// with `extra` making their state. The group's settings stay.
    pub fn reshaped(
        &self,
        backends: Vec<Backend>,
        now: Duration,
        mut extra: impl FnMut(&Backend) -> X,
    ) -> Result<Self, MembershipError> {
        // Checked before any newcomer's state is made.
        check_membership(&backends)?;
        let members = backends
            .iter()
            .map(|b| match self.position(b.addr) {
                Some(i) => Arc::clone(&self.members[i]),
                None => Arc::new(Member::new(b.addr, extra(b), Some(now), self.balance)),
            })
            .collect();
        let mut g = GroupRoutes::with_members(self.name.clone(), backends, members, self.balance);
        g.ejections = self.ejections.clone();
        Ok(g.with_slow_start(self.slow_start))
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    pub fn members(&self) -> &[Arc<Member<X>>] {
        &self.members
    }

    pub fn member(&self, backend: usize) -> &Member<X> {
        &self.members[backend]
    }

    /// The caller's state of `backend`.
    pub fn extra(&self, backend: usize) -> &X {
        &self.members[backend].extra
    }

    /// The index of the backend at `addr`, if it is a member.
    pub fn position(&self, addr: SocketAddr) -> Option<usize> {
        self.backends.iter().position(|b| b.addr == addr)
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    pub fn slow_start(&self) -> Option<SlowStart> {
        self.slow_start
    }

    /// Passive ejection's policy, if the group ejects.
    pub fn ejections(&self) -> Option<&Ejections> {
        self.ejections.as_deref()
    }

    /// A failure of `backend`'s own at `now` (see `Ejections::on_failure`):
    /// `Some` when it ejects the backend.
    pub fn on_failure(
        &self,
        backend: usize,
        now: Duration,
        window: impl FnOnce() -> (u64, u64),
    ) -> Option<Ejected> {
        let e = self.ejections.as_ref()?;
        let all = || self.members.iter().map(|m| &m.eject).collect();
        e.on_failure(&self.members[backend].eject, all, now, window)
    }

    /// Backends ejected at `now`.
    pub fn ejected(&self, now: Duration) -> usize {
        eject::out(self.members.iter().map(|m| &m.eject), now)
    }

    /// Whether `backend` is in rotation at `now`: up by its probe and not
    /// ejected.
    pub fn in_rotation(&self, backend: usize, now: Duration) -> bool {
        let m = &self.members[backend];
        m.is_up() && !m.eject.is_ejected(now)
    }

    /// Whether `backend` may take new connections at all: it has a weight
    /// and is not draining.
    pub fn takes_new(&self, backend: usize) -> bool {
        self.backends[backend].weight > 0 && !self.members[backend].is_draining()
    }

    pub fn addr(&self, backend: usize) -> SocketAddr {
        self.backends[backend].addr
    }

    /// The backend the next connection should try first; `key` is the
    /// hash of its client's address (read by `source_hash` only).
    pub fn next_backend(&self, key: u64, now: Duration) -> usize {
        self.choose(self.next.fetch_add(1, Ordering::Relaxed), key, now)
    }

    /// The backend `next_backend` would return, without taking the turn:
    /// for fallback attempts that may never be made.
    pub fn peek_backend(&self, key: u64, now: Duration) -> usize {
        self.choose(self.next.load(Ordering::Relaxed), key, now)
    }

    fn choose(&self, n: u64, key: u64, now: Duration) -> usize {
        let ramping = self.slow_start.is_some_and(|s| self.any_ramping(s, now))
            || self.draining.load(Ordering::Relaxed);
        let chosen = match self.balance {
            Balance::SourceHash => self.maglev.as_ref().map_or(0, |m| m.lookup(key)),
            Balance::RoundRobin if !ramping => {
                self.schedule[(n % self.schedule.len() as u64) as usize] as usize
            }
            Balance::RoundRobin => {
                let size = self.backends.len();
                let at = self.loads(now);
                weighted_draw(size, |i| at(i).weight, spread(n))
            }
            Balance::LeastConnections => {
                least_connections_by(self.backends.len(), self.loads(now), n)
            }
            Balance::PeakEwma(_) => p2c_by(self.backends.len(), self.loads(now), spread(n)),
        };
        if self.members[chosen].is_draining() {
            return self.next_taking(chosen);
        }
        chosen
    }

    /// The first backend after `from` that takes new connections (`from`
    /// itself if none does: the plan leaves it out).
    fn next_taking(&self, from: usize) -> usize {
        let n = self.backends.len();
        (1..n)
            .map(|k| (from + k) % n)
            .find(|&b| self.takes_new(b))
            .unwrap_or(from)
    }

    fn any_ramping(&self, s: SlowStart, now: Duration) -> bool {
        self.members.iter().any(|m| m.ramp(s, now) < 1.0)
    }

    /// Each backend's figures now, for the balancers that weigh load,
    /// without allocating: its cost, open connections and weight, where a
    /// draining backend weighs 0 and slow start scales a ramping one's (in
    /// hundredths, so a ramp has steps finer than a weight of 1). If every
    /// backend drains, the configured weights: the plan leaves them out.
    fn loads(&self, now: Duration) -> impl Fn(usize) -> Load + '_ {
        let scaled = move |i: usize| {
            let (w, m) = (self.backends[i].weight, &self.members[i]);
            match self.slow_start {
                _ if m.is_draining() => 0,
                None => w,
                Some(_) if w == 0 => 0,
                Some(s) => ((f64::from(w) * 100.0 * m.ramp(s, now)) as u32).max(1),
            }
        };
        let any = (0..self.backends.len()).any(|i| scaled(i) > 0);
        move |i| Load {
            cost: self.members[i].ewma.cost(),
            active: self.members[i].active(),
            weight: if any {
                scaled(i)
            } else {
                self.backends[i].weight
            },
        }
    }

    /// Counts a live connection to `backend` until the guard drops.
    pub fn track(&self, backend: usize) -> ActiveGuard<X> {
        let member = Arc::clone(&self.members[backend]);
        member.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard { member }
    }

    /// Counts one more (or one fewer) open connection to `backend`, for
    /// a caller that cannot hold a guard across events (the simulator).
    pub fn opened(&self, backend: usize, open: bool) {
        let active = &self.members[backend].active;
        if open {
            active.fetch_add(1, Ordering::Relaxed);
        } else {
            active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn active(&self, backend: usize) -> u32 {
        self.members[backend].active()
    }

    /// A latency sample of `signal` from `backend` at `now`: `peak_ewma`
    /// balances on it when it is the signal it reads.
    pub fn observe(&self, backend: usize, signal: Signal, rtt: Duration, now: Duration) {
        if let Balance::PeakEwma(e) = self.balance
            && e.signal == signal
        {
            self.members[backend].ewma.observe(rtt, now, e.decay);
        }
    }

    /// `peak_ewma`'s cost of `backend` in microseconds, if it balances so.
    pub fn ewma_cost(&self, backend: usize) -> Option<f64> {
        matches!(self.balance, Balance::PeakEwma(_)).then(|| self.members[backend].ewma.cost())
    }

    /// Marks a backend up or down (from its probe) at `now`. Down backends
    /// are tried only after every up choice; one that comes back up starts
    /// its slow start.
    pub fn set_up(&self, backend: usize, up: bool, now: Duration) {
        self.members[backend].set_up(up, now);
    }

    pub fn is_up(&self, backend: usize) -> bool {
        self.members[backend].is_up()
    }

    /// Drains `backend` (no new connections) or ends its drain.
    pub fn set_draining(&self, backend: usize, draining: bool) {
        self.members[backend]
            .draining
            .store(draining, Ordering::Relaxed);
        let any = self.members.iter().any(|m| m.is_draining());
        self.draining.store(any, Ordering::Relaxed);
    }
}

/// The backends of a group must carry some weight and appear once each.
pub fn check_membership(backends: &[Backend]) -> Result<(), MembershipError> {
    if backends.iter().all(|b| b.weight == 0) {
        return Err(MembershipError::NoWeight);
    }
    for (i, b) in backends.iter().enumerate() {
        if backends[..i].iter().any(|o| o.addr == b.addr) {
            return Err(MembershipError::Duplicate(b.addr));
        }
    }
    Ok(())
}

/// The index `draw` lands on when each of `n` backends takes its
/// weight's share (a backend of weight 0 never does).
fn weighted_draw(n: usize, weight: impl Fn(usize) -> u32, draw: u64) -> usize {
    let total: u64 = (0..n).map(|i| u64::from(weight(i))).sum();
    let mut point = draw % total.max(1);
    for i in 0..n {
        let w = u64::from(weight(i));
        if point < w {
            return i;
        }
        point -= w;
    }
    0
}

/// Decrements a backend's active count when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard<X = ()> {
    member: Arc<Member<X>>,
}

impl<X> Drop for ActiveGuard<X> {
    fn drop(&mut self) {
        self.member.active.fetch_sub(1, Ordering::Relaxed);
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
/// go round-robin from `rotation` so equal backends share evenly. (The
/// balancer calls `least_connections_by`; this form states the rule.)
#[cfg(test)]
pub fn least_connections(active: &[u32], weights: &[u32], rotation: u64) -> usize {
    let load = |i: usize| Load {
        cost: 0.0,
        active: active[i],
        weight: weights[i],
    };
    least_connections_by(active.len(), load, rotation)
}

/// `least_connections` over `n` backends given by `load`, without
/// allocating.
pub fn least_connections_by(n: usize, load: impl Fn(usize) -> Load, rotation: u64) -> usize {
    let start = (rotation % n as u64) as usize;
    let mut best: Option<(usize, Load)> = None;
    for k in 0..n {
        let i = (start + k) % n;
        let l = load(i);
        if l.weight == 0 {
            continue;
        }
        // active[i]/w[i] < active[b]/w[b], without division.
        let better = best.is_none_or(|(_, b)| {
            u64::from(l.active) * u64::from(b.weight) < u64::from(b.active) * u64::from(l.weight)
        });
        if better {
            best = Some((i, l));
        }
    }
    // None weighs anything (every backend drained as we looked): any
    // will do, the plan leaves out those that take nothing.
    best.map_or(start, |(i, _)| i)
}

/// An immutable routing decision table for one listener.
#[derive(Debug)]
pub struct RouteTable<X = ()> {
    /// The primary first, then backups in order.
    pub groups: Arc<[Arc<GroupRoutes<X>>]>,
    pub weights: Weights,
}

/// One upstream connect attempt: group index and backend index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub group: usize,
    pub backend: usize,
}

// === impl RouteTable ===

impl<X> RouteTable<X> {
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
        let first = g.next_backend(key, now);
        let n = g.backends().len();
        for k in 0..n {
            let b = (first + k) % n;
            if g.takes_new(b) {
                push(first_group, b);
            }
        }
        for (gi, g) in self.groups.iter().enumerate() {
            let b = g.peek_backend(key, now);
            if gi != first_group && g.takes_new(b) {
                push(gi, b);
            }
        }
        plan.extend(down);
        plan.truncate(max);
    }
}

/// Holds a listener's current route table; the control loop publishes new
/// weights, the accept path loads the table without locking.
#[derive(Debug)]
pub struct Router<X = ()> {
    table: ArcSwap<RouteTable<X>>,
    tickets: AtomicU64,
}

// === impl Router ===

impl<X> Router<X> {
    /// A router with everything on the primary (the first group).
    pub fn new(groups: Vec<Arc<GroupRoutes<X>>>) -> Self {
        let weights = Weights::all_on_first(groups.len());
        Router {
            table: ArcSwap::from_pointee(RouteTable {
                groups: groups.into(),
                weights,
            }),
            tickets: AtomicU64::new(0),
        }
    }

    pub fn table(&self) -> Arc<RouteTable<X>> {
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
        // In one step with the groups in force: a membership change made
        // meanwhile (`reshape`) is kept, not undone.
        self.table.rcu(|now| RouteTable {
            groups: Arc::clone(&now.groups),
            weights: weights.clone(),
        });
        Ok(())
    }

    /// Replaces group `group` with `routes` (the same group with another
    /// membership), keeping the weights; the very next connection sees
    /// it, established ones keep the table they started with.
    pub fn reshape(&self, group: usize, routes: Arc<GroupRoutes<X>>) {
        self.table.rcu(|current| {
            let mut groups: Vec<_> = current.groups.iter().cloned().collect();
            groups[group] = Arc::clone(&routes);
            RouteTable {
                groups: groups.into(),
                weights: current.weights.clone(),
            }
        });
    }

    /// The plan for the next new connection, from client `key` (the hash
    /// of its address; see `client_key`).
    pub fn plan_next(
        &self,
        max_attempts: usize,
        key: u64,
        now: Duration,
    ) -> (Arc<RouteTable<X>>, Vec<Attempt>) {
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
        primary.set_up(0, false, Duration::ZERO);
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
        primary.set_up(0, false, Duration::ZERO);
        primary.set_up(1, false, Duration::ZERO);
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

    /// A membership change keeps the state of the backends that stay and
    /// starts the new ones fresh; the old table's connections still count.
    #[test]
    fn reshaped_groups_share_the_members_that_stay() {
        let g = GroupRoutes::new("g", backends(&[1, 1]), Balance::LeastConnections);
        let held = g.track(1);
        g.set_up(0, false, Duration::ZERO);
        let mut next = backends(&[1, 1, 1]);
        next.remove(0);
        let r = g.reshaped(next, Duration::from_secs(5), |_| ()).unwrap();
        assert_eq!(r.backends().len(), 2);
        assert_eq!(r.addr(0), g.addr(1));
        assert_eq!(r.active(0), 1, "the open connection still counts");
        drop(held);
        assert_eq!(r.active(0), 0);
        assert!(r.is_up(1), "the newcomer starts up");
        assert_eq!(r.member(1).ramp_from(), Some(Duration::from_secs(5)));
        assert_eq!(r.member(0).ramp_from(), None, "a founding member");
        assert_eq!(
            g.reshaped(backends(&[0, 0]), Duration::ZERO, |_| ()).err(),
            Some(MembershipError::NoWeight)
        );
        let twice = vec![backends(&[1])[0]; 2];
        assert!(matches!(
            g.reshaped(twice, Duration::ZERO, |_| ()),
            Err(MembershipError::Duplicate(_))
        ));
    }

    /// A draining backend's share goes to the others in proportion to
    /// their weights, not all to its neighbour.
    #[test]
    fn a_drained_share_is_spread_by_weight() {
        let g = Arc::new(GroupRoutes::new(
            "g",
            backends(&[1, 1, 1]),
            Balance::RoundRobin,
        ));
        g.set_draining(0, true);
        let mut seen = [0; 3];
        for _ in 0..3000 {
            seen[g.next_backend(0, Duration::ZERO)] += 1;
        }
        assert_eq!(seen[0], 0);
        assert!(
            (1350..1650).contains(&seen[1]) && (1350..1650).contains(&seen[2]),
            "{seen:?}"
        );
        g.set_draining(0, false);
        let order: Vec<usize> = (0..3).map(|_| g.next_backend(0, Duration::ZERO)).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2], "the smooth order again: {order:?}");
    }

    /// A draining backend gets no new connection, not even as a fallback.
    #[test]
    fn draining_backends_are_never_planned() {
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::SourceHash,
        ] {
            let g = Arc::new(GroupRoutes::new("g", backends(&[1, 1, 1]), balance));
            g.set_draining(1, true);
            let router = Router::new(vec![g]);
            for key in 0..50 {
                let plan = router.plan_next(8, key, Duration::ZERO).1;
                assert_eq!(plan.len(), 2, "{balance:?}");
                assert!(plan.iter().all(|a| a.backend != 1), "{balance:?}");
            }
        }
    }

    /// Under slow start a newcomer takes `min_percent` of its weight at
    /// first, then more, then its whole share.
    #[test]
    fn slow_start_ramps_a_newcomer_up() {
        let ramp = SlowStart {
            window: Duration::from_secs(10),
            min_percent: 10,
        };
        let g =
            GroupRoutes::new("g", backends(&[1]), Balance::RoundRobin).with_slow_start(Some(ramp));
        let g = g
            .reshaped(backends(&[1, 1]), Duration::from_secs(100), |_| ())
            .unwrap();
        let share = |at: u64| {
            let now = Duration::from_secs(at);
            let to_new = (0..10_000).filter(|_| g.next_backend(0, now) == 1).count();
            to_new as f64 / 10_000.0
        };
        // Weights 1 : 0.1 give the newcomer 1/11; at half way 1 : 0.55.
        let (start, half, done) = (share(100), share(105), share(110));
        assert!((start - 0.1 / 1.1).abs() < 0.02, "{start}");
        assert!((half - 0.55 / 1.55).abs() < 0.02, "{half}");
        assert!((done - 0.5).abs() < 0.001, "{done}");
    }
}
