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

use drover_balance::RoundRobin;
use drover_model::{Effective, ListenerSpec, ServiceSpec};

use crate::pool::EndpointState;

/// Everything a request needs to find where it goes.
#[derive(Debug, Default)]
pub struct RoutingTable {
    pub effective: Arc<Effective>,
    listeners: Vec<ListenerRoutes>,
    services: HashMap<String, Arc<Service>>,
}

impl RoutingTable {
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
}

/// One listener's settings and routes.
#[derive(Debug)]
pub struct ListenerRoutes {
    pub spec: ListenerSpec,
    router: Router,
}

impl ListenerRoutes {
    /// The service for a request to `host` (without port, any case) and `path`.
    #[inline]
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Service>> {
        self.router.route(host, path)
    }
}

/// Routes of one listener, grouped by host. Within a group, the longest matching path prefix
/// wins. An exact host is tried first, then wildcard hosts (longest suffix first), then routes
/// without a host; a group that has no matching prefix falls through to the next, as Traefik
/// does with its rule priorities.
#[derive(Debug, Default)]
struct Router {
    exact: HashMap<String, Vec<Prefix>>,
    /// `(".example.com", routes)`, longest suffix first.
    wildcard: Vec<(String, Vec<Prefix>)>,
    any: Vec<Prefix>,
}

#[derive(Debug)]
struct Prefix {
    prefix: String,
    service: Arc<Service>,
}

impl Router {
    fn insert(&mut self, host: Option<&str>, prefix: &str, service: Arc<Service>) {
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
        group.push(Prefix {
            prefix: prefix.to_string(),
            service,
        });
        group.sort_by_key(|p| std::cmp::Reverse(p.prefix.len()));
        self.wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
    }

    fn route(&self, host: &str, path: &str) -> Option<&Arc<Service>> {
        fn longest<'a>(group: &'a [Prefix], path: &str) -> Option<&'a Arc<Service>> {
            group
                .iter()
                .find(|p| path.starts_with(p.prefix.as_str()))
                .map(|p| &p.service)
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
    picker: RoundRobin,
}

impl Service {
    /// The endpoint for the next request.
    #[inline]
    pub fn pick(&self) -> Option<&Arc<EndpointState>> {
        self.picker.pick().map(|i| &self.endpoints[i])
    }
}

/// Builds tables, carrying endpoint state and unchanged services from the last one.
#[derive(Debug, Default)]
pub struct TableBuilder {
    endpoints: HashMap<(String, SocketAddr), Arc<EndpointState>>,
    services: HashMap<String, Arc<Service>>,
}

/// A table ready to publish, with the builder state to keep if it is published.
#[derive(Debug)]
pub struct Built {
    pub table: RoutingTable,
    next: TableBuilder,
}

impl TableBuilder {
    /// Builds the table for a validated configuration. Nothing changes in `self` until the
    /// result is [`commit`](Self::commit)ted, so a table that is never published leaves no
    /// trace.
    pub fn build(&self, effective: &Arc<Effective>) -> Built {
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
            let endpoints: Vec<Arc<EndpointState>> = spec
                .endpoints
                .iter()
                .map(|e| {
                    let key = (name.clone(), e.address);
                    let state = self
                        .endpoints
                        .get(&key)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(EndpointState::new(e.address)));
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
            next.services.insert(
                name.clone(),
                Arc::new(Service {
                    name: name.clone(),
                    spec: spec.clone(),
                    endpoints,
                    picker: RoundRobin::new(&weights),
                }),
            );
        }
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let mut router = Router::default();
                for r in config.routes.iter().filter(|r| r.listener == l.name) {
                    // Validation guarantees the service exists.
                    if let Some(service) = next.services.get(&r.service) {
                        router.insert(
                            r.host.as_deref(),
                            r.path_prefix.as_deref().unwrap_or("/"),
                            service.clone(),
                        );
                    }
                }
                ListenerRoutes {
                    spec: l.clone(),
                    router,
                }
            })
            .collect();
        Built {
            table: RoutingTable {
                effective: effective.clone(),
                listeners,
                services: next.services.clone(),
            },
            next,
        }
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
            listener: "default".into(),
            host: host.map(Into::into),
            path_prefix: prefix.map(Into::into),
            service: service.into(),
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
        let built = b.build(&effective(config()));
        let t = b.commit(built);
        let l = t.listener("127.0.0.1:8080".parse().unwrap()).unwrap();
        let to = |host, path| l.route(host, path).map(|s| s.name.as_str());
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
        let built = b.build(&effective(c.clone()));
        let t1 = b.commit(built);
        let first = t1.service("api").unwrap().endpoints[1].clone();

        c.services.get_mut("api").unwrap().endpoints.remove(0);
        let built = b.build(&effective(c.clone()));
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
    fn a_build_that_is_not_committed_leaves_no_trace() {
        let mut c = config();
        c.services.get_mut("api").unwrap().endpoints =
            vec![EndpointSpec::new("127.0.0.1:1".parse().unwrap(), 1)];
        let b = TableBuilder::default();
        let _ = b.build(&effective(c));
        assert!(b.endpoints.is_empty() && b.services.is_empty());
    }
}
