//! Hardening: limits, slow clients, dying backends, fd exhaustion, load
//! with shifts and reloads, soak and churn (bounded, loopback only), and
//! parsers that never panic.

use crate::common::*;
use portshift::backend::{self, BackendOpts, Mode};
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Sends `len` seeded bytes, reads the echo back, compares checksums.
async fn echo_roundtrip(addr: SocketAddr, len: usize, seed: u64) -> Result<(), String> {
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut r, mut w) = s.into_split();
    let data: Vec<u8> = (0..len as u64)
        .map(|i| (i.wrapping_mul(seed | 1) >> 3) as u8)
        .collect();
    let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut got = Vec::with_capacity(len);
    timeout(PATIENCE, r.read_to_end(&mut got))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let got_sum: u64 = got.iter().map(|&b| u64::from(b)).sum();
    if got.len() != len || got_sum != sum {
        return Err(format!(
            "sent {len} bytes (sum {sum}), got {} (sum {got_sum})",
            got.len()
        ));
    }
    Ok(())
}

/// Past `max_connections`, new connections are closed at accept while the
/// established ones keep working; per source likewise.
#[tokio::test]
async fn connection_limits_refuse_new_and_keep_established() {
    let echo = echo_backend().await;
    let proxy = start_proxy(&echo_config(echo.addr(), "max_connections = 2")).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        timeout(PATIENCE, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        held.push(s);
    }
    let refused = read_all(proxy.addr()).await;
    assert!(
        matches!(&refused, Ok(b) if b.is_empty()) || refused.is_err(),
        "the third connection is closed"
    );
    for s in &mut held {
        s.write_all(b"ok").await.unwrap();
        let mut b = [0u8; 2];
        timeout(PATIENCE, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"ok", "established connections are unaffected");
    }
    assert_eq!(proxy.state("l").outcomes.snapshot().denied, 1);
    drop(held);

    let per = start_proxy(&echo_config(echo.addr(), "max_connections_per_source = 1")).await;
    let first = TcpStream::connect(per.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = read_all(per.addr()).await;
    assert!(matches!(&second, Ok(b) if b.is_empty()) || second.is_err());
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = TcpStream::connect(per.addr()).await.unwrap();
    again.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    timeout(PATIENCE, again.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
}

/// A client that connects and never sends is closed after
/// `first_byte_timeout`, without an upstream connection.
#[tokio::test]
async fn silent_client_is_closed_by_first_byte_timeout() {
    let echo = echo_backend().await;
    let proxy = start_proxy(&echo_config(echo.addr(), "first_byte_timeout = \"300ms\"")).await;
    let started = Instant::now();
    let got = read_all(proxy.addr())
        .await
        .expect("closed by the proxy, not by the test timeout");
    assert!(got.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        proxy.state("l").outcomes.snapshot().connected,
        0,
        "no upstream connection for a silent client"
    );
    echo_roundtrip(proxy.addr(), 10_000, 3)
        .await
        .expect("a talking client is served");
}

/// A backend that dies mid-stream (reset) closes the client promptly, and
/// it is counted.
#[tokio::test]
async fn backend_dying_mid_stream_closes_client_promptly() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = backend.accept().await.unwrap();
        s.write_all(b"partial").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Abort with RST, like a crashed process.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    });
    let proxy = start_proxy(&two_group_config(&[baddr], &[baddr], "")).await;
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"request").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let r = timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
        .await
        .expect("the client is not left hanging");
    assert!(buf.starts_with(b"partial"), "{buf:?} {r:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let c = proxy.state("l").outcomes.snapshot();
    assert_eq!(c.reset, 1, "{c:?}");
}

/// A backend that resets before answering: with `retry_on_early_reset`
/// the client's request goes to the next backend; without, the client
/// sees the reset.
#[tokio::test]
async fn early_reset_is_retried_only_when_enabled() {
    let resetting = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raddr = resetting.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = resetting.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(s);
            });
        }
    });
    let echo = echo_backend().await;
    for (retry, want_ok) in [(true, true), (false, false)] {
        let extra = if retry {
            "retry_on_early_reset = true"
        } else {
            ""
        };
        let proxy = start_proxy(&two_group_config(&[raddr], &[echo.addr()], extra)).await;
        let result = echo_roundtrip(proxy.addr(), 2000, 5).await;
        assert_eq!(result.is_ok(), want_ok, "retry {retry}: {result:?}");
        if retry {
            assert!(proxy.state("l").outcomes.snapshot().retried >= 1);
        }
    }
    // With no attempt left, an early reset is an ordinary reset of the
    // backend: counted as one, not as a retry that never happens.
    let only = start_proxy(&two_group_config(
        &[raddr],
        &[raddr],
        "retry_on_early_reset = true\nconnect_attempts = 1",
    ))
    .await;
    assert!(echo_roundtrip(only.addr(), 2000, 6).await.is_err());
    let deadline = Instant::now() + PATIENCE;
    while only.state("l").outcomes.snapshot().reset == 0 {
        assert!(Instant::now() < deadline, "the reset is counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c = only.state("l").outcomes.snapshot();
    assert_eq!((c.reset, c.retried), (1, 0), "{c:?}");
}

/// `max_connections` counts the connections a listener accepted before a
/// reload that changed it: the limit holds across the reload.
#[tokio::test]
async fn max_connections_holds_across_a_reload() {
    let echo = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    // A configured port (picked by the OS, then released) is handed over
    // by the reload; port 0 would be bound afresh.
    let port = dead_addr().port();
    let text = echo_config(echo.addr(), "max_connections = 2")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let (addr, state, handle) = serve_config_in(dir.path(), &text, None).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        timeout(PATIENCE, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        held.push(s);
    }
    // A changed listener (another idle timeout) on the same port.
    write_config(dir.path(), &format!("{text}idle_timeout = \"10m\"\n"));
    let report = handle.reload().await.unwrap();
    assert_eq!(report.changed, vec!["l".to_string()], "{report:?}");
    let refused = read_all(addr).await;
    assert!(
        matches!(&refused, Ok(b) if b.is_empty()) || refused.is_err(),
        "a third connection is refused after the reload too"
    );
    drop(held);
    let deadline = Instant::now() + PATIENCE;
    while echo_roundtrip(addr, 100, 7).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "serves again once places free up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(state);
}

/// Failed upstream connects are counted by errno on /metrics.
#[tokio::test]
async fn connect_errors_are_counted_by_errno() {
    let live = named_backend("x").await;
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        two_group_config(&[dead_addr(), live], &[live], "")
            .replace("name = \"l\"", "name = \"errno-test\"")
    );
    let config = portshift::config::Config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let proxy = portshift::proxy::Proxy::bind(&config).unwrap();
    let (addr, admin) = (proxy.local_addrs()[0].1, proxy.admin_addr().unwrap());
    tokio::spawn(proxy.serve(std::future::pending()));
    for _ in 0..6 {
        assert_eq!(read_all(addr).await.unwrap(), b"x");
    }
    let body = admin_get(admin, "/metrics").await;
    assert!(body.contains("portshift_upstream_connect_errors_total{listener=\"errno-test\",errno=\"ECONNREFUSED\"}"), "{body}");
}

/// Heavy traffic while the weights are shifted back and forth and the
/// config reloaded: every byte arrives, no connection fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifts_and_reloads_under_load_lose_nothing() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &two_group_config(&[a.addr()], &[b.addr()], ""));
    let proxy =
        portshift::proxy::Proxy::bind(&portshift::config::Config::load(&path).unwrap()).unwrap();
    let addr = proxy.local_addrs()[0].1;
    let handle = proxy.handle();
    tokio::spawn(proxy.serve(std::future::pending()));
    let stop = Arc::new(AtomicBool::new(false));
    let steps = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let steering = {
        let (stop, handle, steps) = (stop.clone(), handle.clone(), steps.clone());
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let state = handle.listener("l").unwrap();
                let w = if i.is_multiple_of(2) {
                    vec![3000, 7000]
                } else {
                    vec![10_000, 0]
                };
                state
                    .pin(portshift::core::routes::Weights::new(w).unwrap())
                    .unwrap();
                if i.is_multiple_of(5) {
                    handle.reload().await.expect("an unchanged file reloads");
                }
                i += 1;
                steps.store(i, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // At least 200 connections, and on until the weights have moved and
    // the file reloaded several times under them (bounded).
    let mut set = tokio::task::JoinSet::new();
    for k in 0..20_000u64 {
        if k >= 200 && steps.load(Ordering::Relaxed) > 10 {
            break;
        }
        set.spawn(echo_roundtrip(addr, 64 * 1024 + (k % 200) as usize * 97, k));
        if set.len() >= 40 {
            set.join_next()
                .await
                .unwrap()
                .unwrap()
                .expect("no byte lost, no connection failed");
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().expect("no byte lost, no connection failed");
    }
    stop.store(true, Ordering::Relaxed);
    steering.await.unwrap();
    let steps = steps.load(Ordering::Relaxed);
    assert!(
        steps > 10,
        "the weights moved during the load ({steps} steps)"
    );
}

/// A proxy child process, killed when dropped (also when a test fails),
/// and the log lines it wrote after starting.
struct ProxyChild(Child, Arc<std::sync::Mutex<Vec<String>>>);

impl ProxyChild {
    fn logged(&self, needle: &str) -> usize {
        let lines = self.1.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_proxy(
    config: &std::path::Path,
    nofile: Option<u32>,
    want_admin: bool,
) -> (ProxyChild, SocketAddr, Option<SocketAddr>) {
    let limit = nofile.map_or(String::new(), |n| format!("ulimit -n {n}; "));
    let (child, mut lines) = spawn_logging(Command::new("sh").arg("-c").arg(format!(
        "{limit}exec {} run -c {}",
        bin(),
        config.display()
    )));
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let child = ProxyChild(child, log.clone());
    let (mut addr, mut admin) = (None, None);
    let deadline = Instant::now() + PATIENCE;
    while addr.is_none() || (want_admin && admin.is_none()) {
        assert!(Instant::now() < deadline, "proxy started");
        let line = lines.next().expect("proxy logs before exiting").unwrap();
        if line.contains("admin listening") {
            admin = logged_addr(&line);
        } else if line.contains(" listening") {
            addr = logged_addr(&line);
        }
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            log.lock().unwrap().push(line);
        }
    });
    (child, addr.unwrap(), admin)
}

/// A proxy child under `ulimit -n nofile`, with an admin plane
/// (`admin_extra` added to `[admin]`) and one listener to `echo`; its
/// config folder, the child, the listener's and the admin's addresses.
fn spawn_with_admin(
    echo: SocketAddr,
    admin_extra: &str,
    nofile: u32,
) -> (tempfile::TempDir, ProxyChild, SocketAddr, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{admin_extra}{}",
        echo_config(echo, "")
    );
    let path = write_config(dir.path(), &text);
    let (child, addr, admin) = spawn_proxy(&path, Some(nofile), true);
    (dir, child, addr, admin.expect("admin address logged"))
}

/// Up to `n` connections to `addr`, one after another, each given 2 s;
/// the ones that connected, held open.
async fn connect_many(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        if let Ok(Ok(s)) = timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            held.push(s);
        }
    }
    held
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Running out of file descriptors: accept errors are counted, the proxy
/// neither crashes nor spins, and it serves again once fds free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loop_survives_fd_exhaustion() {
    let echo = echo_backend().await;
    let (_dir, child, addr, admin) = spawn_with_admin(echo.addr(), "", 64);
    // Each proxied connection costs the proxy two fds: 64 run out fast.
    let held = connect_many(addr, 80).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = cpu_ticks(child.0.id());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_ticks(child.0.id()) - cpu_before;
    assert!(
        spent < 50,
        "the accept loop backs off instead of spinning ({spent} ticks in 1s)"
    );
    // 1.5 s of failing accepts, one attempt each 50 ms: at most one line a
    // second, not thirty.
    let lines = child.logged("accept failed");
    assert!(
        lines <= 3,
        "accept errors are logged once a second ({lines} lines)"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{}", child.0.id())).exists(),
        "the proxy did not crash"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    echo_roundtrip(addr, 1000, 9)
        .await
        .expect("serves again once fds are free");
    let body = admin_get(admin, "/metrics").await;
    let accept_errors: f64 = body
        .lines()
        .find(|l| l.starts_with("portshift_errors_total{") && l.contains("kind=\"accept_error\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    let count = |kind: &str, group: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with("portshift_errors_total{"))
            .filter(|l| l.contains(&format!("group=\"{group}\"")))
            .filter(|l| l.contains(&format!("kind=\"{kind}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Out of descriptors, portshift either fails to accept or fails to
    // open the upstream socket: both are its own, never the backend's.
    assert!(
        accept_errors + count("local_error", "") > 0.0,
        "fd exhaustion is counted:\n{body}"
    );
    assert_eq!(
        count("connect_error", "primary") + count("connect_error", "backup"),
        0.0,
        "EMFILE is not charged to a backend:\n{body}"
    );
    drop(child);
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of /proc/PID/stat.
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// Soak: thousands of concurrent connections held open with traffic; every
/// byte arrives, memory per connection is reported, no fd leaks. Size:
/// PORTSHIFT_SOAK_CONNS (default 5000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_connections_arrive_intact_without_fd_leak() {
    let n: usize = std::env::var("PORTSHIFT_SOAK_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let echo = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &echo_config(echo.addr(), ""));
    let (child, addr, _) = spawn_proxy(&path, None, false);
    let pid = child.0.id();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds_before, rss_before) = (fd_count(pid), rss_bytes(pid));
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = timeout(PATIENCE, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        conns.push(s);
    }
    // Traffic on every connection while all are open.
    let done = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for (i, mut s) in conns.into_iter().enumerate() {
        let done = done.clone();
        set.spawn(async move {
            let msg: Vec<u8> = (0..512u32).map(|k| (k as usize * 31 + i) as u8).collect();
            s.write_all(&msg).await.map_err(|e| e.to_string())?;
            let mut back = vec![0u8; msg.len()];
            timeout(PATIENCE, s.read_exact(&mut back))
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| e.to_string())?;
            if back != msg {
                return Err(format!("connection {i}: bytes changed"));
            }
            done.fetch_add(1, Ordering::Relaxed);
            Ok::<TcpStream, String>(s)
        });
    }
    let mut open = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        open.push(r.unwrap().expect("every byte arrives"));
    }
    let (fds_peak, rss_peak) = (fd_count(pid), rss_bytes(pid));
    eprintln!(
        "{n} concurrent connections: proxy fds {fds_before} -> {fds_peak}, RSS {} -> {} KiB, {} bytes per connection",
        rss_before / 1024,
        rss_peak / 1024,
        rss_peak.saturating_sub(rss_before) / n as u64
    );
    assert_eq!(done.load(Ordering::Relaxed), n as u64);
    assert!(
        fds_peak >= fds_before + 2 * n - 10,
        "each connection holds two fds in the proxy"
    );
    drop(open);
    let deadline = Instant::now() + PATIENCE;
    while fd_count(pid) > fds_before {
        assert!(
            Instant::now() < deadline,
            "fds back to {fds_before} after close, still {}",
            fd_count(pid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(child);
}

/// Churn: new connections at a steady rate while one backend of the
/// primary is stopped and restarted again and again; with the other
/// healthy, no client sees an error. Length: PORTSHIFT_CHURN_SECS
/// (default 8; the long run uses 60).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_churn_causes_no_client_errors() {
    let secs: u64 = std::env::var("PORTSHIFT_CHURN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let opts = |name: &str| BackendOpts {
        name: name.into(),
        mode: Mode::Http,
        delay: Duration::from_millis(1),
        greeting: None,
    };
    let steady = backend::spawn("127.0.0.1:0".parse().unwrap(), opts("steady"))
        .await
        .unwrap();
    let flaky = backend::spawn("127.0.0.1:0".parse().unwrap(), opts("flaky"))
        .await
        .unwrap();
    let flaky_addr = flaky.addr();
    // A stopped backend resets the connections still in its accept queue;
    // retry_on_early_reset hands those requests to the next backend.
    let proxy = start_proxy(&two_group_config(
        &[flaky_addr, steady.addr()],
        &[steady.addr()],
        "retry_on_early_reset = true",
    ))
    .await;
    // Every connection's outcome, to say what happened if a client failed.
    let trace_dir = tempfile::tempdir().unwrap();
    let trace_path = trace_dir.path().join("access.log");
    let trace = Arc::new(portshift::access_log::AccessLog::create(&trace_path).unwrap());
    proxy.handle.set_trace(trace.clone());
    let stats = Arc::new(portshift::load::LoadStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn(portshift::load::run(
        proxy.addr(),
        300.0,
        stats.clone(),
        stop.clone(),
    ));
    let started = Instant::now();
    let mut current = Some(flaky);
    let mut cycles = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match current.take() {
            Some(b) => b.stop_gracefully().await,
            None => current = backend::spawn(flaky_addr, opts("flaky")).await.ok(),
        }
        cycles += 1;
    }
    stop.cancel();
    load.await.unwrap();
    let c = proxy.state("l").outcomes.snapshot();
    let (sent, ok, errors) = (
        stats.sent.load(Ordering::Relaxed),
        stats.ok.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
    );
    eprintln!(
        "churn: {secs}s, {cycles} stop/start cycles, {sent} requests, {ok} ok, {errors} errors, {} refused upstream connects retried; {c:?}",
        c.connect_refused
    );
    trace.flush();
    let unusual: Vec<String> = std::fs::read_to_string(&trace_path)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("\"outcome\":\"closed\""))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        errors,
        0,
        "no client-visible error while a healthy backend remained; clients saw {:?}; connections that did not close cleanly:\n{}",
        stats.failed_by(),
        unusual.join("\n")
    );
    assert!(
        c.connect_refused > 0,
        "the flaky backend really was down at times"
    );
    assert!(ok > 100);
}

mod parsers_never_panic {
    use proptest::prelude::*;
    use std::path::Path;

    const CONFIG: &str = include_str!("../../examples/portshift.toml");
    const SCENARIO: &str = include_str!("../../sim/latency-spike.toml");
    const POLICY: &str = include_str!("../../policies/conservative.toml");

    /// Deletes, duplicates or replaces a slice of `base`.
    fn mutate(base: &str, at: usize, len: usize, junk: &str, how: u8) -> String {
        let b = base.as_bytes();
        let at = at % (b.len() + 1);
        let end = (at + len).min(b.len());
        let mut out = b[..at].to_vec();
        match how % 3 {
            0 => {}
            1 => out.extend_from_slice(&b[at..end]),
            _ => out.extend_from_slice(junk.as_bytes()),
        }
        out.extend_from_slice(&b[end..]);
        String::from_utf8_lossy(&out).into_owned()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn arbitrary_text(text in ".{0,400}") {
            let _ = portshift::config::Config::parse(Path::new("fuzz.toml"), &text);
            let _ = portshift::sim::Scenario::parse(Path::new("fuzz.toml"), &text);
            let _ = portshift::config::policy::parse_text("fuzz", Path::new("fuzz.toml"), &text);
        }

        #[test]
        fn mutated_valid_files(at in 0usize..4000, len in 0usize..60, junk in "[\\[\\]=\"{}a-z0-9 .,:\n-]{0,20}", how in 0u8..3) {
            let c = portshift::config::Config::parse(Path::new("fuzz.toml"), &mutate(CONFIG, at, len, &junk, how));
            if let Err(e) = c {
                prop_assert!(!e.diagnostics.is_empty(), "an error says what is wrong");
            }
            let _ = portshift::sim::Scenario::parse(Path::new("fuzz.toml"), &mutate(SCENARIO, at, len, &junk, how));
            let _ = portshift::config::policy::parse_text("fuzz", Path::new("fuzz.toml"), &mutate(POLICY, at, len, &junk, how));
        }
    }
}

/// A burst of 300 connects against `max_connections = 20`: never more than
/// 20 proxied connections alive at once, counted where they arrive (at the
/// backend), and every refused one is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_under_a_burst() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    let live = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let (l, p) = (live.clone(), peak.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            let n = l.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(n, Ordering::SeqCst);
            let l = l.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 64];
                while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                l.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    let proxy = start_proxy(&two_group_config(
        &[baddr],
        &[baddr],
        "max_connections = 20",
    ))
    .await;
    let addr = proxy.addr();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..300 {
        set.spawn(async move {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"x").await.ok()?;
            // Held open until the test ends.
            tokio::time::sleep(Duration::from_secs(3)).await;
            Some(s)
        });
    }
    let mut held = Vec::new();
    while let Some(r) = set.join_next().await {
        held.extend(r.unwrap());
    }
    let c = proxy.state("l").outcomes.snapshot();
    assert!(
        peak.load(Ordering::SeqCst) <= 20,
        "at most 20 alive at once, saw {}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(peak.load(Ordering::SeqCst), 20, "the limit was reached");
    assert_eq!(c.accepted + c.denied, 300, "{c:?}");
    assert_eq!(c.accepted, 20, "{c:?}");
    drop(held);
}

/// `GET /metrics`, or None while the admin plane refuses.
async fn admin_metrics(admin: SocketAddr) -> Option<String> {
    match admin_request(admin, "GET", "/metrics", "", None).await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

fn rejected(body: &str, reason: &str) -> f64 {
    let series = format!("portshift_admin_rejected_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// 300 idle admin sockets that never send a byte, against a proxy with
/// `ulimit -n 256`: the admin cap (`max_connections`, 64 by default) holds
/// them off and the data path keeps answering; with the cap raised past
/// the fd limit, the descriptors held back for the data path still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_sockets_cannot_starve_the_data_path() {
    let echo = echo_backend().await;
    for (admin_extra, reason) in [
        ("", "max_connections"),
        ("max_connections = 10000\n", "descriptors"),
    ] {
        let (_dir, child, addr, admin) = spawn_with_admin(echo.addr(), admin_extra, 256);
        let idle = connect_many(admin, 300).await;
        // Let the proxy accept (and refuse) what it will.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let fds = fd_count(child.0.id());
        assert!(
            fds < 256 - 8,
            "descriptors are left for the data path ({fds} open)"
        );
        for i in 0..5 {
            echo_roundtrip(addr, 1000, i)
                .await
                .unwrap_or_else(|e| panic!("{reason}: the data path answers: {e}"));
        }
        drop(idle);
        let deadline = Instant::now() + PATIENCE;
        let body = loop {
            if let Some(b) = admin_metrics(admin).await {
                break b;
            }
            assert!(Instant::now() < deadline, "the admin plane comes back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            rejected(&body, reason) > 0.0,
            "refusals counted as {reason}:\n{body}"
        );
        drop(child);
    }
}
