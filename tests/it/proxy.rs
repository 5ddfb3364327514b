//! The proxy over real loopback sockets: bytes, half-close, routing,
//! retries, timeouts, ACLs.

use crate::common::*;
use portshift::core::routes::Weights;
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// A deterministic pseudo-random payload (xorshift), so a corrupted byte
/// anywhere is caught.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Several MiB cross the proxy both ways at once and arrive byte-exact,
/// through splice (the default for bulk flows) and through the copy buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_both_ways() {
    for extra in ["", "splice = false"] {
        let echo = echo_backend().await;
        let proxy = start_proxy(&echo_config(echo.addr(), extra)).await;
        let sent = payload(8 << 20, 42);
        let stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&to_send).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::with_capacity(sent.len());
        timeout(PATIENCE, r.read_to_end(&mut got))
            .await
            .expect("echo completes")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), sent.len(), "every byte came back ({extra:?})");
        assert!(got == sent, "bytes came back unchanged ({extra:?})");
        let report = proxy.shutdown().await;
        assert_eq!(report.cut, 0);
    }
}

/// One connection alternates bulk bursts (which switch a direction to
/// splice) with small exchanges (which switch it back to the buffer), and
/// every byte of every turn comes back in order.
#[tokio::test]
async fn bulk_and_small_turns_alternate_on_one_connection() {
    let echo = echo_backend().await;
    let proxy = start_proxy(&echo_config(echo.addr(), "")).await;
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    for (i, len) in [1 << 20, 5, 300_000, 1, 2 << 20, 64]
        .into_iter()
        .enumerate()
    {
        let sent = payload(len, i as u64 + 1);
        let (mut r, mut w) = c.split();
        let mut got = vec![0u8; len];
        let (wrote, read) = tokio::join!(
            w.write_all(&sent),
            timeout(PATIENCE, r.read_exact(&mut got))
        );
        wrote.unwrap();
        read.expect("echo of the turn arrives").unwrap();
        assert!(got == sent, "turn {i} ({len} bytes) came back unchanged");
    }
    drop(c);
    let report = proxy.shutdown().await;
    assert_eq!(report.cut, 0);
}

/// Client EOF reaches the backend while the reply still flows back.
#[tokio::test]
async fn half_close_from_client_keeps_reply_flowing() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = backend.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap(); // returns only on the client's EOF
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
    });
    let proxy = start_proxy(&two_group_config(&[baddr], &[baddr], "")).await;
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(&payload(100_000, 7)).await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = String::new();
    timeout(PATIENCE, c.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "got 100000 bytes");
}

/// Backend EOF reaches the client while the client can still send.
#[tokio::test]
async fn half_close_from_backend_keeps_requests_flowing() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = backend.accept().await.unwrap();
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        tx.send(got).unwrap();
    });
    let proxy = start_proxy(&two_group_config(&[baddr], &[baddr], "")).await;
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut greeting = Vec::new();
    timeout(PATIENCE, c.read_to_end(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, b"bye");
    c.write_all(b"still talking").await.unwrap();
    c.shutdown().await.unwrap();
    let got = timeout(PATIENCE, rx).await.unwrap().unwrap();
    assert_eq!(got, b"still talking");
}

/// Over 10,000 connections, group and backend shares match the weights
/// within 3 percentage points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_over_ten_thousand_connections() {
    let (a, b, c) = (
        named_backend("a").await,
        named_backend("b").await,
        named_backend("c").await,
    );
    let text = format!(
        "[[group]]\nname = \"primary\"\nbackends = [\"{a}\", {{ addr = \"{b}\", weight = 3 }}]\n\
         [[group]]\nname = \"backup\"\nbackends = [\"{c}\"]\n\
         [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"primary\"\nbackups = [\"backup\"]\n"
    );
    let proxy = start_proxy(&text).await;
    proxy
        .state("l")
        .router
        .publish(Weights::new(vec![7000, 3000]).unwrap())
        .unwrap();
    let addr = proxy.addr();
    let n: u32 = 10_000;
    let mut counts: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut set: tokio::task::JoinSet<std::io::Result<Vec<u8>>> = tokio::task::JoinSet::new();
    for i in 0..n {
        if i >= 32 {
            let name = set
                .join_next()
                .await
                .unwrap()
                .unwrap()
                .expect("connection served");
            *counts.entry(name).or_default() += 1;
        }
        set.spawn(read_all(addr));
    }
    while let Some(r) = set.join_next().await {
        *counts
            .entry(r.unwrap().expect("connection served"))
            .or_default() += 1;
    }
    let share = |k: &[u8]| f64::from(counts.get(k).copied().unwrap_or(0)) * 100.0 / f64::from(n);
    let (sa, sb, sc) = (share(b"a"), share(b"b"), share(b"c"));
    assert!((sc - 30.0).abs() <= 3.0, "backup share {sc:.1}% (want 30%)");
    assert!(
        (sa - 17.5).abs() <= 3.0,
        "primary a share {sa:.1}% (want 17.5%)"
    );
    assert!(
        (sb - 52.5).abs() <= 3.0,
        "primary b share {sb:.1}% (want 52.5%)"
    );
    assert_eq!(proxy.state("l").outcomes.snapshot().connected, u64::from(n));
}

/// A refused backend is retried on the next one: the client never notices.
#[tokio::test]
async fn dead_backend_is_retried_with_zero_client_errors() {
    let live = named_backend("live").await;
    let proxy = start_proxy(&two_group_config(&[dead_addr(), live], &[live], "")).await;
    for _ in 0..50 {
        assert_eq!(
            read_all(proxy.addr())
                .await
                .expect("served despite a dead backend"),
            b"live"
        );
    }
    let c = proxy.state("l").outcomes.snapshot();
    assert!(
        c.connect_refused >= 20,
        "about half the picks hit the dead backend: {c:?}"
    );
    assert_eq!((c.connected, c.no_backend), (50, 0));
}

/// With the whole primary group down, connections fail over to the backup.
#[tokio::test]
async fn dead_primary_group_fails_over_to_backup() {
    let backup = named_backend("backup").await;
    let proxy = start_proxy(&two_group_config(
        &[dead_addr(), dead_addr()],
        &[backup],
        "",
    ))
    .await;
    for _ in 0..20 {
        assert_eq!(read_all(proxy.addr()).await.unwrap(), b"backup");
    }
}

/// When nothing can serve, the client is closed promptly and it is counted.
#[tokio::test]
async fn all_backends_down_closes_client_promptly() {
    let proxy = start_proxy(&two_group_config(&[dead_addr()], &[dead_addr()], "")).await;
    let started = std::time::Instant::now();
    let got = read_all(proxy.addr()).await;
    assert!(
        matches!(&got, Ok(b) if b.is_empty()) || got.is_err(),
        "client sees EOF or reset, not data"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed promptly"
    );
    let c = proxy.state("l").outcomes.snapshot();
    assert_eq!(c.no_backend, 1);
    assert_eq!(c.connect_refused, 2);
}

/// A weight change applies to the very next connection and does not cut an
/// established one.
#[tokio::test]
async fn weight_change_applies_next_and_cuts_nobody() {
    let echo = echo_backend().await;
    let backup = named_backend("backup").await;
    let proxy = start_proxy(&two_group_config(&[echo.addr()], &[backup], "")).await;
    let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
    old.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    timeout(PATIENCE, old.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    proxy
        .state("l")
        .router
        .publish(Weights::new(vec![0, 10_000]).unwrap())
        .unwrap();
    assert_eq!(read_all(proxy.addr()).await.unwrap(), b"backup");
    old.write_all(b"pong").await.unwrap();
    timeout(PATIENCE, old.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"pong", "the established connection still works");
}

/// A connection with no traffic either way is closed after idle_timeout.
#[tokio::test]
async fn idle_connection_is_closed_and_counted() {
    let echo = echo_backend().await;
    let proxy = start_proxy(&echo_config(echo.addr(), "idle_timeout = \"300ms\"")).await;
    let got = read_all(proxy.addr())
        .await
        .expect("closed by the proxy, not by the test timeout");
    assert!(got.is_empty());
    let c = proxy.state("l").outcomes.snapshot();
    assert_eq!(c.idle_timeout, 1);
}

/// A source outside `allow` is closed at accept and never reaches a backend.
#[tokio::test]
async fn denied_source_never_reaches_backend() {
    let echo = echo_backend().await;
    let proxy = start_proxy(&echo_config(echo.addr(), "allow = [\"10.0.0.0/8\"]")).await;
    let got = read_all(proxy.addr()).await;
    assert!(matches!(&got, Ok(b) if b.is_empty()) || got.is_err());
    let c = proxy.state("l").outcomes.snapshot();
    assert_eq!((c.denied, c.accepted, c.connected), (1, 0, 0));
    let allowed = start_proxy(&echo_config(echo.addr(), "deny = [\"10.0.0.0/8\"]")).await;
    let mut s = TcpStream::connect(allowed.addr()).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    timeout(PATIENCE, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
}

/// Listeners on IPv6 loopback and on a port range all accept and route.
#[tokio::test]
async fn ipv6_and_port_range_listeners_work() {
    let backend = named_backend("ok").await;
    let v6 = start_proxy(
        &two_group_config(&[backend], &[backend], "").replace("127.0.0.1:0", "[::1]:0"),
    )
    .await;
    assert!(v6.addr().is_ipv6());
    assert_eq!(read_all(v6.addr()).await.unwrap(), b"ok");

    // Find five free consecutive ports; bounded tries, since other tests
    // bind ports concurrently.
    for attempt in 0..50 {
        let base = 20_000 + (std::process::id() as u16 % 5000) + attempt * 97;
        let range = format!("127.0.0.1:{base}-{}", base + 4);
        let text = two_group_config(&[backend], &[backend], "").replace("127.0.0.1:0", &range);
        let config =
            portshift::config::Config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        let Ok(proxy) = portshift::proxy::Proxy::bind(&config) else {
            continue;
        };
        let addrs: Vec<_> = proxy.local_addrs().into_iter().map(|(_, a)| a).collect();
        assert_eq!(addrs.len(), 5);
        tokio::spawn(proxy.serve(std::future::pending()));
        for a in addrs {
            assert_eq!(
                read_all(a).await.unwrap(),
                b"ok",
                "port {} of the range serves",
                a.port()
            );
        }
        return;
    }
    panic!("no free range of 5 ports found in 50 tries");
}
