//! The discrete-event engine: a virtual clock, one event queue, and the
//! *same* route table, stats and policy engine the proxy runs. Requests
//! arrive from the load model, follow the route table's plan (with the
//! proxy's retries), wait for a worker at their backend (the capacity
//! model), and report latency to the stats exactly as the proxy would.
//! Single-threaded and seeded: the same seed gives the same run.

use super::model::{Arrivals, Sampler};
pub use super::outcome::{DecisionRow, Headline, PhaseStats, TickRow};
use super::outcome::{Observed, headline};
use super::scenario::Scenario;
use crate::core::backend::Backend;
use crate::core::policy::{Action, Decision, Engine, GroupInput, Policy, PolicyState, Reason};
use crate::core::routes::{Attempt, GroupRoutes, Router};
use crate::core::stats::{GroupStats, Signal, WindowConfig, new_histogram};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

/// Seeds of the independent random streams, mixed with the scenario seed.
const ARRIVAL_STREAM: u64 = 0xA11;
const PROBE_STREAM: u64 = 0x9B0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival,
    /// A request's connect attempt ends (refused or timed out) at this time.
    ConnectFailed(u32),
    /// A request finishes service at its backend.
    Done(u32),
    /// Instance `i` of a fleet evaluates (0 without a fleet).
    PolicyTick(u32),
    TimelineTick,
    ProbeTick,
}

struct Req {
    /// The fleet instance that took it (0 without a fleet).
    inst: u32,
    arrival: u64,
    seed: u64,
    plan: Vec<Attempt>,
    attempt: usize,
    /// When the upstream connection was established (ns).
    connected: u64,
    fails: bool,
    degraded: bool,
    live: bool,
}

#[derive(Default)]
struct BackendRt {
    busy: u32,
    queue: VecDeque<u32>,
}

/// How the instances of a simulated fleet decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deciding {
    /// Each on its own window, at its own moment (no fleet mode).
    Alone,
    /// One evaluation on every instance's window merged, applied to all.
    AsFleet,
}

impl Deciding {
    pub fn name(self) -> &'static str {
        match self {
            Deciding::Alone => "local",
            Deciding::AsFleet => "fleet",
        }
    }
}

/// What a run of several instances adds: how each one moved, and how far
/// apart their weights were.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetFigures {
    pub instances: u32,
    pub deciding: Deciding,
    /// Per instance: when it first shifted after the first fault.
    pub first_shift_s: Vec<Option<f64>>,
    /// Per instance: whether it shifted before any fault began (a false
    /// alarm, from a noisy window).
    pub early_shift: Vec<bool>,
    /// Per instance: times traffic went back toward the primary and then
    /// away again.
    pub flaps: Vec<u64>,
    /// The largest gap between two instances' primary shares at a tick,
    /// in percentage points, and its mean over the ticks.
    pub max_spread_pct: f64,
    pub mean_spread_pct: f64,
    /// Ticks at which instances routed differently.
    pub ticks_diverged: u64,
}

/// Everything one run of one policy produced.
#[derive(Debug, Clone)]
pub struct SimRun {
    pub policy: String,
    pub requests: u64,
    pub events: u64,
    /// The event cap stopped the run early.
    pub truncated: bool,
    pub timeline: Vec<TickRow>,
    pub decisions: Vec<DecisionRow>,
    pub headline: Headline,
    /// With `[fleet]`: the instances' figures.
    pub fleet: Option<FleetFigures>,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

fn secs(t: u64) -> f64 {
    t as f64 / 1e9
}

fn dur(t: u64) -> Duration {
    Duration::from_nanos(t)
}

/// Runs `scenario` under `policy` with `seed`; `progress` is told the
/// simulated seconds done after each tick. A scenario with `[fleet]` runs
/// its instances as one fleet.
pub fn run(
    scenario: &Scenario,
    policy: &Policy,
    seed: u64,
    progress: &mut dyn FnMut(f64),
) -> SimRun {
    run_deciding(scenario, policy, seed, Deciding::AsFleet, progress)
}

/// `run`, with the scenario's fleet instances deciding as `deciding` says.
pub fn run_deciding(
    scenario: &Scenario,
    policy: &Policy,
    seed: u64,
    deciding: Deciding,
    progress: &mut dyn FnMut(f64),
) -> SimRun {
    Sim::new(scenario, policy, seed, deciding).run(progress)
}

/// One simulated proxy instance: its own route table, windows and policy
/// state (all instances share the backends).
struct Inst {
    router: Router,
    /// The router's groups, kept for their balancers' latency samples.
    groups: Vec<std::sync::Arc<GroupRoutes>>,
    stats: Vec<GroupStats>,
    pstate: PolicyState,
    /// Open requests per group (connected, not done), for a fleet.
    active: Vec<u64>,
    first_shift: Option<f64>,
    early_shift: bool,
    flaps: u64,
    last_recovered: bool,
}

impl Inst {
    fn new(sc: &Scenario, policy: &Policy, window: WindowConfig) -> Self {
        let groups = routes(sc);
        Inst {
            router: Router::new(groups.clone()),
            groups,
            stats: sc
                .groups
                .iter()
                .map(|g| GroupStats::new(&g.name, g.backends.len(), window, 1))
                .collect(),
            pstate: PolicyState::new(policy, sc.groups.len()),
            active: vec![0; sc.groups.len()],
            first_shift: None,
            early_shift: false,
            flaps: 0,
            last_recovered: false,
        }
    }

    /// A latency sample for `a`'s group's balancer (peak_ewma reads it).
    fn observe(&self, a: Attempt, signal: Signal, rtt: Duration, now: Duration) {
        self.groups[a.group].observe(a.backend, signal, rtt, now);
    }

    /// Notes a decision for the instance's own figures.
    fn note(&mut self, t: f64, d: &Decision, first_fault: Option<f64>) {
        if d.dry_run {
            return;
        }
        match d.action {
            Action::Shift { .. } => {
                let after_fault = first_fault.is_none_or(|f| t >= f);
                if self.first_shift.is_none() && after_fault {
                    self.first_shift = Some(t);
                }
                self.early_shift |= !after_fault;
                if self.last_recovered {
                    self.flaps += 1;
                }
                self.last_recovered = false;
            }
            Action::Recover { .. } => self.last_recovered = true,
            _ => {}
        }
    }
}

struct Sim<'a> {
    sc: &'a Scenario,
    engine: Engine,
    insts: Vec<Inst>,
    deciding: Deciding,
    spreads: Vec<f64>,
    samplers: Vec<Vec<Sampler>>,
    rt: Vec<Vec<BackendRt>>,
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    arrivals: Arrivals,
    probe_rng: Xoshiro256PlusPlus,
    reqs: Vec<Req>,
    free: Vec<u32>,
    window: WindowConfig,
    end: u64,
    // Results.
    requests: u64,
    events_done: u64,
    client: Histogram<u32>,
    tick_client: Histogram<u32>,
    tick_requests: u64,
    tick_errors: u64,
    phases: Vec<(String, Histogram<u32>, u64, u64)>,
    timeline: Vec<TickRow>,
    decisions: Vec<DecisionRow>,
    last_reasons: Vec<Reason>,
    slo_violations: u64,
    client_errors: u64,
    served_by_degraded: u64,
}

impl<'a> Sim<'a> {
    fn new(sc: &'a Scenario, policy: &Policy, seed: u64, deciding: Deciding) -> Self {
        let window = policy
            .window
            .or_else(|| {
                sc.measurement.window.map(|w| WindowConfig {
                    slots: 10,
                    slot: w / 10,
                })
            })
            .unwrap_or_default();
        let phases = phase_names(sc)
            .into_iter()
            .map(|n| (n, new_histogram(), 0, 0))
            .collect();
        Sim {
            sc,
            engine: Engine::new(policy.clone()),
            insts: (0..sc.instances())
                .map(|_| Inst::new(sc, policy, window))
                .collect(),
            deciding,
            spreads: Vec::new(),
            samplers: sc
                .groups
                .iter()
                .map(|g| {
                    g.backends
                        .iter()
                        .map(|b| Sampler::new(&b.latency))
                        .collect()
                })
                .collect(),
            rt: sc
                .groups
                .iter()
                .map(|g| g.backends.iter().map(|_| BackendRt::default()).collect())
                .collect(),
            events: BinaryHeap::new(),
            seq: 0,
            arrivals: Arrivals::new(&sc.load, seed ^ ARRIVAL_STREAM),
            probe_rng: Xoshiro256PlusPlus::seed_from_u64(seed ^ PROBE_STREAM),
            reqs: Vec::new(),
            free: Vec::new(),
            window,
            end: ns(sc.duration),
            requests: 0,
            events_done: 0,
            client: new_histogram(),
            tick_client: new_histogram(),
            tick_requests: 0,
            tick_errors: 0,
            phases,
            timeline: Vec::new(),
            decisions: Vec::new(),
            last_reasons: Vec::new(),
            slo_violations: 0,
            client_errors: 0,
            served_by_degraded: 0,
        }
    }

    fn req(&self, id: u32) -> &Req {
        let r = &self.reqs[id as usize];
        debug_assert!(r.live, "events only name live requests");
        r
    }

    fn req_mut(&mut self, id: u32) -> &mut Req {
        let r = &mut self.reqs[id as usize];
        debug_assert!(r.live, "events only name live requests");
        r
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    fn run(mut self, progress: &mut dyn FnMut(f64)) -> SimRun {
        if let Some(first) = self.arrivals.next(0.0, secs(self.end)) {
            self.push((first * 1e9) as u64, Ev::Arrival);
        }
        // A fleet's instances evaluate at their own moments, spread over
        // the interval; as one fleet, once.
        let n = self.insts.len() as u64;
        let ticks = if self.deciding == Deciding::AsFleet {
            1
        } else {
            n
        };
        for i in 0..ticks {
            let offset = ns(self.engine.policy.interval) * i / n;
            self.push(offset, Ev::PolicyTick(i as u32));
        }
        self.push(ns(self.sc.tick), Ev::TimelineTick);
        if self.sc.measurement.probe_interval.is_some() {
            self.push(0, Ev::ProbeTick);
        }
        let mut truncated = false;
        while let Some(Reverse((t, _, ev))) = self.events.pop() {
            if t > self.end {
                break;
            }
            self.events_done += 1;
            if self.events_done > self.sc.max_events {
                truncated = true;
                break;
            }
            match ev {
                Ev::Arrival => self.arrival(t),
                Ev::ConnectFailed(id) => {
                    self.connect_error(t, id);
                    self.try_connect(t, id);
                }
                Ev::Done(id) => self.done(t, id),
                Ev::PolicyTick(i) => self.policy_tick(t, i as usize),
                Ev::TimelineTick => {
                    self.timeline_tick(t);
                    progress(secs(t));
                }
                Ev::ProbeTick => self.probe_tick(t),
            }
        }
        let headline = self.headline();
        let fleet = (self.insts.len() > 1).then(|| self.fleet_figures());
        SimRun {
            policy: self.engine.policy.name.clone(),
            requests: self.requests,
            events: self.events_done,
            truncated,
            timeline: self.timeline,
            decisions: self.decisions,
            headline,
            fleet,
        }
    }

    fn fleet_figures(&self) -> FleetFigures {
        let ticks = self.spreads.len().max(1) as f64;
        FleetFigures {
            instances: self.insts.len() as u32,
            deciding: self.deciding,
            first_shift_s: self.insts.iter().map(|i| i.first_shift).collect(),
            early_shift: self.insts.iter().map(|i| i.early_shift).collect(),
            flaps: self.insts.iter().map(|i| i.flaps).collect(),
            max_spread_pct: self.spreads.iter().copied().fold(0.0, f64::max),
            mean_spread_pct: self.spreads.iter().sum::<f64>() / ticks,
            ticks_diverged: self.spreads.iter().filter(|s| **s > 0.0).count() as u64,
        }
    }

    fn arrival(&mut self, t: u64) {
        if let Some(next) = self.arrivals.next(secs(t), secs(self.end)) {
            self.push(((next * 1e9) as u64).max(t), Ev::Arrival);
        }
        let seed = self.arrivals.request_seed();
        // Each instance takes a share of the arrivals, as behind ECMP or
        // DNS: picked from the request's own seed, so no stream is drawn
        // and one instance sees exactly what a run without a fleet sees.
        let inst = if self.insts.len() == 1 {
            0
        } else {
            ((seed >> 11) % self.insts.len() as u64) as u32
        };
        self.requests += 1;
        // Slots are reused with their plan buffers: no allocation per request.
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.reqs.push(Req {
                    inst: 0,
                    arrival: 0,
                    seed: 0,
                    plan: Vec::new(),
                    attempt: 0,
                    connected: 0,
                    fails: false,
                    degraded: false,
                    live: false,
                });
                (self.reqs.len() - 1) as u32
            }
        };
        let req = &mut self.reqs[id as usize];
        req.inst = inst;
        // A population of 10,000 clients, each request from one drawn by
        // its seed: what `source_hash` keys on.
        let key = crate::core::routes::client_key(std::net::IpAddr::from(
            ((seed % 10_000) as u32).to_be_bytes(),
        ));
        self.insts[inst as usize].router.plan_next_into(
            self.sc.measurement.connect_attempts as usize,
            (key, dur(t)),
            &mut req.plan,
        );
        (
            req.arrival,
            req.seed,
            req.attempt,
            req.connected,
            req.fails,
            req.degraded,
            req.live,
        ) = (t, seed, 0, 0, false, false, true);
        self.try_connect(t, id);
    }

    /// Connects the request's current attempt at `t`, or moves on.
    fn try_connect(&mut self, t: u64, id: u32) {
        loop {
            let req = self.req_mut(id);
            let Some(&a) = req.plan.get(req.attempt) else {
                self.finish(t, id, None);
                return;
            };
            req.attempt += 1;
            let (refuse, black_hole) = self.fault_blocks(t, a.group, a.backend);
            let full = {
                let b = &self.rt[a.group][a.backend];
                b.busy >= self.sc.groups[a.group].backends[a.backend].workers
                    && b.queue.len() as u32 >= self.sc.groups[a.group].backends[a.backend].queue
            };
            if black_hole {
                self.push(
                    t + ns(self.sc.measurement.connect_timeout),
                    Ev::ConnectFailed(id),
                );
                return;
            }
            if refuse || full {
                self.connect_error(t, id);
                continue;
            }
            let rtt = ns(self.sc.measurement.rtt);
            let inst = self.window_of(self.reqs[id as usize].inst);
            let inst = &mut self.insts[inst];
            inst.stats[a.group].backends[a.backend].record(Signal::Connect, dur(t + rtt), dur(rtt));
            inst.observe(a, Signal::Connect, dur(rtt), dur(t + rtt));
            inst.groups[a.group].opened(a.backend, true);
            inst.active[a.group] += 1;
            let (service, fails, degraded) = self.service(t, id, a);
            let req = self.req_mut(id);
            req.connected = t + rtt;
            req.fails = fails;
            req.degraded = degraded;
            let b = &mut self.rt[a.group][a.backend];
            if b.busy < self.sc.groups[a.group].backends[a.backend].workers {
                b.busy += 1;
                self.push(t + rtt + service, Ev::Done(id));
            } else {
                b.queue.push_back(id);
            }
            return;
        }
    }

    /// Records a failed connect attempt against its backend.
    fn connect_error(&mut self, t: u64, id: u32) {
        let req = self.req(id);
        let a = req.plan[req.attempt - 1];
        self.insts[self.window_of(req.inst)].stats[a.group].backends[a.backend]
            .record_error(Signal::Connect, dur(t));
    }

    /// Refuse / black-hole faults on (group, backend) at `t`.
    fn fault_blocks(&self, t: u64, g: usize, b: usize) -> (bool, bool) {
        let now = dur(t);
        self.sc
            .faults
            .iter()
            .filter(|f| f.hits(g, b) && f.active(now))
            .fold((false, false), |(r, h), f| {
                (r || f.refuse, h || f.black_hole)
            })
    }

    /// Service time (ns), whether the exchange fails, and whether a fault
    /// degraded it. Drawn from the request's own seed and the backend.
    fn service(&self, t: u64, id: u32, a: Attempt) -> (u64, bool, bool) {
        let req = self.req(id);
        let mix = (a.group as u64) << 32 | a.backend as u64;
        let mut rng =
            Xoshiro256PlusPlus::seed_from_u64(req.seed ^ mix.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut s = self.samplers[a.group][a.backend].sample(&mut rng);
        let u: f64 = rng.random();
        let now = dur(t);
        let (mut fails, mut degraded) = (false, false);
        for f in self
            .sc
            .faults
            .iter()
            .filter(|f| f.hits(a.group, a.backend) && f.active(now))
        {
            degraded = true;
            let add = if f.drift {
                let span = (f.until - f.at).as_secs_f64().max(1e-9);
                f.latency_add.as_secs_f64() * ((now - f.at).as_secs_f64() / span).min(1.0)
            } else {
                f.latency_add.as_secs_f64()
            };
            s = s * f.latency_factor + add;
            fails |= u < f.error_rate;
        }
        ((s * 1e9) as u64, fails, degraded)
    }

    fn done(&mut self, t: u64, id: u32) {
        let req = self.req(id);
        let a = req.plan[req.attempt - 1];
        let exchange = dur(t - req.connected);
        let (fails, degraded, inst) = (req.fails, req.degraded, self.window_of(req.inst));
        let inst = &mut self.insts[inst];
        inst.active[a.group] -= 1;
        inst.groups[a.group].opened(a.backend, false);
        let stats = &inst.stats[a.group].backends[a.backend];
        if fails {
            stats.record_error(Signal::Exchange, dur(t));
        } else {
            stats.record(Signal::Exchange, dur(t), exchange);
            inst.observe(a, Signal::Exchange, exchange, dur(t));
            // One request per connection: first_byte equals exchange, so it
            // is recorded only for a policy that reads it.
            if self.engine.policy.signal == Signal::FirstByte {
                stats.record(Signal::FirstByte, dur(t), exchange);
            }
        }
        if degraded {
            self.served_by_degraded += 1;
        }
        // The next waiting request takes the worker.
        let b = &mut self.rt[a.group][a.backend];
        b.busy -= 1;
        if let Some(next) = b.queue.pop_front() {
            b.busy += 1;
            let next_req = self.req(next);
            let (service, _, _) = self.service(next_req.connected, next, a);
            self.push(t + service, Ev::Done(next));
        }
        self.finish(t, id, (!fails).then_some(()));
    }

    /// The client's view of a finished request (None: it failed).
    fn finish(&mut self, t: u64, id: u32, ok: Option<()>) {
        let req = self.req_mut(id);
        req.live = false;
        let arrival = req.arrival;
        self.free.push(id);
        let latency_us = ((t - arrival) / 1000).max(1);
        let phase = phase_of(self.sc, dur(arrival));
        let p = &mut self.phases[phase];
        p.2 += 1;
        self.tick_requests += 1;
        let over = ok.is_none() || dur(t - arrival) > self.sc.slo;
        if over {
            self.slo_violations += 1;
            p.3 += 1;
        }
        match ok {
            Some(()) => {
                let _ = self
                    .client
                    .record(latency_us.min(crate::core::stats::HIGHEST_US));
                let _ = self
                    .tick_client
                    .record(latency_us.min(crate::core::stats::HIGHEST_US));
                let _ = p.1.record(latency_us.min(crate::core::stats::HIGHEST_US));
            }
            None => {
                self.client_errors += 1;
                self.tick_errors += 1;
            }
        }
    }

    /// Instance `i` evaluates; as one fleet, one evaluation on every
    /// instance's window merged, applied to every instance.
    fn policy_tick(&mut self, t: u64, i: usize) {
        let interval = ns(self.engine.policy.interval);
        self.push(t + interval, Ev::PolicyTick(i as u32));
        let inputs = self.inputs(t, i);
        let d = self
            .engine
            .evaluate(dur(t), &inputs, &mut self.insts[i].pstate);
        let first_fault = self
            .sc
            .faults
            .iter()
            .map(|f| f.at.as_secs_f64())
            .reduce(f64::min);
        let applies_to = if self.deciding == Deciding::AsFleet {
            0..self.insts.len()
        } else {
            i..i + 1
        };
        for inst in &mut self.insts[applies_to] {
            if d.changed() && !d.dry_run {
                inst.router
                    .publish(d.weights.clone())
                    .expect("the engine keeps one weight per group");
            }
            inst.note(secs(t), &d, first_fault);
        }
        // The report's decisions and conditions are the first instance's.
        if i == 0 {
            self.last_reasons = d.reasons.clone();
            if d.action != Action::Hold {
                self.decisions.push(decision_row(secs(t), &d));
            }
        }
    }

    /// As one fleet, every instance records into the first instance's
    /// windows: the members' windows merged bucket by bucket are exactly
    /// the window one proxy fed every sample holds (`GroupInput::merge`,
    /// tested so), and one window costs a tenth of ten to read.
    fn windows_shared(&self) -> bool {
        self.insts.len() == 1 || self.deciding == Deciding::AsFleet
    }

    /// The instance whose windows instance `inst`'s samples go into.
    fn window_of(&self, inst: u32) -> usize {
        if self.windows_shared() {
            0
        } else {
            inst as usize
        }
    }

    /// What instance `i`'s policy reads at `t`.
    fn inputs(&self, t: u64, i: usize) -> Vec<GroupInput> {
        // Stale measurements: the policy sees the window as of `stale` ago.
        let seen = dur(t.saturating_sub(ns(self.sc.measurement.stale)));
        let signal = self.engine.policy.signal;
        let inst = &self.insts[i];
        inst.stats
            .iter()
            .zip(&self.rt)
            .enumerate()
            .map(|(g, (s, rt))| {
                let active = if self.windows_shared() {
                    rt.iter()
                        .map(|b| u64::from(b.busy) + b.queue.len() as u64)
                        .sum()
                } else {
                    inst.active[g]
                };
                GroupInput::from_stats(s, signal, seen, self.window.span(), active)
            })
            .collect()
    }

    fn timeline_tick(&mut self, t: u64) {
        self.push(t + ns(self.sc.tick), Ev::TimelineTick);
        let now = dur(t);
        let signal = self.engine.policy.signal;
        let snaps: Vec<_> = (0..self.sc.groups.len())
            .map(|g| {
                let mut d = self.insts[0].stats[g].distribution(signal, now);
                let others = if self.windows_shared() {
                    0
                } else {
                    self.insts.len() - 1
                };
                for inst in &self.insts[1..=others] {
                    let other = inst.stats[g].distribution(signal, now);
                    d.hist
                        .add(&other.hist)
                        .expect("every window has the same bounds");
                    d.failures += other.failures;
                }
                d.snapshot()
            })
            .collect();
        if self.insts.len() > 1 {
            let primary = |i: &Inst| f64::from(i.router.weights().as_slice()[0]) / 100.0;
            let (lo, hi) = self
                .insts
                .iter()
                .map(primary)
                .fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p), hi.max(p)));
            self.spreads.push(hi - lo);
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let client_p99 = if self.tick_client.is_empty() {
            0.0
        } else {
            self.tick_client.value_at_quantile(0.99) as f64 / 1000.0
        };
        self.timeline.push(TickRow {
            t: secs(t),
            weights_pct: self.insts[0]
                .router
                .weights()
                .as_slice()
                .iter()
                .map(|&w| f64::from(w) / 100.0)
                .collect(),
            group_p50_ms: snaps.iter().map(|s| ms(s.p50)).collect(),
            group_p99_ms: snaps.iter().map(|s| ms(s.p99)).collect(),
            requests: self.tick_requests,
            errors: self.tick_errors,
            client_p99_ms: client_p99,
            conditions: self.last_reasons.clone(),
            phase: self.insts[0].pstate.phase.name().to_owned(),
        });
        self.tick_client.reset();
        self.tick_requests = 0;
        self.tick_errors = 0;
    }

    /// Probes every backend: connect time plus one service time, unless a
    /// fault refuses or swallows it; `probe_loss` drops results.
    fn probe_tick(&mut self, t: u64) {
        let interval = ns(self
            .sc
            .measurement
            .probe_interval
            .expect("scheduled only with an interval"));
        self.push(t + interval, Ev::ProbeTick);
        for g in 0..self.sc.groups.len() {
            for b in 0..self.sc.groups[g].backends.len() {
                let lost = self.probe_rng.random::<f64>() < self.sc.measurement.probe_loss;
                let mut rng = Xoshiro256PlusPlus::seed_from_u64(self.probe_rng.random());
                if lost {
                    continue;
                }
                let (refuse, hole) = self.fault_blocks(t, g, b);
                // Every instance probes; they see the same backend.
                let record = |sim: &Self, probe: Option<Duration>| {
                    let probers = if sim.windows_shared() {
                        1
                    } else {
                        sim.insts.len()
                    };
                    for inst in &sim.insts[..probers] {
                        let stats = &inst.stats[g].backends[b];
                        match probe {
                            None => stats.record_error(Signal::Probe, dur(t)),
                            Some(p) => stats.record(Signal::Probe, dur(t) + p, p),
                        }
                    }
                };
                if refuse || hole {
                    record(self, None);
                    continue;
                }
                let mut s = self.samplers[g][b].sample(&mut rng);
                let mut fails = false;
                let u: f64 = rng.random();
                for f in self
                    .sc
                    .faults
                    .iter()
                    .filter(|f| f.hits(g, b) && f.active(dur(t)))
                {
                    s = s * f.latency_factor + f.latency_add.as_secs_f64();
                    // A probe with send/expect fails like any request.
                    fails |= u < f.error_rate;
                }
                if fails {
                    record(self, None);
                    continue;
                }
                let probe = self.sc.measurement.rtt + Duration::from_secs_f64(s);
                record(self, Some(probe));
            }
        }
    }

    fn headline(&self) -> Headline {
        headline(&Observed {
            sc: self.sc,
            decisions: &self.decisions,
            timeline: &self.timeline,
            client: &self.client,
            phases: &self.phases,
            served_by_degraded: self.served_by_degraded,
            slo_violations: self.slo_violations,
            client_errors: self.client_errors,
        })
    }
}

fn decision_row(t: f64, d: &Decision) -> DecisionRow {
    DecisionRow {
        t,
        action: d.action,
        dry_run: d.dry_run,
        rule: d.rule,
        weights_pct: d
            .weights
            .as_slice()
            .iter()
            .map(|&w| f64::from(w) / 100.0)
            .collect(),
        reasons: d.reasons.clone(),
    }
}

/// The scenario's groups as route-table groups. Addresses only name
/// backends; the simulator never connects.
fn routes(sc: &Scenario) -> Vec<std::sync::Arc<GroupRoutes>> {
    sc.groups
        .iter()
        .enumerate()
        .map(|(gi, g)| {
            let backends = (0..g.backends.len())
                .map(|bi| Backend {
                    addr: SocketAddr::from(([127, 0, gi as u8, 1], 10_000 + bi as u16)),
                    weight: 1,
                })
                .collect();
            std::sync::Arc::new(GroupRoutes::new(&g.name, backends, g.balance))
        })
        .collect()
}

/// "before", one phase per fault, "after".
fn phase_names(sc: &Scenario) -> Vec<String> {
    let mut names = vec!["before".to_string()];
    names.extend(
        sc.faults
            .iter()
            .enumerate()
            .map(|(i, f)| format!("fault {} ({})", i + 1, f.target)),
    );
    names.push("after".into());
    names
}

/// The phase a request that arrived at `t` belongs to.
fn phase_of(sc: &Scenario, t: Duration) -> usize {
    if let Some(i) = sc.faults.iter().position(|f| t >= f.at && t < f.until) {
        return i + 1;
    }
    if sc.faults.iter().all(|f| t < f.at) {
        0
    } else {
        sc.faults.len() + 1
    }
}

/// The arrival times a run of `scenario` with `seed` sees: the same stream
/// the engine draws from, so a live rehearsal can replay them exactly.
pub fn arrival_times(scenario: &Scenario, seed: u64) -> Vec<Duration> {
    let mut a = Arrivals::new(&scenario.load, seed ^ ARRIVAL_STREAM);
    let end = scenario.duration.as_secs_f64();
    let mut out = Vec::new();
    let mut t = 0.0;
    while let Some(next) = a.next(t, end) {
        out.push(Duration::from_secs_f64(next));
        let _ = a.request_seed();
        t = next;
    }
    out
}
