//! drover's vocabulary: what a listener, a route, a service and an endpoint are, how a set of
//! them is validated, how two sets differ, and how the snapshots of several sources merge into
//! one effective configuration.
//!
//! This crate is pure: no I/O, no async runtime. Every other crate speaks in these types, and
//! every source (the config file, the API, Docker, Consul, DNS, etcd) produces them. The serde
//! forms here are the TOML schema documented in docs/configuration.md, so a default written
//! here is the default a user gets.

pub mod diff;
pub mod duration;
pub mod merge;
pub mod protocols;
pub mod spec;
pub mod traffic;
pub mod validate;

pub use diff::{Change, diff};
pub use duration::Duration;
pub use merge::{Effective, MergeError, SourceId, merge};
pub use protocols::{
    CertificateFiles, IpNet, ListenerTls, TlsVersion, UnderscoreHeaders, UpstreamProtocol,
    UpstreamTls,
};
pub use spec::{
    AdminState, Config, DockerConfig, EndpointOverride, EndpointSpec, Global, HeaderRules,
    ListenerSpec, Patches, Policy, Protocol, ProxyProtocol, RouteSpec, ServiceSpec,
};
pub use traffic::{
    CheckKind, Compression, Encoding, HashOn, HealthCheck, Outlier, Retries, StatusRange, Sticky,
    StickyMode,
};
pub use validate::{FieldError, FieldPath, Segment, validate};
