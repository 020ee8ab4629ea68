//! Traffic management settings of a service: health checks, outlier ejection, retries,
//! affinity. Each default names the tool it follows; docs/configuration.md repeats them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Duration;

/// Serializes a type as its `Display` form and deserializes it with its `FromStr`, whose
/// error message becomes the deserialization error.
macro_rules! serde_as_string {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Active health checking: drover probes each endpoint on a timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `http` (a GET whose status must fall in `expect_status`) or `tcp` (a connect).
    #[serde(default)]
    pub kind: CheckKind,
    /// Path of the HTTP check. `/`, weldr's.
    #[serde(default = "defaults::check_path")]
    pub path: String,
    /// Host header of the HTTP check; the endpoint's address when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Statuses that pass, as `LOW-HIGH` or one code. `200-299`, weldr's 2xx.
    #[serde(default = "defaults::expect_status")]
    pub expect_status: StatusRange,
    /// Time between checks of one endpoint. 30 s, weldr's.
    #[serde(default = "defaults::check_interval")]
    pub interval: Duration,
    /// How long a check may take before it counts as failed. 5 s.
    #[serde(default = "defaults::check_timeout")]
    pub timeout: Duration,
    /// Up to this much random delay added to each interval, so that checks of many endpoints
    /// do not fire together. 0 s.
    #[serde(default)]
    pub jitter: Duration,
    /// Consecutive failures that mark an endpoint down. 3, weldr's.
    #[serde(default = "defaults::fall")]
    pub fall: u32,
    /// Consecutive passes that bring it back. 2, weldr's.
    #[serde(default = "defaults::rise")]
    pub rise: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: CheckKind::Http,
            path: defaults::check_path(),
            host: None,
            expect_status: defaults::expect_status(),
            interval: defaults::check_interval(),
            timeout: defaults::check_timeout(),
            jitter: Duration::default(),
            fall: defaults::fall(),
            rise: defaults::rise(),
        }
    }
}

/// What an active check does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    #[default]
    Http,
    Tcp,
}

/// An inclusive range of HTTP status codes, written `200-299` or `204`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub low: u16,
    pub high: u16,
}

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl FromStr for StatusRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid status range {s:?}: write LOW-HIGH or one code, such as \"200-299\" or \"204\""
            )
        };
        let (low, high) = s.split_once('-').unwrap_or((s, s));
        let code = |x: &str| {
            x.trim()
                .parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c))
        };
        match (code(low), code(high)) {
            (Some(low), Some(high)) if low <= high => Ok(Self { low, high }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

serde_as_string!(StatusRange);

/// Passive health: endpoints that keep failing real requests are ejected for a while
/// (Envoy's outlier detection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// Consecutive 5xx answers or connect failures that eject an endpoint; 0 turns ejection
    /// off. 5, Envoy's `consecutive_5xx`.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// An ejection lasts this times the number of times the endpoint was ejected. 30 s,
    /// Envoy's `base_ejection_time`.
    #[serde(default = "defaults::base_ejection")]
    pub base_ejection: Duration,
    /// The longest ejection. 300 s, Envoy's `max_ejection_time`.
    #[serde(default = "defaults::max_ejection")]
    pub max_ejection: Duration,
    /// Never more than this share of a service's endpoints ejected at once, in percent.
    /// 50, Envoy's `max_ejection_percent` for most deployments.
    #[serde(default = "defaults::max_ejected_percent")]
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: defaults::consecutive_failures(),
            base_ejection: defaults::base_ejection(),
            max_ejection: defaults::max_ejection(),
            max_ejected_percent: defaults::max_ejected_percent(),
        }
    }
}

/// Trying a request again on another endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Tries in all, the first included. 3, HAProxy's `retries 3` with `redispatch`.
    #[serde(default = "defaults::attempts")]
    pub attempts: u32,
    /// Deadline of each try for its response head; `response_timeout` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Retries may add at most this share of the service's requests, in percent. 20.
    #[serde(default = "defaults::budget_percent")]
    pub budget_percent: u32,
    /// A request body up to this many bytes is kept so that the request can be replayed;
    /// a larger one is streamed and its request is not retried once sent. 64 KiB.
    #[serde(default = "defaults::replay_buffer")]
    pub replay_buffer: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: defaults::attempts(),
            per_try_timeout: None,
            budget_percent: defaults::budget_percent(),
            replay_buffer: defaults::replay_buffer(),
        }
    }
}

/// What `consistent_hash` hashes: `source_ip`, `path`, `header:NAME` or `cookie:NAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HashOn {
    #[default]
    SourceIp,
    Path,
    Header(String),
    Cookie(String),
}

impl FromStr for HashOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let named = |name: &str, what: &str| {
            if name.is_empty() {
                Err(format!("{what}: needs a name, such as \"{what}:X-User\""))
            } else {
                Ok(name.to_string())
            }
        };
        match s.split_once(':') {
            None if s == "source_ip" => Ok(HashOn::SourceIp),
            None if s == "path" => Ok(HashOn::Path),
            Some(("header", name)) => named(name, "header").map(HashOn::Header),
            Some(("cookie", name)) => named(name, "cookie").map(HashOn::Cookie),
            _ => Err(format!(
                "invalid hash_on {s:?}: use \"source_ip\", \"path\", \"header:NAME\" or \"cookie:NAME\""
            )),
        }
    }
}

impl fmt::Display for HashOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashOn::SourceIp => f.write_str("source_ip"),
            HashOn::Path => f.write_str("path"),
            HashOn::Header(n) => write!(f, "header:{n}"),
            HashOn::Cookie(n) => write!(f, "cookie:{n}"),
        }
    }
}

serde_as_string!(HashOn);

/// Keeping a client on one endpoint while that endpoint is healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    /// `cookie`: a cookie names the endpoint; `source_ip`: a table remembers each client IP's
    /// endpoint (HAProxy's `stick on src`, as docker-loadbalancer's template uses).
    pub mode: StickyMode,
    /// Name of the cookie. `DROVER_STICKY`.
    #[serde(default = "defaults::sticky_cookie")]
    pub cookie: String,
    /// How long a client IP is remembered after its last request. 30 min, HAProxy's
    /// `stick-table … expire 30m` as commonly written.
    #[serde(default = "defaults::sticky_expire")]
    pub expire: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StickyMode {
    Cookie,
    SourceIp,
}

/// Compressing responses for clients that accept it (HAProxy's `compression`, nginx's
/// `gzip`). A response is compressed when the client's Accept-Encoding takes one of
/// `algorithms`, its Content-Type is one of `types`, it is not compressed already, it is not
/// a HEAD or 204 or 304 answer, its Cache-Control does not say `no-transform`, and it is not
/// known to be shorter than `min_length`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Media types to compress, without parameters. docker-loadbalancer's list: text/css,
    /// text/html, text/javascript, application/javascript, text/plain, text/xml,
    /// application/json.
    #[serde(default = "defaults::compression_types")]
    pub types: Vec<String>,
    /// Encodings offered, best first, when the client accepts several. `["br", "gzip"]`.
    #[serde(default = "defaults::compression_algorithms")]
    pub algorithms: Vec<Encoding>,
    /// Responses whose Content-Length is below this many bytes go as they are. 256.
    #[serde(default = "defaults::compression_min_length")]
    pub min_length: u64,
}

impl Default for Compression {
    fn default() -> Self {
        Self {
            types: defaults::compression_types(),
            algorithms: defaults::compression_algorithms(),
            min_length: defaults::compression_min_length(),
        }
    }
}

/// A content encoding drover can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// Brotli.
    Br,
    Gzip,
}

impl Encoding {
    /// Its name in Accept-Encoding and Content-Encoding.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
        }
    }
}

pub mod defaults {
    use super::StatusRange;
    use crate::Duration;

    pub fn check_path() -> String {
        "/".into()
    }
    pub fn expect_status() -> StatusRange {
        StatusRange {
            low: 200,
            high: 299,
        }
    }
    pub fn check_interval() -> Duration {
        Duration::from_secs(30)
    }
    pub fn check_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn fall() -> u32 {
        3
    }
    pub fn rise() -> u32 {
        2
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn base_ejection() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_ejection() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_ejected_percent() -> u32 {
        50
    }
    pub fn attempts() -> u32 {
        3
    }
    pub fn budget_percent() -> u32 {
        20
    }
    pub fn replay_buffer() -> u32 {
        64 * 1024
    }
    pub fn sticky_cookie() -> String {
        "DROVER_STICKY".into()
    }
    pub fn sticky_expire() -> Duration {
        Duration::from_secs(30 * 60)
    }
    pub fn compression_types() -> Vec<String> {
        [
            "text/css",
            "text/html",
            "text/javascript",
            "application/javascript",
            "text/plain",
            "text/xml",
            "application/json",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn compression_algorithms() -> Vec<super::Encoding> {
        vec![super::Encoding::Br, super::Encoding::Gzip]
    }
    pub fn compression_min_length() -> u64 {
        256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ranges_and_hash_keys_parse_with_helpful_errors() {
        assert_eq!(
            "200-299".parse(),
            Ok(StatusRange {
                low: 200,
                high: 299
            })
        );
        assert_eq!(
            "204".parse(),
            Ok(StatusRange {
                low: 204,
                high: 204
            })
        );
        assert!(
            "299-200"
                .parse::<StatusRange>()
                .unwrap_err()
                .contains("LOW-HIGH")
        );
        assert!("2xx".parse::<StatusRange>().is_err());
        assert_eq!("header:X-User".parse(), Ok(HashOn::Header("X-User".into())));
        assert_eq!(
            "cookie:sid".parse::<HashOn>().unwrap().to_string(),
            "cookie:sid"
        );
        assert!(
            "header:"
                .parse::<HashOn>()
                .unwrap_err()
                .contains("needs a name")
        );
        assert!("ip".parse::<HashOn>().unwrap_err().contains("source_ip"));
    }
}
