//! The agents source: what `drover agent` registered in etcd, for the gateways to serve
//! (docs/cluster.md, "Agents").
//!
//! Each agent keeps one key, `PREFIX/agents/NODE`, under a lease of its own: a JSON
//! [`Registration`] holding the slice of configuration its host's containers make (listeners,
//! routes, services with endpoints at the host's advertised address and published ports).
//! When an agent stops it revokes its lease; when it dies, or its host does, the lease expires
//! after its TTL. Either way etcd deletes the key, and its endpoints leave every gateway.
//!
//! The source reads every key under the prefix, then watches the prefix from the revision
//! after that read. After a disconnect it resumes from the last revision it saw, so that no
//! change in between is missed; when that revision has been compacted it reads everything
//! again. While etcd cannot be reached, the last known agents keep serving.
//!
//! It sends one snapshot, as the source `agents`, that is the union of the agents' slices
//! ([`union`]): the same listener from several hosts is one listener, routes are deduplicated,
//! and a service's endpoints are every agent's endpoints together. An agent whose slice does
//! not fit the others' (one listener name on two addresses, one route to two services) is
//! left out with a warning that names both nodes, and the rest is served.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use drover_control::sources::SourceHealth;
use drover_control::{Snapshot, SnapshotSender};
use drover_etcd::etcd_client::{self, EventType, GetOptions, WatchOptions};
use drover_etcd::{StoreOptions, StoreUrl};
use drover_model::{Config, ServiceSpec, SourceId};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The source's id in the reconciler, in logs and in the API's `source` fields.
pub fn source_id() -> SourceId {
    SourceId("agents".into())
}

/// What an agent writes under `PREFIX/agents/NODE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// The agent's node name (also the last part of its key).
    pub node: String,
    /// The address other hosts reach this host's published ports on.
    pub advertise: IpAddr,
    /// The agent's drover version.
    pub version: String,
    /// The container behind each endpoint address, for logs.
    #[serde(default)]
    pub containers: BTreeMap<SocketAddr, String>,
    /// The slice of configuration the host's containers make.
    pub config: Config,
}

impl Registration {
    /// The JSON written to etcd.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a registration serializes")
    }

    /// Reads a registration from etcd's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Registration, String> {
        serde_json::from_slice(bytes)
            .map_err(|e| format!("is not a drover agent registration: {e}"))
    }

    /// Endpoints over all services.
    pub fn endpoints(&self) -> usize {
        self.config
            .services
            .values()
            .map(|s| s.endpoints.len())
            .sum()
    }
}

/// The agents' slices together, as the source sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Union {
    pub config: Config,
    /// The nodes whose slices are in.
    pub nodes: Vec<String>,
    /// Agents left out and why, and disagreements resolved in favour of the first node.
    pub warnings: Vec<String>,
}

/// Unions the agents' slices, by node name order. The first node that brings a listener, a
/// route or a service sets it up; later nodes add their endpoints to its services. An agent
/// whose slice cannot join (invalid, a listener name on another address, a listen address
/// under another name, a route to another service) is left out whole, with a warning naming
/// it and the node it disagrees with.
pub fn union(agents: &BTreeMap<String, Result<Registration, String>>) -> Union {
    let mut config = Config::default();
    let mut nodes = Vec::new();
    let mut warnings = Vec::new();
    // Who brought each listener, route, service and endpoint.
    let mut listener_owner: BTreeMap<String, String> = BTreeMap::new();
    type RouteKey = (String, Option<String>, Option<String>);
    let mut routes: BTreeMap<RouteKey, (String, String)> = BTreeMap::new();
    let mut service_owner: BTreeMap<String, String> = BTreeMap::new();
    let mut endpoint_owner: BTreeMap<(String, SocketAddr), String> = BTreeMap::new();

    for (node, registration) in agents {
        let slice = match registration {
            Ok(r) => &r.config,
            Err(e) => {
                warnings.push(format!("agent {node} left out: its registration {e}"));
                continue;
            }
        };
        if let Err(errors) = drover_model::validate(slice) {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            warnings.push(format!(
                "agent {node} left out: its slice is not valid: {}",
                errors.join("; ")
            ));
            continue;
        }
        let mut conflicts = Vec::new();
        for l in &slice.listeners {
            for have in &config.listeners {
                let owner = &listener_owner[&have.name];
                if have.name == l.name && have.listen != l.listen {
                    conflicts.push(format!(
                        "its listener {} listens on {}, but on {} for agent {owner}",
                        l.name, l.listen, have.listen
                    ));
                } else if have.name != l.name && overlap(have.listen, l.listen) {
                    conflicts.push(format!(
                        "its listener {} ({}) overlaps listener {} ({}) of agent {owner}",
                        l.name, l.listen, have.name, have.listen
                    ));
                }
            }
        }
        for r in &slice.routes {
            let key = (r.listener.clone(), r.host.clone(), r.path_prefix.clone());
            if let Some((service, owner)) = routes.get(&key)
                && *service != r.service
            {
                conflicts.push(format!(
                    "its route {r} goes to service {}, but to {service} for agent {owner}",
                    r.service
                ));
            }
        }
        if !conflicts.is_empty() {
            warnings.push(format!(
                "agent {node} left out: {}; give its containers other labels (lb.publish, drover.service, drover.host or drover.path)",
                conflicts.join("; ")
            ));
            continue;
        }

        for l in &slice.listeners {
            if !listener_owner.contains_key(&l.name) {
                listener_owner.insert(l.name.clone(), node.clone());
                config.listeners.push(l.clone());
            }
        }
        for r in &slice.routes {
            let key = (r.listener.clone(), r.host.clone(), r.path_prefix.clone());
            if let std::collections::btree_map::Entry::Vacant(v) = routes.entry(key) {
                v.insert((r.service.clone(), node.clone()));
                config.routes.push(r.clone());
            }
        }
        for (name, spec) in &slice.services {
            let Some(have) = config.services.get_mut(name) else {
                service_owner.insert(name.clone(), node.clone());
                for e in &spec.endpoints {
                    endpoint_owner.insert((name.clone(), e.address), node.clone());
                }
                config.services.insert(name.clone(), spec.clone());
                continue;
            };
            let owner = &service_owner[name];
            if settings(have) != settings(spec) {
                warnings.push(format!(
                    "agent {node}: service {name}'s settings (policy, stickiness, health check, timeouts) differ from agent {owner}'s; {owner}'s apply"
                ));
            }
            for e in &spec.endpoints {
                match endpoint_owner.get(&(name.clone(), e.address)) {
                    Some(first) => {
                        if first != node {
                            warnings.push(format!(
                                "agent {node}: endpoint {} of service {name} is also registered by agent {first}; kept once (do both hosts advertise the same address?)",
                                e.address
                            ));
                        }
                    }
                    None => {
                        endpoint_owner.insert((name.clone(), e.address), node.clone());
                        have.endpoints.push(*e);
                    }
                }
            }
        }
        nodes.push(node.clone());
    }
    Union {
        config,
        nodes,
        warnings,
    }
}

/// A service's settings without its endpoints.
fn settings(s: &ServiceSpec) -> ServiceSpec {
    ServiceSpec {
        endpoints: Vec::new(),
        ..s.clone()
    }
}

/// Two listen addresses on one port where one covers the other.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
}

/// Watches the agents' registrations in etcd and sends their union.
pub struct AgentsSource {
    url: StoreUrl,
    options: StoreOptions,
}

/// The agents as last read, and the revision they are current at.
struct Agents {
    by_node: BTreeMap<String, Result<Registration, String>>,
    /// The etcd revision everything up to which has been seen; 0 before a first full read
    /// and after a compaction, when everything must be read again.
    revision: i64,
}

/// How the link to etcd is doing: reported to /metrics and logged once per outage.
struct Link {
    health: std::sync::Arc<SourceHealth>,
    url: String,
    down_since: Option<Instant>,
    backoff: Duration,
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a quiet watch asks etcd for a progress report.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

impl Link {
    fn up(&mut self) {
        self.health.synced();
        self.backoff = BACKOFF_START;
        if let Some(t) = self.down_since.take() {
            tracing::info!(
                "agents: etcd at {} reachable again after {:.1} s",
                self.url,
                t.elapsed().as_secs_f64()
            );
        }
    }

    fn down(&mut self, why: &str) -> Duration {
        self.health.failed(why);
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            tracing::warn!(
                "agents: etcd at {}: {why}; serving the last known agents' endpoints and retrying",
                self.url
            );
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }
}

/// What the source sent last, to send only changes and to log each warning once.
struct Sent {
    snapshots: SnapshotSender,
    config: Option<Config>,
    nodes: Vec<String>,
    warnings: BTreeSet<String>,
}

impl Sent {
    /// Sends the union when it changed; false when the reconciler is gone.
    async fn publish(&mut self, agents: &Agents, reason: &str) -> bool {
        let u = union(&agents.by_node);
        for w in &u.warnings {
            if !self.warnings.contains(w) {
                tracing::warn!("agents: {w}");
            }
        }
        self.warnings = u.warnings.iter().cloned().collect();
        if self.config.as_ref() == Some(&u.config) {
            return true;
        }
        if self.nodes != u.nodes || self.config.is_none() {
            let described: Vec<String> = u
                .nodes
                .iter()
                .map(|n| match &agents.by_node[n] {
                    Ok(r) => format!("{n} ({} endpoints at {})", r.endpoints(), r.advertise),
                    Err(_) => n.clone(),
                })
                .collect();
            tracing::info!(
                "agents: serving {} agents: {}",
                u.nodes.len(),
                if described.is_empty() {
                    "none".to_string()
                } else {
                    described.join(", ")
                }
            );
        }
        let snapshot = Snapshot::new(source_id(), u.config.clone(), reason);
        if self.snapshots.send(snapshot).await.is_err() {
            return false;
        }
        self.config = Some(u.config);
        self.nodes = u.nodes;
        true
    }
}

/// Why a session with etcd ended.
enum Ended {
    /// The reconciler is gone: stop.
    Closed,
    /// The watched revision was compacted: read everything again, now.
    Compacted,
    Failed(String),
}

impl AgentsSource {
    pub fn new(url: StoreUrl, options: StoreOptions) -> Self {
        Self { url, options }
    }

    /// Follows the agents' registrations until `stop`.
    pub async fn run(self, snapshots: SnapshotSender, stop: CancellationToken) {
        let mut agents = Agents {
            by_node: BTreeMap::new(),
            revision: 0,
        };
        let mut link = Link {
            health: drover_control::sources::health(&source_id()),
            url: self.url.to_string(),
            down_since: None,
            backoff: BACKOFF_START,
        };
        let mut sent = Sent {
            snapshots,
            config: None,
            nodes: Vec::new(),
            warnings: BTreeSet::new(),
        };
        let mut client: Option<etcd_client::Client> = None;
        loop {
            let ended = tokio::select! {
                ended = self.session(&mut client, &mut agents, &mut link, &mut sent) => ended,
                _ = stop.cancelled() => return,
            };
            match ended {
                Ended::Closed => return,
                Ended::Compacted => continue,
                Ended::Failed(why) => {
                    let wait = link.down(&why);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Reads everything if needed, then follows the watch until it ends.
    async fn session(
        &self,
        client: &mut Option<etcd_client::Client>,
        agents: &mut Agents,
        link: &mut Link,
        sent: &mut Sent,
    ) -> Ended {
        let c = match client {
            Some(c) => c,
            None => match drover_etcd::connect(&self.url, &self.options).await {
                Ok(c) => client.insert(c),
                Err(e) => return Ended::Failed(e.to_string()),
            },
        };
        let prefix = self.url.layout().agents();
        if agents.revision == 0 {
            let got = match c
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await
            {
                Ok(r) => r,
                Err(e) => return Ended::Failed(format!("cannot read {prefix}: {e}")),
            };
            link.up();
            agents.by_node.clear();
            for kv in got.kvs() {
                if let Some(node) = node_of(kv.key(), &prefix) {
                    agents
                        .by_node
                        .insert(node, Registration::decode(kv.value()));
                }
            }
            agents.revision = got.header().map_or(0, |h| h.revision()).max(1);
            if !sent.publish(agents, "read every agent").await {
                return Ended::Closed;
            }
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(agents.revision + 1);
        let (mut requests, mut responses) = match c.watch(prefix.as_str(), Some(options)).await {
            Ok(w) => w.split(),
            Err(e) => return Ended::Failed(format!("cannot watch {prefix}: {e}")),
        };
        // A quiet watch asks for a progress report now and then: the answer shows that etcd
        // is there (the source's staleness in /metrics stays low), and its absence that the
        // watch hangs.
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            let message = tokio::select! {
                m = responses.message() => m,
                _ = progress.tick() => {
                    if last_heard.elapsed() > 3 * PROGRESS_EVERY {
                        return Ended::Failed(format!(
                            "etcd has not answered the watch for {} s",
                            last_heard.elapsed().as_secs()
                        ));
                    }
                    if let Err(e) = requests.request_progress().await {
                        return Ended::Failed(format!("the watch broke: {e}"));
                    }
                    continue;
                }
            };
            let response = match message {
                Ok(Some(r)) => r,
                Ok(None) => return Ended::Failed("etcd closed the watch".into()),
                Err(e) => return Ended::Failed(format!("the watch broke: {e}")),
            };
            last_heard = Instant::now();
            link.up();
            if response.compact_revision() > 0 {
                tracing::info!(
                    "agents: revision {} was compacted (etcd keeps {} on); reading every agent again",
                    agents.revision + 1,
                    response.compact_revision()
                );
                agents.revision = 0;
                return Ended::Compacted;
            }
            if response.canceled() {
                return Ended::Failed(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason()
                ));
            }
            let mut reasons = Vec::new();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                agents.revision = agents.revision.max(kv.mod_revision());
                let Some(node) = node_of(kv.key(), &prefix) else {
                    continue;
                };
                match event.event_type() {
                    EventType::Put => {
                        let r = Registration::decode(kv.value());
                        if let Ok(r) = &r
                            && r.node != node
                        {
                            tracing::warn!(
                                "agents: the registration under {node} says it is from {}; taken as {node}'s",
                                r.node
                            );
                        }
                        let known = agents.by_node.contains_key(&node);
                        agents.by_node.insert(node.clone(), r);
                        reasons.push(if known {
                            format!("agent {node} changed")
                        } else {
                            format!("agent {node} registered")
                        });
                    }
                    EventType::Delete => {
                        if agents.by_node.remove(&node).is_some() {
                            reasons
                                .push(format!("agent {node} left (stopped, or its lease expired)"));
                        }
                    }
                }
            }
            if let Some(h) = response.header() {
                agents.revision = agents.revision.max(h.revision());
            }
            if !reasons.is_empty() && !sent.publish(agents, &reasons.join(", ")).await {
                return Ended::Closed;
            }
        }
    }
}

/// The node a key under the agents' prefix belongs to; None for anything else.
fn node_of(key: &[u8], prefix: &str) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    let node = key.strip_prefix(prefix)?;
    (!node.is_empty() && !node.contains('/')).then(|| node.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::{EndpointSpec, ListenerSpec, Policy, Protocol, RouteSpec};

    /// One agent's slice: a listener `docker-PORT` on `listen`, its route to `service`, and
    /// the service's endpoints.
    fn slice(node: &str, listen: &str, service: &str, endpoints: &[&str]) -> Registration {
        let listen: SocketAddr = listen.parse().unwrap();
        let listener = format!("docker-{}", listen.port());
        let mut config = Config::default();
        config
            .listeners
            .push(ListenerSpec::new(listener.clone(), listen, Protocol::Http));
        config.routes.push(RouteSpec::new(listener, service));
        config.services.insert(
            service.into(),
            ServiceSpec {
                endpoints: endpoints
                    .iter()
                    .map(|a| EndpointSpec::new(a.parse().unwrap(), 1))
                    .collect(),
                ..ServiceSpec::default()
            },
        );
        Registration {
            node: node.into(),
            advertise: "10.0.0.1".parse().unwrap(),
            version: "test".into(),
            containers: BTreeMap::new(),
            config,
        }
    }

    fn agents(slices: Vec<Registration>) -> BTreeMap<String, Result<Registration, String>> {
        slices
            .into_iter()
            .map(|r| (r.node.clone(), Ok(r)))
            .collect()
    }

    fn addresses(u: &Union, service: &str) -> Vec<String> {
        u.config.services[service]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect()
    }

    #[test]
    fn the_same_listener_from_two_agents_is_one_listener_with_both_agents_endpoints() {
        let u = union(&agents(vec![
            slice("n1", "0.0.0.0:80", "docker-80", &["10.0.0.1:32768"]),
            slice(
                "n2",
                "0.0.0.0:80",
                "docker-80",
                &["10.0.0.2:32768", "10.0.0.2:32769"],
            ),
        ]));
        assert!(u.warnings.is_empty(), "{:?}", u.warnings);
        assert_eq!(u.nodes, ["n1", "n2"]);
        assert_eq!(u.config.listeners.len(), 1);
        assert_eq!(u.config.listeners[0].name, "docker-80");
        assert_eq!(u.config.routes.len(), 1, "the route is deduplicated");
        assert_eq!(
            addresses(&u, "docker-80"),
            ["10.0.0.1:32768", "10.0.0.2:32768", "10.0.0.2:32769"]
        );
        drover_model::validate(&u.config).expect("the union is valid");
    }

    #[test]
    fn an_address_registered_by_two_agents_is_kept_once_and_reported() {
        let u = union(&agents(vec![
            slice("n1", "0.0.0.0:80", "docker-80", &["127.0.0.1:32768"]),
            slice(
                "n2",
                "0.0.0.0:80",
                "docker-80",
                &["127.0.0.1:32768", "127.0.0.1:32770"],
            ),
        ]));
        assert_eq!(
            addresses(&u, "docker-80"),
            ["127.0.0.1:32768", "127.0.0.1:32770"]
        );
        assert_eq!(u.warnings.len(), 1, "{:?}", u.warnings);
        assert!(
            u.warnings[0].contains("127.0.0.1:32768")
                && u.warnings[0].contains("n1")
                && u.warnings[0].contains("n2"),
            "{:?}",
            u.warnings
        );
        drover_model::validate(&u.config).expect("valid");
    }

    #[test]
    fn one_listener_name_on_two_addresses_leaves_the_later_agent_out_naming_both_nodes() {
        let u = union(&agents(vec![
            slice("n1", "0.0.0.0:80", "docker-80", &["10.0.0.1:32768"]),
            slice("n2", "10.0.0.9:80", "docker-80", &["10.0.0.2:32768"]),
            slice("n3", "0.0.0.0:81", "docker-81", &["10.0.0.3:32768"]),
        ]));
        assert_eq!(u.nodes, ["n1", "n3"], "n2 is left out, n3 is not");
        assert_eq!(addresses(&u, "docker-80"), ["10.0.0.1:32768"]);
        assert_eq!(addresses(&u, "docker-81"), ["10.0.0.3:32768"]);
        assert_eq!(u.warnings.len(), 1, "{:?}", u.warnings);
        let w = &u.warnings[0];
        assert!(
            w.starts_with("agent n2 left out")
                && w.contains("agent n1")
                && w.contains("docker-80")
                && w.contains("10.0.0.9:80")
                && w.contains("0.0.0.0:80"),
            "{w}"
        );
        drover_model::validate(&u.config).expect("valid");
    }

    #[test]
    fn one_route_to_two_services_leaves_the_later_agent_out() {
        let u = union(&agents(vec![
            slice("a", "0.0.0.0:80", "web", &["10.0.0.1:1"]),
            slice("b", "0.0.0.0:80", "shop", &["10.0.0.2:1"]),
        ]));
        assert_eq!(u.nodes, ["a"]);
        assert!(!u.config.services.contains_key("shop"));
        assert!(
            u.warnings[0].contains("agent b left out")
                && u.warnings[0].contains("shop")
                && u.warnings[0].contains("web")
                && u.warnings[0].contains("agent a"),
            "{:?}",
            u.warnings
        );
    }

    #[test]
    fn the_first_agents_service_settings_apply_and_the_difference_is_reported() {
        let mut b = slice("b", "0.0.0.0:80", "docker-80", &["10.0.0.2:1"]);
        b.config.services.get_mut("docker-80").unwrap().policy = Policy::Random;
        let u = union(&agents(vec![
            slice("a", "0.0.0.0:80", "docker-80", &["10.0.0.1:1"]),
            b,
        ]));
        assert_eq!(u.nodes, ["a", "b"]);
        assert_eq!(
            u.config.services["docker-80"].policy,
            ServiceSpec::default().policy
        );
        assert_eq!(addresses(&u, "docker-80"), ["10.0.0.1:1", "10.0.0.2:1"]);
        assert!(u.warnings[0].contains("a's apply"), "{:?}", u.warnings);
    }

    #[test]
    fn an_unreadable_or_invalid_registration_is_left_out_alone() {
        let mut bad = slice("b", "0.0.0.0:80", "docker-80", &["10.0.0.2:1"]);
        bad.config.routes[0].service = "missing".into();
        let mut all = agents(vec![
            slice("a", "0.0.0.0:80", "docker-80", &["10.0.0.1:1"]),
            bad,
        ]);
        all.insert("c".into(), Registration::decode(b"{not json"));
        let u = union(&all);
        assert_eq!(u.nodes, ["a"]);
        assert_eq!(u.warnings.len(), 2, "{:?}", u.warnings);
        assert!(u.warnings[0].starts_with("agent b left out: its slice is not valid"));
        assert!(
            u.warnings[1].starts_with(
                "agent c left out: its registration is not a drover agent registration"
            )
        );
    }

    #[test]
    fn registrations_round_trip_through_json() {
        let mut r = slice("n1", "0.0.0.0:80", "docker-80", &["10.0.0.1:32768"]);
        r.containers
            .insert("10.0.0.1:32768".parse().unwrap(), "web1".into());
        assert_eq!(Registration::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn only_direct_children_of_the_prefix_are_agents() {
        assert_eq!(
            node_of(b"/drover/agents/n1", "/drover/agents/"),
            Some("n1".into())
        );
        assert_eq!(node_of(b"/drover/agents/", "/drover/agents/"), None);
        assert_eq!(node_of(b"/drover/agents/n1/x", "/drover/agents/"), None);
        assert_eq!(node_of(b"/drover/api/state", "/drover/agents/"), None);
    }
}
