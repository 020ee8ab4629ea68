//! What a container's labels ask for.
//!
//! docker-loadbalancer's three labels work unchanged: `lb.enable=Y` makes a container
//! eligible, `lb.publish=PORT` is the port drover listens on, `lb.target=PORT` the container
//! port it forwards to. The `drover.*` labels add what Traefik's users expect: several
//! services on one port by host and path, the policy, a weight, a health check, stickiness.
//! docs/docker.md lists them all.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use drover_model::{Duration, Policy, Protocol, StickyMode};

pub const LB_ENABLE: &str = "lb.enable";
pub const LB_PUBLISH: &str = "lb.publish";
pub const LB_TARGET: &str = "lb.target";
pub const ENABLE: &str = "drover.enable";
pub const PUBLISH: &str = "drover.publish";
pub const PORT: &str = "drover.port";
pub const SERVICE: &str = "drover.service";
pub const PROTOCOL: &str = "drover.protocol";
pub const HOST: &str = "drover.host";
pub const PATH: &str = "drover.path";
pub const POLICY: &str = "drover.policy";
pub const WEIGHT: &str = "drover.weight";
pub const NETWORK: &str = "drover.network";
pub const STICKY: &str = "drover.sticky";
pub const CHECK_PATH: &str = "drover.healthcheck.path";
pub const CHECK_INTERVAL: &str = "drover.healthcheck.interval";
pub const TLS_CERT: &str = "drover.tls.cert";

/// Every `drover.*` label; any other is a typo, reported as such.
pub const DROVER_LABELS: &[&str] = &[
    ENABLE,
    PUBLISH,
    PORT,
    SERVICE,
    PROTOCOL,
    HOST,
    PATH,
    POLICY,
    WEIGHT,
    NETWORK,
    STICKY,
    CHECK_PATH,
    CHECK_INTERVAL,
    TLS_CERT,
];

/// What one eligible container's labels ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    /// Where drover listens: `lb.publish`.
    pub listen: SocketAddr,
    /// `http`, or `tcp` for a layer-4 listener: `drover.protocol`.
    pub protocol: Protocol,
    /// The container port: `lb.target`; None means its only exposed port.
    pub target: Option<u16>,
    pub service: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
    pub policy: Option<Policy>,
    pub weight: u32,
    pub network: Option<String>,
    /// `Some(None)`: stickiness turned off; `Some(Some(mode))`: turned on.
    pub sticky: Option<Option<StickyMode>>,
    pub check_path: Option<String>,
    pub check_interval: Option<Duration>,
}

/// A label that cannot be used, with what would be right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelError {
    pub label: String,
    pub value: String,
    pub why: String,
}

impl std::fmt::Display for LabelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "label {}={:?} {}", self.label, self.value, self.why)
    }
}

/// Reads a container's labels: None when it does not ask to be balanced.
pub fn parse(labels: &HashMap<String, String>) -> Result<Option<Wanted>, LabelError> {
    let get = |key: &str| labels.get(key).map(|v| v.trim());
    let bad = |label: &str, value: &str, why: &str| LabelError {
        label: label.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    };
    let enabled = [LB_ENABLE, ENABLE]
        .into_iter()
        .filter_map(|k| get(k).map(|v| (k, v)))
        .try_fold(false, |on, (k, v)| {
            yes_no(v)
                .map(|b| on || b)
                .ok_or_else(|| bad(k, v, "must be Y or N (also true/false, yes/no, 1/0)"))
        })?;
    if !enabled {
        return Ok(None);
    }
    if let Some(unknown) = labels
        .keys()
        .filter(|k| k.starts_with("drover.") && !DROVER_LABELS.contains(&k.as_str()))
        .min()
    {
        return Err(bad(
            unknown,
            &labels[unknown],
            &format!("is not a drover label; known: {}", DROVER_LABELS.join(", ")),
        ));
    }
    let one_of = |a: &'static str, b: &'static str| match (get(a), get(b)) {
        (Some(x), Some(y)) if x != y => Err(bad(
            b,
            y,
            &format!("contradicts {a}={x:?}; give one of them"),
        )),
        (Some(x), _) => Ok(Some((a, x))),
        (None, Some(y)) => Ok(Some((b, y))),
        (None, None) => Ok(None),
    };
    let listen = match one_of(LB_PUBLISH, PUBLISH)? {
        Some((label, v)) => parse_publish(v).map_err(|why| bad(label, v, &why))?,
        None => {
            return Err(bad(
                LB_PUBLISH,
                "",
                "is missing: an enabled container needs lb.publish=PORT, the port drover listens on",
            ));
        }
    };
    let target = match one_of(LB_TARGET, PORT)? {
        Some((label, v)) => Some(port(v).ok_or_else(|| {
            bad(
                label,
                v,
                "is not a port number: write a port from 1 to 65535, such as 80",
            )
        })?),
        None => None,
    };
    let protocol = match get(PROTOCOL).map(str::to_ascii_lowercase).as_deref() {
        None | Some("http") => Protocol::Http,
        Some("tcp") => Protocol::Tcp,
        Some(_) => {
            let v = get(PROTOCOL).unwrap_or_default();
            return Err(bad(PROTOCOL, v, "names no protocol; use http or tcp"));
        }
    };
    if protocol == Protocol::Tcp {
        for label in [HOST, PATH] {
            if let Some(v) = get(label) {
                return Err(bad(
                    label,
                    v,
                    "cannot be used with drover.protocol=tcp: a TCP listener sees no host or path",
                ));
            }
        }
    }
    if let Some(v) = get(TLS_CERT) {
        return Err(bad(
            TLS_CERT,
            v,
            "asks for TLS, which this version does not terminate yet; the container is left out rather than served without TLS",
        ));
    }
    let service = match get(SERVICE) {
        Some(v) => {
            drover_model::validate::check_name(v).map_err(|e| bad(SERVICE, v, &e))?;
            Some(v.to_string())
        }
        None => None,
    };
    let host = match get(HOST) {
        Some(v) => {
            let host = v.to_ascii_lowercase();
            drover_model::validate::check_host(&host).map_err(|e| bad(HOST, v, &e))?;
            Some(host)
        }
        None => None,
    };
    let path = match get(PATH) {
        Some(v) => Some(url_path(v).map_err(|why| bad(PATH, v, &why))?),
        None => None,
    };
    let policy = match get(POLICY) {
        Some(v) => Some(
            serde_json::from_value::<Policy>(serde_json::Value::String(v.into())).map_err(
                |_| {
                    bad(
                        POLICY,
                        v,
                        "names no policy; use round_robin, least_conn, random, p2c_ewma or consistent_hash",
                    )
                },
            )?,
        ),
        None => None,
    };
    let weight = match get(WEIGHT) {
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|w| (1..=drover_model::spec::MAX_WEIGHT).contains(w))
            .ok_or_else(|| bad(WEIGHT, v, "must be a whole number from 1 to 256"))?,
        None => 1,
    };
    let sticky = match get(STICKY) {
        Some(v) => Some(match v.to_ascii_lowercase().as_str() {
            "cookie" => Some(StickyMode::Cookie),
            "source_ip" | "src" => Some(StickyMode::SourceIp),
            "off" | "none" | "false" | "n" => None,
            _ => return Err(bad(STICKY, v, "must be cookie, source_ip or off")),
        }),
        None => None,
    };
    let check_path = match get(CHECK_PATH) {
        Some(v) => Some(url_path(v).map_err(|why| bad(CHECK_PATH, v, &why))?),
        None => None,
    };
    let check_interval = match get(CHECK_INTERVAL) {
        Some(v) => Some(
            v.parse::<Duration>()
                .ok()
                .filter(|d| !d.get().is_zero())
                .ok_or_else(|| {
                    bad(
                        CHECK_INTERVAL,
                        v,
                        "is not a duration; write one such as 5s or 500ms",
                    )
                })?,
        ),
        None => None,
    };
    Ok(Some(Wanted {
        listen,
        protocol,
        target,
        service,
        host,
        path,
        policy,
        weight,
        network: get(NETWORK).filter(|v| !v.is_empty()).map(str::to_string),
        sticky,
        check_path,
        check_interval,
    }))
}

/// docker-loadbalancer's `Y`; the usual spellings of yes and no too.
fn yes_no(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "y" | "yes" | "true" | "1" | "on" => Some(true),
        "n" | "no" | "false" | "0" | "off" => Some(false),
        _ => None,
    }
}

fn port(v: &str) -> Option<u16> {
    v.parse::<u16>().ok().filter(|p| *p > 0)
}

/// `PORT` (every IPv4 address) or `IP:PORT`, as the seed's template binds `IP:PORT` or `*:PORT`.
fn parse_publish(v: &str) -> Result<SocketAddr, String> {
    if let Some(p) = port(v) {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p));
    }
    match v.parse::<SocketAddr>() {
        Ok(a) if a.port() > 0 => Ok(a),
        _ => Err("is not a port: write PORT or IP:PORT, such as 80 or 127.0.0.1:80".into()),
    }
}

fn url_path(v: &str) -> Result<String, String> {
    if v.starts_with('/')
        && !v
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        Ok(v.to_string())
    } else {
        Err("must start with '/' and contain no spaces, such as /api".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_seeds_three_labels_work_unchanged() {
        let w = parse(&labels(&[
            ("lb.enable", "Y"),
            ("lb.publish", "80"),
            ("lb.target", "8080"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(w.target, Some(8080));
        assert_eq!((w.weight, w.policy, w.host), (1, None, None));
        let w = parse(&labels(&[
            ("lb.enable", "y"),
            ("lb.publish", "127.0.0.1:81"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.listen, "127.0.0.1:81".parse().unwrap());
        assert_eq!(w.target, None);
    }

    #[test]
    fn containers_without_the_enable_label_or_with_n_are_not_balanced() {
        assert_eq!(parse(&labels(&[("lb.publish", "80")])), Ok(None));
        assert_eq!(
            parse(&labels(&[("lb.enable", "N"), ("lb.publish", "80")])),
            Ok(None)
        );
        assert_eq!(parse(&labels(&[("com.example", "x")])), Ok(None));
    }

    #[test]
    fn drover_labels_set_routing_and_balancing() {
        let w = parse(&labels(&[
            ("drover.enable", "true"),
            ("drover.publish", "8000"),
            ("drover.port", "3000"),
            ("drover.host", "API.example.com"),
            ("drover.path", "/v1"),
            ("drover.policy", "round_robin"),
            ("drover.weight", "5"),
            ("drover.sticky", "cookie"),
            ("drover.service", "api"),
            ("drover.network", "backend"),
            ("drover.healthcheck.path", "/healthz"),
            ("drover.healthcheck.interval", "2s"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.host.as_deref(), Some("api.example.com"));
        assert_eq!(w.path.as_deref(), Some("/v1"));
        assert_eq!(w.policy, Some(Policy::RoundRobin));
        assert_eq!(w.weight, 5);
        assert_eq!(w.sticky, Some(Some(StickyMode::Cookie)));
        assert_eq!(w.service.as_deref(), Some("api"));
        assert_eq!(w.network.as_deref(), Some("backend"));
        assert_eq!(w.check_path.as_deref(), Some("/healthz"));
        assert_eq!(w.check_interval, Some("2s".parse().unwrap()));
    }

    #[test]
    fn bad_labels_name_the_label_and_say_what_is_right() {
        for (pairs, label, says) in [
            (
                &[("lb.enable", "Y"), ("lb.publish", "eighty")][..],
                "lb.publish",
                "write PORT or IP:PORT",
            ),
            (
                &[("lb.enable", "Y"), ("lb.publish", "80"), ("lb.target", "0")],
                "lb.target",
                "from 1 to 65535",
            ),
            (&[("lb.enable", "Y")], "lb.publish", "is missing"),
            (
                &[("lb.enable", "maybe"), ("lb.publish", "80")],
                "lb.enable",
                "Y or N",
            ),
            (
                &[
                    ("lb.enable", "Y"),
                    ("lb.publish", "80"),
                    ("drover.policy", "fastest"),
                ],
                "drover.policy",
                "least_conn",
            ),
            (
                &[
                    ("lb.enable", "Y"),
                    ("lb.publish", "80"),
                    ("drover.weight", "1000"),
                ],
                "drover.weight",
                "1 to 256",
            ),
            (
                &[
                    ("lb.enable", "Y"),
                    ("lb.publish", "80"),
                    ("drover.polcy", "random"),
                ],
                "drover.polcy",
                "is not a drover label",
            ),
            (
                &[
                    ("lb.enable", "Y"),
                    ("lb.publish", "80"),
                    ("drover.publish", "81"),
                ],
                "drover.publish",
                "contradicts lb.publish",
            ),
            (
                &[
                    ("lb.enable", "Y"),
                    ("lb.publish", "80"),
                    ("drover.protocol", "udp"),
                ],
                "drover.protocol",
                "use http or tcp",
            ),
            (
                &[
                    ("lb.enable", "Y"),
                    ("lb.publish", "80"),
                    ("drover.protocol", "tcp"),
                    ("drover.host", "a.example"),
                ],
                "drover.host",
                "sees no host or path",
            ),
            (
                &[
                    ("lb.enable", "Y"),
                    ("lb.publish", "80"),
                    ("drover.path", "api"),
                ],
                "drover.path",
                "start with '/'",
            ),
        ] {
            let e = parse(&labels(pairs)).unwrap_err();
            assert_eq!(e.label, label, "{pairs:?}");
            assert!(e.to_string().contains(says), "{pairs:?}: {e}");
        }
    }
}
