//! Limits on what one client can hold: header count and size, the header deadline, request
//! bodies per route, connections per listener and overall, and header names with
//! underscores. Raw bytes on real sockets against the real binary.

mod raw;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use raw::*;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const QUIET: Duration = Duration::from_millis(1500);

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn request_with_headers(count: usize, value_len: usize) -> String {
    // `host` is one of the `count`.
    let mut req = String::from("GET /h HTTP/1.1\r\nhost: a\r\n");
    for i in 1..count {
        req.push_str(&format!("x-h{i}: {}\r\n", "v".repeat(value_len)));
    }
    req.push_str("\r\n");
    req
}

#[tokio::test]
async fn more_than_100_header_fields_get_431() {
    let origin = Recorder::start().await;
    let port = free_port();
    let _d = Drover::start(&config(port, origin.addr, "", "")).await;
    let ok = send_raw(addr(port), request_with_headers(100, 4).as_bytes(), QUIET).await;
    assert_eq!(ok.status(), 200, "100 fields pass: {}", ok.text());
    let refused = send_raw(addr(port), request_with_headers(101, 4).as_bytes(), QUIET).await;
    assert_eq!(refused.status(), 431, "{}", refused.text());
    assert!(refused.closed);
    assert_eq!(origin.seen().len(), 1);
}

#[tokio::test]
async fn a_request_head_over_32_kib_gets_431() {
    let origin = Recorder::start().await;
    let port = free_port();
    let _d = Drover::start(&config(port, origin.addr, "", "")).await;
    // 30 fields of 1,000 bytes: about 30 KiB, under the limit.
    let ok = send_raw(addr(port), request_with_headers(31, 1000).as_bytes(), QUIET).await;
    assert_eq!(ok.status(), 200, "{}", ok.text());
    // 34 fields of 1,000 bytes: over 32 KiB.
    let refused = send_raw(addr(port), request_with_headers(35, 1000).as_bytes(), QUIET).await;
    assert_eq!(refused.status(), 431, "{}", refused.text());
    assert!(refused.closed);
    // One field alone larger than the limit.
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "b".repeat(40_000)
    );
    let refused = send_raw(addr(port), huge.as_bytes(), QUIET).await;
    assert_eq!(refused.status(), 431, "{}", refused.text());
    assert_eq!(origin.seen().len(), 1);
}

/// Settings under hyper's 8 KiB buffer floor are enforced too.
#[tokio::test]
async fn configured_header_limits_apply() {
    let origin = Recorder::start().await;
    let port = free_port();
    let _d = Drover::start(&config(
        port,
        origin.addr,
        "max_header_count = 10\nmax_header_bytes = 2048",
        "",
    ))
    .await;
    let ok = send_raw(addr(port), request_with_headers(10, 4).as_bytes(), QUIET).await;
    assert_eq!(ok.status(), 200, "{}", ok.text());
    let many = send_raw(addr(port), request_with_headers(11, 4).as_bytes(), QUIET).await;
    assert_eq!(many.status(), 431, "{}", many.text());
    let big = send_raw(addr(port), request_with_headers(5, 600).as_bytes(), QUIET).await;
    assert_eq!(big.status(), 431, "3 KiB head over 2 KiB: {}", big.text());
    assert_eq!(origin.seen().len(), 1);
}

/// A client that sends its head one byte at a time is cut off at the header deadline,
/// counted from the first byte, however steadily it drips.
#[tokio::test]
async fn a_client_dripping_its_head_is_closed_at_the_header_deadline() {
    let origin = Recorder::start().await;
    let port = free_port();
    let _d = Drover::start(&config(
        port,
        origin.addr,
        "request_header_timeout = \"2s\"",
        "",
    ))
    .await;
    let mut s = TcpStream::connect(addr(port)).await.unwrap();
    let head =
        b"GET /drip HTTP/1.1\r\nhost: a\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    let mut closed_at = None;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        // Has drover closed it?
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(250), s.peek(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(started.elapsed());
                break;
            }
            _ => {}
        }
    }
    let closed_at = closed_at.expect("drover closed the connection before the head was whole");
    assert!(
        closed_at >= Duration::from_millis(1900) && closed_at < Duration::from_millis(3500),
        "closed after {closed_at:?}, the deadline is 2 s"
    );
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn a_body_over_the_route_limit_gets_413() {
    let origin = Recorder::start().await;
    let port = free_port();
    let _d = Drover::start(&config(port, origin.addr, "", "max_request_body = 10")).await;
    let ok = send_raw(
        addr(port),
        b"POST /small HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n0123456789",
        QUIET,
    )
    .await;
    assert_eq!(ok.status(), 200, "{}", ok.text());
    let announced = send_raw(
        addr(port),
        b"POST /big HTTP/1.1\r\nhost: a\r\ncontent-length: 11\r\n\r\n0123456789A",
        QUIET,
    )
    .await;
    assert_eq!(announced.status(), 413, "{}", announced.text());
    // Chunked: the limit is found while the body streams; the upstream request is aborted.
    let streamed = send_raw(
        addr(port),
        b"POST /chunked HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n6\r\n012345\r\n6\r\n6789AB\r\n0\r\n\r\n",
        QUIET,
    )
    .await;
    assert_eq!(streamed.status(), 413, "{}", streamed.text());
    let chunked_ok = send_raw(
        addr(port),
        b"POST /chunked-ok HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n",
        QUIET,
    )
    .await;
    assert_eq!(chunked_ok.status(), 200, "{}", chunked_ok.text());
    let bodies: Vec<(String, bytes::Bytes)> = origin
        .seen()
        .into_iter()
        .map(|s| (s.target, s.body))
        .collect();
    assert_eq!(
        bodies,
        [
            ("/small".to_string(), bytes::Bytes::from("0123456789")),
            ("/chunked-ok".to_string(), bytes::Bytes::from("0123456789")),
        ],
        "no request over the limit reached the origin whole"
    );
}

/// Opens `n` connections that each complete one request, and keeps them open.
async fn hold(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /held HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let r = read_reply(&mut s, Duration::from_millis(300)).await;
        assert_eq!(r.status(), 200, "{}", r.text());
        held.push(s);
    }
    held
}

/// The connection after the cap waits, unserved, until one of the others closes.
async fn the_next_one_waits(addr: SocketAddr, held: &mut Vec<TcpStream>) {
    let mut next = TcpStream::connect(addr).await.unwrap();
    next.write_all(b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let r = read_reply(&mut next, Duration::from_secs(1)).await;
    assert!(
        r.bytes.is_empty() && !r.closed,
        "not served while at the cap: {}",
        r.text()
    );
    held.pop();
    let r = read_reply(&mut next, Duration::from_secs(2)).await;
    assert_eq!(r.status(), 200, "served once a slot freed: {}", r.text());
}

#[tokio::test]
async fn a_listener_at_its_connection_cap_serves_the_next_client_when_one_leaves() {
    let origin = Recorder::start().await;
    let port = free_port();
    let _d = Drover::start(&config(port, origin.addr, "max_connections = 2", "")).await;
    let mut held = hold(addr(port), 2).await;
    the_next_one_waits(addr(port), &mut held).await;
}

#[tokio::test]
async fn the_global_connection_cap_spans_listeners() {
    let origin = Recorder::start().await;
    let (p1, p2) = (free_port(), free_port());
    let cfg = format!(
        r#"
[global]
max_connections = 2

[[listeners]]
name = "one"
listen = "127.0.0.1:{p1}"

[[listeners]]
name = "two"
listen = "127.0.0.1:{p2}"

[[routes]]
listener = "one"
service = "web"

[[routes]]
listener = "two"
service = "web"

[services.web]
endpoints = [ {{ address = "{}" }} ]
"#,
        origin.addr
    );
    let _d = Drover::start(&cfg).await;
    let mut held = hold(addr(p1), 1).await;
    held.extend(hold(addr(p2), 1).await);
    // Either listener: both are at the process-wide cap.
    the_next_one_waits(addr(p1), &mut held).await;
}

#[tokio::test]
async fn header_names_with_underscores_are_rejected_dropped_or_allowed() {
    let origin = Recorder::start().await;
    let req = b"GET /u HTTP/1.1\r\nhost: a\r\nx_forwarded_for: 6.6.6.6\r\nx-kept: 1\r\n\r\n";
    for (setting, status, forwarded) in [
        ("", 400, None),
        ("underscores_in_headers = \"reject\"", 400, None),
        ("underscores_in_headers = \"drop\"", 200, Some(false)),
        ("underscores_in_headers = \"allow\"", 200, Some(true)),
    ] {
        let before = origin.seen().len();
        let port = free_port();
        let _d = Drover::start(&config(port, origin.addr, setting, "")).await;
        let r = send_raw(addr(port), req, QUIET).await;
        assert_eq!(r.status(), status, "{setting:?}: {}", r.text());
        let seen = origin.seen();
        match forwarded {
            None => assert_eq!(seen.len(), before, "{setting:?}: nothing forwarded"),
            Some(kept) => {
                let last = seen.last().unwrap();
                assert_eq!(
                    last.headers.contains_key("x_forwarded_for"),
                    kept,
                    "{setting:?}"
                );
                assert_eq!(last.headers["x-kept"], "1");
            }
        }
    }
}
