mod support;

// `drover ctl` against a real drover: the binary is run as an operator would run it, and what
// it changes is checked in the traffic through the proxy's listener.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use support::*;

/// What one run of `drover ctl` did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts the run succeeded with nothing on stderr; its stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "{self:#?}");
        assert_eq!(self.stderr, "", "{self:#?}");
        &self.stdout
    }

    /// Asserts the run failed with exit code 1 and one message on stderr; the message.
    fn failed(&self) -> &str {
        assert_eq!(self.code, Some(1), "{self:#?}");
        assert!(self.stderr.starts_with("drover ctl: "), "{self:#?}");
        &self.stderr
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// Runs `drover ctl ARGS` with `env` as extra environment (DROVER_ADMIN_TOKEN is removed
/// unless given), off the test's async threads.
async fn ctl_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_drover"))
            .arg("ctl")
            .args(&args)
            .env_remove("DROVER_ADMIN_TOKEN")
            .envs(env)
            .output()
            .unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    })
    .await
    .unwrap()
}

/// Runs `drover ctl --admin http://ADMIN ARGS`.
async fn ctl(admin: SocketAddr, args: &[&str]) -> Run {
    let url = format!("http://{admin}");
    let all: Vec<&str> = ["--admin", url.as_str()]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    ctl_env(&all, &[]).await
}

/// GETs `url` until `want(status)` holds (changes apply shortly after the API answers); the
/// last answer.
async fn get_until(
    url: &str,
    want: impl Fn(StatusCode) -> bool,
) -> (StatusCode, http::HeaderMap, bytes::Bytes) {
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = get(&client, url).await;
        if want(answer.0) || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The numbers on the line of `stats` output that starts with `side`: (success, failed).
fn stats_line(stdout: &str, side: &str) -> (u64, u64) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(side))
        .unwrap_or_else(|| panic!("no {side} line in {stdout:?}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.len(), 5, "{line:?}");
    assert_eq!((words[1], words[3]), ("success", "failed"), "{line:?}");
    (words[2].parse().unwrap(), words[4].parse().unwrap())
}

async fn embedded_default() -> (Drover, u16) {
    let port = free_port();
    let d = Drover::start_args(&["--listen", &format!("127.0.0.1:{port}")]).await;
    (d, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_drained_enabled_and_removed_with_ctl() {
    let (d, port) = embedded_default().await;
    let origin = Origin::start("a").await;
    let addr = origin.addr.to_string();
    let url = format!("http://127.0.0.1:{port}/hello");

    assert_eq!(
        ctl(d.admin, &["servers", "list"]).await.ok(),
        "no servers in service default\n"
    );

    let added = ctl(d.admin, &["servers", "add", &format!("http://{addr}")]).await;
    assert_eq!(added.ok(), format!("added {addr} to default\n"));
    let again = ctl(d.admin, &["servers", "add", &format!("http://{addr}")]).await;
    assert_eq!(again.ok(), format!("{addr} was already in default\n"));

    let list = ctl(d.admin, &["servers", "list"]).await;
    let lines: Vec<&str> = list.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{list:#?}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["URL", "WEIGHT", "STATE"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        [format!("http://{addr}").as_str(), "1", "enabled"]
    );

    let (status, headers, _) = get_until(&url, |s| s == StatusCode::OK).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(origin_of(&headers), "a");

    // Drained: no new requests go to it, and the service shows it so.
    let drained = ctl(d.admin, &["endpoint", "drain", "default", &addr]).await;
    assert_eq!(drained.ok(), format!("draining {addr} in default\n"));
    let show = ctl(d.admin, &["services", "show", "default"]).await;
    let text = show.ok();
    assert!(text.starts_with("service default  "), "{text}");
    let header = text.lines().nth(1).unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "ADDRESS",
            "WEIGHT",
            "STATE",
            "SOURCE",
            "IN-FLIGHT",
            "RESPONSES",
            "FAILURES"
        ]
    );
    let row: Vec<&str> = text.lines().nth(2).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], [addr.as_str(), "1", "drain", "api"], "{text}");
    let (status, _, _) = get_until(&url, |s| s != StatusCode::OK).await;
    assert_ne!(status, StatusCode::OK, "a drained endpoint took a request");

    let enabled = ctl(d.admin, &["endpoint", "enable", "default", &addr]).await;
    assert_eq!(enabled.ok(), format!("enabled {addr} in default\n"));
    let (status, headers, _) = get_until(&url, |s| s == StatusCode::OK).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(origin_of(&headers), "a");

    let weighted = ctl(d.admin, &["endpoint", "weight", "default", &addr, "5"]).await;
    assert_eq!(
        weighted.ok(),
        format!("set the weight of {addr} in default to 5\n")
    );
    let servers = ctl(d.admin, &["--json", "servers", "list"]).await;
    servers.ok();
    let servers = servers.json();
    assert_eq!(servers.as_array().unwrap().len(), 1, "{servers}");
    assert_eq!(servers[0]["url"], format!("http://{addr}"));
    assert_eq!(servers[0]["weight"], 5);
    assert_eq!(servers[0]["state"], "enabled");

    let services = ctl(d.admin, &["services", "list"]).await;
    let text = services.ok();
    assert_eq!(
        text.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["NAME", "SOURCE", "POLICY", "ENDPOINTS"]
    );
    let default: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("default "))
        .unwrap_or_else(|| panic!("no service default in {text}"))
        .split_whitespace()
        .collect();
    assert_eq!(default.last(), Some(&"1"), "{text}");

    // Counters: requests went through, and the drained one was answered by drover itself.
    let stats = ctl(d.admin, &["stats"]).await;
    let text = stats.ok();
    assert_eq!(text.lines().count(), 2, "{text}");
    let (client_ok, client_failed) = stats_line(text, "client");
    let (server_ok, _) = stats_line(text, "server");
    assert!(client_ok >= 2 && server_ok >= 2, "{text}");
    assert!(client_failed >= 1, "{text}");
    let json = ctl(d.admin, &["stats", "--json"]).await;
    json.ok();
    let json = json.json();
    assert!(
        json["client"]["success"].as_u64().unwrap() >= client_ok,
        "{json}"
    );
    let detail = ctl(d.admin, &["stats", "--detail"]).await;
    let text = detail.ok();
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.contains(&addr))
        .unwrap_or_else(|| panic!("no {addr} in {text}"))
        .split_whitespace()
        .collect();
    assert_eq!(&row[..2], ["default", addr.as_str()], "{text}");
    assert!(row[2].parse::<u64>().unwrap() >= 2, "{text}");

    let removed = ctl(
        d.admin,
        &[
            "servers",
            "remove",
            "127.0.0.1",
            &origin.addr.port().to_string(),
        ],
    )
    .await;
    assert_eq!(removed.ok(), format!("removed {addr} from default\n"));
    assert_eq!(
        ctl(d.admin, &["servers", "list"]).await.ok(),
        "no servers in service default\n"
    );
    let (status, _, _) = get_until(&url, |s| s != StatusCode::OK).await;
    assert_ne!(status, StatusCode::OK, "a removed endpoint took a request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_reported_on_stderr_with_exit_code_1() {
    let (d, _) = embedded_default().await;

    let unknown = ctl(d.admin, &["servers", "remove", "127.0.0.1", "1"]).await;
    assert!(
        unknown.failed().starts_with("drover ctl: 404 "),
        "{unknown:#?}"
    );
    assert_eq!(unknown.stdout, "");
    assert_eq!(unknown.stderr.lines().count(), 1, "{unknown:#?}");

    // The IPv6 address reaches the API as one path segment: not found, rather than a bad path.
    let v6 = ctl(d.admin, &["endpoint", "drain", "default", "[::1]:1"]).await;
    assert!(v6.failed().starts_with("drover ctl: 404 "), "{v6:#?}");

    let service = ctl(d.admin, &["services", "show", "nosuch"]).await;
    assert!(
        service.failed().starts_with("drover ctl: 404 "),
        "{service:#?}"
    );

    let bad_url = ctl(d.admin, &["servers", "add", "ftp://127.0.0.1:1"]).await;
    assert!(
        bad_url.failed().starts_with("drover ctl: 400 "),
        "{bad_url:#?}"
    );

    let origin = Origin::start("a").await;
    let addr = origin.addr.to_string();
    ctl(d.admin, &["servers", "add", &format!("http://{addr}")])
        .await
        .ok();
    let zero = ctl(d.admin, &["endpoint", "weight", "default", &addr, "0"]).await;
    assert!(zero.failed().starts_with("drover ctl: 422 "), "{zero:#?}");

    // With --json the error body is on stdout too, for scripts.
    let json = ctl(d.admin, &["--json", "services", "show", "nosuch"]).await;
    json.failed();
    assert!(json.json()["error"].is_string(), "{json:#?}");

    // Usage errors are clap's, exit code 2.
    let usage = ctl(d.admin, &["endpoint", "weight", "default", &addr, "many"]).await;
    assert_eq!(usage.code, Some(2), "{usage:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_address_where_nothing_listens_is_named() {
    let port = free_port();
    let run = ctl_env(
        &["--admin", &format!("127.0.0.1:{port}"), "services", "list"],
        &[],
    )
    .await;
    let message = run.failed();
    assert!(
        message.contains(&format!(
            "cannot reach the admin API at http://127.0.0.1:{port}"
        )),
        "{run:#?}"
    );
    assert!(message.contains("--admin"), "{run:#?}");
    assert_eq!(run.stdout, "");

    let bad = ctl_env(&["--admin", "https://127.0.0.1:1", "stats"], &[]).await;
    assert!(bad.failed().contains("plain http"), "{bad:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_address_may_be_given_without_scheme() {
    let (d, _) = embedded_default().await;
    let run = ctl_env(
        &[
            "--admin",
            &d.admin.to_string(),
            "--json",
            "services",
            "list",
        ],
        &[],
    )
    .await;
    run.ok();
    let services = run.json();
    let names: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"default"), "{services}");
    // As it came: the API's text re-indented (same keys in the same order, same numbers).
    let (_, _, body) = get(&client(), &format!("http://{}/api/v1/services", d.admin)).await;
    let squeeze = |t: &[u8]| -> Vec<u8> {
        t.iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect()
    };
    assert_eq!(
        String::from_utf8(squeeze(run.stdout.as_bytes())).unwrap(),
        String::from_utf8(squeeze(&body)).unwrap()
    );
    assert!(run.stdout.starts_with("[\n  {\n    \""), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_sent_from_the_option_or_the_environment() {
    let d = Drover::start_args(&[
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--admin-token",
        "s3cret",
    ])
    .await;
    let admin = format!("http://{}", d.admin);

    let without = ctl(d.admin, &["services", "list"]).await;
    let message = without.failed();
    assert!(message.starts_with("drover ctl: 401 "), "{without:#?}");
    assert!(message.contains("DROVER_ADMIN_TOKEN"), "{without:#?}");

    let wrong = ctl(d.admin, &["--token", "nope", "services", "list"]).await;
    assert!(wrong.failed().starts_with("drover ctl: 401 "), "{wrong:#?}");
    assert_eq!(
        wrong.stderr.lines().count(),
        1,
        "no hint when a token was given"
    );

    let with = ctl(d.admin, &["--token", "s3cret", "services", "list"]).await;
    assert!(with.ok().starts_with("NAME "), "{with:#?}");

    let env = ctl_env(
        &["--admin", &admin, "stats"],
        &[("DROVER_ADMIN_TOKEN", "s3cret")],
    )
    .await;
    assert!(env.ok().starts_with("client "), "{env:#?}");
}
