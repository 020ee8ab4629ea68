//! drover-echo: a small origin server for tests and demos, like weldr's test server.
//!
//! Every response carries `x-echo-name: NAME`, so a client can tell which origin answered.
//! - `/status/N`: answers with status N.
//! - `/slow?ms=N`: answers after N milliseconds.
//! - `/large`: a 10 MiB body, streamed in 64 KiB chunks.
//! - `/bytes/N`: a body of N bytes.
//! - `/echo`: streams the request body back as it arrives.
//! - `/health`: 200 `ok`, a health-check target.
//! - any other path: 200 with a body that starts with the name, then the request line and
//!   every request header, one per line.
//!
//! Query parameters set response headers on any path, for compression tests: `type=` the
//! Content-Type, `etag=`, `encoding=` a Content-Encoding (the body is not encoded), and
//! `cache=` a Cache-Control.
//!
//! For health-check demos and tests it can be made to fail: `POST /control/fail?status=500`
//! makes every other path answer that status until `POST /control/recover`. A test that runs
//! it in-process does the same through [`EchoState`], which can also make every answer wait
//! and counts the connections accepted.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Size of `/large`.
pub const LARGE: usize = 10 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

type Body = BoxBody<Bytes, hyper::Error>;

/// What can be changed in a running origin.
#[derive(Debug, Default)]
pub struct EchoState {
    /// When not 0, every path but `/control/*` answers this status.
    forced_status: AtomicU16,
    /// Milliseconds every path but `/control/*` waits before it answers.
    delay_ms: AtomicU64,
    /// Connections accepted so far.
    accepted: AtomicU64,
}

impl EchoState {
    /// Answers `status` to everything from now on.
    pub fn fail_with(&self, status: u16) {
        self.forced_status.store(status, Ordering::Relaxed);
    }

    /// Answers normally again.
    pub fn recover(&self) {
        self.forced_status.store(0, Ordering::Relaxed);
    }

    /// Waits `delay` before every answer from now on (`Duration::ZERO`: answers at once).
    pub fn delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Serves HTTP/1.1 and h2c on `listener` until the returned future is dropped.
pub async fn serve(listener: TcpListener, name: String) {
    serve_with(listener, name, Arc::new(EchoState::default())).await;
}

/// Like [`serve`], with state the caller can change while it runs. Dropping the future
/// closes every connection too, as the death of a process would.
pub async fn serve_with(listener: TcpListener, name: String, state: Arc<EchoState>) {
    let name: &'static str = Box::leak(name.into_boxed_str());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            // Reap finished connections so that the set does not grow.
            Some(_) = connections.join_next() => continue,
        };
        let _ = stream.set_nodelay(true);
        state.accepted.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(name, &state, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(name: &'static str, state: &EchoState, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let forced = state.forced_status.load(Ordering::Relaxed);
    let delay = state.delay_ms.load(Ordering::Relaxed);
    if delay > 0 && !path.starts_with("/control/") {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut response = if path == "/control/fail" {
        let status = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("status=")))
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|s| StatusCode::from_u16(*s).is_ok())
            .unwrap_or(500);
        state.fail_with(status);
        Response::new(full(format!("{name} now answers {status}\n")))
    } else if path == "/control/recover" {
        state.recover();
        Response::new(full(format!("{name} answers normally\n")))
    } else if forced != 0 {
        let status = StatusCode::from_u16(forced).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        with_status(status, full(format!("{name}\nforced {forced}\n")))
    } else if path == "/health" {
        Response::new(full("ok\n".into()))
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(status) => with_status(status, full(format!("{name}\n"))),
            None => with_status(
                StatusCode::BAD_REQUEST,
                full("status must be a number from 100 to 999\n".into()),
            ),
        }
    } else if path == "/slow" {
        let ms = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Response::new(full(format!("{name}\nslept {ms} ms\n")))
    } else if path == "/large" {
        sized(LARGE)
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse() {
            Ok(n) => sized(n),
            Err(_) => with_status(
                StatusCode::BAD_REQUEST,
                full("bytes must be a number\n".into()),
            ),
        }
    } else if path == "/echo" {
        let length = req.headers().get(header::CONTENT_LENGTH).cloned();
        let mut r = Response::new(req.into_body().boxed());
        if let Some(length) = length {
            r.headers_mut().insert(header::CONTENT_LENGTH, length);
        }
        r
    } else {
        let mut text = format!(
            "{name}\n{} {} {:?}\n",
            req.method(),
            req.uri(),
            req.version()
        );
        for (k, v) in req.headers() {
            text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        Response::new(full(text))
    };
    response
        .headers_mut()
        .insert("x-echo-name", http::HeaderValue::from_static(name));
    for (key, name) in [
        ("type", header::CONTENT_TYPE),
        ("etag", header::ETAG),
        ("encoding", header::CONTENT_ENCODING),
        ("cache", header::CACHE_CONTROL),
    ] {
        if let Some(v) = query
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| http::HeaderValue::from_bytes(&percent_decoded(v)).ok())
        {
            response.headers_mut().insert(name, v);
        }
    }
    response
}

/// `%XX` escapes decoded; anything malformed is kept as it is.
fn percent_decoded(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

fn with_status(status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

/// A streamed body of `n` bytes.
fn sized(n: usize) -> Response<Body> {
    let chunk = Bytes::from(vec![b'x'; CHUNK.min(n.max(1))]);
    let frames = (0..n.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(n - i * CHUNK);
        Ok::<_, hyper::Error>(Frame::data(chunk.slice(..len)))
    });
    let body = StreamBody::new(iter_stream(frames));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(header::CONTENT_LENGTH, n.into());
    r
}

/// An iterator as a stream, without a futures dependency.
fn iter_stream<I: Iterator + Unpin>(iter: I) -> IterStream<I> {
    IterStream(iter)
}

struct IterStream<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<I::Item>> {
        std::task::Poll::Ready(self.get_mut().0.next())
    }
}
