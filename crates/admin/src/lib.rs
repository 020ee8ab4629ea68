//! The admin listener: the management API, separate from traffic listeners (default
//! 127.0.0.1:8687, weldr's port). docs/api.md describes every route; [`routes::ROUTES`] lists
//! them and [`openapi::document`] describes them for machines.
//!
//! - weldr's calls, unchanged: `POST /servers`, `DELETE /servers/:ip/:port`, `GET /stats`,
//!   `GET /stats/detail` (and `GET /servers`), all on the service `default`;
//! - `/api/v1`: services, endpoints, listeners, routes, the effective configuration, status,
//!   and the change stream.
//!
//! Reads come from the configuration in force and the routing table; changes go through the
//! API store, which is one more source for the reconciler. GET never changes anything. With
//! a token, every route but `/healthz` needs `Authorization: Bearer TOKEN`; a request whose
//! `Origin` is another origin is refused, so that a web page elsewhere cannot drive the API
//! through a browser.

pub mod openapi;
pub mod routes;

mod events;
mod reply;
mod views;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use drover_control::api::{ApiStore, Outcome};
use drover_control::{Event, Status};
use drover_model::{EndpointOverride, EndpointSpec, RouteSpec, ServiceSpec};
use drover_proxy::{ProxyHandle, Stats};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::reply::{Body, api_error, error, ok, read_json};
use crate::routes::{Found, Op};

/// What the admin API reads and changes.
pub struct Admin {
    pub status: watch::Receiver<Status>,
    pub proxy: ProxyHandle,
    pub api: Arc<ApiStore>,
    pub events: broadcast::Sender<Arc<Event>>,
    /// Required as `Authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
    /// Ends every connection, event streams included.
    pub stop: CancellationToken,
}

/// Serves the admin API on `listener` until `admin.stop` is cancelled.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = admin.stop.cancelled() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let for_service = admin.clone();
            let service = service_fn(move |req| {
                let admin = for_service.clone();
                async move { Ok::<_, std::convert::Infallible>(admin.handle(req).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = admin.stop.cancelled() => {}
            }
        });
    }
}

/// weldr's `POST /servers` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerBody {
    url: String,
}

/// `PATCH .../endpoints/{address}` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointPatch {
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    state: Option<drover_model::AdminState>,
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (op, params) = match routes::find(req.method(), req.uri().path()) {
            Found::Route(op, params) => (op, params),
            Found::WrongMethod(allowed) => {
                let allowed: Vec<&str> = allowed.iter().map(Method::as_str).collect();
                let mut r = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!(
                        "{} is not allowed here; use {}",
                        req.method(),
                        allowed.join(" or ")
                    ),
                    None,
                );
                if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                    r.headers_mut().insert(header::ALLOW, v);
                }
                return r;
            }
            Found::NotFound => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no such admin path: {}; see /api/v1/openapi.json",
                        req.uri().path()
                    ),
                    None,
                );
            }
        };
        if op != Op::Healthz
            && let Err(refusal) = self.check_access(&req)
        {
            return refusal;
        }
        let reason = format!("{} {}", req.method(), req.uri().path());
        self.dispatch(op, params, req, &reason).await
    }

    /// The token and Origin rules.
    fn check_access(&self, req: &Request<Incoming>) -> Result<(), Response<Body>> {
        if let Some(token) = &self.token {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| same_secret(g.trim().as_bytes(), token.as_bytes())) {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "this admin API needs a token: send Authorization: Bearer <token>",
                    None,
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Err(r);
            }
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            let same = host.is_some_and(|h| {
                origin
                    .to_str()
                    .is_ok_and(|o| o.eq_ignore_ascii_case(&format!("http://{h}")))
            });
            if !same {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "requests from a page of another origin are refused",
                    None,
                ));
            }
        }
        Ok(())
    }

    async fn dispatch(
        &self,
        op: Op,
        params: Vec<String>,
        req: Request<Incoming>,
        reason: &str,
    ) -> Response<Body> {
        let param = |i: usize| params.get(i).map(String::as_str).unwrap_or_default();
        match op {
            Op::Healthz => reply::text(StatusCode::OK, "ok\n"),
            Op::OpenApi => ok(&openapi::document()),
            Op::Status => ok(&views::status(&self.status.borrow())),
            Op::Events => {
                let generation = self.status.borrow().generation;
                events::stream(&self.events, generation, self.stop.clone())
            }
            Op::Stats => {
                let s = self.proxy.stats();
                ok(&json!({
                    "client": { "success": Stats::get(&s.client_success), "failed": Stats::get(&s.client_failed) },
                    "server": { "success": Stats::get(&s.server_success), "failed": Stats::get(&s.server_failed) },
                }))
            }
            Op::ServersList => self.view(|v| ok(&v.servers())).await,
            Op::StatsDetail => self.view(|v| ok(&v.stats_detail())).await,
            Op::ServicesList => self.view(|v| ok(&v.services())).await,
            Op::Listeners => self.view(|v| ok(&v.listeners())).await,
            Op::RoutesList => self.view(|v| ok(&v.routes())).await,
            Op::Config => self.view(|v| ok(&v.config())).await,
            Op::ServiceGet => {
                let name = param(0);
                self.view(|v| match v.service(name) {
                    Some(s) => ok(&s),
                    None => error(
                        StatusCode::NOT_FOUND,
                        format!("no service named {name:?}"),
                        None,
                    ),
                })
                .await
            }
            Op::ServersAdd => {
                let body: ServerBody = match read_json(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let address = match parse_server_url(&body.url) {
                    Ok(a) => a,
                    Err(m) => return error(StatusCode::BAD_REQUEST, m, Some("url")),
                };
                match self
                    .api
                    .add_endpoint("default", EndpointSpec::new(address, 1), reason)
                    .await
                {
                    Ok(outcome) => {
                        let added = outcome == Outcome::Created;
                        let status = if added {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        };
                        reply::json(
                            status,
                            &json!({"service": "default", "address": address.to_string(), "added": added}),
                        )
                    }
                    Err(e) => api_error(e),
                }
            }
            Op::ServersRemove => {
                let address = match parse_ip_port(param(0), param(1)) {
                    Ok(a) => a,
                    Err(m) => return error(StatusCode::BAD_REQUEST, m, None),
                };
                match self.api.remove_endpoint("default", address, reason).await {
                    Ok(()) => ok(
                        &json!({"service": "default", "address": address.to_string(), "removed": true}),
                    ),
                    Err(e) => api_error(e),
                }
            }
            Op::ServicePut => {
                let name = param(0);
                let spec: ServiceSpec = match read_json(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                match self.api.put_service(name, spec, reason).await {
                    Ok(outcome) => {
                        let status = match outcome {
                            Outcome::Created => StatusCode::CREATED,
                            Outcome::Existed => StatusCode::OK,
                        };
                        self.view(|v| reply::json(status, &v.service(name).unwrap_or_default()))
                            .await
                    }
                    Err(e) => api_error(e),
                }
            }
            Op::ServiceDelete => match self.api.delete_service(param(0), reason).await {
                Ok(()) => ok(&json!({"deleted": param(0)})),
                Err(e) => api_error(e),
            },
            Op::EndpointAdd => {
                let service = param(0);
                let endpoint: EndpointSpec = match read_json(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                match self.api.add_endpoint(service, endpoint, reason).await {
                    Ok(Outcome::Created) => {
                        self.view(|v| {
                            reply::json(
                                StatusCode::CREATED,
                                &v.endpoint(service, endpoint.address).unwrap_or_default(),
                            )
                        })
                        .await
                    }
                    Ok(Outcome::Existed) => error(
                        StatusCode::CONFLICT,
                        format!(
                            "service {service:?} has endpoint {} already; PATCH it to change its weight or state",
                            endpoint.address
                        ),
                        Some("address"),
                    ),
                    Err(e) => api_error(e),
                }
            }
            Op::EndpointPatch => {
                let service = param(0);
                let address = match parse_address(param(1)) {
                    Ok(a) => a,
                    Err(r) => return r,
                };
                let patch: EndpointPatch = match read_json(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let patch = EndpointOverride {
                    weight: patch.weight,
                    state: patch.state,
                };
                match self
                    .api
                    .patch_endpoint(service, address, patch, reason)
                    .await
                {
                    Ok(()) => {
                        self.view(|v| ok(&v.endpoint(service, address).unwrap_or_default()))
                            .await
                    }
                    Err(e) => api_error(e),
                }
            }
            Op::EndpointDelete => {
                let address = match parse_address(param(1)) {
                    Ok(a) => a,
                    Err(r) => return r,
                };
                match self.api.remove_endpoint(param(0), address, reason).await {
                    Ok(()) => ok(&json!({"removed": address.to_string()})),
                    Err(e) => api_error(e),
                }
            }
            Op::RouteAdd => {
                let route: RouteSpec = match read_json(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                match self.api.add_route(route.clone(), reason).await {
                    Ok(outcome) => {
                        let status = match outcome {
                            Outcome::Created => StatusCode::CREATED,
                            Outcome::Existed => StatusCode::OK,
                        };
                        self.view(|v| reply::json(status, &v.route(&route))).await
                    }
                    Err(e) => api_error(e),
                }
            }
            Op::RouteDelete => {
                let query = match RouteQuery::parse(req.uri().query().unwrap_or("")) {
                    Ok(q) => q,
                    Err(r) => return r,
                };
                let removed = self
                    .api
                    .remove_route(
                        &query.listener,
                        query.host.as_deref(),
                        query.path_prefix.as_deref(),
                        reason,
                    )
                    .await;
                match removed {
                    Ok(route) => {
                        let mut v = serde_json::to_value(&route).unwrap_or_default();
                        v["source"] = json!(drover_control::api::source_id().to_string());
                        ok(&json!({ "removed": v }))
                    }
                    Err(e) => api_error(e),
                }
            }
        }
    }

    /// Answers from one consistent read of the configuration, table and API state.
    async fn view(&self, f: impl FnOnce(&views::Snapshot<'_>) -> Response<Body>) -> Response<Body> {
        let api = self.api.state().await;
        let status = self.status.borrow().clone();
        let table = self.proxy.table();
        f(&views::Snapshot {
            status: &status,
            table: &table,
            api: &api,
        })
    }
}

/// `DELETE /api/v1/routes?listener=…&host=…&path_prefix=…`.
struct RouteQuery {
    listener: String,
    host: Option<String>,
    path_prefix: Option<String>,
}

impl RouteQuery {
    fn parse(query: &str) -> Result<Self, Response<Body>> {
        let (mut listener, mut host, mut path_prefix) = (None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(v) = routes::percent_decode(&v.replace('+', " ")) else {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("{k}: bad percent-encoding"),
                    Some(k),
                ));
            };
            match k {
                "listener" => listener = Some(v),
                "host" => host = Some(v),
                "path_prefix" => path_prefix = Some(v),
                _ => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "unknown query parameter {k:?}; use listener, host and path_prefix"
                        ),
                        Some(k),
                    ));
                }
            }
        }
        let Some(listener) = listener else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "say which route: ?listener=NAME, and host and path_prefix if the route has them",
                Some("listener"),
            ));
        };
        Ok(Self {
            listener,
            host,
            path_prefix,
        })
    }
}

/// weldr's server URL: `http://IP[:PORT][/]`, port 80 by default.
fn parse_server_url(url: &str) -> Result<SocketAddr, String> {
    let bad = |why: &str| {
        format!("invalid url {url:?}: {why}; use http://IP:PORT, such as http://127.0.0.1:12345")
    };
    let rest = url
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &url[7..])
        .ok_or_else(|| bad("only http:// URLs can be added"))?;
    let authority = match rest.split_once('/') {
        Some((a, "")) => a,
        Some(_) => return Err(bad("a server URL has no path")),
        None => rest,
    };
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let ip = authority.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 80))
        .map_err(|_| bad("the host must be an IP address"))
}

fn parse_ip_port(ip: &str, port: &str) -> Result<SocketAddr, String> {
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("{ip:?} is not an IP address"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number"))?;
    Ok(SocketAddr::new(ip, port))
}

fn parse_address(s: &str) -> Result<SocketAddr, Response<Body>> {
    drover_model::spec::parse_endpoint_addr(s)
        .map_err(|m| error(StatusCode::BAD_REQUEST, m, Some("address")))
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weldr_urls() {
        assert_eq!(
            parse_server_url("http://127.0.0.1:12345"),
            Ok("127.0.0.1:12345".parse().unwrap())
        );
        assert_eq!(
            parse_server_url("HTTP://127.0.0.1/"),
            Ok("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            parse_server_url("http://[::1]:81"),
            Ok("[::1]:81".parse().unwrap())
        );
        assert_eq!(
            parse_server_url("http://[::1]"),
            Ok("[::1]:80".parse().unwrap())
        );
        for bad in [
            "https://127.0.0.1",
            "127.0.0.1:80",
            "http://localhost:80",
            "http://127.0.0.1/x",
            "http://127.0.0.1:99999",
        ] {
            let e = parse_server_url(bad).unwrap_err();
            assert!(e.contains("use http://IP:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
