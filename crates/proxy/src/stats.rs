//! Process-wide request counters, the figures of weldr's `GET /stats`. Cumulative: an endpoint
//! that leaves takes its own counters with it, but not its share of these.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts requests from clients and attempts to upstreams.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests answered with an upstream's response (whatever its status).
    pub client_success: AtomicU64,
    /// Requests drover answered itself with an error: 404, 502, 503, 504.
    pub client_failed: AtomicU64,
    /// Responses received from upstreams.
    pub server_success: AtomicU64,
    /// Upstream attempts that got no response: connect errors, resets, timeouts.
    pub server_failed: AtomicU64,
}

impl Stats {
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
