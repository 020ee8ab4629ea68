//! A bounded, lock-free stick table (HAProxy's `stick on src`): client key → small value
//! (an endpoint), each entry with an expiry.
//!
//! Direct-mapped: a key has exactly one slot (its mixed hash modulo the capacity, which is
//! a power of two), so a lookup is one slot read and a colliding key simply evicts the
//! entry before it. Memory is fixed at 32 bytes a slot, allocated up front.
//!
//! Each slot is a small sequence lock made of atomics only: a sequence number, the full
//! 64-bit key, and the value with its expiry packed in one word. A writer claims the slot by
//! moving the sequence from even to odd with a compare-and-swap, writes key and value, and
//! moves it to the next even number. A reader reads the sequence, the key and the value, then
//! the sequence again: if the sequence was odd or changed, another thread wrote in between
//! and the read is a miss. So a torn read (the key of one put with the value of another) is
//! always detected, deterministically rather than by a checksum, and a reader never gets a
//! value that was not put for its key. Nobody waits: a put that finds the slot claimed by
//! another writer is dropped (the other put wins, as a later one would have anyway), and a
//! read that races a write is a miss, which costs the caller one fresh pick.

use std::sync::atomic::{AtomicU64, Ordering, fence};

use crate::hash::mix64;

/// A bounded, lock-free table from a key hash to a small value with an expiry (HAProxy's
/// `stick on src`): direct-mapped slots (capacity rounded up to a power of two); a colliding
/// key evicts. A torn read (two atomics updated by another thread in between) is detected
/// and read as a miss, never as a wrong value.
#[derive(Debug)]
pub struct StickTable {
    slots: Box<[Slot]>,
    mask: usize,
}

/// One entry. Sequence 0 means never written; odd means a write is under way.
#[derive(Debug, Default)]
#[repr(align(32))]
struct Slot {
    sequence: AtomicU64,
    key: AtomicU64,
    /// Value in the high 32 bits, expiry (seconds) in the low 32.
    entry: AtomicU64,
}

impl StickTable {
    /// A table of `capacity` slots, rounded up to a power of two (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1).next_power_of_two();
        Self {
            slots: (0..capacity).map(|_| Slot::default()).collect(),
            mask: capacity - 1,
        }
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn slot(&self, key: u64) -> &Slot {
        &self.slots[mix64(key) as usize & self.mask]
    }

    /// The value put for `key`, if it is still in its slot and `now_secs` is before its
    /// expiry. A read that races a write to the same slot is a miss.
    #[inline]
    pub fn get(&self, key: u64, now_secs: u32) -> Option<u32> {
        let slot = self.slot(key);
        let before = slot.sequence.load(Ordering::Acquire);
        if before == 0 || before & 1 == 1 {
            return None;
        }
        let stored_key = slot.key.load(Ordering::Relaxed);
        let entry = slot.entry.load(Ordering::Relaxed);
        // Orders the two loads above before the re-check below: if either saw a later
        // writer's store, the re-check sees that writer's sequence (or a later one).
        fence(Ordering::Acquire);
        let after = slot.sequence.load(Ordering::Relaxed);
        if before != after || stored_key != key {
            return None;
        }
        let (value, expires_at) = ((entry >> 32) as u32, entry as u32);
        (now_secs < expires_at).then_some(value)
    }

    /// Remembers `value` for `key` until `expires_at_secs` (exclusive), evicting whatever
    /// held the key's slot. Dropped if another thread is writing the same slot right now.
    #[inline]
    pub fn put(&self, key: u64, value: u32, expires_at_secs: u32) {
        let slot = self.slot(key);
        let sequence = slot.sequence.load(Ordering::Relaxed);
        if sequence & 1 == 1
            || slot
                .sequence
                .compare_exchange(sequence, sequence + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // Orders the claim (odd sequence) before the stores below, for any reader whose
        // loads see them.
        fence(Ordering::Release);
        slot.key.store(key, Ordering::Relaxed);
        slot.entry.store(
            (u64::from(value) << 32) | u64::from(expires_at_secs),
            Ordering::Relaxed,
        );
        slot.sequence.store(sequence + 2, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// Two keys that share a slot in `table`.
    fn colliding_pair(table: &StickTable) -> (u64, u64) {
        let first = 1;
        let target = mix64(first) as usize & table.mask;
        let second = (2..)
            .find(|&k| mix64(k) as usize & table.mask == target)
            .unwrap();
        (first, second)
    }

    #[test]
    fn put_then_get_until_expiry() {
        let t = StickTable::new(100);
        assert_eq!(t.capacity(), 128);
        assert_eq!(t.get(7, 0), None);
        t.put(7, 3, 1_000);
        assert_eq!(t.get(7, 0), Some(3));
        assert_eq!(t.get(7, 999), Some(3));
        assert_eq!(t.get(7, 1_000), None, "expiry is exclusive");
        assert_eq!(t.get(8, 10), None);
        t.put(7, 4, 2_000);
        assert_eq!(t.get(7, 1_500), Some(4), "a put refreshes value and expiry");
        // Key 0 and value 0 are ordinary values, not "empty".
        t.put(0, 0, 5);
        assert_eq!(t.get(0, 4), Some(0));
        assert_eq!(StickTable::new(0).capacity(), 1);
    }

    #[test]
    fn a_colliding_key_evicts() {
        let t = StickTable::new(16);
        let (a, b) = colliding_pair(&t);
        t.put(a, 1, 100);
        t.put(b, 2, 100);
        assert_eq!(t.get(b, 0), Some(2));
        assert_eq!(t.get(a, 0), None);
    }

    #[test]
    fn racing_threads_never_read_a_value_put_for_another_key() {
        // Four slots and 64 keys: writers collide constantly. Every value put for key k
        // carries k in its low 16 bits (and a varying nonce above), so a reader that got
        // another put's value would see a foreign tag.
        let table = Arc::new(StickTable::new(4));
        let stop = Arc::new(AtomicBool::new(false));
        let keys: Vec<u64> = (0..64u64).map(|k| mix64(k) & !0xffff | k).collect();
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (table, stop, keys) = (table.clone(), stop.clone(), keys.clone());
                std::thread::spawn(move || {
                    let mut n = w;
                    while !stop.load(Ordering::Relaxed) {
                        n = n.wrapping_add(1);
                        let key = keys[(mix64(n) % 64) as usize];
                        let value = ((n as u32) << 16) | (key as u32 & 0xffff);
                        table.put(key, value, 1 + (n as u32 % 1_000));
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..2u64)
            .map(|r| {
                let (table, keys) = (table.clone(), keys.clone());
                std::thread::spawn(move || {
                    let (mut hits, mut misses) = (0u64, 0u64);
                    for n in 0..2_000_000u64 {
                        let key = keys[(mix64(n ^ (r << 40)) % 64) as usize];
                        match table.get(key, 0) {
                            Some(value) => {
                                assert_eq!(value & 0xffff, key as u32 & 0xffff, "torn read");
                                hits += 1;
                            }
                            None => misses += 1,
                        }
                    }
                    (hits, misses)
                })
            })
            .collect();
        let mut total = (0, 0);
        for r in readers {
            let (h, m) = r.join().unwrap();
            total = (total.0 + h, total.1 + m);
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        assert!(total.0 > 0 && total.1 > 0, "hits and misses: {total:?}");
    }
}
