//! Retry on early reset: the client's first bytes are kept until the
//! backend answers, so that if it resets before sending a single byte, the
//! next backend of the plan can be given the same bytes.

use super::BUFFER_BYTES;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use tokio::net::TcpStream;

/// The client's bytes so far (at most one buffer), and whether it had
/// already closed its side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub bytes: Vec<u8>,
    pub client_eof: bool,
}

/// Gives a fresh backend what the client had sent the one that failed.
pub async fn resend(upstream: &TcpStream, r: &Replay) -> io::Result<()> {
    write_all(upstream, &r.bytes).await?;
    if r.client_eof {
        socket2::SockRef::from(upstream).shutdown(std::net::Shutdown::Write)?;
    }
    Ok(())
}

/// Client bytes kept until the backend first answers (retry on early
/// reset only).
#[derive(Debug, Default)]
pub(super) struct ReplayLog {
    enabled: bool,
    bytes: std::sync::Mutex<Vec<u8>>,
    pub(super) client_eof: std::sync::atomic::AtomicBool,
    /// The backend answered, or the client sent more than one buffer:
    /// nothing may be replayed any more.
    done: std::sync::atomic::AtomicBool,
}

impl ReplayLog {
    pub(super) fn new(enabled: bool) -> Self {
        ReplayLog {
            enabled,
            ..ReplayLog::default()
        }
    }

    pub(super) fn client_sent(&self, chunk: &[u8]) {
        if !self.enabled || self.done.load(Relaxed) {
            return;
        }
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() + chunk.len() > BUFFER_BYTES {
            self.done.store(true, Relaxed);
            b.clear();
        } else {
            b.extend_from_slice(chunk);
        }
    }

    pub(super) fn upstream_spoke(&self) {
        if self.enabled && !self.done.swap(true, Relaxed) {
            self.bytes.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    pub(super) fn take(&self) -> Option<Replay> {
        if !self.enabled || self.done.load(Relaxed) {
            return None;
        }
        let bytes = std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|p| p.into_inner()));
        Some(Replay {
            bytes,
            client_eof: self.client_eof.load(Relaxed),
        })
    }
}

pub async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
