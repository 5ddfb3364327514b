//! Passive ejection over real sockets: a backend that refuses every
//! connection is taken out of rotation after its failures in a row, for
//! longer each time it is ejected again, returns by itself, and clients
//! never see its failures (the plan moves on to the next backend).

use crate::common::*;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_failing_backend_is_ejected_then_returns_and_no_client_fails() {
    let (a, b) = named_pair().await;
    let dead = dead_addr();
    let text = format!(
        "[[group]]\nname = \"g\"\nbackends = [\"{a}\", \"{b}\", \"{dead}\"]\n\
         eject = {{ consecutive_failures = 3, base_time = \"1s\", max_time = \"10s\", max_percent = 50 }}\n\n\
         [[listener]]\nname = \"ejecting\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n"
    );
    let proxy = start_proxy(&text).await;
    let addr = proxy.addr();
    let state = proxy.state("ejecting");
    let ejections = || {
        let table = state.router.table();
        let e = &table.groups[0].member(2).eject;
        (e.times(), e.is_ejected(state.clock.now()))
    };
    // Steady load: every connection answered, by a live backend.
    let started = Instant::now();
    let mut ejected_after = None;
    for n in 0..400 {
        let got = read_all(addr).await.expect("every client is answered");
        assert!(
            got == b"primary" || got == b"backup",
            "connection {n}: {got:?}"
        );
        if ejected_after.is_none() && ejections().1 {
            ejected_after = Some((n + 1, started.elapsed()));
        }
        if ejections().0 >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (conns, took) = ejected_after.expect("the dead backend was ejected");
    eprintln!("ejected after {conns} connections, {took:?} into the load");
    assert!(
        conns <= 12,
        "three failures in a row at a third of the traffic: {conns}"
    );
    let refused = state.outcomes.snapshot().connect_refused;
    assert_eq!(
        ejections().0,
        2,
        "it returned after 1 s, failed again, and went out again"
    );
    assert!(
        refused <= 8,
        "while out it is not tried: {refused} refused connects"
    );

    let m = portshift::telemetry::render();
    let series = format!(
        "portshift_ejections_total{{listener=\"ejecting\",group=\"g\",backend=\"{dead}\"}}"
    );
    assert_eq!(metric_value(&m, &series), 2.0, "{series}");
    proxy.shutdown().await;
}

/// One slow backend among four fast ones: its `exchange` p99 stands out
/// from the group's median, and it is ejected although it never fails.
#[tokio::test]
async fn a_latency_outlier_is_ejected_though_it_never_fails() {
    let mut backends = Vec::new();
    for (name, delay) in [("f1", 0), ("f2", 0), ("f3", 0), ("slow", 150)] {
        backends.push(http_backend(name, delay).await);
    }
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.addr()))
        .collect();
    let text = format!(
        "[[group]]\nname = \"g\"\nbackends = [{}]\n\
         eject = {{ consecutive_failures = 0, latency_factor = 3, min_requests = 5, base_time = \"30s\" }}\n\n\
         [[listener]]\nname = \"outliers\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n",
        list.join(", ")
    );
    let proxy = start_proxy(&text).await;
    let state = proxy.state("outliers");
    let slow_out = || {
        let table = state.router.table();
        table.groups[0]
            .member(3)
            .eject
            .is_ejected(state.clock.now())
    };
    let request = "GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n";
    let started = Instant::now();
    let mut sent = 0;
    while !slow_out() {
        assert!(sent < 400, "not ejected after {sent} requests");
        let (status, _) = http_exchange(proxy.addr(), request).await.unwrap();
        assert_eq!(status, 200);
        sent += 1;
    }
    eprintln!(
        "latency outlier ejected after {sent} requests, {:?}",
        started.elapsed()
    );
    for _ in 0..20 {
        let (_, body) = http_exchange(proxy.addr(), request).await.unwrap();
        assert_ne!(
            body.trim(),
            "slow",
            "an ejected backend gets no new request"
        );
    }
    proxy.shutdown().await;
}
