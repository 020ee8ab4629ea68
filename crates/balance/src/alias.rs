//! Weighted random sampling in O(1): Vose's alias method.
//!
//! The table has one column per endpoint. A draw picks a column uniformly, then flips a
//! biased coin between the column's own endpoint and its alias. Built in O(n) with exact
//! integer arithmetic (no floating-point leftovers), so the invariants hold exactly:
//! an endpoint of weight 0 has a threshold of 0 in its own column and is nobody's alias,
//! so it is never drawn; every other endpoint is drawn with probability `w / Σw` up to the
//! 2⁻³² resolution of the coin. One 64-bit random number serves a draw: its high half
//! chooses the column, its low half is the coin.

/// An alias table over a fixed list of weights.
#[derive(Debug)]
pub(crate) struct AliasTable {
    columns: Box<[Column]>,
}

#[derive(Debug, Clone, Copy)]
struct Column {
    /// The column keeps its own endpoint when the coin (32 bits) is below this.
    /// `u32::MAX` with `alias` pointing back at the column means "always".
    threshold: u32,
    alias: u32,
}

impl AliasTable {
    /// Builds the table; empty when every weight is 0.
    pub(crate) fn new(weights: &[u32]) -> Self {
        let n = weights.len();
        let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
        if total == 0 {
            return Self {
                columns: Box::new([]),
            };
        }
        // Each column holds `total` units; endpoint i brings `w_i * n` units.
        let mut units: Vec<u128> = weights.iter().map(|&w| u128::from(w) * n as u128).collect();
        let mut columns = vec![
            Column {
                threshold: u32::MAX,
                alias: 0,
            };
            n
        ];
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| units[i] < total);
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            // Column s keeps units[s]/total for itself and lends the rest to l.
            columns[s] = Column {
                threshold: ((units[s] << 32) / total) as u32,
                alias: l as u32,
            };
            units[l] -= total - units[s];
            if units[l] < total {
                large.pop();
                small.push(l);
            }
        }
        // Exact arithmetic leaves only full columns (units == total) here.
        for i in large.into_iter().chain(small) {
            debug_assert_eq!(units[i], total);
            columns[i] = Column {
                threshold: u32::MAX,
                alias: i as u32,
            };
        }
        Self {
            columns: columns.into_boxed_slice(),
        }
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The endpoint that the random word `random` draws. The table must not be empty.
    #[inline]
    pub(crate) fn sample(&self, random: u64) -> usize {
        let n = self.columns.len() as u64;
        let column = (((random >> 32) * n) >> 32) as usize;
        let Column { threshold, alias } = self.columns[column];
        if (random as u32) < threshold {
            column
        } else {
            alias as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;

    fn shares(weights: &[u32], draws: usize) -> Vec<f64> {
        let table = AliasTable::new(weights);
        let mut hits = vec![0usize; weights.len()];
        for _ in 0..draws {
            hits[table.sample(rng::next_u64())] += 1;
        }
        hits.iter().map(|&h| h as f64 / draws as f64).collect()
    }

    #[test]
    fn draws_follow_weights_and_zero_is_never_drawn() {
        let s = shares(&[1, 0, 2, 3, 0], 600_000);
        assert_eq!((s[1], s[4]), (0.0, 0.0));
        for (got, want) in [(s[0], 1.0 / 6.0), (s[2], 2.0 / 6.0), (s[3], 3.0 / 6.0)] {
            assert!((got - want).abs() < 0.005, "{s:?}");
        }
    }

    #[test]
    fn exact_construction_leaves_probabilities_exact() {
        // Probability mass of each endpoint, read back from the columns, in units of 2^-32
        // per column: it matches w/Σw to within one unit per column.
        let weights = [7u32, 0, 256, 1, 1, 13, 0, 99];
        let table = AliasTable::new(&weights);
        let n = weights.len() as f64;
        let mut mass = vec![0f64; weights.len()];
        for (i, c) in table.columns.iter().enumerate() {
            let own = if c.alias as usize == i {
                1.0
            } else {
                f64::from(c.threshold) / 2f64.powi(32)
            };
            mass[i] += own / n;
            mass[c.alias as usize] += (1.0 - own) / n;
        }
        let total: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            assert!(
                (mass[i] - f64::from(w) / f64::from(total)).abs() < 1e-8,
                "{mass:?}"
            );
            if w == 0 {
                assert_eq!(mass[i], 0.0);
            }
        }
        assert!(AliasTable::new(&[0, 0]).is_empty());
        assert!(AliasTable::new(&[]).is_empty());
        let one = AliasTable::new(&[0, 5, 0]);
        assert!((0..1000).all(|_| one.sample(rng::next_u64()) == 1));
    }
}
