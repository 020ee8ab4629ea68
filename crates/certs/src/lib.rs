//! Certificate files that drover reads and keeps current: a certificate chain with its key
//! ([`load_pair`]), a CA bundle ([`load_roots`]), files noticed to have changed by polling
//! their metadata ([`Stamp`], [`Settling`]), and the TLS settings of a client whose CA bundle
//! and client certificate reload themselves ([`ClientTls`]).
//!
//! Listeners (their certificates), services (what they trust and show their endpoints) and
//! the Consul source (what it trusts and shows Consul) share this: each polls its files every
//! [`POLL_EVERY`] and loads a changed set once it has stayed the same for one poll, so that a
//! certificate and a key written one after the other are not read half-way. What fails to
//! load is logged, and what was loaded before stays in use. Polling rather than inotify sees
//! every way a file is replaced (written in place, renamed over, a Kubernetes secret
//! volume's symlink swap, network file systems where inotify stays silent) for one `stat`
//! call per file per second.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use drover_model::CertificateFiles;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

mod client;

pub use client::{ClientTls, Holder, Roots};

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

/// Reads a PEM bundle of CA certificates. The error starts `ca FILE: ` and says what is
/// wrong.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let file = path.display();
    let pem = read(path)
        .map_err(|e| format!("ca {file}: {e}; give the path of a PEM bundle of CA certificates"))?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| format!("ca {file}: not a valid PEM bundle: {e}"))?;
        roots.add(cert).map_err(|e| {
            format!(
                "ca {file}: certificate {} cannot be used as a CA: {e}",
                i + 1
            )
        })?;
    }
    if roots.is_empty() {
        return Err(format!(
            "ca {file}: no certificate in it; expected a PEM bundle of CA certificates (-----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(roots)
}

/// `1 certificate`, `2 certificates`.
pub fn certificates(n: usize) -> String {
    match n {
        1 => "1 certificate".into(),
        n => format!("{n} certificates"),
    }
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
#[derive(Clone)]
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
