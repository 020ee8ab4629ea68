//! HTTPS to upstreams: an origin with a certificate for `origin.test` signed by a test CA
//! (rcgen), served over rustls with ALPN h2 and http/1.1, behind drover services with `tls`.
//! Verified against the right CA it serves; against another CA, or under another name, it is
//! a 502 and a failure of the endpoint; HTTP/2 is negotiated by ALPN; a CA file that cannot be
//! read rejects the configuration and the old one keeps serving; an origin that asks for a
//! client certificate (mutual TLS) serves the service that shows one.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use support::*;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// A CA and its key.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ca {
        cert: params.self_signed(&key).unwrap(),
        key,
    }
}

/// An HTTPS origin with a certificate for `origin.test` signed by `ca`. It answers with the
/// HTTP version it received the request in, and the ALPN protocol in `x-alpn`.
async fn https_origin(ca: &Ca) -> SocketAddr {
    https_origin_asking(ca, None).await
}

/// As [`https_origin`]; with `clients`, it accepts only clients whose certificate that CA
/// signed.
async fn https_origin_asking(ca: &Ca, clients: Option<&Ca>) -> SocketAddr {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["origin.test".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "origin.test");
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(clients) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(clients.cert.der().clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: routine here.
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let session = tls.get_ref().1;
                let alpn = session
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).to_string())
                    .unwrap_or_else(|| "none".into());
                // That of a resumed session's first handshake, when it resumes one.
                let client = session
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map_or_else(|| "none".into(), |leaf| fingerprint(leaf));
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (alpn, client) = (alpn.clone(), client.clone());
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("x-alpn", alpn)
                                .header("x-client-cert", client)
                                .body(Full::new(Bytes::from(format!("{:?}", req.version()))))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// One listener on `port`; a route `/NAME` to each service `NAME = (ca file, server_name,
/// protocol)`, all to `origin`.
fn config(port: u16, origin: SocketAddr, services: &[(&str, &Path, &str, &str)]) -> String {
    let mut out = format!("[[listeners]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\n");
    for (name, ..) in services {
        out.push_str(&format!(
            "\n[[routes]]\nlistener = \"web\"\npath_prefix = \"/{name}\"\nservice = \"{name}\"\n"
        ));
    }
    for (name, ca, server_name, protocol) in services {
        out.push_str(&format!(
            r#"
[services.{name}]
upstream_protocol = "{protocol}"
tls = {{ ca = "{}", server_name = "{server_name}" }}
endpoints = [ {{ address = "{origin}" }} ]
"#,
            ca.display()
        ));
    }
    out
}

/// The `failed` count of one endpoint of one service, from `/stats/detail`.
async fn failed(drover: &Drover, service: &str, endpoint: SocketAddr) -> u64 {
    let (status, stats) = drover.api("GET", "/stats/detail", None).await;
    assert_eq!(status, StatusCode::OK);
    let id = format!("{service}/{endpoint}");
    stats
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} not in {stats}"))["failed"]
        .as_u64()
        .unwrap()
}

/// An HTTPS origin signed by a test CA, and two CA bundles in a temporary directory: the CA
/// that signed it, and one that did not.
async fn origin_and_two_cas() -> (
    SocketAddr,
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let good_ca = ca("drover test CA");
    let other_ca = ca("some other CA");
    let origin = https_origin(&good_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let good_pem = dir.path().join("good-ca.pem");
    let other_pem = dir.path().join("other-ca.pem");
    std::fs::write(&good_pem, good_ca.cert.pem()).unwrap();
    std::fs::write(&other_pem, other_ca.cert.pem()).unwrap();
    (origin, dir, good_pem, other_pem)
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_given_ca_and_name() {
    let (origin, _dir, good_pem, other_pem) = origin_and_two_cas().await;

    let port = free_port();
    let services = [
        ("good", good_pem.as_path(), "origin.test", "http1"),
        ("h2", good_pem.as_path(), "origin.test", "http2"),
        ("badca", other_pem.as_path(), "origin.test", "http1"),
        ("badname", good_pem.as_path(), "other.test", "http1"),
    ];
    let drover = Drover::start(&config(port, origin, &services)).await;
    let client = client();
    let url = |path: &str| format!("http://127.0.0.1:{port}/{path}");

    // Verified: served over TLS with HTTP/1.1, twice (the second on the pooled connection).
    for _ in 0..2 {
        let (status, headers, body) = get(&client, &url("good")).await;
        assert_eq!(status, StatusCode::OK, "{}", drover.log_text());
        assert_eq!(body, "HTTP/1.1");
        assert_eq!(headers["x-alpn"], "http/1.1");
    }

    // HTTP/2 negotiated by ALPN, from an HTTP/1.1 client.
    let (status, headers, body) = get(&client, &url("h2")).await;
    assert_eq!(status, StatusCode::OK, "{}", drover.log_text());
    assert_eq!(body, "HTTP/2.0", "the origin saw HTTP/2");
    assert_eq!(headers["x-alpn"], "h2");

    // Signed by a CA the service does not trust: 502, and a failure of the endpoint.
    let (status, _, _) = get(&client, &url("badca")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(failed(&drover, "badca", origin).await >= 1);
    assert_eq!(failed(&drover, "good", origin).await, 0);
    let log = drover.wait_log("its certificate did not verify", 1).await;
    assert!(log.contains("signed by no CA the service trusts"), "{log}");

    // The right CA, but the certificate is not for the name asked for.
    let (status, _, _) = get(&client, &url("badname")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(failed(&drover, "badname", origin).await >= 1);
    let log = drover.wait_log("its certificate did not verify", 2).await;
    assert!(log.contains("not valid for name \"other.test\""), "{log}");

    // curl, a real client, through the TLS upstream path.
    // Off the runtime's thread, which also serves the origin.
    let target = url("h2");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", &target])
            .output()
            .expect("curl runs")
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HTTP/2.0");
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_read_rejects_the_config_and_the_old_one_serves() {
    let good_ca = ca("drover test CA");
    let origin = https_origin(&good_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let good_pem = dir.path().join("good-ca.pem");
    std::fs::write(&good_pem, good_ca.cert.pem()).unwrap();
    let port = free_port();
    let drover = Drover::start(&config(
        port,
        origin,
        &[("good", good_pem.as_path(), "origin.test", "http1")],
    ))
    .await;
    let client = client();
    let url = format!("http://127.0.0.1:{port}/good");
    assert_eq!(get(&client, &url).await.0, StatusCode::OK);
    let generation = drover.generation().await;

    let missing = dir.path().join("missing-ca.pem");
    drover.write_config(&config(
        port,
        origin,
        &[("good", missing.as_path(), "origin.test", "http1")],
    ));
    let log = drover.wait_log("configuration rejected", 1).await;
    let expected = format!(
        "service good: its CA bundle, tls.ca {}: no such file",
        missing.display()
    );
    assert!(log.contains(&expected), "{log}");
    let status = drover.status().await.unwrap();
    assert!(
        status["last_rejection"]["error"]
            .as_str()
            .unwrap()
            .contains(&expected),
        "{status}"
    );
    assert_eq!(drover.generation().await, generation);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, _, body) = get(&client, &url).await;
    assert_eq!(status, StatusCode::OK, "the old configuration still serves");
    assert_eq!(body, "HTTP/1.1");
}

/// The health report of the one endpoint of `service`, once a check has run and its state is
/// `state`.
async fn wait_for_health(drover: &Drover, service: &str, state: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, view) = drover
            .api("GET", &format!("/api/v1/services/{service}"), None)
            .await;
        let health = view["endpoints"][0]["health"].clone();
        if health["state"] == state && !health["last_check_ms"].is_null() {
            return health;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{service} never became {state}: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn http_health_checks_go_over_tls_and_http2_like_requests() {
    let (origin, _dir, good_pem, other_pem) = origin_and_two_cas().await;
    let port = free_port();
    let names = ["good", "h2", "badca"];
    let mut text = config(
        port,
        origin,
        &[
            ("good", good_pem.as_path(), "origin.test", "http1"),
            ("h2", good_pem.as_path(), "origin.test", "http2"),
            ("badca", other_pem.as_path(), "origin.test", "http1"),
        ],
    );
    for name in names {
        text.push_str(&format!(
            "\n[services.{name}.health_check]\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n"
        ));
    }
    let drover = Drover::start(&text).await;
    let good = wait_for_health(&drover, "good", "healthy").await;
    assert_eq!(good["last_check_passed"], true, "{good}");
    let h2 = wait_for_health(&drover, "h2", "healthy").await;
    assert_eq!(h2["last_check_passed"], true, "{h2}");
    let bad = wait_for_health(&drover, "badca", "unhealthy").await;
    let error = bad["last_check_error"].as_str().unwrap();
    assert!(error.contains("its certificate did not verify"), "{bad}");
}

/// Tells certificates apart: the last bytes of the DER, which are of the signature.
fn fingerprint(der: &[u8]) -> String {
    der[der.len() - 8..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A client certificate signed by `ca`, for `name`: its PEM, its key's PEM and its
/// [`fingerprint`].
fn client_certificate(ca: &Ca, name: &str) -> (String, String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem(), fingerprint(cert.der()))
}

/// The files of a service with mutual TLS, in a directory of their own: the CA that signed
/// the origin's certificate, and drover's client certificate and key.
struct MutualFiles {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl MutualFiles {
    fn new(server_ca: &Ca) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |name| dir.path().join(name);
        let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
        std::fs::write(&ca, server_ca.cert.pem()).unwrap();
        Self {
            _dir: dir,
            ca,
            cert,
            key,
        }
    }

    /// Writes a [`client_certificate`] and its key; returns its fingerprint.
    fn write(&self, (cert, key, id): (String, String, String)) -> String {
        std::fs::write(&self.cert, cert).unwrap();
        std::fs::write(&self.key, key).unwrap();
        id
    }

    /// The service's `tls` setting, for endpoints with a certificate for `origin.test`.
    fn tls(&self) -> String {
        format!(
            r#"tls = {{ ca = "{}", server_name = "origin.test", cert = "{}", key = "{}" }}"#,
            self.ca.display(),
            self.cert.display(),
            self.key.display()
        )
    }
}

/// nginx's `proxy_ssl_certificate`, HAProxy's `crt` on a server line: an origin that asks
/// for a client certificate serves the service that shows one its CA signed, and refuses the
/// service that shows none (a 502, as for any handshake that fails).
#[tokio::test]
async fn a_service_with_a_client_certificate_is_served_by_an_origin_that_asks_for_one() {
    let server_ca = ca("drover test CA");
    let client_ca = ca("drover test client CA");
    let origin = https_origin_asking(&server_ca, Some(&client_ca)).await;
    let files = MutualFiles::new(&server_ca);
    files.write(client_certificate(&client_ca, "drover"));

    let port = free_port();
    let mut text = config(
        port,
        origin,
        &[("anonymous", &files.ca, "origin.test", "http1")],
    );
    text.push_str(&format!(
        r#"
[[routes]]
listener = "web"
path_prefix = "/mutual"
service = "mutual"

[services.mutual]
{}
endpoints = [ {{ address = "{origin}" }} ]
"#,
        files.tls()
    ));
    let drover = Drover::start(&text).await;
    let client = client();
    let url = |path: &str| format!("http://127.0.0.1:{port}/{path}");
    for _ in 0..2 {
        let (status, _, body) = get(&client, &url("mutual")).await;
        assert_eq!(status, StatusCode::OK, "{}", drover.log_text());
        assert_eq!(body, "HTTP/1.1");
    }
    let (status, _, _) = get(&client, &url("anonymous")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(failed(&drover, "anonymous", origin).await >= 1);
    assert_eq!(failed(&drover, "mutual", origin).await, 0);
}

/// A client certificate is reloaded when its files change, as a listener's certificate is,
/// without a configuration change: connections opened after the change show the new one,
/// and none resumes a TLS session made with the old one. Files that cannot be used are
/// logged, and the certificate in force stays. The service keeps no idle connection, so
/// that every request opens one; the origin says which certificate it got.
#[tokio::test]
async fn a_service_s_client_certificate_is_reloaded_when_its_files_change() {
    let server_ca = ca("drover test CA");
    let client_ca = ca("drover test client CA");
    let stranger = ca("a CA the origin does not know");
    let origin = https_origin_asking(&server_ca, Some(&client_ca)).await;
    let files = MutualFiles::new(&server_ca);
    files.write(client_certificate(&stranger, "drover"));

    let port = free_port();
    let drover = Drover::start(&format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
service = "mutual"

[services.mutual]
pool_max_idle = 0
{}
endpoints = [ {{ address = "{origin}" }} ]
"#,
        files.tls()
    ))
    .await;
    let generation = drover.generation().await;
    let client = client();
    let url = format!("http://127.0.0.1:{port}/");
    let (status, _, _) = get(&client, &url).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "a stranger's certificate");

    // Each request on a new connection; the origin names the certificate it got.
    let shown = || async {
        let (status, headers, _) = get(&client, &url).await;
        assert_eq!(status, StatusCode::OK, "{}", drover.log_text());
        headers["x-client-cert"].to_str().unwrap().to_string()
    };
    // A certificate the origin's CA signed, in place of the stranger's.
    let first = files.write(client_certificate(&client_ca, "drover"));
    drover.wait_log("reloaded client certificate", 1).await;
    for _ in 0..3 {
        assert_eq!(shown().await, first);
    }

    // Renewed: the sessions made with the first are not resumed.
    let renewed = files.write(client_certificate(&client_ca, "drover"));
    drover.wait_log("reloaded client certificate", 2).await;
    for _ in 0..3 {
        assert_eq!(shown().await, renewed);
    }

    // A key cut short: logged with the file, and the certificate loaded before stays.
    let (_, key, _) = client_certificate(&client_ca, "drover");
    std::fs::write(&files.key, &key[..60]).unwrap();
    let log = drover
        .wait_log("cannot reload service mutual: its client certificate", 1)
        .await;
    assert!(
        log.contains(&format!("tls.key {}", files.key.display())),
        "the error names the file:\n{log}"
    );
    for _ in 0..3 {
        assert_eq!(shown().await, renewed);
    }
    assert_eq!(
        drover.generation().await,
        generation,
        "no configuration change"
    );
}

/// A service's CA bundle is reloaded when its file changes, without a configuration change:
/// connections opened after it are verified against the new bundle, and none resumes a TLS
/// session verified against the old one. A bundle that cannot be used is logged, and the
/// one in force stays. The service keeps no idle connection, so that every request opens
/// one.
#[tokio::test]
async fn a_service_s_ca_bundle_is_reloaded_when_its_file_changes() {
    let (origin, dir, good_pem, other_pem) = origin_and_two_cas().await;
    let bundle = dir.path().join("bundle.pem");
    std::fs::copy(&other_pem, &bundle).unwrap();
    let port = free_port();
    let drover = Drover::start(&format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
service = "rotating"

[services.rotating]
pool_max_idle = 0
tls = {{ ca = "{}", server_name = "origin.test" }}
endpoints = [ {{ address = "{origin}" }} ]
"#,
        bundle.display()
    ))
    .await;
    let generation = drover.generation().await;
    let client = client();
    let url = format!("http://127.0.0.1:{port}/");
    // Three requests, each on a new connection, all answered with `want`.
    let all = |want: StatusCode| {
        let (client, url, drover) = (&client, &url, &drover);
        async move {
            for _ in 0..3 {
                let (status, _, _) = get(client, url).await;
                assert_eq!(status, want, "{}", drover.log_text());
            }
        }
    };
    all(StatusCode::BAD_GATEWAY).await; // not trusted yet

    // The CA that signed the origin joins the bundle.
    let both =
        std::fs::read_to_string(&other_pem).unwrap() + &std::fs::read_to_string(&good_pem).unwrap();
    std::fs::write(&bundle, both).unwrap();
    let log = drover
        .wait_log("service rotating: reloaded CA bundle", 1)
        .await;
    assert!(
        log.contains(&format!("{} (2 certificates)", bundle.display())),
        "{log}"
    );
    all(StatusCode::OK).await;

    // A bundle written half-way: logged with the file, and the one in force stays.
    std::fs::write(&bundle, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let log = drover
        .wait_log("cannot reload service rotating: its CA bundle", 1)
        .await;
    assert!(
        log.contains(&format!("tls.ca {}", bundle.display())),
        "the error names the file:\n{log}"
    );
    all(StatusCode::OK).await;

    // The origin's CA leaves the bundle: new connections refuse the origin, and the sessions
    // verified before are not resumed.
    std::fs::copy(&other_pem, &bundle).unwrap();
    drover
        .wait_log("service rotating: reloaded CA bundle", 2)
        .await;
    all(StatusCode::BAD_GATEWAY).await;
    assert_eq!(
        drover.generation().await,
        generation,
        "no configuration change"
    );
}
