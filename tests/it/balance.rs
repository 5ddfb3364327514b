//! The latency-aware and consistent-hash balancers over real sockets:
//! `source_hash` keeps each client address on one backend (clients bind
//! distinct 127.0.0.x source addresses), and `peak_ewma` sends little to
//! the one slow backend of four.

use crate::common::*;
use std::net::SocketAddr;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

/// One connection from source address `from` to `addr`; the name the
/// backend answered with.
async fn named_from(from: [u8; 4], addr: SocketAddr) -> String {
    tokio::time::timeout(PATIENCE, async {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((from, 0))).unwrap();
        let mut c = s.connect(addr).await.unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    })
    .await
    .expect("answered in time")
}

fn group(balance: &str, backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[group]]\nname = \"g\"\nbackends = [{}]\nbalance = \"{balance}\"\n{extra}\n\n\
         [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n",
        list.join(", ")
    )
}

#[tokio::test]
async fn source_hash_keeps_each_client_on_one_backend() {
    const NAMES: [&str; 4] = ["a", "b", "c", "d"];
    let mut backends = Vec::new();
    for n in NAMES {
        backends.push(named_backend(n).await);
    }
    let proxy = start_proxy(&group("source_hash", &backends, "")).await;
    let addr = proxy.addr();
    let mut used = std::collections::HashSet::new();
    for client in 2..34u8 {
        let first = named_from([127, 0, 0, client], addr).await;
        for _ in 0..3 {
            assert_eq!(
                named_from([127, 0, 0, client], addr).await,
                first,
                "client 127.0.0.{client}"
            );
        }
        used.insert(first);
    }
    assert!(
        used.len() >= 3,
        "32 clients spread over the backends: {used:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn peak_ewma_sends_little_to_a_slow_backend() {
    let mut backends = Vec::new();
    for (i, delay) in [2, 2, 2, 150].into_iter().enumerate() {
        backends.push(http_backend(&format!("b{i}"), delay).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let extra = "[group.peak_ewma]\nsignal = \"exchange\"\ndecay = \"5s\"\ndefault_rtt = \"10ms\"";
    let proxy = start_proxy(&group("peak_ewma", &addrs, extra)).await;
    let addr = proxy.addr();
    // Four clients at a time, 200 requests in all (bounded).
    for _ in 0..50 {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 {
            set.spawn(async move {
                http_exchange(
                    addr,
                    "GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
                )
                .await
            });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap().0, 200);
        }
    }
    let replies: Vec<u64> = backends.iter().map(|b| b.replies()).collect();
    assert_eq!(replies.iter().sum::<u64>(), 200);
    eprintln!("peak_ewma, one backend of four at 150 ms: replies per backend {replies:?}");
    // Round-robin would give the slow one 50; it gets its first probes and
    // then only what both draws leave it.
    assert!(
        replies[3] <= 12,
        "the slow backend served {} of 200: {replies:?}",
        replies[3]
    );
    let state = proxy.state("l");
    let table = state.router.table();
    let cost = |b: usize| table.groups[0].ewma_cost(b).unwrap();
    assert!(cost(3) > 10.0 * cost(0), "costs {} vs {}", cost(3), cost(0));
    proxy.shutdown().await;
}
