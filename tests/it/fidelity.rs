//! Fidelity: one scenario run both ways, in the simulator and live (real
//! proxy, real time, a local backend with the same latency, the same
//! arrival times replayed by the load generator). They must agree: the
//! same rule fires first, and the first shift comes within two policy
//! intervals of each other.

use crate::common::*;
use portshift::backend::{self, BackendOpts, Mode};
use portshift::config::Config;
use portshift::proxy::Proxy;
use portshift::sim::{self, Scenario, SimOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const INTERVAL_S: f64 = 0.25;
const FAULT_AT_S: f64 = 3.0;

const POLICY: &str = r#"
interval = "250ms"
window = "1s"
min_samples = 10
[trip]
p99_above = "150ms"
for = 3
[shift]
step = 10
max = 50
cooldown = "250ms"
[recover]
p99_below = "50ms"
for = "2s"
"#;

const SCENARIO: &str = r#"
name = "fidelity"
duration = "8s"
tick = "250ms"
seed = 17
slo = "250ms"
policy = "policies/fast.toml"

[[group]]
name = "primary"
[[group.backend]]
workers = 1000
latency = { model = "constant", value = "5ms" }

[[group]]
name = "backup"
[[group.backend]]
workers = 1000
latency = { model = "constant", value = "5ms" }

[load]
model = "poisson"
rate = 150

[[fault]]
at = "3s"
until = "8s"
target = "primary"
latency_add = "295ms"

[measurement]
rtt = "100us"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_and_live_proxy_agree_on_the_first_shift() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/fast.toml"), POLICY).unwrap();
    let scenario_path = dir.path().join("fidelity.toml");
    std::fs::write(&scenario_path, SCENARIO).unwrap();

    // The simulator's prediction.
    let policy_file = dir.path().join("policies/fast.toml");
    let report = sim::run(&SimOptions {
        scenario: scenario_path.clone(),
        policies: vec![policy_file.to_str().unwrap().to_owned()],
        ..SimOptions::default()
    })
    .unwrap();
    let predicted = &report.runs[0].1.headline;
    let sim_detect = predicted
        .time_to_detect_s
        .expect("the simulator predicts a shift");
    let sim_rule = predicted.first_rule.clone().unwrap();

    // Live: same latency, same policy, same arrivals.
    let primary = backend::spawn(
        "127.0.0.1:0".parse().unwrap(),
        BackendOpts {
            name: "primary".into(),
            mode: Mode::Http,
            delay: Duration::from_millis(5),
            greeting: None,
        },
    )
    .await
    .unwrap();
    let backup = backend::spawn(
        "127.0.0.1:0".parse().unwrap(),
        BackendOpts {
            name: "backup".into(),
            mode: Mode::Http,
            delay: Duration::from_millis(5),
            greeting: None,
        },
    )
    .await
    .unwrap();
    let config_text = two_group_config(&[primary.addr()], &[backup.addr()], "policy = \"fast\"");
    let config = Config::load(&write_config(dir.path(), &config_text)).unwrap();
    let proxy = Proxy::bind(&config).unwrap();
    let addr = proxy.local_addrs()[0].1;
    let state = proxy.listener("l").unwrap();
    tokio::spawn(proxy.serve(std::future::pending()));
    let scenario = Scenario::load(&scenario_path).unwrap();
    let times = sim::engine::arrival_times(&scenario, scenario.seed);
    let stats = Arc::new(portshift::load::LoadStats::default());
    let stop = CancellationToken::new();
    let start = state.clock.now();
    let load = tokio::spawn(portshift::load::run_schedule(
        addr,
        times,
        stats.clone(),
        stop.clone(),
    ));
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs_f64(FAULT_AT_S))
        .await;
    primary.set_delay(Duration::from_millis(300));
    let fault_at = state.clock.now().as_secs_f64();
    let shift = loop {
        if let Some((_, d)) = state
            .decisions
            .since(0)
            .into_iter()
            .find(|(_, d)| d.action == "shift")
        {
            break d;
        }
        assert!(
            state.clock.now().as_secs_f64() - fault_at < 10.0,
            "the live proxy shifted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    stop.cancel();
    let _ = load.await;
    let live_detect = shift.uptime_s - fault_at;
    let live_rule = shift.rule.as_str();
    eprintln!(
        "first shift: simulated {sim_detect:.2}s after the fault ({sim_rule}), live {live_detect:.2}s ({live_rule}); load started at {:.2}s",
        start.as_secs_f64()
    );
    assert_eq!(live_rule, sim_rule, "the same rule fires first");
    assert!(
        (live_detect - sim_detect).abs() <= 2.0 * INTERVAL_S + 1e-9,
        "first shift within two intervals: simulated {sim_detect:.2}s, live {live_detect:.2}s"
    );
}
