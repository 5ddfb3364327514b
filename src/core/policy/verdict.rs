//! Judging one group at one evaluation, and adding judgements up over time.

use super::{Condition, Counting, GroupInput, NoData, Policy, Quantile, Reason, Recover};

/// One evaluation of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Bad,
    Good,
    /// Too few samples to judge.
    NoData,
}

/// Counts bad evaluations under the policy's counting rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadCounter {
    counting: Counting,
    consecutive: u32,
    /// The last `len` evaluations, newest in bit 0; 1 = bad.
    ring: u64,
    len: u32,
}

impl BadCounter {
    pub fn new(counting: Counting) -> Self {
        BadCounter {
            counting,
            consecutive: 0,
            ring: 0,
            len: 0,
        }
    }

    /// Takes one verdict; `NoData` counts as the policy says.
    pub fn push(&mut self, v: Verdict, no_data: NoData) {
        let bad = match (v, no_data) {
            (Verdict::Bad, _) => true,
            (Verdict::Good, _) | (Verdict::NoData, NoData::Good) => false,
            (Verdict::NoData, NoData::Hold) => return,
        };
        self.consecutive = if bad { self.consecutive + 1 } else { 0 };
        self.ring = (self.ring << 1) | u64::from(bad);
        self.len = (self.len + 1).min(64);
    }

    /// Bad evaluations counted toward the trip.
    pub fn count(&self) -> u32 {
        match self.counting {
            Counting::Consecutive(_) => self.consecutive,
            Counting::BadOfLast { of, .. } => {
                let mask = if of >= 64 { u64::MAX } else { (1u64 << of) - 1 };
                (self.ring & mask).count_ones()
            }
        }
    }

    /// The count that trips.
    pub fn needed(&self) -> u32 {
        match self.counting {
            Counting::Consecutive(n) => n,
            Counting::BadOfLast { bad, .. } => bad,
        }
    }

    pub fn tripped(&self) -> bool {
        self.count() >= self.needed()
    }

    pub fn clear(&mut self) {
        *self = BadCounter::new(self.counting);
    }

    /// What it has counted: bad evaluations in a row, the ring of the last
    /// ones (newest in bit 0) and how many the ring holds. With
    /// `with_parts`, what a leader hands its successor.
    pub fn parts(&self) -> (u32, u64, u32) {
        (self.consecutive, self.ring, self.len)
    }

    /// A counter for `counting` that has counted `parts`.
    pub fn with_parts(counting: Counting, (consecutive, ring, len): (u32, u64, u32)) -> Self {
        BadCounter {
            counting,
            consecutive,
            ring,
            len: len.min(64),
        }
    }
}

/// Adds one condition's outcome to a running verdict: any bad makes it bad;
/// otherwise missing data makes it `NoData`.
fn fold(acc: Verdict, v: Verdict) -> Verdict {
    match (acc, v) {
        (Verdict::Bad, _) | (_, Verdict::Bad) => Verdict::Bad,
        (Verdict::NoData, _) | (_, Verdict::NoData) => Verdict::NoData,
        _ => Verdict::Good,
    }
}

/// The trip conditions on group `g`; `relative_to` is the group the
/// `worse_than_backup` condition compares against.
pub fn trip(
    p: &Policy,
    inputs: &[GroupInput],
    g: usize,
    relative_to: Option<usize>,
    reasons: &mut Vec<Reason>,
) -> Verdict {
    let mut verdict = Verdict::Good;
    for (rule, value, threshold) in trip_values(p, inputs, g, relative_to) {
        let v = match value {
            None => Verdict::NoData,
            Some(x) if x > threshold => Verdict::Bad,
            Some(_) => Verdict::Good,
        };
        if let Some(value) = value {
            reasons.push(Reason {
                rule,
                group: g,
                value,
                threshold,
                fired: v == Verdict::Bad,
            });
        }
        verdict = fold(verdict, v);
    }
    verdict
}

/// Each trip condition of the policy with group `g`'s value (`None` when
/// there is too little data to say) and its threshold.
fn trip_values(
    p: &Policy,
    inputs: &[GroupInput],
    g: usize,
    relative_to: Option<usize>,
) -> Vec<(Condition, Option<f64>, f64)> {
    let input = &inputs[g];
    let t = &p.trip;
    let enough = input.latency.total() >= p.min_samples;
    let mut out = Vec::new();
    // Errors first: when failures also push a quantile over its bar, the
    // error rate is the truer name for what went wrong.
    if let Some(limit) = t.error_rate_above {
        let value = (input.attempts >= p.min_samples)
            .then(|| input.error_rate())
            .flatten();
        out.push((Condition::ErrorRateAbove, value, limit));
    }
    for &(q, limit) in &t.above {
        let value = enough
            .then(|| input.latency.quantile_secs(q.fraction()))
            .flatten();
        out.push((Condition::QuantileAbove(q), value, limit.as_secs_f64()));
    }
    if let (Some(k), Some(b)) = (t.worse_than_backup, relative_to) {
        let q = t.relative_quantile.unwrap_or(Quantile::P99).fraction();
        let other = &inputs[b];
        let value = (enough && other.latency.total() >= p.min_samples)
            .then(|| {
                Some(input.latency.quantile_secs(q)? / other.latency.quantile_secs(q)?.max(1e-6))
            })
            .flatten();
        out.push((Condition::WorseThanBackup, value, k));
    }
    if let Some(limit) = t.active_connections_above {
        let value = Some(input.active_connections as f64);
        out.push((Condition::ActiveConnectionsAbove, value, limit as f64));
    }
    if let Some(limit) = t.new_connections_per_second_above {
        let value = Some(input.new_connections_per_second);
        out.push((Condition::NewConnectionsPerSecondAbove, value, limit));
    }
    out
}

/// The recovery bar on the primary: every `below` quantile and the error
/// rate, read from its traffic, or from its probes when traffic is too thin.
pub fn recovered(
    p: &Policy,
    r: &Recover,
    input: &GroupInput,
    reasons: &mut Vec<Reason>,
) -> Verdict {
    let (dist, errors) = if input.latency.total() >= p.min_samples {
        (&input.latency, input.error_rate())
    } else if input.probe.total() >= r.probe_min_samples {
        let rate = input.probe.failures as f64 / input.probe.total() as f64;
        (&input.probe, Some(rate))
    } else {
        return Verdict::NoData;
    };
    let mut verdict = Verdict::Good;
    let mut check = |rule: Condition, value: Option<f64>, threshold: f64| {
        let v = match value {
            None => Verdict::NoData,
            Some(x) if x < threshold => Verdict::Good,
            Some(_) => Verdict::Bad,
        };
        if let Some(value) = value {
            reasons.push(Reason {
                rule,
                group: 0,
                value,
                threshold,
                fired: v == Verdict::Good,
            });
        }
        verdict = fold(verdict, v);
    };
    for &(q, limit) in &r.below {
        check(
            Condition::QuantileBelow(q),
            dist.quantile_secs(q.fraction()),
            limit.as_secs_f64(),
        );
    }
    if let Some(limit) = r.error_rate_below {
        check(Condition::ErrorRateBelow, errors, limit);
    }
    verdict
}

/// Whether `to` is known to be worse than `from` on the policy's quantile;
/// `None` when either lacks data (unknown is not worse).
pub fn worse(p: &Policy, from: &GroupInput, to: &GroupInput, probe_min: u64) -> Option<bool> {
    let q = p
        .trip
        .relative_quantile
        .or_else(|| p.trip.above.first().map(|(q, _)| *q))
        .unwrap_or(Quantile::P99)
        .fraction();
    if from.latency.total() >= p.min_samples && to.latency.total() >= p.min_samples {
        return Some(to.latency.quantile_secs(q)? > from.latency.quantile_secs(q)?);
    }
    if from.probe.total() >= probe_min && to.probe.total() >= probe_min {
        return Some(to.probe.quantile_secs(q)? > from.probe.quantile_secs(q)?);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(counting: Counting, pattern: &str) -> Vec<bool> {
        let mut c = BadCounter::new(counting);
        pattern
            .chars()
            .map(|ch| {
                let v = match ch {
                    'B' => Verdict::Bad,
                    'G' => Verdict::Good,
                    _ => Verdict::NoData,
                };
                c.push(v, NoData::Hold);
                c.tripped()
            })
            .collect()
    }

    #[test]
    fn consecutive_and_m_of_n() {
        let t = |s: &str| s.chars().map(|c| c == '1').collect::<Vec<_>>();
        assert_eq!(run(Counting::Consecutive(3), "BBGBBB"), t("000001"));
        // No data holds: it neither breaks nor extends the streak.
        assert_eq!(run(Counting::Consecutive(3), "BB.B"), t("0001"));
        assert_eq!(
            run(Counting::BadOfLast { bad: 3, of: 5 }, "BGBGBGG"),
            t("0000100")
        );
    }
}
