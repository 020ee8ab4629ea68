//! How each source is doing: when it last synced with what it watches, how often that failed,
//! and how many of its snapshots the reconciler accepted and rejected.
//!
//! A source reports through its [`SourceHealth`], which it gets once, by its source id, from
//! the process-wide registry:
//!
//! ```
//! use drover_control::sources;
//! use drover_model::SourceId;
//!
//! let health = sources::health(&SourceId("docker".into()));
//! // After each successful read of what the source watches (a listing, an event, a
//! // lookup), whether or not it changed anything:
//! health.synced();
//! // After each failed one (the daemon is unreachable, the answer did not parse):
//! health.failed("cannot reach /var/run/docker.sock: connection refused");
//! ```
//!
//! The registry is global so that a source needs no wiring to report: `drover-admin` reads it
//! for `GET /metrics` (`drover_source_*`). Reporting takes a short mutex for the error text
//! and otherwise touches atomics; it is meant for sync events, not for requests. The
//! reconciler counts accepted and rejected snapshots in the same place.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use drover_model::SourceId;

/// What one source reported, and what the reconciler made of its snapshots.
#[derive(Debug, Default)]
pub struct SourceHealth {
    /// Unix time of the last successful sync, in milliseconds; 0 before the first.
    last_success_ms: AtomicU64,
    /// Unix time of the last failed sync, in milliseconds; 0 before the first.
    last_failure_ms: AtomicU64,
    errors: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    last_error: Mutex<Option<String>>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_unix_ms(ms: u64) -> Option<SystemTime> {
    (ms != 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

impl SourceHealth {
    /// The source read what it watches successfully just now (a file parsed, a DNS answer,
    /// a Consul answer, a Docker listing), whether or not anything changed.
    pub fn synced(&self) {
        // Never 0, which means "never".
        self.last_success_ms
            .store(unix_ms(SystemTime::now()).max(1), Ordering::Relaxed);
    }

    /// A sync failed; `error` says why. The source keeps serving what it had, as every
    /// source does; this counts the failure and keeps the message for whoever looks.
    pub fn failed(&self, error: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.last_failure_ms
            .store(unix_ms(SystemTime::now()).max(1), Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    /// When the last successful sync was, if there was one.
    pub fn last_success(&self) -> Option<SystemTime> {
        from_unix_ms(self.last_success_ms.load(Ordering::Relaxed))
    }

    /// When the last failed sync was, if there was one.
    pub fn last_failure(&self) -> Option<SystemTime> {
        from_unix_ms(self.last_failure_ms.load(Ordering::Relaxed))
    }

    /// Whether the latest sync, success or failure, succeeded; None before either.
    pub fn is_up(&self) -> Option<bool> {
        let ok = self.last_success_ms.load(Ordering::Relaxed);
        let failed = self.last_failure_ms.load(Ordering::Relaxed);
        (ok != 0 || failed != 0).then_some(ok >= failed)
    }

    /// Failed syncs so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The message of the last failed sync.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Snapshots of this source the reconciler accepted (including those that changed
    /// nothing).
    pub fn snapshots_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Snapshots of this source the reconciler rejected.
    pub fn snapshots_rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    pub(crate) fn count_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
}

fn registry() -> &'static Mutex<BTreeMap<SourceId, Arc<SourceHealth>>> {
    static REGISTRY: OnceLock<Mutex<BTreeMap<SourceId, Arc<SourceHealth>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The health handle of `source`, registered on first use. Every call with the same id
/// returns the same handle: get it once when the source starts, and keep it.
pub fn health(source: &SourceId) -> Arc<SourceHealth> {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(source.clone())
        .or_default()
        .clone()
}

/// Every source registered so far, by id.
pub fn all() -> Vec<(SourceId, Arc<SourceHealth>)> {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(id, h)| (id.clone(), h.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_handle_per_source_and_its_reports() {
        let id = SourceId("test:sources".into());
        let h = health(&id);
        assert!(Arc::ptr_eq(&h, &health(&id)));
        assert_eq!(h.is_up(), None);
        assert_eq!(h.last_success(), None);
        h.failed("cannot reach it");
        assert_eq!(h.is_up(), Some(false));
        assert_eq!(h.errors(), 1);
        assert_eq!(h.last_error().as_deref(), Some("cannot reach it"));
        h.synced();
        assert_eq!(h.is_up(), Some(true));
        assert!(h.last_success().is_some());
        assert!(all().iter().any(|(i, _)| *i == id));
    }
}
