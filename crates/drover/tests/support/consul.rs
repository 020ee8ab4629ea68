//! A Consul HTTP API double, in process, for the Consul source's tests.
//!
//! Consul has no package that installs here, so the tests talk to this instead: a real HTTP
//! server on a loopback port that implements the part of Consul's HTTP API that drover uses,
//! as Consul's documentation describes it:
//!
//! - `PUT /v1/agent/service/register` (JSON `ID`, `Name`, `Address`, `Port`, `Tags`, and TTL
//!   checks in `Check` or `Checks`; a TTL check starts `critical` unless its `Status` says
//!   otherwise, and goes critical when its TTL runs out), `PUT
//!   /v1/agent/service/deregister/:id`;
//! - `PUT /v1/agent/check/pass|warn|fail/:check_id` (`?note=`); a service's only check is
//!   named `service:<ID>`, several are `service:<ID>:1`, `:2`, ... as Consul names them;
//! - `GET /v1/health/service/:name` (`?passing`) and `GET /v1/catalog/services`, both
//!   blocking queries: with `index` above 0 the answer waits until the index moves past it or
//!   `wait` (default 5 min, at most 10 min; Go duration syntax) runs out, and every answer
//!   carries `X-Consul-Index`;
//! - `GET /v1/status/leader`;
//! - `X-Consul-Token` (or `?token=`, or `Authorization: Bearer`) when a token is required:
//!   403 `Permission denied` without one, 403 `ACL not found` with a wrong one;
//! - `?dc=`: the double's datacenter is `dc1`; another answers 500 `No path to datacenter`.
//!
//! One node (`node1`, 127.0.0.1, with a passing `serfHealth` check) and one global index that
//! increases on every change. What it leaves out: the jitter Consul adds to `wait`, per-table
//! indexes (the global one is what Consul documents as allowed), ACL policies (a token is
//! right or wrong), and ACL filtering of results.
//!
//! Tests can change it directly (`register`, `deregister`, `pass`, `fail`) or through its API
//! (`put`), make it go away and come back on the same port (`stop`, `start_again`), and
//! rewind its index as a restored Consul would (`rewind_index`).
//! `services` shows what is registered, for the tests of registrars such as
//! `drover agent --register`.
//!
//! `start_tls` serves the same API over TLS only (rustls), with a server certificate for
//! 127.0.0.1 and localhost signed by a CA made for the double (rcgen); `ca_pem` is that CA,
//! for the test to write where `--consul-ca` reads it. `put` speaks plain HTTP only.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// The datacenter the double answers for.
pub const DATACENTER: &str = "dc1";
const NODE: &str = "node1";
const NODE_ADDRESS: &str = "127.0.0.1";
/// Consul's default and longest blocking wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

/// A running Consul double.
pub struct ConsulDouble {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<JoinHandle<()>>>,
    /// With TLS: the CA that signed the server's certificate, PEM.
    ca_pem: Option<String>,
    /// With TLS that verifies clients: a client certificate and key the server takes, PEM.
    client: Option<(String, String)>,
}

/// A test CA and a server certificate for 127.0.0.1 and localhost that it signed; with
/// `verify_clients`, also a client certificate it signed, which the server asks for.
struct TestPki {
    ca_pem: String,
    acceptor: TlsAcceptor,
    /// The client certificate and its key, PEM.
    client: Option<(String, String)>,
}

impl TestPki {
    fn new(verify_clients: bool) -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "drover test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).unwrap();

        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "consul double");
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let (builder, client) = if verify_clients {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der().clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            let client_key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, "drover");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let client_cert = params.signed_by(&client_key, &ca, &ca_key).unwrap();
            let client = (client_cert.pem(), client_key.serialize_pem());
            (builder.with_client_cert_verifier(verifier), Some(client))
        } else {
            (builder.with_no_client_auth(), None)
        };
        let config = builder
            .with_single_cert(vec![cert.der().clone(), ca.der().clone()], key)
            .unwrap();
        TestPki {
            ca_pem: ca.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
            client,
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// The global index, for blocked queries to wait on.
    index: watch::Sender<u64>,
    token: Option<String>,
    /// Serves TLS only, with this, when given.
    tls: Option<TlsAcceptor>,
    /// Health queries answered, blocking or not.
    health_queries: AtomicU64,
    catalog_queries: AtomicU64,
}

struct State {
    index: u64,
    /// By service ID.
    services: BTreeMap<String, Instance>,
}

/// A registered service instance, as [`ConsulDouble::services`] shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub id: String,
    pub name: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    /// Its checks' IDs and statuses (`passing`, `warning`, `critical`).
    pub checks: Vec<(String, String)>,
}

#[derive(Clone)]
struct Instance {
    id: String,
    name: String,
    address: String,
    port: u16,
    tags: Vec<String>,
    checks: Vec<TtlCheck>,
}

#[derive(Clone)]
struct TtlCheck {
    id: String,
    name: String,
    status: String,
    output: String,
    ttl: Duration,
    /// When a passing or warning TTL check turns critical unless updated.
    expires: Option<Instant>,
}

impl ConsulDouble {
    /// Starts a double that needs no token.
    pub async fn start() -> ConsulDouble {
        Self::start_with(None, None).await
    }

    /// Starts a double that answers only requests with `token`.
    pub async fn start_requiring_token(token: &str) -> ConsulDouble {
        Self::start_with(Some(token.to_string()), None).await
    }

    /// Starts a double that speaks TLS only, with a certificate for 127.0.0.1 and localhost
    /// signed by a CA of its own ([`ca_pem`](Self::ca_pem)).
    pub async fn start_tls() -> ConsulDouble {
        Self::start_with(None, Some(TestPki::new(false))).await
    }

    /// As [`start_tls`](Self::start_tls), and the double also asks each client for a
    /// certificate its CA signed (Consul's `verify_incoming`), such as
    /// [`client_pem`](Self::client_pem).
    pub async fn start_tls_verifying_clients() -> ConsulDouble {
        Self::start_with(None, Some(TestPki::new(true))).await
    }

    async fn start_with(token: Option<String>, pki: Option<TestPki>) -> ConsulDouble {
        let (ca_pem, tls, client) = match pki {
            Some(p) => (Some(p.ca_pem), Some(p.acceptor), p.client),
            None => (None, None, None),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            // A fresh Consul's index is already above 0.
            state: Mutex::new(State {
                index: 1,
                services: BTreeMap::new(),
            }),
            index: watch::Sender::new(1),
            token,
            tls,
            health_queries: AtomicU64::new(0),
            catalog_queries: AtomicU64::new(0),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        ConsulDouble {
            addr,
            shared,
            server: Mutex::new(Some(server)),
            ca_pem,
            client,
        }
    }

    /// `127.0.0.1:PORT` (`https://127.0.0.1:PORT` with TLS), as `--consul` takes it.
    pub fn address(&self) -> String {
        match self.ca_pem {
            Some(_) => format!("https://{}", self.addr),
            None => self.addr.to_string(),
        }
    }

    /// The PEM of the CA that signed the TLS double's certificate.
    pub fn ca_pem(&self) -> &str {
        self.ca_pem
            .as_deref()
            .expect("a double started with start_tls")
    }

    /// A client certificate and its key, PEM, that the double takes.
    pub fn client_pem(&self) -> (&str, &str) {
        let (cert, key) = self
            .client
            .as_ref()
            .expect("a double started with start_tls_verifying_clients");
        (cert, key)
    }

    /// Goes away as a crashed Consul would: the port refuses connections and every open one,
    /// blocked queries included, is closed. What was registered is kept for `start_again`.
    pub fn stop(&self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
    }

    /// Comes back on the same port, with the same services and index.
    pub async fn start_again(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot listen on {} again: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let server = tokio::spawn(serve(listener, self.shared.clone()));
        let old = self.server.lock().unwrap().replace(server);
        if let Some(old) = old {
            old.abort();
        }
    }

    /// Registers a service instance with no checks (so it is passing).
    pub fn register(&self, id: &str, name: &str, addr: SocketAddr, tags: &[&str]) {
        self.insert(Instance {
            id: id.into(),
            name: name.into(),
            address: addr.ip().to_string(),
            port: addr.port(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            checks: Vec::new(),
        });
    }

    /// Registers a service instance with a TTL check `service:<id>`, passing or critical.
    pub fn register_with_ttl(
        &self,
        id: &str,
        name: &str,
        addr: SocketAddr,
        ttl: Duration,
        passing: bool,
    ) {
        let status = if passing { "passing" } else { "critical" };
        self.insert(Instance {
            id: id.into(),
            name: name.into(),
            address: addr.ip().to_string(),
            port: addr.port(),
            tags: Vec::new(),
            checks: vec![TtlCheck::new(format!("service:{id}"), id, status, ttl)],
        });
    }

    fn insert(&self, instance: Instance) {
        let mut state = self.shared.state.lock().unwrap();
        state.services.insert(instance.id.clone(), instance);
        self.shared.bump(&mut state);
    }

    pub fn deregister(&self, id: &str) {
        let mut state = self.shared.state.lock().unwrap();
        assert!(
            state.services.remove(id).is_some(),
            "no service {id} to deregister"
        );
        self.shared.bump(&mut state);
    }

    /// Sets a TTL check passing.
    pub fn pass(&self, check_id: &str) {
        self.shared.update_check(check_id, "passing", "").unwrap();
    }

    /// Sets a TTL check critical.
    pub fn fail(&self, check_id: &str) {
        self.shared.update_check(check_id, "critical", "").unwrap();
    }

    /// The global index now.
    pub fn index(&self) -> u64 {
        self.shared.state.lock().unwrap().index
    }

    /// Sets the index back to `to`, as a Consul restored from an older snapshot would.
    pub fn rewind_index(&self, to: u64) {
        let mut state = self.shared.state.lock().unwrap();
        state.index = to;
        self.shared.index.send_replace(to);
    }

    /// `/v1/health/service/...` queries answered so far.
    pub fn health_queries(&self) -> u64 {
        self.shared.health_queries.load(Ordering::Relaxed)
    }

    /// `/v1/catalog/services` queries answered so far.
    pub fn catalog_queries(&self) -> u64 {
        self.shared.catalog_queries.load(Ordering::Relaxed)
    }

    /// Every registered service instance by ID, as the agent API's registrations left them:
    /// what a registrar such as `drover agent --register` made.
    pub fn services(&self) -> BTreeMap<String, Registered> {
        let state = self.shared.state.lock().unwrap();
        state
            .services
            .values()
            .map(|s| {
                let registered = Registered {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    address: s.address.clone(),
                    port: s.port,
                    tags: s.tags.clone(),
                    checks: s
                        .checks
                        .iter()
                        .map(|c| (c.id.clone(), c.status.clone()))
                        .collect(),
                };
                (s.id.clone(), registered)
            })
            .collect()
    }

    /// Sends `PUT path` with a JSON body (and the token, if given) through the HTTP API;
    /// returns the status and body.
    pub async fn put(&self, path: &str, body: &Value, token: Option<&str>) -> (StatusCode, String) {
        assert!(
            self.ca_pem.is_none(),
            "put speaks plain HTTP: register on a TLS double directly"
        );
        let mut req = Request::put(format!("http://{}{path}", self.addr));
        if let Some(t) = token {
            req = req.header("x-consul-token", t);
        }
        let req = req.body(super::full(body.to_string())).unwrap();
        let (status, _, body) = super::send(&super::client(), req).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.stop();
    }
}

impl TtlCheck {
    fn new(id: String, service_id: &str, status: &str, ttl: Duration) -> TtlCheck {
        let mut check = TtlCheck {
            id,
            name: format!("Service '{service_id}' check"),
            status: status.into(),
            output: String::new(),
            ttl,
            expires: None,
        };
        check.arm();
        check
    }

    /// A passing or warning TTL check must be updated within its TTL.
    fn arm(&mut self) {
        self.expires = (self.status != "critical").then(|| Instant::now() + self.ttl);
    }
}

impl Shared {
    /// Records a change: the index moves and blocked queries wake.
    fn bump(&self, state: &mut State) {
        state.index += 1;
        self.index.send_replace(state.index);
    }

    fn update_check(&self, check_id: &str, status: &str, note: &str) -> Result<(), String> {
        let mut state = self.state.lock().unwrap();
        let check = state
            .services
            .values_mut()
            .flat_map(|s| s.checks.iter_mut())
            .find(|c| c.id == check_id)
            .ok_or_else(|| format!("Unknown check ID {check_id:?}"))?;
        let changed = check.status != status || check.output != note;
        check.status = status.into();
        check.output = note.into();
        check.arm();
        if changed {
            self.bump(&mut state);
        }
        Ok(())
    }

    /// Turns TTL checks that were not updated in time critical.
    fn expire_checks(&self) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let mut changed = false;
        for check in state
            .services
            .values_mut()
            .flat_map(|s| s.checks.iter_mut())
        {
            if check.expires.is_some_and(|at| at <= now) {
                check.status = "critical".into();
                check.output = "TTL expired".into();
                check.expires = None;
                changed = true;
            }
        }
        if changed {
            self.bump(&mut state);
        }
    }

    /// The health entries of a service, as `/v1/health/service/:name` gives them.
    fn health(&self, name: &str, passing_only: bool) -> (u64, Value) {
        let state = self.state.lock().unwrap();
        let entries: Vec<Value> = state
            .services
            .values()
            .filter(|s| s.name == name)
            .filter(|s| !passing_only || s.checks.iter().all(|c| c.status == "passing"))
            .map(|s| {
                let mut checks = vec![json!({
                    "Node": NODE, "CheckID": "serfHealth", "Name": "Serf Health Status",
                    "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
                    "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
                })];
                checks.extend(s.checks.iter().map(|c| {
                    json!({
                        "Node": NODE, "CheckID": c.id, "Name": c.name, "Status": c.status,
                        "Notes": "", "Output": c.output, "ServiceID": s.id,
                        "ServiceName": s.name, "ServiceTags": s.tags, "Type": "ttl",
                    })
                }));
                json!({
                    "Node": {
                        "ID": "7c5f8a2e-0000-4000-8000-000000000001", "Node": NODE,
                        "Address": NODE_ADDRESS, "Datacenter": DATACENTER,
                        "TaggedAddresses": { "lan": NODE_ADDRESS, "wan": NODE_ADDRESS },
                        "Meta": {},
                    },
                    "Service": {
                        "ID": s.id, "Service": s.name, "Tags": s.tags, "Address": s.address,
                        "Port": s.port, "Meta": {}, "Weights": { "Passing": 1, "Warning": 1 },
                    },
                    "Checks": checks,
                })
            })
            .collect();
        (state.index, Value::Array(entries))
    }

    /// The catalog's services and their tags, as `/v1/catalog/services` gives them.
    fn catalog(&self) -> (u64, Value) {
        let state = self.state.lock().unwrap();
        let mut services: BTreeMap<String, Vec<String>> =
            BTreeMap::from([("consul".to_string(), Vec::new())]);
        for s in state.services.values() {
            let tags = services.entry(s.name.clone()).or_default();
            tags.extend(s.tags.iter().cloned());
            tags.sort();
            tags.dedup();
        }
        (state.index, json!(services))
    }

    /// Registers from the agent API's JSON body.
    fn register_json(&self, body: &[u8]) -> Result<(), (StatusCode, String)> {
        let bad = |m: String| (StatusCode::BAD_REQUEST, m);
        let v: Value =
            serde_json::from_slice(body).map_err(|e| bad(format!("Request decode failed: {e}")))?;
        let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
        let name = text("Name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("Missing service name".into()))?;
        let id = text("ID")
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| name.clone());
        let port = match v.get("Port") {
            None | Some(Value::Null) => 0,
            Some(p) => p
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| bad(format!("Invalid Port {p}")))?,
        };
        let tags = match v.get("Tags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(tags)) => tags
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("Tags must be strings".into()))?,
            Some(_) => return Err(bad("Tags must be a list".into())),
        };
        let mut definitions: Vec<&Value> = Vec::new();
        if let Some(c) = v.get("Check").filter(|c| !c.is_null()) {
            definitions.push(c);
        }
        if let Some(Value::Array(cs)) = v.get("Checks") {
            definitions.extend(cs.iter());
        }
        let numbered = definitions.len() > 1;
        let mut checks = Vec::new();
        for (i, c) in definitions.iter().enumerate() {
            let ttl = c
                .get("TTL")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("this double implements TTL checks only; give TTL".into()))?;
            let ttl = parse_duration(ttl).map_err(|e| bad(format!("Invalid TTL: {e}")))?;
            let status = c
                .get("Status")
                .and_then(Value::as_str)
                .unwrap_or("critical");
            if !matches!(status, "passing" | "warning" | "critical") {
                return Err(bad(format!("Invalid check status {status:?}")));
            }
            let check_id = c
                .get("CheckID")
                .or_else(|| c.get("ID"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| {
                    if numbered {
                        format!("service:{id}:{}", i + 1)
                    } else {
                        format!("service:{id}")
                    }
                });
            let mut check = TtlCheck::new(check_id, &id, status, ttl);
            if let Some(n) = c.get("Name").and_then(Value::as_str) {
                check.name = n.into();
            }
            checks.push(check);
        }
        let mut state = self.state.lock().unwrap();
        state.services.insert(
            id.clone(),
            Instance {
                id,
                name,
                address: text("Address").unwrap_or_default(),
                port,
                tags,
                checks,
            },
        );
        self.bump(&mut state);
        Ok(())
    }
}

/// Accepts connections until aborted; aborting drops the set and so closes every connection.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    let ttl_shared = shared.clone();
    connections.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            ttl_shared.expire_checks();
        }
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                connections.spawn(async move {
                    let tls = shared.tls.clone();
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            // A client that does not trust the certificate ends here.
                            let Ok(stream) = acceptor.accept(stream).await else { return };
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, text: impl Into<String>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(text.into())))
        .unwrap()
}

fn json_reply(index: u64, value: &Value) -> Reply {
    Response::builder()
        .header("content-type", "application/json")
        .header("x-consul-index", index.to_string())
        .header("x-consul-knownleader", "true")
        .header("x-consul-lastcontact", "0")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap()
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Reply {
    let query = parse_query(req.uri().query().unwrap_or(""));
    if let Some(required) = &shared.token {
        let given = req
            .headers()
            .get("x-consul-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| query.get("token").cloned())
            .or_else(|| {
                req.headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_string)
            });
        match given {
            None => return reply(StatusCode::FORBIDDEN, "Permission denied"),
            Some(t) if &t != required => return reply(StatusCode::FORBIDDEN, "ACL not found"),
            Some(_) => {}
        }
    }
    if let Some(dc) = query.get("dc")
        && dc != DATACENTER
    {
        return reply(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::PUT, ["v1", "agent", "service", "register"]) => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return reply(StatusCode::BAD_REQUEST, e.to_string()),
            };
            match shared.register_json(&body) {
                Ok(()) => reply(StatusCode::OK, ""),
                Err((status, m)) => reply(status, m),
            }
        }
        (Method::PUT, ["v1", "agent", "service", "deregister", id]) => {
            let id = decode(id);
            let mut state = shared.state.lock().unwrap();
            if state.services.remove(&id).is_none() {
                return reply(StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}"));
            }
            shared.bump(&mut state);
            reply(StatusCode::OK, "")
        }
        (
            Method::PUT,
            [
                "v1",
                "agent",
                "check",
                verb @ ("pass" | "warn" | "fail"),
                id,
            ],
        ) => {
            let status = match *verb {
                "pass" => "passing",
                "warn" => "warning",
                _ => "critical",
            };
            let note = query.get("note").cloned().unwrap_or_default();
            match shared.update_check(&decode(id), status, &note) {
                Ok(()) => reply(StatusCode::OK, ""),
                Err(m) => reply(StatusCode::NOT_FOUND, m),
            }
        }
        (Method::GET, ["v1", "health", "service", name]) => {
            shared.health_queries.fetch_add(1, Ordering::Relaxed);
            if let Err(r) = block(shared, &query).await {
                return r;
            }
            let passing = query
                .get("passing")
                .is_some_and(|v| !matches!(v.as_str(), "false" | "0"));
            let (index, entries) = shared.health(&decode(name), passing);
            json_reply(index, &entries)
        }
        (Method::GET, ["v1", "catalog", "services"]) => {
            shared.catalog_queries.fetch_add(1, Ordering::Relaxed);
            if let Err(r) = block(shared, &query).await {
                return r;
            }
            let (index, services) = shared.catalog();
            json_reply(index, &services)
        }
        (Method::GET, ["v1", "status", "leader"]) => {
            let index = shared.state.lock().unwrap().index;
            json_reply(index, &json!("127.0.0.1:8300"))
        }
        (_, ["v1", "agent", ..] | ["v1", "health", ..] | ["v1", "catalog", ..]) => {
            reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => reply(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// Holds a blocking query until the index moves past `index` or `wait` runs out.
async fn block(shared: &Shared, query: &BTreeMap<String, String>) -> Result<(), Reply> {
    let index = match query.get("index") {
        None => return Ok(()),
        Some(i) => i
            .parse::<u64>()
            .map_err(|_| reply(StatusCode::BAD_REQUEST, "Invalid index"))?,
    };
    if index == 0 {
        return Ok(());
    }
    let wait = match query.get("wait") {
        None => DEFAULT_WAIT,
        Some(w) => parse_duration(w)
            .map_err(|_| reply(StatusCode::BAD_REQUEST, "Invalid wait time"))?
            .min(MAX_WAIT),
    };
    let mut changes = shared.index.subscribe();
    let _ = tokio::time::timeout(wait, changes.wait_for(|i| *i > index)).await;
    Ok(())
}

/// Go's duration syntax, as Consul reads `wait` and `TTL`: `10s`, `5m`, `1m30s`, `1.5s`,
/// `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration {s:?}"))?;
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => return Err(format!("unknown unit {u:?} in duration {s:?}")),
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
