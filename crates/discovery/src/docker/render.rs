//! From containers to the slice of configuration the Docker source owns.
//!
//! Containers sharing a publish address, host and path form one service; each publish address
//! gets one listener. A container that cannot be placed (bad labels, no address, a port or
//! service name another source owns, a port that cannot be bound) is left out with a warning
//! that names it, and the rest goes on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use drover_model::{
    AdminState, Config, Effective, EndpointSpec, ListenerSpec, RouteSpec, ServiceSpec, SourceId,
    Sticky,
};

use super::labels::Wanted;
use super::{Container, Serving};

/// What the source sends, with the log lines and warnings that describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub config: Config,
    /// docker-loadbalancer's description of its backends, one line each.
    pub lines: Vec<String>,
    /// Containers left out, and why.
    pub warnings: Vec<String>,
}

/// Renders the containers. `effective` is the configuration in force: the `[docker]` section
/// and what the other sources own. `own_listens` are the listen addresses of the source's
/// last accepted snapshot, which need no check; `can_bind` tells whether a new one is free.
pub fn render(
    containers: &BTreeMap<String, Container>,
    effective: &Effective,
    own: &SourceId,
    own_listens: &[SocketAddr],
    can_bind: &dyn Fn(SocketAddr) -> Result<(), String>,
) -> Rendered {
    let template = &effective.config.docker.defaults;
    let theirs = |name: &str, sources: &BTreeMap<String, SourceId>| {
        sources.get(name).filter(|s| *s != own).cloned()
    };
    let mut ours_bound: BTreeSet<SocketAddr> = own_listens.iter().copied().collect();
    for l in &effective.config.listeners {
        if theirs(&l.name, &effective.listener_sources).is_none() {
            ours_bound.insert(l.listen);
        }
    }
    // The `[docker]` section is the file's: the source reads it and leaves it at its default.
    let mut config = Config::default();
    let mut warnings = Vec::new();
    // Service name -> (the container that set it up, its labels).
    let mut owners: BTreeMap<String, (String, Wanted)> = BTreeMap::new();
    let mut refused: BTreeMap<SocketAddr, String> = BTreeMap::new();

    let mut sorted: Vec<&Container> = containers.values().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for c in sorted {
        let left_out = |why: String| format!("container {} left out: {why}", c.name);
        let (wanted, address) = match &c.spec {
            Ok((w, a)) => (w, *a),
            Err(why) => {
                warnings.push(left_out(why.clone()));
                continue;
            }
        };
        if let Some(l) = effective.config.listeners.iter().find(|l| {
            theirs(&l.name, &effective.listener_sources).is_some() && clash(l.listen, wanted.listen)
        }) {
            let source = &effective.listener_sources[&l.name];
            warnings.push(left_out(format!(
                "its publish address {} is listener {:?}'s ({}), which {source} defines; publish another port",
                wanted.listen, l.name, l.listen
            )));
            continue;
        }
        if !ours_bound.contains(&wanted.listen)
            && !config.listeners.iter().any(|l| l.listen == wanted.listen)
        {
            if let Some(why) = refused.get(&wanted.listen) {
                warnings.push(left_out(why.clone()));
                continue;
            }
            if let Err(e) = can_bind(wanted.listen) {
                let why = format!("cannot listen on {}: {e}", wanted.listen);
                refused.insert(wanted.listen, why.clone());
                warnings.push(left_out(why));
                continue;
            }
        }
        let service = wanted
            .service
            .clone()
            .unwrap_or_else(|| service_name(wanted));
        if let Some(source) = theirs(&service, &effective.service_sources) {
            warnings.push(left_out(format!(
                "service {service:?} is defined by {source}; name this one with drover.service"
            )));
            continue;
        }
        let listener = listener_name(wanted.listen);
        if let Some((first, theirs)) = owners.get(&service) {
            if (theirs.listen, &theirs.host, &theirs.path)
                != (wanted.listen, &wanted.host, &wanted.path)
            {
                warnings.push(left_out(format!(
                    "service {service:?} is published by {first} on another address, host or path; give this one its own drover.service"
                )));
                continue;
            }
            if theirs.protocol != wanted.protocol {
                warnings.push(left_out(format!(
                    "it asks for {} on {}, which {first} publishes as {}",
                    wanted.protocol, wanted.listen, theirs.protocol
                )));
                continue;
            }
            if !same_service_settings(theirs, wanted) {
                warnings.push(format!(
                    "container {}: its policy, stickiness or health check labels differ from {first}'s, which set up service {service:?}; {first}'s apply",
                    c.name
                ));
            }
        } else {
            if let Some(r) = config.routes.iter().find(|r| {
                r.listener == listener && r.host == wanted.host && r.path_prefix == wanted.path
            }) {
                warnings.push(left_out(format!(
                    "service {:?} already takes {} with the same host and path; give both the same drover.service, or another drover.host or drover.path",
                    r.service, wanted.listen
                )));
                continue;
            }
            if let Some(l) = config.listeners.iter().find(|l| l.name == listener)
                && l.protocol != wanted.protocol
            {
                warnings.push(left_out(format!(
                    "it asks for a {} listener on {}, which other containers publish as {}",
                    wanted.protocol, wanted.listen, l.protocol
                )));
                continue;
            }
            if !config.listeners.iter().any(|l| l.name == listener) {
                config.listeners.push(ListenerSpec::new(
                    listener.clone(),
                    wanted.listen,
                    wanted.protocol,
                ));
            }
            config.routes.push(RouteSpec {
                host: wanted.host.clone(),
                path_prefix: wanted.path.clone(),
                ..RouteSpec::new(listener.clone(), service.clone())
            });
            config
                .services
                .insert(service.clone(), service_spec(template, wanted));
            owners.insert(service.clone(), (c.name.clone(), wanted.clone()));
        }
        let spec = config.services.get_mut(&service).expect("inserted above");
        if let Some(other) = spec.endpoints.iter().position(|e| e.address == address) {
            warnings.push(left_out(format!(
                "its address {address} is already endpoint {other} of service {service:?}"
            )));
            continue;
        }
        spec.endpoints.push(EndpointSpec {
            address,
            weight: wanted.weight,
            state: match c.serving {
                Serving::Yes => AdminState::Enabled,
                Serving::Stopping => AdminState::Drain,
                Serving::Starting | Serving::Unhealthy | Serving::Paused => AdminState::Disabled,
            },
        });
    }
    let lines = describe(&config, containers);
    Rendered {
        config,
        lines,
        warnings,
    }
}

/// docker-loadbalancer's log of its backends: the ports it publishes, then each backend.
fn describe(config: &Config, containers: &BTreeMap<String, Container>) -> Vec<String> {
    let by_address: BTreeMap<SocketAddr, (&str, Serving)> = containers
        .values()
        .filter_map(|c| Some((c.spec.as_ref().ok()?.1, (c.name.as_str(), c.serving))))
        .collect();
    let mut lines = Vec::new();
    for l in &config.listeners {
        let port = if l.listen.ip().is_unspecified() && l.listen.is_ipv4() {
            l.listen.port().to_string()
        } else {
            l.listen.to_string()
        };
        lines.push(format!("Publish port {port} {}", l.protocol));
        for r in config.routes.iter().filter(|r| r.listener == l.name) {
            let mut route = format!("Service {}", r.service);
            if let Some(h) = &r.host {
                route += &format!(" for host {h}");
            }
            if let Some(p) = &r.path_prefix {
                route += &format!(" under {p}");
            }
            lines.push(route);
            for e in &config.services[&r.service].endpoints {
                let (name, serving) = by_address
                    .get(&e.address)
                    .copied()
                    .unwrap_or(("?", Serving::Yes));
                let note = match serving {
                    Serving::Yes => "",
                    Serving::Stopping => " (stopping: draining)",
                    Serving::Starting => " (starting: no traffic until its port takes connections)",
                    Serving::Unhealthy => " (not healthy: no traffic)",
                    Serving::Paused => " (paused: no traffic)",
                };
                lines.push(format!(
                    "Backend {name} at {}, port {}{note}",
                    e.address.ip(),
                    e.address.port()
                ));
            }
        }
    }
    lines
}

/// The template with a container's labels applied.
fn service_spec(template: &ServiceSpec, w: &Wanted) -> ServiceSpec {
    let mut spec = ServiceSpec {
        endpoints: Vec::new(),
        ..template.clone()
    };
    if let Some(p) = w.policy {
        spec.policy = p;
    }
    if let Some(sticky) = w.sticky {
        spec.sticky = sticky.map(|mode| Sticky {
            mode,
            cookie: template
                .sticky
                .as_ref()
                .map_or_else(drover_model::traffic::defaults::sticky_cookie, |s| {
                    s.cookie.clone()
                }),
            expire: template
                .sticky
                .as_ref()
                .map_or_else(drover_model::traffic::defaults::sticky_expire, |s| s.expire),
        });
    }
    if w.check_path.is_some() || w.check_interval.is_some() {
        let mut check = template.health_check.clone().unwrap_or_default();
        if let Some(p) = &w.check_path {
            check.path = p.clone();
        }
        if let Some(i) = w.check_interval {
            check.interval = i;
        }
        spec.health_check = Some(check);
    }
    spec
}

fn same_service_settings(a: &Wanted, b: &Wanted) -> bool {
    let template = ServiceSpec::default();
    service_spec(&template, a) == service_spec(&template, b)
}

/// `docker-80`; with an IP, `docker-127.0.0.1-80`; IPv6 colons become `_`.
pub fn listener_name(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() && listen.is_ipv4() {
        format!("docker-{}", listen.port())
    } else {
        let ip = listen.ip().to_string().replace(':', "_");
        format!("docker-{ip}-{}", listen.port())
    }
}

/// The listener's name, then the host and path when given: `docker-80-api.example.com-v1`.
fn service_name(w: &Wanted) -> String {
    let mut name = listener_name(w.listen);
    for part in [w.host.as_deref(), w.path.as_deref()].into_iter().flatten() {
        let part: String = part
            .trim_matches('/')
            .chars()
            .map(|c| match c {
                '*' => 'x',
                c if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' => c,
                _ => '-',
            })
            .collect();
        if !part.is_empty() {
            name = format!("{name}-{part}");
        }
    }
    name.truncate(128);
    name
}

/// Two listen addresses on one port where one covers the other.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::labels;
    use drover_model::{Policy, Protocol, StickyMode};
    use std::collections::HashMap;

    fn container(name: &str, ip: &str, pairs: &[(&str, &str)], serving: Serving) -> Container {
        let labels: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let spec = labels::parse(&labels).map_err(|e| e.to_string()).map(|w| {
            let w = w.expect("enabled");
            let port = w.target.unwrap_or(80);
            (w, SocketAddr::new(ip.parse().unwrap(), port))
        });
        Container {
            id: format!("id-{name}"),
            name: name.into(),
            spec,
            serving,
            has_healthcheck: false,
        }
    }

    fn all(cs: Vec<Container>) -> BTreeMap<String, Container> {
        cs.into_iter().map(|c| (c.id.clone(), c)).collect()
    }

    fn free(_: SocketAddr) -> Result<(), String> {
        Ok(())
    }

    const SEED: &[(&str, &str)] = &[
        ("lb.enable", "Y"),
        ("lb.publish", "80"),
        ("lb.target", "80"),
    ];

    #[test]
    fn containers_sharing_a_publish_port_form_one_service_with_the_seeds_defaults() {
        let r = render(
            &all(vec![
                container("web1", "172.17.0.2", SEED, Serving::Yes),
                container("web2", "172.17.0.3", SEED, Serving::Yes),
            ]),
            &Effective::default(),
            &SourceId("docker".into()),
            &[],
            &free,
        );
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.config.listeners.len(), 1);
        assert_eq!(r.config.listeners[0].name, "docker-80");
        let s = &r.config.services["docker-80"];
        assert_eq!(s.policy, Policy::LeastConn);
        assert_eq!(
            s.sticky.as_ref().map(|s| s.mode),
            Some(StickyMode::SourceIp)
        );
        assert_eq!(s.compression, Some(drover_model::Compression::default()));
        let addrs: Vec<String> = s.endpoints.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["172.17.0.2:80", "172.17.0.3:80"]);
        assert_eq!(
            r.lines,
            [
                "Publish port 80 http",
                "Service docker-80",
                "Backend web1 at 172.17.0.2, port 80",
                "Backend web2 at 172.17.0.3, port 80",
            ]
        );
        drover_model::validate(&r.config).expect("valid");
    }

    #[test]
    fn stopping_unhealthy_and_paused_containers_take_no_new_requests() {
        let r = render(
            &all(vec![
                container("a", "10.0.0.1", SEED, Serving::Stopping),
                container("b", "10.0.0.2", SEED, Serving::Unhealthy),
                container("c", "10.0.0.3", SEED, Serving::Paused),
                container("d", "10.0.0.4", SEED, Serving::Yes),
            ]),
            &Effective::default(),
            &SourceId("docker".into()),
            &[],
            &free,
        );
        let states: Vec<AdminState> = r.config.services["docker-80"]
            .endpoints
            .iter()
            .map(|e| e.state)
            .collect();
        assert_eq!(
            states,
            [
                AdminState::Drain,
                AdminState::Disabled,
                AdminState::Disabled,
                AdminState::Enabled
            ]
        );
        assert!(r.lines.iter().any(|l| l.ends_with("(stopping: draining)")));
    }

    #[test]
    fn hosts_share_a_port_and_labels_override_the_template() {
        let mut effective = Effective::default();
        effective.config.docker.defaults = ServiceSpec::default();
        let r = render(
            &all(vec![
                container(
                    "api",
                    "10.0.0.1",
                    &[
                        ("lb.enable", "Y"),
                        ("lb.publish", "80"),
                        ("drover.host", "api.example.com"),
                        ("drover.policy", "random"),
                        ("drover.healthcheck.path", "/healthz"),
                    ],
                    Serving::Yes,
                ),
                container(
                    "www",
                    "10.0.0.2",
                    &[
                        ("lb.enable", "Y"),
                        ("lb.publish", "80"),
                        ("drover.host", "www.example.com"),
                    ],
                    Serving::Yes,
                ),
            ]),
            &effective,
            &SourceId("docker".into()),
            &[],
            &free,
        );
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.config.listeners.len(), 1);
        let api = &r.config.services["docker-80-api.example.com"];
        assert_eq!(api.policy, Policy::Random);
        assert_eq!(api.health_check.as_ref().unwrap().path, "/healthz");
        let www = &r.config.services["docker-80-www.example.com"];
        assert_eq!(www.policy, Policy::RoundRobin, "the file's template");
        drover_model::validate(&r.config).expect("valid");
    }

    #[test]
    fn bad_containers_are_left_out_by_name_and_the_rest_goes_on() {
        let mut effective = Effective::default();
        effective.config.listeners.push(ListenerSpec::new(
            "web",
            "0.0.0.0:8080".parse().unwrap(),
            Protocol::Http,
        ));
        effective
            .listener_sources
            .insert("web".into(), SourceId("file:/etc/drover.toml".into()));
        let busy = |a: SocketAddr| {
            if a.port() == 9999 {
                Err("address in use".to_string())
            } else {
                Ok(())
            }
        };
        let r = render(
            &all(vec![
                container(
                    "bad",
                    "10.0.0.1",
                    &[("lb.enable", "Y"), ("lb.publish", "x")],
                    Serving::Yes,
                ),
                container(
                    "clash",
                    "10.0.0.2",
                    &[("lb.enable", "Y"), ("lb.publish", "8080")],
                    Serving::Yes,
                ),
                container(
                    "taken",
                    "10.0.0.3",
                    &[("lb.enable", "Y"), ("lb.publish", "9999")],
                    Serving::Yes,
                ),
                container("good", "10.0.0.4", SEED, Serving::Yes),
            ]),
            &effective,
            &SourceId("docker".into()),
            &[],
            &busy,
        );
        assert_eq!(r.config.services.len(), 1);
        assert_eq!(r.config.services["docker-80"].endpoints.len(), 1);
        let w = r.warnings.join("\n");
        assert!(
            w.contains("container bad left out: label lb.publish=\"x\""),
            "{w}"
        );
        assert!(
            w.contains(
                "container clash left out: its publish address 0.0.0.0:8080 is listener \"web\""
            ),
            "{w}"
        );
        assert!(
            w.contains("container taken left out: cannot listen on 0.0.0.0:9999: address in use"),
            "{w}"
        );
    }
}
