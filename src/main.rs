//! The `portshift` command: parses arguments, sets up logging, and calls the
//! library. Exit codes: 0 ok, 1 runtime failure (e.g. a port is taken),
//! 2 bad config or usage.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use portshift::config::Config;
use std::io::IsTerminal;
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

/// `--version`: the version and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PORTSHIFT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "portshift",
    version = VERSION,
    about = "Latency-aware adaptive L4 traffic shifter"
)]
struct Cli {
    /// Log format on stderr: text, or one JSON object per line for log
    /// shippers.
    #[arg(long, value_enum, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file.
        #[arg(short, long, default_value = "portshift.toml")]
        config: PathBuf,
        /// Record every connection of every listener to this file, created
        /// afresh (access-log JSON lines), for `portshift sim` to replay.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Take over from the running portshift without refusing a
        /// connection: receive its listening sockets and policy state over
        /// the upgrade socket, accept, then let it drain and exit. Exit 2,
        /// leaving it serving, if anything fails before accepting.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config and print what would run; exit 2 on any problem.
    Check {
        #[arg(short, long, default_value = "portshift.toml")]
        config: PathBuf,
    },
    /// The whole product on an embedded default: backends, the proxy with
    /// the failover policy, load, a latency spike and its healing, live.
    Demo(DemoArgs),
    /// Check why a port does not answer: bound by whom, ACL, backends
    /// reachable, backends answering. Exit 1 when a check fails.
    Diagnose(DiagnoseArgs),
    /// Replay a scenario offline through the policy engine, deterministically.
    Sim(SimArgs),
    /// Open-loop HTTP load: new connections at a fixed rate.
    Load(LoadArgs),
    /// A test backend: echo or HTTP, with a reply delay.
    Backend(BackendArgs),
    /// Audit the host's ports under a least-exposure rule: every listener's
    /// addresses, ACL, TLS and traffic, every other listening socket and its
    /// process, and sensitive ports reachable without an ACL. Exit 1 when
    /// something should be acted on.
    Audit(AuditArgs),
    /// Print a shell completion script: `portshift completions bash >
    /// /etc/bash_completion.d/portshift`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man pages (roff): `portshift man | man -l -`, or
    /// `portshift man --dir DIR` for portshift.1 and one page per
    /// subcommand.
    Man {
        /// Write each page to its own file here instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct DemoArgs {
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
}

#[derive(clap::Args)]
struct DiagnoseArgs {
    #[arg(short, long, default_value = "portshift.toml")]
    config: PathBuf,
    /// Only this listener.
    #[arg(long)]
    listener: Option<String>,
    /// The client address to test the ACL with.
    #[arg(long, default_value = "127.0.0.1")]
    source: std::net::IpAddr,
}

#[derive(clap::Args)]
struct AuditArgs {
    #[arg(short, long, default_value = "portshift.toml")]
    config: PathBuf,
    /// The running instance's admin API, e.g. http://127.0.0.1:9900
    /// (default: the config's [admin] address).
    #[arg(long)]
    admin: Option<String>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SimArgs {
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
    /// Also run the first policy over N seeds (the seed, then the next
    /// N - 1) and print each headline figure's spread.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=10_000))]
    seeds: Option<u32>,
    /// Simulations run at once (default: one per core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// Where to send requests.
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
}

#[derive(clap::Args)]
struct BackendArgs {
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own report; proxy logs would only interleave with it.
    let level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format, level);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            record,
            upgrade,
        } => on_runtime(|| run(config, record, upgrade)),
        Command::Diagnose(a) => diagnose(&a.config, a.listener.as_deref(), a.source),
        Command::Audit(a) => audit(a),
        Command::Sim(a) => sim(a),
        Command::Demo(a) => {
            let opts = portshift::demo::DemoOptions {
                duration: a.duration,
                policy: a.policy,
                speedup: a.speedup,
                rate: a.rate,
                tui: !a.no_tui && std::io::stdout().is_terminal(),
            };
            on_runtime(|| async { Ok(portshift::demo::run(opts).await.map(|_| ())?) })
        }
        Command::Load(a) => on_runtime(|| async move {
            Ok(portshift::load::report_each_second(a.target, a.rate, a.duration).await?)
        }),
        Command::Backend(a) => on_runtime(|| backend(a)),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "portshift",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man { dir } => man(dir),
    }
}

/// The man pages of the CLI, from the same definition `--help` prints:
/// `portshift.1`, then `portshift-SUB.1` per subcommand.
fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mut pages = Vec::new();
    let mut top = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut top)?;
    pages.push(("portshift.1".to_owned(), top));
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = sub.get_name().to_owned();
        let sub = sub
            .clone()
            .version(VERSION)
            .display_name(format!("portshift-{name}"))
            .bin_name(format!("portshift {name}"));
        let mut page = Vec::new();
        clap_mangen::Man::new(sub).render(&mut page)?;
        pages.push((format!("portshift-{name}.1"), page));
    }
    Ok(pages)
}

/// `portshift man`: every page on stdout, or each in its file under `dir`.
fn man(dir: Option<PathBuf>) -> ExitCode {
    use std::io::Write as _;
    let written = man_pages().and_then(|pages| match &dir {
        None => pages
            .iter()
            .try_for_each(|(_, page)| std::io::stdout().write_all(page)),
        Some(d) => {
            std::fs::create_dir_all(d)?;
            pages
                .iter()
                .try_for_each(|(name, page)| std::fs::write(d.join(name), page))
        }
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the man pages: {e}");
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr, coloured only on a terminal with `NO_COLOR` unset: a
/// file or a pipe (journald, a log shipper) gets plain text, or JSON lines
/// with `--log-format json`.
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// `check`: the file, then its names and discovery files, read once.
fn check(path: &std::path::Path) -> ExitCode {
    let c = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    match portshift::proxy::discovery::initial(&c) {
        Ok((_, _, warnings)) => {
            for w in warnings {
                eprintln!("warning: could not resolve or read {w}");
            }
            println!("{}: ok\n{}", path.display(), c.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

/// `run`: SIGHUP is caught before the config is read or anything binds (its
/// default action would end the process); one that arrives while starting
/// becomes a reload once serving.
async fn run(config: PathBuf, record: Option<PathBuf>, upgrade: bool) -> Result<(), Failure> {
    let hup = portshift::signals::hangup().context("cannot install the SIGHUP handler")?;
    let usr2 = portshift::signals::upgrade().context("cannot install the SIGUSR2 handler")?;
    let config = Config::load(&config).map_err(Failure::Config)?;
    let opts = portshift::proxy::RunOptions {
        record,
        upgrade,
        hup,
        usr2,
    };
    match portshift::proxy::run(config, opts).await {
        Ok(_) => Ok(()),
        // Before it accepts, a new binary that fails leaves the old one
        // serving and says so with exit 2.
        Err(e) if upgrade => Err(Failure::Refused(e.into())),
        // A group with no backend at start: like a bad config.
        Err(e @ portshift::proxy::RunError::Start(portshift::proxy::StartError::Discovery(_))) => {
            Err(Failure::Refused(e.into()))
        }
        Err(e) => Err(e.into()),
    }
}

fn diagnose(path: &std::path::Path, listener: Option<&str>, source: std::net::IpAddr) -> ExitCode {
    use portshift::diagnose;
    let c = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    match diagnose::run(&c, listener, source) {
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Ok(checks) => {
            print!("{}", diagnose::render(&checks));
            let failed = checks.iter().any(|c| c.verdict == diagnose::Verdict::Fail);
            ExitCode::from(u8::from(failed))
        }
    }
}

/// `portshift audit`: exit 0 with no finding, 1 with findings, 2 for a bad
/// config.
fn audit(a: AuditArgs) -> ExitCode {
    use portshift::config::TokenSource;
    let c = match Config::load(&a.config) {
        Ok(c) => c,
        Err(e) => return config_failed(&e),
    };
    // The config's own admin address (a wildcard bind is asked on loopback)
    // and token, unless told otherwise.
    let admin = a.admin.or_else(|| {
        c.admin.as_ref().map(|ad| {
            let mut addr = ad.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        })
    });
    let token = c
        .admin
        .as_ref()
        .and_then(|ad| ad.token.as_ref())
        .and_then(|t| match &t.source {
            TokenSource::File(p) => std::fs::read_to_string(p).ok(),
            TokenSource::Env(v) => std::env::var(v).ok(),
        });
    let report = portshift::port_audit::run(&c, admin.as_deref(), token.as_deref().map(str::trim));
    if a.json {
        println!("{:#}", portshift::port_audit::json(&report));
    } else {
        print!("{}", portshift::port_audit::render(&report));
    }
    ExitCode::from(u8::from(!report.findings.is_empty()))
}

fn sim(a: SimArgs) -> ExitCode {
    let json = a.json;
    let opts = portshift::sim::SimOptions {
        scenario: a.scenario,
        policies: a.policies,
        seed: a.seed,
        out: a.out,
        sweep: a.sweep,
        seeds: a.seeds.unwrap_or(1) as usize,
        threads: a.threads.map(|n| n as usize),
        progress: !json && std::io::stderr().is_terminal(),
    };
    match portshift::sim::run(&opts) {
        Ok(r) if json => {
            let doc = serde_json::to_string_pretty(&r.doc).expect("values serialize");
            println!("{doc}");
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

async fn backend(a: BackendArgs) -> Result<(), Failure> {
    let listen = a.listen;
    let opts = portshift::backend::BackendOpts {
        name: a.name.unwrap_or_else(|| listen.to_string()),
        mode: a.mode,
        delay: a.delay,
        greeting: a.greeting,
    };
    let b = portshift::backend::spawn(listen, opts)
        .await
        .with_context(|| format!("cannot bind backend on {listen}"))?;
    tracing::info!(addr = %b.addr(), "backend listening");
    portshift::signals::shutdown().await;
    b.stop().await;
    Ok(())
}

/// How a command failed: a bad config (exit 2, already explained with file,
/// line and column) or at run time (exit 1).
enum Failure {
    Config(portshift::config::ConfigError),
    Runtime(anyhow::Error),
    /// Refused before anything changed (exit 2).
    Refused(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Runtime(e.into())
    }
}

/// Runs `f` on the runtime and maps its outcome to an exit code.
fn on_runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let result = match runtime() {
        Ok(rt) => rt.block_on(f()),
        Err(e) => Err(Failure::Runtime(e)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => config_failed(&e),
        Err(Failure::Runtime(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(Failure::Refused(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn config_failed(e: &portshift::config::ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(2)
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
