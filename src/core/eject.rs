//! Passive ejection (outlier detection): a backend whose connections fail
//! on its side, in a row or at a rate, is taken out of its group's
//! rotation for `base_time` × the times it was ejected (at most
//! `max_time`), then returns by itself. Never more than `max_percent` of a
//! group is out at once, and never its last backend. Only upstream
//! failures are fed here: a client that aborts never ejects a backend.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
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
}

/// The rate is validated finite (0 to below 1), so equality is total.
impl Eq for EjectPolicy {}

/// One ejection: which backend, for how long, and the how-manieth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejected {
    pub backend: usize,
    pub for_: Duration,
    pub times: u32,
}

/// A group's ejection state.
#[derive(Debug)]
pub struct Ejections {
    policy: EjectPolicy,
    consecutive: Vec<AtomicU32>,
    times: Vec<AtomicU32>,
    /// Ejected until, microseconds on the caller's clock; 0: never.
    until_us: Vec<AtomicU64>,
    /// Ejecting is rare: one at a time, so `max_percent` holds.
    deciding: Mutex<()>,
}

impl Ejections {
    pub fn new(policy: EjectPolicy, backends: usize) -> Self {
        Ejections {
            policy,
            consecutive: (0..backends).map(|_| AtomicU32::new(0)).collect(),
            times: (0..backends).map(|_| AtomicU32::new(0)).collect(),
            until_us: (0..backends).map(|_| AtomicU64::new(0)).collect(),
            deciding: Mutex::new(()),
        }
    }

    /// A connection to `backend` ended with no failure of its own.
    pub fn on_success(&self, backend: usize) {
        self.consecutive[backend].store(0, Relaxed);
    }

    /// A failure of `backend`'s own at `now`. `window` gives its requests
    /// and errors over the stats window, asked only when the error rate
    /// could decide. `Some` when this failure ejects it.
    pub fn on_failure(
        &self,
        backend: usize,
        now: Duration,
        window: impl FnOnce() -> (u64, u64),
    ) -> Option<Ejected> {
        let p = &self.policy;
        // Tried while out (every other backend failed too): not a new run.
        if self.is_ejected(backend, now) {
            return None;
        }
        let run = self.consecutive[backend].fetch_add(1, Relaxed) + 1;
        let by_count = p.consecutive_failures > 0 && run >= p.consecutive_failures;
        let by_rate = !by_count
            && p.error_rate_above.is_some_and(|limit| {
                let (requests, errors) = window();
                requests >= p.min_requests.max(1) && errors as f64 / requests as f64 > limit
            });
        if !(by_count || by_rate) {
            return None;
        }
        let _one = self.deciding.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_ejected(backend, now) || self.out(now) >= self.allowed() {
            return None;
        }
        let times = self.times[backend].fetch_add(1, Relaxed) + 1;
        let for_ = p.base_time.saturating_mul(times).min(p.max_time);
        let until = (now + for_).as_micros().max(1) as u64;
        self.until_us[backend].store(until, Relaxed);
        self.consecutive[backend].store(0, Relaxed);
        Some(Ejected {
            backend,
            for_,
            times,
        })
    }

    /// Whether `backend` is out of rotation at `now`.
    pub fn is_ejected(&self, backend: usize, now: Duration) -> bool {
        self.until_us[backend].load(Relaxed) > now.as_micros() as u64
    }

    /// When `backend`'s ejection ends (or ended), if it was ever ejected.
    pub fn ejected_until(&self, backend: usize) -> Option<Duration> {
        match self.until_us[backend].load(Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Times `backend` was ejected.
    pub fn times(&self, backend: usize) -> u32 {
        self.times[backend].load(Relaxed)
    }

    /// Backends out at `now`.
    pub fn out(&self, now: Duration) -> usize {
        (0..self.until_us.len())
            .filter(|&b| self.is_ejected(b, now))
            .count()
    }

    /// How many may be out at once: `max_percent` of the group, at least
    /// one if the group has two or more, never the last.
    fn allowed(&self) -> usize {
        let n = self.until_us.len();
        if n < 2 {
            return 0;
        }
        (n * self.policy.max_percent as usize / 100).clamp(1, n - 1)
    }
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
        }
    }

    #[test]
    fn failures_in_a_row_eject_for_longer_each_time_up_to_the_cap() {
        let e = Ejections::new(policy(), 4);
        let none = || (0, 0);
        assert_eq!(e.on_failure(0, S, none), None);
        e.on_success(0);
        assert_eq!(e.on_failure(0, S, none), None);
        assert_eq!(e.on_failure(0, S, none), None);
        let first = e.on_failure(0, S, none).unwrap();
        assert_eq!((first.for_, first.times), (10 * S, 1));
        assert!(e.is_ejected(0, 10 * S) && !e.is_ejected(0, 11 * S));
        // Failures while out do not extend it.
        assert_eq!(e.on_failure(0, 2 * S, none), None);
        for _ in 0..2 {
            e.on_failure(0, 12 * S, none);
        }
        let second = e.on_failure(0, 12 * S, none).unwrap();
        assert_eq!((second.for_, second.times), (20 * S, 2));
        for _ in 0..3 {
            e.on_failure(0, 40 * S, none);
        }
        assert_eq!(e.times(0), 3);
        assert_eq!(e.ejected_until(0), Some(65 * S), "capped at max_time");
    }

    #[test]
    fn an_error_rate_ejects_once_there_are_enough_requests() {
        let e = Ejections::new(policy(), 4);
        e.on_success(1);
        assert_eq!(
            e.on_failure(1, S, || (9, 9)),
            None,
            "fewer than min_requests"
        );
        e.on_success(1);
        assert_eq!(
            e.on_failure(1, S, || (20, 10)),
            None,
            "at the rate, not above"
        );
        e.on_success(1);
        assert!(e.on_failure(1, S, || (20, 11)).is_some());
    }

    #[test]
    fn never_more_than_max_percent_nor_the_last_backend() {
        let e = Ejections::new(policy(), 4);
        let fail = |b: usize| (0..3).find_map(|_| e.on_failure(b, S, || (0, 0)));
        assert!(fail(0).is_some());
        assert!(fail(1).is_some());
        assert_eq!(fail(2), None, "50% of four are out");
        assert_eq!(e.out(S), 2);
        let alone = Ejections::new(policy(), 1);
        assert!((0..10).all(|_| alone.on_failure(0, S, || (0, 0)).is_none()));
        // Two backends at 10%: still one may go.
        let two = Ejections::new(
            EjectPolicy {
                max_percent: 10,
                ..policy()
            },
            2,
        );
        assert!(
            (0..3)
                .find_map(|_| two.on_failure(0, S, || (0, 0)))
                .is_some()
        );
        assert!(
            (0..3)
                .find_map(|_| two.on_failure(1, S, || (0, 0)))
                .is_none()
        );
    }
}
