//! The DNS source: the seeds' mappings (`80:webserver:8080`) served from DNS names.
//!
//! A mapping with a target port looks up the A and AAAA records of its name and makes an
//! endpoint of each address on that port (weave-nginx's form). A mapping without one looks up
//! the SRV records of its name (`80:_http._tcp.webserver`) and makes an endpoint of each
//! target's addresses on the record's own port, weighted by the record's weight.
//!
//! Each name is looked up again when its answer's TTL runs out, clamped to
//! [`DnsOptions::min_ttl`]..=[`DnsOptions::max_ttl`]; the resolver's cache is bypassed, so that
//! every refresh really asks the server. When a lookup fails (no answer, REFUSED, SERVFAIL,
//! NXDOMAIN), the last good answer keeps serving until [`DnsOptions::hold`] has passed since it
//! was due for renewal; then the name has no endpoints (its service answers 503) until a lookup
//! succeeds again. Failed lookups are retried every `min_ttl`.
//!
//! Invariants: every snapshot is whole (every mapping's listener, route and service, with the
//! endpoints in force, possibly none); a snapshot is sent at start and then only when the
//! endpoint set (addresses or weights) of some service changed; the hold logic (`Held`) is a
//! pure state machine driven by explicit instants.
//!
//! Health (`drover_source_*` in /metrics): a failed lookup of any name is a failed sync of the
//! source `dns`; a successful lookup is a sync once no name is failing.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use drover_control::{Snapshot, SnapshotSender};
use drover_model::SourceId;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::mapping::{self, Mapping};

/// The source id of the DNS source.
pub fn source_id() -> SourceId {
    SourceId("dns".into())
}

/// The longest a single lookup may take, whatever the resolver's own timeouts and retries.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(20);

/// How long the resolver waits for an answer from a server given on the command line, and
/// how many times it asks again before the lookup fails. Such a server is near (weaveDNS, a
/// sidecar, a node-local cache) and answers in milliseconds, so a dead one is noticed within
/// 2 s; the source itself retries a failed name every `min_ttl`. (The system's resolver keeps
/// the timeout and attempts of /etc/resolv.conf, 5 s and 2 by default.)
const SERVER_TIMEOUT: Duration = Duration::from_secs(1);
const SERVER_ATTEMPTS: usize = 1;

/// The highest endpoint weight (HAProxy's 256).
const MAX_WEIGHT: u32 = 256;

/// How names are resolved.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// The DNS server, asked over UDP (TCP for truncated answers). None: the system's resolver
    /// configuration (`/etc/resolv.conf`, its search list and `/etc/hosts`).
    pub server: Option<SocketAddr>,
    /// Appended to each service name (weave's `weave.local`). None: names are looked up as
    /// written.
    pub domain: Option<String>,
    /// Floor on the refresh interval, and the retry interval of failed lookups. 1 s.
    pub min_ttl: Duration,
    /// Ceiling on the refresh interval. 300 s.
    pub max_ttl: Duration,
    /// How long the last good answer is kept once lookups fail, counted from when it was due
    /// for renewal. 30 s, HAProxy's resolvers `hold` for failed resolutions (`nx`, `refused`,
    /// `timeout`, `other`).
    pub hold: Duration,
}

impl Default for DnsOptions {
    fn default() -> Self {
        Self {
            server: None,
            domain: None,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            hold: Duration::from_secs(30),
        }
    }
}

/// Endpoints of one service: address to weight. A `BTreeMap` so that comparisons, logs and
/// snapshots come in one stable order.
type Endpoints = BTreeMap<SocketAddr, u32>;

/// What one name is looked up for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Query {
    /// A and AAAA; every address on this port.
    Address(u16),
    /// SRV; each target on its record's port.
    Srv,
}

/// One distinct service and the name it is looked up by.
#[derive(Debug)]
struct Target {
    service: String,
    name: Name,
    query: Query,
}

/// Serves mapped names from DNS.
pub struct DnsSource {
    mappings: Vec<Mapping>,
    targets: Vec<Target>,
    options: DnsOptions,
    resolver: TokioResolver,
}

impl std::fmt::Debug for DnsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsSource")
            .field("targets", &self.targets)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl DnsSource {
    /// Checks the mappings and options and sets up the resolver (reading `/etc/resolv.conf`
    /// when no server is given). Errors say what is wrong and what would be valid.
    pub fn new(mappings: Vec<Mapping>, options: DnsOptions) -> Result<Self, String> {
        if mappings.is_empty() {
            return Err(
                "the DNS source needs mappings to resolve, such as 80:webserver:8080".into(),
            );
        }
        if options.min_ttl.is_zero() {
            return Err("the DNS minimum TTL must be above zero, such as 1s".into());
        }
        if options.min_ttl > options.max_ttl {
            return Err(format!(
                "the DNS minimum TTL ({:?}) is above the maximum TTL ({:?}); make the minimum the smaller",
                options.min_ttl, options.max_ttl
            ));
        }
        let domain = match &options.domain {
            Some(d) => {
                let mut d = Name::from_ascii(d).map_err(|e| {
                    format!("invalid DNS domain {d:?}: {e}; write one such as weave.local")
                })?;
                d.set_fqdn(true);
                Some(d)
            }
            None => None,
        };
        let mut targets: Vec<Target> = Vec::new();
        for m in &mappings {
            let query = match m.target_port {
                Some(p) => Query::Address(p),
                None => Query::Srv,
            };
            if let Some(t) = targets.iter().find(|t| t.service == m.service) {
                if t.query != query {
                    return Err(format!(
                        "the mapping {m} resolves {:?} differently from another mapping of the same name; give every mapping of one name the same target port, or none",
                        m.service
                    ));
                }
                continue;
            }
            let name = lookup_name(&m.service, domain.as_ref())
                .map_err(|e| format!("the mapping {m}: {e}"))?;
            targets.push(Target {
                service: m.service.clone(),
                name,
                query,
            });
        }
        let resolver = resolver(options.server)?;
        Ok(Self {
            mappings,
            targets,
            options,
            resolver,
        })
    }

    /// Sends a snapshot at once (services with no endpoints yet), then one whenever the
    /// endpoint set of any service changes; until `stop` is cancelled or the reconciler is
    /// gone.
    pub async fn run(self, snapshots: SnapshotSender, stop: CancellationToken) {
        let Self {
            mappings,
            targets,
            options,
            resolver,
        } = self;
        let mut names: Vec<NameState> = targets.into_iter().map(NameState::new).collect();
        let health = drover_control::sources::health(&source_id());
        // Whether the snapshot went; false when drover stops or the reconciler is gone.
        let send = async |names: &[NameState], reason: String| {
            let snapshot = Snapshot::new(source_id(), snapshot_config(&mappings, names), reason);
            tokio::select! {
                _ = stop.cancelled() => false,
                sent = snapshots.send(snapshot) => sent.is_ok(),
            }
        };
        if !send(&names, "startup".into()).await {
            return;
        }
        let mut lookups: JoinSet<Result<Answer, String>> = JoinSet::new();
        // Which name each lookup task is for.
        let mut tasks: HashMap<tokio::task::Id, usize> = HashMap::new();
        loop {
            let now = Instant::now();
            for (i, n) in names.iter_mut().enumerate() {
                if !n.in_flight && n.next_lookup <= now {
                    n.in_flight = true;
                    let resolver = resolver.clone();
                    let name = n.target.name.clone();
                    let query = n.target.query.clone();
                    let task = lookups.spawn(async move {
                        tokio::time::timeout(LOOKUP_DEADLINE, lookup(&resolver, &name, &query))
                            .await
                            .unwrap_or_else(|_| {
                                Err(format!("no answer within {LOOKUP_DEADLINE:?}"))
                            })
                    });
                    tasks.insert(task.id(), i);
                }
            }
            let mut changed: Vec<&str> = Vec::new();
            for n in names.iter_mut() {
                if n.held.expire(now, options.hold) {
                    tracing::warn!(
                        "dns: {} still cannot be resolved {:?} after its answer was due; it has no endpoints until a lookup succeeds",
                        n.target.service,
                        options.hold
                    );
                    log_endpoints(&n.target.service, &n.held.endpoints);
                    changed.push(&n.target.service);
                }
            }
            if !changed.is_empty() {
                let reason = format!("{} changed", changed.join(", "));
                if !send(&names, reason).await {
                    return;
                }
                continue;
            }
            let wake = names
                .iter()
                .filter(|n| !n.in_flight)
                .map(|n| n.next_lookup)
                .chain(names.iter().filter_map(|n| n.held.drop_at(options.hold)))
                .min();
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let done = tokio::select! {
                _ = stop.cancelled() => return,
                Some(done) = lookups.join_next_with_id() => done,
                _ = sleep => continue,
            };
            let mut results = vec![done];
            while let Some(more) = lookups.try_join_next_with_id() {
                results.push(more);
            }
            let now = Instant::now();
            let mut changed: Vec<String> = Vec::new();
            for done in results {
                let (id, answer) = match done {
                    Ok((id, answer)) => (id, answer),
                    // Nothing in a lookup panics; if one did, its name is retried as failed.
                    Err(e) => (e.id(), Err(format!("the lookup task failed: {e}"))),
                };
                let Some(i) = tasks.remove(&id) else {
                    continue;
                };
                let n = &mut names[i];
                n.in_flight = false;
                if let Err(why) = &answer {
                    health.failed(format!("{}: {why}", n.target.name));
                }
                if n.apply(now, answer, &options) {
                    log_endpoints(&n.target.service, &n.held.endpoints);
                    changed.push(n.target.service.clone());
                }
            }
            if names.iter().all(|n| !n.held.failing) {
                health.synced();
            }
            if !changed.is_empty() {
                let reason = format!("{} changed", changed.join(", "));
                if !send(&names, reason).await {
                    return;
                }
            }
        }
    }
}

/// One name as the run loop sees it.
struct NameState {
    target: Target,
    held: Held,
    next_lookup: Instant,
    in_flight: bool,
}

impl NameState {
    /// A name not looked up yet, due for its first lookup now.
    fn new(target: Target) -> Self {
        Self {
            target,
            held: Held::default(),
            next_lookup: Instant::now(),
            in_flight: false,
        }
    }

    /// Takes a lookup's result; whether the endpoints changed.
    fn apply(
        &mut self,
        now: Instant,
        answer: Result<Answer, String>,
        options: &DnsOptions,
    ) -> bool {
        let service = &self.target.service;
        match answer {
            Ok(answer) => {
                let interval = refresh_interval(answer.ttl, options.min_ttl, options.max_ttl);
                self.next_lookup = now + interval;
                let recovered = self.held.failing;
                let changed = self.held.succeed(now, answer.endpoints, interval);
                if recovered {
                    tracing::info!("dns: {service} resolves again");
                }
                tracing::debug!("dns: {service} looked up, next in {interval:?}");
                changed
            }
            Err(why) => {
                self.next_lookup = now + options.min_ttl;
                let had = !self.held.endpoints.is_empty();
                let failure = self.held.fail(now, options.hold);
                let name = if self.target.name.to_string() == *service {
                    service.clone()
                } else {
                    format!("{} (service {service})", self.target.name)
                };
                let retry = options.min_ttl;
                if failure.first && failure.dropped {
                    tracing::warn!(
                        "dns: cannot resolve {name}: {why}; its last answer is dropped, {:?} after it was due; retrying every {retry:?}",
                        options.hold
                    );
                } else if failure.first && had {
                    tracing::warn!(
                        "dns: cannot resolve {name}: {why}; keeping its last answer for up to {:?} after it was due; retrying every {retry:?}",
                        options.hold
                    );
                } else if failure.first {
                    tracing::warn!(
                        "dns: cannot resolve {name}: {why}; it has no endpoints until a lookup succeeds; retrying every {retry:?}"
                    );
                } else if failure.dropped {
                    tracing::warn!(
                        "dns: {service} still cannot be resolved {:?} after its answer was due ({why}); it has no endpoints until a lookup succeeds",
                        options.hold
                    );
                } else {
                    tracing::debug!("dns: {service} still fails: {why}");
                }
                failure.dropped
            }
        }
    }
}

fn log_endpoints(service: &str, endpoints: &Endpoints) {
    tracing::info!("dns: {service} now {}", describe(endpoints));
}

/// `10.0.0.1:8080, 10.0.0.2:8080 (weight 3)`, or `no endpoints`.
fn describe(endpoints: &Endpoints) -> String {
    if endpoints.is_empty() {
        return "no endpoints".into();
    }
    let mut s = String::new();
    for (i, (addr, weight)) in endpoints.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{addr}");
        if *weight != 1 {
            let _ = write!(s, " (weight {weight})");
        }
    }
    s
}

/// The whole slice of the mappings, with the endpoints in force.
fn snapshot_config(mappings: &[Mapping], names: &[NameState]) -> drover_model::Config {
    let found: BTreeMap<String, Vec<SocketAddr>> = names
        .iter()
        .map(|n| {
            (
                n.target.service.clone(),
                n.held.endpoints.keys().copied().collect(),
            )
        })
        .collect();
    let mut config = mapping::config_for(mappings, &found);
    for n in names {
        if let Some(service) = config.services.get_mut(&n.target.service) {
            for e in &mut service.endpoints {
                if let Some(w) = n.held.endpoints.get(&e.address) {
                    e.weight = *w;
                }
            }
        }
    }
    config
}

/// The name to look up for a service: `SERVICE.DOMAIN.` with a domain, else the service as
/// written (then the system's search list applies, if any).
fn lookup_name(service: &str, domain: Option<&Name>) -> Result<Name, String> {
    let name =
        Name::from_ascii(service).map_err(|e| format!("{service:?} is not a DNS name: {e}"))?;
    match domain {
        Some(d) if !name.is_fqdn() => name
            .append_domain(d)
            .map_err(|e| format!("{service:?} with the domain {d} is not a DNS name: {e}")),
        _ => Ok(name),
    }
}

/// A resolver without a cache worth the name: every refresh must reach the server.
fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            let mut b = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            );
            let o = b.options_mut();
            o.timeout = SERVER_TIMEOUT;
            o.attempts = SERVER_ATTEMPTS;
            // The names are the server's to answer, not /etc/hosts'.
            o.use_hosts_file = ResolveHosts::Never;
            b
        }
        None => TokioResolver::builder_tokio().map_err(|e| {
            format!("cannot read the system's DNS configuration (/etc/resolv.conf): {e}; give a server with --dns ADDR")
        })?,
    };
    // No cache: each lookup is cleared from it first as well, since an empty cache may still
    // hold an entry for a moment.
    builder.options_mut().cache_size = 0;
    builder
        .build()
        .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
}

/// A successful lookup.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    endpoints: Endpoints,
    /// The lowest TTL among the records used, in seconds; None when there were none.
    ttl: Option<u32>,
}

impl Answer {
    fn ttl(&mut self, ttl: u32) {
        self.ttl = Some(self.ttl.map_or(ttl, |t| t.min(ttl)));
    }
}

/// What one query of one record type gave.
enum Records {
    /// The records (possibly none: the name exists without records of the type).
    Found(Lookup),
    Empty(Option<u32>),
}

async fn query(
    resolver: &TokioResolver,
    name: &Name,
    rtype: RecordType,
) -> Result<Records, String> {
    resolver.clear_lookup_cache(name.clone(), rtype);
    match resolver.lookup(name.clone(), rtype).await {
        Ok(l) => Ok(Records::Found(l)),
        Err(NetError::Dns(DnsError::NoRecordsFound(nr)))
            if nr.response_code == ResponseCode::NoError =>
        {
            Ok(Records::Empty(nr.negative_ttl))
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => {
            Err(format!("{rtype} {}", nr.response_code))
        }
        Err(NetError::Dns(DnsError::ResponseCode(code))) => Err(format!("{rtype} {code}")),
        Err(e) => Err(format!("{rtype}: {e}")),
    }
}

async fn lookup(resolver: &TokioResolver, name: &Name, q: &Query) -> Result<Answer, String> {
    match q {
        Query::Address(port) => {
            let mut answer = Answer::default();
            addresses(resolver, name, &mut answer, |ip, ttl, a| {
                a.endpoints.insert(SocketAddr::new(ip, *port), 1);
                a.ttl(ttl);
            })
            .await?;
            Ok(answer)
        }
        Query::Srv => srv(resolver, name).await,
    }
}

/// Looks up A and AAAA of `name` together and calls `each` with every address. Succeeds when
/// either query does (a server may refuse AAAA of a name it only has IPv4 for, as dnsmasq
/// does), fails with both reasons when neither does.
async fn addresses(
    resolver: &TokioResolver,
    name: &Name,
    answer: &mut Answer,
    mut each: impl FnMut(IpAddr, u32, &mut Answer),
) -> Result<(), String> {
    let (a, aaaa) = tokio::join!(
        query(resolver, name, RecordType::A),
        query(resolver, name, RecordType::AAAA)
    );
    if let (Err(a), Err(aaaa)) = (&a, &aaaa) {
        return Err(format!("{a}, {aaaa}"));
    }
    for records in [a, aaaa].into_iter().flatten() {
        match records {
            Records::Found(l) => {
                for r in l.answers() {
                    // Every record of the chain counts: a CNAME's TTL as much as an A's.
                    answer.ttl(r.ttl);
                    let ip = match &r.data {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(a) => IpAddr::V6(a.0),
                        _ => continue,
                    };
                    each(ip, r.ttl, answer);
                }
            }
            Records::Empty(Some(ttl)) => answer.ttl(ttl),
            Records::Empty(None) => {}
        }
    }
    Ok(())
}

/// Looks up the SRV records of `name`, then the addresses of their targets (from the
/// answer's additional section when the server put them there).
async fn srv(resolver: &TokioResolver, name: &Name) -> Result<Answer, String> {
    let mut answer = Answer::default();
    let lookup = match query(resolver, name, RecordType::SRV).await? {
        Records::Found(l) => l,
        Records::Empty(ttl) => {
            answer.ttl = ttl;
            return Ok(answer);
        }
    };
    // Records by priority: the lowest that has reachable targets is used, the others are
    // backups (RFC 2782).
    let mut by_priority: BTreeMap<u16, Vec<(Name, u16, u16, u32)>> = BTreeMap::new();
    for r in lookup.answers() {
        // Backups and CNAMEs included: a change to any record is a change to the answer.
        answer.ttl(r.ttl);
        if let RData::SRV(s) = &r.data {
            // "." means the service is decidedly not available; port 0 cannot be dialled.
            if s.target.is_root() || s.port == 0 {
                continue;
            }
            by_priority.entry(s.priority).or_default().push((
                s.target.clone(),
                s.port,
                s.weight,
                r.ttl,
            ));
        }
    }
    let mut failures = Vec::new();
    for records in by_priority.values() {
        let weights = srv_weights(&records.iter().map(|r| r.2).collect::<Vec<_>>());
        let mut group = Answer::default();
        for ((target, port, _, ttl), weight) in records.iter().zip(weights) {
            let mut ips: Vec<(IpAddr, u32)> = Vec::new();
            for r in lookup.additionals() {
                if &r.name != target {
                    continue;
                }
                match &r.data {
                    RData::A(a) => ips.push((IpAddr::V4(a.0), r.ttl)),
                    RData::AAAA(a) => ips.push((IpAddr::V6(a.0), r.ttl)),
                    _ => {}
                }
            }
            if ips.is_empty() {
                let res = addresses(resolver, target, &mut group, |ip, ttl, _| {
                    ips.push((ip, ttl));
                })
                .await;
                if let Err(e) = res {
                    failures.push(format!("{target}: {e}"));
                    continue;
                }
            }
            group.ttl(*ttl);
            for (ip, ttl) in ips {
                group.ttl(ttl);
                let w = group
                    .endpoints
                    .entry(SocketAddr::new(ip, *port))
                    .or_insert(0);
                *w = (*w).max(weight);
            }
        }
        if !group.endpoints.is_empty() {
            if let Some(t) = answer.ttl {
                group.ttl(t);
            }
            return Ok(group);
        }
        if let Some(t) = group.ttl {
            answer.ttl(t);
        }
    }
    if !failures.is_empty() {
        return Err(format!("no SRV target resolves: {}", failures.join("; ")));
    }
    Ok(answer)
}

/// SRV weights (0..=65535, relative) as endpoint weights (1..=256): kept as they are when
/// they fit, else scaled so that the largest is 256; none below 1 (RFC 2782's weight 0, "a
/// very small chance", gets the smallest share drover has).
fn srv_weights(weights: &[u16]) -> Vec<u32> {
    let max = weights.iter().copied().max().unwrap_or(0) as u32;
    weights
        .iter()
        .map(|&w| {
            let w = w as u32;
            let scaled = if max > MAX_WEIGHT {
                (w * MAX_WEIGHT + max / 2) / max
            } else {
                w
            };
            scaled.clamp(1, MAX_WEIGHT)
        })
        .collect()
}

/// How long until a name is looked up again: its answer's TTL within `[min, max]`; `min` when
/// the answer carried no TTL.
fn refresh_interval(ttl: Option<u32>, min: Duration, max: Duration) -> Duration {
    match ttl {
        Some(t) => Duration::from_secs(u64::from(t)).clamp(min, max),
        None => min,
    }
}

/// The endpoints served for one name, and the hold of the last good answer while lookups fail.
#[derive(Debug, Default)]
struct Held {
    /// What is served.
    endpoints: Endpoints,
    /// When the answer served was due for renewal (its success plus its refresh interval);
    /// None before the first success and after a held answer was dropped.
    due: Option<Instant>,
    /// Whether the last lookup failed.
    failing: bool,
}

/// What a failed lookup did.
#[derive(Debug, PartialEq, Eq)]
struct Failure {
    /// The first failure after a success (or at start): worth a warning.
    first: bool,
    /// The held answer was dropped: the name has no endpoints now.
    dropped: bool,
}

impl Held {
    /// A lookup succeeded at `now`: serve `endpoints`, due for renewal after `interval`.
    /// Whether the endpoints changed.
    fn succeed(&mut self, now: Instant, endpoints: Endpoints, interval: Duration) -> bool {
        self.failing = false;
        self.due = Some(now + interval);
        let changed = self.endpoints != endpoints;
        self.endpoints = endpoints;
        changed
    }

    /// A lookup failed at `now`: the answer served is kept while `hold` has not passed since
    /// it was due.
    fn fail(&mut self, now: Instant, hold: Duration) -> Failure {
        let first = !self.failing;
        self.failing = true;
        Failure {
            first,
            dropped: self.expire(now, hold),
        }
    }

    /// When the answer served will be dropped unless a lookup succeeds first: only while
    /// lookups fail and there is something to drop.
    fn drop_at(&self, hold: Duration) -> Option<Instant> {
        match self.due {
            Some(due) if self.failing && !self.endpoints.is_empty() => Some(due + hold),
            _ => None,
        }
    }

    /// Drops the answer served if lookups fail and its hold has run out at `now`. Whether
    /// the endpoints changed.
    fn expire(&mut self, now: Instant, hold: Duration) -> bool {
        match self.drop_at(hold) {
            Some(at) if now >= at => {
                self.endpoints.clear();
                self.due = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(list: &[&str]) -> Endpoints {
        list.iter().map(|a| (a.parse().unwrap(), 1)).collect()
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ttls_are_clamped_to_the_floor_and_ceiling() {
        let (min, max) = (S, 300 * S);
        assert_eq!(refresh_interval(Some(0), min, max), S);
        assert_eq!(refresh_interval(Some(1), min, max), S);
        assert_eq!(refresh_interval(Some(60), min, max), 60 * S);
        assert_eq!(refresh_interval(Some(86_400), min, max), 300 * S);
        assert_eq!(refresh_interval(None, min, max), S);
        assert_eq!(refresh_interval(Some(u32::MAX), 5 * S, 5 * S), 5 * S);
    }

    #[test]
    fn a_held_answer_outlives_failures_for_the_hold_then_goes() {
        let hold = 30 * S;
        let t0 = Instant::now();
        let mut h = Held::default();
        assert!(h.succeed(t0, eps(&["10.0.0.1:80", "10.0.0.2:80"]), 5 * S));
        assert_eq!(h.drop_at(hold), None, "nothing fails yet");
        // Due at t0+5; the renewal fails at t0+6: warned once, kept.
        assert_eq!(
            h.fail(t0 + 6 * S, hold),
            Failure {
                first: true,
                dropped: false
            }
        );
        assert_eq!(h.drop_at(hold), Some(t0 + 35 * S));
        assert_eq!(h.endpoints.len(), 2);
        // More failures: not first, still kept until due + hold.
        assert_eq!(
            h.fail(t0 + 20 * S, hold),
            Failure {
                first: false,
                dropped: false
            }
        );
        assert!(!h.expire(t0 + 34 * S, hold));
        assert_eq!(h.endpoints.len(), 2);
        // The timer at due + hold drops it.
        assert!(h.expire(t0 + 35 * S, hold));
        assert!(h.endpoints.is_empty());
        assert_eq!(h.drop_at(hold), None);
        assert!(!h.expire(t0 + 36 * S, hold), "dropped once");
        // Later failures change nothing and warn no more.
        assert_eq!(
            h.fail(t0 + 40 * S, hold),
            Failure {
                first: false,
                dropped: false
            }
        );
        // A success brings endpoints back and ends the failure.
        assert!(h.succeed(t0 + 41 * S, eps(&["10.0.0.3:80"]), 5 * S));
        assert!(!h.failing);
        assert!(
            h.fail(t0 + 47 * S, hold).first,
            "a new failure after a success is warned again"
        );
    }

    #[test]
    fn a_failure_known_after_the_hold_drops_at_once() {
        let hold = 2 * S;
        let t0 = Instant::now();
        let mut h = Held::default();
        h.succeed(t0, eps(&["10.0.0.1:80"]), S);
        // The renewal hung until its timeout, long after due + hold.
        assert_eq!(
            h.fail(t0 + 10 * S, hold),
            Failure {
                first: true,
                dropped: true
            }
        );
        assert!(h.endpoints.is_empty());
    }

    #[test]
    fn a_slow_lookup_alone_drops_nothing() {
        // No failure known yet: the answer stays, whatever the time.
        let t0 = Instant::now();
        let mut h = Held::default();
        h.succeed(t0, eps(&["10.0.0.1:80"]), S);
        assert!(!h.expire(t0 + 100 * S, Duration::ZERO));
        assert_eq!(h.endpoints.len(), 1);
    }

    #[test]
    fn a_zero_hold_drops_at_the_first_failure() {
        let t0 = Instant::now();
        let mut h = Held::default();
        h.succeed(t0, eps(&["10.0.0.1:80"]), S);
        assert!(h.fail(t0 + S, Duration::ZERO).dropped);
    }

    #[test]
    fn failing_from_the_start_has_nothing_to_hold() {
        let t0 = Instant::now();
        let mut h = Held::default();
        assert_eq!(
            h.fail(t0, 30 * S),
            Failure {
                first: true,
                dropped: false
            }
        );
        assert_eq!(h.drop_at(30 * S), None);
        assert!(h.endpoints.is_empty());
    }

    #[test]
    fn an_unchanged_answer_is_no_change() {
        let t0 = Instant::now();
        let mut h = Held::default();
        assert!(!h.succeed(t0, Endpoints::new(), S), "empty stays empty");
        assert!(h.succeed(t0 + S, eps(&["10.0.0.1:80"]), S));
        assert!(!h.succeed(t0 + 2 * S, eps(&["10.0.0.1:80"]), S));
        let mut weighted = eps(&["10.0.0.1:80"]);
        weighted.insert("10.0.0.1:80".parse().unwrap(), 7);
        assert!(
            h.succeed(t0 + 3 * S, weighted, S),
            "a weight change is a change"
        );
    }

    #[test]
    fn srv_weights_fit_one_to_256() {
        assert_eq!(srv_weights(&[0, 0]), vec![1, 1]);
        assert_eq!(srv_weights(&[5, 10, 256]), vec![5, 10, 256]);
        assert_eq!(srv_weights(&[0, 100]), vec![1, 100]);
        assert_eq!(srv_weights(&[65535, 32768, 1]), vec![256, 128, 1]);
        assert_eq!(srv_weights(&[1000, 500]), vec![256, 128]);
        assert_eq!(srv_weights(&[]), Vec::<u32>::new());
    }

    #[test]
    fn names_get_the_domain_unless_fully_qualified() {
        let d = Name::from_ascii("weave.local.").unwrap();
        assert_eq!(
            lookup_name("webserver", Some(&d)).unwrap().to_string(),
            "webserver.weave.local."
        );
        assert_eq!(
            lookup_name("_http._tcp.webserver", Some(&d))
                .unwrap()
                .to_string(),
            "_http._tcp.webserver.weave.local."
        );
        assert_eq!(
            lookup_name("webserver.example.", Some(&d))
                .unwrap()
                .to_string(),
            "webserver.example."
        );
        assert_eq!(
            lookup_name("webserver", None).unwrap().to_string(),
            "webserver"
        );
        assert!(lookup_name("a..b", None).is_err());
    }

    #[test]
    fn endpoints_are_described_for_the_log() {
        assert_eq!(describe(&Endpoints::new()), "no endpoints");
        let mut e = eps(&["10.0.0.2:8080", "10.0.0.1:8080"]);
        assert_eq!(describe(&e), "10.0.0.1:8080, 10.0.0.2:8080");
        e.insert("10.0.0.2:8080".parse().unwrap(), 3);
        assert_eq!(describe(&e), "10.0.0.1:8080, 10.0.0.2:8080 (weight 3)");
    }

    fn mappings(list: &[&str]) -> Vec<Mapping> {
        list.iter().map(|m| m.parse().unwrap()).collect()
    }

    #[test]
    fn bad_options_and_mappings_are_refused_with_the_fix() {
        let server = DnsOptions {
            server: Some("127.0.0.1:5353".parse().unwrap()),
            ..DnsOptions::default()
        };
        let e =
            DnsSource::new(mappings(&["80:web:8080", "81:web:9090"]), server.clone()).unwrap_err();
        assert!(e.contains("same target port"), "{e}");
        let e = DnsSource::new(mappings(&["80:web:8080", "81:web"]), server.clone()).unwrap_err();
        assert!(e.contains("same target port"), "{e}");
        let e = DnsSource::new(
            mappings(&["80:web:8080"]),
            DnsOptions {
                min_ttl: 10 * S,
                max_ttl: 5 * S,
                ..server.clone()
            },
        )
        .unwrap_err();
        assert!(e.contains("above the maximum"), "{e}");
        let e = DnsSource::new(
            mappings(&["80:web:8080"]),
            DnsOptions {
                domain: Some("bad..domain".into()),
                ..server.clone()
            },
        )
        .unwrap_err();
        assert!(e.contains("weave.local"), "{e}");
        let e = DnsSource::new(Vec::new(), server.clone()).unwrap_err();
        assert!(e.contains("80:webserver:8080"), "{e}");
        let ok = DnsSource::new(
            mappings(&["80:web:8080", "81:web:8080", "82:_x._tcp.api"]),
            server,
        )
        .unwrap();
        assert_eq!(ok.targets.len(), 2, "one lookup per name");
    }

    #[test]
    fn the_systems_resolver_is_read_from_resolv_conf() {
        if !std::path::Path::new("/etc/resolv.conf").exists() {
            return;
        }
        let source = DnsSource::new(mappings(&["80:web:8080"]), DnsOptions::default());
        assert!(source.is_ok(), "{:?}", source.err());
    }

    #[test]
    fn snapshots_carry_every_mapping_and_the_weights() {
        let source = DnsSource::new(
            mappings(&["127.0.0.1:8080:web:9000", "127.0.0.1:8081:_api._tcp.api"]),
            DnsOptions {
                server: Some("127.0.0.1:5353".parse().unwrap()),
                ..DnsOptions::default()
            },
        )
        .unwrap();
        let mut names: Vec<NameState> = source.targets.into_iter().map(NameState::new).collect();
        let c = snapshot_config(&source.mappings, &names);
        drover_model::validate(&c).unwrap();
        assert!(c.services.values().all(|s| s.endpoints.is_empty()));
        let mut srv = eps(&["10.0.0.1:7001"]);
        srv.insert("10.0.0.2:7002".parse().unwrap(), 10);
        names[1].held.succeed(Instant::now(), srv, S);
        let c = snapshot_config(&source.mappings, &names);
        drover_model::validate(&c).unwrap();
        let api = &c.services["_api._tcp.api"].endpoints;
        assert_eq!(api.len(), 2);
        assert_eq!((api[0].weight, api[1].weight), (1, 10));
        assert_eq!(api[1].address.port(), 7002);
    }
}
