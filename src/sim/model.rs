//! Random parts of a simulation: service times per latency model and
//! request arrivals per load model. Every draw comes from a seeded stream,
//! and a request's service time comes from its own seed, so every compared
//! policy sees the same requests with the same luck (common random
//! numbers), wherever they are routed.

use super::scenario::{LatencyModel, Load};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp1, LogNormal, Normal, Pareto};
use rand_xoshiro::Xoshiro256PlusPlus;
use std::time::Duration;

/// z-score of the 99th percentile of a standard normal.
const Z99: f64 = 2.326_347_874;

/// A latency model ready to sample.
#[derive(Debug, Clone)]
pub enum Sampler {
    Constant(f64),
    Normal(Normal<f64>),
    LogNormal(LogNormal<f64>),
    Pareto(Pareto<f64>),
    /// (quantile, seconds) points, ascending.
    Percentiles(Vec<(f64, f64)>),
    /// (cumulative count, seconds).
    Empirical(Vec<(u64, f64)>),
}

impl Sampler {
    pub fn new(m: &LatencyModel) -> Self {
        let s = |d: &Duration| d.as_secs_f64();
        match m {
            LatencyModel::Constant(d) => Sampler::Constant(s(d)),
            LatencyModel::Normal { mean, stddev } => Sampler::Normal(
                Normal::new(s(mean), s(stddev)).expect("validated: finite mean, stddev >= 0"),
            ),
            LatencyModel::LogNormal { p50, p99 } => {
                let mu = s(p50).max(1e-9).ln();
                let sigma = ((s(p99).max(1e-9).ln() - mu) / Z99).max(0.0);
                Sampler::LogNormal(LogNormal::new(mu, sigma).expect("validated: p99 >= p50 > 0"))
            }
            LatencyModel::Pareto { scale, shape } => Sampler::Pareto(
                Pareto::new(s(scale).max(1e-9), *shape).expect("validated: scale > 0, shape > 1"),
            ),
            LatencyModel::Percentiles(pts) => {
                Sampler::Percentiles(pts.iter().map(|(q, d)| (*q, s(d))).collect())
            }
            LatencyModel::Empirical(buckets) => {
                let mut acc = 0;
                Sampler::Empirical(
                    buckets
                        .iter()
                        .map(|(d, n)| {
                            acc += n;
                            (acc, s(d))
                        })
                        .collect(),
                )
            }
        }
    }

    /// One service time, drawn from `rng`.
    pub fn sample(&self, rng: &mut Xoshiro256PlusPlus) -> f64 {
        let v = match self {
            Sampler::Constant(v) => *v,
            Sampler::Normal(d) => d.sample(rng),
            Sampler::LogNormal(d) => d.sample(rng),
            Sampler::Pareto(d) => d.sample(rng),
            Sampler::Percentiles(pts) => interpolate(pts, rng.random::<f64>()),
            Sampler::Empirical(cum) => {
                let total = cum.last().map_or(1, |c| c.0).max(1);
                let pick = rng.random_range(0..total);
                cum.iter().find(|(c, _)| pick < *c).map_or(0.0, |(_, v)| *v)
            }
        };
        v.max(0.0)
    }
}

/// Inverse CDF through the points, extending the last segment's slope.
fn interpolate(pts: &[(f64, f64)], u: f64) -> f64 {
    for w in pts.windows(2) {
        let ((q0, v0), (q1, v1)) = (w[0], w[1]);
        if u <= q1 {
            return v0 + (v1 - v0) * (u - q0) / (q1 - q0).max(1e-12);
        }
    }
    let n = pts.len();
    if n < 2 {
        return pts.first().map_or(0.0, |p| p.1);
    }
    let ((q0, v0), (q1, v1)) = (pts[n - 2], pts[n - 1]);
    v1 + (v1 - v0) * (u - q1) / (q1 - q0).max(1e-12)
}

/// Generates arrival times from a load model with its own seeded stream.
pub struct Arrivals {
    load: Load,
    rng: Xoshiro256PlusPlus,
    next_trace: usize,
}

impl Arrivals {
    pub fn new(load: &Load, seed: u64) -> Self {
        Arrivals {
            load: load.clone(),
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            next_trace: 0,
        }
    }

    /// The first arrival after `t` (seconds), or None when the load ends.
    pub fn next(&mut self, t: f64, end: f64) -> Option<f64> {
        let mut t = t;
        let Arrivals {
            load,
            rng,
            next_trace,
        } = self;
        let mut exp = || -> f64 { Exp1.sample(rng) };
        loop {
            if t >= end {
                return None;
            }
            match &*load {
                Load::Trace { arrivals, .. } => {
                    let a = arrivals.get(*next_trace)?.as_secs_f64();
                    *next_trace += 1;
                    return Some(a);
                }
                Load::Diurnal {
                    mean,
                    amplitude,
                    period,
                } => {
                    // Thinning: candidates at the peak rate, kept in
                    // proportion to the rate at their time.
                    let peak = mean * (1.0 + amplitude);
                    t += exp() / peak;
                    let phase = 2.0 * std::f64::consts::PI * t / period.as_secs_f64();
                    let rate = mean * (1.0 + amplitude * phase.sin());
                    // The acceptance draw reuses the exponential stream:
                    // exp(-E) is uniform on (0, 1].
                    if (-exp()).exp() * peak <= rate {
                        return Some(t);
                    }
                }
                load => {
                    let (rate, change) = piecewise(load, t);
                    if rate <= 0.0 {
                        t = change;
                        continue;
                    }
                    let candidate = t + exp() / rate;
                    if candidate < change {
                        return Some(candidate);
                    }
                    // Memoryless: restart at the rate change.
                    t = change;
                }
            }
        }
    }

    /// A per-request seed from the arrival stream (common random numbers).
    pub fn request_seed(&mut self) -> u64 {
        self.rng.random()
    }
}

/// The rate at `t` and when it next changes, for piecewise-constant loads.
fn piecewise(load: &Load, t: f64) -> (f64, f64) {
    match load {
        Load::Poisson { rate, schedule } => {
            let mut r = *rate;
            let mut change = f64::INFINITY;
            for (at, rate) in schedule {
                let at = at.as_secs_f64();
                if at <= t {
                    r = *rate;
                } else {
                    change = change.min(at);
                }
            }
            (r, change)
        }
        Load::Bursts {
            rate_on,
            rate_off,
            on,
            off,
        } => {
            let (on, off) = (on.as_secs_f64(), off.as_secs_f64());
            let cycle = (on + off).max(1e-9);
            let start = (t / cycle).floor() * cycle;
            if t - start < on {
                (*rate_on, start + on)
            } else {
                (*rate_off, start + cycle)
            }
        }
        _ => unreachable!("trace and diurnal loads are handled by the caller"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> Xoshiro256PlusPlus {
        Xoshiro256PlusPlus::seed_from_u64(7)
    }

    fn median(s: &Sampler) -> f64 {
        let mut r = rng();
        let mut v: Vec<f64> = (0..20_001).map(|_| s.sample(&mut r)).collect();
        v.sort_by(f64::total_cmp);
        v[10_000]
    }

    #[test]
    fn samplers_match_their_spec() {
        let ms = Duration::from_millis;
        assert_eq!(median(&Sampler::new(&LatencyModel::Constant(ms(5)))), 0.005);
        let ln = median(&Sampler::new(&LatencyModel::LogNormal {
            p50: ms(20),
            p99: ms(80),
        }));
        assert!((ln - 0.020).abs() < 0.001, "{ln}");
        let pc = median(&Sampler::new(&LatencyModel::Percentiles(vec![
            (0.0, ms(0)),
            (0.5, ms(10)),
            (0.99, ms(50)),
        ])));
        assert!((pc - 0.010).abs() < 0.0005, "{pc}");
        let em = median(&Sampler::new(&LatencyModel::Empirical(vec![
            (ms(1), 10),
            (ms(7), 80),
            (ms(30), 10),
        ])));
        assert_eq!(em, 0.007);
    }

    #[test]
    fn poisson_rate_and_schedule() {
        let load = Load::Poisson {
            rate: 1000.0,
            schedule: vec![(Duration::from_secs(10), 100.0)],
        };
        let mut a = Arrivals::new(&load, 1);
        let (mut t, mut first, mut second) = (0.0, 0, 0);
        while let Some(n) = a.next(t, 20.0) {
            t = n;
            if t < 10.0 { first += 1 } else { second += 1 }
        }
        assert!((first as f64 - 10_000.0).abs() < 400.0, "{first}");
        assert!((second as f64 - 1000.0).abs() < 130.0, "{second}");
    }
}
