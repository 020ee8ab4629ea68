//! Benchmarks of one pick per policy at 3, 100 and 10,000 endpoints, of a stick-table
//! lookup, and of building pickers for 10,000 endpoints. Endpoints are all available, with varied in-flight counts and latencies, read
//! from atomics as the proxy's endpoint state would be.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use drover_balance::{Candidate, Picker, StickTable, hash_bytes};
use drover_model::Policy;

struct Endpoint {
    in_flight: AtomicU64,
    latency: AtomicU64,
}

impl Candidate for Endpoint {
    fn is_available(&self) -> bool {
        true
    }
    fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
    fn latency_ewma_ns(&self) -> u64 {
        self.latency.load(Ordering::Relaxed)
    }
    fn ramp(&self) -> f64 {
        1.0
    }
}

fn endpoints(n: usize) -> Vec<Endpoint> {
    (0..n as u64)
        .map(|i| Endpoint {
            in_flight: AtomicU64::new(i * 7 % 13),
            latency: AtomicU64::new(1_000_000 + i * 7_919 % 500_000),
        })
        .collect()
}

fn picks(c: &mut Criterion) {
    let policies = [
        ("round_robin", Policy::RoundRobin),
        ("least_conn", Policy::LeastConn),
        ("random", Policy::Random),
        ("p2c_ewma", Policy::P2cEwma),
        ("consistent_hash", Policy::ConsistentHash),
    ];
    let mut group = c.benchmark_group("pick");
    for n in [3usize, 100, 10_000] {
        let eps = endpoints(n);
        // Mixed weights 1..=4, so the weighted structures are exercised.
        let weights: Vec<u32> = (0..n as u32).map(|i| 1 + i % 4).collect();
        for (name, policy) in policies {
            let picker = Picker::new(policy, &weights);
            let mut key = 0u64;
            group.bench_function(format!("{name}/{n}"), |b| {
                b.iter(|| {
                    key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    black_box(picker.pick(black_box(&eps), key, &[]))
                })
            });
        }
    }
    group.finish();
}

fn stick_table(c: &mut Criterion) {
    let table = StickTable::new(1 << 16);
    let keys: Vec<u64> = (0..4_096u32)
        .map(|i| hash_bytes(&i.to_be_bytes()))
        .collect();
    for (i, &k) in keys.iter().enumerate() {
        table.put(k, i as u32, u32::MAX);
    }
    let mut n = 0usize;
    c.bench_function("stick_table/get", |b| {
        b.iter(|| {
            n = (n + 1) & 4_095;
            black_box(table.get(black_box(keys[n]), 1_000))
        })
    });
    c.bench_function("hash_bytes/ipv6", |b| {
        let ip = [0x20u8, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        b.iter(|| black_box(hash_bytes(black_box(&ip))))
    });
}

/// Building pickers for 10,000 endpoints (off the hot path, on every change of the set).
fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    let equal = vec![1u32; 10_000];
    let mixed: Vec<u32> = (0..10_000u32).map(|i| 1 + i * 7_919 % 256).collect();
    let skewed: Vec<u32> = (0..10_000u32)
        .map(|i| if i == 0 { 256 } else { 1 })
        .collect();
    for (name, policy, weights) in [
        ("round_robin/10000_mixed_1_256", Policy::RoundRobin, &mixed),
        ("random/10000_mixed_1_256", Policy::Random, &mixed),
        (
            "consistent_hash/10000_equal",
            Policy::ConsistentHash,
            &equal,
        ),
        (
            "consistent_hash/10000_mixed_1_256",
            Policy::ConsistentHash,
            &mixed,
        ),
        (
            "consistent_hash/10000_one_256_rest_1",
            Policy::ConsistentHash,
            &skewed,
        ),
    ] {
        group.bench_function(name, |b| b.iter(|| black_box(Picker::new(policy, weights))));
    }
    group.finish();
}

criterion_group!(benches, picks, stick_table, build);
criterion_main!(benches);
