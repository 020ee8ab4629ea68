//! gRPC and HTTP/2 trailers end to end: a tonic server on h2c behind drover (a service with
//! `upstream_protocol = "http2"`), and tonic and hyper clients on h2c (and HTTP/1.1 for the
//! trailers) through drover's listener. Messages are hand-written prost structs; the server
//! is tonic's `server::Grpc` under hyper's HTTP/2 server, the client `client::Grpc` over a
//! tonic `Channel`.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::tokio_stream::{Stream, StreamExt};
use tonic::codegen::{BoxFuture, Service, http::uri::PathAndQuery};
use tonic::{Code, Status, Streaming};
use tonic_prost::ProstCodec;

/// The one message type of the test service.
#[derive(Clone, PartialEq, prost::Message)]
struct Note {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "2")]
    n: u32,
}

fn note(text: &str, n: u32) -> Note {
    Note {
        text: text.into(),
        n,
    }
}

type Codec = ProstCodec<Note, Note>;
type NoteStream = Pin<Box<dyn Stream<Item = Result<Note, Status>> + Send>>;

/// `/test.Notes/Say`: "hello, NAME"; the name "missing" is NOT_FOUND.
#[derive(Clone)]
struct Say;

impl Service<tonic::Request<Note>> for Say {
    type Response = tonic::Response<Note>;
    type Error = Status;
    type Future = BoxFuture<tonic::Response<Note>, Status>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Note>) -> Self::Future {
        Box::pin(async move {
            let name = req.into_inner().text;
            if name == "missing" {
                return Err(Status::not_found("no note named missing"));
            }
            Ok(tonic::Response::new(note(&format!("hello, {name}"), 0)))
        })
    }
}

/// `/test.Notes/Count`: n notes 0..n; the first alone, the rest once `release` is notified,
/// so that a client that sees the first before releasing proves nothing was held back. With
/// text "fail", two notes and then the status ABORTED (in the trailers).
#[derive(Clone)]
struct Count {
    release: Arc<Notify>,
}

impl Service<tonic::Request<Note>> for Count {
    type Response = tonic::Response<NoteStream>;
    type Error = Status;
    type Future = BoxFuture<tonic::Response<NoteStream>, Status>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Note>) -> Self::Future {
        let release = self.release.clone();
        Box::pin(async move {
            let ask = req.into_inner();
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                if ask.text == "fail" {
                    for i in 0..2 {
                        let _ = tx.send(Ok(note("item", i))).await;
                    }
                    let _ = tx.send(Err(Status::aborted("stopped after 2"))).await;
                    return;
                }
                let _ = tx.send(Ok(note("item", 0))).await;
                release.notified().await;
                for i in 1..ask.n {
                    let _ = tx.send(Ok(note("item", i))).await;
                }
            });
            Ok(tonic::Response::new(
                Box::pin(ReceiverStream::new(rx)) as NoteStream
            ))
        })
    }
}

/// `/test.Notes/Sum`: client streaming; the sum of the notes' n.
#[derive(Clone)]
struct Sum;

impl Service<tonic::Request<Streaming<Note>>> for Sum {
    type Response = tonic::Response<Note>;
    type Error = Status;
    type Future = BoxFuture<tonic::Response<Note>, Status>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Streaming<Note>>) -> Self::Future {
        Box::pin(async move {
            let mut notes = req.into_inner();
            let (mut sum, mut count) = (0, 0);
            while let Some(n) = notes.message().await? {
                sum += n.n;
                count += 1;
            }
            Ok(tonic::Response::new(note(&format!("{count} notes"), sum)))
        })
    }
}

/// `/test.Notes/Echo`: bidirectional; each note back with its text in upper case, as it comes.
#[derive(Clone)]
struct Echo;

impl Service<tonic::Request<Streaming<Note>>> for Echo {
    type Response = tonic::Response<NoteStream>;
    type Error = Status;
    type Future = BoxFuture<tonic::Response<NoteStream>, Status>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::Request<Streaming<Note>>) -> Self::Future {
        Box::pin(async move {
            let out = req
                .into_inner()
                .map(|n| n.map(|n| note(&n.text.to_uppercase(), n.n)));
            Ok(tonic::Response::new(Box::pin(out) as NoteStream))
        })
    }
}

/// A gRPC server on h2c; returns its address, the notifier that releases `Count`, and the
/// number of connections it accepted.
async fn grpc_origin() -> (SocketAddr, Arc<Notify>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(Notify::new());
    let count = Count {
        release: release.clone(),
    };
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            let count = count.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let count = count.clone();
                async move {
                    let mut grpc = tonic::server::Grpc::new(Codec::default());
                    let response = match req.uri().path() {
                        "/test.Notes/Say" => grpc.unary(Say, req).await,
                        "/test.Notes/Count" => grpc.server_streaming(count, req).await,
                        "/test.Notes/Sum" => grpc.client_streaming(Sum, req).await,
                        "/test.Notes/Echo" => grpc.streaming(Echo, req).await,
                        _ => Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, release, accepted)
}

fn http2_service(port: u16, origin: SocketAddr) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
service = "grpc"

[services.grpc]
upstream_protocol = "http2"
endpoints = [ {{ address = "{origin}" }} ]
"#
    )
}

/// A tonic client on h2c to drover's listener.
async fn grpc_client(port: u16) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .expect("h2c connection to drover");
    tonic::client::Grpc::new(channel)
}

fn path(method: &str) -> PathAndQuery {
    PathAndQuery::try_from(format!("/test.Notes/{method}")).unwrap()
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn grpc_unary_streaming_and_error_calls_pass_through_drover() {
    let (origin, release, accepted) = grpc_origin().await;
    let port = free_port();
    let _drover = Drover::start(&http2_service(port, origin)).await;
    let mut client = grpc_client(port).await;

    // Unary.
    client.ready().await.unwrap();
    let reply = client
        .unary(
            tonic::Request::new(note("drover", 0)),
            path("Say"),
            Codec::default(),
        )
        .await
        .expect("unary call succeeds");
    assert_eq!(reply.into_inner().text, "hello, drover");

    // An error status, sent by tonic as a trailers-only response.
    client.ready().await.unwrap();
    let status = client
        .unary(
            tonic::Request::new(note("missing", 0)),
            path("Say"),
            Codec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no note named missing");

    // Server streaming: the first note arrives while the server still holds the others.
    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(
            tonic::Request::new(note("count", 5)),
            path("Count"),
            Codec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the first note arrives before the server sends the rest")
        .unwrap()
        .unwrap();
    assert_eq!(first.n, 0);
    release.notify_one();
    let mut seen = vec![first.n];
    while let Some(n) = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        seen.push(n.n);
    }
    assert_eq!(seen, [0, 1, 2, 3, 4], "every note, in order");
    // The OK status came in the trailers.
    assert!(stream.trailers().await.unwrap().is_some());

    // A status after some messages comes in the trailers.
    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(
            tonic::Request::new(note("fail", 0)),
            path("Count"),
            Codec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().n, 0);
    assert_eq!(stream.message().await.unwrap().unwrap().n, 1);
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "stopped after 2");

    // Client streaming.
    client.ready().await.unwrap();
    let notes = tonic::codegen::tokio_stream::iter([1, 2, 3, 4].map(|n| note("x", n)));
    let total = client
        .client_streaming(tonic::Request::new(notes), path("Sum"), Codec::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((total.text.as_str(), total.n), ("4 notes", 10));

    // Bidirectional, in lock step: each answer must come back before the next note is sent,
    // which only works if both directions stream.
    client.ready().await.unwrap();
    let (tx, rx) = mpsc::channel(1);
    let mut answers = client
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            path("Echo"),
            Codec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    for (i, word) in ["one", "two", "three"].into_iter().enumerate() {
        tx.send(note(word, i as u32)).await.unwrap();
        let back = tokio::time::timeout(WAIT, answers.message())
            .await
            .expect("each echo arrives while the call is still open")
            .unwrap()
            .unwrap();
        assert_eq!(back.text, word.to_uppercase());
    }
    drop(tx);
    assert!(answers.message().await.unwrap().is_none());

    // Concurrent calls share drover's one HTTP/2 connection to the origin.
    let calls = (0..20).map(|i| {
        let mut client = client.clone();
        async move {
            client.ready().await.unwrap();
            client
                .unary(
                    tonic::Request::new(note(&format!("n{i}"), 0)),
                    path("Say"),
                    Codec::default(),
                )
                .await
                .unwrap()
                .into_inner()
                .text
        }
    });
    let replies = futures_join(calls).await;
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply, &format!("hello, n{i}"));
    }
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        1,
        "every call went over one multiplexed upstream connection"
    );
}

/// Runs futures at once, results in order.
async fn futures_join<F: std::future::Future<Output = String> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<String> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// An HTTP/2 origin that answers every request with a body and trailers: the body says what
/// it received (the request trailer `x-client-sum`, if any), the trailers carry
/// `x-checksum: 42`, and the response declares them in `Trailer` for HTTP/1.1 clients.
async fn trailer_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let version = format!("{:?}", req.version());
                let collected = req.into_body().collect().await.unwrap();
                let client_sum = collected
                    .trailers()
                    .and_then(|t| t.get("x-client-sum"))
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_else(|| "none".into());
                let mut trailers = HeaderMap::new();
                trailers.insert("x-checksum", HeaderValue::from_static("42"));
                let frames = vec![
                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                        "{version} client-sum={client_sum}"
                    )))),
                    Ok(Frame::trailers(trailers)),
                ];
                let body = StreamBody::new(tonic::codegen::tokio_stream::iter(frames));
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("trailer", "x-checksum")
                        .body(body)
                        .unwrap(),
                )
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn trailers_pass_both_ways_over_http2_and_to_http1_clients_that_ask() {
    let origin = trailer_origin().await;
    let port = free_port();
    let _drover = Drover::start(&http2_service(port, origin)).await;
    let drover: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // h2c client: sends a request trailer, gets the response trailer.
    let stream = TcpStream::connect(drover).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut request_trailers = HeaderMap::new();
    request_trailers.insert("x-client-sum", HeaderValue::from_static("7"));
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(request_trailers)),
    ];
    let req = Request::post(format!("http://127.0.0.1:{port}/sum"))
        .body(StreamBody::new(tonic::codegen::tokio_stream::iter(frames)))
        .unwrap();
    let res = h2
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", _drover.log_text()));
    assert_eq!(res.status(), StatusCode::OK);
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("response trailers");
    assert_eq!(trailers["x-checksum"], "42");
    assert_eq!(
        collected.to_bytes(),
        "HTTP/2.0 client-sum=7",
        "the origin got HTTP/2 and the request trailer"
    );

    // HTTP/1.1 client that sent `TE: trailers`: a chunked body with the trailer.
    let stream = TcpStream::connect(drover).await.unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/plain")
        .header("host", "example.test")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = h1.send_request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["transfer-encoding"], "chunked");
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("HTTP/1.1 trailers");
    assert_eq!(trailers["x-checksum"], "42");
    assert_eq!(collected.to_bytes(), "HTTP/2.0 client-sum=none");
}
