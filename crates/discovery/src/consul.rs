//! The Consul source (being written): watches services with blocking queries.

use std::time::Duration;

use drover_control::SnapshotSender;
use tokio_util::sync::CancellationToken;

use crate::mapping::Mapping;

/// Where Consul is and how to ask it.
pub struct ConsulOptions {
    pub address: String,
    pub token: Option<String>,
    pub datacenter: Option<String>,
    pub wait: Duration,
    pub tag_discovery: bool,
}

/// Serves mapped services from Consul.
pub struct ConsulSource;

impl ConsulSource {
    pub fn new(_mappings: Vec<Mapping>, _options: ConsulOptions) -> Result<Self, String> {
        Err("the Consul source is not built yet".into())
    }

    pub async fn run(self, _snapshots: SnapshotSender, _stop: CancellationToken) {}
}
