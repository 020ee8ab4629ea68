//! `drover agent`: registers this host's labelled containers for the gateways to serve
//! (docs/cluster.md, "Agents").
//!
//! The agent runs the Docker source as `drover run --docker` does, but with host ports: each
//! endpoint is the port Docker publishes for the container's target port, on the host's
//! advertised address (`--advertise`), which other hosts can reach. Instead of serving the
//! slice of configuration the containers make, it registers it:
//!
//! - in etcd (`--store etcd://…`): as JSON under `PREFIX/agents/NODE`, attached to a lease
//!   with a TTL (`--ttl`, 10 s) that the agent keeps alive. Every change is put again. If the
//!   lease is lost (etcd was unreachable for longer than the TTL), a new one is granted and
//!   the key put again. On SIGTERM or SIGINT the lease is revoked, so the endpoints leave the
//!   gateways at once; when the agent or its host dies, they leave when the lease expires.
//!   Gateways read them with `drover run --agents etcd://…`.
//! - in Consul (`--register consul://HOST:PORT`), Registrator's way: one service instance per
//!   container that takes requests, with the `drover.*` tags that `drover run --consul …
//!   --consul-tags` publishes, and a TTL check that the agent passes; deregistered when the
//!   container stops and when the agent does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use drover_control::{Snapshot, Status};
use drover_discovery::agents::Registration;
use drover_discovery::docker::{DockerOptions, DockerSource};
use drover_etcd::etcd_client::{self, PutOptions};
use drover_etcd::{StoreOptions, StoreUrl};
use drover_model::{AdminState, Config, DockerConfig, Effective, Protocol};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::store_args::StoreAccess;
use crate::{agents_args, sources};

/// What the registrars register: the latest slice, None before the engine's first listing.
type Slices = watch::Receiver<Option<Arc<Registration>>>;

/// `drover agent`'s command line.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// Register the containers labelled `lb.enable=Y` (or `drover.enable=true`) of this
    /// host's Docker Engine. Required: the Engine is what an agent watches.
    #[arg(long)]
    docker: bool,
    /// The Docker Engine: unix:///PATH or tcp://HOST:PORT [default: DOCKER_HOST, else
    /// unix:///var/run/docker.sock].
    #[arg(long, env = "DOCKER_HOST", value_name = "URL")]
    docker_host: Option<String>,
    /// Only containers with this label (KEY=VALUE, or KEY for any value); repeat to require
    /// several.
    #[arg(long, value_name = "KEY[=VALUE]", value_parser = sources::parse_constraint)]
    docker_constraint: Vec<(String, Option<String>)>,
    /// Register in this etcd cluster, for gateways run with `--agents` and the same URL:
    /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (etcds:// for TLS) [default prefix: /drover].
    #[arg(long, value_name = "URL", value_parser = agents_args::parse_store_url)]
    store: Option<StoreUrl>,
    #[command(flatten)]
    store_access: StoreAccess,
    /// Register in this Consul agent, Registrator's way, for gateways run with `--consul
    /// HOST:PORT --consul-tags`: consul://HOST:PORT.
    #[arg(long, value_name = "URL", value_parser = parse_consul)]
    register: Option<String>,
    /// Consul ACL token (from CONSUL_HTTP_TOKEN when not given here).
    #[arg(
        long,
        env = "CONSUL_HTTP_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    register_token: Option<String>,
    /// This host's name in the registrations: the key PREFIX/agents/NODE and the Consul
    /// service IDs drover-NODE-CONTAINER [default: the host name].
    #[arg(long, value_name = "NAME", value_parser = parse_node)]
    node: Option<String>,
    /// The address other hosts reach this host's published ports on [default: the address
    /// this host reaches etcd, or Consul, from].
    #[arg(long, value_name = "IP")]
    advertise: Option<IpAddr>,
    /// How long the registration outlives the agent when it dies without revoking it: its
    /// lease's TTL in etcd, and its TTL check's in Consul (whole seconds).
    #[arg(long, default_value = "10s", value_parser = parse_ttl)]
    ttl: Duration,
    /// A config file whose `[docker]` section (the `[docker.defaults]` template) the
    /// services are made with; re-read on SIGHUP. Other sections are ignored.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Log filter, such as `info` or `drover_discovery=debug,info` (RUST_LOG overrides it).
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// The checked command line.
struct Plan {
    docker: DockerOptions,
    store: Option<(StoreUrl, StoreOptions)>,
    consul: Option<Consul>,
    node: String,
    advertise: Option<IpAddr>,
    ttl: Duration,
    config: Option<PathBuf>,
}

/// Where and how to reach Consul's HTTP API.
#[derive(Clone)]
struct Consul {
    /// HOST:PORT.
    address: String,
    token: Option<String>,
}

fn parse_node(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid node name {s:?}: use 1 to 128 letters, digits, '.', '_' or '-' (it names the key PREFIX/agents/NODE and the Consul IDs drover-NODE-CONTAINER)"
        ))
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = s
        .parse::<drover_model::Duration>()
        .map_err(|e| e.to_string())?
        .get();
    if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
        return Err(format!(
            "--ttl {s} is out of range: give 1s to 1h (etcd leases count whole seconds)"
        ));
    }
    // Whole seconds, rounded up.
    Ok(Duration::from_secs(
        d.as_secs() + u64::from(d.subsec_nanos() > 0),
    ))
}

/// `consul://HOST[:PORT]` to `HOST:PORT` (8500, Consul's HTTP port, when none is given).
fn parse_consul(s: &str) -> Result<String, String> {
    let bad = |why: &str| {
        format!(
            "invalid Consul address {s:?}: {why}; write consul://HOST:PORT, such as consul://127.0.0.1:8500"
        )
    };
    let Some(rest) = s.trim().strip_prefix("consul://") else {
        return Err(bad("it must start with consul://"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '?', '@', ' ']) {
        return Err(bad("give only HOST:PORT after consul://"));
    }
    let with_port = match rest.rsplit_once(':') {
        // An IPv6 address in brackets without a port: [fd00::1].
        Some((host, _)) if rest.ends_with(']') || host.is_empty() => {
            if host.is_empty() {
                return Err(bad("there is no host"));
            }
            format!("{rest}:8500")
        }
        Some((_, port)) => {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad(&format!("{port:?} is not a port")));
            }
            rest.to_string()
        }
        None => format!("{rest}:8500"),
    };
    Ok(with_port)
}

impl AgentArgs {
    /// Checks the flags together; what is wrong says what would be right.
    fn plan(&self) -> anyhow::Result<Plan> {
        ensure!(
            self.docker,
            "drover agent needs --docker: it registers the labelled containers of this host's Docker Engine"
        );
        ensure!(
            self.store.is_some() || self.register.is_some(),
            "drover agent needs somewhere to register: --store etcd://HOST:PORT (for gateways run with --agents etcd://HOST:PORT), or --register consul://HOST:PORT (for gateways run with --consul HOST:PORT --consul-tags), or both"
        );
        let options = self.store_access.options(self.store.as_ref())?;
        let store = self.store.clone().zip(options);
        let node = match &self.node {
            Some(n) => n.clone(),
            None => {
                let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .or_else(|_| std::env::var("HOSTNAME"))
                    .unwrap_or_default();
                parse_node(&name).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot take the host name as the node's: {e}; give --node NAME"
                    )
                })?
            }
        };
        if let Some(ip) = self.advertise {
            ensure!(
                !ip.is_unspecified(),
                "--advertise {ip} is no address to reach: give this host's address that other hosts reach it on"
            );
        }
        if let Some(config) = &self.config {
            docker_section(config)?;
        }
        let docker = DockerOptions {
            host: self.docker_host.clone().filter(|h| !h.is_empty()),
            network: None,
            host_ports: true,
            // The advertised address, once known.
            host_ip: self.advertise.unwrap_or(IpAddr::from([127, 0, 0, 1])),
            constraints: self.docker_constraint.clone(),
        };
        DockerSource::new(docker.clone()).map_err(anyhow::Error::msg)?;
        Ok(Plan {
            docker,
            store,
            consul: self.register.clone().map(|address| Consul {
                address,
                token: self.register_token.clone().filter(|t| !t.is_empty()),
            }),
            node,
            advertise: self.advertise,
            ttl: self.ttl,
            config: self.config.clone(),
        })
    }
}

/// Runs `drover agent` until SIGTERM or SIGINT.
pub fn main(args: Box<AgentArgs>) -> ExitCode {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log_level.clone());
    let (writer, _flush_on_exit) = tracing_appender::non_blocking(std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .init();
    let result = args.plan().and_then(|plan| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(run(plan))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("drover agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `[docker]` section of a config file.
fn docker_section(path: &Path) -> anyhow::Result<DockerConfig> {
    drover_config::load(path)
        .map(|c| c.docker)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// What the Docker source reads from the reconciler's status: here only the `[docker]`
/// section, since the agent serves nothing itself.
fn status_with(docker: DockerConfig) -> Status {
    Status {
        generation: 0,
        effective: Arc::new(Effective {
            config: Config {
                docker,
                ..Config::default()
            },
            ..Effective::default()
        }),
        last_changes: Arc::new(Vec::new()),
        last_source: None,
        last_change_at: None,
        last_rejection: None,
    }
}

/// The address this host reaches `target` (HOST:PORT) from: its address on the network that
/// leads there. Connecting a UDP socket sends nothing.
async fn address_towards(target: &str) -> anyhow::Result<IpAddr> {
    let to = tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("cannot resolve {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))?;
    let local: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket
        .connect(to)
        .with_context(|| format!("no route to {to}"))?;
    Ok(socket.local_addr()?.ip())
}

async fn run(plan: Plan) -> anyhow::Result<()> {
    let node = plan.node.clone();
    let advertise = match plan.advertise {
        Some(ip) => ip,
        None => {
            let target = match (&plan.store, &plan.consul) {
                (Some((url, _)), _) => url.endpoints[0]
                    .split_once("://")
                    .map_or(url.endpoints[0].clone(), |(_, h)| h.to_string()),
                (None, Some(c)) => c.address.clone(),
                (None, None) => unreachable!("checked in plan"),
            };
            let ip = address_towards(&target).await.map_err(|e| {
                anyhow::anyhow!("cannot tell this host's address: {e:#}; give --advertise IP")
            })?;
            tracing::info!(
                "agent: advertising {ip}, this host's address towards {target} (--advertise sets it)"
            );
            ip
        }
    };
    if advertise.is_loopback() {
        tracing::warn!(
            "agent: advertising {advertise}, a loopback address: only gateways on this host reach the endpoints; give --advertise with an address other hosts reach"
        );
    }
    let docker = match &plan.config {
        Some(path) => docker_section(path)?,
        None => DockerConfig::default(),
    };
    let mut source = DockerSource::new(DockerOptions {
        host_ip: advertise,
        ..plan.docker.clone()
    })
    .map_err(anyhow::Error::msg)?
    .for_agent();
    let containers = source.watch_containers();
    // The source stops when its status sender is dropped: it lives as long as the agent.
    let (status, status_rx) = watch::channel(status_with(docker));
    let (snapshots_tx, mut snapshots) = mpsc::channel::<Snapshot>(16);
    let stop_docker = CancellationToken::new();
    tokio::spawn(source.run(snapshots_tx, status_rx, stop_docker.clone()));

    let (slices, slices_rx) = watch::channel::<Option<Arc<Registration>>>(None);
    let stop_registrars = CancellationToken::new();
    let mut registrars = tokio::task::JoinSet::new();
    if let Some((url, options)) = plan.store {
        tracing::info!(
            "agent {node}: registering this host's containers at {advertise} under {} in {url}, lease TTL {} s",
            url.layout().agent(&node),
            plan.ttl.as_secs()
        );
        registrars.spawn(keep_in_etcd(
            url,
            options,
            node.clone(),
            plan.ttl,
            slices_rx.clone(),
            stop_registrars.clone(),
        ));
    }
    if let Some(consul) = plan.consul {
        tracing::info!(
            "agent {node}: registering this host's containers at {advertise} in Consul at {}, TTL check {} s",
            consul.address,
            plan.ttl.as_secs()
        );
        registrars.spawn(keep_in_consul(
            consul,
            node.clone(),
            plan.ttl,
            slices_rx,
            stop_registrars.clone(),
        ));
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            Some(snapshot) = snapshots.recv() => {
                let names: BTreeMap<SocketAddr, String> = containers
                    .borrow()
                    .values()
                    .filter_map(|c| Some((c.spec.as_ref().ok()?.1, c.name.clone())))
                    .collect();
                slices.send_replace(Some(Arc::new(Registration {
                    node: node.clone(),
                    advertise,
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    containers: names,
                    config: snapshot.config,
                })));
            }
            _ = hup.recv() => match &plan.config {
                Some(path) => match docker_section(path) {
                    Ok(docker) => {
                        tracing::info!("SIGHUP: re-read the [docker] section of {}", path.display());
                        status.send_replace(status_with(docker));
                    }
                    Err(e) => tracing::error!(
                        "SIGHUP: {} rejected, the [docker] section in force stays: {e:#}",
                        path.display()
                    ),
                },
                None => tracing::info!("SIGHUP: no config file to re-read"),
            },
            _ = term.recv() => { tracing::info!("SIGTERM: withdrawing the registrations and stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: withdrawing the registrations and stopping"); break; }
        }
    }
    stop_docker.cancel();
    stop_registrars.cancel();
    // The registrars revoke the lease and deregister from Consul; not forever.
    let withdrawn = tokio::time::timeout(Duration::from_secs(5), async {
        while registrars.join_next().await.is_some() {}
    })
    .await;
    if withdrawn.is_err() {
        tracing::warn!(
            "agent: gave up withdrawing the registrations after 5 s; they expire within their TTL"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

const BACKOFF_START: Duration = Duration::from_millis(100);
/// How long a member has to answer a status request when the agent connects (a quarter of
/// the lease's TTL when that is shorter).
const PROBE_WITHIN: Duration = Duration::from_secs(2);

/// Retries with a backoff, and logs an outage once when it starts and once when it ends.
struct Outage {
    what: String,
    since: Option<Instant>,
    backoff: Duration,
    max: Duration,
}

impl Outage {
    fn new(what: String, max: Duration) -> Self {
        Self {
            what,
            since: None,
            backoff: BACKOFF_START,
            max,
        }
    }

    /// A failure: the time to wait before trying again.
    fn failed(&mut self, why: &str) -> Duration {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            tracing::warn!("agent: {}: {why}; retrying", self.what);
        } else {
            tracing::debug!("agent: {}: {why}", self.what);
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(self.max);
        wait
    }

    /// A success; true when it ends an outage.
    fn ok(&mut self) -> bool {
        self.backoff = BACKOFF_START;
        match self.since.take() {
            Some(t) => {
                tracing::info!(
                    "agent: {} works again after {:.1} s",
                    self.what,
                    t.elapsed().as_secs_f64()
                );
                true
            }
            None => false,
        }
    }
}

/// Keeps the latest slice registered in etcd under a lease until `stop`, then revokes it.
async fn keep_in_etcd(
    url: StoreUrl,
    options: StoreOptions,
    node: String,
    ttl: Duration,
    mut slices: Slices,
    stop: CancellationToken,
) {
    let key = url.layout().agent(&node);
    let mut outage = Outage::new(
        format!("etcd at {url}"),
        (ttl / 2).clamp(Duration::from_millis(500), Duration::from_secs(5)),
    );
    let mut client: Option<etcd_client::Client> = None;
    let mut lease: Option<i64> = None;
    loop {
        // Nothing to register before the engine's first listing.
        while slices.borrow().is_none() {
            tokio::select! {
                changed = slices.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
        let session = EtcdSession {
            url: &url,
            options: &options,
            key: &key,
            ttl,
        };
        let ended = tokio::select! {
            ended = session.run(&mut client, &mut lease, &mut slices, &mut outage) => ended,
            _ = stop.cancelled() => Ok(()),
        };
        match ended {
            Ok(()) => break,
            Err(why) => {
                let wait = outage.failed(&why);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    // Revoking the lease deletes the key: the endpoints leave the gateways now, not at expiry.
    // A member that is down fails the call; another may answer the next try.
    if let (Some(c), Some(id)) = (client.as_mut(), lease) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let why = match tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(id)).await {
                Ok(Ok(_)) => {
                    tracing::info!("agent: revoked lease {id:x}: {key} is gone");
                    break;
                }
                Ok(Err(e)) if e.to_string().contains("lease not found") => {
                    tracing::info!("agent: lease {id:x} had expired already: {key} is gone");
                    break;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 1 s".to_string(),
            };
            if Instant::now() >= deadline {
                tracing::warn!(
                    "agent: cannot revoke lease {id:x}: {why}; {key} goes when the lease expires"
                );
                break;
            }
            tracing::debug!("agent: revoking lease {id:x}: {why}; trying again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One lease: granted, the key put under it, kept alive, the key put again on each change.
struct EtcdSession<'a> {
    url: &'a StoreUrl,
    options: &'a StoreOptions,
    key: &'a str,
    ttl: Duration,
}

impl EtcdSession<'_> {
    /// The answer to one request, which must come within half the lease's TTL. A member
    /// that has lost its leader holds a request until etcd's own timeout (5 s or more),
    /// longer than a short lease lives; tried again, the request finds the new leader.
    async fn answer<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, String> {
        let within = (self.ttl / 2).max(Duration::from_millis(500));
        match tokio::time::timeout(within, request).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(format!("cannot {what}: {e}")),
            Err(_) => Err(format!(
                "cannot {what}: no answer within {} ms",
                within.as_millis()
            )),
        }
    }

    /// Runs until something fails (the error says what); returns Ok only when the slices'
    /// sender is gone.
    async fn run(
        &self,
        client: &mut Option<etcd_client::Client>,
        lease: &mut Option<i64>,
        slices: &mut Slices,
        outage: &mut Outage,
    ) -> Result<(), String> {
        let c = match client {
            Some(c) => c,
            // Only the members that answer: the session may have ended on a silent one.
            None => client.insert(
                drover_etcd::connect_answering(
                    self.url,
                    self.options,
                    PROBE_WITHIN.min(self.ttl / 4),
                )
                .await
                .map_err(|e| e.to_string())?,
            ),
        };
        let ttl = self.ttl.as_secs() as i64;
        let id = self
            .answer("grant a lease", c.lease_grant(ttl, None))
            .await?
            .id();
        *lease = Some(id);
        let current = slices.borrow_and_update().clone();
        let Some(registration) = current else {
            return Err("nothing to register yet".into());
        };
        let mut value = registration.encode();
        let put = c.put(
            self.key,
            value.clone(),
            Some(PutOptions::new().with_lease(id)),
        );
        self.answer(&format!("put {}", self.key), put).await?;
        let recovered = outage.ok();
        tracing::info!(
            "agent: {} {} with {} endpoints, lease {id:x} (TTL {ttl} s){}",
            if recovered {
                "registered again as"
            } else {
                "registered as"
            },
            self.key,
            registration.endpoints(),
            if recovered { " after the outage" } else { "" }
        );
        let (mut keeper, mut answers) = self
            .answer(&format!("keep lease {id:x} alive"), c.lease_keep_alive(id))
            .await?;
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut answered = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // etcd answers every keep-alive. Unanswered for half the TTL, the
                    // stream's member is likely dead or cut off, which the client's HTTP/2
                    // pings take up to 4 s to notice: longer than a short TTL. A new client
                    // connects afresh, and only the members that answer take its requests.
                    if answered.elapsed() > self.ttl / 2 {
                        *client = None;
                        return Err(format!(
                            "lease {id:x}'s keep-alives went unanswered for {} ms; connecting again",
                            answered.elapsed().as_millis()
                        ));
                    }
                    keeper
                        .keep_alive()
                        .await
                        .map_err(|e| format!("cannot keep lease {id:x} alive: {e}"))?;
                }
                answer = answers.message() => match answer {
                    Ok(Some(a)) if a.ttl() > 0 => answered = Instant::now(),
                    Ok(Some(_)) => {
                        *lease = None;
                        return Err(format!(
                            "lease {id:x} expired (etcd was out of reach for longer than its TTL); granting a new one"
                        ));
                    }
                    Ok(None) => return Err(format!("etcd closed the keep-alive stream of lease {id:x}")),
                    Err(e) => return Err(format!("the keep-alive stream of lease {id:x} broke: {e}")),
                },
                changed = slices.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let current = slices.borrow_and_update().clone();
                    let Some(registration) = current else { continue };
                    let next = registration.encode();
                    if next == value {
                        continue;
                    }
                    let put = c.put(self.key, next.clone(), Some(PutOptions::new().with_lease(id)));
                    self.answer(&format!("put {}", self.key), put).await?;
                    value = next;
                    tracing::info!(
                        "agent: updated {} ({} endpoints)",
                        self.key,
                        registration.endpoints()
                    );
                }
            }
        }
    }
}

/// The Consul service instances a slice makes: one per endpoint that takes requests, by ID;
/// and the services left out because Consul's tags cannot say what they need.
fn consul_services(
    node: &str,
    r: &Registration,
    ttl: Duration,
) -> (BTreeMap<String, Value>, BTreeSet<String>) {
    let mut out = BTreeMap::new();
    let mut left_out = BTreeSet::new();
    let config = &r.config;
    for route in &config.routes {
        let Some(listener) = config.listeners.iter().find(|l| l.name == route.listener) else {
            continue;
        };
        let Some(service) = config.services.get(&route.service) else {
            continue;
        };
        // `--consul-tags` publishes HTTP services only.
        if listener.protocol != Protocol::Http {
            left_out.insert(format!("{} ({})", route.service, listener.protocol));
            continue;
        }
        let mut tags = vec!["drover.enable".to_string()];
        if listener.listen.is_ipv4() && listener.listen.ip().is_unspecified() {
            tags.push(format!("drover.publish={}", listener.listen.port()));
        } else {
            tags.push(format!("drover.listen={}", listener.listen));
        }
        if let Some(host) = &route.host {
            tags.push(format!("drover.host={host}"));
        }
        if let Some(path) = &route.path_prefix {
            tags.push(format!("drover.path={path}"));
        }
        tags.push(format!("drover.policy={}", service.policy));
        for e in &service.endpoints {
            if e.state != AdminState::Enabled {
                continue;
            }
            let container = r
                .containers
                .get(&e.address)
                .cloned()
                .unwrap_or_else(|| format!("{}-{}", e.address.ip(), e.address.port()));
            let id = format!("drover-{node}-{container}");
            out.insert(
                id.clone(),
                json!({
                    "ID": id,
                    "Name": route.service,
                    "Address": e.address.ip().to_string(),
                    "Port": e.address.port(),
                    "Tags": tags,
                    "Meta": { "drover_node": node, "container": container },
                    "Check": {
                        "CheckID": format!("service:{id}"),
                        "Name": format!("drover agent {node}"),
                        "TTL": format!("{}s", ttl.as_secs()),
                        "Status": "passing",
                        "DeregisterCriticalServiceAfter": "1m",
                    },
                }),
            );
        }
    }
    (out, left_out)
}

/// Consul's HTTP API, as much of it as registering needs.
struct ConsulApi {
    consul: Consul,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl ConsulApi {
    /// `PUT path` with an optional JSON body; the status and body of the answer.
    async fn put(&self, path: &str, body: Option<&Value>) -> Result<(StatusCode, String), String> {
        let mut req = Request::put(format!("http://{}{path}", self.consul.address));
        if let Some(t) = &self.consul.token {
            req = req.header("x-consul-token", t);
        }
        let body = body.map(Value::to_string).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            let res = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, String::from_utf8_lossy(&body).trim().to_string()))
        })
        .await
        .map_err(|_| "no answer within 5 s".to_string())??;
        Ok(answer)
    }

    /// Registers or deregisters until Consul holds `desired`; `registered` is what it holds.
    async fn sync(
        &self,
        desired: &BTreeMap<String, Value>,
        registered: &mut BTreeMap<String, Value>,
    ) -> Result<(), String> {
        for (id, body) in desired {
            if registered.get(id) == Some(body) {
                continue;
            }
            let (status, text) = self.put("/v1/agent/service/register", Some(body)).await?;
            if !status.is_success() {
                return Err(format!("registering {id}: {status} {text}"));
            }
            tracing::info!(
                "agent: registered {id} in Consul: service {} at {}:{}",
                body["Name"].as_str().unwrap_or_default(),
                body["Address"].as_str().unwrap_or_default(),
                body["Port"]
            );
            registered.insert(id.clone(), body.clone());
        }
        let gone: Vec<String> = registered
            .keys()
            .filter(|id| !desired.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.deregister(&id).await?;
            registered.remove(&id);
        }
        Ok(())
    }

    async fn deregister(&self, id: &str) -> Result<(), String> {
        let (status, text) = self
            .put(&format!("/v1/agent/service/deregister/{id}"), None)
            .await?;
        // Already gone is gone.
        if !status.is_success() && status != StatusCode::NOT_FOUND {
            return Err(format!("deregistering {id}: {status} {text}"));
        }
        tracing::info!("agent: deregistered {id} from Consul");
        Ok(())
    }

    /// Passes the TTL checks; forgets the registrations Consul no longer knows, so that the
    /// next sync makes them again.
    async fn pass(&self, registered: &mut BTreeMap<String, Value>) -> Result<(), String> {
        let ids: Vec<String> = registered.keys().cloned().collect();
        for id in ids {
            let (status, text) = self
                .put(&format!("/v1/agent/check/pass/service:{id}"), None)
                .await?;
            if status == StatusCode::NOT_FOUND {
                tracing::warn!("agent: Consul lost {id} ({text}); registering it again");
                registered.remove(&id);
            } else if !status.is_success() {
                return Err(format!("passing the check of {id}: {status} {text}"));
            }
        }
        Ok(())
    }
}

/// Keeps Consul's service instances in step with the latest slice until `stop`, then
/// deregisters them.
async fn keep_in_consul(
    consul: Consul,
    node: String,
    ttl: Duration,
    mut slices: Slices,
    stop: CancellationToken,
) {
    let api = ConsulApi {
        client: Client::builder(TokioExecutor::new()).build_http(),
        consul,
    };
    let mut outage = Outage::new(
        format!("Consul at {}", api.consul.address),
        Duration::from_secs(5),
    );
    let mut registered: BTreeMap<String, Value> = BTreeMap::new();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (desired, left_out) = slices
            .borrow_and_update()
            .as_ref()
            .map(|r| consul_services(&node, r, ttl))
            .unwrap_or_default();
        for s in left_out.difference(&warned) {
            tracing::warn!(
                "agent: service {s} is not registered in Consul: its tags publish HTTP services only; use --store for it"
            );
        }
        warned = left_out;
        let retry = match tokio::select! {
            r = api.sync(&desired, &mut registered) => r,
            _ = stop.cancelled() => break,
        } {
            Ok(()) => {
                outage.ok();
                None
            }
            Err(e) => Some(outage.failed(&e)),
        };
        tokio::select! {
            changed = slices.changed() => if changed.is_err() { break },
            _ = tick.tick() => {
                let passed = tokio::select! {
                    r = api.pass(&mut registered) => r,
                    _ = stop.cancelled() => break,
                };
                if let Err(e) = passed {
                    outage.failed(&e);
                }
            }
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
            _ = stop.cancelled() => break,
        }
    }
    for id in registered.keys() {
        if let Err(e) = api.deregister(id).await {
            tracing::warn!(
                "agent: {e}; its TTL check goes critical within {} s",
                ttl.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consul_addresses_take_host_and_port() {
        assert_eq!(
            parse_consul("consul://127.0.0.1:8500").unwrap(),
            "127.0.0.1:8500"
        );
        assert_eq!(parse_consul("consul://consul").unwrap(), "consul:8500");
        assert_eq!(
            parse_consul("consul://[fd00::1]").unwrap(),
            "[fd00::1]:8500"
        );
        assert_eq!(
            parse_consul("consul://[fd00::1]:8600").unwrap(),
            "[fd00::1]:8600"
        );
        for bad in [
            "http://127.0.0.1:8500",
            "127.0.0.1:8500",
            "consul://",
            "consul://:8500",
            "consul://h:0",
            "consul://h:x",
            "consul://h:1/v1",
        ] {
            let e = parse_consul(bad).unwrap_err();
            assert!(e.contains("consul://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn ttls_are_whole_seconds_from_1s_to_1h() {
        assert_eq!(parse_ttl("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_ttl("1500ms").unwrap(), Duration::from_secs(2));
        assert!(parse_ttl("500ms").is_err());
        assert!(parse_ttl("2h").is_err());
        assert!(parse_ttl("ten").is_err());
    }

    #[test]
    fn node_names_fit_a_key_and_an_id() {
        assert!(parse_node("host-1.example_a").is_ok());
        for bad in ["", "a/b", "a b", "é"] {
            assert!(parse_node(bad).is_err(), "{bad}");
        }
    }
}
