//! The reconciler: the one place where configuration changes.
//!
//! Sources send full [`Snapshot`]s of their slice of the world. The reconciler keeps the last
//! accepted snapshot of every source, merges them, validates the result and hands it to the
//! [`Applier`] (the data plane), which builds its routing table and binds new listeners. Only
//! when all of that succeeded is the change accepted; otherwise the snapshot is rejected with
//! its reason, and the configuration in force, including that source's previous snapshot,
//! stays as it was. Every accepted change is logged at info level, one line per difference,
//! with its source and why it was sent.
//!
//! Snapshots that arrive together are applied together, so a burst of events costs one
//! rebuild.

pub mod api;
pub mod metrics;
pub mod sources;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use drover_model::{Change, Config, Effective, SourceId};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use metrics::ReconcilerMetrics;

/// Events kept for subscribers that fall behind before they lose some.
const EVENT_BACKLOG: usize = 256;

/// A source's whole slice of the configuration, and why it was sent.
#[derive(Debug)]
pub struct Snapshot {
    pub source: SourceId,
    pub config: Config,
    /// Why the source sent it ("file changed", "SIGHUP", "startup"); goes into the log.
    pub reason: String,
    /// Told whether the snapshot was accepted: the generation it went live in, or why not.
    pub reply: Option<oneshot::Sender<Result<u64, String>>>,
}

impl Snapshot {
    pub fn new(source: SourceId, config: Config, reason: impl Into<String>) -> Self {
        Self {
            source,
            config,
            reason: reason.into(),
            reply: None,
        }
    }
}

/// What the data plane does with an effective configuration.
pub trait Applier: Send + 'static {
    /// Makes `effective` the configuration that traffic follows. An error rejects it, and must
    /// leave what was applied before in force, untouched.
    fn apply(&mut self, effective: &Arc<Effective>) -> Result<(), String>;
}

/// The configuration in force, as others (the admin API, tests) can watch it.
#[derive(Debug, Clone)]
pub struct Status {
    /// Counts accepted changes; 0 until the first one.
    pub generation: u64,
    pub effective: Arc<Effective>,
    /// What the last accepted change changed, and where it came from.
    pub last_changes: Arc<Vec<Change>>,
    pub last_source: Option<SourceId>,
    pub last_change_at: Option<SystemTime>,
    /// The most recent rejection, kept until the next one.
    pub last_rejection: Option<Rejection>,
}

/// What the change stream carries: every accepted change and every rejection.
#[derive(Debug, Clone)]
pub enum Event {
    Change {
        generation: u64,
        /// The sources of the snapshots applied together, comma-separated.
        source: String,
        /// Why they were sent, comma-separated in the same order.
        reason: String,
        at: SystemTime,
        changes: Arc<Vec<Change>>,
    },
    Rejected {
        source: SourceId,
        error: String,
        at: SystemTime,
    },
}

/// A snapshot that was not accepted.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub source: SourceId,
    pub error: String,
    pub at: SystemTime,
}

/// Where sources send their snapshots.
pub type SnapshotSender = mpsc::Sender<Snapshot>;

/// Merges the snapshots of all sources and keeps the data plane in step with them.
pub struct Reconciler<A> {
    accepted: BTreeMap<SourceId, Config>,
    applier: A,
    status: watch::Sender<Status>,
    events: broadcast::Sender<Arc<Event>>,
    metrics: Arc<ReconcilerMetrics>,
}

impl<A: Applier> Reconciler<A> {
    pub fn new(applier: A) -> Self {
        let (status, _) = watch::channel(Status {
            generation: 0,
            effective: Arc::new(Effective::default()),
            last_changes: Arc::new(Vec::new()),
            last_source: None,
            last_change_at: None,
            last_rejection: None,
        });
        Self {
            accepted: BTreeMap::new(),
            applier,
            status,
            events: broadcast::channel(EVENT_BACKLOG).0,
            metrics: Arc::default(),
        }
    }

    /// Its counters: publishes, rejections, publish durations. Per-source counts of accepted
    /// and rejected snapshots are kept in [`sources`].
    pub fn metrics(&self) -> Arc<ReconcilerMetrics> {
        self.metrics.clone()
    }

    /// The change stream; call `subscribe` on it for a receiver.
    pub fn events(&self) -> broadcast::Sender<Arc<Event>> {
        self.events.clone()
    }

    /// Follows the configuration in force.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Applies one snapshot now; returns the generation it went live in, or why it was
    /// rejected. Used at start-up, where a bad first config must stop the process.
    pub fn apply_now(&mut self, mut snapshot: Snapshot) -> Result<u64, String> {
        let (reply, mut outcome) = oneshot::channel();
        snapshot.reply = Some(reply);
        self.apply_batch(&mut vec![snapshot]);
        outcome
            .try_recv()
            .unwrap_or_else(|_| Err("the reconciler gave no answer".into()))
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Snapshot>) {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, 64).await > 0 {
            self.apply_batch(&mut batch);
        }
    }

    fn apply_batch(&mut self, batch: &mut Vec<Snapshot>) {
        let started = Instant::now();
        let mut candidate = self.accepted.clone();
        let mut taken = Vec::new();
        for snapshot in batch.drain(..) {
            let previous = candidate.insert(snapshot.source.clone(), snapshot.config.clone());
            match effective(&candidate) {
                Ok(_) => taken.push(snapshot),
                Err(error) => {
                    // Put back what the source had before: nothing accepted is lost.
                    match previous {
                        Some(p) => candidate.insert(snapshot.source.clone(), p),
                        None => candidate.remove(&snapshot.source),
                    };
                    self.reject(snapshot, error);
                }
            }
        }
        if taken.is_empty() {
            return;
        }
        let next = match effective(&candidate) {
            Ok(e) => Arc::new(e),
            Err(error) => {
                // Each was valid alone against the accepted set; together they clash.
                for s in taken {
                    self.reject(s, error.clone());
                }
                return;
            }
        };
        let current = self.status.borrow().effective.clone();
        let changes = drover_model::diff(&current.config, &next.config);
        let first_apply = self.status.borrow().generation == 0;
        if changes.is_empty() && !first_apply {
            self.accepted = candidate;
            let generation = self.status.borrow().generation;
            for s in taken {
                tracing::debug!(source = %s.source, reason = %s.reason, "no change");
                sources::health(&s.source).count_accepted();
                self.metrics.count_unchanged();
                if let Some(reply) = s.reply {
                    let _ = reply.send(Ok(generation));
                }
            }
            return;
        }
        let applied = self.applier.apply(&next);
        self.metrics.time_publish(started.elapsed());
        if let Err(error) = applied {
            for s in taken {
                self.reject(s, error.clone());
            }
            return;
        }
        self.metrics.count_publish();
        self.accepted = candidate;
        let sources: Vec<String> = taken
            .iter()
            .map(|s| format!("{} ({})", s.source, s.reason))
            .collect();
        let sources = sources.join(", ");
        let changes = Arc::new(changes);
        let at = SystemTime::now();
        let mut generation = 0;
        self.status.send_modify(|st| {
            st.generation += 1;
            generation = st.generation;
            st.effective = next.clone();
            st.last_changes = changes.clone();
            st.last_source = taken.last().map(|s| s.source.clone());
            st.last_change_at = Some(at);
        });
        let joined =
            |f: fn(&Snapshot) -> String| taken.iter().map(f).collect::<Vec<_>>().join(", ");
        // No subscriber is not an error.
        let _ = self.events.send(Arc::new(Event::Change {
            generation,
            source: joined(|s| s.source.to_string()),
            reason: joined(|s| s.reason.clone()),
            at,
            changes: changes.clone(),
        }));
        if changes.is_empty() {
            tracing::info!(generation, from = %sources, "configuration applied (empty)");
        }
        for change in changes.iter() {
            tracing::info!(generation, from = %sources, "{change}");
        }
        for s in taken {
            sources::health(&s.source).count_accepted();
            if let Some(reply) = s.reply {
                let _ = reply.send(Ok(generation));
            }
        }
    }

    fn reject(&mut self, snapshot: Snapshot, error: String) {
        tracing::error!(
            source = %snapshot.source,
            reason = %snapshot.reason,
            "configuration rejected, the previous one keeps serving: {error}"
        );
        sources::health(&snapshot.source).count_rejected();
        self.metrics.count_rejected();
        let at = SystemTime::now();
        self.status.send_modify(|st| {
            st.last_rejection = Some(Rejection {
                source: snapshot.source.clone(),
                error: error.clone(),
                at,
            });
        });
        let _ = self.events.send(Arc::new(Event::Rejected {
            source: snapshot.source.clone(),
            error: error.clone(),
            at,
        }));
        if let Some(reply) = snapshot.reply {
            let _ = reply.send(Err(error));
        }
    }
}

/// Merges and validates; the error lists every problem, one per line.
fn effective(sources: &BTreeMap<SourceId, Config>) -> Result<Effective, String> {
    let merged = drover_model::merge(sources.iter()).map_err(|errs| join(&errs))?;
    drover_model::validate(&merged.config).map_err(|errs| join(&errs))?;
    Ok(merged)
}

fn join<E: std::fmt::Display>(errors: &[E]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::EndpointSpec;

    /// Records what it was given; fails when told to.
    struct Recorder {
        applied: Arc<std::sync::Mutex<Vec<usize>>>,
        fail: bool,
    }

    impl Applier for Recorder {
        fn apply(&mut self, e: &Arc<Effective>) -> Result<(), String> {
            if self.fail {
                return Err("cannot bind".into());
            }
            let n = e.config.services.values().map(|s| s.endpoints.len()).sum();
            self.applied.lock().unwrap().push(n);
            Ok(())
        }
    }

    fn config(endpoints: &[&str]) -> Config {
        let mut c = Config::embedded_default("127.0.0.1:8080".parse().unwrap());
        c.services.get_mut("default").unwrap().endpoints = endpoints
            .iter()
            .map(|a| EndpointSpec::new(a.parse().unwrap(), 1))
            .collect();
        c
    }

    fn file() -> SourceId {
        SourceId("file".into())
    }

    #[test]
    fn an_invalid_snapshot_keeps_the_previous_one_of_that_source() {
        let applied = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut r = Reconciler::new(Recorder {
            applied: applied.clone(),
            fail: false,
        });
        assert_eq!(
            r.apply_now(Snapshot::new(file(), config(&["127.0.0.1:1"]), "t")),
            Ok(1)
        );
        let mut bad = config(&["127.0.0.1:1"]);
        bad.routes[0].service = "missing".into();
        let err = r.apply_now(Snapshot::new(file(), bad, "t")).unwrap_err();
        assert!(err.contains("routes[0].service"), "{err}");
        assert_eq!(r.status.borrow().generation, 1);
        assert_eq!(r.accepted[&file()], config(&["127.0.0.1:1"]));
        assert_eq!(*applied.lock().unwrap(), [1]);
        // A later good snapshot still applies.
        assert_eq!(
            r.apply_now(Snapshot::new(
                file(),
                config(&["127.0.0.1:1", "127.0.0.1:2"]),
                "t"
            )),
            Ok(2)
        );
    }

    #[test]
    fn a_failed_apply_changes_nothing() {
        let applied = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut r = Reconciler::new(Recorder {
            applied,
            fail: true,
        });
        assert_eq!(
            r.apply_now(Snapshot::new(file(), config(&[]), "t")),
            Err("cannot bind".into())
        );
        assert!(r.accepted.is_empty());
        assert_eq!(r.status.borrow().generation, 0);
    }

    #[test]
    fn publishes_and_rejections_are_counted_overall_and_per_source() {
        let mut r = Reconciler::new(Recorder {
            applied: Arc::default(),
            fail: false,
        });
        let source = SourceId("test:reconciler-metrics".into());
        let metrics = r.metrics();
        r.apply_now(Snapshot::new(source.clone(), config(&["127.0.0.1:1"]), "t"))
            .unwrap();
        r.apply_now(Snapshot::new(source.clone(), config(&["127.0.0.1:1"]), "t"))
            .unwrap();
        let mut bad = config(&[]);
        bad.routes[0].service = "missing".into();
        r.apply_now(Snapshot::new(source.clone(), bad, "t"))
            .unwrap_err();
        assert_eq!(metrics.publishes(), 1);
        assert_eq!(metrics.unchanged(), 1);
        assert_eq!(metrics.rejected(), 1);
        assert_eq!(
            metrics.publish_durations().0,
            1,
            "only the publish reached the applier"
        );
        let health = sources::health(&source);
        assert_eq!(health.snapshots_accepted(), 2);
        assert_eq!(health.snapshots_rejected(), 1);
    }

    #[tokio::test]
    async fn snapshots_report_their_outcome() {
        let applied = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = Reconciler::new(Recorder {
            applied: applied.clone(),
            fail: false,
        });
        let mut status = r.subscribe();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(r.run(rx));
        let (reply, outcome) = oneshot::channel();
        let mut s = Snapshot::new(file(), config(&["127.0.0.1:1"]), "t");
        s.reply = Some(reply);
        tx.send(s).await.unwrap();
        assert_eq!(outcome.await.unwrap(), Ok(1));
        status.changed().await.unwrap();
        assert_eq!(status.borrow().generation, 1);
        // The same config again is no change: no new generation, no apply.
        let (reply, outcome) = oneshot::channel();
        let mut s = Snapshot::new(file(), config(&["127.0.0.1:1"]), "t");
        s.reply = Some(reply);
        tx.send(s).await.unwrap();
        assert_eq!(outcome.await.unwrap(), Ok(1));
        assert_eq!(*applied.lock().unwrap(), [1]);
    }
}
