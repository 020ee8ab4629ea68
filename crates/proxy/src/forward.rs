//! Sending a request upstream: choosing the endpoint, trying again elsewhere when that is
//! safe, and telling health what happened.
//!
//! When a request may go out again:
//! - it never left drover (the connection could not be opened, or a pooled connection was
//!   found closed before the request was written): always, on another endpoint (a closed
//!   pooled connection does not count as a try at all);
//! - it was written on a kept-alive HTTP/1.1 connection that the upstream closed without a
//!   byte of answer (its idle close crossed the request): for idempotent methods whose
//!   request can be replayed, on another connection, and not counted as a try either;
//! - it was sent, but no response byte came back (reset, or the per-try deadline passed):
//!   when the request can be replayed, i.e. it had no body or one small enough to have been
//!   kept (`retries.replay_buffer`); after a per-try timeout only for idempotent methods;
//! - the answer was 502, 503 or 504: for idempotent methods whose request can be replayed.
//!
//! A streamed body is never sent twice: once a try has taken it, only that try can send it.
//! gRPC bodies carry no `Content-Length`, so they always stream.
//!
//! At most `retries.attempts` tries, each on an endpoint this request has not tried, and
//! only while the service's retry budget allows: retries never add more than
//! `retries.budget_percent` to the requests a service receives (plus a small allowance, so
//! that a quiet service can retry at all).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};

use crate::http::{
    Forwarding, Kind, RequestBody, Source, UpstreamBody, error, strip_hop_by_hop_but_trailer,
};
use crate::pool::{ConnectError, EndpointState};
use crate::stats::{RouteStats, Stats};
use crate::table::Service;
use crate::upstream::{Answer, Conn, Sent, Upstream};

/// The most tries the configuration allows.
pub(crate) const MAX_ATTEMPTS: usize = 10;
/// Pooled connections found closed that one request may skip before giving up.
const MAX_STALE: usize = 16;

/// A request body as sent upstream: the client's stream, or bytes kept for replay.
pub enum ReqBody {
    Stream(Upload),
    Bytes(KeptBody),
}

/// A kept request body on its way: its bytes, then its trailers, if it had any.
pub struct KeptBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl KeptBody {
    pub(crate) fn new(data: &Bytes, trailers: &Option<HeaderMap>) -> Self {
        Self {
            data: (!data.is_empty()).then(|| data.clone()),
            trailers: trailers.clone(),
        }
    }
}

impl Body for KeptBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// The client's request body on its way upstream, counted into its route's bytes as it goes.
pub struct Upload {
    body: RequestBody,
    route: Arc<RouteStats>,
    /// The route's body limit and the client's framing errors (`crate::http::BodyWatch`).
    watch: Option<Arc<crate::http::BodyWatch>>,
}

impl Upload {
    pub(crate) fn new(body: RequestBody, route: Arc<RouteStats>) -> Self {
        Self {
            body,
            route,
            watch: None,
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = crate::http::BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.route
                .request_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        match &this.watch {
            Some(watch) => watch.pass(polled),
            None => polled.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl ReqBody {
    /// Whether trailers follow the data, as far as can be known before it is sent: a kept
    /// body knows; a streamed one is taken at its head's word (`named`: the request has a
    /// `Trailer` field, RFC 9110 section 6.6.2). Unannounced trailers on a streamed body
    /// whose length is known cannot be sent to an HTTP/1.1 upstream, which has already
    /// been told that length.
    pub(crate) fn trailers_follow(&self, named: bool) -> bool {
        match self {
            ReqBody::Bytes(k) => k.trailers.is_some(),
            ReqBody::Stream(_) => named,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = crate::http::BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ReqBody::Stream(s) => Pin::new(s).poll_frame(cx),
            ReqBody::Bytes(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Stream(s) => s.is_end_stream(),
            ReqBody::Bytes(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream(s) => s.size_hint(),
            ReqBody::Bytes(b) => b.size_hint(),
        }
    }
}

/// The body of the request being forwarded: kept whole (replayable) or still streaming.
enum Payload {
    /// The bytes, and the trailers that followed them.
    Kept(Bytes, Option<HeaderMap>),
    /// Taken by the try that sends it; back here if the connection hands it back unsent.
    Streaming(Option<Upload>),
}

impl Payload {
    fn replayable(&self) -> bool {
        matches!(self, Payload::Kept(..))
    }
}

/// Keeps the body when it is empty or announced small enough; streams it otherwise.
async fn take_payload(
    body: RequestBody,
    headers: &HeaderMap,
    limit: u32,
    route: &Arc<RouteStats>,
) -> Result<Payload, Response<Kind>> {
    if body.is_end_stream() {
        return Ok(Payload::Kept(Bytes::new(), None));
    }
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n <= u64::from(limit) => {
            match Limited::new(body, limit as usize).collect().await {
                Ok(collected) => {
                    let trailers = collected.trailers().cloned();
                    let b = collected.to_bytes();
                    route
                        .request_bytes
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok(Payload::Kept(b, trailers))
                }
                Err(_) => Err(error(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                )),
            }
        }
        _ => Ok(Payload::Streaming(Some(Upload {
            body,
            route: route.clone(),
            watch: None,
        }))),
    }
}

/// Where a request should go first, from its affinity (sticky cookie or table).
pub(crate) struct Affinity {
    /// The hash `consistent_hash` uses.
    pub key: u64,
    /// The endpoint stickiness asks for, by index, when it can take the request.
    pub preferred: Option<usize>,
}

/// How the tries ended when none got a usable answer.
enum Failure {
    Unreachable,
    TimedOut,
    Broken,
    /// An answer worth another try.
    Answer(Box<Response<Kind>>),
}

/// What forwarding a request came to.
pub(crate) struct Forwarded {
    pub response: Response<Kind>,
    /// The index of the endpoint whose answer this is, if any.
    pub chosen: Option<usize>,
    /// Tries made (a try is a request sent, or a connection attempt that failed).
    pub attempts: u32,
    /// The endpoint whose answer this is, else the endpoint of the last try.
    pub upstream: Option<SocketAddr>,
    /// From the start of the try that answered (connecting included) to its response head.
    pub upstream_time: Option<Duration>,
}

impl Forwarded {
    pub(crate) fn alone(response: Response<Kind>) -> Self {
        Self {
            response,
            chosen: None,
            attempts: 0,
            upstream: None,
            upstream_time: None,
        }
    }
}

/// Forwards `req`, which `route` took, to `service`.
pub(crate) async fn forward(
    stats: &Stats,
    service: &Arc<Service>,
    route: &Arc<RouteStats>,
    req: Request<RequestBody>,
    affinity: &Affinity,
    forwarding: Option<Forwarding<'_>>,
) -> Forwarded {
    let spec = &service.spec;
    let (mut parts, body) = req.into_parts();
    let limit = spec.retries.replay_buffer;
    let mut payload = match take_payload(body, &parts.headers, limit, route).await {
        Ok(p) => p,
        Err(r) => return Forwarded::alone(r),
    };
    if let Payload::Streaming(Some(upload)) = &mut payload {
        upload.watch = parts.extensions.remove();
    }
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    // The request's head between tries. drover's HTTP/1.1 client takes it whole and gives it
    // back after the try; an HTTP/2 try takes a copy, or the headers alone when no other try
    // needs them.
    let mut head = Some(parts);
    let attempts = (spec.retries.attempts as usize).clamp(1, MAX_ATTEMPTS);
    let per_try = spec
        .retries
        .per_try_timeout
        .unwrap_or(spec.response_timeout)
        .get();
    service.budget.deposit();

    let mut tried = [0usize; MAX_ATTEMPTS];
    let mut tries = 0;
    let mut stale = 0;
    // Retries taken from the budget so far.
    let mut charged = 0;
    let mut failure = Failure::Unreachable;
    // For the access log: the endpoint of the last try, and the endpoint and time of the
    // last answer.
    let mut upstream = None;
    let mut answered = None;
    while tries < attempts {
        let preferred = affinity
            .preferred
            .filter(|i| tries == 0 && service.endpoints[*i].health.is_available());
        let index = match preferred {
            Some(i) => i,
            None => match service
                .picker
                .pick(&service.endpoints, affinity.key, &tried[..tries])
            {
                Some(p) => {
                    service.note_panic(p.panic);
                    p.index
                }
                None if tries == 0 => {
                    return Forwarded::alone(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "every endpoint of the service is drained or disabled",
                    ));
                }
                None => break,
            },
        };
        // Each retry is paid for once, even when a stale connection makes it go round again.
        if tries > charged {
            if !service.budget.withdraw() {
                tracing::debug!(service = %service.name, "retry budget spent; no retry");
                break;
            }
            service.retries.fetch_add(1, Ordering::Relaxed);
            service.stats.retries.fetch_add(1, Ordering::Relaxed);
            charged = tries;
        }
        let endpoint = &service.endpoints[index];
        let in_flight = InFlight::start(endpoint);
        let try_started = Instant::now();
        upstream = Some(endpoint.address);
        let (mut conn, opened) =
            match endpoint.checkout(&service.upstream, spec.pool_idle_timeout.get(), try_started) {
                Some(c) => (c, false),
                // Boxed: the connect future (TCP and TLS) is 1.6 KB, and every request's future
                // would carry room for it, pooled connection or not.
                None => {
                    match Box::pin(endpoint.connect(&service.upstream, spec.connect_timeout.get()))
                        .await
                    {
                        Ok(c) => (c, true),
                        Err(e) => {
                            endpoint.log_connect_error(&service.name, &e);
                            record_failure(stats, service, endpoint);
                            failure = match e {
                                ConnectError::Timeout(_) => Failure::TimedOut,
                                _ => Failure::Unreachable,
                            };
                            tried[tries] = index;
                            tries += 1;
                            continue;
                        }
                    }
                }
            };
        // A connection just given back may still be finishing its last response; a shared
        // HTTP/2 connection may have closed since it was stored.
        if conn.ready().await.is_err() {
            endpoint.forget_closed();
            stale += 1;
            if stale > MAX_STALE {
                break;
            }
            continue;
        }
        // A pooled HTTP/1.1 connection is sent on at once, so the try's start is the send's:
        // one clock read less for most requests. Opening a connection, or HTTP/2's `ready`,
        // may have taken time.
        let sent_at = if opened || matches!(conn, Conn::H2(_)) {
            Instant::now()
        } else {
            try_started
        };
        let last_try = tries + 1 >= attempts;
        let body = match &mut payload {
            Payload::Kept(b, t) => ReqBody::Bytes(KeptBody::new(b, t)),
            Payload::Streaming(s) => match s.take() {
                Some(s) => ReqBody::Stream(s),
                // Sent by an earlier try that failed: it cannot go again.
                None => break,
            },
        };
        let req = if conn.gives_head_back() {
            let mut whole = head.take().expect("given back after each try");
            whole.version = Version::HTTP_11;
            Request::from_parts(whole, body)
        } else {
            let parts = head.as_mut().expect("kept by HTTP/2 tries");
            // A request that cannot be sent twice needs no copy of its headers.
            let headers = if last_try || !payload.replayable() {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
            http2_request(
                &parts.method,
                &parts.uri,
                headers,
                body,
                &service.upstream,
                endpoint.address,
            )
        };
        let (sent, back) = conn.send(req, sent_at + per_try, forwarding).await;
        if back.is_some() {
            head = back;
        }
        tried[tries] = index;
        tries += 1;
        match sent {
            Sent::Answer(mut response) => {
                let now = Instant::now();
                endpoint.latency.observe(now - sent_at);
                let upstream_time = now - try_started;
                endpoint.responses.fetch_add(1, Ordering::Relaxed);
                Stats::count(&stats.server_success);
                let status = response.status();
                endpoint.responses_by_class.count(status.as_u16());
                if status.is_server_error() {
                    record_outlier(service, endpoint);
                } else {
                    endpoint.health.record_success();
                }
                let retry = matches!(status.as_u16(), 502..=504)
                    && idempotent
                    && payload.replayable()
                    && tries < attempts;
                // drover's HTTP/1.1 client leaves them out as it reads the head.
                if matches!(response.body(), Answer::H2(_)) {
                    strip_hop_by_hop_but_trailer(response.headers_mut());
                }
                *response.version_mut() = Version::HTTP_11;
                let response = response.map(|answer| {
                    let source = match answer {
                        Answer::H1(body) => Source::Pooled {
                            body,
                            upstream: service.upstream.id,
                            max_idle: spec.pool_max_idle as usize,
                        },
                        // Shared: nothing to give back.
                        Answer::H2(body) => Source::Hyper {
                            body,
                            _connection: None,
                        },
                    };
                    Kind::Upstream(UpstreamBody::new(source, in_flight))
                });
                if retry {
                    tracing::debug!(service = %service.name, endpoint = %endpoint.address, %status, "retrying elsewhere");
                    failure = Failure::Answer(Box::new(response));
                    answered = Some((endpoint.address, upstream_time));
                    continue;
                }
                return Forwarded {
                    response,
                    chosen: Some(index),
                    attempts: tries as u32,
                    upstream: Some(endpoint.address),
                    upstream_time: Some(upstream_time),
                };
            }
            // Never written: the connection was closing. Send it on another one.
            Sent::Unsent(back) => {
                let (back_parts, back_body) = back.into_parts();
                let parts = head.as_mut().expect("kept by HTTP/2 tries");
                parts.headers = back_parts.headers;
                parts.uri = back_parts.uri;
                if let ReqBody::Stream(s) = back_body {
                    payload = Payload::Streaming(Some(s));
                }
                tries -= 1;
                stale += 1;
                if stale > MAX_STALE {
                    break;
                }
            }
            // The upstream closed a kept-alive connection as the request went out, and sent
            // nothing: it never began to answer, so an idempotent request that can be
            // replayed goes again on another connection, not counted as a try (nginx treats
            // its cached connections so).
            Sent::Failed { resend: true, .. } if idempotent && payload.replayable() => {
                tries -= 1;
                stale += 1;
                if stale > MAX_STALE {
                    break;
                }
            }
            Sent::Failed { error, .. } => {
                tracing::debug!(service = %service.name, endpoint = %endpoint.address, "upstream failed: {error}");
                record_failure(stats, service, endpoint);
                failure = Failure::Broken;
                if !payload.replayable() {
                    break;
                }
            }
            Sent::TimedOut => {
                record_failure(stats, service, endpoint);
                failure = Failure::TimedOut;
                if !(idempotent && payload.replayable()) {
                    break;
                }
            }
        }
    }
    let response = match failure {
        Failure::Answer(r) => {
            return Forwarded {
                response: *r,
                chosen: tried[..tries].last().copied(),
                attempts: tries as u32,
                upstream: answered.map(|a| a.0),
                upstream_time: answered.map(|a| a.1),
            };
        }
        Failure::TimedOut => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the upstream did not answer in time",
        ),
        Failure::Broken => error(
            StatusCode::BAD_GATEWAY,
            "the upstream closed the connection or sent an invalid response",
        ),
        Failure::Unreachable => error(StatusCode::BAD_GATEWAY, "no endpoint could be reached"),
    };
    Forwarded {
        response,
        chosen: None,
        attempts: tries as u32,
        upstream,
        upstream_time: None,
    }
}

/// The request as sent to an endpoint over HTTP/2: `:scheme` from the service's TLS,
/// `:authority` from `Host` (which is then left out, as RFC 9113 section 8.3.1 asks of
/// intermediaries), and `te: trailers`, which gRPC servers require and which says drover
/// takes trailers on this hop (nginx's `grpc_pass` sends it too). hyper removes any other
/// connection-specific header from HTTP/2 messages. (HTTP/1.1 requests go as they came from
/// `crate::http`: origin-form target, `Host`.)
fn http2_request(
    method: &Method,
    uri: &Uri,
    mut headers: HeaderMap,
    body: ReqBody,
    upstream: &Upstream,
    address: SocketAddr,
) -> Request<ReqBody> {
    // A request handed back unsent already has its authority in its URI.
    let authority = headers
        .remove(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| uri.authority().cloned())
        .or_else(|| Authority::try_from(address.to_string()).ok());
    let mut target = Uri::builder().scheme(upstream.scheme()).path_and_query(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    if let Some(a) = authority {
        target = target.authority(a);
    }
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = target.build().unwrap_or_else(|_| uri.clone());
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = headers;
    req
}

/// No answer from this endpoint: counts it, and feeds outlier detection.
pub(crate) fn record_failure(stats: &Stats, service: &Service, endpoint: &Arc<EndpointState>) {
    endpoint.failures.fetch_add(1, Ordering::Relaxed);
    Stats::count(&stats.server_failed);
    record_outlier(service, endpoint);
}

fn record_outlier(service: &Service, endpoint: &Arc<EndpointState>) {
    let ejected = endpoint.health.record_failure(&service.spec.outlier, || {
        let out = service
            .endpoints
            .iter()
            .filter(|e| e.health.is_ejected())
            .count();
        (out, service.endpoints.len())
    });
    if let Some(time) = ejected {
        tracing::warn!(
            service = %service.name,
            endpoint = %endpoint.address,
            "endpoint ejected for {}s after {} consecutive failures",
            time.as_secs(),
            service.spec.outlier.consecutive_failures
        );
    }
}

/// Counts a request in the endpoint's in-flight figure for as long as it lives.
pub(crate) struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub(crate) fn start(endpoint: &Arc<EndpointState>) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(endpoint.clone())
    }

    pub(crate) fn endpoint(&self) -> &EndpointState {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The value of the sticky cookie naming an endpoint.
pub(crate) fn cookie_value(address: SocketAddr) -> String {
    format!(
        "{:016x}",
        drover_balance::hash_bytes(address.to_string().as_bytes())
    )
}

/// A `Set-Cookie` for the sticky cookie.
pub(crate) fn set_cookie(name: &str, value: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax")).ok()
}
