//! The TOML configuration file.
//!
//! [`parse`] turns a document into a validated [`drover_model::Config`]. Whatever is wrong
//! with it (a syntax error, an unknown key, a value of the wrong type, a route to a service that
//! does not exist) comes back as a [`Problem`] that names the line, the column and the field,
//! so that `drover check` and the log can point a person straight at it. The schema itself is
//! the model's serde form; this crate adds locations.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use drover_model::{Config, FieldPath, Segment};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column, when the problem can be placed in the text.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The field it is about, such as `routes[0].service`.
    pub field: Option<String>,
    pub message: String,
}

/// Why a config file was rejected: every problem found in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
                if let Some(col) = p.column {
                    write!(f, ":{col}")?;
                }
            }
            f.write_str(": ")?;
            if let Some(field) = &p.field {
                write!(f, "{field}: ")?;
            }
            f.write_str(&p.message)?;
        }
        Ok(())
    }
}

/// Reads and parses a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        problems: vec![Problem {
            line: None,
            column: None,
            field: None,
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    parse(&text, path)
}

/// Parses and validates a config document; `file` only labels the errors.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let fail = |problems| ConfigError {
        file: file.to_path_buf(),
        problems,
    };
    let doc = DeTable::parse(text).map_err(|e| {
        let (line, column) = position(text, e.span());
        fail(vec![Problem {
            line,
            column,
            field: None,
            message: e.message().to_string(),
        }])
    })?;
    let config: Config = toml::from_str(text).map_err(|e| {
        let span = e.span();
        let (line, column) = position(text, span.clone());
        let field = span
            .map(|s| field_at(&doc, s.start))
            .filter(|f| !f.is_empty());
        fail(vec![Problem {
            line,
            column,
            field,
            message: e.message().to_string(),
        }])
    })?;
    drover_model::validate(&config).map_err(|errors| {
        fail(
            errors
                .into_iter()
                .map(|e| {
                    let (line, column) = position(text, locate(&doc, &e.path));
                    Problem {
                        line,
                        column,
                        field: Some(e.path.to_string()),
                        message: e.message,
                    }
                })
                .collect(),
        )
    })?;
    Ok(config)
}

/// 1-based line and column of the start of a span.
fn position(text: &str, span: Option<Range<usize>>) -> (Option<usize>, Option<usize>) {
    let Some(span) = span else {
        return (None, None);
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (Some(line), Some(column))
}

/// The span of the value at `path`, or of its nearest ancestor that the document spells out
/// (a field left to its default has no place in the text, but its table does).
fn locate(doc: &Spanned<DeTable<'_>>, path: &FieldPath) -> Option<Range<usize>> {
    let mut segments = path.0.iter();
    let first = match segments.next()? {
        Segment::Key(k) => doc.get_ref().get(k.as_str())?,
        Segment::Index(_) => return None,
    };
    let mut best = first.span();
    let mut node: &Spanned<DeValue<'_>> = first;
    for seg in segments {
        let next = match seg {
            Segment::Key(k) => node.get_ref().get(k.as_str()),
            Segment::Index(i) => node.get_ref().get(*i),
        };
        match next {
            Some(n) => {
                best = n.span();
                node = n;
            }
            None => break,
        }
    }
    Some(best)
}

/// The deepest field whose value contains the byte `offset`, as `a.b[2].c`.
fn field_at(doc: &Spanned<DeTable<'_>>, offset: usize) -> String {
    fn visit(
        value: &DeValue<'_>,
        path: &mut FieldPath,
        offset: usize,
        best: &mut Option<FieldPath>,
    ) {
        match value {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    path.0.push(Segment::Key(k.get_ref().to_string()));
                    step(v, path, offset, best);
                    path.0.pop();
                }
            }
            DeValue::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    path.0.push(Segment::Index(i));
                    step(v, path, offset, best);
                    path.0.pop();
                }
            }
            _ => {}
        }
    }
    fn step(
        v: &Spanned<DeValue<'_>>,
        path: &mut FieldPath,
        offset: usize,
        best: &mut Option<FieldPath>,
    ) {
        if v.span().contains(&offset) && best.as_ref().is_none_or(|b| path.0.len() > b.0.len()) {
            *best = Some(path.clone());
        }
        visit(v.get_ref(), path, offset, best);
    }
    let mut best = None;
    let root = DeValue::Table(doc.get_ref().clone());
    visit(&root, &mut FieldPath::default(), offset, &mut best);
    best.map(|p| p.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:8080"

[[routes]]
listener = "web"
host = "example.com"
path_prefix = "/api"
service = "webserver"

[services.webserver]
policy = "round_robin"
endpoints = [ { address = "127.0.0.1:9001", weight = 2 }, { address = "127.0.0.1:9002" } ]
"#;

    fn err(text: &str) -> String {
        parse(text, Path::new("drover.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_issue_example_parses_with_defaults_filled_in() {
        let c = parse(GOOD, Path::new("x.toml")).unwrap();
        assert_eq!(c.listeners[0].max_connections, 10_000);
        let s = &c.services["webserver"];
        assert_eq!(s.endpoints[0].weight, 2);
        assert_eq!(s.endpoints[1].weight, 1);
        assert_eq!(s.connect_timeout.to_string(), "5s");
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let e = err("[[listeners]]\nname = \"web\nlisten = 1\n");
        assert!(e.starts_with("drover.toml:2:"), "{e}");
    }

    #[test]
    fn an_unknown_policy_names_line_field_and_choices() {
        let text = GOOD.replace("\"round_robin\"", "\"fastest\"");
        let e = err(&text);
        assert!(
            e.starts_with("drover.toml:13:10: services.webserver.policy: "),
            "{e}"
        );
        assert!(e.contains("round_robin"), "lists what is valid: {e}");
    }

    #[test]
    fn a_bad_address_names_line_and_field() {
        let text = GOOD.replace("127.0.0.1:9002", "127.0.0.1:port");
        let e = err(&text);
        assert!(
            e.starts_with("drover.toml:14:")
                && e.contains("services.webserver.endpoints[1].address"),
            "{e}"
        );
        assert!(e.contains("expected IP:PORT"), "{e}");
    }

    #[test]
    fn a_route_to_a_missing_service_points_at_the_route() {
        let text = GOOD.replace("service = \"webserver\"", "service = \"api\"");
        let e = err(&text);
        assert!(
            e.starts_with("drover.toml:10:11: routes[0].service: no service named \"api\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = GOOD.replace("policy = ", "polcy = ");
        let e = err(&text);
        assert!(e.contains("unknown field `polcy`"), "{e}");
        assert!(e.starts_with("drover.toml:13:"), "{e}");
    }

    #[test]
    fn the_docker_template_is_read_and_checked_like_a_service() {
        let text = format!("{GOOD}\n[docker.defaults]\npolicy = \"random\"\n");
        let config = parse(&text, Path::new("drover.toml")).unwrap();
        assert_eq!(config.docker.defaults.policy, drover_model::Policy::Random);
        assert_eq!(
            config.docker.defaults.sticky, None,
            "the table replaces the template"
        );
        let text = format!("{GOOD}\n[docker.defaults.retries]\nattempts = 0\n");
        let e = err(&text);
        assert!(
            e.contains("docker.defaults.retries.attempts: 0 is out of range"),
            "{e}"
        );
    }

    #[test]
    fn two_listeners_on_one_address_point_at_the_second() {
        let text = format!("{GOOD}\n[[listeners]]\nname = \"web2\"\nlisten = \"127.0.0.1:8080\"\n");
        let e = err(&text);
        assert!(
            e.starts_with("drover.toml:18:10: listeners[1].listen: 127.0.0.1:8080 overlaps"),
            "{e}"
        );
    }
}
