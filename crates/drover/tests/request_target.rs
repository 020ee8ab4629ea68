//! Request targets: `*`, CONNECT, absolute-form, and the path policy (forwarded byte for
//! byte as it was matched; dot segments, encoded slashes and backslashes refused).

mod raw;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use raw::*;
use support::*;

const QUIET: Duration = Duration::from_millis(1500);

/// Two origins: `api` for host `api.test` and for the path prefix `/api`, `web` for the rest.
async fn setup() -> (Drover, Recorder, Recorder, SocketAddr) {
    let (api, web) = (Recorder::start().await, Recorder::start().await);
    let port = free_port();
    let cfg = format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
host = "api.test"
service = "api"

[[routes]]
listener = "web"
path_prefix = "/api"
service = "api"

[[routes]]
listener = "web"
service = "web"

[services.api]
endpoints = [ {{ address = "{}" }} ]

[services.web]
endpoints = [ {{ address = "{}" }} ]
"#,
        api.addr, web.addr
    );
    let d = Drover::start(&cfg).await;
    (d, api, web, format!("127.0.0.1:{port}").parse().unwrap())
}

async fn status_of(addr: SocketAddr, req: &str) -> u16 {
    send_raw(addr, req.as_bytes(), QUIET).await.status()
}

#[tokio::test]
async fn asterisk_form_is_for_options_only() {
    let (_d, api, web, addr) = setup().await;
    assert_eq!(
        status_of(addr, "GET * HTTP/1.1\r\nhost: www.test\r\n\r\n").await,
        400
    );
    assert_eq!(
        status_of(
            addr,
            "POST * HTTP/1.1\r\nhost: www.test\r\ncontent-length: 0\r\n\r\n"
        )
        .await,
        400
    );
    assert!(web.seen().is_empty() && api.seen().is_empty());
    // OPTIONS * goes where `/` goes for its host, as `*`.
    assert_eq!(
        status_of(addr, "OPTIONS * HTTP/1.1\r\nhost: www.test\r\n\r\n").await,
        200
    );
    let seen = web.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].target.as_str()),
        ("OPTIONS", "*")
    );
}

#[tokio::test]
async fn connect_gets_405_since_drover_is_no_forward_proxy() {
    let (_d, api, web, addr) = setup().await;
    for req in [
        "CONNECT api.test:443 HTTP/1.1\r\nhost: api.test:443\r\n\r\n",
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\nhost: 127.0.0.1:22\r\n\r\n",
    ] {
        let reply = send_raw(addr, req.as_bytes(), QUIET).await;
        assert_eq!(reply.status(), 405, "{}", reply.text());
    }
    assert!(web.seen().is_empty() && api.seen().is_empty());
}

/// RFC 9112 section 3.2.2: with an absolute-form target, its authority is the host, whatever
/// the Host header says; the origin gets origin-form and that host.
#[tokio::test]
async fn absolute_form_is_routed_by_its_authority() {
    let (_d, api, web, addr) = setup().await;
    assert_eq!(
        status_of(
            addr,
            "GET http://api.test/users?id=1 HTTP/1.1\r\nhost: www.test\r\n\r\n"
        )
        .await,
        200
    );
    assert!(web.seen().is_empty(), "{:?}", web.targets());
    let seen = api.seen();
    assert_eq!(seen[0].target, "/users?id=1");
    assert_eq!(seen[0].headers["host"], "api.test");
    // With a port and userinfo: the host is still the authority's.
    assert_eq!(
        status_of(
            addr,
            "GET http://user@api.test:8080/x HTTP/1.1\r\nhost: www.test\r\n\r\n"
        )
        .await,
        200
    );
    assert_eq!(api.seen()[1].headers["host"], "api.test:8080");
    // Schemes other than http and https are not ours.
    assert_eq!(
        status_of(
            addr,
            "GET ftp://api.test/x HTTP/1.1\r\nhost: api.test\r\n\r\n"
        )
        .await,
        400
    );
    assert_eq!(api.seen().len(), 2);
}

#[tokio::test]
async fn paths_with_dot_segments_or_encoded_separators_get_400() {
    let (_d, api, web, addr) = setup().await;
    for path in [
        "/web/../api/secret",
        "/..",
        "/a/.",
        "/a/./b",
        "/a/%2e%2e/b",
        "/a/%2E%2E/b",
        "/a/.%2e/b",
        "/a/%2e/b",
        "/api%2fsecret",
        "/api%2Fsecret",
        "/api%5csecret",
        "/api%5Csecret",
        "/api\\secret",
    ] {
        let reply = send_raw(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: www.test\r\n\r\n").as_bytes(),
            QUIET,
        )
        .await;
        assert_eq!(reply.status(), 400, "{path}: {}", reply.text());
    }
    assert!(web.seen().is_empty(), "{:?}", web.targets());
    assert!(api.seen().is_empty(), "{:?}", api.targets());
}

/// Everything else goes upstream byte for byte, and is matched on those same bytes: `//api`
/// does not start with `/api`, so it goes to `web`, as `//api`.
#[tokio::test]
async fn other_paths_are_forwarded_byte_for_byte_as_they_were_matched() {
    let (_d, api, web, addr) = setup().await;
    for (path, to_api) in [
        ("/api/x", true),
        ("/api/a%20b?q=%2F..", true),
        ("//api/x", false),
        ("/web//x///", false),
        ("/web/.hidden/...", false),
        ("/web/%41%42", false),
        ("/web/a;b=c", false),
    ] {
        let reply = send_raw(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: www.test\r\n\r\n").as_bytes(),
            QUIET,
        )
        .await;
        assert_eq!(reply.status(), 200, "{path}: {}", reply.text());
        let (hit, other) = if to_api { (&api, &web) } else { (&web, &api) };
        assert_eq!(hit.targets().last().map(String::as_str), Some(path));
        assert!(!other.targets().iter().any(|t| t == path), "{path}");
    }
}
