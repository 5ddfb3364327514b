//! What a listener carries across a binary upgrade: the weights in force,
//! an operator's pin and pause, the policy engine's state and its recent
//! decisions. The stats windows are not carried: the new process starts
//! them empty and the policy holds until they fill (a policy's
//! `min_samples` already says what "filled" means).

use crate::core::policy::{Policy, PolicyState};
use crate::core::routes::Weights;
use crate::decision_record::DecisionRecord;
use crate::proxy::fleet::StateRecord;
use crate::proxy::state::ListenerState;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// One listener's state as the old process hands it over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerHandover {
    pub listener: String,
    /// The groups, in order: the state applies only to the same groups.
    pub groups: Vec<String>,
    /// The weights in force (a pin's, while pinned).
    pub weights_bp: Vec<u16>,
    pub pin_bp: Option<Vec<u16>>,
    pub paused: bool,
    /// The policy's name and the engine's state, once it has evaluated.
    pub policy: Option<String>,
    pub state: Option<StateRecord>,
    /// The latest decisions that moved traffic, oldest first.
    pub decisions: Vec<DecisionRecord>,
}

/// The upgrade's hold on one listener: the engine's latest state (for an
/// offer), the state inherited from the old process (for the policy loop's
/// start), and the freeze that keeps the policy from moving traffic while
/// a new process takes over.
#[derive(Debug, Default)]
pub struct Carried {
    latest: Mutex<Option<PolicyState>>,
    inherited: Mutex<Option<(StateRecord, Instant)>>,
    frozen: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Carried {
    /// The policy loop's state after each evaluation.
    pub fn publish(&self, s: &PolicyState) {
        *lock(&self.latest) = Some(s.clone());
    }

    /// While frozen, the policy loop evaluates nothing: the state on
    /// offer stays the state in force.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Relaxed);
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Relaxed)
    }

    /// The inherited state as this process's engine continues it at
    /// `now`; `None` without one, or when it does not fit `policy`.
    pub fn take_inherited(&self, policy: &Policy, now: Duration) -> Option<PolicyState> {
        let (record, received) = lock(&self.inherited).take()?;
        let weights = Weights::new(record.weights_bp.clone()).ok()?;
        record.state(policy, weights, now, received.elapsed())
    }
}

impl ListenerHandover {
    /// `s`'s state now, to hand over.
    pub fn of(s: &ListenerState) -> Self {
        let now = s.clock.now();
        let state = lock(&s.carried.latest)
            .as_ref()
            .map(|p| StateRecord::of(p, now));
        ListenerHandover {
            listener: s.name.clone(),
            groups: s.group_names(),
            weights_bp: s.router.weights().as_slice().to_vec(),
            pin_bp: s.pinned().map(|w| w.as_slice().to_vec()),
            paused: s.is_paused(),
            policy: s.policy().map(|p| p.name.clone()),
            state,
            decisions: s.decisions.since(0).into_iter().map(|(_, d)| d).collect(),
        }
    }

    /// Takes this state into `s`, before its loops start. A listener whose
    /// groups changed starts fresh: the old weights would mean other
    /// groups. The engine's state is taken only by the same policy.
    pub fn apply(self, s: &ListenerState) {
        if self.groups != s.group_names() {
            warn!(listener = %s.name, old_groups = ?self.groups, "the old process's weights name other groups; this listener starts fresh");
            return;
        }
        let weights = Weights::new(self.weights_bp.clone());
        if let Ok(w) = weights {
            s.router
                .publish(w)
                .expect("the group count was just checked");
            s.route_metrics.weights(s.router.weights().as_slice());
        }
        if let Some(Ok(pin)) = self.pin_bp.map(Weights::new) {
            let _ = s.pin(pin);
        }
        if s.policy().is_some() {
            s.set_paused(self.paused);
        }
        let same_policy = s.policy().map(|p| &p.name) == self.policy.as_ref();
        match self.state {
            Some(record) if same_policy => {
                *lock(&s.carried.inherited) = Some((record, Instant::now()));
            }
            Some(_) => {
                info!(listener = %s.name, "the policy changed with the upgrade; its state starts fresh")
            }
            None => {}
        }
        for d in self.decisions {
            s.decisions.push(d);
        }
        info!(listener = %s.name, weights = ?s.router.weights().as_slice(), pinned = s.pinned().is_some(), paused = s.is_paused(), "carried over from the old process");
    }
}
