//! TCP listeners (layer 4): each accepted connection is joined to one endpoint of the
//! listener's service, and bytes are copied both ways, with backpressure, until both
//! directions have ended; each side's end of its stream reaches the other as a half-close.
//!
//! The endpoint is picked as for HTTP: by the service's policy over the available endpoints,
//! with `hash_on` and stickiness keyed by the client's IP. A connect that fails or times out
//! is counted against its endpoint (outlier ejection) and tried on another, up to the
//! service's `retries.attempts`. A connection stays with its endpoint for its life, even when
//! that endpoint is drained or removed, as in-flight HTTP requests do; it is closed when its
//! listener is removed or drover shuts down, after the shutdown grace. A service with
//! `proxy_protocol` gets a PROXY header with the client's address before the first byte.
//!
//! A TCP listener may have several routes, each for a `host`, plus one without a host. The
//! host is matched against the TLS server name (SNI): the one of the handshake when the
//! listener terminates TLS, else the one read from the client's ClientHello, which is then
//! passed on untouched (TLS passthrough). A connection whose name matches no route goes to the
//! route without a host, or is closed if there is none.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use drover_model::{HashOn, Policy, ProxyProtocol, StickyMode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::{self, Client, Listening};
use crate::forward::{self, InFlight};
use crate::proxy_protocol;
use crate::stats::Stats;
use crate::table::Service;

/// Serves one client connection of a TCP listener; `server_name` is its TLS SNI, if known.
pub(crate) async fn serve<S>(
    listening: Listening,
    mut client: S,
    from: Client,
    server_name: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Client {
        addr: peer,
        destination,
        open: _open,
        ..
    } = from;
    let (service, route) = {
        let table = listening.tables.load();
        let Some(routes) = table.listener(listening.local) else {
            return;
        };
        // Validation leaves a TCP listener routes with no path, and at most one without a
        // host.
        match routes.route(server_name.as_deref().unwrap_or(""), "/") {
            Some(r) => (r.service.clone(), r.stats.clone()),
            None => {
                tracing::debug!(%peer, server_name = ?server_name, "no route for this server name; closing");
                return;
            }
        }
    };
    let client_hash =
        conn::ip_value(peer.ip()).map_or(0, |ip| drover_balance::hash_bytes(ip.as_bytes()));
    let Some((mut upstream, index, _in_flight)) =
        connect(&listening.stats, &service, client_hash).await
    else {
        tracing::debug!(%peer, service = %service.name, "no endpoint could be reached; closing");
        return;
    };
    if let Some(version) = service.spec.proxy_protocol {
        let header = match version {
            ProxyProtocol::V1 => proxy_protocol::encode_v1(peer, destination),
            ProxyProtocol::V2 => proxy_protocol::encode_v2(peer, destination),
        };
        if let Err(e) = upstream.write_all(&header).await {
            tracing::debug!(%peer, service = %service.name, "cannot send the PROXY header: {e}");
            return;
        }
    }
    if let Some(sticky) = &service.spec.sticky
        && sticky.mode == StickyMode::SourceIp
    {
        service.remember(client_hash, index);
    }
    let grace = listening.tables.load().shutdown_grace();
    let drained = async {
        listening.drain.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
            Ok((up, down)) => {
                route.request_bytes.fetch_add(up, Ordering::Relaxed);
                route.response_bytes.fetch_add(down, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(%peer, service = %service.name, "connection ended: {e}"),
        },
        _ = drained => {
            tracing::debug!(%peer, service = %service.name, "grace period over; closing the connection");
        }
    }
}

/// A connection to an endpoint of `service`, which endpoint it is, and its in-flight count.
async fn connect(
    stats: &Stats,
    service: &Arc<Service>,
    client_hash: u64,
) -> Option<(TcpStream, usize, InFlight)> {
    let spec = &service.spec;
    let key = match (&spec.policy, &spec.hash_on) {
        (Policy::ConsistentHash, HashOn::SourceIp) => client_hash,
        _ => 0,
    };
    let preferred = spec
        .sticky
        .as_ref()
        .filter(|s| s.mode == StickyMode::SourceIp)
        .and_then(|_| service.remembered(client_hash));
    let attempts = (spec.retries.attempts as usize).clamp(1, forward::MAX_ATTEMPTS);
    let mut tried = Vec::with_capacity(attempts);
    while tried.len() < attempts {
        let index = match preferred
            .filter(|i| tried.is_empty() && service.endpoints[*i].health.is_available())
        {
            Some(i) => i,
            None => {
                let pick = service.picker.pick(&service.endpoints, key, &tried)?;
                service.note_panic(pick.panic);
                pick.index
            }
        };
        tried.push(index);
        let endpoint = &service.endpoints[index];
        let in_flight = InFlight::start(endpoint);
        let timeout = spec.connect_timeout.get();
        match tokio::time::timeout(timeout, TcpStream::connect(endpoint.address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                endpoint.health.record_success();
                Stats::count(&stats.server_success);
                return Some((stream, index, in_flight));
            }
            Ok(Err(e)) => {
                tracing::debug!(service = %service.name, endpoint = %endpoint.address, "connect failed: {e}");
            }
            Err(_) => {
                tracing::debug!(service = %service.name, endpoint = %endpoint.address, "connect timed out");
            }
        }
        forward::record_failure(stats, service, endpoint);
    }
    None
}
