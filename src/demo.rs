//! `portshift demo`: the whole product on an embedded default, live in the
//! terminal. Inside this one process, on loopback only: a primary group of
//! two HTTP backends and a backup group of one, the proxy running the
//! shipped failover policy (its timings compressed so the story fits the
//! run), a steady open-loop load, then a latency spike on the primary, then
//! healing. A live view shows weights, latency, load and every decision;
//! the run ends with a summary.

use crate::backend::{self, BackendHandle, BackendOpts, Mode};
use crate::config::{Config, PolicyRef};
use crate::core::policy::{Mode as PolicyMode, Policy};
use crate::core::stats::{Signal, WindowConfig};
use crate::load::{self, LoadStats};
use crate::proxy::{ListenerState, Proxy};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Prints a line; a closed stdout (`portshift demo | head`) must not
/// panic the demo, so write errors are ignored.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

macro_rules! say_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

/// Backend reply delay when healthy, and during the injected spike.
const HEALTHY_DELAY: Duration = Duration::from_millis(5);
const SPIKE_DELAY: Duration = Duration::from_millis(300);
/// The story's beats, as fractions of the run: calm, spike, heal.
const FAULT_AT: f64 = 0.15;
const HEAL_AT: f64 = 0.45;
/// The run the shipped policies' timings were written for; shorter runs
/// compress them by `REFERENCE_RUN / duration`.
const REFERENCE_RUN: Duration = Duration::from_secs(300);

/// Shortest window the demo compresses to: six 400 ms probe rounds.
const MIN_WINDOW: Duration = Duration::from_millis(2500);

/// The embedded config; `{a}`, `{b}`, `{c}` become backend ports.
const DEMO_CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:0"

[[group]]
name = "primary"
backends = ["127.0.0.1:{a}", "127.0.0.1:{b}"]
[group.probe]
interval = "400ms"
timeout = "400ms"
send = "GET /health HTTP/1.1\r\nhost: probe\r\n\r\n"
expect = "HTTP/1.1 200"

[[group]]
name = "backup"
backends = ["127.0.0.1:{c}"]
[group.probe]
interval = "400ms"
timeout = "400ms"
send = "GET /health HTTP/1.1\r\nhost: probe\r\n\r\n"
expect = "HTTP/1.1 200"

[[listener]]
name = "web"
listen = ["127.0.0.1:0"]
primary = "primary"
backups = ["backup"]
connect_timeout = "1s"
"#;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Duration,
    /// A shipped policy name, a name in ./policies, or a file.
    pub policy: Option<String>,
    /// Compress the policy's timings this many times; default from duration.
    pub speedup: Option<f64>,
    /// New connections per second.
    pub rate: f64,
    /// Redraw a live view (a terminal), or print plain lines.
    pub tui: bool,
}

/// What the run showed, in seconds since start.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub fault_at: f64,
    pub heal_at: f64,
    pub first_shift_at: Option<f64>,
    pub peak_backup_share: f64,
    pub back_on_primary_at: Option<f64>,
    pub requests: u64,
    pub client_errors: u64,
}

/// Runs the demo and prints its view and summary.
pub async fn run(opts: DemoOptions) -> io::Result<Summary> {
    let speedup = opts
        .speedup
        .unwrap_or_else(|| (REFERENCE_RUN.as_secs_f64() / opts.duration.as_secs_f64()).max(1.0));
    let (name, path, mut policy) = resolve_policy(opts.policy.as_deref())?;
    compress(&mut policy, speedup);
    let backends = [
        start("primary-a").await?,
        start("primary-b").await?,
        start("backup-a").await?,
    ];
    let mut config = demo_config(&backends)?;
    config.listeners[0].policy = Some(PolicyRef {
        name: name.clone(),
        path,
        policy,
    });
    let proxy = Proxy::bind(&config).map_err(io::Error::other)?;
    let addr = proxy.local_addrs()[0].1;
    let admin = proxy
        .admin_addr()
        .expect("the demo config has an admin listener");
    let state = proxy
        .listener("web")
        .expect("the demo config defines `web`");
    let stop = CancellationToken::new();
    let server = tokio::spawn(proxy.serve(stop.clone().cancelled_owned()));
    let stats = Arc::new(LoadStats::default());
    let load_stop = CancellationToken::new();
    let load_task = tokio::spawn(load::run(
        addr,
        opts.rate,
        Arc::clone(&stats),
        load_stop.clone(),
    ));

    say!(
        "portshift demo: listener `web` on {addr}, policy `{name}` with its timings compressed {speedup:.1}x"
    );
    say!("  admin: http://{admin}/metrics   (curl it, or point Prometheus at it, while this runs)");
    say!(
        "  load: {} new connections/s; primary replies in {HEALTHY_DELAY:?}; a {SPIKE_DELAY:?} spike comes at {:.0}s and heals at {:.0}s\n",
        opts.rate,
        opts.duration.as_secs_f64() * FAULT_AT,
        opts.duration.as_secs_f64() * HEAL_AT
    );
    let summary = watch(&opts, &state, admin, &backends, &stats).await;
    load_stop.cancel();
    let _ = load_task.await;
    stop.cancel();
    let _ = server.await;
    for b in &backends {
        b.stop().await;
    }
    print_summary(&summary);
    Ok(summary)
}

/// Drives the story (spike, heal) and the view until the run ends.
async fn watch(
    opts: &DemoOptions,
    state: &ListenerState,
    admin: SocketAddr,
    backends: &[BackendHandle; 3],
    stats: &LoadStats,
) -> Summary {
    let total = opts.duration.as_secs_f64();
    let mut s = Summary {
        fault_at: total * FAULT_AT,
        heal_at: total * HEAL_AT,
        first_shift_at: None,
        peak_backup_share: 0.0,
        back_on_primary_at: None,
        requests: 0,
        client_errors: 0,
    };
    let (mut faulted, mut healed, mut seen, mut last_draw) = (false, false, 0u64, -1.0f64);
    let mut last_sent = 0u64;
    let mut lines: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        // Ctrl-C ends the run early, still with a summary and a clean stop.
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let now = state.clock.now().as_secs_f64();
        if now >= total {
            break;
        }
        script(now, &s, &mut faulted, &mut healed, backends, &mut lines);
        let backup = f64::from(state.router.weights().as_slice()[1]) / 100.0;
        s.peak_backup_share = s.peak_backup_share.max(backup);
        if healed && backup == 0.0 && s.peak_backup_share > 0.0 && s.back_on_primary_at.is_none() {
            s.back_on_primary_at = Some(now);
        }
        for (n, d) in state.decisions.since(seen) {
            seen = n;
            let at = d.uptime_s;
            if d.action == "shift" && s.first_shift_at.is_none() && faulted {
                s.first_shift_at = Some(at);
            }
            lines.push(format!("{at:6.1}s  {}", describe_decision(&d)));
        }
        if now - last_draw >= 1.0 {
            let sent = stats.sent.load(Relaxed);
            let rate = (sent - last_sent) as f64 / (now - last_draw.max(0.0)).max(0.1);
            last_sent = sent;
            last_draw = now;
            draw(
                opts.tui,
                &view(state, admin, now, total, rate, stats),
                &mut lines,
            );
        }
    }
    if !opts.tui {
        lines.drain(..).for_each(|l| say!("  {l}"));
    }
    s.requests = stats.sent.load(Relaxed);
    s.client_errors = stats.errors.load(Relaxed);
    s
}

/// The demo's story: the primary's latency spike at `fault_at`, its
/// healing at `heal_at`, each announced once.
fn script(
    now: f64,
    s: &Summary,
    faulted: &mut bool,
    healed: &mut bool,
    backends: &[BackendHandle; 3],
    lines: &mut Vec<String>,
) {
    if !*faulted && now >= s.fault_at {
        *faulted = true;
        backends[..2].iter().for_each(|b| b.set_delay(SPIKE_DELAY));
        lines.push(format!(
            "{now:6.1}s  >>> latency spike on the primary: replies now take {SPIKE_DELAY:?}"
        ));
    }
    if !*healed && now >= s.heal_at {
        *healed = true;
        backends[..2]
            .iter()
            .for_each(|b| b.set_delay(HEALTHY_DELAY));
        lines.push(format!(
            "{now:6.1}s  >>> the primary heals: replies back to {HEALTHY_DELAY:?}"
        ));
    }
}

/// Redraws the screen (the view and the last decisions), or prints the
/// status line and the new decisions as plain lines.
fn draw(tui: bool, view: &str, lines: &mut Vec<String>) {
    if tui {
        say_raw!("\x1b[2J\x1b[H{view}");
        for l in lines.iter().rev().take(12).rev() {
            say!("  {l}");
        }
    } else {
        say!("{}", view.lines().next().unwrap_or_default());
        for l in lines.drain(..) {
            say!("  {l}");
        }
    }
}

/// The live view: one status line, then a bar and latency per group.
fn view(
    state: &ListenerState,
    admin: SocketAddr,
    now: f64,
    total: f64,
    rate: f64,
    stats: &LoadStats,
) -> String {
    let mut out = String::new();
    let phase = state.decisions.phase().unwrap_or("starting");
    let _ = writeln!(
        out,
        "t={now:5.1}s/{total:.0}s  state {phase:<11} load {rate:5.0} conn/s  client errors {}",
        stats.errors.load(Relaxed)
    );
    for g in state.view() {
        let share = f64::from(g.weight_bp) / 100.0;
        let bar: String = (0..20)
            .map(|i| if f64::from(i) < share / 5.0 { '#' } else { '.' })
            .collect();
        let ex = g.signals[Signal::Exchange.index()];
        let probe = g.signals[Signal::Probe.index()];
        let _ = writeln!(
            out,
            "  {:<8} [{bar}] {share:5.1}%   p50 {:>7}  p99 {:>7}  {:>4} replies   probe p99 {:>7}{}",
            g.name,
            ms(ex.p50),
            ms(ex.p99),
            ex.count,
            ms(probe.p99),
            if probe.errors > 0 {
                format!(" ({} failed)", probe.errors)
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(out, "  admin http://{admin}/metrics    decisions:");
    out
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}

/// One decision as a line: action, weights, and the reason that fired.
fn describe_decision(d: &crate::decision_record::DecisionRecord) -> String {
    let reason = d
        .fired()
        .map(|r| {
            // Latencies (p99_above, recover.p99_below) read best in ms.
            let latency = r.unit == "seconds";
            let num = |v: &serde_json::Value| match v.as_f64() {
                Some(x) if latency => format!("{:.1}ms", x * 1000.0),
                Some(x) => format!("{x:.3}"),
                None => v.as_str().unwrap_or("?").to_owned(),
            };
            let threshold = serde_json::Value::from(r.threshold);
            format!(": {} {} vs {}", r.rule, num(&r.value), num(&threshold))
        })
        .unwrap_or_default();
    format!(
        "{}{:<8} -> primary {:>5}% / backup {:>5}%{reason}",
        if d.dry_run { "would " } else { "" },
        d.action,
        d.to["primary"],
        d.to["backup"],
    )
}

fn print_summary(s: &Summary) {
    let after = |t: Option<f64>, from: f64| match t {
        Some(t) => format!("at {t:.1}s ({:.1}s after)", t - from),
        None => "never".into(),
    };
    say!("\nsummary");
    say!("  fault began:             at {:.1}s", s.fault_at);
    say!(
        "  first shift:             {}",
        after(s.first_shift_at, s.fault_at)
    );
    say!(
        "  peak share moved:        {:.0}% to the backup",
        s.peak_backup_share
    );
    say!("  fault healed:            at {:.1}s", s.heal_at);
    say!(
        "  traffic back on primary: {}",
        after(s.back_on_primary_at, s.heal_at)
    );
    say!("  client requests:         {}", s.requests);
    say!("  client errors:           {}", s.client_errors);
}

/// A shipped name, a name in ./policies, or a path.
fn resolve_policy(arg: Option<&str>) -> io::Result<(String, PathBuf, Policy)> {
    let r = crate::config::shipped::resolve(arg.unwrap_or("failover"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    Ok((r.name, r.path, r.policy))
}

/// Divides every timing of the policy by `k` (never below 10 ms), so a
/// policy written for minutes plays out in the demo's seconds.
fn compress(p: &mut Policy, k: f64) {
    let f = |d: Duration| d.div_f64(k).max(Duration::from_millis(10));
    p.interval = f(p.interval);
    // The window keeps enough probe rounds to judge a primary that has no
    // traffic left: at least MIN_WINDOW.
    let w = p.window.unwrap_or_default();
    let span = w.span().div_f64(k).max(MIN_WINDOW);
    p.window = Some(WindowConfig {
        slots: w.slots,
        slot: span / w.slots as u32,
    });
    match &mut p.mode {
        PolicyMode::Failover { shift, recover } => {
            shift.cooldown = f(shift.cooldown);
            recover.hold = f(recover.hold);
            recover.cooldown = f(recover.cooldown);
        }
        PolicyMode::Canary(c) => c.hold = f(c.hold),
    }
}

fn demo_config(backends: &[BackendHandle; 3]) -> io::Result<Config> {
    let text = DEMO_CONFIG
        .replace("{a}", &backends[0].addr().port().to_string())
        .replace("{b}", &backends[1].addr().port().to_string())
        .replace("{c}", &backends[2].addr().port().to_string());
    Config::parse(Path::new("<demo>"), &text).map_err(|e| io::Error::other(e.to_string()))
}

async fn start(name: &str) -> io::Result<BackendHandle> {
    let opts = BackendOpts {
        name: name.into(),
        mode: Mode::Http,
        delay: HEALTHY_DELAY,
        greeting: None,
    };
    backend::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
}
