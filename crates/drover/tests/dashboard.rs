//! The dashboard in a real headless Chromium, driven over WebDriver (chromedriver): what a
//! person sees when they open the admin listener in a browser. Each test saves a screenshot
//! under `target/test-artifacts/dashboard/`.

mod support;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use support::*;

/// How long the page may take to show what a person would wait a few seconds for.
const WITHIN: Duration = Duration::from_secs(10);

/// A chromedriver and the Chromium it starts, in a process group of their own, with a fresh
/// profile. Dropping it kills the whole group, so that a failed test leaves no browser behind.
struct Browser {
    client: Option<Client>,
    driver: Child,
    port: u16,
    name: &'static str,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session. `name` names the screenshots.
    async fn start(name: &'static str) -> Browser {
        let port = free_port();
        let profile = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).unwrap();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .expect("chromedriver runs (Debian: apt-get install chromium-driver)");
        let mut browser = Browser {
            client: None,
            driver,
            port,
            name,
            _profile: profile,
        };
        browser.wait_driver().await;
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1440,1000",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let caps = json!({
            "goog:chromeOptions": {"args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session starts");
        browser.client = Some(client);
        browser
    }

    async fn wait_driver(&mut self) {
        let deadline = Instant::now() + WITHIN;
        let url = format!("http://127.0.0.1:{}/status", self.port);
        loop {
            if let Ok((status, _, body)) = try_get(&client(), &url).await
                && status.is_success()
                && serde_json::from_slice::<Value>(&body).is_ok_and(|v| v["value"]["ready"] == true)
            {
                return;
            }
            if let Some(status) = self.driver.try_wait().unwrap() {
                panic!("chromedriver exited with {status}");
            }
            assert!(Instant::now() < deadline, "chromedriver never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    async fn open(&self, drover: &Drover) {
        self.client()
            .goto(&format!("http://{}/", drover.admin))
            .await
            .unwrap();
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    async fn js(&self, script: &str) -> Value {
        self.client()
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` until it returns something other than null or false, and returns that.
    /// Past the deadline, saves a screenshot and fails with what the page shows.
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + WITHIN;
        loop {
            let v = self.js(script).await;
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            if Instant::now() > deadline {
                self.screenshot("failure").await;
                let text = self.js("return document.body.innerText").await;
                panic!(
                    "the page never showed {what} within {WITHIN:?}\n--- page text:\n{}\n--- browser log:\n{:#?}",
                    text.as_str().unwrap_or_default(),
                    self.log().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The browser's console and network log so far (chromedriver's `se/log`), each entry with
    /// its `level`, `source` and `message`. Reading it empties it.
    async fn log(&self) -> Vec<Value> {
        let session = self.client().session_id().await.unwrap().unwrap();
        let req = Request::post(format!(
            "http://127.0.0.1:{}/session/{session}/se/log",
            self.port
        ))
        .header("content-type", "application/json")
        .body(full(r#"{"type":"browser"}"#))
        .unwrap();
        let (status, _, body) = send(&client(), req).await.unwrap();
        assert!(status.is_success(), "se/log: {status}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["value"].as_array().cloned().unwrap_or_default()
    }

    /// The errors in the log: failed loads, uncaught exceptions, console.error.
    async fn errors(&self) -> Vec<Value> {
        self.log()
            .await
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .collect()
    }

    /// Saves a screenshot as `target/test-artifacts/dashboard/<name>[-<suffix>].png`.
    async fn screenshot(&self, suffix: &str) -> PathBuf {
        let png = self.client().screenshot().await.unwrap();
        let dir = artifacts();
        std::fs::create_dir_all(&dir).unwrap();
        let file = if suffix.is_empty() {
            format!("{}.png", self.name)
        } else {
            format!("{}-{suffix}.png", self.name)
        };
        let path = dir.join(file);
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Ends the session, which closes Chromium, then stops chromedriver.
    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver, Chromium and its helpers.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn artifacts() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts/dashboard")
}

/// A config with the listener `web` on `port` routing to service `web` over `endpoints`,
/// checked actively every 200 ms.
fn checked_service(port: u16, endpoints: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
service = "web"

[services.web]
endpoints = [ {} ]

[services.web.health_check]
path = "/"
interval = "200ms"
timeout = "500ms"
fall = 2
rise = 1
"#,
        endpoints.join(", ")
    )
}

/// A script that returns the endpoint rows of service `web` as {address: health}, or null
/// while there are not `n` of them.
fn rows_script(n: usize) -> String {
    format!(
        r#"const rows = [...document.querySelectorAll('[data-service="web"] tr[data-endpoint]')];
        if (rows.length !== {n}) return null;
        return Object.fromEntries(rows.map(r => [r.dataset.endpoint, r.dataset.health]));"#
    )
}

fn row_script(address: SocketAddr, body: &str) -> String {
    format!(
        r#"const row = document.querySelector('tr[data-endpoint="{address}"]');
        if (!row) return null;
        {body}"#
    )
}

const STREAM_LIVE: &str =
    "return document.querySelector('#stream').dataset.state === 'live' || null";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_lists_listeners_services_and_endpoints_with_their_rates_and_no_errors() {
    let origins = origins(&["one", "two"]).await;
    let port = free_port();
    let config = one_service(port, &[(origins[0].addr, 2), (origins[1].addr, 1)]);
    let drover = Drover::start(&config).await;
    let browser = Browser::start("page-loads").await;
    browser.open(&drover).await;

    // Both endpoints, healthy (no active check: up until proven otherwise).
    let rows = browser.wait_for("two endpoint rows", &rows_script(2)).await;
    assert_eq!(
        rows,
        json!({origins[0].addr.to_string(): "up", origins[1].addr.to_string(): "up"})
    );
    let text = browser.js("return document.body.innerText").await;
    let text = text.as_str().unwrap();
    for o in &origins {
        assert!(text.contains(&o.addr.to_string()), "{text}");
    }
    // The listener, its address and its route.
    let listener = browser
        .js(r#"const r = document.querySelector('tr[data-listener="web"]'); return r && r.innerText"#)
        .await;
    let listener = listener.as_str().unwrap_or_default();
    assert!(
        listener.contains(&format!("127.0.0.1:{port}")),
        "{listener}"
    );
    assert!(listener.contains("→ web"), "{listener}");
    // The weight and the policy.
    let weight = browser
        .js(&row_script(
            origins[0].addr,
            "return row.querySelector('[data-field=weight]').innerText",
        ))
        .await;
    assert!(weight.as_str().unwrap().starts_with('2'), "{weight}");
    let chips = browser
        .js("return document.querySelector('[data-service=web] .chips').innerText")
        .await;
    assert!(chips.as_str().unwrap().contains("round_robin"), "{chips}");
    browser
        .wait_for("the change stream connected", STREAM_LIVE)
        .await;

    // Traffic through the listener shows up as a request rate on the endpoints' charts.
    let traffic = tokio::spawn(async move {
        let c = client();
        let deadline = Instant::now() + WITHIN;
        while Instant::now() < deadline {
            let _ = try_get(&c, &format!("http://127.0.0.1:{port}/")).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let rate = browser
        .wait_for(
            "a request rate on the first endpoint",
            &row_script(
                origins[0].addr,
                r#"const cell = row.querySelector('[data-field=requests]');
                const rate = parseFloat(cell.querySelector('.rate').innerText);
                const line = cell.querySelector('svg .line').getAttribute('d');
                return rate > 0 && line.includes('L') ? rate : null;"#,
            ),
        )
        .await;
    assert!(rate.as_f64().unwrap() > 0.0);
    let total = browser
        .js("return parseFloat(document.querySelector('#tile-rate').innerText)")
        .await;
    assert!(total.as_f64().unwrap() > 0.0, "{total}");

    // The second origin answers 500 from now on: its error rate shows, the first's does not.
    origins[1].state.fail_with(500);
    let share = browser
        .wait_for(
            "an error rate on the failing endpoint",
            &row_script(
                origins[1].addr,
                r#"const cell = row.querySelector('[data-field=errors]');
                const share = parseFloat(cell.querySelector('.sub').innerText);
                const line = cell.querySelector('svg .line').getAttribute('d');
                return share > 0 && line.includes('L') ? cell.innerText : null;"#,
            ),
        )
        .await;
    assert!(share.as_str().unwrap().contains("% errors"), "{share}");
    let first = browser
        .js(&row_script(
            origins[0].addr,
            "return row.querySelector('[data-field=errors] .sub').innerText",
        ))
        .await;
    assert_eq!(first, json!("0.0% errors"));
    traffic.abort();

    browser.screenshot("").await;
    let errors = browser.errors().await;
    assert!(errors.is_empty(), "the browser logged errors: {errors:#?}");

    // A narrow window: everything still fits, nothing scrolls sideways.
    browser.client().set_window_size(420, 1000).await.unwrap();
    let fits = browser
        .wait_for(
            "the page fitting a narrow window",
            "return document.documentElement.scrollWidth <= window.innerWidth || null",
        )
        .await;
    assert_eq!(fits, json!(true));
    browser.screenshot("narrow").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_whose_origin_stops_is_shown_down_with_the_reason() {
    let origins = origins(&["one", "two"]).await;
    let (a, b) = (origins[0].addr, origins[1].addr);
    let drover = Drover::start(&checked_service(free_port(), &[a, b])).await;
    let browser = Browser::start("endpoint-down").await;
    browser.open(&drover).await;
    let rows = browser.wait_for("two endpoint rows", &rows_script(2)).await;
    assert_eq!(rows, json!({a.to_string(): "up", b.to_string(): "up"}));
    let checks = browser
        .js("return document.querySelector('[data-service=web] .chips').innerText")
        .await;
    assert!(checks.as_str().unwrap().contains("every 200ms"), "{checks}");

    origins[0].stop();

    let why = browser
        .wait_for(
            "the stopped endpoint down",
            &row_script(
                a,
                r#"if (row.dataset.health !== 'down') return null;
                return {
                  pill: row.querySelector('[data-field=health]').innerText,
                  why: row.querySelector('[data-field=why]').innerText,
                };"#,
            ),
        )
        .await;
    assert_eq!(why["pill"].as_str().unwrap().to_lowercase(), "down");
    let why = why["why"].as_str().unwrap();
    assert!(why.contains("failed checks"), "{why}");
    assert!(why.contains("refused"), "the check's error is shown: {why}");
    let rows = browser.js(&rows_script(2)).await;
    assert_eq!(rows, json!({a.to_string(): "down", b.to_string(): "up"}));
    let up = browser
        .js("return document.querySelector('[data-service=web] [data-field=up]').innerText")
        .await;
    assert_eq!(up, json!("1/2 up"));

    browser.screenshot("").await;
    let errors = browser.errors().await;
    assert!(errors.is_empty(), "the browser logged errors: {errors:#?}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_through_the_api_appears_with_its_change_event_without_a_reload() {
    let origins = origins(&["one", "two"]).await;
    let (a, b) = (origins[0].addr, origins[1].addr);
    let drover = Drover::start(&one_service(free_port(), &[(a, 1)])).await;
    let browser = Browser::start("change-event").await;
    browser.open(&drover).await;
    browser.wait_for("one endpoint row", &rows_script(1)).await;
    browser
        .wait_for("the change stream connected", STREAM_LIVE)
        .await;
    browser
        .js("window.__loadedOnce = 'this page, not a reload'; return null")
        .await;

    let (status, body) = drover
        .api(
            "POST",
            "/api/v1/services/web/endpoints",
            Some(&format!(r#"{{"address":"{b}"}}"#)),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    let rows = browser
        .wait_for("the new endpoint's row", &rows_script(2))
        .await;
    assert_eq!(rows[b.to_string()], "up", "{rows}");
    let event = browser
        .wait_for(
            "a change event naming the new endpoint",
            &format!(
                r#"const e = [...document.querySelectorAll('[data-event-kind=change]')]
                  .find(e => e.innerText.includes('{b}'));
                return e ? e.innerText : null;"#
            ),
        )
        .await;
    let event = event.as_str().unwrap();
    assert!(event.contains(&format!("endpoint {b} added")), "{event}");
    assert!(event.contains("api"), "the source is named: {event}");
    assert!(
        event.contains("POST /api/v1/services/web/endpoints"),
        "the reason is named: {event}"
    );
    let marker = browser.js("return window.__loadedOnce || null").await;
    assert_eq!(marker, json!("this page, not a reload"));
    let generation = browser
        .js("return document.querySelector('#generation').innerText")
        .await;
    assert_eq!(
        generation,
        json!(format!("generation {}", drover.generation().await))
    );

    browser.screenshot("").await;
    let errors = browser.errors().await;
    assert!(errors.is_empty(), "the browser logged errors: {errors:#?}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_and_keeps_it_in_session_storage_only() {
    const TOKEN: &str = "dashboard-test-token-7c1f";
    let origins = origins(&["one"]).await;
    let a = origins[0].addr;
    let drover = Drover::start_with(
        &one_service(free_port(), &[(a, 1)]),
        &["--admin-token", TOKEN],
    )
    .await;
    let browser = Browser::start("token").await;
    browser.open(&drover).await;

    browser
        .wait_for(
            "the token form",
            "return (!document.querySelector('#token-panel').hidden
                     && document.querySelector('#dashboard').hidden) || null",
        )
        .await;
    browser.screenshot("form").await;

    // A wrong token is refused, and the form says so.
    let input = browser
        .client()
        .find(Locator::Css("#token-input"))
        .await
        .unwrap();
    input.send_keys("not-the-token").await.unwrap();
    browser
        .client()
        .find(Locator::Css("#token-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let refused = browser
        .wait_for(
            "the wrong token refused",
            "const m = document.querySelector('#token-message').innerText;
             return (!document.querySelector('#token-panel').hidden && m) || null",
        )
        .await;
    assert!(refused.as_str().unwrap().contains("refused"), "{refused}");

    let input = browser
        .client()
        .find(Locator::Css("#token-input"))
        .await
        .unwrap();
    input.send_keys(TOKEN).await.unwrap();
    browser
        .client()
        .find(Locator::Css("#token-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    let rows = browser
        .wait_for("the service's endpoint", &rows_script(1))
        .await;
    assert_eq!(rows, json!({a.to_string(): "up"}));
    browser
        .wait_for("the change stream connected", STREAM_LIVE)
        .await;
    let kept = browser
        .js("return {
               session: sessionStorage.getItem('drover.admin-token'),
               local: localStorage.length,
               cookie: document.cookie,
               form: document.querySelector('#token-panel').hidden,
             }")
        .await;
    assert_eq!(
        kept,
        json!({"session": TOKEN, "local": 0, "cookie": "", "form": true})
    );

    browser.screenshot("").await;
    // The 401s before the token are the only errors: no script failed.
    let errors: Vec<Value> = browser
        .errors()
        .await
        .into_iter()
        .filter(|e| !e["message"].as_str().unwrap_or_default().contains("401"))
        .collect();
    assert!(errors.is_empty(), "the browser logged errors: {errors:#?}");
    browser.close().await;
}
