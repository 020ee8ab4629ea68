//! The JSON shapes the API answers with, built from the configuration in force, the routing
//! table's runtime state and the API's own state (which tells what the API added).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use drover_control::Status;
use drover_control::api::{self, ApiState};
use drover_model::{Effective, EndpointSpec, RouteSpec, ServiceSpec};
use drover_proxy::RoutingTable;
use serde_json::{Value, json};

/// Everything a view may need, read once per request.
pub struct Snapshot<'a> {
    pub status: &'a Status,
    pub table: &'a RoutingTable,
    pub api: &'a ApiState,
}

impl Snapshot<'_> {
    fn effective(&self) -> &Effective {
        &self.status.effective
    }

    pub fn service(&self, name: &str) -> Option<Value> {
        let spec = self.effective().config.services.get(name)?;
        Some(self.service_view(name, spec))
    }

    pub fn services(&self) -> Value {
        let config = &self.effective().config;
        Value::Array(
            config
                .services
                .iter()
                .map(|(n, s)| self.service_view(n, s))
                .collect(),
        )
    }

    fn service_view(&self, name: &str, spec: &ServiceSpec) -> Value {
        let source = self
            .effective()
            .service_sources
            .get(name)
            .map(ToString::to_string);
        json!({
            "name": name,
            "source": source,
            "policy": spec.policy.to_string(),
            "connect_timeout": spec.connect_timeout,
            "response_timeout": spec.response_timeout,
            "pool_max_idle": spec.pool_max_idle,
            "pool_idle_timeout": spec.pool_idle_timeout,
            "panic": self.table.service(name).is_some_and(|s| s.in_panic()),
            "retries": self.table.service(name).map_or(0, |s| s.retries()),
            "health_check": spec.health_check,
            "slow_start": spec.slow_start,
            "endpoints": spec.endpoints.iter().map(|e| self.endpoint_view(name, e)).collect::<Vec<_>>(),
        })
    }

    pub fn endpoint(&self, service: &str, address: SocketAddr) -> Option<Value> {
        let spec = self.effective().config.services.get(service)?;
        let e = spec.endpoints.iter().find(|e| e.address == address)?;
        Some(self.endpoint_view(service, e))
    }

    fn endpoint_view(&self, service: &str, e: &EndpointSpec) -> Value {
        let source = if self.api.owns_endpoint(service, e.address) {
            Some(api::source_id().to_string())
        } else {
            self.effective()
                .service_sources
                .get(service)
                .map(ToString::to_string)
        };
        let runtime = self
            .table
            .service(service)
            .and_then(|s| s.endpoints.iter().find(|r| r.address == e.address));
        let count = |f: fn(&drover_proxy::EndpointState) -> u64| runtime.map_or(0, |r| f(r));
        json!({
            "address": e.address.to_string(),
            "weight": e.weight,
            "state": e.state.to_string(),
            "source": source,
            "in_flight": count(|r| r.in_flight.load(Ordering::Relaxed)),
            "responses": count(|r| r.responses.load(Ordering::Relaxed)),
            "failures": count(|r| r.failures.load(Ordering::Relaxed)),
            "responses_5xx": count(|r| r.responses_by_class.get()[4]),
            "idle_connections": count(|r| r.idle_connections() as u64),
            "health": runtime.map(|r| serde_json::to_value(r.health.report()).unwrap_or_default()),
            "available": runtime.map(|r| r.health.is_available()),
            "weight_share": runtime.map(|r| (r.health.ramp() * 100.0).round() / 100.0),
        })
    }

    /// weldr's `GET /servers`: the endpoints of `default`.
    pub fn servers(&self) -> Value {
        let endpoints = self
            .effective()
            .config
            .services
            .get("default")
            .map(|s| s.endpoints.as_slice())
            .unwrap_or_default();
        Value::Array(
            endpoints
                .iter()
                .map(|e| {
                    json!({
                        "ip": e.address.ip().to_string(),
                        "port": e.address.port().to_string(),
                        "url": format!("http://{}", e.address),
                        "weight": e.weight,
                        "state": e.state.to_string(),
                    })
                })
                .collect(),
        )
    }

    /// weldr's `GET /stats/detail`: one entry per endpoint of every service.
    pub fn stats_detail(&self) -> Value {
        let mut out = Vec::new();
        let mut services: Vec<_> = self.table.services().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        for s in services {
            for e in &s.endpoints {
                out.push(json!({
                    "id": format!("{}/{}", s.name, e.address),
                    "service": s.name,
                    "ip": e.address.ip().to_string(),
                    "port": e.address.port().to_string(),
                    "success": e.responses.load(Ordering::Relaxed),
                    "failed": e.failures.load(Ordering::Relaxed),
                }));
            }
        }
        Value::Array(out)
    }

    pub fn listeners(&self) -> Value {
        let e = self.effective();
        Value::Array(
            e.config
                .listeners
                .iter()
                .map(|l| {
                    json!({
                        "name": l.name,
                        "listen": l.listen.to_string(),
                        "protocol": l.protocol.to_string(),
                        "source": e.listener_sources.get(&l.name).map(ToString::to_string),
                        "max_connections": l.max_connections,
                        "request_header_timeout": l.request_header_timeout,
                        "idle_timeout": l.idle_timeout,
                    })
                })
                .collect(),
        )
    }

    pub fn routes(&self) -> Value {
        Value::Array(
            self.effective()
                .config
                .routes
                .iter()
                .map(|r| self.route(r))
                .collect(),
        )
    }

    pub fn route(&self, r: &RouteSpec) -> Value {
        // Routes carry no name; the API's own are known by content, the rest belong to the
        // source of their listener.
        let source = if self.api.routes.contains(r) {
            Some(api::source_id().to_string())
        } else {
            self.effective()
                .listener_sources
                .get(&r.listener)
                .map(ToString::to_string)
        };
        let mut v = serde_json::to_value(r).unwrap_or_default();
        v["source"] = json!(source);
        v
    }

    pub fn config(&self) -> Value {
        let e = self.effective();
        let names = |m: &std::collections::BTreeMap<String, drover_model::SourceId>| {
            m.iter()
                .map(|(k, v)| (k.clone(), json!(v.to_string())))
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "generation": self.status.generation,
            "config": e.config,
            "sources": {
                "listeners": names(&e.listener_sources),
                "services": names(&e.service_sources),
            },
        })
    }
}

pub fn unix_ms(t: std::time::SystemTime) -> u128 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

pub fn status(s: &Status) -> Value {
    json!({
        "generation": s.generation,
        "last_change_at_ms": s.last_change_at.map(unix_ms),
        "last_source": s.last_source.as_ref().map(ToString::to_string),
        "last_changes": s.last_changes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "last_rejection": s.last_rejection.as_ref().map(|r| json!({
            "source": r.source.to_string(),
            "error": r.error,
            "at_ms": unix_ms(r.at),
        })),
        "listeners": s.effective.config.listeners.iter().map(|l| json!({
            "name": l.name,
            "listen": l.listen.to_string(),
            "protocol": l.protocol.to_string(),
        })).collect::<Vec<_>>(),
    })
}
