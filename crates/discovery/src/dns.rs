//! The DNS source (being written): resolves mapped names and serves their addresses.

use std::net::SocketAddr;
use std::time::Duration;

use drover_control::SnapshotSender;
use tokio_util::sync::CancellationToken;

use crate::mapping::Mapping;

/// How names are resolved.
pub struct DnsOptions {
    pub server: Option<SocketAddr>,
    pub domain: Option<String>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub hold: Duration,
}

/// Serves mapped names from DNS.
pub struct DnsSource;

impl DnsSource {
    pub fn new(_mappings: Vec<Mapping>, _options: DnsOptions) -> Result<Self, String> {
        Err("the DNS source is not built yet".into())
    }

    pub async fn run(self, _snapshots: SnapshotSender, _stop: CancellationToken) {}
}
