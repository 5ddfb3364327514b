//! A small TCP backend with a controllable reply delay, for the demo, the
//! tests, and operators rehearsing in staging what a policy would do.
//!
//! Modes: `echo` sends every chunk back; `http` answers each HTTP/1.1
//! request (keep-alive) with `200 OK` and a body naming the backend. An
//! optional greeting is sent on connect (a server-speaks-first protocol).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest HTTP request head the backend accepts before closing.
const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Echo,
    Http,
}

#[derive(Debug, Clone)]
pub struct BackendOpts {
    pub name: String,
    pub mode: Mode,
    pub delay: Duration,
    pub greeting: Option<String>,
}

/// A running backend; dropping the handle does not stop it, `stop` does.
#[derive(Debug, Clone)]
pub struct BackendHandle {
    addr: SocketAddr,
    delay_us: Arc<AtomicU64>,
    replies: Arc<AtomicU64>,
    stop: CancellationToken,
    /// Stops accepting only; open connections carry on.
    stop_accepting: CancellationToken,
    tasks: TaskTracker,
}

impl BackendHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the reply delay for every connection from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(delay.as_micros() as u64, Relaxed);
    }

    /// Replies sent so far (echo chunks or HTTP responses).
    pub fn replies(&self) -> u64 {
        self.replies.load(Relaxed)
    }

    /// Closes the listening socket (new connects are refused) and waits
    /// for open connections to finish: a graceful stop.
    pub async fn stop_gracefully(&self) {
        self.stop_accepting.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Stops accepting and closes every open connection, like a crash: new
    /// connects are refused from now on.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Binds `addr` and serves in the background.
pub async fn spawn(addr: SocketAddr, opts: BackendOpts) -> io::Result<BackendHandle> {
    let listener = TcpListener::bind(addr).await?;
    let handle = BackendHandle {
        addr: listener.local_addr()?,
        delay_us: Arc::new(AtomicU64::new(opts.delay.as_micros() as u64)),
        replies: Arc::new(AtomicU64::new(0)),
        stop: CancellationToken::new(),
        stop_accepting: CancellationToken::new(),
        tasks: TaskTracker::new(),
    };
    let h = handle.clone();
    handle.tasks.spawn(async move {
        let opts = Arc::new(opts);
        loop {
            let (sock, _) = tokio::select! {
                () = h.stop.cancelled() => return,
                () = h.stop_accepting.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(20)).await; continue; }
                },
            };
            let (h2, opts) = (h.clone(), Arc::clone(&opts));
            h.tasks.spawn(async move {
                tokio::select! {
                    () = h2.stop.cancelled() => {}
                    _ = serve_conn(sock, &opts, &h2) => {}
                }
            });
        }
    });
    Ok(handle)
}

async fn serve_conn(mut sock: TcpStream, opts: &BackendOpts, h: &BackendHandle) -> io::Result<()> {
    let _ = sock.set_nodelay(true);
    if let Some(g) = &opts.greeting {
        sock.write_all(g.as_bytes()).await?;
    }
    match opts.mode {
        Mode::Echo => echo(sock, h).await,
        Mode::Http => http(sock, &opts.name, h).await,
    }
}

async fn delay(h: &BackendHandle) {
    let us = h.delay_us.load(Relaxed);
    if us > 0 {
        tokio::time::sleep(Duration::from_micros(us)).await;
    }
}

async fn echo(mut sock: TcpStream, h: &BackendHandle) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return sock.shutdown().await;
        }
        delay(h).await;
        sock.write_all(&buf[..n]).await?;
        h.replies.fetch_add(1, Relaxed);
    }
}

async fn http(mut sock: TcpStream, name: &str, h: &BackendHandle) -> io::Result<()> {
    let body = format!("{name}\n");
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Serve every complete request already buffered (pipelining).
        while let Some(end) = find_head_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_len = header_value(&head, "content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() < end + body_len {
                break;
            }
            buf.drain(..end + body_len);
            let close = header_value(&head, "connection").is_some_and(|v| v == "close");
            delay(h).await;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n{}\r\n{body}",
                body.len(),
                if close { "connection: close\r\n" } else { "" }
            );
            sock.write_all(reply.as_bytes()).await?;
            h.replies.fetch_add(1, Relaxed);
            if close {
                return sock.shutdown().await;
            }
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Ok(());
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return sock.shutdown().await;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn header_value<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim())
}

/// One HTTP/1.1 GET on a new connection (`connection: close`); returns the
/// response body. The demo's and the tests' client.
pub async fn http_get(addr: SocketAddr) -> io::Result<String> {
    let mut sock = TcpStream::connect(addr).await?;
    sock.write_all(b"GET / HTTP/1.1\r\nhost: portshift\r\nconnection: close\r\n\r\n")
        .await?;
    let mut reply = Vec::new();
    sock.read_to_end(&mut reply).await?;
    let text = String::from_utf8_lossy(&reply);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a 200 reply: {text:?}"),
        )),
    }
}
