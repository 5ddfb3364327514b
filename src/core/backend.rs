//! A backend as routing sees it (an address and a weight), and how a group
//! spreads connections over its backends. Defined here, in the core, so
//! routing never depends on the config layer; the config layer builds them.

use std::net::SocketAddr;

/// One backend of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// How a group spreads connections across its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Smooth weighted round-robin (nginx's interleaving).
    #[default]
    RoundRobin,
    /// Fewest active connections relative to weight.
    LeastConnections,
}

impl Balance {
    pub const NAMES: [&'static str; 2] = ["round_robin", "least_connections"];

    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConnections => "least_connections",
        }
    }
}
