//! `drover run --agents etcd://…`: serve the containers that `drover agent` registers from
//! each host (docs/cluster.md, "Agents"); and the etcd options that the agent and the
//! gateway both take.

use std::path::PathBuf;

use anyhow::{bail, ensure};
use drover_control::SnapshotSender;
use drover_discovery::agents::AgentsSource;
use drover_etcd::{StoreOptions, StoreUrl};
use tokio_util::sync::CancellationToken;

/// Where the agents' registrations are read from.
#[derive(clap::Args)]
pub struct AgentsArgs {
    /// Serve the containers that `drover agent` registers in this etcd cluster:
    /// etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (etcds:// for TLS) [default prefix: /drover].
    #[arg(long, value_name = "URL", value_parser = parse_store_url)]
    agents: Option<StoreUrl>,
    /// PEM bundle of the CAs that etcd's certificate must chain to (with --agents etcds://).
    #[arg(long, value_name = "FILE")]
    agents_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --agents-key).
    #[arg(long, value_name = "FILE")]
    agents_cert: Option<PathBuf>,
    /// PEM key of --agents-cert.
    #[arg(long, value_name = "FILE")]
    agents_key: Option<PathBuf>,
    /// etcd user, when etcd's authentication is on (with --agents-password).
    #[arg(long, value_name = "USER")]
    agents_user: Option<String>,
    /// Password of --agents-user (from DROVER_AGENTS_PASSWORD when not given here).
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "DROVER_AGENTS_PASSWORD",
        hide_env_values = true
    )]
    agents_password: Option<String>,
}

/// The environment variable a password flag reads: DROVER_AGENTS_PASSWORD for --agents.
pub fn password_env(flag: &str) -> String {
    format!(
        "DROVER_{}_PASSWORD",
        flag.trim_start_matches('-').to_ascii_uppercase()
    )
}

/// Parses `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` for clap.
pub fn parse_store_url(s: &str) -> Result<StoreUrl, String> {
    StoreUrl::parse(s.trim())
}

/// The flags that say how to reach an etcd URL: `FLAG-ca`, `FLAG-cert`, `FLAG-key`,
/// `FLAG-user` and `FLAG-password` for `FLAG` (`--agents`, `--store`).
pub struct EtcdFlags<'a> {
    pub flag: &'a str,
    pub ca: Option<&'a PathBuf>,
    pub cert: Option<&'a PathBuf>,
    pub key: Option<&'a PathBuf>,
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
}

/// The options of an etcd URL, checked: TLS files that go together and exist, and a user
/// with a password.
pub fn store_options(url: &StoreUrl, flags: EtcdFlags<'_>) -> anyhow::Result<StoreOptions> {
    let EtcdFlags {
        flag,
        ca,
        cert,
        key,
        user,
        password,
    } = flags;
    let tls = url.endpoints.iter().any(|e| e.starts_with("https://"));
    if let Some(ca) = ca {
        ensure!(
            tls,
            "{flag}-ca needs {flag} etcds://HOST:PORT (TLS to etcd), not {url}"
        );
        ensure!(ca.is_file(), "{flag}-ca: no file {}", ca.display());
    }
    ensure!(
        !tls || ca.is_some(),
        "{flag} {url} is TLS: give {flag}-ca FILE, the CA bundle etcd's certificate chains to"
    );
    match (cert, key) {
        (Some(c), Some(k)) => {
            ensure!(
                ca.is_some(),
                "{flag}-cert and {flag}-key need {flag}-ca and {flag} etcds://…"
            );
            ensure!(c.is_file(), "{flag}-cert: no file {}", c.display());
            ensure!(k.is_file(), "{flag}-key: no file {}", k.display());
        }
        (Some(_), None) => bail!("{flag}-cert needs {flag}-key, the certificate's key"),
        (None, Some(_)) => bail!("{flag}-key needs {flag}-cert"),
        (None, None) => {}
    }
    let user = match (user, password) {
        (Some(""), _) => bail!("{flag}-user is empty"),
        (Some(u), Some(p)) => Some((u.to_string(), p.to_string())),
        (Some(_), None) => bail!(
            "{flag}-user needs a password: {flag}-password, or {} in the environment",
            password_env(flag)
        ),
        (None, _) => None,
    };
    Ok(StoreOptions {
        ca_file: ca.cloned(),
        cert_file: cert.cloned(),
        key_file: key.cloned(),
        user,
    })
}

impl AgentsArgs {
    /// Whether the agents source was asked for.
    pub fn enabled(&self) -> bool {
        self.agents.is_some()
    }

    /// Checks the options and starts the source, if asked for, until `stop`.
    pub fn spawn(&self, snapshots: SnapshotSender, stop: CancellationToken) -> anyhow::Result<()> {
        let Some(url) = &self.agents else {
            let set = [
                (self.agents_ca.is_some(), "--agents-ca"),
                (self.agents_cert.is_some(), "--agents-cert"),
                (self.agents_key.is_some(), "--agents-key"),
                (self.agents_user.is_some(), "--agents-user"),
            ];
            if let Some((_, flag)) = set.iter().find(|(on, _)| *on) {
                bail!("{flag} needs --agents etcd://HOST:PORT");
            }
            return Ok(());
        };
        let options = store_options(
            url,
            EtcdFlags {
                flag: "--agents",
                ca: self.agents_ca.as_ref(),
                cert: self.agents_cert.as_ref(),
                key: self.agents_key.as_ref(),
                user: self.agents_user.as_deref(),
                password: self.agents_password.as_deref(),
            },
        )?;
        tracing::info!(
            "agents: following the registrations under {} in {url}",
            url.layout().agents()
        );
        tokio::spawn(AgentsSource::new(url.clone(), options).run(snapshots, stop));
        Ok(())
    }
}
