//! A listener's recent policy decisions and current policy state, kept in
//! memory for `/status` and the demo's live view. Written by the control
//! loop, read by anyone holding the listener's state.

use crate::decision_record::DecisionRecord;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Decisions kept in memory per listener, for the demo and status views.
const RECENT_DECISIONS: usize = 64;

/// The latest decisions that moved traffic, numbered from 1, and the
/// policy's current state.
#[derive(Debug, Default)]
pub struct RecentDecisions {
    inner: Mutex<Recent>,
}

#[derive(Debug, Default)]
struct Recent {
    entries: VecDeque<(u64, DecisionRecord)>,
    next: u64,
    phase: Option<&'static str>,
}

impl RecentDecisions {
    pub(super) fn push(&self, record: DecisionRecord) {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        r.next += 1;
        let n = r.next;
        r.entries.push_back((n, record));
        if r.entries.len() > RECENT_DECISIONS {
            r.entries.pop_front();
        }
    }

    pub(super) fn set_phase(&self, phase: &'static str) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).phase = Some(phase);
    }

    /// Decisions numbered above `seen`, oldest first.
    pub fn since(&self, seen: u64) -> Vec<(u64, DecisionRecord)> {
        let r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        r.entries
            .iter()
            .filter(|(n, _)| *n > seen)
            .cloned()
            .collect()
    }

    /// The policy's state name, once it has evaluated.
    pub fn phase(&self) -> Option<&'static str> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).phase
    }
}
