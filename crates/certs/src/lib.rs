//! Certificate files that drover reads and keeps current: a certificate chain with its key
//! ([`load_pair`]), files noticed to have changed by polling their metadata ([`Stamp`],
//! [`Settling`]), and client certificates that reload themselves ([`ClientCert`]).
//!
//! Listeners (their certificates), services (the certificate they show their endpoints) and
//! the Consul source (the one it shows Consul) share this: each polls its files every
//! [`POLL_EVERY`] and loads a changed set once it has stayed the same for one poll, so that a
//! certificate and a key written one after the other are not read half-way. What fails to
//! load is logged, and what was loaded before stays in use. Polling rather than inotify sees
//! every way a file is replaced (written in place, renamed over, a Kubernetes secret
//! volume's symlink swap, network file systems where inotify stays silent) for one `stat`
//! call per file per second.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use drover_model::CertificateFiles;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, ResolvesClientCert, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{NamedGroup, SignatureScheme};
use tokio_util::sync::CancellationToken;

/// How often the certificate files are checked for changes.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// One certificate chain with its key, and the DNS names of its leaf.
#[derive(Clone)]
pub struct Entry {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
}

/// Reads and checks one certificate chain and its key.
pub fn load_pair(files: &CertificateFiles) -> Result<Entry, String> {
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

/// Reads a whole file; a missing one is "no such file".
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
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
pub struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    /// None when the file cannot be read. Follows symbolic links, so a swapped link target
    /// counts as a change.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        })
    }
}

/// The stamps of a certificate file and its key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairStamp([Option<Stamp>; 2]);

impl PairStamp {
    pub fn of(files: &CertificateFiles) -> Self {
        Self([Stamp::of(&files.cert), Stamp::of(&files.key)])
    }
}

/// Tells when watched files have changed and then stayed the same for one poll, so that files
/// written one after the other (a certificate, then its key) are not read half-way.
pub struct Settling<T> {
    /// The stamps of the files in force (or that last failed to load).
    loaded: T,
    /// The stamps seen at the poll before.
    previous: T,
}

impl<T: Clone + PartialEq> Settling<T> {
    pub fn new(loaded: T) -> Self {
        Self {
            previous: loaded.clone(),
            loaded,
        }
    }

    /// Takes one poll's stamps. True when they differ from those loaded and are the same as
    /// one poll ago: the writer is done, and the files are to be loaded (they count as loaded
    /// from here, so that a load that fails is not tried again until they change again).
    pub fn settled(&mut self, seen: T) -> bool {
        let settled = seen != self.loaded && seen == self.previous;
        if settled {
            self.loaded = seen.clone();
        }
        self.previous = seen;
        settled
    }
}

/// Ticks every [`POLL_EVERY`], the first tick one poll from now.
pub async fn polls() -> tokio::time::Interval {
    let mut every = tokio::time::interval(POLL_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    every
}

/// Runs `task` until it ends or `stop` or `shutdown` is cancelled.
pub fn spawn_until(
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

/// A client certificate that drover shows a peer that asks for one: a service's endpoints
/// (the service's `tls.cert` and `tls.key`) or Consul (`--consul-cert`, `--consul-key`). Its
/// files are polled as a listener's certificates are, and a changed pair is loaded for the
/// connections opened after it (with the sessions to resume forgotten); connections already
/// open keep the certificate they were opened with.
pub struct ClientCert {
    resolver: Arc<ClientCertResolver>,
    sessions: Arc<Sessions>,
    holder: Holder,
    files: CertificateFiles,
    /// The files' metadata when they were loaded.
    stamp: PairStamp,
    /// Whether its watcher runs: a service keeps its connector, and so this, across
    /// configurations that do not change its TLS settings.
    watched: AtomicBool,
    /// Stops the watcher when nothing uses this certificate any more.
    stop: CancellationToken,
}

/// Who shows a client certificate, for the messages about it.
#[derive(Clone, Debug)]
pub struct Holder {
    /// What messages start with: `service web`, `Consul`.
    pub name: String,
    /// What precedes `cert` and `key` in the names of the settings that give the files:
    /// `tls.` for a service (`tls.cert`), `--consul-` for the Consul source.
    pub settings: &'static str,
    /// Whom it is shown to: `its endpoints`, `Consul`.
    pub peer: &'static str,
}

impl Holder {
    /// What is wrong with its files, as [`load_pair`] said it.
    fn error(&self, e: &str) -> String {
        format!(
            "{}: its client certificate, {}{e}",
            self.name, self.settings
        )
    }
}

impl Drop for ClientCert {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ClientCert {
    /// Loads a client certificate. The error names the holder, the setting and the file, and
    /// says what is wrong with it.
    pub fn load(holder: Holder, files: &CertificateFiles) -> Result<Self, String> {
        let stamp = PairStamp::of(files);
        let entry = load_pair(files).map_err(|e| holder.error(&e))?;
        Ok(Self {
            resolver: Arc::new(ClientCertResolver(ArcSwap::new(entry.key))),
            sessions: Arc::new(Sessions::new()),
            holder,
            files: files.clone(),
            stamp,
            watched: AtomicBool::new(false),
            stop: CancellationToken::new(),
        })
    }

    /// What a rustls client config shows the peer.
    pub fn resolver(&self) -> Arc<dyn ResolvesClientCert> {
        self.resolver.clone()
    }

    /// Where a rustls client config keeps the sessions it may resume: forgotten when the
    /// certificate is reloaded.
    pub fn sessions(&self) -> Arc<dyn ClientSessionStore> {
        self.sessions.clone()
    }

    /// Starts reloading the certificate when its files change, unless that has started
    /// already; until this is dropped or `shutdown` is cancelled.
    pub fn watch(&self, shutdown: &CancellationToken) {
        if self.watched.swap(true, Ordering::Relaxed) {
            return;
        }
        let task = keep_current(
            self.resolver.clone(),
            self.sessions.clone(),
            self.holder.clone(),
            self.files.clone(),
            Settling::new(self.stamp),
        );
        spawn_until(task, &self.stop, shutdown);
    }
}

/// Polls a client certificate's files; when they have changed, loads them into `resolver`
/// and forgets the `sessions` made with the certificate before.
async fn keep_current(
    resolver: Arc<ClientCertResolver>,
    sessions: Arc<Sessions>,
    holder: Holder,
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
                    "{}: reloaded client certificate {} and key {}; new connections to {} show it",
                    holder.name,
                    files.cert.display(),
                    files.key.display(),
                    holder.peer
                );
            }
            Ok(Err(e)) => tracing::error!(
                "cannot reload {}; the client certificate loaded before stays in use",
                holder.error(&e)
            ),
            Err(e) => tracing::error!("{}: client certificate reload failed: {e}", holder.name),
        }
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
