//! portshift: a latency-aware adaptive L4 traffic shifter.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, read into raw serde types and validated into
//!   [`config::Config`]; every problem carries file, line and column.
//! - [`core`]: pure logic, no tokio, no sockets, no clock reads. Today the
//!   route table ([`core::routes`]): group weights in basis points and
//!   backend choice.
//! - [`proxy`]: the tokio shell: binds listeners, accepts, picks a route,
//!   connects upstream with retries, copies bytes both ways, drains on
//!   shutdown.
//! - [`backend`]: a small TCP backend (echo or HTTP, with a reply delay) for
//!   the demo, the tests and for operators rehearsing in staging.
//! - [`demo`]: `portshift demo`, the whole thing on an embedded default.

pub mod access_log;
pub mod backend;
pub mod config;
pub mod core;
pub mod decision_record;
pub mod demo;
pub mod diagnose;
pub mod etcd;
pub mod http_client;
pub mod load;
pub mod port_audit;
pub mod proxy;
pub mod signals;
pub mod sim;
pub mod systemd;
pub mod telemetry;
