//! What changed between two configurations, as a list a person can read in the log and a
//! machine can send on the change stream.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::Serialize;

use crate::{AdminState, Config, EndpointSpec, RouteSpec};

/// One difference between two configurations.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    ListenerAdded {
        name: String,
        listen: SocketAddr,
    },
    ListenerRemoved {
        name: String,
        listen: SocketAddr,
    },
    ListenerChanged {
        name: String,
    },
    RouteAdded {
        route: String,
    },
    RouteRemoved {
        route: String,
    },
    ServiceAdded {
        name: String,
    },
    ServiceRemoved {
        name: String,
    },
    ServiceSettingsChanged {
        name: String,
    },
    EndpointAdded {
        service: String,
        address: SocketAddr,
        weight: u32,
    },
    EndpointRemoved {
        service: String,
        address: SocketAddr,
    },
    EndpointWeightChanged {
        service: String,
        address: SocketAddr,
        from: u32,
        to: u32,
    },
    EndpointStateChanged {
        service: String,
        address: SocketAddr,
        from: AdminState,
        to: AdminState,
    },
    GlobalChanged,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::ListenerAdded { name, listen } => {
                write!(f, "listener {name} added on {listen}")
            }
            Change::ListenerRemoved { name, listen } => {
                write!(f, "listener {name} on {listen} removed")
            }
            Change::ListenerChanged { name } => write!(f, "listener {name} settings changed"),
            Change::RouteAdded { route } => write!(f, "route added: {route}"),
            Change::RouteRemoved { route } => write!(f, "route removed: {route}"),
            Change::ServiceAdded { name } => write!(f, "service {name} added"),
            Change::ServiceRemoved { name } => write!(f, "service {name} removed"),
            Change::ServiceSettingsChanged { name } => write!(f, "service {name} settings changed"),
            Change::EndpointAdded {
                service,
                address,
                weight,
            } => {
                write!(
                    f,
                    "service {service}: endpoint {address} added (weight {weight})"
                )
            }
            Change::EndpointRemoved { service, address } => {
                write!(f, "service {service}: endpoint {address} removed")
            }
            Change::EndpointWeightChanged {
                service,
                address,
                from,
                to,
            } => {
                write!(
                    f,
                    "service {service}: endpoint {address} weight {from} -> {to}"
                )
            }
            Change::EndpointStateChanged {
                service,
                address,
                from,
                to,
            } => {
                write!(
                    f,
                    "service {service}: endpoint {address} state {from} -> {to}"
                )
            }
            Change::GlobalChanged => f.write_str("global settings changed"),
        }
    }
}

/// Lists what differs from `old` to `new`, in a stable order: global, listeners, routes,
/// services.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut out = Vec::new();
    if old.global != new.global {
        out.push(Change::GlobalChanged);
    }

    let old_l: BTreeMap<_, _> = old.listeners.iter().map(|l| (&l.name, l)).collect();
    let new_l: BTreeMap<_, _> = new.listeners.iter().map(|l| (&l.name, l)).collect();
    for (name, l) in &old_l {
        match new_l.get(name) {
            None => out.push(Change::ListenerRemoved {
                name: l.name.clone(),
                listen: l.listen,
            }),
            Some(n) if n.listen != l.listen => {
                out.push(Change::ListenerRemoved {
                    name: l.name.clone(),
                    listen: l.listen,
                });
                out.push(Change::ListenerAdded {
                    name: n.name.clone(),
                    listen: n.listen,
                });
            }
            Some(n) if n != l => out.push(Change::ListenerChanged {
                name: l.name.clone(),
            }),
            Some(_) => {}
        }
    }
    for (name, l) in &new_l {
        if !old_l.contains_key(name) {
            out.push(Change::ListenerAdded {
                name: l.name.clone(),
                listen: l.listen,
            });
        }
    }

    let route = |r: &RouteSpec| r.to_string();
    for r in &old.routes {
        if !new.routes.contains(r) {
            out.push(Change::RouteRemoved { route: route(r) });
        }
    }
    for r in &new.routes {
        if !old.routes.contains(r) {
            out.push(Change::RouteAdded { route: route(r) });
        }
    }

    for name in old.services.keys() {
        if !new.services.contains_key(name) {
            out.push(Change::ServiceRemoved { name: name.clone() });
        }
    }
    for (name, n) in &new.services {
        let Some(o) = old.services.get(name) else {
            out.push(Change::ServiceAdded { name: name.clone() });
            for e in &n.endpoints {
                out.push(Change::EndpointAdded {
                    service: name.clone(),
                    address: e.address,
                    weight: e.weight,
                });
            }
            continue;
        };
        if !o.same_settings(n) {
            out.push(Change::ServiceSettingsChanged { name: name.clone() });
        }
        let oe: BTreeMap<_, &EndpointSpec> = o.endpoints.iter().map(|e| (e.address, e)).collect();
        let ne: BTreeMap<_, &EndpointSpec> = n.endpoints.iter().map(|e| (e.address, e)).collect();
        for (&address, from) in &oe {
            let Some(to) = ne.get(&address) else {
                out.push(Change::EndpointRemoved {
                    service: name.clone(),
                    address,
                });
                continue;
            };
            if to.weight != from.weight {
                out.push(Change::EndpointWeightChanged {
                    service: name.clone(),
                    address,
                    from: from.weight,
                    to: to.weight,
                });
            }
            if to.state != from.state {
                out.push(Change::EndpointStateChanged {
                    service: name.clone(),
                    address,
                    from: from.state,
                    to: to.state,
                });
            }
        }
        for (&address, e) in &ne {
            if !oe.contains_key(&address) {
                out.push(Change::EndpointAdded {
                    service: name.clone(),
                    address,
                    weight: e.weight,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EndpointSpec;

    #[test]
    fn endpoint_and_listener_changes_are_listed() {
        let old = Config::embedded_default("127.0.0.1:8080".parse().unwrap());
        let mut new = old.clone();
        let svc = new.services.get_mut("default").unwrap();
        svc.endpoints
            .push(EndpointSpec::new("127.0.0.1:9001".parse().unwrap(), 2));
        new.listeners[0].listen = "127.0.0.1:8081".parse().unwrap();
        let text: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "listener default on 127.0.0.1:8080 removed",
                "listener default added on 127.0.0.1:8081",
                "service default: endpoint 127.0.0.1:9001 added (weight 2)",
            ]
        );
        assert!(diff(&new, &new).is_empty());

        let mut drained = new.clone();
        drained.services.get_mut("default").unwrap().endpoints[0].state = AdminState::Drain;
        let text: Vec<String> = diff(&new, &drained)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            ["service default: endpoint 127.0.0.1:9001 state enabled -> drain"]
        );
    }
}
