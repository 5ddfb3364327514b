//! Copies bytes both ways between client and upstream with correct
//! half-close: EOF read on one side shuts down writing on the other, while
//! the other direction keeps flowing. A direction borrows a buffer from a
//! per-thread pool while it has bytes to move and gives it back when it
//! goes idle: no allocation per chunk, and no buffer held by an idle
//! connection. Bulk flows switch to splice(2) through a pooled pipe. Each
//! chunk read also feeds the turn tracker, which yields `exchange` and
//! `first_byte` samples.

use super::Clock;
use super::outcome::End;
use crate::core::blame::Blame;
use crate::core::turns::{Side, Turn, TurnTracker};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::net::TcpStream;

mod pool;
mod replay;
mod splice;
pub mod stream;

use replay::ReplayLog;
pub use replay::{Replay, resend, write_all};

/// Bytes per direction buffer: large enough for bulk flows to move in few
/// syscalls, small enough that 10k idle connections stay cheap.
pub const BUFFER_BYTES: usize = 16 * 1024;

/// What a finished copy moved and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub up: u64,
    pub down: u64,
    pub end: End,
    /// Set when the backend reset before sending a single byte and the
    /// listener retries such resets: what the client had sent, to give the
    /// next backend.
    pub replay: Option<Replay>,
}

/// How a copy runs, from the listener's settings.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// Close both sides when no byte moves either way for this long.
    pub idle: Duration,
    /// Keep the client's first bytes until the backend answers, so an
    /// early reset can be replayed to the next backend (`retry_on_early_reset`).
    pub keep_replay: bool,
    /// Move bulk flows with splice(2) (`splice`); ruled out by `keep_replay`,
    /// which needs the bytes in hand.
    pub splice: bool,
    /// When the client's first bytes went to the backend before the copy
    /// (a routed listener's ClientHello): the first turn starts there.
    pub client_spoke_at: Option<Duration>,
}

/// Runs until both directions reach EOF, either side fails, or nothing moves
/// for `options.idle`. `on_turn` receives every finished request/response
/// turn.
///
/// Both directions and the idle timer are driven by one hand-written poll
/// function rather than `join!`/`select!` over `readable()` futures: a wake
/// costs a readiness check per direction (`poll_read_ready`, one waker slot
/// per socket and direction) instead of a waiter list insert and removal
/// under a lock, and there is no combinator state to walk. On loopback this
/// was about a quarter of the proxy's user-space time per request.
pub async fn bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
    clock: Clock,
    on_turn: &(dyn Fn(Turn, Duration) + Sync),
    options: CopyOptions,
) -> Copied {
    let CopyOptions {
        idle,
        keep_replay,
        splice,
        client_spoke_at,
    } = options;
    let log = ReplayLog::new(keep_replay);
    let watch = Watch::new(clock, on_turn, client_spoke_at);
    // Replay needs the client's bytes in hand, so it rules splice out.
    let splice = splice && !keep_replay;
    let mut up = Direction::new(Side::Client, splice);
    let mut down = Direction::new(Side::Upstream, splice);
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let mut timer = IdleTimer::default();
    // The side whose EOF came first: who ended a connection that closed.
    let mut first_eof = None;
    let end = std::future::poll_fn(|cx| {
        let a = up.poll(cx, client, upstream, down.done, &watch, &log);
        let b = down.poll(cx, upstream, client, up.done, &watch, &log);
        if let Some(end) = ended(a, b, &mut first_eof) {
            return Poll::Ready(end);
        }
        poll_idle(cx, &mut timer, sleep.as_mut(), &watch, idle)
    })
    .await;
    up.release();
    down.release();
    Copied {
        up: up.total,
        down: down.total,
        end,
        replay: if end == End::Failed(Blame::Upstream) {
            log.take()
        } else {
            None
        },
    }
}

/// How the connection ended once both directions are polled, if it has:
/// a failure on either side, or EOF from both. Notes whose EOF came first.
#[inline(always)]
fn ended(
    a: Poll<Result<(), Blame>>,
    b: Poll<Result<(), Blame>>,
    first_eof: &mut Option<Side>,
) -> Option<End> {
    match (a, b) {
        (Poll::Ready(Err(blame)), _) | (_, Poll::Ready(Err(blame))) => Some(End::Failed(blame)),
        (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Some(End::Closed {
            first: first_eof.unwrap_or(Side::Client),
        }),
        (Poll::Ready(Ok(())), _) => {
            first_eof.get_or_insert(Side::Client);
            None
        }
        (_, Poll::Ready(Ok(()))) => {
            first_eof.get_or_insert(Side::Upstream);
            None
        }
        _ => None,
    }
}

/// The idle timeout. The timer is armed for the idle limit counted from the
/// last activity it knew of; when it fires early (traffic since), it is
/// re-armed for the rest.
#[inline(always)]
fn poll_idle(
    cx: &mut Context<'_>,
    timer: &mut IdleTimer,
    mut sleep: std::pin::Pin<&mut tokio::time::Sleep>,
    watch: &Watch<'_>,
    idle: Duration,
) -> Poll<End> {
    while timer.needs_poll(cx, sleep.is_elapsed()) && sleep.as_mut().poll(cx).is_ready() {
        let last = Duration::from_micros(watch.last_us.load(Relaxed));
        let quiet = watch.clock.now().saturating_sub(last);
        if quiet >= idle {
            return Poll::Ready(End::IdleTimeout);
        }
        sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + (idle - quiet));
        timer.rearmed();
    }
    Poll::Pending
}

/// When the idle timer must be polled. A registered timer wakes the task
/// by itself when it fires, so polling it on every I/O wake (a cooperative
/// budget check and a waker comparison each time) is only needed when it is
/// not registered yet, has fired, or the future is now polled with another
/// waker than the one the timer holds.
#[derive(Default)]
struct IdleTimer {
    registered: Option<std::task::Waker>,
}

impl IdleTimer {
    fn needs_poll(&mut self, cx: &Context<'_>, fired: bool) -> bool {
        let current = self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if fired || !current {
            self.registered = Some(cx.waker().clone());
            return true;
        }
        false
    }

    /// The timer was reset: its next poll registers it again.
    fn rearmed(&mut self) {
        self.registered = None;
    }
}

/// What both directions share: last activity and the turn tracker.
struct Watch<'a> {
    clock: Clock,
    last_us: AtomicU64,
    turns: TurnTracker,
    on_turn: &'a (dyn Fn(Turn, Duration) + Sync),
}

impl<'a> Watch<'a> {
    /// Activity from now on; the client spoke at `client_spoke_at`, if
    /// its first bytes went ahead of the copy.
    fn new(
        clock: Clock,
        on_turn: &'a (dyn Fn(Turn, Duration) + Sync),
        client_spoke_at: Option<Duration>,
    ) -> Self {
        let turns = TurnTracker::default();
        if let Some(at) = client_spoke_at {
            turns.on_data(Side::Client, at);
        }
        Watch {
            clock,
            last_us: AtomicU64::new(clock.now().as_micros() as u64),
            turns,
            on_turn,
        }
    }

    fn on_chunk(&self, side: Side) {
        let now = self.clock.now();
        self.last_us.store(now.as_micros() as u64, Relaxed);
        if let Some(turn) = self.turns.on_data(side, now) {
            (self.on_turn)(turn, now);
        }
    }
}

/// One direction's state: bytes read but not yet written (`buf[start..end]`),
/// and whether the last read drained the socket.
///
/// A read that fills the whole buffer marks a bulk flow: if splice is on,
/// the direction then borrows a pipe and moves bytes socket → pipe → socket
/// with splice(2), never copying them through user space, until the source
/// runs dry; then the pipe goes back to its pool and small reads use the
/// buffer again.
struct Direction {
    side: Side,
    buf: Option<Vec<u8>>,
    start: usize,
    end: usize,
    drained: bool,
    done: bool,
    total: u64,
    /// Splice allowed for this direction (config, and no replay; turned
    /// off for good if the kernel refuses it for these sockets).
    splice: bool,
    /// The borrowed pipe while in splice mode, and the bytes inside it.
    pipe: Option<splice::Pipe>,
    in_pipe: usize,
}

impl Direction {
    fn new(side: Side, splice: bool) -> Self {
        Direction {
            side,
            buf: None,
            start: 0,
            end: 0,
            drained: false,
            done: false,
            total: 0,
            splice: splice && splice::SUPPORTED,
            pipe: None,
            in_pipe: 0,
        }
    }

    /// Hands the buffer and an empty pipe back to their pools: the
    /// direction is idle. A pipe with bytes still in it (the connection
    /// failed mid-flow) is closed instead.
    fn release(&mut self) {
        if let Some(b) = self.buf.take() {
            pool::give(b);
        }
        if let Some(p) = self.pipe.take() {
            if self.in_pipe == 0 {
                splice::give(p);
            }
            self.in_pipe = 0;
        }
    }

    /// The sides this direction reads from and writes to: a failed read
    /// is the reader's fault, a failed write the writer's (unless it says
    /// portshift ran out of something).
    fn sides(&self) -> (Side, Side) {
        match self.side {
            Side::Client => (Side::Client, Side::Upstream),
            Side::Upstream => (Side::Upstream, Side::Client),
        }
    }

    /// Splice mode: drains the pipe into `to`, refills it from `from`.
    /// `Ready(Ok(()))` means back to buffer mode, the pipe returned: the
    /// source ran dry, reached EOF (which the buffer path's read then sees
    /// and passes on) or cannot be spliced. `Ready(Err)` ends the direction.
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        watch: &Watch<'_>,
    ) -> Poll<Result<(), Blame>> {
        let (reader, writer) = self.sides();
        let fail = |side, e: &io::Error| Poll::Ready(Err(Blame::of_io(side, e)));
        loop {
            let pipe = self.pipe.as_ref().expect("splice mode holds a pipe");
            while self.in_pipe > 0 {
                match splice::drain(pipe, to, self.in_pipe) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.total += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = ready!(to.poll_write_ready(cx)) {
                            return fail(writer, &e);
                        }
                    }
                    Err(e) => return fail(writer, &e),
                }
            }
            if let Err(e) = ready!(from.poll_read_ready(cx)) {
                return fail(reader, &e);
            }
            match splice::fill(from, pipe) {
                // EOF: the buffer path's read sees it too and passes it on.
                Ok(0) => {
                    self.release();
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    self.in_pipe = n;
                    watch.on_chunk(self.side);
                }
                // Dry: readiness is cleared, the buffer path waits for more.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.release();
                    return Poll::Ready(Ok(()));
                }
                // The kernel cannot splice these sockets: copy instead.
                Err(e) if e.raw_os_error() == Some(splice::EINVAL) => {
                    self.release();
                    self.splice = false;
                    return Poll::Ready(Ok(()));
                }
                Err(e) => return fail(reader, &e),
            }
        }
    }

    /// Moves bytes from `from` to `to` until it would block (`Pending`, with
    /// the waker registered on the socket that blocked), reaches EOF (passed
    /// on as a half-close) or fails. `peer_done`: the other direction has
    /// already read EOF from `to`.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        peer_done: bool,
        watch: &Watch<'_>,
        log: &ReplayLog,
    ) -> Poll<Result<(), Blame>> {
        let (reader, writer) = self.sides();
        let fail = |side, e: &io::Error| Poll::Ready(Err(Blame::of_io(side, e)));
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.pipe.is_some() {
                ready!(self.poll_splice(cx, from, to, watch))?;
            }
            ready!(self.poll_flush(cx, to))?;
            if self.written() {
                continue;
            }
            if let Err(e) = ready!(from.poll_read_ready(cx)) {
                return fail(reader, &e);
            }
            let b = self.buf.get_or_insert_with(pool::take);
            match read_chunk(from, b) {
                Ok((0, _)) => {
                    self.release();
                    self.done = true;
                    return match self.pass_eof(to, peer_done, log) {
                        Ok(()) => Poll::Ready(Ok(())),
                        Err(e) => fail(writer, &e),
                    };
                }
                Ok((n, drained)) => {
                    match self.side {
                        Side::Client => log.client_sent(&b[..n]),
                        Side::Upstream => log.upstream_spoke(),
                    }
                    watch.on_chunk(self.side);
                    (self.end, self.drained) = (n, drained);
                }
                // Readiness is cleared: the next `poll_read_ready` registers.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.release(),
                Err(e) => return fail(reader, &e),
            }
        }
    }

    /// Writes the bytes read but not yet written (`buf[start..end]`).
    ///
    /// Write first, wait only when the kernel says so: a socket is nearly
    /// always writable, and the readiness check before every write was a
    /// tenth of the proxy's user-space work per request. `try_write`
    /// answers `WouldBlock` without a syscall while write readiness is
    /// known to be clear.
    #[inline(always)]
    fn poll_flush(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<Result<(), Blame>> {
        let (_, writer) = self.sides();
        while self.start < self.end {
            let b = self.buf.as_ref().expect("pending bytes live in the buffer");
            match to.try_write(&b[self.start..self.end]) {
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = ready!(to.poll_write_ready(cx)) {
                        return Poll::Ready(Err(Blame::of_io(writer, &e)));
                    }
                }
                Err(e) => return Poll::Ready(Err(Blame::of_io(writer, &e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// After a flush: counts what the buffer held, gives the buffer back if
    /// the socket is dry, and says whether a full buffer (a bulk flow)
    /// switched this direction to splice.
    #[inline(always)]
    fn written(&mut self) -> bool {
        if self.end == 0 {
            return false;
        }
        self.total += self.end as u64;
        let full = self.end == BUFFER_BYTES;
        (self.start, self.end) = (0, 0);
        if self.drained {
            // The socket is empty and its readiness cleared: the buffer
            // goes back now, not after a failed read.
            self.release();
        } else if full
            && self.splice
            && let Some(p) = splice::take()
        {
            self.release();
            self.pipe = Some(p);
            return true;
        }
        false
    }

    /// EOF from `from`: half-close `to` so the other direction keeps flowing.
    fn pass_eof(&self, to: &TcpStream, peer_done: bool, log: &ReplayLog) -> io::Result<()> {
        if self.side == Side::Client {
            log.client_eof.store(true, Relaxed);
        }
        if peer_done {
            // Both sides are done: `to` is closed right after this and its
            // close sends the FIN. `to` sent its EOF and every byte before it
            // was read, so nothing unread turns that close into a reset. One
            // shutdown syscall fewer per connection.
            return Ok(());
        }
        socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)
    }
}

/// One read into `buf`: the byte count, and whether it drained the socket.
///
/// A read that fills less than the buffer has taken everything the kernel
/// held, so the stream's read readiness is cleared on the spot (by
/// answering `WouldBlock` inside `try_io`) instead of by a second `recv`
/// that fails with `EAGAIN`. That saves one syscall per chunk: a third of
/// all syscalls in a request/response exchange. HAProxy and nginx make the
/// same inference. It is safe with edge-triggered epoll: data arriving after
/// this read raises a new edge, which sets readiness again.
fn read_chunk(from: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    use std::io::Read;
    let sock = socket2::SockRef::from(from);
    let mut got = None;
    let r = from.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*sock).read(buf)?;
        if n > 0 && n < buf.len() {
            got = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, got) {
        (_, Some(n)) => Ok((n, true)),
        (Ok(n), None) => Ok((n, false)),
        (Err(e), None) => Err(e),
    }
}
