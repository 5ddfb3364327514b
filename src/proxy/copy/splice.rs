//! Pipes for splice(2), reused per thread like the copy buffers: a pipe is
//! two fds and up to 64 KiB of kernel pages while it holds data, so a
//! connection borrows one only while its flow is bulk.
//!
//! On other systems there is no splice: every flow is copied through a
//! buffer, and this module only says so.

#[cfg(target_os = "linux")]
pub use linux::*;
#[cfg(not(target_os = "linux"))]
pub use other::*;

#[cfg(target_os = "linux")]
mod linux {
    use rustix::pipe::{PipeFlags, SpliceFlags};
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::OwnedFd;
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    pub const SUPPORTED: bool = true;
    pub const EINVAL: i32 = rustix::io::Errno::INVAL.raw_os_error();

    /// Bytes asked of one splice into the pipe: its default capacity.
    const CHUNK: usize = 64 * 1024;
    /// Idle pipes kept per thread; beyond, they are closed.
    const KEEP: usize = 16;

    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    thread_local! {
        static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    /// A pipe from the pool, or a new one; `None` if none can be made
    /// (fd limit): the caller copies through its buffer instead.
    pub fn take() -> Option<Pipe> {
        FREE.with(|f| f.borrow_mut().pop()).or_else(|| {
            let (read, write) =
                rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
            Some(Pipe { read, write })
        })
    }

    /// Returns an empty pipe to the pool.
    pub fn give(p: Pipe) {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(p);
            }
        });
    }

    const FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);

    /// Socket → empty pipe. `WouldBlock` clears the socket's read readiness.
    /// A short count says nothing here (the pipe may have run out of
    /// slots), so there is no drained shortcut as for plain reads.
    pub fn fill(from: &TcpStream, p: &Pipe) -> io::Result<usize> {
        from.try_io(Interest::READABLE, || {
            rustix::pipe::splice(from, None, &p.write, None, CHUNK, FLAGS).map_err(io::Error::from)
        })
    }

    /// Pipe → socket, at most `len` bytes. `WouldBlock` clears the socket's
    /// write readiness.
    pub fn drain(p: &Pipe, to: &TcpStream, len: usize) -> io::Result<usize> {
        to.try_io(Interest::WRITABLE, || {
            rustix::pipe::splice(&p.read, None, to, None, len, FLAGS).map_err(io::Error::from)
        })
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use std::io;
    use tokio::net::TcpStream;

    pub const SUPPORTED: bool = false;
    pub const EINVAL: i32 = 22;

    pub enum Pipe {}

    pub fn take() -> Option<Pipe> {
        None
    }

    pub fn give(p: Pipe) {
        match p {}
    }

    pub fn fill(_: &TcpStream, p: &Pipe) -> io::Result<usize> {
        match *p {}
    }

    pub fn drain(p: &Pipe, _: &TcpStream, _: usize) -> io::Result<usize> {
        match *p {}
    }
}
