//! Three minimal HTTP/1.1 reverse proxies, yardsticks for bench/ and never a product:
//!
//!     floor hyper LISTEN ORIGIN   hyper's server and client, and nothing else
//!     floor half LISTEN ORIGIN    hyper's server, a hand-written upstream client
//!     floor raw LISTEN ORIGIN     a hand-written codec: httparse and one buffer per side
//!
//! All run on tokio with one worker thread, as drover does under `--workers 1`, and
//! give each client connection one upstream connection of its own (`hyper` opens it when
//! the client connects, `half` and `raw` with the first request; at steady state either is
//! the same as a pool of kept-alive connections).
//! All do the header work every proxy does: the hop-by-hop headers are dropped both ways
//! and `X-Forwarded-For` is added. None routes, balances, retries, counts or logs.
//!
//! Set beside drover's figure, `hyper` shows what drover's own work costs on top of hyper,
//! and `raw` what hyper costs on top of a codec that forwards header blocks with no more
//! parsing than finding the framing: the most an HTTP/1 codec of drover's own could gain.
//! `half` is the first step there: hyper still serves the client, but the upstream request
//! is written and its response read in the request's own task, with no dispatcher task and
//! no channel; the response head still becomes a `HeaderMap`, which hyper's server needs.
//! `raw` and `half` frame bodies by Content-Length only (the benchmark's origin sends
//! nothing else); `raw` answers 501 to a chunked request, and `half` closes the connection
//! of any request with a body.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Header names that belong to one connection, not to the message (RFC 9110 section 7.6.1):
/// the ones drover drops too.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The most header lines either side's head may have.
const MAX_HEADERS: usize = 64;
/// The largest head either side may send.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Clone, Copy)]
enum Mode {
    Hyper,
    Half,
    Raw,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: floor hyper|half|raw LISTEN_ADDR ORIGIN_ADDR (e.g. floor raw 127.0.0.1:18080 127.0.0.1:19000)";
    let [_, mode, listen, origin] = &args[..] else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let mode = match mode.as_str() {
        "raw" => Mode::Raw,
        "half" => Mode::Half,
        "hyper" => Mode::Hyper,
        _ => {
            eprintln!("floor: unknown mode {mode:?}; {usage}");
            std::process::exit(2);
        }
    };
    let (Ok(listen), Ok(origin)) = (listen.parse::<SocketAddr>(), origin.parse::<SocketAddr>())
    else {
        eprintln!("floor: LISTEN_ADDR and ORIGIN_ADDR must be IP:PORT; {usage}");
        std::process::exit(2);
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("floor: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        tokio::spawn(async move {
            // Errors end the connection; a yardstick has nothing to report about them.
            let _ = match mode {
                Mode::Raw => serve_raw(client, peer, origin).await,
                Mode::Half => serve_half(client, peer, origin).await,
                Mode::Hyper => serve_hyper(client, peer, origin).await,
            };
        });
    }
}

async fn connect(origin: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(origin).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn serve_hyper(client: TcpStream, peer: SocketAddr, origin: SocketAddr) -> io::Result<()> {
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(connect(origin).await?))
            .await
            .map_err(io::Error::other)?;
    tokio::spawn(conn);
    // One request at a time uses the upstream connection: the next waits for hyper's server
    // to have sent the whole response before it is read.
    let slot = Arc::new(Mutex::new(Some(sender)));
    let forwarded_for = HeaderValue::from_str(&peer.ip().to_string()).map_err(io::Error::other)?;
    let service = service_fn(move |mut req: Request<Incoming>| {
        let slot = slot.clone();
        let forwarded_for = forwarded_for.clone();
        async move {
            let mut sender = slot
                .lock()
                .unwrap()
                .take()
                .expect("HTTP/1 serves one request at a time");
            strip(req.headers_mut());
            req.headers_mut()
                .insert(HeaderName::from_static("x-forwarded-for"), forwarded_for);
            let sent = async {
                sender.ready().await?;
                sender.send_request(req).await
            }
            .await;
            *slot.lock().unwrap() = Some(sender);
            sent.map(|mut response: Response<Incoming>| {
                strip(response.headers_mut());
                response
            })
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await
        .map_err(io::Error::other)
}

async fn serve_half(client: TcpStream, peer: SocketAddr, origin: SocketAddr) -> io::Result<()> {
    // As in `serve_hyper`: one request at a time takes the upstream side and puts it back.
    let slot: Arc<Mutex<Option<Side>>> = Arc::new(Mutex::new(None));
    let forwarded_for = peer.ip().to_string().into_bytes();
    let service = service_fn(move |req: Request<Incoming>| {
        let slot = slot.clone();
        let forwarded_for = forwarded_for.clone();
        async move {
            let taken = slot.lock().unwrap().take();
            let mut up = match taken {
                Some(up) => up,
                None => Side::new(connect(origin).await?),
            };
            let response = exchange(&mut up, &req, &forwarded_for).await?;
            *slot.lock().unwrap() = Some(up);
            Ok::<_, io::Error>(response)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await
        .map_err(io::Error::other)
}

/// Sends `req`'s head upstream and reads the whole response: what `half` does per request.
async fn exchange(
    up: &mut Side,
    req: &Request<Incoming>,
    forwarded_for: &[u8],
) -> io::Result<Response<Full<Bytes>>> {
    if req.headers().contains_key(header::CONTENT_LENGTH)
        || req.headers().contains_key(header::TRANSFER_ENCODING)
    {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "request body"));
    }
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        if HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    out.extend_from_slice(forwarded_for);
    out.extend_from_slice(b"\r\n\r\n");
    up.stream.write_all(&out).await?;

    let (mut response, head_len, body_len) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        if let Some(head_len) = head_length(res.parse(&up.buf))? {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() =
                hyper::StatusCode::from_u16(res.code.unwrap_or(502)).map_err(io::Error::other)?;
            let map = response.headers_mut();
            let mut body_len: usize = 0;
            for h in res.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    body_len = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length")
                        })?;
                }
                if HOP_BY_HOP.iter().any(|n| h.name.eq_ignore_ascii_case(n)) {
                    continue;
                }
                map.append(
                    HeaderName::from_bytes(h.name.as_bytes()).map_err(io::Error::other)?,
                    HeaderValue::from_bytes(h.value).map_err(io::Error::other)?,
                );
            }
            break (response, head_len, body_len);
        }
        if !up.fill().await? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    };
    up.buf.advance(head_len);
    // Not `fill`: its limit is for heads, and a body may be larger.
    up.buf.reserve(body_len.saturating_sub(up.buf.len()));
    while up.buf.len() < body_len {
        if up.stream.read_buf(&mut up.buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    *response.body_mut() = Full::new(up.buf.split_to(body_len).freeze());
    Ok(response)
}

fn strip(headers: &mut header::HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// One side of a connection: the stream and what was read from it but not yet used.
struct Side {
    stream: TcpStream,
    buf: BytesMut,
}

impl Side {
    fn new(stream: TcpStream) -> Self {
        Side {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.buf.len() >= MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        Ok(self.stream.read_buf(&mut self.buf).await? > 0)
    }

    /// Copies the next `len` bytes of body to `to`, starting with what is buffered.
    async fn copy_body(&mut self, mut len: usize, to: &mut TcpStream) -> io::Result<()> {
        while len > 0 {
            if self.buf.is_empty() && !self.fill().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = len.min(self.buf.len());
            to.write_all(&self.buf[..n]).await?;
            self.buf.advance(n);
            len -= n;
        }
        Ok(())
    }
}

/// What a parsed head says about the message after it.
struct Framing {
    head_len: usize,
    body_len: usize,
    close: bool,
}

/// Appends each header line but the hop-by-hop ones to `out`, and finds the framing.
fn copy_headers(headers: &[httparse::Header<'_>], out: &mut Vec<u8>) -> io::Result<(usize, bool)> {
    let mut body_len = 0;
    let mut close = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
        if HOP_BY_HOP.iter().any(|n| h.name.eq_ignore_ascii_case(n)) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    Ok((body_len, close))
}

/// The length of a parsed head; None while it is incomplete.
fn head_length(parsed: httparse::Result<usize>) -> io::Result<Option<usize>> {
    match parsed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(n) => Ok(Some(n)),
    }
}

/// Parses the request head at the start of `buf` and writes the upstream's head to `out`;
/// None while the head is incomplete.
fn request_head(
    buf: &[u8],
    forwarded_for: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<Option<Framing>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Some(head_len) = head_length(req.parse(buf))? else {
        return Ok(None);
    };
    out.clear();
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let (body_len, close) = copy_headers(req.headers, out)?;
    out.extend_from_slice(b"X-Forwarded-For: ");
    out.extend_from_slice(forwarded_for);
    out.extend_from_slice(b"\r\n\r\n");
    Ok(Some(Framing {
        head_len,
        body_len,
        close,
    }))
}

/// Parses the response head at the start of `buf` and writes the client's head to `out`.
fn response_head(buf: &[u8], out: &mut Vec<u8>) -> io::Result<Option<Framing>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let Some(head_len) = head_length(res.parse(buf))? else {
        return Ok(None);
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(res.code.unwrap_or(502).to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let (body_len, close) = copy_headers(res.headers, out)?;
    out.extend_from_slice(b"\r\n");
    Ok(Some(Framing {
        head_len,
        body_len,
        close,
    }))
}

async fn serve_raw(client: TcpStream, peer: SocketAddr, origin: SocketAddr) -> io::Result<()> {
    let forwarded_for = peer.ip().to_string().into_bytes();
    let mut client = Side::new(client);
    let mut upstream: Option<Side> = None;
    let mut out = Vec::with_capacity(4096);
    loop {
        let request = loop {
            match request_head(&client.buf, &forwarded_for, &mut out) {
                Ok(Some(f)) => break f,
                Ok(None) if client.fill().await? => {}
                Ok(None) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    client
                        .stream
                        .write_all(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        };
        client.buf.advance(request.head_len);
        let up = match &mut upstream {
            Some(u) => u,
            None => upstream.insert(Side::new(connect(origin).await?)),
        };
        // The head and as much of the body as was read with it, in one write.
        let first = request.body_len.min(client.buf.len());
        out.extend_from_slice(&client.buf[..first]);
        client.buf.advance(first);
        up.stream.write_all(&out).await?;
        client
            .copy_body(request.body_len - first, &mut up.stream)
            .await?;

        let response = loop {
            match response_head(&up.buf, &mut out)? {
                Some(f) => break f,
                None if up.fill().await? => {}
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        };
        up.buf.advance(response.head_len);
        let first = response.body_len.min(up.buf.len());
        out.extend_from_slice(&up.buf[..first]);
        up.buf.advance(first);
        client.stream.write_all(&out).await?;
        up.copy_body(response.body_len - first, &mut client.stream)
            .await?;
        if response.close {
            upstream = None;
        }
        if request.close {
            return Ok(());
        }
    }
}
