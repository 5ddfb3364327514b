//! Serving the admin API without letting it starve the data path: every
//! admin connection costs a descriptor and a task, and needs no token to
//! open. So the admin plane has its own limits (`[admin]`):
//!
//! - `max_connections` open at once; past it, a new one is closed at accept;
//! - descriptors held back for the data path: an admin connection is
//!   refused while fewer than `reserved_descriptors()` are free;
//! - `header_timeout` for each request's headers (hyper's own timer, which
//!   also runs while a keep-alive connection waits for its next request);
//! - `idle_timeout`: no byte either way for this long closes the connection
//!   (a stalled body, a client that stops reading a response).
//!
//! Each refusal is counted in `portshift_admin_rejected_total{reason}` and
//! logged at most once a second.

use super::super::throttle::OncePerSecond;
use crate::config::AdminLimits;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Pause after a failed admin accept (EMFILE), as the data path does.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// How long open admin connections may finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Why an admin connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    MaxConnections,
    Descriptors,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::Descriptors => "descriptors",
        }
    }
}

/// Accepts and serves admin connections until `stop`, within `limits()`
/// (read at each accept, so a reload's new limits apply to new
/// connections).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: impl Fn() -> AdminLimits,
    stop: CancellationToken,
) {
    let open = Arc::new(AtomicU32::new(0));
    let mut fds = fds::Gauge::default();
    let conns = TaskTracker::new();
    let log = OncePerSecond::new();
    let started = Instant::now();
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut cancelled => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if let Some(held) = log.allow(started.elapsed()) {
                    warn!(error = %e, not_logged = held, "admin accept failed; backing off (logged at most once a second)");
                }
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let limits = limits();
        let slot = match admit(&open, limits.max_connections, &mut fds) {
            Ok(slot) => slot,
            Err(why) => {
                drop(stream);
                crate::telemetry::admin_rejected(why.reason());
                if let Some(held) = log.allow(started.elapsed()) {
                    warn!(%peer, reason = why.reason(), not_logged = held, "admin connection refused (logged at most once a second)");
                }
                continue;
            }
        };
        conns.spawn(connection(
            stream,
            peer,
            app.clone(),
            limits,
            stop.clone(),
            slot,
        ));
    }
    conns.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conns.wait()).await;
}

/// An admin connection's place under `max_connections`, given back on drop.
struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Takes a place for one more admin connection, or says why not. The
/// count is taken first (one atomic step, so a burst cannot pass the cap),
/// then the descriptors are checked.
fn admit(open: &Arc<AtomicU32>, max: u32, fds: &mut fds::Gauge) -> Result<Slot, Refused> {
    open.fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
        .map_err(|_| Refused::MaxConnections)?;
    let slot = Slot(Arc::clone(open));
    if fds.take_one(Instant::now()) {
        Ok(slot)
    } else {
        Err(Refused::Descriptors)
    }
}

/// Serves one admin connection with hyper until it ends, goes idle past
/// `idle_timeout`, or shutdown has begun and its request is done.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: AdminLimits,
    stop: CancellationToken,
    _slot: Slot,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move { tower::Service::call(&mut app, req).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        let idle_at = activity.last() + limits.idle_timeout;
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "admin connection ended");
                }
                return;
            }
            () = stop.cancelled(), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            () = tokio::time::sleep_until(idle_at) => {
                if activity.last() + limits.idle_timeout <= Instant::now() {
                    debug!(%peer, idle = ?limits.idle_timeout, "admin connection idle; closing");
                    return;
                }
            }
        }
    }
}

/// When bytes last moved on a connection.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Relaxed))
    }
}

/// A stream that notes every read or write that moved bytes.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The process's descriptors: how many are free, and what is held back
/// for the data path.
mod fds {
    use std::time::Duration;
    use tokio::time::Instant;

    /// How long a count of open descriptors is trusted. Counting reads
    /// `/proc/self/fd` (a scan of every open descriptor), so a client that
    /// opens and closes admin connections in a loop costs at most ten
    /// scans a second.
    const FRESH: Duration = Duration::from_millis(100);

    /// Descriptors the admin plane never takes: a sixteenth of the limit,
    /// at least 16 (16 of 256, 64 of 1024, 1024 of 16384), enough for the
    /// data path to keep accepting and connecting while admin load peaks.
    pub fn reserved(limit: u64) -> u64 {
        (limit / 16).max(16)
    }

    /// Free descriptors, counted at most every `FRESH` and lowered by one
    /// for each admin connection admitted since.
    #[derive(Debug, Default)]
    pub struct Gauge {
        counted: Option<(Instant, Option<(u64, u64)>)>,
    }

    impl Gauge {
        /// Whether one more admin connection leaves the reserve intact;
        /// if so, counts it as taken.
        pub fn take_one(&mut self, now: Instant) -> bool {
            let stale = self.counted.is_none_or(|(at, _)| now - at >= FRESH);
            if stale {
                self.counted = Some((now, spare()));
            }
            let Some((_, known)) = &mut self.counted else {
                return true;
            };
            match known {
                // Unknown here (not Linux, or no limit): nothing to hold back.
                None => true,
                Some((free, limit)) if *free > reserved(*limit) => {
                    *free -= 1;
                    true
                }
                Some(_) => false,
            }
        }
    }

    /// (free descriptors, the soft limit), where this can be known. A count
    /// that fails for lack of a descriptor says none is free.
    #[cfg(target_os = "linux")]
    fn spare() -> Option<(u64, u64)> {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
        let open = match std::fs::read_dir("/proc/self/fd") {
            Ok(dir) => dir.count() as u64,
            Err(_) => limit,
        };
        Some((limit.saturating_sub(open), limit))
    }

    #[cfg(not(target_os = "linux"))]
    fn spare() -> Option<(u64, u64)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cap_holds_and_places_come_back() {
        let open = Arc::new(AtomicU32::new(0));
        let mut fds = fds::Gauge::default();
        let a = admit(&open, 2, &mut fds).unwrap();
        let _b = admit(&open, 2, &mut fds).unwrap();
        assert_eq!(
            admit(&open, 2, &mut fds).err(),
            Some(Refused::MaxConnections)
        );
        drop(a);
        assert!(admit(&open, 2, &mut fds).is_ok());
        assert_eq!(open.load(Relaxed), 1, "a dropped place is given back");
    }

    #[test]
    fn reserve_scales_with_the_limit() {
        assert_eq!(fds::reserved(64), 16);
        assert_eq!(fds::reserved(256), 16);
        assert_eq!(fds::reserved(1024), 64);
        assert_eq!(fds::reserved(16_384), 1024);
    }
}
