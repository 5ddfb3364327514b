//! The policy engine: `Engine::evaluate(now, inputs, state) -> Decision`.
//!
//! Pure: it reads the windowed statistics it is handed and the state it
//! kept, and returns the new weights with the reasons. The control loop (the
//! shell) and the simulator call exactly this code. Two modes:
//!
//! - `failover`: while the primary trips, move `step` of traffic per
//!   evaluation to the first eligible backup (never into a worse group),
//!   cascading when a backup trips too; once the primary meets the lower
//!   recovery bar for `for`, move traffic back in its own steps.
//! - `canary`: ramp the first backup (the canary) through steps while it
//!   stays within bounds relative to the primary (the baseline); roll back
//!   on its own when it does not; finish promoted.

mod canary;
mod failover;
mod input;
mod rule;
mod verdict;

pub use input::GroupInput;
pub use rule::{Condition, Rule, Unit};
pub use verdict::{BadCounter, Verdict};

use crate::core::routes::{TOTAL_BP, Weights};
use crate::core::stats::Signal;
use std::time::Duration;

/// A quantile a condition reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantile {
    P50,
    P90,
    P99,
    P999,
}

impl Quantile {
    pub const ALL: [Quantile; 4] = [Quantile::P50, Quantile::P90, Quantile::P99, Quantile::P999];

    pub fn fraction(self) -> f64 {
        match self {
            Quantile::P50 => 0.5,
            Quantile::P90 => 0.9,
            Quantile::P99 => 0.99,
            Quantile::P999 => 0.999,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Quantile::P50 => "p50",
            Quantile::P90 => "p90",
            Quantile::P99 => "p99",
            Quantile::P999 => "p999",
        }
    }
}

/// What an evaluation without enough data counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoData {
    /// Neither good nor bad: counters and timers stay as they are.
    #[default]
    Hold,
    /// Counts as a good evaluation. (Silence never counts as bad.)
    Good,
}

/// How bad evaluations add up to a trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// N bad evaluations in a row.
    Consecutive(u32),
    /// M bad among the last N evaluations (N at most 64).
    BadOfLast { bad: u32, of: u32 },
}

/// Conditions that make one evaluation of a group bad; any one suffices.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trip {
    /// Quantile of the policy's signal above an absolute threshold.
    pub above: Vec<(Quantile, Duration)>,
    pub error_rate_above: Option<f64>,
    /// Quantile above k × the same quantile of the backup.
    pub worse_than_backup: Option<f64>,
    pub relative_quantile: Option<Quantile>,
    pub active_connections_above: Option<u64>,
    pub new_connections_per_second_above: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shift {
    pub step_bp: u32,
    pub max_bp: u32,
    pub cooldown: Duration,
}

/// The lower bar the primary must hold for `hold` before traffic returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Recover {
    pub below: Vec<(Quantile, Duration)>,
    pub error_rate_below: Option<f64>,
    pub hold: Duration,
    pub step_bp: u32,
    pub cooldown: Duration,
    /// Probe samples that suffice when the primary has too little traffic.
    pub probe_min_samples: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    /// Canary share per stage, ascending, the last 10000.
    pub steps_bp: Vec<u32>,
    pub hold: Duration,
    /// Canary quantile at most this many times the baseline's.
    pub max_ratio: f64,
    pub quantile: Quantile,
    /// Canary error rate may exceed the baseline's by at most this much.
    pub max_error_rate_increase: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Failover { shift: Shift, recover: Recover },
    Canary(Canary),
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub interval: Duration,
    /// The sliding window this policy reads; `None`: the config's `[stats]`.
    pub window: Option<crate::core::stats::WindowConfig>,
    pub signal: Signal,
    pub min_samples: u64,
    pub no_data: NoData,
    pub dry_run: bool,
    pub trip: Trip,
    pub counting: Counting,
    pub mode: Mode,
}

/// Where a listener stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// All traffic on the primary, nothing tripped.
    Healthy,
    /// The primary is tripped.
    Tripped,
    /// Traffic is off the primary and it is not (yet) healthy enough to return.
    Shifted,
    /// Traffic is off the primary and the primary is holding the recovery bar.
    Recovering,
    /// Canary at stage `n` (0-based).
    CanaryStage(usize),
    CanaryRolledBack,
    CanaryPromoted,
}

impl Phase {
    /// Every state name, for the state gauge.
    pub const NAMES: [&'static str; 7] = [
        "healthy",
        "tripped",
        "shifted",
        "recovering",
        "canary_ramping",
        "canary_rolled_back",
        "canary_promoted",
    ];

    /// The phase named `name` (as `name()` gives it); `stage` is the
    /// canary stage for `canary_ramping`.
    pub fn from_name(name: &str, stage: usize) -> Option<Phase> {
        Some(match name {
            "healthy" => Phase::Healthy,
            "tripped" => Phase::Tripped,
            "shifted" => Phase::Shifted,
            "recovering" => Phase::Recovering,
            "canary_ramping" => Phase::CanaryStage(stage),
            "canary_rolled_back" => Phase::CanaryRolledBack,
            "canary_promoted" => Phase::CanaryPromoted,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Healthy => "healthy",
            Phase::Tripped => "tripped",
            Phase::Shifted => "shifted",
            Phase::Recovering => "recovering",
            Phase::CanaryStage(_) => "canary_ramping",
            Phase::CanaryRolledBack => "canary_rolled_back",
            Phase::CanaryPromoted => "canary_promoted",
        }
    }
}

/// What an evaluation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Hold,
    /// Moved `bp` from group `from` to group `to` because `from` tripped.
    Shift {
        from: usize,
        to: usize,
        bp: u32,
    },
    /// Moved `bp` back toward the primary.
    Recover {
        from: usize,
        to: usize,
        bp: u32,
    },
    CanaryAdvance {
        stage: usize,
    },
    CanaryRollback,
    CanaryPromote,
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Hold => "hold",
            Action::Shift { .. } => "shift",
            Action::Recover { .. } => "recover",
            Action::CanaryAdvance { .. } => "canary_advance",
            Action::CanaryRollback => "canary_rollback",
            Action::CanaryPromote => "canary_promote",
        }
    }
}

/// Why: one measured value against its threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    /// The condition checked (its label is the config key, e.g.
    /// `p99_above`, `error_rate_above`, `recover.p99_below`).
    pub rule: Condition,
    /// Index of the group measured.
    pub group: usize,
    /// Measured value (seconds for latency, ratio for rates; +inf when the
    /// quantile falls among failures).
    pub value: f64,
    pub threshold: f64,
    /// True when this condition was breached (for trip rules) or met (for
    /// recovery rules).
    pub fired: bool,
}

/// One evaluation's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub at: Duration,
    pub action: Action,
    pub previous: Weights,
    pub weights: Weights,
    pub phase: Phase,
    /// The rule that drove the action (`Rule::Hold` when nothing moved).
    pub rule: Rule,
    pub reasons: Vec<Reason>,
    /// Bad evaluations counted toward the trip of the primary, and the
    /// count that trips it.
    pub bad: u32,
    pub bad_needed: u32,
    pub dry_run: bool,
}

impl Decision {
    pub fn changed(&self) -> bool {
        self.previous != self.weights
    }
}

/// What the engine remembers between evaluations.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyState {
    /// The engine's weights: applied ones, or in dry-run those it would
    /// have applied.
    pub weights: Weights,
    pub bad: Vec<BadCounter>,
    pub last_change: Option<Duration>,
    pub healthy_since: Option<Duration>,
    pub stage: usize,
    pub stage_since: Option<Duration>,
    pub phase: Phase,
}

impl PolicyState {
    pub fn new(policy: &Policy, groups: usize) -> Self {
        assert!(groups >= 1, "a listener has a primary");
        PolicyState {
            weights: Weights::all_on_first(groups),
            bad: (0..groups)
                .map(|_| BadCounter::new(policy.counting))
                .collect(),
            last_change: None,
            healthy_since: None,
            stage: 0,
            stage_since: None,
            phase: match policy.mode {
                Mode::Failover { .. } => Phase::Healthy,
                Mode::Canary(_) => Phase::CanaryStage(0),
            },
        }
    }
}

/// Runs one policy.
#[derive(Debug, Clone)]
pub struct Engine {
    pub policy: Policy,
}

impl Engine {
    pub fn new(policy: Policy) -> Self {
        Engine { policy }
    }

    /// One evaluation at `now` over `inputs` (one per group, primary
    /// first). Updates `state` and returns the decision with its reasons.
    pub fn evaluate(
        &self,
        now: Duration,
        inputs: &[GroupInput],
        state: &mut PolicyState,
    ) -> Decision {
        assert_eq!(
            inputs.len(),
            state.weights.as_slice().len(),
            "one input per group"
        );
        let previous = state.weights.clone();
        let mut d = match &self.policy.mode {
            Mode::Failover { shift, recover } => {
                failover::evaluate(&self.policy, shift, recover, now, inputs, state)
            }
            Mode::Canary(c) => canary::evaluate(&self.policy, c, now, inputs, state),
        };
        let sum: u32 = state.weights.as_slice().iter().map(|&w| u32::from(w)).sum();
        assert_eq!(sum, TOTAL_BP, "weights always sum to 10000");
        if state.weights != previous {
            state.last_change = Some(now);
        }
        d.previous = previous;
        d.weights = state.weights.clone();
        d.phase = state.phase;
        d.dry_run = self.policy.dry_run;
        d.at = now;
        d
    }
}

/// Moves up to `bp` from group `from` to group `to`; returns what moved.
pub(crate) fn move_weight(weights: &mut Weights, from: usize, to: usize, bp: u32) -> u32 {
    let mut w: Vec<u16> = weights.as_slice().to_vec();
    let moved = bp.min(u32::from(w[from]));
    w[from] -= moved as u16;
    w[to] += moved as u16;
    *weights = Weights::new(w).expect("moving weight keeps the sum");
    moved
}

/// A decision shell the modes fill in; `Engine::evaluate` completes it.
pub(crate) fn decision(
    action: Action,
    rule: Rule,
    reasons: Vec<Reason>,
    bad: u32,
    bad_needed: u32,
) -> Decision {
    Decision {
        at: Duration::ZERO,
        action,
        previous: Weights::all_on_first(1),
        weights: Weights::all_on_first(1),
        phase: Phase::Healthy,
        rule,
        reasons,
        bad,
        bad_needed,
        dry_run: false,
    }
}

#[cfg(test)]
mod tests;
