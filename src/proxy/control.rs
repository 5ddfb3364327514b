//! The control loop: one task per listener with a policy. Every `interval`
//! it reads the listener's windows, asks the pure engine, publishes the new
//! weights through the route table's atomic swap (unless dry-run), and
//! reports the decision to tracing, the audit log and metrics.
//!
//! In a fleet, the loop does what `core::fleet::Standing` says: the leader
//! evaluates on every member's windows merged and writes the result for
//! all; a follower applies what the leader wrote (the fleet's watch does
//! that) and evaluates nothing; a member whose fleet weights are stale
//! evaluates alone, as without a fleet.

use super::audit::AuditLog;
use super::fleet::{Commit, Fleet};
use super::state::ListenerState;
use crate::core::fleet::Duty;
use crate::core::policy::{Action, Decision, Engine, Phase, Policy, PolicyState};
use crate::decision_record::DecisionRecord;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Every value of the state gauge: the engine's phases plus the operator's.
pub(super) const STATES: [&str; 9] = [
    Phase::NAMES[0],
    Phase::NAMES[1],
    Phase::NAMES[2],
    Phase::NAMES[3],
    Phase::NAMES[4],
    Phase::NAMES[5],
    Phase::NAMES[6],
    "paused",
    "pinned",
];

/// One listener's loop: the engine, its state, and what it last did.
struct Loop {
    state: Arc<ListenerState>,
    engine: Engine,
    pstate: PolicyState,
    audit: Arc<AuditLog>,
    fleet: Option<Arc<Fleet>>,
    steering: u64,
    /// The duty and leader term of the previous evaluation: a change means
    /// the policy state is taken over from the fleet's record.
    duty: Option<(Duty, u64)>,
}

pub async fn run(
    state: Arc<ListenerState>,
    policy: Policy,
    audit: Arc<AuditLog>,
    fleet: Option<Arc<Fleet>>,
    stop: CancellationToken,
) {
    let engine = Engine::new(policy);
    // After a binary upgrade, the engine continues where the old process
    // left off.
    let pstate = state
        .carried
        .take_inherited(&engine.policy, state.clock.now())
        .unwrap_or_else(|| PolicyState::new(&engine.policy, state.group_count()));
    state
        .route_metrics
        .register_decisions(&engine.policy.rules(), engine.policy.dry_run);
    if fleet.is_some() {
        crate::telemetry::fleet::register_listener(&state.unit);
    }
    let mut tick = tokio::time::interval(engine.policy.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    info!(listener = %state.name, policy = %engine.policy.name, dry_run = engine.policy.dry_run, fleet = fleet.is_some(), "policy loop started");
    let mut l = Loop {
        steering: state.steering_generation(),
        state,
        engine,
        pstate,
        audit,
        fleet,
        duty: None,
    };
    l.state.carried.publish(&l.pstate);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        l.tick().await;
    }
}

impl Loop {
    async fn tick(&mut self) {
        // A binary upgrade is taking this state over: nothing may move.
        if self.state.carried.is_frozen() {
            return;
        }
        self.evaluate().await;
        self.state.carried.publish(&self.pstate);
    }

    async fn evaluate(&mut self) {
        let now = self.state.clock.now();
        if let Some(f) = &self.fleet {
            crate::telemetry::fleet::weights_age(
                &self.state.unit,
                f.weights_age(&self.state.name, now),
            );
        }
        // An operator's pin or pause suspends the policy.
        let suspended = if self.state.pinned().is_some() {
            Some("pinned")
        } else {
            self.state.is_paused().then_some("paused")
        };
        if let Some(why) = suspended {
            self.state.route_metrics.state(why, &STATES);
            self.state.decisions.set_phase(why);
            self.heartbeat().await;
            return;
        }
        // After a pin or release, the weights in force are the policy's own.
        let generation = self.state.steering_generation();
        if generation != self.steering {
            self.steering = generation;
            self.pstate.weights = self.state.router.weights();
            self.pstate.last_change = Some(now);
            self.pstate.healthy_since = None;
        }
        let duty = match &self.fleet {
            None => Duty::Alone,
            Some(f) => f.standing(&self.state.name).duty(now, f.cfg.stale_after),
        };
        self.take_over(duty, now);
        match duty {
            Duty::Follow => {}
            Duty::Alone => {
                if self.fleet.is_some() {
                    crate::telemetry::fleet::local_decision(&self.state.unit);
                }
                let inputs = self.state.policy_inputs(self.engine.policy.signal, now);
                let d = self.engine.evaluate(now, &inputs, &mut self.pstate);
                self.apply(&d);
            }
            Duty::Lead => self.lead(now).await,
        }
    }

    /// On a change of duty or of leader term, continues from the state the
    /// fleet last wrote (if it fits), so a new leader does not restart a
    /// cooldown or a trip count, and logs the change.
    fn take_over(&mut self, duty: Duty, now: Duration) {
        let Some(f) = &self.fleet else { return };
        let key = (duty, f.term());
        if self.duty == Some(key) {
            return;
        }
        let first = self.duty.is_none();
        self.duty = Some(key);
        if let Some(s) = f.adopt(&self.state.name, &self.engine.policy, now) {
            self.pstate = s;
        } else {
            // As after a pin: the weights in force are the policy's own.
            self.pstate.weights = self.state.router.weights();
            self.pstate.last_change = Some(now);
            self.pstate.healthy_since = None;
        }
        let name = &self.state.name;
        match duty {
            Duty::Lead => {
                info!(listener = %name, "leading the fleet's decisions for this listener")
            }
            Duty::Follow if !first => {
                info!(listener = %name, "following the fleet's weights again")
            }
            Duty::Follow => {}
            Duty::Alone => {
                warn!(listener = %name, stale_after = ?f.cfg.stale_after, "the fleet's weights are stale: deciding on this member's own window until the fleet answers")
            }
        }
    }

    /// One fleet-wide evaluation: merged windows, one decision, written for
    /// every member. A write etcd refuses or cannot take leaves the state
    /// as it was (nothing applied anywhere), unless the fleet's weights
    /// are stale, when the decision applies here alone.
    async fn lead(&mut self, now: Duration) {
        let f = Arc::clone(self.fleet.as_ref().expect("only a fleet member leads"));
        let policy = &self.engine.policy;
        let g = f
            .gather(&self.state, policy.signal, now, policy.interval)
            .await;
        let before = self.pstate.clone();
        let d = self.engine.evaluate(now, &g.inputs, &mut self.pstate);
        let record = (d.action != Action::Hold).then(|| self.record(&d));
        match f
            .commit(&self.state, &self.pstate, Some(&d), record.as_ref(), &g)
            .await
        {
            Commit::Written | Commit::Unchanged => self.apply_recorded(&d, record),
            Commit::Unreachable
                if f.standing(&self.state.name)
                    .may_apply_alone(now, f.cfg.stale_after) =>
            {
                crate::telemetry::fleet::local_decision(&self.state.unit);
                self.apply_recorded(&d, record);
            }
            Commit::Unreachable | Commit::NotLeader => self.pstate = before,
        }
    }

    /// While suspended, a leader still tells the fleet its weights are
    /// current, so members do not fall back to deciding alone.
    async fn heartbeat(&mut self) {
        let Some(f) = &self.fleet else { return };
        if !f.standing(&self.state.name).leader {
            return;
        }
        let g = super::fleet::Gathered {
            inputs: Vec::new(),
            merged: vec![f.member.clone()],
            missing: Vec::new(),
        };
        let _ = f.commit(&self.state, &self.pstate, None, None, &g).await;
    }

    fn record(&self, d: &Decision) -> DecisionRecord {
        let names: Vec<String> = self.state.group_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        DecisionRecord::of(d, &self.state.name, &self.engine.policy.name, &names, time)
    }

    fn apply(&self, d: &Decision) {
        let record = (d.action != Action::Hold).then(|| self.record(d));
        self.apply_recorded(d, record);
    }

    /// Publishes the decision's weights here (unless dry-run) and reports
    /// it.
    fn apply_recorded(&self, d: &Decision, record: Option<DecisionRecord>) {
        let state = &self.state;
        if d.changed() && !d.dry_run {
            state
                .router
                .publish(d.weights.clone())
                .expect("the engine keeps one weight per group, summing to 10000");
            state.route_metrics.weights(d.weights.as_slice());
        }
        state.route_metrics.state(d.phase.name(), &STATES);
        state.decisions.set_phase(d.phase.name());
        match record {
            None => {
                debug!(listener = %state.name, phase = d.phase.name(), bad = d.bad, needed = d.bad_needed, "policy holds")
            }
            Some(r) => report(state, d, r, &self.audit),
        }
    }
}

fn report(state: &ListenerState, d: &Decision, record: DecisionRecord, audit: &AuditLog) {
    state
        .route_metrics
        .decision(&record.action, &record.rule, d.dry_run);
    let verb = if d.dry_run {
        "policy would move traffic (dry-run)"
    } else {
        "policy moved traffic"
    };
    let reasons = serde_json::to_string(&record.reasons).unwrap_or_default();
    info!(
        listener = %state.name,
        action = %record.action,
        rule = %record.rule,
        from = %record.from,
        to = %record.to,
        reasons = %reasons,
        "{verb}"
    );
    audit.append(&serde_json::to_value(&record).expect("a decision record serializes"));
    state.decisions.push(record);
}
