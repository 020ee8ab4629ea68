//! Bodies stream through drover: a 1 GiB upload echoed back as a 1 GiB download passes while
//! drover's memory stays flat.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 256 * 1024;

/// `total` bytes of a repeating pattern, made as they are sent.
struct Generated {
    chunk: Bytes,
    left: u64,
}

impl futures_core::Stream for Generated {
    type Item = Result<Frame<Bytes>, Infallible>;
    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let n = this.left.min(this.chunk.len() as u64) as usize;
        this.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(this.chunk.slice(..n)))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_streams_both_ways_in_flat_memory() {
    let origin = Origin::start("o").await;
    let port = free_port();
    let d = Drover::start(&one_service(port, &[(origin.addr, 1)])).await;
    // Warm up: one small request so pools and buffers exist before the baseline.
    let client = client();
    get(&client, &format!("http://127.0.0.1:{port}/")).await;
    let (rss_before, _) = d.memory_kib();

    let pattern: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let body = StreamBody::new(Generated {
        chunk: Bytes::from(pattern),
        left: GIB,
    });
    let req = Request::post(format!("http://127.0.0.1:{port}/echo"))
        .header("content-length", GIB.to_string())
        .body(body.boxed())
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-length"], GIB.to_string().as_str());

    let mut body = res.into_body();
    let mut received: u64 = 0;
    let mut peak_rss = 0;
    let mut offset_ok = true;
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap_or_default();
        // The pattern repeats every 251 bytes from the start of the stream.
        if let Some(&first) = data.first() {
            offset_ok &= u64::from(first) == (received % CHUNK as u64) % 251;
        }
        received += data.len() as u64;
        if received % (64 << 20) < data.len() as u64 {
            peak_rss = peak_rss.max(d.memory_kib().0);
        }
    }
    assert_eq!(received, GIB, "every byte came back");
    assert!(offset_ok, "bytes came back in order");
    let grew = peak_rss.saturating_sub(rss_before);
    // A buffered GiB would be 1,048,576 KiB; streaming keeps it to socket-sized buffers.
    assert!(
        grew < 64 * 1024,
        "drover grew by {grew} KiB while streaming (from {rss_before} KiB)"
    );
    eprintln!("RSS before {rss_before} KiB, peak while streaming {peak_rss} KiB");
}
