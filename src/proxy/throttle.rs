//! Log lines that a flood could repeat thousands of times a second
//! (refused connections, accept errors, rejected admin calls) are written
//! at most once a second each; the counters beside them count every event.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Lets one event a second through; counts the ones it held back.
#[derive(Debug)]
pub struct OncePerSecond {
    /// The whole second of uptime last let through.
    last: AtomicU64,
    held: AtomicU64,
}

impl Default for OncePerSecond {
    fn default() -> Self {
        Self::new()
    }
}

impl OncePerSecond {
    pub const fn new() -> Self {
        OncePerSecond {
            last: AtomicU64::new(u64::MAX),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event should be logged, `n` being how many were
    /// held back since the last one; `None` to stay quiet.
    pub fn allow(&self, now: Duration) -> Option<u64> {
        let second = now.as_secs();
        if self.last.swap(second, Relaxed) == second {
            self.held.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.held.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_a_second_with_the_count_held_back() {
        let t = OncePerSecond::default();
        let s = Duration::from_secs;
        assert_eq!(t.allow(s(0)), Some(0));
        assert_eq!(t.allow(s(0)), None);
        assert_eq!(t.allow(Duration::from_millis(900)), None);
        assert_eq!(t.allow(s(1)), Some(2));
        assert_eq!(t.allow(s(5)), Some(0));
    }
}
