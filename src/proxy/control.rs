//! The control loop: one task per listener with a policy. Every `interval`
//! it reads the listener's windows, asks the pure engine, publishes the new
//! weights through the route table's atomic swap (unless dry-run), and
//! reports the decision to tracing, the audit log and metrics.

use super::audit::AuditLog;
use super::state::ListenerState;
use crate::core::policy::{Action, Decision, Engine, Phase, Policy, PolicyState};
use crate::decision_record::DecisionRecord;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Every value of the state gauge: the engine's phases plus the operator's.
const STATES: [&str; 9] = [
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

pub async fn run(
    state: Arc<ListenerState>,
    policy: Policy,
    audit: Arc<AuditLog>,
    stop: CancellationToken,
) {
    let engine = Engine::new(policy);
    let mut pstate = PolicyState::new(&engine.policy, state.stats.len());
    state
        .route_metrics
        .register_decisions(&engine.policy.rules(), engine.policy.dry_run);
    let mut steering = state.steering_generation();
    let mut tick = tokio::time::interval(engine.policy.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    info!(listener = %state.name, policy = %engine.policy.name, dry_run = engine.policy.dry_run, "policy loop started");
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = state.clock.now();
        // An operator's pin or pause suspends the policy.
        let suspended = if state.pinned().is_some() {
            Some("pinned")
        } else {
            state.is_paused().then_some("paused")
        };
        if let Some(why) = suspended {
            state.route_metrics.state(why, &STATES);
            state.decisions.set_phase(why);
            continue;
        }
        // After a pin or release, the weights in force are the policy's own.
        let generation = state.steering_generation();
        if generation != steering {
            steering = generation;
            pstate.weights = state.router.weights();
            pstate.last_change = Some(now);
            pstate.healthy_since = None;
        }
        let inputs = state.policy_inputs(engine.policy.signal, now);
        let d = engine.evaluate(now, &inputs, &mut pstate);
        if d.changed() && !d.dry_run {
            state
                .router
                .publish(d.weights.clone())
                .expect("the engine keeps one weight per group, summing to 10000");
            state.route_metrics.weights(d.weights.as_slice());
        }
        state.route_metrics.state(d.phase.name(), &STATES);
        state.decisions.set_phase(d.phase.name());
        if d.action == Action::Hold {
            debug!(listener = %state.name, phase = d.phase.name(), bad = d.bad, needed = d.bad_needed, "policy holds");
            continue;
        }
        report(&state, &engine.policy, &d, &audit);
    }
}

fn report(state: &ListenerState, policy: &Policy, d: &Decision, audit: &AuditLog) {
    let names: Vec<&str> = state.stats.iter().map(|g| g.name.as_str()).collect();
    let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let record = DecisionRecord::of(d, &state.name, &policy.name, &names, time);
    state
        .route_metrics
        .decision(record.action, &record.rule, d.dry_run);
    let verb = if d.dry_run {
        "policy would move traffic (dry-run)"
    } else {
        "policy moved traffic"
    };
    let reasons = serde_json::to_string(&record.reasons).unwrap_or_default();
    info!(
        listener = %state.name,
        action = record.action,
        rule = %record.rule,
        from = %record.from,
        to = %record.to,
        reasons = %reasons,
        "{verb}"
    );
    audit.append(&serde_json::to_value(&record).expect("a decision record serializes"));
    state.decisions.push(record);
}
