//! One client connection: connect upstream following the route plan, then
//! copy until done, counting every outcome.

use super::ListenerState;
use super::copy;
use super::outcome::ConnectFailure;
use crate::core::routes::Attempt;
use std::io;
use std::sync::Arc;
use tokio::net::TcpStream;
use tracing::debug;

pub async fn handle(state: Arc<ListenerState>, mut client: TcpStream) {
    let _active = state.outcomes.active_guard();
    let (table, plan) = state.router.plan_next(state.connect_attempts);
    let Some((attempt, mut upstream)) = connect_first(&state, &table.groups, &plan).await else {
        // Every attempt failed: close the client now rather than let it hang.
        state.outcomes.no_backend();
        debug!(listener = %state.name, attempts = plan.len(), "no backend reachable; closing client");
        return;
    };
    state.outcomes.connected();
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _tracked = table.groups[attempt.group].track(attempt.backend);
    let copied = copy::bidirectional(&mut client, &mut upstream, state.idle_timeout).await;
    state.outcomes.ended(copied.end, copied.up, copied.down);
}

/// Tries the plan in order; a refused or timed-out backend is followed by the
/// next one before the client has seen anything.
async fn connect_first(
    state: &ListenerState,
    groups: &[Arc<crate::core::routes::GroupRoutes>],
    plan: &[Attempt],
) -> Option<(Attempt, TcpStream)> {
    for (i, &attempt) in plan.iter().enumerate() {
        let addr = groups[attempt.group].addr(attempt.backend);
        let failure = match tokio::time::timeout(state.connect_timeout, TcpStream::connect(addr))
            .await
        {
            Ok(Ok(stream)) => return Some((attempt, stream)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            Ok(Err(_)) => ConnectFailure::Other,
            Err(_) => ConnectFailure::Timeout,
        };
        state.outcomes.connect_failed(failure);
        if i + 1 < plan.len() {
            state.outcomes.retried();
        }
        debug!(listener = %state.name, backend = %addr, ?failure, "upstream connect failed");
    }
    None
}
