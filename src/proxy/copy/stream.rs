//! The copy for a connection with TLS on either side. A rustls stream is
//! no socket: there is no readiness to poll and nothing to splice, so each
//! direction reads and writes through its streams' halves, with the same
//! turns, idle timeout, half-close and blame as the socket copy.

use super::{Copied, Watch, ended, pool};
use crate::core::blame::Blame;
use crate::core::turns::{Side, Turn};
use crate::proxy::Clock;
use crate::proxy::outcome::End;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Runs until both directions reach EOF, either side fails, or nothing
/// moves for `idle`. `client_spoke_at`: when the client's first bytes
/// went to the backend before the copy, as in the socket copy.
pub async fn bidirectional<C, U>(
    client: C,
    upstream: U,
    clock: Clock,
    on_turn: &(dyn Fn(Turn, Duration) + Sync),
    idle: Duration,
    client_spoke_at: Option<Duration>,
) -> Copied
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let watch = Watch::new(clock, on_turn, client_spoke_at);
    let (up_bytes, down_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    let up = pump(
        &mut client_rx,
        &mut upstream_tx,
        Side::Client,
        &watch,
        &up_bytes,
    );
    let down = pump(
        &mut upstream_rx,
        &mut client_tx,
        Side::Upstream,
        &watch,
        &down_bytes,
    );
    tokio::pin!(up, down);
    let (mut a, mut b) = (Poll::Pending, Poll::Pending);
    let mut first_eof = None;
    let end = loop {
        let quiet = clock
            .now()
            .saturating_sub(Duration::from_micros(watch.last_us.load(Relaxed)));
        if quiet >= idle {
            break End::IdleTimeout;
        }
        tokio::select! {
            r = &mut up, if a.is_pending() => a = Poll::Ready(r),
            r = &mut down, if b.is_pending() => b = Poll::Ready(r),
            () = tokio::time::sleep(idle - quiet) => {}
        }
        if let Some(end) = ended(a, b, &mut first_eof) {
            break end;
        }
    };
    Copied {
        up: up_bytes.load(Relaxed),
        down: down_bytes.load(Relaxed),
        end,
        replay: None,
    }
}

/// One direction: `side`'s bytes to the other side until EOF, which is
/// passed on (a TLS side sends its close_notify), or a failure, blamed on
/// the side it came from.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    side: Side,
    watch: &Watch<'_>,
    total: &AtomicU64,
) -> Result<(), Blame>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let other = match side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    let mut buf = pool::take();
    let result = async {
        loop {
            let n = match from.read(&mut buf).await {
                Ok(n) => n,
                // A TLS peer that closes without its close_notify: an EOF
                // all the same, as browsers and most servers treat it.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(Blame::of_io(side, &e)),
            };
            if n == 0 {
                return to.shutdown().await.map_err(|e| Blame::of_io(other, &e));
            }
            watch.on_chunk(side);
            let written = async {
                to.write_all(&buf[..n]).await?;
                to.flush().await
            };
            written.await.map_err(|e| Blame::of_io(other, &e))?;
            total.fetch_add(n as u64, Relaxed);
        }
    }
    .await;
    pool::give(buf);
    result
}
