//! The shell's one clock: time since the proxy started, the `now` that the
//! pure core takes as an argument. Built on tokio's `Instant`, the same
//! clock the shell's timers use, so tests can pause and advance time and
//! there is never a second clock to disagree with.

use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    pub fn start() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    pub fn now(&self) -> Duration {
        self.base.elapsed()
    }
}
