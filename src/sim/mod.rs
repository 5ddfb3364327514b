//! `portshift sim`: replays a scenario (load, backends, faults) through the
//! unchanged route table, stats and policy engine on a virtual clock, and
//! reports what each policy would have done.
//!
//! - `scenario`: the scenario file and its validation.
//! - `model`: latency and load models (seeded, common random numbers).
//! - `engine`: the discrete-event loop.
//! - `report`, `chart`: tables, timeline CSV/JSON, the `--json` document,
//!   the SVG chart.
//! - `trace`: replaying a recording (an access log, or `portshift run --record`).

pub mod chart;
pub mod engine;
mod fleet;
pub mod model;
mod outcome;
mod parallel;
pub mod report;
pub mod scenario;
mod seeds;

pub use engine::{Headline, SimRun};
pub use scenario::Scenario;

use crate::config::shipped::{Resolved, resolve};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Everything `portshift sim` was asked.
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    pub scenario: PathBuf,
    /// Policies to compare; empty: the scenario's own, else `failover`.
    pub policies: Vec<String>,
    pub seed: Option<u64>,
    pub out: Option<PathBuf>,
    /// `KEY=FROM..TO:STEP` over a policy key, e.g. `trip.p99_above=100ms..400ms:50ms`.
    pub sweep: Option<String>,
    /// Also run the first policy over this many seeds (1: not).
    pub seeds: usize,
    /// Simulations run at once; `None`: one per core.
    pub threads: Option<usize>,
    /// Show a progress bar (on a terminal, for runs over a second).
    pub progress: bool,
}

/// What a simulation produced: the runs, the human report and the JSON
/// document.
#[derive(Debug)]
pub struct SimReport {
    pub scenario: Scenario,
    pub runs: Vec<(String, SimRun)>,
    pub text: String,
    pub doc: Value,
    /// Expectations from the scenario's `[expect]` table that the first
    /// run did not meet.
    pub unmet: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Scenario(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Policy(#[from] crate::config::shipped::ResolveError),
    #[error("--sweep: {0}")]
    Sweep(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn run(opts: &SimOptions) -> Result<SimReport, SimError> {
    let scenario = Scenario::load(&opts.scenario)?;
    let seed = opts.seed.unwrap_or(scenario.seed);
    let names: Vec<String> = if opts.policies.is_empty() {
        vec![scenario.policy.clone().unwrap_or_else(|| "failover".into())]
    } else {
        opts.policies.clone()
    };
    let mut policies: Vec<(String, Resolved)> = Vec::new();
    for n in &names {
        let r = resolve(n).map_err(SimError::Policy)?;
        policies.push((r.name.clone(), r));
    }
    let sweep = match &opts.sweep {
        None => Vec::new(),
        Some(spec) => sweep_variants(spec, &policies[0].1)?,
    };
    let all: Vec<(String, Resolved)> = policies
        .iter()
        .cloned()
        .chain(sweep.iter().cloned())
        .collect();

    let started = Instant::now();
    // Jobs: every policy, then (a fleet) the first deciding alone, then
    // the first over the further seeds.
    let fleet_job = usize::from(scenario.fleet.is_some());
    let more_seeds: Vec<u64> = (1..opts.seeds.max(1) as u64)
        .map(|k| seed.wrapping_add(k))
        .collect();
    let jobs = all.len() + fleet_job + more_seeds.len();
    let bar = parallel::Progress::new(opts.progress, jobs, scenario.duration.as_secs_f64());
    let threads = opts.threads.unwrap_or_else(parallel::threads);
    let mut results = parallel::run_all(jobs, threads, &bar, |i, progress| {
        let first = &all[0].1.policy;
        if i < all.len() {
            engine::run(&scenario, &all[i].1.policy, seed, progress)
        } else if i < all.len() + fleet_job {
            engine::run_deciding(&scenario, first, seed, engine::Deciding::Alone, progress)
        } else {
            let s = more_seeds[i - all.len() - fleet_job];
            engine::run(&scenario, first, s, progress)
        }
    });
    let seeded = results.split_off(all.len() + fleet_job);
    let local = if fleet_job == 1 { results.pop() } else { None };
    let runs: Vec<(String, SimRun)> = all.iter().map(|(l, _)| l.clone()).zip(results).collect();
    bar.finish();
    let wall = started.elapsed().as_secs_f64();

    if let Some(dir) = &opts.out {
        write_outputs(dir, &scenario, &runs)?;
    }
    let unmet = runs
        .first()
        .map(|(_, r)| check_expectations(&scenario, r, local.as_ref()))
        .unwrap_or_default();
    let mut doc = document(
        &scenario,
        seed,
        &all,
        &runs,
        policies.len(),
        opts.sweep.as_deref(),
        wall,
    );
    let mut text = text_report(&scenario, seed, &runs, policies.len(), opts, wall, &unmet);
    if !seeded.is_empty() {
        let (label, first) = &runs[0];
        let over: Vec<(u64, &SimRun)> = std::iter::once((seed, first))
            .chain(more_seeds.iter().copied().zip(&seeded))
            .collect();
        text.push_str(&seeds::table(label, &over));
        doc["seeds"] = seeds::json(label, &over);
    }
    if let Some(local) = &local {
        let (label, as_fleet) = &runs[0];
        text.push_str(&fleet::table(label, local, as_fleet));
        doc["fleet"] = fleet::json(local, as_fleet);
    }
    Ok(SimReport {
        scenario,
        runs,
        text,
        doc,
        unmet,
    })
}

fn sha(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn document(
    sc: &Scenario,
    seed: u64,
    all: &[(String, Resolved)],
    runs: &[(String, SimRun)],
    compared: usize,
    sweep: Option<&str>,
    wall: f64,
) -> Value {
    let headlines: Vec<Value> = runs
        .iter()
        .map(|(l, r)| report::headline_json(l, r))
        .collect();
    json!({
        "header": {
            "scenario": sc.name,
            "scenario_file": sc.path.display().to_string(),
            "scenario_sha256": sha(&sc.text),
            "seed": seed,
            "duration_s": sc.duration.as_secs_f64(),
            "policies": all.iter().map(|(l, r)| json!({ "name": l, "file": r.path.display().to_string(), "sha256": sha(&r.text) })).collect::<Vec<_>>(),
        },
        "requests_simulated": runs.iter().map(|(_, r)| r.requests).sum::<u64>(),
        "events": runs.iter().map(|(_, r)| r.events).sum::<u64>(),
        "wall_seconds": wall,
        "policies": headlines[..compared.min(headlines.len())],
        "sweep": sweep.map(|s| json!({ "spec": s, "runs": headlines[compared.min(headlines.len())..] })),
    })
}

#[allow(clippy::too_many_arguments)]
fn text_report(
    sc: &Scenario,
    seed: u64,
    runs: &[(String, SimRun)],
    compared: usize,
    opts: &SimOptions,
    wall: f64,
    unmet: &[String],
) -> String {
    let mut out = String::new();
    let requests: u64 = runs.iter().map(|(_, r)| r.requests).sum();
    let _ = writeln!(
        out,
        "scenario {} ({}), {:.0}s simulated, seed {seed}",
        sc.name,
        sc.path.display(),
        sc.duration.as_secs_f64()
    );
    if !sc.description.is_empty() {
        let _ = writeln!(out, "  {}", sc.description.trim());
    }
    let _ = writeln!(
        out,
        "{requests} requests simulated in {wall:.2}s ({:.2}M requests/s)\n",
        requests as f64 / wall.max(1e-9) / 1e6
    );
    let _ = write!(out, "{}", report::comparison_table(&runs[..compared]));
    for (label, r) in &runs[..compared] {
        run_section(&mut out, sc, label, r);
    }
    if let Some(spec) = &opts.sweep {
        let _ = writeln!(out, "\nsweep {spec}:");
        let _ = write!(out, "{}", report::comparison_table(&runs[compared..]));
    }
    if !sc.expect.is_empty() {
        if unmet.is_empty() {
            let _ = writeln!(out, "\nexpectations of the scenario: all met");
        } else {
            let _ = writeln!(
                out,
                "\nexpectations of the scenario NOT met:\n  {}",
                unmet.join("\n  ")
            );
        }
    }
    if let Some(dir) = &opts.out {
        let _ = writeln!(
            out,
            "\ntimelines (CSV, JSON) and charts (SVG) in {}",
            dir.display()
        );
    }
    out
}

/// One compared run: client latency by phase, and its first decisions.
fn run_section(out: &mut String, sc: &Scenario, label: &str, r: &SimRun) {
    let _ = writeln!(out, "\n{label}: client latency by phase");
    let _ = write!(out, "{}", report::phase_table(&r.headline));
    if r.truncated {
        let _ = writeln!(
            out,
            "  (stopped at the event cap of {}: results cover only part of the run)",
            sc.max_events
        );
    }
    for d in r.decisions.iter().take(6) {
        let _ = writeln!(
            out,
            "  {:>7.1}s {:<16} {:<24} -> {:?}",
            d.t,
            d.action_label(),
            d.rule.label(),
            d.weights_pct
        );
    }
    if r.decisions.len() > 6 {
        let _ = writeln!(
            out,
            "  ... {} decisions in all (see the timeline)",
            r.decisions.len()
        );
    }
}

fn file_label(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_outputs(
    dir: &std::path::Path,
    sc: &Scenario,
    runs: &[(String, SimRun)],
) -> Result<(), SimError> {
    let write = |name: String, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| SimError::Write { path, source })
    };
    std::fs::create_dir_all(dir).map_err(|source| SimError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for (label, r) in runs {
        let l = file_label(label);
        write(
            format!("timeline-{l}.csv"),
            report::timeline_csv(sc, &r.timeline),
        )?;
        let json =
            serde_json::to_string_pretty(&report::timeline_json(sc, &r.timeline, &r.decisions))
                .expect("values serialize");
        write(format!("timeline-{l}.json"), json)?;
        let svg =
            chart::svg(sc, r, &format!("{} / {label}", sc.name)).map_err(|e| SimError::Write {
                path: dir.join(format!("chart-{l}.svg")),
                source: std::io::Error::other(e),
            })?;
        write(format!("chart-{l}.svg"), svg)?;
    }
    Ok(())
}

/// Policy variants for `KEY=FROM..TO:STEP`: the first policy's text with
/// KEY set to each value.
fn sweep_variants(spec: &str, base: &Resolved) -> Result<Vec<(String, Resolved)>, SimError> {
    let err = |m: String| SimError::Sweep(m);
    let (key, range) = spec.split_once('=').ok_or_else(|| {
        err("write KEY=FROM..TO:STEP, e.g. trip.p99_above=100ms..400ms:50ms".into())
    })?;
    let (from, rest) = range
        .split_once("..")
        .ok_or_else(|| err("the range needs FROM..TO:STEP".into()))?;
    let (to, step) = rest
        .split_once(':')
        .ok_or_else(|| err("the range needs :STEP".into()))?;
    let is_duration = from.trim().ends_with(|c: char| c.is_ascii_alphabetic());
    let parse = |s: &str| -> Result<f64, SimError> {
        if is_duration {
            humantime::parse_duration(s.trim())
                .map(|d| d.as_secs_f64())
                .map_err(|e| err(format!("`{s}`: {e}")))
        } else {
            s.trim()
                .parse::<f64>()
                .map_err(|_| err(format!("`{s}` is not a number")))
        }
    };
    let (a, b, st) = (parse(from)?, parse(to)?, parse(step)?);
    if st <= 0.0 || b < a || (b - a) / st > 1000.0 {
        return Err(err(
            "STEP must be positive, TO at least FROM, and at most 1000 values".into(),
        ));
    }
    let mut out = Vec::new();
    let mut v = a;
    while v <= b + st * 1e-9 {
        let value = if is_duration {
            toml::Value::String(format!("{}ms", (v * 1000.0 * 1000.0).round() / 1000.0))
        } else if v.fract() == 0.0 {
            toml::Value::Integer(v as i64)
        } else {
            toml::Value::Float(v)
        };
        let label = format!(
            "{}={}",
            key,
            value.as_str().map_or(value.to_string(), String::from)
        );
        let mut table: toml::Table = toml::from_str(&base.text).map_err(|e| err(e.to_string()))?;
        set_path(&mut table, key, value.clone()).map_err(err)?;
        let text = toml::to_string(&table).map_err(|e| err(e.to_string()))?;
        let policy = crate::config::policy::parse_text(&label, &base.path, &text)
            .map_err(|e| err(format!("{label}: {e}")))?;
        out.push((
            label.clone(),
            Resolved {
                name: label,
                path: base.path.clone(),
                text,
                policy,
            },
        ));
        v += st;
    }
    Ok(out)
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().ok_or("empty key")?;
    let mut t = table;
    for p in parts {
        t = t
            .entry(p.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a table in the policy"))?;
    }
    t.insert(last.to_owned(), value);
    Ok(())
}

/// Checks a run against the scenario's `[expect]` table; returns what is
/// not met. Keys: `shift` (bool), `fail_back` (bool), `first_rule`,
/// `max_backup_share_at_most`, `max_backup_share_at_least`, `flaps_at_most`,
/// `client_errors_at_most`, `weight_changes_at_most`, `detect_within_s`,
/// `client_p99_ms_at_most`, `slo_violations_at_most`.
pub fn check_expectations(sc: &Scenario, r: &SimRun, local: Option<&SimRun>) -> Vec<String> {
    let h = &r.headline;
    let mut unmet = Vec::new();
    for (k, v) in &sc.expect {
        let num = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        if let Some(ok) = fleet::expectation(k, num, r, local) {
            if !ok {
                unmet.push(format!("{k} = {v} (got: {})", fleet::summary(r, local)));
            }
            continue;
        }
        let ok = match (k.as_str(), v) {
            ("shift", toml::Value::Boolean(b)) => h.first_shift_at_s.is_some() == *b,
            ("fail_back", toml::Value::Boolean(b)) => h.time_to_fail_back_s.is_some() == *b,
            ("first_rule", toml::Value::String(s)) => h.first_rule.as_deref() == Some(s.as_str()),
            ("max_backup_share_at_most", _) => num.is_some_and(|n| h.max_backup_share <= n + 1e-9),
            ("max_backup_share_at_least", _) => num.is_some_and(|n| h.max_backup_share >= n - 1e-9),
            ("flaps_at_most", _) => num.is_some_and(|n| h.flaps as f64 <= n),
            ("client_errors_at_most", _) => num.is_some_and(|n| h.client_errors as f64 <= n),
            ("weight_changes_at_most", _) => num.is_some_and(|n| h.weight_changes as f64 <= n),
            ("client_p99_ms_at_most", _) => num.is_some_and(|n| h.client_p99_ms <= n),
            ("slo_violations_at_most", _) => num.is_some_and(|n| h.slo_violations as f64 <= n),
            ("detect_within_s", _) => {
                num.is_some_and(|n| h.time_to_detect_s.is_some_and(|d| d <= n))
            }
            _ => {
                unmet.push(format!("unknown expectation `{k}`"));
                continue;
            }
        };
        if !ok {
            unmet.push(format!("{k} = {v} (got: shift at {:?}, max share {:.2}, flaps {}, errors {}, changes {}, fail back {:?}, first rule {:?}, client p99 {:.1} ms, over SLO {})",
                h.first_shift_at_s, h.max_backup_share, h.flaps, h.client_errors, h.weight_changes, h.time_to_fail_back_s, h.first_rule, h.client_p99_ms, h.slo_violations));
        }
    }
    unmet
}
