//! The Docker source: containers configure drover through their labels (docs/docker.md).
//!
//! It lists the running containers, then follows the Engine's event stream, inspecting a
//! container whenever an event may have changed what it asks for or where it can be reached.
//! Each change re-renders the whole slice of configuration the source owns: a listener per
//! publish address, a route and a service per (address, host, path), an endpoint per
//! container. When the engine goes away, the last containers keep serving; the source
//! reconnects with backoff and lists everything again, so nothing missed meanwhile is lost.
//!
//! A container that is told to stop (`kill` with a terminating signal, or `stop`) is drained
//! at once: it takes no new request while the ones it has finish, before it dies. A container
//! with a Docker HEALTHCHECK takes requests only while healthy; a paused one takes none. One
//! without a HEALTHCHECK takes requests once its target port accepts a connection (at most
//! 30 s after `start`), so that a server still starting up is neither sent requests nor
//! ejected for refusing them.

pub mod labels;
mod render;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{
    ContainerInspectResponse, EventMessage, EventMessageTypeEnum, HealthStatusEnum,
};
use bollard::query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions};
use drover_control::{Snapshot, SnapshotSender, Status};
use drover_model::SourceId;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use render::Rendered;

/// The source's id in the reconciler, in logs and in the API's `source` fields.
pub fn source_id() -> SourceId {
    SourceId("docker".into())
}

/// How the Docker source finds containers and reaches them.
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// `unix:///var/run/docker.sock`, `tcp://HOST:PORT`; None: DOCKER_HOST, else the socket.
    pub host: Option<String>,
    /// The network whose address endpoints use, unless a container's `drover.network` says.
    pub network: Option<String>,
    /// Use the host port a container publishes for its target port, on `host_ip`, instead of
    /// its address on a network: for drover on the host network of another host.
    pub host_ports: bool,
    /// The address that host ports are reached on when Docker bound them to every address.
    pub host_ip: IpAddr,
    /// Only containers with all these labels (`KEY=VALUE`, or `KEY` for any value).
    pub constraints: Vec<(String, Option<String>)>,
}

impl Default for DockerOptions {
    fn default() -> Self {
        Self {
            host: None,
            network: None,
            host_ports: false,
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            constraints: Vec::new(),
        }
    }
}

/// One running container that asks to be balanced, as the source last saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub id: String,
    /// Its name without Docker's leading `/`.
    pub name: String,
    /// What its labels ask for and where it is reached, or why it is left out.
    pub spec: Result<(labels::Wanted, SocketAddr), String>,
    pub serving: Serving,
    /// Whether Docker checks its health (a HEALTHCHECK in its image or `docker run`).
    pub has_healthcheck: bool,
}

/// Whether a container takes new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    Yes,
    /// Just started, and its target port does not accept connections yet.
    Starting,
    /// Told to stop: takes no new requests; those in flight finish.
    Stopping,
    /// Its HEALTHCHECK has not passed yet, or fails.
    Unhealthy,
    Paused,
}

/// Watches the Docker Engine and sends the configuration its containers ask for.
pub struct DockerSource {
    options: DockerOptions,
    /// Whether a new publish address must be free here; not for an agent, which never
    /// listens on it itself.
    check_binds: bool,
    /// Told the containers behind each snapshot, when someone asked.
    containers: Option<watch::Sender<BTreeMap<String, Container>>>,
}

impl DockerSource {
    /// Checks the options; the engine is first reached in [`run`](Self::run), so drover may
    /// start before it.
    pub fn new(options: DockerOptions) -> Result<Self, String> {
        if let Some(host) = &options.host {
            let known = ["unix://", "tcp://", "http://"];
            if !known.iter().any(|k| host.starts_with(k)) {
                return Err(format!(
                    "invalid Docker address {host:?}: write unix:///var/run/docker.sock or tcp://HOST:PORT"
                ));
            }
        }
        Ok(Self {
            options,
            check_binds: true,
            containers: None,
        })
    }

    /// For `drover agent`: renders without checking that publish addresses can be bound on
    /// this host. The gateways listen on them; the agent only registers what they carry.
    pub fn for_agent(mut self) -> Self {
        self.check_binds = false;
        self
    }

    /// The containers behind the snapshots: updated just before each snapshot is sent, so
    /// that whoever reads a snapshot finds its containers (container names, labels) here.
    pub fn watch_containers(&mut self) -> watch::Receiver<BTreeMap<String, Container>> {
        let (tx, rx) = watch::channel(BTreeMap::new());
        self.containers = Some(tx);
        rx
    }

    fn connect(&self) -> Result<Docker, bollard::errors::Error> {
        match &self.options.host {
            Some(host) => Docker::connect_with_host(host),
            None => Docker::connect_with_defaults(),
        }
    }

    /// Follows the engine until `stop`. `status` is the reconciler's: the `[docker]` section
    /// of the configuration, and the listeners and services other sources own.
    pub async fn run(
        self,
        snapshots: SnapshotSender,
        mut status: watch::Receiver<Status>,
        stop: CancellationToken,
    ) {
        let mut containers: BTreeMap<String, Container>;
        let mut last: Option<Rendered> = None;
        let mut backoff = Backoff::new();
        let mut down_since: Option<SystemTime> = None;
        let (listening, mut listened) = mpsc::unbounded_channel::<(String, SocketAddr)>();
        // /metrics' drover_source_*: a listing or an event is a sync; a failure to list or a
        // broken event stream is a failed one.
        let health = drover_control::sources::health(&source_id());
        loop {
            // Events from a second before the list, so that none falls in between; seeing
            // one twice costs an inspect.
            let since = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs().saturating_sub(1));
            let docker = self.connect();
            let listed = match &docker {
                Ok(docker) => tokio::select! {
                    r = self.list(docker) => r,
                    _ = stop.cancelled() => return,
                },
                Err(e) => Err(e.to_string()),
            };
            match listed {
                Ok(found) => {
                    health.synced();
                    if let Some(t) = down_since.take() {
                        tracing::info!(
                            "docker: engine reachable again after {:.1} s; listed {} labelled containers",
                            t.elapsed().unwrap_or_default().as_secs_f64(),
                            found.len()
                        );
                    }
                    backoff.reset();
                    containers = found;
                }
                Err(e) => {
                    health.failed(format!("cannot list containers: {e}"));
                    if down_since.is_none() {
                        down_since = Some(SystemTime::now());
                        tracing::warn!(
                            "docker: cannot list containers: {e}; serving the last known containers and retrying"
                        );
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next()) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            }
            self.publish(&containers, &status, &snapshots, &mut last, "resync")
                .await;
            let Ok(docker) = docker else { continue };
            let mut events = docker.events(Some(EventsOptions {
                since: Some(since.to_string()),
                until: None,
                filters: Some(HashMap::from([(
                    "type".to_string(),
                    vec!["container".to_string(), "network".to_string()],
                )])),
            }));
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok(event)) => {
                            health.synced();
                            let Some(reason) = self.apply(&docker, &mut containers, &event, &listening).await else {
                                continue;
                            };
                            self.publish(&containers, &status, &snapshots, &mut last, &reason).await;
                        }
                        Some(Err(e)) => {
                            health.failed(format!("the event stream broke: {e}"));
                            tracing::warn!("docker: the event stream broke: {e}; reconnecting");
                            break;
                        }
                        None => {
                            health.failed("the engine closed the event stream");
                            tracing::warn!("docker: the engine closed the event stream; reconnecting");
                            break;
                        }
                    },
                    Some((id, address)) = listened.recv() => {
                        let Some(c) = containers.get_mut(&id) else { continue };
                        if c.serving != Serving::Starting
                            || c.spec.as_ref().map(|s| s.1).ok() != Some(address)
                        {
                            continue;
                        }
                        c.serving = Serving::Yes;
                        let reason = format!("{}: listening on {address}", c.name);
                        self.publish(&containers, &status, &snapshots, &mut last, &reason).await;
                    }
                    changed = status.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        self.publish(&containers, &status, &snapshots, &mut last, "configuration changed").await;
                    }
                    _ = stop.cancelled() => return,
                }
            }
            down_since.get_or_insert_with(SystemTime::now);
            tokio::select! {
                _ = tokio::time::sleep(backoff.next()) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Renders the containers and sends the result when it differs from the last one sent.
    async fn publish(
        &self,
        containers: &BTreeMap<String, Container>,
        status: &watch::Receiver<Status>,
        snapshots: &SnapshotSender,
        last: &mut Option<Rendered>,
        reason: &str,
    ) {
        let rendered = {
            let status = status.borrow();
            // Listen addresses of the last snapshot accepted are ours, bound or being bound,
            // even before the status in force shows them.
            let own: Vec<SocketAddr> = last
                .as_ref()
                .map(|l| l.config.listeners.iter().map(|l| l.listen).collect())
                .unwrap_or_default();
            render::render(containers, &status.effective, &source_id(), &own, &|a| {
                if !self.check_binds {
                    return Ok(());
                }
                std::net::TcpListener::bind(a)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        };
        if last.as_ref() == Some(&rendered) {
            return;
        }
        for warning in &rendered.warnings {
            if !last.as_ref().is_some_and(|l| l.warnings.contains(warning)) {
                tracing::warn!("docker: {warning}");
            }
        }
        if last.as_ref().map(|l| &l.lines) != Some(&rendered.lines) {
            tracing::info!("docker: backends changed ({reason}); reconfiguring with:");
            for line in &rendered.lines {
                tracing::info!("docker: {line}");
            }
        }
        if let Some(tx) = &self.containers {
            tx.send_replace(containers.clone());
        }
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let mut snapshot = Snapshot::new(source_id(), rendered.config.clone(), reason);
        snapshot.reply = Some(reply);
        if snapshots.send(snapshot).await.is_err() {
            return;
        }
        // Waiting for the verdict keeps `last` to what is in force (or, for a receiver that
        // does not answer, what was handed over): a rejected snapshot is rendered afresh.
        match outcome.await {
            Ok(Err(e)) => tracing::warn!("docker: the configuration was rejected: {e}"),
            Ok(Ok(_)) | Err(_) => *last = Some(rendered),
        }
    }

    /// Every running container that asks to be balanced.
    async fn list(&self, docker: &Docker) -> Result<BTreeMap<String, Container>, String> {
        let summaries = docker
            .list_containers(Some(ListContainersOptions {
                all: false,
                filters: Some(HashMap::from([(
                    "status".to_string(),
                    vec!["running".to_string(), "paused".to_string()],
                )])),
                ..Default::default()
            }))
            .await
            .map_err(|e| e.to_string())?;
        let mut found = BTreeMap::new();
        for s in summaries {
            let (Some(id), Some(labels)) = (s.id, s.labels) else {
                continue;
            };
            if !self.admits(&labels) || !asks_to_be_balanced(&labels) {
                continue;
            }
            match self.inspect(docker, &id).await.map_err(|e| e.to_string())? {
                Some(c) => {
                    found.insert(id, c);
                }
                None => continue,
            }
        }
        Ok(found)
    }

    /// The container as it is now; None when it is gone, stopped or does not ask for drover.
    async fn inspect(
        &self,
        docker: &Docker,
        id: &str,
    ) -> Result<Option<Container>, bollard::errors::Error> {
        match docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => Ok(self.container(c)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn container(&self, c: ContainerInspectResponse) -> Option<Container> {
        let id = c.id.clone()?;
        let name = c
            .name
            .as_deref()
            .unwrap_or(&id)
            .trim_start_matches('/')
            .to_string();
        let labels = c.config.as_ref()?.labels.clone().unwrap_or_default();
        if !self.admits(&labels) {
            return None;
        }
        let state = c.state.as_ref()?;
        if !state.running.unwrap_or(false) {
            return None;
        }
        // A container with bad labels is kept, left out of the configuration with a warning.
        let wanted = match labels::parse(&labels) {
            Ok(Some(w)) => Ok(w),
            Ok(None) => return None,
            Err(e) => Err(e.to_string()),
        };
        let has_healthcheck = state
            .health
            .as_ref()
            .and_then(|h| h.status)
            .is_some_and(|s| !matches!(s, HealthStatusEnum::NONE | HealthStatusEnum::EMPTY));
        let serving = if state.paused.unwrap_or(false) {
            Serving::Paused
        } else {
            match state.health.as_ref().and_then(|h| h.status) {
                Some(HealthStatusEnum::STARTING | HealthStatusEnum::UNHEALTHY) => {
                    Serving::Unhealthy
                }
                _ => Serving::Yes,
            }
        };
        let spec = wanted.and_then(|w| {
            let address = self.address(&c, &w)?;
            Ok((w, address))
        });
        Some(Container {
            id,
            name,
            spec,
            serving,
            has_healthcheck,
        })
    }

    /// Where a container's target port is reached: its address on the chosen network, or the
    /// host port Docker published for it.
    fn address(
        &self,
        c: &ContainerInspectResponse,
        wanted: &labels::Wanted,
    ) -> Result<SocketAddr, String> {
        let target = match wanted.target {
            Some(p) => p,
            None => {
                let exposed: Vec<u16> = c
                    .config
                    .as_ref()
                    .and_then(|c| c.exposed_ports.clone())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|p| p.strip_suffix("/tcp")?.parse().ok())
                    .collect();
                match exposed.as_slice() {
                    [one] => *one,
                    [] => {
                        return Err(format!(
                            "has no {} label and exposes no port: add {}=PORT, the container port to send to",
                            labels::LB_TARGET,
                            labels::LB_TARGET
                        ));
                    }
                    many => {
                        return Err(format!(
                            "has no {} label and exposes several ports ({many:?}): add {}=PORT to choose one",
                            labels::LB_TARGET,
                            labels::LB_TARGET
                        ));
                    }
                }
            }
        };
        let settings = c.network_settings.as_ref();
        if self.options.host_ports {
            let key = format!("{target}/tcp");
            let binding = settings
                .and_then(|s| s.ports.as_ref())
                .and_then(|p| p.get(&key).cloned().flatten())
                .unwrap_or_default()
                .into_iter()
                .find_map(|b| {
                    let port: u16 = b.host_port?.parse().ok()?;
                    let ip = b
                        .host_ip
                        .and_then(|ip| ip.parse::<IpAddr>().ok())
                        .filter(|ip| !ip.is_unspecified())
                        .unwrap_or(self.options.host_ip);
                    Some(SocketAddr::new(ip, port))
                });
            return binding.ok_or_else(|| {
                format!("publishes no host port for {key}: run it with -p HOSTPORT:{target}, or run drover without --docker-host-ports")
            });
        }
        let network_mode = c
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.as_deref());
        if network_mode == Some("host") {
            return Ok(SocketAddr::new(self.options.host_ip, target));
        }
        let networks: BTreeMap<String, IpAddr> = settings
            .and_then(|s| s.networks.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, e)| {
                let ip = e
                    .ip_address
                    .filter(|ip| !ip.is_empty())
                    .or(e.global_ipv6_address.filter(|ip| !ip.is_empty()))?;
                Some((name, ip.parse().ok()?))
            })
            .collect();
        let chosen = wanted.network.as_ref().or(self.options.network.as_ref());
        let ip = match chosen {
            Some(net) => networks.get(net).copied().ok_or_else(|| {
                format!(
                    "is not on network {net:?} (it is on {}); connect it, or set {} to one of those",
                    listing(networks.keys()),
                    labels::NETWORK
                )
            })?,
            // Its only network; else the default bridge, which the host reaches; else the
            // first by name.
            None => match networks.get("bridge") {
                Some(ip) if networks.len() > 1 => *ip,
                _ => networks.values().next().copied().ok_or_else(|| {
                    "has no address on any network: attach it to one, or use --docker-host-ports"
                        .to_string()
                })?,
            },
        };
        Ok(SocketAddr::new(ip, target))
    }

    /// Whether the `--docker-constraint` labels let a container in.
    fn admits(&self, labels: &HashMap<String, String>) -> bool {
        self.options
            .constraints
            .iter()
            .all(|(k, v)| match (labels.get(k), v) {
                (Some(_), None) => true,
                (Some(have), Some(want)) => have == want,
                (None, _) => false,
            })
    }

    /// Brings the containers up to date with one event; the reason to publish, if any.
    async fn apply(
        &self,
        docker: &Docker,
        containers: &mut BTreeMap<String, Container>,
        event: &EventMessage,
        listening: &mpsc::UnboundedSender<(String, SocketAddr)>,
    ) -> Option<String> {
        let actor = event.actor.as_ref()?;
        let attributes = actor.attributes.clone().unwrap_or_default();
        let action = event.action.as_deref().unwrap_or_default();
        let (id, name) = match event.typ {
            Some(EventMessageTypeEnum::CONTAINER) => {
                (actor.id.clone()?, attributes.get("name").cloned())
            }
            // Network events name the container in their attributes.
            Some(EventMessageTypeEnum::NETWORK) if matches!(action, "connect" | "disconnect") => {
                (attributes.get("container").cloned()?, None)
            }
            _ => return None,
        };
        let name = name
            .or_else(|| containers.get(&id).map(|c| c.name.clone()))
            .unwrap_or_else(|| id.chars().take(12).collect());
        // Only labelled containers matter; network events carry no container labels.
        if event.typ == Some(EventMessageTypeEnum::CONTAINER)
            && !containers.contains_key(&id)
            && !(asks_to_be_balanced(&attributes) && self.admits(&attributes))
        {
            return None;
        }
        match action {
            "die" | "destroy" | "oom" => {
                containers.remove(&id)?;
                Some(format!("{name}: {action}"))
            }
            "stop" => drain(containers, &id, &name, action),
            "kill" => {
                let signal = attributes.get("signal").map(String::as_str);
                if terminates(signal) {
                    drain(
                        containers,
                        &id,
                        &name,
                        &format!("kill (signal {})", signal.unwrap_or("?")),
                    )
                } else {
                    None
                }
            }
            "pause" => {
                let c = containers.get_mut(&id)?;
                c.serving = Serving::Paused;
                Some(format!("{name}: pause"))
            }
            _ => {
                // start, unpause, health_status: …, connect, disconnect, rename, update: look.
                let now = match self.inspect(docker, &id).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("docker: cannot inspect {name} after {action}: {e}");
                        return None;
                    }
                };
                let before = containers.get(&id);
                match now {
                    // A container being stopped stays drained whatever else it reports.
                    Some(mut c) => {
                        let was = before.map(|b| b.serving);
                        if was == Some(Serving::Stopping) && action != "start" {
                            c.serving = Serving::Stopping;
                        }
                        // Just started, with no HEALTHCHECK to say when it is ready: it gets
                        // requests once its port takes connections.
                        let fresh = action == "start" || was == Some(Serving::Starting);
                        if fresh
                            && c.serving == Serving::Yes
                            && !c.has_healthcheck
                            && let Ok((_, address)) = &c.spec
                        {
                            if was != Some(Serving::Starting) {
                                tokio::spawn(wait_listening(
                                    c.id.clone(),
                                    *address,
                                    listening.clone(),
                                ));
                            }
                            c.serving = Serving::Starting;
                        }
                        if before == Some(&c) {
                            return None;
                        }
                        containers.insert(id, c);
                    }
                    None => {
                        containers.remove(&id)?;
                    }
                }
                Some(format!("{name}: {action}"))
            }
        }
    }
}

/// Tells the source when `address` takes a TCP connection, or after 30 s whatever happens.
async fn wait_listening(
    id: String,
    address: SocketAddr,
    listening: mpsc::UnboundedSender<(String, SocketAddr)>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let attempt = tokio::time::timeout(
            Duration::from_millis(250),
            tokio::net::TcpStream::connect(address),
        );
        if let Ok(Ok(_)) = attempt.await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = listening.send((id, address));
}

fn drain(
    containers: &mut BTreeMap<String, Container>,
    id: &str,
    name: &str,
    what: &str,
) -> Option<String> {
    let c = containers.get_mut(id)?;
    if c.serving == Serving::Stopping {
        return None;
    }
    c.serving = Serving::Stopping;
    Some(format!("{name}: {what}, draining"))
}

/// Signals that stop a process: a `kill` with another (HUP to reload, say) changes nothing.
fn terminates(signal: Option<&str>) -> bool {
    match signal {
        None => true,
        Some(s) => {
            let s = s.trim_start_matches("SIG");
            matches!(s, "15" | "9" | "2" | "3" | "TERM" | "KILL" | "INT" | "QUIT")
        }
    }
}

fn asks_to_be_balanced(labels: &HashMap<String, String>) -> bool {
    labels.contains_key(labels::LB_ENABLE) || labels.contains_key(labels::ENABLE)
}

fn listing<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "no network".into()
    } else {
        names.join(", ")
    }
}

/// 100 ms doubling to 10 s between attempts to reach the engine.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }

    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
        now
    }

    fn reset(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_terminating_signals_drain() {
        for s in [None, Some("15"), Some("SIGTERM"), Some("9"), Some("KILL")] {
            assert!(terminates(s), "{s:?}");
        }
        for s in [Some("1"), Some("SIGHUP"), Some("10"), Some("USR1")] {
            assert!(!terminates(s), "{s:?}");
        }
    }

    #[test]
    fn backoff_doubles_from_100_ms_to_10_s() {
        let mut b = Backoff::new();
        let seen: Vec<u128> = (0..9).map(|_| b.next().as_millis()).collect();
        assert_eq!(seen, [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
        b.reset();
        assert_eq!(b.next().as_millis(), 100);
    }

    #[test]
    fn constraints_need_every_label() {
        let source = DockerSource::new(DockerOptions {
            host: Some("unix:///nonexistent.sock".into()),
            constraints: vec![("env".into(), Some("prod".into())), ("team".into(), None)],
            ..Default::default()
        })
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(source.admits(&labels(&[("env", "prod"), ("team", "x")])));
        assert!(!source.admits(&labels(&[("env", "dev"), ("team", "x")])));
        assert!(!source.admits(&labels(&[("env", "prod")])));
    }
}
