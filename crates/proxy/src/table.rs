//! The routing table: an immutable picture of listeners, routes and services that requests
//! read without locks, and its builder, which carries endpoint state from one table to the
//! next.
//!
//! A table is built off the hot path for every accepted configuration and published with one
//! atomic swap. Endpoint state (counters, in-flight requests, idle upstream connections) lives
//! in `Arc<EndpointState>`s keyed by service and address; the builder hands the same `Arc` to
//! every table in which that endpoint still appears, so a rebuild resets nothing. A service
//! whose spec did not change keeps its very `Service` (and so its round-robin position).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use drover_balance::{Picker, StickTable};
use drover_model::{Effective, ListenerSpec, ServiceSpec, StickyMode};

use crate::pool::EndpointState;
use crate::stats::{ListenerStats, RouteStats, ServiceStats};
use crate::upstream::Upstream;

/// Everything a request needs to find where it goes.
#[derive(Debug, Default)]
pub struct RoutingTable {
    pub effective: Arc<Effective>,
    listeners: Vec<ListenerRoutes>,
    services: HashMap<String, Arc<Service>>,
}

impl RoutingTable {
    /// How long draining connections and tunnels may run on (`global.shutdown_grace`).
    pub fn shutdown_grace(&self) -> std::time::Duration {
        self.effective.config.global.shutdown_grace.get()
    }

    /// The listener bound to `addr`, if the table still has one there.
    #[inline]
    pub fn listener(&self, addr: SocketAddr) -> Option<&ListenerRoutes> {
        self.listeners.iter().find(|l| l.spec.listen == addr)
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// Every listener, in the configuration's order.
    pub fn listeners(&self) -> impl Iterator<Item = &ListenerRoutes> {
        self.listeners.iter()
    }
}

/// One listener's settings and routes.
#[derive(Debug)]
pub struct ListenerRoutes {
    pub spec: ListenerSpec,
    /// Its connection and request counters.
    pub stats: Arc<ListenerStats>,
    /// The HTTP server settings its connections are served with, made from its spec.
    pub server: Arc<crate::conn::ServerSettings>,
    router: Router,
    /// The counters of its routes, in the configuration's order.
    routes: Vec<Arc<RouteStats>>,
}

impl ListenerRoutes {
    /// The route for a request to `host` (without port, any case) and `path`.
    #[inline]
    pub fn route(&self, host: &str, path: &str) -> Option<&Route> {
        self.router.route(host, path)
    }

    /// The counters of each of its routes.
    pub fn routes(&self) -> &[Arc<RouteStats>] {
        &self.routes
    }
}

/// Routes of one listener, grouped by host. Within a group, the longest matching path prefix
/// wins. An exact host is tried first, then wildcard hosts (longest suffix first), then routes
/// without a host; a group that has no matching prefix falls through to the next, as Traefik
/// does with its rule priorities.
#[derive(Debug, Default)]
struct Router {
    exact: HashMap<String, Vec<Route>>,
    /// `(".example.com", routes)`, longest suffix first.
    wildcard: Vec<(String, Vec<Route>)>,
    any: Vec<Route>,
}

/// Where a route sends its requests, and its counters.
#[derive(Debug)]
pub struct Route {
    prefix: String,
    pub service: Arc<Service>,
    pub stats: Arc<RouteStats>,
    /// Its header rules, ready to apply; None when it has none.
    pub headers: Option<Arc<HeaderRules>>,
    /// The largest request body it accepts, in bytes; None: no limit.
    pub max_request_body: Option<u64>,
}

/// A route's header rules with names and values parsed once, at build time.
#[derive(Debug, Default)]
pub struct HeaderRules {
    pub request: Rules,
    pub response: Rules,
}

/// `remove`, then `set`, then `add`.
#[derive(Debug, Default)]
pub struct Rules {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl Rules {
    /// Names and values that do not parse were refused by validation; any left are skipped.
    fn compile(spec: &drover_model::HeaderRules) -> Rules {
        let pair = |(n, v): (&String, &String)| {
            Some((
                HeaderName::from_bytes(n.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        };
        Rules {
            remove: spec
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
            set: spec.set.iter().filter_map(pair).collect(),
            add: spec.add.iter().filter_map(pair).collect(),
        }
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

impl Router {
    fn insert(
        &mut self,
        host: Option<&str>,
        prefix: &str,
        service: Arc<Service>,
        stats: Arc<RouteStats>,
        headers: Option<Arc<HeaderRules>>,
        max_request_body: Option<u64>,
    ) {
        let group = match host {
            None => &mut self.any,
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => {
                    let i = match self.wildcard.iter().position(|(s, _)| s == suffix) {
                        Some(i) => i,
                        None => {
                            self.wildcard.push((suffix.to_string(), Vec::new()));
                            self.wildcard.len() - 1
                        }
                    };
                    &mut self.wildcard[i].1
                }
                None => self.exact.entry(h.to_string()).or_default(),
            },
        };
        group.push(Route {
            prefix: prefix.to_string(),
            service,
            stats,
            headers,
            max_request_body,
        });
        group.sort_by_key(|p| std::cmp::Reverse(p.prefix.len()));
        self.wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
    }

    fn route(&self, host: &str, path: &str) -> Option<&Route> {
        fn longest<'a>(group: &'a [Route], path: &str) -> Option<&'a Route> {
            group.iter().find(|p| path.starts_with(p.prefix.as_str()))
        }
        if !self.exact.is_empty() || !self.wildcard.is_empty() {
            let lower;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = host.to_ascii_lowercase();
                lower.as_str()
            } else {
                host
            };
            if let Some(s) = self.exact.get(host).and_then(|g| longest(g, path)) {
                return Some(s);
            }
            for (suffix, group) in &self.wildcard {
                if host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && let Some(s) = longest(group, path)
                {
                    return Some(s);
                }
            }
        }
        longest(&self.any, path)
    }
}

/// A service as requests see it: its settings, its endpoints and its picker.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub spec: ServiceSpec,
    /// In the order of `spec.endpoints`; the picker returns indexes into it.
    pub endpoints: Vec<Arc<EndpointState>>,
    pub(crate) picker: Picker,
    pub(crate) budget: RetryBudget,
    /// The sticky cookie's value for each endpoint.
    pub(crate) cookie_values: Vec<String>,
    /// Client IP hash → endpoint, for `sticky.mode = "source_ip"`; kept across rebuilds.
    stick: Option<Arc<StickTable>>,
    /// Endpoint address hash → index, to read the stick table back.
    by_id: HashMap<u32, usize>,
    /// Whether the last pick found no available endpoint and served an unavailable one.
    panic: AtomicBool,
    /// Retries made since this service was last rebuilt.
    pub(crate) retries: AtomicU64,
    /// Counters that outlive rebuilds.
    pub stats: Arc<ServiceStats>,
    /// How its endpoints are reached: TLS config and HTTP version, made once at build time
    /// and kept while they do not change.
    pub upstream: Arc<Upstream>,
}

/// Slots in a service's source-IP stick table: 64 Ki clients (HAProxy users write sizes
/// such as `size 100k`); a client whose slot another one took is balanced afresh.
const STICK_TABLE_SLOTS: usize = 1 << 16;

fn endpoint_id(address: SocketAddr) -> u32 {
    drover_balance::hash_bytes(address.to_string().as_bytes()) as u32
}

impl Service {
    /// Records whether a pick had to serve an unavailable endpoint, logging each change.
    pub(crate) fn note_panic(&self, panic: bool) {
        if self.panic.load(Ordering::Relaxed) != panic
            && self.panic.swap(panic, Ordering::Relaxed) != panic
        {
            if panic {
                tracing::warn!(service = %self.name, "panic mode: no endpoint is healthy, so all of them are served");
            } else {
                tracing::info!(service = %self.name, "panic mode over: healthy endpoints serve again");
            }
        }
    }

    /// Retries made since the service's settings or endpoints last changed.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Whether the service is in panic mode now.
    pub fn in_panic(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }

    /// The endpoint the stick table holds for a client, if it still has it.
    pub(crate) fn remembered(&self, client: u64) -> Option<usize> {
        let table = self.stick.as_ref()?;
        let id = table.get(client, now_secs())?;
        self.by_id.get(&id).copied()
    }

    /// Holds `index` for a client for the sticky expiry.
    pub(crate) fn remember(&self, client: u64, index: usize) {
        if let (Some(table), Some(sticky)) = (&self.stick, &self.spec.sticky) {
            let expire = sticky.expire.get().as_secs() as u32;
            let id = endpoint_id(self.endpoints[index].address);
            table.put(client, id, now_secs().saturating_add(expire));
        }
    }
}

fn now_secs() -> u32 {
    (crate::health::now_ms() / 1000) as u32
}

/// Retries a service may make: each request adds `budget_percent` of a retry, each retry
/// takes one, and an allowance of [`RETRY_ALLOWANCE`] lets a quiet service retry at all.
/// Lock-free: a counter of thousandths of a retry.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    milli: AtomicI64,
    per_request: i64,
}

/// Retries a service can make before requests have earned any.
const RETRY_ALLOWANCE: i64 = 10;

impl RetryBudget {
    fn new(percent: u32) -> Self {
        Self {
            milli: AtomicI64::new(RETRY_ALLOWANCE * 1000),
            per_request: i64::from(percent) * 10,
        }
    }

    /// A request arrived.
    pub(crate) fn deposit(&self) {
        let cap = RETRY_ALLOWANCE * 1000;
        if self.per_request > 0 && self.milli.load(Ordering::Relaxed) < cap {
            self.milli.fetch_add(self.per_request, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget, if it has one.
    pub(crate) fn withdraw(&self) -> bool {
        self.milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                (m >= 1000).then_some(m - 1000)
            })
            .is_ok()
    }
}

/// Builds tables, carrying endpoint state and unchanged services from the last one.
#[derive(Debug, Default)]
pub struct TableBuilder {
    endpoints: HashMap<(String, SocketAddr), Arc<EndpointState>>,
    services: HashMap<String, Arc<Service>>,
    /// By listener name and address.
    listeners: HashMap<(String, SocketAddr), Arc<ListenerStats>>,
    routes: HashMap<RouteKey, Arc<RouteStats>>,
}

/// A route's identity for its counters: listener, host, path prefix and service.
type RouteKey = (String, Option<String>, String, String);

/// A table ready to publish, with the builder state to keep if it is published.
#[derive(Debug)]
pub struct Built {
    pub table: RoutingTable,
    next: TableBuilder,
}

impl TableBuilder {
    /// Builds the table for a validated configuration. Nothing changes in `self` until the
    /// result is [`commit`](Self::commit)ted, so a table that is never published leaves no
    /// trace. A service whose TLS settings cannot be used (its CA bundle cannot be read)
    /// fails the build with a message that names it.
    pub fn build(&self, effective: &Arc<Effective>) -> Result<Built, String> {
        let config = &effective.config;
        let mut next = TableBuilder::default();
        for (name, spec) in &config.services {
            if let Some(old) = self.services.get(name)
                && old.spec == *spec
            {
                for e in &old.endpoints {
                    next.endpoints.insert((name.clone(), e.address), e.clone());
                }
                next.services.insert(name.clone(), old.clone());
                continue;
            }
            let upstream = match self.services.get(name) {
                Some(old) if old.upstream.same_settings(spec) => old.upstream.clone(),
                _ => Arc::new(Upstream::new(name, spec)?),
            };
            let endpoints: Vec<Arc<EndpointState>> = spec
                .endpoints
                .iter()
                .map(|e| {
                    let key = (name.clone(), e.address);
                    let state = self.endpoints.get(&key).cloned().unwrap_or_else(|| {
                        let fresh = EndpointState::new(e.address);
                        if spec.wait_for_first_check && spec.health_check.is_some() {
                            fresh.health.wait_for_first_check();
                        }
                        Arc::new(fresh)
                    });
                    state.health.set_slow_start(spec.slow_start.get());
                    next.endpoints.insert(key, state.clone());
                    state
                })
                .collect();
            // Drained and disabled endpoints stay in the list, so that their requests in
            // flight finish and their counters show, but get no turn.
            let weights: Vec<u32> = spec
                .endpoints
                .iter()
                .map(|e| if e.state.is_enabled() { e.weight } else { 0 })
                .collect();
            let stick = spec
                .sticky
                .as_ref()
                .filter(|st| st.mode == StickyMode::SourceIp)
                .map(|_| {
                    self.services
                        .get(name)
                        .and_then(|old| old.stick.clone())
                        .unwrap_or_else(|| Arc::new(StickTable::new(STICK_TABLE_SLOTS)))
                });
            next.services.insert(
                name.clone(),
                Arc::new(Service {
                    name: name.clone(),
                    spec: spec.clone(),
                    // Identities keep consistent hashing's keys in place when other endpoints
                    // come or go, wherever they sit in the list.
                    picker: Picker::with_identities(
                        spec.policy,
                        &weights,
                        &endpoints
                            .iter()
                            .map(|e| drover_balance::hash_bytes(e.address.to_string().as_bytes()))
                            .collect::<Vec<_>>(),
                    ),
                    budget: RetryBudget::new(spec.retries.budget_percent),
                    cookie_values: endpoints
                        .iter()
                        .map(|e| crate::forward::cookie_value(e.address))
                        .collect(),
                    by_id: endpoints
                        .iter()
                        .enumerate()
                        .map(|(i, e)| (endpoint_id(e.address), i))
                        .collect(),
                    stick,
                    panic: AtomicBool::new(false),
                    retries: AtomicU64::new(0),
                    stats: self
                        .services
                        .get(name)
                        .map(|old| old.stats.clone())
                        .unwrap_or_default(),
                    upstream,
                    endpoints,
                }),
            );
        }
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let mut router = Router::default();
                let mut routes = Vec::new();
                for r in config.routes.iter().filter(|r| r.listener == l.name) {
                    // Validation guarantees the service exists.
                    if let Some(service) = next.services.get(&r.service) {
                        let prefix = r.path_prefix.as_deref().unwrap_or("/");
                        let key = (
                            l.name.clone(),
                            r.host.clone(),
                            prefix.to_string(),
                            r.service.clone(),
                        );
                        let stats = self.routes.get(&key).cloned().unwrap_or_else(|| {
                            Arc::new(RouteStats::new(
                                &l.name,
                                r.host.as_deref(),
                                prefix,
                                &r.service,
                            ))
                        });
                        next.routes.insert(key, stats.clone());
                        routes.push(stats.clone());
                        let headers = (!r.request_headers.is_empty()
                            || !r.response_headers.is_empty())
                        .then(|| {
                            Arc::new(HeaderRules {
                                request: Rules::compile(&r.request_headers),
                                response: Rules::compile(&r.response_headers),
                            })
                        });
                        router.insert(
                            r.host.as_deref(),
                            prefix,
                            service.clone(),
                            stats,
                            headers,
                            r.max_request_body,
                        );
                    }
                }
                let key = (l.name.clone(), l.listen);
                let stats = self
                    .listeners
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(ListenerStats::new(&l.name, l.listen)));
                next.listeners.insert(key, stats.clone());
                ListenerRoutes {
                    server: Arc::new(crate::conn::server_builder(l)),
                    spec: l.clone(),
                    stats,
                    router,
                    routes,
                }
            })
            .collect();
        Ok(Built {
            table: RoutingTable {
                effective: effective.clone(),
                listeners,
                services: next.services.clone(),
            },
            next,
        })
    }

    /// Keeps the state of a table that was published.
    pub fn commit(&mut self, built: Built) -> RoutingTable {
        *self = built.next;
        built.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::{Config, EndpointSpec, RouteSpec};

    fn effective(config: Config) -> Arc<Effective> {
        Arc::new(Effective {
            config,
            ..Default::default()
        })
    }

    fn config() -> Config {
        let mut c = Config::embedded_default("127.0.0.1:8080".parse().unwrap());
        for name in ["api", "www", "wild"] {
            c.services.insert(name.into(), ServiceSpec::default());
        }
        let route = |host: Option<&str>, prefix: Option<&str>, service: &str| RouteSpec {
            host: host.map(Into::into),
            path_prefix: prefix.map(Into::into),
            ..RouteSpec::new("default", service)
        };
        c.routes
            .push(route(Some("example.com"), Some("/api"), "api"));
        c.routes.push(route(Some("example.com"), None, "www"));
        c.routes.push(route(Some("*.example.com"), None, "wild"));
        c
    }

    #[test]
    fn host_then_longest_prefix_then_fallback() {
        let mut b = TableBuilder::default();
        let built = b.build(&effective(config())).unwrap();
        let t = b.commit(built);
        let l = t.listener("127.0.0.1:8080".parse().unwrap()).unwrap();
        let to = |host, path| l.route(host, path).map(|r| r.service.name.as_str());
        assert_eq!(to("example.com", "/api/users"), Some("api"));
        assert_eq!(
            to("EXAMPLE.com", "/apix"),
            Some("api"),
            "prefixes match bytes, hosts any case"
        );
        assert_eq!(to("example.com", "/"), Some("www"));
        assert_eq!(to("a.example.com", "/api"), Some("wild"));
        assert_eq!(to("example.org", "/api"), Some("default"));
        assert!(t.listener("127.0.0.1:9".parse().unwrap()).is_none());
    }

    #[test]
    fn endpoint_state_survives_a_rebuild_and_unchanged_services_are_kept() {
        let mut c = config();
        let ep = |a: &str| EndpointSpec::new(a.parse().unwrap(), 1);
        c.services.get_mut("api").unwrap().endpoints = vec![ep("127.0.0.1:1"), ep("127.0.0.1:2")];
        let mut b = TableBuilder::default();
        let built = b.build(&effective(c.clone())).unwrap();
        let t1 = b.commit(built);
        let first = t1.service("api").unwrap().endpoints[1].clone();

        c.services.get_mut("api").unwrap().endpoints.remove(0);
        let built = b.build(&effective(c.clone())).unwrap();
        let t2 = b.commit(built);
        assert!(Arc::ptr_eq(
            &t2.service("api").unwrap().endpoints[0],
            &first
        ));
        assert!(Arc::ptr_eq(
            t1.service("www").unwrap(),
            t2.service("www").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            t1.service("api").unwrap(),
            t2.service("api").unwrap()
        ));
    }

    #[test]
    fn listener_route_and_service_counters_survive_a_rebuild() {
        let mut c = config();
        let mut b = TableBuilder::default();
        let built = b.build(&effective(c.clone())).unwrap();
        let t1 = b.commit(built);
        let addr = "127.0.0.1:8080".parse().unwrap();
        let l1 = t1.listener(addr).unwrap();
        let api1 = l1.route("example.com", "/api").unwrap();
        assert_eq!(api1.stats.route, "example.com/api");
        assert_eq!(l1.routes().len(), 4);

        // The service `api` changes (a new endpoint) and the route to `www` moves to `wild`.
        c.services.get_mut("api").unwrap().endpoints =
            vec![EndpointSpec::new("127.0.0.1:1".parse().unwrap(), 1)];
        let www = c.routes.iter_mut().find(|r| r.service == "www").unwrap();
        www.service = "wild".into();
        let built = b.build(&effective(c)).unwrap();
        let t2 = b.commit(built);
        let l2 = t2.listener(addr).unwrap();
        assert!(Arc::ptr_eq(&l1.stats, &l2.stats));
        let api2 = l2.route("example.com", "/api").unwrap();
        assert!(!Arc::ptr_eq(&api1.service, &api2.service), "rebuilt");
        assert!(
            Arc::ptr_eq(&api1.stats, &api2.stats),
            "same route, same counters"
        );
        assert!(Arc::ptr_eq(&api1.service.stats, &api2.service.stats));
        let moved = l2.route("example.com", "/").unwrap();
        assert_eq!(moved.stats.service, "wild");
        assert!(
            !Arc::ptr_eq(&l1.route("example.com", "/").unwrap().stats, &moved.stats),
            "a route to another service counts afresh"
        );
    }

    #[test]
    fn a_build_that_is_not_committed_leaves_no_trace() {
        let mut c = config();
        c.services.get_mut("api").unwrap().endpoints =
            vec![EndpointSpec::new("127.0.0.1:1".parse().unwrap(), 1)];
        let b = TableBuilder::default();
        let _ = b.build(&effective(c)).unwrap();
        assert!(b.endpoints.is_empty() && b.services.is_empty());
        assert!(b.listeners.is_empty() && b.routes.is_empty());
    }
}
