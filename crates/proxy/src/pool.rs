//! Endpoint state and the upstream connection pool.
//!
//! HTTP/1.1: each endpoint owns a lock-free queue of idle connections for each worker
//! ([`crate::workers`]). A request takes one from its worker's queue (dropping any that went
//! stale, that the upstream closed or sent something on, or that an older version of the
//! service's connection settings opened), or opens a new one; its response body gives the
//! connection back to the same queue when it has been read to the end. A connection is so
//! only ever used by the worker that opened it, whose runtime watches its socket. A connection
//! whose response was not read to the end is never reused: it is closed. Each queue is
//! bounded by the service's `pool_max_idle`, as nginx's `keepalive` bounds each worker
//! process's cache; idle connections older than
//! `pool_idle_timeout`, or closed by their upstream, are closed at the next checkout or
//! sweep.
//!
//! HTTP/2: each endpoint has one multiplexed connection, opened by the first request that
//! needs it and shared by all the others (a clone of its `SendRequest` each), held in an
//! `ArcSwapOption` slot: a request reads it with one atomic load. hyper queues requests beyond
//! the server's `SETTINGS_MAX_CONCURRENT_STREAMS` until a stream frees up. A connection that
//! closed (GOAWAY, reset, failed keep-alive ping) is replaced by the next request; one unused
//! for `pool_idle_timeout` is closed by the sweep. Requests that find the slot empty at the
//! same moment may each open a connection: the first stored wins and the others close once
//! their request is done.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use crossbeam_queue::SegQueue;
use drover_balance::{Candidate, PeakEwma};
use drover_model::UpstreamProtocol;
use hyper::client::conn::http2;

use crate::forward::ReqBody;
use crate::h1::H1Conn;
use crate::health::{Health, now_ms};
use crate::stats::CodeCounters;
pub(crate) use crate::upstream::ConnectError;
use crate::upstream::{Conn, Upstream};
use crate::workers;

/// Warnings about an endpoint's refused certificate: at most one per endpoint this often;
/// the others go to the debug log.
const TLS_WARN_EVERY_MS: u64 = 10_000;

/// How fast the latency estimate forgets a slow response: 10 s, Linkerd's default decay.
const LATENCY_DECAY: Duration = Duration::from_secs(10);

/// The runtime state of one endpoint of one service, shared by every table it appears in.
#[derive(Debug)]
pub struct EndpointState {
    pub address: SocketAddr,
    /// Requests sent to it and not yet finished.
    pub in_flight: AtomicU64,
    /// Responses received from it (any status).
    pub responses: AtomicU64,
    /// The same responses by status class.
    pub responses_by_class: CodeCounters,
    /// Requests that got no response from it: connect failures, resets, timeouts.
    pub failures: AtomicU64,
    /// Active checks, outlier ejection, slow start.
    pub health: Health,
    /// Peak-EWMA of its response times, for `p2c_ewma`.
    pub latency: PeakEwma,
    /// Idle HTTP/1.1 connections, a queue for each worker.
    idle: Box<[IdleQueue]>,
    /// The shared HTTP/2 connection, when the service speaks HTTP/2 and one is open.
    h2: ArcSwapOption<Shared>,
    /// When a refused certificate was last warned about (`now_ms`).
    tls_warned: AtomicU64,
}

/// One worker's idle HTTP/1.1 connections to an endpoint.
#[derive(Debug, Default)]
struct IdleQueue {
    conns: SegQueue<Idle>,
    /// How many; kept beside the queue, whose own count is not a single load.
    len: AtomicUsize,
}

#[derive(Debug)]
struct Idle {
    conn: Box<H1Conn>,
    since: Instant,
    /// The `Upstream::id` that opened it.
    upstream: u64,
}

/// An HTTP/2 connection shared by every request to one endpoint.
#[derive(Debug)]
struct Shared {
    sender: http2::SendRequest<ReqBody>,
    upstream: u64,
    /// When a request last took it (`now_ms`).
    used: AtomicU64,
}

impl EndpointState {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            in_flight: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            responses_by_class: CodeCounters::default(),
            failures: AtomicU64::new(0),
            health: Health::new(),
            latency: PeakEwma::new(LATENCY_DECAY),
            idle: (0..workers::count())
                .map(|_| IdleQueue::default())
                .collect(),
            h2: ArcSwapOption::empty(),
            tls_warned: AtomicU64::new(0),
        }
    }

    /// Idle pooled connections right now; an open HTTP/2 connection counts as one.
    pub fn idle_connections(&self) -> usize {
        let idle: usize = self
            .idle
            .iter()
            .map(|q| q.len.load(Ordering::Relaxed))
            .sum();
        idle + usize::from(self.h2.load().is_some())
    }

    /// A connection made by `upstream` that is open and fresh, if there is one: an idle
    /// HTTP/1.1 one, taken out of the pool, or the shared HTTP/2 one. `now` is the caller's
    /// reading of the clock, against which idle connections' ages are judged.
    pub(crate) fn checkout(
        &self,
        upstream: &Upstream,
        max_idle_age: Duration,
        now: Instant,
    ) -> Option<Conn> {
        if upstream.protocol == UpstreamProtocol::Http2 {
            let guard = self.h2.load();
            let shared = guard.as_ref()?;
            if shared.upstream != upstream.id || shared.sender.is_closed() {
                return None;
            }
            shared.used.store(now_ms(), Ordering::Relaxed);
            return Some(Conn::H2(shared.sender.clone()));
        }
        let queue = self.own_queue();
        while let Some(mut idle) = queue.conns.pop() {
            queue.len.fetch_sub(1, Ordering::Relaxed);
            if idle.upstream == upstream.id
                && now.saturating_duration_since(idle.since) < max_idle_age
                && idle.conn.is_open()
            {
                return Some(Conn::H1(idle.conn));
            }
        }
        None
    }

    /// Gives an HTTP/1.1 connection back to this worker's queue, unless it is full.
    pub(crate) fn checkin(&self, conn: Box<H1Conn>, upstream: u64, max_idle: usize) {
        let queue = self.own_queue();
        if queue.len.fetch_add(1, Ordering::Relaxed) >= max_idle {
            queue.len.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        queue.conns.push(Idle {
            conn,
            since: Instant::now(),
            upstream,
        });
    }

    /// The queue of idle connections of the worker this runs on.
    #[inline]
    fn own_queue(&self) -> &IdleQueue {
        self.idle.get(workers::index()).unwrap_or(&self.idle[0])
    }

    /// Closes idle connections that are older than `max_idle_age` or already closed, and
    /// the shared HTTP/2 connection when it is closed, or unused for `max_idle_age` with no
    /// request in flight.
    pub fn sweep(&self, max_idle_age: Duration) {
        for queue in &self.idle {
            for _ in 0..queue.len.load(Ordering::Relaxed) {
                let Some(mut idle) = queue.conns.pop() else {
                    break;
                };
                queue.len.fetch_sub(1, Ordering::Relaxed);
                if idle.since.elapsed() < max_idle_age && idle.conn.is_open() {
                    queue.len.fetch_add(1, Ordering::Relaxed);
                    queue.conns.push(idle);
                }
            }
        }
        let max_ms = max_idle_age.as_millis() as u64;
        self.h2.rcu(|current| match current {
            Some(s)
                if s.sender.is_closed()
                    || (self.in_flight.load(Ordering::Relaxed) == 0
                        && now_ms().saturating_sub(s.used.load(Ordering::Relaxed)) >= max_ms) =>
            {
                None
            }
            other => other.clone(),
        });
    }

    /// Opens a new connection with `upstream` and spawns the task that drives it. An HTTP/2
    /// connection becomes the endpoint's shared one, unless another request stored a live
    /// one first: then that one is used, and this one closes.
    pub(crate) async fn connect(
        &self,
        upstream: &Upstream,
        timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        let conn = upstream.connect(self.address, timeout).await?;
        let Conn::H2(sender) = conn else {
            return Ok(conn);
        };
        let fresh = Arc::new(Shared {
            sender,
            upstream: upstream.id,
            used: AtomicU64::new(now_ms()),
        });
        let before = self.h2.rcu(|current| match current {
            Some(s) if s.upstream == upstream.id && !s.sender.is_closed() => Some(s.clone()),
            _ => Some(fresh.clone()),
        });
        let chosen = match before {
            Some(s) if s.upstream == upstream.id && !s.sender.is_closed() => s,
            _ => fresh,
        };
        Ok(Conn::H2(chosen.sender.clone()))
    }

    /// Drops the shared HTTP/2 connection if it has closed, so that the next request opens
    /// another.
    pub(crate) fn forget_closed(&self) {
        self.h2.rcu(|current| match current {
            Some(s) if s.sender.is_closed() => None,
            other => other.clone(),
        });
    }

    /// Logs a connection failure: a refused certificate as a warning at most every 10 s per
    /// endpoint, everything else at debug level.
    pub(crate) fn log_connect_error(&self, service: &str, e: &ConnectError) {
        if e.is_certificate() {
            let now = now_ms().max(1);
            let last = self.tls_warned.load(Ordering::Relaxed);
            if (last == 0 || now.saturating_sub(last) >= TLS_WARN_EVERY_MS)
                && self
                    .tls_warned
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(service, endpoint = %self.address, "{e}");
                return;
            }
        }
        tracing::debug!(service, endpoint = %self.address, "{e}");
    }
}

impl Candidate for EndpointState {
    #[inline]
    fn is_available(&self) -> bool {
        self.health.is_available()
    }
    #[inline]
    fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
    #[inline]
    fn latency_ewma_ns(&self) -> u64 {
        self.latency.value_ns()
    }
    #[inline]
    fn ramp(&self) -> f64 {
        self.health.ramp()
    }
}
