//! `drover run --store etcd://…`: the state made through the management API kept in etcd and
//! shared by every drover that names the same store, instead of `<data-dir>/api-state.json`
//! (docs/cluster.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_control::api::{self, ApiState, ApiStore, SharedStore, Stored};
use drover_control::{SnapshotSender, Status};
use drover_etcd::state::EtcdState;
use drover_etcd::{StoreOptions, StoreUrl};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agents_args::{EtcdFlags, parse_store_url, store_options};

/// Where the API's state is kept.
#[derive(clap::Args, Debug, Default)]
pub struct StoreArgs {
    /// Keep the state made through the API in etcd, shared with every drover that names the
    /// same store, instead of in --data-dir: etcd://HOST:PORT[,HOST:PORT...][/PREFIX]
    /// (etcds:// for TLS) [default prefix: /drover].
    #[arg(long, value_name = "URL", value_parser = parse_store_url)]
    store: Option<StoreUrl>,
    #[command(flatten)]
    access: StoreAccess,
}

/// How to reach the etcd of `--store`: TLS and authentication. `drover run` and
/// `drover agent` take the same flags.
#[derive(clap::Args, Debug, Default)]
pub struct StoreAccess {
    /// PEM bundle of the CAs that etcd's certificate chains to (with --store etcds://).
    #[arg(long, value_name = "FILE")]
    store_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --store-key and --store-ca).
    #[arg(long, value_name = "FILE")]
    store_cert: Option<PathBuf>,
    /// PEM private key of --store-cert.
    #[arg(long, value_name = "FILE")]
    store_key: Option<PathBuf>,
    /// etcd user, when etcd's authentication is on (with --store-password).
    #[arg(long, value_name = "USER")]
    store_user: Option<String>,
    /// Password of --store-user (from DROVER_STORE_PASSWORD when not given here).
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "DROVER_STORE_PASSWORD",
        hide_env_values = true
    )]
    store_password: Option<String>,
}

impl StoreAccess {
    /// The options for `url`, checked ([`store_options`]); None without a URL.
    pub fn options(&self, url: Option<&StoreUrl>) -> anyhow::Result<Option<StoreOptions>> {
        store_options(
            url,
            EtcdFlags {
                flag: "--store",
                ca: self.store_ca.as_ref(),
                cert: self.store_cert.as_ref(),
                key: self.store_key.as_ref(),
                user: self.store_user.as_deref(),
                password: self.store_password.as_deref(),
            },
        )
    }
}

impl StoreArgs {
    /// The store and how to reach it, checked; None without --store.
    pub fn build(&self) -> Result<Option<(StoreUrl, StoreOptions)>, String> {
        let options = self
            .access
            .options(self.store.as_ref())
            .map_err(|e| e.to_string())?;
        Ok(self.store.clone().zip(options))
    }

    /// Reads the API's state at start-up: the file in `data_dir`, or, with --store, what etcd
    /// holds. etcd that cannot be reached is not an error: drover starts without the API's
    /// state and applies it when etcd answers.
    pub async fn open(&self, data_dir: &Path) -> anyhow::Result<ApiStart> {
        let Some((url, options)) = self.build().map_err(anyhow::Error::msg)? else {
            let state = api::load(data_dir).map_err(anyhow::Error::msg)?;
            return Ok(ApiStart::File(state));
        };
        let store = EtcdState::new(url, options);
        let file = data_dir.join(api::STATE_FILE);
        if file.exists() {
            tracing::warn!(
                "{} is not used: with --store the state made through the API is kept in {} at {}. To carry the file's state over, put it there before the first drover starts with --store: etcdctl put {} < {}",
                file.display(),
                store.url(),
                store.key(),
                store.key(),
                file.display()
            );
        }
        let health = drover_control::sources::health(&api::source_id());
        let initial = match store.read().await {
            Ok(stored) => {
                health.synced();
                tracing::info!(
                    "the state made through the API is kept in {} at {} (revision {}: {} services, {} routes, endpoints added to {} services)",
                    store.url(),
                    store.key(),
                    stored.at.modified,
                    stored.state.services.len(),
                    stored.state.routes.len(),
                    stored.state.patches.added.len()
                );
                Some(stored)
            }
            Err(e) => {
                health.failed(&e);
                tracing::warn!(
                    "{e}; starting without the state made through the API: the configuration file's world serves, the API refuses changes, and the state is applied as soon as etcd answers"
                );
                None
            }
        };
        Ok(ApiStart::Etcd { store, initial })
    }
}

/// The API's state at start-up, and where it is kept.
pub enum ApiStart {
    File(ApiState),
    Etcd {
        store: Arc<EtcdState>,
        /// None when etcd could not be read at start-up.
        initial: Option<Stored>,
    },
}

/// Keeps a drover in step with the API's state in etcd.
pub struct Follower {
    store: Arc<EtcdState>,
    api: Arc<ApiStore>,
}

impl Follower {
    /// Follows until `stop` is cancelled.
    pub fn spawn(self, stop: CancellationToken) {
        tokio::spawn(drover_etcd::state::follow(
            self.store,
            self.api,
            stop.cancelled_owned(),
        ));
    }
}

impl ApiStart {
    /// The state to apply before serving.
    pub fn initial(&self) -> Option<&ApiState> {
        match self {
            ApiStart::File(state) => Some(state),
            ApiStart::Etcd { initial, .. } => initial.as_ref().map(|s| &s.state),
        }
    }

    /// Why the state is applied at start-up, for the reconciler's log.
    pub fn reason(&self) -> String {
        match self {
            ApiStart::File(_) => "startup (saved API state)".into(),
            ApiStart::Etcd { store, initial } => format!(
                "startup (API state from {} revision {})",
                store.url(),
                initial.as_ref().map_or(0, |s| s.at.modified)
            ),
        }
    }

    /// Where the state comes from, for the log and for errors.
    pub fn origin(&self, data_dir: &Path) -> String {
        match self {
            ApiStart::File(_) => format!("saved in {}", data_dir.join(api::STATE_FILE).display()),
            ApiStart::Etcd { store, .. } => format!("kept in {} at {}", store.url(), store.key()),
        }
    }

    /// The API's store, and with etcd what keeps it in step with the other instances.
    pub fn into_store(
        self,
        data_dir: &Path,
        snapshots: SnapshotSender,
        status: watch::Receiver<Status>,
    ) -> (Arc<ApiStore>, Option<Follower>) {
        match self {
            ApiStart::File(state) => (
                Arc::new(ApiStore::new(state, data_dir, snapshots, status)),
                None,
            ),
            ApiStart::Etcd { store, initial } => {
                let shared: Arc<dyn SharedStore> = store.clone();
                let read = initial.is_some();
                let api = Arc::new(ApiStore::shared(initial, shared, snapshots, status));
                // Not read at start-up: etcd was away just now.
                api.store_reachable(read);
                (api.clone(), Some(Follower { store, api }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        store: StoreArgs,
    }

    fn build(args: &[&str]) -> Result<Option<(StoreUrl, StoreOptions)>, String> {
        let cli = Cli::try_parse_from(std::iter::once("drover").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.store.build()
    }

    #[test]
    fn without_store_the_file_is_used() {
        assert!(build(&[]).unwrap().is_none());
    }

    #[test]
    fn a_store_url_with_several_members_and_a_prefix() {
        let (url, options) = build(&["--store", "etcd://127.0.0.1:2379,127.0.0.1:22379/lb"])
            .unwrap()
            .unwrap();
        assert_eq!(url.layout().api_state(), "/lb/api/state");
        assert_eq!(url.endpoints.len(), 2);
        assert!(options.ca_file.is_none() && options.user.is_none());
    }

    #[test]
    fn a_url_that_is_not_etcd_says_what_to_write() {
        let e = build(&["--store", "http://x"]).unwrap_err();
        assert!(
            e.contains("invalid store \"http://x\": it must start with etcd://")
                && e.contains("etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"),
            "{e}"
        );
    }

    #[test]
    fn options_that_do_not_go_together_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "not checked here").unwrap();
        let pem = pem.to_str().unwrap();
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        for (args, expected) in [
            (
                vec!["--store-ca", pem],
                "--store-ca needs --store etcd://HOST:PORT",
            ),
            (
                vec!["--store-user", "u"],
                "--store-user needs --store etcd://HOST:PORT",
            ),
            (
                vec!["--store", "etcd://h:1", "--store-ca", pem],
                "--store-ca is for TLS to etcd: write --store etcds://",
            ),
            (
                vec!["--store", "etcds://h:1"],
                "uses TLS: give --store-ca FILE",
            ),
            (
                vec!["--store", "etcds://h:1", "--store-ca", missing],
                "--store-ca ",
            ),
            (
                vec![
                    "--store",
                    "etcds://h:1",
                    "--store-ca",
                    pem,
                    "--store-cert",
                    pem,
                ],
                "--store-cert needs --store-key",
            ),
            (
                vec![
                    "--store",
                    "etcds://h:1",
                    "--store-ca",
                    pem,
                    "--store-key",
                    pem,
                ],
                "--store-key needs --store-cert",
            ),
            (
                vec![
                    "--store",
                    "etcd://h:1",
                    "--store-cert",
                    pem,
                    "--store-key",
                    pem,
                ],
                "--store-cert and --store-key are for TLS",
            ),
            (
                vec!["--store", "etcd://h:1", "--store-user", "root"],
                "--store-user needs a password: --store-password, or DROVER_STORE_PASSWORD",
            ),
            (
                vec![
                    "--store",
                    "etcd://h:1",
                    "--store-user",
                    "",
                    "--store-password",
                    "p",
                ],
                "--store-user is empty",
            ),
        ] {
            if std::env::var_os("DROVER_STORE_PASSWORD").is_some() && args.contains(&"root") {
                continue;
            }
            let e = build(&args).unwrap_err();
            assert!(e.contains(expected), "{args:?}: {e}");
        }
        let e = build(&["--store", "etcds://h:1", "--store-ca", missing]).unwrap_err();
        assert!(e.contains(missing) && e.contains("cannot read it"), "{e}");
    }

    #[test]
    fn tls_and_a_user_make_the_options() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "pem").unwrap();
        let pem = pem.to_str().unwrap();
        let (url, options) = build(&[
            "--store",
            "etcds://10.0.0.1:2379",
            "--store-ca",
            pem,
            "--store-cert",
            pem,
            "--store-key",
            pem,
            "--store-user",
            "drover",
            "--store-password",
            "secret",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(url.endpoints, ["https://10.0.0.1:2379"]);
        assert_eq!(options.ca_file.as_deref(), Some(Path::new(pem)));
        assert!(options.cert_file.is_some() && options.key_file.is_some());
        assert_eq!(
            options.user,
            Some(("drover".to_string(), "secret".to_string()))
        );
    }
}
