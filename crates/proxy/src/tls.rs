//! TLS on listeners: termination with rustls, certificates chosen by SNI and reloaded when
//! their files change, and the SNI of a ClientHello read without terminating (passthrough on
//! TCP listeners). Also the client certificates that services show their endpoints
//! ([`ClientCert`]), reloaded the same way.
//!
//! A [`Terminator`] is one listener's TLS: its rustls settings (versions, ALPN) and a
//! [`Resolver`] that holds the loaded certificates in an `ArcSwap`. A handshake reads that
//! pointer and two hash maps; it takes no lock. Sessions resume by ticket only
//! ([`crate::tickets`], whose keys take no lock either); rustls' session cache, which would
//! serve session IDs, takes a lock per use and stays off.
//!
//! Certificates (and ticket key files, when the listener lists some) are loaded when a
//! configuration is applied, and a file that cannot be used rejects the configuration. After
//! that a watcher polls the files' metadata every [`POLL_EVERY`] and loads a changed pair (or
//! the changed set of key files) once it has stayed the same for one poll (so that a
//! certificate and key written one after the other are not read half-way). What fails to
//! load is logged and what was loaded before stays in use. Polling rather than inotify: it
//! sees every way a file is replaced (written in place, renamed over, a Kubernetes secret
//! volume's symlink swap, network file systems where inotify stays silent) for one `stat`
//! call per file per second.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use drover_model::{CertificateFiles, ListenerSpec, ListenerTls, Protocol, TlsVersion};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{NamedGroup, ServerConfig, SignatureScheme, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::tickets::{Tickets, read_key_files};

/// How often the certificate files are checked for changes.
pub(crate) const POLL_EVERY: Duration = Duration::from_secs(1);

/// One listener's TLS termination.
pub(crate) struct Terminator {
    pub acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
    /// What it was made from: a listener whose settings are the same keeps it.
    listener: String,
    protocol: Protocol,
    spec: ListenerTls,
    /// The files' metadata when they were loaded.
    stamps: Vec<PairStamp>,
    /// The session ticket keys, when they come from files (`tls.session_ticket_keys`), and
    /// those files' metadata when they were read.
    key_files: Option<(Arc<Tickets>, Vec<Option<Stamp>>)>,
    /// Stops the watcher when the listener no longer uses this terminator.
    stop: CancellationToken,
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Terminator {
    /// Loads the certificates of a listener with `tls` set. The error names the listener, the
    /// file and what is wrong with it.
    pub(crate) fn load(spec: &ListenerSpec, tls: &ListenerTls) -> Result<Self, String> {
        let mut entries = Vec::with_capacity(tls.certificates.len());
        let mut stamps = Vec::with_capacity(tls.certificates.len());
        for (i, files) in tls.certificates.iter().enumerate() {
            stamps.push(PairStamp::of(files));
            let entry = load_pair(files)
                .map_err(|e| format!("listener {}: tls.certificates[{i}]: {e}", spec.name))?;
            entries.push(entry);
        }
        let resolver = Arc::new(Resolver {
            set: ArcSwap::from_pointee(CertSet::new(entries)),
        });
        let versions: &[&SupportedProtocolVersion] = match tls.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| format!("listener {}: TLS settings: {e}", spec.name))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = match (spec.protocol, tls.http2) {
            (Protocol::Http, true) => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            (Protocol::Http, false) => vec![b"http/1.1".to_vec()],
            // A TCP listener does not know what it carries.
            (Protocol::Tcp, _) => Vec::new(),
        };
        config.session_storage = Arc::new(NoServerSessionStorage {});
        let mut key_files = None;
        if !tls.session_tickets {
            config.send_tls13_tickets = 0;
        } else if tls.session_ticket_keys.is_empty() {
            let tickets = Tickets::new().ok_or_else(|| {
                format!(
                    "listener {}: cannot make a session ticket key: the system's random source failed",
                    spec.name
                )
            })?;
            config.ticketer = Arc::new(tickets);
        } else {
            let stamps = tls
                .session_ticket_keys
                .iter()
                .map(|p| Stamp::of(p))
                .collect();
            let keys = read_key_files(&tls.session_ticket_keys)
                .map_err(|e| format!("listener {}: {e}", spec.name))?;
            let tickets = Arc::new(Tickets::from_files(keys));
            config.ticketer = tickets.clone();
            key_files = Some((tickets, stamps));
        }
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            listener: spec.name.clone(),
            protocol: spec.protocol,
            spec: tls.clone(),
            stamps,
            key_files,
            stop: CancellationToken::new(),
        })
    }

    /// Whether this terminator is what `spec` asks for, so that it can stay.
    pub(crate) fn serves(&self, spec: &ListenerSpec) -> bool {
        spec.tls.as_ref() == Some(&self.spec)
            && spec.protocol == self.protocol
            && spec.name == self.listener
    }

    /// Starts reloading the certificates when their files change, until this terminator is
    /// dropped or `shutdown` is cancelled.
    pub(crate) fn watch(&self, shutdown: &CancellationToken) {
        let watcher = Watcher {
            resolver: self.resolver.clone(),
            listener: self.listener.clone(),
            files: self.spec.certificates.clone(),
            pairs: self.stamps.iter().copied().map(Settling::new).collect(),
            keys: self.key_files.as_ref().map(|(tickets, stamps)| KeyFiles {
                tickets: tickets.clone(),
                files: self.spec.session_ticket_keys.clone(),
                stamps: Settling::new(stamps.clone()),
            }),
        };
        spawn_until(watcher.run(), &self.stop, shutdown);
    }
}

/// Chooses the certificate for a handshake by its SNI.
#[derive(Debug)]
pub(crate) struct Resolver {
    set: ArcSwap<CertSet>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.set.load();
        let index = hello.server_name().and_then(|n| set.find(n)).unwrap_or(0);
        set.entries.get(index).map(|e| e.key.clone())
    }
}

/// The loaded certificates of one listener, and which serves which name.
struct CertSet {
    entries: Vec<Entry>,
    /// Exact DNS name → index of the first certificate that has it.
    exact: HashMap<String, usize>,
    /// `example.com` for a certificate with `*.example.com` → its index.
    wildcard: HashMap<String, usize>,
}

impl fmt::Debug for CertSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| &e.names))
            .finish()
    }
}

/// One certificate chain with its key, and the DNS names of its leaf.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) key: Arc<CertifiedKey>,
    names: Vec<String>,
}

impl CertSet {
    fn new(entries: Vec<Entry>) -> Self {
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for (i, e) in entries.iter().enumerate() {
            for name in &e.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        Self {
            entries,
            exact,
            wildcard,
        }
    }

    /// The certificate for `name`: one that names it exactly, else one whose wildcard covers
    /// its first label (`*.example.com` covers `a.example.com`, not `a.b.example.com`).
    fn find(&self, name: &str) -> Option<usize> {
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if let Some(i) = self.exact.get(name) {
            return Some(*i);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).copied()
    }
}

/// Reads and checks one certificate chain and its key.
pub(crate) fn load_pair(files: &CertificateFiles) -> Result<Entry, String> {
    let cert_path = files.cert.display();
    let key_path = files.key.display();
    let cert_pem = read(&files.cert).map_err(|e| format!("cert {cert_path}: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert {cert_path}: not a valid PEM file: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "cert {cert_path}: no certificate in it; expected PEM blocks \"-----BEGIN CERTIFICATE-----\", the leaf first, then its intermediates"
        ));
    };
    let names = dns_names(leaf).ok_or_else(|| {
        format!("cert {cert_path}: the first certificate is not a valid X.509 certificate")
    })?;
    let key_pem = read(&files.key).map_err(|e| format!("key {key_path}: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "key {key_path}: no private key in it ({e}); expected a PEM \"PRIVATE KEY\" (PKCS#8), \"RSA PRIVATE KEY\" (PKCS#1) or \"EC PRIVATE KEY\" (SEC1) block"
        )
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("key {key_path}: not a usable private key: {e}"))?;
    let key = CertifiedKey::new(chain, signer);
    match key.keys_match() {
        Ok(()) => {}
        // The key cannot tell its public half; the handshake will show.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(format!(
                "key {key_path} does not match the certificate in {cert_path}"
            ));
        }
    }
    Ok(Entry {
        key: Arc::new(key),
        names,
    })
}

pub(crate) fn read(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => io::Error::new(e.kind(), "no such file"),
        _ => e,
    })
}

/// The DNS names in a certificate's subject alternative names, lowercase; None when the DER
/// does not parse as a certificate.
fn dns_names(cert: &CertificateDer<'_>) -> Option<Vec<String>> {
    let (tag, certificate, _) = der(cert.as_ref())?;
    if tag != 0x30 {
        return None;
    }
    let (tag, mut tbs, _) = der(certificate)?;
    if tag != 0x30 {
        return None;
    }
    let mut names = Vec::new();
    while !tbs.is_empty() {
        let (tag, value, rest) = der(tbs)?;
        tbs = rest;
        // [3] EXPLICIT Extensions.
        if tag != 0xa3 {
            continue;
        }
        let (_, mut extensions, _) = der(value)?;
        while !extensions.is_empty() {
            let (_, mut extension, rest) = der(extensions)?;
            extensions = rest;
            let (_, oid, rest) = der(extension)?;
            extension = rest;
            // 2.5.29.17, subjectAltName.
            if oid != [0x55, 0x1d, 0x11] {
                continue;
            }
            let (mut tag, mut value, rest) = der(extension)?;
            if tag == 0x01 {
                // The critical flag.
                (tag, value, _) = der(rest)?;
            }
            if tag != 0x04 {
                return None;
            }
            let (_, mut general_names, _) = der(value)?;
            while !general_names.is_empty() {
                let (tag, name, rest) = der(general_names)?;
                general_names = rest;
                // [2] IMPLICIT IA5String dNSName.
                if tag == 0x82
                    && let Ok(name) = std::str::from_utf8(name)
                {
                    names.push(name.to_ascii_lowercase());
                }
            }
        }
    }
    Some(names)
}

/// One DER element: its tag, its contents and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, b| (l << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// What a file's metadata says about its contents: when it was written, its size and its
/// inode (which a rename over it changes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    /// None when the file cannot be read. Follows symbolic links, so a swapped link target
    /// counts as a change.
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PairStamp([Option<Stamp>; 2]);

impl PairStamp {
    fn of(files: &CertificateFiles) -> Self {
        Self([Stamp::of(&files.cert), Stamp::of(&files.key)])
    }
}

/// Tells when watched files have changed and then stayed the same for one poll, so that files
/// written one after the other (a certificate, then its key) are not read half-way.
struct Settling<T> {
    /// The stamps of the files in force (or that last failed to load).
    loaded: T,
    /// The stamps seen at the poll before.
    previous: T,
}

impl<T: Clone + PartialEq> Settling<T> {
    fn new(loaded: T) -> Self {
        Self {
            previous: loaded.clone(),
            loaded,
        }
    }

    /// Takes one poll's stamps. True when they differ from those loaded and are the same as
    /// one poll ago: the writer is done, and the files are to be loaded (they count as loaded
    /// from here, so that a load that fails is not tried again until they change again).
    fn settled(&mut self, seen: T) -> bool {
        let settled = seen != self.loaded && seen == self.previous;
        if settled {
            self.loaded = seen.clone();
        }
        self.previous = seen;
        settled
    }
}

/// Ticks every [`POLL_EVERY`], the first tick one poll from now.
async fn polls() -> tokio::time::Interval {
    let mut every = tokio::time::interval(POLL_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    every
}

/// Reloads one listener's certificates, and its session ticket key files, when their files
/// change.
struct Watcher {
    resolver: Arc<Resolver>,
    listener: String,
    files: Vec<CertificateFiles>,
    pairs: Vec<Settling<PairStamp>>,
    keys: Option<KeyFiles>,
}

/// A listener's session ticket key files: read again together when any of them changes,
/// since the first seals and the order matters.
struct KeyFiles {
    tickets: Arc<Tickets>,
    files: Vec<PathBuf>,
    stamps: Settling<Vec<Option<Stamp>>>,
}

impl Watcher {
    async fn run(mut self) {
        let mut every = polls().await;
        loop {
            every.tick().await;
            let files = self.files.clone();
            let key_files = self.keys.as_ref().map(|k| k.files.clone());
            let Ok((pairs, keys)) = tokio::task::spawn_blocking(move || {
                let pairs = files.iter().map(PairStamp::of).collect::<Vec<_>>();
                let keys = key_files.map(|f| f.iter().map(|p| Stamp::of(p)).collect::<Vec<_>>());
                (pairs, keys)
            })
            .await
            else {
                continue;
            };
            for (i, seen) in pairs.into_iter().enumerate() {
                if self.pairs[i].settled(seen) {
                    self.reload(i).await;
                }
            }
            if let (Some(k), Some(seen)) = (self.keys.as_mut(), keys)
                && k.stamps.settled(seen)
            {
                k.reload(&self.listener).await;
            }
        }
    }

    async fn reload(&self, i: usize) {
        let files = self.files[i].clone();
        let loaded = tokio::task::spawn_blocking(move || load_pair(&files)).await;
        let files = &self.files[i];
        match loaded {
            Ok(Ok(entry)) => {
                let old = self.resolver.set.load_full();
                let mut entries = old.entries.clone();
                let names = entry.names.join(", ");
                entries[i] = entry;
                self.resolver.set.store(Arc::new(CertSet::new(entries)));
                tracing::info!(
                    listener = %self.listener,
                    "reloaded certificate {} ({names}) and key {}; new handshakes use it",
                    files.cert.display(),
                    files.key.display()
                );
            }
            Ok(Err(e)) => tracing::error!(
                listener = %self.listener,
                "cannot reload tls.certificates[{i}]: {e}; the certificate loaded before keeps serving"
            ),
            Err(e) => tracing::error!(listener = %self.listener, "certificate reload failed: {e}"),
        }
    }
}

impl KeyFiles {
    async fn reload(&self, listener: &str) {
        let files = self.files.clone();
        match tokio::task::spawn_blocking(move || read_key_files(&files)).await {
            Ok(Ok(keys)) => {
                self.tickets.replace(keys);
                let names: Vec<String> =
                    self.files.iter().map(|f| f.display().to_string()).collect();
                tracing::info!(
                    listener,
                    "reloaded session ticket keys {}; new tickets are sealed with the first",
                    names.join(", ")
                );
            }
            Ok(Err(e)) => tracing::error!(
                listener,
                "cannot reload {e}; the session ticket keys loaded before stay in use"
            ),
            Err(e) => tracing::error!(listener, "session ticket key reload failed: {e}"),
        }
    }
}

/// Runs `task` until it ends or `stop` or `shutdown` is cancelled.
fn spawn_until(
    task: impl Future<Output = ()> + Send + 'static,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) {
    let (stop, shutdown) = (stop.clone(), shutdown.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = task => {}
            _ = stop.cancelled() => {}
            _ = shutdown.cancelled() => {}
        }
    });
}

/// drover's client certificate for a service's endpoints (the service's `tls.cert` and
/// `tls.key`), shown to those that ask for one. Its files are polled as a listener's
/// certificates are, and a changed pair is loaded for the connections opened after it (with
/// the sessions to resume forgotten); connections already open keep the certificate they
/// were opened with.
pub(crate) struct ClientCert {
    resolver: Arc<ClientCertResolver>,
    sessions: Arc<Sessions>,
    service: String,
    files: CertificateFiles,
    /// The files' metadata when they were loaded.
    stamp: PairStamp,
    /// Whether its watcher runs: a service keeps its connector, and so this, across
    /// configurations that do not change its TLS settings.
    watched: AtomicBool,
    /// Stops the watcher when no service uses this certificate any more.
    stop: CancellationToken,
}

impl Drop for ClientCert {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ClientCert {
    /// Loads a service's client certificate. The error names the service and the file and
    /// says what is wrong with it.
    pub(crate) fn load(service: &str, files: &CertificateFiles) -> Result<Self, String> {
        let stamp = PairStamp::of(files);
        let entry = load_pair(files).map_err(|e| client_cert_error(service, &e))?;
        Ok(Self {
            resolver: Arc::new(ClientCertResolver(ArcSwap::new(entry.key))),
            sessions: Arc::new(Sessions::new()),
            service: service.to_string(),
            files: files.clone(),
            stamp,
            watched: AtomicBool::new(false),
            stop: CancellationToken::new(),
        })
    }

    /// What a rustls client config shows the endpoints.
    pub(crate) fn resolver(&self) -> Arc<dyn ResolvesClientCert> {
        self.resolver.clone()
    }

    /// Where a rustls client config keeps the sessions it may resume: forgotten when the
    /// certificate is reloaded.
    pub(crate) fn sessions(&self) -> Arc<dyn ClientSessionStore> {
        self.sessions.clone()
    }

    /// Starts reloading the certificate when its files change, unless that has started
    /// already; until this is dropped or `shutdown` is cancelled.
    pub(crate) fn watch(&self, shutdown: &CancellationToken) {
        if self.watched.swap(true, Ordering::Relaxed) {
            return;
        }
        let task = keep_current(
            self.resolver.clone(),
            self.sessions.clone(),
            self.service.clone(),
            self.files.clone(),
            Settling::new(self.stamp),
        );
        spawn_until(task, &self.stop, shutdown);
    }
}

fn client_cert_error(service: &str, e: &str) -> String {
    format!("service {service}: its client certificate, tls.{e}")
}

/// Polls a client certificate's files; when they have changed, loads them into `resolver`
/// and forgets the `sessions` made with the certificate before.
async fn keep_current(
    resolver: Arc<ClientCertResolver>,
    sessions: Arc<Sessions>,
    service: String,
    files: CertificateFiles,
    mut stamps: Settling<PairStamp>,
) {
    let mut every = polls().await;
    loop {
        every.tick().await;
        let watched = files.clone();
        let Ok(seen) = tokio::task::spawn_blocking(move || PairStamp::of(&watched)).await else {
            continue;
        };
        if !stamps.settled(seen) {
            continue;
        }
        let watched = files.clone();
        match tokio::task::spawn_blocking(move || load_pair(&watched)).await {
            Ok(Ok(entry)) => {
                resolver.0.store(entry.key);
                sessions.forget();
                tracing::info!(
                    service = %service,
                    "reloaded client certificate {} and key {}; new connections to the endpoints show it",
                    files.cert.display(),
                    files.key.display()
                );
            }
            Ok(Err(e)) => tracing::error!(
                service = %service,
                "cannot reload {}; the client certificate loaded before stays in use",
                client_cert_error(&service, &e)
            ),
            Err(e) => tracing::error!(service = %service, "client certificate reload failed: {e}"),
        }
    }
}

/// The TLS sessions that a service's connections may resume. A resumed session keeps the
/// client identity of the handshake it came from, so once the client certificate is
/// reloaded they are forgotten: resuming one would show the endpoint the old certificate.
/// (A handshake under way at the reload may still leave one from the old certificate.)
#[derive(Debug)]
struct Sessions(ArcSwap<ClientSessionMemoryCache>);

/// How many endpoints' sessions a service keeps (rustls' default).
const SESSIONS: usize = 256;

impl Sessions {
    fn new() -> Self {
        Self(ArcSwap::from_pointee(ClientSessionMemoryCache::new(
            SESSIONS,
        )))
    }

    fn forget(&self) {
        self.0
            .store(Arc::new(ClientSessionMemoryCache::new(SESSIONS)));
    }
}

impl ClientSessionStore for Sessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.0.load().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.0.load().kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.0.load().set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.0.load().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.0.load().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.0.load().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.0.load().take_tls13_ticket(server_name)
    }
}

/// Hands rustls the client certificate in force.
#[derive(Debug)]
struct ClientCertResolver(ArcSwap<CertifiedKey>);

impl ResolvesClientCert for ClientCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // As rustls' own single-certificate resolver: none if the endpoint takes none of the
        // key's signature schemes.
        let key = self.0.load_full();
        key.key.choose_scheme(sigschemes).is_some().then_some(key)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Why a ClientHello's SNI could not be read yet.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// The bytes are not a TLS ClientHello (or one too large to route).
    NotTls,
}

/// The most ClientHello bytes buffered to find the SNI: post-quantum key shares make hellos
/// of 2 KB and more; 16 KiB leaves room for large extensions.
const MAX_HELLO: usize = 16 * 1024;

/// Reads from `stream` until the first ClientHello is whole, and returns the bytes read with
/// the server name it asks for (None when it sends none, or the bytes are not TLS). The bytes
/// are to be sent on unchanged.
pub(crate) async fn read_sni<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<(Vec<u8>, Option<String>)> {
    let mut buf = Vec::with_capacity(2048);
    loop {
        match client_hello_sni(&buf) {
            Ok(name) => return Ok((buf, name)),
            Err(Hello::NotTls) => return Ok((buf, None)),
            Err(Hello::Incomplete) => {}
        }
        buf.reserve(2048);
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok((buf, None));
        }
    }
}

/// The server name in the ClientHello at the start of `buf`: the handshake message is
/// gathered from as many TLS records as it spans.
pub(crate) fn client_hello_sni(buf: &[u8]) -> Result<Option<String>, Hello> {
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Err(Hello::Incomplete);
        }
        // A handshake record of TLS 1.0 or later (ClientHellos say 3.1 for compatibility).
        if rest[0] != 0x16 || rest[1] != 3 {
            return Err(Hello::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if rest.len() < 5 + len {
            return if buf.len() >= MAX_HELLO {
                Err(Hello::NotTls)
            } else {
                Err(Hello::Incomplete)
            };
        }
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                return Err(Hello::NotTls);
            }
            let body_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if body_len > MAX_HELLO {
                return Err(Hello::NotTls);
            }
            if handshake.len() >= 4 + body_len {
                return Ok(hello_server_name(&handshake[4..4 + body_len]));
            }
        }
    }
}

/// The host name of a ClientHello body's server_name extension.
fn hello_server_name(body: &[u8]) -> Option<String> {
    fn take(b: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
        (b.len() >= n).then(|| b.split_at(n))
    }
    fn vec8(b: &[u8]) -> Option<(&[u8], &[u8])> {
        let (&n, b) = b.split_first()?;
        take(b, usize::from(n))
    }
    fn vec16(b: &[u8]) -> Option<(&[u8], &[u8])> {
        let (n, b) = take(b, 2)?;
        take(b, usize::from(u16::from_be_bytes([n[0], n[1]])))
    }
    // Version and random.
    let (_, b) = take(body, 2 + 32)?;
    let (_, b) = vec8(b)?; // session id
    let (_, b) = vec16(b)?; // cipher suites
    let (_, b) = vec8(b)?; // compression methods
    let (mut extensions, _) = vec16(b)?;
    while !extensions.is_empty() {
        let (kind, rest) = take(extensions, 2)?;
        let (data, rest) = vec16(rest)?;
        extensions = rest;
        if kind != [0, 0] {
            continue;
        }
        let (mut list, _) = vec16(data)?;
        while !list.is_empty() {
            let (&name_type, rest) = list.split_first()?;
            let (name, rest) = vec16(rest)?;
            list = rest;
            if name_type == 0 {
                let ok = !name.is_empty()
                    && name
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
                if !ok {
                    return None;
                }
                let name = std::str::from_utf8(name).ok()?.to_ascii_lowercase();
                return Some(name.trim_end_matches('.').to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_loaded_once_they_have_stayed_the_same_for_one_poll() {
        let mut stamps = Settling::new(1);
        assert!(!stamps.settled(1), "unchanged");
        assert!(
            !stamps.settled(2),
            "changed at this poll: maybe still being written"
        );
        assert!(!stamps.settled(3), "changed again");
        assert!(stamps.settled(3), "the same as one poll ago");
        assert!(!stamps.settled(3), "loaded (or failed to load): not again");
        assert!(!stamps.settled(1), "changed back");
        assert!(stamps.settled(1));
    }

    /// A ClientHello as rustls writes it, for `name`.
    fn hello(name: Option<&str>) -> Vec<u8> {
        #[derive(Debug)]
        struct AnyCert;
        impl rustls::client::danger::ServerCertVerifier for AnyCert {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms
                    .supported_schemes()
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth();
        config.enable_sni = name.is_some();
        let server = rustls::pki_types::ServerName::try_from(name.unwrap_or("x.test"))
            .unwrap()
            .to_owned();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn the_server_name_is_read_from_a_client_hello() {
        let bytes = hello(Some("API.example.com"));
        assert_eq!(
            client_hello_sni(&bytes),
            Ok(Some("api.example.com".to_string()))
        );
        for cut in [0, 3, 5, 40, bytes.len() - 1] {
            assert_eq!(client_hello_sni(&bytes[..cut]), Err(Hello::Incomplete));
        }
        assert_eq!(client_hello_sni(&hello(None)), Ok(None));
        assert_eq!(
            client_hello_sni(b"GET / HTTP/1.1\r\n\r\n"),
            Err(Hello::NotTls)
        );
    }

    #[test]
    fn a_hello_split_over_two_records_is_gathered() {
        let bytes = hello(Some("a.example.com"));
        let body = &bytes[5..];
        let (one, two) = body.split_at(50);
        let mut split = Vec::new();
        for part in [one, two] {
            split.extend_from_slice(&[0x16, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            client_hello_sni(&split),
            Ok(Some("a.example.com".to_string()))
        );
    }

    #[test]
    fn names_choose_exact_first_then_one_wildcard_label() {
        let entry = |names: &[&str]| {
            let key = unused_key();
            Entry {
                key,
                names: names.iter().map(|n| n.to_string()).collect(),
            }
        };
        let set = CertSet::new(vec![
            entry(&["default.test"]),
            entry(&["*.example.com"]),
            entry(&["api.example.com", "example.com"]),
        ]);
        assert_eq!(set.find("api.example.com"), Some(2));
        assert_eq!(set.find("API.Example.com."), Some(2));
        assert_eq!(set.find("www.example.com"), Some(1));
        assert_eq!(set.find("a.b.example.com"), None);
        assert_eq!(set.find("example.com"), Some(2));
        assert_eq!(set.find("other.test"), None);
    }

    /// A CertifiedKey that is never used to sign.
    fn unused_key() -> Arc<CertifiedKey> {
        #[derive(Debug)]
        struct NoKey;
        impl rustls::sign::SigningKey for NoKey {
            fn choose_scheme(
                &self,
                _: &[rustls::SignatureScheme],
            ) -> Option<Box<dyn rustls::sign::Signer>> {
                None
            }
            fn algorithm(&self) -> rustls::SignatureAlgorithm {
                rustls::SignatureAlgorithm::ECDSA
            }
        }
        Arc::new(CertifiedKey::new(Vec::new(), Arc::new(NoKey)))
    }

    #[test]
    fn der_lengths_are_read_in_short_and_long_form() {
        assert_eq!(
            der(&[0x04, 2, 9, 9, 1]),
            Some((4, &[9u8, 9][..], &[1u8][..]))
        );
        let mut long = vec![0x30, 0x81, 200];
        long.extend_from_slice(&[0; 200]);
        assert_eq!(
            der(&long).map(|(t, v, r)| (t, v.len(), r.len())),
            Some((0x30, 200, 0))
        );
        assert_eq!(der(&[0x30, 5, 1]), None);
    }
}
