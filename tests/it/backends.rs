//! The runtime backend API over real sockets: backends join, leave, change
//! weight and drain while connections run; established connections are
//! never cut; bad calls change nothing and say why; a reload keeps the
//! overrides of a group it leaves alone and drops (and reports) those of a
//! group it redefines.

use crate::common::*;
use portshift::config::Config;
use portshift::proxy::{Proxy, ProxyHandle};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Running {
    _dir: tempfile::TempDir,
    path: PathBuf,
    admin: SocketAddr,
    addr: SocketAddr,
    handle: ProxyHandle,
}

fn config(group: &[SocketAddr], connect_timeout: &str) -> String {
    let list: Vec<String> = group.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "audit_log = \"audit.jsonl\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[group]]\nname = \"g\"\nbackends = [{}]\n\n\
         [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\nconnect_timeout = \"{connect_timeout}\"\n",
        list.join(", ")
    )
}

async fn run(text: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), text);
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::bind(&config).unwrap();
    let admin = proxy.admin_addr().expect("admin configured");
    let addr = proxy.local_addrs()[0].1;
    let handle = proxy.handle();
    tokio::spawn(proxy.serve(std::future::pending()));
    Running {
        _dir: dir,
        path,
        admin,
        addr,
        handle,
    }
}

async fn call(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, body) = admin_request(admin, method, path, body, None)
        .await
        .unwrap();
    let parsed = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, parsed)
}

/// A client connection through the proxy, and the name its backend
/// greeted it with.
async fn connect(addr: SocketAddr) -> (BufReader<TcpStream>, String) {
    let s = TcpStream::connect(addr).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, r.read_line(&mut line))
        .await
        .expect("greeted in time")
        .unwrap();
    (r, line.trim().to_owned())
}

/// Who greets `n` new connections, counted.
async fn spread(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (_, who) = connect(addr).await;
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

/// The listener's first group in `/status`.
async fn group_status(admin: SocketAddr) -> Value {
    let status: Value = serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
    status["listeners"][0]["groups"][0].clone()
}

fn addrs(group: &Value) -> Vec<String> {
    let list = group["backends"].as_array().unwrap();
    list.iter()
        .map(|b| b["addr"].as_str().unwrap().to_owned())
        .collect()
}

/// Still the same backend, still echoing: the connection was not cut.
async fn still_echoes(conn: &mut BufReader<TcpStream>) {
    conn.get_mut().write_all(b"still here\n").await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, conn.read_line(&mut line))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(line, "still here\n");
}

#[tokio::test]
async fn backends_join_leave_reweigh_and_drain_without_cutting_anyone() {
    let (a, b) = (greeting_echo("a").await, greeting_echo("b").await);
    let p = run(&config(&[a.addr()], "2s")).await;
    let base = "/routes/l/groups/g/backends";
    let (mut held, who) = connect(p.addr).await;
    assert_eq!(who, "a");

    // Join: new connections spread over both.
    let (st, v) = call(
        p.admin,
        "POST",
        base,
        &json!({"addr": b.addr().to_string()}).to_string(),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["changed"]["added"][0], format!("{} (weight 1)", b.addr()));
    let seen = spread(p.addr, 20).await;
    assert_eq!((seen["a"], seen["b"]), (10, 10), "{seen:?}");

    // Weight: 3 to 1.
    let (st, v) = call(
        p.admin,
        "PUT",
        &format!("{base}/{}", b.addr()),
        r#"{"weight": 3}"#,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let seen = spread(p.addr, 40).await;
    assert_eq!((seen["a"], seen["b"]), (10, 30), "{seen:?}");

    // Drain a while a connection is open on it: no new ones, the open one
    // carries on, and the drain is shown finished once it closes.
    let (st, v) = call(p.admin, "POST", &format!("{base}/{}/drain", a.addr()), "").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(spread(p.addr, 10).await.get("a"), None);
    let g = group_status(p.admin).await;
    let a_status = &g["backends"][0];
    assert_eq!(
        (
            a_status["draining"].clone(),
            a_status["active"].clone(),
            a_status["drained"].clone()
        ),
        (json!(true), json!(1), json!(false)),
        "{g}"
    );
    still_echoes(&mut held).await;
    drop(held);
    let mut drained = false;
    for _ in 0..100 {
        if group_status(p.admin).await["backends"][0]["drained"] == json!(true) {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(drained, "a's drain finishes when its connection closes");
    let (st, _) = call(p.admin, "POST", &format!("{base}/{}/undrain", a.addr()), "").await;
    assert_eq!(st, 200);

    // Leave: a connection open on b carries on after b is removed.
    let (mut on_b, _) = loop {
        let c = connect(p.addr).await;
        if c.1 == "b" {
            break c;
        }
    };
    let (st, v) = call(p.admin, "DELETE", &format!("{base}/{}", b.addr()), "").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["changed"]["removed"][0], b.addr().to_string());
    assert_eq!(spread(p.addr, 6).await["a"], 6);
    still_echoes(&mut on_b).await;

    // Overrides and audit.
    let g = group_status(p.admin).await;
    assert_eq!(addrs(&g), vec![a.addr().to_string()]);
    let audit = std::fs::read_to_string(p.path.with_file_name("audit.jsonl")).unwrap();
    assert!(
        audit.contains(&format!("DELETE {base}/{}", b.addr())),
        "{audit}"
    );
}

/// Every bad call answers with a JSON error and leaves the group as it was.
#[tokio::test]
async fn bad_backend_calls_change_nothing_and_say_why() {
    let a = greeting_echo("a").await;
    let p = run(&config(&[a.addr()], "2s")).await;
    let base = "/routes/l/groups/g/backends";
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        (
            "POST",
            "/routes/l/groups/nope/backends".into(),
            r#"{"addr": "127.0.0.1:1"}"#.into(),
            404,
            "no group `nope`",
        ),
        (
            "POST",
            "/routes/nope/groups/g/backends".into(),
            r#"{"addr": "127.0.0.1:1"}"#.into(),
            404,
            "no listener `nope`",
        ),
        (
            "POST",
            base.into(),
            r#"{"addr": "not an address"}"#.into(),
            400,
            "not ip:port nor host:port",
        ),
        (
            "POST",
            base.into(),
            r#"{"weight": 1}"#.into(),
            400,
            "needs an `addr`",
        ),
        (
            "POST",
            base.into(),
            "[1]".into(),
            400,
            "must be a JSON object",
        ),
        (
            "POST",
            base.into(),
            format!(r#"{{"addr": "{}"}}"#, a.addr()),
            409,
            "already a backend",
        ),
        (
            "POST",
            base.into(),
            r#"{"addr": "127.0.0.1:1", "weight": 5000}"#.into(),
            400,
            "from 0 to 1000",
        ),
        (
            "PUT",
            format!("{base}/127.0.0.1:1"),
            r#"{"weight": 1}"#.into(),
            404,
            "not a backend of this group",
        ),
        (
            "PUT",
            format!("{base}/{}", a.addr()),
            r#"{"weight": 0}"#.into(),
            409,
            "at least one backend with a weight",
        ),
        (
            "PUT",
            format!("{base}/{}", a.addr()),
            "{}".into(),
            400,
            "needs a `weight`",
        ),
        (
            "DELETE",
            format!("{base}/{}", a.addr()),
            String::new(),
            409,
            "at least one backend with a weight",
        ),
        (
            "DELETE",
            format!("{base}/nonsense"),
            String::new(),
            400,
            "not a backend address",
        ),
        (
            "POST",
            format!("{base}/{}/unplug", a.addr()),
            String::new(),
            404,
            "use drain or undrain",
        ),
    ];
    for (method, path, body, want, says) in cases {
        let (st, v) = call(p.admin, method, &path, &body).await;
        assert_eq!(st, want, "{method} {path} {body}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{method} {path}: {msg}");
    }
    let g = group_status(p.admin).await;
    assert_eq!(addrs(&g), vec![a.addr().to_string()]);
    assert_eq!(g["overrides"], json!([]));
    // Draining the last backend is allowed, with a warning.
    let (st, v) = call(p.admin, "POST", &format!("{base}/{}/drain", a.addr()), "").await;
    assert_eq!(st, 200);
    assert!(v["warning"].as_str().unwrap().contains("no backend"), "{v}");
}

#[tokio::test]
async fn a_reload_keeps_overrides_of_an_untouched_group_and_drops_a_redefined_ones() {
    let (a, b, c) = (
        greeting_echo("a").await,
        greeting_echo("b").await,
        greeting_echo("c").await,
    );
    let p = run(&config(&[a.addr()], "2s")).await;
    let base = "/routes/l/groups/g/backends";
    let body = json!({"addr": b.addr().to_string(), "weight": 2}).to_string();
    assert_eq!(call(p.admin, "POST", base, &body).await.0, 200);

    // The listener changes, its group does not: the added backend stays.
    std::fs::write(&p.path, config(&[a.addr()], "3s")).unwrap();
    let report = p.handle.reload().await.unwrap();
    assert_eq!(report.changed, vec!["l"]);
    assert!(report.overrides_dropped.is_empty(), "{report:?}");
    let g = group_status(p.admin).await;
    assert_eq!(addrs(&g), vec![a.addr().to_string(), b.addr().to_string()]);
    assert_eq!(g["overrides"][0]["weight"], 2, "{g}");
    // Port 0: the restarted listener has a new one.
    let addr = p.handle.listeners()[0].1[0];
    let seen = spread(addr, 9).await;
    assert_eq!((seen["a"], seen["b"]), (3, 6), "{seen:?}");

    // The group is redefined: the override goes, and the reload says so.
    std::fs::write(&p.path, config(&[a.addr(), c.addr()], "3s")).unwrap();
    let report = p.handle.reload().await.unwrap();
    assert_eq!(report.overrides_dropped, vec!["l/g"]);
    let g = group_status(p.admin).await;
    assert_eq!(addrs(&g), vec![a.addr().to_string(), c.addr().to_string()]);
    assert_eq!(g["overrides"], json!([]));
}

/// A route's group is addressed `/routes/{listener}/{route}/groups/...`;
/// a backend that joins a group with `slow_start` ramps up.
#[tokio::test]
async fn a_routes_group_takes_backends_and_newcomers_ramp_up() {
    let (a, b) = (greeting_echo("a").await, greeting_echo("b").await);
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[group]]\nname = \"web\"\nbackends = [\"{}\"]\nslow_start = {{ window = \"60s\", min_percent = 10 }}\n\n\
         [[listener]]\nname = \"edge\"\nlisten = [\"127.0.0.1:0\"]\n\
         [[listener.route]]\nname = \"www\"\nsni = [\"www.example.com\"]\nprimary = \"web\"\n",
        a.addr()
    );
    let p = run(&text).await;
    let body = json!({"addr": b.addr().to_string()}).to_string();
    let (st, v) = call(
        p.admin,
        "POST",
        "/routes/edge/www/groups/web/backends",
        &body,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["listener"], "edge/www");
    let status: Value = serde_json::from_str(&admin_get(p.admin, "/status").await).unwrap();
    let unit = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["route"] == "www")
        .unwrap()
        .clone();
    let backends = unit["groups"][0]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2, "{unit}");
    assert_eq!(
        backends[0]["ramp_percent"], 100.0,
        "a founding member does not ramp"
    );
    let ramp = backends[1]["ramp_percent"].as_f64().unwrap();
    assert!(
        (10.0..20.0).contains(&ramp),
        "the newcomer starts near 10%: {ramp}"
    );
    // The listener's own path does not reach a route's group.
    let (st, _) = call(p.admin, "POST", "/routes/edge/groups/web/backends", &body).await;
    assert_eq!(st, 404);
}
