//! Independent simulations on every core: the runs of `--policy A
//! --policy B`, `--sweep` and `--seeds` share nothing but the scenario,
//! so each is one job, and jobs are taken by as many threads as the
//! machine has cores. Each run is the same deterministic function of its
//! scenario, policy and seed whichever thread runs it, and results come
//! back in job order: the report is what a sequential run would print.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

/// Runs `job(i, progress)` for every `i` in `0..n` on up to `threads`
/// threads; the results in order of `i`. `progress(t)` reports a job's
/// simulated seconds.
pub fn run_all<T: Send>(
    n: usize,
    threads: usize,
    bar: &Progress,
    job: impl Fn(usize, &mut dyn FnMut(f64)) -> T + Sync,
) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let work = || {
        loop {
            let i = next.fetch_add(1, Relaxed);
            if i >= n {
                return;
            }
            let out = job(i, &mut |t| bar.set(i, t));
            *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads.clamp(1, n.max(1)) {
            s.spawn(work);
        }
        // This thread works too.
        work();
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every job ran")
        })
        .collect()
}

/// The threads to run simulations on: one per core.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A progress bar over several jobs, in simulated seconds; it appears only
/// on a terminal and only after a second.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    /// Each job's simulated seconds so far, in milliseconds.
    done_ms: Vec<AtomicU64>,
    /// Where job `i` starts on the bar, in seconds.
    offset_s: f64,
}

impl Progress {
    /// `jobs` of `each_s` simulated seconds each.
    pub fn new(enabled: bool, jobs: usize, each_s: f64) -> Self {
        let bar = enabled.then(|| {
            let b = indicatif::ProgressBar::with_draw_target(
                Some((each_s * jobs as f64) as u64),
                indicatif::ProgressDrawTarget::hidden(),
            );
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "simulating {bar:40} {pos}/{len} simulated seconds",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        Progress {
            bar,
            started: Instant::now(),
            done_ms: (0..jobs).map(|_| AtomicU64::new(0)).collect(),
            offset_s: each_s,
        }
    }

    /// Job `i` is at `t` simulated seconds.
    pub fn set(&self, i: usize, t: f64) {
        let Some(b) = &self.bar else { return };
        if let Some(d) = self.done_ms.get(i) {
            d.store((t.min(self.offset_s) * 1000.0) as u64, Relaxed);
        }
        if b.is_hidden() && self.started.elapsed().as_secs_f64() > 1.0 {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        let total: u64 = self.done_ms.iter().map(|d| d.load(Relaxed)).sum();
        b.set_position(total / 1000);
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_job_order_whatever_the_threads() {
        let bar = Progress::new(false, 50, 1.0);
        for threads in [1, 2, 7] {
            let got = run_all(50, threads, &bar, |i, p| {
                p(0.5);
                i * i
            });
            assert_eq!(got, (0..50).map(|i| i * i).collect::<Vec<_>>());
        }
        assert!(run_all(0, 4, &bar, |i, _| i).is_empty());
    }
}
