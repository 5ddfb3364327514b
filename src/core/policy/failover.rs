//! Failover mode: shift away from a tripped primary step by step, cascade
//! past a backup that trips too, and return gradually once the primary
//! holds the recovery bar.

use super::verdict::{self, Verdict};
use super::{
    Action, Condition, Decision, GroupInput, Phase, Policy, PolicyState, Reason, Recover, Rule,
    Shift, decision, move_weight,
};
use crate::core::routes::TOTAL_BP;
use std::time::Duration;

/// Probe samples that make a backup's probe latency comparable.
const PROBE_COMPARE_MIN: u64 = 3;

/// What one evaluation knows once the verdicts are in, shared by its steps.
struct Eval<'a> {
    p: &'a Policy,
    inputs: &'a [GroupInput],
    now: Duration,
    tripped: bool,
    bad: u32,
    needed: u32,
}

impl Eval<'_> {
    /// No weight change for at least `cooldown`.
    fn cooled(&self, state: &PolicyState, cooldown: Duration) -> bool {
        state
            .last_change
            .is_none_or(|t| self.now.saturating_sub(t) >= cooldown)
    }

    fn decide(&self, action: Action, rule: Rule, reasons: Vec<Reason>) -> Decision {
        decision(action, rule, reasons, self.bad, self.needed)
    }
}

/// The condition that fired for `group`, if one did.
fn fired(reasons: &[Reason], group: usize) -> Option<Condition> {
    reasons
        .iter()
        .find(|r| r.fired && r.group == group)
        .map(|r| r.rule)
}

pub fn evaluate(
    p: &Policy,
    shift: &Shift,
    recover: &Recover,
    now: Duration,
    inputs: &[GroupInput],
    state: &mut PolicyState,
) -> Decision {
    let mut reasons = Vec::new();
    let primary = verdict::trip(p, inputs, 0, (inputs.len() > 1).then_some(1), &mut reasons);
    state.bad[0].push(primary, p.no_data);
    for g in 1..inputs.len() {
        let mut ignored = Vec::new();
        let v = verdict::trip(p, inputs, g, None, &mut ignored);
        state.bad[g].push(v, p.no_data);
    }
    // Recovery bookkeeping comes first, every evaluation: a primary left
    // with no traffic can only show that it healed through its probes, and
    // doing so clears its trip.
    track_recovery(p, recover, primary, now, inputs, state, &mut reasons);
    let e = Eval {
        p,
        inputs,
        now,
        tripped: state.bad[0].tripped(),
        bad: state.bad[0].count(),
        needed: state.bad[0].needed(),
    };
    let reasons = match shift_off_primary(&e, shift, state, reasons) {
        Ok(d) => return d,
        Err(reasons) => reasons,
    };
    let reasons = match cascade(&e, shift, state, reasons) {
        Ok(d) => return d,
        Err(reasons) => reasons,
    };
    let reasons = match return_to_primary(&e, recover, state, reasons) {
        Ok(d) => return d,
        Err(reasons) => reasons,
    };
    let off_primary = state.weights.as_slice()[0] < TOTAL_BP as u16;
    state.phase = match (e.tripped, off_primary, state.healthy_since.is_some()) {
        (true, _, _) => Phase::Tripped,
        (false, false, _) => Phase::Healthy,
        (false, true, true) => Phase::Recovering,
        (false, true, false) => Phase::Shifted,
    };
    e.decide(Action::Hold, Rule::Hold, reasons)
}

/// Step one: shift a step off a tripped primary, to the first eligible
/// backup. `Err` hands the reasons on when nothing moved.
fn shift_off_primary(
    e: &Eval<'_>,
    shift: &Shift,
    state: &mut PolicyState,
    mut reasons: Vec<Reason>,
) -> Result<Decision, Vec<Reason>> {
    let moved = TOTAL_BP - u32::from(state.weights.as_slice()[0]);
    if !(e.tripped && e.cooled(state, shift.cooldown) && moved < shift.max_bp) {
        return Err(reasons);
    }
    let Some(to) = target(e.p, e.inputs, state, 0) else {
        reasons.push(Reason {
            rule: Condition::NoEligibleBackup,
            group: 0,
            value: 0.0,
            threshold: 0.0,
            fired: true,
        });
        return Err(reasons);
    };
    let step = shift.step_bp.min(shift.max_bp - moved);
    let bp = move_weight(&mut state.weights, 0, to, step);
    state.phase = Phase::Tripped;
    let rule = Rule::Shift {
        cascade: false,
        condition: fired(&reasons, 0),
    };
    Ok(e.decide(Action::Shift { from: 0, to, bp }, rule, reasons))
}

/// Step two, the cascade: a backup carrying traffic that trips itself
/// passes it on.
fn cascade(
    e: &Eval<'_>,
    shift: &Shift,
    state: &mut PolicyState,
    mut reasons: Vec<Reason>,
) -> Result<Decision, Vec<Reason>> {
    if !e.cooled(state, shift.cooldown) {
        return Err(reasons);
    }
    for from in 1..e.inputs.len() {
        if state.weights.as_slice()[from] == 0 || !state.bad[from].tripped() {
            continue;
        }
        let mut backup_reasons = Vec::new();
        verdict::trip(e.p, e.inputs, from, None, &mut backup_reasons);
        if let Some(to) = target(e.p, e.inputs, state, from) {
            let bp = move_weight(&mut state.weights, from, to, shift.step_bp);
            state.phase = if e.tripped {
                Phase::Tripped
            } else {
                Phase::Shifted
            };
            let rule = Rule::Shift {
                cascade: true,
                condition: fired(&backup_reasons, from),
            };
            reasons.extend(backup_reasons);
            return Ok(e.decide(Action::Shift { from, to, bp }, rule, reasons));
        }
    }
    Err(reasons)
}

/// Step three: return a step to the primary once it has held the bar
/// long enough.
fn return_to_primary(
    e: &Eval<'_>,
    recover: &Recover,
    state: &mut PolicyState,
    reasons: Vec<Reason>,
) -> Result<Decision, Vec<Reason>> {
    let off_primary = state.weights.as_slice()[0] < TOTAL_BP as u16;
    let held = state
        .healthy_since
        .is_some_and(|since| e.now.saturating_sub(since) >= recover.hold);
    if e.tripped || !off_primary || !held || !e.cooled(state, recover.cooldown) {
        return Err(reasons);
    }
    let from = (1..e.inputs.len())
        .rev()
        .find(|&g| state.weights.as_slice()[g] > 0)
        .expect("off the primary means some backup holds weight");
    let bp = move_weight(&mut state.weights, from, 0, recover.step_bp);
    state.phase = if state.weights.as_slice()[0] == TOTAL_BP as u16 {
        Phase::Healthy
    } else {
        Phase::Recovering
    };
    Ok(e.decide(Action::Recover { from, to: 0, bp }, Rule::Recover, reasons))
}

/// Starts, keeps or resets the recovery clock of the primary. Meeting the
/// recovery bar also clears a trip that only silence was keeping alive.
fn track_recovery(
    p: &Policy,
    recover: &Recover,
    primary: Verdict,
    now: Duration,
    inputs: &[GroupInput],
    state: &mut PolicyState,
    reasons: &mut Vec<Reason>,
) {
    if state.weights.as_slice()[0] == TOTAL_BP as u16 || primary == Verdict::Bad {
        state.healthy_since = None;
        return;
    }
    match verdict::recovered(p, recover, &inputs[0], reasons) {
        Verdict::Good => {
            state.bad[0].clear();
            state.healthy_since.get_or_insert(now);
        }
        Verdict::Bad => state.healthy_since = None,
        Verdict::NoData => {}
    }
}

/// The first backup after the primary (other than `from`) that has not
/// tripped and is not known to be worse than `from`.
fn target(p: &Policy, inputs: &[GroupInput], state: &PolicyState, from: usize) -> Option<usize> {
    (1..inputs.len()).filter(|&g| g != from).find(|&g| {
        !state.bad[g].tripped()
            && verdict::worse(p, &inputs[from], &inputs[g], PROBE_COMPARE_MIN) != Some(true)
    })
}
