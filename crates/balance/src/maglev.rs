//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
//!
//! A lookup table of M slots (M prime) maps a key to an endpoint: `table[key % M]`. It is
//! filled by letting endpoints take turns, each claiming the next free slot of its own
//! permutation of `0..M` (an offset and a skip derived from the endpoint's identity; M prime
//! makes every skip a full permutation). Weighted: each round, an endpoint earns credit equal
//! to its weight and takes one turn per `max weight` of credit, so slots (and keys) are shared
//! in proportion to weight; the heaviest endpoint takes a turn every round.
//!
//! Invariants and properties:
//! - Every slot names an endpoint of non-zero weight; zero-weight endpoints own no slot.
//! - Permutations depend on identities, not on positions in the list: pass stable
//!   identities (`Picker::with_identities`) so that removing an endpoint from the middle of
//!   the list does not reshuffle the others. Removing one of n endpoints moves its ~1/n of
//!   the keys, plus a small disruption between the others (Maglev trades perfect stability
//!   for balance): 0.3% of all keys when one of 10 leaves, as the tests measure.
//! - M is the first of a short list of primes that is at least 100 × n (n counting every
//!   endpoint, drained ones included, so a drain does not change M): 65,537 up to 655
//!   endpoints, 262,147 up to 2,621, 1,048,583 up to 10,485, 4,194,319 up to 41,943,
//!   16,777,259 beyond (then less than 100 × n). A rebuild that changes M remaps nearly every
//!   key, so the steps are few and far apart. Memory: 4 bytes a slot, so 256 KB for any
//!   pool up to 655 endpoints and 4 MB at 10,000 endpoints (M = 1,048,583).
//! - Building costs O(M log M) for the slot walks plus O(rounds × d) for d distinct weights
//!   (endpoints of one weight take their turns in the same rounds), rounds being about
//!   M × max weight / Σ weights. In release, about 40 ms for 10,000 endpoints, whether
//!   their weights are equal, spread over 1..=256, or one of 256 among 9,999 of 1.

use crate::hash::{GOLDEN, mix64, unit_from};

/// The table sizes, each the first prime at or above a power of two.
const PRIMES: [usize; 5] = [65_537, 262_147, 1_048_583, 4_194_319, 16_777_259];

/// Salts that make the offset, skip, ramp and rendezvous hashes independent of each other.
const OFFSET_SALT: u64 = 0x4f1b_bcdc_bfa5_3e0b;
const SKIP_SALT: u64 = 0x2545_f491_4f6c_dd1d;
const RAMP_SALT: u64 = 0x7a64_6e4b_1c3a_8e2f;
const RENDEZVOUS_SALT: u64 = 0x3c6e_f372_fe94_f82b;

/// The table size for a pool of `n` endpoints.
pub(crate) fn table_size(n: usize) -> usize {
    PRIMES
        .iter()
        .copied()
        .find(|&m| m / 100 >= n)
        .unwrap_or(PRIMES[PRIMES.len() - 1])
}

/// A filled Maglev lookup table.
#[derive(Debug)]
pub(crate) struct Maglev {
    /// Endpoint index per slot; empty when no endpoint has a weight.
    table: Box<[u32]>,
    /// Each endpoint's identity, for the per-key ramp coin and the rendezvous fallback.
    identities: Box<[u64]>,
}

/// An endpoint's walk along its permutation.
struct Walker {
    index: u32,
    position: usize,
    skip: usize,
}

/// The endpoints of one weight, which earn credit together and so take turns in the same
/// rounds.
struct Class {
    weight: u64,
    credit: u64,
    walkers: Vec<Walker>,
}

impl Maglev {
    /// Fills the table. `identities[i]` names endpoint i (stable across rebuilds).
    pub(crate) fn new(weights: &[u32], identities: &[u64]) -> Self {
        assert_eq!(weights.len(), identities.len(), "one identity per weight");
        let identities: Box<[u64]> = identities.into();
        let m = table_size(weights.len());
        let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] != 0).collect();
        if order.is_empty() {
            return Self {
                table: Box::new([]),
                identities,
            };
        }
        // Heaviest class first; within a class, in list order.
        order.sort_by_key(|&i| (std::cmp::Reverse(weights[i]), i));
        let mut classes: Vec<Class> = Vec::new();
        for i in order {
            let id = identities[i];
            let walker = Walker {
                index: i as u32,
                position: (mix64(id ^ OFFSET_SALT) % m as u64) as usize,
                skip: (mix64(id ^ SKIP_SALT) % (m as u64 - 1) + 1) as usize,
            };
            let weight = u64::from(weights[i]);
            match classes.last_mut() {
                Some(class) if class.weight == weight => class.walkers.push(walker),
                _ => classes.push(Class {
                    weight,
                    credit: 0,
                    walkers: vec![walker],
                }),
            }
        }
        let heaviest = classes[0].weight;
        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; m];
        let mut filled = 0;
        // Each round, a class earns its weight in credit and its endpoints take one turn
        // per `heaviest` of credit: O(d) per round for d distinct weights, plus the turns.
        'rounds: loop {
            for class in &mut classes {
                class.credit += class.weight;
                if class.credit < heaviest {
                    continue;
                }
                class.credit -= heaviest;
                for walker in &mut class.walkers {
                    loop {
                        let slot = walker.position;
                        walker.position += walker.skip;
                        if walker.position >= m {
                            walker.position -= m;
                        }
                        if table[slot] == EMPTY {
                            table[slot] = walker.index;
                            break;
                        }
                    }
                    filled += 1;
                    if filled == m {
                        break 'rounds;
                    }
                }
            }
        }
        Self {
            table: table.into_boxed_slice(),
            identities,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The endpoint in the slot of probe number `probe` for `key`: probe 0 is
    /// `table[key % M]`, later probes rehash the key with the probe number. The table must
    /// not be empty.
    #[inline]
    pub(crate) fn probe(&self, key: u64, probe: u32) -> usize {
        let m = self.table.len() as u64;
        let hashed = if probe == 0 {
            key
        } else {
            mix64(key ^ u64::from(probe).wrapping_mul(GOLDEN))
        };
        self.table[(hashed % m) as usize] as usize
    }

    /// A uniform number in `[0, 1)` fixed for this key and endpoint: a ramping endpoint
    /// accepts exactly the keys whose number is below its ramp, so the same keys stay with
    /// it, and more join as the ramp grows.
    #[inline]
    pub(crate) fn ramp_coin(&self, key: u64, index: usize) -> f64 {
        unit_from(mix64(key ^ RAMP_SALT ^ mix64(self.identities[index])))
    }

    /// Weighted rendezvous score of an endpoint for a key (lower wins): `-ln(u) / weight`,
    /// u uniform in (0, 1] and fixed for the pair. Used only by the O(n) fallback.
    pub(crate) fn rendezvous(&self, key: u64, index: usize, weight: f64) -> f64 {
        let u = 1.0 - unit_from(mix64(key ^ RENDEZVOUS_SALT ^ mix64(self.identities[index])));
        -u.ln() / weight
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_prime(n: usize) -> bool {
        n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n / d * d != n)
    }

    #[test]
    fn sizes_are_primes_of_at_least_100_slots_per_endpoint() {
        for p in PRIMES {
            assert!(is_prime(p), "{p}");
        }
        for n in [0, 1, 3, 100, 655, 656, 2_621, 2_622, 10_000, 10_485, 41_943] {
            let m = table_size(n);
            assert!(m >= 100 * n && PRIMES.contains(&m), "n={n} m={m}");
        }
        assert_eq!(table_size(10_000), 1_048_583);
        assert_eq!(table_size(1_000_000), 16_777_259);
    }

    #[test]
    fn slots_follow_weights() {
        let weights = [1, 0, 2, 3];
        let maglev = Maglev::new(&weights, &[11, 12, 13, 14]);
        let mut slots = [0usize; 4];
        for &i in maglev.table.iter() {
            slots[i as usize] += 1;
        }
        assert_eq!(slots[1], 0);
        let m = maglev.len() as f64;
        for (i, want) in [(0, 1.0 / 6.0), (2, 2.0 / 6.0), (3, 3.0 / 6.0)] {
            assert!((slots[i] as f64 / m - want).abs() < 0.01, "{slots:?}");
        }
        assert!(Maglev::new(&[0, 0], &[1, 2]).is_empty());
    }
}
