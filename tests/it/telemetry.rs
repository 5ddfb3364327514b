//! Latency signals measured on real loopback connections: exchange,
//! first_byte, connect, probe, and their exposure on /metrics.

use crate::common::*;
use portshift::backend::{BackendOpts, Mode};
use portshift::core::stats::Signal;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

async fn backend(delay_ms: u64, greeting: Option<&str>) -> portshift::backend::BackendHandle {
    portshift::backend::spawn(
        "127.0.0.1:0".parse().unwrap(),
        BackendOpts {
            name: "b".into(),
            mode: Mode::Echo,
            delay: Duration::from_millis(delay_ms),
            greeting: greeting.map(String::from),
        },
    )
    .await
    .unwrap()
}

/// `turns` request/response turns of 4 bytes on one connection.
async fn talk(s: &mut TcpStream, turns: usize) {
    let mut buf = [0u8; 4];
    for _ in 0..turns {
        s.write_all(b"ping").await.unwrap();
        timeout(PATIENCE, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
    }
}

/// A backend replying after 50 ms yields exchange p50 in [50, 60] ms, and
/// connect well under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_latency_matches_backend_delay() {
    let b = backend(50, None).await;
    let proxy = start_proxy(&two_group_config(&[b.addr()], &[b.addr()], "")).await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    talk(&mut s, 20).await;
    let state = proxy.state("l");
    let view = &state.view()[0];
    let ex = view.signals[Signal::Exchange.index()];
    assert_eq!(ex.count, 20, "one sample per turn");
    let p50 = ex.p50.as_secs_f64() * 1000.0;
    assert!((50.0..=60.0).contains(&p50), "exchange p50 {p50:.2} ms");
    let connect = view.signals[Signal::Connect.index()];
    assert_eq!(connect.count, 1);
    assert!(
        connect.p50 < Duration::from_millis(10),
        "connect {:?}",
        connect.p50
    );
    let fb = view.signals[Signal::FirstByte.index()];
    assert_eq!(fb.count, 1, "one first_byte per connection");
}

/// A server that greets first yields no bogus sample: only real turns count.
#[tokio::test]
async fn greeting_backend_yields_no_bogus_sample() {
    let b = backend(20, Some("220 ready\r\n")).await;
    let proxy = start_proxy(&two_group_config(&[b.addr()], &[b.addr()], "")).await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut greeting = [0u8; 11];
    timeout(PATIENCE, s.read_exact(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // a slow client after the greeting
    talk(&mut s, 3).await;
    let view = &proxy.state("l").view()[0];
    let ex = view.signals[Signal::Exchange.index()];
    assert_eq!(ex.count, 3, "greeting made no sample");
    assert!(
        ex.min >= Duration::from_millis(19),
        "no sample shorter than the delay: {ex:?}"
    );
    assert!(
        ex.max < Duration::from_millis(90),
        "the client's pause was not measured: {ex:?}"
    );
    assert_eq!(view.signals[Signal::FirstByte.index()].count, 0);
}

/// Samples older than the window leave the snapshot.
#[tokio::test]
async fn samples_leave_after_the_window() {
    let b = backend(0, None).await;
    let text = format!(
        "[stats]\nwindow = \"600ms\"\nsub_windows = 6\n{}",
        two_group_config(&[b.addr()], &[b.addr()], "")
    );
    let proxy = start_proxy(&text).await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    talk(&mut s, 5).await;
    let state = proxy.state("l");
    assert_eq!(state.view()[0].signals[Signal::Exchange.index()].count, 5);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(state.view()[0].signals[Signal::Exchange.index()].count, 0);
}

/// Refused connects count against the group as errors, not fast samples.
#[tokio::test]
async fn failed_connects_count_as_errors() {
    let b = backend(0, None).await;
    let proxy = start_proxy(&two_group_config(&[dead_addr()], &[b.addr()], "")).await;
    for _ in 0..5 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        talk(&mut s, 1).await;
    }
    let view = proxy.state("l").view();
    let primary = view[0].signals[Signal::Connect.index()];
    assert_eq!((primary.count, primary.errors), (0, 5));
    assert_eq!(primary.error_rate(), 1.0);
    assert_eq!(view[1].signals[Signal::Connect.index()].count, 5);
}

/// Probes: a killed backend is down within `fall` probes, a revived one up
/// within `rise` probes, and the probe latency is recorded.
#[tokio::test]
async fn probe_detects_death_and_revival_within_fall_and_rise() {
    let b = backend(0, None).await;
    let addr = b.addr();
    let text = two_group_config(&[addr], &[dead_addr()], "").replace(
        "[[group]]\nname = \"backup\"",
        "[group.probe]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 3\n\n[[group]]\nname = \"backup\"",
    );
    let proxy = start_proxy(&text).await;
    let state = proxy.state("l");
    let probes = || {
        let s = state.backend_snapshot(0, 0, Signal::Probe);
        s.count + s.errors
    };
    let up = || state.router.table().groups[0].is_up(0);
    wait_until(|| probes() >= 3).await;
    assert!(up());
    assert!(state.backend_snapshot(0, 0, Signal::Probe).p50 > Duration::ZERO);

    b.stop().await;
    let at_kill = probes();
    wait_until(|| !up()).await;
    let used = probes() - at_kill;
    assert!(
        used <= 3 + 1,
        "down after {used} probes (fall 3, one may be in flight)"
    );

    let revived = portshift::backend::spawn(
        addr,
        BackendOpts {
            name: "b".into(),
            mode: Mode::Echo,
            delay: Duration::ZERO,
            greeting: None,
        },
    )
    .await
    .expect("the port is free again after stop");
    let at_revive = probes();
    wait_until(up).await;
    let used = probes() - at_revive;
    assert!(
        used <= 2 + 1,
        "up after {used} probes (rise 2, one may be in flight)"
    );
    revived.stop().await;
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `/metrics` on the admin address serves Prometheus text with a real
/// latency histogram and outcome counters, labelled per listener/group/backend.
#[tokio::test]
async fn metrics_endpoint_exposes_histogram_and_counters() {
    let b = backend(5, None).await;
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        two_group_config(&[b.addr(), dead_addr()], &[b.addr()], "")
            .replace("name = \"l\"", "name = \"metrics-test\"")
    );
    let config = portshift::config::Config::parse(std::path::Path::new("t.toml"), &text).unwrap();
    let proxy = portshift::proxy::Proxy::bind(&config).unwrap();
    let admin = proxy.admin_addr().expect("admin bound");
    let addr = proxy.local_addrs()[0].1;
    tokio::spawn(proxy.serve(std::future::pending()));
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        talk(&mut s, 2).await;
    }
    let body = admin_get(admin, "/metrics").await;
    let backend = b.addr().to_string();
    for want in [
        "# HELP portshift_latency_seconds",
        "# TYPE portshift_latency_seconds histogram",
        &format!(
            "portshift_latency_seconds_bucket{{listener=\"metrics-test\",group=\"primary\",backend=\"{backend}\",signal=\"exchange\",le=\"0.25\"}} 8"
        ),
        &format!(
            "portshift_latency_seconds_count{{listener=\"metrics-test\",group=\"primary\",backend=\"{backend}\",signal=\"connect\"}}"
        ),
        "portshift_errors_total{listener=\"metrics-test\",group=\"primary\",backend=\"127.0.0.1:",
        "kind=\"connect_refused\"} ",
        &format!(
            "portshift_connections_total{{listener=\"metrics-test\",group=\"primary\",backend=\"{backend}\"}}"
        ),
        "portshift_accepted_connections_total{listener=\"metrics-test\"} 4",
        &format!(
            "portshift_build_info{{version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(body.contains(want), "missing {want:?} in /metrics:\n{body}");
    }
}
