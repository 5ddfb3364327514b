//! The control loop: one task per listener with a policy. Every `interval`
//! it reads the listener's windows, asks the pure engine, publishes the new
//! weights through the route table's atomic swap (unless dry-run), and
//! reports the decision to tracing, the audit log and metrics.

use super::audit::AuditLog;
use super::state::ListenerState;
use crate::core::policy::{Action, Decision, Engine, Phase, Policy, PolicyState};
use serde_json::{Map, Value, json};
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
        .register_decisions(&possible_decisions(&engine.policy), engine.policy.dry_run);
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
    let shares = |w: &[u16]| -> Value {
        let m: Map<String, Value> = names
            .iter()
            .zip(w)
            .map(|(n, &bp)| ((*n).to_owned(), json!(f64::from(bp) / 100.0)))
            .collect();
        Value::Object(m)
    };
    let reasons: Vec<Value> = d
        .reasons
        .iter()
        .map(|r| {
            json!({
                "rule": r.rule,
                "group": names.get(r.group).copied().unwrap_or("?"),
                "value": if r.value.is_finite() { json!(r.value) } else { json!("failing") },
                "threshold": r.threshold,
                "fired": r.fired,
            })
        })
        .collect();
    let record = json!({
        "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "uptime_s": d.at.as_secs_f64(),
        "listener": state.name,
        "policy": policy.name,
        "action": d.action.name(),
        "rule": d.rule,
        "dry_run": d.dry_run,
        "phase": d.phase.name(),
        "from": shares(d.previous.as_slice()),
        "to": shares(d.weights.as_slice()),
        "bad": d.bad,
        "needed": d.bad_needed,
        "reasons": reasons,
    });
    state
        .route_metrics
        .decision(d.action.name(), &d.rule, d.dry_run);
    let verb = if d.dry_run {
        "policy would move traffic (dry-run)"
    } else {
        "policy moved traffic"
    };
    info!(
        listener = %state.name,
        action = d.action.name(),
        rule = %d.rule,
        from = %record["from"],
        to = %record["to"],
        reasons = %record["reasons"],
        "{verb}"
    );
    audit.append(&record);
    state.decisions.push(record);
}

/// Every (action, rule) pair `policy` can report: a short, fixed list per
/// policy, registered up front so dashboards see the first decision.
fn possible_decisions(policy: &Policy) -> Vec<(&'static str, String)> {
    let t = &policy.trip;
    let mut trip_rules: Vec<String> = t
        .above
        .iter()
        .map(|(q, _)| format!("{}_above", q.name()))
        .collect();
    let optional = [
        (t.error_rate_above.is_some(), "error_rate_above"),
        (t.worse_than_backup.is_some(), "worse_than_backup"),
        (
            t.active_connections_above.is_some(),
            "active_connections_above",
        ),
        (
            t.new_connections_per_second_above.is_some(),
            "new_connections_per_second_above",
        ),
    ];
    trip_rules.extend(
        optional
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, r)| (*r).to_owned()),
    );
    match &policy.mode {
        crate::core::policy::Mode::Failover { .. } => {
            let mut out: Vec<(&'static str, String)> =
                trip_rules.iter().map(|r| ("shift", r.clone())).collect();
            out.extend(trip_rules.iter().map(|r| ("shift", format!("cascade.{r}"))));
            out.push(("recover", "recover".into()));
            out
        }
        crate::core::policy::Mode::Canary(c) => {
            let mut out = vec![
                ("canary_advance", "canary.step".to_string()),
                ("canary_promote", "canary.promote".to_string()),
            ];
            out.push((
                "canary_rollback",
                format!("canary.{}_ratio_above", c.quantile.name()),
            ));
            out.push(("canary_rollback", "canary.error_rate_increase_above".into()));
            out.extend(
                trip_rules
                    .iter()
                    .map(|r| ("canary_rollback", format!("canary.{r}"))),
            );
            out
        }
    }
}
