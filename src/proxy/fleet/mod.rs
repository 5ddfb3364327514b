//! Fleet mode: instances that share one decision per listener, on etcd.
//!
//! Every member keeps a lease in etcd with its admin address, campaigns in
//! etcd's election, and watches the fleet's keys. The elected leader's
//! policy loops evaluate on every member's windows merged (`lead.rs`) and
//! write the weights with a transaction conditioned on the leadership; the
//! members apply what they watch (`store.rs`). Operator pins and pauses go
//! through etcd too, so they hold on every member. A member that cannot
//! hear its fleet keeps the last weights, and once they are older than
//! `stale_after` decides alone until the fleet is back
//! (`core::fleet::Standing`). The lease and the campaign live in
//! `session.rs`; what is stored where, in `record.rs`.

mod lead;
mod promql;
mod record;
mod session;
mod store;
mod window;

pub use lead::{Commit, Gathered, window_of};
pub use record::{ControlRecord, MemberRecord, StateRecord, WeightsRecord};
pub use window::{GroupWire, WindowWire, signal_named};

use super::clock::Clock;
use super::runtime::Shared;
use super::state::ListenerState;
use crate::config::Fleet as FleetConfig;
use crate::core::fleet::Standing;
use crate::core::policy::{Policy, PolicyState};
use crate::core::routes::Weights;
use crate::etcd::{Etcd, LeaderKey};
use crate::http_client::HttpClient;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;
use tracing::{info, warn};

/// How long a member waits for etcd at start before it accepts
/// connections without the fleet's weights (it takes them when it hears).
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Fleet {
    pub cfg: FleetConfig,
    /// This member's id.
    pub member: String,
    /// Where the other members reach this one's admin API.
    pub admin: SocketAddr,
    etcd: Etcd,
    http: HttpClient,
    clock: Clock,
    /// When this member joined (the origin of "never heard" ages).
    joined: Duration,
    started: String,
    /// `/portshift/fleet/{name}/`.
    prefix: String,
    shared: Weak<Shared>,
    inner: Mutex<Inner>,
    /// Signalled when the leadership is lost while the lease lives, so the
    /// session campaigns again.
    lost_lead: Notify,
    /// A Prometheus that does not answer is logged once a second.
    prometheus_log: crate::proxy::throttle::OncePerSecond,
}

#[derive(Default)]
struct Inner {
    lease: Option<i64>,
    leading: Option<LeaderKey>,
    /// Bumped at every election this member wins.
    term: u64,
    elected_at: Option<Duration>,
    /// Election candidates by creation revision: the lowest leads.
    candidates: BTreeMap<i64, (String, String)>,
    members: BTreeMap<String, MemberRecord>,
    weights: HashMap<String, Heard>,
    controls: HashMap<String, (i64, ControlRecord)>,
    /// This member's writes as leader, per listener.
    written: HashMap<String, Written>,
    seq: u64,
    role: &'static str,
}

/// The latest fleet weights of a listener, and when they were heard.
struct Heard {
    record: WeightsRecord,
    rev: i64,
    at: Duration,
    /// The time of the last decision shown in this member's `/status`.
    shown_decision: Option<String>,
}

struct Written {
    at: Duration,
    weights: Vec<u16>,
    state: StateRecord,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wall_time() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The host's name, for the default member id.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

impl Fleet {
    /// Joins the fleet: takes a lease, registers, and reads the fleet's
    /// weights and controls before returning, so the first connection
    /// already follows them. If etcd does not answer within a few seconds
    /// the member starts without (and says so); the session keeps trying.
    pub(super) async fn join(
        shared: &Arc<Shared>,
        cfg: FleetConfig,
        admin_bound: SocketAddr,
    ) -> Arc<Fleet> {
        let admin = cfg.advertise.unwrap_or(admin_bound);
        let member = cfg
            .member
            .clone()
            .unwrap_or_else(|| format!("{}-{}", hostname(), admin_bound.port()));
        let fleet = Arc::new(Fleet {
            etcd: Etcd::new(&cfg.etcd),
            prefix: format!("/portshift/fleet/{}/", cfg.name),
            http: HttpClient::default(),
            clock: shared.clock,
            joined: shared.clock.now(),
            started: wall_time(),
            shared: Arc::downgrade(shared),
            inner: Mutex::new(Inner {
                role: "detached",
                ..Inner::default()
            }),
            lost_lead: Notify::new(),
            prometheus_log: crate::proxy::throttle::OncePerSecond::new(),
            member,
            admin,
            cfg,
        });
        crate::telemetry::fleet::role(&fleet.cfg.name, "detached");
        crate::telemetry::fleet::members(&fleet.cfg.name, 0);
        crate::telemetry::fleet::register_store_errors();
        match tokio::time::timeout(JOIN_TIMEOUT, fleet.sync()).await {
            Ok(Ok(rev)) => {
                info!(fleet = %fleet.cfg.name, member = %fleet.member, revision = rev, "read the fleet's weights and controls")
            }
            Ok(Err(e)) => {
                warn!(fleet = %fleet.cfg.name, error = %e, "etcd unreachable at start: serving on local weights until the fleet answers")
            }
            Err(_) => {
                warn!(fleet = %fleet.cfg.name, "etcd did not answer within {JOIN_TIMEOUT:?} at start: serving on local weights until it does")
            }
        }
        let stop = shared.stop.clone();
        shared
            .background
            .spawn(session::run(Arc::clone(&fleet), stop.clone()));
        shared
            .background
            .spawn(store::run(Arc::clone(&fleet), stop));
        fleet
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}/{name}", self.prefix)
    }

    fn election(&self) -> String {
        format!("{}election", self.prefix)
    }

    /// This member's standing for `listener` at the moment.
    pub fn standing(&self, listener: &str) -> Standing {
        let i = lock(&self.inner);
        let heard = i.weights.get(listener).map(|h| h.at);
        let heard = match (i.leading.is_some(), heard, i.elected_at) {
            (true, h, Some(e)) => Some(h.map_or(e, |h| h.max(e))),
            (_, h, _) => h,
        };
        Standing {
            leader: i.leading.is_some(),
            heard,
            joined: self.joined,
        }
    }

    /// Changes at every election this member wins.
    pub fn term(&self) -> u64 {
        lock(&self.inner).term
    }

    /// The policy state the fleet last wrote for `listener`, as this
    /// process continues it at `now`; `None` without a fitting record, or
    /// when the record is stale (a member that decided alone while etcd
    /// was away knows better than the fleet's last word).
    pub fn adopt(&self, listener: &str, policy: &Policy, now: Duration) -> Option<PolicyState> {
        let i = lock(&self.inner);
        let h = i.weights.get(listener)?;
        if now.saturating_sub(h.at) >= self.cfg.stale_after {
            return None;
        }
        let weights = Weights::new(h.record.state.weights_bp.clone()).ok()?;
        h.record
            .state
            .state(policy, weights, now, now.saturating_sub(h.at))
    }

    /// Seconds since the weights in force for `listener` were heard.
    pub fn weights_age(&self, listener: &str, now: Duration) -> f64 {
        self.standing(listener).age(now).as_secs_f64()
    }

    /// The listener in force under `name`, if the proxy still runs.
    fn listener(&self, name: &str) -> Option<Arc<ListenerState>> {
        self.shared.upgrade()?.listener(name)
    }

    /// Applies what the fleet knows of `state`'s listener (a listener just
    /// started or replaced by a reload).
    pub(super) fn apply_known(&self, state: &Arc<ListenerState>) {
        let mut i = lock(&self.inner);
        if let Some((_, c)) = i.controls.get(&state.name) {
            store::apply_control(state, c);
        }
        if let Some(h) = i.weights.get_mut(&state.name) {
            store::apply_weights(state, h, &self.member);
        }
    }

    /// Sets the operator's steering of `state`'s listener for the whole
    /// fleet: written to etcd first, applied here once etcd has it. On
    /// failure nothing changed, and the error says why.
    pub async fn steer(
        &self,
        state: &Arc<ListenerState>,
        change: impl FnOnce(&mut ControlRecord),
    ) -> Result<ControlRecord, String> {
        let mut c = lock(&self.inner)
            .controls
            .get(&state.name)
            .map(|(_, c)| c.clone())
            .unwrap_or_default();
        c.groups = state.group_names();
        change(&mut c);
        c.by = self.member.clone();
        c.time = wall_time();
        let value = serde_json::to_vec(&c).expect("a control record serializes");
        let rev = self
            .etcd
            .put(&self.key("control", &state.name), &value, None)
            .await
            .map_err(|e| {
                crate::telemetry::fleet::store_error("control");
                format!("the fleet's store did not take the change, so nothing changed on any member: {e}")
            })?;
        let mut i = lock(&self.inner);
        if i.controls.get(&state.name).is_none_or(|(r, _)| *r < rev) {
            i.controls.insert(state.name.clone(), (rev, c.clone()));
        }
        store::apply_control(state, &c);
        Ok(c)
    }

    /// The fleet as `/status` shows it.
    pub fn status(&self) -> Value {
        let now = self.clock.now();
        let i = lock(&self.inner);
        let leader = i.candidates.values().next().map(|(_, m)| m.clone());
        let members: Vec<Value> = i
            .members
            .values()
            .map(|m| json!({ "member": m.member, "admin": m.admin, "seen": m.seen, "started": m.started, "version": m.version }))
            .collect();
        let listeners: serde_json::Map<String, Value> = i
            .weights
            .iter()
            .map(|(name, h)| {
                let age = now.saturating_sub(h.at).as_secs_f64();
                let weights: serde_json::Map<String, Value> = h
                    .record
                    .groups
                    .iter()
                    .zip(&h.record.weights_bp)
                    .map(|(g, &bp)| (g.clone(), json!(f64::from(bp) / 100.0)))
                    .collect();
                (
                    name.clone(),
                    json!({
                        "weights_percent": weights, "leader": h.record.leader, "revision": h.rev,
                        "age_s": age, "phase": h.record.state.phase, "time": h.record.time,
                        "merged": h.record.merged, "missing": h.record.missing,
                    }),
                )
            })
            .collect();
        let controls: serde_json::Map<String, Value> = i
            .controls
            .iter()
            .map(|(name, (_, c))| (name.clone(), serde_json::to_value(c).unwrap_or_default()))
            .collect();
        json!({
            "name": self.cfg.name,
            "member": self.member,
            "role": i.role,
            "leader": leader,
            "members": members,
            "lease_ttl_s": self.cfg.lease_ttl.as_secs(),
            "stale_after_s": self.cfg.stale_after.as_secs_f64(),
            "listeners": listeners,
            "controls": controls,
        })
    }

    /// Updates the role gauge and logs a change.
    fn set_role(&self, i: &mut Inner) {
        let role = if i.leading.is_some() {
            "leader"
        } else if i.lease.is_some() {
            "follower"
        } else {
            "detached"
        };
        if role != i.role {
            info!(fleet = %self.cfg.name, member = %self.member, from = i.role, to = role, "fleet role changed");
            i.role = role;
            crate::telemetry::fleet::role(&self.cfg.name, role);
        }
    }
}
