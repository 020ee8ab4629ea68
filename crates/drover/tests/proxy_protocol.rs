//! PROXY protocol received from trusted downstreams (`proxy_protocol_from`), end to end: raw
//! clients that write the headers a load balancer in front of drover would, an echo origin
//! that reports the X-Forwarded-For it gets, and for TCP listeners an origin that records the
//! PROXY header drover sends on.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP listener `web` on `port` that trusts `trusted`, in front of `origin`.
fn config(port: u16, trusted: &str, origin: SocketAddr) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"
proxy_protocol_from = [ {trusted} ]
request_header_timeout = "1s"

[[routes]]
listener = "web"
service = "web"

[services.web]
endpoints = [ {{ address = "{origin}" }} ]
"#
    )
}

/// Sends `prefix` and a GET on a new connection; returns all drover answers before it
/// closes.
async fn exchange(port: u16, prefix: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut sent = prefix.to_vec();
    sent.extend_from_slice(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n");
    // The peer may close before reading it all; that shows in the answer.
    let _ = s.write_all(&sent).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("drover answered or closed within 5 s");
    String::from_utf8_lossy(&answer).into_owned()
}

fn header(answer: &str, name: &str) -> Option<String> {
    answer
        .lines()
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.to_string())
}

/// A version 2 header: PROXY command over TCP, with `body` (addresses and ports).
fn v2(family: u8, body: &[u8], command: u8) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(body);
    h
}

#[tokio::test]
async fn v1_and_v2_headers_from_a_trusted_address_set_the_client_address() {
    let origin = Origin::start("web").await;
    let port = free_port();
    let _d = Drover::start(&config(port, "\"127.0.0.0/8\"", origin.addr)).await;

    let v1 = format!("PROXY TCP4 203.0.113.7 127.0.0.1 51000 {port}\r\n");
    let answer = exchange(port, v1.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        header(&answer, "x-forwarded-for").as_deref(),
        Some("203.0.113.7"),
        "{answer}"
    );

    // v2 over IPv6: 2001:db8::9 port 4000 to 2001:db8::1 port 443.
    let mut body = Vec::new();
    body.extend_from_slice(
        &"2001:db8::9"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    body.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    body.extend_from_slice(&4000u16.to_be_bytes());
    body.extend_from_slice(&443u16.to_be_bytes());
    let answer = exchange(port, &v2(0x21, &body, 1)).await;
    assert_eq!(
        header(&answer, "x-forwarded-for").as_deref(),
        Some("2001:db8::9"),
        "{answer}"
    );
    assert_eq!(
        header(&answer, "x-original-to").as_deref(),
        Some("2001:db8::1"),
        "the header's destination is the address the client connected to"
    );

    // v2 over IPv4 with a TLV after the addresses, which is skipped.
    let mut body = vec![198, 51, 100, 3, 127, 0, 0, 1];
    body.extend_from_slice(&1234u16.to_be_bytes());
    body.extend_from_slice(&port.to_be_bytes());
    body.extend_from_slice(&[0x04, 0, 3, b'a', b'b', b'c']);
    let answer = exchange(port, &v2(0x11, &body, 1)).await;
    assert_eq!(
        header(&answer, "x-forwarded-for").as_deref(),
        Some("198.51.100.3"),
        "{answer}"
    );

    // LOCAL (a health check from the balancer itself): the real peer stands.
    let answer = exchange(port, &v2(0x00, &[], 0)).await;
    assert_eq!(
        header(&answer, "x-forwarded-for").as_deref(),
        Some("127.0.0.1"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_trusted_address_without_a_valid_header_is_closed() {
    let origin = Origin::start("web").await;
    let port = free_port();
    let d = Drover::start(&config(port, "\"127.0.0.1\"", origin.addr)).await;

    // A plain request, a malformed v1 line, an unknown v2 command: closed with no answer.
    let bad_v2 = v2(0x11, &[0; 12], 5);
    for prefix in [&b""[..], b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", &bad_v2] {
        let answer = exchange(port, prefix).await;
        assert_eq!(answer, "", "{:?}", String::from_utf8_lossy(prefix));
    }
    // Silence: closed at the header deadline (1 s here).
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed at the deadline")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let (_, _, metrics) = get(&client(), &format!("http://{}/metrics", d.admin)).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.lines().any(|l| l
            .starts_with("drover_listener_proxy_header_failures_total{listener=\"web\"")
            && l.ends_with(" 4")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_header_from_an_untrusted_address_is_not_read() {
    let origin = Origin::start("web").await;
    let port = free_port();
    let _d = Drover::start(&config(port, "\"10.0.0.0/8\"", origin.addr)).await;
    // The header is taken as the request line, which does not parse.
    let v1 = format!("PROXY TCP4 203.0.113.7 127.0.0.1 51000 {port}\r\n");
    let answer = exchange(port, v1.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(!answer.contains("203.0.113.7"), "{answer}");
    // A normal request is served, with the real peer's address.
    let answer = exchange(port, b"").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        header(&answer, "x-forwarded-for").as_deref(),
        Some("127.0.0.1"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_tcp_listener_sends_the_received_address_upstream() {
    // An origin that reports the first line of each connection, then the next 5 bytes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut byte = [0u8; 1];
                while !got.ends_with(b"\r\n") && s.read_exact(&mut byte).await.is_ok() {
                    got.push(byte[0]);
                }
                let mut rest = [0u8; 5];
                if s.read_exact(&mut rest).await.is_ok() {
                    got.extend_from_slice(&rest);
                }
                let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
            });
        }
    });
    let port = free_port();
    let config = format!(
        r#"
[[listeners]]
name = "db"
listen = "127.0.0.1:{port}"
protocol = "tcp"
proxy_protocol_from = [ "127.0.0.1" ]

[[routes]]
listener = "db"
service = "db"

[services.db]
proxy_protocol = "v1"
endpoints = [ {{ address = "{origin}" }} ]
"#
    );
    let _d = Drover::start(&config).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"PROXY TCP4 198.51.100.4 192.0.2.1 4000 5432\r\nhello")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, "PROXY TCP4 198.51.100.4 192.0.2.1 4000 5432\r\nhello");

    // Without a header, the connection is closed and nothing reaches the origin.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"hello\r\n").await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err()
    );
}

/// A keep-alive connection that idles leaves its task for its listener's lot (see
/// docs/architecture.md), and comes back when its next request begins. It is still the client
/// its PROXY header named, for every request after every wait.
#[tokio::test]
async fn a_parked_connection_keeps_the_addresses_from_its_proxy_header() {
    let origin = Origin::start("web").await;
    let port = free_port();
    let _d = Drover::start(&config(port, "\"127.0.0.0/8\"", origin.addr)).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let proxy = format!("PROXY TCP4 203.0.113.7 192.0.2.1 51000 {port}\r\n");
    s.write_all(proxy.as_bytes()).await.unwrap();
    // No wait, then waits past the first release (10 ms), and past the longest (100 ms).
    for wait_ms in [0, 50, 300, 300] {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(
            header(&answer, "x-forwarded-for").as_deref(),
            Some("203.0.113.7"),
            "after {wait_ms} ms: {answer}"
        );
        assert_eq!(
            header(&answer, "x-original-to").as_deref(),
            Some("192.0.2.1"),
            "after {wait_ms} ms: {answer}"
        );
    }
}
