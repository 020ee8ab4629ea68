//! Proxying one HTTP request: route it, prepare it for upstream, hand it to [`forward`], and
//! stream the response back.
//!
//! Bodies are never buffered on their way through: the client's request body goes upstream
//! as it arrives (unless it is small enough to be kept for a retry), and the upstream's
//! response body to the client, with hyper's backpressure both ways. Errors are answered
//! here with a short text body: 404 no route, 503 a service with no endpoint that can take
//! the request, 502 no endpoint could be reached or the upstream broke off, 504 the upstream
//! did not answer in time.
//!
//! Each request is an [`Exchange`] from its head to the end of its response: when the
//! response body has been handed to the connection to its last byte, or dropped, the exchange
//! counts the request in its listener's and route's counters and hands its access log record
//! over.
//!
//! [`forward`]: crate::forward

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use drover_model::{HashOn, StickyMode};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::access::Record;
use crate::conn::{Active, ConnCtx};
use crate::forward::{self, Affinity, InFlight};
use crate::pool::Sender;
use crate::stats::{RouteStats, Stats};
use crate::table::{HeaderRules, Service};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_ORIGINAL_TO: HeaderName = HeaderName::from_static("x-original-to");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Headers that describe one connection, not the message, and never cross a proxy
/// (RFC 9110 section 7.6.1, plus the legacy `Proxy-Connection` and `Keep-Alive`).
fn hop_by_hop() -> [&'static HeaderName; 9] {
    [
        &header::CONNECTION,
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// The status counted for a request whose client went away before its response head
/// (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

/// Serves one request of a client connection.
pub(crate) async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let active = ctx.begin();
    // Dropped with this future if the client goes away first: then it counts as a 499.
    let mut exchange = Exchange::start(&ctx, &req);
    let response = proxy(&ctx, req, &mut exchange).await;
    // drover's own answers are the failures; an upstream's 101 has no body either.
    let own = matches!(response.body(), Kind::Full(_))
        && response.status() != StatusCode::SWITCHING_PROTOCOLS;
    Stats::count(if own {
        &ctx.stats.client_failed
    } else {
        &ctx.stats.client_success
    });
    exchange.status = response.status().as_u16();
    let (parts, kind) = response.into_parts();
    let body = ResponseBody {
        kind,
        exchange: Some(exchange),
        _active: active,
    };
    Ok(Response::from_parts(parts, body))
}

/// One request from its head to the end of its response, and what it will be counted and
/// logged as.
pub(crate) struct Exchange {
    ctx: Arc<ConnCtx>,
    start: Instant,
    status: u16,
    /// Response body bytes sent so far.
    sent: u64,
    route: Option<Arc<RouteStats>>,
    /// What only the access log needs; None when there is no access log.
    log: Option<LogFields>,
}

/// A request's access log fields, taken from its head before it goes upstream.
struct LogFields {
    time: SystemTime,
    method: http::Method,
    uri: Uri,
    version: Version,
    host: Option<HeaderValue>,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    upstream: Option<SocketAddr>,
    upstream_time: Option<Duration>,
    attempts: u32,
}

impl Exchange {
    fn start(ctx: &Arc<ConnCtx>, req: &Request<Incoming>) -> Self {
        let log = ctx.access_log.as_ref().map(|_| {
            let header = |name| req.headers().get(name).cloned();
            LogFields {
                time: SystemTime::now(),
                method: req.method().clone(),
                uri: req.uri().clone(),
                version: req.version(),
                host: header(header::HOST),
                referer: header(header::REFERER),
                user_agent: header(header::USER_AGENT),
                upstream: None,
                upstream_time: None,
                attempts: 0,
            }
        });
        Self {
            ctx: ctx.clone(),
            start: Instant::now(),
            status: CLIENT_CLOSED,
            sent: 0,
            route: None,
            log,
        }
    }

    #[inline]
    fn sent(&mut self, bytes: usize) {
        self.sent += bytes as u64;
        if let Some(route) = &self.route {
            route
                .response_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

impl Drop for Exchange {
    /// The request is over: counts it, and logs it.
    fn drop(&mut self) {
        let total = self.start.elapsed();
        self.ctx.listener.responses.count(self.status);
        if let Some(route) = &self.route {
            route.responses.count(self.status);
            route.duration.observe(total);
        }
        if let (Some(f), Some(access_log)) = (self.log.take(), &self.ctx.access_log) {
            access_log.send(Record {
                time: f.time,
                client: self.ctx.peer,
                method: f.method,
                uri: f.uri,
                version: f.version,
                host: f.host,
                referer: f.referer,
                user_agent: f.user_agent,
                listener: self.ctx.listener.clone(),
                route: self.route.take(),
                status: self.status,
                bytes_sent: self.sent,
                upstream: f.upstream,
                upstream_time: f.upstream_time,
                total_time: total,
                attempts: f.attempts,
            });
        }
    }
}

async fn proxy(ctx: &ConnCtx, req: Request<Incoming>, ex: &mut Exchange) -> Response<Kind> {
    let (service, route, rules) = {
        let table = ctx.tables.load();
        let Some(listener) = table.listener(ctx.local) else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "this listener is closing");
        };
        match listener.route(request_host(&req), req.uri().path()) {
            Some(r) => (r.service.clone(), r.stats.clone(), r.headers.clone()),
            None => return error(StatusCode::NOT_FOUND, "no route for this host and path"),
        }
    };
    let mut response = route_request(ctx, req, ex, service, route, rules.as_deref()).await;
    if let Some(rules) = &rules {
        rules.response.apply(response.headers_mut());
    }
    response
}

/// Forwards a request that `route` took to `service`, with the route's request header rules.
async fn route_request(
    ctx: &ConnCtx,
    mut req: Request<Incoming>,
    ex: &mut Exchange,
    service: Arc<Service>,
    route: Arc<RouteStats>,
    rules: Option<&HeaderRules>,
) -> Response<Kind> {
    ex.route = Some(route.clone());
    if service.endpoints.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service has no endpoints",
        );
    }
    let affinity = affinity(ctx, &service, &req);
    let compression = service.spec.compression.as_ref().and_then(|spec| {
        crate::compress::accepted(req.headers(), req.method(), spec).map(|e| (e, spec))
    });
    let upgrade = crate::upgrade::requested(&req);
    prepare_upstream_request(&mut req, ctx);
    if let Some(rules) = rules {
        rules.request.apply(req.headers_mut());
    }
    let forwarded = match upgrade {
        Some(protocol) => {
            crate::upgrade::forward(ctx, &service, &route, req, protocol, &affinity).await
        }
        None => forward::forward(&ctx.stats, &service, &route, req, &affinity).await,
    };
    if let Some(log) = &mut ex.log {
        log.upstream = forwarded.upstream;
        log.upstream_time = forwarded.upstream_time;
        log.attempts = forwarded.attempts;
    }
    let (mut response, chosen) = (forwarded.response, forwarded.chosen);
    if let Some((encoding, spec)) = compression {
        response = crate::compress::maybe(response, encoding, spec);
    }
    if let (Some(index), Some(sticky)) = (chosen, &service.spec.sticky) {
        match sticky.mode {
            StickyMode::Cookie if affinity.preferred != Some(index) => {
                if let Some(v) = forward::set_cookie(&sticky.cookie, &service.cookie_values[index])
                {
                    response.headers_mut().append(header::SET_COOKIE, v);
                }
            }
            StickyMode::Cookie => {}
            StickyMode::SourceIp => service.remember(ctx.client_hash, index),
        }
    }
    response
}

/// The request's hash for `consistent_hash`, and the endpoint stickiness asks for.
fn affinity(ctx: &ConnCtx, service: &Service, req: &Request<Incoming>) -> Affinity {
    let spec = &service.spec;
    let key = match &spec.hash_on {
        _ if spec.policy != drover_model::Policy::ConsistentHash => 0,
        HashOn::SourceIp => ctx.client_hash,
        HashOn::Path => drover_balance::hash_bytes(req.uri().path().as_bytes()),
        HashOn::Header(name) => req
            .headers()
            .get(name.as_str())
            .map_or(0, |v| drover_balance::hash_bytes(v.as_bytes())),
        HashOn::Cookie(name) => {
            cookie(req.headers(), name).map_or(0, |v| drover_balance::hash_bytes(v.as_bytes()))
        }
    };
    let preferred = spec.sticky.as_ref().and_then(|sticky| match sticky.mode {
        StickyMode::Cookie => cookie(req.headers(), &sticky.cookie)
            .and_then(|v| service.cookie_values.iter().position(|c| c == v)),
        StickyMode::SourceIp => service.remembered(ctx.client_hash),
    });
    Affinity { key, preferred }
}

/// The value of the cookie `name` in the request's Cookie headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// The host a request is for, without its port: the Host header, or for HTTP/2 the
/// `:authority`.
fn request_host<B>(req: &Request<B>) -> &str {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    strip_port(raw)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Turns a client's request into the one sent upstream: HTTP/1.1, origin-form target,
/// connection headers removed, forwarding headers added (HAProxy's `forwardfor` and
/// `originalto`).
fn prepare_upstream_request(req: &mut Request<Incoming>, ctx: &ConnCtx) {
    if req.headers().get(header::HOST).is_none()
        && let Some(value) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, value);
    }
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let origin_form = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse::<Uri>()
            .unwrap_or_else(|_| Uri::from_static("/"));
        *req.uri_mut() = origin_form;
    }
    *req.version_mut() = Version::HTTP_11;

    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    let forwarded_for = match joined(headers, &X_FORWARDED_FOR) {
        None => ctx.client_ip.clone(),
        Some(mut prior) => {
            prior.extend_from_slice(b", ");
            prior.extend_from_slice(ctx.client_ip.as_bytes());
            HeaderValue::from_bytes(&prior).unwrap_or_else(|_| ctx.client_ip.clone())
        }
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    headers.insert(X_ORIGINAL_TO.clone(), ctx.local_ip.clone());
}

/// All values of a header joined with ", ", or None when it is absent.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut values = headers.get_all(name).iter();
    let mut out = values.next()?.as_bytes().to_vec();
    for v in values {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(out)
}

/// Removes hop-by-hop headers and every header the Connection header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in hop_by_hop() {
        headers.remove(name);
    }
}

pub(crate) fn error(status: StatusCode, message: &'static str) -> Response<Kind> {
    let mut r = Response::new(Kind::Full(Full::new(Bytes::from(format!(
        "drover: {message}\n"
    )))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The body of every response drover sends to a client.
pub struct ResponseBody {
    kind: Kind,
    /// Ended (counted and logged) at the body's end, or when it is dropped.
    exchange: Option<Exchange>,
    /// Keeps the client connection counted as busy until the body is sent or dropped.
    _active: Active,
}

pub(crate) enum Kind {
    Upstream(UpstreamBody),
    /// An upstream body compressed on its way (`crate::compress`).
    Compressed(crate::compress::Compressed),
    Full(Full<Bytes>),
}

/// An upstream response body; gives its connection back to the pool once read to the end.
pub(crate) struct UpstreamBody {
    body: Incoming,
    sender: Option<Sender>,
    max_idle: usize,
    in_flight: InFlight,
}

impl UpstreamBody {
    pub(crate) fn new(
        body: Incoming,
        sender: Sender,
        max_idle: usize,
        in_flight: InFlight,
    ) -> Self {
        Self {
            body,
            sender: Some(sender),
            max_idle,
            in_flight,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.body.is_end_stream()
            && let Some(sender) = self.sender.take()
        {
            self.in_flight.endpoint().checkin(sender, self.max_idle);
        }
    }
}

/// What can break a response body on its way: the upstream connection, or compression.
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(f) => Pin::new(f).poll_frame(cx).map_err(|never| match never {}),
            Kind::Upstream(u) => Pin::new(&mut u.body).poll_frame(cx).map_err(Into::into),
            Kind::Compressed(c) => c.as_mut().poll_frame(cx).map_err(Into::into),
        };
        let ended = match &polled {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(ex)) = (frame.data_ref(), &mut this.exchange) {
                    ex.sent(data.len());
                }
                this.kind_ended()
            }
            // The end, or the upstream broke off: either way nothing more is sent.
            Poll::Ready(_) => true,
        };
        if ended {
            // Before hyper writes the last bytes out, so that a client that has the whole
            // response finds the request counted.
            this.exchange = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.kind_ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(f) => f.size_hint(),
            Kind::Upstream(u) => u.body.size_hint(),
            Kind::Compressed(c) => c.size_hint(),
        }
    }
}

impl ResponseBody {
    fn kind_ended(&self) -> bool {
        match &self.kind {
            Kind::Full(f) => f.is_end_stream(),
            Kind::Upstream(u) => u.body.is_end_stream(),
            Kind::Compressed(c) => c.is_end_stream(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn connection_named_and_hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }
}
