//! The black-box tests, one crate with a module per area: real sockets on
//! loopback (or in network namespaces the tests make), real Prometheus,
//! the real binary. One link step for all of them, and one copy of each
//! helper (`common`).

mod certs;
mod common;

mod access_log;
mod admin;
mod architecture;
mod backends;
mod balance;
mod blame;
mod cli;
mod discovery;
mod docs;
mod eject;
mod etcd;
mod fidelity;
mod fleet;
mod hardening;
mod knock;
mod netns;
mod policy;
mod port_audit;
mod prometheus;
mod proxy;
mod proxy_protocol;
mod sim;
mod sni;
mod sni_routes;
mod systemd;
mod telemetry;
mod tls;
mod upgrade;
