//! Canary mode: the first backup is the canary, the primary the baseline.
//! The canary's share climbs through `steps`, each held for `hold`, while
//! it stays within bounds of the baseline; a trip rolls it back to 0 and
//! the ramp stops. The last step held means promoted.

use super::verdict::{self, Verdict};
use super::{
    Action, Canary, Condition, Decision, GroupInput, Phase, Policy, PolicyState, Reason, Rule,
    decision,
};
use crate::core::routes::{TOTAL_BP, Weights};
use std::time::Duration;

const CANARY: usize = 1;

pub fn evaluate(
    p: &Policy,
    c: &Canary,
    now: Duration,
    inputs: &[GroupInput],
    state: &mut PolicyState,
) -> Decision {
    assert!(
        inputs.len() >= 2,
        "canary mode needs a canary group (the first backup)"
    );
    let mut reasons = Vec::new();
    if matches!(state.phase, Phase::CanaryRolledBack | Phase::CanaryPromoted) {
        return decision(Action::Hold, Rule::Hold, reasons, 0, 0);
    }
    let Some(since) = state.stage_since else {
        // First evaluation: open the first step.
        state.stage = 0;
        state.stage_since = Some(now);
        set_canary(state, c.steps_bp[0], inputs.len());
        state.phase = Phase::CanaryStage(0);
        return decision(
            Action::CanaryAdvance { stage: 0 },
            Rule::CanaryStep,
            reasons,
            0,
            0,
        );
    };

    let v = judge(p, c, inputs, &mut reasons);
    state.bad[CANARY].push(v, p.no_data);
    let (bad, needed) = (state.bad[CANARY].count(), state.bad[CANARY].needed());
    if state.bad[CANARY].tripped() {
        set_canary(state, 0, inputs.len());
        state.phase = Phase::CanaryRolledBack;
        let rule = Rule::CanaryRollback(reasons.iter().find(|r| r.fired).map(|r| r.rule));
        return decision(Action::CanaryRollback, rule, reasons, bad, needed);
    }
    // Advance only on evidence: a held step with enough canary samples.
    let evidence = v != Verdict::Bad && inputs[CANARY].latency.total() >= p.min_samples;
    if now.saturating_sub(since) >= c.hold && evidence {
        if state.stage + 1 == c.steps_bp.len() {
            state.phase = Phase::CanaryPromoted;
            return decision(
                Action::CanaryPromote,
                Rule::CanaryPromote,
                reasons,
                bad,
                needed,
            );
        }
        state.stage += 1;
        state.stage_since = Some(now);
        set_canary(state, c.steps_bp[state.stage], inputs.len());
        state.phase = Phase::CanaryStage(state.stage);
        return decision(
            Action::CanaryAdvance { stage: state.stage },
            Rule::CanaryStep,
            reasons,
            bad,
            needed,
        );
    }
    state.phase = Phase::CanaryStage(state.stage);
    decision(Action::Hold, Rule::Hold, reasons, bad, needed)
}

/// The canary against the baseline, plus the policy's absolute trip
/// conditions on the canary.
fn judge(p: &Policy, c: &Canary, inputs: &[GroupInput], reasons: &mut Vec<Reason>) -> Verdict {
    let (base, canary) = (&inputs[0], &inputs[CANARY]);
    let mut v = verdict::trip(p, inputs, CANARY, None, reasons);
    let q = c.quantile.fraction();
    if canary.latency.total() >= p.min_samples && base.latency.total() >= p.min_samples {
        if let (Some(cq), Some(bq)) = (
            canary.latency.quantile_secs(q),
            base.latency.quantile_secs(q),
        ) {
            let ratio = cq / bq.max(1e-6);
            let fired = ratio > c.max_ratio;
            reasons.push(Reason {
                rule: Condition::RatioAbove(c.quantile),
                group: CANARY,
                value: ratio,
                threshold: c.max_ratio,
                fired,
            });
            if fired {
                v = Verdict::Bad;
            }
        }
    } else if v == Verdict::Good {
        v = Verdict::NoData;
    }
    if canary.attempts >= p.min_samples {
        let increase = canary.error_rate().unwrap_or(0.0) - base.error_rate().unwrap_or(0.0);
        let fired = increase > c.max_error_rate_increase;
        reasons.push(Reason {
            rule: Condition::ErrorRateIncreaseAbove,
            group: CANARY,
            value: increase,
            threshold: c.max_error_rate_increase,
            fired,
        });
        if fired {
            v = Verdict::Bad;
        }
    }
    v
}

fn set_canary(state: &mut PolicyState, canary_bp: u32, groups: usize) {
    let mut w = vec![0u16; groups];
    w[CANARY] = canary_bp as u16;
    w[0] = (TOTAL_BP - canary_bp) as u16;
    state.weights = Weights::new(w).expect("baseline + canary = 10000");
}
