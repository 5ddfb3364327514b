//! The admin API and hot reload against a running proxy over loopback:
//! pins, pause/resume, status, errors, tokens, and reloads good and bad.

use crate::common::*;
use portshift::config::Config;
use portshift::proxy::{Proxy, ProxyHandle};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One admin call; returns status and parsed JSON body (or the raw text as
/// a JSON string).
async fn call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let (status, body) = admin_request(admin, method, path, body, token)
        .await
        .unwrap();
    let parsed = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, parsed)
}

struct Running {
    dir: tempfile::TempDir,
    path: PathBuf,
    admin: SocketAddr,
    addrs: Vec<(String, SocketAddr)>,
    handle: ProxyHandle,
}

impl Running {
    fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
            .expect("listener bound")
    }
}

async fn run(text: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/failover.toml");
    std::fs::copy(shipped, dir.path().join("policies/failover.toml")).unwrap();
    let path = write_config(dir.path(), text);
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::bind(&config).unwrap();
    let admin = proxy.admin_addr().expect("admin configured");
    let addrs = proxy.local_addrs();
    let handle = proxy.handle();
    tokio::spawn(proxy.serve(std::future::pending()));
    Running {
        dir,
        path,
        admin,
        addrs,
        handle,
    }
}

fn config(listener: &str, primary: SocketAddr, backup: SocketAddr, extra: &str) -> String {
    format!(
        "audit_log = \"audit.jsonl\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        two_group_config(&[primary], &[backup], extra)
            .replace("name = \"l\"", &format!("name = \"{listener}\""))
    )
}

/// A pin moves the next connections where it says and suspends the policy;
/// releasing it resumes the policy.
#[tokio::test]
async fn pin_steers_traffic_and_release_resumes_policy() {
    let (p, b) = named_pair().await;
    let r = run(&config("pin", p, b, "policy = \"failover\"")).await;
    let (status, body) = call(
        r.admin,
        "PUT",
        "/routes/pin/weights",
        r#"{"primary": 0, "backup": 100}"#,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pinned"]["backup"], 100.0);
    for _ in 0..10 {
        assert_eq!(
            read_all(r.addr("pin")).await.unwrap(),
            b"backup",
            "traffic follows the pin"
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // a policy tick passes
    let (_, status) = call(r.admin, "GET", "/status", "", None).await;
    let l = &status["listeners"][0];
    assert_eq!(l["pinned"]["backup"], 100.0);
    assert_eq!(l["policy"]["state"], "pinned", "{l}");
    assert_eq!(l["weights_percent"]["backup"], 100.0);

    let (status, body) = call(r.admin, "DELETE", "/routes/pin/weights", "", None).await;
    assert_eq!((status, &body["released"]), (200, &Value::Bool(true)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, status) = call(r.admin, "GET", "/status", "", None).await;
    assert_ne!(
        status["listeners"][0]["policy"]["state"], "pinned",
        "the policy resumed"
    );
    assert!(status["listeners"][0]["pinned"].is_null());

    let audit = std::fs::read_to_string(r.dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"call\":\"PUT /routes/pin/weights\""),
        "{audit}"
    );
    assert!(
        audit.contains("\"call\":\"DELETE /routes/pin/weights\""),
        "{audit}"
    );
}

/// Without a policy, releasing a pin returns all traffic to the primary.
#[tokio::test]
async fn release_without_policy_returns_to_primary() {
    let (p, b) = named_pair().await;
    let r = run(&config("nopolicy", p, b, "")).await;
    assert_eq!(
        call(
            r.admin,
            "PUT",
            "/routes/nopolicy/weights",
            r#"{"backup": 100}"#,
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(read_all(r.addr("nopolicy")).await.unwrap(), b"backup");
    assert_eq!(
        call(r.admin, "DELETE", "/routes/nopolicy/weights", "", None)
            .await
            .0,
        200
    );
    assert_eq!(read_all(r.addr("nopolicy")).await.unwrap(), b"primary");
    let (status, body) = call(r.admin, "POST", "/routes/nopolicy/policy/pause", "", None).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no policy"));
}

/// Pause and resume the policy; the state says so.
#[tokio::test]
async fn pause_and_resume_policy() {
    let (p, b) = named_pair().await;
    let r = run(&config("pause", p, b, "policy = \"failover\"")).await;
    assert_eq!(
        call(r.admin, "POST", "/routes/pause/policy/pause", "", None)
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, s) = call(r.admin, "GET", "/status", "", None).await;
    assert_eq!(s["listeners"][0]["policy"]["paused"], true);
    assert_eq!(s["listeners"][0]["policy"]["state"], "paused");
    assert_eq!(
        call(r.admin, "POST", "/routes/pause/policy/resume", "", None)
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, s) = call(r.admin, "GET", "/status", "", None).await;
    assert_eq!(s["listeners"][0]["policy"]["state"], "healthy");
}

/// Bad requests get a 4xx with a JSON error saying what was wrong.
#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let (p, b) = named_pair().await;
    let r = run(&config("errs", p, b, "")).await;
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        (
            "PUT",
            "/routes/nope/weights",
            r#"{"primary": 100}"#,
            404,
            "no listener `nope`; known: errs",
        ),
        (
            "PUT",
            "/routes/errs/weights",
            "not json",
            400,
            "body is not JSON",
        ),
        (
            "PUT",
            "/routes/errs/weights",
            r#"{"primary": 60}"#,
            400,
            "add up to 60",
        ),
        (
            "PUT",
            "/routes/errs/weights",
            r#"{"tax": 100}"#,
            400,
            "`tax` is not a group of this listener",
        ),
        (
            "PUT",
            "/routes/errs/weights",
            r#"{"primary": 100, "backup": 0, "primary": 0}"#,
            400,
            "`primary` appears more than once",
        ),
        ("GET", "/nowhere", "", 404, "no such endpoint: GET /nowhere"),
    ];
    for (method, path, body, want_status, want) in cases {
        let (status, reply) = call(r.admin, method, path, body, None).await;
        assert_eq!(status, *want_status, "{method} {path}: {reply}");
        assert!(
            reply["error"].as_str().unwrap_or_default().contains(want),
            "{method} {path}: {reply}"
        );
    }
    let huge = format!("{{\"primary\": 100, \"pad\": \"{}\"}}", "x".repeat(100_000));
    let (status, reply) = call(r.admin, "PUT", "/routes/errs/weights", &huge, None).await;
    assert_eq!(status, 413, "oversized bodies are refused");
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 16384 bytes")),
        "the refusal is JSON like every other: {reply}"
    );
    assert_eq!(
        read_all(r.addr("errs")).await.unwrap(),
        b"primary",
        "nothing changed"
    );
}

/// A proxy whose admin plane on `listen` needs the bearer token `token`
/// (from a `token` file beside the config).
struct WithToken {
    dir: tempfile::TempDir,
    path: PathBuf,
    /// The config as written, to edit for reloads.
    text: String,
    /// Where to call the admin plane (on loopback, whatever `listen` was).
    admin: SocketAddr,
}

async fn run_with_token(listener: &str, listen: &str, token: &str) -> WithToken {
    let (p, b) = named_pair().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
    let text = config(listener, p, b, "").replace(
        "listen = \"127.0.0.1:0\"\n[[group]]",
        &format!("listen = \"{listen}\"\ntoken_file = \"token\"\n[[group]]"),
    );
    let path = write_config(dir.path(), &text);
    let proxy = Proxy::bind(&Config::load(&path).unwrap()).unwrap();
    let port = proxy.admin_addr().unwrap().port();
    tokio::spawn(proxy.serve(std::future::pending()));
    WithToken {
        dir,
        path,
        text,
        admin: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

/// With a token, every call needs it.
#[tokio::test]
async fn token_guards_every_call() {
    let WithToken { dir, admin, .. } = run_with_token("tok", "127.0.0.1:0", "s3cret").await;
    assert_eq!(call(admin, "GET", "/status", "", None).await.0, 401);
    assert_eq!(
        call(admin, "GET", "/metrics", "", Some("wrong")).await.0,
        401
    );
    assert_eq!(
        call(admin, "GET", "/status", "", Some("s3cret")).await.0,
        200
    );
    assert_eq!(call(admin, "POST", "/reload", "", None).await.0, 401);
    // The scheme is case-insensitive (RFC 7235).
    assert_eq!(
        raw_status(admin, "authorization: bearer s3cret\r\n").await,
        200
    );
    assert_eq!(
        raw_status(admin, "authorization: BEARER s3cret\r\n").await,
        200
    );
    // Every refusal is counted; the log and the audit trail get one line a
    // second at most.
    let (_, m) = call(admin, "GET", "/metrics", "", Some("s3cret")).await;
    let m = m.as_str().unwrap().to_owned();
    // The recorder is per process, shared with the other tests here: at
    // least this test's three.
    let rejected: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("portshift_admin_rejected_total{reason=\"unauthorized\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(rejected >= 3.0, "{m}");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"result\":\"unauthorized\""),
        "the first refusal is audited: {audit}"
    );
}

/// A GET /status with `headers` (each ending in CRLF); returns the status.
async fn raw_status(admin: SocketAddr, headers: &str) -> u16 {
    let req = format!("GET /status HTTP/1.1\r\nhost: admin\r\n{headers}connection: close\r\n\r\n");
    http_exchange(admin, &req).await.unwrap().0
}

/// Rotating the token: a reload takes the new one at once and refuses the
/// old; a reload with an unusable token changes nothing and says why.
#[tokio::test]
async fn reload_rotates_the_token() {
    let r = run_with_token("rot", "127.0.0.1:0", "old-token").await;
    let (dir, path, text, admin) = (&r.dir, &r.path, &r.text, r.admin);
    let token = dir.path().join("token");
    assert_eq!(
        call(admin, "GET", "/status", "", Some("old-token")).await.0,
        200
    );

    std::fs::write(&token, "new-token\n").unwrap();
    let (status, body) = call(admin, "POST", "/reload", "", Some("old-token")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["restart_required"], serde_json::json!([]));
    assert_eq!(
        call(admin, "GET", "/status", "", Some("old-token")).await.0,
        401
    );
    assert_eq!(
        call(admin, "GET", "/status", "", Some("new-token")).await.0,
        200
    );

    // An empty token file is refused: the running token stays.
    std::fs::write(&token, "\n").unwrap();
    let (status, body) = call(admin, "POST", "/reload", "", Some("new-token")).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("is empty"),
        "{body}"
    );
    assert_eq!(
        call(admin, "GET", "/status", "", Some("new-token")).await.0,
        200
    );

    // A new file takes over too; a changed admin address is reported as
    // needing a restart, not silently ignored.
    std::fs::write(dir.path().join("other"), "third-token").unwrap();
    let moved = text
        .replace("token_file = \"token\"", "token_file = \"other\"")
        .replace(
            "listen = \"127.0.0.1:0\"\ntoken",
            "listen = \"127.0.0.1:1\"\ntoken",
        );
    std::fs::write(path, moved).unwrap();
    let (status, body) = call(admin, "POST", "/reload", "", Some("new-token")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["changes"]["restart_required"],
        serde_json::json!(["admin.listen"])
    );
    let (_, st) = call(admin, "GET", "/status", "", Some("third-token")).await;
    assert_eq!(
        st["last_reload"]["changes"]["restart_required"],
        serde_json::json!(["admin.listen"])
    );
}

/// After logrotate moves the audit log away, a reload (same path) opens a
/// new file, and records go there, not to the rotated one.
#[tokio::test]
async fn reload_reopens_the_audit_log() {
    let (p, b) = named_pair().await;
    let r = run(&config("rotate", p, b, "")).await;
    let log = r.dir.path().join("audit.jsonl");
    let rotated = r.dir.path().join("audit.jsonl.1");
    let pin = r#"{"primary": 50, "backup": 50}"#;
    assert_eq!(
        call(r.admin, "PUT", "/routes/rotate/weights", pin, None)
            .await
            .0,
        200
    );
    std::fs::rename(&log, &rotated).unwrap();
    assert_eq!(call(r.admin, "POST", "/reload", "", None).await.0, 200);
    assert_eq!(
        call(r.admin, "DELETE", "/routes/rotate/weights", "", None)
            .await
            .0,
        200
    );
    let new = std::fs::read_to_string(&log).expect("a new audit log was opened");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(new.contains("DELETE /routes/rotate/weights"), "{new}");
    assert!(
        !old.contains("DELETE"),
        "nothing goes to the rotated file: {old}"
    );
    assert!(old.contains("PUT /routes/rotate/weights"));
}

/// A client that trickles its headers is closed after `header_timeout`; one
/// that stalls in its body after `idle_timeout`. Neither holds a
/// descriptor for long.
#[tokio::test]
async fn slow_admin_clients_are_closed() {
    let (p, b) = named_pair().await;
    let text = config("slow", p, b, "").replace(
        "listen = \"127.0.0.1:0\"\n[[group]]",
        "listen = \"127.0.0.1:0\"\nheader_timeout = \"1s\"\nidle_timeout = \"1s\"\n[[group]]",
    );
    let r = run(&text).await;
    let started = std::time::Instant::now();
    let mut slowloris = TcpStream::connect(r.admin).await.unwrap();
    slowloris
        .write_all(b"GET /status HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut closed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if slowloris.write_all(b"x").await.is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 256];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), slowloris.read(&mut b)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickled header is cut off");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "within about header_timeout ({took:?})"
    );

    let mut stalled = TcpStream::connect(r.admin).await.unwrap();
    stalled
        .write_all(b"PUT /routes/slow/weights HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n{\"primary\"")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stalled.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "a stalled body is closed, not held");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "after about idle_timeout ({took:?})"
    );
}

/// A broken file on reload: the old config keeps serving, the error is
/// reported by the API, in /status and in metrics.
#[tokio::test]
async fn bad_reload_keeps_old_config_and_says_why() {
    let (p, b) = named_pair().await;
    let r = run(&config("keep", p, b, "")).await;
    std::fs::write(
        &r.path,
        "[[listener]]\nname = \"keep\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"gone\"\n",
    )
    .unwrap();
    let (status, body) = call(r.admin, "POST", "/reload", "", None).await;
    assert_eq!(status, 422, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains(
            "portshift.toml:4:11: error: listener `keep`: primary group `gone` is not defined"
        ),
        "{msg}"
    );
    assert!(msg.contains("the running config is unchanged"));
    assert_eq!(
        read_all(r.addr("keep")).await.unwrap(),
        b"primary",
        "the old config still serves"
    );
    let (_, s) = call(r.admin, "GET", "/status", "", None).await;
    assert_eq!(s["last_reload"]["ok"], false);
    let (_, metrics) = call(r.admin, "GET", "/metrics", "", None).await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("portshift_config_reloads_total{result=\"error\"}")
    );
}

/// Reload adding a listener: it accepts; removing one: new connections are
/// refused while an established connection finishes.
#[tokio::test]
async fn reload_adds_and_removes_listeners_without_cutting_connections() {
    let (p, b) = named_pair().await;
    let echo = echo_backend().await;
    let r = run(&config("old", echo.addr(), b, "")).await;
    let old_addr = r.addr("old");
    let mut established = TcpStream::connect(old_addr).await.unwrap();
    established.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    tokio::time::timeout(PATIENCE, established.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();

    // Swap listener `old` for `new`.
    let text = config("new", p, b, "");
    std::fs::write(&r.path, &text).unwrap();
    let (status, body) = call(r.admin, "POST", "/reload", "", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["added"][0], "new");
    assert_eq!(body["changes"]["removed"][0], "old");
    let new_addr = r.handle.listeners()[0].1[0];
    assert_eq!(
        read_all(new_addr).await.unwrap(),
        b"primary",
        "the added listener accepts"
    );
    assert!(
        TcpStream::connect(old_addr).await.is_err(),
        "the removed listener no longer accepts"
    );
    established.write_all(b"after!").await.unwrap();
    tokio::time::timeout(PATIENCE, established.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"after!", "the established connection was not cut");
}

/// A reload that leaves a listener unchanged keeps it as it was: same
/// state, same pin, same socket.
#[tokio::test]
async fn reload_keeps_unchanged_listeners_untouched() {
    let (p, b) = named_pair().await;
    let r = run(&config("same", p, b, "")).await;
    assert_eq!(
        call(
            r.admin,
            "PUT",
            "/routes/same/weights",
            r#"{"backup": 100}"#,
            None
        )
        .await
        .0,
        200
    );
    let (status, body) = call(r.admin, "POST", "/reload", "", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"]["unchanged"][0], "same");
    assert_eq!(
        read_all(r.addr("same")).await.unwrap(),
        b"backup",
        "pin and socket survived"
    );
}

/// The admin socket bound at start keeps serving until a restart, so a
/// reload may not take its token away while it listens beyond loopback:
/// not by moving `listen` to loopback in the file, not by removing
/// `[admin]`. Both are refused and the token keeps guarding every call.
#[tokio::test]
async fn reload_never_leaves_a_non_loopback_admin_without_a_token() {
    let WithToken {
        dir: _dir,
        path,
        text,
        admin,
    } = run_with_token("open", "0.0.0.0:0", "s3cret").await;
    let loopback_no_token = text
        .replace("listen = \"0.0.0.0:0\"", "listen = \"127.0.0.1:0\"")
        .replace("token_file = \"token\"\n", "");
    let no_admin = text
        .replace("[admin]\n", "")
        .replace("listen = \"0.0.0.0:0\"\ntoken_file = \"token\"\n", "");
    for file in [loopback_no_token, no_admin] {
        std::fs::write(&path, file).unwrap();
        let (status, body) = call(admin, "POST", "/reload", "", Some("s3cret")).await;
        assert_eq!(status, 422, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("keep `token_file` or `token_env`"),
            "{body}"
        );
        assert_eq!(call(admin, "GET", "/status", "", None).await.0, 401);
    }
}
