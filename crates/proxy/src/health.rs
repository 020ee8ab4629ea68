//! Endpoint health: active checks, passive outlier ejection, slow start, and the report the
//! API shows.
//!
//! Health lives in atomics beside each endpoint's counters, so it survives table rebuilds
//! and requests read it without a lock. Active checks run as one task per endpoint of each
//! service that has a `health_check`; the checker is reconciled with every published table
//! (a new endpoint gets a task, a removed or disabled one loses it, a changed check
//! restarts). The fall/rise state machine is [`Machine`], kept free of I/O so that it can be
//! tested alone; [`check_loop`] drives it on tokio's clock, so its timing is tested with the
//! clock paused.
//!
//! Passive checks follow Envoy's outlier detection: consecutive failures (5xx answers or
//! connect errors) eject an endpoint for `base_ejection` × the number of its ejections,
//! at most `max_ejection`, never more than `max_ejected_percent` of a service at once.
//! A passing active check ends an ejection early.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use drover_model::UpstreamProtocol;
use drover_model::{AdminState, CheckKind, HealthCheck, Outlier};
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::pool::EndpointState;
use crate::table::RoutingTable;
use crate::upstream::Upstream;

/// Milliseconds since the process started, the clock health timestamps are kept in.
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

const UP: u8 = 0;
const DOWN: u8 = 1;
/// Waiting for a first passing check (`wait_for_first_check`).
const UNKNOWN: u8 = 2;

/// An endpoint's health, shared by every table it appears in.
#[derive(Debug)]
pub struct Health {
    active: AtomicU8,
    /// Ejected until this `now_ms`; 0 when not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    consecutive_failures: AtomicU32,
    /// When it last became available (`now_ms`), for slow start.
    available_since: AtomicU64,
    /// The service's slow-start window in ms; 0 when off.
    slow_start_ms: AtomicU64,
    /// What the API shows. Written by checks and ejections, read by the API: never touched
    /// by a request that goes through normally.
    report: Mutex<Report>,
}

/// The health of an endpoint as the API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// `healthy`, `unhealthy`, `unknown` (waiting for its first check) or `ejected`.
    pub state: &'static str,
    /// Why it is in that state.
    pub reason: String,
    /// Since when (Unix ms).
    pub since_ms: u128,
    /// The last active check: when (Unix ms), whether it passed, and its error.
    pub last_check_ms: Option<u128>,
    pub last_check_passed: Option<bool>,
    pub last_check_error: Option<String>,
    /// How many times outlier detection ejected it.
    pub ejections: u32,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl Health {
    pub(crate) fn new() -> Self {
        Self {
            active: AtomicU8::new(UP),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            available_since: AtomicU64::new(now_ms()),
            slow_start_ms: AtomicU64::new(0),
            report: Mutex::new(Report {
                state: "healthy",
                reason: "new endpoints are healthy until a check fails".into(),
                since_ms: unix_ms(),
                ..Report::default()
            }),
        }
    }

    /// Whether it may take requests: not down by active checks, and not ejected.
    #[inline]
    pub fn is_available(&self) -> bool {
        if self.active.load(Ordering::Relaxed) != UP {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || until <= now_ms()
    }

    /// Share of its weight it may use now: ramps from 0 to 1 over the slow-start window after
    /// it became available.
    #[inline]
    pub fn ramp(&self) -> f64 {
        if self.slow_start_ms.load(Ordering::Relaxed) == 0 {
            return 1.0;
        }
        self.ramp_at(now_ms())
    }

    fn ramp_at(&self, now: u64) -> f64 {
        let window = self.slow_start_ms.load(Ordering::Relaxed);
        if window == 0 {
            return 1.0;
        }
        let age = now.saturating_sub(self.available_since.load(Ordering::Relaxed));
        if age >= window {
            1.0
        } else {
            // A small floor, so that a ramping endpoint is tried at all.
            (age as f64 / window as f64).max(0.05)
        }
    }

    pub(crate) fn set_slow_start(&self, window: Duration) {
        self.slow_start_ms
            .store(window.as_millis() as u64, Ordering::Relaxed);
    }

    /// Starts as unknown until a first passing check.
    pub(crate) fn wait_for_first_check(&self) {
        if self
            .active
            .compare_exchange(UP, UNKNOWN, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.set_report("unknown", "waiting for a first passing health check".into());
        }
    }

    pub fn report(&self) -> Report {
        let mut r = self
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        r.ejections = self.ejections.load(Ordering::Relaxed);
        let until = self.ejected_until.load(Ordering::Relaxed);
        if r.state == "ejected" && (until == 0 || until <= now_ms()) {
            r.state = "healthy";
            r.reason = "the ejection has ended".into();
        }
        r
    }

    fn set_report(&self, state: &'static str, reason: String) {
        let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        r.state = state;
        r.reason = reason;
        r.since_ms = unix_ms();
    }

    /// A request got an answer that is not a 5xx.
    #[inline]
    pub(crate) fn record_success(&self) {
        // Read first: the common case writes nothing, so the cache line stays shared.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed on this endpoint (a 5xx, or no answer). Returns how long it was
    /// ejected for, if this failure ejected it.
    pub(crate) fn record_failure(
        &self,
        outlier: &Outlier,
        ejected_in_service: impl FnOnce() -> (usize, usize),
    ) -> Option<Duration> {
        if outlier.consecutive_failures == 0 {
            return None;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures || !self.is_available() {
            return None;
        }
        // Never more than the set share of the service ejected (but one may always go).
        let (ejected, total) = ejected_in_service();
        let allowed = (total * outlier.max_ejected_percent as usize / 100).max(1);
        if ejected >= allowed {
            return None;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let count = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = (outlier.base_ejection.get() * count).min(outlier.max_ejection.get());
        self.ejected_until
            .store(now_ms() + duration.as_millis() as u64, Ordering::Relaxed);
        self.set_report(
            "ejected",
            format!(
                "{failures} consecutive failures; ejected for {}s (ejection {count})",
                duration.as_secs()
            ),
        );
        Some(duration)
    }

    /// Whether outlier detection has it out right now.
    pub(crate) fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > now_ms()
    }

    /// Applies an active check's result; returns the new state when it changed.
    fn record_check(&self, machine: &mut Machine, result: &Result<(), String>) -> Option<bool> {
        {
            let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
            r.last_check_ms = Some(unix_ms());
            r.last_check_passed = Some(result.is_ok());
            r.last_check_error = result.as_ref().err().cloned();
        }
        if result.is_ok() && self.is_ejected() {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.available_since.store(now_ms(), Ordering::Relaxed);
            self.set_report(
                "healthy",
                "a passing health check ended its ejection".into(),
            );
        }
        let change = machine.record(result.is_ok())?;
        if change {
            self.active.store(UP, Ordering::Relaxed);
            self.available_since.store(now_ms(), Ordering::Relaxed);
            self.set_report(
                "healthy",
                format!("{} consecutive passing checks", machine.rise),
            );
        } else {
            self.active.store(DOWN, Ordering::Relaxed);
            let error = result.as_ref().err().cloned().unwrap_or_default();
            self.set_report(
                "unhealthy",
                format!("{} consecutive failed checks; last: {error}", machine.fall),
            );
        }
        Some(change)
    }
}

/// The fall/rise state machine of active checks.
#[derive(Debug, Clone)]
pub struct Machine {
    fall: u32,
    rise: u32,
    /// None until the first verdict when waiting for a first check.
    up: Option<bool>,
    streak: u32,
}

impl Machine {
    /// `up` is the starting state: Some(true) for new endpoints (weldr), None when they
    /// wait for a first check.
    pub fn new(fall: u32, rise: u32, up: Option<bool>) -> Self {
        Self {
            fall,
            rise,
            up,
            streak: 0,
        }
    }

    /// Counts one check; returns the new state when it changed.
    pub fn record(&mut self, pass: bool) -> Option<bool> {
        match self.up {
            // Waiting: one pass lets traffic in; `fall` failures make it down.
            None if pass => {
                self.up = Some(true);
                self.streak = 0;
                Some(true)
            }
            Some(up) if up == pass => {
                self.streak = 0;
                None
            }
            _ => {
                self.streak += 1;
                let needed = if pass { self.rise } else { self.fall };
                if self.streak < needed {
                    return None;
                }
                self.streak = 0;
                self.up = Some(pass);
                Some(pass)
            }
        }
    }
}

/// Checks one endpoint until `stop`: probes every `interval` (plus jitter), applies each
/// result, and logs every change of state.
pub(crate) async fn check_loop<P, F>(
    service: String,
    endpoint: Arc<EndpointState>,
    check: HealthCheck,
    wait_for_first: bool,
    mut probe: P,
    stop: CancellationToken,
) where
    P: FnMut() -> F,
    F: Future<Output = Result<(), String>>,
{
    let start = if wait_for_first { None } else { Some(true) };
    let mut machine = Machine::new(check.fall, check.rise, start);
    let jitter = check.jitter.get().as_millis() as u64;
    let mut round: u64 = 0;
    loop {
        let result = tokio::select! {
            r = tokio::time::timeout(check.timeout.get(), probe()) => {
                r.unwrap_or_else(|_| Err(format!("no answer within {}", check.timeout)))
            }
            _ = stop.cancelled() => return,
        };
        if let Some(up) = endpoint.health.record_check(&mut machine, &result) {
            if up {
                tracing::info!(service, endpoint = %endpoint.address, "endpoint is healthy again");
            } else {
                tracing::warn!(
                    service,
                    endpoint = %endpoint.address,
                    "endpoint is down after {} failed checks: {}",
                    check.fall,
                    result.as_ref().err().map_or("", String::as_str)
                );
            }
        }
        round += 1;
        let extra = if jitter == 0 {
            0
        } else {
            spread(endpoint.address, round) % (jitter + 1)
        };
        tokio::select! {
            _ = tokio::time::sleep(check.interval.get() + Duration::from_millis(extra)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// A pseudo-random number that differs per endpoint and round, for jitter.
fn spread(address: SocketAddr, round: u64) -> u64 {
    use std::hash::BuildHasher;
    static SEED: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    SEED.get_or_init(Default::default)
        .hash_one((address, round))
}

/// One active check: a TCP connect, or an HTTP GET whose status must be in range. An HTTP
/// check goes the way requests do: over TLS, verified the same way, when the service has
/// `tls`, and in HTTP/2 when the service speaks it (on a connection of its own).
pub(crate) async fn probe(
    address: SocketAddr,
    check: &HealthCheck,
    upstream: &Upstream,
) -> Result<(), String> {
    if check.kind == CheckKind::Tcp {
        TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        return Ok(());
    }
    // The check's own timeout bounds the whole probe.
    let stream = upstream
        .open(address, check.timeout.get())
        .await
        .map_err(|e| e.to_string())?;
    let host = check.host.clone().unwrap_or_else(|| address.to_string());
    let io = TokioIo::new(stream);
    let res = match upstream.protocol {
        UpstreamProtocol::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let driver = tokio::spawn(conn);
            let req = Request::get(check.path.as_str())
                .header(header::HOST, host)
                .header(header::USER_AGENT, "drover-health-check")
                .header(header::CONNECTION, "close")
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("request: {e}"))?;
            let res = sender.send_request(req).await;
            driver.abort();
            res
        }
        UpstreamProtocol::Http2 => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            let driver = tokio::spawn(conn);
            let uri = format!("{}://{host}{}", upstream.scheme(), check.path);
            let req = Request::get(uri)
                .version(http::Version::HTTP_2)
                .header(header::USER_AGENT, "drover-health-check")
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("request: {e}"))?;
            let res = sender.send_request(req).await;
            driver.abort();
            res
        }
    };
    let status = res.map_err(|e| format!("request: {e}"))?.status().as_u16();
    if check.expect_status.contains(status) {
        Ok(())
    } else {
        Err(format!("status {status}, expected {}", check.expect_status))
    }
}

/// Keeps one check task per checked endpoint, in step with the published table.
#[derive(Default)]
pub(crate) struct Checker {
    running: HashMap<(String, SocketAddr), Running>,
}

struct Running {
    endpoint: Arc<EndpointState>,
    check: HealthCheck,
    /// The service's connector the checks go through.
    upstream: Arc<Upstream>,
    stop: CancellationToken,
}

/// What a check task needs: the endpoint, the check, whether to wait for a first pass, and
/// the service's connector.
type Wanted = (Arc<EndpointState>, HealthCheck, bool, Arc<Upstream>);

impl Checker {
    /// Starts, restarts and stops check tasks to match `table`.
    pub(crate) fn reconcile(&mut self, table: &RoutingTable, shutdown: &CancellationToken) {
        let mut wanted: HashMap<(String, SocketAddr), Wanted> = HashMap::new();
        for service in table.services() {
            let Some(check) = &service.spec.health_check else {
                continue;
            };
            for (endpoint, spec) in service.endpoints.iter().zip(&service.spec.endpoints) {
                // Disabled endpoints are out of service: their checks stop (HAProxy's maint).
                if spec.state == AdminState::Disabled {
                    continue;
                }
                wanted.insert(
                    (service.name.clone(), endpoint.address),
                    (
                        endpoint.clone(),
                        check.clone(),
                        service.spec.wait_for_first_check,
                        service.upstream.clone(),
                    ),
                );
            }
        }
        self.running.retain(|key, r| {
            let keep = wanted.get(key).is_some_and(|(e, c, _, u)| {
                Arc::ptr_eq(e, &r.endpoint) && *c == r.check && Arc::ptr_eq(u, &r.upstream)
            });
            if !keep {
                r.stop.cancel();
            }
            keep
        });
        for (key, (endpoint, check, wait, upstream)) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let stop = shutdown.child_token();
            let (service, address) = key.clone();
            let probe_check = check.clone();
            let probe_upstream = upstream.clone();
            tokio::spawn(check_loop(
                service,
                endpoint.clone(),
                check.clone(),
                wait,
                move || {
                    let c = probe_check.clone();
                    let u = probe_upstream.clone();
                    async move { probe(address, &c, &u).await }
                },
                stop.clone(),
            ));
            self.running.insert(
                key,
                Running {
                    endpoint,
                    check,
                    upstream,
                    stop,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_after_fall_failures_and_up_after_rise_passes() {
        let mut m = Machine::new(3, 2, Some(true));
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(true), None, "a pass resets the failure streak");
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(
            m.record(false),
            Some(false),
            "down at the third failure in a row"
        );
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(true), Some(true), "up at the second pass in a row");
    }

    #[test]
    fn waiting_endpoints_need_one_pass() {
        let mut m = Machine::new(3, 2, None);
        assert_eq!(m.record(true), Some(true));
        let mut m = Machine::new(2, 2, None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), Some(false));
    }

    fn outlier() -> Outlier {
        Outlier {
            consecutive_failures: 3,
            base_ejection: drover_model::Duration::from_secs(30),
            max_ejection: drover_model::Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_with_a_growing_time_capped_at_the_maximum() {
        let h = Health::new();
        let none_ejected = || (0, 4);
        assert_eq!(h.record_failure(&outlier(), none_ejected), None);
        h.record_success();
        assert_eq!(h.record_failure(&outlier(), none_ejected), None);
        assert_eq!(h.record_failure(&outlier(), none_ejected), None);
        assert_eq!(
            h.record_failure(&outlier(), none_ejected),
            Some(Duration::from_secs(30))
        );
        assert!(!h.is_available());
        assert_eq!(h.report().state, "ejected");
        // Let it back, then eject again: twice as long; and never past the maximum.
        h.ejected_until.store(0, Ordering::Relaxed);
        for _ in 0..3 {
            h.record_failure(&outlier(), none_ejected);
        }
        assert_eq!(h.ejections.load(Ordering::Relaxed), 2);
        h.ejections.store(20, Ordering::Relaxed);
        h.ejected_until.store(0, Ordering::Relaxed);
        let mut last = None;
        for _ in 0..3 {
            last = h.record_failure(&outlier(), none_ejected);
        }
        assert_eq!(last, Some(Duration::from_secs(300)));
    }

    #[test]
    fn no_more_than_the_set_share_is_ejected() {
        let h = Health::new();
        for _ in 0..10 {
            assert_eq!(
                h.record_failure(&outlier(), || (2, 4)),
                None,
                "2 of 4 out already"
            );
        }
        assert!(h.is_available());
    }

    #[test]
    fn slow_start_ramps_the_share_up_over_its_window() {
        let h = Health::new();
        assert_eq!(h.ramp(), 1.0, "off by default");
        h.set_slow_start(Duration::from_secs(10));
        h.available_since.store(1_000, Ordering::Relaxed);
        assert_eq!(h.ramp_at(3_500), 0.25, "a quarter of the way in");
        assert_eq!(
            h.ramp_at(1_000),
            0.05,
            "a new endpoint still gets a trickle"
        );
        assert_eq!(h.ramp_at(11_000), 1.0, "full share after the window");
    }

    #[tokio::test(start_paused = true)]
    async fn the_check_loop_keeps_its_interval_and_timeout() {
        let endpoint = Arc::new(EndpointState::new("127.0.0.1:1".parse().unwrap()));
        let check = HealthCheck {
            interval: drover_model::Duration::from_secs(30),
            timeout: drover_model::Duration::from_secs(5),
            ..HealthCheck::default()
        };
        let started = tokio::time::Instant::now();
        let stop = CancellationToken::new();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        // Probes that never answer: each times out after 5 s.
        let task = tokio::spawn(check_loop(
            "svc".into(),
            endpoint.clone(),
            check,
            false,
            move || {
                seen.lock().unwrap().push(started.elapsed().as_secs());
                std::future::pending::<Result<(), String>>()
            },
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(100)).await;
        // Probes at 0, 35 and 70 s (5 s timeout + 30 s interval); down after the third.
        assert_eq!(*calls.lock().unwrap(), [0, 35, 70]);
        assert!(!endpoint.health.is_available());
        let report = endpoint.health.report();
        assert_eq!(report.state, "unhealthy");
        assert!(
            report.reason.contains("no answer within 5s"),
            "{}",
            report.reason
        );
        stop.cancel();
        task.await.unwrap();
    }
}
