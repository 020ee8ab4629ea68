//! The public API used as the proxy uses it: one picker per service, shared by threads that
//! pick concurrently against endpoint state kept in atomics, with the stick table and the
//! peak-EWMA tracker feeding it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use drover_balance::{Candidate, PeakEwma, Pick, Picker, RoundRobin, StickTable, hash_bytes};
use drover_model::Policy;

/// Endpoint state as the proxy keeps it: atomics shared by every request.
#[derive(Default)]
struct Endpoint {
    down: AtomicBool,
    in_flight: AtomicU64,
    latency: PeakEwma,
}

impl Candidate for Endpoint {
    fn is_available(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }
    fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
    fn latency_ewma_ns(&self) -> u64 {
        self.latency.value_ns()
    }
    fn ramp(&self) -> f64 {
        1.0
    }
}

fn endpoints(n: usize) -> Arc<Vec<Arc<Endpoint>>> {
    Arc::new((0..n).map(|_| Arc::new(Endpoint::default())).collect())
}

#[test]
fn round_robin_stays_exact_across_threads() {
    // Every turn of the cycle is taken exactly once, whichever thread takes it: 4 threads
    // × 15,000 picks over weights 1:2:3 give exactly 10,000, 20,000 and 30,000.
    let picker = Arc::new(Picker::new(Policy::RoundRobin, &[1, 2, 3]));
    let eps = endpoints(3);
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (picker, eps, counts) = (picker.clone(), eps.clone(), counts.clone());
            std::thread::spawn(move || {
                for _ in 0..15_000 {
                    let i = picker.pick(&eps, 0, &[]).unwrap().index;
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let counts: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(counts, [10_000, 20_000, 30_000]);
}

#[test]
fn every_policy_serves_threads_while_endpoints_flap() {
    // Two threads pick (with a retry that excludes the first try) while a third takes
    // endpoints down and up. Every pick returns, never the excluded index, never a
    // zero-weight one.
    for policy in [
        Policy::RoundRobin,
        Policy::LeastConn,
        Policy::Random,
        Policy::P2cEwma,
        Policy::ConsistentHash,
    ] {
        let weights: Vec<u32> = (0..24)
            .map(|i| if i % 6 == 0 { 0 } else { 1 + i % 3 })
            .collect();
        let picker = Arc::new(Picker::new(policy, &weights));
        let eps = endpoints(24);
        let stop = Arc::new(AtomicBool::new(false));
        let flapper = {
            let (eps, stop) = (eps.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let e = &eps[n * 7 % 24];
                    e.down.store(!e.is_available(), Ordering::Relaxed);
                    std::thread::yield_now();
                }
            })
        };
        let pickers: Vec<_> = (0..2u64)
            .map(|t| {
                let (picker, eps, weights) = (picker.clone(), eps.clone(), weights.clone());
                std::thread::spawn(move || {
                    for n in 0..20_000u64 {
                        let key = hash_bytes(&(n ^ t << 32).to_le_bytes());
                        let first = picker.pick(&eps, key, &[]).unwrap();
                        let e = &eps[first.index];
                        e.in_flight.fetch_add(1, Ordering::Relaxed);
                        e.latency
                            .observe(Duration::from_micros(100 + first.index as u64));
                        let retry = picker.pick(&eps, key, &[first.index]).unwrap();
                        assert_ne!(retry.index, first.index);
                        for Pick { index, .. } in [first, retry] {
                            assert_ne!(weights[index], 0);
                        }
                        e.in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for p in pickers {
            p.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        flapper.join().unwrap();
    }
}

#[test]
fn sticky_source_ip_flow() {
    // The `stick on src` flow: look the client up; on a miss, pick and remember.
    let picker = Picker::new(Policy::Random, &[1; 8]);
    let eps = endpoints(8);
    let table = StickTable::new(1_024);
    let client = hash_bytes(&[192, 0, 2, 33]);
    let now = 1_000;
    assert_eq!(table.get(client, now), None);
    let chosen = picker.pick(&eps, client, &[]).unwrap().index;
    table.put(client, chosen as u32, now + 1_800);
    for t in 0..1_800 {
        assert_eq!(table.get(client, now + t), Some(chosen as u32));
    }
    assert_eq!(table.get(client, now + 1_800), None);
}

#[test]
fn round_robin_alone_still_works() {
    let rr = RoundRobin::new(&[5, 1, 1]);
    assert_eq!(rr.cycle_len(), 7);
    let order: Vec<usize> = (0..7).map(|_| rr.pick().unwrap()).collect();
    assert_eq!(order, [0, 0, 1, 0, 2, 0, 0]);
}
