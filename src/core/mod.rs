//! The pure core: no tokio, no sockets, no clock reads. Everything here takes
//! its inputs (tickets, counts, `now`) as arguments, so the simulator and the
//! unit tests can drive it exactly.

pub mod backend;
pub mod blame;
pub mod eject;
pub mod ewma;
pub mod fleet;
pub mod knock;
pub mod maglev;
pub mod policy;
pub mod probe;
pub mod routes;
pub mod sni;
pub mod stats;
pub mod turns;
