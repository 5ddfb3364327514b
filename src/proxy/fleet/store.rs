//! What the member reads from etcd: every key under the fleet's prefix,
//! then a watch from the revision read, reapplied from scratch whenever
//! the watch breaks. Weights and controls are applied to the listeners in
//! force as they arrive; members and election candidates feed `/status`
//! and the leader's window reads.

use super::{ControlRecord, Fleet, Heard, Inner, MemberRecord, WeightsRecord, lock};
use crate::core::policy::Phase;
use crate::core::routes::Weights;
use crate::etcd::{EtcdError, Event, Kv};
use crate::proxy::state::ListenerState;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub(super) async fn run(fleet: Arc<Fleet>, stop: CancellationToken) {
    let mut rev = None;
    loop {
        if rev.is_none() {
            rev = tokio::select! {
                () = stop.cancelled() => return,
                r = fleet.sync() => r.map_err(|e| debug!(error = %e, "fleet read failed; retrying")).ok(),
            };
        }
        if let Some(from) = rev {
            let watch = tokio::select! {
                () = stop.cancelled() => return,
                w = fleet.etcd.watch_prefix(&fleet.prefix, from + 1) => w,
            };
            match watch {
                Ok(mut w) => loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => return,
                        n = w.next() => n,
                    };
                    match next {
                        Ok((_, events)) => fleet.apply_events(events),
                        Err(e) => {
                            debug!(error = %e, "fleet watch ended; reading the keys again");
                            break;
                        }
                    }
                },
                Err(e) => debug!(error = %e, "fleet watch failed; reading the keys again"),
            }
            crate::telemetry::fleet::store_error("watch");
        }
        rev = None;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

impl Fleet {
    /// Reads every key of the fleet and applies them; the revision read.
    pub(super) async fn sync(&self) -> Result<i64, EtcdError> {
        let (rev, kvs) = self.etcd.range_prefix(&self.prefix).await?;
        let mut touched = Vec::new();
        {
            let mut i = lock(&self.inner);
            i.members.clear();
            i.candidates.clear();
            for kv in kvs {
                self.put(&mut i, kv, &mut touched);
            }
        }
        self.after_change(touched);
        Ok(rev)
    }

    fn apply_events(&self, events: Vec<Event>) {
        let mut touched = Vec::new();
        {
            let mut i = lock(&self.inner);
            for e in events {
                match e {
                    Event::Put(kv) => self.put(&mut i, kv, &mut touched),
                    Event::Delete(kv) => self.delete(&mut i, &kv, &mut touched),
                }
            }
        }
        self.after_change(touched);
    }

    /// Applies what changed to the listeners in force. Outside the fleet's
    /// lock: finding a listener takes the proxy's, which is held, in turn,
    /// around `apply_known` when listeners start.
    fn after_change(&self, mut touched: Vec<String>) {
        crate::telemetry::fleet::members(&self.cfg.name, lock(&self.inner).members.len());
        touched.sort();
        touched.dedup();
        for name in touched {
            if let Some(state) = self.listener(&name) {
                self.apply_known(&state);
            }
        }
    }

    fn put(&self, i: &mut Inner, kv: Kv, touched: &mut Vec<String>) {
        let Some(rest) = kv.key.strip_prefix(&self.prefix) else {
            return;
        };
        let Some((kind, name)) = rest.split_once('/') else {
            return;
        };
        match kind {
            "members" => match serde_json::from_slice::<MemberRecord>(&kv.value) {
                Ok(m) => {
                    i.members.insert(name.to_owned(), m);
                }
                Err(e) => {
                    warn!(key = %kv.key, error = %e, "ignoring a member record that does not parse")
                }
            },
            "election" => {
                let member = String::from_utf8_lossy(&kv.value).into_owned();
                i.candidates
                    .insert(kv.create_revision, (kv.key.clone(), member));
            }
            "weights" if self.put_weights(i, name, &kv) => touched.push(name.to_owned()),
            "control" if self.put_control(i, name, &kv) => touched.push(name.to_owned()),
            _ => {}
        }
    }

    fn delete(&self, i: &mut Inner, kv: &Kv, touched: &mut Vec<String>) {
        let Some(rest) = kv.key.strip_prefix(&self.prefix) else {
            return;
        };
        match rest.split_once('/') {
            Some(("members", name)) => {
                i.members.remove(name);
            }
            Some(("election", _)) => i.candidates.retain(|_, (k, _)| *k != kv.key),
            // An operator deleting the control key releases and resumes.
            Some(("control", name)) => {
                let released = Kv {
                    value: b"{}".to_vec(),
                    ..kv.clone()
                };
                if self.put_control(i, name, &released) {
                    touched.push(name.to_owned());
                }
            }
            _ => {}
        }
    }

    /// Keeps weights newer than those heard; true when they were.
    fn put_weights(&self, i: &mut Inner, listener: &str, kv: &Kv) -> bool {
        let record: WeightsRecord = match serde_json::from_slice(&kv.value) {
            Ok(r) => r,
            Err(e) => {
                warn!(key = %kv.key, error = %e, "ignoring fleet weights that do not parse");
                return false;
            }
        };
        if i.weights
            .get(listener)
            .is_some_and(|h| h.rev >= kv.mod_revision)
        {
            // Already heard (the leader's own write, or a re-read).
            return false;
        }
        let shown = i
            .weights
            .get_mut(listener)
            .and_then(|h| h.shown_decision.take());
        i.weights.insert(
            listener.to_owned(),
            Heard {
                record,
                rev: kv.mod_revision,
                at: self.clock.now(),
                shown_decision: shown,
            },
        );
        true
    }

    fn put_control(&self, i: &mut Inner, listener: &str, kv: &Kv) -> bool {
        let c: ControlRecord = serde_json::from_slice(&kv.value).unwrap_or_default();
        if i.controls
            .get(listener)
            .is_some_and(|(r, _)| *r >= kv.mod_revision)
        {
            return false;
        }
        i.controls.insert(listener.to_owned(), (kv.mod_revision, c));
        true
    }

    /// Notes a write this member made as leader, as if heard.
    pub(super) fn heard_own(&self, listener: &str, record: WeightsRecord, rev: i64) {
        let mut i = lock(&self.inner);
        let shown = i
            .weights
            .get_mut(listener)
            .and_then(|h| h.shown_decision.take());
        let shown = record.decision.as_ref().map(|d| d.time.clone()).or(shown);
        i.weights.insert(
            listener.to_owned(),
            Heard {
                record,
                rev,
                at: self.clock.now(),
                shown_decision: shown,
            },
        );
    }
}

/// The state gauge's names are static; a name from the store maps onto one.
fn phase_name(name: &str) -> Option<&'static str> {
    Phase::NAMES
        .iter()
        .chain(&["paused", "pinned"])
        .find(|n| **n == name)
        .copied()
}

/// Puts the fleet's weights in force on `state` (unless an operator pin
/// holds it), and shows the fleet's latest decision in its `/status`.
pub(super) fn apply_weights(state: &ListenerState, h: &mut Heard, member: &str) {
    let own = h.record.leader == member;
    let r = &h.record;
    if r.groups != state.group_names() {
        warn!(listener = %state.name, fleet_groups = ?r.groups, "the fleet's weights name other groups than this member's config; not applied");
        return;
    }
    let Ok(w) = Weights::new(r.weights_bp.clone()) else {
        warn!(listener = %state.name, weights = ?r.weights_bp, "the fleet's weights do not sum to 10000; not applied");
        return;
    };
    if state.pinned().is_none() && state.router.weights() != w {
        state
            .router
            .publish(w)
            .expect("the group count was just checked");
        state
            .route_metrics
            .weights(state.router.weights().as_slice());
    }
    if let Some(p) = phase_name(&r.state.phase)
        && state.pinned().is_none()
        && !state.is_paused()
    {
        state.decisions.set_phase(p);
        state.route_metrics.state(p, &crate::proxy::control::STATES);
    }
    let Some(d) = &r.decision else { return };
    if h.shown_decision.as_deref() != Some(d.time.as_str()) {
        h.shown_decision = Some(d.time.clone());
        if !own {
            state.decisions.push(d.clone());
        }
    }
}

/// Puts the fleet's pin, pause and backend overrides in force on `state`.
pub(super) fn apply_control(state: &Arc<ListenerState>, c: &ControlRecord) {
    if !c.groups.is_empty() && c.groups != state.group_names() {
        warn!(listener = %state.name, fleet_groups = ?c.groups, "the fleet's pin names other groups than this member's config; not applied");
        return;
    }
    match c.pin_bp.as_ref().map(|bp| Weights::new(bp.clone())) {
        Some(Ok(w)) if state.pinned().as_ref() != Some(&w) => {
            let _ = state.pin(w);
        }
        Some(Err(e)) => {
            warn!(listener = %state.name, error = %e, "the fleet's pin is not valid weights; not applied")
        }
        None if state.pinned().is_some() => {
            state.release();
        }
        _ => {}
    }
    if state.policy().is_some() && state.is_paused() != c.paused {
        state.set_paused(c.paused);
    }
    for (gi, name) in state.group_names().iter().enumerate() {
        let want = c.backends.get(name).cloned().unwrap_or_default();
        if state.membership(gi).overrides == want {
            continue;
        }
        let applied = state.reshape(gi, "fleet", |m| {
            m.overrides = want;
            Ok(())
        });
        if let Err(e) = applied {
            warn!(listener = %state.name, group = %name, error = %e, "the fleet's backend overrides do not apply to this member's group; not applied");
        }
    }
}
