//! `GET /api/v1/events`: the change stream as Server-Sent Events.
//!
//! The stream opens with `event: hello` (the generation in force), then carries one
//! `event: change` per accepted change and one `event: rejected` per rejected snapshot. A
//! comment every 15 s keeps idle proxies in between from closing it. A subscriber too slow
//! for the backlog is told how many events it lost, and goes on.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use drover_control::Event;
use futures_core::Stream;
use http::{HeaderValue, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::reply::Body;
use crate::views::unix_ms;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn stream(
    events: &broadcast::Sender<Arc<Event>>,
    generation: u64,
    stop: CancellationToken,
) -> Response<Body> {
    let stream = Events {
        first: Some(sse("hello", &json!({ "generation": generation }))),
        inner: BroadcastStream::new(events.subscribe()),
        keep_alive: tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE),
        stop: Box::pin(stop.cancelled_owned()),
    };
    let mut r = Response::new(StreamBody::new(stream).boxed());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

struct Events {
    first: Option<Bytes>,
    inner: BroadcastStream<Arc<Event>>,
    keep_alive: tokio::time::Interval,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stream for Events {
    type Item = Result<Frame<Bytes>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if self.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(event))) => {
                return Poll::Ready(Some(Ok(Frame::data(encode(&event)))));
            }
            Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(n)))) => {
                let note = format!(": {n} events were lost because this stream fell behind\n\n");
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(note)))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        if self.keep_alive.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": keep-alive\n\n",
            )))));
        }
        Poll::Pending
    }
}

fn sse(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

fn encode(event: &Event) -> Bytes {
    match event {
        Event::Change {
            generation,
            source,
            reason,
            at,
            changes,
        } => {
            let changes: Vec<Value> = changes
                .iter()
                .map(|c| {
                    let mut v = serde_json::to_value(c).unwrap_or_default();
                    v["text"] = json!(c.to_string());
                    v
                })
                .collect();
            sse(
                "change",
                &json!({
                    "generation": generation,
                    "source": source,
                    "reason": reason,
                    "at_ms": unix_ms(*at),
                    "changes": changes,
                }),
            )
        }
        Event::Rejected { source, error, at } => sse(
            "rejected",
            &json!({ "source": source.to_string(), "error": error, "at_ms": unix_ms(*at) }),
        ),
    }
}
