//! Routing by TLS server name: real ClientHellos (`openssl s_client`'s,
//! captured once) sent through the proxy pick a route by name, reach that
//! route's backend byte for byte, and each route steers on its own: a pin
//! or a policy shift on one route leaves the others where they were.
//! Connections no route takes are closed and counted by reason.

use crate::common::*;
use crate::sni::real_hello;
use portshift::backend::{self, BackendOpts, Mode};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `hello` to `addr` in writes of `segment` bytes; who answered (its
/// greeting) and whether the hello came back byte for byte after it.
async fn route_of(
    addr: SocketAddr,
    hello: &[u8],
    segment: usize,
) -> std::io::Result<(String, bool)> {
    tokio::time::timeout(PATIENCE, async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        for chunk in hello.chunks(segment) {
            s.write_all(chunk).await?;
            if segment < hello.len() {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let mut greeting = Vec::new();
        let mut byte = [0u8; 1];
        while s.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
            greeting.push(byte[0]);
        }
        let mut back = vec![0u8; hello.len()];
        let same = s.read_exact(&mut back).await.is_ok() && back == hello;
        Ok((String::from_utf8_lossy(&greeting).into_owned(), same))
    })
    .await
    .map_err(|_| std::io::Error::other("timed out"))?
}

/// Sends `hello` to `addr` and reads it back from an echo backend.
async fn echoed(addr: SocketAddr, hello: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(PATIENCE, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(hello).await?;
        let mut back = vec![0u8; hello.len()];
        s.read_exact(&mut back).await?;
        match back == hello {
            true => Ok(()),
            false => Err(std::io::Error::other("the echo differs")),
        }
    })
    .await
    .map_err(|_| std::io::Error::other("timed out"))?
}

/// Groups `gateway`, `payments`, `payments-dr` and `risk` on `backends`;
/// listener `name` (with `head`) routing pay and risk names.
fn routed_config(name: &str, backends: &[SocketAddr; 4], head: &str) -> String {
    let groups = ["gateway", "payments", "payments-dr", "risk"]
        .iter()
        .zip(backends)
        .map(|(g, a)| format!("[[group]]\nname = \"{g}\"\nbackends = [\"{a}\"]\n\n"))
        .collect::<String>();
    format!(
        "{groups}[[listener]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:0\"]\n{head}\n\n\
         [[listener.route]]\nname = \"payments\"\nsni = [\"pay.example.com\", \"*.pay.example.com\"]\n\
         primary = \"payments\"\nbackups = [\"payments-dr\"]\n\n\
         [[listener.route]]\nname = \"risk\"\nsni = [\"risk.example.com\"]\nprimary = \"risk\"\n"
    )
}

#[tokio::test]
async fn server_names_pick_routes_and_backends_get_the_hello_unchanged() {
    if !have_tool("openssl", "openssl") {
        return;
    }
    let names = ["gateway", "payments", "payments-dr", "risk"];
    let mut backends = Vec::new();
    for n in names {
        backends.push(greeting_echo(n).await);
    }
    let addrs: [SocketAddr; 4] = std::array::from_fn(|i| backends[i].addr());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.jsonl");
    let head = format!("primary = \"gateway\"\naccess_log = \"{}\"", log.display());
    let proxy = start_proxy(&routed_config("sni-edge", &addrs, &head)).await;
    let addr = proxy.addr();

    for (name, segment, want) in [
        (Some("pay.example.com"), 1 << 20, "payments"),
        (Some("a.b.pay.example.com"), 1 << 20, "payments"),
        (Some("RISK.example.com"), 1 << 20, "risk"),
        (Some("pay.example.com"), 1, "payments"),
        (Some("example.com"), 1 << 20, "gateway"),
        (Some("pay.example.com.evil.net"), 1 << 20, "gateway"),
        (None, 1 << 20, "gateway"),
    ] {
        let hello = real_hello(name).await.bytes;
        let (who, same) = route_of(addr, &hello, segment).await.unwrap();
        assert_eq!(who, want, "{name:?} in {segment}-byte writes");
        assert!(same, "{name:?}: the backend got the hello unchanged");
    }

    let payments = proxy.handle.listener("sni-edge/payments").unwrap();
    assert_eq!(payments.outcomes.snapshot().accepted, 3);
    assert_eq!(payments.route(), Some("payments"));
    assert_eq!(proxy.state("sni-edge").outcomes.snapshot().accepted, 7);
    let m = portshift::telemetry::render();
    let series = format!(
        "portshift_connections_total{{listener=\"sni-edge\",route=\"payments\",group=\"payments\",backend=\"{}\"}}",
        addrs[1]
    );
    assert_eq!(metric_value(&m, &series), 3.0, "{series}");

    proxy.shutdown().await;
    // Lines are written off the data path: wait (bounded) for all seven.
    let count = || std::fs::read_to_string(&log).map_or(0, |t| t.lines().count());
    wait_until("seven access-log lines", PATIENCE, || count() >= 7).await;
    let lines = std::fs::read_to_string(&log).unwrap();
    let routes: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["route"].clone())
        .collect();
    assert_eq!(routes.len(), 7, "{lines}");
    assert_eq!(
        routes.iter().filter(|r| *r == "payments").count(),
        3,
        "{lines}"
    );
    assert_eq!(routes.iter().filter(|r| r.is_null()).count(), 3, "{lines}");
    assert!(
        lines
            .lines()
            .all(|l| !l.contains("\"bytes_to_backend\":0,")),
        "the hello counts among the bytes to the backend: {lines}"
    );
}

#[tokio::test]
async fn connections_no_route_takes_are_closed_and_counted_by_reason() {
    if !have_tool("openssl", "openssl") {
        return;
    }
    let mut backends = Vec::new();
    for n in ["gateway", "payments", "payments-dr", "risk"] {
        backends.push(greeting_echo(n).await);
    }
    let addrs: [SocketAddr; 4] = std::array::from_fn(|i| backends[i].addr());
    // No primary: what no route takes is closed.
    let text = routed_config("sni-closed", &addrs, "client_hello_timeout = \"400ms\"");
    let proxy = start_proxy(&text).await;
    let addr = proxy.addr();
    let pay = real_hello(Some("pay.example.com")).await.bytes;

    let closed = |bytes: Vec<u8>, hold: bool| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        if !hold {
            s.shutdown().await.unwrap();
        }
        let mut out = Vec::new();
        let started = Instant::now();
        let r = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "the proxy closes the connection");
        assert!(out.is_empty(), "nothing reached a backend: {out:?}");
        started.elapsed()
    };
    closed(real_hello(Some("example.com")).await.bytes, true).await;
    closed(real_hello(None).await.bytes, true).await;
    closed(
        b"GET / HTTP/1.1\r\nhost: pay.example.com\r\n\r\n".to_vec(),
        true,
    )
    .await;
    let waited = closed(pay[..pay.len() / 2].to_vec(), true).await;
    assert!(
        waited >= Duration::from_millis(350),
        "a truncated hello waits for client_hello_timeout ({waited:?})"
    );
    closed(pay[..pay.len() / 2].to_vec(), false).await;
    // The route still works beside them.
    assert_eq!(route_of(addr, &pay, 1 << 20).await.unwrap().0, "payments");

    let m = portshift::telemetry::render();
    for (reason, n) in [
        ("no_match", 2.0),
        ("not_tls", 1.0),
        ("timeout", 1.0),
        ("closed", 1.0),
        ("malformed", 0.0),
    ] {
        let series =
            format!("portshift_sni_rejected_total{{listener=\"sni-closed\",reason=\"{reason}\"}}");
        assert_eq!(metric_value(&m, &series), n, "{series}");
    }
    proxy.shutdown().await;
}

/// A policy file: shift 20 points a step while the exchange p99 is above
/// 100 ms, judged every 100 ms over a 1 s window.
const POLICY: &str = r#"
interval = "100ms"
window = "1s"
sub_windows = 10
signal = "exchange"
min_samples = 5

[trip]
p99_above = "100ms"
for = 2

[shift]
step = 20
max = 60
cooldown = "100ms"

[recover]
p99_below = "50ms"
for = "30s"
step = 10
cooldown = "1s"
"#;

#[tokio::test]
async fn each_route_steers_on_its_own() {
    if !have_tool("openssl", "openssl") {
        return;
    }
    // Plain echo backends; payments' primary answers after 250 ms.
    let mut backends = Vec::new();
    for delay in [0, 250, 0, 0] {
        backends.push(
            backend::spawn(
                "127.0.0.1:0".parse().unwrap(),
                BackendOpts {
                    name: "echo".into(),
                    mode: Mode::Echo,
                    delay: Duration::from_millis(delay),
                    greeting: None,
                },
            )
            .await
            .unwrap(),
        );
    }
    let addrs: [SocketAddr; 4] = std::array::from_fn(|i| backends[i].addr());
    let dir = tempfile::tempdir().unwrap();
    // Both routes under the policy; only payments' primary is slow.
    let text = routed_config("l", &addrs, "primary = \"gateway\"")
        .replace(
            "backups = [\"payments-dr\"]",
            "backups = [\"payments-dr\"]\npolicy = \"fast\"",
        )
        .replace(
            "primary = \"risk\"",
            "primary = \"risk\"\nbackups = [\"gateway\"]\npolicy = \"fast\"",
        );
    let text = format!("[admin]\nlisten = \"127.0.0.1:0\"\n{text}");
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/fast.toml"), POLICY).unwrap();
    let path = write_config(dir.path(), &text);
    let config = portshift::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let proxy = portshift::proxy::Proxy::bind(&config).unwrap();
    let (addr, admin) = (proxy.local_addrs()[0].1, proxy.admin_addr().unwrap());
    let handle = proxy.handle();
    tokio::spawn(proxy.serve(std::future::pending()));
    let payments = handle.listener("l/payments").unwrap();
    let risk = handle.listener("l/risk").unwrap();
    let pay = real_hello(Some("pay.example.com")).await.bytes;
    let risky = real_hello(Some("risk.example.com")).await.bytes;

    // Load on both routes until payments has shifted (bounded: 20 s).
    let started = Instant::now();
    let mut load = tokio::task::JoinSet::new();
    while payments.router.weights().as_slice()[0] == 10_000 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "payments never shifted: {:?}",
            payments.decisions.since(0)
        );
        for hello in [pay.clone(), risky.clone()] {
            load.spawn(async move { echoed(addr, &hello).await });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let shifted_after = started.elapsed();
    while let Some(r) = load.join_next().await {
        r.unwrap().expect("no client connection fails");
    }
    eprintln!("payments shifted {shifted_after:?} into the load");
    assert_eq!(
        risk.router.weights().as_slice(),
        [10_000, 0],
        "risk stays on its primary: {:?}",
        risk.decisions.since(0)
    );

    // An operator's pin on one route, through the admin API's
    // `{listener}/{route}` paths, holds that route only.
    let (code, body) = admin_request(
        admin,
        "PUT",
        "/routes/l/risk/weights",
        r#"{"risk": 40, "gateway": 60}"#,
        None,
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(risk.router.weights().as_slice(), [4_000, 6_000]);
    assert_eq!(payments.pinned(), None);
    let (code, body) = admin_request(admin, "POST", "/routes/l/payments/policy/pause", "", None)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(payments.is_paused() && !risk.is_paused());
    // The same unit, one path segment with the slash encoded.
    let (code, body) = admin_request(admin, "DELETE", "/routes/l%2Frisk/weights", "", None)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(risk.pinned(), None);
    let (code, body) = admin_request(admin, "PUT", "/routes/l/nope/weights", "{}", None)
        .await
        .unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("l/payments") && body.contains("l/risk"),
        "{body}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
    let units: Vec<(String, serde_json::Value)> = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["name"].as_str().unwrap().to_owned(), l["route"].clone()))
        .collect();
    assert_eq!(
        units,
        [
            ("l".to_owned(), serde_json::Value::Null),
            ("l/payments".to_owned(), "payments".into()),
            ("l/risk".to_owned(), "risk".into())
        ]
    );
    let m = portshift::telemetry::render();
    assert_eq!(
        metric_value(
            &m,
            "portshift_policy_paused{listener=\"l\",route=\"payments\"}"
        ),
        1.0
    );
    assert!(
        metric_value(
            &m,
            "portshift_decisions_total{listener=\"l\",route=\"payments\",action=\"shift\",rule=\"p99_above\"}"
        ) >= 1.0,
        "{m}"
    );
}
