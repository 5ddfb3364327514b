//! The shell's one clock: time since the proxy started, the `now` that the
//! pure core takes as an argument. Built on tokio's `Instant`, the same
//! clock the shell's timers use, so tests can pause and advance time and
//! there is never a second clock to disagree with.

use std::time::{Duration, SystemTime};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    /// The wall clock at `base`: what a log line's `time` is counted from,
    /// so a connection costs no second clock read.
    wall: SystemTime,
}

impl Clock {
    pub fn start() -> Self {
        Clock {
            base: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    pub fn now(&self) -> Duration {
        self.base.elapsed()
    }

    /// The wall-clock time of `at` (a `now()` reading).
    pub fn wall(&self, at: Duration) -> SystemTime {
        self.wall + at
    }
}
