//! The conditions a policy checks and the rules its decisions cite, as
//! types. Each has one label, the name an operator reads in the audit log,
//! `/status`, metrics and the simulator's reports (`p99_above`,
//! `recover.error_rate_below`, `cascade.p99_above`, `canary.step`), and a
//! unit that says how its values read.

use super::{Mode, Policy, Quantile};
use std::fmt;

/// What a condition's value and threshold measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A latency, in seconds (shown in milliseconds).
    Seconds,
    /// A ratio or a rate, 0 to 1 or a multiple.
    Ratio,
    /// A count of connections.
    Count,
    /// New connections per second.
    PerSecond,
    /// Nothing measured: the condition is a fact (no eligible backup).
    Flag,
}

/// One condition of a policy, checked against one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// `trip.error_rate_above`.
    ErrorRateAbove,
    /// `trip.pNN_above`.
    QuantileAbove(Quantile),
    /// `trip.worse_than_backup`.
    WorseThanBackup,
    /// `trip.active_connections_above`.
    ActiveConnectionsAbove,
    /// `trip.new_connections_per_second_above`.
    NewConnectionsPerSecondAbove,
    /// `recover.pNN_below`.
    QuantileBelow(Quantile),
    /// `recover.error_rate_below`.
    ErrorRateBelow,
    /// `canary.max_ratio` on the canary's quantile against the baseline's.
    RatioAbove(Quantile),
    /// `canary.max_error_rate_increase` over the baseline's error rate.
    ErrorRateIncreaseAbove,
    /// The primary tripped but no backup could take traffic.
    NoEligibleBackup,
}

impl Condition {
    pub fn label(self) -> String {
        match self {
            Condition::ErrorRateAbove => "error_rate_above".into(),
            Condition::QuantileAbove(q) => format!("{}_above", q.name()),
            Condition::WorseThanBackup => "worse_than_backup".into(),
            Condition::ActiveConnectionsAbove => "active_connections_above".into(),
            Condition::NewConnectionsPerSecondAbove => "new_connections_per_second_above".into(),
            Condition::QuantileBelow(q) => format!("recover.{}_below", q.name()),
            Condition::ErrorRateBelow => "recover.error_rate_below".into(),
            Condition::RatioAbove(q) => format!("{}_ratio_above", q.name()),
            Condition::ErrorRateIncreaseAbove => "error_rate_increase_above".into(),
            Condition::NoEligibleBackup => "no_eligible_backup".into(),
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Condition::QuantileAbove(_) | Condition::QuantileBelow(_) => Unit::Seconds,
            Condition::ErrorRateAbove
            | Condition::ErrorRateBelow
            | Condition::WorseThanBackup
            | Condition::RatioAbove(_)
            | Condition::ErrorRateIncreaseAbove => Unit::Ratio,
            Condition::ActiveConnectionsAbove => Unit::Count,
            Condition::NewConnectionsPerSecondAbove => Unit::PerSecond,
            Condition::NoEligibleBackup => Unit::Flag,
        }
    }
}

/// The rule that drove a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Nothing moved.
    Hold,
    /// Traffic left a tripped group: the primary (`cascade = false`) or a
    /// backup carrying traffic (`cascade.` prefix). `None` when the trip
    /// came from the counter with no condition firing this evaluation.
    Shift {
        cascade: bool,
        condition: Option<Condition>,
    },
    /// Traffic went back to the healed primary.
    Recover,
    /// The canary moved to its next step.
    CanaryStep,
    /// The canary took all traffic.
    CanaryPromote,
    /// The canary was rolled back, by the condition that fired.
    CanaryRollback(Option<Condition>),
}

impl Rule {
    pub fn label(self) -> String {
        let or_tripped = |c: Option<Condition>| c.map_or("tripped".to_string(), Condition::label);
        match self {
            Rule::Hold => "hold".into(),
            Rule::Shift {
                cascade: false,
                condition,
            } => or_tripped(condition),
            Rule::Shift {
                cascade: true,
                condition,
            } => format!("cascade.{}", or_tripped(condition)),
            Rule::Recover => "recover".into(),
            Rule::CanaryStep => "canary.step".into(),
            Rule::CanaryPromote => "canary.promote".into(),
            Rule::CanaryRollback(None) => "canary.rollback".into(),
            Rule::CanaryRollback(Some(c)) => format!("canary.{}", c.label()),
        }
    }

    /// The unit of the condition behind the rule, if one is.
    pub fn unit(self) -> Option<Unit> {
        match self {
            Rule::Shift { condition, .. } | Rule::CanaryRollback(condition) => {
                condition.map(Condition::unit)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl PartialEq<&str> for Rule {
    fn eq(&self, other: &&str) -> bool {
        self.label() == *other
    }
}

impl PartialEq<&str> for Condition {
    fn eq(&self, other: &&str) -> bool {
        self.label() == *other
    }
}

impl Policy {
    /// The trip conditions this policy checks, in the order it checks them.
    pub fn trip_conditions(&self) -> Vec<Condition> {
        let t = &self.trip;
        let mut out = Vec::new();
        if t.error_rate_above.is_some() {
            out.push(Condition::ErrorRateAbove);
        }
        out.extend(t.above.iter().map(|(q, _)| Condition::QuantileAbove(*q)));
        let optional = [
            (t.worse_than_backup.is_some(), Condition::WorseThanBackup),
            (
                t.active_connections_above.is_some(),
                Condition::ActiveConnectionsAbove,
            ),
            (
                t.new_connections_per_second_above.is_some(),
                Condition::NewConnectionsPerSecondAbove,
            ),
        ];
        out.extend(optional.iter().filter(|(on, _)| *on).map(|(_, c)| *c));
        out
    }

    /// Every (action, rule) this policy's decisions can report: the one
    /// list, registered up front so dashboards see the first decision.
    pub fn rules(&self) -> Vec<(&'static str, Rule)> {
        let trips = self.trip_conditions();
        match &self.mode {
            Mode::Failover { .. } => {
                let shift = |cascade| {
                    trips.iter().map(move |&c| {
                        let rule = Rule::Shift {
                            cascade,
                            condition: Some(c),
                        };
                        ("shift", rule)
                    })
                };
                let mut out: Vec<_> = shift(false).chain(shift(true)).collect();
                out.push(("recover", Rule::Recover));
                out
            }
            Mode::Canary(c) => {
                let mut out = vec![
                    ("canary_advance", Rule::CanaryStep),
                    ("canary_promote", Rule::CanaryPromote),
                    (
                        "canary_rollback",
                        Rule::CanaryRollback(Some(Condition::RatioAbove(c.quantile))),
                    ),
                    (
                        "canary_rollback",
                        Rule::CanaryRollback(Some(Condition::ErrorRateIncreaseAbove)),
                    ),
                ];
                out.extend(
                    trips
                        .iter()
                        .map(|&t| ("canary_rollback", Rule::CanaryRollback(Some(t)))),
                );
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_names_operators_read() {
        let p99 = Condition::QuantileAbove(Quantile::P99);
        assert_eq!(p99.label(), "p99_above");
        assert_eq!(
            Condition::QuantileBelow(Quantile::P999).label(),
            "recover.p999_below"
        );
        let shift = |cascade, condition| Rule::Shift { cascade, condition };
        assert_eq!(shift(false, Some(p99)).label(), "p99_above");
        assert_eq!(shift(true, Some(p99)).label(), "cascade.p99_above");
        assert_eq!(shift(false, None).label(), "tripped");
        assert_eq!(
            Rule::CanaryRollback(Some(Condition::RatioAbove(Quantile::P99))).label(),
            "canary.p99_ratio_above"
        );
        assert_eq!(Rule::CanaryRollback(None).label(), "canary.rollback");
        assert_eq!(shift(false, Some(p99)).unit(), Some(Unit::Seconds));
        assert_eq!(Rule::Recover.unit(), None);
    }
}
