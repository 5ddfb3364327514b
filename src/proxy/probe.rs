//! Active probes: one task per backend of every group that configures a
//! probe. Each round connects, optionally sends bytes and expects a reply
//! prefix, records the latency (or the failure) as the `probe` signal, and
//! feeds rise/fall hysteresis that marks the backend up or down in the
//! route table. A group at 0% traffic still has a signal this way.

use super::state::{ListenerState, Tally};
use crate::config::{Probe, TlsOriginate};
use crate::core::probe::{ProbeHealth, Transition};
use crate::core::routes::Member;
use crate::core::stats::Signal;
use crate::telemetry::ErrorKind;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Starts a probe task for every backend of every probed group.
pub fn spawn_all(state: &Arc<ListenerState>, tasks: &TaskTracker, stop: &CancellationToken) {
    let table = state.router.table();
    for (group, routes) in table.groups.iter().enumerate() {
        for member in routes.members() {
            spawn_one(state, (group, member), tasks, stop);
        }
    }
}

/// Starts the probe of one backend of `group`, if the group probes. The
/// task ends with `stop`, or once the backend is no longer a member.
pub fn spawn_one(
    state: &Arc<ListenerState>,
    (group, member): (usize, &Arc<Member<Tally>>),
    tasks: &TaskTracker,
    stop: &CancellationToken,
) {
    let Some(probe) = state.probes[group].clone() else {
        return;
    };
    let (state, member, stop) = (Arc::clone(state), Arc::clone(member), stop.clone());
    tasks.spawn(run(state, (group, member), probe, stop));
}

/// Whether `member` is still one of `group`'s backends.
fn still_member(state: &ListenerState, group: usize, member: &Arc<Member<Tally>>) -> bool {
    let table = state.router.table();
    table.groups[group]
        .members()
        .iter()
        .any(|m| Arc::ptr_eq(m, member))
}

async fn run(
    state: Arc<ListenerState>,
    (group, member): (usize, Arc<Member<Tally>>),
    probe: Probe,
    stop: CancellationToken,
) {
    let group_name = state.group_names().swap_remove(group);
    let addr = member.addr;
    let (stats, metrics) = (&member.extra.stats, &member.extra.metrics);
    let mut health = ProbeHealth::new(probe.rise, probe.fall);
    // Backends that require a PROXY protocol header get the form that
    // names no client.
    let header = state.send_proxy_protocol[group].map(super::proxy_protocol::local);
    let tls = state.tls_to[group].as_ref();
    metrics.probe_up.set(1.0);
    let mut tick = tokio::time::interval(probe.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !still_member(&state, group, &member) {
            debug!(listener = %state.name, group = %group_name, backend = %addr, "probe ends: the backend left its group");
            return;
        }
        let started = state.clock.now();
        let ok = matches!(
            tokio::time::timeout(probe.timeout, check(addr, &probe, header.as_deref(), tls)).await,
            Ok(Ok(()))
        );
        let now = state.clock.now();
        if ok {
            stats.record(Signal::Probe, now, now - started);
            metrics.latency(Signal::Probe, now - started);
        } else {
            stats.record_error(Signal::Probe, now);
            metrics.error(ErrorKind::ProbeFailure);
        }
        match health.observe(ok) {
            Some(Transition::WentDown) => {
                warn!(listener = %state.name, group = %group_name, backend = %addr, fall = probe.fall, "probe: backend down");
                member.set_up(false, now);
                metrics.probe_up.set(0.0);
            }
            Some(Transition::CameUp) => {
                info!(listener = %state.name, group = %group_name, backend = %addr, rise = probe.rise, "probe: backend up");
                member.set_up(true, now);
                metrics.probe_up.set(1.0);
            }
            None => {}
        }
    }
}

/// One probe round: connect (and the group's TLS handshake, which a
/// backend passes only with a certificate the group trusts), send,
/// expect. The caller bounds it in time.
async fn check(
    addr: SocketAddr,
    probe: &Probe,
    header: Option<&[u8]>,
    tls: Option<&TlsOriginate>,
) -> io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    if let Some(h) = header {
        s.write_all(h).await?;
    }
    match tls {
        None => exchange(&mut s, probe).await,
        Some(t) => {
            let mut s = super::tls::connect(t, addr, s, probe.timeout).await?;
            exchange(&mut s, probe).await?;
            // A clean close (close_notify), so the backend logs no error.
            s.shutdown().await
        }
    }
}

/// The probe's `send` and `expect`, over whatever stream the round has.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, probe: &Probe) -> io::Result<()> {
    if let Some(send) = &probe.send {
        s.write_all(send).await?;
        s.flush().await?;
    }
    let Some(expect) = &probe.expect else {
        return Ok(());
    };
    let mut got = vec![0u8; expect.len()];
    s.read_exact(&mut got).await?;
    if &got == expect {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "reply does not start with `expect`",
        ))
    }
}
