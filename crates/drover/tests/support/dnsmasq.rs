//! A dnsmasq DNS server for tests: filled in with the DNS source.
