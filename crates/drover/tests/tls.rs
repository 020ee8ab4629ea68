//! TLS end to end: certificates made here with rcgen and signed by a test CA, written to
//! files that drover loads. Clients verify what they get against that CA: rustls clients
//! here, and curl and h2load from Debian. Also TLS on TCP listeners: terminated in front of a
//! clear-text origin, and passed through by SNI to TLS origins.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// A test certificate authority.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    roots: Arc<RootCertStore>,
}

/// A certificate and its key, as PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "drover TLS test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        Ca {
            cert,
            key,
            roots: Arc::new(roots),
        }
    }

    fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

impl Leaf {
    /// Writes `NAME.pem` and `NAME.key` in `dir`; returns their paths.
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    /// A TLS server with this certificate, for origins.
    fn acceptor(&self) -> TlsAcceptor {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![self.der.clone()],
            PrivateKeyDer::Pkcs8(self.key_der.clone().into()),
        )
        .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// Checks a server's chain against the test CA and its name against `expect`, whatever
/// server name the client sent: what a client sees when drover falls back to its first
/// certificate for an unknown name.
#[derive(Debug)]
struct Expect {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for Expect {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _sent: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// How a test client connects.
struct Dial<'a> {
    /// Sent as SNI; None connects by IP address, which sends no SNI.
    sni: Option<&'a str>,
    /// The name the certificate must be valid for.
    expect: &'a str,
    versions: &'a [&'static rustls::SupportedProtocolVersion],
    alpn: &'a [&'a [u8]],
    /// The client's settings, made from the fields above by [`client_config`] when None. A
    /// client resumes only sessions made with the same settings.
    config: Option<&'a Arc<rustls::ClientConfig>>,
}

impl Dial<'_> {
    fn to(sni: &str) -> Dial<'_> {
        Dial {
            sni: Some(sni),
            expect: sni,
            versions: rustls::ALL_VERSIONS,
            alpn: &[],
            config: None,
        }
    }
}

/// A TLS connection to `addr`, its certificate checked against `ca` as `dial` says.
async fn connect(
    ca: &Ca,
    addr: SocketAddr,
    dial: &Dial<'_>,
) -> std::io::Result<TlsStream<TcpStream>> {
    connect_over(ca, TcpStream::connect(addr).await?, dial).await
}

async fn connect_over(
    ca: &Ca,
    tcp: TcpStream,
    dial: &Dial<'_>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let config = match dial.config {
        Some(c) => c.clone(),
        None => Arc::new(client_config(ca, dial)),
    };
    let name = match dial.sni {
        Some(sni) => ServerName::try_from(sni.to_string()).unwrap(),
        None => ServerName::IpAddress(tcp.peer_addr()?.ip().into()),
    };
    TlsConnector::from(config).connect(name, tcp).await
}

/// A client's settings for `dial`: the versions and ALPN it offers, and the certificate it
/// accepts. It keeps sessions to resume (rustls' default store).
fn client_config(ca: &Ca, dial: &Dial<'_>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        ca.roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    let verifier = Expect {
        inner,
        name: ServerName::try_from(dial.expect.to_string()).unwrap(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(dial.versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = dial.alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// The certificate the server presented.
fn leaf_of(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// GET `path` over an established TLS connection; the status and body.
async fn get_over(stream: TlsStream<TcpStream>, host: &str, path: &str) -> (StatusCode, String) {
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(empty())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A header's value in an echo body (one `name: value` per line).
fn echoed<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A listener `https` on `port` terminating TLS with `certs` (cert, key) in front of one
/// origin; `extra` goes into its TLS table (`min_version = "1.3"`, say).
fn tls_config(port: u16, certs: &[(PathBuf, PathBuf)], extra: &str, origin: SocketAddr) -> String {
    let certs: Vec<String> = certs
        .iter()
        .map(|(c, k)| format!("{{ cert = {:?}, key = {:?} }}", c, k))
        .collect();
    format!(
        r#"
[[listeners]]
name = "https"
listen = "127.0.0.1:{port}"
tls = {{ certificates = [ {} ] {extra} }}

[[routes]]
listener = "https"
service = "web"

[services.web]
endpoints = [ {{ address = "{origin}" }} ]
"#,
        certs.join(", ")
    )
}

/// [`tls_config`]'s listener `https` on `port`, and beside it a listener (PORT, NAME, EXTRA)
/// with the same certificates and route, whose TLS table has `extra` too.
fn and_another_listener(
    port: u16,
    (other, name, extra): (u16, &str, &str),
    certs: &[(PathBuf, PathBuf)],
    origin: SocketAddr,
) -> String {
    let second = tls_config(other, certs, extra, origin).replace("\"https\"", &format!("{name:?}"));
    let (listener_and_route, _service) = second.split_once("[services.web]").unwrap();
    format!(
        "{}{listener_and_route}",
        tls_config(port, certs, "", origin)
    )
}

#[tokio::test]
async fn the_certificate_is_chosen_by_sni_and_unknown_names_get_the_first() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let a = ca.leaf(&["a.test"]);
    let b = ca.leaf(&["b.test", "*.b.test"]);
    let files = [a.write(dir.path(), "a"), b.write(dir.path(), "b")];
    let origin = Origin::start("web").await;
    let port = free_port();
    let d = Drover::start(&tls_config(port, &files, "", origin.addr)).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    for (sni, expect, leaf) in [
        (Some("a.test"), "a.test", &a),
        (Some("b.test"), "b.test", &b),
        (Some("www.b.test"), "www.b.test", &b),
        // Unknown names, and clients that send no SNI, get the first certificate.
        (Some("c.test"), "a.test", &a),
        (None, "a.test", &a),
    ] {
        let dial = Dial {
            sni,
            expect,
            ..Dial::to("x")
        };
        let stream = connect(&ca, addr, &dial)
            .await
            .unwrap_or_else(|e| panic!("{sni:?}: {e}\n{}", d.log_text()));
        assert!(
            leaf_of(&stream) == leaf.der,
            "{sni:?} got another certificate"
        );
        let (status, body) = get_over(stream, sni.unwrap_or("127.0.0.1"), "/").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(echoed(&body, "x-forwarded-proto"), Some("https"), "{body}");
        assert_eq!(
            echoed(&body, "x-forwarded-for"),
            Some("127.0.0.1"),
            "{body}"
        );
    }
    // A client that trusts the CA but wants a name drover has no certificate for fails.
    let strict = Dial::to("c.test");
    assert!(connect(&ca, addr, &strict).await.is_err());
}

#[tokio::test]
async fn a_certificate_rewritten_on_disk_serves_new_handshakes_and_a_bad_one_is_ignored() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let first = ca.leaf(&["a.test"]);
    let files = [first.write(dir.path(), "a")];
    let origin = Origin::start("web").await;
    let port = free_port();
    let d = Drover::start(&tls_config(port, &files, "", origin.addr)).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let generation = d.generation().await;
    let served = || async { leaf_of(&connect(&ca, addr, &Dial::to("a.test")).await.unwrap()) };
    assert!(served().await == first.der);
    // A connection open before the swap keeps working after it.
    let open = connect(&ca, addr, &Dial::to("a.test")).await.unwrap();

    let second = ca.leaf(&["a.test"]);
    second.write(dir.path(), "a");
    let started = Instant::now();
    while served().await != second.der {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new certificate was not served within 5 s:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.wait_log("reloaded certificate", 1).await;
    assert_eq!(d.generation().await, generation, "no configuration change");
    let (status, _) = get_over(open, "a.test", "/").await;
    assert_eq!(status, StatusCode::OK);

    // A truncated certificate: an error in the log, and the certificate in force stays.
    std::fs::write(&files[0].0, &second.cert_pem[..100]).unwrap();
    let log = d.wait_log("cannot reload tls.certificates[0]", 1).await;
    assert!(
        log.contains(&format!("cert {}", files[0].0.display())),
        "the error names the file:\n{log}"
    );
    for _ in 0..3 {
        assert!(served().await == second.der);
    }
    // A key that belongs to another certificate is refused the same way.
    std::fs::write(&files[0].0, &second.cert_pem).unwrap();
    std::fs::write(&files[0].1, ca.leaf(&["a.test"]).key_pem).unwrap();
    let log = d.wait_log("does not match the certificate", 1).await;
    assert!(
        log.contains("the certificate loaded before keeps serving"),
        "{log}"
    );
    assert!(served().await == second.der);
}

#[tokio::test]
async fn a_certificate_that_cannot_be_loaded_rejects_the_config_and_the_old_one_serves() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let a = ca.leaf(&["a.test"]);
    let files = [a.write(dir.path(), "a")];
    let origin = Origin::start("web").await;
    let port = free_port();
    let d = Drover::start(&tls_config(port, &files, "", origin.addr)).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let generation = d.generation().await;

    let missing = dir.path().join("missing.pem");
    let other = ca.leaf(&["other.test"]).write(dir.path(), "other");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let cases = [
        (
            (missing.clone(), files[0].1.clone()),
            format!("cert {}: no such file", missing.display()),
        ),
        (
            (garbage.clone(), files[0].1.clone()),
            format!("cert {}: no certificate in it", garbage.display()),
        ),
        (
            (files[0].0.clone(), other.1.clone()),
            format!(
                "key {} does not match the certificate in {}",
                other.1.display(),
                files[0].0.display()
            ),
        ),
    ];
    for (i, (pair, message)) in cases.into_iter().enumerate() {
        d.write_config(&tls_config(port, &[pair], "", origin.addr));
        let log = d.wait_log("configuration rejected", i + 1).await;
        let wanted = format!("listener https: tls.certificates[0]: {message}");
        assert!(log.contains(&wanted), "{wanted:?} not in:\n{log}");
        let s = d.status().await.unwrap();
        assert!(
            s["last_rejection"]["error"]
                .as_str()
                .unwrap()
                .contains(&message),
            "{s}"
        );
        assert_eq!(d.generation().await, generation);
        let stream = connect(&ca, addr, &Dial::to("a.test")).await.unwrap();
        assert!(leaf_of(&stream) == a.der);
        assert_eq!(get_over(stream, "a.test", "/").await.0, StatusCode::OK);
    }
}

/// Runs a command off the runtime's thread; its exit status and stdout.
async fn run(program: &str, args: Vec<String>) -> (bool, String, String) {
    let program = program.to_string();
    let out = tokio::task::spawn_blocking(move || Command::new(&program).args(&args).output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot run it (scripts/test.sh installs it): {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// curl's `%{http_version}` and body for `url`, trusting the test CA.
async fn curl(ca_file: &Path, port: u16, version: &str, url: &str) -> (String, String) {
    let args = vec![
        "-sS".into(),
        version.into(),
        "--cacert".into(),
        ca_file.display().to_string(),
        "--resolve".into(),
        format!("a.test:{port}:127.0.0.1"),
        "-w".into(),
        "\n%{http_version}".into(),
        url.into(),
    ];
    let (ok, out, err) = run("curl", args).await;
    assert!(ok, "curl {version} {url}: {err}");
    let (body, version) = out.rsplit_once('\n').unwrap();
    (version.to_string(), body.to_string())
}

#[tokio::test]
async fn curl_speaks_http1_and_http2_over_tls_and_h2c_in_clear_text() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let files = [ca.leaf(&["a.test"]).write(dir.path(), "a")];
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let origin = Origin::start("web").await;
    let (tls, no_h2, clear) = (free_port(), free_port(), free_port());
    let config = format!(
        "{}{}\n[[listeners]]\nname = \"clear\"\nlisten = \"127.0.0.1:{clear}\"\n\n[[routes]]\nlistener = \"clear\"\nservice = \"web\"\n",
        tls_config(tls, &files, "", origin.addr),
        tls_config(no_h2, &files, ", http2 = false", origin.addr)
            .replace("\"https\"", "\"h1only\"")
            .split("[services.web]")
            .next()
            .unwrap(),
    );
    let _d = Drover::start(&config).await;
    let url = format!("https://a.test:{tls}/");
    let (v, body) = curl(&ca_file, tls, "--http1.1", &url).await;
    assert_eq!(v, "1.1");
    assert_eq!(echoed(&body, "x-forwarded-proto"), Some("https"), "{body}");
    let (v, body) = curl(&ca_file, tls, "--http2", &url).await;
    assert_eq!(v, "2", "ALPN offers h2");
    assert_eq!(echoed(&body, "x-forwarded-proto"), Some("https"), "{body}");
    let (v, _) = curl(
        &ca_file,
        no_h2,
        "--http2",
        &format!("https://a.test:{no_h2}/"),
    )
    .await;
    assert_eq!(v, "1.1", "http2 = false offers only http/1.1");
    let (v, body) = curl(
        &ca_file,
        clear,
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{clear}/"),
    )
    .await;
    assert_eq!(v, "2", "h2c with prior knowledge");
    assert_eq!(echoed(&body, "x-forwarded-proto"), Some("http"), "{body}");
}

#[tokio::test]
async fn h2load_over_tls_completes_every_request() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let files = [ca.leaf(&["a.test"]).write(dir.path(), "a")];
    let origin = Origin::start("web").await;
    let port = free_port();
    let _d = Drover::start(&tls_config(port, &files, "", origin.addr)).await;
    let args = ["-n", "2000", "-c", "10", "-m", "10"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("https://127.0.0.1:{port}/")])
        .collect();
    let (_, out, err) = run("h2load", args).await;
    assert!(out.contains("Application protocol: h2"), "{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("no requests line:\n{out}\n{err}"));
    // requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored, 0 timeout
    let count = |what: &str| -> u64 {
        line.split(", ")
            .find_map(|p| p.trim_start_matches("requests: ").strip_suffix(what))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(count("succeeded"), 2000, "{line}");
    assert_eq!(count("failed"), 0, "{line}");
    let status = out
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap();
    assert!(status.starts_with("status codes: 2000 2xx"), "{status}");
}

/// A hand-written ClientHello for a client that speaks up to TLS `1.minor` (no
/// supported_versions extension), offering ECDHE-ECDSA and ECDHE-RSA with AES-GCM.
fn legacy_hello(minor: u8) -> Vec<u8> {
    let mut ext = Vec::new();
    let mut add = |kind: u16, data: &[u8]| {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    };
    add(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, P-256
    add(0x000b, &[1, 0]); // point formats: uncompressed
    add(0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // signatures: ECDSA P-256, RSA-PSS
    let mut body = vec![3, minor];
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 4, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut handshake = vec![1, 0];
    handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// The first record drover answers a hand-written ClientHello with: its type and the first
/// byte of its content (22 and 2 for a ServerHello; 21 and the level for an alert).
async fn answer_to(addr: SocketAddr, hello: &[u8]) -> (u8, u8) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(hello).await.unwrap();
    let mut head = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    (head[0], head[5])
}

#[tokio::test]
async fn tls_1_1_is_refused_and_min_version_1_3_refuses_a_1_2_client() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let files = [ca.leaf(&["a.test"]).write(dir.path(), "a")];
    let origin = Origin::start("web").await;
    let (default, strict) = (free_port(), free_port());
    let config = and_another_listener(
        default,
        (strict, "strict", ", min_version = \"1.3\""),
        &files,
        origin.addr,
    );
    let d = Drover::start(&config).await;
    let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };

    // The same hello, as TLS 1.2, gets a ServerHello: the refusal below is the version's.
    assert_eq!(answer_to(addr(default), &legacy_hello(3)).await, (22, 2));
    for minor in [1, 2] {
        let (kind, _) = answer_to(addr(default), &legacy_hello(minor)).await;
        assert_eq!(kind, 21, "TLS 1.{} must get an alert", minor - 1);
    }

    let tls12 = Dial {
        versions: &[&rustls::version::TLS12],
        ..Dial::to("a.test")
    };
    let tls13 = Dial {
        versions: &[&rustls::version::TLS13],
        ..Dial::to("a.test")
    };
    let s = connect(&ca, addr(default), &tls12).await.unwrap();
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert!(connect(&ca, addr(strict), &tls12).await.is_err());
    let s = connect(&ca, addr(strict), &tls13).await.unwrap();
    assert_eq!(get_over(s, "a.test", "/").await.0, StatusCode::OK);

    // Every failed handshake is counted: on the first listener, the two old hellos and the
    // TLS 1.2 one dropped after its ServerHello.
    await_counters(
        &d,
        "drover_listener_tls_handshake_failures_total",
        &[("https", 3), ("strict", 1)],
    )
    .await;
}

/// Waits up to 3 s for the listeners' values of the counter `metric` to be `expect`.
async fn await_counters(d: &Drover, metric: &str, expect: &[(&str, u64)]) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, _, metrics) = get(&client(), &format!("http://{}/metrics", d.admin)).await;
        let metrics = String::from_utf8_lossy(&metrics).into_owned();
        let value = |listener: &str| -> u64 {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!("{metric}{{"))
                        && l.contains(&format!("listener=\"{listener}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {metric} for {listener}:\n{metrics}"))
        };
        if expect.iter().all(|(listener, n)| value(listener) == *n) {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_returning_client_resumes_its_session_by_ticket_unless_tickets_are_off() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let files = [ca.leaf(&["a.test"]).write(dir.path(), "a")];
    let origin = Origin::start("web").await;
    let (on, off) = (free_port(), free_port());
    let config = and_another_listener(
        on,
        (off, "full", ", session_tickets = false"),
        &files,
        origin.addr,
    );
    let d = Drover::start(&config).await;
    let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };

    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        for (port, resumes) in [(on, true), (off, false)] {
            let what = format!("{:?} to port {port}", version.version);
            let versions = [version];
            let dial = Dial {
                versions: &versions,
                ..Dial::to("a.test")
            };
            let config = Arc::new(client_config(&ca, &dial));
            let dial = Dial {
                config: Some(&config),
                ..dial
            };
            let first = connect(&ca, addr(port), &dial).await.unwrap();
            assert_eq!(
                first.get_ref().1.handshake_kind(),
                Some(rustls::HandshakeKind::Full),
                "{what}"
            );
            // A TLS 1.3 client reads its tickets after the handshake, with the answer.
            assert_eq!(get_over(first, "a.test", "/").await.0, StatusCode::OK);

            let second = connect(&ca, addr(port), &dial).await.unwrap();
            let expected = if resumes {
                rustls::HandshakeKind::Resumed
            } else {
                rustls::HandshakeKind::Full
            };
            assert_eq!(
                second.get_ref().1.handshake_kind(),
                Some(expected),
                "{what}"
            );
            let (status, body) = get_over(second, "a.test", "/").await;
            assert_eq!(status, StatusCode::OK, "{what}");
            assert_eq!(echoed(&body, "x-forwarded-proto"), Some("https"), "{body}");
        }
    }
    await_counters(
        &d,
        "drover_listener_tls_resumed_handshakes_total",
        &[("https", 2), ("full", 0)],
    )
    .await;
}

/// A client that made a full handshake with the listener on `port` over `version`, read an
/// answer there (and with it, over TLS 1.3, its tickets), and keeps its sessions.
async fn served_once(
    ca: &Ca,
    port: u16,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let versions = [version];
    let dial = Dial {
        versions: &versions,
        ..Dial::to("a.test")
    };
    let config = Arc::new(client_config(ca, &dial));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let dial = Dial {
        config: Some(&config),
        ..dial
    };
    let s = connect(ca, addr, &dial).await.unwrap();
    assert_eq!(
        s.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    assert_eq!(get_over(s, "a.test", "/").await.0, StatusCode::OK);
    config
}

/// How that client's next handshake with the listener on `port` goes.
async fn next_handshake(
    ca: &Ca,
    client: &Arc<rustls::ClientConfig>,
    port: u16,
) -> rustls::HandshakeKind {
    let dial = Dial {
        config: Some(client),
        ..Dial::to("a.test")
    };
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = connect(ca, addr, &dial).await.unwrap();
    let kind = s.get_ref().1.handshake_kind().unwrap();
    assert_eq!(get_over(s, "a.test", "/").await.0, StatusCode::OK);
    kind
}

/// Gateways that read the same session ticket key files (nginx's `ssl_session_ticket_key`)
/// resume each other's clients. Rewriting the files rotates the keys without a restart: the
/// new first key seals, the one moved second still opens. A file that cannot be used is
/// logged at reload and the keys in force stay; at a configuration change, it rejects the
/// configuration.
#[tokio::test]
async fn gateways_that_share_ticket_key_files_resume_each_other_s_sessions() {
    use rustls::HandshakeKind::{Full, Resumed};
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let files = [ca.leaf(&["a.test"]).write(dir.path(), "a")];
    let origin = Origin::start("web").await;
    // Each gateway reads its own copy of the files, as on two machines.
    let paths = |gateway: &str| {
        let file = |name: &str| dir.path().join(format!("{gateway}-{name}.key"));
        [file("ticket"), file("old")]
    };
    let write = |[first, second]: &[PathBuf; 2], keys: [&[u8]; 2]| {
        std::fs::write(first, keys[0]).unwrap();
        std::fs::write(second, keys[1]).unwrap();
        format!(", session_ticket_keys = [{first:?}, {second:?}]")
    };
    let (k1, k2, k3) = ([0x11u8; 80], [0x22u8; 48], [0x33u8; 80]);
    let (on_one, on_two) = (paths("one"), paths("two"));
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let one = Drover::start(&tls_config(
        p1,
        &files,
        &write(&on_one, [&k1, &k2]),
        origin.addr,
    ))
    .await;
    let two = Drover::start(&tls_config(
        p2,
        &files,
        &write(&on_two, [&k1, &k2]),
        origin.addr,
    ))
    .await;
    // A gateway with keys of its own, made at random.
    let _alone = Drover::start(&tls_config(p3, &files, "", origin.addr)).await;

    let (tls13, tls12) = (&rustls::version::TLS13, &rustls::version::TLS12);
    for version in [tls13, tls12] {
        let what = format!("{:?}", version.version);
        let client = served_once(&ca, p1, version).await;
        assert_eq!(next_handshake(&ca, &client, p2).await, Resumed, "{what}");
        let client = served_once(&ca, p2, version).await;
        assert_eq!(next_handshake(&ca, &client, p1).await, Resumed, "{what}");
        let client = served_once(&ca, p1, version).await;
        assert_eq!(next_handshake(&ca, &client, p3).await, Full, "{what}");
    }

    // Gateway two's files are rotated first: a new key, then k1, which one still seals with.
    let sealed_with_k1 = served_once(&ca, p1, tls13).await;
    write(&on_two, [&k3, &k1]);
    two.wait_log("reloaded session ticket keys", 1).await;
    assert_eq!(next_handshake(&ca, &sealed_with_k1, p2).await, Resumed);
    let sealed_with_k3 = served_once(&ca, p2, tls13).await;
    assert_eq!(
        next_handshake(&ca, &sealed_with_k3, p1).await,
        Full,
        "one does not have k3 yet"
    );

    // A key file cut short is refused at reload; two goes on with k3 and k1.
    std::fs::write(&on_two[0], b"too short").unwrap();
    let log = two
        .wait_log("cannot reload tls.session_ticket_keys[0]", 1)
        .await;
    assert!(
        log.contains(&format!(
            "{}: it holds 9 bytes; a session ticket key is 48 or 80 random bytes, such as `openssl rand 80` writes; the session ticket keys loaded before stay in use",
            on_two[0].display()
        )),
        "{log}"
    );
    let sealed_with_k1 = served_once(&ca, p1, tls13).await;
    assert_eq!(next_handshake(&ca, &sealed_with_k1, p2).await, Resumed);

    // Given in a new configuration, the short file rejects it.
    let generation = one.generation().await;
    let short = format!(", session_ticket_keys = [{:?}]", on_two[0]);
    one.write_config(&tls_config(p1, &files, &short, origin.addr));
    let log = one.wait_log("configuration rejected", 1).await;
    let wanted = format!(
        "listener https: tls.session_ticket_keys[0] {}: it holds 9 bytes",
        on_two[0].display()
    );
    assert!(log.contains(&wanted), "{wanted:?} not in:\n{log}");
    assert_eq!(one.generation().await, generation);
    let client = served_once(&ca, p1, tls13).await;
    assert_eq!(
        next_handshake(&ca, &client, p2).await,
        Resumed,
        "one still seals with k1, from the files of the configuration in force"
    );
}

/// A TLS origin: answers each connection with `NAME` and a newline after the handshake, then
/// echoes lines.
async fn tls_origin(name: &'static str, leaf: &Leaf) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = leaf.acceptor();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                let _ = s.flush().await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let _ = s.flush().await;
                }
            });
        }
    });
    addr
}

/// Reads one line from a client stream.
async fn line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut r = BufReader::new(s);
    let mut l = String::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut l))
        .await
        .unwrap()
        .unwrap();
    l.trim_end().to_string()
}

#[tokio::test]
async fn sni_passthrough_reaches_the_origin_for_each_name_and_closes_unknown_ones() {
    let ca = Ca::new();
    let (a, b) = (ca.leaf(&["a.test"]), ca.leaf(&["x.b.test"]));
    let (origin_a, origin_b) = (tls_origin("a", &a).await, tls_origin("b", &b).await);
    let port = free_port();
    let config = format!(
        r#"
[[listeners]]
name = "passthrough"
listen = "127.0.0.1:{port}"
protocol = "tcp"

[[routes]]
listener = "passthrough"
host = "a.test"
service = "a"

[[routes]]
listener = "passthrough"
host = "*.b.test"
service = "b"

[services.a]
endpoints = [ {{ address = "{origin_a}" }} ]

[services.b]
endpoints = [ {{ address = "{origin_b}" }} ]
"#
    );
    let d = Drover::start(&config).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for (sni, name, leaf) in [("a.test", "a", &a), ("x.b.test", "b", &b)] {
        let mut s = connect(&ca, addr, &Dial::to(sni))
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}\n{}", d.log_text()));
        assert!(leaf_of(&s) == leaf.der, "{sni} saw another certificate");
        assert_eq!(line(&mut s).await, name);
        s.write_all(b"ping\n").await.unwrap();
        assert_eq!(line(&mut s).await, "ping");
    }
    // No route for the name and none without a host: closed before any byte comes back.
    for dial in [
        Dial::to("c.test"),
        Dial {
            sni: None,
            ..Dial::to("a.test")
        },
    ] {
        let e = connect(&ca, addr, &dial).await.unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
}

#[tokio::test]
async fn tls_terminated_on_a_tcp_listener_reaches_a_clear_text_origin() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["db.test"]).write(dir.path(), "db");
    // A clear-text line echo.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let _ = w.write_all(format!("echo: {l}\n").as_bytes()).await;
                }
                let _ = w.shutdown().await;
            });
        }
    });
    let port = free_port();
    let config = format!(
        r#"
[[listeners]]
name = "db"
listen = "127.0.0.1:{port}"
protocol = "tcp"
tls = {{ certificates = [ {{ cert = {cert:?}, key = {key:?} }} ] }}

[[routes]]
listener = "db"
service = "db"

[services.db]
endpoints = [ {{ address = "{origin}" }} ]
"#
    );
    let _d = Drover::start(&config).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = connect(&ca, addr, &Dial::to("db.test")).await.unwrap();
    let (r, mut w) = tokio::io::split(s);
    let mut r = BufReader::new(r).lines();
    for i in 0..3 {
        w.write_all(format!("hello {i}\n").as_bytes())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), r.next_line())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.as_deref(), Some(format!("echo: hello {i}").as_str()));
    }
    // The client's close reaches the origin, whose close comes back.
    w.shutdown().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), r.next_line()).await;
    assert!(matches!(end, Ok(Ok(None))), "{end:?}");
}

#[tokio::test]
async fn a_proxy_header_comes_before_the_tls_handshake() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let files = [ca.leaf(&["a.test"]).write(dir.path(), "a")];
    let origin = Origin::start("web").await;
    let port = free_port();
    let config = tls_config(port, &files, "", origin.addr)
        .replace("tls = {", "proxy_protocol_from = [\"127.0.0.1\"]\ntls = {");
    let d = Drover::start(&config).await;
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(format!("PROXY TCP4 198.51.100.20 127.0.0.1 40000 {port}\r\n").as_bytes())
        .await
        .unwrap();
    let s = connect_over(&ca, tcp, &Dial::to("a.test"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    let (status, body) = get_over(s, "a.test", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        echoed(&body, "x-forwarded-for"),
        Some("198.51.100.20"),
        "{body}"
    );
    assert_eq!(echoed(&body, "x-forwarded-proto"), Some("https"), "{body}");
    // Without the header, the TLS hello itself is refused as a PROXY header: closed.
    assert!(
        connect(
            &ca,
            format!("127.0.0.1:{port}").parse().unwrap(),
            &Dial::to("a.test")
        )
        .await
        .is_err()
    );
}
