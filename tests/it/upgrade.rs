//! Binary upgrade: a new `portshift run --upgrade` (or SIGUSR2's
//! successor) takes the listening sockets and policy state from the
//! running process; not one client connection is refused or reset, the
//! long-lived streams the old process carries finish intact, and the
//! weights, pin and pause carry over. Real processes of the built binary,
//! real TCP on loopback.

use crate::common::*;
use crate::prometheus::free_port;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A `portshift run` process and its log lines.
struct Instance {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    unclaimed: Vec<String>,
}

impl Instance {
    fn start(config: &Path, extra: &[&str]) -> Instance {
        let (child, lines) = spawn_logging(
            Command::new(bin())
                .args(["run", "-c"])
                .arg(config)
                .args(extra),
        );
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Instance {
            child,
            lines: rx,
            seen: Vec::new(),
            unclaimed: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first log line that contains `want` and that no earlier call
    /// returned, whether it came before this call or comes within
    /// `PATIENCE` (the order of lines from different tasks is not fixed).
    fn wait_for(&mut self, want: &str) -> String {
        if let Some(i) = self.unclaimed.iter().position(|l| l.contains(want)) {
            return self.unclaimed.remove(i);
        }
        let start = Instant::now();
        loop {
            let left = PATIENCE.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(want) => {
                    self.seen.push(l.clone());
                    return l;
                }
                Ok(l) => {
                    self.seen.push(l.clone());
                    self.unclaimed.push(l);
                }
                Err(_) => panic!(
                    "no log line with {want:?} within {PATIENCE:?}; seen:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits (bounded) for the process to exit; its status code.
    fn exit_code(&mut self) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < PATIENCE * 2,
                "pid {} did not exit",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) -> i32 {
        send_signal(self.pid(), "-TERM");
        self.exit_code()
    }
}

/// The numeric value of `key=` in a log line.
fn logged_number(line: &str, key: &str) -> u64 {
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

struct Setup {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    a: SocketAddr,
    admin: SocketAddr,
    socket: std::path::PathBuf,
    _backends: Vec<portshift::backend::BackendHandle>,
}

/// Two echo groups; listener `a` without a policy, `b` with one; fixed
/// free ports, so the new process's config names the same addresses.
fn setup(rt: &tokio::runtime::Runtime) -> Setup {
    let backends: Vec<_> = (0..4).map(|_| rt.block_on(echo_backend())).collect();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, admin) = (free_port(), free_port(), free_port());
    let socket = dir.path().join("upgrade.sock");
    let text = format!(
        "drain_timeout = \"30s\"\nupgrade_socket = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[group]]\nname = \"primary\"\nbackends = [\"{}\", \"{}\"]\n\n\
         [[group]]\nname = \"backup\"\nbackends = [\"{}\", \"{}\"]\n\n\
         [[listener]]\nname = \"a\"\nlisten = [\"127.0.0.1:{a}\"]\nprimary = \"primary\"\nbackups = [\"backup\"]\n\n\
         [[listener]]\nname = \"b\"\nlisten = [\"127.0.0.1:{b}\"]\nprimary = \"primary\"\nbackups = [\"backup\"]\npolicy = \"{}\"\n",
        socket.display(),
        backends[0].addr(),
        backends[1].addr(),
        backends[2].addr(),
        backends[3].addr(),
        repo_path("policies/failover.toml").display(),
    );
    let config = write_config(dir.path(), &text);
    Setup {
        _dir: dir,
        config,
        a: format!("127.0.0.1:{a}").parse().unwrap(),
        admin: format!("127.0.0.1:{admin}").parse().unwrap(),
        socket,
        _backends: backends,
    }
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&admin_get(admin, "/status").await).unwrap()
}

fn listener<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap()
}

async fn call(admin: SocketAddr, method: &str, path: &str, body: &str) {
    let (code, body) = admin_request(admin, method, path, body, None)
        .await
        .unwrap();
    assert_eq!(code, 200, "{method} {path}: {body}");
}

/// New connections at a steady rate (one per 5 ms), each an exchange of
/// 32 bytes; counts those that worked and keeps every failure.
struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, f, s) = (ok.clone(), failures.clone(), stop.clone());
        let task = rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut inflight = tokio::task::JoinSet::new();
            // Bounded: at most two minutes of load.
            for n in 0u64..24_000 {
                if s.load(Relaxed) {
                    break;
                }
                tick.tick().await;
                let (o, f) = (o.clone(), f.clone());
                inflight.spawn(async move {
                    match tokio::time::timeout(PATIENCE, exchange(addr, n)).await {
                        Ok(Ok(())) => {
                            o.fetch_add(1, Relaxed);
                        }
                        Ok(Err(e)) => f.lock().unwrap().push(format!("connection {n}: {e}")),
                        Err(_) => f.lock().unwrap().push(format!("connection {n}: timed out")),
                    }
                });
            }
            while inflight.join_next().await.is_some() {}
        });
        Load {
            ok,
            failures,
            stop,
            task,
        }
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> (u64, Vec<String>) {
        self.stop.store(true, Relaxed);
        rt.block_on(self.task).unwrap();
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Relaxed), failures)
    }
}

async fn exchange(addr: SocketAddr, n: u64) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let msg = format!("{n:031}\n");
    s.write_all(msg.as_bytes()).await?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await?;
    if back != msg.as_bytes() {
        return Err(std::io::Error::other("the echo differs"));
    }
    Ok(())
}

/// A long-lived connection carrying 4 KiB blocks every few milliseconds
/// until told to stop; true when every byte came back in order (SHA-256
/// of what was sent and what came back).
async fn stream(addr: SocketAddr, seed: u8, stop: Arc<AtomicBool>) -> std::io::Result<(u64, bool)> {
    let mut s = TcpStream::connect(addr).await?;
    let (mut sent, mut got) = (Sha256::new(), Sha256::new());
    let mut bytes = 0u64;
    let mut back = vec![0u8; 4096];
    // Bounded: at most two minutes.
    for i in 0u32..24_000 {
        if stop.load(Relaxed) {
            break;
        }
        let block: Vec<u8> = (0..4096u32)
            .map(|j| (j.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8 ^ seed)
            .collect();
        s.write_all(&block).await?;
        sent.update(&block);
        s.read_exact(&mut back).await?;
        got.update(&back);
        bytes += block.len() as u64;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((bytes, sent.finalize() == got.finalize()))
}

/// The upgrade itself, under load: zero failed connections, intact
/// streams, state carried over, old process exits 0.
#[test]
fn an_upgrade_under_load_refuses_nothing_and_carries_the_state_over() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = setup(&rt);
    let mut old = Instance::start(&s.config, &[]);
    old.wait_for("offering binary upgrades");
    old.wait_for("admin listening");
    rt.block_on(async {
        call(
            s.admin,
            "PUT",
            "/routes/a/weights",
            r#"{"primary": 25, "backup": 75}"#,
        )
        .await;
        // `b`: shifted to 70/30 by the operator, then left to its policy,
        // paused.
        call(
            s.admin,
            "PUT",
            "/routes/b/weights",
            r#"{"primary": 70, "backup": 30}"#,
        )
        .await;
        call(s.admin, "DELETE", "/routes/b/weights", "").await;
        call(s.admin, "POST", "/routes/b/policy/pause", "").await;
    });
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4)
        .map(|i| rt.spawn(stream(s.a, i, stop.clone())))
        .collect();
    let load = Load::start(&rt, s.a);
    std::thread::sleep(Duration::from_millis(500));

    let mut new = Instance::start(&s.config, &["--upgrade"]);
    let done = new.wait_for("binary upgrade complete");
    let took_ms = logged_number(&done, "took_ms");
    eprintln!("handover took {took_ms} ms; {done}");
    old.wait_for("stops accepting and drains");
    std::thread::sleep(Duration::from_millis(700));
    new.wait_for("offering binary upgrades");

    let st = rt.block_on(status(s.admin));
    assert_eq!(
        st["pid"],
        new.pid(),
        "the new process answers the admin API"
    );
    let a = listener(&st, "a");
    assert_eq!(
        a["pinned"],
        serde_json::json!({"primary": 25.0, "backup": 75.0}),
        "{a}"
    );
    assert_eq!(
        a["weights_percent"],
        serde_json::json!({"primary": 25.0, "backup": 75.0})
    );
    assert!(
        a["connections"]["accepted"].as_u64().unwrap() > 0,
        "the new process accepts: {a}"
    );
    let b = listener(&st, "b");
    assert_eq!(
        b["weights_percent"],
        serde_json::json!({"primary": 70.0, "backup": 30.0}),
        "{b}"
    );
    assert_eq!(b["pinned"], serde_json::Value::Null);
    assert_eq!(b["policy"]["paused"], true, "{b}");

    // The old process still carries the long-lived streams.
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old process drains, it has not exited"
    );
    stop.store(true, Relaxed);
    for (i, t) in streams.into_iter().enumerate() {
        let (bytes, intact) = rt
            .block_on(t)
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
        assert!(intact, "stream {i}: the bytes that came back differ");
        assert!(bytes > 100 * 4096, "stream {i} carried only {bytes} bytes");
        eprintln!("long-lived stream {i}: {bytes} bytes each way, intact");
    }
    let (ok, failures) = load.finish(&rt);
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 150, "only {ok} connections in the load");
    eprintln!("{ok} new connections across the upgrade, none failed");
    assert_eq!(old.exit_code(), 0, "the old process drains and exits 0");
    assert_eq!(new.stop(), 0);
    assert!(!s.socket.exists(), "the upgrade socket is removed at exit");
}

/// A new process that cannot start (here: a new listener's port is held
/// by someone else) exits 2 with the reason; the old one serves on, with
/// its policy thawed, and can still be upgraded afterwards.
#[test]
fn a_new_process_that_fails_before_accepting_leaves_the_old_one_serving() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = setup(&rt);
    let mut old = Instance::start(&s.config, &[]);
    old.wait_for("offering binary upgrades");
    old.wait_for("admin listening");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap()
        + &format!(
            "\n[[listener]]\nname = \"c\"\nlisten = [\"{}\"]\nprimary = \"primary\"\n",
            held.local_addr().unwrap()
        );
    let bad_dir = tempfile::tempdir().unwrap();
    let bad = write_config(bad_dir.path(), &text);
    let (code, stderr) = upgrade_once(&bad);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot bind") && stderr.contains("serves on unchanged"),
        "{stderr}"
    );
    old.wait_for("abandoned by the new process");
    rt.block_on(async {
        exchange(s.a, 1)
            .await
            .expect("the old process still serves");
        assert_eq!(status(s.admin).await["pid"], old.pid());
    });
    // Not left frozen: a second, good upgrade goes through.
    let mut new = Instance::start(&s.config, &["--upgrade"]);
    new.wait_for("binary upgrade complete");
    assert_eq!(old.exit_code(), 0);
    rt.block_on(async { exchange(s.a, 2).await.expect("the new process serves") });
    assert_eq!(new.stop(), 0);
}

/// `run --upgrade -c config` to its end: the exit code and stderr.
fn upgrade_once(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(["run", "--upgrade", "-c"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// With nothing running, `--upgrade` says so and exits 2.
#[test]
fn an_upgrade_with_nothing_to_take_over_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "upgrade_socket = \"{}\"\n{}",
        dir.path().join("none.sock").display(),
        echo_config(dead_addr(), "")
    );
    let config = write_config(dir.path(), &text);
    let (code, stderr) = upgrade_once(&config);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("no running portshift offers upgrades"),
        "{stderr}"
    );
}

/// SIGUSR2 starts the successor itself, twice in a row: each new process
/// offers upgrades in turn.
#[test]
fn sigusr2_hands_over_to_a_successor_and_the_successor_can_do_it_again() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = setup(&rt);
    let mut first = Instance::start(&s.config, &[]);
    first.wait_for("offering binary upgrades");
    first.wait_for("admin listening");
    let mut pids = vec![first.pid()];
    // The successors log to the first process's stderr, which it inherits.
    for round in 0..2 {
        send_signal(*pids.last().unwrap(), "-USR2");
        let started = first.wait_for("started the successor");
        pids.push(logged_number(&started, "pid") as u32);
        first.wait_for("binary upgrade complete");
        first.wait_for("offering binary upgrades");
        // The old process stops accepting as it confirms its drain; a
        // call already queued to it may still be answered by it.
        let deadline = Instant::now() + PATIENCE;
        while rt.block_on(status(s.admin))["pid"] != pids[round + 1] {
            assert!(
                Instant::now() < deadline,
                "round {round}: the new process answers"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        rt.block_on(async { exchange(s.a, round as u64).await.expect("serving") });
    }
    assert_eq!(first.exit_code(), 0);
    // The second process exits after handing over; the third serves.
    let second = pids[1];
    wait_gone(second);
    send_signal(pids[2], "-TERM");
    wait_gone(pids[2]);
}

/// Waits (bounded) until no process has `pid`.
fn wait_gone(pid: u32) {
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        // A zombie that init has not reaped yet has exited too.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            return;
        }
        assert!(start.elapsed() < PATIENCE * 2, "pid {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}
