//! The PROXY protocol: a listener behind load balancers takes their
//! header (v1 and v2, IPv4 and IPv6) and treats the client it names as the
//! client for its ACL and limits; a group sends a header to its backends
//! (and a LOCAL one before a probe); bad headers are closed and counted by
//! reason. Real TCP on loopback, a backend that checks the header, and,
//! where installed, HAProxy sending the header and nginx checking ours.

use crate::common::*;
use crate::prometheus::free_port;
use portshift::config::Config;
use portshift::proxy::Proxy;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What a checking backend has seen.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    local: AtomicU64,
    missing: AtomicU64,
}

/// A backend that requires a PROXY protocol header: it answers
/// `"{source}\n"` (or `"local\n"` for LOCAL/UNKNOWN), then echoes. A
/// connection without a header is answered `"no header\n"` and closed.
async fn checking_backend() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(check_one(sock, Arc::clone(&s)));
        }
    });
    (addr, seen)
}

async fn check_one(mut sock: TcpStream, seen: Arc<Seen>) {
    use ppp::PartialResult;
    seen.connections.fetch_add(1, Relaxed);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let (answer, used) = loop {
        let Ok(n) = sock.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let parsed = ppp::HeaderResult::parse(&buf);
        if parsed.is_incomplete() {
            continue;
        }
        break match parsed {
            ppp::HeaderResult::V1(Ok(h)) => (
                match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        SocketAddr::from((a.source_address, a.source_port)).to_string()
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        SocketAddr::from((a.source_address, a.source_port)).to_string()
                    }
                    ppp::v1::Addresses::Unknown => "local".to_owned(),
                },
                h.header.len(),
            ),
            ppp::HeaderResult::V2(Ok(h)) => (
                match h.addresses {
                    _ if h.command == ppp::v2::Command::Local => "local".to_owned(),
                    ppp::v2::Addresses::IPv4(a) => {
                        SocketAddr::from((a.source_address, a.source_port)).to_string()
                    }
                    ppp::v2::Addresses::IPv6(a) => {
                        SocketAddr::from((a.source_address, a.source_port)).to_string()
                    }
                    _ => "unspecified".to_owned(),
                },
                h.len(),
            ),
            _ => {
                seen.missing.fetch_add(1, Relaxed);
                let _ = sock.write_all(b"no header\n").await;
                return;
            }
        };
    };
    if answer == "local" {
        seen.local.fetch_add(1, Relaxed);
    }
    let reply = [format!("{answer}\n").as_bytes(), &buf[used..]].concat();
    if sock.write_all(&reply).await.is_err() {
        return;
    }
    let (mut r, mut w) = sock.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

/// Serves `text`; listener addresses by name, and the admin address.
async fn serve(text: &str) -> (Vec<(String, SocketAddr)>, SocketAddr) {
    let config = Config::parse(Path::new("pp.toml"), text).unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::bind(&config).unwrap();
    let addrs = proxy.local_addrs();
    let admin = proxy.admin_addr().expect("admin configured");
    tokio::spawn(proxy.serve(std::future::pending()));
    (addrs, admin)
}

fn addr_of(addrs: &[(String, SocketAddr)], name: &str) -> SocketAddr {
    addrs.iter().find(|(n, _)| n == name).unwrap().1
}

fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    )
    .build()
    .unwrap()
}

fn v1_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    ppp::v1::Addresses::from((source, destination))
        .to_string()
        .into_bytes()
}

/// Sends `header` and a line; the backend's first line and the echo.
async fn through(addr: SocketAddr, header: &[u8]) -> std::io::Result<(String, String)> {
    tokio::time::timeout(PATIENCE, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&[header, b"ping\n"].concat()).await?;
        let mut r = BufReader::new(s);
        let (mut first, mut echo) = (String::new(), String::new());
        r.read_line(&mut first).await?;
        r.read_line(&mut echo).await?;
        Ok((first.trim_end().to_owned(), echo.trim_end().to_owned()))
    })
    .await
    .map_err(|_| std::io::Error::other("timed out"))?
}

/// Reads until EOF (bounded): true when the proxy closed the connection
/// without a byte.
async fn closed_silently(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(PATIENCE, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn metric(body: &str, prefix: &str) -> u64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn groups(backend: SocketAddr) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[group]]\nname = \"v2\"\nbackends = [\"{backend}\"]\nsend_proxy_protocol = \"v2\"\n\n\
         [[group]]\nname = \"v1\"\nbackends = [\"{backend}\"]\nsend_proxy_protocol = \"v1\"\n\n"
    )
}

/// Both versions in, both versions out, IPv4 and IPv6 clients: the
/// backend sees the client the header named, and the bytes after it.
#[tokio::test]
async fn the_client_a_header_names_reaches_the_backend_in_both_versions() {
    let (backend, seen) = checking_backend().await;
    let text = format!(
        "{}[[listener]]\nname = \"to-v2\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"v2\"\n\
         proxy_protocol = \"any\"\nproxy_protocol_from = [\"127.0.0.1\"]\n\n\
         [[listener]]\nname = \"to-v1\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"v1\"\n\
         proxy_protocol = \"any\"\nproxy_protocol_from = [\"127.0.0.0/8\"]\n",
        groups(backend)
    );
    let (addrs, _) = serve(&text).await;
    let dest: SocketAddr = "10.0.0.1:443".parse().unwrap();
    let dest6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    for listener in ["to-v2", "to-v1"] {
        let at = addr_of(&addrs, listener);
        for (client, header) in [
            (
                "203.0.113.7:51000",
                v1_header("203.0.113.7:51000".parse().unwrap(), dest),
            ),
            (
                "203.0.113.8:51001",
                v2_header("203.0.113.8:51001".parse().unwrap(), dest),
            ),
            (
                "[2001:db8::7]:51002",
                v1_header("[2001:db8::7]:51002".parse().unwrap(), dest6),
            ),
            (
                "[2001:db8::8]:51003",
                v2_header("[2001:db8::8]:51003".parse().unwrap(), dest6),
            ),
        ] {
            let (first, echo) = through(at, &header).await.unwrap();
            assert_eq!(
                first, client,
                "{listener}: the backend sees the named client"
            );
            assert_eq!(echo, "ping", "{listener}: the bytes after the header pass");
        }
    }
    assert_eq!(seen.missing.load(Relaxed), 0);
}

/// Without a header of its own, a direct client is sent to the backend
/// as itself, IPv6 included.
#[tokio::test]
async fn a_direct_ipv6_client_is_named_to_the_backend() {
    let (backend, _) = checking_backend().await;
    let text = format!(
        "{}[[listener]]\nname = \"l\"\nlisten = [\"[::1]:0\"]\nprimary = \"v1\"\n",
        groups(backend)
    );
    let (addrs, _) = serve(&text).await;
    let mut s = TcpStream::connect(addrs[0].1).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"ping\n").await.unwrap();
    let mut r = BufReader::new(s);
    let mut first = String::new();
    tokio::time::timeout(PATIENCE, r.read_line(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.trim_end(), me.to_string());
}

/// The header's client is the one the ACL and the per-source limit judge.
#[tokio::test]
async fn the_named_client_is_the_one_the_acl_and_limits_judge() {
    let (backend, seen) = checking_backend().await;
    let text = format!(
        "{}[[listener]]\nname = \"acl\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"v2\"\n\
         proxy_protocol = \"v1\"\nproxy_protocol_from = [\"127.0.0.1\"]\n\
         deny = [\"203.0.113.0/24\"]\nmax_connections_per_source = 1\n",
        groups(backend)
    );
    let (addrs, admin) = serve(&text).await;
    let at = addrs[0].1;
    let dest: SocketAddr = "10.0.0.1:443".parse().unwrap();
    // Denied by the ACL although the TCP peer (127.0.0.1) is not.
    let mut s = TcpStream::connect(at).await.unwrap();
    s.write_all(&v1_header("203.0.113.5:4000".parse().unwrap(), dest))
        .await
        .unwrap();
    assert!(closed_silently(s).await, "a denied client is closed");
    // One connection per named source: a second from the same one is
    // closed while the first is open; another source is not.
    let first = TcpStream::connect(at).await.unwrap();
    let mut first = BufReader::new(first);
    first
        .get_mut()
        .write_all(&v1_header("192.0.2.1:4001".parse().unwrap(), dest))
        .await
        .unwrap();
    let mut line = String::new();
    first.read_line(&mut line).await.unwrap();
    assert_eq!(line.trim_end(), "192.0.2.1:4001");
    let mut again = TcpStream::connect(at).await.unwrap();
    again
        .write_all(&v1_header("192.0.2.1:4002".parse().unwrap(), dest))
        .await
        .unwrap();
    assert!(
        closed_silently(again).await,
        "the source's second connection is closed"
    );
    let (other, _) = through(at, &v1_header("192.0.2.2:4003".parse().unwrap(), dest))
        .await
        .unwrap();
    assert_eq!(other, "192.0.2.2:4003");
    drop(first);
    let body = admin_get(admin, "/metrics").await;
    assert_eq!(
        metric(
            &body,
            "portshift_denied_connections_total{listener=\"acl\",reason=\"acl\"}"
        ),
        1,
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "portshift_denied_connections_total{listener=\"acl\",reason=\"max_connections_per_source\"}"
        ),
        1
    );
    assert_eq!(
        seen.connections.load(Relaxed),
        2,
        "only the admitted reached the backend"
    );
}

/// Every way a header can be wrong closes the connection before any
/// backend is touched, counted by its reason.
#[tokio::test]
async fn bad_headers_are_closed_and_counted_by_reason() {
    let (backend, seen) = checking_backend().await;
    let text = format!(
        "{}[[listener]]\nname = \"bad\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"v2\"\n\
         proxy_protocol = \"v1\"\nproxy_protocol_from = [\"127.0.0.1\"]\nproxy_protocol_timeout = \"300ms\"\n\n\
         [[listener]]\nname = \"untrusted\"\nlisten = [\"[::1]:0\"]\nprimary = \"v2\"\n\
         proxy_protocol = \"any\"\nproxy_protocol_from = [\"127.0.0.1\"]\n",
        groups(backend)
    );
    let (addrs, admin) = serve(&text).await;
    let bad = addr_of(&addrs, "bad");
    let dest: SocketAddr = "10.0.0.1:443".parse().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("missing", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        (
            "malformed",
            b"PROXY TCP4 1.2.3.999 10.0.0.1 1 443\r\n".to_vec(),
        ),
        (
            "wrong_version",
            v2_header("1.2.3.4:1".parse().unwrap(), dest),
        ),
        (
            "oversized",
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat(),
        ),
    ];
    for (reason, bytes) in &cases {
        let mut s = TcpStream::connect(bad).await.unwrap();
        s.write_all(bytes).await.unwrap();
        assert!(closed_silently(s).await, "{reason}: closed");
    }
    // Half a header, then silence: closed at the header timeout.
    let mut s = TcpStream::connect(bad).await.unwrap();
    s.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
    let started = Instant::now();
    assert!(closed_silently(s).await, "timeout: closed");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );
    // Closed by the client mid-header.
    let mut s = TcpStream::connect(bad).await.unwrap();
    s.write_all(b"PROXY TCP4").await.unwrap();
    drop(s);
    // From a peer not trusted to send one: closed at accept.
    let s = TcpStream::connect(addr_of(&addrs, "untrusted"))
        .await
        .unwrap();
    assert!(closed_silently(s).await, "untrusted: closed");
    let deadline = Instant::now() + PATIENCE;
    let counted = |body: &str, listener: &str, reason: &str| {
        metric(
            body,
            &format!(
                "portshift_proxy_protocol_rejected_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
            ),
        )
    };
    loop {
        let body = admin_get(admin, "/metrics").await;
        let all = [
            "missing",
            "malformed",
            "wrong_version",
            "oversized",
            "timeout",
            "closed",
        ]
        .iter()
        .all(|r| counted(&body, "bad", r) == 1)
            && counted(&body, "untrusted", "untrusted") == 1;
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every reason counted once:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.connections.load(Relaxed), 0, "no backend was touched");
}

/// A header that arrives a byte at a time is still taken whole, and not
/// one byte after it is lost.
#[tokio::test]
async fn a_header_split_over_many_segments_is_taken_whole() {
    let (backend, _) = checking_backend().await;
    let text = format!(
        "{}[[listener]]\nname = \"split\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"v1\"\n\
         proxy_protocol = \"any\"\nproxy_protocol_from = [\"127.0.0.1\"]\n",
        groups(backend)
    );
    let (addrs, _) = serve(&text).await;
    for header in [
        v2_header(
            "[2001:db8::9]:7000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        ),
        v1_header(
            "198.51.100.9:7001".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
        ),
    ] {
        let s = TcpStream::connect(addrs[0].1).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = BufReader::new(s);
        for b in &header {
            r.get_mut().write_all(&[*b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        r.get_mut().write_all(b"ping\n").await.unwrap();
        let (mut first, mut echo) = (String::new(), String::new());
        tokio::time::timeout(PATIENCE, async {
            r.read_line(&mut first).await.unwrap();
            r.read_line(&mut echo).await.unwrap();
        })
        .await
        .unwrap();
        assert!(
            first.starts_with("[2001:db8::9]:7000") || first.starts_with("198.51.100.9:7001"),
            "{first:?}"
        );
        assert_eq!(echo.trim_end(), "ping");
    }
}

/// A probed group whose backends require the header is probed with the
/// LOCAL form, so its backends stay up.
#[tokio::test]
async fn probes_send_the_local_form() {
    let (backend, seen) = checking_backend().await;
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[group]]\nname = \"g\"\nbackends = [\"{backend}\"]\nsend_proxy_protocol = \"v2\"\n\
         probe = {{ interval = \"200ms\", timeout = \"200ms\", expect = \"local\" }}\n\n\
         [[group]]\nname = \"g1\"\nbackends = [\"{backend}\"]\nsend_proxy_protocol = \"v1\"\n\
         probe = {{ interval = \"200ms\", timeout = \"200ms\", expect = \"local\" }}\n\n\
         [[listener]]\nname = \"probed\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"g\"\nbackups = [\"g1\"]\n"
    );
    let (_, admin) = serve(&text).await;
    let deadline = Instant::now() + PATIENCE;
    while seen.local.load(Relaxed) < 4 {
        assert!(Instant::now() < deadline, "probes send LOCAL headers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = admin_get(admin, "/metrics").await;
    assert_eq!(seen.missing.load(Relaxed), 0);
    for g in ["g", "g1"] {
        assert_eq!(
            metric(
                &body,
                &format!(
                    "portshift_probe_up{{listener=\"probed\",group=\"{g}\",backend=\"{backend}\"}}"
                )
            ),
            1,
            "{g}: up\n{body}"
        );
    }
}

/// Waits (bounded) until something accepts on `port`.
fn wait_listening(port: u16) {
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The reference implementations on both sides: HAProxy sends portshift
/// a v2 header (`send-proxy-v2`), portshift sends nginx a v1 header
/// (`listen ... proxy_protocol`), and nginx answers with the client it was
/// told: the real client's port, through two proxies.
#[test]
fn haproxy_sends_and_nginx_reads_what_portshift_carries() {
    if !have_tool("haproxy", "haproxy") || !have_tool("nginx", "nginx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (hap_port, ps_port, ngx_port) = (free_port(), free_port(), free_port());
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    let load = if module.exists() {
        format!("load_module {};\n", module.display())
    } else {
        String::new()
    };
    let ngx_conf = dir.path().join("nginx.conf");
    std::fs::write(
        &ngx_conf,
        format!(
            "{load}daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             stream {{ server {{ listen 127.0.0.1:{ngx_port} proxy_protocol; return \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }} }}\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let hap_conf = dir.path().join("haproxy.cfg");
    std::fs::write(
        &hap_conf,
        format!(
            "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind 127.0.0.1:{hap_port}\n  default_backend b\n\
             backend b\n  server portshift 127.0.0.1:{ps_port} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let ps_conf = write_config(
        dir.path(),
        &format!(
            "[[group]]\nname = \"nginx\"\nbackends = [\"127.0.0.1:{ngx_port}\"]\nsend_proxy_protocol = \"v1\"\n\n\
             [[listener]]\nname = \"edge\"\nlisten = [\"127.0.0.1:{ps_port}\"]\nprimary = \"nginx\"\n\
             proxy_protocol = \"v2\"\nproxy_protocol_from = [\"127.0.0.1\"]\n"
        ),
    );
    let _nginx = Reaped(
        Command::new("nginx")
            .args(["-p", &dir.path().display().to_string(), "-e"])
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&ngx_conf)
            .spawn()
            .unwrap(),
    );
    let _haproxy = Reaped(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&hap_conf)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (child, lines) = spawn_logging(Command::new(bin()).args(["run", "-c"]).arg(&ps_conf));
    let _portshift = Reaped(child);
    std::thread::spawn(move || lines.for_each(drop));
    for port in [ngx_port, hap_port, ps_port] {
        wait_listening(port);
    }
    for _ in 0..3 {
        let s = std::net::TcpStream::connect(("127.0.0.1", hap_port)).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let me = s.local_addr().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line).unwrap();
        assert_eq!(
            line.trim_end(),
            me.to_string(),
            "nginx was told the real client"
        );
    }
}
