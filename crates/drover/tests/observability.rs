//! Metrics and access logs, end to end: a real drover process, real origins, `GET /metrics`
//! parsed as the Prometheus text format, access log files and a FIFO read as a log shipper
//! would.
//!
//! Counters are checked for exact growth: each test reads them before and after its traffic.
//! A counter moves when a response is finished, before its last byte reaches the client, so a
//! scrape after the client has the whole response sees it; the tests still wait for a value
//! with a deadline rather than assume it.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use support::consul::ConsulDouble;
use support::dnsmasq::Dnsmasq;
use support::{
    Body, Drover, Origin, client, empty, free_port, full, origin_of, read_response, send,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// The text format, parsed strictly.

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape: its samples, and the type of each family.
#[derive(Debug)]
struct Metrics {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
    /// The samples as served, for failure messages.
    text: String,
}

impl Metrics {
    /// Parses the text format (0.0.4), panicking on anything malformed: a sample outside the
    /// family its `# TYPE` line opened, a family typed twice, a bad label or value.
    fn parse(text: &str) -> Metrics {
        let mut types = BTreeMap::new();
        let mut helps = BTreeMap::new();
        let mut family: Option<(String, String)> = None;
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let at = || format!("line {}: {line:?}", n + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
                assert!(!help.is_empty(), "empty HELP, {}", at());
                assert!(
                    helps.insert(name.to_string(), help.to_string()).is_none(),
                    "HELP twice, {}",
                    at()
                );
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "unknown type, {}",
                    at()
                );
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "family typed twice (its samples must be together), {}",
                    at()
                );
                assert!(helps.contains_key(name), "TYPE without HELP, {}", at());
                family = Some((name.to_string(), kind.to_string()));
                continue;
            }
            assert!(!line.starts_with('#'), "stray comment, {}", at());
            let sample = parse_sample(line).unwrap_or_else(|e| panic!("{e}, {}", at()));
            let (fam, kind) = family
                .as_ref()
                .unwrap_or_else(|| panic!("sample before any TYPE, {}", at()));
            let belongs = sample.name == *fam
                || match kind.as_str() {
                    "histogram" => ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| sample.name == format!("{fam}{s}")),
                    "summary" => ["_sum", "_count"]
                        .iter()
                        .any(|s| sample.name == format!("{fam}{s}")),
                    _ => false,
                };
            assert!(belongs, "sample outside its family {fam}, {}", at());
            if kind == "counter" {
                assert!(sample.value >= 0.0, "negative counter, {}", at());
            }
            samples.push(sample);
        }
        let text = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("_bucket{"))
            .collect::<Vec<_>>()
            .join("\n");
        let m = Metrics {
            samples,
            types,
            text,
        };
        m.check_histograms();
        m
    }

    /// Every histogram's buckets rise, end at +Inf, and +Inf equals `_count`.
    fn check_histograms(&self) {
        for (name, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self
                .samples
                .iter()
                .filter(|s| s.name == format!("{name}_bucket"))
            {
                let mut labels = s.labels.clone();
                let le = labels.remove("le").expect("a bucket has le");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                series.entry(labels).or_default().push((le, s.value));
            }
            for (labels, buckets) in series {
                assert!(
                    buckets
                        .windows(2)
                        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                    "{name}{labels:?}: buckets must rise: {buckets:?}"
                );
                assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
                let count = self
                    .samples
                    .iter()
                    .find(|s| s.name == format!("{name}_count") && s.labels == labels)
                    .expect("a histogram has _count")
                    .value;
                assert_eq!(buckets.last().unwrap().1, count, "{name}{labels:?}");
            }
        }
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// The value of the one sample of `name` with these labels (among others).
    fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        assert_eq!(
            found.len(),
            1,
            "{name}{labels:?}: wanted one sample, found {found:?}"
        );
        found[0].value
    }

    /// The sum of the samples of `name` with these labels (among others); 0 if none.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            let (start, c) = chars.next().ok_or("unclosed labels")?;
            if c == '}' {
                rest = &after[start + 1..];
                break;
            }
            let mut key = String::from(c);
            loop {
                let (_, c) = chars.next().ok_or("unclosed label")?;
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {key:?}"));
            }
            if chars.next().map(|x| x.1) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unclosed label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    '\n' => return Err("raw line feed in a label value".into()),
                    c => value.push(c),
                }
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            if let Some(&(_, ',')) = chars.peek() {
                chars.next();
            }
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[test]
fn the_parser_reads_escapes_and_refuses_what_is_malformed() {
    let s = parse_sample(r#"a_total{x="q\"\\\n",y=""} 3"#).unwrap();
    assert_eq!(s.labels["x"], "q\"\\\n");
    assert_eq!(s.labels["y"], "");
    assert_eq!(s.value, 3.0);
    assert!(parse_sample("a_total{x=\"1\"}3").is_err());
    assert!(parse_sample("a_total{x=1} 3").is_err());
    assert!(parse_sample("a_total five").is_err());
}

// ---------------------------------------------------------------------------------------
// Scraping.

/// `GET /metrics` with drover's token, if it has one; checks the status and content type.
async fn scrape(drover: &Drover) -> Metrics {
    let mut req = Request::get(format!("http://{}/metrics", drover.admin));
    if let Some(t) = &drover.token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let (status, headers, body) = send(&client(), req.body(empty()).unwrap()).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Metrics::parse(std::str::from_utf8(&body).expect("the exposition is UTF-8"))
}

/// Scrapes until `ready` holds (a value is reached); returns that scrape.
async fn scrape_until(drover: &Drover, what: &str, ready: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(drover).await;
        if ready(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}; last scrape:\n{}\ndrover's log:\n{}",
            m.text,
            drover.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type HttpClient = Client<HttpConnector, Body>;

/// Sends a request with a Host header; the status and body.
async fn request(
    c: &HttpClient,
    method: &str,
    port: u16,
    host: &str,
    path: &str,
    body: Option<Bytes>,
) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host);
    let req = match body {
        Some(b) => req.body(full(b)),
        None => req.body(empty()),
    }
    .unwrap();
    let (status, _, body) = send(c, req).await.unwrap();
    (status, body)
}

// ---------------------------------------------------------------------------------------
// Metrics.

/// One listener `web` with a host route to `app` (two endpoints) and a prefix route to
/// `empty` (no endpoints).
fn two_routes(port: u16, app: &[&Origin], extra: &str) -> String {
    let endpoints: Vec<String> = app
        .iter()
        .map(|o| format!("{{ address = \"{}\" }}", o.addr))
        .collect();
    format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
host = "app.test"
service = "app"

[[routes]]
listener = "web"
path_prefix = "/empty"
service = "empty"

[services.app]
endpoints = [ {} ]
{extra}

[services.empty]
endpoints = []
"#,
        endpoints.join(", ")
    )
}

const APP: [(&str, &str); 3] = [
    ("listener", "web"),
    ("route", "app.test/"),
    ("service", "app"),
];
const EMPTY: [(&str, &str); 3] = [
    ("listener", "web"),
    ("route", "*/empty"),
    ("service", "empty"),
];

fn with<'a>(base: &[(&'a str, &'a str)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(more).copied().collect()
}

#[tokio::test]
async fn counters_grow_by_exactly_the_requests_made() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let port = free_port();
    let drover = Drover::start(&two_routes(port, &[&a, &b], "")).await;
    let c = client();
    // The listener's labels come from the configuration.
    let listener = [
        ("listener", "web"),
        ("address", &*format!("127.0.0.1:{port}")),
    ];
    let before = scrape(&drover).await;

    // 20 GETs of 1000 bytes, 3 small POSTs kept for replay, 1 large streamed POST, 2
    // answered 500 by the origin: 26 requests to `app`.
    for _ in 0..20 {
        let (status, body) = request(&c, "GET", port, "app.test", "/bytes/1000", None).await;
        assert_eq!((status, body.len()), (StatusCode::OK, 1000));
    }
    for _ in 0..3 {
        let body = Bytes::from(vec![b'x'; 5000]);
        let (status, echoed) = request(&c, "POST", port, "app.test", "/echo", Some(body)).await;
        assert_eq!((status, echoed.len()), (StatusCode::OK, 5000));
    }
    let large = Bytes::from(vec![b'y'; 300_000]);
    let (status, echoed) = request(&c, "POST", port, "app.test", "/echo", Some(large)).await;
    assert_eq!((status, echoed.len()), (StatusCode::OK, 300_000));
    for _ in 0..2 {
        let (status, _) = request(&c, "GET", port, "app.test", "/status/500", None).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    // 2 to the service with no endpoints, 4 that no route takes.
    for _ in 0..2 {
        let (status, _) = request(&c, "GET", port, "other.test", "/empty/x", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    for _ in 0..4 {
        let (status, _) = request(&c, "GET", port, "other.test", "/", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    let name = "drover_route_requests_total";
    let after = scrape_until(&drover, "every request counted", |m| {
        m.sum("drover_listener_requests_total", &listener)
            >= before.sum("drover_listener_requests_total", &listener) + 32.0
    })
    .await;
    let grew =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);

    assert_eq!(grew(name, &with(&APP, &[("code", "2xx")])), 24.0);
    assert_eq!(grew(name, &with(&APP, &[("code", "5xx")])), 2.0);
    assert_eq!(grew(name, &APP), 26.0, "no other class moved");
    assert_eq!(grew(name, &with(&EMPTY, &[("code", "5xx")])), 2.0);
    assert_eq!(grew(name, &EMPTY), 2.0);

    let listener_requests = |code| {
        grew(
            "drover_listener_requests_total",
            &with(&listener, &[("code", code)]),
        )
    };
    assert_eq!(listener_requests("2xx"), 24.0);
    assert_eq!(
        listener_requests("4xx"),
        4.0,
        "the 404s count on the listener"
    );
    assert_eq!(listener_requests("5xx"), 4.0);
    assert_eq!(listener_requests("1xx") + listener_requests("3xx"), 0.0);

    let histogram = "drover_route_request_duration_seconds";
    assert_eq!(grew(&format!("{histogram}_count"), &APP), 26.0);
    assert_eq!(
        grew(
            &format!("{histogram}_bucket"),
            &with(&APP, &[("le", "+Inf")])
        ),
        26.0
    );
    assert!(grew(&format!("{histogram}_sum"), &APP) > 0.0);
    assert_eq!(after.types[histogram], "histogram");

    // Every try went to one of the two endpoints, and both had a share.
    let per_endpoint = |origin: &Origin, code| {
        let addr = origin.addr.to_string();
        let labels = [
            ("service", "app"),
            ("endpoint", addr.as_str()),
            ("code", code),
        ];
        grew("drover_endpoint_responses_total", &labels)
    };
    assert_eq!(per_endpoint(&a, "2xx") + per_endpoint(&b, "2xx"), 24.0);
    assert_eq!(per_endpoint(&a, "5xx") + per_endpoint(&b, "5xx"), 2.0);
    assert!(per_endpoint(&a, "2xx") >= 10.0 && per_endpoint(&b, "2xx") >= 10.0);
    assert_eq!(
        grew("drover_endpoint_requests_total", &[("service", "app")]),
        26.0
    );
    assert_eq!(
        grew("drover_endpoint_failures_total", &[("service", "app")]),
        0.0
    );
    assert_eq!(
        grew("drover_service_retries_total", &[("service", "app")]),
        0.0,
        "a 500 is not retried"
    );

    let sent = grew("drover_route_response_bytes_total", &APP);
    let received = grew("drover_route_request_bytes_total", &APP);
    assert!(sent >= (20 * 1000 + 3 * 5000 + 300_000) as f64, "{sent}");
    assert!(received >= (3 * 5000 + 300_000) as f64, "{received}");
    assert!(
        grew("drover_route_response_bytes_total", &EMPTY) > 0.0,
        "drover's own 503 body"
    );

    assert!(grew("drover_listener_connections_accepted_total", &listener) >= 1.0);
    assert!(
        after.one("drover_listener_connections_active", &listener) >= 1.0,
        "the client keeps its connection"
    );
    assert_eq!(after.one("drover_listener_requests_active", &listener), 0.0);
    for o in [&a, &b] {
        let addr = o.addr.to_string();
        let labels = [("service", "app"), ("endpoint", addr.as_str())];
        assert_eq!(after.one("drover_endpoint_up", &labels), 1.0);
        assert_eq!(
            after.one("drover_endpoint_requests_in_flight", &labels),
            0.0
        );
        assert_eq!(after.one("drover_endpoint_weight", &labels), 1.0);
        assert_eq!(
            after.one(
                "drover_endpoint_health_state",
                &with(&labels, &[("state", "healthy")])
            ),
            1.0
        );
        assert_eq!(
            after.sum("drover_endpoint_health_state", &labels),
            1.0,
            "one state at a time"
        );
    }
    // The client held idle keep-alive connections; so did drover, to the origins.
    assert!(after.sum("drover_endpoint_idle_connections", &[("service", "app")]) >= 1.0);

    drop(c);
    scrape_until(&drover, "the client's connection closed", |m| {
        m.one("drover_listener_connections_active", &listener) == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_request_in_flight_shows_in_the_gauges_until_it_ends() {
    let a = Origin::start("a").await;
    let port = free_port();
    let drover = Drover::start(&two_routes(port, &[&a], "")).await;
    let slow = tokio::spawn(async move {
        request(&client(), "GET", port, "app.test", "/slow?ms=1500", None).await
    });
    let addr = a.addr.to_string();
    let endpoint = [("service", "app"), ("endpoint", addr.as_str())];
    let during = scrape_until(&drover, "the slow request in flight", |m| {
        m.one("drover_endpoint_requests_in_flight", &endpoint) == 1.0
    })
    .await;
    assert_eq!(
        during.one("drover_listener_requests_active", &[("listener", "web")]),
        1.0
    );
    assert_eq!(
        during.one("drover_listener_connections_active", &[("listener", "web")]),
        1.0
    );
    assert_eq!(
        during.sum("drover_route_requests_total", &APP),
        0.0,
        "counted when it ends"
    );

    assert_eq!(slow.await.unwrap().0, StatusCode::OK);
    let after = scrape_until(&drover, "the slow request finished", |m| {
        m.one("drover_endpoint_requests_in_flight", &endpoint) == 0.0
    })
    .await;
    assert_eq!(
        after.one("drover_listener_requests_active", &[("listener", "web")]),
        0.0
    );
    assert_eq!(
        after.sum(
            "drover_route_requests_total",
            &with(&APP, &[("code", "2xx")])
        ),
        1.0
    );
    // 1.5 s lands above the 1 s bucket and at or below the 2.5 s one.
    let bucket = |le| {
        after.one(
            "drover_route_request_duration_seconds_bucket",
            &with(&APP, &[("le", le)]),
        )
    };
    assert_eq!((bucket("1"), bucket("2.5")), (0.0, 1.0));
}

/// An idle keep-alive connection over plain TCP waits parked, with no task of its own: it shows
/// in the parked gauge while still counted open, and its next request is served. When its
/// client closes it, drover notices while it is parked.
#[tokio::test]
async fn an_idle_connection_shows_parked_until_its_client_closes_it() {
    let a = Origin::start("a").await;
    let port = free_port();
    let drover = Drover::start(&two_routes(port, &[&a], "")).await;
    let web = [("listener", "web")];
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    for n in 1..=2 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "request {n}: {answer}");
        let parked = scrape_until(&drover, "the idle connection parked", |m| {
            m.one("drover_listener_connections_parked", &web) == 1.0
        })
        .await;
        assert_eq!(
            parked.one("drover_listener_connections_active", &web),
            1.0,
            "parked, it is still open"
        );
    }
    drop(s);
    scrape_until(&drover, "the closed connection gone", |m| {
        m.one("drover_listener_connections_parked", &web) == 0.0
            && m.one("drover_listener_connections_active", &web) == 0.0
    })
    .await;
}

/// With two workers, a listener's connections are spread over both: a worker that accepts a
/// connection while the other has two fewer hands it over. Every connection is served
/// wherever it went, and each worker's gauge falls back to zero when they close.
#[tokio::test]
async fn connections_are_spread_over_the_workers() {
    let a = Origin::start("a").await;
    let port = free_port();
    let drover = Drover::start_with(&two_routes(port, &[&a], ""), &["--workers", "2"]).await;
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    for (n, s) in conns.iter_mut().enumerate() {
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(s).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "connection {n}: {answer}"
        );
    }
    let on = |worker| [("listener", "web"), ("worker", worker)];
    let m = scrape(&drover).await;
    let (w0, w1) = (
        m.one("drover_listener_worker_connections_active", &on("0")),
        m.one("drover_listener_worker_connections_active", &on("1")),
    );
    assert_eq!(w0 + w1, 20.0, "every connection on a worker: {w0} + {w1}");
    // Two apart at most by the rule; two workers that accept at the same moment may each
    // judge by the other's count of a moment before.
    assert!((w0 - w1).abs() <= 4.0, "spread: {w0} and {w1}");
    drop(conns);
    scrape_until(&drover, "both workers' connections gone", |m| {
        m.one("drover_listener_worker_connections_active", &on("0")) == 0.0
            && m.one("drover_listener_worker_connections_active", &on("1")) == 0.0
    })
    .await;
}

/// A listener removed from the configuration closes its parked connections at once.
#[tokio::test]
async fn a_removed_listener_closes_its_parked_connections() {
    let a = Origin::start("a").await;
    let (port, side) = (free_port(), free_port());
    let base = two_routes(port, &[&a], "");
    let with_side = format!(
        r#"{base}
[[listeners]]
name = "side"
listen = "127.0.0.1:{side}"

[[routes]]
listener = "side"
service = "app"
"#
    );
    let drover = Drover::start(&with_side).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", side))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    scrape_until(&drover, "the idle connection parked", |m| {
        m.one(
            "drover_listener_connections_parked",
            &[("listener", "side")],
        ) == 1.0
    })
    .await;

    std::fs::write(&drover.config, &base).unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "closed, with nothing more sent: {read:?} {rest:?}"
    );
}

#[tokio::test]
async fn route_and_endpoint_counters_survive_a_config_change() {
    let (a, b, c3) = (
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    );
    let port = free_port();
    let drover = Drover::start(&two_routes(port, &[&a, &b], "")).await;
    let c = client();
    for _ in 0..10 {
        assert_eq!(
            request(&c, "GET", port, "app.test", "/", None).await.0,
            StatusCode::OK
        );
    }
    let before = scrape_until(&drover, "10 requests", |m| {
        m.sum("drover_route_requests_total", &APP) == 10.0
    })
    .await;
    let a_addr = a.addr.to_string();
    let a_labels = [("service", "app"), ("endpoint", a_addr.as_str())];
    let a_before = before.sum("drover_endpoint_responses_total", &a_labels);

    // A third endpoint: the service is rebuilt, its route and its kept endpoints are not reset.
    drover.write_config(&two_routes(port, &[&a, &b, &c3], ""));
    drover.wait_generation(2).await;
    let after = scrape(&drover).await;
    assert_eq!(after.sum("drover_route_requests_total", &APP), 10.0);
    assert_eq!(
        after.one("drover_route_request_duration_seconds_count", &APP),
        10.0
    );
    assert_eq!(
        after.sum("drover_endpoint_responses_total", &a_labels),
        a_before
    );
    assert_eq!(after.one("drover_reconciler_generation", &[]), 2.0);

    for _ in 0..9 {
        assert_eq!(
            request(&c, "GET", port, "app.test", "/", None).await.0,
            StatusCode::OK
        );
    }
    let more = scrape_until(&drover, "19 requests", |m| {
        m.sum("drover_route_requests_total", &APP) == 19.0
    })
    .await;
    let c_addr = c3.addr.to_string();
    assert_eq!(
        more.sum(
            "drover_endpoint_responses_total",
            &[("endpoint", c_addr.as_str())]
        ),
        3.0,
        "the new endpoint took its third of the 9"
    );
}

#[tokio::test]
async fn a_stopped_endpoint_that_is_checked_shows_down() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let port = free_port();
    let check = r#"
[services.app.health_check]
path = "/health"
interval = "100ms"
timeout = "500ms"
fall = 1
rise = 1
"#;
    let drover = Drover::start(&two_routes(port, &[&a, &b], check)).await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let a_labels = [("service", "app"), ("endpoint", a_addr.as_str())];
    let b_labels = [("service", "app"), ("endpoint", b_addr.as_str())];
    let m = scrape(&drover).await;
    assert_eq!(m.one("drover_endpoint_up", &a_labels), 1.0);

    a.stop();
    let m = scrape_until(&drover, "a down", |m| {
        m.one("drover_endpoint_up", &a_labels) == 0.0
    })
    .await;
    assert_eq!(
        m.one(
            "drover_endpoint_health_state",
            &with(&a_labels, &[("state", "unhealthy")])
        ),
        1.0
    );
    assert_eq!(
        m.one(
            "drover_endpoint_health_state",
            &with(&a_labels, &[("state", "healthy")])
        ),
        0.0
    );
    assert_eq!(m.one("drover_endpoint_up", &b_labels), 1.0);
    assert_eq!(m.one("drover_service_panic", &[("service", "app")]), 0.0);
}

#[tokio::test]
async fn rejected_configs_and_failed_reads_are_counted() {
    let a = Origin::start("a").await;
    let port = free_port();
    let drover = Drover::start(&two_routes(port, &[&a], "")).await;
    let source = format!("file:{}", drover.config.display());
    let src = [("source", source.as_str())];
    let m0 = scrape(&drover).await;
    assert_eq!(m0.one("drover_source_up", &src), 1.0);
    assert!(m0.one("drover_source_last_sync_timestamp_seconds", &src) > 1.6e9);
    assert!(m0.one("drover_source_staleness_seconds", &src) >= 0.0);
    assert_eq!(m0.one("drover_source_snapshots_accepted_total", &src), 1.0);
    assert_eq!(m0.one("drover_reconciler_publishes_total", &[]), 1.0);
    assert_eq!(m0.one("drover_reconciler_rejected_total", &[]), 0.0);
    assert_eq!(
        m0.one("drover_reconciler_publish_duration_seconds_count", &[]),
        1.0
    );

    // A file that does not parse: the file source's failure; the reconciler never sees it.
    drover.write_config("[[listeners]\nname = ");
    let m1 = scrape_until(&drover, "a failed read", |m| {
        m.one("drover_source_sync_errors_total", &src) == 1.0
    })
    .await;
    assert_eq!(m1.one("drover_source_up", &src), 0.0);
    assert_eq!(m1.one("drover_reconciler_rejected_total", &[]), 0.0);

    // A file that parses but whose new listener cannot bind: the reconciler rejects it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let mut config = two_routes(port, &[&a], "");
    config.push_str(&format!(
        "\n[[listeners]]\nname = \"busy\"\nlisten = \"{busy}\"\n"
    ));
    drover.write_config(&config);
    let m2 = scrape_until(&drover, "a rejection", |m| {
        m.one("drover_reconciler_rejected_total", &[]) == 1.0
    })
    .await;
    assert_eq!(m2.one("drover_source_snapshots_rejected_total", &src), 1.0);
    assert_eq!(
        m2.one("drover_source_up", &src),
        1.0,
        "the file itself was read fine"
    );
    assert_eq!(m2.one("drover_reconciler_publishes_total", &[]), 1.0);
    assert_eq!(m2.one("drover_reconciler_generation", &[]), 1.0);
    assert_eq!(
        m2.one("drover_reconciler_publish_duration_seconds_count", &[]),
        2.0,
        "it reached the data plane"
    );

    // Through the API: a change the reconciler refuses (a route to a service that is not
    // there) is a rejection of the source `api`.
    let (status, _) = drover
        .api(
            "POST",
            "/api/v1/routes",
            Some(r#"{"listener":"nope","service":"app"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let m3 = scrape_until(&drover, "the API's rejection", |m| {
        m.one("drover_reconciler_rejected_total", &[]) == 2.0
    })
    .await;
    assert_eq!(
        m3.one(
            "drover_source_snapshots_rejected_total",
            &[("source", "api")]
        ),
        1.0
    );

    // A good file (with a change) is published.
    drover.write_config(&two_routes(port, &[&a], "pool_max_idle = 7"));
    let m4 = scrape_until(&drover, "a publish", |m| {
        m.one("drover_reconciler_publishes_total", &[]) == 2.0
    })
    .await;
    assert_eq!(m4.one("drover_reconciler_generation", &[]), 2.0);
    assert_eq!(m4.one("drover_source_snapshots_accepted_total", &src), 2.0);
    assert!(
        m4.one("drover_reconciler_last_publish_timestamp_seconds", &[])
            >= m0.one("drover_reconciler_last_publish_timestamp_seconds", &[])
    );
    drop(taken);
}

#[tokio::test]
async fn metrics_need_the_token_when_one_is_set() {
    let drover = Drover::start_args(&[
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--admin-token",
        "s3cret",
    ])
    .await;
    let url = format!("http://{}/metrics", drover.admin);
    let (status, _, _) = send(&client(), Request::get(&url).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let m = scrape(&drover).await;
    assert_eq!(m.one("drover_build_info", &[]), 1.0);
    assert_eq!(
        m.one(
            "drover_listener_connections_active",
            &[("listener", "default")]
        ),
        0.0
    );
    assert!(
        !m.has("drover_access_log_dropped_total", &[]),
        "no access log, no access log figures"
    );
}

#[tokio::test]
async fn consul_source_health_follows_consul_going_away_and_back() {
    let consul = ConsulDouble::start().await;
    let a = Origin::start("a").await;
    consul.register("web-a", "web", a.addr, &[]);
    let mapping = format!("127.0.0.1:{}:web", free_port());
    let address = consul.address();
    let drover = Drover::start_args(&["--consul", &address, &mapping]).await;
    let src = [("source", "consul")];
    let up = scrape_until(&drover, "consul synced", |m| {
        m.has("drover_source_up", &src) && m.one("drover_source_up", &src) == 1.0
    })
    .await;
    assert_eq!(up.one("drover_source_sync_errors_total", &src), 0.0);
    assert!(up.one("drover_source_snapshots_accepted_total", &src) >= 1.0);

    consul.stop();
    let down = scrape_until(&drover, "consul down", |m| {
        m.one("drover_source_up", &src) == 0.0
    })
    .await;
    assert!(down.one("drover_source_sync_errors_total", &src) >= 1.0);
    let last = down.one("drover_source_last_sync_timestamp_seconds", &src);
    let again = scrape(&drover).await;
    assert_eq!(
        again.one("drover_source_last_sync_timestamp_seconds", &src),
        last,
        "no sync while it is away"
    );

    consul.start_again().await;
    let back = scrape_until(&drover, "consul back", |m| {
        m.one("drover_source_up", &src) == 1.0
    })
    .await;
    assert!(back.one("drover_source_last_sync_timestamp_seconds", &src) > last);
}

#[tokio::test]
async fn dns_source_health_follows_its_lookups() {
    let a = Origin::start("a").await;
    let hosts = [("webserver", a.addr.ip())];
    let dns = Dnsmasq::start(&hosts, &[]).await;
    let mapping = format!("127.0.0.1:{}:webserver:{}", free_port(), a.addr.port());
    let server = dns.addr.to_string();
    let drover = Drover::start_args(&["--dns", &server, &mapping]).await;
    let src = [("source", "dns")];
    let up = scrape_until(&drover, "dns synced", |m| {
        m.has("drover_source_up", &src) && m.one("drover_source_up", &src) == 1.0
    })
    .await;
    assert_eq!(up.one("drover_source_sync_errors_total", &src), 0.0);
    assert!(up.one("drover_source_staleness_seconds", &src) >= 0.0);

    // The name goes away: its lookups fail (the last answer is held meanwhile).
    dns.set_hosts(&[]).await;
    let down = scrape_until(&drover, "dns failing", |m| {
        m.one("drover_source_up", &src) == 0.0
    })
    .await;
    assert!(down.one("drover_source_sync_errors_total", &src) >= 1.0);
    let last = down.one("drover_source_last_sync_timestamp_seconds", &src);

    dns.set_hosts(&hosts).await;
    let back = scrape_until(&drover, "dns back", |m| {
        m.one("drover_source_up", &src) == 1.0
    })
    .await;
    assert!(back.one("drover_source_last_sync_timestamp_seconds", &src) > last);
}

// ---------------------------------------------------------------------------------------
// Access logs.

/// The lines of `path`, once it has at least `n`.
async fn lines_of(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, not {n}:\n{text}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `date -u +FORMAT` now.
fn date(format: &str) -> String {
    let out = Command::new("date")
        .env("LC_ALL", "C")
        .args(["-u", &format!("+{format}")])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn json_access_log_has_a_line_per_request_with_its_fields() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let port = free_port();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    let drover = Drover::start_with(
        &two_routes(port, &[&a, &b], ""),
        &["--access-log", path.to_str().unwrap()],
    )
    .await;
    let c = client();
    let minute_before = date("%Y-%m-%dT%H:%M");
    let mut answered_by = Vec::new();
    for i in 0..3 {
        let req = Request::get(format!("http://127.0.0.1:{port}/bytes/{}?n={i}", 100 + i))
            .header("host", "app.test")
            .header("referer", "http://ref.test/page")
            .header("user-agent", "obs-test \"quoted\"")
            .body(empty())
            .unwrap();
        let (status, headers, body) = send(&c, req).await.unwrap();
        assert_eq!((status, body.len()), (StatusCode::OK, 100 + i));
        answered_by.push(origin_of(&headers));
    }
    let (status, _) = request(&c, "GET", port, "other.test", "/nowhere", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let minute_after = date("%Y-%m-%dT%H:%M");

    let lines = lines_of(&path, 4).await;
    assert_eq!(lines.len(), 4, "one line per request: {lines:#?}");
    for (i, line) in lines[..3].iter().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let origin = if answered_by[i] == "a" { &a } else { &b };
        assert_eq!(v["status"], 200, "{line}");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], format!("/bytes/{}?n={i}", 100 + i));
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["bytes_sent"], 100 + i, "{line}");
        assert_eq!(v["referer"], "http://ref.test/page");
        assert_eq!(v["user_agent"], "obs-test \"quoted\"");
        assert_eq!(v["host"], "app.test");
        assert_eq!(v["listener"], "web");
        assert_eq!(v["route"], "app.test/");
        assert_eq!(v["service"], "app");
        assert_eq!(
            v["upstream"],
            origin.addr.to_string(),
            "the endpoint that answered"
        );
        assert_eq!(v["attempts"], 1);
        assert!(
            v["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
        let upstream_time = v["upstream_time"].as_f64().unwrap();
        let total_time = v["total_time"].as_f64().unwrap();
        assert!(upstream_time > 0.0 && upstream_time <= total_time, "{line}");
        let time = v["time"].as_str().unwrap();
        assert!(
            time.starts_with(&minute_before) || time.starts_with(&minute_after),
            "{time} is not {minute_before} or {minute_after}"
        );
        assert_eq!(time.len(), "2024-01-01T00:00:00.000Z".len(), "{time}");
        assert!(time.ends_with('Z'));
    }
    let v: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
    assert_eq!(v["status"], 404);
    assert_eq!(v["host"], "other.test");
    assert_eq!(v["route"], serde_json::Value::Null);
    assert_eq!(v["service"], serde_json::Value::Null);
    assert_eq!(v["upstream"], serde_json::Value::Null);
    assert_eq!(v["upstream_time"], serde_json::Value::Null);
    assert_eq!(v["attempts"], 0);
    assert_eq!(v["referer"], serde_json::Value::Null);
    assert!(v["total_time"].as_f64().unwrap() >= 0.0);

    let m = scrape(&drover).await;
    assert_eq!(m.one("drover_access_log_written_total", &[]), 4.0);
    assert_eq!(m.one("drover_access_log_dropped_total", &[]), 0.0);
}

#[tokio::test]
async fn a_retried_request_logs_its_attempts_and_the_endpoint_that_answered() {
    let (live, dead) = (Origin::start("live").await, Origin::start("dead").await);
    dead.stop();
    let port = free_port();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    let drover = Drover::start_with(
        &two_routes(port, &[&live, &dead], ""),
        &["--access-log", path.to_str().unwrap()],
    )
    .await;
    let c = client();
    for _ in 0..4 {
        let (status, body) = request(&c, "GET", port, "app.test", "/", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with(b"live"));
    }
    let lines = lines_of(&path, 4).await;
    let mut retries = 0;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["status"], 200, "{line}");
        assert_eq!(
            v["upstream"],
            live.addr.to_string(),
            "the endpoint that answered: {line}"
        );
        let attempts = v["attempts"].as_u64().unwrap();
        assert!((1..=2).contains(&attempts), "{line}");
        retries += attempts - 1;
    }
    assert!(retries >= 1, "the dead endpoint was tried: {lines:#?}");
    let m = scrape(&drover).await;
    assert_eq!(
        m.one("drover_service_retries_total", &[("service", "app")]),
        retries as f64,
        "a retry in the log is a retry in the metrics"
    );
    let dead_addr = dead.addr.to_string();
    let dead_labels = [("service", "app"), ("endpoint", dead_addr.as_str())];
    assert_eq!(
        m.one("drover_endpoint_failures_total", &dead_labels),
        retries as f64
    );
    assert_eq!(m.sum("drover_endpoint_responses_total", &dead_labels), 0.0);
}

/// `IP - - [TIME] "REQUEST" STATUS BYTES "REFERER" "AGENT"`, split into its parts.
fn combined_fields(line: &str) -> Option<[String; 7]> {
    let (ip, rest) = line.split_once(" - - [")?;
    let (time, rest) = rest.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let (status, rest) = rest.split_once(' ')?;
    let (bytes, rest) = rest.split_once(' ')?;
    let rest = rest.strip_prefix('"')?.strip_suffix('"')?;
    let (referer, agent) = rest.split_once("\" \"")?;
    Some([ip, time, request, status, bytes, referer, agent].map(str::to_string))
}

#[tokio::test]
async fn combined_access_log_lines_have_nginx_shape() {
    let a = Origin::start("a").await;
    let port = free_port();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    let _drover = Drover::start_with(
        &two_routes(port, &[&a], ""),
        &[
            "--access-log",
            path.to_str().unwrap(),
            "--access-log-format",
            "combined",
        ],
    )
    .await;
    let c = client();
    let before = date("%d/%b/%Y:%H:%M");
    let req = Request::get(format!("http://127.0.0.1:{port}/bytes/42?x=1"))
        .header("host", "app.test")
        .header("referer", "http://ref.test/")
        .header("user-agent", "agent \"q\"")
        .body(empty())
        .unwrap();
    assert_eq!(send(&c, req).await.unwrap().0, StatusCode::OK);
    let (status, _) = request(&c, "GET", port, "other.test", "/missing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let after = date("%d/%b/%Y:%H:%M");

    let lines = lines_of(&path, 2).await;
    let [ip, time, request_line, status, bytes, referer, agent] =
        combined_fields(&lines[0]).unwrap_or_else(|| panic!("not combined: {}", lines[0]));
    assert_eq!(ip, "127.0.0.1");
    assert!(
        time.ends_with(":00 +0000") || time.ends_with(" +0000"),
        "{time}"
    );
    assert!(
        time.starts_with(&before) || time.starts_with(&after),
        "{time}: not {before} or {after}"
    );
    assert_eq!(request_line, "GET /bytes/42?x=1 HTTP/1.1");
    assert_eq!((status.as_str(), bytes.as_str()), ("200", "42"));
    assert_eq!(referer, "http://ref.test/");
    assert_eq!(agent, "agent \\x22q\\x22", "quotes escaped as nginx does");

    let f = combined_fields(&lines[1]).unwrap_or_else(|| panic!("not combined: {}", lines[1]));
    assert_eq!(f[2], "GET /missing HTTP/1.1");
    assert_eq!(f[3], "404");
    assert_eq!(f[5], "-", "no referer");
    assert!(!lines[1].contains('{'), "not JSON: {}", lines[1]);
}

#[tokio::test]
async fn sigusr1_reopens_the_access_log_after_it_is_renamed() {
    let a = Origin::start("a").await;
    let port = free_port();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    let rotated = logs.path().join("access.log.1");
    let drover = Drover::start_with(
        &two_routes(port, &[&a], ""),
        &["--access-log", path.to_str().unwrap()],
    )
    .await;
    let c = client();
    assert_eq!(
        request(&c, "GET", port, "app.test", "/before", None)
            .await
            .0,
        StatusCode::OK
    );
    lines_of(&path, 1).await;

    // What logrotate does: rename, then signal.
    std::fs::rename(&path, &rotated).unwrap();
    drover.signal("USR1");
    drover.wait_log("access log reopened", 1).await;
    assert!(path.exists(), "a new file at the original path");
    assert_eq!(
        request(&c, "GET", port, "app.test", "/after", None).await.0,
        StatusCode::OK
    );

    let new = lines_of(&path, 1).await;
    let old = lines_of(&rotated, 1).await;
    assert_eq!(old.len(), 1, "{old:?}");
    assert!(old[0].contains("\"path\":\"/before\""), "{old:?}");
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].contains("\"path\":\"/after\""), "{new:?}");
}

#[test]
fn bad_access_log_options_are_refused_with_what_is_allowed() {
    let run = |args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_drover"))
            .arg("run")
            .args(args)
            .args(["--admin", &format!("127.0.0.1:{}", free_port())])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--access-log", "-", "--access-log-format", "xml"]);
    assert!(
        e.contains("\"xml\"") && e.contains("`json` or `combined`"),
        "{e}"
    );
    let e = run(&["--access-log-format", "json"]);
    assert!(e.contains("need --access-log"), "{e}");
    let e = run(&["--access-log", "-", "--access-log-buffer", "0"]);
    assert!(e.contains("--access-log-buffer must be at least 1"), "{e}");
    let e = run(&["--access-log", "/nonexistent-dir/access.log"]);
    assert!(
        e.contains("cannot open the access log /nonexistent-dir/access.log"),
        "{e}"
    );
}

/// `clients` keep-alive clients each send `per_client` GETs; every answer must be a 200.
/// Returns requests per second.
async fn load(port: u16, clients: usize, per_client: usize) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..per_client {
                let (status, _) = request(&c, "GET", port, "app.test", "/", None).await;
                assert_eq!(status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (clients * per_client) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_access_log_drops_records_and_requests_go_on() {
    let a = Origin::start("a").await;
    let fifo_dir = tempfile::tempdir().unwrap();
    let fifo = fifo_dir.path().join("access.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo failed");

    // The log shipper: opens the FIFO, reads nothing until told, then everything to the end.
    let read_lines = Arc::new(AtomicU64::new(0));
    let (drain, drain_rx) = std::sync::mpsc::channel::<()>();
    let shipper = {
        let (fifo, read_lines) = (fifo.clone(), read_lines.clone());
        std::thread::spawn(move || {
            let f = std::fs::File::open(&fifo).unwrap();
            drain_rx.recv().unwrap();
            let mut bad = 0;
            for line in BufReader::new(f).lines() {
                let line = line.unwrap();
                if serde_json::from_str::<serde_json::Value>(&line)
                    .map_or(true, |v| v["status"] != 200)
                {
                    bad += 1;
                }
                read_lines.fetch_add(1, Ordering::Relaxed);
            }
            bad
        })
    };

    let (quiet_port, slow_port) = (free_port(), free_port());
    let quiet = Drover::start(&two_routes(quiet_port, &[&a], "")).await;
    let slow = Drover::start_with(
        &two_routes(slow_port, &[&a], ""),
        &[
            "--access-log",
            fifo.to_str().unwrap(),
            "--access-log-buffer",
            "256",
        ],
    )
    .await;

    // Warm up both, then alternate rounds so that both see the same machine.
    let (clients, per_client, rounds) = (4, 400, 3);
    load(quiet_port, 2, 50).await;
    load(slow_port, 2, 50).await;
    let mut sent_to_slow = 100;
    let (mut quiet_rps, mut slow_rps) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        quiet_rps.push(load(quiet_port, clients, per_client).await);
        slow_rps.push(load(slow_port, clients, per_client).await);
        sent_to_slow += clients * per_client;
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "requests/s without an access log: {quiet_rps:.0?} (best {:.0}); with one to a FIFO nobody reads: {slow_rps:.0?} (best {:.0}); ratio {:.2}",
        best(&quiet_rps),
        best(&slow_rps),
        best(&slow_rps) / best(&quiet_rps)
    );
    let stuck = scrape(&slow).await;
    let dropped = stuck.one("drover_access_log_dropped_total", &[]);
    eprintln!(
        "while the FIFO was not read: {} written, {dropped} dropped, {} queued of {}",
        stuck.one("drover_access_log_written_total", &[]),
        stuck.one("drover_access_log_queued", &[]),
        stuck.one("drover_access_log_queue_capacity", &[]),
    );
    assert!(dropped > 0.0, "a sink that does not read must cost records");
    assert!(
        best(&slow_rps) >= 0.5 * best(&quiet_rps),
        "a stuck access log slowed requests down: {slow_rps:?} vs {quiet_rps:?}"
    );

    // The shipper catches up: every request is either written (and read) or dropped.
    drain.send(()).unwrap();
    let total = sent_to_slow as f64;
    let m = scrape_until(&slow, "every record written or dropped", |m| {
        m.one("drover_access_log_written_total", &[])
            + m.one("drover_access_log_dropped_total", &[])
            == total
    })
    .await;
    let written = m.one("drover_access_log_written_total", &[]);
    eprintln!(
        "after draining: {written} written, {} dropped, of {total} requests",
        m.one("drover_access_log_dropped_total", &[])
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while (read_lines.load(Ordering::Relaxed) as f64) < written {
        assert!(
            Instant::now() < deadline,
            "the shipper read {} of {written} lines",
            read_lines.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        read_lines.load(Ordering::Relaxed) as f64,
        written,
        "written means written whole"
    );
    assert_eq!(m.one("drover_access_log_write_errors_total", &[]), 0.0);
    assert_eq!(
        m.sum(
            "drover_route_requests_total",
            &with(&APP, &[("code", "2xx")])
        ),
        total,
        "every request was answered and counted"
    );
    drop(slow);
    assert_eq!(
        shipper.join().unwrap(),
        0,
        "every line read is a JSON record of a 200"
    );
    drop(quiet);
}
