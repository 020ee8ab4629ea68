//! Raw-bytes tools for the hardening tests: a client that writes exact bytes and reads
//! whatever comes back, an origin that records every request that reaches it, and an origin
//! that answers with exact bytes.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What came back on a raw connection.
#[derive(Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
    /// Whether the server closed the connection (EOF or reset) before we stopped waiting.
    pub closed: bool,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).to_string()
    }

    /// The status codes of every response head in the reply, in order.
    pub fn statuses(&self) -> Vec<u16> {
        let text = self.text();
        let mut out = Vec::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("HTTP/1.") {
            let line = &rest[at..];
            if let Some(code) = line.get(9..12).and_then(|c| c.parse().ok()) {
                out.push(code);
            }
            rest = &rest[at + 8..];
        }
        out
    }

    /// The single status of a reply that must hold exactly one response.
    pub fn status(&self) -> u16 {
        let s = self.statuses();
        assert_eq!(s.len(), 1, "expected one response, got {:?}", self.text());
        s[0]
    }
}

/// Writes `bytes` on a new connection and reads until the server closes it, or until
/// nothing has arrived for `quiet`.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8], quiet: Duration) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_reply(&mut s, quiet).await
}

/// Reads until EOF, a reset, or `quiet` without a byte.
pub async fn read_reply(s: &mut TcpStream, quiet: Duration) -> Reply {
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Reply {
                    bytes: got,
                    closed: true,
                };
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {
                return Reply {
                    bytes: got,
                    closed: false,
                };
            }
        }
    }
}

/// One request as an origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

/// An origin (HTTP/1.1 and h2c) that records every whole request that reaches it and answers
/// 200 with the body `ok`.
pub struct Recorder {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests whose head arrived, counted before their body is read.
    pub heads: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let heads: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let (s, h) = (seen.clone(), heads.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, h) = (s.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, h) = (s.clone(), h.clone());
                        async move {
                            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            // A request whose body broke off is not a request: only whole
                            // ones are recorded (`heads` counts every head).
                            let Ok(collected) = body.collect().await else {
                                return Ok(Response::new(Full::new(Bytes::new())));
                            };
                            s.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                headers: parts.headers,
                                trailers: collected.trailers().cloned(),
                                body: collected.to_bytes(),
                            });
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let mut server =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    // Room for drover's forwarding headers on top of a client's 100.
                    server.http1().max_headers(200);
                    let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Recorder {
            addr,
            seen,
            heads,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn targets(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.target).collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An origin that reads each request (its head, and a body of a `Content-Length`) and answers
/// with exactly `answer`, then closes. Returns its address.
pub async fn scripted_origin(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                // Whole: a body left unread would make the close a reset.
                let whole = |got: &[u8]| {
                    got.windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .is_some_and(|at| {
                            let head = String::from_utf8_lossy(&got[..at]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                            got.len() >= at + 4 + length
                        })
                };
                while !whole(&head) {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            });
        }
    });
    addr
}

/// A config with one listener on `port` (with `listener_extra` TOML lines) routing everything
/// to one service over `origin` (with `route_extra` lines on the route).
pub fn config(port: u16, origin: SocketAddr, listener_extra: &str, route_extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"
{listener_extra}

[[routes]]
listener = "web"
service = "web"
{route_extra}

[services.web]
endpoints = [ {{ address = "{origin}" }} ]
"#
    )
}
