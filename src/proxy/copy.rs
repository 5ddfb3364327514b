//! Copies bytes both ways between client and upstream with correct
//! half-close: EOF read on one side shuts down writing on the other, while
//! the other direction keeps flowing. One fixed buffer per direction,
//! allocated once per connection, never per chunk. Each chunk read also
//! feeds the turn tracker, which yields `exchange` and `first_byte` samples.

use super::Clock;
use super::outcome::End;
use crate::core::turns::{Side, Turn, TurnTracker};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

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
/// for `idle`. `on_turn` receives every finished request/response turn.
pub async fn bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    clock: Clock,
    on_turn: &(dyn Fn(Turn, Duration) + Sync),
) -> Copied {
    let watch = Watch {
        clock,
        last_us: AtomicU64::new(clock.now().as_micros() as u64),
        turns: TurnTracker::default(),
        on_turn,
    };
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let mut bufs = vec![0u8; 2 * BUFFER_BYTES];
    let (b1, b2) = bufs.split_at_mut(BUFFER_BYTES);
    let both = async {
        tokio::try_join!(
            pipe(&mut cr, &mut uw, b1, &up, &watch, Side::Client),
            pipe(&mut ur, &mut cw, b2, &down, &watch, Side::Upstream)
        )
    };
    let end = tokio::select! {
        r = both => if r.is_ok() { End::Closed } else { End::Reset },
        () = watch.idle_for(idle) => End::IdleTimeout,
    };
    Copied {
        up: up.load(Relaxed),
        down: down.load(Relaxed),
        end,
    }
}

/// What both directions share: last activity and the turn tracker.
struct Watch<'a> {
    clock: Clock,
    last_us: AtomicU64,
    turns: TurnTracker,
    on_turn: &'a (dyn Fn(Turn, Duration) + Sync),
}

impl Watch<'_> {
    fn on_chunk(&self, side: Side) {
        let now = self.clock.now();
        self.last_us.store(now.as_micros() as u64, Relaxed);
        if let Some(turn) = self.turns.on_data(side, now) {
            (self.on_turn)(turn, now);
        }
    }

    /// Completes once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_micros(self.last_us.load(Relaxed));
            let quiet = self.clock.now().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

async fn pipe<R, W>(
    r: &mut R,
    w: &mut W,
    buf: &mut [u8],
    total: &AtomicU64,
    watch: &Watch<'_>,
    side: Side,
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
        watch.on_chunk(side);
        w.write_all(&buf[..n]).await?;
        total.fetch_add(n as u64, Relaxed);
    }
}
