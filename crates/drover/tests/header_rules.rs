//! Header rules per route: set, add and remove request headers on their way upstream and
//! response headers on their way back (docker-loadbalancer's template deleted ETag).

mod support;

use support::*;

fn config(port: u16, origin: std::net::SocketAddr, cache: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
path_prefix = "/bare"
service = "web"

[[routes]]
listener = "web"
service = "web"
request_headers = {{ remove = ["X-Debug"], set = {{ "X-Env" = "prod", "Host" = "backend.internal" }}, add = {{ "X-Tag" = "drover" }} }}
response_headers = {{ remove = ["ETag"], set = {{ "Cache-Control" = "{cache}" }}, add = {{ "X-Served-By" = "drover" }} }}

[services.web]
endpoints = [ {{ address = "{origin}" }} ]
"#
    )
}

#[tokio::test]
async fn a_route_s_rules_change_request_and_response_headers() {
    let o = origins(&["a"]).await;
    let port = free_port();
    let d = Drover::start(&config(port, o[0].addr, "no-store")).await;
    let c = client();
    let send = |path: &str| {
        let req = http::Request::get(format!("http://127.0.0.1:{port}{path}"))
            .header("x-debug", "1")
            .header("x-tag", "client")
            .header("x-env", "dev")
            .body(empty())
            .unwrap();
        send(&c, req)
    };
    let (status, headers, body) = send("/page?etag=%22v1%22&cache=max-age%3D60")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let seen = String::from_utf8_lossy(&body).to_ascii_lowercase();
    // The echo origin lists the request headers it received.
    assert!(!seen.contains("x-debug:"), "removed: {seen}");
    assert!(
        seen.contains("x-env: prod") && !seen.contains("x-env: dev"),
        "set replaces: {seen}"
    );
    assert!(
        seen.contains("x-tag: client") && seen.contains("x-tag: drover"),
        "add keeps: {seen}"
    );
    assert!(seen.contains("host: backend.internal"), "{seen}");
    assert!(headers.get("etag").is_none(), "the seed's rspdel ETag");
    assert_eq!(headers.get_all("cache-control").iter().count(), 1);
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-served-by"], "drover");

    // Another route of the same listener has no rules.
    let (_, headers, body) = send("/bare/page?etag=%22v1%22").await.unwrap();
    assert!(
        String::from_utf8_lossy(&body)
            .to_ascii_lowercase()
            .contains("x-debug: 1")
    );
    assert_eq!(headers["etag"], "\"v1\"");
    assert!(headers.get("x-served-by").is_none());

    // Rules change live with the file.
    d.write_config(&config(port, o[0].addr, "private"));
    d.wait_generation(2).await;
    let (_, headers, _) = send("/page").await.unwrap();
    assert_eq!(headers["cache-control"], "private");
}

#[test]
fn rules_on_framing_headers_are_refused_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drover.toml");
    let text = config(8080, "127.0.0.1:9000".parse().unwrap(), "no-store")
        .replace("\"X-Debug\"", "\"Content-Length\"");
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["check", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes[1].request_headers.remove[0]: Content-Length frames the message"),
        "{err}"
    );
}
