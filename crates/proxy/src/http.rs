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
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use drover_model::{HashOn, ListenerSpec, StickyMode, UnderscoreHeaders, UpstreamProtocol};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::access::Record;
use crate::conn::{Active, ConnCtx};
use crate::forward::{self, Affinity, InFlight};
use crate::h1::H1Body;
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
///
/// This and [`route_request`] return `async move` blocks rather than being `async fn`s: an
/// `async fn`'s future keeps each argument twice (as passed, and moved into its body), and the
/// request alone is 264 bytes. hyper boxes this future for every request, so its size is
/// copied for every request too.
#[allow(clippy::manual_async_fn)]
pub(crate) fn handle(
    ctx: Arc<ConnCtx>,
    mut req: Request<RequestBody>,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send {
    async move {
        let active = ctx.begin();
        // Dropped with this future if the client goes away first: then it counts as a 499.
        let mut exchange = Exchange::start(&ctx, &req);
        let response = 'answer: {
            // A `let`, so that nothing of `route`'s result but these is held over the await.
            let Routed {
                service,
                stats,
                rules,
                max_body,
            } = match route(&ctx, &mut req, &mut exchange) {
                Ok(routed) => routed,
                Err(refusal) => break 'answer refuse(refusal, req.version()),
            };
            let rules = rules.as_deref();
            let mut response =
                route_request(&ctx, req, &mut exchange, service, stats, rules, max_body).await;
            if let Some(rules) = rules {
                rules.response.apply(response.headers_mut());
            }
            response
        };
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
    /// What only the access log needs; None when there is no access log. Boxed: the
    /// exchange is moved with the answer several times per request, and these fields inline
    /// would make it six times as large (352 bytes against 56) for every request, logged or
    /// not.
    log: Option<Box<LogFields>>,
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
    fn start(ctx: &Arc<ConnCtx>, req: &Request<RequestBody>) -> Self {
        let log = ctx.access_log.as_ref().map(|_| {
            let header = |name| req.headers().get(name).cloned();
            Box::new(LogFields {
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
            })
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

/// Where a request goes, once [`route`] has checked it and found its route.
struct Routed {
    service: Arc<Service>,
    stats: Arc<RouteStats>,
    rules: Option<Arc<HeaderRules>>,
    max_body: Option<u64>,
}

/// Checks a request and finds its route; why it is refused if it has none or may not pass.
fn route(
    ctx: &ConnCtx,
    req: &mut Request<RequestBody>,
    ex: &mut Exchange,
) -> Result<Routed, Refusal> {
    let table = ctx.tables.load();
    let Some(listener) = table.listener(ctx.local) else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "this listener is closing"));
    };
    check_request(req, &listener.spec)?;
    let path = match req.uri().path() {
        // `OPTIONS *` asks about the server as a whole: the route of `/` answers it.
        "*" => "/",
        path => path,
    };
    let Some(r) = listener.route(request_host(req), path) else {
        return Err((StatusCode::NOT_FOUND, "no route for this host and path"));
    };
    if let (Some(limit), Some(announced)) = (r.max_request_body, content_length(req))
        && announced > limit
    {
        ex.route = Some(r.stats.clone());
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is larger than this route accepts",
        ));
    }
    Ok(Routed {
        service: r.service.clone(),
        stats: r.stats.clone(),
        rules: r.headers.clone(),
        max_body: r.max_request_body,
    })
}

/// drover's answer to a request that [`route`] refused.
fn refuse((status, message): Refusal, version: Version) -> Response<Kind> {
    let mut refused = error(status, message);
    if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE && version < Version::HTTP_2 {
        // As hyper does with the HTTP/1 heads it refuses itself.
        refused
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    refused
}

/// Why a request is refused before it is routed.
type Refusal = (StatusCode, &'static str);

/// The checks a request passes before it is routed, on top of hyper's (which answers 400 to
/// malformed heads, obs-fold, invalid or differing Content-Lengths, Transfer-Encoding in
/// HTTP/1.0 or not ending in `chunked`, and 431 to heads over the buffer or the header count):
/// - request target: CONNECT is refused (drover is no forward proxy), `*` is for OPTIONS
///   only, an absolute-form target must be http or https, and a path must not hold dot
///   segments (`.`, `..`, also percent-encoded) or encoded slashes or backslashes, or
///   backslashes; everything else is forwarded byte for byte as it was matched;
/// - framing: a Transfer-Encoding must be exactly `chunked`, once (hyper takes
///   `chunked, chunked` and `gzip, chunked`);
/// - limits: HTTP/2 header counts (hyper counts HTTP/1 ones), and the size of HTTP/1 heads
///   (see `head_size`);
/// - header names with an underscore, per the listener's `underscores_in_headers`.
fn check_request<B>(req: &mut Request<B>, spec: &ListenerSpec) -> Result<(), Refusal> {
    check_target(req)?;
    let headers = req.headers();
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next()
        && (te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked"))
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "a Transfer-Encoding other than chunked",
        ));
    }
    if req.version() == Version::HTTP_2 && headers.len() > spec.max_header_count as usize {
        return Err((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too many header fields",
        ));
    }
    if req.version() < Version::HTTP_2 && head_size(req) > spec.max_header_bytes as usize {
        return Err((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request head is too large",
        ));
    }
    match spec.underscores_in_headers {
        UnderscoreHeaders::Allow => {}
        policy => {
            if headers.keys().any(|n| n.as_str().contains('_')) {
                if policy == UnderscoreHeaders::Reject {
                    return Err((StatusCode::BAD_REQUEST, "a header name with an underscore"));
                }
                let names: Vec<HeaderName> = headers
                    .keys()
                    .filter(|n| n.as_str().contains('_'))
                    .cloned()
                    .collect();
                for name in names {
                    req.headers_mut().remove(name);
                }
            }
        }
    }
    Ok(())
}

/// Watches a request body on its way upstream (`forward::Upload` passes each frame through
/// it): counts it against its route's `max_request_body`, and remembers why it broke off, so
/// that the client is told 413 or 400 rather than the 502 of an aborted upstream request.
pub(crate) struct BodyWatch {
    /// Bytes still allowed; `u64::MAX` without a limit.
    remaining: AtomicU64,
    state: AtomicU8,
}

const BODY_OK: u8 = 0;
const BODY_OVER_LIMIT: u8 = 1;
const BODY_BROKEN: u8 = 2;

/// The error an upload ends with when it goes over its limit.
#[derive(Debug)]
struct OverLimit;

impl std::fmt::Display for OverLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body is larger than its route accepts")
    }
}

impl std::error::Error for OverLimit {}

impl BodyWatch {
    fn new(limit: Option<u64>) -> Self {
        Self {
            remaining: AtomicU64::new(limit.unwrap_or(u64::MAX)),
            state: AtomicU8::new(BODY_OK),
        }
    }

    /// Passes one poll of the client's body through.
    pub(crate) fn pass(
        &self,
        polled: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    let left = self.remaining.load(Ordering::Relaxed);
                    if len > left {
                        self.state.store(BODY_OVER_LIMIT, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(OverLimit))));
                    }
                    self.remaining.store(left - len, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.state.store(BODY_BROKEN, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The answer the client gets instead of the upstream's, if its body broke off.
    fn refusal(&self) -> Option<Refusal> {
        match self.state.load(Ordering::Relaxed) {
            BODY_OVER_LIMIT => Some((
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than this route accepts",
            )),
            BODY_BROKEN => Some((
                StatusCode::BAD_REQUEST,
                "the request body is malformed or was cut off",
            )),
            _ => None,
        }
    }
}

/// The size of an HTTP/1 request head as sent, give or take optional whitespace.
///
/// hyper bounds a head by its read buffer, which cannot be under 8 KiB and which it checks
/// only between reads: one read can take a head past the limit and complete it. Counting here
/// makes `max_header_bytes` exact, whatever the reads.
fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    // "METHOD TARGET HTTP/1.1\r\n", each "name: value\r\n", and the blank line.
    let line = req.method().as_str().len() + 1 + target + 11;
    let fields: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + fields + 2
}

/// The request-target rules of [`check_request`].
fn check_target<B>(req: &Request<B>) -> Result<(), Refusal> {
    if req.method() == Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served: drover is not a forward proxy",
        ));
    }
    let uri = req.uri();
    if let Some(scheme) = uri.scheme_str()
        && scheme != "http"
        && scheme != "https"
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "a request target of another scheme",
        ));
    }
    let path = uri.path();
    if path == "*" {
        return if req.method() == Method::OPTIONS {
            Ok(())
        } else {
            Err((StatusCode::BAD_REQUEST, "the target * is for OPTIONS only"))
        };
    }
    if !path.starts_with('/') {
        return Err((StatusCode::BAD_REQUEST, "a request path must start with /"));
    }
    if !path_is_plain(path) {
        return Err((
            StatusCode::BAD_REQUEST,
            "a request path with a dot segment, an encoded slash or a backslash",
        ));
    }
    Ok(())
}

/// Whether a path has no dot segment (`.` or `..`, plain or percent-encoded), no `%2F` or
/// `%5C`, and no backslash: the paths that every upstream reads as drover matched them.
#[doc(hidden)]
pub fn path_is_plain(path: &str) -> bool {
    let bytes = path.as_bytes();
    // Most paths have none of the three bytes the checks below look for: one pass says so.
    if !bytes.iter().any(|&b| matches!(b, b'.' | b'%' | b'\\')) {
        return true;
    }
    if bytes.contains(&b'\\') {
        return false;
    }
    let mut i = 0;
    while let Some(at) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + at;
        if let Some(code) = bytes.get(at + 1..at + 3)
            && (code.eq_ignore_ascii_case(b"2f") || code.eq_ignore_ascii_case(b"5c"))
        {
            return false;
        }
        i = at + 1;
    }
    path.split('/').all(|segment| !is_dot_segment(segment))
}

/// `.` or `..`, with any dot written `%2e`.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2e") {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

/// The Content-Length a request announced (hyper has checked that it is one valid number).
fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether an upstream response's framing is unambiguous. hyper refuses differing
/// Content-Lengths and bad chunk sizes itself, but takes identical repeated Content-Lengths,
/// and a Content-Length beside Transfer-Encoding (it reads the chunks, and the
/// Transfer-Encoding is then removed as hop-by-hop, leaving a length that is not the body's).
fn upstream_framing_ok(head: bool, response: &Response<Kind>) -> bool {
    let Kind::Upstream(body) = response.body() else {
        return true;
    };
    if body.read_by_own_client() && response.status() != StatusCode::NO_CONTENT {
        // drover's client has refused more than one length, one that is not a number, and
        // one beside Transfer-Encoding, and reads the body by the length: only a 204's
        // length is not its body's.
        return true;
    }
    let mut lengths = response.headers().get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return true;
    };
    if lengths.next().is_some() {
        return false;
    }
    let status = response.status();
    if head || status == StatusCode::NOT_MODIFIED || status.is_informational() {
        return true;
    }
    let announced = first.to_str().ok().and_then(|v| v.parse::<u64>().ok());
    announced.is_some() && body.size_hint().exact() == announced
}

/// Forwards a request that `route` took to `service`, with the route's request header rules;
/// see [`handle`] for why this is not an `async fn`.
#[allow(clippy::manual_async_fn)]
fn route_request<'a>(
    ctx: &'a ConnCtx,
    mut req: Request<RequestBody>,
    ex: &'a mut Exchange,
    service: Arc<Service>,
    route: Arc<RouteStats>,
    rules: Option<&'a HeaderRules>,
    max_body: Option<u64>,
) -> impl Future<Output = Response<Kind>> + Send + 'a {
    async move {
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
        prepare_upstream_request(&mut req);
        let forwarding = Forwarding::of(ctx);
        // drover's HTTP/1.1 client writes them into the request's head, unless rules may
        // change them first or another client sends the request.
        let written_by_client = rules.is_none()
            && upgrade.is_none()
            && service.upstream.protocol == UpstreamProtocol::Http1;
        if !written_by_client {
            forwarding.add_to(req.headers_mut());
        }
        if let Some(rules) = rules {
            rules.request.apply(req.headers_mut());
        }
        let head = req.method() == Method::HEAD;
        // A body that streams is watched for the route's limit and for client framing errors.
        let watch = (!req.body().is_end_stream()).then(|| {
            let w = Arc::new(BodyWatch::new(max_body));
            req.extensions_mut().insert(w.clone());
            w
        });
        let forwarded = match upgrade {
            // Boxed: the upgrade's future is the largest of all, and every request's future
            // would otherwise be as large, upgrade or not.
            Some(protocol) => {
                Box::pin(crate::upgrade::forward(
                    ctx, &service, &route, req, protocol, &affinity,
                ))
                .await
            }
            None => {
                let forwarding = written_by_client.then_some(forwarding);
                forward::forward(&ctx.stats, &service, &route, req, &affinity, forwarding).await
            }
        };
        if let Some(log) = &mut ex.log {
            log.upstream = forwarded.upstream;
            log.upstream_time = forwarded.upstream_time;
            log.attempts = forwarded.attempts;
        }
        let (mut response, chosen) = (forwarded.response, forwarded.chosen);
        if let Some((status, message)) = watch.as_deref().and_then(BodyWatch::refusal) {
            return error(status, message);
        }
        if !upstream_framing_ok(head, &response) {
            // Dropping the upstream body closes its connection: it never goes back to the pool.
            return error(
                StatusCode::BAD_GATEWAY,
                "the upstream sent a response with conflicting framing",
            );
        }
        if let Some((encoding, spec)) = compression {
            response = crate::compress::maybe(response, encoding, spec);
        }
        if let (Some(index), Some(sticky)) = (chosen, &service.spec.sticky) {
            match sticky.mode {
                StickyMode::Cookie if affinity.preferred != Some(index) => {
                    if let Some(v) =
                        forward::set_cookie(&sticky.cookie, &service.cookie_values[index])
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
}

/// The request's hash for `consistent_hash`, and the endpoint stickiness asks for.
fn affinity(ctx: &ConnCtx, service: &Service, req: &Request<RequestBody>) -> Affinity {
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

/// The host a request is for, without its port: the authority of an absolute-form target
/// or of an HTTP/2 request, which RFC 9112 section 3.2.2 puts before the Host header, else
/// the Host header.
fn request_host<B>(req: &Request<B>) -> &str {
    if let Some(a) = req.uri().authority() {
        return a.host();
    }
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
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
/// connection headers removed. The forwarding headers are [`Forwarding`]'s.
fn prepare_upstream_request(req: &mut Request<RequestBody>) {
    // The host routed on goes upstream: an absolute-form target's authority replaces the
    // Host header (without any userinfo).
    if let Some(value) = req.uri().authority().and_then(|a| {
        let hostport = a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, h)| h);
        HeaderValue::from_str(hostport).ok()
    }) {
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

    strip_hop_by_hop_but_trailer(req.headers_mut());
}

/// The headers drover adds to a request going upstream, as HAProxy's `forwardfor` and
/// `originalto`: `X-Forwarded-For` (the client's IP after any the request brought),
/// `X-Forwarded-Proto`, `X-Forwarded-Host` (the Host asked for) and `X-Original-To` (the
/// IP the client connected to). A value the client sent for one of the last three is
/// replaced, or removed when there is nothing to put in its place.
///
/// drover's HTTP/1.1 client writes them straight into the request's head ([`write`]),
/// which saves four inserts into the header map, about 1,000 instructions a request. They
/// go into the map ([`add_to`]) when something else reads it: header rules, which may
/// change them, and hyper's clients (HTTP/2, upgrades).
///
/// [`write`]: Self::write
/// [`add_to`]: Self::add_to
#[derive(Clone, Copy)]
pub(crate) struct Forwarding<'a> {
    client_ip: &'a HeaderValue,
    local_ip: &'a HeaderValue,
    tls: bool,
}

impl<'a> Forwarding<'a> {
    pub(crate) fn of(ctx: &'a ConnCtx) -> Self {
        Self {
            client_ip: &ctx.client_ip,
            local_ip: &ctx.local_ip,
            tls: ctx.tls,
        }
    }

    fn proto(self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// Puts them in a request's header map.
    pub(crate) fn add_to(self, headers: &mut HeaderMap) {
        let forwarded_for = match joined(headers, &X_FORWARDED_FOR) {
            None => self.client_ip.clone(),
            Some(mut prior) => {
                prior.extend_from_slice(b", ");
                prior.extend_from_slice(self.client_ip.as_bytes());
                HeaderValue::from_bytes(&prior).unwrap_or_else(|_| self.client_ip.clone())
            }
        };
        headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(self.proto()),
        );
        match headers.get(header::HOST).cloned() {
            Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
            None => headers.remove(&X_FORWARDED_HOST),
        };
        headers.insert(X_ORIGINAL_TO.clone(), self.local_ip.clone());
    }

    /// Whether a client's field is one of the four, which [`write`](Self::write) writes
    /// afresh: a head written with them must leave the client's out. `Some(true)` for
    /// `X-Forwarded-For`, whose values `write` keeps.
    pub(crate) fn replaces(name: &HeaderName) -> Option<bool> {
        if name == X_FORWARDED_FOR {
            Some(true)
        } else if name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST || name == X_ORIGINAL_TO {
            Some(false)
        } else {
            None
        }
    }

    /// Writes them, as [`add_to`](Self::add_to) would have made them, at the end of a
    /// request head written from `headers` without the fields that
    /// [`replaces`](Self::replaces) names. The writer found the request's `host` and
    /// whether it has an `X-Forwarded-For` (`prior_for`) as it went: looking them up again
    /// would hash their names.
    pub(crate) fn write(
        self,
        out: &mut BytesMut,
        headers: &HeaderMap,
        host: Option<&HeaderValue>,
        prior_for: bool,
    ) {
        out.put_slice(b"x-forwarded-for: ");
        if prior_for {
            for prior in headers.get_all(&X_FORWARDED_FOR) {
                out.put_slice(prior.as_bytes());
                out.put_slice(b", ");
            }
        }
        out.put_slice(self.client_ip.as_bytes());
        out.put_slice(b"\r\nx-forwarded-proto: ");
        out.put_slice(self.proto().as_bytes());
        if let Some(host) = host {
            out.put_slice(b"\r\nx-forwarded-host: ");
            out.put_slice(host.as_bytes());
        }
        out.put_slice(b"\r\nx-original-to: ");
        out.put_slice(self.local_ip.as_bytes());
        out.put_slice(b"\r\n");
    }
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
    strip(headers, false);
}

/// As `strip_hop_by_hop`, but keeps `Trailer`, which names the trailer fields to come (RFC
/// 9110 no longer counts it hop-by-hop). On a response, hyper sends an HTTP/1.1 client only
/// the trailers it names; on a request, it tells drover's HTTP/1.1 client to chunk a body
/// whose length is known, so that its trailers have somewhere to go.
pub(crate) fn strip_hop_by_hop_but_trailer(headers: &mut HeaderMap) {
    strip(headers, true);
}

/// Most messages carry no hop-by-hop header, or only `Connection: keep-alive`, so one walk
/// over the fields (no hashing) finds which are there, reading Connection's options on the
/// way, and only those are removed.
fn strip(headers: &mut HeaderMap, keep_trailer: bool) {
    let list = hop_by_hop();
    let kept = |name: &HeaderName| keep_trailer && name == header::TRAILER;
    let mut present = [false; 9];
    let mut any = false;
    // What Connection names besides its options `close` and `keep-alive` (Keep-Alive is in
    // the list anyway).
    let mut named: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        let Some(i) = list.iter().position(|h| *h == name) else {
            continue;
        };
        if kept(name) {
            continue;
        }
        present[i] = true;
        any = true;
        // Connection, nearly always with one of its options alone, which names nothing.
        let option = |o: &[u8]| value.as_bytes().eq_ignore_ascii_case(o);
        if i == 0 && !option(b"keep-alive") && !option(b"close") {
            let tokens = value.to_str().unwrap_or("").split(',').map(str::trim);
            named.extend(
                tokens
                    .filter(|n| {
                        !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive")
                    })
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                    .filter(|n| !kept(n)),
            );
        }
    }
    if !any {
        return;
    }
    for name in named {
        headers.remove(name);
    }
    for (name, _) in list.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(*name);
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

/// The body of a client's request: hyper's, or for a request that drover's own HTTP/1.1
/// server read (`crate::front`), the body that came whole with its head, if any.
pub enum RequestBody {
    Hyper(Incoming),
    /// Taken (and then empty) by the first poll; empty for a request without a body.
    Whole(Bytes),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Hyper(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Whole(data) if data.is_empty() => Poll::Ready(None),
            RequestBody::Whole(data) => Poll::Ready(Some(Ok(Frame::data(std::mem::take(data))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(body) => body.is_end_stream(),
            RequestBody::Whole(data) => data.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(body) => body.size_hint(),
            RequestBody::Whole(data) => SizeHint::with_exact(data.len() as u64),
        }
    }
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

/// An upstream response body, trailers included; gives its HTTP/1.1 connection back to the
/// pool once read to its end.
pub(crate) struct UpstreamBody {
    source: Source,
    in_flight: InFlight,
    /// The body returned its end. A chunked body cannot tell its end before that.
    done: bool,
}

pub(crate) enum Source {
    /// drover's HTTP/1.1 client. Its connection goes back to the endpoint's pool, marked as
    /// opened by the `Upstream` whose id is `upstream`; the pool keeps at most `max_idle`.
    Pooled {
        body: H1Body,
        upstream: u64,
        max_idle: usize,
    },
    /// hyper's client: an HTTP/2 stream, or the answer to an upgrade request that did not
    /// switch, with that request's connection of its own (kept until the body is read).
    Hyper {
        body: Incoming,
        _connection: Option<hyper::client::conn::http1::SendRequest<crate::forward::ReqBody>>,
    },
}

impl UpstreamBody {
    pub(crate) fn new(source: Source, in_flight: InFlight) -> Self {
        Self {
            source,
            in_flight,
            done: false,
        }
    }

    /// Whether drover's HTTP/1.1 client read the answer (not hyper's).
    fn read_by_own_client(&self) -> bool {
        matches!(self.source, Source::Pooled { .. })
    }

    fn ended(&self) -> bool {
        self.done
            || match &self.source {
                Source::Pooled { body, .. } => body.is_end_stream(),
                Source::Hyper { body, .. } => body.is_end_stream(),
            }
    }

    /// At the end of the body, its HTTP/1.1 connection goes back to the pool, if it can
    /// take another request.
    fn give_back(&mut self) {
        if let Source::Pooled {
            body,
            upstream,
            max_idle,
        } = &mut self.source
            && let Some(conn) = body.take_reusable()
        {
            self.in_flight
                .endpoint()
                .checkin(conn, *upstream, *max_idle);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        // Data, then trailers (HTTP/2, or a chunked HTTP/1.1 body's), then the end.
        let polled = match &mut this.source {
            Source::Pooled { body, .. } => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Source::Hyper { body, .. } => Pin::new(body).poll_frame(cx).map_err(Into::into),
        };
        match &polled {
            Poll::Ready(None) => {
                this.done = true;
                this.give_back();
            }
            Poll::Ready(Some(Ok(_))) if this.ended() => this.give_back(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Pooled { body, .. } => body.size_hint(),
            Source::Hyper { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for UpstreamBody {
    /// A body ended but never polled again (an answer to HEAD, say) gives its connection
    /// back here.
    fn drop(&mut self) {
        self.give_back();
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
            Kind::Upstream(u) => Pin::new(u).poll_frame(cx).map_err(Into::into),
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
            Kind::Upstream(u) => u.size_hint(),
            Kind::Compressed(c) => c.size_hint(),
        }
    }
}

impl ResponseBody {
    fn kind_ended(&self) -> bool {
        match &self.kind {
            Kind::Full(f) => f.is_end_stream(),
            Kind::Upstream(u) => u.ended(),
            Kind::Compressed(c) => c.is_end_stream(),
        }
    }
}

/// Route matching for fuzzing and its corpus replay: every line of `data` but the last is a
/// route `HOST PREFIX` (`-` for any host) on a default listener, the last is a request
/// `HOST PATH`. The table is built only from configurations that validate, as drover does.
/// Returns whether a route matched.
#[doc(hidden)]
pub fn fuzz_route(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<&str> = text.lines().collect();
    let Some(request) = lines.pop() else {
        return false;
    };
    let addr: SocketAddr = ([127, 0, 0, 1], 8080).into();
    let mut config = drover_model::Config::embedded_default(addr);
    for line in lines.iter().take(64) {
        let mut parts = line.splitn(2, ' ');
        let host = parts.next().filter(|h| *h != "-").map(str::to_string);
        config.routes.push(drover_model::RouteSpec {
            host,
            path_prefix: parts.next().map(str::to_string),
            ..drover_model::RouteSpec::new("default", "default")
        });
    }
    if drover_model::validate(&config).is_err() {
        return false;
    }
    let effective = Arc::new(drover_model::Effective {
        config,
        ..Default::default()
    });
    let mut builder = crate::table::TableBuilder::default();
    let Ok(built) = builder.build(&effective) else {
        return false;
    };
    let table = builder.commit(built);
    let (host, path) = request.split_once(' ').unwrap_or((request, "/"));
    let _ = path_is_plain(path);
    table
        .listener(addr)
        .is_some_and(|l| l.route(host, path).is_some())
}

/// The HTTP/1 front end without a network, for fuzzing and its corpus replay: `input` is
/// taken apart into heads by drover's own HTTP/1.1 server (`crate::front`), and fed as a
/// client's bytes to hyper with a default listener's settings ([`server_builder`]), each
/// request going through drover's checks and routing (to a service with no endpoints, so
/// nothing is forwarded). Returns what the client would read back from hyper.
///
/// [`server_builder`]: crate::conn::server_builder
#[doc(hidden)]
pub async fn fuzz_front_end(input: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    crate::front::fuzz_heads(input);
    let addr: SocketAddr = ([127, 0, 0, 1], 8080).into();
    let config = drover_model::Config::embedded_default(addr);
    let effective = Arc::new(drover_model::Effective {
        config,
        ..Default::default()
    });
    let mut builder = crate::table::TableBuilder::default();
    let Ok(built) = builder.build(&effective) else {
        return Vec::new();
    };
    let table = Arc::new(builder.commit(built));
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let Some(listener) = table.listener(addr) else {
        return Vec::new();
    };
    // The listener's settings, and half-close: the input ends with EOF, after which hyper
    // still answers the requests it has read.
    let mut settings = listener.server.h1.clone();
    settings.half_close(true);
    let answer = |status: StatusCode, message: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(message)));
        *r.status_mut() = status;
        Ok::<_, Infallible>(r)
    };
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let table = table.clone();
        async move {
            let Some(listener) = table.listener(addr) else {
                return answer(StatusCode::SERVICE_UNAVAILABLE, "closing");
            };
            if let Err((status, message)) = check_request(&mut req, &listener.spec) {
                return answer(status, message);
            }
            let path = match req.uri().path() {
                "*" => "/",
                path => path,
            };
            match listener.route(request_host(&req), path) {
                Some(r) if r.service.endpoints.is_empty() => {
                    answer(StatusCode::SERVICE_UNAVAILABLE, "no endpoints")
                }
                Some(_) => answer(StatusCode::OK, "routed"),
                None => answer(StatusCode::NOT_FOUND, "no route"),
            }
        }
    });
    let conn = tokio::spawn(async move {
        let io = hyper_util::rt::TokioIo::new(server);
        let _ = settings.serve_connection(io, service).with_upgrades().await;
    });
    let _ = client.write_all(input).await;
    let _ = client.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut out)).await;
    conn.abort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_dot_segments_or_encoded_separators_are_not_plain() {
        for bad in [
            "/..",
            "/a/..",
            "/a/../b",
            "/./a",
            "/a/.",
            "/%2e%2e/a",
            "/%2E./a",
            "/.%2e",
            "/%2e",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a%5Cb",
            "/a\\b",
        ] {
            assert!(!path_is_plain(bad), "{bad}");
        }
        for good in [
            "/",
            "/api/v1/items",
            "//a//",
            "/a/...",
            "/a/.b",
            "/a/b.",
            "/a..b",
            "/%2e%2e%2e",
            "/%2",
            "/a%",
            "/%41",
            "/a%252fb",
        ] {
            assert!(path_is_plain(good), "{good}");
        }
    }

    #[test]
    fn a_transfer_encoding_must_be_one_chunked() {
        let spec = ListenerSpec::new(
            "l",
            ([127, 0, 0, 1], 1).into(),
            drover_model::Protocol::Http,
        );
        let check = |te: &[&str]| {
            let mut b = Request::post("/");
            for v in te {
                b = b.header("transfer-encoding", *v);
            }
            check_request(&mut b.body(()).unwrap(), &spec).map_err(|r| r.0)
        };
        assert_eq!(check(&[]), Ok(()));
        assert_eq!(check(&["chunked"]), Ok(()));
        assert_eq!(check(&["Chunked"]), Ok(()));
        for bad in [
            &["chunked", "chunked"][..],
            &["gzip, chunked"],
            &["chunked, chunked"],
        ] {
            assert_eq!(check(bad), Err(StatusCode::BAD_REQUEST), "{bad:?}");
        }
    }

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

    #[test]
    fn a_message_keeps_its_trailer_header_even_when_connection_names_it() {
        let fields = [
            ("connection", "close, Trailer, X-Secret"),
            ("connection", "upgrade"),
            ("upgrade", "h2c"),
            ("trailer", "x-checksum"),
            ("trailer", "x-count"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "1"),
        ];
        let map = || {
            let mut h = HeaderMap::new();
            for (name, value) in fields {
                h.append(name, HeaderValue::from_static(value));
            }
            h
        };
        let mut message = map();
        strip_hop_by_hop_but_trailer(&mut message);
        let mut left: Vec<(&str, &str)> = message
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        // Removal moves fields about; their order across names means nothing.
        left.sort();
        assert_eq!(
            left,
            [
                ("trailer", "x-checksum"),
                ("trailer", "x-count"),
                ("x-kept", "1")
            ]
        );
        // An upgrade's head, which has no trailers to announce, loses it.
        let mut upgrade = map();
        strip_hop_by_hop(&mut upgrade);
        assert_eq!(
            upgrade.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x-kept"]
        );
    }
}
