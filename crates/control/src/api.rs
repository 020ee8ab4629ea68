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

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use drover_model::{
    Config, Effective, EndpointOverride, EndpointSpec, Patches, RouteSpec, ServiceSpec, SourceId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, oneshot, watch};

use crate::{Snapshot, SnapshotSender, Status};

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

/// The API's state, and the one way to change it.
pub struct ApiStore {
    state: Mutex<ApiState>,
    file: PathBuf,
    snapshots: SnapshotSender,
    status: watch::Receiver<Status>,
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
        Self {
            state: Mutex::new(ApiState {
                version: STATE_VERSION,
                ..state
            }),
            file: data_dir.join(STATE_FILE),
            snapshots,
            status,
        }
    }

    /// A copy of the state.
    pub async fn state(&self) -> ApiState {
        self.state.lock().await.clone()
    }

    /// Applies `edit` to a copy of the state; if it changed anything, has the reconciler
    /// accept it, saves it, and only then makes it the state. Calls are serialised.
    async fn change<R>(
        &self,
        reason: &str,
        edit: impl FnOnce(&mut ApiState, &Effective) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        let mut state = self.state.lock().await;
        let effective = self.status.borrow().effective.clone();
        let mut next = state.clone();
        let result = edit(&mut next, &effective)?;
        if next == *state {
            return Ok(result);
        }
        self.send(&next, reason)
            .await
            .map_err(|e| ApiError::new(ErrorKind::Invalid, e))?;
        if let Err(e) = save(&self.file, &next) {
            // Put back what is saved, so that memory and disk agree.
            let undo = self
                .send(&state, "undo of a change that could not be saved")
                .await;
            let undone = if undo.is_ok() {
                "it was undone"
            } else {
                "undoing it failed too"
            };
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                format!(
                    "the change could not be saved to {}: {e}; {undone}",
                    self.file.display()
                ),
            ));
        }
        *state = next;
        Ok(result)
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
            let outcome = match state.services.insert(name.to_string(), spec) {
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
            state.routes.push(route);
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
}
