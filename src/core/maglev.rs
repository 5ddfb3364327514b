//! Consistent hashing for `balance = "source_hash"`: Maglev's lookup table
//! (Eisenbud et al., NSDI 2016), weighted. Each backend walks its own
//! permutation of the table's slots, taking turns in proportion to its
//! weight, until every slot is taken. A client's key picks a slot; a
//! backend that joins or leaves moves about its share of the slots and
//! few others, so most clients keep their backend.

use super::backend::Backend;

/// The table's size: a prime, so every skip walks every slot, and the
/// same for every group, so a backend joining or leaving changes only the
/// slots it takes or frees (a size that grew with the group would move
/// nearly every client). At least 100 slots per backend, Maglev's rule
/// for an even spread, up to 655 backends (Envoy's default is 65,537).
pub const TABLE_SIZE: usize = 65_521;

/// A built lookup table: slot -> backend index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// The table for `backends`; those with weight 0 get no slot. `None`
    /// when no backend has a weight.
    pub fn new(backends: &[Backend]) -> Option<Maglev> {
        // In address order: the table depends on who claims a slot first,
        // and must not depend on the order the backends were listed in.
        let mut live: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect();
        live.sort_by_key(|&i| backends[i].addr);
        if live.is_empty() {
            return None;
        }
        let m = TABLE_SIZE;
        // Each backend's permutation: slot_j = (offset + j * skip) mod m.
        let perms: Vec<(u64, u64)> = live
            .iter()
            .map(|&i| {
                let key = backends[i].addr.to_string();
                let offset = fnv1a(key.as_bytes(), 0) % m as u64;
                let skip = fnv1a(key.as_bytes(), 1) % (m as u64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        let max_weight = live.iter().map(|&i| backends[i].weight).max().unwrap_or(1);
        let mut next = vec![0u64; live.len()];
        let mut credit = vec![0u64; live.len()];
        let mut table = vec![u32::MAX; m];
        let mut filled = 0;
        // Each round, every backend earns its weight in credit and takes a
        // slot for each `max_weight` of credit: turns proportional to weight.
        while filled < m {
            for (k, &i) in live.iter().enumerate() {
                credit[k] += u64::from(backends[i].weight);
                while credit[k] >= u64::from(max_weight) && filled < m {
                    credit[k] -= u64::from(max_weight);
                    let (offset, skip) = perms[k];
                    loop {
                        let slot = ((offset + next[k] * skip) % m as u64) as usize;
                        next[k] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
        Some(Maglev { table })
    }

    /// The backend for `key` (a hash of the client's address).
    pub fn lookup(&self, key: u64) -> usize {
        self.table[(key % self.table.len() as u64) as usize] as usize
    }

    /// Slots in the table.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// FNV-1a, 64 bits, from basis `seed` mixed in: stable across builds and
/// machines, so every instance of a fleet maps a client alike.
pub fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(PRIME);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    // A final mix: FNV's low bits alone spread short keys poorly.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)),
                weight: 1,
            })
            .collect()
    }

    fn key(client: u32) -> u64 {
        fnv1a(&client.to_be_bytes(), 7)
    }

    /// Which backend each of `n` clients lands on.
    fn assign(m: &Maglev, b: &[Backend], n: u32) -> Vec<SocketAddr> {
        (0..n).map(|c| b[m.lookup(key(c))].addr).collect()
    }

    #[test]
    fn every_slot_is_taken_and_the_spread_is_even() {
        let b = backends(10);
        let m = Maglev::new(&b).unwrap();
        assert_eq!(m.len(), TABLE_SIZE);
        let mut per = [0usize; 10];
        for s in 0..m.len() {
            per[m.table[s] as usize] += 1;
        }
        for n in per {
            assert!((6551..=6553).contains(&n), "{per:?}");
        }
    }

    #[test]
    fn weights_split_the_slots() {
        let mut b = backends(3);
        b[0].weight = 3;
        b[1].weight = 1;
        b[2].weight = 0;
        let m = Maglev::new(&b).unwrap();
        let taken = |i: u32| m.table.iter().filter(|&&x| x == i).count() as f64 / m.len() as f64;
        assert!((taken(0) - 0.75).abs() < 0.01, "{}", taken(0));
        assert!((taken(1) - 0.25).abs() < 0.01);
        assert_eq!(taken(2), 0.0, "weight 0 gets nothing");
        assert_eq!(Maglev::new(&[Backend { weight: 0, ..b[0] }]), None);
    }

    /// One backend joining ten moves about 1/11 of the clients (the share
    /// it must take), and barely more.
    #[test]
    fn a_backend_joining_ten_moves_about_its_share_of_clients() {
        let ten = backends(10);
        let eleven = backends(11);
        let before = assign(&Maglev::new(&ten).unwrap(), &ten, 100_000);
        let after = assign(&Maglev::new(&eleven).unwrap(), &eleven, 100_000);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let to_new = after.iter().filter(|a| **a == eleven[10].addr).count();
        let share = moved as f64 / 100_000.0;
        eprintln!(
            "a backend joining ten moved {share:.4} of 100,000 clients, {to_new} of {moved} to it"
        );
        assert!((0.085..0.11).contains(&share), "moved {share}");
        assert!(
            to_new as f64 >= 0.9 * moved as f64,
            "most moves go to the new backend: {to_new} of {moved}"
        );
        // And one leaving: its clients move, few others do.
        let nine = backends(9);
        let gone = assign(&Maglev::new(&nine).unwrap(), &nine, 100_000);
        let moved: usize = before.iter().zip(&gone).filter(|(a, b)| a != b).count();
        let was_on_gone = before.iter().filter(|a| **a == ten[9].addr).count();
        assert!(
            moved as f64 <= 1.15 * was_on_gone as f64,
            "{moved} vs {was_on_gone}"
        );
    }

    #[test]
    fn the_same_backends_give_the_same_table_whatever_their_order() {
        let b = backends(5);
        let mut r = b.clone();
        r.reverse();
        let (m1, m2) = (Maglev::new(&b).unwrap(), Maglev::new(&r).unwrap());
        for c in 0..1000 {
            assert_eq!(b[m1.lookup(key(c))].addr, r[m2.lookup(key(c))].addr);
        }
    }
}
