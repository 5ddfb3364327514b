//! What a run means for a user: the headline (time to detect, mitigate
//! and fail back, flaps, the largest share moved) and client-seen figures
//! per phase, computed from what the event loop observed.

use super::scenario::Scenario;
use crate::core::policy::{Action, Reason, Rule};
use hdrhistogram::Histogram;

/// One row of the per-tick timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct TickRow {
    pub t: f64,
    pub weights_pct: Vec<f64>,
    /// The policy's signal per group over the stats window.
    pub group_p50_ms: Vec<f64>,
    pub group_p99_ms: Vec<f64>,
    pub requests: u64,
    pub errors: u64,
    /// Client-seen p99 of the requests that finished in this tick.
    pub client_p99_ms: f64,
    /// The latest evaluation's conditions: rule, value, threshold, fired.
    pub conditions: Vec<Reason>,
    pub phase: String,
}

/// A decision that moved (or in dry-run would move) traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionRow {
    pub t: f64,
    pub action: Action,
    pub dry_run: bool,
    pub rule: Rule,
    pub weights_pct: Vec<f64>,
    pub reasons: Vec<Reason>,
}

impl DecisionRow {
    /// The action as reports and metrics name it (`would_` in dry-run).
    pub fn action_label(&self) -> String {
        if self.dry_run {
            format!("would_{}", self.action.name())
        } else {
            self.action.name().to_owned()
        }
    }

    /// A real (not dry-run) decision that moved traffic off a group.
    fn is_shift(&self) -> bool {
        !self.dry_run && matches!(self.action, Action::Shift { .. })
    }
}

/// Client-seen outcome of one phase (before, during each fault, after).
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseStats {
    pub name: String,
    pub requests: u64,
    pub errors: u64,
    pub slo_violations: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Headline {
    pub first_shift_at_s: Option<f64>,
    pub first_rule: Option<String>,
    pub time_to_detect_s: Option<f64>,
    pub time_to_mitigate_s: Option<f64>,
    pub time_to_fail_back_s: Option<f64>,
    /// Largest share off the primary at any moment, 0 to 1.
    pub max_backup_share: f64,
    pub weight_changes: u64,
    /// Times traffic went back toward the primary and then away again.
    pub flaps: u64,
    pub served_by_degraded: u64,
    pub slo_violations: u64,
    pub client_errors: u64,
    pub client_p50_ms: f64,
    pub client_p99_ms: f64,
    pub client_p999_ms: f64,
    pub phases: Vec<PhaseStats>,
}

/// What the event loop observed, for the headline.
pub(super) struct Observed<'a> {
    pub sc: &'a Scenario,
    pub decisions: &'a [DecisionRow],
    pub timeline: &'a [TickRow],
    pub client: &'a Histogram<u32>,
    /// Per phase: name, latency of requests served, requests, SLO misses.
    pub phases: &'a [(String, Histogram<u32>, u64, u64)],
    pub served_by_degraded: u64,
    pub slo_violations: u64,
    pub client_errors: u64,
}

pub(super) fn headline(o: &Observed<'_>) -> Headline {
    let first_fault =
        o.sc.faults
            .iter()
            .map(|f| f.at.as_secs_f64())
            .reduce(f64::min);
    let first_shift = o
        .decisions
        .iter()
        .find(|d| d.is_shift() && first_fault.is_none_or(|f| d.t >= f));
    let first_shift_at = first_shift.map(|d| d.t);
    let start = first_fault.unwrap_or(0.0);
    Headline {
        first_shift_at_s: first_shift_at,
        first_rule: first_shift.map(|d| d.rule.label()),
        time_to_detect_s: first_shift_at.map(|s| s - start),
        time_to_mitigate_s: first_shift_at.and_then(|s| time_to_mitigate(o, s, start)),
        time_to_fail_back_s: time_to_fail_back(o),
        max_backup_share: o
            .timeline
            .iter()
            .map(|r| (100.0 - primary_pct(r)) / 100.0)
            .fold(0.0, f64::max),
        weight_changes: o.decisions.iter().filter(|d| !d.dry_run).count() as u64,
        flaps: flaps(o.decisions),
        served_by_degraded: o.served_by_degraded,
        slo_violations: o.slo_violations,
        client_errors: o.client_errors,
        client_p50_ms: quantile_ms(o.client, 0.5),
        client_p99_ms: quantile_ms(o.client, 0.99),
        client_p999_ms: quantile_ms(o.client, 0.999),
        phases: o
            .phases
            .iter()
            .map(|(name, h, n, over)| PhaseStats {
                name: name.clone(),
                requests: *n,
                errors: n - h.len().min(*n),
                slo_violations: *over,
                p50_ms: quantile_ms(h, 0.5),
                p99_ms: quantile_ms(h, 0.99),
                p999_ms: quantile_ms(h, 0.999),
            })
            .collect(),
    }
}

fn quantile_ms(h: &Histogram<u32>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

fn primary_pct(r: &TickRow) -> f64 {
    r.weights_pct.first().copied().unwrap_or(100.0)
}

/// From the fault's start to the first tick at or after the first shift
/// whose client p99 is within the SLO again.
fn time_to_mitigate(o: &Observed<'_>, shift_at: f64, start: f64) -> Option<f64> {
    let slo_ms = o.sc.slo.as_secs_f64() * 1000.0;
    o.timeline
        .iter()
        .find(|r| r.t >= shift_at && r.requests > 0 && r.client_p99_ms <= slo_ms)
        .map(|r| r.t - start)
}

/// From the last fault's end to the tick where all traffic was back on the
/// primary for good; `None` if it never moved, or never came back.
fn time_to_fail_back(o: &Observed<'_>) -> Option<f64> {
    let end = o.sc.faults.iter().map(|f| f.until).max()?.as_secs_f64();
    let last_off = o.timeline.iter().rev().find(|r| primary_pct(r) < 100.0)?.t;
    if last_off >= o.timeline.last().map_or(0.0, |r| r.t) {
        return None;
    }
    o.timeline
        .iter()
        .find(|r| r.t > last_off && primary_pct(r) >= 100.0)
        .map(|r| (r.t - end).max(0.0))
}

/// Times traffic went back toward the primary and then away again.
fn flaps(decisions: &[DecisionRow]) -> u64 {
    let mut flaps = 0;
    let mut returned = false;
    for d in decisions.iter().filter(|d| !d.dry_run) {
        match d.action {
            Action::Recover { .. } | Action::CanaryRollback => returned = true,
            Action::Shift { .. } | Action::CanaryAdvance { .. } if returned => {
                flaps += 1;
                returned = false;
            }
            _ => {}
        }
    }
    flaps
}
