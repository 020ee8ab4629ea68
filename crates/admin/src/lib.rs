//! The admin listener, separate from traffic listeners (default 127.0.0.1:8687, weldr's
//! port). Today it answers:
//! - `GET /healthz`: `ok` while the process runs (a liveness probe);
//! - `GET /api/v1/status`: the generation of the configuration in force, when it changed,
//!   from which source, and the last rejected change with its error.
//!
//! The management API (weldr's `/servers` and `/stats`, and the rest of `/api/v1`) is built
//! on this listener by its own issue.

pub mod openapi;

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use drover_control::Status;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Serves the admin API on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    status: watch::Receiver<Status>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let status = status.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let status = status.clone();
                async move { Ok::<_, Infallible>(route(&req, &status)) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn route(req: &Request<Incoming>, status: &watch::Receiver<Status>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/api/v1/status") => {
            json_response(StatusCode::OK, &status_json(&status.borrow()))
        }
        (_, "/healthz" | "/api/v1/status") => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": format!("{} is not allowed here; use GET", req.method())}),
        ),
        (_, path) => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no such admin path: {path}")}),
        ),
    }
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

fn status_json(s: &Status) -> serde_json::Value {
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

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().expect("static"),
    );
    r
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("static"),
    );
    r
}
