//! The `portshift` command: parses arguments, sets up logging, and calls the
//! library. Exit codes: 0 ok, 1 runtime failure (e.g. a port is taken),
//! 2 bad config or usage.

use anyhow::Context;
use clap::{Parser, Subcommand};
use portshift::config::Config;
use portshift::proxy::Proxy;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// mimalloc: a connection allocates a task, its registrations and timers,
/// and frees them all when it ends; glibc malloc spent ~2.5% of the proxy's
/// CPU on that churn (perf, `Connection: close`), mimalloc's per-thread free
/// lists far less.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "portshift",
    version,
    about = "Latency-aware adaptive L4 traffic shifter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file.
        #[arg(short, long, default_value = "portshift.toml")]
        config: PathBuf,
        /// Record every proxied connection to this trace file (CSV), for
        /// `portshift sim` to replay.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// Validate a config and print what would run; exit 2 on any problem.
    Check {
        #[arg(short, long, default_value = "portshift.toml")]
        config: PathBuf,
    },
    /// The whole product on an embedded default: backends, the proxy with
    /// the failover policy, load, a latency spike and its healing, live.
    Demo {
        /// How long the demo runs; the policy's timings are compressed to fit.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        duration: Duration,
        /// Policy to try: a shipped name (failover, conservative, canary) or a file.
        #[arg(long)]
        policy: Option<String>,
        /// Compress the policy's timings this many times (default: 300s / duration).
        #[arg(long)]
        speedup: Option<f64>,
        /// New connections per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Print plain lines instead of redrawing the screen (automatic when
        /// stdout is not a terminal).
        #[arg(long)]
        no_tui: bool,
    },
    /// Check why a port does not answer: bound by whom, ACL, backends
    /// reachable, backends answering. Exit 1 when a check fails.
    Diagnose {
        #[arg(short, long, default_value = "portshift.toml")]
        config: PathBuf,
        /// Only this listener.
        #[arg(long)]
        listener: Option<String>,
        /// The client address to test the ACL with.
        #[arg(long, default_value = "127.0.0.1")]
        source: std::net::IpAddr,
    },
    /// Replay a scenario offline through the policy engine, deterministically.
    Sim {
        /// Scenario file (see sim/).
        scenario: PathBuf,
        /// Policy to judge: shipped name or file; repeat to compare several.
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Seed (default: the scenario's).
        #[arg(long)]
        seed: Option<u64>,
        /// Write timelines (CSV, JSON) and charts (SVG) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print one JSON document instead of tables.
        #[arg(long)]
        json: bool,
        /// Sweep a policy key: KEY=FROM..TO:STEP, e.g. trip.p99_above=100ms..400ms:50ms.
        #[arg(long)]
        sweep: Option<String>,
    },
    /// Open-loop HTTP load: new connections at a fixed rate.
    Load {
        /// Where to send requests.
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        duration: Duration,
    },
    /// A test backend: echo or HTTP, with a reply delay.
    Backend {
        #[arg(short, long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value = "http")]
        mode: portshift::backend::Mode,
        /// Delay before each reply, e.g. 5ms.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        delay: Duration,
        /// Sent on connect, before anything is read.
        #[arg(long)]
        greeting: Option<String>,
        /// Name in HTTP replies.
        #[arg(long)]
        name: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own report; proxy logs would only interleave with it.
    let default_level = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    // Colour only on a terminal: a file or a pipe (journald, a log
    // shipper) gets plain text, not escape codes.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .init();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: ok\n{}", config.display(), c.describe());
                ExitCode::SUCCESS
            }
            Err(e) => config_failed(&e),
        },
        Command::Run { config, record } => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return report(Err(e)),
            };
            rt.block_on(async move {
                // SIGHUP's default action ends the process, and an operator
                // or a config-management run may send one at any moment:
                // catch it before reading the config or binding anything.
                // One that arrives before serving starts is a reload then.
                let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
                match Config::load(&config) {
                    Ok(c) => report(run(c, record, hup).await),
                    Err(e) => config_failed(&e),
                }
            })
        }
        Command::Diagnose {
            config,
            listener,
            source,
        } => match Config::load(&config) {
            Err(e) => config_failed(&e),
            Ok(c) => match portshift::diagnose::run(&c, listener.as_deref(), source) {
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
                Ok(checks) => {
                    print!("{}", portshift::diagnose::render(&checks));
                    let failed = checks
                        .iter()
                        .any(|c| c.verdict == portshift::diagnose::Verdict::Fail);
                    if failed {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
            },
        },
        Command::Sim {
            scenario,
            policies,
            seed,
            out,
            json,
            sweep,
        } => {
            use std::io::IsTerminal;
            let opts = portshift::sim::SimOptions {
                scenario,
                policies,
                seed,
                out,
                sweep,
                progress: !json && std::io::stderr().is_terminal(),
            };
            match portshift::sim::run(&opts) {
                Ok(r) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&r.doc).expect("values serialize")
                    );
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    print!("{}", r.text);
                    ExitCode::SUCCESS
                }
                Err(e @ portshift::sim::SimError::Write { .. }) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Demo {
            duration,
            policy,
            speedup,
            rate,
            no_tui,
        } => {
            use std::io::IsTerminal;
            let opts = portshift::demo::DemoOptions {
                duration,
                policy,
                speedup,
                rate,
                tui: !no_tui && std::io::stdout().is_terminal(),
            };
            report(
                runtime().and_then(|rt| Ok(rt.block_on(portshift::demo::run(opts)).map(|_| ())?)),
            )
        }
        Command::Load {
            target,
            rate,
            duration,
        } => report(runtime().and_then(|rt| Ok(rt.block_on(load(target, rate, duration))?))),
        Command::Backend {
            listen,
            mode,
            delay,
            greeting,
            name,
        } => {
            let opts = portshift::backend::BackendOpts {
                name: name.unwrap_or_else(|| listen.to_string()),
                mode,
                delay,
                greeting,
            };
            report(runtime().and_then(|rt| rt.block_on(backend(listen, opts))))
        }
    }
}

fn config_failed(e: &portshift::config::ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(2)
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The async runtime: one thread per CPU this process may use. On a single
/// CPU (e.g. under taskset) the current-thread scheduler does the same work
/// without the cross-thread bookkeeping of work stealing.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn run(
    config: Config,
    record: Option<PathBuf>,
    hup: std::io::Result<tokio::signal::unix::Signal>,
) -> anyhow::Result<()> {
    let proxy = Proxy::bind(&config)?;
    if let Some(path) = record {
        let writer = portshift::trace::TraceWriter::create(&path)
            .with_context(|| format!("cannot create trace file {}", path.display()))?;
        proxy.handle().set_trace(std::sync::Arc::new(writer));
        tracing::info!(path = %path.display(), "recording a trace of every connection");
    }
    let handle = proxy.handle();
    let mut hup = hup.context("cannot install the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            // The outcome is logged, counted and shown in /status.
            let _ = handle.reload().await;
        }
    });
    let states: Vec<_> = config
        .listeners
        .iter()
        .filter_map(|l| proxy.listener(&l.name))
        .collect();
    let report = proxy.serve(shutdown_signal()).await;
    for s in states {
        let c = s.outcomes.snapshot();
        tracing::info!(
            listener = %s.name,
            accepted = c.accepted,
            denied = c.denied,
            connected = c.connected,
            connect_refused = c.connect_refused,
            connect_timeout = c.connect_timeout,
            no_backend = c.no_backend,
            local_error = c.local_error,
            idle_timeout = c.idle_timeout,
            reset = c.reset,
            client_reset = c.client_reset,
            bytes_up = c.bytes_up,
            bytes_down = c.bytes_down,
            "listener totals"
        );
    }
    tracing::info!(cut = report.cut, "stopped");
    Ok(())
}

async fn backend(listen: SocketAddr, opts: portshift::backend::BackendOpts) -> anyhow::Result<()> {
    let b = portshift::backend::spawn(listen, opts)
        .await
        .with_context(|| format!("cannot bind backend on {listen}"))?;
    tracing::info!(addr = %b.addr(), "backend listening");
    shutdown_signal().await;
    b.stop().await;
    Ok(())
}

async fn load(target: SocketAddr, rate: f64, duration: Duration) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = std::sync::Arc::new(portshift::load::LoadStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(portshift::load::run(
        target,
        rate,
        stats.clone(),
        stop.clone(),
    ));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for second in 1..=duration.as_secs().max(1) {
        tick.tick().await;
        println!(
            "{second:>4}s sent {:>8} ok {:>8} errors {:>6} mean {:?} served by {:?}",
            stats.sent.load(Relaxed),
            stats.ok.load(Relaxed),
            stats.errors.load(Relaxed),
            stats.mean_latency(),
            stats.served_by()
        );
    }
    stop.cancel();
    task.await.map_err(std::io::Error::other)?;
    println!(
        "done: {} sent, {} ok, {} errors",
        stats.sent.load(Relaxed),
        stats.ok.load(Relaxed),
        stats.errors.load(Relaxed)
    );
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}
