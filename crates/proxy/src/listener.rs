//! The listener supervisor: makes the sockets match the configuration, and publishes tables.
//!
//! [`Proxy`] is the reconciler's [`Applier`]. For a new configuration it builds the routing
//! table, binds every listen address that is new, and only if all of them bound does it
//! publish the table and start accepting on them; a bind failure rejects the configuration
//! and closes nothing. Listeners are keyed by address: an address that stays keeps its socket
//! and its connections whatever else changes (its name, limits or routes), one that goes
//! stops accepting at once and drains its connections within the shutdown grace.
//!
//! Before a connection is served, its listener's [`Frontend`] applies: a PROXY protocol
//! header is read from trusted downstreams, then TLS is terminated, or for TLS passthrough
//! the ClientHello's server name is read; both within the listener's
//! `request_header_timeout`. Certificates are loaded when a configuration is applied, and a
//! certificate that cannot be loaded rejects it.
//!
//! Every worker ([`crate::workers`]) accepts on every listener, and serves a connection it
//! accepts unless another worker has at least two fewer of the listener's connections: then
//! it hands the socket over to that one. Each listener also keeps a lot ([`crate::park`]) on
//! each worker, where the idle HTTP/1 connections over plain TCP that worker serves wait for
//! their next request without a task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use drover_control::Applier;
use drover_model::{Effective, IpNet, ListenerSpec, Protocol, RouteSpec};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::AccessLog;
use crate::conn::{self, Accepted, Client, Deadlines, HttpVersion, Listening, Open, Served};
use crate::health::Checker;
use crate::park::{self, Parked};
use crate::proxy_protocol::{self, Prefixed};
use crate::stats::{ListenerStats, Stats};
use crate::table::{RoutingTable, TableBuilder};
use crate::tls::{self, Terminator};
use crate::workers::Workers;

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
        let table = self.table();
        let grace = table.shutdown_grace();
        self.shutdown.cancel();
        self.tracker.close();
        // Connections, not the tracker's tasks: those count each worker's accept loop and lot
        // as well, and no parked connection.
        let open = || -> u64 {
            table
                .listeners()
                .map(|l| l.stats.connections_active.load(Ordering::Relaxed))
                .sum()
        };
        let open_now = open();
        if open_now > 0 {
            tracing::info!("draining {open_now} connections for up to {grace:?}");
        }
        // Each connection cuts itself at the end of the grace; the margin covers the cut.
        if tokio::time::timeout(grace + Duration::from_secs(1), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("{} connections still open after the grace period", open());
        }
    }
}

struct Running {
    drain: CancellationToken,
    slots: Arc<Semaphore>,
    max_connections: u32,
    frontend: Arc<ArcSwap<Frontend>>,
}

/// What happens to a listener's connections before HTTP or TCP serving starts. Read once per
/// connection, when it is accepted.
pub(crate) struct Frontend {
    /// TLS termination, when the listener has `tls`.
    tls: Option<Arc<Terminator>>,
    /// Downstreams whose connections open with a PROXY protocol header.
    proxy_from: Vec<IpNet>,
    /// A TCP listener without TLS whose routes have hosts: read each ClientHello's SNI.
    sni_routing: bool,
}

impl Frontend {
    /// The frontend for `spec`, keeping the TLS terminator of `current` if its settings are
    /// the same (its watcher reloads the files), else loading the certificates. The bool says
    /// whether the terminator is new, so that its watcher must be started.
    fn new(
        spec: &ListenerSpec,
        routes: &[RouteSpec],
        current: Option<&Frontend>,
    ) -> Result<(Frontend, bool), String> {
        let kept = current
            .and_then(|c| c.tls.clone())
            .filter(|t| t.serves(spec));
        let (tls, fresh) = match (&spec.tls, kept) {
            (None, _) => (None, false),
            (Some(_), Some(kept)) => (Some(kept), false),
            (Some(settings), None) => (Some(Arc::new(Terminator::load(spec, settings)?)), true),
        };
        let sni_routing = spec.protocol == Protocol::Tcp
            && spec.tls.is_none()
            && routes
                .iter()
                .any(|r| r.listener == spec.name && r.host.is_some());
        Ok((
            Frontend {
                tls,
                proxy_from: spec.proxy_protocol_from.clone(),
                sni_routing,
            },
            fresh,
        ))
    }
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
    /// The workers' runtimes: each accepts on every listener.
    runtimes: Vec<Handle>,
}

impl Proxy {
    /// A data plane with no listeners yet and no access log, serving on the runtime it is
    /// called in. Must be called inside a tokio runtime: it starts the pool sweeper.
    pub fn new() -> Self {
        Self::on(&Workers::current(), None)
    }

    /// A data plane with no listeners yet that serves its connections on `workers` and logs
    /// every request to `access_log`, if given. Must be called inside a tokio runtime: the
    /// pool sweeper and health checks run on it.
    pub fn on(workers: &Workers, access_log: Option<AccessLog>) -> Self {
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
            runtimes: workers.runtimes().to_vec(),
        }
    }

    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    /// Starts accepting on `sockets`, one for each worker, in order.
    fn start(
        &self,
        spec: &ListenerSpec,
        sockets: Vec<TcpListener>,
        frontend: Arc<Frontend>,
    ) -> Running {
        let running = Running {
            drain: self.handle.shutdown.child_token(),
            slots: Arc::new(Semaphore::new(spec.max_connections as usize)),
            max_connections: spec.max_connections,
            frontend: Arc::new(ArcSwap::new(frontend)),
        };
        tracing::info!(listener = %spec.name, "accepting {} on {}", spec.protocol, spec.listen);
        let tracker = &self.handle.tracker;
        let mut stations = Vec::with_capacity(self.runtimes.len());
        for runtime in &self.runtimes {
            let mut listening = Listening {
                tables: self.handle.tables.clone(),
                stats: self.handle.stats.clone(),
                access_log: self.handle.access_log.clone(),
                local: spec.listen,
                drain: running.drain.clone(),
                lot: None,
            };
            // The lot's epoll set is registered with the runtime it is made in: its worker's.
            let lot = {
                let _worker = runtime.enter();
                park::lot()
            };
            let lot = lot.inspect_err(|e| {
                tracing::warn!(listener = %spec.name, "idle connections will keep their tasks: cannot make their lot: {e}")
            });
            if let Ok((lot, yard)) = lot {
                listening.lot = Some(lot);
                let (resumed, tasks) = (listening.clone(), tracker.clone());
                let resume = move |parked| resume(&resumed, &tasks, parked);
                tracker.spawn_on(park::run(yard, running.drain.clone(), resume), runtime);
            }
            stations.push(Station {
                runtime: runtime.clone(),
                listening,
            });
        }
        let stations: Arc<[Station]> = stations.into();
        for (here, socket) in sockets.into_iter().enumerate() {
            let accepting = Accepting {
                here,
                stations: stations.clone(),
                tracker: tracker.clone(),
                slots: Slots {
                    listener: running.slots.clone(),
                    global: self.global_slots.clone(),
                },
                frontend: running.frontend.clone(),
            };
            tracker.spawn_on(accept(socket, accepting), &stations[here].runtime);
        }
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
        let built = self.builder.build(effective)?;
        let listeners = &effective.config.listeners;
        // Certificates first: a file that cannot be used rejects the configuration before any
        // socket is bound or anything is published.
        let mut frontends = HashMap::with_capacity(listeners.len());
        for spec in listeners {
            let current = self
                .listeners
                .get(&spec.listen)
                .map(|r| r.frontend.load_full());
            let made = Frontend::new(spec, &effective.config.routes, current.as_deref())?;
            frontends.insert(spec.listen, made);
        }
        let mut bound = Vec::new();
        for spec in listeners {
            if self.listeners.contains_key(&spec.listen) {
                continue;
            }
            let sockets = bind(spec.listen, &self.runtimes).map_err(|e| {
                format!(
                    "listener {}: cannot listen on {}: {e}",
                    spec.name, spec.listen
                )
            })?;
            bound.push((spec, sockets));
        }

        let global_max = effective.config.global.max_connections;
        resize_slots(&self.global_slots, self.global_max, global_max);
        self.global_max = global_max;

        let table = Arc::new(self.builder.commit(built));
        self.handle.tables.store(table.clone());
        self.checker.reconcile(&table, &self.handle.shutdown);
        for service in table.services() {
            service.upstream.watch(&self.handle.shutdown);
        }

        for (frontend, fresh) in frontends.values() {
            if let (true, Some(t)) = (fresh, &frontend.tls) {
                t.watch(&self.handle.shutdown);
            }
        }
        let mut frontends: HashMap<SocketAddr, Arc<Frontend>> = frontends
            .into_iter()
            .map(|(addr, (frontend, _))| (addr, Arc::new(frontend)))
            .collect();
        for (spec, sockets) in bound {
            let frontend = frontends.remove(&spec.listen).expect("made above");
            let running = self.start(spec, sockets, frontend);
            self.listeners.insert(spec.listen, running);
        }
        for spec in listeners {
            let running = self.listeners.get_mut(&spec.listen).expect("started above");
            if let Some(frontend) = frontends.remove(&spec.listen) {
                running.frontend.store(frontend);
            }
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

/// Listens on `addr`, with one descriptor of the socket registered with each of `runtimes`.
fn bind(addr: SocketAddr, runtimes: &[Handle]) -> std::io::Result<Vec<TcpListener>> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // Made in the caller's runtime, then taken out of it (still non-blocking) to be shared.
    let socket = socket.listen(BACKLOG)?.into_std()?;
    runtimes
        .iter()
        .map(|runtime| {
            let own = socket.try_clone()?;
            let _worker = runtime.enter();
            TcpListener::from_std(own)
        })
        .collect()
}

/// A listener on one worker.
struct Station {
    runtime: Handle,
    listening: Listening,
}

/// What a worker's accept loop needs besides its socket.
struct Accepting {
    /// Its worker.
    here: usize,
    /// The listener on every worker.
    stations: Arc<[Station]>,
    tracker: TaskTracker,
    slots: Slots,
    frontend: Arc<ArcSwap<Frontend>>,
}

/// A connection just accepted, on its way to the worker that serves it.
enum Arrived {
    /// Accepted by that worker.
    Here(TcpStream),
    /// Accepted by another worker, and taken out of its runtime to be handed over.
    HandedOver(std::net::TcpStream),
}

async fn accept(socket: TcpListener, a: Accepting) {
    let here = &a.stations[a.here];
    let (local, drain) = (here.listening.local, here.listening.drain.clone());
    loop {
        // At a connection limit, wait here: new clients queue in the kernel's backlog.
        let permit = tokio::select! {
            p = async {
                let listener = a.slots.listener.clone().acquire_owned().await?;
                let global = a.slots.global.clone().acquire_owned().await?;
                Ok::<_, tokio::sync::AcquireError>([listener, global])
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
        let Some((accepted, protocol)) = accepted(&here.listening) else {
            return;
        };
        // Served here, unless another worker has fewer connections of this listener.
        let to = accepted.stats.connections_by_worker.pick(a.here);
        let stream = if to == a.here {
            Arrived::Here(stream)
        } else {
            match stream.into_std() {
                Ok(s) => Arrived::HandedOver(s),
                Err(e) => {
                    tracing::debug!(%peer, "lost a connection on its way to another worker: {e}");
                    continue;
                }
            }
        };
        let open = Open::new(&accepted.stats, permit, to);
        let station = &a.stations[to];
        // The task's own future is a few pointers: the connection's start (with what it was
        // accepted with) and the way it is then served are boxed each, so that an idle
        // connection holds only what serving it needs, not the room its start took.
        let starting = Box::pin(start(
            station.listening.clone(),
            stream,
            peer,
            accepted,
            protocol,
            a.frontend.load_full(),
            open,
        ));
        let task = async move {
            if let Some(served) = starting.await {
                served.await;
            }
        };
        if to == a.here {
            a.tracker.spawn(task);
        } else {
            a.tracker.spawn_on(task, &station.runtime);
        }
    }
}

/// The settings a connection is served with, from its listener's entry in the table in force;
/// None once the listener is gone from it.
fn accepted(listening: &Listening) -> Option<(Accepted, Protocol)> {
    let table = listening.tables.load();
    let l = table.listener(listening.local)?;
    let accepted = Accepted {
        deadlines: Deadlines {
            request_header: l.spec.request_header_timeout.get(),
            idle: l.spec.idle_timeout.get(),
            send: l.spec.send_timeout.get(),
        },
        server: l.server.clone(),
        stats: l.stats.clone(),
        release_after: conn::RELEASE_FIRST,
    };
    Some((accepted, l.spec.protocol))
}

/// Serves a parked connection whose next request has begun, as HTTP/1 with the settings in
/// force now; its PROXY header, if it had one, was read when it was accepted.
fn resume(listening: &Listening, tracker: &TaskTracker, parked: Parked) {
    let Parked {
        socket,
        client,
        destination,
        open,
        until: _,
        release_after,
        since,
    } = parked;
    let Some((mut accepted, _)) = accepted(listening) else {
        return;
    };
    accepted.release_after = conn::release_next(release_after, since.elapsed());
    let stream = match park::unpark(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%client, "lost a parked connection on its way back: {e}");
            return;
        }
    };
    let client = Client {
        addr: client,
        // Only its IP is used from here on.
        destination: SocketAddr::new(destination, 0),
        tls: false,
        open,
    };
    let version = HttpVersion::Http1;
    if let Some(served) = conn::serve(listening.clone(), stream, client, accepted, version) {
        tracker.spawn(served);
    }
}

/// The address a client connected to. A listener bound to one address is reached at that
/// address alone, so only a wildcard (or ephemeral) one asks the socket, which costs a system
/// call per connection.
fn destination(local: SocketAddr, stream: &TcpStream) -> SocketAddr {
    if local.ip().is_unspecified() || local.port() == 0 {
        stream.local_addr().unwrap_or(local)
    } else {
        local
    }
}

/// Reads a connection's PROXY header and does its TLS handshake as its listener asks; then
/// returns how it is served, as HTTP or TCP. None if it closes or fails before that.
async fn start(
    listening: Listening,
    stream: Arrived,
    peer: SocketAddr,
    accepted: Accepted,
    protocol: Protocol,
    frontend: Arc<Frontend>,
    open: Open,
) -> Option<Served> {
    let stream = match stream {
        Arrived::Here(s) => s,
        // Registered with this worker's runtime, the one now running it.
        Arrived::HandedOver(s) => match TcpStream::from_std(s) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, "lost a connection handed over from another worker: {e}");
                return None;
            }
        },
    };
    let stats = accepted.stats.clone();
    // The PROXY header, the TLS handshake or ClientHello together: a request head's time.
    let deadline = tokio::time::Instant::now() + accepted.deadlines.request_header;
    let mut client = Client {
        addr: peer,
        destination: destination(listening.local, &stream),
        tls: false,
        open,
    };
    let stream = if frontend.proxy_from.iter().any(|n| n.contains(peer.ip())) {
        match tokio::time::timeout_at(deadline, proxy_protocol::read_header(stream)).await {
            Ok(Ok((header, stream))) => {
                if let proxy_protocol::Header::Proxied {
                    source,
                    destination,
                } = header
                {
                    client.addr = source;
                    client.destination = destination;
                }
                stream
            }
            Ok(Err(e)) => {
                proxy_header_failed(&stats, peer, &e.to_string());
                return None;
            }
            Err(_) => {
                proxy_header_failed(&stats, peer, "no header before the deadline");
                return None;
            }
        }
    } else {
        Prefixed::new(Vec::new(), stream)
    };
    match (&frontend.tls, protocol) {
        (None, Protocol::Http) => {
            let mut stream = stream;
            let drain = &listening.drain;
            let version = conn::sniff_version(&mut stream, &accepted.deadlines, drain).await?;
            conn::serve(listening, stream, client, accepted, version)
        }
        // Boxed: a clear-text connection's start does not carry room for a TLS handshake.
        (Some(t), protocol) => {
            Box::pin(serve_tls(
                t, listening, stream, client, accepted, protocol, deadline,
            ))
            .await
        }
        (None, Protocol::Tcp) if frontend.sni_routing => {
            let mut stream = stream;
            match tokio::time::timeout_at(deadline, tls::read_sni(&mut stream)).await {
                Ok(Ok((hello, name))) => {
                    stream.unread(hello);
                    Some(Box::pin(crate::tcp::serve(listening, stream, client, name)))
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %client.addr, "reading the ClientHello failed: {e}");
                    None
                }
                Err(_) => {
                    tracing::debug!(peer = %client.addr, "no ClientHello before the deadline; closing");
                    None
                }
            }
        }
        (None, Protocol::Tcp) => Some(Box::pin(crate::tcp::serve(listening, stream, client, None))),
    }
}

fn proxy_header_failed(stats: &ListenerStats, peer: SocketAddr, why: &str) {
    stats
        .proxy_header_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(%peer, "closing a connection from a trusted downstream: {why}");
}

/// Terminates TLS; then returns how what it carries is served, as the listener's protocol.
async fn serve_tls(
    terminator: &Terminator,
    listening: Listening,
    stream: Prefixed<TcpStream>,
    mut client: Client,
    accepted: Accepted,
    protocol: Protocol,
    deadline: tokio::time::Instant,
) -> Option<Served> {
    let stats = accepted.stats.clone();
    let stream = handshake(terminator, stream, deadline, &stats, &client).await?;
    client.tls = true;
    match protocol {
        Protocol::Http => {
            // The client picks the version by ALPN; without ALPN, HTTP/1.1.
            let version = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => HttpVersion::Http2,
                _ => HttpVersion::Http1,
            };
            conn::serve(listening, stream, client, accepted, version)
        }
        Protocol::Tcp => {
            let name = stream.get_ref().1.server_name().map(str::to_string);
            Some(Box::pin(crate::tcp::serve(listening, stream, client, name)))
        }
    }
}

/// Terminates TLS within `deadline`; None (and counted) when the handshake fails. Resumed
/// sessions are counted too.
async fn handshake(
    terminator: &Terminator,
    stream: Prefixed<TcpStream>,
    deadline: tokio::time::Instant,
    stats: &ListenerStats,
    client: &Client,
) -> Option<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>> {
    let why = match tokio::time::timeout_at(deadline, terminator.acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                stats
                    .tls_resumed_handshakes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return Some(stream);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "not finished before the deadline".to_string(),
    };
    stats
        .tls_handshake_failures
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(peer = %client.addr, "TLS handshake failed: {why}");
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_s_destination_is_the_address_the_client_reached() {
        let bound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = bound.local_addr().unwrap();
        let _client = TcpStream::connect(at).await.unwrap();
        let (stream, _) = bound.accept().await.unwrap();
        // Bound to one address: that one.
        assert_eq!(destination(at, &stream), at);
        // A wildcard listener: the socket says which of its addresses was reached.
        let wildcard = SocketAddr::new("0.0.0.0".parse().unwrap(), at.port());
        assert_eq!(destination(wildcard, &stream), at);
        let ephemeral = SocketAddr::new(at.ip(), 0);
        assert_eq!(destination(ephemeral, &stream), at);
    }
}
