//! TLS at both ends, with certificates made in the test (rcgen): a
//! listener that terminates TLS for real clients (`openssl s_client`, and
//! rustls) and routes by the server name they ask for; a group that speaks
//! TLS to a TLS-only backend (`openssl s_server`), refusing backends whose
//! certificate is expired or from another CA; handshakes that fail counted
//! by reason; a reload that renews the certificate, or fails and keeps it.

use crate::certs::{Ca, Leaf};
use crate::common::*;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TLS exchange with `addr` asking for `name`: sends `msg`, reads until
/// `want` bytes came back; the reply and the certificate the server sent.
async fn tls_exchange(
    client: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
    msg: &[u8],
    want: usize,
) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    tokio::time::timeout(PATIENCE, async {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut s = connector.connect(name, tcp).await?;
        let cert = s.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        s.write_all(msg).await?;
        s.flush().await?;
        let mut reply = vec![0u8; want];
        s.read_exact(&mut reply).await?;
        Ok((reply, cert))
    })
    .await
    .map_err(|_| std::io::Error::other("timed out"))?
}

/// `openssl s_client` through `addr` asking for `name`, trusting `ca`,
/// sending a line; what it printed.
fn s_client(addr: SocketAddr, name: &str, ca: &Path) -> String {
    let script = format!(
        "(printf 'from s_client\\n'; sleep 1) | timeout 10 openssl s_client -connect {addr} -servername {name} -CAfile {} -verify_return_error -quiet",
        ca.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_listener_terminates_tls_for_real_clients_and_routes_by_their_server_name() {
    if !have_tool("openssl", "openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.leaf(dir.path(), "edge", &["edge.test", "pay.test"], false);
    let (gateway, payments) = (
        greeting_echo("gateway").await,
        greeting_echo("payments").await,
    );
    let text = format!(
        "[[group]]\nname = \"gateway\"\nbackends = [\"{}\"]\n\n[[group]]\nname = \"payments\"\nbackends = [\"{}\"]\n\n\
         [[listener]]\nname = \"tls-edge\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"gateway\"\n\
         tls = {{ cert = \"{}\", key = \"{}\", handshake_timeout = \"500ms\" }}\n\n\
         [[listener.route]]\nname = \"payments\"\nsni = [\"pay.test\"]\nprimary = \"payments\"\n",
        gateway.addr(),
        payments.addr(),
        leaf.cert.display(),
        leaf.key.display()
    );
    let proxy = start_proxy(&text).await;
    let addr = proxy.addr();

    // rustls: the plaintext reaches the backend the server name picks.
    for (name, who) in [("edge.test", "gateway"), ("pay.test", "payments")] {
        let want = format!("{who}\nping\n");
        let (reply, _) = tls_exchange(ca.client(), addr, name, b"ping\n", want.len())
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&reply), want, "{name}");
    }
    // OpenSSL's client, verifying the chain against the CA.
    let ca_path = ca.path.clone();
    let printed = tokio::task::spawn_blocking(move || s_client(addr, "pay.test", &ca_path))
        .await
        .unwrap();
    assert!(
        printed.contains("payments\nfrom s_client\n"),
        "s_client printed {printed:?}"
    );

    // Handshakes that do not complete: counted by reason, no backend
    // touched.
    let other = Ca::new(dir.path(), "other");
    let refused = tls_exchange(other.client(), addr, "edge.test", b"x", 1).await;
    assert!(
        refused.is_err(),
        "a client that does not trust the certificate refuses it"
    );
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, plain.read_to_end(&mut out)).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let r = tokio::time::timeout(PATIENCE, silent.read_to_end(&mut out)).await;
    assert!(
        r.is_ok(),
        "a client that says nothing is closed after handshake_timeout"
    );
    let m = portshift::telemetry::render();
    for (reason, n) in [("handshake_failed", 2.0), ("timeout", 1.0)] {
        let series =
            format!("portshift_tls_rejected_total{{listener=\"tls-edge\",reason=\"{reason}\"}}");
        assert_eq!(metric_value(&m, &series), n, "{series}");
    }
    assert_eq!(
        gateway.replies() + payments.replies(),
        3,
        "only the good clients reached a backend"
    );
    proxy.shutdown().await;
}

/// `openssl s_server -rev` on a free port with `leaf`: a TLS-only backend
/// that answers each line reversed.
fn s_server(leaf: &Leaf) -> (Reaped, SocketAddr) {
    let port = crate::prometheus::free_port();
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-rev",
            "-quiet",
            "-cert",
        ])
        .arg(&leaf.cert)
        .arg("-key")
        .arg(&leaf.key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(started.elapsed() < PATIENCE, "s_server listens");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Reaped(child), addr)
}

/// Sends a line in plaintext and reads what comes back until EOF or a
/// newline.
async fn plain_line(addr: SocketAddr, line: &str) -> String {
    tokio::time::timeout(PATIENCE, async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(line.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while s.read_exact(&mut byte).await.is_ok() {
            out.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("answered or closed in time")
}

#[tokio::test]
async fn a_group_speaks_tls_to_its_backends_and_refuses_ones_it_cannot_trust() {
    if !have_tool("openssl", "openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let good = ca.leaf(dir.path(), "backend", &["backend.test"], false);
    let expired = ca.leaf(dir.path(), "expired", &["backend.test"], true);
    let stranger =
        Ca::new(dir.path(), "stranger").leaf(dir.path(), "stranger", &["backend.test"], false);
    let (_a, good_addr) = s_server(&good);
    let (_b, expired_addr) = s_server(&expired);
    let (_c, stranger_addr) = s_server(&stranger);
    let group = |name: &str, addr: SocketAddr| {
        format!(
            "[[group]]\nname = \"{name}\"\nbackends = [\"{addr}\"]\ntls = {{ ca = \"{}\", server_name = \"backend.test\" }}\n\
             [group.probe]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\n",
            ca.path.display()
        )
    };
    let listener = |name: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:0\"]\nprimary = \"{name}\"\nconnect_attempts = 1\n\n"
        )
    };
    let text = [
        group("tls-good", good_addr),
        group("tls-expired", expired_addr),
        group("tls-stranger", stranger_addr),
        listener("tls-good"),
        listener("tls-expired"),
        listener("tls-stranger"),
    ]
    .concat();
    let proxy = start_proxy(&text).await;
    let addr = |n: &str| proxy.addrs.iter().find(|(l, _)| l == n).unwrap().1;

    assert_eq!(plain_line(addr("tls-good"), "hello\n").await, "olleh\n");
    assert_eq!(
        plain_line(addr("tls-expired"), "hello\n").await,
        "",
        "an expired backend certificate is refused"
    );
    assert_eq!(
        plain_line(addr("tls-stranger"), "hello\n").await,
        "",
        "a certificate from another CA is refused"
    );

    // The handshake's time is in `connect`; failures count against the
    // backend, and its probe (which does the handshake too) marks it down.
    let good_state = proxy.state("tls-good");
    let connect = good_state.backend_snapshot(0, 0, portshift::core::stats::Signal::Connect);
    assert_eq!((connect.count, connect.errors), (1, 0), "{connect:?}");
    let bad = proxy.state("tls-expired");
    wait_until("the expired backend's probe fails", PATIENCE, || {
        !bad.router.table().groups[0].is_up(0)
    })
    .await;
    assert!(
        good_state.router.table().groups[0].is_up(0),
        "the good backend passes its TLS probe"
    );
    let m = portshift::telemetry::render();
    for l in ["tls-expired", "tls-stranger"] {
        let series = format!(
            "portshift_errors_total{{listener=\"{l}\",group=\"{l}\",backend=\"{}\",kind=\"tls_handshake\"}}",
            addr_of_group(&text, l)
        );
        assert_eq!(metric_value(&m, &series), 1.0, "{series}");
    }
    proxy.shutdown().await;
}

/// The backend address written for group `g` in `text`.
fn addr_of_group(text: &str, g: &str) -> String {
    let at = text
        .find(&format!("name = \"{g}\"\nbackends = [\""))
        .unwrap();
    let rest = &text[at..];
    let start = rest.find("[\"").unwrap() + 2;
    rest[start..start + rest[start..].find('"').unwrap()].to_owned()
}

#[tokio::test]
async fn a_reload_renews_the_certificate_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let first = ca.leaf(dir.path(), "edge", &["edge.test"], false);
    let echo = greeting_echo("echo").await;
    // A fixed port: a changed listener keeps it (port 0 would be fresh).
    let port = crate::prometheus::free_port();
    let text = format!(
        "[[group]]\nname = \"g\"\nbackends = [\"{}\"]\n\n[[listener]]\nname = \"l\"\nlisten = [\"127.0.0.1:{port}\"]\nprimary = \"g\"\n\
         tls = {{ cert = \"edge.pem\", key = \"edge.key\" }}\n",
        echo.addr()
    );
    let (addr, _, handle) = serve_config_in(dir.path(), &text, None).await;
    let want = "echo\nhi\n".len();
    let (_, cert1) = tls_exchange(ca.client(), addr, "edge.test", b"hi\n", want)
        .await
        .unwrap();
    // An established TLS connection, kept across both reloads.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut held = tokio_rustls::TlsConnector::from(ca.client())
        .connect(ServerName::try_from("edge.test").unwrap(), tcp)
        .await
        .unwrap();

    std::fs::write(&first.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    let err = handle.reload().await.unwrap_err().to_string();
    assert!(err.contains("edge.pem"), "the error names the file: {err}");
    let (_, still) = tls_exchange(ca.client(), addr, "edge.test", b"hi\n", want)
        .await
        .unwrap();
    assert_eq!(still, cert1, "a failed reload keeps the old certificate");

    // Renewed: a new key and certificate at the same paths.
    ca.leaf(dir.path(), "edge", &["edge.test"], false);
    let report = handle.reload().await.unwrap();
    assert_eq!(report.changed, ["l"], "a renewed certificate is a change");
    let (_, cert2) = tls_exchange(ca.client(), addr, "edge.test", b"hi\n", want)
        .await
        .unwrap();
    assert_ne!(cert2, cert1, "new connections get the renewed certificate");

    held.write_all(b"still here\n").await.unwrap();
    let mut back = vec![0u8; "echo\nstill here\n".len()];
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(
        back, b"echo\nstill here\n",
        "the established connection lives on"
    );
}
