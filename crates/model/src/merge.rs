//! Merging the snapshots of several sources into one effective configuration.
//!
//! Each source owns a slice of the world and always sends its whole slice. Merging is a union:
//! a listener or service named by two sources is a conflict, reported with both sources, never
//! resolved by silently letting one win. Then each source's patches apply: endpoints it adds
//! to services others own (an address the owner already lists stays the owner's), and the
//! weights and admin states it sets.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::{Config, Patches};

/// Which source a piece of configuration came from: `file:/etc/drover.toml`, `default`, `api`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SourceId(pub String);

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The merged configuration and where each named piece came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Effective {
    pub config: Config,
    pub listener_sources: BTreeMap<String, SourceId>,
    pub service_sources: BTreeMap<String, SourceId>,
}

/// Why sources cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("{kind} {name:?} is defined by both {first} and {second}; rename one of them")]
    Duplicate {
        kind: &'static str,
        name: String,
        first: SourceId,
        second: SourceId,
    },
    #[error(
        "service {service:?} is not defined by any source, but {source_id} added endpoints to it; remove them through {source_id} first"
    )]
    Orphaned {
        service: String,
        source_id: SourceId,
    },
}

/// Unites the configurations of all sources. The global settings and the `[docker]` section
/// come from the first source (in source order) that sets them to anything but their
/// defaults: only the config file writes them, so the file's apply.
pub fn merge<'a>(
    sources: impl IntoIterator<Item = (&'a SourceId, &'a Config)> + Clone,
) -> Result<Effective, Vec<MergeError>> {
    let mut out = Effective::default();
    let mut errors = Vec::new();
    let (mut have_global, mut have_docker) = (false, false);
    for (source, config) in sources.clone() {
        if !have_global && config.global != Default::default() {
            out.config.global = config.global.clone();
            have_global = true;
        }
        if !have_docker && !config.docker.is_default() {
            out.config.docker = config.docker.clone();
            have_docker = true;
        }
        for l in &config.listeners {
            if let Some(first) = out.listener_sources.get(&l.name) {
                errors.push(MergeError::Duplicate {
                    kind: "listener",
                    name: l.name.clone(),
                    first: first.clone(),
                    second: source.clone(),
                });
                continue;
            }
            out.listener_sources.insert(l.name.clone(), source.clone());
            out.config.listeners.push(l.clone());
        }
        for (name, s) in &config.services {
            if let Some(first) = out.service_sources.get(name) {
                errors.push(MergeError::Duplicate {
                    kind: "service",
                    name: name.clone(),
                    first: first.clone(),
                    second: source.clone(),
                });
                continue;
            }
            out.service_sources.insert(name.clone(), source.clone());
            out.config.services.insert(name.clone(), s.clone());
        }
        out.config.routes.extend(config.routes.iter().cloned());
    }
    for (source, config) in sources {
        apply_patches(&mut out.config, source, &config.patches, &mut errors);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn apply_patches(
    config: &mut Config,
    source: &SourceId,
    patches: &Patches,
    errors: &mut Vec<MergeError>,
) {
    for (service, endpoints) in &patches.added {
        let Some(spec) = config.services.get_mut(service) else {
            errors.push(MergeError::Orphaned {
                service: service.clone(),
                source_id: source.clone(),
            });
            continue;
        };
        for e in endpoints {
            if !spec.endpoints.iter().any(|o| o.address == e.address) {
                spec.endpoints.push(*e);
            }
        }
    }
    for (service, overrides) in &patches.overrides {
        let Some(spec) = config.services.get_mut(service) else {
            continue;
        };
        for e in &mut spec.endpoints {
            if let Some(o) = overrides.get(&e.address) {
                e.weight = o.weight.unwrap_or(e.weight);
                e.state = o.state.unwrap_or(e.state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_s_global_settings_and_docker_template_win_over_sources_sorted_before_it() {
        // "docker" sorts before "file:…": a source that leaves them at their defaults must
        // not hide what the file sets.
        let docker = SourceId("docker".into());
        let file = SourceId("file:/etc/drover.toml".into());
        let mut from_docker = Config::embedded_default("127.0.0.1:1".parse().unwrap());
        from_docker.services.clear();
        from_docker.routes.clear();
        from_docker.listeners[0].name = "docker-1".into();
        let mut from_file = Config::default();
        from_file.global.shutdown_grace = "5s".parse().unwrap();
        from_file.docker.defaults.policy = crate::Policy::Random;
        let merged = merge([(&docker, &from_docker), (&file, &from_file)]).unwrap();
        assert_eq!(merged.config.global.shutdown_grace, "5s".parse().unwrap());
        assert_eq!(merged.config.docker.defaults.policy, crate::Policy::Random);
        let alone = merge([(&docker, &from_docker)]).unwrap();
        assert_eq!(alone.config.docker, crate::DockerConfig::default());
    }

    #[test]
    fn a_name_defined_twice_names_both_sources() {
        let a = SourceId("file:/a.toml".into());
        let b = SourceId("api".into());
        let c = Config::embedded_default("127.0.0.1:1".parse().unwrap());
        let errs = merge([(&a, &c), (&b, &c)]).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            r#"listener "default" is defined by both file:/a.toml and api; rename one of them"#
        );
        assert_eq!(errs.len(), 2, "the service clashes too");
    }

    #[test]
    fn patches_add_endpoints_and_override_weight_and_state_wherever_they_are() {
        use crate::{AdminState, EndpointOverride, EndpointSpec};
        let file = SourceId("file".into());
        let api = SourceId("api".into());
        let mut owner = Config::embedded_default("127.0.0.1:1".parse().unwrap());
        let own: std::net::SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let added: std::net::SocketAddr = "127.0.0.1:9002".parse().unwrap();
        owner.services.get_mut("default").unwrap().endpoints = vec![EndpointSpec::new(own, 1)];
        let mut patcher = Config::default();
        patcher.patches.added.insert(
            "default".into(),
            vec![EndpointSpec::new(added, 1), EndpointSpec::new(own, 7)],
        );
        patcher
            .patches
            .overrides
            .entry("default".into())
            .or_default()
            .insert(
                own,
                EndpointOverride {
                    weight: Some(3),
                    state: Some(AdminState::Drain),
                },
            );
        let e = merge([(&file, &owner), (&api, &patcher)]).unwrap();
        let eps = &e.config.services["default"].endpoints;
        assert_eq!(
            eps.len(),
            2,
            "an address the owner lists is not added twice"
        );
        assert_eq!((eps[0].weight, eps[0].state), (3, AdminState::Drain));
        assert_eq!((eps[1].address, eps[1].weight), (added, 1));

        // Endpoints added to a service no source defines are an error naming the patcher.
        let errs = merge([(&api, &patcher)]).unwrap_err();
        assert!(
            errs[0].to_string().contains("api added endpoints to it"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn disjoint_sources_unite_and_remember_their_origin() {
        let a = SourceId("file".into());
        let b = SourceId("api".into());
        let ca = Config::embedded_default("127.0.0.1:1".parse().unwrap());
        let mut cb = Config::default();
        cb.services.insert("extra".into(), Default::default());
        let e = merge([(&a, &ca), (&b, &cb)]).unwrap();
        assert_eq!(e.config.services.len(), 2);
        assert_eq!(e.service_sources["extra"], b);
        assert_eq!(e.listener_sources["default"], a);
    }
}
