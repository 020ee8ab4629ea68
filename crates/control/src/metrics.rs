//! The reconciler's own figures, for `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters the reconciler keeps as it works; [`Reconciler::metrics`] hands them out.
///
/// [`Reconciler::metrics`]: crate::Reconciler::metrics
#[derive(Debug, Default)]
pub struct ReconcilerMetrics {
    publishes: AtomicU64,
    rejected: AtomicU64,
    unchanged: AtomicU64,
    publish_count: AtomicU64,
    publish_ns_sum: AtomicU64,
    last_publish_ns: AtomicU64,
}

impl ReconcilerMetrics {
    /// Configurations published: every new generation.
    pub fn publishes(&self) -> u64 {
        self.publishes.load(Ordering::Relaxed)
    }

    /// Snapshots rejected: invalid, clashing with another source, or refused by the data
    /// plane (a listener that cannot bind).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Snapshots accepted that changed nothing.
    pub fn unchanged(&self) -> u64 {
        self.unchanged.load(Ordering::Relaxed)
    }

    /// How many batches went to the data plane (published or refused by it), and their
    /// total time from the first snapshot's merge to the table's swap.
    pub fn publish_durations(&self) -> (u64, Duration) {
        (
            self.publish_count.load(Ordering::Relaxed),
            Duration::from_nanos(self.publish_ns_sum.load(Ordering::Relaxed)),
        )
    }

    /// The time the last batch that went to the data plane took.
    pub fn last_publish_duration(&self) -> Duration {
        Duration::from_nanos(self.last_publish_ns.load(Ordering::Relaxed))
    }

    pub(crate) fn count_publish(&self) {
        self.publishes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_unchanged(&self) {
        self.unchanged.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn time_publish(&self, took: Duration) {
        let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.publish_count.fetch_add(1, Ordering::Relaxed);
        self.publish_ns_sum.fetch_add(ns, Ordering::Relaxed);
        self.last_publish_ns.store(ns, Ordering::Relaxed);
    }
}
