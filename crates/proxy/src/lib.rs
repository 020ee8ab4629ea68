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
//! - a configuration is published only once every listener it needs is bound.

mod conn;
mod forward;
mod health;
mod http;
mod listener;
mod pool;
mod stats;
pub mod table;

pub use health::Report as HealthReport;
pub use listener::{Proxy, ProxyHandle};
pub use pool::EndpointState;
pub use stats::Stats;
pub use table::RoutingTable;
