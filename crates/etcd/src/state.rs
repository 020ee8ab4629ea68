//! The management API's state in etcd (`drover run --store`): [`EtcdState`], the
//! [`SharedStore`] that several gateways write, and [`follow`], which keeps one gateway in step
//! with what the others write.
//!
//! The state is one JSON document at [`crate::Layout::api_state`], the same shape as the
//! `api-state.json` file. A write is a transaction: put the new document if the key's
//! `mod_revision` is still the one the change was based on, else get what is there now. The
//! API applies its change again on top of that (`drover_control::api`), so two instances that
//! change the state at once never lose either change.
//!
//! Every gateway watches the key from the revision after the one it read, and applies each new
//! document through its reconciler as the source `api`. After a disconnect the watch resumes
//! after the last revision seen; if etcd compacted that revision away, the document is read
//! again whole. While etcd cannot be reached the last state keeps serving, reads answer from
//! memory, and changes are refused (503). The source's health (`/metrics`, `source="api"`)
//! follows the connection: the watch asks etcd for a progress report every few seconds, and a
//! watch that does not answer counts as a lost connection.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_control::api::{
    self, ApiState, ApiStore, Revision, SharedStore, StoreFuture, Stored, Written,
};
use drover_control::sources::{self, SourceHealth};
use etcd_client::{
    Client, Compare, CompareOp, EventType, KeyValue, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use crate::{StoreError, StoreOptions, StoreUrl, connect};

/// How long one read or write may take, tries on other members included, before etcd counts
/// as unreachable and the API answers 503.
pub const CALL_DEADLINE: Duration = Duration::from_secs(4);

/// How long one try may take before it is sent again. A member whose leader just died holds a
/// write until etcd's request timeout (7 s by default) and then drops it, while the others
/// elect a new leader within about a second: sending it again gets through.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a quiet watch asks etcd for a progress report. One that gets no answer by the
/// next time is treated as a lost connection.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// The longest pause between two attempts to reach etcd again.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// The API's state in etcd.
pub struct EtcdState {
    url: StoreUrl,
    options: StoreOptions,
    key: String,
    /// Made on first use: with a user and password, making it needs etcd to answer.
    client: tokio::sync::Mutex<Option<Client>>,
}

/// Why a call failed, and whether trying again (on another member, a moment later) may help.
struct Failure {
    message: String,
    transient: bool,
}

impl From<etcd_client::Error> for Failure {
    fn from(e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        use tonic_code::*;
        let transient = match &e {
            E::GRpcStatus(s) => matches!(
                s.code() as i32,
                UNAVAILABLE | DEADLINE_EXCEEDED | CANCELLED | ABORTED | UNKNOWN | INTERNAL
            ),
            E::TransportError(_) | E::IoError(_) | E::WatchError(_) => true,
            _ => false,
        };
        Failure {
            message: describe(&e),
            transient,
        }
    }
}

/// gRPC status codes, as numbers: etcd-client does not re-export tonic's `Code`.
mod tonic_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const ABORTED: i32 = 10;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

/// An etcd-client error in a few words: a gRPC status by its message and causes, not its
/// debug dump.
fn describe(e: &etcd_client::Error) -> String {
    let (mut text, mut cause) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let text = if s.message().is_empty() {
                format!("{:?}", s.code())
            } else {
                s.message().to_string()
            };
            (text, std::error::Error::source(s))
        }
        etcd_client::Error::TransportError(t) => (t.to_string(), std::error::Error::source(t)),
        other => (other.to_string(), None),
    };
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text += &format!(": {part}");
        }
        cause = c.source();
    }
    text
}

impl EtcdState {
    /// The state under `url`'s prefix. Nothing is contacted until the first call.
    pub fn new(url: StoreUrl, options: StoreOptions) -> Arc<EtcdState> {
        let key = url.layout().api_state();
        Arc::new(EtcdState {
            url,
            options,
            key,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The key the state is kept at.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The store's URL.
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn unreachable(&self, why: impl fmt::Display) -> String {
        format!("the cluster store {} cannot be reached: {why}", self.url)
    }

    async fn client(&self) -> Result<Client, Failure> {
        let mut slot = self.client.lock().await;
        if let Some(client) = &*slot {
            return Ok(client.clone());
        }
        let client = connect(&self.url, &self.options)
            .await
            .map_err(|e| match e {
                StoreError::Etcd(_, e) => Failure::from(e),
                file @ StoreError::File(..) => Failure {
                    message: file.to_string(),
                    transient: false,
                },
            })?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs `op` until it succeeds, fails for a reason that trying again cannot fix, or
    /// [`CALL_DEADLINE`] passes; each try may take [`ATTEMPT_TIMEOUT`], and etcd-client
    /// balances them over the members. Also returns how many tries it took.
    async fn call<T, F, Fut>(&self, op: F) -> Result<(T, u32), String>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_within(CALL_DEADLINE, op).await
    }

    /// [`EtcdState::call`] with another deadline than [`CALL_DEADLINE`].
    async fn call_within<T, F, Fut>(&self, within: Duration, mut op: F) -> Result<(T, u32), String>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        let mut pause = Duration::from_millis(20);
        let mut last = None;
        for attempt in 1.. {
            let step = async {
                let client = self.client().await?;
                op(client).await.map_err(Failure::from)
            };
            let until = deadline.min(tokio::time::Instant::now() + ATTEMPT_TIMEOUT);
            match tokio::time::timeout_at(until, step).await {
                Ok(Ok(value)) => return Ok((value, attempt)),
                Ok(Err(f)) if !f.transient => {
                    return Err(format!(
                        "the cluster store {} refused the request: {}",
                        self.url, f.message
                    ));
                }
                Ok(Err(f)) => last = Some(f.message),
                Err(_) if until >= deadline => break,
                Err(_) => {
                    last = Some(format!("no answer within {} s", within.as_secs()));
                    continue;
                }
            }
            if tokio::time::Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
        Err(self.unreachable(
            last.unwrap_or_else(|| format!("no answer within {} s", within.as_secs())),
        ))
    }

    /// The state in `kv` (None: the key does not exist).
    fn parse(&self, kv: Option<&KeyValue>, seen: i64) -> Result<Stored, String> {
        let Some(kv) = kv else {
            return Ok(Stored {
                state: ApiState::empty(),
                at: Revision { modified: 0, seen },
            });
        };
        let state = ApiState::from_json(kv.value()).map_err(|e| {
            format!(
                "the API state in {} at {} (revision {}) is not valid: {e}; put a valid one there, or delete the key to start from an empty state",
                self.url,
                self.key,
                kv.mod_revision()
            )
        })?;
        Ok(Stored {
            state,
            at: Revision {
                modified: kv.mod_revision(),
                seen: seen.max(kv.mod_revision()),
            },
        })
    }

    async fn read_state(&self) -> Result<Stored, String> {
        self.read_within(CALL_DEADLINE).await
    }

    async fn read_within(&self, within: Duration) -> Result<Stored, String> {
        let key = self.key.clone();
        let (response, _) = self
            .call_within(within, |client| {
                let key = key.clone();
                async move { client.kv_client().get(key, None).await }
            })
            .await?;
        let seen = response.header().map_or(0, |h| h.revision());
        self.parse(response.kvs().first(), seen)
    }

    async fn write_state(&self, base: i64, state: &ApiState) -> Result<Written, String> {
        let json = state.to_json();
        let key = self.key.clone();
        let (response, tries) = self
            .call(|client| {
                let txn = Txn::new()
                    .when([Compare::mod_revision(key.clone(), CompareOp::Equal, base)])
                    .and_then([TxnOp::put(key.clone(), json.clone(), None)])
                    .or_else([TxnOp::get(key.clone(), None)]);
                async move { client.kv_client().txn(txn).await }
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        if response.succeeded() {
            return Ok(Written::Done(Revision {
                modified: revision,
                seen: revision,
            }));
        }
        let now = response.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        if tries > 1
            && let Some(kv) = &now
            && kv.value() == json.as_slice()
        {
            // An earlier try was stored, and its answer lost: this is not a conflict.
            return Ok(Written::Done(Revision {
                modified: kv.mod_revision(),
                seen: revision,
            }));
        }
        Ok(Written::Conflict(self.parse(now.as_ref(), revision)?))
    }
}

impl SharedStore for EtcdState {
    fn name(&self) -> String {
        self.url.to_string()
    }

    fn read(&self) -> StoreFuture<'_, Stored> {
        Box::pin(self.read_state())
    }

    fn write<'a>(&'a self, base: i64, state: &'a ApiState) -> StoreFuture<'a, Written> {
        Box::pin(self.write_state(base, state))
    }
}

/// Why a watch ended.
enum Ended {
    /// The revision to resume from was compacted: read the whole state again.
    Compacted(i64),
    /// The connection failed or the watch was cancelled; resume after the last revision.
    Failed(String),
}

/// Keeps `api` in step with the state in etcd until `stop` completes: reads it if it has not
/// been read yet, then watches its key from the revision after the last one seen, and applies
/// every new state through the reconciler. It never clears what is in force because etcd went
/// away.
pub async fn follow(store: Arc<EtcdState>, api: Arc<ApiStore>, stop: impl Future<Output = ()>) {
    tokio::select! {
        () = stop => {}
        () = follow_forever(&store, &api) => {}
    }
}

async fn follow_forever(store: &EtcdState, api: &ApiStore) {
    let mut link = Link {
        store,
        api,
        health: sources::health(&api::source_id()),
        down_since: None,
    };
    let mut reread = false;
    let mut reopen = false;
    let mut pause = Duration::from_millis(100);
    loop {
        let mut connected = false;
        let started = Instant::now();
        let ended = follow_once(&mut link, reread, reopen, &mut connected).await;
        if connected {
            pause = Duration::from_millis(100);
        }
        (reread, reopen) = (false, false);
        match ended {
            Ended::Compacted(oldest) => {
                tracing::info!(
                    "{}: the revision to resume watching {} from was compacted (etcd keeps revisions from {oldest}); reading the whole state again",
                    store.url,
                    store.key
                );
                reread = true;
                continue;
            }
            Ended::Failed(e) if connected && started.elapsed() > ATTEMPT_TIMEOUT => {
                // The watch broke after it worked a while, most often because its member went
                // away. Another member takes a new watch at once; only if none does is etcd
                // away. (A watch that keeps breaking at once takes the slow path below.)
                tracing::debug!("{e}; watching again");
                reopen = true;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Ended::Failed(e) => link.down(&e),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Whether the follower reaches etcd: reported to `/metrics` (the source `api`), to the API
/// (which refuses changes at once while etcd is away), and to the log once per outage.
struct Link<'a> {
    store: &'a EtcdState,
    api: &'a ApiStore,
    health: Arc<SourceHealth>,
    down_since: Option<Instant>,
}

impl Link<'_> {
    /// etcd answered.
    fn up(&mut self) {
        self.health.synced();
        self.api.store_reachable(true);
        if let Some(since) = self.down_since.take() {
            tracing::info!(
                "the cluster store {} is reachable again after {:.1} s; following {} from where it was left",
                self.store.url,
                since.elapsed().as_secs_f64(),
                self.store.key
            );
        }
    }

    /// etcd could not be reached, or the watch broke.
    fn down(&mut self, error: &str) {
        self.health.failed(error);
        self.api.store_reachable(false);
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            tracing::warn!(
                "{error}; the last known state keeps serving, and the API refuses changes until etcd answers again"
            );
        } else {
            tracing::debug!("{error}");
        }
    }
}

/// Applies a state from etcd; logs when this instance's configuration rejects it.
async fn apply(api: &ApiStore, stored: Stored, reason: &str) {
    let revision = stored.at.modified;
    match api.apply_shared(stored, reason).await {
        Ok(true) => tracing::debug!(revision, "applied the API state from etcd"),
        Ok(false) => {}
        Err(e) => tracing::error!(
            revision,
            "the API state in etcd does not fit this instance's configuration; the previous one stays in force here: {e}"
        ),
    }
}

/// Reads if needed, then watches until the watch ends. Sets `connected` once etcd answered.
/// With `reopen`, a watch that just broke is opened again, and etcd gets one try's time
/// ([`ATTEMPT_TIMEOUT`]) to take it.
async fn follow_once(
    link: &mut Link<'_>,
    reread: bool,
    reopen: bool,
    connected: &mut bool,
) -> Ended {
    let (store, api) = (link.store, link.api);
    if reread || api.revision().await.is_none() {
        match store.read_state().await {
            Ok(stored) => {
                *connected = true;
                link.up();
                let reason = format!("read from {} (revision {})", store.url, stored.at.modified);
                apply(api, stored, &reason).await;
            }
            Err(e) => return Ended::Failed(e),
        }
    }
    let Some(from) = api.revision().await.map(|at| at.seen + 1) else {
        return Ended::Failed(store.unreachable("the state was not read"));
    };
    let key = store.key.clone();
    let within = if reopen {
        ATTEMPT_TIMEOUT
    } else {
        CALL_DEADLINE
    };
    let opened = store
        .call_within(within, |client| {
            let key = key.clone();
            async move {
                let options = WatchOptions::new().with_start_revision(from);
                client.watch_client().watch(key, Some(options)).await
            }
        })
        .await;
    let (mut requests, mut responses) = match opened {
        Ok((stream, _)) => stream.split(),
        Err(e) => return Ended::Failed(e),
    };
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.tick().await;
    let mut answered = true;
    loop {
        tokio::select! {
            message = responses.message() => {
                let response = match message {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ended::Failed(store.unreachable("etcd closed the watch")),
                    Err(e) => return Ended::Failed(store.unreachable(describe(&e))),
                };
                answered = true;
                if response.compact_revision() > 0 {
                    return Ended::Compacted(response.compact_revision());
                }
                if response.canceled() {
                    return Ended::Failed(store.unreachable(format!(
                        "etcd cancelled the watch: {}",
                        response.cancel_reason()
                    )));
                }
                *connected = true;
                link.up();
                // Each event is a whole state: the last one is all that matters.
                let Some(event) = response.events().last() else { continue };
                let Some(kv) = event.kv() else { continue };
                let stored = match event.event_type() {
                    EventType::Put => store.parse(Some(kv), kv.mod_revision()),
                    EventType::Delete => Ok(Stored {
                        state: ApiState::empty(),
                        at: Revision { modified: 0, seen: kv.mod_revision() },
                    }),
                };
                match stored {
                    Ok(stored) => {
                        let reason = format!(
                            "changed through another instance ({} revision {})",
                            store.url,
                            kv.mod_revision()
                        );
                        apply(api, stored, &reason).await;
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        link.health.failed(e);
                    }
                }
            }
            _ = progress.tick() => {
                if !answered {
                    return Ended::Failed(store.unreachable(format!(
                        "no answer to a progress request within {} s",
                        PROGRESS_EVERY.as_secs()
                    )));
                }
                answered = false;
                if let Err(e) = requests.request_progress().await {
                    return Ended::Failed(store.unreachable(describe(&e)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_control::{Applier, Reconciler, Snapshot, Status};
    use drover_model::{Config, Effective, EndpointSpec, SourceId};
    use std::net::SocketAddr;
    use std::process::{Child, Command, Stdio};

    /// One real etcd member on free loopback ports, killed on drop.
    struct Etcd {
        child: Child,
        url: StoreUrl,
        _dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    impl Etcd {
        async fn start() -> Etcd {
            let dir = tempfile::tempdir().unwrap();
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
            let child = Command::new("etcd")
                .args(["--name", "solo", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("solo={peer_url}")])
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("etcd is installed (Debian etcd-server; scripts/test.sh installs it)");
            let etcd = Etcd {
                child,
                url: StoreUrl::parse(&format!("etcd://127.0.0.1:{client}/test")).unwrap(),
                _dir: dir,
            };
            let store = etcd.store();
            let deadline = Instant::now() + Duration::from_secs(20);
            while let Err(e) = store.read_state().await {
                assert!(Instant::now() < deadline, "etcd did not start: {e}");
            }
            etcd
        }

        fn store(&self) -> Arc<EtcdState> {
            EtcdState::new(self.url.clone(), StoreOptions::default())
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn added(ports: &[u16]) -> ApiState {
        let mut state = ApiState::empty();
        state.patches.added.insert(
            "default".into(),
            ports
                .iter()
                .map(|p| EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], *p)), 1))
                .collect(),
        );
        state
    }

    #[tokio::test]
    async fn a_write_lands_only_on_the_revision_it_was_based_on() {
        let etcd = Etcd::start().await;
        let store = etcd.store();
        let empty = store.read_state().await.unwrap();
        assert_eq!(empty.state, ApiState::empty(), "no key is an empty state");
        assert_eq!(empty.at.modified, 0);

        let Written::Done(first) = store.write_state(0, &added(&[1])).await.unwrap() else {
            panic!("the first write finds no key, as it expected");
        };
        assert!(first.modified > 0 && first.seen == first.modified);
        // A second writer that also started from "no key" loses, and is told what won.
        match store.write_state(0, &added(&[2])).await.unwrap() {
            Written::Conflict(now) => {
                assert_eq!(now.state, added(&[1]));
                assert_eq!(now.at.modified, first.modified);
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        // Based on the winner's revision, it lands.
        assert!(matches!(
            store.write_state(first.modified, &added(&[1, 2])).await,
            Ok(Written::Done(_))
        ));
        assert_eq!(store.read_state().await.unwrap().state, added(&[1, 2]));
    }

    #[tokio::test]
    async fn an_unreachable_etcd_is_a_clear_error_within_the_deadline() {
        let url = StoreUrl::parse(&format!("etcd://127.0.0.1:{}", free_port())).unwrap();
        let store = EtcdState::new(url.clone(), StoreOptions::default());
        let started = Instant::now();
        let e = store.read_state().await.unwrap_err();
        assert!(
            e.starts_with(&format!("the cluster store {url} cannot be reached: ")),
            "{e}"
        );
        assert!(
            started.elapsed() < CALL_DEADLINE + Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let e = store.write_state(0, &added(&[1])).await.unwrap_err();
        assert!(e.contains("cannot be reached"), "{e}");
    }

    #[tokio::test]
    async fn a_garbled_document_is_named_with_its_key_and_revision() {
        let etcd = Etcd::start().await;
        let store = etcd.store();
        let mut client = store.client().await.ok().unwrap();
        client
            .put(store.key(), "{\"version\": 1, \"services\": ", None)
            .await
            .unwrap();
        let e = store.read_state().await.unwrap_err();
        assert!(
            e.contains("/test/api/state") && e.contains("is not valid") && e.contains("revision"),
            "{e}"
        );
    }

    struct Nothing;

    impl Applier for Nothing {
        fn apply(&mut self, _: &Arc<Effective>) -> Result<(), String> {
            Ok(())
        }
    }

    /// A reconciler on the embedded default, and an API store that read `initial`.
    fn gateway(
        store: &Arc<EtcdState>,
        initial: Stored,
    ) -> (Arc<ApiStore>, tokio::sync::watch::Receiver<Status>) {
        let mut reconciler = Reconciler::new(Nothing);
        reconciler
            .apply_now(Snapshot::new(
                SourceId("default".into()),
                Config::embedded_default("127.0.0.1:8080".parse().unwrap()),
                "test",
            ))
            .unwrap();
        reconciler
            .apply_now(Snapshot::new(
                api::source_id(),
                initial.state.to_config(),
                "test",
            ))
            .unwrap();
        let status = reconciler.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(reconciler.run(rx));
        let shared: Arc<dyn SharedStore> = store.clone();
        (
            Arc::new(ApiStore::shared(Some(initial), shared, tx, status.clone())),
            status,
        )
    }

    fn in_force(status: &tokio::sync::watch::Receiver<Status>) -> Vec<u16> {
        status.borrow().effective.config.services["default"]
            .endpoints
            .iter()
            .map(|e| e.address.port())
            .collect()
    }

    async fn wait_for(status: &tokio::sync::watch::Receiver<Status>, ports: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_force(status) != ports {
            assert!(
                Instant::now() < deadline,
                "{ports:?} never came in force; in force: {:?}",
                in_force(status)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_applies_new_states_and_reads_all_again_after_a_compaction() {
        let etcd = Etcd::start().await;
        let store = etcd.store();
        let Written::Done(_) = store.write_state(0, &added(&[1])).await.unwrap() else {
            panic!()
        };
        let initial = store.read_state().await.unwrap();
        let (api, status) = gateway(&store, initial.clone());

        // While this instance was away, others wrote three times, and etcd compacted its
        // history past the revision it would resume from.
        let mut at = initial.at.modified;
        for ports in [&[1, 2][..], &[1, 2, 3], &[1, 2, 3, 4]] {
            let Written::Done(r) = store.write_state(at, &added(ports)).await.unwrap() else {
                panic!()
            };
            at = r.modified;
        }
        let mut client = store.client().await.ok().unwrap();
        client.compact(at, None).await.unwrap();

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let following = tokio::spawn(follow(store.clone(), api.clone(), async move {
            let _ = stop_rx.await;
        }));
        wait_for(&status, &[1, 2, 3, 4]).await;
        assert_eq!(api.state().await, added(&[1, 2, 3, 4]));
        assert_eq!(api.revision().await.map(|r| r.modified), Some(at));

        // From there it watches: the next change arrives through the watch.
        let Written::Done(_) = store
            .write_state(at, &added(&[1, 2, 3, 4, 5]))
            .await
            .unwrap()
        else {
            panic!()
        };
        wait_for(&status, &[1, 2, 3, 4, 5]).await;
        // A change through this instance is based on the latest revision: no conflict.
        api.add_endpoint(
            "default",
            EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], 6)), 1),
            "test",
        )
        .await
        .unwrap();
        assert_eq!(
            store.read_state().await.unwrap().state,
            added(&[1, 2, 3, 4, 5, 6])
        );
        // Deleting the key empties the API's state.
        client.delete(store.key(), None).await.unwrap();
        wait_for(&status, &[]).await;
        stop_tx.send(()).unwrap();
        following.await.unwrap();
    }
}
