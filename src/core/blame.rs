//! Which side a failure belongs to. Every failed connect, reset or broken
//! pipe is the client's, the upstream's, or portshift's own (out of
//! descriptors, memory, local ports). Only the upstream's failures are
//! evidence that a backend is worse, so only they may reach a backend's
//! statistics and, through them, the policy.

use crate::core::turns::Side;
use std::io;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blame {
    /// The client went away or misbehaved: a reset, a close before reading
    /// the reply, a timeout of its own.
    Client,
    /// The backend refused, timed out, reset or closed on us.
    Upstream,
    /// portshift itself ran out of something: descriptors, memory, buffer
    /// space or local ports.
    Local,
}

impl Blame {
    pub fn name(self) -> &'static str {
        match self {
            Blame::Client => "client",
            Blame::Upstream => "upstream",
            Blame::Local => "local",
        }
    }

    /// A read or write on `side`'s socket failed with `e`: that side's
    /// fault, unless the error is about this process's own resources.
    pub fn of_io(side: Side, e: &io::Error) -> Blame {
        if is_local(e) {
            return Blame::Local;
        }
        match side {
            Side::Client => Blame::Client,
            Side::Upstream => Blame::Upstream,
        }
    }

    /// An upstream connect failed with `e`: the backend's fault (refused,
    /// unreachable, timed out), unless portshift could not even make the
    /// attempt (no descriptor, no memory, no free local port).
    pub fn of_connect(e: &io::Error) -> Blame {
        if is_local(e) || matches!(e.raw_os_error(), Some(EADDRNOTAVAIL | EADDRINUSE)) {
            Blame::Local
        } else {
            Blame::Upstream
        }
    }
}

const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const ENOMEM: i32 = 12;
const ENOBUFS: i32 = 105;
const EADDRINUSE: i32 = 98;
const EADDRNOTAVAIL: i32 = 99;

/// Errors that say this process (or this host) is short of a resource,
/// whatever the socket: descriptors, kernel memory, buffer space.
fn is_local(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOMEM | ENOBUFS))
        || e.kind() == io::ErrorKind::OutOfMemory
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn a_socket_error_blames_its_side_unless_resources_ran_out() {
        let reset = os(104);
        assert_eq!(Blame::of_io(Side::Client, &reset), Blame::Client);
        assert_eq!(Blame::of_io(Side::Upstream, &reset), Blame::Upstream);
        let pipe = os(32);
        assert_eq!(Blame::of_io(Side::Client, &pipe), Blame::Client);
        for local in [EMFILE, ENFILE, ENOMEM, ENOBUFS] {
            assert_eq!(Blame::of_io(Side::Upstream, &os(local)), Blame::Local);
            assert_eq!(Blame::of_io(Side::Client, &os(local)), Blame::Local);
        }
    }

    #[test]
    fn a_connect_error_is_the_backends_unless_it_never_left_this_host() {
        for upstream in [111, 110, 113, 101, 104] {
            assert_eq!(Blame::of_connect(&os(upstream)), Blame::Upstream);
        }
        for local in [EMFILE, ENFILE, ENOMEM, ENOBUFS, EADDRNOTAVAIL, EADDRINUSE] {
            assert_eq!(Blame::of_connect(&os(local)), Blame::Local);
        }
    }
}
