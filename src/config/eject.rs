//! A group's `eject` (passive ejection of failing backends) and
//! `slow_start` (the ramp of a backend that joins or returns), validated.

use super::raw::{RawEject, RawSlowStart, S};
use super::validate::Validator;
use crate::core::backend::SlowStart;
use crate::core::eject::EjectPolicy;
use std::time::Duration;

/// The defaults: Envoy's outlier detection's, but for the error rate.
pub const DEFAULT_EJECT: EjectPolicy = EjectPolicy {
    consecutive_failures: 5,
    error_rate_above: Some(0.5),
    min_requests: 20,
    base_time: Duration::from_secs(10),
    max_time: Duration::from_secs(300),
    max_percent: 50,
    latency_factor: None,
};

impl Validator<'_, '_> {
    pub(super) fn eject(&mut self, group: &str, raw: Option<&S<RawEject>>) -> Option<EjectPolicy> {
        let r = raw?.get_ref();
        let d = DEFAULT_EJECT;
        let mut count = |v: &Option<S<u32>>, key: &str, max: u32, default: u32| match v {
            None => default,
            Some(n) if *n.get_ref() <= max => *n.get_ref(),
            Some(n) => {
                self.rep.error(
                    n.span(),
                    format!(
                        "group `{group}`: `eject.{key}` is {}; it must be 0 to {max}",
                        n.get_ref()
                    ),
                    None,
                );
                default
            }
        };
        let consecutive_failures = count(
            &r.consecutive_failures,
            "consecutive_failures",
            1000,
            d.consecutive_failures,
        );
        let min_requests = count(
            &r.min_requests,
            "min_requests",
            1_000_000,
            d.min_requests as u32,
        );
        let max_percent = count(&r.max_percent, "max_percent", 100, d.max_percent);
        let error_rate_above = match &r.error_rate_above {
            None => d.error_rate_above,
            Some(x) if (0.0..1.0).contains(x.get_ref()) => Some(*x.get_ref()),
            Some(x) => {
                self.rep.error(
                    x.span(),
                    format!("group `{group}`: `eject.error_rate_above` is {}; it must be at least 0 and below 1", x.get_ref()),
                    Some("a share of the window's requests, e.g. 0.5".into()),
                );
                d.error_rate_above
            }
        };
        let latency_factor = match &r.latency_factor {
            None => None,
            Some(x) if x.get_ref().is_finite() && *x.get_ref() > 1.0 => Some(*x.get_ref()),
            Some(x) => {
                self.rep.error(
                    x.span(),
                    format!(
                        "group `{group}`: `eject.latency_factor` is {}; it must be above 1",
                        x.get_ref()
                    ),
                    Some(
                        "how many times the group's median p99 makes a backend an outlier, e.g. 3"
                            .into(),
                    ),
                );
                None
            }
        };
        let base_time = self.duration(r.base_time.as_ref(), "eject.base_time", d.base_time);
        let max_time = self.duration(r.max_time.as_ref(), "eject.max_time", d.max_time);
        if max_time < base_time {
            self.rep.error(
                raw?.span(),
                format!("group `{group}`: `eject.max_time` is shorter than `eject.base_time`"),
                Some("the cap on an ejection must be at least its base".into()),
            );
        }
        Some(EjectPolicy {
            consecutive_failures,
            error_rate_above,
            min_requests: u64::from(min_requests),
            base_time,
            max_time,
            max_percent,
            latency_factor,
        })
    }
}

impl Validator<'_, '_> {
    pub(super) fn slow_start(
        &mut self,
        group: &str,
        raw: Option<&S<RawSlowStart>>,
    ) -> Option<SlowStart> {
        let r = raw?.get_ref();
        // A window that does not parse is reported there.
        let window = self.rep.duration(&r.window, "slow_start.window", true)?;
        if window.is_zero() {
            self.rep.error(
                r.window.span(),
                format!("group `{group}`: `slow_start.window` must be longer than 0"),
                Some("how long a new backend takes to reach its weight, e.g. \"30s\"".into()),
            );
        }
        let min_percent = match &r.min_percent {
            None => SlowStart::DEFAULT_MIN_PERCENT,
            Some(p) if (1..=100).contains(p.get_ref()) => *p.get_ref(),
            Some(p) => {
                self.rep.error(
                    p.span(),
                    format!(
                        "group `{group}`: `slow_start.min_percent` is {}; it must be 1 to 100",
                        p.get_ref()
                    ),
                    None,
                );
                SlowStart::DEFAULT_MIN_PERCENT
            }
        };
        Some(SlowStart {
            window,
            min_percent,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;
    use std::time::Duration;

    fn with(eject: &str) -> Result<Config, String> {
        let text = format!(
            "[[group]]\nname = \"g\"\nbackends = [\"127.0.0.1:9\", \"127.0.0.1:10\"]\n{eject}\n\n\
             [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:8000\"]\nprimary = \"g\"\n"
        );
        Config::parse(Path::new("e.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_settings() {
        assert_eq!(with("").unwrap().groups[0].eject, None);
        assert_eq!(
            with("eject = {}").unwrap().groups[0].eject,
            Some(super::DEFAULT_EJECT)
        );
        let e = with("eject = { consecutive_failures = 2, error_rate_above = 0.2, min_requests = 5, base_time = \"1s\", max_time = \"4s\", max_percent = 100 }")
            .unwrap()
            .groups[0]
            .eject
            .unwrap();
        assert_eq!(
            (e.consecutive_failures, e.error_rate_above, e.min_requests),
            (2, Some(0.2), 5)
        );
        assert_eq!(
            (e.base_time, e.max_time, e.max_percent),
            (Duration::from_secs(1), Duration::from_secs(4), 100)
        );
    }

    #[test]
    fn mistakes_name_the_line_and_the_fix() {
        for (eject, want) in [
            (
                "eject = { max_percent = 101 }",
                "`eject.max_percent` is 101; it must be 0 to 100",
            ),
            (
                "eject = { error_rate_above = 1.5 }",
                "`eject.error_rate_above` is 1.5",
            ),
            (
                "eject = { base_time = \"1m\", max_time = \"10s\" }",
                "`eject.max_time` is shorter",
            ),
            ("eject = { base = \"1s\" }", "unknown field `base`"),
            (
                "eject = { latency_factor = 0.5 }",
                "`eject.latency_factor` is 0.5; it must be above 1",
            ),
        ] {
            let err = with(eject).expect_err(want);
            assert!(err.contains(want), "want {want:?} in:\n{err}");
        }
    }
}
