//! systemd integration without systemd running: the notify protocol
//! against a datagram socket of the test's own (`NOTIFY_SOCKET`), and
//! socket activation through `systemd-socket-activate` (Debian's systemd
//! package), which passes a listening socket the way systemd does.

use crate::common::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The next notification, within `PATIENCE`.
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Notifications until one contains `want`; all of them, in order.
fn until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|m: &String| m.contains(want)) {
        assert!(start.elapsed() < PATIENCE, "no {want:?} in {seen:?}");
        seen.push(next(sock));
    }
    seen
}

/// READY=1 once listening, WATCHDOG=1 at half of WATCHDOG_USEC,
/// RELOADING=1 then READY=1 around a SIGHUP reload, STOPPING=1 at SIGTERM.
#[test]
fn the_notify_protocol_follows_the_proxys_life() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let config = write_config(dir.path(), &echo_config(dead_addr(), ""));
    let (mut child, lines) = spawn_logging(
        Command::new(bin())
            .args(["run", "-c"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "400000"),
    );
    std::thread::spawn(move || lines.for_each(drop));
    let start = until(&sock, "READY=1");
    assert!(
        start.last().unwrap().contains("STATUS=serving"),
        "{start:?}"
    );
    let pings = until(&sock, "WATCHDOG=1");
    assert!(
        pings.len() <= 2,
        "a watchdog ping soon after start: {pings:?}"
    );
    send_signal(child.id(), "-HUP");
    let reload = until(&sock, "RELOADING=1");
    assert!(
        reload.last().unwrap().contains("MONOTONIC_USEC="),
        "{reload:?}"
    );
    until(&sock, "READY=1");
    send_signal(child.id(), "-TERM");
    until(&sock, "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// Kills a process that is not the test's child when the test ends,
/// passed or failed.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// A binary upgrade by SIGUSR2 inside a unit: the old process tells
/// systemd the successor's MAINPID and never says STOPPING=1 (which
/// would stop the unit the successor now runs); the successor says
/// READY=1, and STOPPING=1 only when it is stopped itself.
#[test]
fn a_binary_upgrade_moves_mainpid_without_stopping_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    let text = format!(
        "upgrade_socket = \"{}\"\n{}",
        dir.path().join("upgrade.sock").display(),
        echo_config(dead_addr(), "")
    );
    let config = write_config(dir.path(), &text);
    let (mut old, lines) = spawn_logging(
        Command::new(bin())
            .args(["run", "-c"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &path),
    );
    std::thread::spawn(move || lines.for_each(drop));
    until(&sock, "READY=1");
    // The upgrade socket is offered once serving.
    let start = Instant::now();
    while !dir.path().join("upgrade.sock").exists() {
        assert!(start.elapsed() < PATIENCE, "no upgrade socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    send_signal(old.id(), "-USR2");
    let mut seen = until(&sock, "MAINPID=");
    let successor: u32 = seen
        .last()
        .unwrap()
        .split("MAINPID=")
        .nth(1)
        .and_then(|r| r.lines().next())
        .and_then(|p| p.parse().ok())
        .expect("a MAINPID number");
    assert_ne!(successor, old.id());
    let _reaper = KillOnDrop(successor);
    // Everything the old process says until it has exited.
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while old.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < PATIENCE * 2, "the old process exits");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(old.wait().unwrap().success());
    assert!(
        seen.iter().any(|m| m.contains("READY=1")),
        "the successor is ready: {seen:?}"
    );
    assert!(
        !seen.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING=1 across the upgrade: {seen:?}"
    );
    sock.set_read_timeout(Some(PATIENCE)).unwrap();
    send_signal(successor, "-TERM");
    until(&sock, "STOPPING=1");
}

/// `systemd-socket-activate` binds the listener's address itself and
/// passes the socket: portshift takes it (it could not bind the address,
/// which is held), and serves the connection that woke it.
#[test]
fn a_socket_passed_by_systemd_is_taken_not_bound() {
    if !have_tool("systemd-socket-activate", "systemd") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(named_backend("activated"));
    let port = crate::prometheus::free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[[group]]\nname = \"g\"\nbackends = [\"{backend}\"]\n[[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:{port}\"]\nprimary = \"g\"\n"
        ),
    );
    let log = dir.path().join("portshift.log");
    let mut activator = Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.1:{port}"),
            "-E",
            "RUST_LOG=info",
            "-E",
            "NO_COLOR=1",
        ])
        .arg(bin())
        .args(["run", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("systemd-socket-activate starts");
    // The first connection wakes the service; it must be answered by it.
    let start = Instant::now();
    let answer = loop {
        assert!(
            start.elapsed() < PATIENCE,
            "no answer on the activated port"
        );
        match rt.block_on(read_all(format!("127.0.0.1:{port}").parse().unwrap())) {
            Ok(a) if !a.is_empty() => break a,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert_eq!(answer, b"activated");
    send_signal(activator.id(), "-TERM");
    let _ = activator.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("taking a passed socket instead of binding"),
        "{text}"
    );
}

/// The shipped units pass `systemd-analyze verify`, and the service's
/// hardening keeps its exposure at most 2.5 of 10 ("OK"), checked offline.
#[test]
fn the_shipped_units_verify_and_are_hardened() {
    if !have_tool("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(repo_path("packaging/portshift.service"))
        .unwrap()
        .replace("/usr/bin/portshift", bin())
        .replace(
            "/etc/portshift/portshift.toml",
            repo_path("examples/portshift.toml").to_str().unwrap(),
        );
    std::fs::write(dir.path().join("portshift.service"), service).unwrap();
    std::fs::copy(
        repo_path("packaging/portshift.socket"),
        dir.path().join("portshift.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("portshift.socket"))
        .arg(dir.path().join("portshift.service"))
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.path().join("portshift.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("portshift.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.5, "exposure {level}:\n{text}");
}
