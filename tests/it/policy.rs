//! The policy loop end to end over real sockets: a primary that turns slow
//! under steady load loses traffic to the backup, gets it back once it
//! heals, and no client connection fails on the way.

use crate::common::*;
use portshift::backend;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WINDOW: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_millis(100);
const RECOVER_FOR: Duration = Duration::from_secs(1);
/// Scheduling slack on a busy two-core machine, on top of what the policy
/// itself allows.
const GRACE: Duration = Duration::from_secs(2);

const POLICY: &str = r#"
interval = "100ms"
window = "1s"
sub_windows = 10
signal = "exchange"
min_samples = 10
dry_run = DRY_RUN

[trip]
p99_above = "150ms"
for = 3

[shift]
step = 10
max = 50
cooldown = "200ms"

[recover]
p99_below = "50ms"
for = "1s"
step = 10
cooldown = "100ms"
"#;

struct Setup {
    _dir: tempfile::TempDir,
    audit: std::path::PathBuf,
    primary: backend::BackendHandle,
    addr: SocketAddr,
    state: Arc<portshift::proxy::ListenerState>,
}

async fn setup(dry_run: bool) -> Setup {
    let primary = http_backend("primary", 5).await;
    let backup = http_backend("backup", 5).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = POLICY.replace("DRY_RUN", &dry_run.to_string());
    let text = format!(
        "audit_log = \"audit.jsonl\"\n{}",
        two_group_config(&[primary.addr()], &[backup.addr()], "policy = \"fast\"")
    );
    let (addr, state, _) = serve_config_in(dir.path(), &text, Some(&policy)).await;
    Setup {
        audit: dir.path().join("audit.jsonl"),
        _dir: dir,
        primary,
        addr,
        state,
    }
}

/// Steady load: `workers` clients each doing one request per new
/// connection until stopped; returns (when, who served it or None on error).
fn start_load(
    addr: SocketAddr,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<Vec<(Instant, Option<String>)>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let stop = stop.clone();
        set.spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = tokio::time::timeout(PATIENCE, backend::http_get(addr)).await;
                seen.push((
                    started,
                    r.ok().and_then(|r| r.ok()).map(|b| b.trim().to_owned()),
                ));
            }
            seen
        });
    }
    set
}

fn backup_bp(state: &portshift::proxy::ListenerState) -> u16 {
    state.router.weights().as_slice()[1]
}

/// A keep-alive HTTP request on an existing connection; returns the body.
async fn keepalive_get(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_primary_sheds_traffic_and_gets_it_back_without_errors() {
    let s = setup(false).await;
    let mut long_lived = TcpStream::connect(s.addr).await.unwrap();
    assert_eq!(keepalive_get(&mut long_lived).await, "primary");
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = start_load(s.addr, 6, stop.clone());
    tokio::time::sleep(WINDOW + Duration::from_millis(500)).await;
    assert_eq!(backup_bp(&s.state), 0, "a healthy primary keeps everything");

    // The primary turns slow: 5 ms -> 300 ms.
    s.primary.set_delay(Duration::from_millis(300));
    let fault = Instant::now();
    let detect = wait_until("10% on the backup", WINDOW + 3 * INTERVAL + GRACE, || {
        backup_bp(&s.state) >= 1000
    })
    .await;
    let shifted_at = Instant::now();
    eprintln!(
        "first shift {detect:?} after the fault (window + 3 intervals = {:?})",
        WINDOW + 3 * INTERVAL
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let peak = backup_bp(&s.state);

    // The primary heals.
    s.primary.set_delay(Duration::from_millis(5));
    let healed = Instant::now();
    let steps = u32::from(peak / 1000);
    let limit = WINDOW + RECOVER_FOR + INTERVAL * (steps + 2) + GRACE;
    let back = wait_until("all traffic back on the primary", limit, || {
        backup_bp(&s.state) == 0
    })
    .await;
    eprintln!("back to 100% primary {back:?} after healing (peak backup share {peak} bp)");
    stop.store(true, Ordering::Relaxed);

    let mut seen = Vec::new();
    while let Some(r) = load.join_next().await {
        seen.extend(r.unwrap());
    }
    let errors = seen.iter().filter(|(_, who)| who.is_none()).count();
    assert_eq!(errors, 0, "no client connection failed during either shift");
    let during: Vec<_> = seen
        .iter()
        .filter(|(t, _)| *t >= shifted_at && *t < healed)
        .collect();
    let on_backup = during
        .iter()
        .filter(|(_, who)| who.as_deref() == Some("backup"))
        .count();
    assert!(
        on_backup * 10 >= during.len(),
        "{on_backup} of {} new connections went to the backup",
        during.len()
    );
    assert!(fault < shifted_at);

    assert_eq!(
        keepalive_get(&mut long_lived).await,
        "primary",
        "the long-lived connection survived both shifts"
    );

    let audit = std::fs::read_to_string(&s.audit).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = lines
        .iter()
        .find(|l| l["action"] == "shift")
        .expect("a shift was audited");
    assert_eq!(first["rule"], "p99_above");
    assert_eq!(first["listener"], "l");
    assert_eq!(first["to"]["backup"], 10.0);
    assert!(
        first["reasons"][0]["value"].as_f64().unwrap() > 0.15,
        "{first}"
    );
    assert!(
        lines.iter().any(|l| l["action"] == "recover"),
        "recovery was audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_reports_but_changes_nothing() {
    let s = setup(true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = start_load(s.addr, 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.primary.set_delay(Duration::from_millis(300));
    let audit = s.audit.clone();
    wait_until(
        "a would-shift decision",
        WINDOW + 3 * INTERVAL + GRACE,
        || std::fs::read_to_string(&audit).is_ok_and(|t| t.contains("\"action\":\"shift\"")),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = load.join_next().await {
        assert!(
            r.unwrap()
                .iter()
                .all(|(_, who)| who.as_deref() == Some("primary")),
            "dry-run routed nothing away"
        );
    }
    assert_eq!(backup_bp(&s.state), 0);
    let text = std::fs::read_to_string(&s.audit).unwrap();
    assert!(
        text.lines().all(|l| l.contains("\"dry_run\":true")),
        "{text}"
    );
}
