//! Settings of the wire protocols: TLS on listeners and to upstreams, the HTTP version spoken
//! to upstreams, PROXY protocol from downstreams, and the limits a listener puts on what
//! clients send. docs/configuration.md and docs/security.md list their defaults.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// TLS termination on a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificate chains and their keys, as PEM files. The one whose names match the
    /// client's SNI serves it; the first serves clients that send no SNI or an unknown name
    /// (nginx's default server). The files are watched and reloaded when they change.
    pub certificates: Vec<CertificateFiles>,
    /// The oldest TLS version accepted: `"1.2"` or `"1.3"`. `"1.2"`, Mozilla's
    /// "intermediate" profile.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Offers HTTP/2 by ALPN beside HTTP/1.1. On.
    #[serde(default = "defaults::yes")]
    pub http2: bool,
    /// Issues session tickets, with which a returning client resumes its session in a short
    /// handshake (no certificate, no signature). On, as in nginx and HAProxy.
    #[serde(default = "defaults::yes")]
    pub session_tickets: bool,
    /// Files of session ticket keys shared with other gateways, as nginx's
    /// `ssl_session_ticket_key`: 48 or 80 random bytes each (`openssl rand 80`). The first
    /// seals new tickets; all of them open tickets. Empty: the listener makes its own keys
    /// and rotates them. The files are watched and reloaded when they change.
    #[serde(default)]
    pub session_ticket_keys: Vec<PathBuf>,
}

/// One certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM file with the leaf certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsVersion {
    #[default]
    Tls12,
    Tls13,
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        })
    }
}

impl Serialize for TlsVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "1.2" => Ok(TlsVersion::Tls12),
            "1.3" => Ok(TlsVersion::Tls13),
            other => Err(serde::de::Error::custom(format!(
                "unsupported TLS version {other:?}: expected \"1.2\" or \"1.3\""
            ))),
        }
    }
}

/// The HTTP version drover speaks to a service's endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2: with prior knowledge (h2c) in clear text, negotiated by ALPN over TLS. What
    /// gRPC services need.
    Http2,
}

impl fmt::Display for UpstreamProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::Http2 => "http2",
        })
    }
}

/// TLS from drover to a service's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM bundle of the CAs that may sign the endpoints' certificates. None: the system's
    /// roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The name sent as SNI and checked against the endpoints' certificates. None: the
    /// endpoint's IP address, checked against the certificate's IP names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// A client certificate chain, PEM with the leaf first, that drover shows to endpoints
    /// that ask for one (mutual TLS); with `key`. None: no client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The private key of `cert`, PEM (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// What a listener does with a request header whose name contains an underscore. Such names
/// can alias dash-named headers in CGI-style backends (`X_Forwarded_For` and
/// `X-Forwarded-For` both become `HTTP_X_FORWARDED_FOR`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    /// Passes them on.
    Allow,
    /// Removes them from the request (nginx's `underscores_in_headers off`).
    Drop,
    /// Answers 400 (Envoy's edge-proxy recommendation).
    #[default]
    Reject,
}

impl fmt::Display for UnderscoreHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            UnderscoreHeaders::Allow => "allow",
            UnderscoreHeaders::Drop => "drop",
            UnderscoreHeaders::Reject => "reject",
        })
    }
}

/// An IP network in CIDR form (`10.0.0.0/8`, `fd00::/8`); a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address counts as its IPv4 form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid network {s:?}: expected an address or ADDRESS/PREFIX, such as 10.0.0.0/8, 127.0.0.1 or fd00::/8"
            )
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

pub mod defaults {
    pub fn yes() -> bool {
        true
    }
    /// Request header fields per request: 100, nginx's and Envoy's order of magnitude
    /// (Envoy's `max_headers_count` is 100).
    pub fn max_header_count() -> u32 {
        100
    }
    /// Bytes of a whole request head: 32 KiB, nginx's `large_client_header_buffers` (4 × 8k)
    /// and hyper's order of magnitude.
    pub fn max_header_bytes() -> u32 {
        32 * 1024
    }
    /// HTTP/2 streams a client may have open at once: 100, Envoy's edge recommendation and
    /// the floor RFC 9113 suggests.
    pub fn h2_max_concurrent_streams() -> u32 {
        100
    }
    /// Connections served at once over all listeners: 50,000.
    pub fn global_max_connections() -> u32 {
        50_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_contain_their_addresses_and_no_others() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:10.1.0.9".parse().unwrap()),
            "v4-mapped"
        );
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
    }

    #[test]
    fn bad_networks_say_what_would_be_right() {
        for s in ["10.0.0.0/33", "10.0.0/8", "fd00::/129", "x"] {
            let e = s.parse::<IpNet>().unwrap_err();
            assert!(e.contains("10.0.0.0/8"), "{e}");
        }
    }
}
