//! Backends from discovery files and DNS, over real sockets: a file an
//! orchestrator rewrites is applied when it parses and ignored (counted)
//! when it does not; names resolve against a real DNS server (Debian's
//! dnsmasq on a loopback port, started here) and are re-resolved as their
//! records change; SRV records give ports and weights; a group with no
//! backend at start stops the start, naming it.

use crate::common::*;
use portshift::config::Config;
use portshift::proxy::{Proxy, StartError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// Who greets `n` new connections to `addr`, counted.
async fn spread(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut r = tokio::io::BufReader::new(s);
        let mut line = String::new();
        let _ = tokio::time::timeout(PATIENCE, r.read_line(&mut line)).await;
        *seen.entry(line.trim().to_owned()).or_insert(0) += 1;
    }
    seen
}

/// Replaces `path` whole, as an orchestrator should (write, then rename).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn load(dir: &Path, text: &str) -> Config {
    let path = write_config(dir, text);
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until the group's backends, as the listener routes them, are
/// `want` (as strings, in any order).
async fn wait_for_backends(handle: &portshift::proxy::ProxyHandle, want: &[SocketAddr]) {
    let state = handle.listener("l").unwrap();
    let mut want: Vec<SocketAddr> = want.to_vec();
    want.sort();
    let took = wait_until("the group's backends to change", PATIENCE, || {
        let table = state.router.table();
        let mut got: Vec<SocketAddr> = table.groups[0].backends().iter().map(|b| b.addr).collect();
        got.sort();
        got == want
    })
    .await;
    eprintln!("backends became {want:?} after {took:?}");
}

#[tokio::test]
async fn a_discovery_file_is_applied_when_it_changes_and_ignored_when_bad() {
    let (a, b) = (greeting_echo("a").await, greeting_echo("b").await);
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.json");
    replace(&pool, &format!(r#"["{}"]"#, a.addr()));
    let config = load(
        dir.path(),
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[group]]\nname = \"g\"\nbackends = [{ file = \"pool.json\" }]\nresolve_every = \"30s\"\n\n\
         [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n",
    );
    let proxy = Proxy::bind(&config).unwrap();
    let addr = proxy.local_addrs()[0].1;
    let admin = proxy.admin_addr().unwrap();
    let handle = proxy.handle();
    tokio::spawn(proxy.serve(std::future::pending()));
    assert_eq!(spread(addr, 4).await["a"], 4);

    // An override made through the API stays on top of what the file says.
    let c = greeting_echo("c").await;
    let body = format!(r#"{{"addr": "{}"}}"#, c.addr());
    let (st, _) = admin_request(admin, "POST", "/routes/l/groups/g/backends", &body, None)
        .await
        .unwrap();
    assert_eq!(st, 200);

    // The orchestrator adds b (inotify: no wait for resolve_every).
    replace(
        &pool,
        &format!(
            r#"[{{"addr": "{}", "weight": 1}}, {{"addr": "{}", "weight": 2}}]"#,
            a.addr(),
            b.addr()
        ),
    );
    wait_for_backends(&handle, &[a.addr(), b.addr(), c.addr()]).await;
    let seen = spread(addr, 8).await;
    assert_eq!((seen["a"], seen["b"], seen["c"]), (2, 4, 2), "{seen:?}");

    // Malformed, empty, then gone: each ignored, counted, nothing changes.
    let errors = || {
        let series = format!(
            "portshift_discovery_errors_total{{group=\"g\",source=\"file {}\"}}",
            pool.display()
        );
        metric_value(&portshift::telemetry::render(), &series)
    };
    let mut counted = errors();
    for bad in ["[\"10.0.0.1:80\",", "[]", ""] {
        if bad.is_empty() {
            std::fs::remove_file(&pool).unwrap();
        } else {
            replace(&pool, bad);
        }
        wait_until("the bad file to be counted", PATIENCE, || {
            errors() > counted
        })
        .await;
        counted = errors();
        let seen = spread(addr, 4).await;
        assert_eq!(seen.values().sum::<usize>(), 4, "still served: {seen:?}");
    }
    let state = handle.listener("l").unwrap();
    assert_eq!(state.router.table().groups[0].backends().len(), 3);

    // Back to one: b leaves, the override stays.
    replace(&pool, &format!(r#"["{}"]"#, a.addr()));
    wait_for_backends(&handle, &[a.addr(), c.addr()]).await;
}

#[tokio::test]
async fn a_group_with_no_backend_at_start_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = load(
        dir.path(),
        "[[group]]\nname = \"payments\"\nbackends = [{ file = \"missing.json\" }]\n\n\
         [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"payments\"\n",
    );
    let err = Proxy::bind(&config).err().expect("no backend: no start");
    assert!(matches!(err, StartError::Discovery(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("group `payments` has no backend") && msg.contains("missing.json"),
        "{msg}"
    );

    // `check` says so too, and exits 2.
    let out = std::process::Command::new(bin())
        .args(["check", "-c"])
        .arg(&config.path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("group `payments` has no backend"),
        "{stderr}"
    );
}

/// dnsmasq serving the hosts files in `hosts` and `srv` records, on a free
/// loopback port, with 1 s TTLs; killed when dropped.
struct Dns {
    _child: Reaped,
    port: u16,
}

fn dnsmasq(hosts: &Path, srv: &[String]) -> Dns {
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let mut cmd = std::process::Command::new("dnsmasq");
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--user=root",
        "--bind-interfaces",
    ])
    .args([
        "--listen-address=127.0.0.1",
        "--no-resolv",
        "--no-hosts",
        "--local-ttl=1",
        "--pid-file=",
    ])
    .arg(format!("--port={port}"))
    .arg(format!("--hostsdir={}", hosts.display()))
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    for s in srv {
        cmd.arg(format!("--srv-host={s}"));
    }
    let child = Reaped(cmd.spawn().expect("dnsmasq starts"));
    // Up once it answers on its port.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let query = [0u8, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'x', 0, 0, 1, 0, 1];
    let mut buf = [0u8; 512];
    let up = (0..50).any(|_| {
        let _ = probe.send_to(&query, ("127.0.0.1", port));
        probe.recv(&mut buf).is_ok()
    });
    assert!(up, "dnsmasq answers on port {port}");
    Dns {
        _child: child,
        port,
    }
}

/// Two backends on one port, at 127.0.0.1 and 127.0.0.2.
async fn pair_on_one_port() -> (
    portshift::backend::BackendHandle,
    portshift::backend::BackendHandle,
) {
    for _ in 0..20 {
        let two = greeting_echo_at("two", "127.0.0.2:0".parse().unwrap())
            .await
            .unwrap();
        let port = two.addr().port();
        if let Ok(one) = greeting_echo_at("one", SocketAddr::from(([127, 0, 0, 1], port))).await {
            return (one, two);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

fn hosts_file(dir: &Path, lines: &[&str]) -> PathBuf {
    let path = dir.join("pool");
    replace(&path, &(lines.join("\n") + "\n"));
    path
}

#[tokio::test]
async fn names_resolve_against_a_real_dns_server_and_follow_its_changes() {
    if !have_tool("dnsmasq", "dnsmasq-base") {
        return;
    }
    let (one, two) = pair_on_one_port().await;
    let port = one.addr().port();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::create_dir(&hosts).unwrap();
    hosts_file(&hosts, &["127.0.0.1 pool.test"]);
    let srv = format!("_echo._tcp.pool.test,pool.test,{port},0,7");
    let dns = dnsmasq(&hosts, &[srv]);
    let config = load(
        dir.path(),
        &format!(
            "[dns]\nservers = [\"127.0.0.1:{}\"]\n\n\
             [[group]]\nname = \"g\"\nbackends = [\"pool.test:{port}\"]\nresolve_every = \"1s\"\n\n\
             [[group]]\nname = \"s\"\nbackends = [{{ srv = \"_echo._tcp.pool.test\" }}]\nresolve_every = \"1s\"\n\n\
             [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n\n\
             [[listener]]\nname = \"srv\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"s\"\n",
            dns.port
        ),
    );
    check_names_it_cannot_resolve(dir.path(), dns.port, port);
    let proxy = Proxy::bind(&config).unwrap();
    let addr = proxy.local_addrs()[0].1;
    let handle = proxy.handle();
    tokio::spawn(proxy.serve(std::future::pending()));
    assert_eq!(spread(addr, 4).await["one"], 4);
    // The SRV group: the record's target and port, with its weight.
    let s = handle.listener("srv").unwrap();
    let table = s.router.table();
    assert_eq!(
        table.groups[0].backends(),
        &[portshift::config::Backend {
            addr: one.addr(),
            weight: 7
        }]
    );

    // The name gains an address: both serve.
    hosts_file(&hosts, &["127.0.0.1 pool.test", "127.0.0.2 pool.test"]);
    wait_for_backends(&handle, &[one.addr(), two.addr()]).await;
    let seen = spread(addr, 6).await;
    assert_eq!((seen["one"], seen["two"]), (3, 3), "{seen:?}");

    // The server goes away: the last good answer stays.
    drop(dns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = spread(addr, 4).await;
    assert_eq!(seen.values().sum::<usize>(), 4, "{seen:?}");
    assert_eq!(
        handle.listener("l").unwrap().router.table().groups[0]
            .backends()
            .len(),
        2
    );
}

/// `check` warns about a name the server does not know, and fails for a
/// group with nothing else.
fn check_names_it_cannot_resolve(dir: &Path, dns: u16, port: u16) {
    let check = |backends: &str| {
        let text = format!(
            "[dns]\nservers = [\"127.0.0.1:{dns}\"]\n[[group]]\nname = \"g\"\nbackends = [{backends}]\n\n\
             [[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\n"
        );
        let path = dir.join("check.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(bin())
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = check(&format!("\"pool.test:{port}\", \"nope.test:{port}\""));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: could not resolve or read group `g`: nope.test"),
        "{stderr}"
    );
    let (code, stderr) = check(&format!("\"nope.test:{port}\""));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("group `g` has no backend: nope.test"),
        "{stderr}"
    );
}
