//! The admin API's route table: every (method, path template) it answers, in one list that
//! the dispatcher matches against and the OpenAPI test compares with the document.

use http::Method;

/// An operation of the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Healthz,
    ServersList,
    ServersAdd,
    ServersRemove,
    Stats,
    StatsDetail,
    Status,
    ServicesList,
    ServiceGet,
    ServicePut,
    ServiceDelete,
    EndpointAdd,
    EndpointPatch,
    EndpointDelete,
    Listeners,
    RoutesList,
    RouteAdd,
    RouteDelete,
    Config,
    Events,
    OpenApi,
    Metrics,
    Dashboard,
    Asset,
}

/// Every route. `{name}` segments capture one path segment, percent-decoded.
pub const ROUTES: &[(Method, &str, Op)] = &[
    (Method::GET, "/healthz", Op::Healthz),
    (Method::GET, "/servers", Op::ServersList),
    (Method::POST, "/servers", Op::ServersAdd),
    (Method::DELETE, "/servers/{ip}/{port}", Op::ServersRemove),
    (Method::GET, "/stats", Op::Stats),
    (Method::GET, "/stats/detail", Op::StatsDetail),
    (Method::GET, "/api/v1/status", Op::Status),
    (Method::GET, "/api/v1/services", Op::ServicesList),
    (Method::GET, "/api/v1/services/{service}", Op::ServiceGet),
    (Method::PUT, "/api/v1/services/{service}", Op::ServicePut),
    (
        Method::DELETE,
        "/api/v1/services/{service}",
        Op::ServiceDelete,
    ),
    (
        Method::POST,
        "/api/v1/services/{service}/endpoints",
        Op::EndpointAdd,
    ),
    (
        Method::PATCH,
        "/api/v1/services/{service}/endpoints/{address}",
        Op::EndpointPatch,
    ),
    (
        Method::DELETE,
        "/api/v1/services/{service}/endpoints/{address}",
        Op::EndpointDelete,
    ),
    (Method::GET, "/api/v1/listeners", Op::Listeners),
    (Method::GET, "/api/v1/routes", Op::RoutesList),
    (Method::POST, "/api/v1/routes", Op::RouteAdd),
    (Method::DELETE, "/api/v1/routes", Op::RouteDelete),
    (Method::GET, "/api/v1/config", Op::Config),
    (Method::GET, "/api/v1/events", Op::Events),
    (Method::GET, "/api/v1/openapi.json", Op::OpenApi),
    (Method::GET, "/metrics", Op::Metrics),
    (Method::GET, "/", Op::Dashboard),
    (Method::GET, "/ui/{file}", Op::Asset),
];

/// What a request's method and path come to.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Route(Op, Vec<String>),
    /// The path exists, with other methods.
    WrongMethod(Vec<Method>),
    NotFound,
}

/// Finds the route for a request.
pub fn find(method: &Method, path: &str) -> Found {
    let mut allowed = Vec::new();
    for (m, template, op) in ROUTES {
        if let Some(params) = capture(template, path) {
            if m == method {
                return Found::Route(*op, params);
            }
            allowed.push(m.clone());
        }
    }
    if allowed.is_empty() {
        Found::NotFound
    } else {
        Found::WrongMethod(allowed)
    }
}

fn capture(template: &str, path: &str) -> Option<Vec<String>> {
    let mut t = template.split('/');
    let mut p = path.split('/');
    let mut params = Vec::new();
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(params),
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return None;
                }
                params.push(percent_decode(ps)?);
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

/// Decodes `%XX` escapes; None when an escape is malformed or the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_capture_decoded_segments() {
        assert_eq!(
            find(
                &Method::PATCH,
                "/api/v1/services/web/endpoints/%5B%3A%3A1%5D:80"
            ),
            Found::Route(Op::EndpointPatch, vec!["web".into(), "[::1]:80".into()])
        );
        assert_eq!(
            find(&Method::DELETE, "/servers/127.0.0.1/12345"),
            Found::Route(Op::ServersRemove, vec!["127.0.0.1".into(), "12345".into()])
        );
    }

    #[test]
    fn a_known_path_with_another_method_is_told_apart_from_an_unknown_one() {
        assert_eq!(
            find(&Method::POST, "/stats"),
            Found::WrongMethod(vec![Method::GET])
        );
        assert_eq!(find(&Method::GET, "/servers/1.2.3.4"), Found::NotFound);
        assert_eq!(find(&Method::GET, "/api/v1/services/"), Found::NotFound);
    }

    #[test]
    fn bad_escapes_do_not_match() {
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("a%zz"), None);
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
    }
}
