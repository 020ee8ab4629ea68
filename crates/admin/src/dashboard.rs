//! The dashboard: `GET /` is its page, `GET /ui/{file}` its script, style sheet and icon, all
//! embedded in the binary. The page holds no data: its script reads the API (with the token
//! the page asks for, when one is set) and follows the change stream, so neither route needs
//! the token.
//!
//! Every answer carries a strict Content-Security-Policy: the page may load only its own
//! files and talk only to this listener, and runs no inline script.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::reply::{Body, Failure, fail};

const INDEX: &str = include_str!("dashboard/index.html");

/// The files under `/ui/`: name, Content-Type, body.
const FILES: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/style.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_str!("dashboard/icon.svg"),
    ),
];

/// Only this origin's files, no inline script or style element, no plugins, no framing, and
/// no form that submits anywhere (the token form is handled by the script).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

pub fn page() -> Response<Body> {
    file("text/html; charset=utf-8", INDEX)
}

pub fn asset(name: &str) -> Result<Response<Body>, Failure> {
    FILES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, content_type, body)| file(content_type, body))
        .ok_or_else(|| fail(StatusCode::NOT_FOUND, format!("no dashboard file {name:?}")))
}

fn file(content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidated on every load, so that a new drover's page never runs an old script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(r: &Response<Body>, name: header::HeaderName) -> &str {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    async fn body(r: Response<Body>) -> String {
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn the_page_and_its_files_are_served_with_their_types_and_policy() {
        let cases = [
            (page(), "text/html; charset=utf-8", "<!doctype html>"),
            (
                asset("app.js").unwrap(),
                "text/javascript; charset=utf-8",
                "'use strict'",
            ),
            (
                asset("style.css").unwrap(),
                "text/css; charset=utf-8",
                ":root",
            ),
            (asset("icon.svg").unwrap(), "image/svg+xml", "<svg"),
        ];
        for (r, content_type, start) in cases {
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(header(&r, header::CONTENT_TYPE), content_type);
            assert_eq!(header(&r, header::CACHE_CONTROL), "no-cache");
            let csp = header(&r, header::CONTENT_SECURITY_POLICY);
            assert!(csp.starts_with("default-src 'self';"), "{csp}");
            assert!(!csp.contains("unsafe-inline"), "{csp}");
            assert_eq!(header(&r, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
            let text = body(r).await;
            assert!(
                text.trim_start().starts_with(start),
                "{content_type}: {text:.80}"
            );
        }
    }

    #[test]
    fn an_unknown_file_is_not_found() {
        for name in ["nope.js", "index.html", "../lib.rs", "", "APP.JS"] {
            let e = asset(name).unwrap_err();
            assert_eq!(e.status, StatusCode::NOT_FOUND, "{name}");
            assert!(e.message.contains("no dashboard file"), "{}", e.message);
        }
    }

    #[test]
    fn the_page_runs_no_inline_script_and_loads_only_its_own_files() {
        // An inline <script> or on* handler would be blocked by the policy: the page would
        // look fine in the source and do nothing in a browser.
        let lower = INDEX.to_ascii_lowercase();
        for (at, _) in lower.match_indices("<script") {
            let tag = &lower[at..at + lower[at..].find('>').unwrap()];
            assert!(tag.contains("src=\"/ui/"), "inline script: {tag}");
        }
        assert!(!lower.contains(" onclick="), "inline handler");
        assert!(!lower.contains(" onload="), "inline handler");
        assert!(!lower.contains(" style="), "inline style");
        assert!(!lower.contains("<style"), "style element");
        for url in ["src=\"", "href=\""] {
            for (at, _) in lower.match_indices(url) {
                let rest = &lower[at + url.len()..];
                assert!(
                    rest.starts_with("/ui/") || rest.starts_with('#'),
                    "external resource: {:.60}",
                    rest
                );
            }
        }
    }
}
