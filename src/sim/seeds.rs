//! `--seeds N`: the first policy over N seeds (the scenario's, then the
//! next N - 1), and the spread of each headline figure: how much of a
//! result is the policy and how much the luck of one seed.

use super::SimRun;
use super::outcome::Headline;
use serde_json::{Value, json};
use std::fmt::Write;

/// One headline figure: its name, unit, and its value in a run (`None`:
/// it did not happen, e.g. no shift to detect).
struct Figure {
    name: &'static str,
    unit: &'static str,
    of: fn(&Headline) -> Option<f64>,
}

const FIGURES: [Figure; 9] = [
    Figure {
        name: "detect",
        unit: "s",
        of: |h| h.time_to_detect_s,
    },
    Figure {
        name: "mitigate",
        unit: "s",
        of: |h| h.time_to_mitigate_s,
    },
    Figure {
        name: "fail back",
        unit: "s",
        of: |h| h.time_to_fail_back_s,
    },
    Figure {
        name: "max moved",
        unit: "%",
        of: |h| Some(h.max_backup_share * 100.0),
    },
    Figure {
        name: "moves",
        unit: "",
        of: |h| Some(h.weight_changes as f64),
    },
    Figure {
        name: "flaps",
        unit: "",
        of: |h| Some(h.flaps as f64),
    },
    Figure {
        name: "over SLO",
        unit: "",
        of: |h| Some(h.slo_violations as f64),
    },
    Figure {
        name: "errors",
        unit: "",
        of: |h| Some(h.client_errors as f64),
    },
    Figure {
        name: "p99",
        unit: "ms",
        of: |h| Some(h.client_p99_ms),
    },
];

/// A figure over the runs: how many had it, and its min, median and max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub had: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

/// The spread of `values` (the runs that had the figure); `None` when
/// none had it.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return None;
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        had: n,
        min: v[0],
        median,
        max: v[n - 1],
    })
}

fn spreads(runs: &[(u64, &SimRun)]) -> Vec<(&'static Figure, Option<Spread>)> {
    FIGURES
        .iter()
        .map(|f| {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|(_, r)| (f.of)(&r.headline))
                .collect();
            (f, spread(&values))
        })
        .collect()
}

fn value(x: f64, unit: &str) -> String {
    match unit {
        "" => format!("{x:.0}"),
        "%" => format!("{x:.0}%"),
        u => format!("{x:.1}{u}"),
    }
}

/// The spread table of `label` over `runs` (seed, run).
pub fn table(label: &str, runs: &[(u64, &SimRun)]) -> String {
    let mut out = String::new();
    let (first, last) = (
        runs.first().map_or(0, |r| r.0),
        runs.last().map_or(0, |r| r.0),
    );
    let _ = writeln!(
        out,
        "\n{label} over {} seeds ({first}..={last}):",
        runs.len()
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>7} {:>10} {:>10} {:>10}",
        "figure", "runs", "min", "median", "max"
    );
    for (f, s) in spreads(runs) {
        let had = format!("{}/{}", s.map_or(0, |s| s.had), runs.len());
        let show = |x: Option<f64>| x.map_or("-".to_owned(), |x| value(x, f.unit));
        let _ = writeln!(
            out,
            "  {:<10} {:>7} {:>10} {:>10} {:>10}",
            f.name,
            had,
            show(s.map(|s| s.min)),
            show(s.map(|s| s.median)),
            show(s.map(|s| s.max))
        );
    }
    out
}

/// The same, for `--json`: each seed's headline and each figure's spread.
pub fn json(label: &str, runs: &[(u64, &SimRun)]) -> Value {
    let figures: serde_json::Map<String, Value> = spreads(runs)
        .into_iter()
        .map(|(f, s)| {
            let v = s.map_or(
                json!({ "runs": 0 }),
                |s| json!({ "runs": s.had, "min": s.min, "median": s.median, "max": s.max }),
            );
            (f.name.replace(' ', "_"), v)
        })
        .collect();
    json!({
        "policy": label,
        "seeds": runs.iter().map(|(s, _)| s).collect::<Vec<_>>(),
        "runs": runs.iter().map(|(s, r)| {
            let mut h = super::report::headline_json(label, r);
            h["seed"] = json!(s);
            h
        }).collect::<Vec<_>>(),
        "spread": figures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_min_median_max_of_what_happened() {
        assert_eq!(spread(&[]), None);
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.had, s.min, s.median, s.max), (3, 1.0, 2.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
    }
}
