//! The seeds' command-line mappings: `PORT:SERVICE[:PORT]`, optionally prefixed with the IP to
//! listen on (`127.0.0.1:80:webserver:8080`).
//!
//! weave-nginx wrote `80:webserver:8080` (listen on 80, send to port 8080 of every address of
//! the name `webserver`); docker-nginx-consul wrote `80:webserver` (the port comes from
//! Consul). A source that serves mappings owns the whole slice each one makes: a listener
//! named `SERVICE-PORT`, a route of all its traffic, and the service with the endpoints it
//! found, so that nothing refers to what another source has not sent yet.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use drover_model::{Config, EndpointSpec, ListenerSpec, Protocol, RouteSpec, ServiceSpec};

/// One `[IP:]PORT:SERVICE[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Where drover listens; all IPv4 addresses unless an IP was given.
    pub listen: SocketAddr,
    /// The name to look up (DNS) or the service to watch (Consul).
    pub service: String,
    /// The endpoints' port; None when the source knows it (Consul, DNS SRV).
    pub target_port: Option<u16>,
}

impl Mapping {
    /// The listener's name, `SERVICE-PORT`.
    pub fn listener_name(&self) -> String {
        format!("{}-{}", self.service, self.listen.port())
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.listen.ip().is_unspecified() {
            write!(f, "{}:", self.listen.ip())?;
        }
        write!(f, "{}:{}", self.listen.port(), self.service)?;
        if let Some(p) = self.target_port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl FromStr for Mapping {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "invalid mapping {s:?}: {why}; write PORT:SERVICE[:PORT], such as 80:webserver:8080, optionally after the IP to listen on (127.0.0.1:80:webserver:8080)"
            )
        };
        let mut parts: Vec<&str> = s.split(':').collect();
        let ip = match parts.first().map(|p| p.parse::<IpAddr>()) {
            Some(Ok(ip)) if parts.len() >= 3 => {
                parts.remove(0);
                ip
            }
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let port = |p: &str, what: &str| {
            p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                bad(&format!(
                    "{what} {p:?} is not a port number from 1 to 65535"
                ))
            })
        };
        let (listen, service, target) = match parts.as_slice() {
            [listen, service] => (port(listen, "the listen port")?, *service, None),
            [listen, service, target] => (
                port(listen, "the listen port")?,
                *service,
                Some(port(target, "the target port")?),
            ),
            _ => return Err(bad("it needs two or three parts separated by ':'")),
        };
        let valid_name = !service.is_empty()
            && service
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid_name {
            return Err(bad(&format!(
                "{service:?} is not a service name (letters, digits, '-', '_' and '.')"
            )));
        }
        Ok(Mapping {
            listen: SocketAddr::new(ip, listen),
            service: service.to_string(),
            target_port: target,
        })
    }
}

/// The configuration a set of mappings makes, with the endpoints found for each service
/// (by service name; a service with none found has no endpoints and answers 503).
pub fn config_for(mappings: &[Mapping], found: &BTreeMap<String, Vec<SocketAddr>>) -> Config {
    let mut config = Config::default();
    for m in mappings {
        config.listeners.push(ListenerSpec::new(
            m.listener_name(),
            m.listen,
            Protocol::Http,
        ));
        config
            .routes
            .push(RouteSpec::new(m.listener_name(), m.service.clone()));
        let endpoints = found
            .get(&m.service)
            .map(|addrs| addrs.iter().map(|a| EndpointSpec::new(*a, 1)).collect())
            .unwrap_or_default();
        config
            .services
            .entry(m.service.clone())
            .or_insert_with(|| ServiceSpec {
                endpoints,
                ..ServiceSpec::default()
            });
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_forms_parse() {
        let m: Mapping = "80:webserver:8080".parse().unwrap();
        assert_eq!(
            (m.listen, m.service.as_str(), m.target_port),
            ("0.0.0.0:80".parse().unwrap(), "webserver", Some(8080))
        );
        let m: Mapping = "81:graphite".parse().unwrap();
        assert_eq!(m.target_port, None);
        let m: Mapping = "127.0.0.1:18080:webserver:8080".parse().unwrap();
        assert_eq!(m.listen, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(m.to_string(), "127.0.0.1:18080:webserver:8080");
        assert_eq!(m.listener_name(), "webserver-18080");
    }

    #[test]
    fn bad_mappings_say_what_is_wrong_and_what_is_right() {
        for (bad, why) in [
            ("80", "two or three parts"),
            ("eighty:web", "the listen port \"eighty\""),
            ("80:web:0", "the target port \"0\""),
            ("80::8080", "is not a service name"),
            ("80:web/x", "is not a service name"),
            ("1:2:3:4:5", "two or three parts"),
        ] {
            let e = bad.parse::<Mapping>().unwrap_err();
            assert!(
                e.contains(why) && e.contains("such as 80:webserver:8080"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn mappings_make_a_valid_config_with_what_was_found() {
        let mappings: Vec<Mapping> = ["127.0.0.1:8080:web:9000", "127.0.0.1:8081:api"]
            .iter()
            .map(|m| m.parse().unwrap())
            .collect();
        let found = BTreeMap::from([("web".to_string(), vec!["10.0.0.1:9000".parse().unwrap()])]);
        let c = config_for(&mappings, &found);
        drover_model::validate(&c).unwrap();
        assert_eq!(c.services["web"].endpoints.len(), 1);
        assert!(c.services["api"].endpoints.is_empty());
        assert_eq!(c.routes[1].listener, "api-8081");
    }
}
