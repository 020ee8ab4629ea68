//! A Consul HTTP API double for tests: filled in with the Consul source.
