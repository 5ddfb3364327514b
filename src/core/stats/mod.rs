//! Latency statistics per signal, per backend, merged per group on read.
//!
//! The hot path (`Recorder::record`) takes one uncontended lock on a shard
//! chosen by the recording thread, so threads do not share a cache line or a
//! lock; reads merge every shard. Time is passed in as `now` (a `Duration`
//! since any fixed origin), never read here.

mod window;

pub use window::{HIGHEST_US, LOWEST_US, Window, WindowConfig, new_histogram};

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The latency signals an L4 proxy can see without parsing a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    /// Upstream TCP connect time.
    Connect,
    /// First client bytes forwarded -> first upstream byte back.
    FirstByte,
    /// Every request/response turn: client speaks after the upstream (or
    /// first) -> first upstream byte of the reply.
    Exchange,
    /// Active probe: connect, optional send / expect.
    Probe,
}

impl Signal {
    pub const ALL: [Signal; 4] = [
        Signal::Connect,
        Signal::FirstByte,
        Signal::Exchange,
        Signal::Probe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Signal::Connect => "connect",
            Signal::FirstByte => "first_byte",
            Signal::Exchange => "exchange",
            Signal::Probe => "probe",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What a window holds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Snapshot {
    /// Successful samples.
    pub count: u64,
    /// Failures (refused, timeout, reset, probe failure) in the window.
    pub errors: u64,
    pub min: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
}

// === impl Snapshot ===

impl Snapshot {
    pub fn from_histogram(h: &Histogram<u32>, errors: u64) -> Self {
        if h.is_empty() {
            return Snapshot {
                errors,
                ..Snapshot::default()
            };
        }
        let q = |q: f64| Duration::from_micros(h.value_at_quantile(q));
        Snapshot {
            count: h.len(),
            errors,
            min: Duration::from_micros(h.min()),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: Duration::from_micros(h.max()),
        }
    }

    /// Failures over all attempts; 0 with no data.
    pub fn error_rate(&self) -> f64 {
        let total = self.count + self.errors;
        if total == 0 {
            0.0
        } else {
            self.errors as f64 / total as f64
        }
    }
}

/// A window's full distribution: every sample plus the failures, which
/// count as slower than any sample. A group that fails fast must not look
/// fast: with 5% failures, its p99 is a failure, not its fastest replies.
#[derive(Debug, Clone)]
pub struct Distribution {
    pub hist: Histogram<u32>,
    pub failures: u64,
}

/// One quantile of a distribution that counts failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantileValue {
    Latency(Duration),
    /// The quantile falls among the failures.
    Failing,
}

// === impl Distribution ===

impl Distribution {
    pub fn empty() -> Self {
        Distribution {
            hist: new_histogram(),
            failures: 0,
        }
    }

    /// Samples plus failures.
    pub fn total(&self) -> u64 {
        self.hist.len() + self.failures
    }

    /// The `q` quantile (0..=1) with failures ranked above every sample;
    /// `None` when there is nothing at all.
    pub fn quantile(&self, q: f64) -> Option<QuantileValue> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let samples = self.hist.len();
        // Rank of the quantile among all outcomes, 1-based.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        if rank > samples {
            return Some(QuantileValue::Failing);
        }
        let within = rank as f64 / samples as f64;
        Some(QuantileValue::Latency(Duration::from_micros(
            self.hist.value_at_quantile(within),
        )))
    }

    /// The quantile in seconds, failures as +infinity: for comparisons.
    pub fn quantile_secs(&self, q: f64) -> Option<f64> {
        self.quantile(q).map(|v| match v {
            QuantileValue::Latency(d) => d.as_secs_f64(),
            QuantileValue::Failing => f64::INFINITY,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot::from_histogram(&self.hist, self.failures)
    }
}

/// Most shards a recorder uses: enough for the cores a proxy runs on here,
/// few enough that reads stay cheap.
pub const MAX_SHARDS: usize = 8;

/// A shard on its own cache lines, so two recording threads never share one.
#[derive(Debug)]
#[repr(align(128))]
struct Shard(Mutex<Window>);

/// A concurrent window: one `Window` per shard, merged on read.
#[derive(Debug)]
pub struct Recorder {
    shards: Box<[Shard]>,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Each thread records into its own shard (modulo the shard count).
    static THREAD_SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

// === impl Recorder ===

impl Recorder {
    pub fn new(cfg: WindowConfig, shards: usize) -> Self {
        let n = shards.clamp(1, MAX_SHARDS);
        Recorder {
            shards: (0..n)
                .map(|_| Shard(Mutex::new(Window::new(cfg))))
                .collect(),
        }
    }

    fn shard(&self) -> &Mutex<Window> {
        let i = THREAD_SHARD.with(|s| *s) % self.shards.len();
        &self.shards[i].0
    }

    pub fn record(&self, now: Duration, latency: Duration) {
        lock(self.shard()).record(now, latency);
    }

    pub fn record_error(&self, now: Duration) {
        lock(self.shard()).record_error(now);
    }

    /// Adds this recorder's window at `now` into `acc`; returns its errors.
    pub fn merge_into(&self, now: Duration, acc: &mut Histogram<u32>) -> u64 {
        self.shards
            .iter()
            .map(|s| lock(&s.0).merge_into(now, acc))
            .sum()
    }

    pub fn snapshot(&self, now: Duration) -> Snapshot {
        let mut h = new_histogram();
        let errors = self.merge_into(now, &mut h);
        Snapshot::from_histogram(&h, errors)
    }

    /// Failures in the window at `now`, without merging histograms.
    pub fn errors(&self, now: Duration) -> u64 {
        self.shards.iter().map(|s| lock(&s.0).errors(now)).sum()
    }
}

/// A poisoned shard only means a panic elsewhere mid-record; the window's
/// data is still counts, so keep using it rather than spread the panic.
fn lock(m: &Mutex<Window>) -> std::sync::MutexGuard<'_, Window> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every signal of one backend.
#[derive(Debug)]
pub struct BackendStats {
    signals: [Recorder; 4],
}

impl BackendStats {
    pub fn new(cfg: WindowConfig, shards: usize) -> Self {
        BackendStats {
            signals: Signal::ALL.map(|_| Recorder::new(cfg, shards)),
        }
    }

    pub fn signal(&self, s: Signal) -> &Recorder {
        &self.signals[s.index()]
    }

    pub fn record(&self, s: Signal, now: Duration, latency: Duration) {
        self.signal(s).record(now, latency);
    }

    pub fn record_error(&self, s: Signal, now: Duration) {
        self.signal(s).record_error(now);
    }
}

/// A group's stats: its backends', merged on read.
#[derive(Debug)]
pub struct GroupStats {
    pub name: String,
    /// Shared with whoever records them (the proxy keeps each with its
    /// backend, so a group's stats can be read over any membership).
    pub backends: Vec<Arc<BackendStats>>,
}

impl GroupStats {
    pub fn new(name: impl Into<String>, backends: usize, cfg: WindowConfig, shards: usize) -> Self {
        GroupStats {
            name: name.into(),
            backends: (0..backends)
                .map(|_| Arc::new(BackendStats::new(cfg, shards)))
                .collect(),
        }
    }

    /// The group's window for `signal` at `now`, over all its backends.
    pub fn snapshot(&self, signal: Signal, now: Duration) -> Snapshot {
        self.distribution(signal, now).snapshot()
    }

    /// The group's failures for `signal` at `now`.
    pub fn errors(&self, signal: Signal, now: Duration) -> u64 {
        self.backends
            .iter()
            .map(|b| b.signal(signal).errors(now))
            .sum()
    }

    /// The group's full window for `signal` at `now`, with its failures.
    pub fn distribution(&self, signal: Signal, now: Duration) -> Distribution {
        let mut d = Distribution::empty();
        d.failures = self
            .backends
            .iter()
            .map(|b| b.signal(signal).merge_into(now, &mut d.hist))
            .sum();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Records `(at_ms, latency_ms)` samples and checks the snapshot at `now`.
    fn check(
        samples: &[(u64, u64)],
        errors_at: &[u64],
        now: u64,
        want_count: u64,
        want_p50_ms: u64,
        want_errors: u64,
    ) {
        let r = Recorder::new(WindowConfig::default(), 2);
        for &(at, lat) in samples {
            r.record(ms(at), ms(lat));
        }
        for &at in errors_at {
            r.record_error(ms(at));
        }
        let s = r.snapshot(ms(now));
        assert_eq!(
            (s.count, s.errors),
            (want_count, want_errors),
            "{samples:?} at {now}"
        );
        let p50 = s.p50.as_millis() as u64;
        assert!(
            p50.abs_diff(want_p50_ms) <= want_p50_ms / 50,
            "p50 {p50} ms, want {want_p50_ms}"
        );
    }

    #[test]
    fn table_of_windows() {
        check(&[], &[], 0, 0, 0, 0);
        check(&[(0, 50), (100, 50), (200, 50)], &[], 300, 3, 50, 0);
        check(&[(0, 10), (100, 20), (200, 30)], &[150], 300, 3, 20, 1);
        // The 10 ms sample at t=0 leaves at t=10 s; p50 becomes 100 ms.
        check(&[(0, 10), (5000, 100), (6000, 100)], &[], 10_000, 2, 100, 0);
        check(&[(0, 10)], &[0], 20_000, 0, 0, 0);
    }

    #[test]
    fn quantiles_and_error_rate() {
        let r = Recorder::new(WindowConfig::default(), 1);
        for i in 1..=1000 {
            r.record(ms(0), Duration::from_micros(i * 100));
        }
        r.record_error(ms(0));
        let s = r.snapshot(ms(1));
        assert_eq!(s.count, 1000);
        assert!(s.p99.as_micros().abs_diff(99_000) <= 1000, "{s:?}");
        assert!(s.p999 >= s.p99 && s.max >= s.p999 && s.min <= s.p50);
        assert!((s.error_rate() - 1.0 / 1001.0).abs() < 1e-9);
    }

    #[test]
    fn failures_rank_above_every_sample() {
        let mut d = Distribution::empty();
        for _ in 0..95 {
            d.hist.record(200).unwrap();
        }
        assert_eq!(
            d.quantile(0.99),
            Some(QuantileValue::Latency(Duration::from_micros(200)))
        );
        d.failures = 5;
        assert_eq!(
            d.quantile(0.5),
            Some(QuantileValue::Latency(Duration::from_micros(200)))
        );
        assert_eq!(
            d.quantile(0.95),
            Some(QuantileValue::Latency(Duration::from_micros(200)))
        );
        assert_eq!(d.quantile(0.96), Some(QuantileValue::Failing));
        assert_eq!(d.quantile_secs(0.99), Some(f64::INFINITY));
        assert_eq!(Distribution::empty().quantile(0.5), None);
    }

    #[test]
    fn group_merges_backends() {
        let g = GroupStats::new("g", 2, WindowConfig::default(), 1);
        g.backends[0].record(Signal::Exchange, ms(0), ms(10));
        g.backends[1].record(Signal::Exchange, ms(0), ms(30));
        g.backends[1].record_error(Signal::Connect, ms(0));
        assert_eq!(g.snapshot(Signal::Exchange, ms(1)).count, 2);
        assert_eq!(g.snapshot(Signal::Connect, ms(1)).errors, 1);
        assert_eq!(g.snapshot(Signal::Probe, ms(1)), Snapshot::default());
    }

    #[test]
    fn threads_record_into_their_own_shards() {
        let r = Arc::new(Recorder::new(WindowConfig::default(), 2));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (0..10_000).for_each(|_| r.record(ms(0), ms(1))))
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(r.snapshot(ms(0)).count, 20_000);
    }
}
