//! `drover run --agents etcd://…`: serve the containers that `drover agent` registers from
//! each host (docs/cluster.md, "Agents"); and the etcd options that the agent and the
//! gateway both take.

use std::path::{Path, PathBuf};

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

/// The options of an etcd URL given with `flags.flag`, checked: TLS files that go together
/// with an `etcds://` URL and can be read now, not at the first connection, and a user with
/// a password. None without a URL, when none of the flags that go with one is given either.
pub fn store_options(
    url: Option<&StoreUrl>,
    flags: EtcdFlags<'_>,
) -> anyhow::Result<Option<StoreOptions>> {
    let EtcdFlags {
        flag,
        ca,
        cert,
        key,
        user,
        password,
    } = flags;
    // A password from the environment may be there for another drover on the machine.
    let password_given = password.is_some() && std::env::var_os(password_env(flag)).is_none();
    let Some(url) = url else {
        let given = [
            ("ca", ca.is_some()),
            ("cert", cert.is_some()),
            ("key", key.is_some()),
            ("user", user.is_some()),
            ("password", password_given),
        ];
        if let Some((name, _)) = given.iter().find(|(_, set)| *set) {
            bail!("{flag}-{name} needs {flag} etcd://HOST:PORT (or etcds:// for TLS)");
        }
        return Ok(None);
    };
    let tls = url.endpoints.iter().any(|e| e.starts_with("https://"));
    match (ca, tls) {
        (Some(_), false) => {
            bail!("{flag}-ca is for TLS to etcd: write {flag} etcds://… instead of {url}")
        }
        (None, true) => bail!(
            "{flag} {url} uses TLS: give {flag}-ca FILE, the PEM bundle of the CAs that etcd's certificate chains to"
        ),
        (Some(ca), true) => readable(flag, "ca", ca)?,
        (None, false) => {}
    }
    match (cert, key) {
        (Some(cert), Some(key)) => {
            ensure!(
                tls,
                "{flag}-cert and {flag}-key are for TLS to etcd: write {flag} etcds://… instead of {url}"
            );
            readable(flag, "cert", cert)?;
            readable(flag, "key", key)?;
        }
        (Some(_), None) => bail!("{flag}-cert needs {flag}-key, the certificate's private key"),
        (None, Some(_)) => bail!("{flag}-key needs {flag}-cert, the certificate it belongs to"),
        (None, None) => {}
    }
    let user = match (user, password) {
        (Some(""), _) => bail!("{flag}-user is empty"),
        (Some(u), Some(p)) => Some((u.to_string(), p.to_string())),
        (Some(_), None) => bail!(
            "{flag}-user needs a password: {flag}-password, or {} in the environment",
            password_env(flag)
        ),
        (None, _) if password_given => bail!("{flag}-password needs {flag}-user"),
        (None, _) => None,
    };
    Ok(Some(StoreOptions {
        ca_file: ca.cloned(),
        cert_file: cert.cloned(),
        key_file: key.cloned(),
        user,
    }))
}

/// A file an etcd flag names (`FLAG-WHICH`): it must be readable now, not at the first
/// connection.
fn readable(flag: &str, which: &str, path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("{flag}-{which} {}: cannot read it: {e}", path.display()))
}

impl AgentsArgs {
    /// Whether the agents source was asked for.
    pub fn enabled(&self) -> bool {
        self.agents.is_some()
    }

    /// Checks the options and starts the source, if asked for, until `stop`.
    pub fn spawn(&self, snapshots: SnapshotSender, stop: CancellationToken) -> anyhow::Result<()> {
        let options = store_options(
            self.agents.as_ref(),
            EtcdFlags {
                flag: "--agents",
                ca: self.agents_ca.as_ref(),
                cert: self.agents_cert.as_ref(),
                key: self.agents_key.as_ref(),
                user: self.agents_user.as_deref(),
                password: self.agents_password.as_deref(),
            },
        )?;
        let (Some(url), Some(options)) = (&self.agents, options) else {
            return Ok(());
        };
        tracing::info!(
            "agents: following the registrations under {} in {url}",
            url.layout().agents()
        );
        tokio::spawn(AgentsSource::new(url.clone(), options).run(snapshots, stop));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags<'a>(user: Option<&'a str>, password: Option<&'a str>) -> EtcdFlags<'a> {
        EtcdFlags {
            flag: "--agents",
            ca: None,
            cert: None,
            key: None,
            user,
            password,
        }
    }

    #[test]
    fn each_flag_is_named_in_what_it_needs() {
        let url = StoreUrl::parse("etcd://127.0.0.1:2379").unwrap();
        let e = store_options(None, flags(Some("u"), None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--agents-user needs --agents etcd://HOST:PORT (or etcds:// for TLS)"
        );
        let e = store_options(Some(&url), flags(Some("u"), None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--agents-user needs a password: --agents-password, or DROVER_AGENTS_PASSWORD in the environment"
        );
        if std::env::var_os("DROVER_AGENTS_PASSWORD").is_none() {
            let e = store_options(Some(&url), flags(None, Some("p"))).unwrap_err();
            assert_eq!(e.to_string(), "--agents-password needs --agents-user");
        }
        let options = store_options(Some(&url), flags(Some("u"), Some("p")))
            .unwrap()
            .unwrap();
        assert_eq!(options.user, Some(("u".to_string(), "p".to_string())));
        assert!(store_options(None, flags(None, None)).unwrap().is_none());
    }
}
