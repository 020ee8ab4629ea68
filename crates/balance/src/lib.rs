//! Endpoint pickers.
//!
//! A picker is built off the hot path whenever a service's endpoint set changes, and is then
//! read by every request at once. A pick takes no lock and allocates nothing.
//!
//! Smooth weighted round robin is nginx's algorithm: every round, each endpoint's `current`
//! grows by its weight, the largest `current` wins and gives back the total weight. It spreads
//! a heavy endpoint's turns between the others' (weights 5,1,1 give `a a b a c a a`, not
//! `a a a a a b c`). nginx runs it under a per-upstream lock on every request; here the whole
//! cycle is computed once when the picker is built, and a pick is one atomic increment into it.

use std::sync::atomic::{AtomicUsize, Ordering};

/// nginx's smooth weighted round robin over a fixed list of weights.
#[derive(Debug)]
pub struct RoundRobin {
    /// One full cycle of picks, as indexes into the endpoint list.
    cycle: Box<[u32]>,
    next: AtomicUsize,
}

impl RoundRobin {
    /// Builds the cycle for these weights. Weights of zero never get a turn.
    pub fn new(weights: &[u32]) -> Self {
        Self {
            cycle: smooth_cycle(weights).into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    /// The index of the next endpoint, or None when no endpoint has a weight.
    #[inline]
    pub fn pick(&self) -> Option<usize> {
        if self.cycle.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.cycle[turn % self.cycle.len()] as usize)
    }

    /// How many picks make one full cycle.
    pub fn cycle_len(&self) -> usize {
        self.cycle.len()
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One cycle of nginx's smooth weighted round robin, with the weights first divided by their
/// greatest common divisor (weights 2,2 and 1,1 give the same cycle `0 1`).
fn smooth_cycle(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd);
    if divisor == 0 {
        return Vec::new();
    }
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    if weights.iter().all(|&w| w == 1 || w == 0) {
        // Equal weights: the cycle is plain order, and needs no quadratic walk.
        return (0..weights.len() as u32)
            .filter(|&i| weights[i as usize] == 1)
            .collect();
    }
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heavy_endpoints_are_interleaved_like_nginx() {
        // nginx documents this order for weights 5, 1, 1.
        assert_eq!(smooth_cycle(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn shares_follow_weights_and_zero_gets_nothing() {
        let rr = RoundRobin::new(&[3, 0, 1, 2]);
        let mut hits = [0; 4];
        for _ in 0..600 {
            hits[rr.pick().unwrap()] += 1;
        }
        assert_eq!(hits, [300, 0, 100, 200]);
    }

    #[test]
    fn common_factors_shorten_the_cycle() {
        assert_eq!(RoundRobin::new(&[4, 4, 8]).cycle_len(), 4);
        assert_eq!(RoundRobin::new(&[1; 10_000]).cycle_len(), 10_000);
    }

    #[test]
    fn no_weight_no_pick() {
        assert_eq!(RoundRobin::new(&[]).pick(), None);
        assert_eq!(RoundRobin::new(&[0, 0]).pick(), None);
    }
}
