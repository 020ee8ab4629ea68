//! Sources of configuration. Each source owns a slice of the world and sends full snapshots
//! of it to the reconciler, never deltas: a missed event then costs nothing, because the next
//! snapshot is whole.
//!
//! - [`file`]: the config file, watched;
//! - [`dns`]: names resolved from DNS (weave-nginx's `80:webserver:8080`);
//! - [`consul`]: services watched in Consul with blocking queries (docker-nginx-consul's
//!   `80:webserver`), or discovered from its catalog by tag;
//! - [`mapping`]: the `PORT:SERVICE[:PORT]` mappings the last two serve;
//! - [`docker`]: containers configured by their labels (docker-loadbalancer's `lb.*`);
//! - [`agents`]: the containers of many hosts, registered in etcd by `drover agent`.

pub mod agents;
pub mod consul;
pub mod dns;
pub mod docker;
pub mod file;
pub mod mapping;
