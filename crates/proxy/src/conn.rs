//! One client connection: serving it with hyper (HTTP/1.1, or HTTP/2 with prior knowledge),
//! enforcing its deadlines, and draining it.
//!
//! Two deadlines apply between requests, checked by a watchdog timer beside the connection
//! rather than by hyper (whose header timer also bounds the idle wait):
//! - `request_header_timeout`: from the first byte of a request head to the whole head, in
//!   total, not per read, so a client that drips one byte a second is still cut off;
//! - `idle_timeout`: how long a connection may wait for its next request.
//!
//! While a request is in flight neither applies; the upstream's deadlines do. On drain
//! (listener removed, or shutdown) hyper is told to finish: HTTP/1.1 completes the request in
//! progress and closes, HTTP/2 sends GOAWAY. Whatever is still running when the grace period
//! ends is cut.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use drover_model::ListenerSpec;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::access::AccessLog;
use crate::stats::{ListenerStats, Stats};
use crate::table::RoutingTable;

/// What the requests of one connection share.
pub(crate) struct ConnCtx {
    pub tables: Arc<ArcSwap<RoutingTable>>,
    pub stats: Arc<Stats>,
    /// The counters of the listener it was accepted on.
    pub listener: Arc<ListenerStats>,
    pub access_log: Option<AccessLog>,
    /// The client's address.
    pub peer: SocketAddr,
    /// The listener address the client connected to.
    pub local: SocketAddr,
    /// The client's IP, ready for X-Forwarded-For.
    pub client_ip: HeaderValue,
    /// The IP the client connected to, for X-Original-To.
    pub local_ip: HeaderValue,
    /// A hash of the client's IP, for `hash_on = "source_ip"` and the stick table.
    pub client_hash: u64,
    /// Cancelled when the listener is removed or drover shuts down; tunnels outlive the
    /// connection's HTTP part and watch it themselves.
    pub drain: CancellationToken,
    clock: Clock,
}

/// Millisecond timestamps, relative to the connection's start, that the watchdog reads.
struct Clock {
    start: Instant,
    in_flight: AtomicU32,
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived; `NOT_READING` if none has.
    head_since: AtomicU64,
}

const NOT_READING: u64 = u64::MAX;

impl Clock {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Marks the connection busy while a request and its response are under way.
pub(crate) struct Active(Arc<ConnCtx>);

impl ConnCtx {
    pub(crate) fn begin(self: &Arc<Self>) -> Active {
        self.listener
            .requests_active
            .fetch_add(1, Ordering::Relaxed);
        self.clock.in_flight.fetch_add(1, Ordering::Relaxed);
        self.clock.head_since.store(NOT_READING, Ordering::Relaxed);
        Active(self.clone())
    }

    fn on_read(&self) {
        let c = &self.clock;
        if c.in_flight.load(Ordering::Relaxed) == 0
            && c.head_since.load(Ordering::Relaxed) == NOT_READING
        {
            c.head_since.store(c.now(), Ordering::Relaxed);
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0
            .listener
            .requests_active
            .fetch_sub(1, Ordering::Relaxed);
        let c = &self.0.clock;
        if c.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            c.idle_since.store(c.now(), Ordering::Relaxed);
        }
    }
}

/// A client stream that tells the watchdog when request bytes arrive.
struct Tracked<S> {
    stream: S,
    ctx: Arc<ConnCtx>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.ctx.on_read();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, b)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The hyper server settings for the connections of one listener.
pub(crate) fn server_builder(_spec: &ListenerSpec) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The watchdog in `serve` owns the header and idle deadlines; hyper's own header timer
    // would also cut idle keep-alive connections at the header deadline.
    b.http1().keep_alive(true).header_read_timeout(None);
    b
}

/// The settings of one connection, read from its listener's entry in the table in force when
/// it was accepted.
pub(crate) struct Accepted {
    pub deadlines: Deadlines,
    pub server: Arc<auto::Builder<TokioExecutor>>,
    pub stats: Arc<ListenerStats>,
}

/// The deadlines of one connection.
pub(crate) struct Deadlines {
    pub request_header: Duration,
    pub idle: Duration,
}

/// What every connection of one listener shares.
#[derive(Clone)]
pub(crate) struct Listening {
    pub tables: Arc<ArcSwap<RoutingTable>>,
    pub stats: Arc<Stats>,
    pub access_log: Option<AccessLog>,
    /// The listener's address.
    pub local: SocketAddr,
    /// Cancelled when the listener is removed or drover shuts down.
    pub drain: CancellationToken,
}

/// Counts a connection as open for as long as it lives.
pub(crate) struct Open(Arc<ListenerStats>);

impl Open {
    pub(crate) fn new(listener: &Arc<ListenerStats>) -> Self {
        listener
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        Self::tunnel(listener)
    }

    /// A connection that lives on as a tunnel after its HTTP part ended: open, not accepted
    /// again.
    pub(crate) fn tunnel(listener: &Arc<ListenerStats>) -> Self {
        listener.connections_active.fetch_add(1, Ordering::Relaxed);
        Self(listener.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves a connection until it closes, breaks a deadline, or is drained.
pub(crate) async fn serve<S>(listening: Listening, stream: S, peer: SocketAddr, accepted: Accepted)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Accepted {
        deadlines,
        server,
        stats: listener,
    } = accepted;
    let _open = Open::new(&listener);
    let Listening {
        tables,
        stats,
        access_log,
        local,
        drain,
    } = listening;
    let ip_value =
        |ip: std::net::IpAddr| HeaderValue::from_str(&ip.to_canonical().to_string()).ok();
    let (Some(client_ip), Some(local_ip)) = (ip_value(peer.ip()), ip_value(local.ip())) else {
        return;
    };
    let ctx = Arc::new(ConnCtx {
        tables,
        stats,
        listener,
        access_log,
        peer,
        local,
        client_hash: drover_balance::hash_bytes(client_ip.as_bytes()),
        client_ip,
        local_ip,
        drain: drain.clone(),
        clock: Clock {
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NOT_READING),
        },
    });
    let io = TokioIo::new(Tracked {
        stream,
        ctx: ctx.clone(),
    });
    let service_ctx = ctx.clone();
    let service = service_fn(move |req| crate::http::handle(service_ctx.clone(), req));
    let conn = server.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);

    let check_every = deadlines.request_header.min(deadlines.idle);
    let watchdog = tokio::time::sleep(check_every);
    tokio::pin!(watchdog);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = drain.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
                let grace = ctx.tables.load().effective.config.global.shutdown_grace.get();
                watchdog.as_mut().reset(tokio::time::Instant::now() + grace);
            }
            _ = &mut watchdog => {
                if draining {
                    tracing::debug!(%peer, "grace period over; closing the connection");
                    return;
                }
                match next_check(&ctx.clock, &deadlines) {
                    None => {
                        tracing::debug!(%peer, "connection deadline passed; closing it");
                        return;
                    }
                    Some(wait) => watchdog.as_mut().reset(tokio::time::Instant::now() + wait.min(check_every)),
                }
            }
        }
    }
}

/// How long until the connection's next deadline, or None if one has passed.
fn next_check(clock: &Clock, d: &Deadlines) -> Option<Duration> {
    let now = clock.now();
    if clock.in_flight.load(Ordering::Relaxed) > 0 {
        return Some(d.request_header.min(d.idle));
    }
    let remaining = |since: u64, limit: Duration| {
        let limit = limit.as_millis() as u64;
        let elapsed = now.saturating_sub(since);
        (elapsed < limit).then(|| Duration::from_millis(limit - elapsed))
    };
    match clock.head_since.load(Ordering::Relaxed) {
        NOT_READING => remaining(clock.idle_since.load(Ordering::Relaxed), d.idle),
        since => remaining(since, d.request_header),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> Clock {
        Clock {
            start: Instant::now() - Duration::from_secs(100),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NOT_READING),
        }
    }

    const D: Deadlines = Deadlines {
        request_header: Duration::from_secs(10),
        idle: Duration::from_secs(75),
    };

    #[test]
    fn an_idle_connection_expires_after_the_idle_timeout() {
        let c = clock();
        assert_eq!(next_check(&c, &D), None, "idle since 0 s, now 100 s");
        c.idle_since.store(50_000, Ordering::Relaxed);
        let left = next_check(&c, &D).unwrap();
        assert!(
            left <= Duration::from_secs(25) && left > Duration::from_secs(24),
            "{left:?}"
        );
    }

    #[test]
    fn a_started_head_must_finish_within_the_header_timeout() {
        let c = clock();
        c.idle_since.store(99_000, Ordering::Relaxed);
        c.head_since.store(85_000, Ordering::Relaxed);
        assert_eq!(next_check(&c, &D), None, "head started 15 s ago");
        c.head_since.store(95_000, Ordering::Relaxed);
        assert!(next_check(&c, &D).unwrap() <= Duration::from_secs(5));
    }

    #[test]
    fn a_busy_connection_has_no_deadline_of_its_own() {
        let c = clock();
        c.in_flight.store(1, Ordering::Relaxed);
        assert_eq!(next_check(&c, &D), Some(Duration::from_secs(10)));
    }
}
