//! Helpers shared by the black-box tests: real sockets on loopback only,
//! ports chosen by the OS, every wait bounded.

use portshift::config::Config;
use portshift::proxy::{ListenerState, Proxy};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Generous bound for anything that should take milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_portshift")
}

/// Writes `text` as `portshift.toml` in `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("portshift.toml");
    std::fs::write(&path, text).expect("temp dir is writable");
    path
}

/// Starts `cmd` (a `portshift run`) with info logs on a piped stderr, and
/// returns the child and its stderr lines.
pub fn spawn_logging(
    cmd: &mut std::process::Command,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
) {
    use std::io::BufRead;
    // Each process its own runtime directory, so its default upgrade
    // socket is its own: test processes never probe or offer each other
    // upgrades (nor an installed portshift's in /run/portshift).
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let runtime = std::env::temp_dir().join(format!(
        "portshift-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&runtime).expect("the temp dir is writable");
    let mut child = cmd
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("RUNTIME_DIRECTORY", &runtime)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the portshift binary starts");
    let lines = std::io::BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    (child, lines)
}

/// The `addr=` value of a proxy log line (`listening addr=127.0.0.1:…`).
pub fn logged_addr(line: &str) -> Option<SocketAddr> {
    line.split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
}

/// A proxy running in this process.
pub struct TestProxy {
    pub addrs: Vec<(String, SocketAddr)>,
    pub handle: portshift::proxy::ProxyHandle,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<portshift::proxy::DrainReport>,
    proxy_states: Vec<Arc<ListenerState>>,
}

impl TestProxy {
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0].1
    }

    pub fn state(&self, listener: &str) -> Arc<ListenerState> {
        self.proxy_states
            .iter()
            .find(|s| s.name == listener)
            .cloned()
            .expect("listener exists in the test config")
    }

    pub async fn shutdown(mut self) -> portshift::proxy::DrainReport {
        let _ = self.stop.take().expect("shut down once").send(());
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("proxy drains in time")
            .expect("serve task does not panic")
    }
}

/// Validates `text` (policies resolve against a temp dir) and serves it.
pub async fn start_proxy(text: &str) -> TestProxy {
    let config = Config::parse(Path::new("test.toml"), text)
        .unwrap_or_else(|e| panic!("test config is valid: {e}"));
    let proxy = Proxy::bind(&config).expect("binding 127.0.0.1:0 works");
    let addrs = proxy.local_addrs();
    let handle = proxy.handle();
    let proxy_states = config
        .listeners
        .iter()
        .map(|l| proxy.listener(&l.name).expect("bound"))
        .collect();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(proxy.serve(async {
        let _ = rx.await;
    }));
    TestProxy {
        addrs,
        handle,
        stop: Some(tx),
        task,
        proxy_states,
    }
}

/// A backend that writes `name` and closes: one connection, one answer.
/// Closing first keeps TIME_WAIT on the server side, so thousands of test
/// connections do not use up the client's ephemeral ports.
pub async fn named_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = sock.write_all(name.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    addr
}

/// Connects and reads everything until EOF, bounded in time.
pub async fn read_all(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(PATIENCE, async {
        let mut s = TcpStream::connect(addr).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(out)
    })
    .await
    .map_err(|_| std::io::Error::other("timed out"))?
}

/// An address nothing listens on: bound by the OS then released, so a
/// connect there is refused.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().expect("bound")
}

pub async fn echo_backend() -> portshift::backend::BackendHandle {
    portshift::backend::spawn(
        "127.0.0.1:0".parse().expect("literal address"),
        portshift::backend::BackendOpts {
            name: "echo".into(),
            mode: portshift::backend::Mode::Echo,
            delay: Duration::ZERO,
            greeting: None,
        },
    )
    .await
    .expect("bind loopback")
}

/// An echo backend that greets with its name and a newline first.
pub async fn greeting_echo(name: &str) -> portshift::backend::BackendHandle {
    greeting_echo_at(name, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// `greeting_echo` on a given address (which may be taken).
pub async fn greeting_echo_at(
    name: &str,
    at: SocketAddr,
) -> std::io::Result<portshift::backend::BackendHandle> {
    portshift::backend::spawn(
        at,
        portshift::backend::BackendOpts {
            name: name.into(),
            mode: portshift::backend::Mode::Echo,
            delay: Duration::ZERO,
            greeting: Some(format!("{name}\n")),
        },
    )
    .await
}

/// `two_group_config` with one echo backend as both primary and backup.
pub fn echo_config(echo: SocketAddr, extra: &str) -> String {
    two_group_config(&[echo], &[echo], extra)
}

/// A config with one listener on 127.0.0.1:0, a primary and a backup group.
pub fn two_group_config(primary: &[SocketAddr], backup: &[SocketAddr], extra: &str) -> String {
    let list = |a: &[SocketAddr]| {
        a.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[group]]\nname = \"primary\"\nbackends = [{}]\n\n[[group]]\nname = \"backup\"\nbackends = [{}]\n\n\
         [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"primary\"\nbackups = [\"backup\"]\n{extra}\n",
        list(primary),
        list(backup)
    )
}

/// A file of the repository (`policies/failover.toml`, `sim/…`).
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// An HTTP keep-alive backend answering with its `name` after `delay_ms`.
pub async fn http_backend(name: &str, delay_ms: u64) -> portshift::backend::BackendHandle {
    let opts = portshift::backend::BackendOpts {
        name: name.into(),
        mode: portshift::backend::Mode::Http,
        delay: Duration::from_millis(delay_ms),
        greeting: None,
    };
    portshift::backend::spawn("127.0.0.1:0".parse().expect("literal address"), opts)
        .await
        .expect("bind loopback")
}

/// Waits (bounded by `limit`) until `cond` holds; returns how long it took.
pub async fn wait_until(what: &str, limit: Duration, cond: impl Fn() -> bool) -> Duration {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// Sends `request` (a whole HTTP/1.x request) on a fresh connection and
/// reads the reply to EOF; returns the status and the body.
pub async fn http_exchange(addr: SocketAddr, request: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP reply: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// One admin call (`connection: close`), with an optional bearer token;
/// returns the status and the body.
pub async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: admin\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    http_exchange(admin, &req).await
}

/// `GET path` on the admin address, which must answer 200; the body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let (status, body) = admin_request(admin, "GET", path, "", None)
        .await
        .expect("the admin API answers");
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Two `named_backend`s, answering `primary` and `backup`.
pub async fn named_pair() -> (SocketAddr, SocketAddr) {
    (
        named_backend("primary").await,
        named_backend("backup").await,
    )
}

/// Writes `config` (and `policy` as `policies/fast.toml`) into `dir`,
/// loads it as `portshift run` would and serves it until the test ends;
/// returns listener `l`'s address and state, and the proxy's handle.
pub async fn serve_config_in(
    dir: &Path,
    config: &str,
    policy: Option<&str>,
) -> (
    SocketAddr,
    Arc<ListenerState>,
    portshift::proxy::ProxyHandle,
) {
    if let Some(policy) = policy {
        std::fs::create_dir_all(dir.join("policies")).expect("temp dir is writable");
        std::fs::write(dir.join("policies/fast.toml"), policy).expect("temp dir is writable");
    }
    let path = write_config(dir, config);
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::bind(&config).expect("binding 127.0.0.1:0 works");
    let addr = proxy.local_addrs()[0].1;
    let state = proxy.listener("l").expect("listener `l` is configured");
    let handle = proxy.handle();
    tokio::spawn(proxy.serve(std::future::pending()));
    (addr, state, handle)
}

/// True when `tool` is installed. In CI (`CI` set; `.ci/run` installs
/// Debian's `package`) a missing tool fails the test; elsewhere the test
/// says why it skips.
pub fn have_tool(tool: &str, package: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is not installed; .ci/run installs Debian's {package} package"
        );
        eprintln!("SKIP: {tool} is not installed (apt-get install {package}); CI runs this test");
    }
    found
}

/// Sends `sig` (e.g. "-HUP") to process `pid`, which must take it.
pub fn send_signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// A child process killed (and reaped) when the test ends, passed or
/// failed, so a failing test leaves nothing running.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The value of one sample line of a `/metrics` rendering (`series` with
/// its labels, as rendered), 0 when absent.
pub fn metric_value(rendered: &str, series: &str) -> f64 {
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
