//! HTTP/1.1 Upgrade (WebSocket and any other protocol): the request goes to one endpoint on a
//! connection of its own; when that endpoint answers `101 Switching Protocols`, the client's
//! connection and the upstream one become one tunnel, and bytes are copied both ways until
//! either side closes (each direction's end is passed on as a half-close).
//!
//! No byte the client sends after its request head reaches the upstream before the 101:
//! hyper holds those bytes with the client's connection, and `crate::conn` hands the
//! connection over, those bytes in front, only once hyper has written the 101 and let go. An answer other than 101 is passed on as an ordinary
//! response, and its connection is not pooled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use crate::conn::{ConnCtx, Open, Switched};
use crate::forward::{self, Affinity, Forwarded, InFlight, ReqBody, Upload};
use crate::http::{Kind, RequestBody, Source, UpstreamBody, error, strip_hop_by_hop};
use crate::stats::{RouteStats, Stats};
use crate::table::Service;
use crate::upstream::Upstream;

/// The protocol an HTTP/1.1 request asks to switch to: its `Upgrade` header, when its
/// `Connection` header names `upgrade`.
pub(crate) fn requested(req: &Request<RequestBody>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let names_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    names_upgrade
        .then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// Sends an upgrade request, already prepared for upstream, to one endpoint of `service`; on
/// a 101, starts the tunnel and answers the client with the 101.
pub(crate) async fn forward(
    ctx: &ConnCtx,
    service: &Arc<Service>,
    route: &Arc<RouteStats>,
    req: Request<RequestBody>,
    protocol: HeaderValue,
    affinity: &Affinity,
) -> Forwarded {
    let client = ctx.on_switch();
    let (mut parts, body) = req.into_parts();
    parts.headers.insert(header::UPGRADE, protocol);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let spec = &service.spec;
    let attempts = (spec.retries.attempts as usize).clamp(1, forward::MAX_ATTEMPTS);
    let mut tried = Vec::with_capacity(attempts);
    let mut body = Some(body);
    let mut last = None;
    // Only a failed connect is tried again elsewhere: nothing has been sent then.
    while tried.len() < attempts {
        let preferred = affinity
            .preferred
            .filter(|i| tried.is_empty() && service.endpoints[*i].health.is_available());
        let index = match preferred {
            Some(i) => i,
            None => match service
                .picker
                .pick(&service.endpoints, affinity.key, &tried)
            {
                Some(p) => p.index,
                None if tried.is_empty() => {
                    return Forwarded::alone(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "every endpoint of the service is drained or disabled",
                    ));
                }
                None => break,
            },
        };
        tried.push(index);
        let endpoint = &service.endpoints[index];
        last = Some(endpoint.address);
        let in_flight = InFlight::start(endpoint);
        let started = Instant::now();
        let mut sender = match connect(
            &service.upstream,
            endpoint.address,
            spec.connect_timeout.get(),
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(service = %service.name, "upgrade: {e}");
                forward::record_failure(&ctx.stats, service, endpoint);
                continue;
            }
        };
        let mut upstream_req = Request::new(ReqBody::Stream(Upload::new(
            body.take().expect("sent once"),
            route.clone(),
        )));
        *upstream_req.method_mut() = parts.method.clone();
        *upstream_req.uri_mut() = parts.uri.clone();
        *upstream_req.version_mut() = Version::HTTP_11;
        *upstream_req.headers_mut() = std::mem::take(&mut parts.headers);
        let answer = tokio::time::timeout(
            spec.response_timeout.get(),
            sender.send_request(upstream_req),
        )
        .await;
        let mut response = match answer {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!(service = %service.name, endpoint = %endpoint.address, "upgrade: {e}");
                forward::record_failure(&ctx.stats, service, endpoint);
                return done(
                    error(StatusCode::BAD_GATEWAY, "the upstream broke off"),
                    &tried,
                    last,
                    None,
                );
            }
            Err(_) => {
                forward::record_failure(&ctx.stats, service, endpoint);
                return done(
                    error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the upstream did not answer in time",
                    ),
                    &tried,
                    last,
                    None,
                );
            }
        };
        let upstream_time = started.elapsed();
        endpoint.responses.fetch_add(1, Ordering::Relaxed);
        endpoint
            .responses_by_class
            .count(response.status().as_u16());
        Stats::count(&ctx.stats.server_success);
        endpoint.health.record_success();
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(response.headers_mut());
            // Its connection was opened for this request alone: never pooled.
            let response = response.map(|body| {
                Kind::Upstream(UpstreamBody::new(
                    Source::Hyper {
                        body,
                        _connection: Some(sender),
                    },
                    in_flight,
                ))
            });
            return done(response, &tried, last, Some(upstream_time));
        }
        let switched_to = response.headers().get(header::UPGRADE).cloned();
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(splice(
            client,
            upstream,
            Tunnel {
                _in_flight: in_flight,
                _open: Open::tunnel(&ctx.listener),
                drain: ctx.drain.clone(),
                grace: ctx.tables.load().shutdown_grace(),
                peer: ctx.peer,
                endpoint: endpoint.address,
            },
        ));
        let (mut head, _) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        if let Some(p) = switched_to {
            head.headers.insert(header::UPGRADE, p);
        }
        head.headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let response = Response::from_parts(head, Kind::Full(Default::default()));
        return done(response, &tried, last, Some(upstream_time));
    }
    let response = error(StatusCode::BAD_GATEWAY, "no endpoint could be reached");
    done(response, &tried, last, None)
}

fn done(
    response: Response<Kind>,
    tried: &[usize],
    upstream: Option<SocketAddr>,
    upstream_time: Option<Duration>,
) -> Forwarded {
    Forwarded {
        response,
        chosen: upstream_time.and(tried.last().copied()),
        attempts: tried.len() as u32,
        upstream,
        upstream_time,
    }
}

/// A connection of its own to `address` (over TLS when the service has it), driven with
/// upgrades allowed.
async fn connect(
    upstream: &Upstream,
    address: SocketAddr,
    timeout: Duration,
) -> Result<hyper::client::conn::http1::SendRequest<ReqBody>, String> {
    let stream = upstream
        .open(address, timeout)
        .await
        .map_err(|e| e.to_string())?;
    if stream.alpn() == Some(b"h2") {
        return Err(format!(
            "{address} chose HTTP/2 by ALPN, which has no HTTP/1.1 Upgrade; use upstream_protocol = \"http1\" for this service"
        ));
    }
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake with {address} failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// What a tunnel holds while it lives.
struct Tunnel {
    /// Counts it against its endpoint, for least_conn and the in-flight figures.
    _in_flight: InFlight,
    /// Counts it as an open connection of its listener.
    _open: Open,
    drain: tokio_util::sync::CancellationToken,
    grace: Duration,
    peer: SocketAddr,
    endpoint: SocketAddr,
}

/// Copies bytes both ways once both sides have switched, until both directions end, or the
/// listener has been drained for its grace period.
async fn splice(
    client: oneshot::Receiver<Switched>,
    upstream: hyper::upgrade::OnUpgrade,
    t: Tunnel,
) {
    let client = async {
        client
            .await
            .map_err(|_| "the client's connection ended before the 101".to_string())
    };
    let upstream = async { upstream.await.map_err(|e| e.to_string()) };
    let (mut client, mut upstream) = match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => (client, TokioIo::new(upstream)),
        Err(e) => {
            tracing::debug!(peer = %t.peer, endpoint = %t.endpoint, "upgrade did not complete: {e}");
            return;
        }
    };
    let drained = async {
        t.drain.cancelled().await;
        tokio::time::sleep(t.grace).await;
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = copied {
                tracing::debug!(peer = %t.peer, endpoint = %t.endpoint, "tunnel ended: {e}");
            }
        }
        _ = drained => {
            tracing::debug!(peer = %t.peer, endpoint = %t.endpoint, "grace period over; closing the tunnel");
        }
    }
}
