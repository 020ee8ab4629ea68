//! Merging the snapshots of several sources into one effective configuration.
//!
//! Each source owns a slice of the world and always sends its whole slice. Merging is a union:
//! a listener or service named by two sources is a conflict, reported with both sources, never
//! resolved by silently letting one win.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::Config;

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

/// Two sources define the same name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?} is defined by both {first} and {second}; rename one of them")]
pub struct MergeError {
    pub kind: &'static str,
    pub name: String,
    pub first: SourceId,
    pub second: SourceId,
}

/// Unites the configurations of all sources. Global settings come from the first source (in
/// source order) that has any listener, so the file's settings apply when a file is used.
pub fn merge<'a>(
    sources: impl IntoIterator<Item = (&'a SourceId, &'a Config)>,
) -> Result<Effective, Vec<MergeError>> {
    let mut out = Effective::default();
    let mut errors = Vec::new();
    let mut have_global = false;
    for (source, config) in sources {
        if !have_global && !config.listeners.is_empty() {
            out.config.global = config.global.clone();
            have_global = true;
        }
        for l in &config.listeners {
            if let Some(first) = out.listener_sources.get(&l.name) {
                errors.push(MergeError {
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
                errors.push(MergeError {
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
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
