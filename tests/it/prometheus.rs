//! The dashboards and alert rules against a real Prometheus (Debian's
//! package) scraping a real proxy under load: every PromQL expression in
//! `dashboards/portshift.json` and `dashboards/alerts.yml` must return
//! data, and `promtool check rules` must pass. The scenario makes every
//! alert's condition true: a pinned shift onto a slow backup, a dead
//! probed backend, a listener with no reachable backend, a failed reload,
//! and a policy that keeps shifting.

use crate::common::*;
use portshift::config::Config;
use portshift::proxy::Proxy;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const POLICY: &str = r#"
interval = "100ms"
window = "1s"
min_samples = 5
[trip]
p99_above = "150ms"
for = 2
[shift]
step = 20
max = 60
cooldown = "200ms"
[recover]
p99_below = "50ms"
for = "500ms"
step = 20
cooldown = "100ms"
"#;

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/portshift.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every expression in the dashboard: panel targets and annotations.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        if let Some(e) = a["expr"].as_str() {
            out.push(e.to_owned());
        }
    }
    out
}

/// Every `expr:` in the rules file (each is written on one line).
fn alert_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/alerts.yml"),
    )
    .unwrap();
    let exprs: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().trim_matches(|c| c == '\'' || c == '"').to_owned())
        .collect();
    assert_eq!(
        exprs.len(),
        text.matches("- alert:").count(),
        "one single-line expr per alert"
    );
    exprs
}

/// Grafana's template variables, as Grafana would expand "All".
fn expand(expr: &str) -> String {
    expr.replace("$listener", ".*")
        .replace("$group", ".*")
        .replace("$route", ".*")
        .replace("$__rate_interval", "10s")
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn http(addr: SocketAddr, path: &str) -> Option<String> {
    // HTTP/1.0: a plain body, no chunked encoding to undo.
    let req = format!("GET {path} HTTP/1.0\r\nhost: prom\r\n\r\n");
    http_exchange(addr, &req).await.ok().map(|(_, body)| body)
}

/// Queries until the expression returns data (bounded); returns how many
/// series it returned.
async fn query_until_data(
    prom: SocketAddr,
    expr: &str,
    deadline: Instant,
) -> Result<usize, String> {
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(body) = http(prom, &format!("/api/v1/query?query={}", urlencode(expr))).await {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v["status"] != "success" {
                return Err(format!("query failed: {body}"));
            }
            let n = v["data"]["result"].as_array().map_or(0, |r| r.len());
            if n > 0 {
                return Ok(n);
            }
            last = body;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("no data before the deadline; last answer {last}"))
}

/// `portshift run` as a second fleet member with one listener, `shifted`;
/// the child and its admin address.
fn second_member(
    dir: &Path,
    fleet: &str,
    main: SocketAddr,
    spare: SocketAddr,
) -> (std::process::Child, SocketAddr) {
    let sub = dir.join("second");
    std::fs::create_dir_all(&sub).unwrap();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{fleet}member = \"second\"\n[[group]]\nname = \"main\"\nbackends = [\"{main}\"]\n[[group]]\nname = \"spare\"\nbackends = [\"{spare}\"]\n[[listener]]\nname = \"shifted\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"main\"\nbackups = [\"spare\"]\n"
    );
    let path = write_config(&sub, &text);
    let (child, mut lines) = spawn_logging(Command::new(bin()).args(["run", "-c"]).arg(&path));
    let admin = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("admin listening"))
        .and_then(|l| logged_addr(&l))
        .expect("the second member serves its admin API");
    // Keep reading its log, so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, admin)
}

/// A real Prometheus scraping `targets` every second; killed when dropped.
pub struct PromServer {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl PromServer {
    /// Starts on `port` with its data under `dir`; waits until ready.
    pub async fn start(dir: &Path, port: u16, targets: &[SocketAddr]) -> PromServer {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = dir.join("prometheus.yml");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: portshift\n    static_configs:\n      - targets: [{}]\n", list.join(", ")),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        let ready_by = Instant::now() + Duration::from_secs(60);
        while http(addr, "/-/ready")
            .await
            .is_none_or(|b| !b.contains("Ready"))
        {
            assert!(Instant::now() < ready_by, "prometheus became ready");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        PromServer { child, addr }
    }
}

impl Drop for PromServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn promtool_accepts_the_alert_rules() {
    if !have_tool("promtool", "prometheus") {
        return;
    }
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/alerts.yml");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dashboard_is_import_ready() {
    let d = dashboard();
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "listener", "group", "route"]);
    for p in d["panels"].as_array().unwrap() {
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {} uses the datasource variable",
            p["title"]
        );
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "panel {} is described",
            p["title"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_data_from_real_prometheus() {
    if !have_tool("prometheus", "prometheus") {
        return;
    }
    let fast = http_backend("fast", 2).await;
    let slow = http_backend("slow", 300).await;
    let toggling = http_backend("toggling", 2).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/flappy.toml"), POLICY).unwrap();
    let (dead1, dead2, no_etcd) = (dead_addr(), dead_addr(), dead_addr());
    let leaf =
        crate::certs::Ca::new(dir.path(), "ca").leaf(dir.path(), "edge", &["edge.test"], false);
    let fleet = format!(
        "[fleet]\nname = \"edge\"\netcd = [\"http://{no_etcd}\"]\nlease_ttl = \"2s\"\nstale_after = \"2s\"\n"
    );
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
{fleet}member = "first"

[[group]]
name = "main"
backends = ["{fast}"]
[[group]]
name = "spare"
backends = ["{slow}", "{dead1}"]
[group.probe]
interval = "500ms"
timeout = "400ms"

[[group]]
name = "flaky"
backends = ["{toggling}"]
[[group]]
name = "steady"
backends = ["{fast}"]

[[group]]
name = "void"
backends = ["{dead2}"]

# Backends from a discovery file, which changes (then breaks) below.
[[group]]
name = "found"
backends = [{{ file = "found.json" }}]
resolve_every = "1s"

[[listener]]
name = "shifted"
listen = ["127.0.0.1:0"]
primary = "main"
backups = ["spare"]

[[listener]]
name = "policy"
listen = ["127.0.0.1:0"]
primary = "flaky"
backups = ["steady"]
policy = "flappy"

[[listener]]
name = "nobackend"
listen = ["127.0.0.1:0"]
primary = "void"

[[listener]]
name = "discovered"
listen = ["127.0.0.1:0"]
primary = "found"

[[listener]]
name = "edge"
listen = ["127.0.0.1:0"]
primary = "main"
proxy_protocol = "v2"
proxy_protocol_from = ["127.0.0.1"]

[[listener]]
name = "knocked"
listen = ["127.0.0.1:0"]
primary = "main"
knock = {{ sequence = [{knock}] }}

# TLS terminated; the load's plain HTTP fails its handshake.
[[listener]]
name = "tlsedge"
listen = ["127.0.0.1:0"]
primary = "main"
tls = {{ cert = "{cert}", key = "{key}" }}

# Routes by TLS server name; the load's plain HTTP is refused (not_tls).
[[listener]]
name = "routed"
listen = ["127.0.0.1:0"]
[[listener.route]]
name = "tls"
sni = ["tls.example.com"]
primary = "main"
backups = ["spare"]
"#,
        knock = free_port(),
        cert = leaf.cert.display(),
        key = leaf.key.display(),
        fast = fast.addr(),
        slow = slow.addr(),
        toggling = toggling.addr(),
    );
    let found = dir.path().join("found.json");
    std::fs::write(&found, format!(r#"["{}"]"#, fast.addr())).unwrap();
    let path = write_config(dir.path(), &text);
    let proxy = Proxy::bind(&Config::load(&path).unwrap_or_else(|e| panic!("{e}"))).unwrap();
    let admin = proxy.admin_addr().unwrap();
    let addrs = proxy.local_addrs();
    let handle = proxy.handle();
    tokio::spawn(proxy.serve(std::future::pending()));
    // A second member of the fleet, in its own process (its own metrics),
    // whose `shifted` stays all on the primary: with etcd unreachable both
    // are detached, there is no leader, and their weights disagree.
    let second = second_member(dir.path(), &fleet, fast.addr(), slow.addr());

    // Pin most traffic of `shifted` onto its slow backup.
    handle
        .listener("shifted")
        .unwrap()
        .pin(portshift::core::routes::Weights::new(vec![4000, 6000]).unwrap())
        .unwrap();

    // Load on every listener; the policy listener's primary flaps.
    let stop = CancellationToken::new();
    for (_, addr) in &addrs {
        let stats = Arc::new(portshift::load::LoadStats::default());
        tokio::spawn(portshift::load::run(*addr, 40.0, stats, stop.clone()));
    }
    let flapper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut slow_now = false;
            while !stop.is_cancelled() {
                slow_now = !slow_now;
                toggling.set_delay(Duration::from_millis(if slow_now { 300 } else { 2 }));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };

    let prom = PromServer::start(dir.path(), free_port(), &[admin, second.1]).await;
    let prom_addr = prom.addr;

    // A reload fails while Prometheus watches (after its first scrapes), so
    // the counter visibly moves.
    query_until_data(
        prom_addr,
        "count_over_time(up{job=\"portshift\"}[1m]) >= 2",
        Instant::now() + Duration::from_secs(60),
    )
    .await
    .expect("prometheus scrapes the proxy");
    std::fs::write(&path, "not = [valid").unwrap();
    assert!(handle.reload().await.is_err());
    std::fs::write(&path, &text).unwrap();
    // The discovery file gains a backend, then breaks (and stays broken).
    std::fs::write(&found, format!(r#"["{}", "{}"]"#, fast.addr(), slow.addr())).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(&found, "[oops").unwrap();

    let mut exprs = dashboard_exprs(&dashboard());
    exprs.extend(alert_exprs());
    let overall = Instant::now() + Duration::from_secs(180);
    let mut failures = Vec::new();
    for e in &exprs {
        let deadline = overall.min(Instant::now() + Duration::from_secs(30));
        match query_until_data(prom_addr, &expand(e), deadline).await {
            Ok(n) => eprintln!("ok ({n} series): {e}"),
            Err(why) => failures.push(format!("{e}\n    {why}")),
        }
    }
    if !failures.is_empty() {
        let raw = http(
            prom_addr,
            &format!(
                "/api/v1/query?query={}",
                urlencode("portshift_config_reloads_total[2m]")
            ),
        )
        .await;
        eprintln!("reload series: {raw:?}");
    }
    stop.cancel();
    let _ = flapper.await;
    drop(prom);
    let (mut second, _) = second;
    let _ = second.kill();
    let _ = second.wait();
    assert!(
        failures.is_empty(),
        "queries without data:\n{}",
        failures.join("\n")
    );
    assert!(exprs.len() >= 20, "checked {} expressions", exprs.len());
}
