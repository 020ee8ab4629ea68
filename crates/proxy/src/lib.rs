//! drover's data plane.
//!
//! [`Proxy`] receives each accepted configuration from the reconciler, builds a
//! [`RoutingTable`] for it, binds new listeners, and publishes the table with one atomic swap.
//! Requests load the table in force (an `ArcSwap` load: no lock), route, pick an endpoint and
//! forward over a pooled keep-alive connection, streaming bodies both ways.
//!
//! Invariants:
//! - the hot path takes no lock, allocates little, and logs only at debug level;
//! - endpoint state (counters, in-flight requests, pooled connections) survives every rebuild
//!   in which the endpoint is still present;
//! - a configuration is published only once every listener it needs is bound;
//! - metrics are atomics in the structures requests already hold (listener, route, service,
//!   endpoint), carried across rebuilds like endpoint state and read at scrape time
//!   ([`metrics`]); the access log ([`access`]) is fed with `try_send`, never awaited.

pub mod access;
mod compress;
mod conn;
mod forward;
mod front;
mod h1;
mod health;
mod http;
mod listener;
pub mod metrics;
mod park;
mod pool;
pub mod proxy_protocol;
mod stats;
pub mod table;
mod tcp;
mod tickets;
mod tls;
mod upgrade;
mod upstream;
mod workers;

pub use access::AccessLog;
#[doc(hidden)]
pub use h1::fuzz_upstream_answer;
pub use health::Report as HealthReport;
#[doc(hidden)]
pub use http::{fuzz_front_end, fuzz_route, path_is_plain};
pub use listener::{Proxy, ProxyHandle};
pub use pool::EndpointState;
pub use stats::{CODE_CLASSES, CodeCounters, ListenerStats, RouteStats, ServiceStats, Stats};
pub use table::RoutingTable;
#[doc(hidden)]
pub use tickets::fuzz_session_ticket;
pub use workers::{WorkerCounts, Workers};
