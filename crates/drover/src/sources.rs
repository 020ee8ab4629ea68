//! The seeds' command-line forms: `PORT:SERVICE[:PORT]` mappings served from DNS
//! (weave-nginx: `--dns 127.0.0.1:5353 80:webserver:8080`) or from Consul
//! (docker-nginx-consul: `--consul localhost:8500 80:webserver`), and Consul's catalog
//! discovery by tag (`--consul-tags`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure};
use drover_control::SnapshotSender;
use drover_discovery::consul::{ClientCertificate, ConsulOptions, ConsulSource, ConsulTls};
use drover_discovery::dns::{DnsOptions, DnsSource};
use drover_discovery::docker::{DockerOptions, DockerSource};
use drover_discovery::mapping::{self, Mapping};
use drover_model::{Config, SourceId};
use tokio_util::sync::CancellationToken;

/// Where mapped services' endpoints come from.
#[derive(clap::Args)]
pub struct MappingArgs {
    /// `[IP:]PORT:SERVICE[:PORT]`: listen on PORT (all IPv4 addresses, or IP) and balance over
    /// SERVICE's endpoints, found through --dns or --consul, on their PORT (or the port
    /// Consul or a DNS SRV record gives).
    #[arg(value_name = "MAPPING", value_parser = parse_mapping)]
    mappings: Vec<Mapping>,
    /// DNS server to resolve mapped names with (IP or IP:PORT); the system's when `system`.
    #[arg(long, value_name = "ADDR", value_parser = parse_dns_server)]
    dns: Option<DnsServer>,
    /// Domain appended to mapped names (weave-nginx's `weave.local`) [default: none].
    #[arg(long, value_name = "DOMAIN")]
    dns_domain: Option<String>,
    /// Shortest time between two lookups of one name, whatever its TTL.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    dns_min_ttl: Duration,
    /// Longest time between two lookups of one name, whatever its TTL.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    dns_max_ttl: Duration,
    /// How long the last good answer is kept while lookups fail (HAProxy's resolvers `hold`).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    dns_hold: Duration,
    /// Consul agent to watch mapped services on (HOST:PORT; https://HOST:PORT for TLS).
    #[arg(long, value_name = "HOST:PORT")]
    consul: Option<String>,
    /// PEM bundle of the CAs that Consul's TLS certificate must chain to, instead of the
    /// system's roots (with --consul https://...).
    #[arg(long, value_name = "FILE")]
    consul_ca: Option<PathBuf>,
    /// PEM certificate (then its intermediates) that drover shows Consul, for an agent with
    /// `verify_incoming` (with --consul https://... and --consul-key).
    #[arg(long, value_name = "FILE")]
    consul_cert: Option<PathBuf>,
    /// PEM private key of --consul-cert.
    #[arg(long, value_name = "FILE")]
    consul_key: Option<PathBuf>,
    /// Consul ACL token (from CONSUL_HTTP_TOKEN when not given here).
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    consul_token: Option<String>,
    /// Consul datacenter [default: the agent's].
    #[arg(long, value_name = "DC")]
    consul_dc: Option<String>,
    /// Also publish every Consul service tagged `drover.enable` (see docs/consul.md).
    #[arg(long)]
    consul_tags: bool,
    /// How long one Consul blocking query may wait for a change.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    consul_wait: Duration,
}

#[derive(Clone)]
enum DnsServer {
    System,
    At(SocketAddr),
}

fn parse_mapping(s: &str) -> Result<Mapping, String> {
    s.parse()
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<drover_model::Duration>()
        .map(drover_model::Duration::get)
        .map_err(|e| e.to_string())
}

fn parse_dns_server(s: &str) -> Result<DnsServer, String> {
    if s == "system" {
        return Ok(DnsServer::System);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(DnsServer::At(SocketAddr::new(ip, 53)));
    }
    s.parse::<SocketAddr>().map(DnsServer::At).map_err(|_| {
        format!("invalid DNS server {s:?}: write IP, IP:PORT (such as 127.0.0.1:5353) or `system`")
    })
}

impl MappingArgs {
    /// Whether any source other than a config file was asked for.
    pub fn any(&self) -> bool {
        !self.mappings.is_empty() || self.dns.is_some() || self.consul.is_some()
    }

    /// Checks that the flags and mappings go together.
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.dns.is_none() || self.consul.is_none(),
            "choose --dns or --consul for the mappings, not both"
        );
        if self.dns.is_none() && self.consul.is_none() && !self.mappings.is_empty() {
            let listed: Vec<String> = self.mappings.iter().map(ToString::to_string).collect();
            bail!(
                "the mappings {} need --dns ADDR or --consul HOST:PORT to say where their endpoints come from",
                listed.join(" ")
            );
        }
        if self.dns.is_some() && self.mappings.is_empty() {
            bail!("--dns needs mappings to resolve, such as 80:webserver:8080");
        }
        if self.consul.is_some() && self.mappings.is_empty() && !self.consul_tags {
            bail!("--consul needs mappings to watch, such as 80:webserver, or --consul-tags");
        }
        ensure!(
            !self.consul_tags || self.consul.is_some(),
            "--consul-tags needs --consul HOST:PORT"
        );
        let https = self
            .consul
            .as_deref()
            .is_some_and(|a| a.trim().starts_with("https://"));
        for (flag, given) in [
            ("--consul-ca", self.consul_ca.is_some()),
            ("--consul-cert", self.consul_cert.is_some()),
            ("--consul-key", self.consul_key.is_some()),
        ] {
            ensure!(
                !given || https,
                "{flag} needs --consul https://HOST:PORT (TLS to Consul)"
            );
        }
        match (&self.consul_cert, &self.consul_key) {
            (Some(_), None) => {
                bail!("--consul-cert needs --consul-key, the certificate's private key")
            }
            (None, Some(_)) => {
                bail!("--consul-key needs --consul-cert, the certificate it belongs to")
            }
            _ => {}
        }
        Ok(())
    }

    /// The source id and first snapshot of the mapping source, applied at start-up so that a
    /// port that cannot be bound stops drover at once.
    pub fn initial(&self) -> Option<(SourceId, Config)> {
        let id = if self.dns.is_some() {
            "dns"
        } else if self.consul.is_some() {
            "consul"
        } else {
            return None;
        };
        let config = mapping::config_for(&self.mappings, &Default::default());
        Some((SourceId(id.into()), config))
    }

    /// Builds the mapping source, if any: done before anything is bound, so that a bad
    /// option stops drover before it listens anywhere.
    pub fn build(self) -> anyhow::Result<MappingSource> {
        if let Some(server) = self.dns {
            let options = DnsOptions {
                server: match server {
                    DnsServer::System => None,
                    DnsServer::At(a) => Some(a),
                },
                domain: self.dns_domain,
                min_ttl: self.dns_min_ttl,
                max_ttl: self.dns_max_ttl,
                hold: self.dns_hold,
            };
            let source = DnsSource::new(self.mappings, options).map_err(anyhow::Error::msg)?;
            return Ok(MappingSource::Dns(Box::new(source)));
        }
        if let Some(address) = self.consul {
            let options = ConsulOptions {
                address,
                tls: tls_to_consul(self.consul_ca, self.consul_cert.zip(self.consul_key)),
                token: self.consul_token.filter(|t| !t.is_empty()),
                datacenter: self.consul_dc,
                wait: self.consul_wait,
                tag_discovery: self.consul_tags,
            };
            let source = ConsulSource::new(self.mappings, options).map_err(anyhow::Error::msg)?;
            return Ok(MappingSource::Consul(Box::new(source)));
        }
        Ok(MappingSource::None)
    }
}

/// The source that serves the mappings.
pub enum MappingSource {
    None,
    Dns(Box<DnsSource>),
    Consul(Box<ConsulSource>),
}

impl MappingSource {
    /// Runs it until `stop`.
    pub fn spawn(self, snapshots: SnapshotSender, stop: CancellationToken) {
        match self {
            MappingSource::None => {}
            MappingSource::Dns(s) => {
                tokio::spawn(s.run(snapshots, stop));
            }
            MappingSource::Consul(s) => {
                tokio::spawn(s.run(snapshots, stop));
            }
        }
    }
}

/// Containers configured by their labels (docs/docker.md).
#[derive(clap::Args)]
pub struct DockerArgs {
    /// Publish the containers labelled `lb.enable=Y` (docker-loadbalancer's labels) or
    /// `drover.enable=true`, watching the Docker Engine.
    #[arg(long)]
    docker: bool,
    /// The Docker Engine: unix:///PATH or tcp://HOST:PORT [default: DOCKER_HOST, else
    /// unix:///var/run/docker.sock].
    #[arg(long, env = "DOCKER_HOST", value_name = "URL")]
    docker_host: Option<String>,
    /// The network whose container addresses are used, unless a container's `drover.network`
    /// label names another [default: a container's only network, else `bridge`].
    #[arg(long, value_name = "NAME")]
    docker_network: Option<String>,
    /// Send to the host port each container publishes for its target port (`docker run -p`),
    /// on --docker-host-ip, instead of to its network address.
    #[arg(long)]
    docker_host_ports: bool,
    /// The address that host ports published on every address are reached at.
    #[arg(long, default_value = "127.0.0.1", value_name = "IP")]
    docker_host_ip: IpAddr,
    /// Only containers with this label (KEY=VALUE, or KEY for any value); repeat to require
    /// several, so that several drovers on one engine each take their own containers.
    #[arg(long, value_name = "KEY[=VALUE]", value_parser = parse_constraint)]
    docker_constraint: Vec<(String, Option<String>)>,
}

pub(crate) fn parse_constraint(s: &str) -> Result<(String, Option<String>), String> {
    let (k, v) = match s.split_once('=') {
        Some((k, v)) => (k.trim(), Some(v.trim().to_string())),
        None => (s.trim(), None),
    };
    if k.is_empty() {
        return Err(format!(
            "invalid constraint {s:?}: write LABEL=VALUE or LABEL, such as com.example.lb=public"
        ));
    }
    Ok((k.to_string(), v))
}

impl DockerArgs {
    /// Whether the Docker source was asked for.
    pub fn enabled(&self) -> bool {
        self.docker
    }

    /// Builds the source, checking the options first.
    pub fn build(&self) -> anyhow::Result<Option<DockerSource>> {
        if !self.docker {
            let set = [
                (self.docker_network.is_some(), "--docker-network"),
                (self.docker_host_ports, "--docker-host-ports"),
                (!self.docker_constraint.is_empty(), "--docker-constraint"),
            ];
            if let Some((_, flag)) = set.iter().find(|(on, _)| *on) {
                bail!("{flag} needs --docker");
            }
            return Ok(None);
        }
        let options = DockerOptions {
            host: self.docker_host.clone().filter(|h| !h.is_empty()),
            network: self.docker_network.clone(),
            host_ports: self.docker_host_ports,
            host_ip: self.docker_host_ip,
            constraints: self.docker_constraint.clone(),
        };
        DockerSource::new(options)
            .map(Some)
            .map_err(anyhow::Error::msg)
    }
}

/// The TLS options to Consul, None when none was given.
fn tls_to_consul(ca: Option<PathBuf>, client: Option<(PathBuf, PathBuf)>) -> Option<ConsulTls> {
    let client = client.map(|(cert, key)| ClientCertificate { cert, key });
    (ca.is_some() || client.is_some()).then_some(ConsulTls {
        ca_file: ca,
        client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        mapping: MappingArgs,
    }

    fn check(args: &[&str]) -> Result<(), String> {
        let argv = std::iter::once("drover").chain(args.iter().copied());
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.mapping.check().map_err(|e| e.to_string())
    }

    #[test]
    fn tls_flags_to_consul_need_an_https_address_and_a_client_certificate_its_key() {
        let https = ["--consul", "https://consul:8501", "80:web"];
        let with = |more: &[&'static str]| [&https[..], more].concat();
        check(&with(&["--consul-ca", "ca.pem"])).unwrap();
        check(&with(&["--consul-cert", "c.pem", "--consul-key", "c.key"])).unwrap();
        assert_eq!(
            check(&with(&["--consul-cert", "c.pem"])).unwrap_err(),
            "--consul-cert needs --consul-key, the certificate's private key"
        );
        assert_eq!(
            check(&with(&["--consul-key", "c.key"])).unwrap_err(),
            "--consul-key needs --consul-cert, the certificate it belongs to"
        );
        let plain = [
            "--consul",
            "consul:8500",
            "80:web",
            "--consul-cert",
            "c.pem",
        ];
        assert_eq!(
            check(&plain).unwrap_err(),
            "--consul-cert needs --consul https://HOST:PORT (TLS to Consul)"
        );
    }
}
