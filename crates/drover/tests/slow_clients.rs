//! Slow clients, with slowhttptest (the Debian package; scripts/test.sh installs it) against
//! the real binary: slowloris connections are closed at the header deadline, slow readers
//! are bounded by the connection cap, and neither leaves memory or file descriptors behind.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn slowhttptest() -> &'static str {
    let found = Command::new("slowhttptest").arg("-h").output().is_ok();
    assert!(
        found,
        "slowhttptest is not installed: apt-get install slowhttptest (scripts/test.sh does)"
    );
    "slowhttptest"
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// slowhttptest's CSV: one row a second of (seconds, closed, pending, connected).
fn csv_rows(path: &Path) -> Vec<[u64; 4]> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let v: Vec<u64> = l.split(',').filter_map(|c| c.trim().parse().ok()).collect();
            (v.len() >= 4).then(|| [v[0], v[1], v[2], v[3]])
        })
        .collect()
}

fn listener_config(port: u16, origin: std::net::SocketAddr) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"
request_header_timeout = "2s"
idle_timeout = "3s"
max_connections = 100

[[routes]]
listener = "web"
service = "web"

[services.web]
endpoints = [ {{ address = "{origin}" }} ]
"#
    )
}

/// Waits until drover's open descriptors are back to `baseline` (plus a little slack for
/// pooled upstream connections), and returns what they are.
async fn fds_settle(pid: u32, baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let now = open_fds(pid);
        if now <= baseline + 4 || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn slowloris_connections_are_closed_at_the_header_deadline() {
    let tool = slowhttptest();
    let origin = Origin::start("o").await;
    let port = free_port();
    let d = Drover::start_measured(&listener_config(port, origin.addr)).await;
    let (fds_before, (rss_before, _)) = (open_fds(d.pid()), d.memory_kib());
    let out = d.dir.path().join("loris");
    // 60 connections at 30 a second, each sending one more header line every second, for
    // 8 seconds: without the deadline all 60 would still be open at the end.
    let status = Command::new(tool)
        .args([
            "-H", "-c", "60", "-r", "30", "-i", "1", "-l", "8", "-p", "2", "-g",
        ])
        .arg("-o")
        .arg(&out)
        .arg("-u")
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    let rows = csv_rows(&out.with_extension("csv"));
    let stdout = String::from_utf8_lossy(&status.stdout);
    eprintln!("slowloris (seconds, closed, pending, connected): {rows:?}");
    assert!(rows.len() >= 2, "slowhttptest ran: {stdout}\n{rows:?}");
    // Every connection was closed by drover at its deadline (2 s after its first byte), so
    // slowhttptest ran out of connections well before its 8 seconds.
    let last = rows.last().unwrap();
    assert!(
        stdout.contains("No open connections left"),
        "slowhttptest still had connections open: {stdout}"
    );
    assert!(
        last[0] <= 5,
        "closed at the 2 s deadline, not later: {rows:?}"
    );
    // Each was closed 2 s after it opened, give or take slowhttptest's one-second samples:
    // every connection open at one sample is closed by the sample 3 s later. (Counted from the
    // samples rather than from the 30-a-second rate: on a loaded machine the tool opens them
    // more slowly than it asks.)
    let mut compared = 0;
    for r in &rows {
        let Some(later) = rows.iter().find(|l| l[0] >= r[0] + 3) else {
            continue;
        };
        compared += 1;
        assert!(
            later[1] >= r[1] + r[3],
            "the {} connections open at {} s were not all closed by {} s: {rows:?}",
            r[3],
            r[0],
            later[0]
        );
    }
    assert!(compared > 0, "samples 3 s apart: {rows:?}");
    let fds_after = fds_settle(d.pid(), fds_before).await;
    let (rss_after, _) = d.memory_kib();
    eprintln!(
        "slowloris: fds {fds_before} -> {fds_after}, RSS {rss_before} KiB -> {rss_after} KiB"
    );
    assert!(
        fds_after <= fds_before + 4,
        "fds {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    // drover still serves.
    let (status, _) = get_fresh(format!("127.0.0.1:{port}").parse().unwrap(), "/")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// Runs slowhttptest in slow-read mode for `secs` and returns drover's peak descriptors and
/// RSS while it ran.
async fn slow_read_round(d: &Drover, port: u16, secs: u32) -> (usize, u64) {
    let out = d.dir.path().join("slowread");
    let mut child = Command::new(slowhttptest())
        .args([
            "-X", "-c", "150", "-r", "75", "-k", "1", "-n", "1", "-w", "1", "-y", "64", "-z", "5",
            "-p", "2", "-g",
        ])
        .arg("-l")
        .arg(secs.to_string())
        .arg("-o")
        .arg(&out)
        .arg("-u")
        .arg(format!("http://127.0.0.1:{port}/large"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (mut most_fds, mut most_rss) = (0, 0);
    while child.try_wait().unwrap().is_none() {
        most_fds = most_fds.max(open_fds(d.pid()));
        most_rss = most_rss.max(d.memory_kib().0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows = csv_rows(&out.with_extension("csv"));
    eprintln!("slow read (seconds, closed, pending, connected): {rows:?}");
    assert!(rows.len() >= 4, "slowhttptest ran: {rows:?}");
    (most_fds, most_rss)
}

/// Slow read: clients that advertise a tiny window and read 5 bytes a second of a 10 MiB
/// response. A response in progress has no deadline in drover (a slow but live download is
/// legitimate), so what bounds them is the connection cap and hyper's backpressure: drover
/// holds a bounded amount per connection, and when the clients go every descriptor and the
/// memory they took are given back, and a second wave keeps no more than the first (nothing
/// leaks).
#[tokio::test]
async fn slow_readers_are_bounded_and_leave_nothing_behind() {
    let origin = Origin::start("o").await;
    let port = free_port();
    let d = Drover::start_measured(&listener_config(port, origin.addr)).await;
    let (fds_before, (rss_before, _)) = (open_fds(d.pid()), d.memory_kib());
    let (fds1, rss1) = slow_read_round(&d, port, 5).await;
    let fds_after1 = fds_settle(d.pid(), fds_before).await;
    let (rss_after1, _) = d.memory_kib();
    let (fds2, rss2) = slow_read_round(&d, port, 5).await;
    let fds_after2 = fds_settle(d.pid(), fds_before).await;
    let (rss_after2, _) = d.memory_kib();
    eprintln!(
        "slow read: fds {fds_before} -> peak {fds1} -> {fds_after1} -> peak {fds2} -> {fds_after2}; \
         RSS KiB {rss_before} -> peak {rss1} -> {rss_after1} -> peak {rss2} -> {rss_after2}"
    );
    // 100 client connections at the cap, each with its upstream connection: the cap holds
    // (the other 50 wait in the kernel's backlog).
    for peak in [fds1, fds2] {
        assert!(
            peak <= fds_before + 2 * 100 + 16,
            "fds peaked at {peak} (from {fds_before})"
        );
    }
    assert!(
        fds_after1 <= fds_before + 4,
        "fds {fds_before} -> {fds_after1}"
    );
    assert!(
        fds_after2 <= fds_before + 4,
        "fds {fds_before} -> {fds_after2}"
    );
    // At most 2 MiB per connection held at the cap.
    assert!(
        rss1.max(rss2) < rss_before + 100 * 2 * 1024,
        "RSS peaked at {} KiB (from {rss_before})",
        rss1.max(rss2)
    );
    assert!(
        rss_after1 < rss_before + 16 * 1024,
        "the first wave was not given back: {rss_before} -> {rss_after1} KiB"
    );
    assert!(
        rss_after2 < rss_after1 + 8 * 1024,
        "the second wave kept more: {rss_after1} -> {rss_after2} KiB"
    );
    let (status, _) = get_fresh(format!("127.0.0.1:{port}").parse().unwrap(), "/")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// A client that asks for a large response and then reads nothing: the write to it stays
/// blocked, and at `send_timeout` drover closes the connection and gives back its
/// descriptors (the client's and the upstream's), rather than holding them for ever.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_at_the_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("o").await;
    let port = free_port();
    let config = listener_config(port, origin.addr).replace(
        "max_connections = 100",
        "max_connections = 100\nsend_timeout = \"1s\"",
    );
    let d = Drover::start(&config).await;
    let fds_before = open_fds(d.pid());
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    client
        .write_all(b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Read nothing for a while: drover's writes block once the socket buffers are full.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fds_after = fds_settle(d.pid(), fds_before).await;
    assert!(
        fds_after <= fds_before + 4,
        "the stalled connection still holds descriptors: {fds_before} -> {fds_after}"
    );
    // What drover sent before it gave up is in the socket buffers; then the stream ends
    // long before the 10 MiB body does.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got)).await;
    let ended = matches!(read, Ok(Ok(_)) | Ok(Err(_)));
    assert!(ended, "the connection was not closed");
    assert!(
        got.len() < 10 * 1024 * 1024,
        "the whole body arrived ({} bytes), so drover never stalled",
        got.len()
    );
    let (status, _) = get_fresh(format!("127.0.0.1:{port}").parse().unwrap(), "/")
        .await
        .unwrap();
    assert_eq!(status, 200);
}
