//! nginx's smooth weighted round robin, precomputed as one cycle.
//!
//! Every round, each endpoint's `current` grows by its weight, the largest `current` wins
//! (the lowest index on a tie) and gives back the total weight. This spreads a heavy
//! endpoint's turns between the others' (weights 5,1,1 give `a a b a c a a`, not
//! `a a a a a b c`). nginx runs it under a per-upstream lock on every request; here the whole
//! cycle is computed once when the picker is built, and a pick is one atomic increment into
//! it. The cycle has `Σw / gcd(w)` entries of 4 bytes: at most 10 MB for 10,000 endpoints of
//! the highest weight (256) with no common factor; 40 KB for 10,000 equal ones.
//!
//! Building it does not run nginx's O(n) step `Σw` times. Endpoints of equal weight always
//! take their turns in index order (the one with the fewest turns so far leads its class,
//! ties to the lowest index), so only one candidate per distinct weight competes, and a
//! kinetic tournament tree over those d candidates finds the largest `current` in
//! O(log d) amortised: O(Σw · log d) for the cycle, d ≤ 256 distinct weights. It is exactly
//! nginx's sequence (checked against the plain algorithm in the tests). In release: about
//! 130 ms for 10,000 endpoints with weights spread over 1..=256 (1.3 million turns), under
//! a millisecond for 10,000 equal ones.

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
        Some(self.cycle[self.ticket() % self.cycle.len()] as usize)
    }

    /// How many picks make one full cycle.
    pub fn cycle_len(&self) -> usize {
        self.cycle.len()
    }

    /// The next turn number (one atomic increment).
    #[inline]
    pub(crate) fn ticket(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The endpoint at a position of the cycle, taken modulo its length. The cycle must not
    /// be empty.
    #[inline]
    pub(crate) fn at(&self, position: usize) -> usize {
        self.cycle[position % self.cycle.len()] as usize
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Endpoints that share one (reduced) weight, in index order.
struct Class {
    weight: i128,
    members: Vec<u32>,
    /// Turns the class has had; its members have had `turns / len` or one more each.
    turns: usize,
}

impl Class {
    /// The class's leader: the member with the fewest turns, the lowest index on a tie.
    fn leader(&self) -> u32 {
        self.members[self.turns % self.members.len()]
    }

    /// Turns each member has had at least (those of the leader).
    fn rounds(&self) -> i128 {
        (self.turns / self.members.len()) as i128
    }
}

/// One cycle of nginx's smooth weighted round robin, with the weights first divided by their
/// greatest common divisor (weights 2,2 and 1,1 give the same cycle `0 1`).
fn smooth_cycle(weights: &[u32]) -> Vec<u32> {
    let mut classes = classes(weights);
    let total: i128 = classes
        .iter()
        .map(|c| c.weight * c.members.len() as i128)
        .sum();
    let heaviest = classes.last().map_or(0, |c| c.weight);
    // Every current and every difference of two stays within ±3 × total × heaviest.
    if total * (heaviest + 1) < 1 << 60 {
        Tournament::new(&mut classes, total as i64).cycle()
    } else {
        scan_cycle(&mut classes, total)
    }
}

/// The non-zero weights divided by their gcd, grouped, lightest class first.
fn classes(weights: &[u32]) -> Vec<Class> {
    let divisor = weights.iter().copied().fold(0, gcd);
    if divisor == 0 {
        return Vec::new();
    }
    let mut order: Vec<u32> = (0..weights.len() as u32)
        .filter(|&i| weights[i as usize] != 0)
        .collect();
    order.sort_by_key(|&i| (weights[i as usize], i));
    let mut classes: Vec<Class> = Vec::new();
    for i in order {
        let weight = i128::from(weights[i as usize] / divisor);
        match classes.last_mut() {
            Some(class) if class.weight == weight => class.members.push(i),
            _ => classes.push(Class {
                weight,
                members: vec![i],
                turns: 0,
            }),
        }
    }
    classes
}

/// The cycle by scanning every class at every step: O(Σw · d). The fallback for weights so
/// large that `Tournament`'s 64-bit arithmetic could overflow.
fn scan_cycle(classes: &mut [Class], total: i128) -> Vec<u32> {
    let mut cycle = Vec::with_capacity(total as usize);
    for step in 1..=total {
        // After step `step`'s additions, member m of a class has current
        // `step * weight - total * turns(m)`; the class's leader has the largest.
        let mut best: Option<(i128, u32, usize)> = None;
        for (c, class) in classes.iter().enumerate() {
            let current = step * class.weight - total * class.rounds();
            let leader = class.leader();
            let better = match best {
                None => true,
                Some((cur, idx, _)) => current > cur || (current == cur && leader < idx),
            };
            if better {
                best = Some((current, leader, c));
            }
        }
        let (_, leader, c) = best.expect("at least one class");
        classes[c].turns += 1;
        cycle.push(leader);
    }
    cycle
}

/// A kinetic tournament over the classes: O(Σw · log d) rather than O(Σw · d).
///
/// A class leader's current at step t is the line `t × weight − total × rounds`: it only
/// changes its intercept, and only when the class takes a turn. Each node of a binary tree
/// over the classes keeps the winner of its two children at the current step and the first
/// later step at which the loser overtakes it (never, if the loser's slope is not larger).
/// A step refreshes only the nodes whose certificate has expired, plus the path of the class
/// that took the previous turn.
struct Tournament<'a> {
    classes: &'a mut [Class],
    total: i64,
    /// Leaves start here (a power of two); node k has children 2k and 2k + 1.
    leaves: usize,
    /// Winning class of each node; `NONE` for empty padding leaves.
    winner: Vec<u32>,
    /// The node's result holds for steps before this one.
    valid_until: Vec<i64>,
}

const NONE: u32 = u32::MAX;

impl<'a> Tournament<'a> {
    fn new(classes: &'a mut [Class], total: i64) -> Self {
        let leaves = classes.len().next_power_of_two();
        let mut winner = vec![NONE; 2 * leaves];
        for c in 0..classes.len() {
            winner[leaves + c] = c as u32;
        }
        Self {
            classes,
            total,
            leaves,
            winner,
            valid_until: vec![0; 2 * leaves],
        }
    }

    fn cycle(mut self) -> Vec<u32> {
        let mut cycle = Vec::with_capacity(self.total as usize);
        for step in 1..=self.total {
            self.refresh(1, step);
            let c = self.winner[1] as usize;
            cycle.push(self.classes[c].leader());
            self.classes[c].turns += 1;
            let mut node = self.leaves + c;
            while node > 0 {
                self.valid_until[node] = 0;
                node /= 2;
            }
        }
        cycle
    }

    fn current(&self, c: u32, step: i64) -> i64 {
        let class = &self.classes[c as usize];
        step * class.weight as i64 - self.total * class.rounds() as i64
    }

    /// Whether class a's leader beats class b's at this step.
    fn beats(&self, a: u32, b: u32, step: i64) -> bool {
        let (x, y) = (self.current(a, step), self.current(b, step));
        x > y || (x == y && self.classes[a as usize].leader() < self.classes[b as usize].leader())
    }

    /// The first step after `step` at which `loser` beats `winner`, as things stand.
    fn overtaken(&self, winner: u32, loser: u32, step: i64) -> i64 {
        let (w, l) = (
            &self.classes[winner as usize],
            &self.classes[loser as usize],
        );
        let gain = (l.weight - w.weight) as i64;
        if gain <= 0 {
            return i64::MAX;
        }
        // loser - winner at step s is s × gain - gap.
        let gap = self.total * (l.rounds() - w.rounds()) as i64;
        let at = if l.leader() < w.leader() {
            (gap + gain - 1).div_euclid(gain) // a tie is enough
        } else {
            gap.div_euclid(gain) + 1
        };
        at.max(step + 1)
    }

    fn refresh(&mut self, node: usize, step: i64) {
        if self.valid_until[node] > step {
            return;
        }
        if node >= self.leaves {
            self.valid_until[node] = i64::MAX;
            return;
        }
        self.refresh(2 * node, step);
        self.refresh(2 * node + 1, step);
        let (a, b) = (self.winner[2 * node], self.winner[2 * node + 1]);
        let (winner, until) = if b == NONE {
            (a, i64::MAX)
        } else if a == NONE {
            (b, i64::MAX)
        } else if self.beats(a, b, step) {
            (a, self.overtaken(a, b, step))
        } else {
            (b, self.overtaken(b, a, step))
        };
        self.winner[node] = winner;
        self.valid_until[node] = until
            .min(self.valid_until[2 * node])
            .min(self.valid_until[2 * node + 1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;

    /// nginx's algorithm as written, O(n) per step: the reference for `smooth_cycle`.
    fn plain_cycle(weights: &[u32]) -> Vec<u32> {
        let divisor = weights.iter().copied().fold(0, gcd);
        if divisor == 0 {
            return Vec::new();
        }
        let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut cycle = Vec::new();
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

    #[test]
    fn heavy_endpoints_are_interleaved_like_nginx() {
        // nginx documents this order for weights 5, 1, 1.
        assert_eq!(smooth_cycle(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn grouping_by_weight_gives_nginx_sequence_exactly() {
        for case in 0..300 {
            let n = 1 + rng::below(if case < 250 { 12 } else { 60 });
            let weights: Vec<u32> = (0..n)
                .map(|_| match rng::below(4) {
                    0 => 0,
                    1 => 1 + rng::below(3) as u32,
                    _ if case < 250 => 1 + rng::below(9) as u32,
                    _ => 1 + rng::below(40) as u32,
                })
                .collect();
            assert_eq!(
                smooth_cycle(&weights),
                plain_cycle(&weights),
                "case {case}: weights {weights:?}"
            );
        }
        assert_eq!(smooth_cycle(&[0, 0, 3]), plain_cycle(&[0, 0, 3]));
        // The O(Σw · d) fallback too.
        for weights in [
            &[5u32, 1, 1][..],
            &[3, 7, 7, 2, 0, 9, 3],
            &[1, 2, 3, 4, 5, 6, 7, 8],
        ] {
            let mut classes = classes(weights);
            let total = classes
                .iter()
                .map(|c| c.weight * c.members.len() as i128)
                .sum();
            assert_eq!(scan_cycle(&mut classes, total), plain_cycle(weights));
        }
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
    fn large_mixed_pools_build_quickly() {
        // 2,000 endpoints of weights 1..=256: a cycle of about 260,000 turns (the benchmark
        // builds 10,000 in release).
        let weights: Vec<u32> = (0..2_000u32).map(|i| 1 + (i * 7919) % 256).collect();
        let rr = RoundRobin::new(&weights);
        let total: u32 = weights.iter().sum();
        assert_eq!(rr.cycle_len(), total as usize);
    }

    #[test]
    fn no_weight_no_pick() {
        assert_eq!(RoundRobin::new(&[]).pick(), None);
        assert_eq!(RoundRobin::new(&[0, 0]).pick(), None);
    }
}
