//! The access log: one JSON line per connection when it ends, naming the
//! real client (after a PROXY protocol header), where it went, how long it
//! took and how it ended; reopened by SIGHUP for logrotate; replayable by
//! the simulator. Real connections on loopback, the real binary for the
//! signal.

use crate::common::*;
use portshift::config::Config;
use portshift::proxy::Proxy;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The file's records once it holds `n` lines (bounded wait: lines are
/// flushed within 100 ms). Blocking: from a runtime, `records_async`.
fn records(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
        }
        assert!(Instant::now() < deadline, "{n} lines expected in:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `records` without blocking the runtime the proxy runs on.
async fn records_async(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || records(&path, n))
        .await
        .unwrap()
}

async fn echo_once(addr: SocketAddr, prefix: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[prefix, b"hello"].concat()).await.unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello");
}

/// A direct client, a client named by a PROXY protocol header, one refused
/// for a missing header and one no backend took: one line each, in the
/// documented shape.
#[tokio::test]
async fn every_connection_ends_as_one_line_naming_the_real_client() {
    let echo = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "access_log = \"access.log\"\n\n\
         [[group]]\nname = \"echo\"\nbackends = [\"{}\"]\n\n\
         [[group]]\nname = \"dead\"\nbackends = [\"{}\"]\n\n\
         [[listener]]\nname = \"direct\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"echo\"\n\n\
         [[listener]]\nname = \"behind\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"echo\"\n\
         proxy_protocol = \"v1\"\nproxy_protocol_from = [\"127.0.0.1\"]\n\n\
         [[listener]]\nname = \"nowhere\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"dead\"\n\
         connect_attempts = 1\naccess_log = \"nowhere.log\"\n",
        echo.addr(),
        dead_addr()
    );
    let path = write_config(dir.path(), &text);
    let config = Config::load(&path).unwrap();
    let proxy = Proxy::bind(&config).unwrap();
    let addrs = proxy.local_addrs();
    let at = |n: &str| addrs.iter().find(|(l, _)| l == n).unwrap().1;
    tokio::spawn(proxy.serve(std::future::pending()));

    let s = TcpStream::connect(at("direct")).await.unwrap();
    let me = s.local_addr().unwrap();
    drop(s);
    echo_once(at("direct"), b"").await;
    echo_once(
        at("behind"),
        b"PROXY TCP4 203.0.113.7 10.0.0.1 5000 443\r\n",
    )
    .await;
    // Refused before any backend: logged with why.
    let mut bad = TcpStream::connect(at("behind")).await.unwrap();
    let bad_peer = bad.local_addr().unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 8];
    let _ = tokio::time::timeout(PATIENCE, bad.read(&mut buf)).await;
    let mut s = TcpStream::connect(at("nowhere")).await.unwrap();
    let _ = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await;

    let lines = records_async(&dir.path().join("access.log"), 4).await;
    let by = |listener: &str, client: &str| {
        lines
            .iter()
            .find(|r| r["listener"] == listener && r["client"] == client)
            .unwrap_or_else(|| panic!("no line for {listener} {client}: {lines:?}"))
    };
    let first = by("direct", &me.to_string());
    assert_eq!(first["group"], "echo");
    assert_eq!(first["backend"], echo.addr().to_string());
    assert_eq!(first["outcome"], "closed");
    assert_eq!(first["ended_by"], "client");
    assert!(first["connect_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert!(first["route"].is_null());
    let named = by("behind", "203.0.113.7:5000");
    assert_eq!(named["bytes_to_backend"], 5);
    assert_eq!(named["bytes_to_client"], 5);
    assert!(named["total_ms"].as_f64().unwrap() >= named["connect_ms"].as_f64().unwrap());
    let refused = by("behind", &bad_peer.to_string());
    assert_eq!(refused["outcome"], "proxy_header_missing");
    assert_eq!(refused["ended_by"], "local");
    assert_eq!(refused["backend"], "");
    let none = &records_async(&dir.path().join("nowhere.log"), 1).await[0];
    assert_eq!(none["outcome"], "no_backend");
    assert_eq!(none["group"], "");
    assert!(none["connect_ms"].is_null());
}

/// logrotate's way: the file is renamed, SIGHUP, and new lines go to a new
/// file at the path while the old one keeps what it had.
#[test]
fn sighup_reopens_the_access_log_at_its_path() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(echo_backend());
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "access_log = \"access.log\"\n{}",
        echo_config(echo.addr(), "")
    );
    let config = write_config(dir.path(), &text);
    let (child, mut lines) = spawn_logging(Command::new(bin()).args(["run", "-c"]).arg(&config));
    let mut child = Reaped(child);
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains(" listening"))
        .and_then(|l| logged_addr(&l))
        .expect("the proxy listens");
    rt.block_on(echo_once(addr, b""));
    let log = dir.path().join("access.log");
    records(&log, 1);
    std::fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    send_signal(child.0.id(), "-HUP");
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("config reloaded")),
        "the reload is logged"
    );
    std::thread::spawn(move || lines.for_each(drop));
    rt.block_on(echo_once(addr, b""));
    rt.block_on(echo_once(addr, b""));
    assert_eq!(records(&log, 2).len(), 2, "new lines in the new file");
    assert_eq!(records(&dir.path().join("access.log.1"), 1).len(), 1);
    send_signal(child.0.id(), "-TERM");
    assert!(child.0.wait().unwrap().success());
}

/// A file that cannot be opened stops the start, saying which.
#[test]
fn an_access_log_that_cannot_be_opened_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "access_log = \"no/such/folder/access.log\"\n{}",
        echo_config(dead_addr(), "")
    );
    let config = write_config(dir.path(), &text);
    let out = Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot open access log") && stderr.contains("no/such/folder/access.log"),
        "{stderr}"
    );
}
