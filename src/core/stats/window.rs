//! A sliding window of latency: a ring of sub-window HdrHistograms keyed by
//! epoch (`now / slot`), merged on demand. Single-threaded; `Recorder`
//! shards it for concurrent use. Time is always passed in.

use hdrhistogram::Histogram;
use std::time::Duration;

/// Lowest trackable latency: 1 µs.
pub const LOWEST_US: u64 = 1;
/// Highest trackable latency: 10 minutes; longer samples are clamped here.
pub const HIGHEST_US: u64 = 10 * 60 * 1_000_000;
/// Two significant digits: 1% relative error, ~12 KiB per sub-window.
pub const SIGFIG: u8 = 2;

/// How a window is cut: `slots` sub-windows of `slot` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    pub slots: usize,
    pub slot: Duration,
}

impl Default for WindowConfig {
    /// 10 × 1 s: a 10 s window that slides in 1 s steps.
    fn default() -> Self {
        WindowConfig {
            slots: 10,
            slot: Duration::from_secs(1),
        }
    }
}

impl WindowConfig {
    pub fn span(&self) -> Duration {
        self.slot * self.slots as u32
    }

    fn slot_us(&self) -> u64 {
        (self.slot.as_micros() as u64).max(1)
    }
}

/// An empty histogram with the shared bounds.
pub fn new_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGFIG)
        .expect("constant bounds are valid: 1 <= low, high >= 2*low, sigfig <= 5")
}

#[derive(Debug)]
struct Slot {
    /// `u64::MAX`: never used.
    epoch: u64,
    /// Allocated on first sample, reset and reused when the slot turns over.
    hist: Option<Histogram<u32>>,
    errors: u64,
}

/// One ring of sub-window histograms.
#[derive(Debug)]
pub struct Window {
    cfg: WindowConfig,
    slots: Vec<Slot>,
    /// The current epoch's slot and time range, so most records skip the
    /// division.
    current: usize,
    current_start_us: u64,
    current_end_us: u64,
}

// === impl Window ===

impl Window {
    pub fn new(cfg: WindowConfig) -> Self {
        assert!(cfg.slots > 0, "a window has at least one sub-window");
        Window {
            cfg,
            slots: (0..cfg.slots)
                .map(|_| Slot {
                    epoch: u64::MAX,
                    hist: None,
                    errors: 0,
                })
                .collect(),
            current: 0,
            current_start_us: 1,
            current_end_us: 0,
        }
    }

    /// Records one latency sample taken at `now`.
    pub fn record(&mut self, now: Duration, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(LOWEST_US, HIGHEST_US);
        let slot = self.slot_at(now);
        slot.hist
            .get_or_insert_with(new_histogram)
            .record(us)
            .expect("value is clamped into the histogram's range");
    }

    /// Records one failure (refused, timeout, reset, probe failure) at `now`.
    pub fn record_error(&mut self, now: Duration) {
        self.slot_at(now).errors += 1;
    }

    fn slot_at(&mut self, now: Duration) -> &mut Slot {
        let now_us = now.as_micros() as u64;
        if now_us < self.current_start_us || now_us >= self.current_end_us {
            let slot_us = self.cfg.slot_us();
            let epoch = now_us / slot_us;
            self.current = (epoch % self.slots.len() as u64) as usize;
            self.current_start_us = epoch * slot_us;
            self.current_end_us = self.current_start_us + slot_us;
            let slot = &mut self.slots[self.current];
            if slot.epoch != epoch {
                slot.epoch = epoch;
                slot.errors = 0;
                if let Some(h) = &mut slot.hist {
                    h.reset();
                }
            }
        }
        &mut self.slots[self.current]
    }

    /// Failures still inside the window at `now`.
    pub fn errors(&self, now: Duration) -> u64 {
        let epoch = now.as_micros() as u64 / self.cfg.slot_us();
        let n = self.slots.len() as u64;
        self.slots
            .iter()
            .filter(|s| s.epoch <= epoch && epoch - s.epoch < n)
            .map(|s| s.errors)
            .sum()
    }

    /// Adds every sub-window still inside the window at `now` into `acc`,
    /// and returns their error count. Samples older than the window are gone.
    pub fn merge_into(&self, now: Duration, acc: &mut Histogram<u32>) -> u64 {
        let epoch = now.as_micros() as u64 / self.cfg.slot_us();
        let n = self.slots.len() as u64;
        let mut errors = 0;
        for slot in &self.slots {
            if slot.epoch <= epoch && epoch - slot.epoch < n {
                errors += slot.errors;
                if let Some(h) = &slot.hist {
                    acc.add(h).expect("all histograms share bounds");
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn count_at(w: &Window, now: Duration) -> (u64, u64) {
        let mut h = new_histogram();
        let e = w.merge_into(now, &mut h);
        (h.len(), e)
    }

    #[test]
    fn samples_leave_after_the_window() {
        let mut w = Window::new(WindowConfig::default());
        w.record(ms(500), ms(10));
        w.record_error(ms(1500));
        assert_eq!(count_at(&w, ms(1600)), (1, 1));
        assert_eq!(count_at(&w, ms(9999)), (1, 1), "still inside 10 s");
        assert_eq!(
            count_at(&w, ms(10_000)),
            (0, 1),
            "the first sub-window left"
        );
        assert_eq!(count_at(&w, ms(11_000)), (0, 0), "both left");
    }

    #[test]
    fn reused_slot_forgets_its_old_epoch() {
        let cfg = WindowConfig {
            slots: 2,
            slot: ms(100),
        };
        let mut w = Window::new(cfg);
        w.record(ms(0), ms(1));
        w.record(ms(200), ms(2)); // same ring slot, new epoch
        let mut h = new_histogram();
        w.merge_into(ms(250), &mut h);
        assert_eq!(h.len(), 1);
        assert!(h.max().abs_diff(2000) <= 20, "only the 2 ms sample is left");
    }

    #[test]
    fn latency_is_clamped_into_range() {
        let mut w = Window::new(WindowConfig::default());
        w.record(ms(0), Duration::ZERO);
        w.record(ms(0), Duration::from_secs(3600));
        let mut h = new_histogram();
        w.merge_into(ms(0), &mut h);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= HIGHEST_US * 99 / 100);
    }
}
