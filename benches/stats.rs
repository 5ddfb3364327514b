//! What recording a latency sample costs on the hot path, alone and with two
//! threads recording into the same group (they must scale, not collapse).
//!
//! Run: `cargo bench --bench stats`.

use criterion::{Criterion, criterion_group, criterion_main};
use portshift::core::stats::{GroupStats, Recorder, Signal, WindowConfig};
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn record_single_thread(c: &mut Criterion) {
    let r = Recorder::new(WindowConfig::default(), 2);
    let mut i: u64 = 0;
    c.bench_function("record/1 thread", |b| {
        b.iter(|| {
            i += 1;
            // Time moves 1 µs per sample, so sub-windows turn over as in life.
            r.record(
                black_box(Duration::from_micros(i)),
                black_box(Duration::from_micros(100 + i % 5000)),
            );
        })
    });
}

/// Each of `threads` threads records `iters` samples into one group's
/// backend; returns the wall time for all of them.
fn run_threads(threads: usize, iters: u64) -> Duration {
    let g = Arc::new(GroupStats::new(
        "g",
        1,
        WindowConfig::default(),
        threads.max(2),
    ));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (g, barrier) = (g.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..iters {
                    g.backends[0].record(
                        Signal::Exchange,
                        Duration::from_micros(i),
                        Duration::from_micros(100 + i % 5000),
                    );
                }
            })
        })
        .collect();
    let start = Instant::now();
    barrier.wait();
    handles
        .into_iter()
        .for_each(|h| h.join().expect("recording thread does not panic"));
    start.elapsed()
}

fn record_two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("record/one group");
    for threads in [1, 2] {
        // Per-sample time as seen by each thread: equal figures mean the
        // threads scale; double means they serialize.
        group.bench_function(format!("{threads} threads, per thread"), |b| {
            b.iter_custom(|iters| run_threads(threads, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, record_single_thread, record_two_threads);
criterion_main!(benches);
