//! Validation of a whole configuration. It collects every error rather than stopping at the
//! first, and each error names the field it is about (`routes[1].service`) so that the config
//! file loader can point at the line and the API can name the field in its JSON error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

use crate::spec::MAX_WEIGHT;
use crate::{Config, Duration, HeaderRules, ListenerSpec, Protocol, ServiceSpec};

/// One step in the path to a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// Where a field is: `services.web.endpoints[1].weight`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    pub fn key(mut self, k: impl Into<String>) -> Self {
        self.0.push(Segment::Key(k.into()));
        self
    }
    pub fn index(mut self, i: usize) -> Self {
        self.0.push(Segment::Index(i));
        self
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A field that holds a value that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub path: FieldPath,
    pub message: String,
}

fn path(root: &str) -> FieldPath {
    FieldPath::default().key(root)
}

/// Checks a configuration; returns every problem found, or `Ok` if there is none.
pub fn validate(config: &Config) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut err = |path: FieldPath, message: String| errors.push(FieldError { path, message });

    let mut listener_names: HashMap<&str, usize> = HashMap::new();
    let mut listener_addrs: Vec<(SocketAddr, usize)> = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let p = path("listeners").index(i);
        if let Err(m) = check_name(&l.name) {
            err(p.clone().key("name"), m);
        }
        if let Some(first) = listener_names.insert(&l.name, i) {
            err(
                p.clone().key("name"),
                format!(
                    "listener name {:?} is already used by listeners[{first}]",
                    l.name
                ),
            );
        }
        for &(other, j) in &listener_addrs {
            if addresses_clash(other, l.listen) {
                err(
                    p.clone().key("listen"),
                    format!(
                        "{} overlaps listeners[{j}] ({other}): two listeners cannot share a port",
                        l.listen
                    ),
                );
            }
        }
        listener_addrs.push((l.listen, i));
        if l.max_connections == 0 {
            err(
                p.clone().key("max_connections"),
                "must be at least 1".into(),
            );
        }
        positive(
            &mut err,
            p.clone().key("request_header_timeout"),
            l.request_header_timeout,
        );
        positive(&mut err, p.clone().key("idle_timeout"), l.idle_timeout);
        positive(&mut err, p.clone().key("send_timeout"), l.send_timeout);
        check_limits(&mut err, &p, l);
    }
    if config.global.max_connections == 0 {
        err(
            path("global").key("max_connections"),
            "must be at least 1".into(),
        );
    }

    let tcp: HashSet<&str> = config
        .listeners
        .iter()
        .filter(|l| l.protocol == Protocol::Tcp)
        .map(|l| l.name.as_str())
        .collect();
    let mut tcp_routes: HashMap<&str, usize> = HashMap::new();
    let mut seen_routes: HashMap<(&str, Option<&str>, Option<&str>), usize> = HashMap::new();
    for (i, r) in config.routes.iter().enumerate() {
        let p = path("routes").index(i);
        if !tcp.contains(r.listener.as_str())
            && config
                .services
                .get(&r.service)
                .is_some_and(|s| s.proxy_protocol.is_some())
        {
            err(
                path("services").key(&r.service).key("proxy_protocol"),
                format!(
                    "is sent on TCP listeners only for now, but HTTP listener {:?} routes to this service; use a TCP listener or leave proxy_protocol out",
                    r.listener
                ),
            );
        }
        if let Some(s) = config.services.get(&r.service)
            && tcp.contains(r.listener.as_str())
        {
            let http_only = [
                ("tls", s.tls.is_some()),
                (
                    "upstream_protocol",
                    s.upstream_protocol != Default::default(),
                ),
            ];
            for (field, set) in http_only {
                if set {
                    err(
                        path("services").key(&r.service).key(field),
                        format!(
                            "applies to HTTP listeners only, but TCP listener {:?} routes to this service; leave {field} out, or pass TLS through untouched",
                            r.listener
                        ),
                    );
                }
            }
        }
        // A TCP listener routes by the TLS server name (SNI) alone: routes with distinct hosts,
        // and at most one without, for every other name.
        if let Some(name) = tcp.get(r.listener.as_str()).copied() {
            if r.path_prefix.is_some() {
                err(
                    p.clone().key("path_prefix"),
                    format!(
                        "listener {name:?} is a TCP listener, which sees no path: leave path_prefix out (a TCP route may have a host, matched against the TLS server name)"
                    ),
                );
            }
            if r.host.is_none()
                && let Some(first) = tcp_routes.insert(name, i)
            {
                err(
                    p.clone().key("host"),
                    format!(
                        "TCP listener {name:?} already sends connections for any server name to routes[{first}]'s service; give one of them a host (matched against the TLS server name)"
                    ),
                );
            }
        }
        if !listener_names.contains_key(r.listener.as_str()) {
            err(
                p.clone().key("listener"),
                format!(
                    "no listener named {:?}; {}",
                    r.listener,
                    known(
                        "listeners",
                        config.listeners.iter().map(|l| l.name.as_str())
                    )
                ),
            );
        }
        if !config.services.contains_key(&r.service) {
            err(
                p.clone().key("service"),
                format!(
                    "no service named {:?}; {}",
                    r.service,
                    known("services", config.services.keys().map(String::as_str))
                ),
            );
        }
        if let Some(host) = &r.host
            && let Err(m) = check_host(host)
        {
            err(p.clone().key("host"), m);
        }
        if let Some(prefix) = &r.path_prefix
            && (!prefix.starts_with('/') || prefix.bytes().any(|b| b.is_ascii_whitespace()))
        {
            err(
                p.clone().key("path_prefix"),
                format!("{prefix:?} must start with '/' and contain no spaces, such as \"/api\""),
            );
        }
        for (field, rules) in [
            ("request_headers", &r.request_headers),
            ("response_headers", &r.response_headers),
        ] {
            check_header_rules(&mut err, &p.clone().key(field), rules);
        }
        let key = (
            r.listener.as_str(),
            r.host.as_deref(),
            r.path_prefix.as_deref(),
        );
        if let Some(first) = seen_routes.insert(key, i) {
            err(
                p.clone(),
                format!("routes[{first}] already matches the same listener, host and path prefix"),
            );
        }
    }

    for (name, s) in &config.services {
        let p = path("services").key(name);
        if let Err(m) = check_name(name) {
            err(p.clone(), m);
        }
        check_service(&mut err, &p, s);
    }
    check_service(
        &mut err,
        &path("docker").key("defaults"),
        &config.docker.defaults,
    );

    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Checks a listener's TLS settings and its limits on what clients send.
fn check_limits(err: &mut impl FnMut(FieldPath, String), p: &FieldPath, l: &ListenerSpec) {
    if let Some(tls) = &l.tls {
        if tls.certificates.is_empty() {
            err(
                p.clone().key("tls").key("certificates"),
                "needs at least one certificate, such as [{ cert = \"site.pem\", key = \"site.key\" }]"
                    .into(),
            );
        }
        for (i, files) in tls.certificates.iter().enumerate() {
            for (field, path) in [("cert", &files.cert), ("key", &files.key)] {
                if path.as_os_str().is_empty() {
                    err(
                        p.clone().key("tls").key("certificates").index(i).key(field),
                        "must name a PEM file, such as \"/etc/drover/site.pem\"".into(),
                    );
                }
            }
        }
        let keys = p.clone().key("tls").key("session_ticket_keys");
        if !tls.session_tickets && !tls.session_ticket_keys.is_empty() {
            err(
                keys.clone(),
                "lists keys for session tickets, which session_tickets = false turns off; remove one of the two"
                    .into(),
            );
        }
        for (i, path) in tls.session_ticket_keys.iter().enumerate() {
            if path.as_os_str().is_empty() {
                err(
                    keys.clone().index(i),
                    "must name a file of 48 or 80 random bytes, such as \"/etc/drover/ticket.key\""
                        .into(),
                );
            }
        }
    }
    for (field, value, least) in [
        ("max_header_count", l.max_header_count, 1),
        ("max_header_bytes", l.max_header_bytes, 1024),
        ("h2_max_concurrent_streams", l.h2_max_concurrent_streams, 1),
    ] {
        if value < least {
            err(p.clone().key(field), format!("must be at least {least}"));
        }
    }
}

/// Checks one service's settings and endpoints, reporting under `p`.
pub fn check_service(err: &mut impl FnMut(FieldPath, String), p: &FieldPath, s: &ServiceSpec) {
    positive(err, p.clone().key("connect_timeout"), s.connect_timeout);
    positive(err, p.clone().key("response_timeout"), s.response_timeout);
    if let Some(hc) = &s.health_check {
        let hp = p.clone().key("health_check");
        positive(err, hp.clone().key("interval"), hc.interval);
        positive(err, hp.clone().key("timeout"), hc.timeout);
        for (name, n) in [("fall", hc.fall), ("rise", hc.rise)] {
            if !(1..=100).contains(&n) {
                err(
                    hp.clone().key(name),
                    format!("{n} is out of range: use 1 to 100"),
                );
            }
        }
        if !hc.path.starts_with('/') || hc.path.bytes().any(|b| b.is_ascii_whitespace()) {
            err(
                hp.clone().key("path"),
                format!(
                    "{:?} must start with '/' and contain no spaces, such as \"/healthz\"",
                    hc.path
                ),
            );
        }
        if let Some(host) = &hc.host
            && let Err(m) = check_host(host)
        {
            err(hp.key("host"), m);
        }
    }
    if s.outlier.max_ejected_percent > 100 {
        err(
            p.clone().key("outlier").key("max_ejected_percent"),
            format!(
                "{} is out of range: use 0 to 100",
                s.outlier.max_ejected_percent
            ),
        );
    }
    if !(1..=10).contains(&s.retries.attempts) {
        err(
            p.clone().key("retries").key("attempts"),
            format!(
                "{} is out of range: use 1 (no retry) to 10",
                s.retries.attempts
            ),
        );
    }
    if s.retries.budget_percent > 100 {
        err(
            p.clone().key("retries").key("budget_percent"),
            format!("{} is out of range: use 0 to 100", s.retries.budget_percent),
        );
    }
    if let Some(t) = s.retries.per_try_timeout {
        positive(err, p.clone().key("retries").key("per_try_timeout"), t);
    }
    if let Some(sticky) = &s.sticky {
        let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
        if sticky.cookie.is_empty() || !sticky.cookie.bytes().all(token) {
            err(
                p.clone().key("sticky").key("cookie"),
                format!(
                    "{:?} is not a valid cookie name: use letters, digits, '-' or '_'",
                    sticky.cookie
                ),
            );
        }
        positive(err, p.clone().key("sticky").key("expire"), sticky.expire);
    }
    if let Some(c) = &s.compression {
        let cp = p.clone().key("compression");
        if c.algorithms.is_empty() {
            err(
                cp.clone().key("algorithms"),
                "name at least one: \"br\" or \"gzip\"; leave compression out to turn it off"
                    .into(),
            );
        }
        let token = |x: &str| {
            !x.is_empty()
                && x.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
        };
        for (i, t) in c.types.iter().enumerate() {
            if !t.split_once('/').is_some_and(|(a, b)| token(a) && token(b)) {
                err(
                    cp.clone().key("types").index(i),
                    format!(
                        "{t:?} is not a media type; write one such as \"text/html\", without parameters"
                    ),
                );
            }
        }
    }
    if let Some(tls) = &s.tls {
        let tp = p.clone().key("tls");
        if let Some(ca) = &tls.ca
            && ca.as_os_str().is_empty()
        {
            err(
                tp.clone().key("ca"),
                "is empty: give the path of a PEM bundle of CA certificates, or leave ca out to use the system's roots".into(),
            );
        }
        match (&tls.cert, &tls.key) {
            (Some(_), None) => err(
                tp.clone().key("cert"),
                "needs key, the client certificate's private key: add key = \"client.key\"".into(),
            ),
            (None, Some(_)) => err(
                tp.clone().key("key"),
                "needs cert, the client certificate it goes with: add cert = \"client.pem\"".into(),
            ),
            _ => {}
        }
        for (field, path) in [("cert", &tls.cert), ("key", &tls.key)] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                err(
                    tp.clone().key(field),
                    "is empty: give the path of a PEM file, such as \"/etc/drover/client.pem\""
                        .into(),
                );
            }
        }
        if let Some(name) = &tls.server_name
            && !is_dns_name(name)
        {
            err(
                tp.key("server_name"),
                format!(
                    "{name:?} is not a valid DNS name: write one such as \"api.example.com\", or leave server_name out to verify the endpoint's IP address"
                ),
            );
        }
    }
    let mut addrs: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for (j, e) in s.endpoints.iter().enumerate() {
        let ep = p.clone().key("endpoints").index(j);
        if !(1..=MAX_WEIGHT).contains(&e.weight) {
            err(
                ep.clone().key("weight"),
                format!("weight {} is out of range: use 1 to {MAX_WEIGHT}", e.weight),
            );
        }
        if let Some(first) = addrs.insert(e.address, j) {
            err(
                ep.key("address"),
                format!(
                    "{} is already endpoints[{first}] of this service",
                    e.address
                ),
            );
        }
    }
}

/// Whether `name` is a DNS name a certificate can be checked against: dot-separated labels
/// of letters, digits and inner hyphens, 63 bytes each, 253 in all, and not an IP address.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Headers that frame a message or describe its connection: drover sets them, rules may not.
const FRAMING_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn check_header_rules(err: &mut impl FnMut(FieldPath, String), p: &FieldPath, rules: &HeaderRules) {
    let token = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let name_problem = |name: &str| {
        if !token(name) {
            Some(format!(
                "{name:?} is not a header name: use letters, digits and '-', such as \"X-Request-Source\""
            ))
        } else if FRAMING_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            Some(format!(
                "{name} frames the message or its connection, which drover manages; rules cannot change it"
            ))
        } else {
            None
        }
    };
    for (i, name) in rules.remove.iter().enumerate() {
        if let Some(m) = name_problem(name) {
            err(p.clone().key("remove").index(i), m);
        }
    }
    for (field, map) in [("set", &rules.set), ("add", &rules.add)] {
        for (name, value) in map {
            if let Some(m) = name_problem(name) {
                err(p.clone().key(field).key(name), m);
            }
            if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                err(
                    p.clone().key(field).key(name),
                    "a header value cannot hold control characters such as line breaks".into(),
                );
            }
        }
    }
}

fn positive(err: &mut impl FnMut(FieldPath, String), p: FieldPath, d: Duration) {
    if d.get().is_zero() {
        err(p, "must be longer than zero, such as \"5s\"".into());
    }
}

/// Two listen addresses clash when they would fight over one port: the same address, or the
/// same port where one side is the unspecified address of the same family.
fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
}

fn known<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.map(|n| format!("{n:?}")).collect();
    if names.is_empty() {
        format!("no {what} are defined")
    } else {
        format!("defined {what}: {}", names.join(", "))
    }
}

/// Names of listeners and services: 1 to 128 of `A-Z a-z 0-9 _ . -`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1 to 128 letters, digits, '_', '.' or '-'"
        ))
    }
}

/// Hosts in routes: lowercase DNS names, optionally with one leading `*.` label.
pub fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid host {host:?}: use a lowercase DNS name without port, such as \"example.com\" or \"*.example.com\""
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EndpointSpec, ListenerSpec, ListenerTls, RouteSpec, ServiceSpec};

    fn base() -> Config {
        Config::embedded_default("127.0.0.1:8080".parse().unwrap())
    }

    fn messages(c: &Config) -> Vec<String> {
        validate(c)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_embedded_default_is_valid() {
        validate(&base()).unwrap();
    }

    #[test]
    fn upstream_tls_and_http2_are_refused_behind_a_tcp_listener() {
        let mut c = base();
        c.listeners[0].protocol = Protocol::Tcp;
        let service = c.services.get_mut("default").unwrap();
        service.tls = Some(Default::default());
        service.upstream_protocol = crate::UpstreamProtocol::Http2;
        let m = messages(&c);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].starts_with("services.default.tls: applies to HTTP listeners only"));
        assert!(m[1].starts_with("services.default.upstream_protocol: applies to HTTP"));
    }

    #[test]
    fn a_route_to_a_missing_service_names_the_field_and_the_choices() {
        let mut c = base();
        c.routes[0].service = "api".into();
        assert_eq!(
            messages(&c),
            [r#"routes[0].service: no service named "api"; defined services: "default""#]
        );
    }

    #[test]
    fn two_listeners_on_one_port_clash_including_the_wildcard_address() {
        let mut c = base();
        let mut second: ListenerSpec = c.listeners[0].clone();
        second.name = "other".into();
        second.listen = "0.0.0.0:8080".parse().unwrap();
        c.listeners.push(second);
        let m = messages(&c);
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].starts_with("listeners[1].listen: 0.0.0.0:8080 overlaps listeners[0]"));
        // Different ports, or different families, do not clash.
        c.listeners[1].listen = "[::]:8080".parse().unwrap();
        validate(&c).unwrap();
    }

    #[test]
    fn header_rules_name_headers_and_leave_framing_alone() {
        let mut c = base();
        c.routes[0].response_headers.remove = vec!["ETag".into(), "bad name".into()];
        c.routes[0]
            .request_headers
            .set
            .insert("Transfer-Encoding".into(), "chunked".into());
        c.routes[0]
            .request_headers
            .add
            .insert("X-Via".into(), "a\r\nb".into());
        let m = messages(&c);
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(
            m[0].starts_with(
                "routes[0].request_headers.set.Transfer-Encoding: Transfer-Encoding frames"
            ),
            "{m:?}"
        );
        assert!(
            m[1].starts_with(
                "routes[0].request_headers.add.X-Via: a header value cannot hold control"
            ),
            "{m:?}"
        );
        assert!(
            m[2].starts_with(
                "routes[0].response_headers.remove[1]: \"bad name\" is not a header name"
            ),
            "{m:?}"
        );
    }

    #[test]
    fn weights_hosts_prefixes_and_duplicates_are_checked() {
        let mut c = base();
        let ep = |a: &str, w| EndpointSpec::new(a.parse().unwrap(), w);
        c.services.insert(
            "web".into(),
            ServiceSpec {
                endpoints: vec![ep("127.0.0.1:1", 0), ep("127.0.0.1:1", 2)],
                ..Default::default()
            },
        );
        c.routes.push(RouteSpec {
            host: Some("Example.com".into()),
            path_prefix: Some("api".into()),
            ..RouteSpec::new("default", "web")
        });
        c.routes.push(c.routes[0].clone());
        let m = messages(&c);
        let fields: Vec<&str> = m.iter().map(|s| s.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "routes[1].host",
                "routes[1].path_prefix",
                "routes[2]",
                "services.web.endpoints[0].weight",
                "services.web.endpoints[1].address",
            ]
        );
    }

    #[test]
    fn tcp_routes_have_distinct_hosts_one_fallback_and_no_path() {
        let mut c = base();
        c.listeners.push(ListenerSpec::new(
            "tls",
            "127.0.0.1:8443".parse().unwrap(),
            Protocol::Tcp,
        ));
        let route = |host: Option<&str>| RouteSpec {
            host: host.map(String::from),
            ..RouteSpec::new("tls", "default")
        };
        c.routes.push(route(Some("a.example.com")));
        c.routes.push(route(Some("*.example.com")));
        c.routes.push(route(None));
        validate(&c).unwrap();
        c.routes.push(route(None));
        c.routes.push(RouteSpec {
            path_prefix: Some("/x".into()),
            ..route(Some("b.example.com"))
        });
        let m = messages(&c);
        assert!(
            m.iter().any(|e| e.starts_with(
                "routes[4].host: TCP listener \"tls\" already sends connections for any server name to routes[3]"
            )),
            "{m:?}"
        );
        assert!(
            m.iter().any(|e| e.starts_with(
                "routes[5].path_prefix: listener \"tls\" is a TCP listener, which sees no path"
            )),
            "{m:?}"
        );
    }

    #[test]
    fn session_ticket_key_files_need_paths_and_tickets_on() {
        let mut c = base();
        let tls = |keys: &[&str], session_tickets: bool| ListenerTls {
            certificates: vec![crate::CertificateFiles {
                cert: "/etc/drover/site.pem".into(),
                key: "/etc/drover/site.key".into(),
            }],
            min_version: Default::default(),
            http2: true,
            session_tickets,
            session_ticket_keys: keys.iter().map(Into::into).collect(),
        };
        c.listeners[0].tls = Some(tls(
            &["/etc/drover/ticket.key", "/etc/drover/old.key"],
            true,
        ));
        validate(&c).unwrap();
        c.listeners[0].tls = Some(tls(&["/etc/drover/ticket.key", ""], false));
        assert_eq!(
            messages(&c),
            [
                "listeners[0].tls.session_ticket_keys: lists keys for session tickets, which session_tickets = false turns off; remove one of the two",
                "listeners[0].tls.session_ticket_keys[1]: must name a file of 48 or 80 random bytes, such as \"/etc/drover/ticket.key\"",
            ]
        );
    }

    #[test]
    fn upstream_tls_needs_a_dns_server_name_and_a_ca_path() {
        let mut c = base();
        let tls = |ca: &str, name: &str| ServiceSpec {
            tls: Some(crate::UpstreamTls {
                ca: Some(ca.into()),
                server_name: Some(name.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.services
            .insert("good".into(), tls("/etc/ca.pem", "api.example.com"));
        validate(&c).unwrap();
        c.services.insert("bad".into(), tls("", "not a name"));
        c.services.insert("ip".into(), tls("/ca.pem", "10.0.0.1"));
        let m = messages(&c);
        let fields: Vec<&str> = m.iter().map(|s| s.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "services.bad.tls.ca",
                "services.bad.tls.server_name",
                "services.ip.tls.server_name",
            ],
            "{m:?}"
        );
        assert!(m[1].contains("\"api.example.com\""), "{m:?}");
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_a_key_its_certificate() {
        let mut c = base();
        let tls = |cert: Option<&str>, key: Option<&str>| ServiceSpec {
            tls: Some(crate::UpstreamTls {
                cert: cert.map(Into::into),
                key: key.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.services
            .insert("both".into(), tls(Some("/c.pem"), Some("/c.key")));
        validate(&c).unwrap();
        c.services.insert("cert".into(), tls(Some("/c.pem"), None));
        c.services.insert("key".into(), tls(None, Some("/c.key")));
        c.services
            .insert("empty".into(), tls(Some(""), Some("/c.key")));
        let m = messages(&c);
        let fields: Vec<&str> = m.iter().map(|s| s.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "services.cert.tls.cert",
                "services.empty.tls.cert",
                "services.key.tls.key",
            ],
            "{m:?}"
        );
        assert!(m[0].contains("key = \"client.key\""), "{m:?}");
        assert!(m[2].contains("cert = \"client.pem\""), "{m:?}");
    }
}
