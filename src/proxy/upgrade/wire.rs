//! The handoff's conversation on the Unix socket: JSON messages, one per
//! line, in lockstep, and the listening sockets themselves as SCM_RIGHTS
//! attached to single marker bytes.
//!
//! Lockstep matters: descriptors ride on the byte they are attached to, and
//! a buffered read that swallowed that byte would drop them. So the side
//! that receives them asks for them (`SendSockets`) and reads nothing else
//! until they have come.

use super::carry::ListenerHandover;
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Bumped whenever a message changes shape; both sides must agree.
pub const PROTOCOL: u32 = 1;

/// The kernel's cap on descriptors in one SCM_RIGHTS message is 253.
const FDS_PER_MESSAGE: usize = 200;

/// A message longer than this is refused: the state of thousands of
/// listeners fits well below it.
const MAX_MESSAGE: u64 = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Message {
    /// New to old: who is asking.
    Hello {
        protocol: u32,
        version: String,
        pid: u32,
    },
    /// Old to new: the sockets it will pass, in order, and the policy
    /// state of every listener (frozen from now until the handoff ends).
    Offer {
        version: String,
        pid: u32,
        sockets: Vec<SocketOffer>,
        listeners: Vec<ListenerHandover>,
    },
    /// Old to new: no handoff, and why.
    Refused { reason: String },
    /// New to old: pass the sockets now.
    SendSockets,
    /// New to old: every listener accepts; stop accepting and drain.
    Accepting,
    /// New to old: the new process gives up; keep serving.
    Abort { reason: String },
    /// Old to new: it stopped accepting and is draining its connections.
    Draining { in_flight: usize },
}

/// One listening socket on offer: whose it is and where it is bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketOffer {
    /// The listener's name, or `admin` for the admin API's socket.
    pub listener: String,
    pub addr: SocketAddr,
}

/// One end of the conversation.
pub struct Conn {
    reader: BufReader<UnixStream>,
}

impl Conn {
    pub fn new(stream: UnixStream, timeout: Duration) -> io::Result<Self> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    pub fn stream(&self) -> &UnixStream {
        self.reader.get_ref()
    }

    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.stream().set_read_timeout(Some(timeout))
    }

    pub fn send(&mut self, m: &Message) -> io::Result<()> {
        let mut line = serde_json::to_vec(m).map_err(io::Error::other)?;
        line.push(b'\n');
        self.reader.get_mut().write_all(&line)
    }

    /// The next message; the peer closing first is `UnexpectedEof`.
    pub fn recv(&mut self) -> io::Result<Message> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(MAX_MESSAGE)
            .read_until(b'\n', &mut line)?;
        if line.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process closed the upgrade socket",
            ));
        }
        serde_json::from_slice(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("a bad message: {e}")))
    }

    /// Passes `fds`, in order, in batches the kernel accepts.
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        for batch in fds.chunks(FDS_PER_MESSAGE) {
            let mut space =
                vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(batch.len()))];
            let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
            if !control.push(rustix::net::SendAncillaryMessage::ScmRights(batch)) {
                return Err(io::Error::other(
                    "the descriptors do not fit the control buffer",
                ));
            }
            rustix::net::sendmsg(
                self.stream(),
                &[IoSlice::new(b"F")],
                &mut control,
                rustix::net::SendFlags::empty(),
            )?;
        }
        Ok(())
    }

    /// Receives exactly `n` descriptors (close-on-exec), in the order sent.
    pub fn recv_fds(&mut self, n: usize) -> io::Result<Vec<OwnedFd>> {
        // Lockstep: nothing else may have been read past the last message.
        debug_assert!(self.reader.buffer().is_empty());
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let want = (n - out.len()).min(FDS_PER_MESSAGE);
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(want))];
            let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
            let mut byte = [0u8; 1];
            let got = rustix::net::recvmsg(
                self.reader.get_ref().as_fd(),
                &mut [IoSliceMut::new(&mut byte)],
                &mut control,
                rustix::net::RecvFlags::CMSG_CLOEXEC,
            )?;
            if got.bytes == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the other process closed the upgrade socket while passing sockets",
                ));
            }
            let before = out.len();
            for m in control.drain() {
                if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = m {
                    out.extend(fds);
                }
            }
            if out.len() == before {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a marker byte came without its descriptors (is RLIMIT_NOFILE too low?)",
                ));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_and_descriptors_cross_a_socket_pair_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut old = Conn::new(a, Duration::from_secs(5)).unwrap();
        let mut new = Conn::new(b, Duration::from_secs(5)).unwrap();
        // More listeners than one SCM_RIGHTS message may carry.
        let listeners: Vec<std::net::TcpListener> = (0..230)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let sockets = addrs
            .iter()
            .map(|&addr| SocketOffer {
                listener: "l".into(),
                addr,
            })
            .collect();
        old.send(&Message::Offer {
            version: "v".into(),
            pid: 1,
            sockets,
            listeners: Vec::new(),
        })
        .unwrap();
        let Message::Offer { sockets, .. } = new.recv().unwrap() else {
            panic!("not an offer")
        };
        assert_eq!(sockets.len(), 230);
        let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(AsFd::as_fd).collect();
        old.send_fds(&fds).unwrap();
        let got = new.recv_fds(230).unwrap();
        let got: Vec<SocketAddr> = got
            .into_iter()
            .map(|fd| std::net::TcpListener::from(fd).local_addr().unwrap())
            .collect();
        assert_eq!(got, addrs);
    }

    #[test]
    fn a_peer_that_closes_is_an_eof_not_a_hang() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut new = Conn::new(b, Duration::from_secs(5)).unwrap();
        assert_eq!(new.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            new.recv_fds(1).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
