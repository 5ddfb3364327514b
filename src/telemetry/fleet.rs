//! Fleet metrics: the member's role, the members it sees, how old the
//! weights in force are, and what failed on the way.

use super::{Unit, prometheus};

pub const FLEET_ROLE: &str = "portshift_fleet_role";
pub const FLEET_MEMBERS: &str = "portshift_fleet_members";
pub const FLEET_WEIGHTS_AGE: &str = "portshift_fleet_weights_age_seconds";
pub const FLEET_MEMBER_READ_ERRORS: &str = "portshift_fleet_member_read_errors_total";
pub const FLEET_LOCAL_DECISIONS: &str = "portshift_fleet_local_decisions_total";
pub const FLEET_REJECTED_WRITES: &str = "portshift_fleet_rejected_writes_total";
pub const FLEET_STORE_ERRORS: &str = "portshift_fleet_store_errors_total";

pub const ROLES: [&str; 3] = ["leader", "follower", "detached"];

pub(super) fn describe() {
    metrics::describe_gauge!(
        FLEET_ROLE,
        "1 for this member's fleet role (leader, follower or detached: no lease in etcd), 0 for the others"
    );
    metrics::describe_gauge!(
        FLEET_MEMBERS,
        "Fleet members this member sees in etcd, itself included"
    );
    metrics::describe_gauge!(
        FLEET_WEIGHTS_AGE,
        metrics::Unit::Seconds,
        "Age of the fleet weights in force for the listener: since this member last heard them (a leader: last wrote them)"
    );
    metrics::describe_counter!(
        FLEET_MEMBER_READ_ERRORS,
        "Window reads of a member that failed or timed out at the leader; that member was left out of the decision"
    );
    metrics::describe_counter!(
        FLEET_LOCAL_DECISIONS,
        "Policy evaluations made on this member's own window because the fleet's weights were stale"
    );
    metrics::describe_counter!(
        FLEET_REJECTED_WRITES,
        "Weight writes etcd refused because this member no longer held the leadership"
    );
    metrics::describe_counter!(
        FLEET_STORE_ERRORS,
        "Calls to etcd (and, with signal = \"prometheus\", to Prometheus) that failed, by operation"
    );
}

pub fn role(fleet: &str, current: &str) {
    prometheus();
    for r in ROLES {
        metrics::gauge!(FLEET_ROLE, "fleet" => fleet.to_owned(), "role" => r)
            .set(if r == current { 1.0 } else { 0.0 });
    }
}

pub fn members(fleet: &str, n: usize) {
    metrics::gauge!(FLEET_MEMBERS, "fleet" => fleet.to_owned()).set(n as f64);
}

/// The etcd operations whose failures are counted, registered at zero.
pub const STORE_OPS: [&str; 6] = [
    "lease",
    "keepalive",
    "campaign",
    "watch",
    "weights",
    "control",
];

pub fn register_store_errors() {
    for op in STORE_OPS {
        metrics::counter!(FLEET_STORE_ERRORS, "op" => op).increment(0);
    }
}

pub fn weights_age(unit: &Unit, secs: f64) {
    metrics::gauge!(FLEET_WEIGHTS_AGE, unit.labels()).set(secs);
}

pub fn member_read_error(member: &str) {
    metrics::counter!(FLEET_MEMBER_READ_ERRORS, "member" => member.to_owned()).increment(1);
}

/// Registers a listener's fleet counters at zero, so the first event shows
/// in increase().
pub fn register_listener(unit: &Unit) {
    metrics::counter!(FLEET_LOCAL_DECISIONS, unit.labels()).increment(0);
    metrics::counter!(FLEET_REJECTED_WRITES, unit.labels()).increment(0);
}

pub fn local_decision(unit: &Unit) {
    metrics::counter!(FLEET_LOCAL_DECISIONS, unit.labels()).increment(1);
}

pub fn rejected_write(unit: &Unit) {
    metrics::counter!(FLEET_REJECTED_WRITES, unit.labels()).increment(1);
}

pub fn store_error(op: &'static str) {
    metrics::counter!(FLEET_STORE_ERRORS, "op" => op).increment(1);
}
