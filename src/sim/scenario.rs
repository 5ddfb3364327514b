//! Scenario files (`sim/*.toml`): what the simulator replays. Raw serde
//! types with spans, validated into `Scenario` with the same
//! file:line:column diagnostics as the proxy config.

use crate::config::ConfigError;
use crate::config::diagnostic::{Reporter, did_you_mean};
use crate::core::backend::Balance;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned as S;

/// Most events one run may process: a black hole or a runaway rate must
/// end the run, not hang it.
pub const DEFAULT_MAX_EVENTS: u64 = 200_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    description: Option<String>,
    duration: S<String>,
    tick: Option<S<String>>,
    seed: Option<u64>,
    slo: Option<S<String>>,
    policy: Option<String>,
    max_events: Option<u64>,
    #[serde(rename = "group")]
    groups: S<Vec<RawGroup>>,
    load: S<RawLoad>,
    #[serde(default, rename = "fault")]
    faults: Vec<S<RawFault>>,
    measurement: Option<RawMeasurement>,
    fleet: Option<S<RawSimFleet>>,
    expect: Option<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSimFleet {
    instances: S<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: S<String>,
    #[serde(rename = "backend")]
    backends: S<Vec<RawBackend>>,
    /// As a config group's `balance` (peak_ewma with its defaults).
    balance: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<String>,
    count: Option<S<u32>>,
    workers: Option<S<u32>>,
    queue: Option<u32>,
    latency: S<RawLatency>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLatency {
    model: S<String>,
    value: Option<S<String>>,
    mean: Option<S<String>>,
    stddev: Option<S<String>>,
    p50: Option<S<String>>,
    p90: Option<S<String>>,
    p99: Option<S<String>>,
    p999: Option<S<String>>,
    scale: Option<S<String>>,
    shape: Option<f64>,
    /// `[[latency_ms, count], ...]`
    buckets: Option<S<Vec<(f64, u64)>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoad {
    model: S<String>,
    rate: Option<f64>,
    #[serde(default)]
    schedule: Vec<RawStep>,
    mean: Option<f64>,
    amplitude: Option<f64>,
    period: Option<S<String>>,
    rate_on: Option<f64>,
    rate_off: Option<f64>,
    on: Option<S<String>>,
    off: Option<S<String>>,
    file: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    at: S<String>,
    rate: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    at: S<String>,
    until: S<String>,
    target: S<String>,
    latency_factor: Option<f64>,
    latency_add: Option<S<String>>,
    #[serde(default)]
    drift: bool,
    error_rate: Option<f64>,
    #[serde(default)]
    refuse: bool,
    #[serde(default)]
    black_hole: bool,
    flap_period: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeasurement {
    probe_interval: Option<S<String>>,
    probe_loss: Option<f64>,
    stale: Option<S<String>>,
    rtt: Option<S<String>>,
    connect_timeout: Option<S<String>>,
    connect_attempts: Option<u32>,
    window: Option<S<String>>,
}

/// A validated scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    /// The file's text, for the scenario hash in reports.
    pub text: String,
    pub duration: Duration,
    pub tick: Duration,
    pub seed: u64,
    pub slo: Duration,
    /// The policy to use when none is named on the command line.
    pub policy: Option<String>,
    pub max_events: u64,
    pub groups: Vec<SimGroup>,
    pub load: Load,
    pub faults: Vec<Fault>,
    pub measurement: Measurement,
    /// `[fleet] instances`: proxies that share the arrivals, each taking
    /// 1/N; `None`: one proxy.
    pub fleet: Option<u32>,
    /// Expected outcomes, asserted by the tests of shipped scenarios.
    pub expect: toml::Table,
}

#[derive(Debug, Clone)]
pub struct SimGroup {
    pub name: String,
    pub backends: Vec<SimBackend>,
    pub balance: Balance,
}

#[derive(Debug, Clone)]
pub struct SimBackend {
    pub name: String,
    /// Requests served at once; more wait in the queue (the capacity model).
    pub workers: u32,
    /// Requests that may wait; beyond, connects are refused.
    pub queue: u32,
    pub latency: LatencyModel,
}

/// A service-time distribution.
#[derive(Debug, Clone, PartialEq)]
pub enum LatencyModel {
    Constant(Duration),
    Normal {
        mean: Duration,
        stddev: Duration,
    },
    /// From its median and 99th percentile.
    LogNormal {
        p50: Duration,
        p99: Duration,
    },
    Pareto {
        scale: Duration,
        shape: f64,
    },
    /// Piecewise-linear through the given quantiles.
    Percentiles(Vec<(f64, Duration)>),
    /// From a recorded histogram: (latency, count) buckets.
    Empirical(Vec<(Duration, u64)>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Load {
    /// Poisson arrivals; `schedule` changes the rate at given times.
    Poisson {
        rate: f64,
        schedule: Vec<(Duration, f64)>,
    },
    Diurnal {
        mean: f64,
        amplitude: f64,
        period: Duration,
    },
    Bursts {
        rate_on: f64,
        rate_off: f64,
        on: Duration,
        off: Duration,
    },
    /// Arrival times replayed from a recorded trace.
    Trace {
        file: PathBuf,
        arrivals: Vec<Duration>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub at: Duration,
    pub until: Duration,
    /// Group index, and backend index within it (None: every backend).
    pub group: usize,
    pub backend: Option<usize>,
    pub target: String,
    pub latency_factor: f64,
    pub latency_add: Duration,
    /// `latency_add` grows linearly from 0 at `at` to full at `until`.
    pub drift: bool,
    pub error_rate: f64,
    pub refuse: bool,
    pub black_hole: bool,
    /// Active only in the first half of each period.
    pub flap_period: Option<Duration>,
}

impl Fault {
    pub fn active(&self, t: Duration) -> bool {
        if t < self.at || t >= self.until {
            return false;
        }
        match self.flap_period {
            None => true,
            Some(p) => ((t - self.at).as_nanos() % p.as_nanos()) < p.as_nanos() / 2,
        }
    }

    pub fn hits(&self, group: usize, backend: usize) -> bool {
        self.group == group && self.backend.is_none_or(|b| b == backend)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub probe_interval: Option<Duration>,
    pub probe_loss: f64,
    pub stale: Duration,
    pub rtt: Duration,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub window: Option<Duration>,
}

// === impl Scenario ===

impl Scenario {
    /// The proxies the run simulates: 1 without `[fleet]`.
    pub fn instances(&self) -> usize {
        self.fleet.unwrap_or(1) as usize
    }

    pub fn load(path: &Path) -> Result<Scenario, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            diagnostics: vec![crate::config::Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read scenario: {e}"),
                hint: Some("name a scenario file, e.g. sim/latency-spike.toml".into()),
            }],
        })?;
        Scenario::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Scenario, ConfigError> {
        let mut rep = Reporter::new(path, text);
        let Some(raw) = rep.parse_toml::<RawScenario>(text) else {
            return Err(rep.finish().expect_err("an error was reported"));
        };
        let s = Validator {
            rep: &mut rep,
            dir: path.parent().unwrap_or(Path::new(".")),
        }
        .scenario(raw, path, text);
        rep.finish().map(|()| s)
    }
}

struct Validator<'r, 'a> {
    rep: &'r mut Reporter<'a>,
    dir: &'a Path,
}

impl Validator<'_, '_> {
    fn scenario(&mut self, raw: RawScenario, path: &Path, text: &str) -> Scenario {
        let duration = self.dur(&raw.duration, "duration");
        let groups: Vec<SimGroup> = raw.groups.get_ref().iter().map(|g| self.group(g)).collect();
        if groups.is_empty() {
            self.rep.error(
                raw.groups.span(),
                "a scenario needs groups: the primary first, then backups",
                None,
            );
        }
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        let faults = raw
            .faults
            .iter()
            .filter_map(|f| self.fault(f, &groups, &names, duration))
            .collect();
        let measurement = self.measurement(raw.measurement.as_ref());
        Scenario {
            name: raw.name.unwrap_or_else(|| {
                path.file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("scenario")
                    .to_owned()
            }),
            description: raw.description.unwrap_or_default(),
            path: path.to_path_buf(),
            text: text.to_owned(),
            duration,
            tick: raw
                .tick
                .as_ref()
                .map_or(Duration::from_secs(1), |t| self.dur(t, "tick")),
            seed: raw.seed.unwrap_or(1),
            slo: raw
                .slo
                .as_ref()
                .map_or(Duration::from_millis(250), |s| self.dur(s, "slo")),
            policy: raw.policy,
            max_events: raw.max_events.unwrap_or(DEFAULT_MAX_EVENTS),
            groups,
            load: self.load(&raw.load),
            faults,
            measurement,
            fleet: raw.fleet.as_ref().and_then(|f| self.fleet(f)),
            expect: raw.expect.unwrap_or_default(),
        }
    }

    /// `[fleet] instances = N`, 2 to 64.
    fn fleet(&mut self, raw: &S<RawSimFleet>) -> Option<u32> {
        let n = &raw.get_ref().instances;
        if !(2..=64).contains(n.get_ref()) {
            self.rep.error(
                n.span(),
                format!("`fleet.instances` is {}; it must be 2 to 64", n.get_ref()),
                Some("leave out [fleet] to simulate one proxy".into()),
            );
            return None;
        }
        Some(*n.get_ref())
    }

    /// `[measurement]`: how the simulated proxy observes its backends.
    fn measurement(&mut self, m: Option<&RawMeasurement>) -> Measurement {
        let opt = |v: &mut Self, d: Option<&S<String>>, key: &str, default: Duration| {
            d.map_or(default, |d| v.dur(d, key))
        };
        Measurement {
            probe_interval: m
                .and_then(|m| m.probe_interval.as_ref())
                .map(|d| self.dur(d, "measurement.probe_interval")),
            probe_loss: m.and_then(|m| m.probe_loss).unwrap_or(0.0).clamp(0.0, 1.0),
            stale: opt(
                self,
                m.and_then(|m| m.stale.as_ref()),
                "measurement.stale",
                Duration::ZERO,
            ),
            rtt: opt(
                self,
                m.and_then(|m| m.rtt.as_ref()),
                "measurement.rtt",
                Duration::from_micros(200),
            ),
            connect_timeout: opt(
                self,
                m.and_then(|m| m.connect_timeout.as_ref()),
                "measurement.connect_timeout",
                Duration::from_secs(3),
            ),
            connect_attempts: m.and_then(|m| m.connect_attempts).unwrap_or(3).clamp(1, 32),
            window: m
                .and_then(|m| m.window.as_ref())
                .map(|d| self.dur(d, "measurement.window")),
        }
    }

    fn dur(&mut self, raw: &S<String>, key: &str) -> Duration {
        self.rep
            .duration(raw, key, false)
            .unwrap_or(Duration::from_secs(1))
    }

    fn group(&mut self, g: &RawGroup) -> SimGroup {
        let mut backends = Vec::new();
        for (i, b) in g.backends.get_ref().iter().enumerate() {
            let count = b.count.as_ref().map_or(1, |c| *c.get_ref());
            let workers = b.workers.as_ref().map_or(100, |w| *w.get_ref());
            if workers == 0 {
                let span = b.workers.as_ref().map_or(0..0, |w| w.span());
                self.rep.error(
                    span,
                    "`workers` must be at least 1",
                    Some("the requests a backend serves at once".into()),
                );
            }
            let latency = self.latency(&b.latency);
            for k in 0..count {
                let base = b
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}-{}", g.name.get_ref(), i + 1));
                let name = if count > 1 {
                    format!("{base}.{}", k + 1)
                } else {
                    base
                };
                backends.push(SimBackend {
                    name,
                    workers: workers.max(1),
                    queue: b.queue.unwrap_or(10_000),
                    latency: latency.clone(),
                });
            }
        }
        if backends.is_empty() {
            self.rep.error(
                g.backends.span(),
                format!("group `{}` has no backends", g.name.get_ref()),
                Some("add a [[group.backend]] table".into()),
            );
        }
        SimGroup {
            name: g.name.get_ref().clone(),
            backends,
            balance: self.balance(g),
        }
    }

    fn balance(&mut self, g: &RawGroup) -> Balance {
        let Some(b) = &g.balance else {
            return Balance::default();
        };
        Balance::from_name(b.get_ref()).unwrap_or_else(|| {
            self.rep.error(
                b.span(),
                format!(
                    "group `{}`: unknown balance `{}`",
                    g.name.get_ref(),
                    b.get_ref()
                ),
                did_you_mean(b.get_ref(), Balance::NAMES),
            );
            Balance::default()
        })
    }

    fn latency(&mut self, raw: &S<RawLatency>) -> LatencyModel {
        let l = raw.get_ref();
        let need = |v: &mut Self, d: &Option<S<String>>, key: &str| match d {
            Some(d) => v.dur(d, key),
            None => {
                v.rep.error(
                    raw.span(),
                    format!("latency model `{}` needs `{key}`", l.model.get_ref()),
                    None,
                );
                Duration::from_millis(1)
            }
        };
        match l.model.get_ref().as_str() {
            "constant" => LatencyModel::Constant(need(self, &l.value, "value")),
            "normal" => LatencyModel::Normal {
                mean: need(self, &l.mean, "mean"),
                stddev: need(self, &l.stddev, "stddev"),
            },
            "lognormal" => {
                let (p50, p99) = (need(self, &l.p50, "p50"), need(self, &l.p99, "p99"));
                if p99 < p50 {
                    self.rep
                        .error(raw.span(), "lognormal `p99` is below `p50`", None);
                }
                LatencyModel::LogNormal { p50, p99 }
            }
            "pareto" => {
                let shape = l.shape.unwrap_or(0.0);
                if shape <= 1.0 {
                    self.rep.error(
                        raw.span(),
                        "pareto `shape` must be above 1 (a finite mean)",
                        Some("e.g. shape = 2.5".into()),
                    );
                }
                LatencyModel::Pareto {
                    scale: need(self, &l.scale, "scale"),
                    shape: shape.max(1.01),
                }
            }
            "percentiles" => self.percentiles(raw),
            "empirical" => self.empirical(raw),
            other => {
                let models = [
                    "constant",
                    "normal",
                    "lognormal",
                    "pareto",
                    "percentiles",
                    "empirical",
                ];
                self.rep.error(
                    l.model.span(),
                    format!("unknown latency model `{other}`"),
                    did_you_mean(other, models),
                );
                LatencyModel::Constant(Duration::from_millis(1))
            }
        }
    }

    /// `model = "percentiles"`: p50 … p999, non-decreasing.
    fn percentiles(&mut self, raw: &S<RawLatency>) -> LatencyModel {
        let l = raw.get_ref();
        let mut pts = vec![(0.0, Duration::ZERO)];
        for (q, v) in [
            (0.5, &l.p50),
            (0.9, &l.p90),
            (0.99, &l.p99),
            (0.999, &l.p999),
        ] {
            if let Some(v) = v {
                pts.push((q, self.dur(v, "percentile")));
            }
        }
        if pts.len() < 2 || pts.windows(2).any(|w| w[1].1 < w[0].1) {
            self.rep.error(
                raw.span(),
                "percentiles must be given and must not decrease (p50 <= p90 <= p99 <= p999)",
                None,
            );
        }
        LatencyModel::Percentiles(pts)
    }

    /// `model = "empirical"`: a histogram of `[latency_ms, count]` buckets.
    fn empirical(&mut self, raw: &S<RawLatency>) -> LatencyModel {
        let l = raw.get_ref();
        let buckets: Vec<(Duration, u64)> = l
            .buckets
            .as_ref()
            .map(|b| {
                b.get_ref()
                    .iter()
                    .map(|&(ms, n)| (Duration::from_secs_f64(ms.max(0.0) / 1000.0), n))
                    .collect()
            })
            .unwrap_or_default();
        if buckets.iter().map(|b| b.1).sum::<u64>() == 0 {
            self.rep.error(
                raw.span(),
                "empirical model needs `buckets = [[latency_ms, count], ...]` with some counts",
                None,
            );
        }
        LatencyModel::Empirical(buckets)
    }

    fn load(&mut self, raw: &S<RawLoad>) -> Load {
        let l = raw.get_ref();
        let rate = |v: &mut Self, r: Option<f64>, key: &str| match r {
            Some(r) if r > 0.0 && r.is_finite() => r,
            _ => {
                v.rep.error(
                    raw.span(),
                    format!("load `{key}` must be a positive rate (requests per second)"),
                    None,
                );
                1.0
            }
        };
        match l.model.get_ref().as_str() {
            "poisson" => Load::Poisson {
                rate: rate(self, l.rate, "rate"),
                schedule: l
                    .schedule
                    .iter()
                    .map(|s| (self.dur(&s.at, "schedule.at"), s.rate.max(0.0)))
                    .collect(),
            },
            "diurnal" => Load::Diurnal {
                mean: rate(self, l.mean, "mean"),
                amplitude: l.amplitude.unwrap_or(0.5).clamp(0.0, 1.0),
                period: l
                    .period
                    .as_ref()
                    .map_or(Duration::from_secs(86_400), |p| self.dur(p, "period")),
            },
            "bursts" => Load::Bursts {
                rate_on: rate(self, l.rate_on, "rate_on"),
                rate_off: l.rate_off.unwrap_or(0.0).max(0.0),
                on: l
                    .on
                    .as_ref()
                    .map_or(Duration::from_secs(10), |d| self.dur(d, "on")),
                off: l
                    .off
                    .as_ref()
                    .map_or(Duration::from_secs(50), |d| self.dur(d, "off")),
            },
            "trace" => self.trace_load(raw),
            other => {
                let models = ["poisson", "diurnal", "bursts", "trace"];
                self.rep.error(
                    l.model.span(),
                    format!("unknown load model `{other}`"),
                    did_you_mean(other, models),
                );
                Load::Poisson {
                    rate: 1.0,
                    schedule: Vec::new(),
                }
            }
        }
    }

    /// `model = "trace"`: the arrival times of a recorded trace file.
    fn trace_load(&mut self, raw: &S<RawLoad>) -> Load {
        let l = raw.get_ref();
        let Some(f) = &l.file else {
            self.rep.error(
                raw.span(),
                "trace load needs `file`",
                Some("an access log, or a recording by `portshift run --record FILE`".into()),
            );
            return Load::Trace {
                file: PathBuf::new(),
                arrivals: Vec::new(),
            };
        };
        let file = self.dir.join(f.get_ref());
        match crate::access_log::read_arrivals(&file) {
            Ok(arrivals) => Load::Trace { file, arrivals },
            Err(e) => {
                self.rep.error(
                    f.span(),
                    format!("cannot read trace {}: {e}", file.display()),
                    None,
                );
                Load::Trace {
                    file,
                    arrivals: Vec::new(),
                }
            }
        }
    }

    /// A fault's `target`: a group, or `group/backend`.
    fn fault_target(
        &mut self,
        raw: &S<RawFault>,
        groups: &[SimGroup],
        names: &[&str],
    ) -> Option<(usize, Option<usize>)> {
        let f = raw.get_ref();
        let target = f.target.get_ref();
        let (gname, bname) = target
            .split_once('/')
            .map_or((target.as_str(), None), |(g, b)| (g, Some(b)));
        let Some(group) = names.iter().position(|n| *n == gname) else {
            self.rep.error(
                f.target.span(),
                format!("fault target `{gname}` is not a group"),
                did_you_mean(gname, names.iter().copied()),
            );
            return None;
        };
        let backend = match bname {
            None => None,
            Some(b) => match groups[group].backends.iter().position(|x| x.name == b) {
                Some(i) => Some(i),
                None => {
                    let known = groups[group].backends.iter().map(|x| x.name.as_str());
                    self.rep.error(
                        f.target.span(),
                        format!("group `{gname}` has no backend `{b}`"),
                        did_you_mean(b, known),
                    );
                    return None;
                }
            },
        };
        Some((group, backend))
    }

    fn fault(
        &mut self,
        raw: &S<RawFault>,
        groups: &[SimGroup],
        names: &[&str],
        duration: Duration,
    ) -> Option<Fault> {
        let f = raw.get_ref();
        let (at, until) = (
            self.dur(&f.at, "fault.at"),
            self.dur(&f.until, "fault.until"),
        );
        if until <= at {
            self.rep
                .error(f.until.span(), "fault `until` must be after `at`", None);
        }
        if at > duration {
            self.rep
                .error(f.at.span(), "fault starts after the scenario ends", None);
        }
        let target = f.target.get_ref();
        let (group, backend) = self.fault_target(raw, groups, names)?;
        let any = f.latency_factor.is_some()
            || f.latency_add.is_some()
            || f.error_rate.is_some()
            || f.refuse
            || f.black_hole;
        if !any {
            self.rep.error(
                raw.span(),
                "this fault changes nothing",
                Some("set latency_factor, latency_add, error_rate, refuse or black_hole".into()),
            );
        }
        Some(Fault {
            at,
            until,
            group,
            backend,
            target: target.clone(),
            latency_factor: f.latency_factor.unwrap_or(1.0).max(0.0),
            latency_add: f
                .latency_add
                .as_ref()
                .map_or(Duration::ZERO, |d| self.dur(d, "fault.latency_add")),
            drift: f.drift,
            error_rate: f.error_rate.unwrap_or(0.0).clamp(0.0, 1.0),
            refuse: f.refuse,
            black_hole: f.black_hole,
            flap_period: f
                .flap_period
                .as_ref()
                .map(|p| self.dur(p, "fault.flap_period")),
        })
    }
}
