//! `portshift_latency_seconds`, kept here rather than in the exporter.
//!
//! The exporter's histogram pushes every sample into a lock-free block list
//! with a timestamp and an epoch pin, and folds them into buckets at scrape
//! or upkeep time. A latency sample is recorded on every request/response
//! turn, so this keeps cumulative bucket counters instead: a record is a
//! search over 20 bounds and two relaxed atomic adds, and nothing is
//! allocated or needs upkeep. Series are registered once per
//! listener/group/backend (a reload that keeps a backend keeps its counts)
//! and rendered in the Prometheus text format beside the exporter's output.

use super::{LATENCY, Unit};
use crate::core::stats::Signal;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bucket upper bounds in seconds, dense in the 1 ms – 1 s range where
/// latency alerts are written (e.g. p99 above 250 ms).
pub const LATENCY_BUCKETS: [f64; 20] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25,
    0.3, 0.5, 0.75, 1.0, 2.5, 10.0,
];

const HELP: &str =
    "Latency per signal: connect, first_byte, exchange (each request/response turn), probe";

/// The same bounds in nanoseconds, for an integer search on the hot path.
const BOUNDS_NS: [u64; 20] = {
    let mut out = [0u64; 20];
    let mut i = 0;
    while i < 20 {
        out[i] = (LATENCY_BUCKETS[i] * 1e9 + 0.5) as u64;
        i += 1;
    }
    out
};

/// One series: a counter per bucket (not cumulative; summed when
/// rendered), the last one for samples above every bound, and the sum.
#[derive(Debug, Default)]
pub struct Series {
    buckets: [AtomicU64; 21],
    sum_ns: AtomicU64,
}

impl Series {
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // `le` buckets: the first bound that is >= the sample.
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    fn render(&self, out: &mut String, labels: &str) {
        let mut cumulative = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{LATENCY}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{LATENCY}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{LATENCY}_count{{{labels}}} {cumulative}");
    }
}

/// A backend's four series, one per signal.
pub type BackendSeries = [Series; 4];

/// Every registered backend's series, in registration order.
static REGISTRY: Mutex<Vec<(Key, Arc<BackendSeries>)>> = Mutex::new(Vec::new());

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    listener: String,
    route: Option<String>,
    group: String,
    backend: String,
}

/// The series of one listener/group/backend: the registered ones if they
/// exist (a rebuilt listener keeps counting where it left off), new ones
/// otherwise.
pub fn backend_series(unit: &Unit, group: &str, backend: &str) -> Arc<BackendSeries> {
    let key = Key {
        listener: unit.listener.clone(),
        route: unit.route.clone(),
        group: group.to_owned(),
        backend: backend.to_owned(),
    };
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, s)) = reg.iter().find(|(k, _)| *k == key) {
        return Arc::clone(s);
    }
    let s = Arc::new(BackendSeries::default());
    reg.push((key, Arc::clone(&s)));
    s
}

/// Appends the whole `portshift_latency_seconds` family in the Prometheus
/// text format.
pub fn render(out: &mut String) {
    let reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    if reg.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {LATENCY} {HELP}");
    let _ = writeln!(out, "# TYPE {LATENCY} histogram");
    for (key, series) in reg.iter() {
        for signal in Signal::ALL {
            let route = key
                .route
                .as_ref()
                .map_or(String::new(), |r| format!("route=\"{}\",", escape(r)));
            let labels = format!(
                "listener=\"{}\",{route}group=\"{}\",backend=\"{}\",signal=\"{}\"",
                escape(&key.listener),
                escape(&key.group),
                escape(&key.backend),
                signal.name()
            );
            series[signal.index()].render(out, &labels);
        }
    }
}

/// Label value escaping of the text format: backslash, quote, newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(s: &Series) -> String {
        let mut out = String::new();
        s.render(&mut out, "l=\"x\"");
        out
    }

    /// Buckets are cumulative and `le` is inclusive, as Prometheus reads
    /// them: a sample exactly on a bound counts in that bound's bucket.
    #[test]
    fn buckets_are_cumulative_and_inclusive() {
        let s = Series::default();
        for ms in [0, 1, 1, 3, 250, 251, 20_000] {
            s.record(Duration::from_millis(ms));
        }
        let out = rendered(&s);
        for want in [
            "portshift_latency_seconds_bucket{l=\"x\",le=\"0.0001\"} 1\n",
            "portshift_latency_seconds_bucket{l=\"x\",le=\"0.001\"} 3\n",
            "portshift_latency_seconds_bucket{l=\"x\",le=\"0.005\"} 4\n",
            "portshift_latency_seconds_bucket{l=\"x\",le=\"0.25\"} 5\n",
            "portshift_latency_seconds_bucket{l=\"x\",le=\"0.3\"} 6\n",
            "portshift_latency_seconds_bucket{l=\"x\",le=\"10\"} 6\n",
            "portshift_latency_seconds_bucket{l=\"x\",le=\"+Inf\"} 7\n",
            "portshift_latency_seconds_sum{l=\"x\"} 20.506\n",
            "portshift_latency_seconds_count{l=\"x\"} 7\n",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }

    /// A listener rebuilt by a reload gets the same series back, so its
    /// counters never go backwards (Prometheus would read a reset).
    #[test]
    fn the_same_labels_share_one_series() {
        let a = backend_series(&Unit::listener("hist-test"), "g", "127.0.0.1:1");
        a[0].record(Duration::from_millis(1));
        let b = backend_series(&Unit::listener("hist-test"), "g", "127.0.0.1:1");
        assert!(Arc::ptr_eq(&a, &b));
        let c = backend_series(&Unit::listener("hist-test"), "g", "127.0.0.1:2");
        assert!(!Arc::ptr_eq(&a, &c));
        let mut out = String::new();
        render(&mut out);
        assert!(out.contains("# TYPE portshift_latency_seconds histogram\n"));
        assert!(out.contains(
            "portshift_latency_seconds_count{listener=\"hist-test\",group=\"g\",backend=\"127.0.0.1:1\",signal=\"connect\"} 1\n"
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
