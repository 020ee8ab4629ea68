//! How drover reaches a service's endpoints: a TCP connection, then TLS when the service has
//! `tls`, then for HTTP/2 hyper's handshake; an HTTP/1.1 connection goes to drover's own
//! client (`crate::h1`) as it is.
//!
//! A service's [`Upstream`] is made when its table entry is built, off the hot path: the CA
//! bundle and the client certificate are read and the rustls `ClientConfig` built there,
//! once, and a file that cannot be used rejects the configuration. Once the table that holds
//! the `Upstream` is published, the bundle and the certificate are reloaded when their files
//! change (`drover_certs::ClientTls`). Connections share that config; a new connection costs a
//! TCP connect, a TLS handshake (resumed when rustls has a session ticket for the server) and
//! the HTTP/2 handshake, all within the service's `connect_timeout`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use drover_certs::{ClientTls, Holder, Roots};
use drover_model::{CertificateFiles, ServiceSpec, UpstreamProtocol, UpstreamTls};
use futures_util::FutureExt as _;
use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::forward::ReqBody;
use crate::h1::{self, H1Body, H1Conn};
use crate::http::{BodyError, Forwarding};

/// Why a new upstream connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connect to {0} failed: {1}")]
    Io(SocketAddr, io::Error),
    /// The TLS handshake failed; the message says whether the certificate did not verify.
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(SocketAddr, String),
    #[error("{2} handshake with {0} failed: {1}")]
    Handshake(SocketAddr, hyper::Error, &'static str),
}

impl ConnectError {
    /// Whether the endpoint's certificate was refused.
    pub fn is_certificate(&self) -> bool {
        matches!(self, ConnectError::Tls(_, m) if m.starts_with(CERT_REFUSED))
    }
}

const CERT_REFUSED: &str = "its certificate did not verify";

/// A service's way to its endpoints, shared by all of them.
pub struct Upstream {
    pub protocol: UpstreamProtocol,
    tls: Option<Tls>,
    /// The settings it was made from: a service whose settings change gets a new one.
    settings: (UpstreamProtocol, Option<UpstreamTls>),
    /// Tells pooled connections made by another `Upstream` (older settings) from its own.
    pub(crate) id: u64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("protocol", &self.protocol)
            .field("tls", &self.settings.1)
            .finish()
    }
}

struct Tls {
    connector: TlsConnector,
    /// The SNI and verification name; None: each endpoint's IP address.
    name: Option<ServerName<'static>>,
    /// Keeps the CA bundle and the client certificate current.
    files: ClientTls,
}

/// A connection ready for requests.
pub(crate) enum Conn {
    /// drover's own HTTP/1.1 client (`crate::h1`): one request at a time.
    H1(Box<H1Conn>),
    H2(http2::SendRequest<ReqBody>),
}

/// What a request sent on a connection came to.
pub(crate) enum Sent {
    /// The answer's head; its body follows.
    Answer(Response<Answer>),
    /// Never written: the connection was closing. The request comes back whole.
    Unsent(Request<ReqBody>),
    /// Written, but no usable answer came: the connection broke, or the answer was invalid.
    /// `resend`: the upstream closed a connection it had kept alive as the request went
    /// out, with no byte of an answer (`h1::Sent::Failed`).
    Failed { error: BodyError, resend: bool },
    /// The deadline passed before the answer's head.
    TimedOut,
}

/// An answer's body, as the connection's client reads it.
pub(crate) enum Answer {
    /// It holds its connection, for the pool to take back at its end.
    H1(H1Body),
    H2(Incoming),
}

impl Conn {
    /// Waits until the connection can take a request; an error means it closed. An HTTP/1.1
    /// connection was checked when it was taken from the pool.
    pub(crate) async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Conn::H1(_) => Ok(()),
            Conn::H2(s) => s.ready().await,
        }
    }

    /// Whether [`send`](Self::send) gives the request's head back, whatever became of the
    /// request: drover's HTTP/1.1 client does; hyper's HTTP/2 client keeps it unless the
    /// request was never sent.
    pub(crate) fn gives_head_back(&self) -> bool {
        matches!(self, Conn::H1(_))
    }

    /// Sends a request and waits until `until` at most for the answer's head; with the
    /// outcome, the request's head when the connection [gives it back](Self::gives_head_back).
    /// `forwarding`: the forwarding headers, for drover's HTTP/1.1 client to write into the
    /// head (None when they are in the request's header map already, as they must be for
    /// HTTP/2).
    ///
    /// Not an `async fn`, which would keep room for `req` beside the send that took it:
    /// every request's future, and each one it is part of, would be larger and more to copy.
    pub(crate) fn send(
        self,
        req: Request<ReqBody>,
        until: Instant,
        forwarding: Option<Forwarding<'_>>,
    ) -> impl Future<Output = (Sent, Option<http::request::Parts>)> {
        match self {
            Conn::H1(c) => Either::Left(c.send(req, until, forwarding).map(|(sent, head)| {
                let sent = match sent {
                    h1::Sent::Answer(r) => Sent::Answer(r.map(Answer::H1)),
                    h1::Sent::Failed { error, resend } => Sent::Failed {
                        error: error.into(),
                        resend,
                    },
                    h1::Sent::TimedOut => Sent::TimedOut,
                };
                (sent, Some(head))
            })),
            // Requests share the connection: each has a timer of its own.
            Conn::H2(mut s) => {
                debug_assert!(forwarding.is_none(), "an HTTP/2 request's map has them");
                let answer = tokio::time::timeout_at(until.into(), s.try_send_request(req));
                // `s` is kept until the answer, as it would be if the future borrowed it.
                Either::Right(answer.map(move |answer| {
                    drop(s);
                    let sent = match answer {
                        Ok(Ok(r)) => Sent::Answer(r.map(Answer::H2)),
                        Ok(Err(mut e)) => match e.take_message() {
                            Some(req) => Sent::Unsent(req),
                            None => Sent::Failed {
                                error: e.into_error().into(),
                                resend: false,
                            },
                        },
                        Err(_) => Sent::TimedOut,
                    };
                    (sent, None)
                }))
            }
        }
    }
}

impl Upstream {
    /// Builds the connector for `service`: reads its CA bundle, if any, and makes its TLS
    /// config. The error names the service and the file and says what would be right.
    pub fn new(service: &str, spec: &ServiceSpec) -> Result<Upstream, String> {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let tls = match &spec.tls {
            None => None,
            Some(t) => Some(Tls::new(service, t, spec.upstream_protocol)?),
        };
        Ok(Upstream {
            protocol: spec.upstream_protocol,
            tls,
            settings: (spec.upstream_protocol, spec.tls.clone()),
            id: IDS.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Whether `spec` asks for exactly this connector.
    pub fn same_settings(&self, spec: &ServiceSpec) -> bool {
        self.settings.0 == spec.upstream_protocol && self.settings.1 == spec.tls
    }

    /// Starts reloading its CA bundle and client certificate when their files change, if it
    /// has them and that has not started yet; until it is dropped or `shutdown` is cancelled.
    pub(crate) fn watch(&self, shutdown: &CancellationToken) {
        if let Some(tls) = &self.tls {
            tls.files.watch(shutdown);
        }
    }

    /// Whether it connects over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// `https` over TLS, else `http`: the `:scheme` of HTTP/2 requests.
    pub(crate) fn scheme(&self) -> http::uri::Scheme {
        if self.is_tls() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        }
    }

    /// A byte stream to `address`: TCP, then TLS when the service has it, within `timeout`.
    pub async fn open(
        &self,
        address: SocketAddr,
        timeout: Duration,
    ) -> Result<Stream, ConnectError> {
        match tokio::time::timeout(timeout, self.open_now(address)).await {
            Err(_) => Err(ConnectError::Timeout(address)),
            Ok(r) => r,
        }
    }

    async fn open_now(&self, address: SocketAddr) -> Result<Stream, ConnectError> {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|e| ConnectError::Io(address, e))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let name = tls
            .name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(address.ip().into()));
        match tls.connector.connect(name, tcp).await {
            Ok(s) => Ok(Stream::Tls(Box::new(s))),
            Err(e) => Err(ConnectError::Tls(address, describe_tls_error(&e))),
        }
    }

    /// A new connection to `address`; for HTTP/2, with the task that drives it spawned.
    pub(crate) async fn connect(
        &self,
        address: SocketAddr,
        timeout: Duration,
    ) -> Result<Conn, ConnectError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = self.open(address, timeout).await?;
        if self.protocol == UpstreamProtocol::Http1 {
            // No handshake: the first request is the first word.
            return Ok(Conn::H1(H1Conn::new(stream)));
        }
        let handshake = async {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // Keeps an idle multiplexed connection known to be alive, and finds a dead
                // one before a request does (gRPC clients ping too).
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ConnectError::Handshake(address, e, "HTTP/2"))?;
            tokio::spawn(async move {
                // Ends when the upstream or drover closes the connection; routine.
                let _ = conn.await;
            });
            Ok(Conn::H2(sender))
        };
        match tokio::time::timeout_at(deadline, handshake).await {
            Err(_) => Err(ConnectError::Timeout(address)),
            Ok(r) => r,
        }
    }
}

impl Tls {
    fn new(service: &str, spec: &UpstreamTls, protocol: UpstreamProtocol) -> Result<Tls, String> {
        let roots = match &spec.ca {
            Some(path) => Roots::File(path.clone()),
            None => Roots::Fixed(system_roots()),
        };
        let client = match (&spec.cert, &spec.key) {
            (Some(cert), Some(key)) => Some(CertificateFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            // Validation allows neither alone.
            _ => None,
        };
        let holder = Holder {
            name: format!("service {service}"),
            settings: "tls.",
            peer: "its endpoints",
        };
        let (files, mut config) = ClientTls::new(holder, roots, client.as_ref())?;
        config.alpn_protocols = vec![match protocol {
            UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
            UpstreamProtocol::Http2 => b"h2".to_vec(),
        }];
        let name = match &spec.server_name {
            None => None,
            Some(n) => Some(ServerName::try_from(n.clone()).map_err(|_| {
                format!(
                    "service {service}: tls.server_name {n:?} is not a valid DNS name: write one such as \"api.example.com\""
                )
            })?),
        };
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            files,
        })
    }
}

/// The system's trusted roots, read once per process.
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(
                    "no system root certificates were found; services with tls and no tls.ca cannot verify their endpoints: give tls.ca"
                );
            }
            Arc::new(roots)
        })
        .clone()
}

/// What went wrong in a TLS handshake, in words; a refused certificate says so first.
fn describe_tls_error(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            format!(
                "{CERT_REFUSED}: it is signed by no CA the service trusts (UnknownIssuer); give the CA that signed it in tls.ca"
            )
        }
        Some(rustls::Error::InvalidCertificate(why)) => format!("{CERT_REFUSED}: {why}"),
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// A connection to an endpoint, in clear text or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The protocol ALPN chose, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tls: UpstreamTls) -> ServiceSpec {
        ServiceSpec {
            tls: Some(tls),
            ..ServiceSpec::default()
        }
    }

    #[test]
    fn a_missing_ca_file_names_the_service_and_the_file() {
        let e = Upstream::new(
            "api",
            &spec(UpstreamTls {
                ca: Some("/nonexistent/ca.pem".into()),
                ..UpstreamTls::default()
            }),
        )
        .unwrap_err();
        assert!(
            e.contains("service api") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("drover-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = Upstream::new(
            "api",
            &spec(UpstreamTls {
                ca: Some(path.clone()),
                ..UpstreamTls::default()
            }),
        )
        .unwrap_err();
        assert_eq!(
            e,
            format!(
                "service api: its CA bundle, tls.ca {}: no certificate in it; expected a PEM bundle of CA certificates (-----BEGIN CERTIFICATE-----)",
                path.display()
            )
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_client_certificate_that_cannot_be_read_names_the_service_and_the_file() {
        let e = Upstream::new(
            "api",
            &spec(UpstreamTls {
                cert: Some("/nonexistent/client.pem".into()),
                key: Some("/nonexistent/client.key".into()),
                ..UpstreamTls::default()
            }),
        )
        .unwrap_err();
        assert!(
            e.starts_with("service api: its client certificate, tls.cert /nonexistent/client.pem:"),
            "{e}"
        );
    }
}
