//! The listener supervisor: makes the sockets match the configuration, and publishes tables.
//!
//! [`Proxy`] is the reconciler's [`Applier`]. For a new configuration it builds the routing
//! table, binds every listen address that is new, and only if all of them bound does it
//! publish the table and start accepting on them; a bind failure rejects the configuration
//! and closes nothing. Listeners are keyed by address: an address that stays keeps its socket
//! and its connections whatever else changes (its name, limits or routes), one that goes
//! stops accepting at once and drains its connections within the shutdown grace.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use drover_control::Applier;
use drover_model::{Effective, ListenerSpec, Protocol};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::AccessLog;
use crate::conn::{self, Accepted, Deadlines, Listening};
use crate::health::Checker;
use crate::stats::Stats;
use crate::table::{RoutingTable, TableBuilder};

/// Pending connections the kernel queues for each listener.
const BACKLOG: u32 = 1024;
/// How often idle upstream connections are checked for age.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A cheap handle to the running data plane.
#[derive(Clone, Debug)]
pub struct ProxyHandle {
    tables: Arc<ArcSwap<RoutingTable>>,
    stats: Arc<Stats>,
    access_log: Option<AccessLog>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl ProxyHandle {
    /// The table in force.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.tables.load_full()
    }

    /// The process-wide request counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The access log, when there is one.
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.as_ref()
    }

    /// Stops accepting on every listener, lets in-flight requests finish within the shutdown
    /// grace, and returns once every connection is closed.
    pub async fn shutdown(&self) {
        let grace = self.table().effective.config.global.shutdown_grace.get();
        self.shutdown.cancel();
        self.tracker.close();
        let open = self.tracker.len();
        if open > 0 {
            tracing::info!("draining {open} connections for up to {grace:?}");
        }
        // Each connection cuts itself at the end of the grace; the margin covers the cut.
        if tokio::time::timeout(grace + Duration::from_secs(1), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "{} connections still open after the grace period",
                self.tracker.len()
            );
        }
    }
}

struct Running {
    drain: CancellationToken,
    slots: Arc<Semaphore>,
    max_connections: u32,
}

/// The data plane's side of reconciliation: tables, listeners, and the handle to them.
pub struct Proxy {
    handle: ProxyHandle,
    builder: TableBuilder,
    listeners: HashMap<SocketAddr, Running>,
    /// Connections served at once over all listeners (`global.max_connections`).
    global_slots: Arc<Semaphore>,
    global_max: u32,
    checker: Checker,
}

impl Proxy {
    /// A data plane with no listeners yet and no access log. Must be called inside a tokio
    /// runtime: it starts the pool sweeper.
    pub fn new() -> Self {
        Self::with_access_log(None)
    }

    /// A data plane with no listeners yet that logs every request to `access_log`, if given.
    /// Must be called inside a tokio runtime: it starts the pool sweeper.
    pub fn with_access_log(access_log: Option<AccessLog>) -> Self {
        let handle = ProxyHandle {
            tables: Arc::new(ArcSwap::from_pointee(RoutingTable::default())),
            stats: Arc::new(Stats::default()),
            access_log,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        tokio::spawn(sweep_pools(handle.tables.clone(), handle.shutdown.clone()));
        Self {
            handle,
            builder: TableBuilder::default(),
            listeners: HashMap::new(),
            global_slots: Arc::new(Semaphore::new(0)),
            global_max: 0,
            checker: Checker::default(),
        }
    }

    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    fn start(&self, spec: &ListenerSpec, socket: TcpListener) -> Running {
        let running = Running {
            drain: self.handle.shutdown.child_token(),
            slots: Arc::new(Semaphore::new(spec.max_connections as usize)),
            max_connections: spec.max_connections,
        };
        tracing::info!(listener = %spec.name, "accepting {} on {}", spec.protocol, spec.listen);
        let listening = Listening {
            tables: self.handle.tables.clone(),
            stats: self.handle.stats.clone(),
            access_log: self.handle.access_log.clone(),
            local: spec.listen,
            drain: running.drain.clone(),
        };
        let tracker = self.handle.tracker.clone();
        let slots = Slots {
            listener: running.slots.clone(),
            global: self.global_slots.clone(),
        };
        self.handle
            .tracker
            .spawn(accept(socket, listening, tracker, slots));
        running
    }
}

impl Default for Proxy {
    fn default() -> Self {
        Self::new()
    }
}

impl Applier for Proxy {
    fn apply(&mut self, effective: &Arc<Effective>) -> Result<(), String> {
        let built = self.builder.build(effective);
        let listeners = &effective.config.listeners;
        let mut bound = Vec::new();
        for spec in listeners {
            if self.listeners.contains_key(&spec.listen) {
                continue;
            }
            let socket = bind(spec.listen).map_err(|e| {
                format!(
                    "listener {}: cannot listen on {}: {e}",
                    spec.name, spec.listen
                )
            })?;
            bound.push((spec, socket));
        }

        let global_max = effective.config.global.max_connections;
        resize_slots(&self.global_slots, self.global_max, global_max);
        self.global_max = global_max;

        let table = Arc::new(self.builder.commit(built));
        self.handle.tables.store(table.clone());
        self.checker.reconcile(&table, &self.handle.shutdown);

        for (spec, socket) in bound {
            let running = self.start(spec, socket);
            self.listeners.insert(spec.listen, running);
        }
        for spec in listeners {
            let running = self.listeners.get_mut(&spec.listen).expect("started above");
            resize(running, spec.max_connections);
        }
        self.listeners.retain(|addr, running| {
            let keep = listeners.iter().any(|l| l.listen == *addr);
            if !keep {
                tracing::info!("stopped accepting on {addr}; draining its connections");
                running.drain.cancel();
            }
            keep
        });
        Ok(())
    }
}

/// Moves a listener's connection limit to `max`, for connections accepted from now on.
fn resize(running: &mut Running, max: u32) {
    resize_slots(&running.slots, running.max_connections, max);
    running.max_connections = max;
}

/// Moves a connection limit from `old` to `max` slots.
fn resize_slots(slots: &Semaphore, old: u32, max: u32) {
    if max > old {
        slots.add_permits((max - old) as usize);
    } else if max < old {
        // Only free slots can be taken away now; busy ones are not handed back.
        let wanted = (old - max) as usize;
        let taken = slots.forget_permits(wanted);
        if taken < wanted {
            tracing::warn!(
                "connection limit lowered to {max}, but {} connections over it stay open",
                wanted - taken
            );
        }
    }
}

/// The connection limits an accepted connection takes a slot of: its listener's and the
/// process-wide one.
struct Slots {
    listener: Arc<Semaphore>,
    global: Arc<Semaphore>,
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn accept(socket: TcpListener, listening: Listening, tracker: TaskTracker, slots: Slots) {
    let (local, drain) = (listening.local, listening.drain.clone());
    loop {
        // At a connection limit, wait here: new clients queue in the kernel's backlog.
        let permit = tokio::select! {
            p = async {
                let listener = slots.listener.clone().acquire_owned().await?;
                let global = slots.global.clone().acquire_owned().await?;
                Ok::<_, tokio::sync::AcquireError>((listener, global))
            } => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = drain.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, or a connection reset while queued: back off
                    // briefly rather than spin.
                    tracing::warn!("accept on {local} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let (accepted, protocol) = match listening.tables.load().listener(local) {
            Some(l) => (
                Accepted {
                    deadlines: Deadlines {
                        request_header: l.spec.request_header_timeout.get(),
                        idle: l.spec.idle_timeout.get(),
                    },
                    server: l.server.clone(),
                    stats: l.stats.clone(),
                },
                l.spec.protocol,
            ),
            None => return,
        };
        let listening = listening.clone();
        tracker.spawn(async move {
            match protocol {
                Protocol::Http => conn::serve(listening, stream, peer, accepted).await,
                Protocol::Tcp => crate::tcp::serve(listening, stream, peer, accepted.stats).await,
            }
            drop(permit);
        });
    }
}

async fn sweep_pools(tables: Arc<ArcSwap<RoutingTable>>, stop: CancellationToken) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return,
        }
        let table = tables.load_full();
        for service in table.services() {
            for (endpoint, spec) in service.endpoints.iter().zip(&service.spec.endpoints) {
                // A drained or disabled endpoint keeps no idle connections.
                let max_age = if spec.state.is_enabled() {
                    service.spec.pool_idle_timeout.get()
                } else {
                    Duration::ZERO
                };
                endpoint.sweep(max_age);
            }
        }
    }
}
