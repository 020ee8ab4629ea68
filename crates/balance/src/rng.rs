//! A small, fast per-thread random number generator for picks.
//!
//! Each thread owns one 64-bit state in a `thread_local!` `Cell`: a pick never touches a
//! shared cache line for randomness and never locks. The generator is wyrand (a Weyl
//! sequence, so every state is visited, passed through a folded 128-bit multiply): fast and
//! statistically good enough for load balancing, and not cryptographic. A thread's state is
//! seeded on first use from the clock, a process-wide counter and the state's own address,
//! so threads (and processes) draw different sequences.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::hash::{GOLDEN, mix64, unit_from};

thread_local! {
    /// 0 means "not seeded yet"; a seeded state is never 0 when stored.
    static STATE: Cell<u64> = const { Cell::new(0) };
}

static SEEDS: AtomicU64 = AtomicU64::new(0);

const WEYL: u64 = 0xa076_1d64_78bd_642f;
const FOLD: u64 = 0xe703_7ed1_a0b4_28db;

#[cold]
fn seed(cell: &Cell<u64>) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = SEEDS.fetch_add(1, Ordering::Relaxed);
    let here = cell as *const Cell<u64> as usize as u64;
    mix64(nanos ^ count.wrapping_mul(GOLDEN) ^ here.rotate_left(32)) | 1
}

/// The next 64 random bits of this thread's sequence.
#[inline]
pub(crate) fn next_u64() -> u64 {
    STATE.with(|cell| {
        let mut state = cell.get();
        if state == 0 {
            state = seed(cell);
        }
        state = state.wrapping_add(WEYL);
        cell.set(state);
        let product = u128::from(state) * u128::from(state ^ FOLD);
        (product as u64) ^ ((product >> 64) as u64)
    })
}

/// A uniform index in `0..n` (Lemire's multiply-shift; `n` must be above 0).
#[inline]
pub(crate) fn below(n: usize) -> usize {
    ((u128::from(next_u64()) * n as u128) >> 64) as usize
}

/// A uniform number in `[0, 1)`.
#[inline]
pub(crate) fn unit() -> f64 {
    unit_from(next_u64())
}

/// True with probability `p` (for `p` in `0..=1`).
#[inline]
pub(crate) fn chance(p: f64) -> bool {
    unit() < p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_enough_and_threads_differ() {
        let mut hits = [0u32; 10];
        for _ in 0..100_000 {
            hits[below(10)] += 1;
        }
        assert!(
            hits.iter().all(|&h| (9_500..10_500).contains(&h)),
            "{hits:?}"
        );
        let heads = (0..100_000).filter(|_| chance(0.25)).count();
        assert!((24_000..26_000).contains(&heads), "{heads}");
        let mine: Vec<u64> = (0..4).map(|_| next_u64()).collect();
        let theirs = std::thread::spawn(|| (0..4).map(|_| next_u64()).collect::<Vec<_>>())
            .join()
            .unwrap();
        assert_ne!(mine, theirs);
    }
}
