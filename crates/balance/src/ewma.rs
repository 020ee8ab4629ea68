//! Peak-EWMA latency (Finagle's and Linkerd's load metric for power of two choices).
//!
//! A sample slower than the estimate replaces it at once (the peak), so an endpoint that
//! turns slow is avoided from its first slow answer. A faster sample is blended in with
//! weight `1 - e^(-Δt/τ)`, Δt being the time since the previous sample and τ the decay
//! time constant: the estimate comes down smoothly, at a speed set by time, not by request
//! count. Reading applies the same decay towards 0 for the time since the last sample (as
//! tower's `PeakEwma` does), so an endpoint that stopped being picked because it looked slow
//! looks cheaper as time passes and gets tried again.
//!
//! The estimate and the time of the last sample live together in one `AtomicU64`, updated by
//! compare-and-swap: readers and writers never lock, and a reader never sees an estimate
//! paired with another sample's time. To fit, the estimate is kept as an `f32` with its 8
//! lowest mantissa bits rounded off (relative precision 2⁻¹⁶, about 0.002%) in the high 23
//! bits, and the time as microseconds since the tracker was created, modulo 2⁴¹ (25 days),
//! in the low 41 bits. Samples closer together than a microsecond count as simultaneous, and
//! a gap of more than 25 days between two samples is misread modulo 25 days; neither
//! matters for a 10 s time constant.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The default decay time constant: 10 s, Finagle's and Linkerd's.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

const TIME_BITS: u32 = 41;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
/// Largest estimate kept, in nanoseconds (about 31,700 years): keeps the packed f32 finite.
const MAX_NS: f64 = 1e18;

/// Peak-EWMA of latency (Finagle/Linkerd): a slower sample raises the estimate at once,
/// faster ones pull it down with exponential decay over time (decay time constant: 10 s
/// default). Lock-free (atomics), shared by threads.
#[derive(Debug)]
pub struct PeakEwma {
    /// Estimate (23-bit float) above the time of the last sample (41 bits of µs).
    state: AtomicU64,
    epoch: Instant,
    /// τ in microseconds.
    tau_us: f64,
}

impl Default for PeakEwma {
    /// A tracker with the default time constant, [`DEFAULT_DECAY`].
    fn default() -> Self {
        Self::new(DEFAULT_DECAY)
    }
}

fn pack(estimate_ns: f64, time_us: u64) -> u64 {
    let bits = (estimate_ns.clamp(0.0, MAX_NS) as f32).to_bits();
    // Round to nearest on the 8 bits dropped; a carry into the exponent is correct rounding.
    let short = u64::from((bits + 0x80) >> 8);
    (short << TIME_BITS) | (time_us & TIME_MASK)
}

fn unpack(state: u64) -> (f64, u64) {
    let short = (state >> TIME_BITS) as u32;
    (f64::from(f32::from_bits(short << 8)), state & TIME_MASK)
}

impl PeakEwma {
    /// A tracker with nothing measured (its value is 0) and this decay time constant.
    pub fn new(decay: Duration) -> Self {
        Self {
            state: AtomicU64::new(0),
            epoch: Instant::now(),
            tau_us: (decay.as_secs_f64() * 1e6).max(1.0),
        }
    }

    /// Records one round-trip time.
    pub fn observe(&self, rtt: Duration) {
        self.observe_at(rtt.as_nanos() as f64, self.now_us());
    }

    /// The current estimate in nanoseconds, decayed for the time since the last sample;
    /// 0 while nothing has been measured.
    pub fn value_ns(&self) -> u64 {
        self.value_ns_at(self.now_us())
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Time from `then` to `now` on the 41-bit clock; 0 when `then` is ahead (another
    /// thread's sample with a later clock reading landed first).
    fn elapsed_us(then: u64, now: u64) -> u64 {
        let elapsed = now.wrapping_sub(then) & TIME_MASK;
        if elapsed > TIME_MASK / 2 { 0 } else { elapsed }
    }

    /// `e^(-Δt/τ)`: how much of the old estimate survives Δt.
    fn survival(&self, elapsed_us: u64) -> f64 {
        (-(elapsed_us as f64) / self.tau_us).exp()
    }

    /// `observe` with the clock passed in: `rtt_ns` in nanoseconds, `now_us` in microseconds
    /// since the tracker was created.
    pub(crate) fn observe_at(&self, rtt_ns: f64, now_us: u64) {
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let (estimate, then) = unpack(current);
            let elapsed = Self::elapsed_us(then, now_us);
            let (next, time) = if rtt_ns >= estimate {
                (rtt_ns, if elapsed == 0 { then } else { now_us })
            } else {
                let keep = self.survival(elapsed);
                let time = if elapsed == 0 { then } else { now_us };
                (estimate * keep + rtt_ns * (1.0 - keep), time)
            };
            match self.state.compare_exchange_weak(
                current,
                pack(next, time),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// `value_ns` with the clock passed in (microseconds since the tracker was created).
    pub(crate) fn value_ns_at(&self, now_us: u64) -> u64 {
        let (estimate, then) = unpack(self.state.load(Ordering::Relaxed));
        (estimate * self.survival(Self::elapsed_us(then, now_us))).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6; // nanoseconds
    const S_US: u64 = 1_000_000; // microseconds

    fn close(got: u64, want: f64) -> bool {
        (got as f64 - want).abs() <= want * 1e-4 + 1.0
    }

    #[test]
    fn nothing_measured_reads_zero() {
        let e = PeakEwma::default();
        assert_eq!(e.value_ns(), 0);
        assert_eq!(e.value_ns_at(123 * S_US), 0);
        e.observe(Duration::from_millis(3));
        let v = e.value_ns();
        assert!((2_990_000..=3_000_100).contains(&v), "{v}");
    }

    #[test]
    fn a_peak_counts_at_once() {
        let e = PeakEwma::new(Duration::from_secs(10));
        e.observe_at(10.0 * MS, 0);
        e.observe_at(10.0 * MS, S_US / 10);
        e.observe_at(500.0 * MS, S_US / 10 + 1);
        assert!(close(e.value_ns_at(S_US / 10 + 1), 500.0 * MS));
    }

    #[test]
    fn faster_samples_pull_it_down_with_time() {
        let e = PeakEwma::new(Duration::from_secs(10));
        e.observe_at(500.0 * MS, 0);
        // One fast sample a time constant later keeps e^-1 of the old estimate.
        e.observe_at(10.0 * MS, 10 * S_US);
        let keep = (-1f64).exp();
        let want = 500.0 * MS * keep + 10.0 * MS * (1.0 - keep);
        assert!(
            close(e.value_ns_at(10 * S_US), want),
            "{}",
            e.value_ns_at(10 * S_US)
        );
        // A fast sample right after a slow one barely moves it: decay is by time.
        let e = PeakEwma::new(Duration::from_secs(10));
        e.observe_at(500.0 * MS, 0);
        e.observe_at(10.0 * MS, 1_000);
        assert!(e.value_ns_at(1_000) > (499.9 * MS) as u64);
        // Many fast samples over many time constants converge on the fast latency.
        for t in 1..=100u64 {
            e.observe_at(10.0 * MS, t * S_US);
        }
        let left = 490.0 * MS * (-(100.0 - 0.001) / 10.0f64).exp();
        assert!(close(e.value_ns_at(100 * S_US), 10.0 * MS + left));
    }

    #[test]
    fn reading_decays_an_idle_estimate() {
        let e = PeakEwma::new(Duration::from_secs(10));
        e.observe_at(100.0 * MS, 5 * S_US);
        assert!(close(e.value_ns_at(5 * S_US), 100.0 * MS));
        assert!(close(e.value_ns_at(15 * S_US), 100.0 * MS * (-1f64).exp()));
        assert!(e.value_ns_at(505 * S_US) < 1_000);
        // A clock reading behind the last sample's counts as no time at all.
        assert!(close(e.value_ns_at(4 * S_US), 100.0 * MS));
    }

    #[test]
    fn packing_keeps_five_significant_digits() {
        for ns in [0.0, 1.0, 999.0, 123_456.0, 2.5e9, 7.3e12] {
            let (back, time) = unpack(pack(ns, 42));
            assert_eq!(time, 42);
            assert!((back - ns).abs() <= ns * 2e-5, "{ns} -> {back}");
        }
        assert_eq!(unpack(pack(f64::INFINITY, TIME_MASK + 5)).1, 4);
        assert!(unpack(pack(f64::INFINITY, 0)).0.is_finite());
    }

    #[test]
    fn threads_observe_concurrently() {
        let e = std::sync::Arc::new(PeakEwma::default());
        let handles: Vec<_> = (1..=4u64)
            .map(|k| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        e.observe(Duration::from_micros(100 * k));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        // The slowest sample (400 µs) set the peak; the fast ones could not pull it far
        // within the test's few milliseconds (over a second would lose more than 12%).
        let v = e.value_ns();
        assert!((350_000..=400_100).contains(&v), "{v}");
    }
}
