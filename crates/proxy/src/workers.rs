//! The data plane's worker threads.
//!
//! Each worker is a thread running a single-threaded tokio runtime of its own. Every
//! listener accepts on every worker, each through its own descriptor of the one listening
//! socket, and a connection is served from its accept to its close by one worker: the one
//! that accepted it, or the one with fewer connections it was handed to at once
//! ([`WorkerCounts`]). Its task never moves to another thread, so its socket, its timers and
//! the data its requests touch stay in that core's cache, and waking it never crosses
//! threads.
//! What a connection leaves behind for later stays with its worker too: an idle client
//! connection waits in its worker's lot ([`crate::park`]), an idle upstream connection in its
//! worker's part of the endpoint's pool ([`crate::pool`]).
//!
//! The rest of drover (sources, reconciler, admin API, health checks) runs on a runtime of
//! its own. Without workers of its own, a [`Proxy`](crate::Proxy) serves on the runtime it
//! was made in, as one worker: that is how tests run it.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// This thread's worker number; 0 on a thread that is not a worker.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The most workers any [`Workers`] in this process has had: how many parts an endpoint's
/// pool of idle connections, and a listener's count of open connections, are split into.
static COUNT: AtomicUsize = AtomicUsize::new(1);

/// The worker this thread is, from 0; 0 on any other thread.
#[inline]
pub(crate) fn index() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers there are (at least 1).
pub(crate) fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// The runtimes a [`Proxy`](crate::Proxy) serves connections on.
pub struct Workers {
    runtimes: Vec<Handle>,
    /// What ends each thread's runtime, and the threads; empty when the runtime is borrowed.
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` worker threads (at least one), named `drover-worker-{i}`.
    pub fn start(n: usize) -> io::Result<Workers> {
        let n = n.max(1);
        COUNT.fetch_max(n, Ordering::Relaxed);
        let mut workers = Workers {
            runtimes: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.runtimes.push(runtime.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("drover-worker-{i}"))
                .spawn(move || {
                    INDEX.with(|index| index.set(i));
                    // Until told to stop, or until the `Workers` is dropped. Its tasks are
                    // dropped with the runtime, here on its own thread.
                    let _ = runtime.block_on(stopped);
                })?;
            workers.stops.push(stop);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// The runtime this is called in, as the only worker. Must be called inside a tokio
    /// runtime.
    pub fn current() -> Workers {
        Workers {
            runtimes: vec![Handle::current()],
            stops: Vec::new(),
            threads: Vec::new(),
        }
    }

    /// The workers' runtimes, worker 0 first.
    pub(crate) fn runtimes(&self) -> &[Handle] {
        &self.runtimes
    }
}

impl Drop for Workers {
    /// Stops the worker threads and waits for them; their connections close. Shut the data
    /// plane down first ([`ProxyHandle::shutdown`](crate::ProxyHandle::shutdown)) for
    /// connections to end gracefully.
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A listener's connections open on each worker. A worker that accepts a connection while
/// another has at least two fewer hands it over to the one with the fewest
/// (`WorkerCounts::pick`), so that one worker does not end up serving most of a burst of
/// connections while another idles: which worker's accept wins a connection is a race (a
/// burst of 64 ended up 40 to 24 without this).
#[derive(Debug)]
pub struct WorkerCounts(Box<[Count]>);

/// One worker's count, on a cache line of its own: mostly written by its own worker, which
/// counts the connections it keeps and those that close on it.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Count(AtomicU64);

impl Default for WorkerCounts {
    /// A count for each worker there is.
    fn default() -> Self {
        Self::new(count())
    }
}

impl WorkerCounts {
    fn new(workers: usize) -> Self {
        Self((0..workers.max(1)).map(|_| Count::default()).collect())
    }

    /// Connections open on each worker now, worker 0 first.
    pub fn get(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().map(|c| c.0.load(Ordering::Relaxed))
    }

    /// The worker a connection accepted by worker `here` should be served by: `here`, unless
    /// another has at least two fewer connections; then the one with the fewest.
    pub(crate) fn pick(&self, here: usize) -> usize {
        let Some(own) = self.0.get(here) else {
            return here;
        };
        let own = own.0.load(Ordering::Relaxed);
        let (least, fewest) = self
            .get()
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .expect("at least one worker");
        if fewest + 1 < own { least } else { here }
    }

    pub(crate) fn add(&self, worker: usize) {
        if let Some(c) = self.0.get(worker) {
            c.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn sub(&self, worker: usize) {
        if let Some(c) = self.0.get(worker) {
            c.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_worker_is_a_thread_of_its_own_that_knows_its_number() {
        let workers = Workers::start(3).unwrap();
        let (tx, rx) = mpsc::channel();
        for (i, runtime) in workers.runtimes().iter().enumerate() {
            let tx = tx.clone();
            runtime.spawn(async move {
                let thread = std::thread::current();
                let _ = tx.send((i, index(), thread.name().map(str::to_string), thread.id()));
            });
        }
        drop(tx);
        let mut seen: Vec<_> = rx.iter().collect();
        seen.sort_by_key(|s| s.0);
        assert_eq!(seen.len(), 3);
        for (i, index, name, _) in &seen {
            assert_eq!(index, i);
            assert_eq!(name.as_deref(), Some(format!("drover-worker-{i}").as_str()));
        }
        assert!(seen[0].3 != seen[1].3 && seen[1].3 != seen[2].3 && seen[0].3 != seen[2].3);
        assert!(count() >= 3);
        assert_eq!(index(), 0, "not a worker: the test's own thread");
    }

    #[test]
    fn dropping_the_workers_ends_their_tasks_and_threads() {
        let workers = Workers::start(2).unwrap();
        let (tx, rx) = mpsc::channel::<()>();
        for runtime in workers.runtimes() {
            let tx = tx.clone();
            // Never finishes: only dropped, with its runtime.
            runtime.spawn(async move {
                std::future::pending::<()>().await;
                drop(tx);
            });
        }
        drop(tx);
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(100)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "the tasks run until the workers go"
        );
        drop(workers);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn a_connection_goes_to_a_worker_with_two_fewer_connections_or_stays() {
        let counts = |open: &[u64]| {
            let c = WorkerCounts::new(open.len());
            for (worker, &n) in open.iter().enumerate() {
                (0..n).for_each(|_| c.add(worker));
            }
            c
        };
        assert_eq!(counts(&[0, 0]).pick(0), 0);
        assert_eq!(
            counts(&[1, 0]).pick(0),
            0,
            "one more: not worth a hand-over"
        );
        assert_eq!(counts(&[2, 0]).pick(0), 1);
        assert_eq!(counts(&[0, 2]).pick(0), 0);
        assert_eq!(counts(&[3, 2, 1]).pick(0), 2, "to the fewest");
        assert_eq!(counts(&[3, 1, 1]).pick(0), 1, "the first of the fewest");
        assert_eq!(counts(&[2, 1, 1]).pick(0), 0);
        assert_eq!(counts(&[5]).pick(0), 0, "one worker");
        let c = counts(&[2, 0]);
        c.sub(0);
        c.sub(0);
        c.add(1);
        assert_eq!(c.get().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(c.pick(1), 1);
    }
}
