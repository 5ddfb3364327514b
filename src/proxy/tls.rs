//! TLS on either side of a connection, through rustls (tokio-rustls): a
//! listener's handshake with its client, bounded in time and refused by
//! reason, and a group's handshake with its backend.

use crate::config::{TlsOriginate, TlsTerminate};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::either::Either;

/// A client connection whose TLS portshift terminated.
pub type ClientTls = tokio_rustls::server::TlsStream<TcpStream>;
/// A backend connection over TLS.
pub type UpstreamTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Why a client's TLS handshake did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not done within `tls.handshake_timeout`.
    Timeout,
    /// The client closed or reset before it was done.
    Closed,
    /// Not TLS, a version or cipher in common with none, a bad message, or
    /// the client refused the certificate (its alert).
    Failed,
}

impl Refused {
    pub const ALL: [Refused; 3] = [Refused::Timeout, Refused::Closed, Refused::Failed];

    /// The metric's `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Refused::Timeout => "timeout",
            Refused::Closed => "closed",
            Refused::Failed => "handshake_failed",
        }
    }

    /// The access log's `outcome`.
    pub fn outcome(self) -> &'static str {
        match self {
            Refused::Timeout => "tls_timeout",
            Refused::Closed => "tls_closed",
            Refused::Failed => "tls_handshake_failed",
        }
    }
}

/// The server side of a client's handshake, within its timeout.
pub async fn accept(t: &TlsTerminate, client: TcpStream) -> Result<ClientTls, Refused> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&t.server));
    match tokio::time::timeout(t.handshake_timeout, acceptor.accept(client)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) if is_closed(&e) => Err(Refused::Closed),
        Ok(Err(_)) => Err(Refused::Failed),
        Err(_) => Err(Refused::Timeout),
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// The client side of a handshake with backend `addr`, within `timeout`:
/// a failure is the backend's (it answered no TLS, or a certificate that
/// does not chain to the group's CA or carry its name).
pub async fn connect(
    t: &TlsOriginate,
    addr: SocketAddr,
    tcp: TcpStream,
    timeout: Duration,
) -> io::Result<UpstreamTls> {
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&t.client));
    match tokio::time::timeout(timeout, connector.connect(t.name_for(addr), tcp)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}

/// A client connection: the socket itself, or TLS portshift terminates.
#[derive(Debug)]
pub enum Client {
    Plain(TcpStream),
    Tls(Box<ClientTls>),
}

/// A backend connection: the socket itself, or TLS portshift originates.
#[derive(Debug)]
pub enum Upstream {
    Plain(TcpStream),
    Tls(Box<UpstreamTls>),
}

impl Client {
    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Client::Plain(s) => s,
            Client::Tls(t) => t.get_ref().0,
        }
    }

    /// The bytes the client means, through TLS if there is any.
    pub fn io(&mut self) -> Either<&mut TcpStream, &mut ClientTls> {
        match self {
            Client::Plain(s) => Either::Left(s),
            Client::Tls(t) => Either::Right(t),
        }
    }
}

impl Upstream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Upstream::Plain(s) => s,
            Upstream::Tls(t) => t.get_ref().0,
        }
    }

    pub fn io(&mut self) -> Either<&mut TcpStream, &mut UpstreamTls> {
        match self {
            Upstream::Plain(s) => Either::Left(s),
            Upstream::Tls(t) => Either::Right(t),
        }
    }

    /// Writes `bytes` to the backend (through TLS if there is any).
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Upstream::Plain(s) => super::copy::write_all(s, bytes).await,
            Upstream::Tls(t) => {
                t.write_all(bytes).await?;
                t.flush().await
            }
        }
    }
}
