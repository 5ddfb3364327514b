//! The simulator: shipped scenarios meet their expected outcomes, runs are
//! byte-identical for a seed, comparisons, sweeps, JSON, traces, limits.

use crate::common::*;
use portshift::sim::{self, SimOptions};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Every shipped scenario, under its own policy, meets its `[expect]`.
#[test]
fn shipped_scenarios_meet_their_expected_outcomes() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo_path("sim/")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let report = sim::run(&SimOptions {
            scenario: path.clone(),
            ..SimOptions::default()
        })
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            !report.scenario.expect.is_empty(),
            "{} states its expected outcome",
            path.display()
        );
        assert!(
            report.unmet.is_empty(),
            "{} (seed {}): {:?}",
            path.display(),
            report.scenario.seed,
            report.unmet
        );
        seen += 1;
    }
    assert!(seen >= 8, "the eight shipped scenarios: {seen}");
}

fn sim_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).arg("sim").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Same seed, same bytes: timelines, charts and the JSON document (less
/// its wall-clock time) are identical across two runs.
#[test]
fn same_seed_gives_byte_identical_outputs() {
    let scenario = repo_path("sim/latency-spike.toml");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut docs = Vec::new();
    for d in &dirs {
        let (code, stdout, stderr) = sim_cli(&[
            scenario.to_str().unwrap(),
            "--json",
            "--out",
            d.path().to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stderr}");
        let mut doc: Value = serde_json::from_str(&stdout).unwrap();
        doc.as_object_mut().unwrap().remove("wall_seconds");
        docs.push(doc);
    }
    assert_eq!(docs[0], docs[1], "the JSON documents match");
    let mut files: Vec<_> = std::fs::read_dir(dirs[0].path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        3,
        "timeline CSV, timeline JSON, chart SVG: {files:?}"
    );
    for f in files {
        let a = std::fs::read(dirs[0].path().join(&f)).unwrap();
        let b = std::fs::read(dirs[1].path().join(&f)).unwrap();
        assert!(a == b, "{f:?} differs between two runs with the same seed");
    }
    let svg = std::fs::read_to_string(dirs[0].path().join("chart-failover.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("traffic share per group"));
    let csv = std::fs::read_to_string(dirs[0].path().join("timeline-failover.csv")).unwrap();
    assert!(
        csv.starts_with("t_s,phase,requests,errors,client_p99_ms,primary_weight_pct"),
        "{}",
        &csv[..120]
    );
    assert_eq!(
        csv.lines().count(),
        361,
        "one row per 1s tick of a 6 minute run, plus the header"
    );
}

/// A different seed gives a different run (the seed is really used).
#[test]
fn different_seed_changes_the_run() {
    let scenario = repo_path("sim/latency-spike.toml");
    let doc = |seed: &str| -> Value {
        let (_, stdout, _) = sim_cli(&[scenario.to_str().unwrap(), "--json", "--seed", seed]);
        serde_json::from_str(&stdout).unwrap()
    };
    let (a, b) = (doc("1"), doc("2"));
    assert_eq!(a["header"]["seed"], 1);
    assert_ne!(
        a["policies"][0]["client_p99_ms"],
        b["policies"][0]["client_p99_ms"]
    );
}

/// Several policies side by side, and the JSON fields scripts rely on.
#[test]
fn compares_policies_and_reports_the_json_contract() {
    let scenario = repo_path("sim/latency-spike.toml");
    let (code, stdout, stderr) = sim_cli(&[
        scenario.to_str().unwrap(),
        "--policy",
        "failover",
        "--policy",
        "conservative",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert!(doc["requests_simulated"].as_u64().unwrap() > 100_000);
    assert!(doc["wall_seconds"].as_f64().is_some());
    assert_eq!(doc["header"]["seed"], 42);
    assert_eq!(doc["header"]["scenario"], "latency-spike");
    assert_eq!(doc["header"]["scenario_sha256"].as_str().unwrap().len(), 16);
    assert_eq!(doc["header"]["policies"].as_array().unwrap().len(), 2);
    let p = doc["policies"].as_array().unwrap();
    assert_eq!(
        (p[0]["policy"].as_str(), p[1]["policy"].as_str()),
        (Some("failover"), Some("conservative"))
    );
    for run in p {
        for key in [
            "first_shift_at_s",
            "max_backup_share",
            "slo_violations",
            "flaps",
            "time_to_detect_s",
            "client_p99_ms",
        ] {
            assert!(run.get(key).is_some(), "{key} in {run}");
        }
    }
    // The conservative policy moves at most half.
    assert!(p[1]["max_backup_share"].as_f64().unwrap() <= 0.5 + 1e-9);
    assert!(p[0]["max_backup_share"].as_f64().unwrap() > 0.5);
    let (_, table, _) = sim_cli(&[
        scenario.to_str().unwrap(),
        "--policy",
        "failover",
        "--policy",
        "conservative",
    ]);
    assert!(
        table.contains("failover") && table.contains("conservative") && table.contains("detect"),
        "{table}"
    );
}

/// --sweep runs one variant per value of a policy key.
#[test]
fn sweep_over_a_policy_key() {
    let scenario = repo_path("sim/latency-spike.toml");
    let (code, stdout, stderr) = sim_cli(&[
        scenario.to_str().unwrap(),
        "--sweep",
        "trip.p99_above=200ms..400ms:100ms",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    let runs = doc["sweep"]["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "trip.p99_above=200ms",
            "trip.p99_above=300ms",
            "trip.p99_above=400ms"
        ]
    );
    let (code, _, stderr) = sim_cli(&[
        scenario.to_str().unwrap(),
        "--sweep",
        "trip.p99_above=1..",
        "--json",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--sweep"), "{stderr}");
}

/// A bad scenario names file, line and column, exit 2.
#[test]
fn bad_scenario_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(repo_path("sim/latency-spike.toml"))
        .unwrap()
        .replace("target = \"primary\"", "target = \"primery\"");
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = sim_cli(&[path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("bad.toml:33:10: error: fault target `primery` is not a group"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `primary`?"), "{stderr}");
}

/// A black hole under a tiny event cap stops the run instead of hanging it.
#[test]
fn event_cap_bounds_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("capped.toml");
    let text = std::fs::read_to_string(repo_path("sim/latency-spike.toml"))
        .unwrap()
        .replace("latency_factor = 10.0", "black_hole = true")
        .replace("seed = 42", "seed = 42\nmax_events = 20000");
    std::fs::write(&path, text).unwrap();
    let report = sim::run(&SimOptions {
        scenario: path,
        ..SimOptions::default()
    })
    .unwrap();
    assert!(report.runs[0].1.truncated);
    assert!(report.runs[0].1.events <= 20_001);
    assert!(report.text.contains("event cap"));
}

/// A trace recorded by the proxy replays as the scenario's arrivals.
#[tokio::test]
async fn recorded_trace_replays_in_the_simulator() {
    let b = named_backend("b").await;
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("access.log");
    let writer = std::sync::Arc::new(portshift::access_log::AccessLog::create(&trace).unwrap());
    let config =
        portshift::config::Config::parse(Path::new("t.toml"), &two_group_config(&[b], &[b], ""))
            .unwrap();
    let p = portshift::proxy::Proxy::bind(&config).unwrap();
    let addr = p.local_addrs()[0].1;
    p.handle().set_trace(writer.clone());
    tokio::spawn(p.serve(std::future::pending()));
    for _ in 0..25 {
        assert_eq!(read_all(addr).await.unwrap(), b"b");
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    writer.flush();
    let text = std::fs::read_to_string(&trace).unwrap();
    assert_eq!(text.lines().count(), 25, "one line per connection:\n{text}");
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["listener"], "l", "{text}");
    assert_eq!(first["group"], "primary", "{text}");
    assert!(
        first["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{text}"
    );
    // The backend answers and closes first: it ended the connection.
    assert_eq!(first["outcome"], "closed", "{text}");
    assert_eq!(first["ended_by"], "upstream", "{text}");

    let scenario = dir.path().join("replay.toml");
    let sc = std::fs::read_to_string(repo_path("sim/latency-spike.toml"))
        .unwrap()
        .replace(
            "model = \"poisson\"\nrate = 300",
            "model = \"trace\"\nfile = \"access.log\"",
        );
    std::fs::write(&scenario, sc).unwrap();
    let report = sim::run(&SimOptions {
        scenario,
        ..SimOptions::default()
    })
    .unwrap();
    assert_eq!(
        report.runs[0].1.requests, 25,
        "every recorded arrival replayed"
    );
}

/// `[fleet] instances = 10`: deciding alone, the instances shift on their
/// own noisy windows and their weights drift apart; as one fleet they never
/// differ and none shifts before the fault. The same seed gives the same
/// figures.
#[test]
fn a_fleet_of_ten_diverges_alone_and_not_as_one() {
    let run = || {
        sim::run(&SimOptions {
            scenario: repo_path("sim/fleet-of-ten.toml"),
            ..SimOptions::default()
        })
        .unwrap()
    };
    let (a, b) = (run(), run());
    assert_eq!(a.doc["fleet"], b.doc["fleet"], "deterministic per seed");
    let f = &a.doc["fleet"];
    assert_eq!(f["instances"], 10);
    let early = |side: &str| {
        f[side]["early_shift"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.as_bool() == Some(true))
            .count()
    };
    assert!(early("local") >= 2, "{f}");
    assert_eq!(early("fleet"), 0, "{f}");
    assert!(
        f["local"]["max_spread_pct"].as_f64().unwrap() >= 50.0,
        "{f}"
    );
    assert_eq!(f["fleet"]["max_spread_pct"].as_f64().unwrap(), 0.0, "{f}");
    assert!(a.text.contains("fleet of 10 instances"), "{}", a.text);
    let shifted = |side: &str| {
        f[side]["first_shift_s"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t.is_f64())
            .count()
    };
    assert_eq!(
        shifted("fleet"),
        10,
        "every instance shifts for the real fault: {f}"
    );
}

/// Runs in parallel print what one thread prints, and `--seeds` gives
/// each headline figure's spread over the seeds.
#[test]
fn parallel_runs_match_a_sequential_one_and_seeds_give_spreads() {
    let scenario = repo_path("sim/latency-spike.toml");
    let run = |threads: &str| {
        let (code, stdout, stderr) = sim_cli(&[
            scenario.to_str().unwrap(),
            "--policy",
            "failover",
            "--policy",
            "canary",
            "--seeds",
            "4",
            "--threads",
            threads,
        ]);
        assert_eq!(code, 0, "{stderr}");
        // The wall time and throughput line differs from run to run.
        stdout
            .lines()
            .filter(|l| !l.contains("requests simulated in"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (one, two) = (run("1"), run("2"));
    assert_eq!(one, two, "two threads print what one prints");
    assert!(one.contains("failover over 4 seeds"), "{one}");
    let (code, stdout, stderr) = sim_cli(&[scenario.to_str().unwrap(), "--seeds", "3", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    let seeds = &doc["seeds"];
    assert_eq!(seeds["runs"].as_array().unwrap().len(), 3);
    let first = doc["header"]["seed"].as_u64().unwrap();
    assert_eq!(
        seeds["seeds"],
        serde_json::json!([first, first + 1, first + 2])
    );
    let p99 = &seeds["spread"]["p99"];
    assert_eq!(p99["runs"], 3);
    assert!(
        p99["min"].as_f64() <= p99["median"].as_f64()
            && p99["median"].as_f64() <= p99["max"].as_f64()
    );
    let (code, _, stderr) = sim_cli(&[scenario.to_str().unwrap(), "--seeds", "1"]);
    assert_eq!(code, 2, "at least two seeds: {stderr}");
}
