//! The cluster store: where gateways keep the state made through the management API, and where
//! agents register the containers of their hosts (docs/cluster.md).
//!
//! `--store etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` names the etcd cluster and the key
//! prefix (default `/drover`). Under the prefix:
//!
//! - [`Layout::api_state`] (`PREFIX/api/state`): the API's state, one JSON document (the same
//!   shape as the `api-state.json` file), written with a transaction on its `mod_revision`,
//!   so two concurrent writers never lose each other's change;
//! - [`Layout::agents`] (`PREFIX/agents/`): one key per agent, `PREFIX/agents/NODE`, holding
//!   the slice of configuration that agent's containers make, under the agent's lease.

use std::fmt;

pub use etcd_client;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/drover";

/// A parsed `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// `http://HOST:PORT` (or `https://` with TLS), as etcd-client takes them.
    pub endpoints: Vec<String>,
    pub prefix: String,
}

impl StoreUrl {
    /// Parses the URL. `etcds://` means TLS.
    pub fn parse(s: &str) -> Result<StoreUrl, String> {
        let bad = |why: &str| {
            format!(
                "invalid store {s:?}: {why}; write etcd://HOST:PORT[,HOST:PORT...][/PREFIX], such as etcd://127.0.0.1:2379,127.0.0.1:22379/drover"
            )
        };
        let (scheme, rest) = if let Some(r) = s.strip_prefix("etcd://") {
            ("http", r)
        } else if let Some(r) = s.strip_prefix("etcds://") {
            ("https", r)
        } else {
            return Err(bad("it must start with etcd:// (or etcds:// for TLS)"));
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
            None => (rest, DEFAULT_PREFIX.to_string()),
        };
        if prefix == "/" {
            return Err(bad("the prefix cannot be the root"));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let Some((name, port)) = host.rsplit_once(':') else {
                return Err(bad(&format!("{host:?} has no port")));
            };
            if name.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad(&format!("{host:?} is not HOST:PORT")));
            }
            endpoints.push(format!("{scheme}://{host}"));
        }
        Ok(StoreUrl { endpoints, prefix })
    }

    /// The keys under this URL's prefix.
    pub fn layout(&self) -> Layout {
        Layout {
            prefix: self.prefix.clone(),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tls = self.endpoints.iter().any(|e| e.starts_with("https://"));
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.split_once("://").map_or(e.as_str(), |(_, h)| h))
            .collect();
        let scheme = if tls { "etcds" } else { "etcd" };
        write!(f, "{scheme}://{}{}", hosts.join(","), self.prefix)
    }
}

/// The keys drover uses under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// The API's state document.
    pub fn api_state(&self) -> String {
        format!("{}/api/state", self.prefix)
    }

    /// The prefix of the agents' registrations (ends with `/`).
    pub fn agents(&self) -> String {
        format!("{}/agents/", self.prefix)
    }

    /// One agent's registration.
    pub fn agent(&self, node: &str) -> String {
        format!("{}{node}", self.agents())
    }
}

/// How to reach etcd beyond its URL.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// PEM CA bundle for `etcds://`.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate and key for `etcds://` with client authentication.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    /// etcd user and password (etcd's auth).
    pub user: Option<(String, String)>,
}

/// Why etcd could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {0}: {1}")]
    File(std::path::PathBuf, std::io::Error),
    #[error("etcd at {0}: {1}")]
    Etcd(String, etcd_client::Error),
}

/// Connects to the cluster. etcd-client balances over the endpoints and fails over when one
/// goes away.
pub async fn connect(
    url: &StoreUrl,
    options: &StoreOptions,
) -> Result<etcd_client::Client, StoreError> {
    let mut connect = etcd_client::ConnectOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(2))
        .with_timeout(std::time::Duration::from_secs(5))
        .with_keep_alive(
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(2),
        );
    if let Some((user, password)) = &options.user {
        connect = connect.with_user(user.clone(), password.clone());
    }
    if let Some(ca) = &options.ca_file {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| StoreError::File(p.to_path_buf(), e))
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&options.cert_file, &options.key_file) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        connect = connect.with_tls(tls);
    }
    etcd_client::Client::connect(&url.endpoints, Some(connect))
        .await
        .map_err(|e| StoreError::Etcd(url.to_string(), e))
}

/// Connects to the members that answer a status request within `within`, or to all of
/// them when none or all do. For a client that found its member silent: a member whose
/// process hangs, or whose network is cut, may still take TCP connections, so a client
/// balanced over every member would go on sending it requests that wait for their timeout.
pub async fn connect_answering(
    url: &StoreUrl,
    options: &StoreOptions,
    within: std::time::Duration,
) -> Result<etcd_client::Client, StoreError> {
    let mut probes = tokio::task::JoinSet::new();
    for endpoint in &url.endpoints {
        let one = StoreUrl {
            endpoints: vec![endpoint.clone()],
            prefix: url.prefix.clone(),
        };
        let options = options.clone();
        probes.spawn(async move {
            let status = tokio::time::timeout(within, async {
                connect(&one, &options).await.ok()?.status().await.ok()
            });
            status.await.ok().flatten().map(|_| one.endpoints)
        });
    }
    let mut answering = Vec::new();
    while let Some(probe) = probes.join_next().await {
        answering.extend(probe.ok().flatten().unwrap_or_default());
    }
    if answering.is_empty() || answering.len() == url.endpoints.len() {
        return connect(url, options).await;
    }
    // In the order given, as `connect` would have them.
    answering.sort_by_key(|e| url.endpoints.iter().position(|u| u == e));
    tracing::info!(
        "etcd at {url}: connecting to the members that answered: {}",
        answering.join(", ")
    );
    let some = StoreUrl {
        endpoints: answering,
        prefix: url.prefix.clone(),
    };
    connect(&some, options).await
}

// --- The API's state in etcd (`drover run --store`): see the module. ---

pub mod state;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_take_several_hosts_and_a_prefix() {
        let u = StoreUrl::parse("etcd://127.0.0.1:2379,127.0.0.1:22379/prod/lb").unwrap();
        assert_eq!(
            u.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
        );
        assert_eq!(u.prefix, "/prod/lb");
        assert_eq!(
            u.to_string(),
            "etcd://127.0.0.1:2379,127.0.0.1:22379/prod/lb"
        );
        assert_eq!(u.layout().api_state(), "/prod/lb/api/state");
        assert_eq!(u.layout().agent("host1"), "/prod/lb/agents/host1");
        let u = StoreUrl::parse("etcds://etcd:2379").unwrap();
        assert_eq!(
            (u.endpoints[0].as_str(), u.prefix.as_str()),
            ("https://etcd:2379", "/drover")
        );
    }

    #[test]
    fn bad_urls_say_what_is_right() {
        for (bad, why) in [
            ("http://127.0.0.1:2379", "must start with etcd://"),
            ("etcd://127.0.0.1", "has no port"),
            ("etcd://127.0.0.1:x", "is not HOST:PORT"),
            ("etcd://127.0.0.1:2379/", "cannot be the root"),
        ] {
            let e = StoreUrl::parse(bad).unwrap_err();
            assert!(
                e.contains(why) && e.contains("etcd://HOST:PORT"),
                "{bad}: {e}"
            );
        }
    }
}
