//! One client connection: serving it (HTTP/1.1 with drover's own server, `crate::front`, and
//! hyper for the requests that one leaves; HTTP/2 with prior knowledge with hyper), enforcing
//! its deadlines, and draining it.
//!
//! An HTTP/1 connection that has waited a little for its next request ([`release_next`]) gives
//! up its server's state (drover's read buffer, or hyper's two 8 KiB buffers and dispatcher):
//! drover waits for the next request with nothing but the socket, and serves it afresh when it
//! comes. One that
//! came over plain TCP then leaves its task for its listener's lot ([`crate::park`]), which
//! keeps it as a socket and a few addresses until the request comes.
//!
//! Two deadlines apply between requests, checked by a watchdog timer beside the connection
//! rather than by hyper (whose header timer also bounds the idle wait):
//! - `request_header_timeout`: from the first byte of a request head to the whole head, in
//!   total, not per read, so a client that drips one byte a second is still cut off;
//! - `idle_timeout`: how long a connection may wait for its next request.
//!
//! While a request is in flight neither applies; the upstream's deadlines do. One more applies
//! at any time: `send_timeout`, how long a write to the client may stay blocked because the
//! client reads nothing (nginx's `send_timeout`), so that a client that stops reading does not
//! hold its connection, its upstream request and their buffers for ever. On drain
//! (listener removed, or shutdown) the server is told to finish: HTTP/1.1 completes the request in
//! progress and closes, HTTP/2 sends GOAWAY. Whatever is still running when the grace period
//! ends is cut.

use std::convert::Infallible;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use drover_model::ListenerSpec;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio_util::sync::CancellationToken;

use crate::access::AccessLog;
use crate::front::{self, Outcome};
use crate::http::{RequestBody, ResponseBody};
use crate::park::{Lot, Park, Parked};
use crate::proxy_protocol::Prefixed;
use crate::stats::{ListenerStats, Stats};
use crate::table::RoutingTable;
use crate::workers;

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
    /// Whether the connection came over TLS, for X-Forwarded-Proto.
    pub tls: bool,
    /// A hash of the client's IP, for `hash_on = "source_ip"` and the stick table.
    pub client_hash: u64,
    /// Cancelled when the listener is removed or drover shuts down; tunnels outlive the
    /// connection's HTTP part and watch it themselves.
    pub drain: CancellationToken,
    clock: Clock,
    /// Where the connection goes if a request on it is answered `101 Switching Protocols`:
    /// set by `crate::upgrade` for a request that asks to switch, taken when hyper lets the
    /// connection go. Plain requests never touch it.
    switch_to: Mutex<Option<oneshot::Sender<Switched>>>,
    /// Where the connection waits for its next request, if it can leave its task.
    lot: Option<Lot>,
}

/// A client connection handed over for a tunnel after a 101, with the bytes the client sent
/// after its request put back in front.
pub(crate) type Switched = Box<dyn ClientStream>;

/// What a client connection is, whatever it came over (TCP, PROXY, TLS).
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientStream for T {}

/// Millisecond timestamps, relative to the connection's start, that the watchdog reads.
struct Clock {
    start: Instant,
    in_flight: AtomicU32,
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived; `NOT_READING` if none has.
    head_since: AtomicU64,
    /// Since when a write to the client has been blocked; `NOT_BLOCKED` if none is.
    write_blocked_since: AtomicU64,
}

const NOT_READING: u64 = u64::MAX;
const NOT_BLOCKED: u64 = u64::MAX;

impl Clock {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// When the connection's current idle spell began: when it last had no request in flight,
    /// no request head coming, and nothing waiting to be written. None while it is not idle.
    fn idle_since(&self) -> Option<u64> {
        let idle = self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NOT_READING
            && self.write_blocked_since.load(Ordering::Relaxed) == NOT_BLOCKED;
        idle.then(|| self.idle_since.load(Ordering::Relaxed))
    }

    /// The instant `ms` milliseconds after the connection's start, plus `after`.
    fn instant(&self, ms: u64, after: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.start + Duration::from_millis(ms) + after)
    }

    /// When an idle connection is closed: `idle` after its last request ended.
    fn idle_deadline(&self, idle: Duration) -> tokio::time::Instant {
        self.instant(self.idle_since.load(Ordering::Relaxed), idle)
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

    /// Registers the request being served as the one that may switch protocols, and returns
    /// where the client connection arrives if it does (after its 101 has been written).
    pub(crate) fn on_switch(&self) -> oneshot::Receiver<Switched> {
        let (tx, rx) = oneshot::channel();
        *self
            .switch_to
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Who waits for the connection, if a request on it switched protocols (or asked to and
    /// is still waiting for the upstream's answer).
    fn switched_to(&self) -> Option<oneshot::Sender<Switched>> {
        let mut slot = self
            .switch_to
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.take().filter(|tx| !tx.is_closed())
    }

    /// Bytes of a request head arrived: on an idle connection, the header deadline starts.
    pub(crate) fn on_read(&self) {
        let c = &self.clock;
        if c.in_flight.load(Ordering::Relaxed) == 0
            && c.head_since.load(Ordering::Relaxed) == NOT_READING
        {
            c.head_since.store(c.now(), Ordering::Relaxed);
        }
    }

    /// Notes whether a write to the client went through or must wait for the client to read.
    fn on_write<T>(&self, r: &Poll<T>) {
        let c = &self.clock;
        let blocked = c.write_blocked_since.load(Ordering::Relaxed);
        match r {
            Poll::Pending if blocked == NOT_BLOCKED => {
                c.write_blocked_since.store(c.now(), Ordering::Relaxed)
            }
            Poll::Ready(_) if blocked != NOT_BLOCKED => {
                c.write_blocked_since.store(NOT_BLOCKED, Ordering::Relaxed)
            }
            _ => {}
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

/// A client stream that tells the watchdog when request bytes arrive and when writes block.
struct Tracked<S> {
    stream: S,
    ctx: Arc<ConnCtx>,
    /// Whether bytes read on an idle connection begin a request head, so that the header
    /// deadline takes over from the idle one: in HTTP/1. Not in HTTP/2, where an idle
    /// connection also carries PINGs, window updates and settings, none of them a request.
    heads: bool,
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
        if this.heads && buf.filled().len() > before {
            this.ctx.on_read();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, b);
        this.ctx.on_write(&r);
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.ctx.on_write(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_flush(cx);
        this.ctx.on_write(&r);
        r
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// hyper's default number of request headers, parsed into a stack buffer; any other count
/// makes hyper allocate one on the heap per request.
const HYPER_DEFAULT_MAX_HEADERS: u32 = 100;

/// Locally reset HTTP/2 streams (malformed requests answered with RST_STREAM) a connection
/// may cause before it gets GOAWAY: bounds the "MadeYouReset" variant of rapid reset
/// (CVE-2025-8671). hyper's default is 1024; a well-behaved client causes none.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 200;

/// Streams a client may open and reset before drover accepts them (CVE-2023-44487, rapid
/// reset). h2's default, written down so that it does not move under us.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// The hyper server settings for the connections of one listener.
///
/// HTTP/1: a head that does not fit in `max_header_bytes` (hyper's read buffer, at least its
/// floor of 8 KiB) or that has more than `max_header_count` fields gets 431 from hyper, which
/// then closes the connection; `crate::http` measures the heads hyper lets through, since
/// hyper checks its buffer only between reads. HTTP/2: `max_header_bytes` is the advertised
/// SETTINGS_MAX_HEADER_LIST_SIZE, which h2 also uses to bound CONTINUATION frames;
/// `h2_max_concurrent_streams` is SETTINGS_MAX_CONCURRENT_STREAMS (streams over it get
/// REFUSED_STREAM). The header count of HTTP/2 requests is checked in `crate::http`.
pub(crate) fn server_builder(spec: &ListenerSpec) -> ServerSettings {
    let header_bytes = spec.max_header_bytes as usize;
    let mut h1 = http1::Builder::new();
    // The watchdog in `serve` owns the header and idle deadlines; hyper's own header timer
    // would also cut idle keep-alive connections at the header deadline.
    h1.keep_alive(true)
        .header_read_timeout(None)
        // hyper's floor is 8 KiB; validation keeps smaller settings out.
        .max_buf_size(header_bytes.max(8192));
    if spec.max_header_count != HYPER_DEFAULT_MAX_HEADERS {
        h1.max_headers(spec.max_header_count as usize);
    }
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.max_concurrent_streams(spec.h2_max_concurrent_streams)
        .max_header_list_size(spec.max_header_bytes)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS);
    let limits = front::Limits {
        head_bytes: header_bytes,
        fields: spec.max_header_count as usize,
    };
    ServerSettings { h1, h2, limits }
}

/// A listener's server settings: hyper's, one for each HTTP version, and the limits of
/// drover's own HTTP/1.1 server.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub h1: http1::Builder,
    pub h2: http2::Builder<TokioExecutor>,
    pub(crate) limits: front::Limits,
}

/// The HTTP version a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HttpVersion {
    Http1,
    Http2,
}

/// What a client with HTTP/2 prior knowledge sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells HTTP/2 with prior knowledge from HTTP/1.x by a cleartext connection's first bytes,
/// and puts them back. Most HTTP/1 requests are told by their first byte; only one that starts
/// like the preface waits for more. None if the client closes, or sends nothing within the
/// idle deadline, or does not finish what it started within the header deadline (counted
/// from its first byte), or if drover drains first.
///
/// Doing this before hyper, rather than with hyper-util's `auto` server, means hyper reads
/// straight from the stream: `auto` hands hyper the first bytes alone, which makes hyper
/// double its read buffer to 16 KiB for the life of every connection.
pub(crate) async fn sniff_version<S: AsyncRead + Unpin>(
    stream: &mut Prefixed<S>,
    deadlines: &Deadlines,
    drain: &CancellationToken,
) -> Option<HttpVersion> {
    let mut seen = Vec::with_capacity(H2_PREFACE.len());
    let mut buf = [0u8; H2_PREFACE.len()];
    // The idle deadline until the first byte, then the header deadline from it, in total.
    let mut until = tokio::time::Instant::now() + deadlines.idle;
    let version = loop {
        let want = H2_PREFACE.len() - seen.len();
        let n = tokio::select! {
            r = tokio::time::timeout_at(until, stream.read(&mut buf[..want])) => match r {
                Ok(Ok(n)) if n > 0 => n,
                _ => return None,
            },
            _ = drain.cancelled() => return None,
        };
        if seen.is_empty() {
            until = tokio::time::Instant::now() + deadlines.request_header;
        }
        seen.extend_from_slice(&buf[..n]);
        if !H2_PREFACE.starts_with(&seen) {
            break HttpVersion::Http1;
        }
        if seen.len() == H2_PREFACE.len() {
            break HttpVersion::Http2;
        }
    };
    stream.unread(seen);
    Some(version)
}

/// The settings of one connection, read from its listener's entry in the table in force when
/// it was accepted.
pub(crate) struct Accepted {
    pub deadlines: Deadlines,
    pub server: Arc<ServerSettings>,
    pub stats: Arc<ListenerStats>,
    /// How long it waits for a request, idle, before its HTTP/1 state is released: see
    /// [`release_next`].
    pub release_after: Duration,
}

/// The deadlines of one connection.
pub(crate) struct Deadlines {
    pub request_header: Duration,
    pub idle: Duration,
    pub send: Duration,
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
    /// Where its idle plain-TCP HTTP/1 connections wait; None if it could not be made.
    pub lot: Option<Lot>,
}

/// Who a connection is from, once its PROXY header (if any) is read and its TLS handshake (if
/// any) is done.
pub(crate) struct Client {
    /// The client's address: the peer's, or the one its PROXY header carried.
    pub addr: SocketAddr,
    /// The address the client connected to: the socket's, or the PROXY header's destination.
    pub destination: SocketAddr,
    /// Whether it came over TLS.
    pub tls: bool,
    /// Counts it open from its accept on.
    pub open: Open,
}

/// Counts a connection as open for as long as it lives (on its listener, and on the worker
/// that serves it), and holds its slots under the connection limits (its listener's and the
/// process's), wherever it is: in its task, or parked.
pub(crate) struct Open {
    stats: Arc<ListenerStats>,
    worker: usize,
    _slots: Option<[OwnedSemaphorePermit; 2]>,
}

impl Open {
    /// A connection just accepted, to be served by `worker`.
    pub(crate) fn new(
        listener: &Arc<ListenerStats>,
        slots: [OwnedSemaphorePermit; 2],
        worker: usize,
    ) -> Self {
        listener
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        Self::counted(listener, Some(slots), worker)
    }

    /// The counters of the listener it was accepted on.
    pub(crate) fn listener(&self) -> &ListenerStats {
        &self.stats
    }

    /// A connection that lives on as a tunnel after its HTTP part ended, on the worker this
    /// is called on: open, not accepted again, and no longer under the connection limits.
    pub(crate) fn tunnel(listener: &Arc<ListenerStats>) -> Self {
        Self::counted(listener, None, workers::index())
    }

    fn counted(
        listener: &Arc<ListenerStats>,
        slots: Option<[OwnedSemaphorePermit; 2]>,
        worker: usize,
    ) -> Self {
        listener.connections_active.fetch_add(1, Ordering::Relaxed);
        listener.connections_by_worker.add(worker);
        Self {
            stats: listener.clone(),
            worker,
            _slots: slots,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.stats
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        self.stats.connections_by_worker.sub(self.worker);
    }
}

/// How a connection is served once it has started, boxed: the connection's task holds this
/// pointer while the connection lives.
pub(crate) type Served = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How a connection is served as HTTP until it closes, breaks a deadline, or is drained. None
/// if its addresses cannot be written as header values.
pub(crate) fn serve<S>(
    listening: Listening,
    stream: S,
    client: Client,
    accepted: Accepted,
    version: HttpVersion,
) -> Option<Served>
where
    S: AsyncRead + AsyncWrite + Park + Unpin + Send + 'static,
{
    let Accepted {
        deadlines,
        server,
        stats: listener,
        release_after,
    } = accepted;
    let Client {
        addr: peer,
        destination,
        tls,
        open,
    } = client;
    let Listening {
        tables,
        stats,
        access_log,
        local,
        drain,
        lot,
    } = listening;
    let (client_ip, local_ip) = (ip_value(peer.ip())?, ip_value(destination.ip())?);
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
        tls,
        drain,
        clock: Clock {
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NOT_READING),
            write_blocked_since: AtomicU64::new(NOT_BLOCKED),
        },
        switch_to: Mutex::new(None),
        lot,
    });
    // Each its own box: an HTTP/1 connection does not carry room for HTTP/2's larger state.
    Some(match version {
        HttpVersion::Http1 => Box::pin(serve_http1(
            server,
            stream,
            ctx,
            deadlines,
            open,
            release_after,
        )),
        HttpVersion::Http2 => Box::pin(serve_http2(server, stream, ctx, deadlines, open)),
    })
}

/// An address as a header value, as `Display` writes its canonical form (an IPv4-mapped IPv6
/// address as IPv4). IPv4 is written digit by digit: `Display`, with its padding and its
/// `String`, cost about 1,300 instructions an address, twice for every connection.
pub(crate) fn ip_value(ip: IpAddr) -> Option<HeaderValue> {
    let ip = ip.to_canonical();
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string()).ok();
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        for (at_least, digit) in [(100, octet / 100), (10, octet / 10 % 10), (0, octet % 10)] {
            if octet >= at_least {
                text[len] = b'0' + digit;
                len += 1;
            }
        }
    }
    HeaderValue::from_bytes(&text[..len]).ok()
}

/// Serves HTTP/2 on a connection.
async fn serve_http2<S>(
    server: Arc<ServerSettings>,
    stream: S,
    ctx: Arc<ConnCtx>,
    deadlines: Deadlines,
    _open: Open,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Tracked {
        stream,
        ctx: ctx.clone(),
        heads: false,
    });
    let mut conn = pin!(server.h2.serve_connection(io, Requests(ctx.clone())));
    let shutdown = |c: &mut Pin<&mut http2::Connection<_, _, _>>| c.as_mut().graceful_shutdown();
    watch(&mut conn, shutdown, None, &ctx, &deadlines, &ctx.drain).await;
}

/// Serves each request of a connection with [`crate::http::handle`].
#[derive(Clone)]
struct Requests(Arc<ConnCtx>);

impl hyper::service::Service<Request<Incoming>> for Requests {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    /// Boxed: hyper keeps a slot for the request future for the connection's whole life, idle
    /// or not; a box there is 16 bytes instead of the future's 2.6 KB.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Made in its box: `Box::pin(handle(..))` makes the future on the stack and then
        // copies all of it, its largest state's size and not just the arguments, into the box.
        let slot: Box<MaybeUninit<_>> = Box::new_uninit();
        let req = req.map(RequestBody::Hyper);
        let made: Box<_> = Box::write(slot, crate::http::handle(self.0.clone(), req));
        Box::into_pin(made)
    }
}

/// How long a new HTTP/1 connection waits for its next request before drover frees hyper's
/// state for it (and parks it). nginx frees its buffers as soon as a request is done; waiting a
/// little spares a busy connection the cost of building the state again for every request.
pub(crate) const RELEASE_FIRST: Duration = Duration::from_millis(10);

/// The longest a connection that keeps coming back waits before its release.
const RELEASE_MAX: Duration = Duration::from_millis(100);

/// How long a connection waits before its next release, after one `after` that it came back
/// from `waited` later: twice as long if that was soon (up to [`RELEASE_MAX`]), so that a
/// connection whose requests come every few tens of milliseconds is released (and parked)
/// only its first few times; [`RELEASE_FIRST`] again if it stayed away longer.
pub(crate) fn release_next(after: Duration, waited: Duration) -> Duration {
    if waited < RELEASE_MAX {
        (after * 2).min(RELEASE_MAX)
    } else {
        RELEASE_FIRST
    }
}

/// The stream under an HTTP/1 connection: bytes read but not used (a request that came after
/// the one before, or the first bytes of the next) go back in front.
type Http1Stream<S> = Tracked<Prefixed<S>>;

/// hyper's HTTP/1 connection, boxed so that it is freed with its buffers on release, and
/// polled so that it leaves the stream open when it ends: for the idle wait after a release,
/// or for a tunnel after a 101.
struct Http1<S>(Box<http1::Connection<TokioIo<Http1Stream<S>>, Requests>>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Future for Http1<S> {
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().0.poll_without_shutdown(cx)
    }
}

/// Serves HTTP/1.x on a connection: with hyper while requests come, and with nothing but the
/// stream once it has waited `release_after` for the next; parked in its listener's lot, if it
/// can be, until that comes.
fn serve_http1<S>(
    server: Arc<ServerSettings>,
    stream: S,
    ctx: Arc<ConnCtx>,
    deadlines: Deadlines,
    open: Open,
    mut release_after: Duration,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Park + Unpin + Send + 'static,
{
    let mut stream = Tracked {
        stream: Prefixed::new(Vec::new(), stream),
        ctx: ctx.clone(),
        heads: true,
    };
    let mut service = Requests(ctx.clone());
    // An async block rather than an async fn: it works on what it captures in place, where an
    // async fn's future keeps each argument twice (as passed, and moved into its body). This
    // future is what an idle connection holds.
    async move {
        let (builder, drain) = (&server.h1, &ctx.drain);
        // drover's own server left a request to hyper, which then serves the connection until
        // it has waited `release_after` for the next.
        let mut hyper_turn = false;
        loop {
            let released = if hyper_turn {
                hyper_turn = false;
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let mut conn = Http1(Box::new(conn));
                let shutdown = |c: &mut Http1<S>| Pin::new(&mut *c.0).graceful_shutdown();
                let ended = watch(
                    &mut conn,
                    shutdown,
                    Some(release_after),
                    &ctx,
                    &deadlines,
                    drain,
                );
                let released = match Box::pin(ended).await {
                    Ended::Finished {
                        output: Ok(()),
                        released,
                    } => released,
                    Ended::Finished { output: Err(_), .. } | Ended::Cut => return,
                };
                (stream, service) = conn.take_back();
                if !released && let Some(tunnel) = ctx.switched_to() {
                    // The 101 is written; the tunnel takes the connection from here. (A
                    // release needs an idle connection, so it never comes with a switch.)
                    let _ = tunnel.send(Box::new(stream.stream));
                    return;
                }
                released
            } else {
                let finish = AtomicBool::new(false);
                let mut served = Box::pin(front::serve(&mut stream, &ctx, &finish, server.limits));
                let shutdown = |_: &mut _| finish.store(true, Ordering::Relaxed);
                let ended = watch(
                    &mut served,
                    shutdown,
                    Some(release_after),
                    &ctx,
                    &deadlines,
                    drain,
                );
                let ended = Box::pin(ended).await;
                drop(served);
                match ended {
                    Ended::Finished {
                        output: Outcome::Handover(unread),
                        ..
                    } => {
                        stream.stream.unread(unread.to_vec());
                        hyper_turn = true;
                        continue;
                    }
                    Ended::Finished {
                        output: Outcome::Idle,
                        released,
                    } => released,
                    Ended::Finished {
                        output: Outcome::Closed,
                        ..
                    } => false,
                    Ended::Cut => return,
                }
            };
            if released {
                let until = ctx.clock.idle_deadline(deadlines.idle);
                if let Some(lot) = &ctx.lot {
                    stream = match park(stream) {
                        Ok(Some((socket, destination))) => {
                            lot.park(Parked {
                                socket,
                                client: ctx.peer,
                                destination,
                                until,
                                open,
                                release_after,
                                since: tokio::time::Instant::now(),
                            });
                            return;
                        }
                        Ok(None) => return,
                        Err(stream) => stream,
                    };
                }
                let waiting = tokio::time::Instant::now();
                if next_request(&mut stream, until, drain).await {
                    release_after = release_next(release_after, waiting.elapsed());
                    continue;
                }
            }
            // The connection is done (the client closed it, or a request or response asked
            // to close), or it idled out, or drover drains: say so to the client, as hyper
            // would have.
            let _ = tokio::time::timeout(deadlines.send, stream.shutdown()).await;
            return;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Http1<S> {
    /// Takes the stream and the service back from hyper's ended connection, with the bytes
    /// hyper read but did not use put back in front, and frees the rest.
    fn take_back(self) -> (Http1Stream<S>, Requests) {
        let http1::Parts {
            io,
            read_buf,
            service,
            ..
        } = (*self.0).into_parts();
        let mut stream = io.into_inner();
        if !read_buf.is_empty() {
            stream.stream.unread(read_buf.to_vec());
        }
        // Even empty, `read_buf` holds hyper's whole read buffer: it is freed here, with the
        // box, before the caller waits for anything.
        (stream, service)
    }
}

/// Takes a released connection's socket out of tokio's hands, with the address the client
/// connected to, to be parked. The stream back if it cannot be parked (TLS, or bytes read
/// ahead); None if the socket was lost on the way.
#[allow(clippy::type_complexity)]
fn park<S: Park>(
    stream: Http1Stream<S>,
) -> Result<Option<(std::net::TcpStream, IpAddr)>, Http1Stream<S>> {
    // The IP the client connected to is kept only as a header value.
    let local_ip = stream.ctx.local_ip.to_str().ok();
    let Some(ip) = local_ip.and_then(|ip| ip.parse().ok()) else {
        return Err(stream);
    };
    let Tracked { stream, ctx, heads } = stream;
    match stream.park() {
        Ok(Ok(socket)) => Ok(Some((socket, ip))),
        Ok(Err(e)) => {
            tracing::debug!(client = %ctx.peer, "lost a connection while parking it: {e}");
            Ok(None)
        }
        Err(stream) => Err(Tracked { stream, ctx, heads }),
    }
}

/// Waits on a released connection, with no hyper state held, for the first bytes of its next
/// request, and puts them back for hyper. False if the client closes, the idle deadline
/// `until` passes, or drover drains first.
// An async block, for the reason given in `serve_http1`: every idle connection that cannot be
// parked (TLS) holds it.
#[allow(clippy::manual_async_fn)]
fn next_request<'a, S: AsyncRead + Unpin>(
    stream: &'a mut Http1Stream<S>,
    until: tokio::time::Instant,
    drain: &'a CancellationToken,
) -> impl Future<Output = bool> + 'a {
    async move {
        // Small: this read only tells that a request is coming; hyper's first read takes the
        // rest.
        let mut first = [0u8; 8];
        let n = tokio::select! {
            r = tokio::time::timeout_at(until, stream.read(&mut first)) => match r {
                Ok(Ok(n)) if n > 0 => n,
                _ => return false,
            },
            _ = drain.cancelled() => return false,
        };
        stream.stream.unread(first[..n].to_vec());
        true
    }
}

/// How long an idle connection asked to close may take to do so: an HTTP/2 connection
/// waits for the client to acknowledge its GOAWAY's PING, one round trip.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How [`watch`] ended.
enum Ended<T> {
    /// hyper's connection ended: by itself, or `released` because drover asked it to while
    /// the connection was idle.
    Finished { output: T, released: bool },
    /// A deadline passed, or the grace period after a drain ran out.
    Cut,
}

/// Drives hyper's connection until it ends, a deadline passes, or the grace period after a
/// drain runs out. `shutdown` asks hyper to finish: on a drain, and, when `release` is given,
/// once the connection has been idle that long.
async fn watch<C: Future + Unpin>(
    conn: &mut C,
    shutdown: impl Fn(&mut C),
    release: Option<Duration>,
    ctx: &ConnCtx,
    deadlines: &Deadlines,
    drain: &CancellationToken,
) -> Ended<C::Output> {
    let (peer, clock) = (ctx.peer, &ctx.clock);
    let check_every = deadlines
        .request_header
        .min(deadlines.idle)
        .min(deadlines.send);
    let mut watchdog = pin!(tokio::time::sleep(check_every));
    let mut drained = pin!(drain.cancelled());
    let mut draining = false;
    let mut releasing = false;
    // Asked to close because it stayed idle past its idle deadline.
    let mut closing = false;
    // The idle spell the watchdog was last set to release the connection after.
    let mut armed_for = None;
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(output) = Pin::new(&mut *conn).poll(cx) {
                let released = releasing;
                return Poll::Ready(Ended::Finished { output, released });
            }
            if !draining && drained.as_mut().poll(cx).is_ready() {
                draining = true;
                shutdown(conn);
                let grace = ctx.tables.load().shutdown_grace();
                watchdog.as_mut().reset(tokio::time::Instant::now() + grace);
                continue;
            }
            let idle_since = clock.idle_since();
            if let (Some(after), Some(since)) = (release, idle_since) {
                // Idle again: set the watchdog for the release (or the idle deadline, if that
                // comes first). Under load this moves it later each time, which tokio does
                // without touching its timer wheel.
                if !draining && !releasing && armed_for != Some(since) {
                    armed_for = Some(since);
                    let at = clock.instant(since, after.min(deadlines.idle));
                    watchdog.as_mut().reset(at);
                }
            }
            if watchdog.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if draining {
                tracing::debug!(%peer, "grace period over; closing the connection");
                return Poll::Ready(Ended::Cut);
            }
            if closing && clock.in_flight.load(Ordering::Relaxed) == 0 {
                tracing::debug!(%peer, "idle connection did not close in time; closing it");
                return Poll::Ready(Ended::Cut);
            }
            let idle_enough = match (release, idle_since) {
                (Some(after), Some(since)) => {
                    Duration::from_millis(clock.now().saturating_sub(since)) >= after
                }
                _ => false,
            };
            if idle_enough && !releasing {
                releasing = true;
                shutdown(conn);
                watchdog
                    .as_mut()
                    .reset(tokio::time::Instant::now() + check_every);
                continue;
            }
            match next_check(clock, deadlines) {
                // Idle past the idle deadline: closed the way a server announces it, so that
                // the client opens a new connection for its next request instead of racing
                // the close (HTTP/2 sends GOAWAY; an idle HTTP/1 connection just closes).
                None if !closing && idle_since.is_some() => {
                    closing = true;
                    shutdown(conn);
                    watchdog
                        .as_mut()
                        .reset(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                    continue;
                }
                None => {
                    tracing::debug!(%peer, "connection deadline passed; closing it");
                    return Poll::Ready(Ended::Cut);
                }
                Some(wait) => watchdog
                    .as_mut()
                    .reset(tokio::time::Instant::now() + wait.min(check_every)),
            }
        }
    })
    .await
}
/// How long until the connection's next deadline, or None if one has passed.
fn next_check(clock: &Clock, d: &Deadlines) -> Option<Duration> {
    let now = clock.now();
    let remaining = |since: u64, limit: Duration| {
        let limit = limit.as_millis() as u64;
        let elapsed = now.saturating_sub(since);
        (elapsed < limit).then(|| Duration::from_millis(limit - elapsed))
    };
    let sending = match clock.write_blocked_since.load(Ordering::Relaxed) {
        NOT_BLOCKED => d.send,
        since => remaining(since, d.send)?,
    };
    if clock.in_flight.load(Ordering::Relaxed) > 0 {
        return Some(d.request_header.min(d.idle).min(sending));
    }
    let next = match clock.head_since.load(Ordering::Relaxed) {
        NOT_READING => remaining(clock.idle_since.load(Ordering::Relaxed), d.idle),
        since => remaining(since, d.request_header),
    };
    next.map(|n| n.min(sending))
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
            write_blocked_since: AtomicU64::new(NOT_BLOCKED),
        }
    }

    const D: Deadlines = Deadlines {
        request_header: Duration::from_secs(10),
        idle: Duration::from_secs(75),
        send: Duration::from_secs(60),
    };

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "127.0.0.1",
            "192.168.10.200",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip).unwrap(), ip.to_string().as_str());
        }
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(ip_value(mapped).unwrap(), "203.0.113.7");
    }

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

    #[test]
    fn a_write_blocked_on_a_client_that_does_not_read_expires_even_while_busy() {
        let c = clock();
        c.in_flight.store(1, Ordering::Relaxed);
        c.write_blocked_since.store(95_000, Ordering::Relaxed);
        let left = next_check(&c, &D).unwrap();
        assert!(left <= Duration::from_secs(10), "{left:?}");
        c.write_blocked_since.store(30_000, Ordering::Relaxed);
        assert_eq!(next_check(&c, &D), None, "blocked for 70 s, limit 60 s");
        c.write_blocked_since.store(NOT_BLOCKED, Ordering::Relaxed);
        assert!(next_check(&c, &D).is_some(), "unblocked again");
    }

    /// Sniffs what `chunks` (written with a pause between them) start with, and returns the
    /// version and the bytes a reader then gets from the stream.
    async fn sniff(chunks: &[&[u8]], then_close: bool) -> (Option<HttpVersion>, Vec<u8>) {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1024);
        let owned: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for c in owned {
                client.write_all(&c).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if then_close {
                drop(client);
                return None;
            }
            Some(client)
        });
        let mut stream = Prefixed::new(Vec::new(), server);
        let version = sniff_version(&mut stream, &D, &CancellationToken::new()).await;
        let _client = writer.await.unwrap();
        let mut back = vec![0u8; 1024];
        let n = match version {
            Some(_) => stream.read(&mut back).await.unwrap(),
            None => 0,
        };
        back.truncate(n);
        (version, back)
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_bytes_tell_the_version_and_are_read_again() {
        let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        assert_eq!(
            sniff(&[get], false).await,
            (Some(HttpVersion::Http1), get.to_vec())
        );
        // PROPFIND shares "PR" with the preface; the third byte tells them apart.
        let propfind = b"PROPFIND / HTTP/1.1\r\n\r\n";
        assert_eq!(
            sniff(&[&propfind[..1], &propfind[1..]], false).await,
            (Some(HttpVersion::Http1), propfind.to_vec())
        );
        // The preface in pieces, and the SETTINGS frame after it.
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(
            sniff(&[&h2[..3], &h2[3..20], &h2[20..]], false).await,
            (Some(HttpVersion::Http2), h2.clone())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silence_or_an_early_end_is_no_version() {
        // Nothing within the idle deadline.
        let started = tokio::time::Instant::now();
        assert_eq!(sniff(&[], false).await.0, None);
        assert!(started.elapsed() >= D.idle, "{:?}", started.elapsed());
        // Half a preface, then nothing within the header deadline.
        let started = tokio::time::Instant::now();
        assert_eq!(sniff(&[&H2_PREFACE[..10]], false).await.0, None);
        let waited = started.elapsed();
        assert!(waited >= D.request_header && waited < D.idle, "{waited:?}");
        // Half a preface, then the end.
        assert_eq!(sniff(&[&H2_PREFACE[..10]], true).await.0, None);
        // The preface a byte every 4 s: each read within the 10 s header deadline, the whole
        // not, so the deadline counts in total from the first byte.
        let (tx, rx) = tokio::io::duplex(64);
        let drip = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut tx = tx;
            for b in H2_PREFACE {
                if tx.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
        });
        let started = tokio::time::Instant::now();
        let mut stream = Prefixed::new(Vec::new(), rx);
        let version = sniff_version(&mut stream, &D, &CancellationToken::new()).await;
        assert_eq!(version, None);
        let waited = started.elapsed();
        assert!(waited <= D.request_header, "{waited:?}");
        drop(stream);
        drip.await.unwrap();
    }
}
