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
    let (bad, needed) = (state.bad[0].count(), state.bad[0].needed());
    let tripped = state.bad[0].tripped();
    let last_change = state.last_change;
    let cooled = |cooldown: Duration| last_change.is_none_or(|t| now.saturating_sub(t) >= cooldown);
    let fired = |reasons: &[Reason], group: usize| {
        reasons
            .iter()
            .find(|r| r.fired && r.group == group)
            .map(|r| r.rule)
    };

    // 1. Shift off a tripped primary.
    let moved = TOTAL_BP - u32::from(state.weights.as_slice()[0]);
    if tripped && cooled(shift.cooldown) && moved < shift.max_bp {
        if let Some(to) = target(p, inputs, state, 0) {
            let bp = move_weight(
                &mut state.weights,
                0,
                to,
                shift.step_bp.min(shift.max_bp - moved),
            );
            state.phase = Phase::Tripped;
            let rule = Rule::Shift {
                cascade: false,
                condition: fired(&reasons, 0),
            };
            return decision(
                Action::Shift { from: 0, to, bp },
                rule,
                reasons,
                bad,
                needed,
            );
        }
        reasons.push(Reason {
            rule: Condition::NoEligibleBackup,
            group: 0,
            value: 0.0,
            threshold: 0.0,
            fired: true,
        });
    }

    // 2. Cascade: a backup carrying traffic that trips itself passes it on.
    if cooled(shift.cooldown) {
        for from in 1..inputs.len() {
            if state.weights.as_slice()[from] == 0 || !state.bad[from].tripped() {
                continue;
            }
            let mut backup_reasons = Vec::new();
            verdict::trip(p, inputs, from, None, &mut backup_reasons);
            if let Some(to) = target(p, inputs, state, from) {
                let bp = move_weight(&mut state.weights, from, to, shift.step_bp);
                state.phase = if tripped {
                    Phase::Tripped
                } else {
                    Phase::Shifted
                };
                let rule = Rule::Shift {
                    cascade: true,
                    condition: fired(&backup_reasons, from),
                };
                reasons.extend(backup_reasons);
                return decision(Action::Shift { from, to, bp }, rule, reasons, bad, needed);
            }
        }
    }

    // 3. Return to the primary once it has held the bar long enough.
    let off_primary = state.weights.as_slice()[0] < TOTAL_BP as u16;
    let held = state
        .healthy_since
        .is_some_and(|since| now.saturating_sub(since) >= recover.hold);
    if !tripped && off_primary && held && cooled(recover.cooldown) {
        let from = (1..inputs.len())
            .rev()
            .find(|&g| state.weights.as_slice()[g] > 0)
            .expect("off the primary means some backup holds weight");
        let bp = move_weight(&mut state.weights, from, 0, recover.step_bp);
        state.phase = if state.weights.as_slice()[0] == TOTAL_BP as u16 {
            Phase::Healthy
        } else {
            Phase::Recovering
        };
        return decision(
            Action::Recover { from, to: 0, bp },
            Rule::Recover,
            reasons,
            bad,
            needed,
        );
    }

    state.phase = match (tripped, off_primary, state.healthy_since.is_some()) {
        (true, _, _) => Phase::Tripped,
        (false, false, _) => Phase::Healthy,
        (false, true, true) => Phase::Recovering,
        (false, true, false) => Phase::Shifted,
    };
    decision(Action::Hold, Rule::Hold, reasons, bad, needed)
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
