//! Request smuggling and response splitting: raw bytes in, and what the client and the
//! origin see. Each case is one a proxy in front of another parser must not let through
//! (HAProxy's reg-tests and the HTTP/1 desync papers are the anchors).

mod raw;
mod support;

use std::time::Duration;

use raw::*;
use support::*;

const QUIET: Duration = Duration::from_millis(1500);

async fn setup() -> (Drover, Recorder, std::net::SocketAddr) {
    let origin = Recorder::start().await;
    let port = free_port();
    let drover = Drover::start(&config(port, origin.addr, "", "")).await;
    (drover, origin, format!("127.0.0.1:{port}").parse().unwrap())
}

/// Sends each request on a connection of its own; each must get 400.
async fn each_gets_400<R: AsRef<str>>(
    addr: std::net::SocketAddr,
    requests: impl IntoIterator<Item = R>,
) {
    for req in requests {
        let req = req.as_ref();
        let reply = send_raw(addr, req.as_bytes(), QUIET).await;
        assert_eq!(reply.status(), 400, "{req:?}: {}", reply.text());
    }
}

/// Content-Length beside Transfer-Encoding, in either order: hyper frames the body by the
/// chunks alone, drops the Content-Length, and closes the connection after the response, so
/// the bytes after the chunked body are never read as a second request.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_framed_by_the_chunks_and_the_connection_closed() {
    let (_d, origin, addr) = setup().await;
    for (i, head) in [
        "content-length: 6\r\ntransfer-encoding: chunked",
        "transfer-encoding: chunked\r\ncontent-length: 6",
    ]
    .iter()
    .enumerate()
    {
        let req = format!(
            "POST /first{i} HTTP/1.1\r\nhost: a\r\n{head}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n"
        );
        let reply = send_raw(addr, req.as_bytes(), QUIET).await;
        assert_eq!(reply.statuses(), [200], "{}", reply.text());
        assert!(reply.closed, "the connection is closed after the response");
    }
    let seen = origin.seen();
    assert_eq!(
        origin.targets(),
        ["/first0", "/first1"],
        "no smuggled request"
    );
    for s in seen {
        assert!(
            s.body.is_empty(),
            "the chunked body was empty: {:?}",
            s.body
        );
        assert_ne!(
            s.headers.get("content-length").map(|v| v.as_bytes()),
            Some(&b"6"[..]),
            "the client's Content-Length is not forwarded"
        );
    }
}

#[tokio::test]
async fn transfer_encodings_other_than_one_chunked_get_400() {
    let (_d, origin, addr) = setup().await;
    let requests = [
        "transfer-encoding: chunked, chunked",
        "transfer-encoding: gzip",
        "transfer-encoding: chunked, gzip",
        "transfer-encoding: gzip, chunked",
        "transfer-encoding: chunked\r\ntransfer-encoding: chunked",
        "transfer-encoding: identity",
        "transfer-encoding: xchunked",
    ]
    .map(|te| format!("POST /te HTTP/1.1\r\nhost: a\r\n{te}\r\n\r\n0\r\n\r\n"));
    each_gets_400(addr, requests).await;
    assert!(origin.targets().is_empty(), "{:?}", origin.targets());
}

#[tokio::test]
async fn transfer_encoding_on_http_1_0_gets_400() {
    let (_d, origin, addr) = setup().await;
    let reply = send_raw(
        addr,
        b"POST /old HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        QUIET,
    )
    .await;
    assert_eq!(reply.status(), 400, "{}", reply.text());
    assert!(origin.targets().is_empty());
}

#[tokio::test]
async fn bad_content_lengths_get_400() {
    let (_d, origin, addr) = setup().await;
    let requests = [
        "content-length: 5\r\ncontent-length: 6",
        "content-length: 5, 6",
        "content-length: 5, 5",
        "content-length: ",
        "content-length: +5",
        "content-length: -1",
        "content-length: 0x5",
        "content-length: 5 5",
        "content-length: 99999999999999999999999",
    ]
    .map(|cl| format!("POST /cl HTTP/1.1\r\nhost: a\r\n{cl}\r\n\r\nhello"));
    each_gets_400(addr, requests).await;
    assert!(origin.targets().is_empty(), "{:?}", origin.targets());
}

/// Two Content-Length lines with the same value are one length (RFC 9110 section 8.6 lets a
/// recipient take them as one): the origin gets a single Content-Length and exactly that
/// body, and the bytes after it are the next request, which both sides read alike.
#[tokio::test]
async fn identical_repeated_content_lengths_are_forwarded_as_one() {
    let (_d, origin, addr) = setup().await;
    let reply = send_raw(
        addr,
        b"POST /twice HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        QUIET,
    )
    .await;
    assert_eq!(reply.statuses(), [200, 200], "{}", reply.text());
    let seen = origin.seen();
    assert_eq!(origin.targets(), ["/twice", "/next"]);
    assert_eq!(seen[0].headers.get_all("content-length").iter().count(), 1);
    assert_eq!(seen[0].body, "hello");
}

#[tokio::test]
async fn malformed_header_lines_get_400() {
    let (_d, origin, addr) = setup().await;
    let fields = [
        ": empty-name",
        "x-folded: a\r\n  b",
        "x-folded: a\r\n\tb",
        "host : spaced",
        "x-bad\tname: 1",
        "x-nul: a\0b",
        "no-colon",
    ]
    .map(|line| format!("GET /h HTTP/1.1\r\nhost: a\r\n{line}\r\n\r\n"));
    each_gets_400(addr, fields).await;
    // A bare LF as the line end, and a request line with two spaces.
    let lines = [
        "GET /h HTTP/1.1\r\nhost: a\rx-cr: 1\r\n\r\n",
        "GET  /h HTTP/1.1\r\nhost: a\r\n\r\n",
        "GET /h HTTP/1.1 extra\r\nhost: a\r\n\r\n",
        "GET /h HTTP/9.9\r\nhost: a\r\n\r\n",
    ];
    each_gets_400(addr, lines).await;
    assert!(origin.targets().is_empty(), "{:?}", origin.targets());
}

/// A chunk size that overflows 64 bits: the request fails without a panic or a wrap-around,
/// the origin never gets a complete request, and drover keeps serving.
#[tokio::test]
async fn an_oversized_chunk_size_is_refused_without_overflow() {
    let (_d, origin, addr) = setup().await;
    for size in [
        "fffffffffffffffff",
        "10000000000000000",
        "ffffffffffffffff0",
    ] {
        let req = format!(
            "POST /chunk HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n"
        );
        let reply = send_raw(addr, req.as_bytes(), QUIET).await;
        assert_eq!(reply.status(), 400, "{size}: {}", reply.text());
        assert!(reply.closed, "the connection is closed after it");
    }
    assert!(
        origin.seen().iter().all(|s| s.body.is_empty()),
        "no body with the bad chunk reached the origin: {:?}",
        origin.seen()
    );
    let (status, _, _) = get(&client(), &format!("http://{addr}/after")).await;
    assert_eq!(status, 200, "still serving");
}

/// An upstream answer whose framing is ambiguous is never passed on: the client gets 502.
#[tokio::test]
async fn an_upstream_response_with_bad_framing_becomes_502() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nx-folded: a\r\n b\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 2000 OK\r\ncontent-length: 5\r\n\r\nhello",
    ] {
        let origin = scripted_origin(answer).await;
        let port = free_port();
        let _d = Drover::start(&config(port, origin, "", "")).await;
        let reply = send_raw(
            format!("127.0.0.1:{port}").parse().unwrap(),
            b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
            QUIET,
        )
        .await;
        let text = reply.text();
        assert_eq!(
            reply.status(),
            502,
            "{}: {text}",
            String::from_utf8_lossy(answer)
        );
        assert!(!text.contains("hello"), "nothing of it forwarded: {text}");
    }
}

/// A bad chunk after a good head: the head is already on its way, so the client gets an
/// incomplete message (no last chunk, connection closed), never a complete one.
#[tokio::test]
async fn a_bad_chunk_after_the_upstream_head_leaves_the_client_an_incomplete_response() {
    let origin = scripted_origin(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
    )
    .await;
    let port = free_port();
    let _d = Drover::start(&config(port, origin, "", "")).await;
    let reply = send_raw(
        format!("127.0.0.1:{port}").parse().unwrap(),
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
        QUIET,
    )
    .await;
    let text = reply.text();
    assert!(reply.closed, "the connection is closed: {text}");
    assert!(!text.contains("world"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "no last chunk, so the client knows it is cut: {text:?}"
    );
}
