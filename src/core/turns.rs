//! Request/response turns seen from L4, without parsing any protocol.
//!
//! A turn starts when the client speaks after the upstream last spoke (or
//! first), and ends at the first upstream byte after that: that span is one
//! `exchange` sample. The first turn of a connection whose upstream did not
//! greet first is also the `first_byte` sample. A greeting (upstream speaks
//! before the client) yields nothing, and pipelined requests measure from the
//! first unanswered one, so no sample is ever negative or invented.
//!
//! Both copy directions report here; they run in one task, so atomics with
//! relaxed ordering only serve to make the type shareable.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// One finished turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    pub latency: Duration,
    /// The connection's first turn, and the client spoke first.
    pub first_byte: bool,
}

const NOBODY: u8 = 0;
const CLIENT: u8 = 1;
const UPSTREAM: u8 = 2;

#[derive(Debug, Default)]
pub struct TurnTracker {
    last: AtomicU8,
    since_us: AtomicU64,
    greeted: AtomicBool,
    turns: AtomicU64,
}

impl TurnTracker {
    /// Data from `side` was read at `now`; returns a finished turn, if any.
    pub fn on_data(&self, side: Side, now: Duration) -> Option<Turn> {
        let now_us = now.as_micros() as u64;
        let last = self.last.load(Relaxed);
        match side {
            Side::Client => {
                if last != CLIENT {
                    self.since_us.store(now_us, Relaxed);
                    self.last.store(CLIENT, Relaxed);
                }
                None
            }
            Side::Upstream => {
                self.last.store(UPSTREAM, Relaxed);
                if last == NOBODY {
                    self.greeted.store(true, Relaxed);
                }
                if last != CLIENT {
                    return None;
                }
                let n = self.turns.fetch_add(1, Relaxed);
                let since = self.since_us.load(Relaxed);
                Some(Turn {
                    latency: Duration::from_micros(now_us.saturating_sub(since)),
                    first_byte: n == 0 && !self.greeted.load(Relaxed),
                })
            }
        }
    }

    pub fn turns(&self) -> u64 {
        self.turns.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Side::*;

    /// Feeds `(side, at_ms)` events; returns the turns as (latency ms, first_byte).
    fn check(events: &[(Side, u64)], want: &[(u64, bool)]) {
        let t = TurnTracker::default();
        let got: Vec<(u64, bool)> = events
            .iter()
            .filter_map(|&(s, at)| t.on_data(s, Duration::from_millis(at)))
            .map(|turn| (turn.latency.as_millis() as u64, turn.first_byte))
            .collect();
        assert_eq!(got, want, "{events:?}");
    }

    #[test]
    fn turns_table() {
        // Request/response, keep-alive.
        check(
            &[(Client, 0), (Upstream, 50), (Client, 60), (Upstream, 110)],
            &[(50, true), (50, false)],
        );
        // A reply in several chunks is one turn.
        check(&[(Client, 0), (Upstream, 5), (Upstream, 9)], &[(5, true)]);
        // Server greets first: no bogus sample, and no first_byte later.
        check(
            &[(Upstream, 0), (Client, 100), (Upstream, 130)],
            &[(30, false)],
        );
        // Pipelining: two requests, measured from the first unanswered one.
        check(
            &[(Client, 0), (Client, 2), (Upstream, 20), (Upstream, 21)],
            &[(20, true)],
        );
        // Client speaks only: nothing.
        check(&[(Client, 0), (Client, 10)], &[]);
    }
}
