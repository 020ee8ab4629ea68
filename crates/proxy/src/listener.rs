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
//! Each listener also keeps a lot ([`crate::park`]), where its idle HTTP/1 connections over
//! plain TCP wait for their next request without a task.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use drover_control::Applier;
use drover_model::{Effective, IpNet, ListenerSpec, Protocol, RouteSpec};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
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
        let grace = self.table().shutdown_grace();
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

    fn start(&self, spec: &ListenerSpec, socket: TcpListener, frontend: Arc<Frontend>) -> Running {
        let running = Running {
            drain: self.handle.shutdown.child_token(),
            slots: Arc::new(Semaphore::new(spec.max_connections as usize)),
            max_connections: spec.max_connections,
            frontend: Arc::new(ArcSwap::new(frontend)),
        };
        tracing::info!(listener = %spec.name, "accepting {} on {}", spec.protocol, spec.listen);
        let tracker = self.handle.tracker.clone();
        let lot = park::lot()
            .inspect_err(|e| {
                tracing::warn!(listener = %spec.name, "idle connections will keep their tasks: cannot make their lot: {e}")
            })
            .ok();
        let mut listening = Listening {
            tables: self.handle.tables.clone(),
            stats: self.handle.stats.clone(),
            access_log: self.handle.access_log.clone(),
            local: spec.listen,
            drain: running.drain.clone(),
            lot: None,
        };
        if let Some((lot, yard)) = lot {
            listening.lot = Some(lot);
            let (resumed, tasks) = (listening.clone(), tracker.clone());
            let resume = move |parked| resume(&resumed, &tasks, parked);
            tracker.spawn(park::run(yard, running.drain.clone(), resume));
        }
        let slots = Slots {
            listener: running.slots.clone(),
            global: self.global_slots.clone(),
        };
        self.handle.tracker.spawn(accept(
            socket,
            listening,
            tracker,
            slots,
            running.frontend.clone(),
        ));
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
        for (spec, socket) in bound {
            let frontend = frontends.remove(&spec.listen).expect("made above");
            let running = self.start(spec, socket, frontend);
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

async fn accept(
    socket: TcpListener,
    listening: Listening,
    tracker: TaskTracker,
    slots: Slots,
    frontend: Arc<ArcSwap<Frontend>>,
) {
    let (local, drain) = (listening.local, listening.drain.clone());
    loop {
        // At a connection limit, wait here: new clients queue in the kernel's backlog.
        let permit = tokio::select! {
            p = async {
                let listener = slots.listener.clone().acquire_owned().await?;
                let global = slots.global.clone().acquire_owned().await?;
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
        let Some((accepted, protocol)) = accepted(&listening) else {
            return;
        };
        // The task's own future is a few pointers: the connection's start (with what it was
        // accepted with) and the way it is then served are boxed each, so that an idle
        // connection holds only what serving it needs, not the room its start took.
        let starting = Box::pin(start(
            listening.clone(),
            stream,
            peer,
            accepted,
            protocol,
            frontend.load_full(),
            permit,
        ));
        tracker.spawn(async move {
            if let Some(served) = starting.await {
                served.await;
            }
        });
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

/// Reads a connection's PROXY header and does its TLS handshake as its listener asks; then
/// returns how it is served, as HTTP or TCP. None if it closes or fails before that.
async fn start(
    listening: Listening,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Accepted,
    protocol: Protocol,
    frontend: Arc<Frontend>,
    slots: [tokio::sync::OwnedSemaphorePermit; 2],
) -> Option<Served> {
    let stats = accepted.stats.clone();
    let open = Open::new(&stats, slots);
    // The PROXY header, the TLS handshake or ClientHello together: a request head's time.
    let deadline = tokio::time::Instant::now() + accepted.deadlines.request_header;
    let mut client = Client {
        addr: peer,
        destination: stream.local_addr().unwrap_or(listening.local),
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
