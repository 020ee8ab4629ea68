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
    // A host on a TCP route cannot be matched: the file is refused, and the old one kept.
    let bad = tcp_config(port, &[a]).replace(
        "listener = \"db\"\nservice",
        "listener = \"db\"\nhost = \"db.example\"\nservice",
    );
    d.write_config(&bad);
    let log = d.wait_log("sees no host or path", 1).await;
    assert!(log.contains("routes[0]"), "{log}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"still\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"a: still\n");
}
