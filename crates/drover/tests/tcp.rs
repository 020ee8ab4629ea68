//! TCP listeners (layer 4) end to end: raw TCP echo origins that prefix each answer with
//! their name, long-lived client connections under load, an endpoint removed midway, and
//! half-close.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A line echo server: answers each line with `NAME: LINE`, and `NAME: bye` when the client
/// half-closes.
async fn echo(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        while let Ok((s, _)) = listener.accept().await {
            set.spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{name}: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = w.write_all(format!("{name}: bye\n").as_bytes()).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

fn tcp_config(port: u16, endpoints: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        r#"
[[listeners]]
name = "db"
listen = "127.0.0.1:{port}"
protocol = "tcp"

[[routes]]
listener = "db"
service = "db"

[services.db]
policy = "round_robin"
endpoints = [ {} ]
"#,
        endpoints.join(", ")
    )
}

/// Sends a line and reads the answer; returns which origin answered.
async fn ask(
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    r: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    line: &str,
) -> Result<String, String> {
    w.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(5), r.next_line())
        .await
        .map_err(|_| "no answer in 5 s".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("closed")?;
    let (name, echoed) = answer.split_once(": ").ok_or(answer.clone())?;
    if echoed != line {
        return Err(format!("asked {line:?}, got {answer:?}"));
    }
    Ok(name.to_string())
}

#[tokio::test]
async fn connections_are_balanced_and_half_closes_pass_through() {
    let (a, _ta) = echo("a").await;
    let (b, _tb) = echo("b").await;
    let port = free_port();
    let _d = Drover::start(&tcp_config(port, &[a, b])).await;
    let mut seen = BTreeMap::new();
    for i in 0..6 {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r).lines();
        let first = ask(&mut w, &mut r, &format!("hello {i}")).await.unwrap();
        // Every line of one connection goes to the same origin.
        for j in 0..3 {
            assert_eq!(
                ask(&mut w, &mut r, &format!("line {j}")).await.unwrap(),
                first
            );
        }
        *seen.entry(first.clone()).or_insert(0) += 1;
        // The client's half-close reaches the origin, whose last words still come back.
        w.shutdown().await.unwrap();
        let last = tokio::time::timeout(Duration::from_secs(5), r.next_line())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(last, Some(format!("{first}: bye")));
        assert_eq!(r.next_line().await.unwrap(), None);
    }
    assert_eq!(seen, BTreeMap::from([("a".into(), 3), ("b".into(), 3)]));
}

#[tokio::test]
async fn removing_an_endpoint_under_load_breaks_no_connection() {
    let (a, _ta) = echo("a").await;
    let (b, _tb) = echo("b").await;
    let (c, _tc) = echo("c").await;
    let port = free_port();
    let d = Drover::start(&tcp_config(port, &[a, b, c])).await;

    let stop = Arc::new(AtomicBool::new(false));
    let exchanged = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..12 {
        let (stop, exchanged) = (stop.clone(), exchanged.clone());
        clients.push(tokio::spawn(async move {
            let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r).lines();
            let origin = ask(&mut w, &mut r, &format!("client {i}")).await?;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let answered = ask(&mut w, &mut r, &format!("client {i} line {n}")).await?;
                if answered != origin {
                    return Err(format!("client {i} moved from {origin} to {answered}"));
                }
                n += 1;
                exchanged.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, String>(origin)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // c leaves the service; its connections carry on, as HTTP requests in flight do.
    d.write_config(&tcp_config(port, &[a, b]));
    d.wait_generation(2).await;
    let after = Instant::now();
    let mut new_origins = BTreeMap::new();
    for _ in 0..8 {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r).lines();
        let origin = ask(&mut w, &mut r, "new").await.unwrap();
        *new_origins.entry(origin).or_insert(0) += 1;
    }
    assert!(
        !new_origins.contains_key("c"),
        "a removed endpoint gets no new connection: {new_origins:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut origins = BTreeMap::new();
    for c in clients {
        let origin = c
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("a connection broke: {e}"));
        *origins.entry(origin).or_insert(0) += 1;
    }
    eprintln!(
        "{} exchanges over 12 connections; by origin {origins:?}; new after removal {new_origins:?} ({:?} after)",
        exchanged.load(Ordering::Relaxed),
        after.elapsed()
    );
    assert_eq!(
        origins.len(),
        3,
        "the load covered every endpoint: {origins:?}"
    );
    assert!(exchanged.load(Ordering::Relaxed) > 1000);
}

#[tokio::test]
async fn a_dead_endpoint_is_skipped_and_bad_tcp_routes_are_refused() {
    let (a, _ta) = echo("a").await;
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = free_port();
    let d = Drover::start(&tcp_config(port, &[dead, a])).await;
    for _ in 0..4 {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r).lines();
        assert_eq!(ask(&mut w, &mut r, "hi").await.unwrap(), "a");
    }
    // A path on a TCP route cannot be matched: the file is refused, and the old one kept.
    let bad = tcp_config(port, &[a]).replace(
        "listener = \"db\"\nservice",
        "listener = \"db\"\npath_prefix = \"/db\"\nservice",
    );
    d.write_config(&bad);
    let log = d.wait_log("which sees no path", 1).await;
    assert!(log.contains("routes[0]"), "{log}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"still\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"a: still\n");
}

/// An origin that reports the first `n` bytes of each connection on a channel.
async fn recording_origin(n: usize) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; n];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = tx.send(buf);
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn a_service_that_asks_gets_a_proxy_protocol_header_with_the_client_s_address() {
    for version in ["v1", "v2"] {
        // Long enough for either header, then the client's first bytes.
        let (origin, mut got) = recording_origin(if version == "v1" { 48 } else { 33 }).await;
        let port = free_port();
        let config = tcp_config(port, &[origin]).replace(
            "policy = \"round_robin\"",
            &format!("policy = \"round_robin\"\nproxy_protocol = \"{version}\""),
        );
        let _d = Drover::start(&config).await;
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.bind(([127, 0, 0, 9], 0).into()).unwrap();
        let mut s = client.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let from = s.local_addr().unwrap();
        s.write_all(b"hello").await.unwrap();
        let bytes = tokio::time::timeout(Duration::from_secs(5), got.recv())
            .await
            .unwrap()
            .unwrap();
        let expected = if version == "v1" {
            format!("PROXY TCP4 127.0.0.9 127.0.0.1 {} {port}\r\n", from.port()).into_bytes()
        } else {
            let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            v2.extend_from_slice(&[0x21, 0x11, 0, 12, 127, 0, 0, 9, 127, 0, 0, 1]);
            v2.extend_from_slice(&from.port().to_be_bytes());
            v2.extend_from_slice(&port.to_be_bytes());
            v2
        };
        let (header, rest) = bytes.split_at(expected.len());
        assert_eq!(
            header,
            expected,
            "{version}: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        assert!(
            b"hello".starts_with(rest),
            "{version}: then the client's bytes: {rest:?}"
        );
    }
}

#[test]
fn proxy_protocol_on_an_http_listener_is_refused_for_now() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drover.toml");
    let config = one_service(8080, &[("127.0.0.1:9000".parse().unwrap(), 1)])
        .replace("[services.web]", "[services.web]\nproxy_protocol = \"v1\"");
    std::fs::write(&file, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("services.web.proxy_protocol: is sent on TCP listeners only for now"),
        "{err}"
    );
}
