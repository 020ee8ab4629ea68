//! Parked connections: plain HTTP/1 keep-alive connections that wait for their next request
//! with no task of their own.
//!
//! An idle HTTP/1 connection first gives up hyper's state ([`crate::conn`]'s release). If it
//! came over plain TCP, with nothing read ahead, it is then parked: its socket leaves tokio
//! and joins its listener's lot. The lot is one task with one epoll set. For each connection
//! it keeps only:
//! - the socket;
//! - the client's address and the address it connected to;
//! - its idle deadline;
//! - its place under the connection limits.
//!
//! When the next request's first bytes come, the lot hands the socket back to tokio and the
//! connection is served as if just accepted, minus the accept, PROXY header and sniffing. A
//! connection that the client closes, or that passes its idle deadline, is closed; when its
//! listener drains, every parked connection is closed at once.
//!
//! A TLS connection is not parked: its session lives in user space.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::conn::Open;
use crate::proxy_protocol::Prefixed;

/// A connection waiting in its listener's lot.
pub(crate) struct Parked {
    pub socket: std::net::TcpStream,
    /// The client's address: the peer's, or the one its PROXY header carried.
    pub client: SocketAddr,
    /// The IP the client connected to (its port is not used again).
    pub destination: IpAddr,
    /// When it is closed if no request comes.
    pub until: Instant,
    /// Keeps it counted open, and its slots under the connection limits.
    pub open: Open,
    /// How long it waited, idle, before it was released and parked.
    pub release_after: Duration,
    /// When it was parked.
    pub since: Instant,
}

/// A listener's lot, as its connections see it: where they go to wait.
#[derive(Clone)]
pub(crate) struct Lot(mpsc::UnboundedSender<Parked>);

impl Lot {
    /// Leaves a connection in the lot. If the lot is gone (its listener drained), the
    /// connection closes.
    pub(crate) fn park(&self, parked: Parked) {
        let _ = self.0.send(parked);
    }
}

/// The lot's side: the connections it is handed, and its epoll set.
pub(crate) struct Yard {
    arrivals: mpsc::UnboundedReceiver<Parked>,
    poll: AsyncFd<mio::Poll>,
}

/// A new lot. Must be called within the runtime: its epoll set is registered with tokio's.
pub(crate) fn lot() -> io::Result<(Lot, Yard)> {
    // `AsyncFd::new` is deprecated because a type's raw fd might be closed while tokio still
    // has it registered. A `mio::Poll` owns its epoll fd and closes it only when dropped,
    // which `AsyncFd` does after deregistering it; its safe replacement is an unsafe fn.
    #[allow(deprecated)]
    let poll = AsyncFd::new(mio::Poll::new()?)?;
    let (tx, arrivals) = mpsc::unbounded_channel();
    Ok((Lot(tx), Yard { arrivals, poll }))
}

/// A stream that can be parked: plain TCP, with no bytes put back in front of it.
pub(crate) trait Park: Sized {
    /// The socket, out of tokio's hands, or the stream itself if it cannot be parked. An
    /// error means the socket was lost on the way.
    fn park(self) -> Result<io::Result<std::net::TcpStream>, Self>;
}

impl Park for TcpStream {
    fn park(self) -> Result<io::Result<std::net::TcpStream>, Self> {
        Ok(self.into_std())
    }
}

impl<S: Park> Park for Prefixed<S> {
    fn park(self) -> Result<io::Result<std::net::TcpStream>, Self> {
        if self.holds_unread() {
            return Err(self);
        }
        // Nothing left in front: the stream alone is all there is to keep.
        self.into_inner()
            .park()
            .map_err(|inner| Self::new(Vec::new(), inner))
    }
}

impl<S> Park for tokio_rustls::server::TlsStream<S> {
    fn park(self) -> Result<io::Result<std::net::TcpStream>, Self> {
        Err(self)
    }
}

/// One connection in the yard, under a number of its own, so that a deadline left in the heap
/// for a connection that went never closes the one that took its place.
struct Slot {
    id: u64,
    parked: Parked,
}

impl Slot {
    /// Counts it parked, or no longer.
    fn count(&self, parked: bool) {
        let gauge = &self.parked.open.listener().connections_parked;
        if parked {
            gauge.fetch_add(1, Ordering::Relaxed);
        } else {
            gauge.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The lot's places: place `i` holds the connection registered in the epoll set under token
/// `i`. A connection takes the lowest free place, so that the places in use gather at the
/// bottom and the free places at the top can be dropped: after a spike of idle connections
/// the lot does not keep room for all of them for good.
#[derive(Default)]
struct Places {
    /// Each place's connection; None while the place is free, or while its connection is
    /// taken out to be looked at.
    slots: Vec<Option<Slot>>,
    /// The free places. The top place is never free: a free place at the top is dropped.
    free: BTreeSet<usize>,
}

impl Places {
    /// The lowest free place, made if there is none.
    fn take(&mut self) -> usize {
        self.free.pop_first().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        })
    }

    /// Frees `index`, whose connection is gone from it.
    fn give_back(&mut self, index: usize) {
        debug_assert!(self.slots.get(index).is_some_and(Option::is_none));
        self.free.insert(index);
        while self
            .free
            .last()
            .is_some_and(|&top| top + 1 == self.slots.len())
        {
            self.free.pop_last();
            self.slots.pop();
        }
        // Room for more than four times the places: shrunk to twice. Never below 256
        // places, so that a small lot does not reallocate back and forth.
        let (len, capacity) = (self.slots.len(), self.slots.capacity());
        if capacity > 256 && capacity > 4 * len {
            self.slots.shrink_to((2 * len).max(256));
        }
    }

    /// Connections in the lot.
    fn parked(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn get(&self, index: usize) -> Option<&Slot> {
        self.slots.get(index).and_then(Option::as_ref)
    }

    /// The connection in `index`, taken out of it (the place stays taken).
    fn take_out(&mut self, index: usize) -> Option<Slot> {
        self.slots.get_mut(index).and_then(Option::take)
    }
}

/// Keeps the lot until `drain` is cancelled: hands each connection whose next request begins
/// to `resume`, and closes those that the client closes or that pass their idle deadline.
/// When it ends, every connection still parked closes.
pub(crate) async fn run(mut yard: Yard, drain: CancellationToken, resume: impl Fn(Parked)) {
    let mut places = Places::default();
    let mut deadlines: BinaryHeap<Reverse<(Instant, usize, u64)>> = BinaryHeap::new();
    let mut next_id = 0u64;
    let mut events = Events::with_capacity(256);
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    loop {
        if let Some(Reverse((at, _, _))) = deadlines.peek() {
            timer.as_mut().reset(*at);
        }
        tokio::select! {
            biased;
            _ = drain.cancelled() => break,
            Some(parked) = yard.arrivals.recv() => {
                let index = places.take();
                let fd = parked.socket.as_raw_fd();
                let registry = yard.poll.get_ref().registry();
                // Registered while already readable, the socket is reported at once.
                match registry.register(&mut SourceFd(&fd), Token(index), Interest::READABLE) {
                    Ok(()) => {
                        next_id += 1;
                        deadlines.push(Reverse((parked.until, index, next_id)));
                        let slot = Slot { id: next_id, parked };
                        slot.count(true);
                        places.slots[index] = Some(slot);
                        // The deadlines of connections gone from the lot stay in the heap until
                        // they pass; past twice the lot's size, they are swept out, and the
                        // heap's room shrinks with them as the places' does.
                        let parked_now = places.parked();
                        if deadlines.len() > 2 * parked_now + 64 {
                            deadlines.retain(|&Reverse((_, i, id))| {
                                places.get(i).is_some_and(|s| s.id == id)
                            });
                            if deadlines.capacity() > 4 * deadlines.len() + 256 {
                                deadlines.shrink_to(2 * deadlines.len() + 256);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(client = %parked.client, "cannot park a connection, closing it: {e}");
                        places.give_back(index);
                    }
                }
            }
            ready = yard.poll.readable_mut() => {
                let mut ready = match ready {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("parked connections lost their epoll set, closing them: {e}");
                        break;
                    }
                };
                match ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("parked connections lost their epoll set, closing them: {e}");
                        break;
                    }
                }
                if events.is_empty() {
                    ready.clear_ready();
                    continue;
                }
                let registry = ready.get_inner().registry();
                for event in &events {
                    let index = event.token().0;
                    let Some(slot) = places.take_out(index) else {
                        continue;
                    };
                    let mut byte = [0u8; 1];
                    let peeked = slot.parked.socket.peek(&mut byte);
                    if matches!(&peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                        // Not readable after all: it stays.
                        places.slots[index] = Some(slot);
                        continue;
                    }
                    slot.count(false);
                    if matches!(peeked, Ok(n) if n > 0) {
                        // The next request's first bytes.
                        let fd = slot.parked.socket.as_raw_fd();
                        let _ = registry.deregister(&mut SourceFd(&fd));
                        resume(slot.parked);
                    }
                    // Otherwise closed by the client, or broken: dropped, which closes it.
                    places.give_back(index);
                }
            }
            () = &mut timer, if !deadlines.is_empty() => {
                let now = Instant::now();
                while let Some(&Reverse((at, index, id))) = deadlines.peek() {
                    if at > now {
                        break;
                    }
                    deadlines.pop();
                    // The place may be gone, or another connection's, by now.
                    if places.get(index).is_some_and(|s| s.id == id)
                        && let Some(slot) = places.take_out(index)
                    {
                        // Dropped, which closes it.
                        slot.count(false);
                        places.give_back(index);
                    }
                }
            }
        }
    }
    // Dropped, which closes them.
    places.slots.iter().flatten().for_each(|s| s.count(false));
}

/// The stream a resumed connection is served on.
pub(crate) fn unpark(socket: std::net::TcpStream) -> io::Result<Prefixed<TcpStream>> {
    Ok(Prefixed::new(Vec::new(), TcpStream::from_std(socket)?))
}

#[cfg(test)]
mod tests {
    use super::Places;

    #[test]
    fn a_connection_takes_the_lowest_free_place() {
        let mut places = Places::default();
        let taken: Vec<usize> = (0..4).map(|_| places.take()).collect();
        assert_eq!(taken, [0, 1, 2, 3]);
        places.give_back(2);
        places.give_back(0);
        assert_eq!(places.parked(), 2);
        assert_eq!(places.take(), 0);
        assert_eq!(places.take(), 2);
        assert_eq!(places.take(), 4);
    }

    #[test]
    fn the_places_of_a_spike_are_given_back_when_it_is_over() {
        let mut places = Places::default();
        for _ in 0..100_000 {
            places.take();
        }
        // All leave but the first and one in the middle, the top ones neither first nor last.
        let leaving = (1..100_000)
            .filter(|i| i % 7 != 3)
            .rev()
            .chain((1..100_000).filter(|i| i % 7 == 3))
            .filter(|&i| i != 50_000);
        for i in leaving {
            places.give_back(i);
        }
        assert_eq!(places.parked(), 2);
        // Everything above the one in the middle is given up...
        assert_eq!(places.slots.len(), 50_001);
        assert!(places.slots.capacity() < 4 * 50_001);
        // ... and, once it leaves, everything above the first.
        places.give_back(50_000);
        assert_eq!(places.slots.len(), 1);
        assert!(places.free.is_empty());
        assert!(
            places.slots.capacity() <= 256,
            "{}",
            places.slots.capacity()
        );
        assert_eq!(places.take(), 1);
    }
}
