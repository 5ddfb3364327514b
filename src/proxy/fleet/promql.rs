//! `signal = "prometheus"`: the leader's inputs from PromQL over every
//! member's counters, summed, the way canary controllers read health. Per
//! group, over the policy's window:
//!
//! - the signal's latency: `increase()` of `portshift_latency_seconds`
//!   buckets, each bucket's count put at its upper bound (so a quantile is
//!   rounded up to a bucket edge: 150 ms reads as 150 ms, 160 ms as 200 ms);
//! - failures: `increase()` of `portshift_errors_total` by kind (connect
//!   failures join `first_byte` and `exchange` as in the exact mode, resets
//!   are the exchange's own, `probe_failure` the probe's);
//! - connect attempts and open connections.
//!
//! The cost beside the exact mode: bucket rounding, `increase()`'s
//! extrapolation at the window's edges, and a scrape interval of delay.

use crate::core::policy::GroupInput;
use crate::core::stats::{Distribution, HIGHEST_US, Signal};
use crate::http_client::HttpClient;
use hyper::Method;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

const CONNECT_FAILURES: [&str; 3] = ["connect_refused", "connect_timeout", "connect_error"];

/// Where and what to ask.
pub struct Query<'a> {
    pub http: &'a HttpClient,
    /// `http://host:port`.
    pub url: &'a str,
    /// Extra label matchers, e.g. `job="portshift-edge"`.
    pub selector: Option<&'a str>,
    /// The listener, or route, whose series are read.
    pub unit: &'a crate::telemetry::Unit,
    pub window: Duration,
    pub timeout: Duration,
}

impl Query<'_> {
    fn matchers(&self, extra: &str) -> String {
        // A listener's own series have no `route` label (`route=""`
        // matches them, and not its routes').
        let mut m = format!(
            "listener=\"{}\", route=\"{}\"",
            self.unit.listener,
            self.unit.route.as_deref().unwrap_or("")
        );
        if let Some(s) = self.selector {
            m.push_str(", ");
            m.push_str(s);
        }
        if !extra.is_empty() {
            m.push_str(", ");
            m.push_str(extra);
        }
        m
    }

    fn range(&self) -> String {
        format!("{}ms", self.window.as_millis().max(1))
    }

    /// One instant query: its result vector.
    async fn vector(&self, promql: &str) -> Result<Vec<Value>, String> {
        let qs: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let url = format!("{}/api/v1/query?{qs}", self.url.trim_end_matches('/'));
        let v = self
            .http
            .json(Method::GET, &url, None, None, self.timeout)
            .await
            .map_err(|e| format!("prometheus at {}: {e}", self.url))?;
        if v["status"] != "success" {
            return Err(format!("prometheus refused `{promql}`: {}", v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// `sum by (group, …) (…)` as a map from the labels to the value.
    async fn by_group(
        &self,
        promql: &str,
        label: &str,
    ) -> Result<HashMap<(String, String), f64>, String> {
        let mut out = HashMap::new();
        for s in self.vector(promql).await? {
            let group = s["metric"]["group"].as_str().unwrap_or("").to_owned();
            let other = s["metric"][label].as_str().unwrap_or("").to_owned();
            let value = s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            out.insert((group, other), value.max(0.0));
        }
        Ok(out)
    }

    /// The signal's bucket counts per group, as distributions.
    async fn distributions(&self, signal: Signal) -> Result<HashMap<String, Distribution>, String> {
        let promql = format!(
            "sum by (group, le) (increase(portshift_latency_seconds_bucket{{{}}}[{}]))",
            self.matchers(&format!("signal=\"{}\"", signal.name())),
            self.range()
        );
        let mut cumulative: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
        for ((group, le), count) in self.by_group(&promql, "le").await? {
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            cumulative.entry(group).or_default().push((le, count));
        }
        Ok(cumulative
            .into_iter()
            .map(|(g, mut buckets)| {
                buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                (g, distribution(&buckets))
            })
            .collect())
    }

    /// Every group's input, primary first.
    pub async fn inputs(
        &self,
        groups: &[String],
        signal: Signal,
    ) -> Result<Vec<GroupInput>, String> {
        let mut latency = self.distributions(signal).await?;
        let mut probe = self.distributions(Signal::Probe).await?;
        let connect = self.distributions(Signal::Connect).await?;
        let errors = self
            .by_group(
                &format!(
                    "sum by (group, kind) (increase(portshift_errors_total{{{}}}[{}]))",
                    self.matchers(""),
                    self.range()
                ),
                "kind",
            )
            .await?;
        let active = self
            .by_group(
                &format!(
                    "sum by (group) (portshift_active_connections{{{}}})",
                    self.matchers("")
                ),
                "",
            )
            .await?;
        let count = |g: &str, kinds: &[&str]| -> u64 {
            kinds
                .iter()
                .map(|k| {
                    errors
                        .get(&(g.to_owned(), (*k).to_owned()))
                        .copied()
                        .unwrap_or(0.0)
                })
                .sum::<f64>()
                .round() as u64
        };
        let secs = self.window.as_secs_f64().max(0.001);
        Ok(groups
            .iter()
            .map(|g| {
                let connect_failed = count(g, &CONNECT_FAILURES);
                let resets = count(g, &["reset"]);
                let mut lat = latency.remove(g).unwrap_or_else(Distribution::empty);
                lat.failures = match signal {
                    Signal::Connect => connect_failed,
                    Signal::Exchange => resets + connect_failed,
                    Signal::FirstByte => connect_failed,
                    Signal::Probe => count(g, &["probe_failure"]),
                };
                let mut pr = probe.remove(g).unwrap_or_else(Distribution::empty);
                pr.failures = count(g, &["probe_failure"]);
                let attempts = connect.get(g).map_or(0, |d| d.hist.len()) + connect_failed;
                GroupInput {
                    latency: lat,
                    probe: pr,
                    attempts,
                    failed: connect_failed + resets,
                    active_connections: active
                        .get(&(g.clone(), String::new()))
                        .copied()
                        .unwrap_or(0.0)
                        .round() as u64,
                    new_connections_per_second: attempts as f64 / secs,
                }
            })
            .collect())
    }
}

/// A distribution from cumulative `(le, count)` buckets, ascending: each
/// bucket's own count at its upper bound (the last finite one for +Inf).
fn distribution(buckets: &[(f64, f64)]) -> Distribution {
    let mut d = Distribution::empty();
    let mut below = 0.0;
    let mut last_finite = 0.0f64;
    for &(le, cum) in buckets {
        let own = (cum - below).max(0.0).round() as u64;
        below = below.max(cum);
        let at = if le.is_finite() {
            last_finite = le;
            le
        } else {
            last_finite
        };
        let us = ((at * 1e6).round() as u64).clamp(1, HIGHEST_US);
        if own > 0 {
            let _ = d.hist.record_n(us, own as u32);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_become_upper_bounds() {
        // 90 at or below 5 ms, 9 more at or below 200 ms, 1 beyond 10 s.
        let d = distribution(&[
            (0.005, 90.0),
            (0.2, 99.0),
            (10.0, 99.0),
            (f64::INFINITY, 100.0),
        ]);
        assert_eq!(d.hist.len(), 100);
        // Within the histogram's 2 significant digits of the bucket edge.
        let near = |q: f64, want: f64| {
            let got = d.quantile_secs(q).unwrap();
            assert!((got - want).abs() <= want * 0.01, "q{q}: {got} vs {want}");
        };
        near(0.5, 0.005);
        near(0.95, 0.2);
        assert!(d.quantile_secs(1.0).unwrap() >= 9.9);
        // Extrapolated, slightly decreasing cumulative counts never go negative.
        let d = distribution(&[(0.001, 10.4), (0.002, 10.3), (f64::INFINITY, 12.0)]);
        assert_eq!(d.hist.len(), 12);
    }
}
