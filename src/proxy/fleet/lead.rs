//! The leader's side of a decision: read every member's window for the
//! listener (in parallel, each bounded by a deadline; a member that does
//! not answer is left out and counted), merge them exactly, and after the
//! engine has decided, write the weights for the fleet, conditioned on
//! still leading.

use super::{Fleet, StateRecord, WeightsRecord, WindowWire, lock, wall_time};
use crate::config::FleetSignal;
use crate::core::policy::{Decision, GroupInput, PolicyState};
use crate::core::stats::Signal;
use crate::decision_record::DecisionRecord;
use crate::proxy::state::ListenerState;
use hyper::Method;
use std::time::Duration;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// The longest a leader waits for members' windows.
const MAX_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The inputs of one fleet-wide evaluation.
pub struct Gathered {
    pub inputs: Vec<GroupInput>,
    /// Members whose windows were merged (this one first).
    pub merged: Vec<String>,
    /// Members that did not answer in time, or answered wrong.
    pub missing: Vec<String>,
}

/// What became of a leader's write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The fleet has it.
    Written,
    /// Nothing new to write (a heartbeat was not due yet).
    Unchanged,
    /// etcd refused it: another member leads now.
    NotLeader,
    /// etcd could not be reached.
    Unreachable,
}

impl Fleet {
    /// The fleet's inputs: from Prometheus with `signal = "prometheus"`
    /// (falling back to the members' windows when it does not answer), or
    /// this member's window and every other member's, merged. Reads take at
    /// most half the policy interval (and 2 s).
    pub async fn gather(
        &self,
        state: &ListenerState,
        signal: Signal,
        now: Duration,
        interval: Duration,
    ) -> Gathered {
        let deadline = (interval / 2).min(MAX_READ_TIMEOUT);
        if let FleetSignal::Prometheus { url, selector } = &self.cfg.signal {
            let q = super::promql::Query {
                http: &self.http,
                url,
                selector: selector.as_deref(),
                unit: &state.unit,
                window: state.window(),
                timeout: deadline,
            };
            match q.inputs(&state.group_names(), signal).await {
                Ok(inputs) => {
                    return Gathered {
                        inputs,
                        merged: vec!["prometheus".to_owned()],
                        missing: Vec::new(),
                    };
                }
                Err(e) => {
                    crate::telemetry::fleet::store_error("prometheus");
                    if let Some(held) = self.prometheus_log.allow(now) {
                        warn!(listener = %state.name, error = %e, not_logged = held, "prometheus did not answer; this decision merges the members' windows instead (logged at most once a second)");
                    }
                }
            }
        }
        self.read_members(state, signal, now, deadline).await
    }

    async fn read_members(
        &self,
        state: &ListenerState,
        signal: Signal,
        now: Duration,
        deadline: Duration,
    ) -> Gathered {
        let mut inputs = state.policy_inputs(signal, now);
        let groups = state.group_names();
        let peers: Vec<(String, String)> = lock(&self.inner)
            .members
            .values()
            .filter(|m| m.member != self.member)
            .map(|m| (m.member.clone(), m.admin.clone()))
            .collect();
        let mut reads = JoinSet::new();
        for (member, admin) in peers {
            let http = self.http.clone();
            let token = self.cfg.token.as_ref().map(|t| t.0.clone());
            let url = format!(
                "http://{admin}/fleet/window/{}?signal={}",
                state.name,
                signal.name()
            );
            reads.spawn(async move {
                let r = http
                    .json(Method::GET, &url, None, token.as_deref(), deadline)
                    .await;
                (member, r)
            });
        }
        let mut merged = vec![self.member.clone()];
        let mut missing = Vec::new();
        while let Some(done) = reads.join_next().await {
            let Ok((member, result)) = done else { continue };
            let window = result
                .map_err(|e| e.to_string())
                .and_then(|v| serde_json::from_value::<WindowWire>(v).map_err(|e| e.to_string()))
                .and_then(|w| w.inputs(&groups));
            match window {
                Ok(theirs) => {
                    for (mine, other) in inputs.iter_mut().zip(&theirs) {
                        mine.merge(other);
                    }
                    merged.push(member);
                }
                Err(e) => {
                    debug!(listener = %state.name, %member, error = %e, "member window not read; left out of this decision");
                    crate::telemetry::fleet::member_read_error(&member);
                    missing.push(member);
                }
            }
        }
        merged[1..].sort();
        missing.sort();
        Gathered {
            inputs,
            merged,
            missing,
        }
    }

    /// Writes the leader's decision for the fleet: when the weights or the
    /// policy state changed, or a decision moved traffic, or a heartbeat is
    /// due (a third of `stale_after` since the last write), so members know
    /// the weights are current.
    pub async fn commit(
        &self,
        state: &ListenerState,
        pstate: &PolicyState,
        d: Option<&Decision>,
        record: Option<&DecisionRecord>,
        g: &Gathered,
    ) -> Commit {
        let now = self.clock.now();
        let weights = if d.is_some_and(|d| d.dry_run) {
            state.router.weights().as_slice().to_vec()
        } else {
            pstate.weights.as_slice().to_vec()
        };
        let srec = StateRecord::of(pstate, now);
        let (leading, seq) = {
            let mut i = lock(&self.inner);
            let Some(leading) = i.leading.clone() else {
                return Commit::NotLeader;
            };
            let due = match i.written.get(&state.name) {
                None => true,
                Some(w) => {
                    record.is_some()
                        || w.weights != weights
                        || !w.state.same_as(&srec)
                        || now.saturating_sub(w.at) >= self.cfg.stale_after / 3
                }
            };
            if !due {
                return Commit::Unchanged;
            }
            i.seq += 1;
            (leading, i.seq)
        };
        let rec = WeightsRecord {
            listener: state.name.clone(),
            groups: state.group_names(),
            weights_bp: weights.clone(),
            leader: self.member.clone(),
            term: leading.rev,
            seq,
            time: wall_time(),
            state: srec.clone(),
            merged: g.merged.clone(),
            missing: g.missing.clone(),
            decision: record.cloned(),
        };
        let value = serde_json::to_vec(&rec).expect("a weights record serializes");
        match self
            .etcd
            .put_if_leader(&leading, &self.key("weights", &state.name), &value)
            .await
        {
            Ok(Some(rev)) => {
                lock(&self.inner).written.insert(
                    state.name.clone(),
                    super::Written {
                        at: now,
                        weights,
                        state: srec,
                    },
                );
                self.heard_own(&state.name, rec, rev);
                Commit::Written
            }
            Ok(None) => {
                warn!(listener = %state.name, member = %self.member, "etcd refused the weights: this member no longer leads the fleet (a newer leader holds it); decision discarded");
                crate::telemetry::fleet::rejected_write(&state.unit);
                self.lose_lead(&leading);
                Commit::NotLeader
            }
            Err(e) => {
                crate::telemetry::fleet::store_error("weights");
                debug!(listener = %state.name, error = %e, "fleet weights not written");
                Commit::Unreachable
            }
        }
    }

    /// Drops the leadership `key` (if still held) and campaigns again.
    fn lose_lead(&self, key: &crate::etcd::LeaderKey) {
        let mut i = lock(&self.inner);
        if i.leading.as_ref() == Some(key) {
            i.leading = None;
            i.written.clear();
            self.set_role(&mut i);
        }
        drop(i);
        self.lost_lead.notify_one();
    }

    /// This member's window as `GET /fleet/window/{listener}` serves it.
    pub fn window(&self, state: &ListenerState, signal: Signal) -> WindowWire {
        window_of(&self.member, state, signal)
    }
}

/// A listener's window for `signal` now, on the wire.
pub fn window_of(member: &str, state: &ListenerState, signal: Signal) -> WindowWire {
    let inputs = state.policy_inputs(signal, state.clock.now());
    WindowWire {
        member: member.to_owned(),
        listener: state.name.clone(),
        signal: signal.name().to_owned(),
        groups: state
            .group_names()
            .iter()
            .zip(&inputs)
            .map(|(n, g)| super::GroupWire::of(n, g))
            .collect(),
    }
}
