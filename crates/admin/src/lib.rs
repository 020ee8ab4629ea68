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

mod dashboard;
mod events;
mod metrics;
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

use crate::reply::{Body, Failure, fail, ok, read_json};
use crate::routes::{Found, Op};

/// What the admin API reads and changes.
pub struct Admin {
    pub status: watch::Receiver<Status>,
    pub proxy: ProxyHandle,
    pub api: Arc<ApiStore>,
    pub events: broadcast::Sender<Arc<Event>>,
    /// The reconciler's counters, for `GET /metrics`.
    pub reconciler: Arc<drover_control::ReconcilerMetrics>,
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
        match self.route(req).await {
            Ok(r) => r,
            Err(f) => f.into_response(),
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>, Failure> {
        let (op, params) = match routes::find(req.method(), req.uri().path()) {
            Found::Route(op, params) => (op, params),
            Found::WrongMethod(allowed) => {
                let allowed: Vec<&str> = allowed.iter().map(Method::as_str).collect();
                let mut r = fail(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!(
                        "{} is not allowed here; use {}",
                        req.method(),
                        allowed.join(" or ")
                    ),
                )
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                    r.headers_mut().insert(header::ALLOW, v);
                }
                return Ok(r);
            }
            Found::NotFound => {
                return Err(fail(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no such admin path: {}; see /api/v1/openapi.json",
                        req.uri().path()
                    ),
                ));
            }
        };
        // The dashboard's page and files hold no data: the page asks for the token itself.
        if !matches!(op, Op::Healthz | Op::Dashboard | Op::Asset) {
            self.check_access(&req)?;
        }
        let reason = format!("{} {}", req.method(), req.uri().path());
        self.dispatch(op, &params, req, &reason).await
    }

    /// The token and Origin rules.
    fn check_access(&self, req: &Request<Incoming>) -> Result<(), Failure> {
        if let Some(token) = &self.token {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| same_secret(g.trim().as_bytes(), token.as_bytes())) {
                return Err(fail(
                    StatusCode::UNAUTHORIZED,
                    "this admin API needs a token: send Authorization: Bearer <token>",
                ));
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
                return Err(fail(
                    StatusCode::FORBIDDEN,
                    "requests from a page of another origin are refused",
                ));
            }
        }
        Ok(())
    }

    async fn dispatch(
        &self,
        op: Op,
        params: &[String],
        req: Request<Incoming>,
        reason: &str,
    ) -> Result<Response<Body>, Failure> {
        let param = |i: usize| params.get(i).map(String::as_str).unwrap_or_default();
        let created = |outcome| match outcome {
            Outcome::Created => StatusCode::CREATED,
            Outcome::Existed => StatusCode::OK,
        };
        Ok(match op {
            Op::Healthz => reply::text(StatusCode::OK, "ok\n"),
            Op::OpenApi => ok(&openapi::document()),
            Op::Metrics => metrics::render(self),
            Op::Dashboard => dashboard::page(),
            Op::Asset => dashboard::asset(param(0))?,
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
                let found = self.view(|v| v.service(name).map(|s| ok(&s))).await;
                found.ok_or_else(|| {
                    fail(StatusCode::NOT_FOUND, format!("no service named {name:?}"))
                })?
            }
            Op::ServersAdd => {
                let body: ServerBody = read_json(req).await?;
                let address = parse_server_url(&body.url)
                    .map_err(|m| fail(StatusCode::BAD_REQUEST, m).field("url"))?;
                let outcome = self
                    .api
                    .add_endpoint("default", EndpointSpec::new(address, 1), reason)
                    .await?;
                let added = outcome == Outcome::Created;
                reply::json(
                    created(outcome),
                    &json!({"service": "default", "address": address.to_string(), "added": added}),
                )
            }
            Op::ServersRemove => {
                let address = parse_ip_port(param(0), param(1))?;
                self.api.remove_endpoint("default", address, reason).await?;
                ok(&json!({"service": "default", "address": address.to_string(), "removed": true}))
            }
            Op::ServicePut => {
                let name = param(0);
                let spec: ServiceSpec = read_json(req).await?;
                let outcome = self.api.put_service(name, spec, reason).await?;
                self.view(|v| reply::json(created(outcome), &v.service(name).unwrap_or_default()))
                    .await
            }
            Op::ServiceDelete => {
                self.api.delete_service(param(0), reason).await?;
                ok(&json!({"deleted": param(0)}))
            }
            Op::EndpointAdd => {
                let service = param(0);
                let endpoint: EndpointSpec = read_json(req).await?;
                if self.api.add_endpoint(service, endpoint, reason).await? == Outcome::Existed {
                    return Err(fail(
                        StatusCode::CONFLICT,
                        format!(
                            "service {service:?} has endpoint {} already; PATCH it to change its weight or state",
                            endpoint.address
                        ),
                    )
                    .field("address"));
                }
                self.view(|v| {
                    let view = v.endpoint(service, endpoint.address).unwrap_or_default();
                    reply::json(StatusCode::CREATED, &view)
                })
                .await
            }
            Op::EndpointPatch => {
                let (service, address) = (param(0), parse_address(param(1))?);
                let patch: EndpointPatch = read_json(req).await?;
                let patch = EndpointOverride {
                    weight: patch.weight,
                    state: patch.state,
                };
                self.api
                    .patch_endpoint(service, address, patch, reason)
                    .await?;
                self.view(|v| ok(&v.endpoint(service, address).unwrap_or_default()))
                    .await
            }
            Op::EndpointDelete => {
                let address = parse_address(param(1))?;
                self.api.remove_endpoint(param(0), address, reason).await?;
                ok(&json!({"removed": address.to_string()}))
            }
            Op::RouteAdd => {
                let route: RouteSpec = read_json(req).await?;
                let outcome = self.api.add_route(route.clone(), reason).await?;
                self.view(|v| reply::json(created(outcome), &v.route(&route)))
                    .await
            }
            Op::RouteDelete => {
                let q = RouteQuery::parse(req.uri().query().unwrap_or(""))?;
                let route = self
                    .api
                    .remove_route(
                        &q.listener,
                        q.host.as_deref(),
                        q.path_prefix.as_deref(),
                        reason,
                    )
                    .await?;
                let mut v = serde_json::to_value(&route).unwrap_or_default();
                v["source"] = json!(drover_control::api::source_id().to_string());
                ok(&json!({ "removed": v }))
            }
        })
    }

    /// Answers from one consistent read of the configuration, table and API state.
    async fn view<R>(&self, f: impl FnOnce(&views::Snapshot<'_>) -> R) -> R {
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
    fn parse(query: &str) -> Result<Self, Failure> {
        let (mut listener, mut host, mut path_prefix) = (None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = routes::percent_decode(&v.replace('+', " ")).ok_or_else(|| {
                fail(
                    StatusCode::BAD_REQUEST,
                    format!("{k}: bad percent-encoding"),
                )
                .field(k)
            })?;
            match k {
                "listener" => listener = Some(v),
                "host" => host = Some(v),
                "path_prefix" => path_prefix = Some(v),
                _ => {
                    return Err(fail(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "unknown query parameter {k:?}; use listener, host and path_prefix"
                        ),
                    )
                    .field(k));
                }
            }
        }
        let listener = listener.ok_or_else(|| {
            fail(
                StatusCode::BAD_REQUEST,
                "say which route: ?listener=NAME, and host and path_prefix if the route has them",
            )
            .field("listener")
        })?;
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

/// weldr's `/servers/{ip}/{port}`.
fn parse_ip_port(ip: &str, port: &str) -> Result<SocketAddr, Failure> {
    let bad = |m: String| fail(StatusCode::BAD_REQUEST, m);
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| bad(format!("{ip:?} is not an IP address")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad(format!("{port:?} is not a port number")))?;
    Ok(SocketAddr::new(ip, port))
}

fn parse_address(s: &str) -> Result<SocketAddr, Failure> {
    drover_model::spec::parse_endpoint_addr(s)
        .map_err(|m| fail(StatusCode::BAD_REQUEST, m).field("address"))
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
        let addr = |s: &str| Ok(s.parse().unwrap());
        assert_eq!(
            parse_server_url("http://127.0.0.1:12345"),
            addr("127.0.0.1:12345")
        );
        assert_eq!(parse_server_url("HTTP://127.0.0.1/"), addr("127.0.0.1:80"));
        assert_eq!(parse_server_url("http://[::1]:81"), addr("[::1]:81"));
        assert_eq!(parse_server_url("http://[::1]"), addr("[::1]:80"));
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
