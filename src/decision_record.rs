//! A policy decision as operators read it, in one serializable shape: the
//! audit log's line, `/status`'s `decisions` and the demo's live view are
//! this record; the simulator's reports use its reasons. Field names are a
//! contract: scripts and dashboards read them.

use crate::core::policy::{Decision, Reason, Unit};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One decision that moved (or in dry-run would move) traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// Wall-clock time, RFC 3339 with milliseconds.
    pub time: String,
    /// Seconds since the proxy started (the policy's clock).
    pub uptime_s: f64,
    pub listener: String,
    pub policy: String,
    pub action: String,
    pub rule: String,
    pub dry_run: bool,
    pub phase: String,
    /// Percent of new connections per group, before and after.
    pub from: Value,
    pub to: Value,
    /// Bad evaluations counted toward the primary's trip, and the count
    /// that trips it.
    pub bad: u32,
    pub needed: u32,
    pub reasons: Vec<ReasonRecord>,
}

/// One condition checked: its value against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReasonRecord {
    pub rule: String,
    pub group: String,
    /// The measured value, or `"failing"` when the quantile fell among
    /// failures.
    pub value: Value,
    pub threshold: f64,
    pub fired: bool,
    /// `seconds`, `ratio`, `count`, `per_second` or `flag`.
    pub unit: String,
}

impl ReasonRecord {
    /// `groups` names the groups by index, primary first.
    pub fn of(r: &Reason, groups: &[&str]) -> Self {
        ReasonRecord {
            rule: r.rule.label(),
            group: groups.get(r.group).copied().unwrap_or("?").to_owned(),
            value: if r.value.is_finite() {
                Value::from(r.value)
            } else {
                Value::from("failing")
            },
            threshold: r.threshold,
            fired: r.fired,
            unit: unit_name(r.rule.unit()).to_owned(),
        }
    }
}

pub fn unit_name(u: Unit) -> &'static str {
    match u {
        Unit::Seconds => "seconds",
        Unit::Ratio => "ratio",
        Unit::Count => "count",
        Unit::PerSecond => "per_second",
        Unit::Flag => "flag",
    }
}

/// `{"group": percent, ...}` from basis points per group.
pub fn shares(groups: &[&str], bp: &[u16]) -> Value {
    let m: Map<String, Value> = groups
        .iter()
        .zip(bp)
        .map(|(n, &b)| ((*n).to_owned(), Value::from(f64::from(b) / 100.0)))
        .collect();
    Value::Object(m)
}

impl DecisionRecord {
    /// The record of `d`, made by `policy` on `listener` at wall-clock
    /// `time`; `groups` names the groups, primary first.
    pub fn of(d: &Decision, listener: &str, policy: &str, groups: &[&str], time: String) -> Self {
        DecisionRecord {
            time,
            uptime_s: d.at.as_secs_f64(),
            listener: listener.to_owned(),
            policy: policy.to_owned(),
            action: d.action.name().to_owned(),
            rule: d.rule.label(),
            dry_run: d.dry_run,
            phase: d.phase.name().to_owned(),
            from: shares(groups, d.previous.as_slice()),
            to: shares(groups, d.weights.as_slice()),
            bad: d.bad,
            needed: d.bad_needed,
            reasons: d
                .reasons
                .iter()
                .map(|r| ReasonRecord::of(r, groups))
                .collect(),
        }
    }

    /// The reason whose condition fired, if any.
    pub fn fired(&self) -> Option<&ReasonRecord> {
        self.reasons.iter().find(|r| r.fired)
    }
}
