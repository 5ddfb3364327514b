//! Latency-aware choice for `balance = "peak_ewma"`: each backend's
//! peak-EWMA latency (the cost Finagle and linkerd2-proxy balance on)
//! times its open connections plus one, per unit of weight, and of two
//! backends drawn at random the cheaper one (the power of two choices).
//!
//! Peak: a sample above the cost replaces it at once, so a backend that
//! turns slow is avoided from its first slow answer; a sample below pulls
//! the cost down by a weight that decays with the time since the last
//! sample (`decay` is the time constant), so it recovers smoothly.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// One backend's cost, shared by the connections that report samples.
/// Concurrent samples may race; a lost update only delays the cost by one
/// sample.
#[derive(Debug)]
pub struct PeakEwma {
    /// The cost in microseconds, as `f64` bits.
    cost_bits: AtomicU64,
    /// When the last sample came, microseconds on the caller's clock.
    stamp_us: AtomicU64,
}

impl PeakEwma {
    /// A backend with no sample yet costs `default_rtt`.
    pub fn new(default_rtt: Duration) -> Self {
        PeakEwma {
            cost_bits: AtomicU64::new((default_rtt.as_micros() as f64).to_bits()),
            stamp_us: AtomicU64::new(0),
        }
    }

    /// A latency sample at `now`.
    pub fn observe(&self, rtt: Duration, now: Duration, decay: Duration) {
        let rtt_us = rtt.as_micros() as f64;
        let now_us = now.as_micros() as u64;
        let prev = self.cost();
        let last = self.stamp_us.swap(now_us, Relaxed);
        let next = if rtt_us > prev {
            rtt_us
        } else {
            let elapsed = now_us.saturating_sub(last) as f64;
            let w = (-elapsed / (decay.as_micros() as f64).max(1.0)).exp();
            prev * w + rtt_us * (1.0 - w)
        };
        self.cost_bits.store(next.to_bits(), Relaxed);
    }

    /// The cost in microseconds.
    pub fn cost(&self) -> f64 {
        f64::from_bits(self.cost_bits.load(Relaxed))
    }
}

/// One backend as the load-weighing balancers see it at a pick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// `peak_ewma`'s cost (unused by least-connections).
    pub cost: f64,
    pub active: u32,
    pub weight: u32,
}

/// Of two distinct backends drawn by `draw` among those with a weight, the
/// one whose `cost × (active + 1) / weight` is lower (the first drawn on a
/// tie); the only one when one has a weight. (The balancer calls
/// `p2c_by`; this form states the rule.)
#[cfg(test)]
pub fn p2c(costs: &[f64], active: &[u32], weights: &[u32], draw: u64) -> usize {
    p2c_by(
        costs.len(),
        |i| Load {
            cost: costs[i],
            active: active[i],
            weight: weights[i],
        },
        draw,
    )
}

/// `p2c` over `n` backends given by `load`, without allocating: the pick
/// runs on every new connection. `load` may change between two reads (a
/// backend drained meanwhile): the pick then falls back to a backend that
/// still weighs, or any, never panics.
pub fn p2c_by(n: usize, load: impl Fn(usize) -> Load, draw: u64) -> usize {
    let first = || (0..n).find(|&i| load(i).weight > 0).unwrap_or(0);
    let live = |k: usize| {
        (0..n)
            .filter(|&i| load(i).weight > 0)
            .nth(k)
            .unwrap_or_else(first)
    };
    let count = (0..n).filter(|&i| load(i).weight > 0).count();
    if count < 2 {
        return first();
    }
    let k = count as u64;
    let a = (draw % k) as usize;
    let mut b = ((draw >> 32) % (k - 1)) as usize;
    if b >= a {
        b += 1;
    }
    let cost = |i: usize| {
        let l = load(i);
        l.cost * f64::from(l.active + 1) / f64::from(l.weight.max(1))
    };
    let (a, b) = (live(a), live(b));
    if cost(b) < cost(a) { b } else { a }
}

/// A ticket spread over 64 bits (splitmix64's finaliser): the random draw
/// of `p2c`, repeatable for a given ticket.
pub fn spread(ticket: u64) -> u64 {
    let mut z = ticket.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slower_sample_is_taken_at_once_and_a_faster_one_decays_in() {
        let e = PeakEwma::new(30 * MS);
        assert_eq!(e.cost(), 30_000.0, "no sample yet: the default");
        let decay = Duration::from_secs(10);
        e.observe(200 * MS, Duration::from_secs(1), decay);
        assert_eq!(e.cost(), 200_000.0, "the peak");
        // 10 s later (one time constant): a 10 ms sample weighs 1 - 1/e.
        e.observe(10 * MS, Duration::from_secs(11), decay);
        let want = 200_000.0 / std::f64::consts::E + 10_000.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((e.cost() - want).abs() < 1.0, "{} vs {want}", e.cost());
        // Right after: almost no weight for the new sample.
        let before = e.cost();
        e.observe(10 * MS, Duration::from_secs(11) + MS, decay);
        assert!(before - e.cost() < 0.01 * before);
    }

    #[test]
    fn the_cheaper_of_two_draws_wins_and_active_connections_count() {
        // Draw 0: a = 0, b = 1 (of 3 live).
        let draw = 0;
        assert_eq!(p2c(&[100.0, 50.0, 1.0], &[0, 0, 0], &[1, 1, 1], draw), 1);
        // Backend 1 is cheaper per connection but has 3 open: 4 × 50 > 1 × 100.
        assert_eq!(p2c(&[100.0, 50.0, 1.0], &[0, 3, 0], &[1, 1, 1], draw), 0);
        // Weight 2 halves the load.
        assert_eq!(p2c(&[100.0, 150.0, 1.0], &[0, 0, 0], &[1, 2, 1], draw), 1);
        // Weight 0 is never drawn; one live backend is always chosen.
        assert_eq!(p2c(&[1.0, 9.0], &[0, 0], &[0, 1], 12345), 1);
    }

    /// With one slow backend of four, the slow one is chosen only when
    /// both draws avoid the others: about never among four.
    #[test]
    fn a_slow_backend_gets_little_traffic() {
        let costs = [5_000.0, 5_000.0, 5_000.0, 300_000.0];
        let mut to_slow = 0;
        for t in 0..10_000 {
            if p2c(&costs, &[0; 4], &[1; 4], spread(t)) == 3 {
                to_slow += 1;
            }
        }
        assert_eq!(to_slow, 0, "the slow one always loses its draw");
        // The two draws are distinct and cover every pair.
        let mut seen = std::collections::HashSet::new();
        for t in 0..1000 {
            let d = spread(t);
            let a = (d % 4) as usize;
            let mut b = ((d >> 32) % 3) as usize;
            if b >= a {
                b += 1;
            }
            assert_ne!(a, b);
            seen.insert((a.min(b), a.max(b)));
        }
        assert_eq!(seen.len(), 6);
    }

    /// A backend drained between two reads of the loads never panics a
    /// pick (the connection goes on with a backend that still weighs).
    #[test]
    fn loads_that_change_mid_pick_do_not_panic() {
        for drained_after in 0..12 {
            let reads = std::cell::Cell::new(0);
            let load = |i: usize| {
                reads.set(reads.get() + 1);
                let weight = u32::from(reads.get() <= drained_after || i == 2);
                Load {
                    cost: 1.0,
                    active: 0,
                    weight,
                }
            };
            assert!(p2c_by(3, load, spread(drained_after as u64)) < 3);
        }
    }
}
