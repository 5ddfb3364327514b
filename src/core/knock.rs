//! Port knocking: a source that connects to the knock ports in order,
//! each within `within` of the first, is admitted to the listener for
//! `open_for`. A knock out of order resets its sequence. Pure: every call
//! takes `now`, and the state is bounded (past `max_sources` tracked
//! sources, the oldest is forgotten).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

/// What one knock did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knocked {
    /// The next port of the sequence; more to come.
    Progress,
    /// The last port: the source is admitted until `now + open_for`.
    Opened,
    /// Out of order (or too late): the sequence starts over.
    Reset,
}

impl Knocked {
    pub const ALL: [Knocked; 3] = [Knocked::Progress, Knocked::Opened, Knocked::Reset];

    pub fn name(self) -> &'static str {
        match self {
            Knocked::Progress => "progress",
            Knocked::Opened => "opened",
            Knocked::Reset => "reset",
        }
    }
}

/// One source: how far into the sequence it is, and until when it is
/// admitted. Knocking again while admitted keeps the opening.
#[derive(Debug, Clone, Copy, Default)]
struct Source {
    /// Ports of the sequence knocked so far, and when the first came.
    knocking: Option<(usize, Duration)>,
    open_until: Option<Duration>,
}

/// One listener's knock state.
#[derive(Debug)]
pub struct Knocks {
    sequence: Vec<u16>,
    within: Duration,
    open_for: Duration,
    max_sources: usize,
    sources: HashMap<IpAddr, (Source, u64)>,
    /// Sources in the order they were (re)inserted, with the stamp they
    /// had then: the front is the oldest unless its stamp is stale.
    order: VecDeque<(IpAddr, u64)>,
    stamp: u64,
}

impl Knocks {
    pub fn new(
        sequence: Vec<u16>,
        within: Duration,
        open_for: Duration,
        max_sources: usize,
    ) -> Self {
        Knocks {
            sequence,
            within,
            open_for,
            max_sources: max_sources.max(1),
            sources: HashMap::new(),
            order: VecDeque::new(),
            stamp: 0,
        }
    }

    /// A connection from `ip` to knock port `port` at `now`.
    pub fn knock(&mut self, ip: IpAddr, port: u16, now: Duration) -> Knocked {
        let mut source = self.sources.get(&ip).map(|s| s.0).unwrap_or_default();
        let next = source
            .knocking
            .filter(|&(_, started)| now.saturating_sub(started) <= self.within);
        let (done, started) = match next {
            Some((n, started)) if self.sequence.get(n) == Some(&port) => (n + 1, started),
            // A knock on the first port always starts over from it.
            _ if self.sequence.first() == Some(&port) => (1, now),
            _ => {
                source.knocking = None;
                if source.open_until.is_some_and(|t| now < t) {
                    self.sources.entry(ip).and_modify(|e| e.0 = source);
                } else {
                    self.sources.remove(&ip);
                }
                return Knocked::Reset;
            }
        };
        let result = if done == self.sequence.len() {
            source.knocking = None;
            source.open_until = Some(now + self.open_for);
            Knocked::Opened
        } else {
            source.knocking = Some((done, started));
            Knocked::Progress
        };
        self.put(ip, source);
        result
    }

    /// Whether `ip` knocked its way in and its opening still holds.
    pub fn admits(&self, ip: IpAddr, now: Duration) -> bool {
        self.sources
            .get(&ip)
            .and_then(|s| s.0.open_until)
            .is_some_and(|t| now < t)
    }

    /// Sources tracked now (knocking or open).
    pub fn tracked(&self) -> usize {
        self.sources.len()
    }

    fn put(&mut self, ip: IpAddr, s: Source) {
        self.stamp += 1;
        self.sources.insert(ip, (s, self.stamp));
        self.order.push_back((ip, self.stamp));
        while self.sources.len() > self.max_sources {
            let Some((old, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.sources.get(&old).is_some_and(|e| e.1 == stamp) {
                self.sources.remove(&old);
            }
        }
        // Stale entries (sources since re-inserted or removed) are skipped
        // above; keep the queue from growing past a few times the cap.
        if self.order.len() > self.max_sources * 4 {
            let live = &self.sources;
            self.order
                .retain(|(ip, st)| live.get(ip).is_some_and(|e| e.1 == *st));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn knocks() -> Knocks {
        Knocks::new(vec![7001, 7002, 7003], 5 * S, 30 * S, 100)
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn the_sequence_in_order_opens_for_open_for() {
        let mut k = knocks();
        assert!(!k.admits(ip(1), S));
        assert_eq!(k.knock(ip(1), 7001, S), Knocked::Progress);
        assert_eq!(k.knock(ip(1), 7002, 2 * S), Knocked::Progress);
        assert!(!k.admits(ip(1), 2 * S), "not before the last knock");
        assert_eq!(k.knock(ip(1), 7003, 3 * S), Knocked::Opened);
        assert!(k.admits(ip(1), 3 * S));
        assert!(k.admits(ip(1), 32 * S));
        assert!(!k.admits(ip(1), 33 * S), "closed after open_for");
        assert!(!k.admits(ip(2), 4 * S), "only the source that knocked");
    }

    #[test]
    fn a_wrong_order_or_a_slow_sequence_starts_over() {
        let mut k = knocks();
        k.knock(ip(1), 7001, S);
        assert_eq!(k.knock(ip(1), 7003, 2 * S), Knocked::Reset);
        assert_eq!(
            k.knock(ip(1), 7002, 3 * S),
            Knocked::Reset,
            "reset means from the start"
        );
        k.knock(ip(1), 7001, 4 * S);
        k.knock(ip(1), 7002, 5 * S);
        // 7003 more than `within` after the first knock.
        assert_eq!(k.knock(ip(1), 7003, 10 * S), Knocked::Reset);
        assert!(!k.admits(ip(1), 10 * S));
        // Repeating the first port starts over from it.
        k.knock(ip(1), 7001, 11 * S);
        k.knock(ip(1), 7001, 12 * S);
        k.knock(ip(1), 7002, 13 * S);
        assert_eq!(k.knock(ip(1), 7003, 14 * S), Knocked::Opened);
    }

    #[test]
    fn knocking_again_while_admitted_keeps_the_opening() {
        let mut k = knocks();
        for (i, p) in [7001, 7002, 7003].into_iter().enumerate() {
            k.knock(ip(1), p, S * i as u32);
        }
        assert!(k.admits(ip(1), 3 * S));
        assert_eq!(k.knock(ip(1), 7001, 4 * S), Knocked::Progress);
        assert_eq!(k.knock(ip(1), 7003, 5 * S), Knocked::Reset);
        assert!(k.admits(ip(1), 6 * S), "a stray knock does not close it");
        assert!(!k.admits(ip(1), 33 * S));
        // The sequence again renews it.
        for p in [7001, 7002, 7003] {
            k.knock(ip(1), p, 20 * S);
        }
        assert!(k.admits(ip(1), 45 * S));
    }

    #[test]
    fn a_flood_of_sources_stays_bounded_and_forgets_the_oldest() {
        let mut k = Knocks::new(vec![1, 2], 5 * S, 30 * S, 1000);
        k.knock(ip(1), 1, S);
        k.knock(ip(1), 2, S);
        assert!(k.admits(ip(1), S));
        for n in 0..100_000u32 {
            let a = IpAddr::from(std::net::Ipv6Addr::from(u128::from(n) + 1));
            k.knock(a, 1, 2 * S);
        }
        assert!(k.tracked() <= 1000);
        assert!(k.order.len() <= 4000);
        assert!(!k.admits(ip(1), 2 * S), "the oldest was forgotten");
    }
}
