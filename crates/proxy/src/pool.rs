//! Endpoint state and the upstream keep-alive pool.
//!
//! Each endpoint owns a lock-free queue of idle HTTP/1.1 connections. A request takes one
//! (dropping any that went stale or that the upstream closed), or opens a new one; its response
//! body gives the connection back when it has been read to the end. A connection whose response
//! was not read to the end is never reused: hyper closes it. The queue is bounded by the
//! service's `pool_max_idle`; idle connections older than `pool_idle_timeout` are closed at
//! the next checkout or sweep.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use drover_balance::{Candidate, PeakEwma};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::forward::ReqBody;
use crate::health::Health;
use crate::stats::CodeCounters;

/// The sending half of an upstream HTTP/1.1 connection.
pub type Sender = SendRequest<ReqBody>;

/// Why a new upstream connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("HTTP/1.1 handshake with {0} failed: {1}")]
    Handshake(SocketAddr, hyper::Error),
}

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
    idle: SegQueue<Idle>,
    idle_len: AtomicUsize,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
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
            idle: SegQueue::new(),
            idle_len: AtomicUsize::new(0),
        }
    }

    /// Idle pooled connections right now.
    pub fn idle_connections(&self) -> usize {
        self.idle_len.load(Ordering::Relaxed)
    }

    /// A pooled connection that is still open and fresh, if there is one.
    pub fn checkout(&self, max_idle_age: Duration) -> Option<Sender> {
        while let Some(idle) = self.idle.pop() {
            self.idle_len.fetch_sub(1, Ordering::Relaxed);
            if !idle.sender.is_closed() && idle.since.elapsed() < max_idle_age {
                return Some(idle.sender);
            }
        }
        None
    }

    /// Gives a connection back, unless the pool is full or the connection is closed.
    pub fn checkin(&self, sender: Sender, max_idle: usize) {
        if sender.is_closed() {
            return;
        }
        if self.idle_len.fetch_add(1, Ordering::Relaxed) >= max_idle {
            self.idle_len.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.idle.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// Closes idle connections that are older than `max_idle_age` or already closed.
    pub fn sweep(&self, max_idle_age: Duration) {
        for _ in 0..self.idle_len.load(Ordering::Relaxed) {
            let Some(idle) = self.idle.pop() else { break };
            self.idle_len.fetch_sub(1, Ordering::Relaxed);
            if !idle.sender.is_closed() && idle.since.elapsed() < max_idle_age {
                self.idle_len.fetch_add(1, Ordering::Relaxed);
                self.idle.push(idle);
            }
        }
    }

    /// Opens a new connection and spawns the task that drives it.
    pub async fn connect(&self, timeout: Duration) -> Result<Sender, ConnectError> {
        let addr = self.address;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ConnectError::Timeout(addr)),
            Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(addr, e))?;
        tokio::spawn(async move {
            // Ends when the upstream or drover closes the connection; either is routine.
            let _ = conn.await;
        });
        Ok(sender)
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
