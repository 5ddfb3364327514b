//! The member's session with etcd: a lease kept alive every third of its
//! TTL, the member key on it (refreshed with each renewal, so `/status`
//! shows when each member was last seen), and a campaign in the fleet's
//! election. Losing the lease (etcd gone for a TTL, or this process
//! stopped for longer) ends the leadership and the membership; the session
//! then starts over with a new lease.

use super::{Fleet, MemberRecord, lock, wall_time};
use crate::etcd::{EtcdError, LeaderKey};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

type Campaign = Pin<Box<dyn Future<Output = Result<LeaderKey, EtcdError>> + Send>>;

pub(super) async fn run(fleet: Arc<Fleet>, stop: CancellationToken) {
    let ttl = fleet.cfg.lease_ttl;
    let mut backoff = Duration::from_millis(250);
    let mut warned = false;
    loop {
        let lease = tokio::select! {
            () = stop.cancelled() => return,
            r = fleet.etcd.grant(ttl) => r,
        };
        let lease = match lease {
            Ok(l) => l,
            Err(e) => {
                crate::telemetry::fleet::store_error("lease");
                if !warned {
                    warn!(fleet = %fleet.cfg.name, error = %e, "cannot take a lease in etcd; retrying (logged once until it succeeds)");
                    warned = true;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ttl);
                continue;
            }
        };
        warned = false;
        backoff = Duration::from_millis(250);
        {
            let mut i = lock(&fleet.inner);
            i.lease = Some(lease);
            fleet.set_role(&mut i);
        }
        if let Err(e) = put_member(&fleet, lease).await {
            warn!(fleet = %fleet.cfg.name, error = %e, "cannot register in etcd; retrying at the next renewal");
        }
        info!(fleet = %fleet.cfg.name, member = %fleet.member, admin = %fleet.admin, lease = format!("{lease:x}"), "joined the fleet");
        hold(&fleet, lease, &stop).await;
        {
            let mut i = lock(&fleet.inner);
            i.lease = None;
            i.leading = None;
            fleet.set_role(&mut i);
        }
        if stop.is_cancelled() {
            // Leaving: the lease's keys go at once, so a successor need not
            // wait out the TTL.
            let _ = tokio::time::timeout(Duration::from_secs(1), fleet.etcd.revoke(lease)).await;
            return;
        }
    }
}

async fn put_member(fleet: &Fleet, lease: i64) -> Result<i64, EtcdError> {
    let m = MemberRecord {
        member: fleet.member.clone(),
        admin: fleet.admin.to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started: fleet.started.clone(),
        seen: wall_time(),
    };
    let value = serde_json::to_vec(&m).expect("a member record serializes");
    fleet
        .etcd
        .put(&fleet.key("members", &fleet.member), &value, Some(lease))
        .await
}

fn campaign(fleet: &Fleet, lease: i64, after: Duration) -> Campaign {
    let etcd = fleet.etcd.clone();
    let name = fleet.election();
    let value = fleet.member.clone().into_bytes();
    Box::pin(async move {
        tokio::time::sleep(after).await;
        etcd.campaign(&name, lease, &value).await
    })
}

/// Keeps `lease` alive and campaigns on it until it is lost or `stop`.
async fn hold(fleet: &Fleet, lease: i64, stop: &CancellationToken) {
    let ttl = fleet.cfg.lease_ttl;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut renewed = Instant::now();
    let mut running: Option<Campaign> = Some(campaign(fleet, lease, Duration::ZERO));
    loop {
        let elect = async {
            match running.as_mut() {
                Some(c) => c.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            r = elect => {
                running = None;
                match r {
                    Ok(key) if key.lease == lease => elected(fleet, key),
                    Ok(key) => warn!(fleet = %fleet.cfg.name, lease = format!("{:x}", key.lease), "the election answered for another lease; campaigning again"),
                    Err(e) => {
                        crate::telemetry::fleet::store_error("campaign");
                        warn!(fleet = %fleet.cfg.name, error = %e, "campaign failed; campaigning again in 1s");
                    }
                }
                if lock(&fleet.inner).leading.is_none() {
                    running = Some(campaign(fleet, lease, Duration::from_secs(1)));
                }
            }
            () = fleet.lost_lead.notified() => {
                if running.is_none() {
                    running = Some(campaign(fleet, lease, Duration::ZERO));
                }
            }
            _ = tick.tick() => match fleet.etcd.keepalive(lease).await {
                Ok(left) if left > 0 => {
                    renewed = Instant::now();
                    let _ = put_member(fleet, lease).await;
                }
                Ok(_) => {
                    warn!(fleet = %fleet.cfg.name, member = %fleet.member, "the lease had expired (this process stalled or etcd was away for a TTL); rejoining");
                    return;
                }
                Err(e) => {
                    crate::telemetry::fleet::store_error("keepalive");
                    if renewed.elapsed() >= ttl {
                        warn!(fleet = %fleet.cfg.name, error = %e, "no lease renewal for a TTL: leaving the leadership and rejoining");
                        return;
                    }
                }
            },
        }
    }
}

fn elected(fleet: &Fleet, key: LeaderKey) {
    let now = fleet.clock.now();
    let mut i = lock(&fleet.inner);
    info!(fleet = %fleet.cfg.name, member = %fleet.member, term = key.rev, "elected fleet leader");
    i.leading = Some(key);
    i.term += 1;
    i.elected_at = Some(now);
    fleet.set_role(&mut i);
}
