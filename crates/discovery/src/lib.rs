//! Sources of configuration. Each source owns a slice of the world and sends full snapshots
//! of it to the reconciler, never deltas: a missed event then costs nothing, because the next
//! snapshot is whole.
//!
//! Today there is one source, the config file ([`file`]). Docker, Consul, DNS and etcd come
//! with their issues.

pub mod consul;
pub mod dns;
pub mod file;
pub mod mapping;
