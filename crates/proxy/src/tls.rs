//! TLS on listeners: termination with rustls, certificates chosen by SNI and reloaded when
//! their files change, and the SNI of a ClientHello read without terminating (passthrough on
//! TCP listeners).
//!
//! A [`Terminator`] is one listener's TLS: its rustls settings (versions, ALPN) and a
//! [`Resolver`] that holds the loaded certificates in an `ArcSwap`. A handshake reads that
//! pointer and two hash maps; it takes no lock. Sessions resume by ticket only
//! ([`crate::tickets`], whose keys take no lock either); rustls' session cache, which would
//! serve session IDs, takes a lock per use and stays off.
//!
//! Certificates (and ticket key files, when the listener lists some) are loaded when a
//! configuration is applied, and a file that cannot be used rejects the configuration. After
//! that a watcher polls the files as `drover_certs` describes, every
//! [`POLL_EVERY`](drover_certs::POLL_EVERY), and loads a changed pair (or the changed set of
//! key files) once it has stayed the same for one poll. What fails to load is logged and what
//! was loaded before stays in use. The client certificates that services show their
//! endpoints are `drover_certs::ClientCert`s, reloaded the same way.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use drover_certs::{Entry, PairStamp, Settling, Stamp, load_pair, polls, spawn_until};
use drover_model::{CertificateFiles, ListenerSpec, ListenerTls, Protocol, TlsVersion};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::tickets::{Tickets, read_key_files};

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
    use rustls::pki_types::CertificateDer;

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
}
