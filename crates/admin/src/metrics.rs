//! `GET /metrics`: the Prometheus text exposition (format 0.0.4), written at scrape time from
//! the data plane's atomics (the routing table in force), the reconciler's counters and the
//! sources' health. docs/observability.md lists every metric.

use std::time::SystemTime;

use bytes::Bytes;
use drover_control::sources;
use drover_proxy::metrics::{CONTENT_TYPE, Exposition, Kind};
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::Admin;
use crate::reply::Body;

pub fn render(admin: &Admin) -> http::Response<Body> {
    let mut out = Exposition::new();
    let name = "drover_build_info";
    out.family(name, Kind::Gauge, "Always 1; the version of drover.");
    out.sample(name, &[("version", env!("CARGO_PKG_VERSION"))], 1u64);
    admin.proxy.write_metrics(&mut out);
    write_reconciler(admin, &mut out);
    write_sources(&mut out);

    let mut r = http::Response::new(Full::new(Bytes::from(out.finish())).boxed());
    *r.status_mut() = StatusCode::OK;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    r
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn write_reconciler(admin: &Admin, out: &mut Exposition) {
    let (generation, last_change) = {
        let status = admin.status.borrow();
        (status.generation, status.last_change_at)
    };
    let m = &admin.reconciler;
    let counters: [(&str, Kind, &str, u64); 4] = [
        (
            "drover_reconciler_generation",
            Kind::Gauge,
            "The generation of the configuration in force; each publish adds one.",
            generation,
        ),
        (
            "drover_reconciler_publishes_total",
            Kind::Counter,
            "Configurations published to the data plane.",
            m.publishes(),
        ),
        (
            "drover_reconciler_rejected_total",
            Kind::Counter,
            "Snapshots rejected: invalid, clashing with another source, or refused by the data plane.",
            m.rejected(),
        ),
        (
            "drover_reconciler_unchanged_total",
            Kind::Counter,
            "Snapshots accepted that changed nothing.",
            m.unchanged(),
        ),
    ];
    for (name, kind, help, value) in counters {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
    let name = "drover_reconciler_last_publish_timestamp_seconds";
    out.family(
        name,
        Kind::Gauge,
        "When the configuration in force was published (Unix time).",
    );
    if let Some(at) = last_change {
        out.sample(name, &[], unix_seconds(at));
    }
    let name = "drover_reconciler_last_publish_duration_seconds";
    out.family(
        name,
        Kind::Gauge,
        "How long the last batch sent to the data plane took: merge, validation, table build, binds and swap.",
    );
    out.sample(name, &[], m.last_publish_duration());
    let name = "drover_reconciler_publish_duration_seconds";
    let (count, sum) = m.publish_durations();
    out.family(
        name,
        Kind::Summary,
        "Time of each batch sent to the data plane: merge, validation, table build, binds and swap.",
    );
    out.sample(&format!("{name}_sum"), &[], sum);
    out.sample(&format!("{name}_count"), &[], count);
}

fn write_sources(out: &mut Exposition) {
    let all = sources::all();
    let now = SystemTime::now();
    let name = "drover_source_last_sync_timestamp_seconds";
    out.family(
        name,
        Kind::Gauge,
        "When the source last read what it watches successfully (Unix time).",
    );
    for (id, h) in &all {
        if let Some(at) = h.last_success() {
            out.sample(name, &[("source", &id.0)], unix_seconds(at));
        }
    }
    let name = "drover_source_staleness_seconds";
    out.family(
        name,
        Kind::Gauge,
        "Time since the source last read what it watches successfully.",
    );
    for (id, h) in &all {
        if let Some(at) = h.last_success() {
            let age = now.duration_since(at).unwrap_or_default();
            out.sample(name, &[("source", &id.0)], age);
        }
    }
    let name = "drover_source_up";
    out.family(
        name,
        Kind::Gauge,
        "1 when the source's latest sync succeeded, 0 when it failed.",
    );
    for (id, h) in &all {
        if let Some(up) = h.is_up() {
            out.sample(name, &[("source", &id.0)], up);
        }
    }
    type Read = fn(&sources::SourceHealth) -> u64;
    let counters: [(&str, &str, Read); 3] = [
        (
            "drover_source_sync_errors_total",
            "Failed syncs: the source could not read what it watches, or what it read was invalid.",
            |h| h.errors(),
        ),
        (
            "drover_source_snapshots_accepted_total",
            "Snapshots of the source the reconciler accepted.",
            |h| h.snapshots_accepted(),
        ),
        (
            "drover_source_snapshots_rejected_total",
            "Snapshots of the source the reconciler rejected.",
            |h| h.snapshots_rejected(),
        ),
    ];
    for (name, help, read) in counters {
        out.family(name, Kind::Counter, help);
        for (id, h) in &all {
            out.sample(name, &[("source", &id.0)], read(h));
        }
    }
}
