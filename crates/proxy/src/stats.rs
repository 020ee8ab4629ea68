//! Process-wide request counters, the figures of weldr's `GET /stats`. Cumulative: an endpoint
//! that leaves takes its own counters with it, but not its share of these.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::workers::WorkerCounts;

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

/// Responses counted by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
#[derive(Debug, Default)]
pub struct CodeCounters([AtomicU64; 5]);

/// The `code` label of each class, in the order of [`CodeCounters::get`].
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl CodeCounters {
    /// Counts one response with `status` (100..=999; anything above 599 counts as 5xx).
    #[inline]
    pub fn count(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.0[class].fetch_add(1, Ordering::Relaxed);
    }

    /// The count of each class, 1xx first.
    pub fn get(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }

    /// All classes together.
    pub fn total(&self) -> u64 {
        self.get().iter().sum()
    }
}

/// What one listener's connections and requests add up to; kept across table rebuilds for as
/// long as a listener is bound to the same address.
#[derive(Debug)]
pub struct ListenerStats {
    pub name: String,
    pub address: SocketAddr,
    /// Connections accepted.
    pub connections_accepted: AtomicU64,
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Idle connections parked now (see `crate::park`), of those open.
    pub connections_parked: AtomicU64,
    /// The connections open now, by the worker that serves them.
    pub connections_by_worker: WorkerCounts,
    /// Requests whose response is not finished yet.
    pub requests_active: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
    /// TLS handshakes that resumed a session by ticket.
    pub tls_resumed_handshakes: AtomicU64,
    /// Connections from a trusted downstream closed for a missing or invalid PROXY header.
    pub proxy_header_failures: AtomicU64,
    /// Finished requests by the status class of their response, routed or not.
    pub responses: CodeCounters,
}

impl ListenerStats {
    pub(crate) fn new(name: &str, address: SocketAddr) -> Self {
        Self {
            name: name.to_string(),
            address,
            connections_accepted: AtomicU64::new(0),
            connections_active: AtomicU64::new(0),
            connections_parked: AtomicU64::new(0),
            connections_by_worker: WorkerCounts::default(),
            requests_active: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            tls_resumed_handshakes: AtomicU64::new(0),
            proxy_header_failures: AtomicU64::new(0),
            responses: CodeCounters::default(),
        }
    }
}

/// One route's requests: by status, latency and bytes. Kept across table rebuilds while the
/// route (listener, host, path prefix and service) stays.
#[derive(Debug)]
pub struct RouteStats {
    /// The name of its listener.
    pub listener: String,
    /// `host` and path prefix, as in `example.com/api`; `*` stands for any host.
    pub route: String,
    pub service: String,
    /// Finished requests by the status class of their response.
    pub responses: CodeCounters,
    /// From the request head to the end of the response body.
    pub duration: crate::metrics::Histogram,
    /// Request body bytes read from clients.
    pub request_bytes: AtomicU64,
    /// Response body bytes sent to clients.
    pub response_bytes: AtomicU64,
}

impl RouteStats {
    pub(crate) fn new(listener: &str, host: Option<&str>, prefix: &str, service: &str) -> Self {
        Self {
            listener: listener.to_string(),
            route: format!("{}{prefix}", host.unwrap_or("*")),
            service: service.to_string(),
            responses: CodeCounters::default(),
            duration: Default::default(),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
        }
    }
}

/// A service's own counters, kept across table rebuilds for as long as the service exists.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Retries made (tries after the first of a request).
    pub retries: AtomicU64,
}
