//! Passive ejection (outlier detection): a backend whose connections fail
//! on its side, in a row or at a rate, is taken out of its group's
//! rotation for `base_time` × the times it was ejected (at most
//! `max_time`), then returns by itself. Never more than `max_percent` of a
//! group is out at once, and never its last backend. Only upstream
//! failures are fed here: a client that aborts never ejects a backend.
//!
//! Each backend's state (`EjectState`) belongs to the backend, so it
//! survives a change of its group's membership; the group's `Ejections`
//! holds the policy and decides one ejection at a time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// When to eject, and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EjectPolicy {
    /// Failures in a row that eject (0: never by count).
    pub consecutive_failures: u32,
    /// An error rate over the stats window above which a backend is
    /// ejected, once it carried at least `min_requests` in it.
    pub error_rate_above: Option<f64>,
    pub min_requests: u64,
    pub base_time: Duration,
    pub max_time: Duration,
    /// The most of a group's backends out at once, in percent.
    pub max_percent: u32,
    /// Latency outliers: eject a backend whose `exchange` p99 over the
    /// window is above this many times the median of its group's
    /// backends' (each with at least `min_requests` samples).
    pub latency_factor: Option<f64>,
}

/// The rate is validated finite (0 to below 1), so equality is total.
impl Eq for EjectPolicy {}

/// One ejection: for how long, and the how-manieth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejected {
    pub for_: Duration,
    pub times: u32,
}

/// One backend's ejection state.
#[derive(Debug, Default)]
pub struct EjectState {
    consecutive: AtomicU32,
    times: AtomicU32,
    /// Ejected until, microseconds on the caller's clock; 0: never.
    until_us: AtomicU64,
    /// Set when ejected, taken when its return has been reported.
    unreported: AtomicBool,
}

impl EjectState {
    /// A connection ended with no failure of the backend's own.
    pub fn on_success(&self) {
        self.consecutive.store(0, Relaxed);
    }

    /// Whether the backend is out of rotation at `now`.
    pub fn is_ejected(&self, now: Duration) -> bool {
        self.until_us.load(Relaxed) > now.as_micros() as u64
    }

    /// When the backend's ejection ends (or ended), if it was ever ejected.
    pub fn ejected_until(&self) -> Option<Duration> {
        match self.until_us.load(Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Times the backend was ejected.
    pub fn times(&self) -> u32 {
        self.times.load(Relaxed)
    }

    /// True once, when an ejected backend is back in rotation at `now`: its
    /// return is for the caller to report.
    pub fn take_return(&self, now: Duration) -> bool {
        !self.is_ejected(now) && self.unreported.swap(false, Relaxed)
    }
}

/// A group's ejection policy, deciding one ejection at a time.
#[derive(Debug)]
pub struct Ejections {
    policy: EjectPolicy,
    /// Ejecting is rare: one at a time, so `max_percent` holds.
    deciding: Mutex<()>,
}

impl Ejections {
    pub fn new(policy: EjectPolicy) -> Self {
        Ejections {
            policy,
            deciding: Mutex::new(()),
        }
    }

    pub fn policy(&self) -> EjectPolicy {
        self.policy
    }

    /// A failure of `backend`'s own at `now`; `group` is every backend of
    /// its group, itself included. `window` gives its requests and errors
    /// over the stats window, asked only when the error rate could decide.
    /// `Some` when this failure ejects it.
    pub fn on_failure<'a>(
        &self,
        backend: &EjectState,
        group: impl Fn() -> Vec<&'a EjectState>,
        now: Duration,
        window: impl FnOnce() -> (u64, u64),
    ) -> Option<Ejected> {
        let p = &self.policy;
        // Tried while out (every other backend failed too): not a new run.
        if backend.is_ejected(now) {
            return None;
        }
        let run = backend.consecutive.fetch_add(1, Relaxed) + 1;
        let by_count = p.consecutive_failures > 0 && run >= p.consecutive_failures;
        let by_rate = !by_count
            && p.error_rate_above.is_some_and(|limit| {
                let (requests, errors) = window();
                requests >= p.min_requests.max(1) && errors as f64 / requests as f64 > limit
            });
        if !(by_count || by_rate) {
            return None;
        }
        self.eject(backend, group, now)
    }

    /// Ejects `backend` at `now` unless it is out already or its group
    /// (`group`, itself included) has as many out as may be.
    pub fn eject<'a>(
        &self,
        backend: &EjectState,
        group: impl Fn() -> Vec<&'a EjectState>,
        now: Duration,
    ) -> Option<Ejected> {
        let p = &self.policy;
        let _one = self.deciding.lock().unwrap_or_else(|e| e.into_inner());
        let all = group();
        if backend.is_ejected(now) || out(all.iter().copied(), now) >= self.allowed(all.len()) {
            return None;
        }
        let times = backend.times.fetch_add(1, Relaxed) + 1;
        let for_ = p.base_time.saturating_mul(times).min(p.max_time);
        let until = (now + for_).as_micros().max(1) as u64;
        backend.until_us.store(until, Relaxed);
        backend.consecutive.store(0, Relaxed);
        backend.unreported.store(true, Relaxed);
        Some(Ejected { for_, times })
    }

    /// How many of `n` may be out at once: `max_percent` of the group, at
    /// least one if the group has two or more, never the last.
    fn allowed(&self, n: usize) -> usize {
        if n < 2 {
            return 0;
        }
        (n * self.policy.max_percent as usize / 100).clamp(1, n - 1)
    }
}

/// The latency outliers of a group: the indexes whose p99 is above
/// `factor` × the median p99 of the backends that have one (`None`: too
/// few samples to judge). A median needs at least three backends.
pub fn latency_outliers(p99: &[Option<Duration>], factor: f64) -> Vec<usize> {
    let mut known: Vec<Duration> = p99.iter().flatten().copied().collect();
    if known.len() < 3 {
        return Vec::new();
    }
    known.sort();
    // The upper median: a slow half is not a set of outliers.
    let median = known[known.len() / 2];
    if median.is_zero() {
        return Vec::new();
    }
    let limit = median.mul_f64(factor);
    (0..p99.len())
        .filter(|&i| p99[i].is_some_and(|p| p > limit))
        .collect()
}

/// Backends out at `now`.
pub fn out<'a>(group: impl Iterator<Item = &'a EjectState>, now: Duration) -> usize {
    group.filter(|s| s.is_ejected(now)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn policy() -> EjectPolicy {
        EjectPolicy {
            consecutive_failures: 3,
            error_rate_above: Some(0.5),
            min_requests: 10,
            base_time: 10 * S,
            max_time: 25 * S,
            max_percent: 50,
            latency_factor: None,
        }
    }

    /// A group of `n` backends under `p`.
    struct Group {
        e: Ejections,
        states: Vec<EjectState>,
    }

    impl Group {
        fn new(p: EjectPolicy, n: usize) -> Self {
            Group {
                e: Ejections::new(p),
                states: (0..n).map(|_| EjectState::default()).collect(),
            }
        }

        fn fail(&self, b: usize, now: Duration, window: (u64, u64)) -> Option<Ejected> {
            let all = || self.states.iter().collect();
            self.e.on_failure(&self.states[b], all, now, || window)
        }
    }

    #[test]
    fn failures_in_a_row_eject_for_longer_each_time_up_to_the_cap() {
        let g = Group::new(policy(), 4);
        let none = (0, 0);
        assert_eq!(g.fail(0, S, none), None);
        g.states[0].on_success();
        assert_eq!(g.fail(0, S, none), None);
        assert_eq!(g.fail(0, S, none), None);
        let first = g.fail(0, S, none).unwrap();
        assert_eq!((first.for_, first.times), (10 * S, 1));
        let s = &g.states[0];
        assert!(s.is_ejected(10 * S) && !s.is_ejected(11 * S));
        // Failures while out do not extend it.
        assert_eq!(g.fail(0, 2 * S, none), None);
        assert!(!s.take_return(10 * S), "still out");
        assert!(s.take_return(11 * S), "back: reported once");
        assert!(!s.take_return(11 * S));
        for _ in 0..2 {
            g.fail(0, 12 * S, none);
        }
        let second = g.fail(0, 12 * S, none).unwrap();
        assert_eq!((second.for_, second.times), (20 * S, 2));
        for _ in 0..3 {
            g.fail(0, 40 * S, none);
        }
        assert_eq!(s.times(), 3);
        assert_eq!(s.ejected_until(), Some(65 * S), "capped at max_time");
    }

    #[test]
    fn an_error_rate_ejects_once_there_are_enough_requests() {
        let g = Group::new(policy(), 4);
        assert_eq!(g.fail(1, S, (9, 9)), None, "fewer than min_requests");
        g.states[1].on_success();
        assert_eq!(g.fail(1, S, (20, 10)), None, "at the rate, not above");
        g.states[1].on_success();
        assert!(g.fail(1, S, (20, 11)).is_some());
    }

    #[test]
    fn never_more_than_max_percent_nor_the_last_backend() {
        let g = Group::new(policy(), 4);
        let fail = |g: &Group, b: usize| (0..3).find_map(|_| g.fail(b, S, (0, 0)));
        assert!(fail(&g, 0).is_some());
        assert!(fail(&g, 1).is_some());
        assert_eq!(fail(&g, 2), None, "50% of four are out");
        assert_eq!(out(g.states.iter(), S), 2);
        let alone = Group::new(policy(), 1);
        assert!((0..10).all(|_| alone.fail(0, S, (0, 0)).is_none()));
        // Two backends at 10%: still one may go.
        let two = Group::new(
            EjectPolicy {
                max_percent: 10,
                ..policy()
            },
            2,
        );
        assert!(fail(&two, 0).is_some());
        assert!(fail(&two, 1).is_none());
    }

    #[test]
    fn latency_outliers_stand_out_from_the_median() {
        let ms = |n| Some(Duration::from_millis(n));
        let p99 = [ms(10), ms(12), ms(11), ms(200), None];
        assert_eq!(latency_outliers(&p99, 3.0), vec![3]);
        assert_eq!(latency_outliers(&p99, 20.0), Vec::<usize>::new());
        // Two with data: no median to judge by.
        assert!(latency_outliers(&[ms(10), ms(500), None], 3.0).is_empty());
        // A slow half does not make the fast half outliers.
        assert!(latency_outliers(&[ms(10), ms(10), ms(100), ms(100)], 3.0).is_empty());
    }
}
