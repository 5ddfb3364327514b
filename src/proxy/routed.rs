//! A listener with routes: once a connection is admitted, its TLS
//! ClientHello is read (never terminated), the server name picks a route's
//! unit (or, with none, the listener's own groups), and that unit carries
//! the connection, its backend getting the hello as its first bytes.

use super::connection::{self, Peer};
use super::sni::{self, Refused};
use super::state::{Admission, ListenerState, Refusal};
use super::tls::Client;
use crate::config::Listener;
use crate::core::sni::NameTable;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// Why a routed listener closed a connection before picking a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    /// The ClientHello could not be taken.
    Hello(Refused),
    /// No route takes the name (or none was sent) and the listener has no
    /// primary of its own.
    NoMatch,
}

impl Unrouted {
    /// Every reason, in the order of the counters.
    fn all() -> impl Iterator<Item = Unrouted> {
        Refused::ALL
            .into_iter()
            .map(Unrouted::Hello)
            .chain([Unrouted::NoMatch])
    }

    /// The metric's `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Unrouted::Hello(r) => r.name(),
            Unrouted::NoMatch => "no_match",
        }
    }

    /// The access log's `outcome`.
    fn outcome(self) -> &'static str {
        match self {
            Unrouted::Hello(Refused::NotTls) => "sni_not_tls",
            Unrouted::Hello(Refused::Malformed) => "sni_malformed",
            Unrouted::Hello(Refused::Oversized) => "sni_oversized",
            Unrouted::Hello(Refused::Timeout) => "sni_timeout",
            Unrouted::Hello(Refused::Closed) => "sni_closed",
            Unrouted::NoMatch => "sni_no_match",
        }
    }
}

/// A listener's routes: the server-name table and each route's unit.
#[derive(Debug)]
pub struct Routed {
    table: NameTable<usize>,
    /// In the order of the listener's routes.
    pub units: Vec<Arc<ListenerState>>,
    timeout: Duration,
    /// Per `Unrouted::all()`.
    counted: Vec<metrics::Counter>,
}

impl Routed {
    pub fn new(l: &Listener, units: Vec<Arc<ListenerState>>) -> Routed {
        let patterns = l
            .routes
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.sni.iter().map(move |p| (p.clone(), i)));
        Routed {
            table: NameTable::new(patterns)
                .expect("the config refuses a server name in two routes"),
            units,
            timeout: l.client_hello_timeout,
            counted: Unrouted::all()
                .map(|r| crate::telemetry::sni_rejected(&l.name, r.name()))
                .collect(),
        }
    }

    /// The unit that takes `server_name`: a route's, else the listener's
    /// own when it has groups.
    fn pick(
        &self,
        front: &Arc<ListenerState>,
        server_name: Option<&str>,
    ) -> Option<Arc<ListenerState>> {
        match server_name.and_then(|n| self.table.lookup(n)) {
            Some(i) => Some(Arc::clone(&self.units[i])),
            None if front.group_count() > 0 => Some(Arc::clone(front)),
            None => None,
        }
    }
}

/// An admitted connection to a routed listener (`front`) that passes TLS
/// through: its ClientHello is read, and is the preface of whichever
/// unit takes it.
pub async fn handle(
    front: Arc<ListenerState>,
    mut client: TcpStream,
    admitted: Admission,
    peer: Peer,
) {
    let Some(routed) = front.routed.get() else {
        return;
    };
    match sni::read_client_hello(&mut client, routed.timeout).await {
        Ok(hello) => {
            let (name, preface) = (hello.server_name, Some(hello.bytes));
            carry(
                front,
                name.as_deref(),
                Client::Plain(client),
                admitted,
                peer,
                preface,
            )
            .await;
        }
        Err(why) => note_unrouted(&front, routed, peer.client, Unrouted::Hello(why)),
    }
}

/// Gives a connection to the unit of `front` that takes `server_name`
/// (`front` itself without routes), or closes it when none does.
pub async fn carry(
    front: Arc<ListenerState>,
    server_name: Option<&str>,
    client: Client,
    admitted: Admission,
    peer: Peer,
    preface: Option<Vec<u8>>,
) {
    let Some(routed) = front.routed.get() else {
        return connection::handle(front, client, admitted, peer, preface).await;
    };
    match routed.pick(&front, server_name) {
        Some(unit) => {
            let _open = (!Arc::ptr_eq(&unit, &front)).then(|| Open::new(&unit));
            connection::handle(unit, client, admitted, peer, preface).await;
        }
        None => note_unrouted(&front, routed, peer.client, Unrouted::NoMatch),
    }
}

/// A connection a route's unit carries, counted among its accepted and
/// open ones (its listener counted it at admission too).
struct Open(Arc<ListenerState>);

impl Open {
    fn new(unit: &Arc<ListenerState>) -> Open {
        unit.outcomes.accepted();
        unit.outcomes.try_open(None);
        Open(Arc::clone(unit))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.outcomes.close_one();
    }
}

/// Counts a connection closed before a route was picked and logs it, at
/// most once a second.
fn note_unrouted(front: &ListenerState, routed: &Routed, peer: SocketAddr, why: Unrouted) {
    let i = Unrouted::all().position(|r| r == why);
    front.note_refused(
        peer,
        Refusal {
            counter: i.and_then(|i| routed.counted.get(i)),
            reason: why.name(),
            outcome: why.outcome(),
            check: "route by server name",
        },
    );
}
