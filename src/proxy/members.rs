//! A group's membership at run time: the backends its source gives (the
//! config file, or a discovery file it names) with an operator's overrides
//! on top (the admin API). Every change, whoever makes it, goes through
//! `ListenerState::reshape`: the new backends are checked, the group's
//! routes are rebuilt sharing the members that stay (their counters,
//! health and stats), swapped in for the next connection while
//! established ones keep the table they started with, probes start for
//! the new members (and stop by themselves for the removed), and the
//! change is logged with what changed.

use super::state::{ListenerState, Tally};
use crate::core::backend::Backend;
use crate::core::routes::MembershipError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::info;

/// What an operator changed about one backend of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
pub struct Override {
    /// A member with this weight (added, or its weight set); `None`: as
    /// the source says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Added by the operator (the source does not list it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub added: bool,
    /// Not a member, whatever the source says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    /// No new connections.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// One group's backends: its source's, and the overrides on top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub source: Vec<Backend>,
    pub overrides: BTreeMap<SocketAddr, Override>,
}

/// Why a membership change was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} is not a backend of this group")]
    NotMember(SocketAddr),
    #[error("{0} is already a backend of this group; PUT its weight to change it")]
    AlreadyMember(SocketAddr),
    #[error("{0}; the group is unchanged")]
    Membership(#[from] MembershipError),
}

/// What a change did to a group's backends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changed {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// `addr: old -> new`.
    pub reweighted: Vec<String>,
}

impl Changed {
    fn between(old: &[Backend], new: &[Backend]) -> Changed {
        let find = |list: &[Backend], addr| list.iter().find(|b| b.addr == addr).copied();
        let mut c = Changed::default();
        for b in new {
            match find(old, b.addr) {
                None => c.added.push(format!("{} (weight {})", b.addr, b.weight)),
                Some(o) if o.weight != b.weight => c
                    .reweighted
                    .push(format!("{}: {} -> {}", b.addr, o.weight, b.weight)),
                Some(_) => {}
            }
        }
        c.removed = old
            .iter()
            .filter(|b| find(new, b.addr).is_none())
            .map(|b| b.addr.to_string())
            .collect();
        c
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.reweighted.is_empty()
    }
}

// === impl Membership ===

impl Membership {
    pub fn of(source: Vec<Backend>) -> Self {
        Membership {
            source,
            overrides: BTreeMap::new(),
        }
    }

    /// The backends in force: the source's, less the removed, with the
    /// weights set, then the added in address order.
    pub fn backends(&self) -> Vec<Backend> {
        let o = |addr: &SocketAddr| self.overrides.get(addr).copied().unwrap_or_default();
        let mut out: Vec<Backend> = self
            .source
            .iter()
            .filter(|b| !o(&b.addr).removed)
            .map(|b| Backend {
                addr: b.addr,
                weight: o(&b.addr).weight.unwrap_or(b.weight),
            })
            .collect();
        for (&addr, ov) in &self.overrides {
            if let (Some(weight), true) = (ov.weight, ov.added)
                && !self.source.iter().any(|b| b.addr == addr)
            {
                out.push(Backend { addr, weight });
            }
        }
        out
    }

    /// The overrides as `/status` and the API show them: one object per
    /// backend, with its address.
    pub fn overrides_json(&self) -> serde_json::Value {
        let list: Vec<serde_json::Value> = self
            .overrides
            .iter()
            .map(|(addr, o)| {
                let mut v = serde_json::to_value(o).unwrap_or_default();
                v["addr"] = serde_json::json!(addr.to_string());
                v
            })
            .collect();
        serde_json::Value::Array(list)
    }

    fn is_member(&self, addr: SocketAddr) -> bool {
        self.backends().iter().any(|b| b.addr == addr)
    }

    /// Whether `addr` is draining.
    pub fn draining(&self, addr: SocketAddr) -> bool {
        self.overrides.get(&addr).is_some_and(|o| o.draining)
    }

    pub fn add(&mut self, addr: SocketAddr, weight: u32) -> Result<(), Refused> {
        if self.is_member(addr) {
            return Err(Refused::AlreadyMember(addr));
        }
        // A source backend the operator removed comes back as an override
        // of its weight; any other is added.
        let added = !self.source.iter().any(|b| b.addr == addr);
        self.overrides.insert(
            addr,
            Override {
                weight: Some(weight),
                added,
                ..Override::default()
            },
        );
        Ok(())
    }

    pub fn remove(&mut self, addr: SocketAddr) -> Result<(), Refused> {
        if !self.is_member(addr) {
            return Err(Refused::NotMember(addr));
        }
        if self.overrides.get(&addr).is_none_or(|o| !o.added) {
            self.overrides.insert(
                addr,
                Override {
                    removed: true,
                    ..Override::default()
                },
            );
        } else {
            self.overrides.remove(&addr);
        }
        Ok(())
    }

    pub fn set_weight(&mut self, addr: SocketAddr, weight: u32) -> Result<(), Refused> {
        if !self.is_member(addr) {
            return Err(Refused::NotMember(addr));
        }
        self.overrides.entry(addr).or_default().weight = Some(weight);
        Ok(())
    }

    pub fn set_draining(&mut self, addr: SocketAddr, draining: bool) -> Result<(), Refused> {
        if !self.is_member(addr) {
            return Err(Refused::NotMember(addr));
        }
        let o = self.overrides.entry(addr).or_default();
        o.draining = draining;
        if *o == Override::default() {
            self.overrides.remove(&addr);
        }
        Ok(())
    }

    /// The same overrides over another source: those about backends the
    /// new source no longer has (removed, drained, reweighted) go; the
    /// added stay (and are no longer "added" once the source lists them).
    pub fn with_source(&self, source: Vec<Backend>) -> Membership {
        let in_source = |a: &SocketAddr| source.iter().any(|b| b.addr == *a);
        let overrides = self
            .overrides
            .iter()
            .filter(|(a, o)| in_source(a) || o.added)
            .map(|(a, o)| {
                let added = o.added && !in_source(a);
                (*a, Override { added, ..*o })
            })
            .collect();
        Membership { source, overrides }
    }
}

/// The result of a reshape: what changed, and whether the group is left
/// with no backend that takes new connections.
#[derive(Debug, Clone)]
pub struct Reshaped {
    pub changed: Changed,
    pub none_takes_new: bool,
}

// === impl ListenerState ===

impl ListenerState {
    /// Group `group`'s membership as it stands.
    pub fn membership(&self, group: usize) -> Membership {
        self.memberships()[group].clone()
    }

    /// Group `group`'s membership as `change` would leave it, checked, with
    /// nothing applied.
    pub fn plan_change(
        &self,
        group: usize,
        change: impl FnOnce(&mut Membership) -> Result<(), Refused>,
    ) -> Result<Membership, Refused> {
        let mut next = self.membership(group);
        change(&mut next)?;
        crate::core::routes::check_membership(&next.backends())?;
        Ok(next)
    }

    /// What group `group` is now, against its backends `before`.
    pub fn since(&self, group: usize, before: &[Backend]) -> Reshaped {
        let table = self.router.table();
        let now = &table.groups[group];
        Reshaped {
            changed: Changed::between(before, now.backends()),
            none_takes_new: (0..now.backends().len()).all(|b| !now.takes_new(b)),
        }
    }

    /// Changes group `group`'s membership with `change` and applies it, or
    /// changes nothing and says why. `why` names who changed it, for the
    /// log.
    pub fn reshape(
        self: &Arc<Self>,
        group: usize,
        why: &str,
        change: impl FnOnce(&mut Membership) -> Result<(), Refused>,
    ) -> Result<Reshaped, Refused> {
        let mut all = self.memberships();
        let mut next = all[group].clone();
        change(&mut next)?;
        let table = self.router.table();
        let old = &table.groups[group];
        let now = self.clock.now();
        let tally = |b: &Backend| Tally::new(&self.unit, &old.name, b.addr, self.window_config());
        let new = Arc::new(old.reshaped(next.backends(), now, tally)?);
        for (b, m) in new.members().iter().enumerate() {
            new.set_draining(b, next.draining(m.addr));
        }
        let changed = Changed::between(old.backends(), new.backends());
        let none_takes_new = (0..new.backends().len()).all(|b| !new.takes_new(b));
        let joined: Vec<_> = new
            .members()
            .iter()
            .filter(|m| old.position(m.addr).is_none())
            .cloned()
            .collect();
        self.router.reshape(group, Arc::clone(&new));
        all[group] = next;
        drop(all);
        for m in old
            .members()
            .iter()
            .filter(|m| new.position(m.addr).is_none())
        {
            // Its return would never be reported: not out any more.
            if m.eject.is_ejected(now) {
                m.extra.metrics.returned();
            }
        }
        if let Some((tasks, stop)) = self.tasks.get() {
            for m in &joined {
                super::probe::spawn_one(self, (group, m), tasks, stop);
            }
        }
        if !changed.is_empty() {
            info!(listener = %self.name, group = %old.name, by = why,
                added = ?changed.added, removed = ?changed.removed, reweighted = ?changed.reweighted,
                "group membership changed");
        }
        Ok(Reshaped {
            changed,
            none_takes_new,
        })
    }
}

/// A unit's group with overrides, as a stopping listener left it: what a
/// reload carries over to the unit that replaces it.
#[derive(Debug)]
pub(super) struct Overridden {
    unit: String,
    group: crate::config::Group,
    membership: Membership,
}

impl Overridden {
    /// Every overridden group of `r`'s units.
    pub(super) fn of(r: &super::runtime::Running) -> Vec<Overridden> {
        let mut out = Vec::new();
        for unit in r.units() {
            for (gi, name) in unit.group_names().iter().enumerate() {
                let membership = unit.membership(gi);
                let spec = r.spec.groups.iter().find(|g| g.name == *name);
                if let (false, Some(group)) = (membership.overrides.is_empty(), spec) {
                    out.push(Overridden {
                        unit: unit.name.clone(),
                        group: group.clone(),
                        membership,
                    });
                }
            }
        }
        out
    }
}

/// Gives `unit` (just built by a reload) the overrides its predecessor had
/// on each group the reload left as it was; returns `{unit}/{group}` of
/// those it drops because the reload redefines the group.
pub(super) fn carry_over(
    unit: &Arc<ListenerState>,
    old: &[Overridden],
    config: &crate::config::Config,
) -> Vec<String> {
    let mut dropped = Vec::new();
    for (gi, name) in unit.group_names().iter().enumerate() {
        let Some(o) = old
            .iter()
            .find(|o| o.unit == unit.name && o.group.name == *name)
        else {
            continue;
        };
        let same = config.groups.contains(&o.group);
        let kept = same
            && unit
                .reshape(gi, "reload (overrides kept)", |m| {
                    // Over the source the reload just read.
                    m.overrides = o.membership.with_source(m.source.clone()).overrides;
                    Ok(())
                })
                .is_ok();
        if !kept {
            let at = format!("{}/{}", unit.name, name);
            tracing::warn!(unit = %unit.name, group = %name, overrides = %o.membership.overrides_json(),
                "the reload redefines this group: the admin API's overrides of its backends are dropped");
            dropped.push(at);
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(port: u16, weight: u32) -> Backend {
        Backend {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
        }
    }

    fn a(port: u16) -> SocketAddr {
        b(port, 0).addr
    }

    #[test]
    fn overrides_apply_over_the_source_and_survive_a_new_one() {
        let mut m = Membership::of(vec![b(1, 1), b(2, 1)]);
        m.add(a(3), 5).unwrap();
        assert_eq!(m.add(a(1), 1), Err(Refused::AlreadyMember(a(1))));
        m.remove(a(1)).unwrap();
        assert_eq!(m.remove(a(1)), Err(Refused::NotMember(a(1))));
        m.set_weight(a(2), 7).unwrap();
        m.set_draining(a(3), true).unwrap();
        assert_eq!(m.backends(), vec![b(2, 7), b(3, 5)]);
        assert!(m.draining(a(3)) && !m.draining(a(2)));
        // A new source without 2: its weight override goes; 1 comes back
        // removed only if the source still lists it.
        let next = m.with_source(vec![b(1, 1), b(4, 1)]);
        assert_eq!(next.backends(), vec![b(4, 1), b(3, 5)]);
        assert!(next.draining(a(3)));
        // Removing an added backend forgets it.
        let mut m = Membership::of(vec![b(1, 1)]);
        m.add(a(3), 1).unwrap();
        m.remove(a(3)).unwrap();
        assert!(m.overrides.is_empty());
    }

    #[test]
    fn changed_lists_what_moved() {
        let c = Changed::between(&[b(1, 1), b(2, 1)], &[b(2, 3), b(3, 1)]);
        assert_eq!(c.added, vec!["127.0.0.1:3 (weight 1)"]);
        assert_eq!(c.removed, vec!["127.0.0.1:1"]);
        assert_eq!(c.reweighted, vec!["127.0.0.1:2: 1 -> 3"]);
        assert!(Changed::between(&[b(1, 1)], &[b(1, 1)]).is_empty());
    }
}
