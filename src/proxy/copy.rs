//! Copies bytes both ways between client and upstream with correct
//! half-close: EOF read on one side shuts down writing on the other, while
//! the other direction keeps flowing. One fixed buffer per direction,
//! allocated once per connection, never per chunk.

use super::outcome::End;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes per direction buffer: large enough for bulk flows to move in few
/// syscalls, small enough that 10k idle connections stay cheap.
pub const BUFFER_BYTES: usize = 16 * 1024;

/// What a finished copy moved and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub up: u64,
    pub down: u64,
    pub end: End,
}

/// Runs until both directions reach EOF, either side fails, or nothing moves
/// for `idle`.
pub async fn bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
) -> Copied {
    let start = Instant::now();
    let last_ms = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let mut bufs = vec![0u8; 2 * BUFFER_BYTES];
    let (b1, b2) = bufs.split_at_mut(BUFFER_BYTES);
    let activity = Activity {
        start,
        last_ms: &last_ms,
    };
    let both = async {
        tokio::try_join!(
            pipe(&mut cr, &mut uw, b1, &up, &activity),
            pipe(&mut ur, &mut cw, b2, &down, &activity)
        )
    };
    let end = tokio::select! {
        r = both => if r.is_ok() { End::Closed } else { End::Reset },
        () = activity.idle_for(idle) => End::IdleTimeout,
    };
    Copied {
        up: up.load(Relaxed),
        down: down.load(Relaxed),
        end,
    }
}

/// When bytes last moved, in ms since the connection started.
struct Activity<'a> {
    start: Instant,
    last_ms: &'a AtomicU64,
}

impl Activity<'_> {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.start + Duration::from_millis(self.last_ms.load(Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

async fn pipe<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut [u8],
    total: &AtomicU64,
    activity: &Activity<'_>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let n = r.read(buf).await?;
        if n == 0 {
            // Half-close: pass the EOF on, keep the other direction open.
            return w.shutdown().await;
        }
        activity.touch();
        w.write_all(&buf[..n]).await?;
        total.fetch_add(n as u64, Relaxed);
    }
}
