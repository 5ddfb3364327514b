//! One client connection: connect upstream following the route plan, then
//! copy until done, recording latency signals and every outcome.

use super::copy;
use super::outcome::{ConnectFailure, End};
use super::proxy_protocol;
use super::state::{Admission, ListenerState, Routes};
use super::tls::{self, Client, Upstream};
use crate::access_log::AccessRecord;
use crate::config::SocketOptions;
use crate::core::blame::Blame;
use crate::core::routes::{Attempt, client_key};
use crate::core::stats::Signal;
use crate::core::turns::{Side, Turn};
use crate::telemetry::ErrorKind;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::net::TcpStream;
use tracing::debug;

/// Who is at the other end of a client connection: the TCP peer, or the
/// client a trusted load balancer's PROXY protocol header names.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub client: SocketAddr,
    /// The address the client connected to, as the header gave it; read
    /// from the socket only when a backend is to be told.
    pub destination: Option<SocketAddr>,
}

impl Peer {
    pub fn direct(client: SocketAddr) -> Peer {
        Peer {
            client,
            destination: None,
        }
    }

    fn addresses(&self, socket: &TcpStream) -> io::Result<proxy_protocol::Addresses> {
        Ok(proxy_protocol::Addresses {
            source: self.client,
            destination: match self.destination {
                Some(d) => d,
                None => socket.local_addr()?,
            },
        })
    }
}

/// A connection to a listener behind load balancers: its header first
/// (the accept loop has checked the peer is trusted), then the listener's
/// admission for the client the header names, then as any other.
pub async fn handle_behind_proxy(
    state: Arc<ListenerState>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let Some(pp) = state.proxy_protocol.as_ref() else {
        return;
    };
    let named = match proxy_protocol::read_header(&mut client, pp.versions, pp.timeout).await {
        Ok(named) => named,
        Err(why) => {
            state.note_proxy_rejected(peer, why);
            return;
        }
    };
    let peer = match named {
        Some(a) => Peer {
            client: a.source,
            destination: Some(a.destination),
        },
        None => Peer::direct(peer),
    };
    match state.admit(peer.client.ip()) {
        Ok(slot) => {
            state.outcomes.accepted();
            state.listener_metrics.accepted.increment(1);
            admitted(state, client, slot, peer).await;
        }
        Err(reason) => {
            state.outcomes.denied();
            state.note_denied(peer.client, reason);
        }
    }
}

/// An admitted connection: a TLS listener's handshake first; a listener
/// with routes then picks one, by the handshake's server name or (passing
/// TLS through) by the client's ClientHello.
pub async fn admitted(state: Arc<ListenerState>, client: TcpStream, slot: Admission, peer: Peer) {
    let Some(t) = &state.tls else {
        if state.routed.get().is_some() {
            super::routed::handle(state, client, slot, peer).await;
        } else {
            handle(state, Client::Plain(client), slot, peer, None).await;
        }
        return;
    };
    match tls::accept(t, client).await {
        Ok(stream) => {
            let name = stream.get_ref().1.server_name().map(str::to_owned);
            let client = Client::Tls(Box::new(stream));
            super::routed::carry(state, name.as_deref(), client, slot, peer, None).await;
        }
        Err(why) => state.note_tls_rejected(peer.client, why),
    }
}

/// `_admitted` holds the connection's place under the listener's limits
/// until this returns. `preface`: bytes already read from the client (a
/// routed listener's ClientHello), which every backend tried gets first.
pub async fn handle(
    state: Arc<ListenerState>,
    mut client: Client,
    _admitted: Admission,
    peer: Peer,
    preface: Option<Vec<u8>>,
) {
    let arrived = state.clock.now();
    apply_socket_options(client.tcp(), &state.socket, Side::Client);
    if let (Client::Plain(tcp), None) = (&client, &preface)
        && !first_byte_in_time(&state, tcp).await
    {
        return;
    }
    let key = client_key(crate::config::canonical_ip(peer.client.ip()));
    let (table, plan) = state
        .router
        .plan_next(state.connect_attempts, key, state.clock.now());
    let mut from = 0;
    let mut replay: Option<copy::Replay> = None;
    // Whose fault the latest failure was, for the client's closing if no
    // attempt is left.
    let mut last = Blame::Upstream;
    loop {
        let connected = connect_first(&state, &table.groups, &plan, from, last).await;
        let (i, tcp, connect) = match connected {
            Ok(connected) => connected,
            Err(last) => {
                // Every attempt failed: close the client now rather than let it hang.
                no_backend(&state, &peer, arrived, plan.len(), last);
                return;
            }
        };
        let attempt = plan[i];
        let opening = Opening {
            attempt,
            routes: &table.groups[attempt.group],
            addr: table.groups[attempt.group].addr(attempt.backend),
            peer: &peer,
            preface: preface.as_deref(),
        };
        let (mut upstream, connect) = match open(&state, opening, client.tcp(), tcp, connect).await
        {
            Ok(opened) => opened,
            Err(blame) => {
                last = blame;
                from = i + 1;
                continue;
            }
        };
        if let Some(r) = replay.take() {
            // The previous backend reset before answering: give this one
            // what the client had sent.
            if let Err(e) = copy::resend(upstream.tcp(), &r).await {
                last = resend_failed(&state, (&table.groups[attempt.group], attempt.backend), &e);
                from = i + 1;
                replay = Some(r);
                continue;
            }
        }
        // Replay only when another attempt is left; otherwise an early
        // reset is an ordinary reset of this backend.
        let can_retry = i + 1 < plan.len();
        let start = Start {
            client: peer.client,
            arrived,
            connect,
            // The client has spoken: its preface is the first request.
            preface_sent: preface.as_ref().map(|_| state.clock.now()),
            preface_bytes: preface.as_ref().map_or(0, |p| p.len() as u64),
        };
        let copied = proxy_one(
            &state,
            &table.groups,
            attempt,
            (&mut client, &mut upstream),
            start,
            can_retry,
        )
        .await;
        match copied.replay {
            Some(r) => {
                state.outcomes.retried();
                debug!(listener = %state.name, bytes = r.bytes.len(), "backend reset before answering; replaying to the next");
                from = i + 1;
                replay = Some(r);
            }
            None => return,
        }
    }
}

/// Slow-loris guard: a client that says nothing within
/// `first_byte_timeout` gets no upstream connection and is closed. False
/// when it was closed.
async fn first_byte_in_time(state: &ListenerState, client: &TcpStream) -> bool {
    let Some(limit) = state.first_byte_timeout else {
        return true;
    };
    let mut byte = [0u8; 1];
    match tokio::time::timeout(limit, client.peek(&mut byte)).await {
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
        Err(_) => {
            state.listener_metrics.first_byte_timeout.increment(1);
            debug!(listener = %state.name, ?limit, "client sent nothing; closing");
            false
        }
    }
}

/// A connected backend about to carry a client.
struct Opening<'a> {
    attempt: Attempt,
    routes: &'a Routes,
    addr: SocketAddr,
    peer: &'a Peer,
    preface: Option<&'a [u8]>,
}

/// Makes a connected backend ready for the client's bytes: the PROXY
/// protocol header, the group's TLS handshake (its time joins `connect`,
/// recorded here), then the client's preface. On failure, whose it was
/// (a backend's counts against it).
async fn open(
    state: &ListenerState,
    o: Opening<'_>,
    client: &TcpStream,
    tcp: TcpStream,
    connect: Duration,
) -> Result<(Upstream, Duration), Blame> {
    let group = o.attempt.group;
    if let Some(version) = state.send_proxy_protocol[group]
        && let Err(e) = send_header(version, o.peer, client, &tcp).await
    {
        return Err(resend_failed(state, (o.routes, o.attempt.backend), &e));
    }
    let (mut upstream, connect) = match &state.tls_to[group] {
        None => (Upstream::Plain(tcp), connect),
        Some(t) => {
            let started = state.clock.now();
            match tls::connect(t, o.addr, tcp, state.connect_timeout).await {
                Ok(s) => {
                    let now = state.clock.now();
                    let connect = connect + now.saturating_sub(started);
                    record_connect(state, o.routes, o.attempt, (connect, now));
                    (Upstream::Tls(Box::new(s)), connect)
                }
                Err(e) => return Err(tls_failed(state, (o.routes, o.attempt.backend), &e)),
            }
        }
    };
    if let Some(p) = o.preface
        && let Err(e) = upstream.write_all(p).await
    {
        return Err(resend_failed(state, (o.routes, o.attempt.backend), &e));
    }
    Ok((upstream, connect))
}

/// A backend's TLS handshake failed: its fault, counted against its
/// `connect` signal as a failed connect would be.
fn tls_failed(state: &ListenerState, (routes, b): (&Routes, usize), e: &io::Error) -> Blame {
    let blame = Blame::of_connect(e);
    if blame == Blame::Upstream {
        super::eject::backend_failed(state, (routes, b), Signal::Connect);
        routes.extra(b).metrics.error(ErrorKind::TlsHandshake);
        state.outcomes.connect_failed(ConnectFailure::Other);
    }
    debug!(listener = %state.name, backend = %routes.addr(b), error = %e, "TLS handshake with the backend failed");
    blame
}

/// A `connect` sample for the backend of `attempt` (in `routes`, its
/// group, whose balancer may read it): `took`, ending `now`.
fn record_connect(
    state: &ListenerState,
    routes: &Routes,
    attempt: Attempt,
    (took, now): (Duration, Duration),
) {
    routes.observe(attempt.backend, Signal::Connect, took, now);
    if state.record_latency {
        let tally = routes.extra(attempt.backend);
        tally.stats.record(Signal::Connect, now, took);
        tally.metrics.latency(Signal::Connect, took);
    }
}

/// The PROXY protocol header a backend of this group is sent before any
/// of the client's bytes.
async fn send_header(
    version: crate::config::ProxyVersion,
    peer: &Peer,
    client: &TcpStream,
    upstream: &TcpStream,
) -> io::Result<()> {
    let header = proxy_protocol::encode(version, peer.addresses(client)?);
    copy::write_all(upstream, &header).await
}

/// Every attempt failed: count, log, trace. When portshift itself could
/// not make an attempt (out of descriptors or local ports), the client's
/// closing is counted as a local error, not as backends being down.
fn no_backend(state: &ListenerState, peer: &Peer, arrived: Duration, attempts: usize, last: Blame) {
    let outcome = if last == Blame::Local {
        state.outcomes.local_error();
        state.listener_metrics.local_error.increment(1);
        debug!(listener = %state.name, attempts, "no upstream connection could be made (local resources); closing client");
        "local_error"
    } else {
        state.outcomes.no_backend();
        state.listener_metrics.no_backend.increment(1);
        debug!(listener = %state.name, attempts, "no backend reachable; closing client");
        "no_backend"
    };
    if state.logs_connections() {
        let now = state.clock.now();
        state.log_connection(&AccessRecord {
            time: state.clock.wall(arrived),
            t_s: arrived,
            listener: &state.unit.listener,
            route: state.route(),
            client: peer.client,
            group: "",
            backend: "",
            connect_ms: None,
            first_byte_ms: None,
            total_ms: Some(now.saturating_sub(arrived)),
            bytes_to_backend: 0,
            bytes_to_client: 0,
            outcome,
            ended_by: last.name(),
        });
    }
}

/// Copies between the client and one connected backend, recording every
/// signal and outcome against that backend.
async fn proxy_one(
    state: &ListenerState,
    groups: &[Arc<Routes>],
    attempt: Attempt,
    (client, upstream): (&mut Client, &mut Upstream),
    start: Start,
    can_retry: bool,
) -> copy::Copied {
    state.outcomes.connected();
    apply_socket_options(upstream.tcp(), &state.socket, Side::Upstream);
    let routes = &groups[attempt.group];
    let _tracked = routes.track(attempt.backend);
    let metrics = &routes.extra(attempt.backend).metrics;
    let stats = &routes.extra(attempt.backend).stats;
    metrics.connections.increment(1);
    metrics.active.increment(1.0);
    let first_byte_us = AtomicU64::new(0);
    let record = state.record_latency;
    let on_turn = |turn: Turn, now: Duration| {
        // A latency-aware balancer reads the turns whether or not they
        // are recorded.
        routes.observe(attempt.backend, Signal::Exchange, turn.latency, now);
        if !record {
            return;
        }
        stats.record(Signal::Exchange, now, turn.latency);
        metrics.latency(Signal::Exchange, turn.latency);
        if turn.first_byte {
            first_byte_us.store(turn.latency.as_micros().max(1) as u64, Relaxed);
            stats.record(Signal::FirstByte, now, turn.latency);
            metrics.latency(Signal::FirstByte, turn.latency);
        }
    };
    let options = copy::CopyOptions {
        idle: state.idle_timeout,
        keep_replay: state.retry_on_early_reset && can_retry,
        splice: state.splice,
        client_spoke_at: start.preface_sent,
    };
    let mut copied = match (client, upstream) {
        (Client::Plain(c), Upstream::Plain(u)) => {
            copy::bidirectional(c, u, state.clock, &on_turn, options).await
        }
        (c, u) => {
            let (clock, idle) = (state.clock, state.idle_timeout);
            copy::stream::bidirectional(c.io(), u.io(), clock, &on_turn, idle, start.preface_sent)
                .await
        }
    };
    copied.up += start.preface_bytes;
    metrics.active.decrement(1.0);
    metrics.to_backend.increment(copied.up);
    metrics.to_client.increment(copied.down);
    count_end(state, routes, attempt, copied.end);
    if copied.replay.is_none() {
        state.outcomes.ended(copied.end, copied.up, copied.down);
    }
    if state.logs_connections() {
        let fb = first_byte_us.load(Relaxed);
        let first_byte = (fb > 0).then(|| Duration::from_micros(fb));
        log_one(
            state,
            (&groups[attempt.group], attempt.backend),
            &start,
            first_byte,
            &copied,
        );
    }
    copied
}

/// Counts how a proxied connection ended against the side that ended it:
/// only the backend's own failure reaches its window (and so its error
/// rate and the policy).
fn count_end(state: &ListenerState, routes: &Routes, attempt: Attempt, end: End) {
    let metrics = &routes.extra(attempt.backend).metrics;
    if end != End::Failed(Blame::Upstream) {
        routes.member(attempt.backend).eject.on_success();
    }
    match end {
        End::Closed { .. } => {}
        End::IdleTimeout => metrics.error(ErrorKind::IdleTimeout),
        End::Failed(Blame::Upstream) => {
            super::eject::backend_failed(state, (routes, attempt.backend), Signal::Exchange);
            metrics.error(ErrorKind::Reset);
        }
        // The client aborted: counted, never the backend's fault.
        End::Failed(Blame::Client) => metrics.error(ErrorKind::ClientReset),
        End::Failed(Blame::Local) => state.listener_metrics.local_error.increment(1),
    }
}

/// Who came when, how long its upstream connect took, and when the
/// client's preface (if any) went to the backend.
struct Start {
    client: SocketAddr,
    arrived: Duration,
    connect: Duration,
    preface_sent: Option<Duration>,
    preface_bytes: u64,
}

/// The access-log line of a connection that reached a backend.
fn log_one(
    state: &ListenerState,
    (routes, backend): (&Routes, usize),
    start: &Start,
    first_byte: Option<Duration>,
    copied: &copy::Copied,
) {
    let now = state.clock.now();
    state.log_connection(&AccessRecord {
        time: state.clock.wall(start.arrived),
        t_s: start.arrived,
        listener: &state.unit.listener,
        route: state.route(),
        client: start.client,
        group: &routes.name,
        backend: &routes.addr(backend).to_string(),
        connect_ms: Some(start.connect),
        first_byte_ms: first_byte,
        total_ms: Some(now.saturating_sub(start.arrived)),
        outcome: if copied.replay.is_some() {
            "reset_retried"
        } else {
            copied.end.name()
        },
        bytes_to_backend: copied.up,
        bytes_to_client: copied.down,
        ended_by: copied.end.ended_by().name(),
    });
}

/// Giving a fresh backend the client's first bytes failed: the backend's
/// reset counts against it, portshift's own shortage does not.
fn resend_failed(state: &ListenerState, (routes, b): (&Routes, usize), e: &io::Error) -> Blame {
    let blame = Blame::of_io(Side::Upstream, e);
    if blame == Blame::Upstream {
        super::eject::backend_failed(state, (routes, b), Signal::Exchange);
        routes.extra(b).metrics.error(ErrorKind::Reset);
    }
    debug!(listener = %state.name, error = %e, ?blame, "replaying the client's bytes failed");
    blame
}

/// Tries the plan in order; a refused or timed-out backend is followed by the
/// next one before the client has seen anything. The backend's failures
/// count against its `connect` signal, so a group that fails fast never
/// looks fast; an attempt portshift could not make (EMFILE, EADDRNOTAVAIL)
/// is counted as local and left out of the backend's statistics. When all
/// fail: whose fault the last failure was (`last` if no attempt was left).
async fn connect_first(
    state: &ListenerState,
    groups: &[Arc<Routes>],
    plan: &[Attempt],
    from: usize,
    mut last: Blame,
) -> Result<(usize, TcpStream, Duration), Blame> {
    for (i, &attempt) in plan.iter().enumerate().skip(from) {
        let routes = &groups[attempt.group];
        let addr = routes.addr(attempt.backend);
        let metrics = &routes.extra(attempt.backend).metrics;
        let started = state.clock.now();
        let failure =
            match tokio::time::timeout(state.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let now = state.clock.now();
                    let took = now - started;
                    // A TLS group's sample waits for its handshake.
                    if state.tls_to[attempt.group].is_none() {
                        record_connect(state, routes, attempt, (took, now));
                    }
                    return Ok((i, stream, took));
                }
                Ok(Err(e)) => {
                    crate::telemetry::connect_errno(&state.unit, crate::telemetry::errno_name(&e));
                    if Blame::of_connect(&e) == Blame::Local {
                        ConnectFailure::Local
                    } else if e.kind() == io::ErrorKind::ConnectionRefused {
                        ConnectFailure::Refused
                    } else {
                        ConnectFailure::Other
                    }
                }
                Err(_) => {
                    crate::telemetry::connect_errno(&state.unit, "timeout");
                    ConnectFailure::Timeout
                }
            };
        let kind = match failure {
            ConnectFailure::Refused => Some(ErrorKind::ConnectRefused),
            ConnectFailure::Timeout => Some(ErrorKind::ConnectTimeout),
            ConnectFailure::Other => Some(ErrorKind::ConnectError),
            ConnectFailure::Local => None,
        };
        if let Some(kind) = kind {
            super::eject::backend_failed(state, (routes, attempt.backend), Signal::Connect);
            metrics.error(kind);
            last = Blame::Upstream;
        } else {
            last = Blame::Local;
        }
        state.outcomes.connect_failed(failure);
        if i + 1 < plan.len() {
            state.outcomes.retried();
        }
        debug!(listener = %state.name, backend = %addr, ?failure, "upstream connect failed");
    }
    Err(last)
}

/// Linux copies `TCP_NODELAY` from a listening socket to the sockets it
/// accepts, so the client side gets it from `prepare_listener` once, not
/// from a `setsockopt` per connection (one syscall of about twenty in a
/// short connection's life).
const NODELAY_INHERITED: bool = cfg!(target_os = "linux");

/// The listener's options that accepted sockets inherit, set on the
/// listening socket itself (again at each start, so a reload that changes
/// them applies to its kept sockets too).
pub fn prepare_listener(listener: &tokio::net::TcpListener, o: &SocketOptions) {
    if NODELAY_INHERITED && let Err(e) = socket2::SockRef::from(listener).set_tcp_nodelay(o.nodelay)
    {
        debug!(error = %e, "nodelay not applied to the listening socket");
    }
}

/// The listener's socket options, on one side of a proxied connection.
/// A refused option (e.g. a buffer size above the system cap) is logged,
/// never fatal: the connection works with the system's default.
fn apply_socket_options(stream: &TcpStream, o: &SocketOptions, side: Side) {
    let sock = socket2::SockRef::from(stream);
    let report = |option: &str, r: io::Result<()>| {
        if let Err(e) = r {
            debug!(option, error = %e, "socket option not applied");
        }
    };
    if !(NODELAY_INHERITED && side == Side::Client) {
        report("nodelay", sock.set_tcp_nodelay(o.nodelay));
    }
    if let Some(k) = o.keepalive {
        let params = socket2::TcpKeepalive::new()
            .with_time(k.time)
            .with_interval(k.interval)
            .with_retries(k.count);
        report("keepalive", sock.set_tcp_keepalive(&params));
    }
    if let Some(n) = o.send_buffer {
        report("send_buffer", sock.set_send_buffer_size(n as usize));
    }
    if let Some(n) = o.recv_buffer {
        report("recv_buffer", sock.set_recv_buffer_size(n as usize));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client side of every proxied connection gets the listener's
    /// `nodelay`, whether it is set per connection or inherited, and a
    /// restart on the same socket (a reload) that changes it takes effect.
    #[tokio::test]
    async fn accepted_sockets_carry_the_listeners_nodelay() {
        let listener = super::super::bind_one("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        for nodelay in [true, false, true] {
            let o = SocketOptions {
                nodelay,
                ..SocketOptions::default()
            };
            prepare_listener(&listener, &o);
            let _client = TcpStream::connect(addr).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            apply_socket_options(&accepted, &o, Side::Client);
            assert_eq!(accepted.nodelay().unwrap(), nodelay, "nodelay = {nodelay}");
        }
    }
}
