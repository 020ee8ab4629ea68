//! The Consul source: services registered in Consul become endpoints, listeners and routes.
//!
//! Two ways pick the services. The seeds' mappings (`80:webserver`) name them on the command
//! line: each becomes a listener and a route of all its traffic to the service, and the
//! endpoints' port comes from Consul unless the mapping gives one. With tag discovery on, the
//! catalog is watched too, and every service tagged `drover.enable` is published on the port
//! its `drover.publish` (or `drover.listen`) tag names, with an optional host, path prefix and
//! policy from more tags.
//!
//! Every service has its own watcher: a loop of blocking queries on
//! `/v1/health/service/<name>?passing`, each sent with the `X-Consul-Index` of the answer
//! before it, so that Consul holds the request until the service's health changes. A
//! registration, a deregistration or a failing check therefore reaches traffic one round trip
//! after it happened, never at a polling interval. The watcher keeps the rules Consul's
//! documentation gives for blocking queries: an index that goes backwards (a restored or
//! restarted Consul) resets it to 0, a missing index is never used to block, and a wake-up
//! that changed nothing sends nothing.
//!
//! Invariants: the source sends whole snapshots of its slice (every mapped and published
//! service, with the endpoints last seen), and only when that slice changed. When Consul
//! cannot be reached, watchers retry with exponential backoff (100 ms, doubling, at most
//! 10 s) and the last known endpoints keep serving; this is logged once when it starts and
//! once when Consul answers again. A published service whose tags cannot be used is left out
//! with a warning that names the service and the tag; the others are published.
//!
//! TLS: an `https://` address is reached over TLS 1.2 or 1.3 (rustls, with ring), the server's
//! certificate verified for the address's host against the system's roots, or against a CA
//! file's certificates only ([`ConsulTls::ca_file`]); drover shows a client certificate if
//! given one ([`ConsulTls::client`]). A CA file or client certificate that cannot be read or
//! used stops [`ConsulSource::new`]; a handshake that fails is an unreachable Consul, logged
//! with the TLS error. While the source runs, the CA file and the client certificate's files
//! are polled, and what changed is used by the connections opened after it
//! (`drover_certs::ClientTls`); the connections already open, blocking queries included,
//! keep what they were opened with.
//!
//! Health (`drover_source_*` in /metrics): every answer that parses is a sync of the source
//! `consul`; a query that gets no answer, an error status, or an answer that does not parse is
//! a failed one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use drover_certs::{ClientTls, Holder, Roots, certificates};
use drover_control::sources::SourceHealth;
use drover_control::{Snapshot, SnapshotSender};
use drover_model::{
    CertificateFiles, Config, ListenerSpec, Policy, Protocol, RouteSpec, ServiceSpec, SourceId,
};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::HeaderValue;
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mapping::{Mapping, config_for};

/// Consul's own default HTTP address (`CONSUL_HTTP_ADDR`).
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:8500";
/// The port of an `https://` address that gives none: Consul's HTTPS port.
pub const DEFAULT_HTTPS_PORT: u16 = 8501;
/// Blocking query wait: 60 s. Consul's default is 5 min and its cap 10 min; a shorter wait
/// finds a half-dead TCP connection sooner.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// The longest wait Consul honours.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// First retry after an error.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest pause between retries.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// TCP connect timeout to Consul.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed beyond `wait` for a blocking answer: Consul adds up to wait/16 of jitter.
const ANSWER_SLACK: Duration = Duration::from_secs(5);
/// Largest answer read from Consul.
const MAX_BODY: usize = 64 << 20;
/// Name resolution of a service address that is a host name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The tags of tag discovery.
pub mod tags {
    /// Publishes the service: `drover.enable` or `drover.enable=true`.
    pub const ENABLE: &str = "drover.enable";
    /// `drover.publish=PORT`: listen on 0.0.0.0:PORT.
    pub const PUBLISH: &str = "drover.publish";
    /// `drover.listen=IP:PORT`: listen on this address (instead of `drover.publish`).
    pub const LISTEN: &str = "drover.listen";
    /// `drover.host=example.com`: the route's host.
    pub const HOST: &str = "drover.host";
    /// `drover.path=/api`: the route's path prefix.
    pub const PATH: &str = "drover.path";
    /// `drover.policy=least_conn`: the service's balancing policy.
    pub const POLICY: &str = "drover.policy";
    /// `drover.port=PORT`: send to this port instead of the registered one.
    pub const PORT: &str = "drover.port";
    /// Every tag above.
    pub const ALL: [&str; 7] = [ENABLE, PUBLISH, LISTEN, HOST, PATH, POLICY, PORT];
}

/// The source id of every Consul snapshot.
pub fn source_id() -> SourceId {
    SourceId("consul".into())
}

/// How to reach Consul and what to watch.
#[derive(Clone)]
pub struct ConsulOptions {
    /// `HOST:PORT` of Consul's HTTP API (`http://` may precede it), or `https://HOST:PORT`
    /// for TLS. [`DEFAULT_ADDRESS`].
    pub address: String,
    /// How to verify Consul's certificate when the address is `https://`; None is
    /// [`ConsulTls::default`] (the system's roots). Given with a plain address, it is an
    /// error.
    pub tls: Option<ConsulTls>,
    /// ACL token, sent as `X-Consul-Token`. None.
    pub token: Option<String>,
    /// Datacenter to query (`?dc=`); None asks the agent's own.
    pub datacenter: Option<String>,
    /// How long Consul may hold a blocking query. [`DEFAULT_WAIT`].
    pub wait: Duration,
    /// Also publish the catalog's services tagged `drover.enable`. Off.
    pub tag_discovery: bool,
}

impl Default for ConsulOptions {
    fn default() -> Self {
        Self {
            address: DEFAULT_ADDRESS.into(),
            tls: None,
            token: None,
            datacenter: None,
            wait: DEFAULT_WAIT,
            tag_discovery: false,
        }
    }
}

impl fmt::Debug for ConsulOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulOptions")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("wait", &self.wait)
            .field("tag_discovery", &self.tag_discovery)
            .finish()
    }
}

/// TLS to Consul.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsulTls {
    /// A PEM bundle of the CA certificates that Consul's certificate must chain to, instead
    /// of the system's roots. None: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The certificate drover shows Consul, for an agent that verifies its clients
    /// (`verify_incoming`). None: none.
    pub client: Option<ClientCertificate>,
}

/// A client certificate chain and its private key, as PEM files (Consul's
/// `-client-cert` and `-client-key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The leaf certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
}

/// Watches Consul and sends the snapshots of the mapped and published services.
pub struct ConsulSource {
    mappings: Vec<Mapping>,
    tag_discovery: bool,
    api: Arc<Api>,
}

impl fmt::Debug for ConsulSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulSource")
            .field("mappings", &self.mappings)
            .field("tag_discovery", &self.tag_discovery)
            .field("consul", &self.api.base)
            .finish()
    }
}

impl ConsulSource {
    /// Checks the options; nothing is sent to Consul before [`run`](Self::run).
    pub fn new(mappings: Vec<Mapping>, options: ConsulOptions) -> Result<Self, String> {
        let base = parse_address(&options.address)?;
        let https = base.starts_with("https://");
        if !https && options.tls.is_some() {
            return Err(format!(
                "TLS options were given for the plain HTTP Consul address {:?}: write https://HOST:PORT to reach Consul over TLS",
                options.address
            ));
        }
        if options.wait.is_zero() || options.wait > MAX_WAIT {
            return Err(format!(
                "invalid Consul wait {:?}: give more than 0 and at most 10 minutes (Consul's cap), such as 60s",
                options.wait
            ));
        }
        if mappings.is_empty() && !options.tag_discovery {
            return Err(
                "the Consul source has nothing to watch: give mappings such as 80:webserver, or turn on tag discovery".into(),
            );
        }
        let token = match options.token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) => Some(HeaderValue::from_str(t).map_err(|_| {
                "invalid Consul token: it must be printable ASCII (a Consul token is a UUID)"
                    .to_string()
            })?),
        };
        let datacenter = options.datacenter.filter(|d| !d.trim().is_empty());
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(Duration::from_secs(90));
        let (client, roots, files) = if https {
            let (config, roots, files) = tls_config(&options.tls.unwrap_or_default())?;
            connector.enforce_http(false);
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .enable_http1()
                .wrap_connector(connector);
            let client = HttpClient::Tls(builder.build(connector));
            (client, Some(roots), Some(files))
        } else {
            (HttpClient::Plain(builder.build(connector)), None, None)
        };
        Ok(Self {
            mappings,
            tag_discovery: options.tag_discovery,
            api: Arc::new(Api {
                client,
                base,
                roots,
                files,
                token,
                datacenter,
                wait: options.wait,
                reachability: Reachability::default(),
                health: drover_control::sources::health(&source_id()),
            }),
        })
    }

    /// Sends a first snapshot at once (mapped services with no endpoints yet), then one on
    /// every change, until `stop` is cancelled or the reconciler is gone.
    pub async fn run(self, snapshots: SnapshotSender, stop: CancellationToken) {
        // Our own token under the caller's: cancelled on the way out to end every watcher,
        // without cancelling what else the caller's token stops.
        let stop = stop.child_token();
        let (tx, mut rx) = mpsc::channel::<Update>(64);
        let mut state = State::new(self.mappings, self.tag_discovery);
        let mut watchers = Watchers {
            api: self.api.clone(),
            tx: tx.clone(),
            stop: stop.clone(),
            running: BTreeMap::new(),
            next_id: 0,
        };
        for name in state.mapped_services() {
            watchers.start(name);
        }
        if self.tag_discovery {
            let api = self.api.clone();
            let (tx, stop) = (tx.clone(), stop.child_token());
            tokio::spawn(async move { watch_catalog(api, tx, stop).await });
        }
        drop(tx);
        if let Some(files) = &self.api.files {
            files.watch(&stop);
        }
        tracing::info!(
            consul = %self.api.base,
            tls = self.api.roots.as_deref().unwrap_or("off"),
            services = ?state.mapped_services(),
            tag_discovery = self.tag_discovery,
            "watching Consul"
        );

        let mut notices = BTreeSet::new();
        let mut last_sent = None;
        let mut reasons = vec!["startup".to_string()];
        let mut batch = Vec::new();
        loop {
            if !reasons.is_empty() {
                let (config, warnings) = state.build();
                for w in warnings.difference(&notices) {
                    tracing::warn!("{w}");
                }
                notices = warnings;
                if last_sent.as_ref() != Some(&config) {
                    let snapshot = Snapshot::new(source_id(), config.clone(), reasons.join(", "));
                    if snapshots.send(snapshot).await.is_err() {
                        break;
                    }
                    last_sent = Some(config);
                }
                reasons.clear();
            }
            let received = tokio::select! {
                _ = stop.cancelled() => break,
                n = rx.recv_many(&mut batch, 64) => n,
            };
            if received == 0 {
                break;
            }
            for update in batch.drain(..) {
                match update {
                    Update::Service {
                        name,
                        watcher,
                        endpoints,
                    } => {
                        if watchers.is_current(&name, watcher) {
                            state.found.insert(name.clone(), endpoints);
                            reasons.push(format!("{name} changed"));
                        }
                    }
                    Update::Catalog(catalog) => {
                        state.set_catalog(catalog);
                        let wanted = state.watched_services();
                        for gone in watchers.names().difference(&wanted) {
                            watchers.stop(gone);
                            state.found.remove(gone);
                        }
                        for new in wanted.difference(&watchers.names()) {
                            watchers.start(new.clone());
                        }
                        reasons.push("catalog changed".into());
                    }
                }
            }
            let mut seen = BTreeSet::new();
            reasons.retain(|r| seen.insert(r.clone()));
        }
        stop.cancel();
    }
}

/// What a watcher reports to the source's loop.
enum Update {
    /// The passing instances of a service, with the port Consul gave.
    Service {
        name: String,
        watcher: u64,
        endpoints: Vec<SocketAddr>,
    },
    /// Every service in the catalog, with its tags.
    Catalog(BTreeMap<String, Vec<String>>),
}

/// The running health watchers, by service name.
struct Watchers {
    api: Arc<Api>,
    tx: mpsc::Sender<Update>,
    stop: CancellationToken,
    running: BTreeMap<String, (u64, CancellationToken)>,
    next_id: u64,
}

impl Watchers {
    fn start(&mut self, name: String) {
        if self.running.contains_key(&name) {
            return;
        }
        self.next_id += 1;
        let id = self.next_id;
        let stop = self.stop.child_token();
        self.running.insert(name.clone(), (id, stop.clone()));
        let (api, tx) = (self.api.clone(), self.tx.clone());
        tokio::spawn(async move { watch_service(api, name, id, tx, stop).await });
    }

    fn stop(&mut self, name: &str) {
        if let Some((_, stop)) = self.running.remove(name) {
            stop.cancel();
        }
    }

    /// Whether an update comes from the watcher now running for `name` (not from one that
    /// was stopped while its answer was on the way).
    fn is_current(&self, name: &str, watcher: u64) -> bool {
        self.running.get(name).is_some_and(|(id, _)| *id == watcher)
    }

    fn names(&self) -> BTreeSet<String> {
        self.running.keys().cloned().collect()
    }
}

/// What the source knows, from which it builds its snapshot.
struct State {
    mappings: Vec<Mapping>,
    tag_discovery: bool,
    /// Passing instances by service, with Consul's ports.
    found: BTreeMap<String, Vec<SocketAddr>>,
    /// Services published by their tags, by name order.
    published: Vec<Published>,
    /// Why services of the catalog were left out.
    tag_problems: BTreeSet<String>,
}

impl State {
    fn new(mappings: Vec<Mapping>, tag_discovery: bool) -> Self {
        Self {
            mappings,
            tag_discovery,
            found: BTreeMap::new(),
            published: Vec::new(),
            tag_problems: BTreeSet::new(),
        }
    }

    fn mapped_services(&self) -> Vec<String> {
        let mut names: Vec<String> = self.mappings.iter().map(|m| m.service.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    fn watched_services(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.mapped_services().into_iter().collect();
        names.extend(self.published.iter().map(|p| p.service.clone()));
        names
    }

    fn set_catalog(&mut self, catalog: BTreeMap<String, Vec<String>>) {
        if !self.tag_discovery {
            return;
        }
        self.published.clear();
        self.tag_problems.clear();
        for (service, service_tags) in &catalog {
            match Published::from_tags(service, service_tags) {
                Ok(Some(p)) => self.published.push(p),
                Ok(None) => {}
                Err(e) => {
                    self.tag_problems.insert(e);
                }
            }
        }
    }

    /// The snapshot's configuration, and a warning for everything left out of it.
    fn build(&self) -> (Config, BTreeSet<String>) {
        let mut warnings = self.tag_problems.clone();
        // The mappings' slice: a mapping's port, when given, replaces Consul's.
        let mut adjusted = BTreeMap::new();
        for m in &self.mappings {
            if adjusted.contains_key(&m.service) {
                continue;
            }
            let found = self.found.get(&m.service).map(Vec::as_slice).unwrap_or(&[]);
            let (endpoints, portless) = with_port(found, m.target_port);
            if portless > 0 {
                warnings.insert(format!(
                    "consul service {:?}: {portless} instance(s) registered without a port are left out; register a port, or give one in the mapping ({}:{}:PORT)",
                    m.service,
                    m.listen.port(),
                    m.service
                ));
            }
            adjusted.insert(m.service.clone(), endpoints);
        }
        let mut config = config_for(&self.mappings, &adjusted);

        for p in &self.published {
            // Published once its watcher has answered, so that a new service does not
            // answer 503 for the moment between the catalog's answer and its own.
            let Some(found) = self.found.get(&p.service) else {
                continue;
            };
            let (endpoints, portless) = with_port(found, p.port);
            if portless > 0 {
                warnings.insert(format!(
                    "consul service {:?}: {portless} instance(s) registered without a port are left out; register a port, or tag the service {}=PORT",
                    p.service,
                    tags::PORT
                ));
            }
            let mut trial = config.clone();
            p.add_to(&mut trial, endpoints);
            match drover_model::validate(&trial) {
                Ok(()) => config = trial,
                Err(errors) => {
                    let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                    warnings.insert(format!(
                        "consul service {:?} is not published, its tags ({}) do not fit: {}",
                        p.service,
                        p.tags.join(", "),
                        errors.join("; ")
                    ));
                }
            }
        }
        (config, warnings)
    }
}

/// The endpoints with `port` in place of Consul's when given; and how many were left out for
/// having no port at all.
fn with_port(found: &[SocketAddr], port: Option<u16>) -> (Vec<SocketAddr>, usize) {
    let mut out = Vec::with_capacity(found.len());
    let mut portless = 0;
    for a in found {
        match port {
            Some(p) => out.push(SocketAddr::new(a.ip(), p)),
            None if a.port() == 0 => portless += 1,
            None => out.push(*a),
        }
    }
    out.sort();
    out.dedup();
    (out, portless)
}

/// A service that its tags publish.
#[derive(Debug, Clone, PartialEq)]
struct Published {
    service: String,
    listen: SocketAddr,
    host: Option<String>,
    path: Option<String>,
    policy: Option<Policy>,
    port: Option<u16>,
    /// Its `drover.*` tags, for messages.
    tags: Vec<String>,
}

impl Published {
    /// The publication a service's tags ask for: None when it is not tagged
    /// `drover.enable`, an error naming the service and the tag when a tag cannot be used.
    fn from_tags(service: &str, all_tags: &[String]) -> Result<Option<Published>, String> {
        let ours: Vec<&String> = all_tags
            .iter()
            .filter(|t| t.starts_with("drover."))
            .collect();
        let mut values: BTreeMap<&str, &str> = BTreeMap::new();
        let bad = |tag: &str, why: String| {
            format!("consul service {service:?} is not published: tag {tag:?} {why}")
        };
        for tag in &ours {
            let (key, value) = match tag.split_once('=') {
                Some((k, v)) => (k, v.trim()),
                None => (tag.as_str(), ""),
            };
            if !tags::ALL.contains(&key) {
                return Err(bad(
                    tag,
                    format!("is not a drover tag; known: {}", tags::ALL.join(", ")),
                ));
            }
            if let Some(before) = values.insert(key, value)
                && before != value
            {
                return Err(bad(
                    tag,
                    format!("contradicts {key}={before}; give it once"),
                ));
            }
        }
        match values.get(tags::ENABLE) {
            None | Some(&"false") => return Ok(None),
            Some(&"") | Some(&"true") => {}
            Some(other) => {
                return Err(bad(
                    &format!("{}={other}", tags::ENABLE),
                    "must be drover.enable or drover.enable=true".into(),
                ));
            }
        }
        let tag = |key: &str| values.get(key).map(|v| (format!("{key}={v}"), *v));
        let port = |tag: &str, v: &str| {
            v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                bad(
                    tag,
                    format!("needs a port number from 1 to 65535, not {v:?}"),
                )
            })
        };
        let listen = match (tag(tags::PUBLISH), tag(tags::LISTEN)) {
            (Some((t, _)), Some((u, _))) => {
                return Err(bad(
                    &t,
                    format!("and {u:?} both say where to listen; give one"),
                ));
            }
            (Some((t, v)), None) => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port(&t, v)?)
            }
            (None, Some((t, v))) => drover_model::spec::parse_listen_addr(v)
                .map_err(|e| bad(&t, format!("is not a listen address: {e}")))?,
            (None, None) => {
                return Err(format!(
                    "consul service {service:?} is not published: it is tagged {} but has no {}=PORT (or {}=IP:PORT) to say where to listen",
                    tags::ENABLE,
                    tags::PUBLISH,
                    tags::LISTEN
                ));
            }
        };
        if listen.port() == 0 {
            return Err(bad(
                &tag(tags::LISTEN).map(|t| t.0).unwrap_or_default(),
                "needs a port from 1 to 65535".into(),
            ));
        }
        let host = match tag(tags::HOST) {
            Some((t, v)) => {
                let host = v.to_ascii_lowercase();
                drover_model::validate::check_host(&host).map_err(|e| bad(&t, e))?;
                Some(host)
            }
            None => None,
        };
        let path = match tag(tags::PATH) {
            Some((t, v)) if !v.starts_with('/') || v.bytes().any(|b| b.is_ascii_whitespace()) => {
                return Err(bad(
                    &t,
                    "must start with '/' and contain no spaces, such as drover.path=/api".into(),
                ));
            }
            Some((_, v)) => Some(v.to_string()),
            None => None,
        };
        let policy = match tag(tags::POLICY) {
            Some((t, v)) => Some(
                serde_json::from_value::<Policy>(serde_json::Value::String(v.into())).map_err(
                    |_| {
                        bad(
                            &t,
                            "names no policy; use round_robin, least_conn, random, p2c_ewma or consistent_hash".into(),
                        )
                    },
                )?,
            ),
            None => None,
        };
        let target = match tag(tags::PORT) {
            Some((t, v)) => Some(port(&t, v)?),
            None => None,
        };
        Ok(Some(Published {
            service: service.to_string(),
            listen,
            host,
            path,
            policy,
            port: target,
            tags: ours.iter().map(|t| t.to_string()).collect(),
        }))
    }

    /// The name of the listener of a publish address: `consul-PORT`, or with its IP.
    fn listener_name(&self) -> String {
        if self.listen.ip().is_unspecified() && self.listen.is_ipv4() {
            format!("consul-{}", self.listen.port())
        } else {
            let ip = self.listen.ip().to_string().replace(':', "_");
            format!("consul-{ip}-{}", self.listen.port())
        }
    }

    /// Adds its listener (unless one listens on that address already), route and service.
    fn add_to(&self, config: &mut Config, endpoints: Vec<SocketAddr>) {
        let listener = match config.listeners.iter().find(|l| l.listen == self.listen) {
            Some(l) => l.name.clone(),
            None => {
                let name = self.listener_name();
                config
                    .listeners
                    .push(ListenerSpec::new(name.clone(), self.listen, Protocol::Http));
                name
            }
        };
        config.routes.push(RouteSpec {
            host: self.host.clone(),
            path_prefix: self.path.clone(),
            ..RouteSpec::new(listener, self.service.clone())
        });
        let service = config
            .services
            .entry(self.service.clone())
            .or_insert_with(|| ServiceSpec {
                endpoints: endpoints
                    .iter()
                    .map(|a| drover_model::EndpointSpec::new(*a, 1))
                    .collect(),
                ..ServiceSpec::default()
            });
        if let Some(policy) = self.policy {
            service.policy = policy;
        }
    }
}

/// Watches one service's passing instances until `stop`.
async fn watch_service(
    api: Arc<Api>,
    name: String,
    watcher: u64,
    tx: mpsc::Sender<Update>,
    stop: CancellationToken,
) {
    let path = format!("/v1/health/service/{}", encode(&name));
    let what = format!("service {name:?}");
    let mut query = BlockingQuery::new(&api, path, vec![("passing", "true".into())], what);
    let mut last: Option<Vec<(String, u16)>> = None;
    while let Some(body) = query.next(&stop).await {
        let entries: Vec<HealthEntry> = match serde_json::from_slice(&body) {
            Ok(e) => e,
            Err(e) => {
                let message = format!("Consul's answer is not a list of health entries: {e}");
                api.health.failed(&message);
                query.problem(message);
                continue;
            }
        };
        api.health.synced();
        let mut raw: Vec<(String, u16)> = entries.iter().map(HealthEntry::address).collect();
        raw.sort();
        raw.dedup();
        if last.as_ref() == Some(&raw) {
            continue; // a wake-up that changed nothing
        }
        let endpoints = resolve(&name, &raw).await;
        tracing::debug!(service = %name, ?endpoints, index = query.index, "consul: passing instances");
        last = Some(raw);
        let update = Update::Service {
            name: name.clone(),
            watcher,
            endpoints,
        };
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

/// Watches the catalog's services and their tags until `stop`.
async fn watch_catalog(api: Arc<Api>, tx: mpsc::Sender<Update>, stop: CancellationToken) {
    let mut query = BlockingQuery::new(
        &api,
        "/v1/catalog/services".into(),
        Vec::new(),
        "the catalog".into(),
    );
    let mut last = None;
    while let Some(body) = query.next(&stop).await {
        let catalog: BTreeMap<String, Option<Vec<String>>> = match serde_json::from_slice(&body) {
            Ok(c) => c,
            Err(e) => {
                let message = format!("Consul's answer is not a map of services to tags: {e}");
                api.health.failed(&message);
                query.problem(message);
                continue;
            }
        };
        api.health.synced();
        let catalog: BTreeMap<String, Vec<String>> = catalog
            .into_iter()
            .map(|(name, tags)| (name, tags.unwrap_or_default()))
            .collect();
        if last.as_ref() == Some(&catalog) {
            continue;
        }
        last = Some(catalog.clone());
        if tx.send(Update::Catalog(catalog)).await.is_err() {
            return;
        }
    }
}

/// Socket addresses of the instances; host names (Consul allows them as service addresses)
/// are resolved once, when the instances change.
async fn resolve(service: &str, raw: &[(String, u16)]) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(raw.len());
    for (address, port) in raw {
        if let Ok(ip) = address.parse::<IpAddr>() {
            out.push(SocketAddr::new(ip, *port));
            continue;
        }
        if address.is_empty() {
            tracing::warn!(service, "consul: an instance has no address; left out");
            continue;
        }
        let lookup = tokio::net::lookup_host((address.as_str(), *port));
        match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
            Ok(Ok(mut addrs)) => match addrs.next() {
                Some(a) => out.push(a),
                None => tracing::warn!(
                    service,
                    address,
                    "consul: instance address resolves to nothing; left out"
                ),
            },
            Ok(Err(e)) => {
                tracing::warn!(
                    service,
                    address,
                    "consul: cannot resolve an instance's address, left out: {e}"
                )
            }
            Err(_) => tracing::warn!(
                service,
                address,
                "consul: resolving an instance's address timed out; left out"
            ),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// One entry of `/v1/health/service/:service`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
}

impl HealthEntry {
    /// Where the instance listens: the service's address, else its node's (Consul's rule).
    fn address(&self) -> (String, u16) {
        let address = if self.service.address.trim().is_empty() {
            &self.node.address
        } else {
            &self.service.address
        };
        (address.trim().to_string(), self.service.port)
    }
}

/// The client of Consul's API: plain HTTP, or HTTPS only.
enum HttpClient {
    Plain(Client<HttpConnector, Empty<Bytes>>),
    Tls(Client<HttpsConnector<HttpConnector>, Empty<Bytes>>),
}

impl HttpClient {
    fn request(&self, req: Request<Empty<Bytes>>) -> ResponseFuture {
        match self {
            HttpClient::Plain(c) => c.request(req),
            HttpClient::Tls(c) => c.request(req),
        }
    }
}

/// The client configuration of TLS to Consul (TLS 1.2 and 1.3, ring), what Consul's
/// certificate is verified against (to be logged), and what keeps the CA file and the client
/// certificate current.
fn tls_config(tls: &ConsulTls) -> Result<(rustls::ClientConfig, String, ClientTls), String> {
    let holder = Holder {
        name: "Consul".into(),
        settings: "--consul-",
        peer: "Consul",
    };
    let client = tls.client.as_ref().map(|c| CertificateFiles {
        cert: c.cert.clone(),
        key: c.key.clone(),
    });
    let (roots, system) = match &tls.ca_file {
        Some(path) => (Roots::File(path.clone()), None),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _unusable) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                tracing::warn!(
                    "no system root certificates were found{}{}; Consul's certificate cannot be verified: give its CA with --consul-ca FILE",
                    if why.is_empty() { "" } else { ": " },
                    why.join("; ")
                );
            }
            let described = format!("system roots ({})", certificates(added));
            (Roots::Fixed(Arc::new(roots)), Some(described))
        }
    };
    let (files, config) = ClientTls::new(holder, roots, client.as_ref())?;
    let described = match (&tls.ca_file, files.cas()) {
        (Some(path), Some(cas)) => format!("CA file {} ({})", path.display(), certificates(cas)),
        _ => system.unwrap_or_default(),
    };
    Ok((config, described, files))
}

/// The HTTP side: one client for every watcher.
struct Api {
    client: HttpClient,
    /// `http://host:port` or `https://host:port`.
    base: String,
    /// With TLS, what Consul's certificate is verified against.
    roots: Option<String>,
    /// With TLS, what keeps the CA file and the client certificate current.
    files: Option<ClientTls>,
    token: Option<HeaderValue>,
    datacenter: Option<String>,
    wait: Duration,
    reachability: Reachability,
    /// Every usable answer is a sync; every failed query or unusable answer a failed one.
    health: Arc<SourceHealth>,
}

/// A successful answer.
struct Answer {
    index: Option<u64>,
    body: Bytes,
    filtered_by_acls: bool,
}

/// Why a query failed.
enum Failure {
    /// No answer: Consul is down, or the network is.
    Unreachable(String),
    /// An answer that is not a success.
    Status(StatusCode, String),
}

impl Api {
    /// GET `path` with `params`; blocking on `index` when it is above 0.
    async fn get(
        &self,
        path: &str,
        params: &[(&str, String)],
        index: u64,
    ) -> Result<Answer, Failure> {
        let mut query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        if let Some(dc) = &self.datacenter {
            query.push(format!("dc={}", encode(dc)));
        }
        if index > 0 {
            query.push(format!("index={index}"));
            query.push(format!("wait={}ms", self.wait.as_millis()));
        }
        let uri = if query.is_empty() {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}?{}", self.base, query.join("&"))
        };
        let mut req = Request::get(uri).header("accept", "application/json");
        if let Some(t) = &self.token {
            req = req.header("x-consul-token", t.clone());
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| Failure::Unreachable(format!("cannot make the request: {e}")))?;
        let deadline = self.wait + self.wait / 16 + ANSWER_SLACK;
        let exchange = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| Failure::Unreachable(self.describe_client_error(&e)))?;
            let (parts, body) = res.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| Failure::Unreachable(format!("the answer broke off: {e}")))?
                .to_bytes();
            Ok::<_, Failure>((parts, body))
        };
        let (parts, body) = match tokio::time::timeout(deadline, exchange).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Failure::Unreachable(format!(
                    "no answer within {} s",
                    deadline.as_secs()
                )));
            }
        };
        if !parts.status.is_success() {
            let text = String::from_utf8_lossy(&body)
                .trim()
                .chars()
                .take(200)
                .collect();
            return Err(Failure::Status(parts.status, text));
        }
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        Ok(Answer {
            index: header("x-consul-index").and_then(|v| v.trim().parse().ok()),
            filtered_by_acls: header("x-consul-results-filtered-by-acls") == Some("true"),
            body,
        })
    }

    /// The error chain of the client, on one line; with TLS, what a certificate that was
    /// not accepted was checked against.
    fn describe_client_error(&self, e: &hyper_util::client::legacy::Error) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        if let Some(roots) = &self.roots
            && text.contains("invalid peer certificate")
        {
            let host = self.base.trim_start_matches("https://");
            let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
            text.push_str(&format!(
                " (TLS: Consul's certificate was verified for the name {host} against the {roots}"
            ));
            if text.contains("UnknownIssuer") {
                text.push_str("; give the CA that signed it with --consul-ca FILE");
            }
            text.push(')');
        }
        text
    }
}

/// The next index of a blocking query, from the one sent and the `X-Consul-Index` received:
/// reset to 0 when it went backwards (Consul restored or restarted) or is missing, as
/// Consul's documentation asks.
fn next_index(sent: u64, received: Option<u64>) -> u64 {
    match received {
        Some(i) if i >= sent => i,
        _ => 0,
    }
}

/// Exponential backoff: 100 ms, doubling, at most 10 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(BACKOFF_START)
    }
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        now
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_START;
    }
}

/// One watched endpoint of Consul, with its index, backoff and last problem.
struct BlockingQuery {
    api: Arc<Api>,
    path: String,
    params: Vec<(&'static str, String)>,
    /// What is watched, for messages: `service "web"`, `the catalog`.
    what: String,
    index: u64,
    backoff: Backoff,
    /// A pause before the next query (after an error, or an answer without an index).
    pause: Option<Duration>,
    /// The problem last logged, so that a lasting one is logged once.
    problem: Option<String>,
    acl_filtered: bool,
}

impl BlockingQuery {
    fn new(
        api: &Arc<Api>,
        path: String,
        params: Vec<(&'static str, String)>,
        what: String,
    ) -> Self {
        Self {
            api: api.clone(),
            path,
            params,
            what,
            index: 0,
            backoff: Backoff::new(),
            pause: None,
            problem: None,
            acl_filtered: false,
        }
    }

    /// The body of the next answer; None once `stop` is cancelled. Errors are logged and
    /// retried with backoff in here.
    async fn next(&mut self, stop: &CancellationToken) -> Option<Bytes> {
        loop {
            if let Some(pause) = self.pause.take() {
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            let answer = tokio::select! {
                _ = stop.cancelled() => return None,
                a = self.api.get(&self.path, &self.params, self.index) => a,
            };
            match answer {
                Ok(answer) => {
                    self.api.reachability.answered();
                    if let Some(p) = self.problem.take() {
                        tracing::info!("consul: {} answers again (after: {p})", self.what);
                    }
                    if answer.filtered_by_acls && !self.acl_filtered {
                        tracing::warn!(
                            "consul left some of {} out of its answer for lack of ACL permission (X-Consul-Results-Filtered-By-ACLs); give a token with service:read and node:read",
                            self.what
                        );
                    }
                    self.acl_filtered = answer.filtered_by_acls;
                    match answer.index {
                        Some(i) if i > 0 => {
                            if i < self.index {
                                tracing::info!(
                                    "consul: the index of {} went backwards ({} to {i}): Consul was restored or restarted; starting over from 0",
                                    self.what,
                                    self.index
                                );
                            }
                            self.index = next_index(self.index, Some(i));
                            self.backoff.reset();
                        }
                        _ => {
                            // Never block on a missing index, and never spin on it either.
                            self.index = 0;
                            self.pause = Some(self.backoff.next());
                            self.problem(format!(
                                "Consul's answer has no X-Consul-Index; is {} a Consul agent?",
                                self.api.base
                            ));
                        }
                    }
                    return Some(answer.body);
                }
                Err(Failure::Unreachable(e)) => {
                    self.api
                        .health
                        .failed(format!("consul at {} unreachable: {e}", self.api.base));
                    self.api.reachability.failed(&self.api.base, &e);
                    // Ask without blocking once it answers again: a blocking query would
                    // hide that it is back, and what changed meanwhile, until `wait` ends.
                    self.index = 0;
                    self.pause = Some(self.backoff.next());
                }
                Err(Failure::Status(status, text)) => {
                    // It answered, if not as hoped: it is reachable.
                    self.api.reachability.answered();
                    let message = match status {
                        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => format!(
                            "Consul refused the token for {} ({status}: {text}); {}",
                            self.what,
                            if self.api.token.is_some() {
                                "the token is wrong, expired or lacks service:read; check --consul-token"
                            } else {
                                "this Consul requires an ACL token; give one with --consul-token"
                            }
                        ),
                        _ => format!("Consul answered {status} for {}: {text}", self.what),
                    };
                    self.api.health.failed(&message);
                    self.problem(message);
                    // The index may have been meant for another Consul; ask afresh.
                    self.index = 0;
                    self.pause = Some(self.backoff.next());
                }
            }
        }
    }

    /// Logs a problem unless it is the one logged last; the last known endpoints keep
    /// serving.
    fn problem(&mut self, message: String) {
        if self.problem.as_ref() != Some(&message) {
            tracing::warn!("{message}; serving the last known endpoints");
            self.problem = Some(message);
        }
    }
}

/// Whether Consul answers, shared by the watchers so that an outage is logged once.
#[derive(Default)]
struct Reachability {
    down_since: Mutex<Option<(SystemTime, Instant)>>,
}

impl Reachability {
    fn failed(&self, address: &str, error: &str) {
        let mut down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        if down.is_none() {
            let now = SystemTime::now();
            *down = Some((now, Instant::now()));
            tracing::warn!(
                "consul unreachable since {}; serving the last known endpoints (consul at {address}: {error})",
                utc(now)
            );
        }
    }

    fn answered(&self) {
        let mut down = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((since, at)) = down.take() {
            tracing::info!(
                "consul reachable again after {:.1} s (unreachable since {}); watching resumed",
                at.elapsed().as_secs_f64(),
                utc(since)
            );
        }
    }
}

/// `2024-05-01T12:34:56Z`.
fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `http://HOST:PORT` from `HOST:PORT`, `HOST` (port 8500) or `http://HOST:PORT`;
/// `https://HOST:PORT` from `https://HOST:PORT` or `https://HOST` (port 8501).
fn parse_address(address: &str) -> Result<String, String> {
    let a = address.trim().trim_end_matches('/');
    let bad = |why: &str| {
        format!(
            "invalid Consul address {address:?}: {why}; give HOST:PORT of its HTTP API, such as 127.0.0.1:8500 or localhost:8500, or https://HOST:PORT for TLS"
        )
    };
    let (scheme, hostport, default_port) = match a.strip_prefix("https://") {
        Some(rest) => ("https", rest, DEFAULT_HTTPS_PORT),
        None => ("http", a.strip_prefix("http://").unwrap_or(a), 8500),
    };
    if hostport.is_empty() || hostport.contains(['/', '@', '?', '#']) || hostport.contains("://") {
        return Err(bad("it is not HOST:PORT"));
    }
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, "")) => (&hostport[..ip.len() + 2], None),
            Some((ip, rest)) => match rest.strip_prefix(':') {
                Some(p) => (&hostport[..ip.len() + 2], Some(p)),
                None => return Err(bad("it is not HOST:PORT")),
            },
            None => return Err(bad("the IPv6 address has no closing ']'")),
        },
        None => match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    };
    if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
        return Err(bad(
            "it is not HOST:PORT (write an IPv6 address in brackets)",
        ));
    }
    let port = match port {
        None => default_port,
        Some("") => return Err(bad("the port is missing")),
        Some(p) => match p.parse::<u16>() {
            Ok(0) => return Err(bad("port 0 cannot be reached")),
            Ok(p) => p,
            Err(_) => return Err(bad("it is not HOST:PORT (the port is not a number)")),
        },
    };
    let base = format!("{scheme}://{host}:{port}");
    match base.parse::<Uri>() {
        Ok(uri) if uri.host().is_some() => Ok(base),
        _ => Err(bad("it is not HOST:PORT")),
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn addresses_take_the_forms_people_write() {
        assert_eq!(
            parse_address("localhost:8500").unwrap(),
            "http://localhost:8500"
        );
        assert_eq!(
            parse_address("127.0.0.1:8500").unwrap(),
            "http://127.0.0.1:8500"
        );
        assert_eq!(
            parse_address("http://consul:8501/").unwrap(),
            "http://consul:8501"
        );
        assert_eq!(parse_address("consul").unwrap(), "http://consul:8500");
        assert_eq!(parse_address("[::1]:8500").unwrap(), "http://[::1]:8500");
        assert_eq!(parse_address("[::1]").unwrap(), "http://[::1]:8500");
        assert_eq!(
            parse_address("https://consul:8443/").unwrap(),
            "https://consul:8443"
        );
        assert_eq!(
            parse_address("https://consul").unwrap(),
            "https://consul:8501"
        );
        assert_eq!(
            parse_address("https://[::1]:8501").unwrap(),
            "https://[::1]:8501"
        );
        for (bad, why) in [
            ("https://consul:http", "not HOST:PORT"),
            ("https://consul:8501/v1", "not HOST:PORT"),
            ("", "not HOST:PORT"),
            ("consul:8500/v1", "not HOST:PORT"),
            ("consul:http", "not HOST:PORT"),
            ("consul:0", "port 0"),
            ("consul:", "port is missing"),
            ("::1:8500", "in brackets"),
            ("[::1]x", "not HOST:PORT"),
            ("consul host:8500", "not HOST:PORT"),
        ] {
            let e = parse_address(bad).unwrap_err();
            assert!(
                e.contains(why) && e.contains("such as 127.0.0.1:8500"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn options_are_checked() {
        let m: Vec<Mapping> = vec!["80:webserver".parse().unwrap()];
        let ok = ConsulSource::new(m.clone(), ConsulOptions::default()).unwrap();
        assert_eq!(ok.api.base, "http://127.0.0.1:8500");
        let e = ConsulSource::new(
            m.clone(),
            ConsulOptions {
                wait: Duration::ZERO,
                ..ConsulOptions::default()
            },
        )
        .unwrap_err();
        assert!(e.contains("wait"), "{e}");
        let e = ConsulSource::new(
            m.clone(),
            ConsulOptions {
                wait: Duration::from_secs(601),
                ..ConsulOptions::default()
            },
        )
        .unwrap_err();
        assert!(e.contains("10 minutes"), "{e}");
        let e = ConsulSource::new(Vec::new(), ConsulOptions::default()).unwrap_err();
        assert!(e.contains("nothing to watch"), "{e}");
        let e = ConsulSource::new(
            m.clone(),
            ConsulOptions {
                token: Some("bad\ntoken".into()),
                ..ConsulOptions::default()
            },
        )
        .unwrap_err();
        assert!(e.contains("token"), "{e}");
        let options = ConsulOptions {
            token: Some("s3cret".into()),
            ..ConsulOptions::default()
        };
        assert!(!format!("{options:?}").contains("s3cret"));
    }

    fn with_ca(address: &str, ca_file: Option<PathBuf>) -> Result<ConsulSource, String> {
        ConsulSource::new(
            vec!["80:webserver".parse().unwrap()],
            ConsulOptions {
                address: address.into(),
                tls: Some(ConsulTls {
                    ca_file,
                    client: None,
                }),
                ..ConsulOptions::default()
            },
        )
    }

    #[test]
    fn tls_options_are_checked_at_start() {
        let ok = ConsulSource::new(
            vec!["80:webserver".parse().unwrap()],
            ConsulOptions {
                address: "https://127.0.0.1:8501".into(),
                ..ConsulOptions::default()
            },
        )
        .unwrap();
        assert_eq!(ok.api.base, "https://127.0.0.1:8501");
        assert!(ok.api.roots.as_deref().unwrap().starts_with("system roots"));
        let plain = ConsulSource::new(
            vec!["80:webserver".parse().unwrap()],
            ConsulOptions::default(),
        )
        .unwrap();
        assert_eq!(plain.api.roots, None);

        let e = with_ca("127.0.0.1:8500", None).unwrap_err();
        assert!(e.contains("https://HOST:PORT"), "{e}");
        let e = with_ca("https://127.0.0.1:8501", Some("/nonexistent/ca.pem".into())).unwrap_err();
        assert!(
            e.starts_with("Consul: its CA bundle, --consul-ca /nonexistent/ca.pem: no such file"),
            "{e}"
        );

        let dir = std::env::temp_dir().join(format!("drover-consul-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let e = with_ca("https://127.0.0.1:8501", Some(not_pem.clone())).unwrap_err();
        assert!(
            e.contains(&format!(
                "--consul-ca {}: no certificate in it",
                not_pem.display()
            )),
            "{e}"
        );
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = with_ca("https://127.0.0.1:8501", Some(broken.clone())).unwrap_err();
        assert!(e.contains(&broken.display().to_string()), "{e}");
        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = with_ca("https://127.0.0.1:8501", Some(garbage.clone())).unwrap_err();
        assert!(
            e.contains(&garbage.display().to_string()) && e.contains("certificate 1"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_client_certificate_that_cannot_be_used_stops_start_up_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let with = |cert: &std::path::Path, key: &std::path::Path| {
            let tls = ConsulTls {
                ca_file: None,
                client: Some(ClientCertificate {
                    cert: cert.into(),
                    key: key.into(),
                }),
            };
            let options = ConsulOptions {
                address: "https://127.0.0.1:8501".into(),
                tls: Some(tls),
                ..ConsulOptions::default()
            };
            ConsulSource::new(vec!["80:webserver".parse().unwrap()], options).unwrap_err()
        };
        let missing = dir.path().join("missing.pem");
        let e = with(&missing, &empty);
        assert_eq!(
            e,
            format!(
                "Consul: its client certificate, --consul-cert {}: no such file",
                missing.display()
            )
        );
        let e = with(&empty, &empty);
        assert!(
            e.starts_with(&format!(
                "Consul: its client certificate, --consul-cert {}: no certificate in it",
                empty.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn the_index_follows_consul_and_resets_when_it_goes_backwards_or_is_missing() {
        assert_eq!(next_index(0, Some(7)), 7);
        assert_eq!(next_index(7, Some(7)), 7); // a wake-up with no change
        assert_eq!(next_index(7, Some(12)), 12);
        assert_eq!(next_index(12, Some(3)), 0); // Consul restored: start over
        assert_eq!(next_index(12, None), 0);
    }

    #[test]
    fn backoff_doubles_from_100_ms_to_10_s() {
        let mut b = Backoff::new();
        let steps: Vec<u128> = (0..10).map(|_| b.next().as_millis()).collect();
        assert_eq!(
            steps,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }

    #[test]
    fn health_entries_use_the_service_address_else_the_node_address() {
        let body = r#"[
          {"Node":{"Node":"n1","Address":"10.0.0.1"},
           "Service":{"ID":"web-1","Service":"web","Address":"","Port":8080,"Tags":[]},
           "Checks":[]},
          {"Node":{"Node":"n2","Address":"10.0.0.2"},
           "Service":{"ID":"web-2","Service":"web","Address":"172.17.0.5","Port":80,"Tags":null,"Meta":{}},
           "Checks":[{"CheckID":"serfHealth","Status":"passing"}]}
        ]"#;
        let entries: Vec<HealthEntry> = serde_json::from_str(body).unwrap();
        let addrs: Vec<(String, u16)> = entries.iter().map(HealthEntry::address).collect();
        assert_eq!(
            addrs,
            [
                ("10.0.0.1".to_string(), 8080),
                ("172.17.0.5".to_string(), 80)
            ]
        );
    }

    #[tokio::test]
    async fn host_names_are_resolved_and_unresolvable_ones_left_out() {
        let raw = vec![
            ("127.0.0.1".to_string(), 80),
            ("localhost".to_string(), 81),
            ("no-such-host.invalid".to_string(), 82),
            ("".to_string(), 83),
        ];
        let addrs = resolve("web", &raw).await;
        assert!(addrs.contains(&"127.0.0.1:80".parse().unwrap()));
        assert!(addrs.iter().any(|a| a.port() == 81 && a.ip().is_loopback()));
        assert_eq!(addrs.len(), 2, "{addrs:?}");
    }

    #[test]
    fn tags_publish_a_service() {
        let p = Published::from_tags(
            "api",
            &tagged(&[
                "v2",
                "drover.enable",
                "drover.publish=8080",
                "drover.host=API.example.com",
                "drover.path=/api",
                "drover.policy=least_conn",
                "drover.port=9000",
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(p.host.as_deref(), Some("api.example.com"));
        assert_eq!(p.path.as_deref(), Some("/api"));
        assert_eq!(p.policy, Some(Policy::LeastConn));
        assert_eq!(p.port, Some(9000));
        assert_eq!(p.listener_name(), "consul-8080");

        let p = Published::from_tags(
            "web",
            &tagged(&["drover.enable=true", "drover.listen=127.0.0.1:18080"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.listen, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(p.listener_name(), "consul-127.0.0.1-18080");
        assert_eq!(p.host, None);

        for not_enabled in [
            &["drover.publish=80"][..],
            &["drover.enable=false", "drover.publish=80"],
            &[],
        ] {
            assert_eq!(Published::from_tags("x", &tagged(not_enabled)), Ok(None));
        }
    }

    #[test]
    fn bad_tags_name_the_service_and_the_tag() {
        for (tags, needle) in [
            (
                &["drover.enable", "drover.publish=http"][..],
                "\"drover.publish=http\"",
            ),
            (
                &["drover.enable", "drover.publish=0"],
                "\"drover.publish=0\"",
            ),
            (
                &["drover.enable", "drover.listen=localhost"],
                "\"drover.listen=localhost\"",
            ),
            (
                &[
                    "drover.enable",
                    "drover.publish=80",
                    "drover.policy=fastest",
                ],
                "\"drover.policy=fastest\"",
            ),
            (
                &["drover.enable", "drover.publish=80", "drover.host=bad host"],
                "\"drover.host=bad host\"",
            ),
            (
                &["drover.enable", "drover.publish=80", "drover.path=api"],
                "\"drover.path=api\"",
            ),
            (
                &["drover.enable", "drover.publish=80", "drover.port=x"],
                "\"drover.port=x\"",
            ),
            (
                &["drover.enable", "drover.publish=80", "drover.pubilsh=81"],
                "\"drover.pubilsh=81\"",
            ),
            (
                &["drover.enable", "drover.publish=80", "drover.publish=81"],
                "\"drover.publish=81\"",
            ),
            (
                &[
                    "drover.enable",
                    "drover.publish=80",
                    "drover.listen=127.0.0.1:80",
                ],
                "both say where",
            ),
            (
                &["drover.enable=yes", "drover.publish=80"],
                "\"drover.enable=yes\"",
            ),
            (&["drover.enable"], "no drover.publish=PORT"),
        ] {
            let e = Published::from_tags("svc", &tagged(tags)).unwrap_err();
            assert!(e.contains("\"svc\"") && e.contains(needle), "{tags:?}: {e}");
        }
    }

    fn state(mappings: &[&str]) -> State {
        State::new(mappings.iter().map(|m| m.parse().unwrap()).collect(), true)
    }

    #[test]
    fn mappings_take_consul_ports_unless_they_give_one() {
        let mut s = state(&["127.0.0.1:8080:web", "127.0.0.1:8081:api:9000"]);
        s.found.insert(
            "web".into(),
            vec![
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.2:0".parse().unwrap(),
            ],
        );
        s.found
            .insert("api".into(), vec!["10.0.0.3:1234".parse().unwrap()]);
        let (c, warnings) = s.build();
        drover_model::validate(&c).unwrap();
        let eps = |name: &str| -> Vec<String> {
            c.services[name]
                .endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect()
        };
        assert_eq!(eps("web"), ["10.0.0.1:80"]);
        assert_eq!(eps("api"), ["10.0.0.3:9000"]);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings.iter().next().unwrap().contains("without a port"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_first_snapshot_has_the_mapped_services_with_no_endpoints() {
        let s = state(&["127.0.0.1:8080:webserver", "127.0.0.1:8081:graphite"]);
        let (c, warnings) = s.build();
        drover_model::validate(&c).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(c.listeners.len(), 2);
        assert!(c.services.values().all(|s| s.endpoints.is_empty()));
    }

    #[test]
    fn tagged_services_share_a_port_by_host_and_bad_ones_are_left_out() {
        let mut s = state(&["127.0.0.1:8080:web"]);
        s.set_catalog(BTreeMap::from([
            ("consul".to_string(), vec![]),
            ("web".to_string(), tagged(&["primary"])),
            (
                "one".to_string(),
                tagged(&[
                    "drover.enable",
                    "drover.listen=127.0.0.1:9000",
                    "drover.host=one.test",
                ]),
            ),
            (
                "two".to_string(),
                tagged(&[
                    "drover.enable=true",
                    "drover.listen=127.0.0.1:9000",
                    "drover.host=two.test",
                    "drover.policy=random",
                ]),
            ),
            // Same route as "one": a route can go to one service only.
            (
                "three".to_string(),
                tagged(&[
                    "drover.enable",
                    "drover.listen=127.0.0.1:9000",
                    "drover.host=one.test",
                ]),
            ),
            // Overlaps the mapping's listener on 127.0.0.1:8080.
            (
                "four".to_string(),
                tagged(&["drover.enable", "drover.publish=8080"]),
            ),
            (
                "five".to_string(),
                tagged(&["drover.enable", "drover.publish=eighty"]),
            ),
        ]));
        assert_eq!(
            s.watched_services(),
            BTreeSet::from(["web", "one", "two", "three", "four"].map(String::from))
        );
        s.found
            .insert("one".into(), vec!["127.0.0.1:7001".parse().unwrap()]);
        // Not published before its watcher answered.
        assert_eq!(s.build().0.routes.len(), 2);
        for name in ["two", "three", "four"] {
            s.found.insert(name.into(), Vec::new());
        }
        let (c, warnings) = s.build();
        drover_model::validate(&c).unwrap();
        let names: Vec<&str> = c.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["web-8080", "consul-127.0.0.1-9000"]);
        let routes: Vec<String> = c.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            routes,
            [
                "web-8080 host=* path_prefix=/ -> web",
                "consul-127.0.0.1-9000 host=one.test path_prefix=/ -> one",
                "consul-127.0.0.1-9000 host=two.test path_prefix=/ -> two",
            ]
        );
        assert_eq!(c.services["two"].policy, Policy::Random);
        assert_eq!(c.services["one"].endpoints.len(), 1);
        let warnings: Vec<&String> = warnings.iter().collect();
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        for (service, needle) in [
            ("three", "drover.host=one.test"),
            ("four", "drover.publish=8080"),
            ("five", "drover.publish=eighty"),
        ] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(&format!("{service:?}")) && w.contains(needle)),
                "{service}: {warnings:#?}"
            );
        }
    }

    #[test]
    fn a_mapped_service_can_also_be_published_by_tags() {
        let mut s = state(&["127.0.0.1:8080:web"]);
        s.set_catalog(BTreeMap::from([(
            "web".to_string(),
            tagged(&[
                "drover.enable",
                "drover.listen=127.0.0.1:9000",
                "drover.policy=least_conn",
            ]),
        )]));
        s.found
            .insert("web".into(), vec!["127.0.0.1:7001".parse().unwrap()]);
        let (c, warnings) = s.build();
        assert!(warnings.is_empty(), "{warnings:?}");
        drover_model::validate(&c).unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services["web"].policy, Policy::LeastConn);
    }

    #[test]
    fn times_are_written_in_utc() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(1_709_210_096)),
            "2024-02-29T12:34:56Z"
        );
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(4_102_444_799)),
            "2099-12-31T23:59:59Z"
        );
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(encode("web-1.v2_x~"), "web-1.v2_x~");
        assert_eq!(encode("a b/c?d"), "a%20b%2Fc%3Fd");
    }
}
