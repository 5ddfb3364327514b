//! What the fleet keeps in etcd, as JSON values under
//! `/portshift/fleet/{name}/`:
//!
//! - `members/{member}`: a `MemberRecord`, on the member's lease;
//! - `election/...`: etcd's election keys, one per candidate;
//! - `weights/{listener}`: a `WeightsRecord`, written by the leader only,
//!   each write conditioned on its leadership;
//! - `control/{listener}`: a `ControlRecord`, the operator's pin and pause,
//!   written by whichever member took the call.

use crate::core::policy::{BadCounter, Phase, Policy, PolicyState};
use crate::core::routes::Weights;
use crate::decision_record::DecisionRecord;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub member: String,
    /// Where its admin API answers, for the leader's window reads.
    pub admin: String,
    pub version: String,
    pub started: String,
    /// Refreshed with every lease renewal.
    pub seen: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsRecord {
    pub listener: String,
    pub groups: Vec<String>,
    pub weights_bp: Vec<u16>,
    pub leader: String,
    /// The creation revision of the leader's election key: one per term.
    pub term: i64,
    /// Bumped by every write of a term's leader.
    pub seq: u64,
    pub time: String,
    pub state: StateRecord,
    /// The members whose windows this decision merged, and those that did
    /// not answer.
    pub merged: Vec<String>,
    pub missing: Vec<String>,
    /// The latest decision that moved traffic, with its reasons.
    pub decision: Option<DecisionRecord>,
}

/// A `PolicyState` that another process can take over: times are ages at
/// the moment of writing, since clocks of two processes share no origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// The engine's weights (in dry-run, those it would have applied).
    pub weights_bp: Vec<u16>,
    pub phase: String,
    pub stage: usize,
    /// Per group: (bad in a row, ring of the last verdicts, ring length).
    pub bad: Vec<(u32, u64, u32)>,
    pub last_change_ago_ms: Option<u64>,
    pub healthy_since_ago_ms: Option<u64>,
    pub stage_since_ago_ms: Option<u64>,
}

fn ago(now: Duration, at: Option<Duration>) -> Option<u64> {
    at.map(|t| now.saturating_sub(t).as_millis() as u64)
}

/// A time `ago_ms` (plus `extra`) before `now`; a time before this
/// process started counts as its start, which only lengthens a cooldown or
/// a hold, never shortens one.
fn back(now: Duration, ago_ms: Option<u64>, extra: Duration) -> Option<Duration> {
    ago_ms.map(|ms| now.saturating_sub(Duration::from_millis(ms) + extra))
}

impl StateRecord {
    pub fn of(s: &PolicyState, now: Duration) -> Self {
        StateRecord {
            weights_bp: s.weights.as_slice().to_vec(),
            phase: s.phase.name().to_owned(),
            stage: s.stage,
            bad: s.bad.iter().map(BadCounter::parts).collect(),
            last_change_ago_ms: ago(now, s.last_change),
            healthy_since_ago_ms: ago(now, s.healthy_since),
            stage_since_ago_ms: ago(now, s.stage_since),
        }
    }

    /// The state as this process's engine continues it at `now`, with
    /// `weights`; `since` is how long ago the record was received.
    /// `None` when it does not fit the policy (another group count).
    pub fn state(
        &self,
        policy: &Policy,
        weights: Weights,
        now: Duration,
        since: Duration,
    ) -> Option<PolicyState> {
        if self.bad.len() != weights.as_slice().len() {
            return None;
        }
        Some(PolicyState {
            weights,
            bad: self
                .bad
                .iter()
                .map(|&p| BadCounter::with_parts(policy.counting, p))
                .collect(),
            last_change: back(now, self.last_change_ago_ms, since),
            healthy_since: back(now, self.healthy_since_ago_ms, since),
            stage: self.stage,
            stage_since: back(now, self.stage_since_ago_ms, since),
            phase: Phase::from_name(&self.phase, self.stage)?,
        })
    }

    /// The same state apart from how long ago things happened: what makes
    /// a write worth more than a heartbeat.
    pub fn same_as(&self, other: &StateRecord) -> bool {
        (&self.weights_bp, self.phase.as_str(), self.stage, &self.bad)
            == (
                &other.weights_bp,
                other.phase.as_str(),
                other.stage,
                &other.bad,
            )
    }
}

/// The operator's steering of one listener, fleet-wide.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlRecord {
    pub groups: Vec<String>,
    /// Pinned weights per group (basis points); `None`: not pinned.
    pub pin_bp: Option<Vec<u16>>,
    pub paused: bool,
    /// The admin API's backend overrides, by group name then address.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub backends: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<std::net::SocketAddr, crate::proxy::members::Override>,
    >,
    /// The member that took the call, and when.
    pub by: String,
    pub time: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::Verdict;

    #[test]
    fn policy_state_survives_the_trip_between_processes() {
        let policy = crate::config::shipped::resolve("failover").unwrap().policy;
        let mut s = PolicyState::new(&policy, 2);
        s.bad[0].push(Verdict::Bad, policy.no_data);
        s.bad[0].push(Verdict::Bad, policy.no_data);
        s.phase = Phase::Shifted;
        s.last_change = Some(Duration::from_secs(90));
        s.weights = Weights::new(vec![8000, 2000]).unwrap();
        let r = StateRecord::of(&s, Duration::from_secs(100));
        assert_eq!(r.last_change_ago_ms, Some(10_000));
        let json = serde_json::to_string(&r).unwrap();
        let back: StateRecord = serde_json::from_str(&json).unwrap();
        // A younger process: 30 s since its start, received 1 s ago.
        let t = back
            .state(
                &policy,
                s.weights.clone(),
                Duration::from_secs(30),
                Duration::from_secs(1),
            )
            .unwrap();
        assert_eq!(t.phase, Phase::Shifted);
        assert_eq!(t.bad[0].count(), s.bad[0].count());
        assert_eq!(t.last_change, Some(Duration::from_secs(19)));
        // An older change than the process: its start.
        let t = back
            .state(
                &policy,
                s.weights.clone(),
                Duration::from_secs(5),
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(t.last_change, Some(Duration::ZERO));
        assert!(back.same_as(&r));
    }
}
