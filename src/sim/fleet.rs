//! `[fleet] instances = N`: what N proxies, each taking 1/N of the
//! arrivals, do when each decides on its own window against when they
//! decide as one fleet on every window merged. The comparison table and
//! its JSON.

use super::engine::{FleetFigures, SimRun};
use serde_json::{Value, json};
use std::fmt::Write;

fn first_last(f: &FleetFigures) -> (Option<f64>, Option<f64>, usize) {
    let shifted: Vec<f64> = f.first_shift_s.iter().flatten().copied().collect();
    let first = shifted.iter().copied().reduce(f64::min);
    let last = (shifted.len() == f.first_shift_s.len())
        .then(|| shifted.iter().copied().reduce(f64::max))
        .flatten();
    (first, last, shifted.len())
}

fn s(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |x| format!("{x:.1}s"))
}

type Cell = fn(&SimRun, &FleetFigures) -> String;

/// The comparison's rows: a name, and how one run fills its cell.
const ROWS: [(&str, Cell); 9] = [
    ("shifted before any fault", |_, f| {
        format!("{} of {}", early(f), f.instances)
    }),
    ("first shift in a fault, first", |_, f| s(first_last(f).0)),
    ("first shift in a fault, last", |_, f| s(first_last(f).1)),
    ("shifted in a fault", |_, f| {
        format!("{} of {}", first_last(f).2, f.instances)
    }),
    ("flaps, all instances", |_, f| {
        f.flaps.iter().sum::<u64>().to_string()
    }),
    ("weights apart, max / mean (points)", |_, f| {
        format!("{:.1} / {:.1}", f.max_spread_pct, f.mean_spread_pct)
    }),
    ("ticks with instances apart", |r, f| {
        format!("{} of {}", f.ticks_diverged, r.timeline.len())
    }),
    ("requests over the SLO", |r, _| {
        r.headline.slo_violations.to_string()
    }),
    ("client errors", |r, _| r.headline.client_errors.to_string()),
];

/// The two runs side by side; `local` decided alone, `fleet` as one.
pub fn table(policy: &str, local: &SimRun, fleet: &SimRun) -> String {
    let (Some(l), Some(f)) = (&local.fleet, &fleet.fleet) else {
        return String::new();
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nfleet of {} instances, each taking 1/{} of the arrivals ({policy}):",
        l.instances, l.instances
    );
    let _ = writeln!(
        out,
        "  {:<34} {:>20} {:>20}",
        "", "local decisions", "one fleet decision"
    );
    for (name, cell) in ROWS {
        let _ = writeln!(
            out,
            "  {name:<34} {:>20} {:>20}",
            cell(local, l),
            cell(fleet, f)
        );
    }
    out
}

fn figures_json(r: &SimRun) -> Value {
    let Some(f) = &r.fleet else {
        return Value::Null;
    };
    json!({
        "deciding": f.deciding.name(),
        "first_shift_s": f.first_shift_s,
        "early_shift": f.early_shift,
        "flaps": f.flaps,
        "max_spread_pct": f.max_spread_pct,
        "mean_spread_pct": f.mean_spread_pct,
        "ticks_diverged": f.ticks_diverged,
        "ticks": r.timeline.len(),
        "slo_violations": r.headline.slo_violations,
        "client_errors": r.headline.client_errors,
    })
}

/// `"fleet"` in the `--json` document.
pub fn json(local: &SimRun, fleet: &SimRun) -> Value {
    json!({
        "instances": fleet.fleet.as_ref().map(|f| f.instances),
        "local": figures_json(local),
        "fleet": figures_json(fleet),
    })
}

fn early(f: &FleetFigures) -> f64 {
    f.early_shift.iter().filter(|e| **e).count() as f64
}

/// A fleet expectation of `[expect]`, checked on the fleet run and the
/// local one; `None` when `key` is not a fleet expectation.
pub fn expectation(
    key: &str,
    num: Option<f64>,
    fleet: &SimRun,
    local: Option<&SimRun>,
) -> Option<bool> {
    let f = fleet.fleet.as_ref();
    let l = local.and_then(|r| r.fleet.as_ref());
    let n = num?;
    let check = |figures: Option<&FleetFigures>, ok: &dyn Fn(&FleetFigures) -> bool| {
        Some(figures.is_some_and(ok))
    };
    match key {
        "fleet_early_shifts_at_most" => check(f, &|f| early(f) <= n),
        "local_early_shifts_at_least" => check(l, &|l| early(l) >= n),
        "fleet_spread_at_most" => check(f, &|f| f.max_spread_pct <= n + 1e-9),
        "local_spread_at_least" => check(l, &|l| l.max_spread_pct >= n - 1e-9),
        _ => None,
    }
}

/// The fleet figures an unmet expectation reports.
pub fn summary(fleet: &SimRun, local: Option<&SimRun>) -> String {
    let one = |r: Option<&SimRun>| {
        r.and_then(|r| r.fleet.as_ref())
            .map_or("no fleet".to_owned(), |f| {
                format!(
                    "{} early shifts, weights up to {:.1} points apart",
                    early(f),
                    f.max_spread_pct
                )
            })
    };
    format!("fleet: {}; local: {}", one(Some(fleet)), one(local))
}
