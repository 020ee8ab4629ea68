//! HTTP/1.1 Upgrade (WebSocket) end to end, with raw sockets on both sides so that the test
//! sees every byte: a client that writes its handshake, and an origin that records what
//! reaches it and when.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What the origin saw of one connection.
#[derive(Debug)]
enum Seen {
    /// The request head.
    Head(String),
    /// Bytes that arrived after the head and before the origin answered.
    BeforeAnswer(Vec<u8>),
}

/// An origin that answers an upgrade request with 101 after `delay` (or with a 200 when the
/// path is /refuse), then echoes every byte back in upper case, and says "bye" when the
/// client half-closes.
async fn upgrade_origin(delay: Duration) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let mut early = head.split_off(end);
                let head = String::from_utf8_lossy(&head).to_string();
                let refuse = head.starts_with("GET /refuse");
                let _ = tx.send(Seen::Head(head));
                // Whatever else arrives before the answer is a byte that should not have.
                let deadline = tokio::time::Instant::now() + delay;
                while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    early.extend_from_slice(&buf[..n]);
                }
                let _ = tx.send(Seen::BeforeAnswer(early));
                if refuse {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nno, ok\n")
                        .await;
                    return;
                }
                s.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n",
                )
                .await
                .unwrap();
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        let _ = s.write_all(b"bye").await;
                        let _ = s.shutdown().await;
                        return;
                    }
                    let upper: Vec<u8> = buf[..n].iter().map(u8::to_ascii_uppercase).collect();
                    if s.write_all(&upper).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

const HANDSHAKE: &str = "GET /chat HTTP/1.1\r\nhost: chat.test\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n";

/// Reads until the end of a response head; returns it and any bytes after it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = got.split_off(end + 4);
            return (String::from_utf8_lossy(&got).to_string(), rest);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("a response head in time")
            .unwrap();
        assert!(n > 0, "closed before a response head: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

async fn read_exactly(s: &mut TcpStream, mut have: Vec<u8>, n: usize) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    while have.len() < n {
        let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("bytes in time")
            .unwrap();
        assert!(got > 0, "closed after {have:?}");
        have.extend_from_slice(&buf[..got]);
    }
    have
}

#[tokio::test]
async fn a_websocket_is_tunnelled_both_ways_until_each_side_closes() {
    let (origin, mut seen) = upgrade_origin(Duration::ZERO).await;
    let port = free_port();
    let d = Drover::start(&one_service(port, &[(origin, 1)])).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(HANDSHAKE.as_bytes()).await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 101"), "{head}");
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    let Some(Seen::Head(upstream_head)) = seen.recv().await else {
        panic!("the origin saw no head");
    };
    let upstream_lower = upstream_head.to_ascii_lowercase();
    assert!(
        upstream_lower.contains("upgrade: websocket"),
        "{upstream_head}"
    );
    assert!(
        upstream_lower.contains("connection: upgrade"),
        "{upstream_head}"
    );
    assert!(
        upstream_lower.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        "{upstream_head}"
    );
    assert!(
        upstream_lower.contains("x-forwarded-for: 127.0.0.1"),
        "{upstream_head}"
    );

    let (_, view) = d.api("GET", "/api/v1/services/web", None).await;
    assert_eq!(
        view["endpoints"][0]["in_flight"], 1,
        "the open tunnel: {view}"
    );
    for message in ["hello", "a second message", &"x".repeat(100_000)] {
        s.write_all(message.as_bytes()).await.unwrap();
        let echoed = read_exactly(&mut s, Vec::new(), message.len()).await;
        assert_eq!(echoed, message.to_ascii_uppercase().as_bytes());
    }
    assert!(rest.is_empty());
    // The client's half-close reaches the origin, which still answers on its side.
    s.shutdown().await.unwrap();
    let mut tail = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut tail))
        .await
        .expect("the tunnel ends")
        .unwrap();
    assert_eq!(tail, b"bye");
    // The tunnel counted as a request in flight at its endpoint until it ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, view) = d.api("GET", "/api/v1/services/web", None).await;
        if view["endpoints"][0]["in_flight"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tunnel never ended: {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn no_byte_after_the_upgrade_request_reaches_the_upstream_before_its_101() {
    let (origin, mut seen) = upgrade_origin(Duration::from_millis(300)).await;
    let port = free_port();
    let _d = Drover::start(&one_service(port, &[(origin, 1)])).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The handshake and the first bytes of the new protocol in one write.
    s.write_all(format!("{HANDSHAKE}early bytes").as_bytes())
        .await
        .unwrap();
    assert!(matches!(seen.recv().await, Some(Seen::Head(_))));
    let Some(Seen::BeforeAnswer(early)) = seen.recv().await else {
        panic!("the origin did not report");
    };
    assert!(
        early.is_empty(),
        "{:?} reached the upstream before its 101",
        String::from_utf8_lossy(&early)
    );
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // After the 101 they go through.
    let echoed = read_exactly(&mut s, rest, "early bytes".len()).await;
    assert_eq!(echoed, b"EARLY BYTES");
}

/// Asks to switch on a path the origin refuses, and checks that its answer comes back as an
/// ordinary response on the still-open connection.
async fn ask_and_be_refused(s: &mut TcpStream) {
    s.write_all(HANDSHAKE.replace("/chat", "/refuse").as_bytes())
        .await
        .unwrap();
    let (head, rest) = read_head(s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exactly(s, rest, 7).await, b"no, ok\n");
}

#[tokio::test]
async fn an_upstream_that_refuses_the_upgrade_answers_as_usual() {
    let (origin, _seen) = upgrade_origin(Duration::ZERO).await;
    let port = free_port();
    let _d = Drover::start(&one_service(port, &[(origin, 1)])).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    ask_and_be_refused(&mut s).await;
}

/// A connection switches after it was refused an upgrade, and after it idled long enough
/// (100 ms) to give up its HTTP buffers: the handshake that ends the wait, and the bytes after
/// it, reach the tunnel.
#[tokio::test]
async fn a_connection_refused_an_upgrade_that_idles_can_still_switch() {
    let (origin, _seen) = upgrade_origin(Duration::ZERO).await;
    let port = free_port();
    let _d = Drover::start(&one_service(port, &[(origin, 1)])).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    ask_and_be_refused(&mut s).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(format!("{HANDSHAKE}after a wait").as_bytes())
        .await
        .unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let echoed = read_exactly(&mut s, rest, "after a wait".len()).await;
    assert_eq!(echoed, b"AFTER A WAIT");
}

#[tokio::test]
async fn an_upgrade_to_a_dead_endpoint_goes_to_a_live_one() {
    let (origin, _seen) = upgrade_origin(Duration::ZERO).await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = free_port();
    let _d = Drover::start(&one_service(port, &[(dead, 1), (origin, 1)])).await;
    for _ in 0..4 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(HANDSHAKE.as_bytes()).await.unwrap();
        let (head, _) = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    }
}
