//! Blame the side that failed: clients that abort (a reset before the
//! reply, or a close after reading part of it) are counted as theirs and
//! never move traffic off a healthy primary; a backend that resets still
//! counts against it, and the policy moves traffic away.

use crate::common::*;
use portshift::core::stats::Signal;
use portshift::proxy::ListenerState;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The shipped failover policy's rules, on a clock fast enough for a test:
/// more than 5% failed connections for 3 evaluations trips it.
const POLICY: &str = r#"
mode = "failover"
interval = "100ms"
window = "3s"
signal = "exchange"
min_samples = 10

[trip]
p99_above = "250ms"
error_rate_above = 0.05
for = 3

[shift]
step = 10
max = 100
cooldown = "100ms"

[recover]
p99_below = "150ms"
error_rate_below = 0.01
for = "30s"
step = 10
cooldown = "100ms"
"#;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: portshift\r\nconnection: close\r\n\r\n";

struct Setup {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    state: Arc<ListenerState>,
    /// Every connection's outcome and who ended it.
    trace: Arc<portshift::access_log::AccessLog>,
}

async fn setup(primary: SocketAddr, backup: SocketAddr) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let text = two_group_config(&[primary], &[backup], "policy = \"fast\"");
    let (addr, state, handle) = serve_config_in(dir.path(), &text, Some(POLICY)).await;
    let trace =
        Arc::new(portshift::access_log::AccessLog::create(&dir.path().join("access.log")).unwrap());
    handle.set_trace(trace.clone());
    Setup {
        dir,
        addr,
        state,
        trace,
    }
}

/// How a test client ends its request.
#[derive(Clone, Copy, Debug)]
enum Client {
    /// Reads the whole reply.
    Polite,
    /// Resets (`SO_LINGER 0`) right after sending, before the reply.
    ResetBeforeReply,
    /// Reads a few bytes of the reply, then closes with the rest unread
    /// (the kernel answers the unread data with a reset).
    CloseEarly,
}

/// `SO_LINGER 0`: closing the socket sends a reset instead of a FIN.
fn reset_on_drop(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

async fn one_request(addr: SocketAddr, how: Client) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(REQUEST).await.is_err() {
        return false;
    }
    match how {
        Client::Polite => {
            let mut reply = Vec::new();
            let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut reply)).await;
            matches!(read, Ok(Ok(_))) && reply.starts_with(b"HTTP/1.1 200")
        }
        Client::ResetBeforeReply => {
            reset_on_drop(&s);
            drop(s);
            true
        }
        Client::CloseEarly => {
            let mut head = [0u8; 8];
            let read = tokio::time::timeout(PATIENCE, s.read_exact(&mut head)).await;
            drop(s);
            matches!(read, Ok(Ok(_)))
        }
    }
}

/// `n` requests, four at a time; every second one aborts, alternating
/// between the two ways. Returns how many polite requests failed.
async fn abortive_load(addr: SocketAddr, n: usize) -> usize {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (next, failed) = (next.clone(), failed.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let how = match i % 4 {
                    1 => Client::ResetBeforeReply,
                    3 => Client::CloseEarly,
                    _ => Client::Polite,
                };
                if !one_request(addr, how).await && matches!(how, Client::Polite) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    failed.load(Ordering::Relaxed)
}

fn primary_error_rate(state: &ListenerState) -> Option<f64> {
    let now = state.clock.now();
    state.policy_inputs(Signal::Exchange, now)[0].error_rate()
}

fn weights(state: &ListenerState) -> Vec<u16> {
    state.router.weights().as_slice().to_vec()
}

/// 200 requests to a healthy 5 ms primary, half of them aborted by the
/// client: the primary's error rate stays 0, the policy stays healthy and
/// every connection stays on the primary; the aborts are counted as the
/// client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_clients_do_not_move_traffic() {
    let primary = http_backend("primary", 5).await;
    let backup = http_backend("backup", 5).await;
    let s = setup(primary.addr(), backup.addr()).await;
    let before = (primary_error_rate(&s.state), weights(&s.state));
    let failed = abortive_load(s.addr, 200).await;
    assert_eq!(failed, 0, "every polite request is answered");
    // Give the policy more evaluations than `for` needs to trip, with the
    // aborts still inside its window.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let deadline = Instant::now() + PATIENCE;
    while s.state.outcomes.snapshot().active > 0 {
        assert!(Instant::now() < deadline, "connections end");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = (primary_error_rate(&s.state), weights(&s.state));
    let c = s.state.outcomes.snapshot();
    eprintln!(
        "primary error rate {:?} -> {:?}, weights {:?} -> {:?}; {c:?}",
        before.0, after.0, before.1, after.1
    );
    assert_eq!(after.0, Some(0.0), "aborts are not the backend's errors");
    assert_eq!(after.1, vec![10_000, 0], "no traffic moved");
    assert!(
        s.state.decisions.since(0).is_empty(),
        "the policy made no decision"
    );
    assert_eq!(s.state.decisions.phase(), Some("healthy"));
    assert_eq!(c.reset, 0, "no reset is the backend's: {c:?}");
    assert!(
        c.client_reset >= 95,
        "the aborts are counted as the client's: {c:?}"
    );
    let window = &s.state.view()[0].signals[Signal::Exchange.index()];
    assert_eq!(window.errors, 0, "nothing in the primary's window");
    // The trace says who ended each connection: the aborting clients.
    s.trace.flush();
    let text = std::fs::read_to_string(s.dir.path().join("access.log")).unwrap();
    let aborted: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"outcome\":\"client_reset\""))
        .collect();
    assert_eq!(aborted.len() as u64, c.client_reset, "{text}");
    assert!(
        aborted
            .iter()
            .all(|l| l.contains("\"ended_by\":\"client\"")),
        "{text}"
    );
    assert!(window.count >= 100, "the polite replies were measured");
}

/// A backend that answers every second connection with a reset still
/// counts: its error rate rises and the policy moves traffic to the
/// backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resetting_backend_still_loses_traffic() {
    let flaky = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flaky_addr = flaky.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((mut sock, _)) = flaky.accept().await {
            n += 1;
            tokio::spawn(async move {
                let mut req = [0u8; 256];
                let _ = sock.read(&mut req).await;
                if n.is_multiple_of(2) {
                    reset_on_drop(&sock);
                    return;
                }
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let backup = http_backend("backup", 5).await;
    let s = setup(flaky_addr, backup.addr()).await;
    let deadline = Instant::now() + PATIENCE;
    while weights(&s.state)[1] == 0 {
        assert!(
            Instant::now() < deadline,
            "traffic moved off the resetting backend"
        );
        for _ in 0..20 {
            one_request(s.addr, Client::Polite).await;
        }
    }
    let c = s.state.outcomes.snapshot();
    assert!(c.reset > 0, "the backend's resets are counted: {c:?}");
    assert_eq!(c.client_reset, 0, "{c:?}");
    assert!(primary_error_rate(&s.state).is_some_and(|r| r > 0.05));
}
