//! The TLS settings of a client of drover's (a service's connections to its endpoints, the
//! Consul source's to Consul) whose CA bundle and client certificate are reloaded when their
//! files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use drover_model::CertificateFiles;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Tls12ClientSessionValue,
    Tls13ClientSessionValue, WebPkiServerVerifier,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, NamedGroup, RootCertStore,
    SignatureScheme,
};
use tokio_util::sync::CancellationToken;

use crate::{PairStamp, Settling, Stamp, certificates, load_pair, load_roots, polls, spawn_until};

/// Who a client's TLS settings are for, as the messages about them name it.
#[derive(Clone, Debug)]
pub struct Holder {
    /// What messages start with: `service web`, `Consul`.
    pub name: String,
    /// What precedes `ca`, `cert` and `key` in the names of the settings that give the
    /// files: `tls.` for a service (`tls.cert`), `--consul-` for the Consul source.
    pub settings: &'static str,
    /// Whom it connects to: `its endpoints`, `Consul`.
    pub peer: &'static str,
}

impl Holder {
    /// What is wrong with the files of its `what` (`CA bundle`, `client certificate`), as
    /// [`load_roots`] or [`load_pair`] said it.
    fn error(&self, what: &str, e: &str) -> String {
        format!("{}: its {what}, {}{e}", self.name, self.settings)
    }
}

/// What the peer's certificate must chain to.
pub enum Roots {
    /// A PEM bundle of CA certificates, reloaded when the file changes.
    File(PathBuf),
    /// Roots that do not change while drover runs (the system's).
    Fixed(Arc<RootCertStore>),
}

/// A client's TLS settings: a rustls config (ring; TLS 1.2 and 1.3) that verifies the peer
/// against [`Roots`] and shows a client certificate to a peer that asks for one, if it was
/// given one. A CA bundle file and the client certificate's files are polled as a listener's
/// certificates are; what changed is loaded for the connections opened after it, and the
/// sessions to resume are forgotten (they carry the trust and the identity of their first
/// handshake). Connections already open keep what they were opened with.
pub struct ClientTls {
    /// What its watcher keeps current, with the files' metadata when they were loaded.
    watch: Watch,
    /// How many CA certificates the bundle held when it was loaded; None for fixed roots.
    cas: Option<usize>,
    /// Whether its watcher runs: a service keeps its connector, and so this, across
    /// configurations that do not change its TLS settings.
    watched: AtomicBool,
    /// Stops the watcher when nothing uses these settings any more.
    stop: CancellationToken,
}

impl Drop for ClientTls {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ClientTls {
    /// Loads the CA bundle (if the roots are a file) and the client certificate (if given),
    /// and builds the rustls config that uses them; the caller sets its ALPN protocols. The
    /// error names the holder, the setting and the file, and says what is wrong with it.
    pub fn new(
        holder: Holder,
        roots: Roots,
        client: Option<&CertificateFiles>,
    ) -> Result<(Self, ClientConfig), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{}: cannot set up TLS to {}: {e}", holder.name, holder.peer))?;
        let (builder, trust, cas) = match roots {
            Roots::Fixed(roots) => (builder.with_root_certificates(roots), None, None),
            Roots::File(path) => {
                let stamp = Stamp::of(&path);
                let roots = load_roots(&path).map_err(|e| holder.error("CA bundle", &e))?;
                let cas = roots.len();
                let verifier = Arc::new(Trust(ArcSwap::new(
                    verifier(roots, &provider, &path).map_err(|e| holder.error("CA bundle", &e))?,
                )));
                let builder = builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier.clone());
                (
                    builder,
                    Some((verifier, path, Settling::new(stamp))),
                    Some(cas),
                )
            }
        };
        let sessions = Arc::new(Sessions::new());
        let (mut config, cert) = match client {
            None => (builder.with_no_client_auth(), None),
            Some(files) => {
                let stamp = PairStamp::of(files);
                let entry = load_pair(files).map_err(|e| holder.error("client certificate", &e))?;
                let resolver = Arc::new(ClientCertResolver(ArcSwap::new(entry.key)));
                let config = builder.with_client_cert_resolver(resolver.clone());
                (
                    config,
                    Some((resolver, files.clone(), Settling::new(stamp))),
                )
            }
        };
        config.resumption = rustls::client::Resumption::store(sessions.clone());
        let watch = Watch {
            trust,
            cert,
            sessions,
            holder,
            provider,
        };
        let tls = Self {
            watch,
            cas,
            watched: AtomicBool::new(false),
            stop: CancellationToken::new(),
        };
        Ok((tls, config))
    }

    /// How many CA certificates the bundle held when it was loaded; None for fixed roots.
    pub fn cas(&self) -> Option<usize> {
        self.cas
    }

    /// Starts reloading the CA bundle and the client certificate when their files change,
    /// unless that has started already or there are no such files; until this is dropped or
    /// `shutdown` is cancelled.
    pub fn watch(&self, shutdown: &CancellationToken) {
        if self.watched.swap(true, Ordering::Relaxed) {
            return;
        }
        if self.watch.trust.is_some() || self.watch.cert.is_some() {
            spawn_until(self.watch.clone().run(), &self.stop, shutdown);
        }
    }
}

/// A WebPKI verifier over `roots`, read from `path`. Its error starts as those of
/// [`load_roots`] do (`ca FILE: `).
fn verifier(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
    path: &Path,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("ca {}: cannot verify with it: {e}", path.display()))
}

/// What a client's watcher keeps current.
#[derive(Clone)]
struct Watch {
    trust: Option<(Arc<Trust>, PathBuf, Settling<Option<Stamp>>)>,
    cert: Option<(
        Arc<ClientCertResolver>,
        CertificateFiles,
        Settling<PairStamp>,
    )>,
    sessions: Arc<Sessions>,
    holder: Holder,
    provider: Arc<CryptoProvider>,
}

impl Watch {
    /// Polls the files; loads what has changed and forgets the sessions made before.
    async fn run(mut self) {
        let mut every = polls().await;
        loop {
            every.tick().await;
            let ca = self.trust.as_ref().map(|(_, path, _)| path.clone());
            let pair = self.cert.as_ref().map(|(_, files, _)| files.clone());
            let Ok((ca, pair)) = tokio::task::spawn_blocking(move || {
                (
                    ca.map(|path| Stamp::of(&path)),
                    pair.map(|files| PairStamp::of(&files)),
                )
            })
            .await
            else {
                continue;
            };
            if let (Some((_, _, stamps)), Some(seen)) = (self.trust.as_mut(), ca)
                && stamps.settled(seen)
            {
                self.reload_ca().await;
            }
            if let (Some((_, _, stamps)), Some(seen)) = (self.cert.as_mut(), pair)
                && stamps.settled(seen)
            {
                self.reload_cert().await;
            }
        }
    }

    async fn reload_ca(&self) {
        let Some((trust, path, _)) = &self.trust else {
            return;
        };
        let (file, provider) = (path.clone(), self.provider.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            let roots = load_roots(&file)?;
            let cas = roots.len();
            Ok::<_, String>((verifier(roots, &provider, &file)?, cas))
        })
        .await;
        let holder = &self.holder;
        match loaded {
            Ok(Ok((verifier, cas))) => {
                trust.0.store(verifier);
                self.sessions.forget();
                tracing::info!(
                    "{}: reloaded CA bundle {} ({}); new connections to {} are verified against it",
                    holder.name,
                    path.display(),
                    certificates(cas),
                    holder.peer
                );
            }
            Ok(Err(e)) => tracing::error!(
                "cannot reload {}; the CA bundle loaded before stays in use",
                holder.error("CA bundle", &e)
            ),
            Err(e) => tracing::error!("{}: CA bundle reload failed: {e}", holder.name),
        }
    }

    async fn reload_cert(&self) {
        let Some((resolver, files, _)) = &self.cert else {
            return;
        };
        let watched = files.clone();
        let loaded = tokio::task::spawn_blocking(move || load_pair(&watched)).await;
        let holder = &self.holder;
        match loaded {
            Ok(Ok(entry)) => {
                resolver.0.store(entry.key);
                self.sessions.forget();
                tracing::info!(
                    "{}: reloaded client certificate {} and key {}; new connections to {} show it",
                    holder.name,
                    files.cert.display(),
                    files.key.display(),
                    holder.peer
                );
            }
            Ok(Err(e)) => tracing::error!(
                "cannot reload {}; the client certificate loaded before stays in use",
                holder.error("client certificate", &e)
            ),
            Err(e) => tracing::error!("{}: client certificate reload failed: {e}", holder.name),
        }
    }
}

/// Verifies the peer's certificate against the CA bundle in force.
#[derive(Debug)]
struct Trust(ArcSwap<WebPkiServerVerifier>);

impl ServerCertVerifier for Trust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .load()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.load().supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        // The hints of one bundle cannot be lent out past a reload.
        None
    }
}

/// The TLS sessions that connections showing a client certificate may resume. A resumed
/// session keeps the client identity of the handshake it came from, so once the client
/// certificate is reloaded they are forgotten: resuming one would show the peer the old
/// certificate. (A handshake under way at the reload may still leave one from the old
/// certificate.)
#[derive(Debug)]
struct Sessions(ArcSwap<ClientSessionMemoryCache>);

/// How many servers' sessions are kept (rustls' default).
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
