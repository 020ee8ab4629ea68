//! The management API against a real drover: weldr's calls as its README makes them (with
//! curl), persistence across SIGKILL, bad input on every route, drain on removal, and the
//! access rules.

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};
use support::*;

/// A bad request and what it must get: method, path, body, status, field named, words in
/// the error.
type BadCase<'a> = (&'a str, String, &'a str, u16, Option<&'a str>, &'a str);

/// Runs curl as a weldr user would; returns (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed (scripts/test.sh installs it)");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

async fn default_drover() -> (Drover, u16) {
    let port = free_port();
    let d = Drover::start_args(&["--listen", &format!("127.0.0.1:{port}")]).await;
    (d, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weldr_calls_as_its_readme_makes_them_start_and_stop_traffic() {
    let origin = Origin::start("test-server").await;
    let (d, port) = default_drover().await;
    let admin = d.admin.to_string();
    let client = client();
    let front = format!("http://127.0.0.1:{port}/");

    let (status, _, _) = get(&client, &front).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no server in the pool yet"
    );

    // curl localhost:8687/servers -d '{"url":"http://127.0.0.1:12345"}'
    let body = format!(r#"{{"url":"http://{}"}}"#, origin.addr);
    let (code, text) = curl(&[&format!("{admin}/servers"), "-d", &body]);
    assert_eq!(code, 201, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v,
        json!({"service": "default", "address": origin.addr.to_string(), "added": true})
    );
    let (code, _) = curl(&[&format!("{admin}/servers"), "-d", &body]);
    assert_eq!(code, 200, "adding it again is not an error");

    for _ in 0..5 {
        let (status, headers, _) = get(&client, &front).await;
        assert_eq!(
            (status, origin_of(&headers)),
            (StatusCode::OK, "test-server".into())
        );
    }
    // curl localhost:8687/stats and /stats/detail
    let (code, text) = curl(&[&format!("{admin}/stats")]);
    assert_eq!(code, 200);
    let stats: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        stats["client"],
        json!({"success": 5, "failed": 1}),
        "{stats}"
    );
    assert_eq!(
        stats["server"],
        json!({"success": 5, "failed": 0}),
        "{stats}"
    );
    let (_, text) = curl(&[&format!("{admin}/stats/detail")]);
    let detail: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        detail,
        json!([{
            "id": format!("default/{}", origin.addr),
            "service": "default",
            "ip": "127.0.0.1",
            "port": origin.addr.port().to_string(),
            "success": 5,
            "failed": 0,
        }])
    );

    // curl -X DELETE localhost:8687/servers/127.0.0.1/12345
    let (code, text) = curl(&[
        "-X",
        "DELETE",
        &format!("{admin}/servers/127.0.0.1/{}", origin.addr.port()),
    ]);
    assert_eq!(code, 200, "{text}");
    let (status, _, _) = get(&client, &front).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "traffic stopped reaching the origin"
    );
    let (code, text) = curl(&[
        "-X",
        "DELETE",
        &format!("{admin}/servers/127.0.0.1/{}", origin.addr.port()),
    ]);
    assert_eq!(code, 404, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_endpoints_added_through_the_api_survive_sigkill() {
    let mut origins = Vec::new();
    for i in 0..50 {
        origins.push(Origin::start(&format!("o{i}")).await);
    }
    let (mut d, port) = default_drover().await;
    for o in &origins {
        let (status, body) = d
            .api(
                "POST",
                "/servers",
                Some(&format!(r#"{{"url":"http://{}"}}"#, o.addr)),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    d.kill_and_restart().await;

    let client = client();
    let mut seen = HashSet::new();
    for _ in 0..100 {
        let (status, headers, _) = get(&client, &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(status, StatusCode::OK);
        seen.insert(origin_of(&headers));
    }
    assert_eq!(
        seen.len(),
        50,
        "after the restart, every endpoint serves: {seen:?}"
    );
    assert!(d.log_text().contains("startup (saved API state)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_stops_start_up_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("api-state.json");
    std::fs::write(&state, "{\"version\": 1, \"services\": {").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin",
        ])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the API state file {} is corrupt",
            state.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "{\"version\": 1, \"services\": {",
        "left as it was"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_every_route_gets_its_error_and_changes_nothing() {
    let origin = Origin::start("o").await;
    let port = free_port();
    let d = Drover::start(&one_service(port, &[(origin.addr, 1)])).await;
    let ep = origin.addr.to_string();
    let (_, before) = d.api("GET", "/api/v1/config", None).await;
    let state_file = d.dir.path().join("data/api-state.json");

    let existing = format!(r#"{{"address":"{ep}"}}"#);
    // (method, path, body, status, field, words in the error)
    #[rustfmt::skip]
    let cases: Vec<BadCase> = vec![
        ("POST", "/servers".into(), "", 400, None, "needs a JSON body"),
        ("POST", "/servers".into(), "{", 400, None, "invalid JSON"),
        ("POST", "/servers".into(), "{\"url\":", 400, Some("url"), "invalid JSON"),
        ("POST", "/servers".into(), r#"{"url":5}"#, 400, Some("url"), "invalid type"),
        ("POST", "/servers".into(), r#"{"url":"http://1.2.3.4","health":1}"#, 400, Some("health"), "unknown field"),
        ("POST", "/servers".into(), r#"{"url":"http://example.com"}"#, 400, Some("url"), "must be an IP"),
        ("POST", "/servers".into(), r#"{"url":"http://127.0.0.1:1"}"#, 404, None, "no service named \"default\""),
        ("DELETE", "/servers/nope/80".into(), "", 400, None, "not an IP address"),
        ("DELETE", "/servers/127.0.0.1/70000".into(), "", 400, None, "not a port"),
        ("DELETE", "/servers/127.0.0.1/1".into(), "", 404, None, "no service named"),
        ("GET", "/api/v1/services/nope".into(), "", 404, None, "no service named"),
        ("PUT", "/api/v1/services/web".into(), "{}", 409, None, "can only be changed there"),
        ("PUT", "/api/v1/services/new".into(), r#"{"policy":"fastest"}"#, 400, Some("policy"), "unknown variant"),
        ("PUT", "/api/v1/services/new".into(), r#"{"connect_timeout":5}"#, 400, Some("connect_timeout"), "invalid type"),
        ("PUT", "/api/v1/services/new".into(), r#"{"endpoints":[{"address":"127.0.0.1:1","weight":0}]}"#, 422, Some("weight"), "out of range"),
        ("PUT", "/api/v1/services/bad%20name".into(), "{}", 422, Some("name"), "invalid name"),
        ("DELETE", "/api/v1/services/web".into(), "", 409, None, "can only be deleted there"),
        ("DELETE", "/api/v1/services/nope".into(), "", 404, None, "no service named"),
        ("POST", "/api/v1/services/web/endpoints".into(), &existing, 409, Some("address"), "already"),
        ("POST", "/api/v1/services/web/endpoints".into(), r#"{"address":"127.0.0.1"}"#, 400, Some("address"), "expected IP:PORT"),
        ("POST", "/api/v1/services/web/endpoints".into(), r#"{"address":"127.0.0.1:2","weight":257}"#, 422, Some("weight"), "out of range"),
        ("POST", "/api/v1/services/web/endpoints".into(), r#"{"address":"127.0.0.1:2","weight":"heavy"}"#, 400, Some("weight"), "invalid type"),
        ("POST", "/api/v1/services/nope/endpoints".into(), r#"{"address":"127.0.0.1:2"}"#, 404, None, "no service named"),
        ("PATCH", format!("/api/v1/services/web/endpoints/{ep}"), "{}", 422, None, "nothing to change"),
        ("PATCH", format!("/api/v1/services/web/endpoints/{ep}"), r#"{"state":"asleep"}"#, 400, Some("state"), "unknown variant"),
        ("PATCH", format!("/api/v1/services/web/endpoints/{ep}"), r#"{"weight":-1}"#, 400, Some("weight"), "invalid value"),
        ("PATCH", "/api/v1/services/web/endpoints/127.0.0.1:2".into(), r#"{"weight":2}"#, 404, None, "has no endpoint"),
        ("PATCH", "/api/v1/services/web/endpoints/nowhere".into(), r#"{"weight":2}"#, 400, Some("address"), "invalid address"),
        ("DELETE", format!("/api/v1/services/web/endpoints/{ep}"), "", 409, None, "drain or disable it instead"),
        ("DELETE", "/api/v1/services/web/endpoints/127.0.0.1:2".into(), "", 404, None, "has no endpoint"),
        ("POST", "/api/v1/routes".into(), r#"{"listener":"web","service":"nope"}"#, 422, None, "no service named \"nope\""),
        ("POST", "/api/v1/routes".into(), r#"{"listener":"web","service":"web"}"#, 422, None, "already matches"),
        ("POST", "/api/v1/routes".into(), r#"{"listener":"web"}"#, 400, None, "missing field `service`"),
        ("DELETE", "/api/v1/routes".into(), "", 400, Some("listener"), "say which route"),
        ("DELETE", "/api/v1/routes?listener=web&color=red".into(), "", 400, Some("color"), "unknown query parameter"),
        ("DELETE", "/api/v1/routes?listener=web".into(), "", 409, None, "another source"),
        ("DELETE", "/api/v1/routes?listener=nope".into(), "", 404, None, "no such route"),
        ("POST", "/stats".into(), "", 405, None, "use GET"),
        ("GET", "/nope".into(), "", 404, None, "no such admin path"),
    ];
    for (method, path, body, status, field, words) in &cases {
        let (got, v) = d.api(method, path, Some(body)).await;
        let what = format!("{method} {path} {body}");
        assert_eq!(got.as_u16(), *status, "{what}: {v}");
        let message = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error in {v}"));
        assert!(message.contains(words), "{what}: {message}");
        assert_eq!(v["field"].as_str(), *field, "{what}: {v}");
    }
    let (_, after) = d.api("GET", "/api/v1/config", None).await;
    assert_eq!(before, after, "nothing changed");
    assert!(!state_file.exists(), "nothing was saved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_endpoint_lets_its_slow_request_finish() {
    let origin = Origin::start("slow").await;
    let (d, port) = default_drover().await;
    let (status, _) = d
        .api(
            "POST",
            "/servers",
            Some(&format!(r#"{{"url":"http://{}"}}"#, origin.addr)),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let url = format!("http://127.0.0.1:{port}/slow?ms=1500");
    let slow = tokio::spawn(async move { try_get(&client(), &url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, servers) = d.api("GET", "/api/v1/services/default", None).await;
    assert_eq!(servers["endpoints"][0]["in_flight"], 1, "{servers}");

    let path = format!("/servers/127.0.0.1/{}", origin.addr.port());
    let (status, _) = d.api("DELETE", &path, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get(&client(), &format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no new request goes to it"
    );
    let (status, _, body) = slow
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with(b"slow\nslept 1500 ms"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_file_endpoint_stays_drained_across_file_changes_until_enabled() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    let d = Drover::start(&one_service(port, &[(a.addr, 1), (b.addr, 1)])).await;
    let client = client();
    let front = format!("http://127.0.0.1:{port}/");
    let path = format!("/api/v1/services/web/endpoints/{}", a.addr);
    let (status, v) = d.api("PATCH", &path, Some(r#"{"state":"drain"}"#)).await;
    assert_eq!(
        (status, v["state"].as_str()),
        (StatusCode::OK, Some("drain")),
        "{v}"
    );
    for _ in 0..6 {
        let (_, headers, _) = get(&client, &front).await;
        assert_eq!(origin_of(&headers), "b");
    }
    // The file changes (weights) but still lists a: a stays drained.
    let generation = d.generation().await;
    d.write_config(&one_service(port, &[(a.addr, 2), (b.addr, 3)]));
    d.wait_generation(generation + 1).await;
    for _ in 0..6 {
        let (_, headers, _) = get(&client, &front).await;
        assert_eq!(origin_of(&headers), "b");
    }
    let (_, v) = d.api("PATCH", &path, Some(r#"{"state":"enabled"}"#)).await;
    assert_eq!(v["state"], "enabled");
    let mut seen = HashSet::new();
    for _ in 0..10 {
        let (_, headers, _) = get(&client, &front).await;
        seen.insert(origin_of(&headers));
    }
    assert_eq!(seen.len(), 2, "a is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_routes_made_through_the_api_take_traffic() {
    let origin = Origin::start("made").await;
    let port = free_port();
    let other = Origin::start("other").await;
    let d = Drover::start(&one_service(port, &[(other.addr, 1)])).await;
    let body = format!(
        r#"{{"endpoints":[{{"address":"{}","weight":2}}],"response_timeout":"2s"}}"#,
        origin.addr
    );
    let (status, v) = d.api("PUT", "/api/v1/services/made", Some(&body)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["source"].as_str(), v["response_timeout"].as_str()),
        (Some("api"), Some("2s"))
    );
    let (status, v) = d
        .api(
            "POST",
            "/api/v1/routes",
            Some(r#"{"listener":"web","path_prefix":"/made","service":"made"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, headers, _) = get(&client(), &format!("http://127.0.0.1:{port}/made/x")).await;
    assert_eq!(origin_of(&headers), "made");

    let (_, config) = d.api("GET", "/api/v1/config", None).await;
    assert_eq!(config["sources"]["services"]["made"], "api");
    assert!(
        config["sources"]["services"]["web"]
            .as_str()
            .unwrap()
            .starts_with("file:")
    );

    // A service a route still uses cannot go; once the route is gone it can.
    let (status, v) = d.api("DELETE", "/api/v1/services/made", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (status, _) = d
        .api(
            "DELETE",
            "/api/v1/routes?listener=web&path_prefix=%2Fmade",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = d.api("DELETE", "/api/v1/services/made", None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, headers, _) = get(&client(), &format!("http://127.0.0.1:{port}/made/x")).await;
    assert_eq!(origin_of(&headers), "other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_tells_each_change_with_its_source() {
    let origin = Origin::start("o").await;
    let (d, _) = default_drover().await;
    let stream = tokio::net::TcpStream::connect(d.admin).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/api/v1/events")
        .header("host", d.admin.to_string())
        .body(empty())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let mut text = String::new();
    let mut next = async || {
        let frame = tokio::time::timeout(
            Duration::from_secs(5),
            http_body_util::BodyExt::frame(&mut body),
        )
        .await
        .expect("an event within 5 s")
        .unwrap()
        .unwrap();
        String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
    };
    text.push_str(&next().await);
    assert!(
        text.starts_with("event: hello\ndata: {\"generation\":1}"),
        "{text}"
    );
    d.api(
        "POST",
        "/servers",
        Some(&format!(r#"{{"url":"http://{}"}}"#, origin.addr)),
    )
    .await;
    let event = next().await;
    let data: Value =
        serde_json::from_str(event.strip_prefix("event: change\ndata: ").unwrap().trim()).unwrap();
    assert_eq!(data["source"], "api");
    assert_eq!(data["reason"], "POST /servers");
    assert_eq!(data["generation"], 2);
    assert_eq!(data["changes"][0]["kind"], "endpoint_added");
    assert_eq!(data["changes"][0]["address"], origin.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_and_origin_rules_hold() {
    let port = free_port();
    let d = Drover::start_args(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin-token",
        "s3cret",
    ])
    .await;
    let url = format!("http://{}/api/v1/status", d.admin);
    let no_token = send(&client(), http::Request::get(&url).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(no_token.0, StatusCode::UNAUTHORIZED);
    assert_eq!(no_token.1["www-authenticate"], "Bearer");
    let wrong = http::Request::get(&url)
        .header("authorization", "Bearer s3creT")
        .body(empty())
        .unwrap();
    assert_eq!(
        send(&client(), wrong).await.unwrap().0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _) = d.api("GET", "/api/v1/status", None).await;
    assert_eq!(status, StatusCode::OK);
    let health = get(&client(), &format!("http://{}/healthz", d.admin)).await;
    assert_eq!(health.0, StatusCode::OK, "liveness needs no token");

    // A page of another origin cannot make a change, even with the token.
    let (_, before) = d.api("GET", "/api/v1/config", None).await;
    let cross = http::Request::post(format!("http://{}/servers", d.admin))
        .header("authorization", "Bearer s3cret")
        .header("origin", "http://evil.example")
        .body(full(r#"{"url":"http://127.0.0.1:1"}"#))
        .unwrap();
    let (status, _, body) = send(&client(), cross).await.unwrap();
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (_, after) = d.api("GET", "/api/v1/config", None).await;
    assert_eq!(before, after);

    // Bound beyond loopback without a token, drover refuses to start and says why.
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin",
            "0.0.0.0:0",
        ])
        .env_remove("DROVER_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("would be reachable from other hosts without a token; set --admin-token"),
        "{stderr}"
    );
}
