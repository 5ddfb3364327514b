//! What a simulation tells a person: the headline table, the per-tick
//! timeline (CSV and JSON), and the machine-readable document of `--json`.
//! Nothing here reads a clock or iterates a hash map, so the same run
//! always writes the same bytes.

use super::engine::{DecisionRow, Headline, SimRun, TickRow};
use super::scenario::Scenario;
use crate::core::policy::Reason;
use crate::decision_record::ReasonRecord;
use serde_json::{Value, json};
use std::fmt::Write;

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}s"))
}

/// One row per policy, one column per headline figure.
pub fn comparison_table(runs: &[(String, SimRun)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:>8} {:>8} {:>9} {:>9} {:>6} {:>6} {:>9} {:>8} {:>9} {:>9}",
        "policy",
        "detect",
        "mitigate",
        "fail back",
        "max moved",
        "moves",
        "flaps",
        "over SLO",
        "errors",
        "p99",
        "p99.9"
    );
    for (label, r) in runs {
        let h = &r.headline;
        let _ = writeln!(
            out,
            "{:<28} {:>8} {:>8} {:>9} {:>8.0}% {:>6} {:>6} {:>9} {:>8} {:>7.1}ms {:>7.1}ms",
            label,
            opt(h.time_to_detect_s),
            opt(h.time_to_mitigate_s),
            opt(h.time_to_fail_back_s),
            h.max_backup_share * 100.0,
            h.weight_changes,
            h.flaps,
            h.slo_violations,
            h.client_errors,
            h.client_p99_ms,
            h.client_p999_ms
        );
    }
    out
}

/// Per-phase client latency for one run.
pub fn phase_table(h: &Headline) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<28} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "phase", "requests", "errors", "over SLO", "p50", "p99", "p99.9"
    );
    for p in &h.phases {
        let _ = writeln!(
            out,
            "  {:<28} {:>9} {:>7} {:>9} {:>7.1}ms {:>7.1}ms {:>7.1}ms",
            p.name, p.requests, p.errors, p.slo_violations, p.p50_ms, p.p99_ms, p.p999_ms
        );
    }
    out
}

/// The timeline as CSV: one row per tick.
pub fn timeline_csv(sc: &Scenario, rows: &[TickRow]) -> String {
    let mut out = String::from("t_s,phase,requests,errors,client_p99_ms");
    for g in &sc.groups {
        let _ = write!(out, ",{0}_weight_pct,{0}_p50_ms,{0}_p99_ms", g.name);
    }
    out.push_str(",conditions\n");
    for r in rows {
        let _ = write!(
            out,
            "{:.3},{},{},{},{:.3}",
            r.t, r.phase, r.requests, r.errors, r.client_p99_ms
        );
        for i in 0..sc.groups.len() {
            let _ = write!(
                out,
                ",{:.2},{:.3},{:.3}",
                r.weights_pct[i], r.group_p50_ms[i], r.group_p99_ms[i]
            );
        }
        let conds: Vec<String> = r
            .conditions
            .iter()
            .map(|c| {
                format!(
                    "{}={}/{}{}",
                    c.rule,
                    num(c.value),
                    num(c.threshold),
                    if c.fired { "!" } else { "" }
                )
            })
            .collect();
        let _ = writeln!(out, ",\"{}\"", conds.join(" "));
    }
    out
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "failing".into()
    }
}

/// A reason in the same shape as the audit log's and `/status`'s.
fn reason_json(r: &Reason, sc: &Scenario) -> Value {
    let names: Vec<&str> = sc.groups.iter().map(|g| g.name.as_str()).collect();
    serde_json::to_value(ReasonRecord::of(r, &names)).expect("a reason serializes")
}

fn weights_json(sc: &Scenario, w: &[f64]) -> Value {
    Value::Object(
        sc.groups
            .iter()
            .zip(w)
            .map(|(g, p)| (g.name.clone(), json!(p)))
            .collect(),
    )
}

pub fn timeline_json(sc: &Scenario, rows: &[TickRow], decisions: &[DecisionRow]) -> Value {
    let ticks: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "t_s": r.t,
                "phase": r.phase,
                "requests": r.requests,
                "errors": r.errors,
                "client_p99_ms": r.client_p99_ms,
                "weights_pct": weights_json(sc, &r.weights_pct),
                "p50_ms": weights_json(sc, &r.group_p50_ms),
                "p99_ms": weights_json(sc, &r.group_p99_ms),
                "conditions": r.conditions.iter().map(|c| reason_json(c, sc)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let decisions: Vec<Value> = decisions
        .iter()
        .map(|d| {
            json!({
                "t_s": d.t,
                "action": d.action_label(),
                "rule": d.rule.label(),
                "weights_pct": weights_json(sc, &d.weights_pct),
                "reasons": d.reasons.iter().map(|c| reason_json(c, sc)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "ticks": ticks, "decisions": decisions })
}

pub fn headline_json(label: &str, r: &SimRun) -> Value {
    let h = &r.headline;
    json!({
        "policy": label,
        "requests": r.requests,
        "events": r.events,
        "truncated": r.truncated,
        "first_shift_at_s": h.first_shift_at_s,
        "first_rule": h.first_rule,
        "time_to_detect_s": h.time_to_detect_s,
        "time_to_mitigate_s": h.time_to_mitigate_s,
        "time_to_fail_back_s": h.time_to_fail_back_s,
        "max_backup_share": h.max_backup_share,
        "weight_changes": h.weight_changes,
        "flaps": h.flaps,
        "served_by_degraded": h.served_by_degraded,
        "slo_violations": h.slo_violations,
        "client_errors": h.client_errors,
        "client_p50_ms": h.client_p50_ms,
        "client_p99_ms": h.client_p99_ms,
        "client_p999_ms": h.client_p999_ms,
        "phases": h.phases.iter().map(|p| json!({
            "name": p.name, "requests": p.requests, "errors": p.errors, "slo_violations": p.slo_violations,
            "p50_ms": p.p50_ms, "p99_ms": p.p99_ms, "p999_ms": p.p999_ms,
        })).collect::<Vec<_>>(),
    })
}
