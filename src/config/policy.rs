//! Policy files (`policies/NAME.toml`): raw serde types and validation into
//! `core::policy::Policy`, with the same file:line:column diagnostics as the
//! main config.

use super::diagnostic::{Reporter, did_you_mean};
use super::raw::S;
use crate::core::policy::{Canary, Counting, Mode, NoData, Policy, Quantile, Recover, Shift, Trip};
use crate::core::routes::TOTAL_BP;
use crate::core::stats::Signal;
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

/// Shortest evaluation interval: below this, windows hold too few samples
/// for any quantile to mean something.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Defaults for a failover policy that leaves a key out.
const DEFAULT_MIN_SAMPLES: u64 = 20;
const DEFAULT_FOR: u32 = 3;
const DEFAULT_STEP_PCT: f64 = 10.0;
const DEFAULT_RECOVER_HOLD: Duration = Duration::from_secs(30);
/// Without explicit recovery bars, the primary must fall to this fraction
/// of each trip threshold: the hysteresis that prevents flapping.
const DEFAULT_RECOVER_FRACTION: f64 = 0.6;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    mode: Option<S<String>>,
    interval: Option<S<String>>,
    window: Option<S<String>>,
    sub_windows: Option<S<u32>>,
    signal: Option<S<String>>,
    min_samples: Option<S<u64>>,
    no_data: Option<S<String>>,
    #[serde(default)]
    dry_run: bool,
    trip: Option<S<RawTrip>>,
    shift: Option<S<RawShift>>,
    recover: Option<S<RawRecover>>,
    canary: Option<S<RawCanary>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTrip {
    p50_above: Option<S<String>>,
    p90_above: Option<S<String>>,
    p99_above: Option<S<String>>,
    p999_above: Option<S<String>>,
    error_rate_above: Option<S<f64>>,
    worse_than_backup: Option<S<f64>>,
    relative_quantile: Option<S<String>>,
    active_connections_above: Option<S<u64>>,
    new_connections_per_second_above: Option<S<f64>>,
    #[serde(rename = "for")]
    for_: Option<S<u32>>,
    bad_of_last: Option<S<Vec<u32>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShift {
    step: Option<S<f64>>,
    max: Option<S<f64>>,
    cooldown: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecover {
    p50_below: Option<S<String>>,
    p90_below: Option<S<String>>,
    p99_below: Option<S<String>>,
    p999_below: Option<S<String>>,
    error_rate_below: Option<S<f64>>,
    #[serde(rename = "for")]
    for_: Option<S<String>>,
    step: Option<S<f64>>,
    cooldown: Option<S<String>>,
    probe_min_samples: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCanary {
    steps: S<Vec<f64>>,
    hold: Option<S<String>>,
    max_ratio: Option<S<f64>>,
    quantile: Option<S<String>>,
    max_error_rate_increase: Option<S<f64>>,
}

/// Reads and validates the policy at `path`, named `name`; problems go
/// into `out` with the policy file's own line and column.
pub fn load(name: &str, path: &Path, out: &mut Vec<super::Diagnostic>) -> Option<Policy> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let mut rep = Reporter::new(path, "");
            rep.error_file(format!("cannot read policy: {e}"), None);
            out.extend(rep.diagnostics);
            return None;
        }
    };
    let mut rep = Reporter::new(path, &text);
    let policy = parse(name, &text, &mut rep);
    out.extend(rep.diagnostics);
    policy
}

/// Parses and validates policy `text` (named `name`, read from `path`).
pub fn parse_text(name: &str, path: &Path, text: &str) -> Result<Policy, super::ConfigError> {
    let mut rep = Reporter::new(path, text);
    match parse(name, text, &mut rep) {
        Some(p) => Ok(p),
        None => Err(super::ConfigError {
            diagnostics: rep.diagnostics,
        }),
    }
}

/// Parses policy `text`; `None` when anything was reported.
pub fn parse(name: &str, text: &str, rep: &mut Reporter<'_>) -> Option<Policy> {
    let raw: RawPolicy = rep.parse_toml(text)?;
    let before = rep.diagnostics.len();
    let policy = PolicyValidator { rep }.policy(name, raw);
    (rep.diagnostics.len() == before).then_some(policy)
}

struct PolicyValidator<'r, 'a> {
    rep: &'r mut Reporter<'a>,
}

impl PolicyValidator<'_, '_> {
    fn policy(&mut self, name: &str, raw: RawPolicy) -> Policy {
        let interval = self.duration(raw.interval.as_ref(), "interval", Duration::from_secs(1));
        if interval < MIN_INTERVAL {
            let span = raw.interval.as_ref().map_or(0..0, |s| s.span());
            self.rep.error(
                span,
                "`interval` is shorter than 10ms",
                Some("evaluate at most every 10ms".into()),
            );
        }
        let signal = self.signal(raw.signal.as_ref());
        let no_data = self.no_data(raw.no_data.as_ref());
        let raw_trip = raw.trip.as_ref().map(|t| t.get_ref());
        let (trip, counting) = self.trip(raw_trip.unwrap_or(&RawTrip::default()));
        let is_canary = match raw.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "failover")) => false,
            Some((_, "canary")) => true,
            Some((m, other)) => {
                self.rep.error(
                    m.span(),
                    format!("unknown mode `{other}`"),
                    did_you_mean(other, ["failover", "canary"]),
                );
                false
            }
        };
        let mode = if is_canary {
            self.canary_mode(&raw)
        } else {
            self.failover_mode(&raw, &trip, interval)
        };
        let window = self.window(&raw);
        Policy {
            name: name.to_owned(),
            interval,
            window,
            signal,
            min_samples: raw
                .min_samples
                .map_or(DEFAULT_MIN_SAMPLES, |m| *m.get_ref()),
            no_data,
            dry_run: raw.dry_run,
            trip,
            counting,
            mode,
        }
    }

    /// `no_data`: what an evaluation without enough samples counts as.
    fn no_data(&mut self, raw: Option<&S<String>>) -> NoData {
        match raw.map(|s| (s, s.get_ref().as_str())) {
            None | Some((_, "hold")) => NoData::Hold,
            Some((_, "good")) => NoData::Good,
            Some((s, other)) => {
                let hint = if other == "bad" || other == "trip" {
                    Some("silence never trips: use \"hold\" (default) or \"good\"".into())
                } else {
                    did_you_mean(other, ["hold", "good"])
                };
                self.rep
                    .error(s.span(), format!("unknown `no_data` value `{other}`"), hint);
                NoData::Hold
            }
        }
    }

    /// The policy's own `window` and `sub_windows`, if it sets one.
    fn window(&mut self, raw: &RawPolicy) -> Option<crate::core::stats::WindowConfig> {
        raw.window.as_ref().map(|w| {
            let span = self.duration(Some(w), "window", Duration::from_secs(10));
            let slots = raw
                .sub_windows
                .as_ref()
                .map_or(10, |n| (*n.get_ref()).clamp(1, 120));
            let slot = span / slots;
            if slot < super::MIN_SUB_WINDOW {
                self.rep.error(
                    w.span(),
                    format!(
                        "`window` / `sub_windows` gives sub-windows of {}",
                        super::describe::duration(slot)
                    ),
                    Some("each sub-window must be at least 10ms".into()),
                );
            }
            crate::core::stats::WindowConfig {
                slots: slots as usize,
                slot,
            }
        })
    }

    fn signal(&mut self, raw: Option<&S<String>>) -> Signal {
        let Some(raw) = raw else {
            return Signal::Exchange;
        };
        match Signal::ALL.iter().find(|s| s.name() == raw.get_ref()) {
            Some(s) => *s,
            None => {
                let names = Signal::ALL.map(|s| s.name());
                self.rep.error(
                    raw.span(),
                    format!("unknown signal `{}`", raw.get_ref()),
                    did_you_mean(raw.get_ref(), names),
                );
                Signal::Exchange
            }
        }
    }

    fn trip(&mut self, t: &RawTrip) -> (Trip, Counting) {
        let keys = [
            (Quantile::P50, &t.p50_above),
            (Quantile::P90, &t.p90_above),
            (Quantile::P99, &t.p99_above),
            (Quantile::P999, &t.p999_above),
        ];
        let above = keys
            .into_iter()
            .filter_map(|(q, v)| {
                v.as_ref().map(|v| {
                    (
                        q,
                        self.duration(Some(v), &format!("trip.{}_above", q.name()), Duration::ZERO),
                    )
                })
            })
            .collect();
        let trip = Trip {
            above,
            error_rate_above: t
                .error_rate_above
                .as_ref()
                .map(|r| self.ratio(r, "trip.error_rate_above")),
            worse_than_backup: t.worse_than_backup.as_ref().map(|k| {
                if *k.get_ref() <= 1.0 {
                    self.rep.error(
                        k.span(),
                        format!("`worse_than_backup` is {}; it must be above 1", k.get_ref()),
                        Some(
                            "e.g. 2.0: trip when the primary is twice as slow as the backup".into(),
                        ),
                    );
                }
                *k.get_ref()
            }),
            relative_quantile: t.relative_quantile.as_ref().map(|q| self.quantile(q)),
            active_connections_above: t.active_connections_above.as_ref().map(|v| *v.get_ref()),
            new_connections_per_second_above: t
                .new_connections_per_second_above
                .as_ref()
                .map(|v| *v.get_ref()),
        };
        (trip, self.counting(t))
    }

    /// How bad evaluations trip: `for` in a row, or `bad_of_last` M of N.
    fn counting(&mut self, t: &RawTrip) -> Counting {
        match (&t.for_, &t.bad_of_last) {
            (Some(f), Some(_)) => {
                self.rep.error(
                    f.span(),
                    "`for` and `bad_of_last` both set",
                    Some("choose one way of counting bad evaluations".into()),
                );
                Counting::Consecutive(DEFAULT_FOR)
            }
            (Some(f), None) if (1..=1000).contains(f.get_ref()) => {
                Counting::Consecutive(*f.get_ref())
            }
            (Some(f), None) => {
                self.rep.error(
                    f.span(),
                    format!("`for` is {}; it must be 1 to 1000 evaluations", f.get_ref()),
                    None,
                );
                Counting::Consecutive(DEFAULT_FOR)
            }
            (None, Some(b)) => match b.get_ref().as_slice() {
                &[bad, of] if bad >= 1 && bad <= of && of <= 64 => Counting::BadOfLast { bad, of },
                _ => {
                    self.rep.error(
                        b.span(),
                        "`bad_of_last` must be [M, N] with 1 <= M <= N <= 64",
                        Some("e.g. [3, 5]: trip when 3 of the last 5 evaluations were bad".into()),
                    );
                    Counting::Consecutive(DEFAULT_FOR)
                }
            },
            (None, None) => Counting::Consecutive(DEFAULT_FOR),
        }
    }

    fn failover_mode(&mut self, raw: &RawPolicy, trip: &Trip, interval: Duration) -> Mode {
        if let Some(c) = &raw.canary {
            self.rep.error(
                c.span(),
                "`[canary]` belongs to a canary policy",
                Some("add mode = \"canary\", or remove [canary]".into()),
            );
        }
        let no_condition = trip.above.is_empty()
            && trip.error_rate_above.is_none()
            && trip.worse_than_backup.is_none()
            && trip.active_connections_above.is_none()
            && trip.new_connections_per_second_above.is_none();
        if no_condition {
            let span = raw.trip.as_ref().map_or(0..0, |t| t.span());
            self.rep.error(
                span,
                "a failover policy needs at least one trip condition",
                Some(
                    "add e.g. p99_above = \"250ms\" or error_rate_above = 0.05 under [trip]".into(),
                ),
            );
        }
        let s = raw.shift.as_ref().map(|s| s.get_ref());
        let step = s
            .and_then(|s| s.step.as_ref())
            .map_or(pct_bp(DEFAULT_STEP_PCT), |v| self.percent(v, "shift.step"));
        let max = s
            .and_then(|s| s.max.as_ref())
            .map_or(TOTAL_BP, |v| self.percent(v, "shift.max"));
        let cooldown = self.duration(
            s.and_then(|s| s.cooldown.as_ref()),
            "shift.cooldown",
            interval,
        );
        let shift = Shift {
            step_bp: step,
            max_bp: max,
            cooldown,
        };
        let recover = self.recover(raw.recover.as_ref(), trip, &shift);
        Mode::Failover { shift, recover }
    }

    fn recover(&mut self, raw: Option<&S<RawRecover>>, trip: &Trip, shift: &Shift) -> Recover {
        let r = raw.map(|r| r.get_ref());
        let below = self.recover_below(r, trip);
        let error_rate_below = self.recover_error_rate(r, trip);
        let step = r
            .and_then(|r| r.step.as_ref())
            .map_or(shift.step_bp, |v| self.percent(v, "recover.step"));
        Recover {
            below,
            error_rate_below,
            hold: self.duration(
                r.and_then(|r| r.for_.as_ref()),
                "recover.for",
                DEFAULT_RECOVER_HOLD,
            ),
            step_bp: step,
            cooldown: self.duration(
                r.and_then(|r| r.cooldown.as_ref()),
                "recover.cooldown",
                shift.cooldown,
            ),
            probe_min_samples: r
                .and_then(|r| r.probe_min_samples.as_ref())
                .map_or(3, |v| (*v.get_ref()).max(1)),
        }
    }

    /// `recover.pNN_below`: each below its trip bar (hysteresis); by
    /// default a fraction of the trip bars.
    fn recover_below(&mut self, r: Option<&RawRecover>, trip: &Trip) -> Vec<(Quantile, Duration)> {
        let keys = r.map(|r| {
            [
                (Quantile::P50, &r.p50_below),
                (Quantile::P90, &r.p90_below),
                (Quantile::P99, &r.p99_below),
                (Quantile::P999, &r.p999_below),
            ]
        });
        let mut below = Vec::new();
        for (q, v) in keys.into_iter().flatten() {
            let Some(v) = v else { continue };
            let d = self.duration(
                Some(v),
                &format!("recover.{}_below", q.name()),
                Duration::ZERO,
            );
            let trip_bar = trip
                .above
                .iter()
                .find(|(tq, _)| *tq == q)
                .map(|(_, above)| *above);
            if let Some(above) = trip_bar
                && d >= above
            {
                self.rep.error(
                    v.span(),
                    format!("recovery bar {} is not below the trip threshold {}", super::describe::duration(d), super::describe::duration(above)),
                    Some("recover below a lower bar than the one that trips (hysteresis), or the policy flaps".into()),
                );
            }
            below.push((q, d));
        }
        if below.is_empty() {
            below = trip
                .above
                .iter()
                .map(|&(q, d)| (q, d.mul_f64(DEFAULT_RECOVER_FRACTION)))
                .collect();
        }
        below
    }

    /// `recover.error_rate_below`: positive and below the trip rate; by
    /// default a fraction of it.
    fn recover_error_rate(&mut self, r: Option<&RawRecover>, trip: &Trip) -> Option<f64> {
        match r.and_then(|r| r.error_rate_below.as_ref()) {
            Some(v) => {
                let rate = self.ratio(v, "recover.error_rate_below");
                if rate == 0.0 {
                    self.rep.error(
                        v.span(),
                        "`error_rate_below = 0` can never be met",
                        Some("use a small positive rate such as 0.001".into()),
                    );
                }
                if trip.error_rate_above.is_some_and(|above| rate > above) {
                    self.rep.error(
                        v.span(),
                        "recovery error rate is above the trip error rate",
                        Some("recover below a lower bar than the one that trips".into()),
                    );
                }
                Some(rate)
            }
            None => trip.error_rate_above.map(|e| e * DEFAULT_RECOVER_FRACTION),
        }
    }

    fn canary_mode(&mut self, raw: &RawPolicy) -> Mode {
        for (key, span) in [
            ("shift", raw.shift.as_ref().map(|s| s.span())),
            ("recover", raw.recover.as_ref().map(|s| s.span())),
        ] {
            if let Some(span) = span {
                self.rep.error(
                    span,
                    format!("`[{key}]` belongs to a failover policy"),
                    Some("a canary ramps through [canary] steps instead".into()),
                );
            }
        }
        let Some(c) = &raw.canary else {
            self.rep.error_file(
                "a canary policy needs a [canary] table",
                Some("add [canary] with steps = [1, 5, 10, 25, 50, 100]".into()),
            );
            return Mode::Canary(Canary {
                steps_bp: vec![TOTAL_BP],
                hold: Duration::from_secs(30),
                max_ratio: 1.5,
                quantile: Quantile::P99,
                max_error_rate_increase: 0.01,
            });
        };
        let c = c.get_ref();
        let steps: Vec<u32> = c.steps.get_ref().iter().map(|&p| pct_bp(p)).collect();
        let ascending = steps.windows(2).all(|w| w[0] < w[1]);
        let in_range = c.steps.get_ref().iter().all(|&p| p > 0.0 && p <= 100.0);
        if steps.is_empty() || !ascending || !in_range || steps.last() != Some(&TOTAL_BP) {
            self.rep.error(
                c.steps.span(),
                "canary `steps` must rise from above 0 to exactly 100 percent",
                Some("e.g. steps = [1, 5, 10, 25, 50, 100]".into()),
            );
        }
        let max_ratio = c.max_ratio.as_ref().map_or(1.5, |r| {
            if *r.get_ref() < 1.0 {
                self.rep.error(
                    r.span(),
                    "`max_ratio` below 1 would fail a canary as fast as the baseline",
                    Some("e.g. 1.5: the canary may be 50% slower".into()),
                );
            }
            *r.get_ref()
        });
        Mode::Canary(Canary {
            steps_bp: steps,
            hold: self.duration(c.hold.as_ref(), "canary.hold", Duration::from_secs(30)),
            max_ratio,
            quantile: c
                .quantile
                .as_ref()
                .map_or(Quantile::P99, |q| self.quantile(q)),
            max_error_rate_increase: c
                .max_error_rate_increase
                .as_ref()
                .map_or(0.01, |r| self.ratio(r, "canary.max_error_rate_increase")),
        })
    }

    fn quantile(&mut self, raw: &S<String>) -> Quantile {
        match Quantile::ALL.iter().find(|q| q.name() == raw.get_ref()) {
            Some(q) => *q,
            None => {
                let names = Quantile::ALL.map(|q| q.name());
                self.rep.error(
                    raw.span(),
                    format!("unknown quantile `{}`", raw.get_ref()),
                    did_you_mean(raw.get_ref(), names),
                );
                Quantile::P99
            }
        }
    }

    fn ratio(&mut self, raw: &S<f64>, key: &str) -> f64 {
        let v = *raw.get_ref();
        if !(0.0..=1.0).contains(&v) {
            self.rep.error(
                raw.span(),
                format!("`{key}` is {v}; it is a ratio from 0 to 1"),
                Some("5% is written 0.05".into()),
            );
        }
        v.clamp(0.0, 1.0)
    }

    fn percent(&mut self, raw: &S<f64>, key: &str) -> u32 {
        let v = *raw.get_ref();
        if !(v > 0.0 && v <= 100.0) {
            self.rep.error(
                raw.span(),
                format!("`{key}` is {v}; it is a percentage above 0 and at most 100"),
                None,
            );
            return pct_bp(DEFAULT_STEP_PCT);
        }
        pct_bp(v).max(1)
    }

    fn duration(&mut self, raw: Option<&S<String>>, key: &str, default: Duration) -> Duration {
        raw.and_then(|r| self.rep.duration(r, key, true))
            .unwrap_or(default)
    }
}

fn pct_bp(pct: f64) -> u32 {
    ((pct * 100.0).round() as u32).min(TOTAL_BP)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(text: &str, want: &str) {
        let mut rep = Reporter::new(Path::new("p.toml"), text);
        assert!(parse("p", text, &mut rep).is_none(), "accepted: {text}");
        let all: Vec<String> = rep.diagnostics.iter().map(|d| d.to_string()).collect();
        assert!(
            all.iter().any(|d| d.contains(want)),
            "want {want:?} in {all:?}"
        );
    }

    fn ok(text: &str) -> Policy {
        let mut rep = Reporter::new(Path::new("p.toml"), text);
        parse("p", text, &mut rep).unwrap_or_else(|| panic!("{:?}", rep.diagnostics))
    }

    #[test]
    fn defaults_give_hysteresis() {
        let p = ok("[trip]\np99_above = \"250ms\"\n");
        let Mode::Failover { shift, recover } = p.mode else {
            panic!()
        };
        assert_eq!((shift.step_bp, shift.max_bp), (1000, 10_000));
        assert_eq!(
            recover.below,
            vec![(Quantile::P99, Duration::from_millis(150))]
        );
        assert_eq!(p.counting, Counting::Consecutive(3));
    }

    #[test]
    fn bad_policies_say_what_and_where() {
        check_err(
            "[trip]\np99_above = \"250ms\"\n[recover]\np99_below = \"300ms\"\n",
            "p.toml:4:13: error: recovery bar 300ms is not below the trip threshold 250ms",
        );
        check_err(
            "[trip]\np99_abve = \"250ms\"\n",
            "did you mean `p99_above`?",
        );
        check_err(
            "[trip]\nerror_rate_above = 5\n",
            "it is a ratio from 0 to 1",
        );
        check_err(
            "interval = \"1ms\"\n[trip]\np99_above = \"1s\"\n",
            "shorter than 10ms",
        );
        check_err("[trip]\n", "needs at least one trip condition");
        check_err(
            "mode = \"canary\"\n[canary]\nsteps = [5, 1, 100]\n",
            "must rise from above 0 to exactly 100",
        );
        check_err(
            "no_data = \"bad\"\n[trip]\np99_above = \"1s\"\n",
            "silence never trips",
        );
        check_err(
            "[trip]\np99_above = \"1s\"\nfor = 3\nbad_of_last = [3, 5]\n",
            "both set",
        );
        check_err(
            "signal = \"latency\"\n[trip]\np99_above = \"1s\"\n",
            "unknown signal `latency`",
        );
    }
}
