//! State made through the management API: the source `api`.
//!
//! The API owns the services and routes it created, the endpoints it added to services that
//! other sources define, and the weights and admin states it set on any endpoint. Every change
//! is a new whole snapshot sent to the reconciler like any other source's; only once the
//! reconciler has accepted it is it written to disk and made the store's state. A change the
//! reconciler refuses, or one that cannot be saved, leaves nothing behind.
//!
//! The state file (`api-state.json` in the data directory) is written atomically: a temporary
//! file beside it, fsync, rename over the old one, fsync of the directory. So after a crash,
//! even `kill -9` in the middle of a write, it holds either the old state or the new one.
//!
//! With `drover run --store`, the state lives in a store that several instances share
//! ([`Persistence::Shared`], etcd in `drover-etcd`) instead. A change is then a
//! compare-and-swap on the revision it was based on: when another instance wrote first, the
//! change is applied again to the newer state, through the reconciler, and its preconditions
//! are checked again. A change the store cannot take is undone here and refused.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drover_model::{
    Config, Effective, EndpointOverride, EndpointSpec, Patches, RouteSpec, ServiceSpec, SourceId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, oneshot, watch};

use crate::{Snapshot, SnapshotSender, Status, sources};

/// The source id of the management API.
pub fn source_id() -> SourceId {
    SourceId("api".into())
}

/// Version of the state file's format.
const STATE_VERSION: u32 = 1;
/// Name of the state file in the data directory.
pub const STATE_FILE: &str = "api-state.json";

/// Everything the API has made, as it is saved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiState {
    pub version: u32,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub patches: Patches,
}

impl ApiState {
    /// An empty state, as a missing file or key reads.
    pub fn empty() -> Self {
        Self {
            version: STATE_VERSION,
            ..Self::default()
        }
    }

    /// The state as it is saved, in the file and in a shared store alike.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Reads a saved state; the error says what is wrong with it.
    pub fn from_json(bytes: &[u8]) -> Result<ApiState, String> {
        let state: ApiState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if state.version != STATE_VERSION {
            return Err(format!(
                "format version {}, but this drover reads version {STATE_VERSION}",
                state.version
            ));
        }
        Ok(state)
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.routes.is_empty() && self.patches.is_empty()
    }

    /// The API's slice of the configuration.
    pub fn to_config(&self) -> Config {
        Config {
            services: self.services.clone(),
            routes: self.routes.clone(),
            patches: self.patches.clone(),
            ..Config::default()
        }
    }

    /// Whether the API added this endpoint (to its own service or to another source's).
    pub fn owns_endpoint(&self, service: &str, address: SocketAddr) -> bool {
        let in_own = self
            .services
            .get(service)
            .is_some_and(|s| s.endpoints.iter().any(|e| e.address == address));
        let in_added = self
            .patches
            .added
            .get(service)
            .is_some_and(|v| v.iter().any(|e| e.address == address));
        in_own || in_added
    }
}

/// Why an API call changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The body field the error is about, when it is about one.
    pub field: Option<String>,
}

/// The kinds of API errors; the admin listener maps them to HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such service, endpoint or route.
    NotFound,
    /// It exists already, or another source owns it.
    Conflict,
    /// The value is out of range, or the change would make the configuration invalid.
    Invalid,
    /// The change could not be applied or saved right now.
    Unavailable,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            field: None,
        }
    }

    pub fn field(mut self, field: &str) -> Self {
        self.field = Some(field.to_string());
        self
    }
}

/// Whether a call created something or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Existed,
}

/// Where the API's state is kept.
pub enum Persistence {
    /// A file that this instance alone writes: `<data-dir>/api-state.json`.
    File(PathBuf),
    /// A store that several instances share, such as etcd (`drover run --store`). A change is
    /// a compare-and-swap on the revision it was based on; every instance follows the store
    /// and applies what the others write through [`ApiStore::apply_shared`].
    Shared(Arc<dyn SharedStore>),
}

/// Where a copy of the state is in a shared store's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revision {
    /// When the state's key was last written; 0 while the key does not exist.
    pub modified: i64,
    /// The store's revision the copy is current as of (at least `modified`). A watch resumes
    /// right after it.
    pub seen: i64,
}

/// The API's state as a shared store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub state: ApiState,
    pub at: Revision,
}

/// What a compare-and-swap write did.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// The state is stored; where.
    Done(Revision),
    /// Another writer changed the key since the base revision; what it holds now.
    Conflict(Stored),
}

/// What a [`SharedStore`] returns. The error is a sentence a user can act on, such as "the
/// cluster store etcd://10.0.0.1:2379/drover cannot be reached: connection refused".
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// A store that several drover instances share (etcd in `drover-etcd`).
pub trait SharedStore: Send + Sync {
    /// Names the store in logs and errors, such as `etcd://127.0.0.1:2379/drover`.
    fn name(&self) -> String;
    /// Reads the state. A missing key reads as an empty state modified at revision 0.
    fn read(&self) -> StoreFuture<'_, Stored>;
    /// Reads the state when the store is known to be away: a store that answers again
    /// answers at once, so this may give up sooner than [`SharedStore::read`].
    fn check(&self) -> StoreFuture<'_, Stored> {
        self.read()
    }
    /// Stores `state` if the key was last modified at `base` (0: if it does not exist).
    ///
    /// A store that sends a write again after its answer was lost must not report the first
    /// attempt's success as a conflict: if what it finds is what it wrote, that is `Done`.
    fn write<'a>(&'a self, base: i64, state: &'a ApiState) -> StoreFuture<'a, Written>;
}

/// How many times a change is tried against a shared store that other instances keep
/// changing under it.
pub const WRITE_ATTEMPTS: u32 = 10;

/// The API's state, and the one way to change it.
pub struct ApiStore {
    /// Held while the state changes: by API calls, and by states that come from a shared
    /// store. Changes are serialised.
    base: Mutex<Base>,
    /// The state in force, which reads answer from without waiting for a change under way.
    current: watch::Sender<ApiState>,
    /// Whether the shared store answered last time it was asked (by a change, or by whoever
    /// follows it). While it did not, a change first checks that it answers again, before
    /// anything goes in force.
    reachable: AtomicBool,
    persistence: Persistence,
    snapshots: SnapshotSender,
    status: watch::Receiver<Status>,
}

struct Base {
    /// What is saved: the file, or the shared store as far as this instance knows.
    saved: ApiState,
    /// Where `saved` is in the shared store's history: None until the store has been read
    /// (and always for a file).
    at: Option<Revision>,
    /// What the reconciler has in force from the source `api`. The same as `saved`, except
    /// while a change is being made, and when the shared store holds a state that this
    /// instance's configuration rejects (the reconciler's error says why).
    in_force: ApiState,
}

/// Reads the saved state. A missing file is an empty state; an unreadable or corrupt one is an
/// error that names the file, because silently starting without it would lose what was made.
pub fn load(data_dir: &Path) -> Result<ApiState, String> {
    let file = data_dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ApiState::default()),
        Err(e) => {
            return Err(format!(
                "cannot read the API state file {}: {e}",
                file.display()
            ));
        }
    };
    let state: ApiState = serde_json::from_str(&text).map_err(|e| {
        format!(
            "the API state file {} is corrupt ({e}); it was not changed. Restore it from a backup, or move it away to start without the state made through the API",
            file.display()
        )
    })?;
    if state.version != STATE_VERSION {
        return Err(format!(
            "the API state file {} has format version {}, but this drover reads version {STATE_VERSION}",
            file.display(),
            state.version
        ));
    }
    Ok(state)
}

/// Writes the state atomically: temporary file, fsync, rename, fsync of the directory.
fn save(file: &Path, state: &ApiState) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = file.with_extension("json.tmp");
    let mut out = std::fs::File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut out, state)?;
    out.write_all(b"\n")?;
    out.sync_all()?;
    drop(out);
    std::fs::rename(&tmp, file)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The state with the current format version, which an empty default lacks.
fn normalized(state: ApiState) -> ApiState {
    ApiState {
        version: STATE_VERSION,
        ..state
    }
}

impl ApiStore {
    /// A store that starts from `state` (already applied by the caller), saves to
    /// `data_dir`, sends changes to the reconciler and reads the configuration in force from
    /// `status`.
    pub fn new(
        state: ApiState,
        data_dir: &Path,
        snapshots: SnapshotSender,
        status: watch::Receiver<Status>,
    ) -> Self {
        Self::build(
            state,
            None,
            Persistence::File(data_dir.join(STATE_FILE)),
            snapshots,
            status,
        )
    }

    /// A store that keeps the state in a store that instances share. `initial` is what was
    /// read from it at start-up, already applied by the caller; None if it could not be read
    /// then, in which case the state arrives later through [`ApiStore::apply_shared`], and a
    /// change reads the store first.
    pub fn shared(
        initial: Option<Stored>,
        store: Arc<dyn SharedStore>,
        snapshots: SnapshotSender,
        status: watch::Receiver<Status>,
    ) -> Self {
        let (state, at) = match initial {
            Some(s) => (s.state, Some(s.at)),
            None => (ApiState::default(), None),
        };
        Self::build(state, at, Persistence::Shared(store), snapshots, status)
    }

    fn build(
        state: ApiState,
        at: Option<Revision>,
        persistence: Persistence,
        snapshots: SnapshotSender,
        status: watch::Receiver<Status>,
    ) -> Self {
        let state = normalized(state);
        Self {
            base: Mutex::new(Base {
                saved: state.clone(),
                at,
                in_force: state.clone(),
            }),
            current: watch::Sender::new(state),
            reachable: AtomicBool::new(true),
            persistence,
            snapshots,
            status,
        }
    }

    /// A copy of the state in force. It never waits for a change under way, so it answers
    /// while a shared store cannot be reached.
    pub async fn state(&self) -> ApiState {
        self.current.borrow().clone()
    }

    /// Where this instance is in the shared store's history; None before the store was first
    /// read, and for a file.
    pub async fn revision(&self) -> Option<Revision> {
        self.base.lock().await.at
    }

    /// Tells whether the shared store answers, as whoever follows it finds out. While it does
    /// not, changes are refused before anything goes in force here.
    pub fn store_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Relaxed);
    }

    /// Applies a state read from the shared store (a watch event, or a whole read after a
    /// disconnect), unless this instance has seen that revision already. Returns whether it
    /// was newer. An error is the reconciler's reason for rejecting it: the previous state
    /// stays in force here, and a change through this instance's API is refused with the same
    /// reason until the store holds a state that fits.
    pub async fn apply_shared(&self, stored: Stored, reason: &str) -> Result<bool, String> {
        let mut base = self.base.lock().await;
        if base.at.is_some_and(|at| stored.at.seen <= at.seen) {
            return Ok(false);
        }
        self.adopt(&mut base, stored, reason).await.map(|()| true)
    }

    /// Makes `stored` what is known to be saved, and puts it in force.
    async fn adopt(&self, base: &mut Base, stored: Stored, reason: &str) -> Result<(), String> {
        let state = normalized(stored.state);
        base.at = Some(stored.at);
        base.saved = state.clone();
        if state == base.in_force {
            return Ok(());
        }
        self.send(&state, reason).await?;
        base.in_force = state.clone();
        self.current.send_replace(state);
        Ok(())
    }

    /// Puts `state` back in force after a change that could not be saved. Says how it went,
    /// for the error message.
    async fn restore(&self, base: &mut Base, state: ApiState, why: &str) -> &'static str {
        if base.in_force == state {
            return "it was undone";
        }
        match self.send(&state, why).await {
            Ok(_) => {
                base.in_force = state;
                "it was undone"
            }
            Err(_) => "undoing it failed too",
        }
    }

    /// Applies `edit` to a copy of the saved state; if it changed anything, has the
    /// reconciler accept it, saves it, and only then makes it the state. Calls are
    /// serialised. With a shared store, `edit` runs again on the newer state when another
    /// instance wrote first.
    async fn change<R>(
        &self,
        reason: &str,
        mut edit: impl FnMut(&mut ApiState, &Effective) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        let mut base = self.base.lock().await;
        match &self.persistence {
            Persistence::File(file) => self.change_file(&mut base, file, reason, edit).await,
            Persistence::Shared(store) => {
                self.change_shared(&mut base, store.as_ref(), reason, &mut edit)
                    .await
            }
        }
    }

    async fn change_file<R>(
        &self,
        base: &mut Base,
        file: &Path,
        reason: &str,
        edit: impl FnOnce(&mut ApiState, &Effective) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        let effective = self.status.borrow().effective.clone();
        let mut next = base.saved.clone();
        let result = edit(&mut next, &effective)?;
        if next == base.saved {
            return Ok(result);
        }
        self.send(&next, reason)
            .await
            .map_err(|e| ApiError::new(ErrorKind::Invalid, e))?;
        base.in_force = next.clone();
        if let Err(e) = save(file, &next) {
            // Put back what is saved, so that memory and disk agree.
            let saved = base.saved.clone();
            let undone = self
                .restore(base, saved, "undo of a change that could not be saved")
                .await;
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                format!(
                    "the change could not be saved to {}: {e}; {undone}",
                    file.display()
                ),
            ));
        }
        base.saved = next.clone();
        self.current.send_replace(next);
        Ok(result)
    }

    async fn change_shared<R>(
        &self,
        base: &mut Base,
        store: &dyn SharedStore,
        reason: &str,
        edit: &mut impl FnMut(&mut ApiState, &Effective) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        let health = sources::health(&source_id());
        let unreachable = |e: String| {
            health.failed(&e);
            self.store_reachable(false);
            ApiError::new(ErrorKind::Unavailable, format!("{e}; nothing was changed"))
        };
        let away = !self.reachable.load(Ordering::Relaxed);
        if base.at.is_none() || away {
            // Not read since start-up, so there is no state to base the change on; or the
            // store did not answer last time: it must answer before anything goes in force.
            let read = if away { store.check() } else { store.read() };
            let stored = read.await.map_err(unreachable)?;
            health.synced();
            self.store_reachable(true);
            // If it does not fit here, the change below is refused with the reason.
            let _ = self
                .adopt(base, stored, "read from the cluster store")
                .await;
        }
        for attempt in 1..=WRITE_ATTEMPTS {
            let effective = self.status.borrow().effective.clone();
            let mut next = base.saved.clone();
            let result = edit(&mut next, &effective)?;
            if next == base.saved {
                return Ok(result);
            }
            let before = base.in_force.clone();
            self.send(&next, reason)
                .await
                .map_err(|e| ApiError::new(ErrorKind::Invalid, e))?;
            base.in_force = next.clone();
            let modified = base.at.map_or(0, |at| at.modified);
            match store.write(modified, &next).await {
                Ok(Written::Done(at)) => {
                    health.synced();
                    self.store_reachable(true);
                    base.at = Some(at);
                    base.saved = next.clone();
                    self.current.send_replace(next);
                    return Ok(result);
                }
                Ok(Written::Conflict(now)) => {
                    health.synced();
                    tracing::debug!(
                        attempt,
                        revision = now.at.modified,
                        "{}: another instance changed the API state first; applying its change and trying again",
                        store.name()
                    );
                    let why = format!(
                        "changed through another instance (revision {})",
                        now.at.modified
                    );
                    if self.adopt(base, now, &why).await.is_err() {
                        // What the store holds does not fit here: back to what was in force.
                        self.restore(base, before, "undo of a change made on an older state")
                            .await;
                    }
                    if attempt >= 3 {
                        tokio::time::sleep(jitter(attempt)).await;
                    }
                }
                Err(e) => {
                    let undone = self
                        .restore(base, before, "undo of a change that could not be stored")
                        .await;
                    let mut error = unreachable(e);
                    if undone != "it was undone" {
                        error.message += &format!(" in the store, but {undone} here");
                    }
                    return Err(error);
                }
            }
        }
        Err(ApiError::new(
            ErrorKind::Unavailable,
            format!(
                "other instances changed the API state in {} {WRITE_ATTEMPTS} times while this change was being made; nothing was changed, try again",
                store.name()
            ),
        ))
    }

    async fn send(&self, state: &ApiState, reason: &str) -> Result<u64, String> {
        let (reply, outcome) = oneshot::channel();
        let mut snapshot = Snapshot::new(source_id(), state.to_config(), reason);
        snapshot.reply = Some(reply);
        self.snapshots
            .send(snapshot)
            .await
            .map_err(|_| "drover is shutting down".to_string())?;
        outcome
            .await
            .unwrap_or_else(|_| Err("drover is shutting down".into()))
    }

    /// Adds an endpoint to a service of any source.
    pub async fn add_endpoint(
        &self,
        service: &str,
        endpoint: EndpointSpec,
        reason: &str,
    ) -> Result<Outcome, ApiError> {
        check_weight(endpoint.weight)?;
        self.change(reason, |state, effective| {
            let spec = find_service(effective, service)?;
            if spec.endpoints.iter().any(|e| e.address == endpoint.address) {
                return Ok(Outcome::Existed);
            }
            match state.services.get_mut(service) {
                Some(own) => own.endpoints.push(endpoint),
                None => state
                    .patches
                    .added
                    .entry(service.to_string())
                    .or_default()
                    .push(endpoint),
            }
            Ok(Outcome::Created)
        })
        .await
    }

    /// Removes an endpoint the API added. Its requests in flight finish.
    pub async fn remove_endpoint(
        &self,
        service: &str,
        address: SocketAddr,
        reason: &str,
    ) -> Result<(), ApiError> {
        self.change(reason, |state, effective| {
            let spec = find_service(effective, service)?;
            if !state.owns_endpoint(service, address) {
                if spec.endpoints.iter().any(|e| e.address == address) {
                    let owner = owner_of(effective, service);
                    return Err(ApiError::new(
                        ErrorKind::Conflict,
                        format!(
                            "endpoint {address} of service {service:?} comes from {owner} and can only be removed there; drain or disable it instead"
                        ),
                    ));
                }
                return Err(no_endpoint(service, address));
            }
            if let Some(own) = state.services.get_mut(service) {
                own.endpoints.retain(|e| e.address != address);
            }
            if let Some(added) = state.patches.added.get_mut(service) {
                added.retain(|e| e.address != address);
                if added.is_empty() {
                    state.patches.added.remove(service);
                }
            }
            forget_override(&mut state.patches, service, address);
            Ok(())
        })
        .await
    }

    /// Sets the weight or the admin state of an endpoint of any source. The setting is kept
    /// for as long as the API state is: a drained endpoint stays drained while its source
    /// still lists it, until it is enabled again.
    pub async fn patch_endpoint(
        &self,
        service: &str,
        address: SocketAddr,
        patch: EndpointOverride,
        reason: &str,
    ) -> Result<(), ApiError> {
        if patch.weight.is_none() && patch.state.is_none() {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                "nothing to change: give \"weight\", \"state\" or both",
            ));
        }
        if let Some(w) = patch.weight {
            check_weight(w)?;
        }
        self.change(reason, |state, effective| {
            let spec = find_service(effective, service)?;
            if !spec.endpoints.iter().any(|e| e.address == address) {
                return Err(no_endpoint(service, address));
            }
            let slot = state
                .patches
                .overrides
                .entry(service.to_string())
                .or_default()
                .entry(address)
                .or_default();
            slot.weight = patch.weight.or(slot.weight);
            slot.state = patch.state.or(slot.state);
            // Kept even when it repeats the source's own value: the source may change that
            // value later, and the operator's word should still hold.
            Ok(())
        })
        .await
    }

    /// Creates or replaces a service the API owns.
    pub async fn put_service(
        &self,
        name: &str,
        spec: ServiceSpec,
        reason: &str,
    ) -> Result<Outcome, ApiError> {
        drover_model::validate::check_name(name)
            .map_err(|m| ApiError::new(ErrorKind::Invalid, m).field("name"))?;
        for e in &spec.endpoints {
            check_weight(e.weight)?;
        }
        self.change(reason, |state, effective| {
            if let Some(owner) = effective.service_sources.get(name)
                && *owner != source_id()
            {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!(
                        "service {name:?} comes from {owner} and can only be changed there; the API can add endpoints to it and set their weight and state"
                    ),
                ));
            }
            let outcome = match state.services.insert(name.to_string(), spec.clone()) {
                Some(_) => Outcome::Existed,
                None => Outcome::Created,
            };
            Ok(outcome)
        })
        .await
    }

    /// Deletes a service the API owns, with the settings the API made on its endpoints.
    pub async fn delete_service(&self, name: &str, reason: &str) -> Result<(), ApiError> {
        self.change(reason, |state, effective| {
            if state.services.remove(name).is_none() {
                return Err(match effective.service_sources.get(name) {
                    Some(owner) => ApiError::new(
                        ErrorKind::Conflict,
                        format!(
                            "service {name:?} comes from {owner} and can only be deleted there"
                        ),
                    ),
                    None => {
                        ApiError::new(ErrorKind::NotFound, format!("no service named {name:?}"))
                    }
                });
            }
            state.patches.overrides.remove(name);
            Ok(())
        })
        .await
    }

    /// Adds a route.
    pub async fn add_route(&self, route: RouteSpec, reason: &str) -> Result<Outcome, ApiError> {
        self.change(reason, |state, _| {
            if state.routes.contains(&route) {
                return Ok(Outcome::Existed);
            }
            state.routes.push(route.clone());
            Ok(Outcome::Created)
        })
        .await
    }

    /// Removes a route the API added; returns it.
    pub async fn remove_route(
        &self,
        listener: &str,
        host: Option<&str>,
        path_prefix: Option<&str>,
        reason: &str,
    ) -> Result<RouteSpec, ApiError> {
        self.change(reason, |state, effective| {
            let matches = |r: &RouteSpec| {
                r.listener == listener
                    && r.host.as_deref() == host
                    && r.path_prefix.as_deref() == path_prefix
            };
            match state.routes.iter().position(matches) {
                Some(i) => Ok(state.routes.remove(i)),
                None if effective.config.routes.iter().any(matches) => Err(ApiError::new(
                    ErrorKind::Conflict,
                    "that route comes from another source and can only be removed there",
                )),
                None => Err(ApiError::new(ErrorKind::NotFound, "no such route")),
            }
        })
        .await
    }
}

/// A random pause of up to `attempt` × 5 ms, so that instances that keep colliding drift
/// apart.
fn jitter(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    Duration::from_micros(hasher.finish() % (u64::from(attempt) * 5000))
}

fn check_weight(weight: u32) -> Result<(), ApiError> {
    let max = drover_model::spec::MAX_WEIGHT;
    if (1..=max).contains(&weight) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::Invalid,
            format!("weight {weight} is out of range: use 1 to {max}"),
        )
        .field("weight"))
    }
}

fn find_service<'e>(effective: &'e Effective, name: &str) -> Result<&'e ServiceSpec, ApiError> {
    effective.config.services.get(name).ok_or_else(|| {
        let known: Vec<String> = effective
            .config
            .services
            .keys()
            .map(|k| format!("{k:?}"))
            .collect();
        ApiError::new(
            ErrorKind::NotFound,
            if known.is_empty() {
                format!("no service named {name:?}; no services are defined")
            } else {
                format!(
                    "no service named {name:?}; defined services: {}",
                    known.join(", ")
                )
            },
        )
    })
}

fn owner_of(effective: &Effective, service: &str) -> String {
    effective
        .service_sources
        .get(service)
        .map_or_else(|| "another source".to_string(), ToString::to_string)
}

fn no_endpoint(service: &str, address: SocketAddr) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("service {service:?} has no endpoint {address}"),
    )
}

fn forget_override(patches: &mut Patches, service: &str, address: SocketAddr) {
    if let Some(o) = patches.overrides.get_mut(service) {
        o.remove(&address);
        if o.is_empty() {
            patches.overrides.remove(service);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_the_file_and_corruption_names_it() {
        let dir = std::env::temp_dir().join(format!("drover-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            load(&dir).unwrap(),
            ApiState::default(),
            "no file is an empty state"
        );
        let mut state = ApiState {
            version: STATE_VERSION,
            ..Default::default()
        };
        state.patches.added.insert(
            "default".into(),
            vec![EndpointSpec::new("127.0.0.1:1".parse().unwrap(), 3)],
        );
        save(&dir.join(STATE_FILE), &state).unwrap();
        assert_eq!(load(&dir).unwrap(), state);
        assert!(
            !dir.join("api-state.json.tmp").exists(),
            "the temporary file was renamed"
        );

        std::fs::write(dir.join(STATE_FILE), "{\"version\": 1, \"services\": ").unwrap();
        let e = load(&dir).unwrap_err();
        assert!(
            e.contains(&dir.join(STATE_FILE).display().to_string()) && e.contains("corrupt"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A shared store in memory, standing in for etcd, with another instance that can write
    /// between a change's read and its write.
    struct FakeStore {
        inner: std::sync::Mutex<Fake>,
    }

    /// Another instance's change, made just before this instance's next write reaches the
    /// store.
    type Interloper = Box<dyn FnMut(&mut ApiState) + Send>;

    #[derive(Default)]
    struct Fake {
        state: ApiState,
        modified: i64,
        revision: i64,
        down: bool,
        /// Runs before the next write, once.
        interloper: Option<Interloper>,
        /// Runs before every write.
        always: Option<Interloper>,
        /// Writes that reached the store (stored or not).
        writes: usize,
    }

    impl Fake {
        fn stored(&self) -> Stored {
            Stored {
                state: self.state.clone(),
                at: Revision {
                    modified: self.modified,
                    seen: self.revision,
                },
            }
        }

        fn put(&mut self, state: ApiState) {
            self.revision += 1;
            self.modified = self.revision;
            self.state = state;
        }
    }

    impl FakeStore {
        fn new(state: ApiState) -> Arc<FakeStore> {
            let store = FakeStore {
                inner: Default::default(),
            };
            store.inner.lock().unwrap().put(state);
            Arc::new(store)
        }

        fn with<R>(&self, f: impl FnOnce(&mut Fake) -> R) -> R {
            f(&mut self.inner.lock().unwrap())
        }
    }

    impl SharedStore for FakeStore {
        fn name(&self) -> String {
            "fake://store".into()
        }

        fn read(&self) -> StoreFuture<'_, Stored> {
            let out = self.with(|f| {
                if f.down {
                    Err(
                        "the cluster store fake://store cannot be reached: connection refused"
                            .into(),
                    )
                } else {
                    Ok(f.stored())
                }
            });
            Box::pin(async move { out })
        }

        fn write<'a>(&'a self, base: i64, state: &'a ApiState) -> StoreFuture<'a, Written> {
            let out = self.with(|f| {
                if f.down {
                    return Err(
                        "the cluster store fake://store cannot be reached: connection refused"
                            .into(),
                    );
                }
                f.writes += 1;
                if let Some(mut other) = f.interloper.take() {
                    let mut theirs = f.state.clone();
                    other(&mut theirs);
                    f.put(theirs);
                }
                if let Some(other) = &mut f.always {
                    let mut theirs = f.state.clone();
                    other(&mut theirs);
                    f.put(theirs);
                }
                if f.modified != base {
                    return Ok(Written::Conflict(f.stored()));
                }
                f.put(state.clone());
                Ok(Written::Done(f.stored().at))
            });
            Box::pin(async move { out })
        }
    }

    struct Nothing;

    impl crate::Applier for Nothing {
        fn apply(&mut self, _: &Arc<Effective>) -> Result<(), String> {
            Ok(())
        }
    }

    fn ep(port: u16) -> EndpointSpec {
        EndpointSpec::new(SocketAddr::from(([127, 0, 0, 1], port)), 1)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A state that added `ports` to the service `default`.
    fn added(ports: &[u16]) -> ApiState {
        let mut state = ApiState::empty();
        if !ports.is_empty() {
            state
                .patches
                .added
                .insert("default".into(), ports.iter().map(|p| ep(*p)).collect());
        }
        state
    }

    /// Another instance adding an endpoint to `default`.
    fn adds(port: u16) -> Interloper {
        Box::new(move |s: &mut ApiState| {
            s.patches
                .added
                .entry("default".into())
                .or_default()
                .push(ep(port))
        })
    }

    /// A reconciler running the embedded default, and an API store on `store` that has read
    /// it (or not yet, with `read` false).
    fn gateway(store: &Arc<FakeStore>, read: bool) -> (ApiStore, watch::Receiver<Status>) {
        let mut reconciler = crate::Reconciler::new(Nothing);
        reconciler
            .apply_now(Snapshot::new(
                SourceId("default".into()),
                Config::embedded_default("127.0.0.1:8080".parse().unwrap()),
                "test",
            ))
            .unwrap();
        let initial = read.then(|| store.with(|f| f.stored()));
        if let Some(i) = &initial {
            reconciler
                .apply_now(Snapshot::new(source_id(), i.state.to_config(), "test"))
                .unwrap();
        }
        let status = reconciler.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(reconciler.run(rx));
        let shared: Arc<dyn SharedStore> = store.clone();
        (
            ApiStore::shared(initial, shared, tx, status.clone()),
            status,
        )
    }

    /// The endpoints of `default` in force.
    fn in_force(status: &watch::Receiver<Status>) -> Vec<u16> {
        let mut ports: Vec<u16> = status.borrow().effective.config.services["default"]
            .endpoints
            .iter()
            .map(|e| e.address.port())
            .collect();
        ports.sort();
        ports
    }

    fn stored_ports(store: &FakeStore) -> Vec<u16> {
        let mut ports: Vec<u16> = store.with(|f| {
            f.state
                .patches
                .added
                .get("default")
                .map(|v| v.iter().map(|e| e.address.port()).collect())
                .unwrap_or_default()
        });
        ports.sort();
        ports
    }

    #[tokio::test]
    async fn a_change_that_lost_the_race_is_made_again_on_the_winners_state() {
        let store = FakeStore::new(added(&[1]));
        let (api, status) = gateway(&store, true);
        store.with(|f| f.interloper = Some(adds(2)));
        let outcome = api.add_endpoint("default", ep(3), "test").await;
        assert_eq!(outcome, Ok(Outcome::Created));
        assert_eq!(stored_ports(&store), [1, 2, 3], "neither change is lost");
        assert_eq!(
            store.with(|f| f.writes),
            2,
            "one conflict, then one write on top of the other instance's change"
        );
        assert_eq!(in_force(&status), [1, 2, 3]);
        assert_eq!(api.state().await, store.with(|f| f.state.clone()));
        assert_eq!(
            api.revision().await,
            Some(store.with(|f| f.stored().at)),
            "the next change is based on the revision it wrote"
        );
        // A later change from this instance applies without a conflict.
        api.add_endpoint("default", ep(4), "test").await.unwrap();
        assert_eq!(store.with(|f| f.writes), 3);
        assert_eq!(stored_ports(&store), [1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_precondition_the_winner_made_false_answers_as_it_would_have() {
        let store = FakeStore::new(added(&[1, 5]));
        let (api, status) = gateway(&store, true);
        // The other instance adds the very endpoint this one adds: it exists (the admin API's
        // 409), and nothing more is written.
        store.with(|f| f.interloper = Some(adds(2)));
        assert_eq!(
            api.add_endpoint("default", ep(2), "test").await,
            Ok(Outcome::Existed)
        );
        assert_eq!(stored_ports(&store), [1, 2, 5]);
        assert_eq!(in_force(&status), [1, 2, 5]);

        // The other instance removes the endpoint this one removes: 404.
        store.with(|f| {
            f.interloper = Some(Box::new(|s: &mut ApiState| {
                s.patches
                    .added
                    .get_mut("default")
                    .unwrap()
                    .retain(|e| e.address != addr(5))
            }))
        });
        let e = api
            .remove_endpoint("default", addr(5), "test")
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{e:?}");
        assert!(e.message.contains("has no endpoint 127.0.0.1:5"), "{e:?}");
        assert_eq!(stored_ports(&store), [1, 2]);
        assert_eq!(
            in_force(&status),
            [1, 2],
            "the winner's removal is in force"
        );

        // Weights set on two endpoints at once through two instances both hold.
        store.with(|f| {
            f.interloper = Some(Box::new(|s: &mut ApiState| {
                s.patches
                    .overrides
                    .entry("default".into())
                    .or_default()
                    .insert(
                        addr(1),
                        EndpointOverride {
                            weight: Some(7),
                            state: None,
                        },
                    );
            }))
        });
        let patch = EndpointOverride {
            weight: Some(9),
            state: None,
        };
        api.patch_endpoint("default", addr(2), patch, "test")
            .await
            .unwrap();
        let overrides = store.with(|f| f.state.patches.overrides["default"].clone());
        assert_eq!(overrides[&addr(1)].weight, Some(7));
        assert_eq!(overrides[&addr(2)].weight, Some(9));
    }

    #[tokio::test]
    async fn an_unreachable_store_refuses_the_change_and_undoes_it_here() {
        let store = FakeStore::new(added(&[1]));
        let (api, status) = gateway(&store, true);
        store.with(|f| f.down = true);
        let e = api
            .add_endpoint("default", ep(2), "test")
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert_eq!(
            e.message,
            "the cluster store fake://store cannot be reached: connection refused; nothing was changed"
        );
        assert_eq!(in_force(&status), [1], "the change is undone in the pool");
        assert_eq!(api.state().await, added(&[1]), "and in what the API shows");

        // Known to be away, the store must answer before anything goes in force: the next
        // change is refused without a new generation, not even for a moment.
        let generation = status.borrow().generation;
        let e = api
            .add_endpoint("default", ep(3), "test")
            .await
            .unwrap_err();
        assert!(e.message.ends_with("; nothing was changed"), "{e:?}");
        assert_eq!(status.borrow().generation, generation);

        store.with(|f| f.down = false);
        api.add_endpoint("default", ep(2), "test").await.unwrap();
        assert_eq!(stored_ports(&store), [1, 2]);
    }

    #[tokio::test]
    async fn a_store_reported_away_is_asked_before_a_change_goes_in_force() {
        let store = FakeStore::new(added(&[1]));
        let (api, status) = gateway(&store, true);
        store.with(|f| f.down = true);
        api.store_reachable(false);
        let generation = status.borrow().generation;
        let e = api
            .add_endpoint("default", ep(2), "test")
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert_eq!(
            status.borrow().generation,
            generation,
            "nothing went in force"
        );
        assert_eq!(store.with(|f| f.writes), 0);
        // Back, and changed meanwhile: the change is based on what it holds now.
        store.with(|f| {
            f.down = false;
            f.put(added(&[1, 5]));
        });
        api.add_endpoint("default", ep(2), "test").await.unwrap();
        assert_eq!(stored_ports(&store), [1, 2, 5]);
        assert_eq!(store.with(|f| f.writes), 1, "no conflict: it read first");
    }

    #[tokio::test]
    async fn a_store_that_keeps_changing_makes_the_change_give_up_cleanly() {
        let store = FakeStore::new(ApiState::empty());
        let (api, status) = gateway(&store, true);
        let mut port = 100;
        store.with(|f| {
            f.always = Some(Box::new(move |s: &mut ApiState| {
                port += 1;
                s.patches
                    .added
                    .entry("default".into())
                    .or_default()
                    .push(ep(port))
            }))
        });
        let e = api
            .add_endpoint("default", ep(1), "test")
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(
            e.message
                .contains("changed the API state in fake://store 10 times")
                && e.message.contains("nothing was changed, try again"),
            "{e:?}"
        );
        assert_eq!(store.with(|f| f.writes), WRITE_ATTEMPTS as usize);
        assert!(!stored_ports(&store).contains(&1));
        assert!(
            !in_force(&status).contains(&1),
            "the attempt is not left in force"
        );
        assert_eq!(
            in_force(&status).len(),
            WRITE_ATTEMPTS as usize,
            "the other instance's changes are"
        );
    }

    #[tokio::test]
    async fn states_from_the_store_apply_in_order_and_only_once() {
        let store = FakeStore::new(added(&[1]));
        let (api, status) = gateway(&store, true);
        let first = store.with(|f| f.stored());
        store.with(|f| f.put(added(&[1, 2])));
        let second = store.with(|f| f.stored());
        assert_eq!(api.apply_shared(second.clone(), "test").await, Ok(true));
        assert_eq!(in_force(&status), [1, 2]);
        assert_eq!(
            api.apply_shared(first, "test").await,
            Ok(false),
            "an older revision is skipped"
        );
        assert_eq!(api.apply_shared(second, "test").await, Ok(false));
        assert_eq!(in_force(&status), [1, 2]);
        assert_eq!(api.state().await, added(&[1, 2]));
        // A deleted key is an empty state.
        let gone = Stored {
            state: ApiState::empty(),
            at: Revision {
                modified: 0,
                seen: 9,
            },
        };
        assert_eq!(api.apply_shared(gone, "test").await, Ok(true));
        assert_eq!(in_force(&status), Vec::<u16>::new());
    }

    #[tokio::test]
    async fn a_change_before_the_first_read_reads_the_store_first() {
        let store = FakeStore::new(added(&[1]));
        store.with(|f| f.down = true);
        let (api, status) = gateway(&store, false);
        assert_eq!(in_force(&status), Vec::<u16>::new());
        let e = api
            .add_endpoint("default", ep(2), "test")
            .await
            .unwrap_err();
        assert!(e.message.ends_with("; nothing was changed"), "{e:?}");
        assert_eq!(store.with(|f| f.writes), 0);
        store.with(|f| f.down = false);
        api.add_endpoint("default", ep(2), "test").await.unwrap();
        assert_eq!(
            stored_ports(&store),
            [1, 2],
            "based on what the store held, not on the empty state this instance started with"
        );
        assert_eq!(in_force(&status), [1, 2]);
    }
}
