//! Reading the server name off a real client's ClientHello without
//! terminating TLS: `openssl s_client` connects to a plain TCP socket on
//! loopback, and the reader must return the name it asked for and every
//! byte it took; the same bytes split into one-byte segments, cut short,
//! or replaced by something that is not TLS are refused by reason, never
//! hung on.

use portshift::proxy::sni::{self, ClientHello, Progress, Refused};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(10);

/// An `openssl s_client` that connects to `port` (asking for `name`, or
/// for no name) and waits for an answer that never comes.
fn s_client(port: u16, name: Option<&str>) -> Child {
    let mut c = Command::new("openssl");
    c.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    match name {
        Some(n) => c.args(["-servername", n]),
        None => c.arg("-noservername"),
    };
    c.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed (Debian's openssl package)")
}

/// The ClientHello a real client sends for `name`, as the reader took it.
pub(crate) async fn real_hello(name: Option<&str>) -> ClientHello {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = s_client(listener.local_addr().unwrap().port(), name);
    let (mut sock, _) = tokio::time::timeout(TIMEOUT, listener.accept())
        .await
        .expect("openssl connected")
        .unwrap();
    let hello = sni::read_client_hello(&mut sock, TIMEOUT).await;
    let _ = client.kill();
    let _ = client.wait();
    hello.expect("a real ClientHello is read")
}

/// Sends `bytes` to a fresh connection in segments of `segment` bytes
/// (each its own write, nodelay), then reads it back with the reader;
/// `close` ends the sending side after the bytes.
async fn through_socket(
    bytes: Vec<u8>,
    segment: usize,
    close: bool,
) -> Result<ClientHello, Refused> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sender = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        for chunk in bytes.chunks(segment) {
            s.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if close {
            drop(s);
        } else {
            // Hold the connection open past the reader's timeout.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    });
    let (mut sock, _) = listener.accept().await.unwrap();
    let got = sni::read_client_hello(&mut sock, Duration::from_secs(2)).await;
    sender.abort();
    got
}

#[tokio::test]
async fn a_real_client_hello_gives_its_server_name_and_every_byte_taken() {
    let hello = real_hello(Some("Pay.Example.com")).await;
    assert_eq!(hello.server_name.as_deref(), Some("Pay.Example.com"));
    assert!(hello.bytes.len() > 100, "{} bytes", hello.bytes.len());
    assert_eq!(
        sni::parse(&hello.bytes),
        Ok(Progress::Complete(Some("Pay.Example.com".into())))
    );
    // Every prefix is incomplete, never an error: a ClientHello split
    // anywhere by TCP is waited for, not refused.
    for n in 0..hello.bytes.len() {
        assert_eq!(
            sni::parse(&hello.bytes[..n]),
            Ok(Progress::Incomplete),
            "prefix {n}"
        );
    }
    let none = real_hello(None).await;
    assert_eq!(none.server_name, None);
}

#[tokio::test]
async fn one_byte_segments_truncation_and_garbage_are_told_apart() {
    let hello = real_hello(Some("risk.example.com")).await;
    let split = through_socket(hello.bytes.clone(), 1, true).await.unwrap();
    assert_eq!(split, hello, "read whole from one-byte segments");

    let half = hello.bytes[..hello.bytes.len() / 2].to_vec();
    assert_eq!(
        through_socket(half.clone(), 64, true).await,
        Err(Refused::Closed)
    );
    assert_eq!(through_socket(half, 64, false).await, Err(Refused::Timeout));

    let http = b"GET / HTTP/1.1\r\nHost: pay.example.com\r\n\r\n".to_vec();
    assert_eq!(through_socket(http, 64, true).await, Err(Refused::NotTls));

    // A handshake record that is not a ClientHello (a ServerHello, type 2).
    let mut server_hello = hello.bytes.clone();
    server_hello[5] = 2;
    assert_eq!(
        through_socket(server_hello, 512, true).await,
        Err(Refused::Malformed)
    );

    // A ClientHello that says it is 60 KiB long is refused at its header,
    // before 60 KiB are read.
    let oversized = vec![0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0xf0, 0x00];
    assert_eq!(
        through_socket(oversized, 64, false).await,
        Err(Refused::Oversized)
    );
}
