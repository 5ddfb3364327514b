//! Table-driven engine tests with explicit inputs and times, and proptest
//! invariants.

use super::*;
use crate::core::stats::Distribution;
use proptest::prelude::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `n` samples of `ms` milliseconds plus `failures` failures.
fn dist(ms: u64, n: u64, failures: u64) -> Distribution {
    let mut d = Distribution::empty();
    if n > 0 {
        d.hist.record_n((ms * 1000).max(1), n as u32).unwrap();
    }
    d.failures = failures;
    d
}

/// A group with `n` samples of `ms` and `failures` failed connects.
fn gi(ms: u64, n: u64, failures: u64) -> GroupInput {
    GroupInput {
        latency: dist(ms, n, failures),
        probe: Distribution::empty(),
        attempts: n + failures,
        failed: failures,
        active_connections: 0,
        new_connections_per_second: 0.0,
    }
}

/// The shipped failover policy's shape: p99 above 250 ms or errors above 5%
/// for 3 evaluations; 10% steps every 2 s up to 100%; back below 150 ms held
/// 30 s, 10% steps.
fn failover() -> Policy {
    Policy {
        name: "failover".into(),
        interval: secs(1),
        window: None,
        signal: Signal::Exchange,
        min_samples: 20,
        no_data: NoData::Hold,
        dry_run: false,
        trip: Trip {
            above: vec![(Quantile::P99, Duration::from_millis(250))],
            error_rate_above: Some(0.05),
            ..Trip::default()
        },
        counting: Counting::Consecutive(3),
        mode: Mode::Failover {
            shift: Shift {
                step_bp: 1000,
                max_bp: 10_000,
                cooldown: secs(2),
            },
            recover: Recover {
                below: vec![(Quantile::P99, Duration::from_millis(150))],
                error_rate_below: Some(0.01),
                hold: secs(30),
                step_bp: 1000,
                cooldown: secs(2),
                probe_min_samples: 3,
            },
        },
    }
}

fn canary() -> Policy {
    Policy {
        name: "canary".into(),
        trip: Trip::default(),
        mode: Mode::Canary(Canary {
            steps_bp: vec![100, 500, 1000, 2500, 5000, 10_000],
            hold: secs(10),
            max_ratio: 1.5,
            quantile: Quantile::P99,
            max_error_rate_increase: 0.01,
        }),
        ..failover()
    }
}

/// Evaluates once a second for `seconds`; returns every decision.
fn simulate(
    policy: Policy,
    seconds: u64,
    inputs: impl Fn(u64) -> Vec<GroupInput>,
) -> Vec<Decision> {
    let first = inputs(0);
    let engine = Engine::new(policy);
    let mut state = PolicyState::new(&engine.policy, first.len());
    (0..seconds)
        .map(|t| engine.evaluate(secs(t), &inputs(t), &mut state))
        .collect()
}

/// Backup share (basis points) after each evaluation.
fn backup_share(ds: &[Decision]) -> Vec<u16> {
    ds.iter()
        .map(|d| 10_000 - d.weights.as_slice()[0])
        .collect()
}

#[test]
fn healthy_primary_keeps_all_traffic() {
    let ds = simulate(failover(), 100, |_| vec![gi(100, 500, 0), gi(50, 0, 0)]);
    assert!(
        ds.iter()
            .all(|d| d.action == Action::Hold && d.phase == Phase::Healthy)
    );
}

#[test]
fn slow_primary_shifts_ten_percent_per_step_after_three_bad() {
    let ds = simulate(failover(), 25, |_| vec![gi(300, 500, 0), gi(50, 100, 0)]);
    let share = backup_share(&ds);
    assert_eq!(&share[..7], &[0, 0, 1000, 1000, 2000, 2000, 3000]);
    assert_eq!(share[20], 10_000, "up to max");
    let first = &ds[2];
    assert_eq!(
        first.action,
        Action::Shift {
            from: 0,
            to: 1,
            bp: 1000
        }
    );
    assert_eq!(first.rule, "p99_above");
    assert_eq!((first.bad, first.bad_needed), (3, 3));
    let r = first
        .reasons
        .iter()
        .find(|r| r.rule == "p99_above")
        .unwrap();
    assert!(
        r.fired && (r.value - 0.3).abs() < 0.01 && (r.threshold - 0.25).abs() < 1e-9,
        "{r:?}"
    );
}

#[test]
fn too_few_samples_never_trip() {
    let ds = simulate(failover(), 30, |_| vec![gi(10_000, 5, 0), gi(50, 100, 0)]);
    assert!(backup_share(&ds).iter().all(|&s| s == 0));
}

#[test]
fn failing_fast_does_not_look_fast() {
    // 94 quick replies and 6 refused connects: p99 is a failure.
    let ds = simulate(failover(), 5, |_| vec![gi(1, 94, 6), gi(50, 100, 0)]);
    assert_eq!(backup_share(&ds)[2], 1000);
    let r = ds[2]
        .reasons
        .iter()
        .find(|r| r.rule == "p99_above")
        .unwrap();
    assert!(r.value.is_infinite() && r.fired);
    assert!(
        ds[2]
            .reasons
            .iter()
            .any(|r| r.rule == "error_rate_above" && r.fired)
    );
}

#[test]
fn never_shifts_into_a_worse_group() {
    let ds = simulate(failover(), 20, |_| vec![gi(300, 500, 0), gi(400, 500, 0)]);
    assert!(backup_share(&ds).iter().all(|&s| s == 0));
    assert!(ds[5].reasons.iter().any(|r| r.rule == "no_eligible_backup"));
}

#[test]
fn cascades_to_second_backup_when_first_trips() {
    // The first backup is fine until t=10, then as slow as the primary.
    let ds = simulate(failover(), 40, |t| {
        let b1 = if t < 10 {
            gi(50, 100, 0)
        } else {
            gi(600, 100, 0)
        };
        vec![gi(300, 500, 0), b1, gi(40, 100, 0)]
    });
    let last = ds.last().unwrap().weights.as_slice().to_vec();
    assert_eq!(last[1], 0, "the first backup passed its share on: {last:?}");
    assert!(last[2] > 0, "{last:?}");
    assert!(ds.iter().any(|d| d.rule.label().starts_with("cascade.")
        && d.action
            == Action::Shift {
                from: 1,
                to: 2,
                bp: 1000
            }));
}

#[test]
fn recovery_needs_the_lower_bar_held_then_returns_gradually() {
    // Slow until 10 s, in the hysteresis band (200 ms) until 50 s, then good.
    let ds = simulate(failover(), 140, |t| {
        let p = match t {
            0..10 => gi(300, 500, 0),
            10..50 => gi(200, 500, 0),
            _ => gi(100, 500, 0),
        };
        vec![p, gi(50, 100, 0)]
    });
    let share = backup_share(&ds);
    assert_eq!(share[9], 4000);
    assert!(
        share[10..80].iter().all(|&s| s == 4000),
        "holds in the band and while the bar is held"
    );
    assert_eq!(
        ds[80].action,
        Action::Recover {
            from: 1,
            to: 0,
            bp: 1000
        }
    );
    assert_eq!(share[80], 3000);
    assert_eq!(share[82], 2000, "one step per cooldown");
    assert_eq!(share[86], 0);
    assert_eq!(ds[86].phase, Phase::Healthy);
}

#[test]
fn fully_failed_over_primary_recovers_through_its_probes() {
    // The primary is slow until 30 s; it then has no traffic at all, and
    // its probes show 300 ms until 60 s, then 20 ms.
    let ds = simulate(failover(), 140, |t| {
        let mut p = if t < 30 { gi(300, 500, 0) } else { gi(0, 0, 0) };
        p.probe = dist(if t < 60 { 300 } else { 20 }, 10, 0);
        vec![p, gi(50, 500, 0)]
    });
    let share = backup_share(&ds);
    assert_eq!(share[25], 10_000, "fully failed over");
    assert!(
        share[30..90].iter().all(|&s| s == 10_000),
        "no return while the probes are slow"
    );
    assert_eq!(ds[59].phase, Phase::Tripped);
    assert_eq!(ds[70].phase, Phase::Recovering);
    assert_eq!(
        ds[90].action,
        Action::Recover {
            from: 1,
            to: 0,
            bp: 1000
        }
    );
    assert_eq!(share[108], 0);
}

#[test]
fn bad_of_last_counts_intermittent_slowness() {
    let policy = Policy {
        counting: Counting::BadOfLast { bad: 3, of: 5 },
        ..failover()
    };
    let ds = simulate(policy, 6, |t| {
        vec![
            if t % 2 == 0 {
                gi(300, 500, 0)
            } else {
                gi(100, 500, 0)
            },
            gi(50, 100, 0),
        ]
    });
    assert_eq!(backup_share(&ds), vec![0, 0, 0, 0, 1000, 1000]);
}

#[test]
fn load_above_threshold_moves_overflow() {
    let mut policy = failover();
    policy.trip = Trip {
        active_connections_above: Some(100),
        ..Trip::default()
    };
    let ds = simulate(policy, 5, |_| {
        let mut p = gi(10, 500, 0);
        p.active_connections = 150;
        vec![p, gi(10, 100, 0)]
    });
    assert_eq!(backup_share(&ds)[2], 1000);
    assert_eq!(ds[2].rule, "active_connections_above");
}

#[test]
fn relative_trip_compares_with_the_backup() {
    let mut policy = failover();
    policy.trip = Trip {
        worse_than_backup: Some(2.0),
        ..Trip::default()
    };
    let twice = simulate(policy.clone(), 4, |_| {
        vec![gi(300, 500, 0), gi(100, 500, 0)]
    });
    assert_eq!(backup_share(&twice)[2], 1000);
    let similar = simulate(policy, 4, |_| vec![gi(300, 500, 0), gi(200, 500, 0)]);
    assert!(
        backup_share(&similar).iter().all(|&s| s == 0),
        "everything slow: nowhere better to go"
    );
}

#[test]
fn canary_ramps_through_steps_and_is_promoted() {
    let ds = simulate(canary(), 70, |_| vec![gi(100, 500, 0), gi(110, 100, 0)]);
    let share = backup_share(&ds);
    assert_eq!(
        (
            share[0], share[9], share[10], share[20], share[30], share[40], share[50]
        ),
        (100, 100, 500, 1000, 2500, 5000, 10_000)
    );
    assert_eq!(ds[60].action, Action::CanaryPromote);
    assert_eq!(ds[69].phase, Phase::CanaryPromoted);
    assert_eq!(share[69], 10_000);
}

#[test]
fn canary_worse_than_baseline_rolls_back() {
    let ds = simulate(canary(), 40, |t| {
        vec![
            gi(100, 500, 0),
            if t < 15 {
                gi(110, 100, 0)
            } else {
                gi(300, 100, 0)
            },
        ]
    });
    let share = backup_share(&ds);
    assert_eq!(share[14], 500);
    assert_eq!(ds[17].action, Action::CanaryRollback);
    assert_eq!(ds[17].rule, "canary.p99_ratio_above");
    assert!(share[17..].iter().all(|&s| s == 0));
    assert_eq!(ds[39].phase, Phase::CanaryRolledBack);
}

#[test]
fn canary_waits_for_evidence() {
    let ds = simulate(canary(), 40, |_| vec![gi(100, 500, 0), gi(100, 3, 0)]);
    assert!(
        backup_share(&ds).iter().all(|&s| s == 100),
        "never advances on silence"
    );
}

#[test]
fn dry_run_is_marked_on_every_decision() {
    let policy = Policy {
        dry_run: true,
        ..failover()
    };
    let ds = simulate(policy, 5, |_| vec![gi(300, 500, 0), gi(50, 100, 0)]);
    assert!(ds.iter().all(|d| d.dry_run));
    assert!(ds[2].changed(), "the engine still says what it would do");
}

prop_compose! {
    fn arb_group()(ms in 1u64..1000, n in 0u64..200, failures in 0u64..20, active in 0u64..300) -> GroupInput {
        let mut g = gi(ms, n, failures);
        g.active_connections = active;
        g
    }
}

fn loaded_policy() -> Policy {
    let mut p = failover();
    p.trip.active_connections_above = Some(200);
    p.trip.worse_than_backup = Some(3.0);
    p
}

proptest! {
    /// Weights always sum to 10000 (asserted inside the engine) whatever
    /// the input sequence, in both modes.
    #[test]
    fn any_input_sequence_keeps_weights_valid(seq in prop::collection::vec(prop::collection::vec(arb_group(), 3), 1..80), canary_mode in any::<bool>()) {
        let policy = if canary_mode { canary() } else { loaded_policy() };
        let engine = Engine::new(policy);
        let mut state = PolicyState::new(&engine.policy, 3);
        for (t, inputs) in seq.iter().enumerate() {
            let d = engine.evaluate(secs(t as u64), inputs, &mut state);
            prop_assert_eq!(d.weights.as_slice().iter().map(|&w| u32::from(w)).sum::<u32>(), 10_000);
        }
    }

    /// Under steady input the weights settle: no change in the last 100 of
    /// 300 evaluations.
    #[test]
    fn steady_input_settles(inputs in prop::collection::vec(arb_group(), 3)) {
        let engine = Engine::new(loaded_policy());
        let mut state = PolicyState::new(&engine.policy, 3);
        let ds: Vec<Decision> = (0..300).map(|t| engine.evaluate(secs(t), &inputs, &mut state)).collect();
        prop_assert!(ds[200..].iter().all(|d| !d.changed()), "still moving: {:?}", ds.last().unwrap().weights);
    }

    /// A healthy primary never loses traffic, whatever the backups do.
    #[test]
    fn healthy_primary_never_loses_traffic(seq in prop::collection::vec((1u64..240, 20u64..500, 0u64..200, arb_group()), 1..100)) {
        let engine = Engine::new(loaded_policy());
        let mut state = PolicyState::new(&engine.policy, 2);
        for (t, (ms, n, active, backup)) in seq.into_iter().enumerate() {
            let mut primary = gi(ms, n, 0);
            primary.active_connections = active;
            let backup = GroupInput { latency: dist(ms.max(1), 100, 0), ..backup };
            let d = engine.evaluate(secs(t as u64), &[primary, backup], &mut state);
            prop_assert_eq!(d.weights.as_slice()[0], 10_000);
        }
    }
}
