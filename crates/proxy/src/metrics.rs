//! Prometheus figures: the fixed-bucket [`Histogram`] requests record into, and
//! [`Exposition`], the writer of the text format (version 0.0.4) that `GET /metrics` serves.
//!
//! Nothing here is on a request's way but [`Histogram::observe`], which is two relaxed atomic
//! additions. Everything else runs at scrape time: [`ProxyHandle::write_metrics`] walks the
//! routing table in force and writes what the data plane's atomics hold, so a request never
//! looks up a label set, takes a lock or allocates for the sake of metrics.
//!
//! [`ProxyHandle::write_metrics`]: crate::ProxyHandle::write_metrics

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::access::AccessLog;
use crate::pool::EndpointState;
use crate::stats::{CODE_CLASSES, ListenerStats, RouteStats};
use crate::table::{RoutingTable, Service};

/// Upper bounds of the latency buckets, in microseconds: 1 ms to 10 s.
const BOUNDS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// A latency histogram with fixed buckets (1 ms … 10 s, and +Inf), lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last one is above the highest bound.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A histogram as read at one moment: cumulative bucket counts, as Prometheus wants them.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, ending with `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    /// Records one observation.
    #[inline]
    pub fn observe(&self, took: Duration) {
        let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
        // The first bound at or above the value: a bucket's bound is inclusive (`le`).
        let i = BOUNDS_US.partition_point(|&bound| bound < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Reads it. The count is the total of the buckets read, so that the two always agree.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BOUNDS_US.len() + 1);
        for (i, counter) in self.buckets.iter().enumerate() {
            cumulative += counter.load(Ordering::Relaxed);
            let bound = BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            buckets.push((bound, cumulative));
        }
        HistogramSnapshot {
            buckets,
            count: cumulative,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// Only `_sum` and `_count`, no quantiles.
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

/// A sample's value: integers are written as integers, floats in full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<Duration> for Value {
    fn from(v: Duration) -> Self {
        Value::Float(v.as_secs_f64())
    }
}

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Writes the Prometheus text format. Call [`family`](Self::family) once per metric name,
/// then its samples; label values are escaped here.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        escape_help(&mut self.out, help);
        self.out.push_str("\n# TYPE ");
        self.out.push_str(name);
        self.out.push(' ');
        self.out.push_str(kind.as_str());
        self.out.push('\n');
    }

    /// One sample of the family last started (or of its `_sum`, `_count`, `_bucket`).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.out.push_str(name);
        self.labels(labels, None);
        self.out.push(' ');
        self.value(value.into());
        self.out.push('\n');
    }

    /// The `_bucket`, `_sum` and `_count` samples of a histogram.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let mut le = String::new();
        for &(bound, count) in &h.buckets {
            le.clear();
            if bound.is_infinite() {
                le.push_str("+Inf");
            } else {
                let _ = write!(le, "{bound}");
            }
            self.out.push_str(name);
            self.out.push_str("_bucket");
            self.labels(labels, Some(("le", &le)));
            self.out.push(' ');
            self.value(Value::Int(count));
            self.out.push('\n');
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count);
    }

    /// The text, ready to serve.
    pub fn finish(self) -> String {
        self.out
    }

    fn labels(&mut self, labels: &[(&str, &str)], extra: Option<(&str, &str)>) {
        if labels.is_empty() && extra.is_none() {
            return;
        }
        self.out.push('{');
        for (i, (k, v)) in labels.iter().chain(extra.as_ref()).enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape_label_value(&mut self.out, v);
            self.out.push('"');
        }
        self.out.push('}');
    }

    fn value(&mut self, v: Value) {
        match v {
            Value::Int(i) => {
                let _ = write!(self.out, "{i}");
            }
            Value::Float(f) if f.is_nan() => self.out.push_str("NaN"),
            Value::Float(f) if f == f64::INFINITY => self.out.push_str("+Inf"),
            Value::Float(f) if f == f64::NEG_INFINITY => self.out.push_str("-Inf"),
            Value::Float(f) => {
                let _ = write!(self.out, "{f}");
            }
        }
    }
}

/// The health states `drover_endpoint_health_state` lists, one sample each.
const HEALTH_STATES: [&str; 4] = ["healthy", "unhealthy", "unknown", "ejected"];

impl crate::ProxyHandle {
    /// Writes the data plane's metrics: per listener, route, service and endpoint of the
    /// table in force, and the access log's counters when there is one.
    pub fn write_metrics(&self, out: &mut Exposition) {
        let table = self.table();
        write_listeners(out, &table);
        write_routes(out, &table);
        write_services(out, &table);
        if let Some(log) = self.access_log() {
            write_access_log(out, log);
        }
    }
}

fn write_listeners(out: &mut Exposition, table: &RoutingTable) {
    let listeners: Vec<(&ListenerStats, String)> = table
        .listeners()
        .map(|l| (&*l.stats, l.spec.listen.to_string()))
        .collect();
    let labels = |l: &(&ListenerStats, String)| -> [(&str, String); 2] {
        [("listener", l.0.name.clone()), ("address", l.1.clone())]
    };
    type Read = fn(&ListenerStats) -> u64;
    let simple: [(&str, Kind, &str, Read); 7] = [
        (
            "drover_listener_connections_active",
            Kind::Gauge,
            "Client connections open now.",
            |l| l.connections_active.load(Ordering::Relaxed),
        ),
        (
            "drover_listener_connections_parked",
            Kind::Gauge,
            "Idle client connections open now that wait for a request with no task of their own.",
            |l| l.connections_parked.load(Ordering::Relaxed),
        ),
        (
            "drover_listener_connections_accepted_total",
            Kind::Counter,
            "Client connections accepted.",
            |l| l.connections_accepted.load(Ordering::Relaxed),
        ),
        (
            "drover_listener_requests_active",
            Kind::Gauge,
            "Requests whose response is not finished yet.",
            |l| l.requests_active.load(Ordering::Relaxed),
        ),
        (
            "drover_listener_tls_handshake_failures_total",
            Kind::Counter,
            "TLS handshakes that failed or timed out.",
            |l| l.tls_handshake_failures.load(Ordering::Relaxed),
        ),
        (
            "drover_listener_tls_resumed_handshakes_total",
            Kind::Counter,
            "TLS handshakes that resumed a session by ticket.",
            |l| l.tls_resumed_handshakes.load(Ordering::Relaxed),
        ),
        (
            "drover_listener_proxy_header_failures_total",
            Kind::Counter,
            "Connections from trusted downstreams closed for a missing or invalid PROXY header.",
            |l| l.proxy_header_failures.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, read) in simple {
        out.family(name, kind, help);
        for l in &listeners {
            let [a, b] = labels(l);
            out.sample(name, &[(a.0, &a.1), (b.0, &b.1)], read(l.0));
        }
    }
    let name = "drover_listener_worker_connections_active";
    out.family(
        name,
        Kind::Gauge,
        "Client connections open now, by the worker thread that serves them.",
    );
    for l in &listeners {
        let [a, b] = labels(l);
        for (worker, n) in l.0.connections_by_worker.get().enumerate() {
            let worker = worker.to_string();
            out.sample(name, &[(a.0, &a.1), (b.0, &b.1), ("worker", &worker)], n);
        }
    }
    let name = "drover_listener_requests_total";
    out.family(
        name,
        Kind::Counter,
        "Finished requests by the status class of their response, routed or not (499: the client went away first).",
    );
    for l in &listeners {
        let [a, b] = labels(l);
        for (code, n) in CODE_CLASSES.iter().zip(l.0.responses.get()) {
            out.sample(name, &[(a.0, &a.1), (b.0, &b.1), ("code", code)], n);
        }
    }
}

fn write_routes(out: &mut Exposition, table: &RoutingTable) {
    let routes: Vec<&RouteStats> = table
        .listeners()
        .flat_map(|l| l.routes().iter().map(|r| &**r))
        .collect();
    let labels = |r: &RouteStats| -> [(&'static str, String); 3] {
        [
            ("listener", r.listener.clone()),
            ("route", r.route.clone()),
            ("service", r.service.clone()),
        ]
    };
    let name = "drover_route_requests_total";
    out.family(
        name,
        Kind::Counter,
        "Finished requests of a route by the status class of their response.",
    );
    for r in &routes {
        let [a, b, c] = labels(r);
        for (code, n) in CODE_CLASSES.iter().zip(r.responses.get()) {
            out.sample(
                name,
                &[(a.0, &a.1), (b.0, &b.1), (c.0, &c.1), ("code", code)],
                n,
            );
        }
    }
    let name = "drover_route_request_duration_seconds";
    out.family(
        name,
        Kind::Histogram,
        "Time from a request's head to the end of its response body.",
    );
    for r in &routes {
        let [a, b, c] = labels(r);
        out.histogram(
            name,
            &[(a.0, &a.1), (b.0, &b.1), (c.0, &c.1)],
            &r.duration.snapshot(),
        );
    }
    type Read = fn(&RouteStats) -> u64;
    let bytes: [(&str, &str, Read); 2] = [
        (
            "drover_route_request_bytes_total",
            "Request body bytes received from clients.",
            |r| r.request_bytes.load(Ordering::Relaxed),
        ),
        (
            "drover_route_response_bytes_total",
            "Response body bytes sent to clients.",
            |r| r.response_bytes.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, read) in bytes {
        out.family(name, Kind::Counter, help);
        for r in &routes {
            let [a, b, c] = labels(r);
            out.sample(name, &[(a.0, &a.1), (b.0, &b.1), (c.0, &c.1)], read(r));
        }
    }
}

/// One endpoint as the metrics show it.
struct EndpointRow<'a> {
    service: &'a str,
    address: String,
    state: &'a EndpointState,
    weight: u32,
    health: &'static str,
    ejections: u32,
}

fn write_services(out: &mut Exposition, table: &RoutingTable) {
    let mut services: Vec<&Arc<Service>> = table.services().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));

    let name = "drover_service_retries_total";
    out.family(
        name,
        Kind::Counter,
        "Retries: tries after the first of a request.",
    );
    for s in &services {
        out.sample(
            name,
            &[("service", &s.name)],
            s.stats.retries.load(Ordering::Relaxed),
        );
    }
    let name = "drover_service_panic";
    out.family(
        name,
        Kind::Gauge,
        "1 while no endpoint of the service is healthy and all of them are served.",
    );
    for s in &services {
        out.sample(name, &[("service", &s.name)], s.in_panic());
    }

    let rows: Vec<EndpointRow> = services
        .iter()
        .flat_map(|s| {
            s.endpoints
                .iter()
                .zip(&s.spec.endpoints)
                .map(|(state, spec)| {
                    let report = state.health.report();
                    EndpointRow {
                        service: &s.name,
                        address: state.address.to_string(),
                        state,
                        weight: if spec.state.is_enabled() {
                            spec.weight
                        } else {
                            0
                        },
                        health: report.state,
                        ejections: report.ejections,
                    }
                })
        })
        .collect();
    type Read = fn(&EndpointRow) -> Value;
    let simple: [(&str, Kind, &str, Read); 8] = [
        (
            "drover_endpoint_requests_total",
            Kind::Counter,
            "Tries sent to the endpoint that ended: responses and failures.",
            |e| {
                (e.state.responses.load(Ordering::Relaxed)
                    + e.state.failures.load(Ordering::Relaxed))
                .into()
            },
        ),
        (
            "drover_endpoint_failures_total",
            Kind::Counter,
            "Tries that got no response: connect errors, resets, timeouts.",
            |e| e.state.failures.load(Ordering::Relaxed).into(),
        ),
        (
            "drover_endpoint_requests_in_flight",
            Kind::Gauge,
            "Requests sent to the endpoint and not finished.",
            |e| e.state.in_flight.load(Ordering::Relaxed).into(),
        ),
        (
            "drover_endpoint_up",
            Kind::Gauge,
            "1 when health checks and outlier detection let the endpoint take requests.",
            |e| e.state.health.is_available().into(),
        ),
        (
            "drover_endpoint_ejections_total",
            Kind::Counter,
            "Times outlier detection ejected the endpoint.",
            |e| e.ejections.into(),
        ),
        (
            "drover_endpoint_idle_connections",
            Kind::Gauge,
            "Idle keep-alive connections pooled to the endpoint.",
            |e| e.state.idle_connections().into(),
        ),
        (
            "drover_endpoint_weight",
            Kind::Gauge,
            "The endpoint's weight; 0 while it is drained or disabled.",
            |e| e.weight.into(),
        ),
        (
            "drover_endpoint_latency_ewma_seconds",
            Kind::Gauge,
            "Peak-EWMA of the endpoint's response times (p2c_ewma's estimate).",
            |e| (e.state.latency.value_ns() as f64 / 1e9).into(),
        ),
    ];
    for (name, kind, help, read) in simple {
        out.family(name, kind, help);
        for e in &rows {
            out.sample(
                name,
                &[("service", e.service), ("endpoint", &e.address)],
                read(e),
            );
        }
    }
    let name = "drover_endpoint_responses_total";
    out.family(
        name,
        Kind::Counter,
        "Responses from the endpoint by status class.",
    );
    for e in &rows {
        for (code, n) in CODE_CLASSES.iter().zip(e.state.responses_by_class.get()) {
            out.sample(
                name,
                &[
                    ("service", e.service),
                    ("endpoint", &e.address),
                    ("code", code),
                ],
                n,
            );
        }
    }
    let name = "drover_endpoint_health_state";
    out.family(
        name,
        Kind::Gauge,
        "1 for the endpoint's health state (healthy, unhealthy, unknown, ejected), 0 for the others.",
    );
    for e in &rows {
        for state in HEALTH_STATES {
            out.sample(
                name,
                &[
                    ("service", e.service),
                    ("endpoint", &e.address),
                    ("state", state),
                ],
                e.health == state,
            );
        }
    }
}

fn write_access_log(out: &mut Exposition, log: &AccessLog) {
    let families: [(&str, Kind, &str, u64); 5] = [
        (
            "drover_access_log_written_total",
            Kind::Counter,
            "Access log records written.",
            log.written(),
        ),
        (
            "drover_access_log_dropped_total",
            Kind::Counter,
            "Access log records dropped: the queue was full, or writing them failed.",
            log.dropped(),
        ),
        (
            "drover_access_log_write_errors_total",
            Kind::Counter,
            "Writes to the access log that failed.",
            log.write_errors(),
        ),
        (
            "drover_access_log_queued",
            Kind::Gauge,
            "Access log records waiting to be written.",
            log.queued() as u64,
        ),
        (
            "drover_access_log_queue_capacity",
            Kind::Gauge,
            "Records the access log's queue holds before it drops.",
            log.capacity() as u64,
        ),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
}

/// A label value in the text format: backslash, double quote and line feed escaped.
pub fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A HELP text: backslash and line feed escaped (double quotes stay).
fn escape_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_holds_them() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // 0.001
        h.observe(Duration::from_millis(1)); // 0.001: bounds are inclusive
        h.observe(Duration::from_micros(1_001)); // 0.0025
        h.observe(Duration::from_millis(300)); // 0.5
        h.observe(Duration::from_secs(60)); // +Inf
        let s = h.snapshot();
        let at = |bound: f64| s.buckets.iter().find(|b| b.0 == bound).unwrap().1;
        assert_eq!(at(0.001), 2);
        assert_eq!(at(0.0025), 3);
        assert_eq!(at(0.25), 3);
        assert_eq!(at(0.5), 4);
        assert_eq!(at(10.0), 4);
        assert_eq!(s.buckets.last().unwrap(), &(f64::INFINITY, 5));
        assert_eq!(s.count, 5);
        assert!(
            (s.sum_seconds - 60.302501).abs() < 1e-9,
            "{}",
            s.sum_seconds
        );
        assert!(
            s.buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "bounds rise and counts are cumulative: {:?}",
            s.buckets
        );
    }

    #[test]
    fn histograms_are_written_with_le_labels_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        let mut e = Exposition::new();
        e.family("x_seconds", Kind::Histogram, "Latency.");
        e.histogram("x_seconds", &[("route", "a")], &h.snapshot());
        let text = e.finish();
        assert!(text.starts_with("# HELP x_seconds Latency.\n# TYPE x_seconds histogram\n"));
        assert!(
            text.contains("x_seconds_bucket{route=\"a\",le=\"0.0025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{route=\"a\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{route=\"a\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_sum{route=\"a\"} 0.003\n"),
            "{text}"
        );
        assert!(text.ends_with("x_seconds_count{route=\"a\"} 1\n"), "{text}");
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::new();
        e.family(
            "t_total",
            Kind::Counter,
            "Back\\slash and\nnewline, \"quoted\".",
        );
        e.sample(
            "t_total",
            &[("route", "a\"b\\c\nd"), ("host", "é*.example.com/")],
            7u64,
        );
        e.sample("t_total", &[], 1.5);
        e.sample("t_total", &[], f64::INFINITY);
        assert_eq!(
            e.finish(),
            "# HELP t_total Back\\\\slash and\\nnewline, \"quoted\".\n\
             # TYPE t_total counter\n\
             t_total{route=\"a\\\"b\\\\c\\nd\",host=\"é*.example.com/\"} 7\n\
             t_total 1.5\n\
             t_total +Inf\n"
        );
    }

    #[test]
    fn durations_are_written_in_seconds() {
        let mut e = Exposition::new();
        e.sample("d", &[], Duration::from_millis(1500));
        e.sample("d", &[], Duration::from_micros(7));
        assert_eq!(e.finish(), "d 1.5\nd 0.000007\n");
    }
}
