//! The configuration types and their defaults.
//!
//! Each default names the tool it follows; docs/configuration.md repeats them in a table.
//! Unknown keys are errors everywhere (`deny_unknown_fields`): a misspelt key that silently
//! does nothing is the worst kind of config bug.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize};

use crate::Duration;
use crate::protocols::{IpNet, ListenerTls, UnderscoreHeaders, UpstreamProtocol, UpstreamTls};
use crate::traffic::{HashOn, HealthCheck, Outlier, Retries, Sticky};

/// One source's whole view of the world, and after merging, the effective configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub global: Global,
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Services by name. A `BTreeMap` so that output and diffs come in a stable order.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
    /// How services discovered from Docker labels are set up (docs/docker.md).
    #[serde(default, skip_serializing_if = "DockerConfig::is_default")]
    pub docker: DockerConfig,
    /// Changes to endpoints of services that other sources define. Only the management API
    /// makes them; they are not part of the file's schema.
    #[serde(skip)]
    pub patches: Patches,
}

/// What a source may change in services it does not own: endpoints it adds, and the weight
/// and admin state it sets on any endpoint. An override for an endpoint that is not there
/// (a container that stopped) is kept, and applies again when the endpoint comes back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patches {
    /// Endpoints added, by service name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub added: BTreeMap<String, Vec<EndpointSpec>>,
    /// Weight and state set, by service name and endpoint address.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, BTreeMap<SocketAddr, EndpointOverride>>,
}

impl Patches {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.overrides.is_empty()
    }
}

/// A weight or admin state set on an endpoint from outside its source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AdminState>,
}

/// Process-wide settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Global {
    /// How long in-flight requests may run after SIGTERM, or after their listener is removed,
    /// before their connections are closed. 30 s: Kubernetes' default termination grace.
    #[serde(default = "defaults::shutdown_grace")]
    pub shutdown_grace: Duration,
    /// Client connections served at once over all listeners; more wait in the kernel's
    /// accept queues (HAProxy's global `maxconn`). 50,000.
    #[serde(default = "crate::protocols::defaults::global_max_connections")]
    pub max_connections: u32,
}

impl Default for Global {
    fn default() -> Self {
        Self {
            shutdown_grace: defaults::shutdown_grace(),
            max_connections: crate::protocols::defaults::global_max_connections(),
        }
    }
}

/// The `[docker]` section: what the Docker source does with labelled containers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// The template of every service made from container labels; labels override it. Without
    /// this table: docker-loadbalancer's HAProxy template, `least_conn` with stickiness on the
    /// client's IP (`balance leastconn`, `stick on src`) and its compressed types. A `[docker.defaults]` table replaces
    /// that template whole: keys it leaves out take the usual service defaults.
    #[serde(default = "DockerConfig::seed_defaults")]
    pub defaults: ServiceSpec,
}

impl DockerConfig {
    /// docker-loadbalancer's choices: least connections, each client IP kept on its
    /// endpoint, and its compressed types.
    pub fn seed_defaults() -> ServiceSpec {
        ServiceSpec {
            policy: Policy::LeastConn,
            compression: Some(crate::Compression::default()),
            sticky: Some(crate::Sticky {
                mode: crate::StickyMode::SourceIp,
                cookie: crate::traffic::defaults::sticky_cookie(),
                expire: crate::traffic::defaults::sticky_expire(),
            }),
            ..ServiceSpec::default()
        }
    }

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            defaults: Self::seed_defaults(),
        }
    }
}

/// A socket drover accepts traffic on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub name: String,
    /// `IP:PORT`, `[IPv6]:PORT`, or `:PORT` for every IPv4 address.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    /// Connections served at once; more wait in the kernel's accept queue, as with HAProxy's
    /// `maxconn`. 10,000.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    /// Deadline for a whole request head (line and headers), from its first byte: a client
    /// that drips one byte a second still hits it. 10 s, HAProxy's recommended
    /// `timeout http-request`.
    #[serde(default = "defaults::request_header_timeout")]
    pub request_header_timeout: Duration,
    /// How long a keep-alive connection may sit with no request before it is closed.
    /// 75 s, nginx's `keepalive_timeout`.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: Duration,
    /// How long a write to the client may stay blocked because the client reads nothing,
    /// before the connection is closed. 60 s, nginx's `send_timeout`.
    #[serde(default = "defaults::send_timeout")]
    pub send_timeout: Duration,
    /// Terminates TLS, choosing the certificate by SNI. Off: clear text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// Downstream addresses (load balancers in front of drover) whose connections start with
    /// a PROXY protocol header, v1 or v2; the client address it carries replaces theirs.
    /// Connections from these addresses without a valid header are closed; those from
    /// anywhere else are served as they are. None.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_protocol_from: Vec<IpNet>,
    /// Header fields in one request; more get 431. 100.
    #[serde(default = "crate::protocols::defaults::max_header_count")]
    pub max_header_count: u32,
    /// Bytes in one request head (HTTP/1) or header list (HTTP/2); more get 431. 32 KiB.
    #[serde(default = "crate::protocols::defaults::max_header_bytes")]
    pub max_header_bytes: u32,
    /// What a request header with an underscore in its name gets: `allow`, `drop` or
    /// `reject` (400). `reject`.
    #[serde(default)]
    pub underscores_in_headers: UnderscoreHeaders,
    /// HTTP/2 streams one client connection may have open at once. 100.
    #[serde(default = "crate::protocols::defaults::h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
}

impl ListenerSpec {
    /// A listener with every setting at its default.
    pub fn new(name: impl Into<String>, listen: SocketAddr, protocol: Protocol) -> Self {
        Self {
            name: name.into(),
            listen,
            protocol,
            max_connections: defaults::max_connections(),
            request_header_timeout: defaults::request_header_timeout(),
            idle_timeout: defaults::idle_timeout(),
            send_timeout: defaults::send_timeout(),
            tls: None,
            proxy_protocol_from: Vec::new(),
            max_header_count: crate::protocols::defaults::max_header_count(),
            max_header_bytes: crate::protocols::defaults::max_header_bytes(),
            underscores_in_headers: UnderscoreHeaders::default(),
            h2_max_concurrent_streams: crate::protocols::defaults::h2_max_concurrent_streams(),
        }
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1, and HTTP/2 with prior knowledge (h2c).
    #[default]
    Http,
    /// Plain TCP (layer 4).
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        })
    }
}

/// Sends the requests of one listener that match a host and a path prefix to a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub listener: String,
    /// Exact host (`example.com`) or one leading wildcard label (`*.example.com`), matched
    /// case-insensitively against the Host header without its port. None matches any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Matches any path that starts with it, byte for byte (nginx's prefix `location`,
    /// Traefik's `PathPrefix`): `/api` matches `/api`, `/api/x` and `/apix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    pub service: String,
    /// Changes to the headers of requests on their way upstream. None.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
    /// Changes to the headers of responses on their way to the client (docker-loadbalancer's
    /// template removed `ETag`). None.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub response_headers: HeaderRules,
    /// Largest request body accepted, in bytes; a larger one gets 413. None: no limit, as
    /// with HAProxy and Traefik.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<u64>,
}

impl RouteSpec {
    /// A route of every host and path on `listener` to `service`, with no header rules.
    pub fn new(listener: impl Into<String>, service: impl Into<String>) -> Self {
        Self {
            listener: listener.into(),
            host: None,
            path_prefix: None,
            service: service.into(),
            request_headers: HeaderRules::default(),
            response_headers: HeaderRules::default(),
            max_request_body: None,
        }
    }
}

/// Header changes, applied in this order: `remove`, then `set` (replacing any value), then
/// `add` (one more value beside those there).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

impl fmt::Display for HeaderRules {
    /// `-etag =cache-control +x-via`: removed, set and added names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self
            .remove
            .iter()
            .map(|n| format!("-{n}"))
            .chain(self.set.keys().map(|n| format!("={n}")))
            .chain(self.add.keys().map(|n| format!("+{n}")));
        f.write_str(&names.collect::<Vec<_>>().join(" "))
    }
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} host={} path_prefix={} -> {}",
            self.listener,
            self.host.as_deref().unwrap_or("*"),
            self.path_prefix.as_deref().unwrap_or("/"),
            self.service
        )?;
        if !self.request_headers.is_empty() {
            write!(f, " request_headers=[{}]", self.request_headers)?;
        }
        if !self.response_headers.is_empty() {
            write!(f, " response_headers=[{}]", self.response_headers)?;
        }
        Ok(())
    }
}

/// A named pool of endpoints and how to balance and reach them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// TCP connect to an endpoint. 5 s, Envoy's cluster `connect_timeout`.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// From the request being sent upstream to the response head arriving. 60 s, nginx's
    /// `proxy_read_timeout`.
    #[serde(default = "defaults::response_timeout")]
    pub response_timeout: Duration,
    /// Idle upstream keep-alive connections each worker keeps per endpoint. 128.
    #[serde(default = "defaults::pool_max_idle")]
    pub pool_max_idle: u32,
    /// How long an idle upstream connection is kept. 60 s, nginx's upstream
    /// `keepalive_timeout`.
    #[serde(default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: Duration,
    /// What `consistent_hash` hashes. `source_ip`.
    #[serde(default)]
    pub hash_on: HashOn,
    /// Keeps each client on one endpoint while it is healthy. Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// Active health checks. Off: endpoints are healthy until passive checks say otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// New endpoints get traffic only after a first passing check, rather than at once
    /// (weldr assumes them healthy). Off.
    #[serde(default)]
    pub wait_for_first_check: bool,
    #[serde(default)]
    pub outlier: Outlier,
    #[serde(default)]
    pub retries: Retries,
    /// A new or recovered endpoint's share ramps up over this window. 0 s: off.
    #[serde(default)]
    pub slow_start: Duration,
    /// Compresses responses for clients that accept it. Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::Compression>,
    /// Opens each upstream connection with a PROXY protocol header (`"v1"` or `"v2"`)
    /// carrying the client's address. TCP listeners only, for now. Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// The HTTP version spoken to the endpoints: `http1`, or `http2` (h2c in clear text, ALPN
    /// `h2` over TLS) for gRPC. `http1`.
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// Connects to the endpoints over TLS, verifying their certificates. Off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
}

/// A version of HAProxy's PROXY protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    /// The text form.
    V1,
    /// The binary form.
    V2,
}

impl ServiceSpec {
    /// Whether two specs differ in anything but their endpoints.
    pub fn same_settings(&self, other: &ServiceSpec) -> bool {
        let strip = |s: &ServiceSpec| ServiceSpec {
            endpoints: Vec::new(),
            ..s.clone()
        };
        strip(self) == strip(other)
    }
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            endpoints: Vec::new(),
            connect_timeout: defaults::connect_timeout(),
            response_timeout: defaults::response_timeout(),
            pool_max_idle: defaults::pool_max_idle(),
            pool_idle_timeout: defaults::pool_idle_timeout(),
            hash_on: HashOn::default(),
            sticky: None,
            health_check: None,
            wait_for_first_check: false,
            outlier: Outlier::default(),
            retries: Retries::default(),
            slow_start: Duration::default(),
            compression: None,
            proxy_protocol: None,
            upstream_protocol: UpstreamProtocol::default(),
            tls: None,
        }
    }
}

/// How a service chooses an endpoint for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// nginx's smooth weighted round robin.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest requests in flight for its weight (HAProxy's
    /// `leastconn`).
    LeastConn,
    /// A weighted random endpoint.
    Random,
    /// The better of two random endpoints by peak-EWMA latency times load (Finagle's and
    /// Linkerd's power of two choices).
    P2cEwma,
    /// The same key (see `hash_on`) always goes to the same endpoint while it is available;
    /// when one of n endpoints leaves, about 1/n of keys move (Maglev).
    ConsistentHash,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastConn => "least_conn",
            Policy::Random => "random",
            Policy::P2cEwma => "p2c_ewma",
            Policy::ConsistentHash => "consistent_hash",
        })
    }
}

/// One place a service's requests can go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    #[serde(deserialize_with = "endpoint_addr")]
    pub address: SocketAddr,
    /// Relative share of requests, 1 to 256 (HAProxy's range). 1.
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// Whether it takes new requests. `enabled`.
    #[serde(default, skip_serializing_if = "AdminState::is_enabled")]
    pub state: AdminState,
}

impl EndpointSpec {
    pub fn new(address: SocketAddr, weight: u32) -> Self {
        Self {
            address,
            weight,
            state: AdminState::Enabled,
        }
    }
}

/// An endpoint's administrative state, set by an operator (HAProxy's `ready`, `drain` and
/// `maint`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// Takes requests.
    #[default]
    Enabled,
    /// Takes no new requests; those in flight finish.
    Drain,
    /// Out of service: takes no new requests; those in flight finish. Unlike `drain`, health
    /// checks of it stop too.
    Disabled,
}

impl AdminState {
    pub fn is_enabled(&self) -> bool {
        *self == AdminState::Enabled
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            AdminState::Enabled => "enabled",
            AdminState::Drain => "drain",
            AdminState::Disabled => "disabled",
        })
    }
}

/// Highest endpoint weight accepted.
pub const MAX_WEIGHT: u32 = 256;

/// Parses a listen address: `IP:PORT`, `[IPv6]:PORT` or `:PORT` (all IPv4 addresses).
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        return port
            .parse::<u16>()
            .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p))
            .map_err(|_| {
                bad_addr(
                    s,
                    "IP:PORT or :PORT, such as 127.0.0.1:8080, [::1]:8080 or :8080",
                )
            });
    }
    s.parse().map_err(|_| {
        bad_addr(
            s,
            "IP:PORT or :PORT, such as 127.0.0.1:8080, [::1]:8080 or :8080",
        )
    })
}

/// Parses an endpoint address: `IP:PORT` or `[IPv6]:PORT`.
pub fn parse_endpoint_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| bad_addr(s, "IP:PORT, such as 10.0.0.5:8080 or [fd00::5]:8080"))
}

fn bad_addr(s: &str, expected: &str) -> String {
    format!("invalid address {s:?}: expected {expected}")
}

fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_listen_addr(&s).map_err(serde::de::Error::custom)
}

fn endpoint_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_endpoint_addr(&s).map_err(serde::de::Error::custom)
}

/// The defaults, in one place; docs/configuration.md lists them with their anchors.
pub mod defaults {
    use crate::Duration;

    pub fn shutdown_grace() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_connections() -> u32 {
        10_000
    }
    pub fn request_header_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(75)
    }
    pub fn send_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn response_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn pool_max_idle() -> u32 {
        128
    }
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn weight() -> u32 {
        1
    }
}

impl Config {
    /// The embedded default: one HTTP listener that routes everything to the service
    /// `default`, which starts with no endpoints (so every request gets 503 until one is added).
    pub fn embedded_default(listen: SocketAddr) -> Config {
        Config {
            global: Global::default(),
            listeners: vec![ListenerSpec::new("default", listen, Protocol::Http)],
            routes: vec![RouteSpec::new("default", "default")],
            services: BTreeMap::from([("default".to_string(), ServiceSpec::default())]),
            docker: DockerConfig::default(),
            patches: Patches::default(),
        }
    }
}
