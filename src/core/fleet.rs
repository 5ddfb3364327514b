//! Who evaluates a listener's policy when instances run as a fleet.
//!
//! The fleet's leader evaluates on every member's windows merged and writes
//! the weights for all; the others apply them. A member whose fleet
//! weights have gone stale (the store unreachable, no leader for too long)
//! decides alone on its own window until it hears from the fleet again,
//! so a partition never freezes traffic where it is.

use std::time::Duration;

/// What this instance does at one evaluation of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duty {
    /// Evaluate on the merged windows of every member and write the result
    /// for the whole fleet.
    Lead,
    /// Apply the leader's weights; do not evaluate.
    Follow,
    /// Evaluate on this instance's own window and apply the result here
    /// only (no fleet, or the fleet's weights are stale).
    Alone,
}

/// Where a member stands with its fleet at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// This member holds the fleet's leadership.
    pub leader: bool,
    /// When the member last heard the fleet's weights for the listener (a
    /// leader: last wrote them, or was elected); `None` if never.
    pub heard: Option<Duration>,
    /// When the member joined (or started trying to).
    pub joined: Duration,
}

impl Standing {
    /// How old the weights in force are: since they were last heard, or
    /// since the member joined if it never heard any.
    pub fn age(&self, now: Duration) -> Duration {
        now.saturating_sub(self.heard.unwrap_or(self.joined))
    }

    /// The duty at `now`, with fleet weights older than `stale_after`
    /// counting as lost. A leader always evaluates (its merge simply lacks
    /// the members it cannot reach); whether its result may apply here
    /// alone when the store refuses it is `may_apply_alone`.
    pub fn duty(&self, now: Duration, stale_after: Duration) -> Duty {
        if self.leader {
            Duty::Lead
        } else if self.age(now) < stale_after {
            Duty::Follow
        } else {
            Duty::Alone
        }
    }

    /// A leader whose write the store did not take applies its decision
    /// locally only once the fleet's weights are stale: before that, the
    /// members may still be following the last weights it wrote.
    pub fn may_apply_alone(&self, now: Duration, stale_after: Duration) -> bool {
        self.age(now) >= stale_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn duties_by_standing_and_age() {
        let stale = s(15);
        let follower = |heard| Standing {
            leader: false,
            heard,
            joined: s(100),
        };
        // Never heard: counts from joining.
        assert_eq!(follower(None).duty(s(110), stale), Duty::Follow);
        assert_eq!(follower(None).duty(s(115), stale), Duty::Alone);
        // Heard recently, then silence past stale_after.
        assert_eq!(follower(Some(s(120))).duty(s(134), stale), Duty::Follow);
        assert_eq!(follower(Some(s(120))).duty(s(135), stale), Duty::Alone);
        assert_eq!(follower(Some(s(120))).age(s(110)), Duration::ZERO);
        let leader = Standing {
            leader: true,
            heard: Some(s(120)),
            joined: s(100),
        };
        assert_eq!(leader.duty(s(500), stale), Duty::Lead);
        assert!(!leader.may_apply_alone(s(134), stale));
        assert!(leader.may_apply_alone(s(135), stale));
    }
}
