//! HTTP/2 attacks on drover's clear-text listener (h2c with prior knowledge): raw frames
//! written by hand where the attack is in the framing (concurrency over SETTINGS,
//! CONTINUATION flood, rapid reset), and the `h2` client where the answer must be decoded.
//! Also how an idle HTTP/2 connection ends, which only raw frames show.

mod raw;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raw::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix, the prefix's high bits set to `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing, new name, no Huffman coding.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn get_block(path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", "GET");
    literal(&mut b, ":scheme", "http");
    literal(&mut b, ":path", path);
    literal(&mut b, ":authority", "a.test");
    b
}

/// A frame read back: type, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

/// Connects, sends the preface and empty SETTINGS, and returns the stream.
async fn h2c(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    s
}

/// Reads frames until the connection closes or nothing comes for `quiet`; acknowledges
/// the server's SETTINGS and PINGs.
async fn read_frames(s: &mut TcpStream, quiet: Duration) -> (Vec<Frame>, bool) {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 16384];
    let closed = loop {
        while buf.len() >= 9 {
            let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            let f: Frame = (
                buf[3],
                buf[4],
                u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                buf[9..9 + len].to_vec(),
            );
            buf.drain(..9 + len);
            if f.0 == SETTINGS && f.1 & ACK == 0 {
                let _ = s.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
            }
            if f.0 == PING && f.1 & ACK == 0 {
                let _ = s.write_all(&frame(PING, ACK, 0, &f.3)).await;
            }
            frames.push(f);
        }
        match tokio::time::timeout(quiet, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    (frames, closed)
}

fn goaway_code(frames: &[Frame]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.0 == GOAWAY)
        .map(|f| u32::from_be_bytes([f.3[4], f.3[5], f.3[6], f.3[7]]))
}

/// An origin that takes requests and never answers them, counting their heads.
async fn silent_origin() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut tail = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    let heads_here = tail.windows(4).filter(|w| w == b"\r\n\r\n").count();
                    h.fetch_add(heads_here, Ordering::SeqCst);
                    let keep = tail.len().saturating_sub(3);
                    tail.drain(..keep);
                }
            });
        }
    });
    (addr, heads)
}

fn local(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// A client that ignores SETTINGS_MAX_CONCURRENT_STREAMS: the streams over it are refused
/// with REFUSED_STREAM and never reach the upstream.
#[tokio::test]
async fn streams_over_the_concurrency_limit_are_refused() {
    let (origin, heads) = silent_origin().await;
    let port = free_port();
    let _d = Drover::start(&config(port, origin, "h2_max_concurrent_streams = 5", "")).await;
    let mut s = h2c(local(port)).await;
    let (first, _) = read_frames(&mut s, Duration::from_millis(300)).await;
    let settings = first
        .iter()
        .find(|f| f.0 == SETTINGS && f.1 & ACK == 0)
        .expect("server SETTINGS");
    let advertised = settings
        .3
        .chunks(6)
        .find(|c| c[..2] == [0, 3])
        .map(|c| u32::from_be_bytes([c[2], c[3], c[4], c[5]]));
    assert_eq!(advertised, Some(5), "SETTINGS_MAX_CONCURRENT_STREAMS");
    let mut out = Vec::new();
    for i in 0..12u32 {
        out.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            2 * i + 1,
            &get_block("/held"),
        ));
    }
    s.write_all(&out).await.unwrap();
    let (frames, _) = read_frames(&mut s, Duration::from_millis(1500)).await;
    let refused: Vec<u32> = frames
        .iter()
        .filter(|f| f.0 == RST_STREAM && f.3 == REFUSED_STREAM.to_be_bytes())
        .map(|f| f.2)
        .collect();
    assert_eq!(refused.len(), 7, "streams 6 to 12 refused: {frames:?}");
    assert!(
        heads.load(Ordering::SeqCst) <= 5,
        "{} requests reached the upstream",
        heads.load(Ordering::SeqCst)
    );
}

/// A connection idle past `idle_timeout` is told with a GOAWAY (NO_ERROR) before it closes,
/// so that the client does not send its next request into the close. The PINGs a client sends
/// while idle are no request: they do not bring the shorter `request_header_timeout` on.
#[tokio::test]
async fn an_idle_connection_gets_goaway_at_the_idle_timeout_and_pings_do_not_shorten_it() {
    let origin = Origin::start("one").await;
    let port = free_port();
    let listener = "request_header_timeout = \"300ms\"\nidle_timeout = \"1500ms\"";
    let _d = Drover::start(&config(port, origin.addr, listener, "")).await;
    let mut s = h2c(local(port)).await;
    let asked = std::time::Instant::now();
    s.write_all(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &get_block("/"),
    ))
    .await
    .unwrap();
    let (frames, closed) = read_frames(&mut s, Duration::from_millis(300)).await;
    assert!(
        frames.iter().any(|f| f.2 == 1 && f.1 & END_STREAM != 0),
        "the request is answered: {frames:?}"
    );
    assert!(!closed && goaway_code(&frames).is_none(), "{frames:?}");
    // Twice the header timeout of PINGs, as clients send to keep a connection warm.
    for _ in 0..3 {
        s.write_all(&frame(PING, 0, 0, &[7; 8])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (frames, closed) = read_frames(&mut s, Duration::from_secs(4)).await;
    let lasted = asked.elapsed();
    assert_eq!(
        goaway_code(&frames),
        Some(0),
        "GOAWAY with NO_ERROR: {frames:?}"
    );
    assert!(closed, "the connection closes after its GOAWAY");
    assert!(
        lasted >= Duration::from_millis(1300),
        "closed {lasted:?} after the request: the idle timeout is 1.5 s"
    );
}

async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .max_header_list_size(1 << 20)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

/// The status of a GET with `headers`, or the stream error's reason.
async fn h2_get(addr: SocketAddr, headers: &[(String, String)]) -> Result<u16, String> {
    let mut client = h2_client(addr).await;
    let mut req = http::Request::get(format!("http://{addr}/h"));
    for (n, v) in headers {
        req = req.header(n, v);
    }
    let (response, _) = client
        .send_request(req.body(()).unwrap(), true)
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn a_header_list_over_the_limit_gets_431() {
    let origin = Recorder::start().await;
    let port = free_port();
    let _d = Drover::start(&config(port, origin.addr, "", "")).await;
    let addr = local(port);
    let fits = vec![("x-big".to_string(), "v".repeat(20_000))];
    assert_eq!(h2_get(addr, &fits).await, Ok(200));
    let over = vec![("x-big".to_string(), "v".repeat(40_000))];
    assert_eq!(h2_get(addr, &over).await, Ok(431));
    let many: Vec<(String, String)> = (0..120)
        .map(|i| (format!("x-h{i}"), "1".to_string()))
        .collect();
    assert_eq!(h2_get(addr, &many).await, Ok(431), "more than 100 fields");
    assert_eq!(origin.seen().len(), 1);
}

/// HEADERS without END_HEADERS, then CONTINUATION frames without end: h2 counts them against
/// the header list size and sends GOAWAY (ENHANCE_YOUR_CALM) after a handful; memory stays
/// flat over many such connections.
#[tokio::test]
async fn a_continuation_flood_gets_goaway_and_memory_stays_flat() {
    let origin = Recorder::start().await;
    let port = free_port();
    let d = Drover::start(&config(port, origin.addr, "", "")).await;
    let addr = local(port);
    let flood = |s: u32| {
        let mut block = Vec::new();
        literal(&mut block, ":method", "GET");
        // A value announced as 10 MB, never finished.
        block.push(0);
        hpack_int(&mut block, 0, 7, 5);
        block.extend_from_slice(b"x-big");
        hpack_int(&mut block, 0, 7, 10_000_000);
        let mut out = frame(HEADERS, 0, s, &block);
        for _ in 0..200 {
            out.extend(frame(CONTINUATION, 0, s, &[b'a'; 8000]));
        }
        out
    };
    let mut closed_after = Vec::new();
    let (rss_before, _) = d.memory_kib();
    for round in 0..40 {
        let mut s = h2c(addr).await;
        let _ = s.write_all(&flood(1)).await;
        let (frames, closed) = read_frames(&mut s, Duration::from_secs(3)).await;
        assert!(closed, "round {round}: the connection is closed");
        closed_after.push(goaway_code(&frames));
    }
    let (rss_after, _) = d.memory_kib();
    eprintln!("CONTINUATION flood: RSS {rss_before} KiB before, {rss_after} KiB after 40 floods");
    assert!(
        closed_after.iter().all(|c| c.is_some()),
        "GOAWAY each time: {closed_after:?}"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over 40 floods of 1.6 MB"
    );
    assert!(origin.seen().is_empty());
}

/// CVE-2023-44487: open a stream and reset it at once, in a loop. The connection gets GOAWAY
/// after a bounded number, and only a bounded number of requests reach the upstream.
#[tokio::test]
async fn rapid_reset_gets_goaway_and_the_upstream_sees_a_bounded_number() {
    let (origin, heads) = silent_origin().await;
    let port = free_port();
    let _d = Drover::start(&config(port, origin, "", "")).await;
    let mut s = h2c(local(port)).await;
    let _ = read_frames(&mut s, Duration::from_millis(200)).await;
    let mut sent = 0u32;
    let mut write_failed = false;
    'outer: for batch in 0..100u32 {
        let mut out = Vec::new();
        for i in 0..100u32 {
            let id = 2 * (batch * 100 + i) + 1;
            out.extend(frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                id,
                &get_block("/r"),
            ));
            out.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        if s.write_all(&out).await.is_err() {
            write_failed = true;
            break 'outer;
        }
        sent += 100;
    }
    let (frames, closed) = read_frames(&mut s, Duration::from_secs(2)).await;
    let code = goaway_code(&frames);
    assert!(
        code.is_some() || write_failed,
        "GOAWAY after {sent} resets: {:?}",
        frames.iter().map(|f| f.0).collect::<Vec<_>>()
    );
    assert_eq!(code, Some(0xb), "ENHANCE_YOUR_CALM");
    assert!(closed || write_failed, "the connection is closed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reached = heads.load(Ordering::SeqCst);
    eprintln!("rapid reset: {sent} pairs written, GOAWAY {code:?}, {reached} reached the upstream");
    assert!(
        reached <= 200,
        "{reached} of {sent} reset requests reached the upstream"
    );
    // DATA on a closed connection is not accepted either.
    let _ = s.write_all(&frame(DATA, END_STREAM, 1, b"x")).await;
}
