//! The Consul source, against the Consul HTTP API double of the test kit (Consul has no
//! package that installs here; see support/consul.rs and docs/consul.md).
//!
//! The end-to-end tests run the real binary as `drover run --consul ADDR MAPPING...` with
//! drover-echo origins registered in the double; the in-process tests run the source alone
//! and read its snapshots, to look at what the binary does not show (how many queries it
//! sends, how it follows an index that goes backwards).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use drover_control::Snapshot;
use drover_discovery::consul::{ConsulOptions, ConsulSource, ConsulTls};
use http::{Request, StatusCode};
use serde_json::json;
use support::consul::ConsulDouble;
use support::{Drover, Origin, client, empty, free_port, origin_of, send, try_get};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Starts drover on the double with one mapping `127.0.0.1:PORT:SERVICE` and more flags.
async fn drover_for(consul: &ConsulDouble, service: &str, extra: &[&str]) -> (Drover, u16) {
    let port = free_port();
    let mapping = format!("127.0.0.1:{port}:{service}");
    let address = consul.address();
    let mut args = vec!["--consul", address.as_str()];
    args.extend_from_slice(extra);
    args.push(&mapping);
    (Drover::start_args(&args).await, port)
}

/// GETs `http://127.0.0.1:PORT/` until `origin` answers; the time it took.
async fn first_answer_from(port: u16, origin: &str, within: Duration) -> Duration {
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    let start = Instant::now();
    loop {
        if let Ok((StatusCode::OK, headers, _)) = try_get(&c, &url).await
            && origin_of(&headers) == origin
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{origin} never answered on {port}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// GETs until 20 answers in a row come from others than `origin`; the time to the first of
/// them.
async fn last_answer_from(port: u16, origin: &str, within: Duration) -> Duration {
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    let start = Instant::now();
    let mut run_started = None;
    let mut run = 0;
    loop {
        let (status, headers, _) = try_get(&c, &url).await.unwrap();
        if status == StatusCode::OK && origin_of(&headers) != origin {
            run_started.get_or_insert_with(|| start.elapsed());
            run += 1;
            if run == 20 {
                return run_started.unwrap();
            }
        } else {
            run = 0;
            run_started = None;
        }
        assert!(
            start.elapsed() < within,
            "{origin} kept answering on {port}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Who answered `n` requests, with a count each ("503" for a 503).
async fn origins(port: u16, n: usize) -> BTreeMap<String, usize> {
    let c = client();
    let url = format!("http://127.0.0.1:{port}/");
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let (status, headers, _) = try_get(&c, &url).await.unwrap();
        let who = if status == StatusCode::OK {
            origin_of(&headers)
        } else {
            status.as_u16().to_string()
        };
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

fn names(seen: &BTreeMap<String, usize>) -> Vec<&str> {
    seen.keys().map(String::as_str).collect()
}

/// Waits until the `n` requests in a row are all answered by exactly `want`.
async fn until_exactly(port: u16, want: &[&str], within: Duration) {
    let start = Instant::now();
    loop {
        let seen = origins(port, 2 * want.len().max(1) + 2).await;
        if names(&seen) == want {
            return;
        }
        assert!(
            start.elapsed() < within,
            "wanted {want:?} on {port}, got {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn instances_of_a_registered_service_get_traffic() {
    let consul = ConsulDouble::start().await;
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    consul.register("webserver-a", "webserver", a.addr, &[]);
    consul.register("webserver-b", "webserver", b.addr, &[]);
    consul.register("graphite-1", "graphite", Origin::start("g").await.addr, &[]);
    let (drover, port) = drover_for(&consul, "webserver", &[]).await;

    until_exactly(port, &["a", "b"], Duration::from_secs(10)).await;
    let seen = origins(port, 20).await;
    assert_eq!(seen, BTreeMap::from([("a".into(), 10), ("b".into(), 10)]));
    let log = drover.log_text();
    assert!(log.contains("watching Consul"), "{log}");
}

#[tokio::test]
async fn registrations_and_deregistrations_reach_traffic_within_one_round_trip() {
    let wait = Duration::from_secs(30);
    let consul = ConsulDouble::start().await;
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    consul.register("web-a", "web", a.addr, &[]);
    let (_drover, port) = drover_for(&consul, "web", &["--consul-wait", "30s"]).await;
    until_exactly(port, &["a"], Duration::from_secs(10)).await;
    // Let the watcher settle into its blocking query.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queries_before = consul.health_queries();

    let start = Instant::now();
    let (status, _) = consul
        .put(
            "/v1/agent/service/register",
            &json!({"ID": "web-b", "Name": "web", "Address": "127.0.0.1", "Port": b.addr.port()}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let registered = start.elapsed() + first_answer_from(port, "b", wait).await;

    let start = Instant::now();
    let (status, _) = consul
        .put("/v1/agent/service/deregister/web-b", &json!(null), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let deregistered = start.elapsed() + last_answer_from(port, "b", wait).await;

    println!(
        "consul propagation with wait={wait:?}: registration {registered:?}, deregistration {deregistered:?} ({} health queries)",
        consul.health_queries() - queries_before
    );
    // A poller at the wait would need up to 30 s; one blocking round trip takes milliseconds.
    // The bound is loose on purpose: it only tells the two apart.
    assert!(registered < wait / 10, "registration took {registered:?}");
    assert!(
        deregistered < wait / 10,
        "deregistration took {deregistered:?}"
    );
    assert!(consul.health_queries() - queries_before <= 6);
}

#[tokio::test]
async fn a_failing_ttl_check_removes_the_instance_and_passing_brings_it_back() {
    let consul = ConsulDouble::start().await;
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    // a passes from the start; b's TTL check starts critical, as Consul's do by default.
    for (id, origin, status) in [("web-a", &a, Some("passing")), ("web-b", &b, None)] {
        let mut check = json!({"TTL": "10m"});
        if let Some(s) = status {
            check["Status"] = json!(s);
        }
        let (code, text) = consul
            .put(
                "/v1/agent/service/register",
                &json!({"ID": id, "Name": "web", "Address": "127.0.0.1",
                        "Port": origin.addr.port(), "Check": check}),
                None,
            )
            .await;
        assert_eq!(code, StatusCode::OK, "{text}");
    }
    let (_drover, port) = drover_for(&consul, "web", &[]).await;
    until_exactly(port, &["a"], Duration::from_secs(10)).await;

    let (code, _) = consul
        .put("/v1/agent/check/pass/service:web-b", &json!(null), None)
        .await;
    assert_eq!(code, StatusCode::OK);
    until_exactly(port, &["a", "b"], Duration::from_secs(10)).await;

    consul.fail("service:web-a");
    until_exactly(port, &["b"], Duration::from_secs(10)).await;
    consul.pass("service:web-a");
    until_exactly(port, &["a", "b"], Duration::from_secs(10)).await;

    // No passing instance at all: 503, not the last ones.
    consul.fail("service:web-a");
    consul.fail("service:web-b");
    until_exactly(port, &["503"], Duration::from_secs(10)).await;
}

#[tokio::test]
async fn consul_going_away_keeps_the_last_endpoints_and_watching_resumes() {
    let consul = ConsulDouble::start().await;
    let (a, b, c) = (
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    );
    consul.register("web-a", "web", a.addr, &[]);
    consul.register("web-b", "web", b.addr, &[]);
    let (drover, port) = drover_for(&consul, "web", &[]).await;
    until_exactly(port, &["a", "b"], Duration::from_secs(10)).await;

    consul.stop();
    drover.wait_log("consul unreachable since", 1).await;
    for _ in 0..5 {
        let seen = origins(port, 20).await;
        assert_eq!(names(&seen), ["a", "b"], "the last endpoints keep serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    consul.start_again().await;
    let log = drover.wait_log("consul reachable again", 1).await;
    assert_eq!(
        log.matches("consul unreachable since").count(),
        1,
        "one warning per outage:\n{log}"
    );
    let start = Instant::now();
    consul.register("web-c", "web", c.addr, &[]);
    let took = start.elapsed() + first_answer_from(port, "c", Duration::from_secs(10)).await;
    println!("after Consul came back, a registration reached traffic in {took:?}");
    until_exactly(port, &["a", "b", "c"], Duration::from_secs(10)).await;
}

/// GET with a Host header; the origin that answered, or the status.
async fn get_host(port: u16, host: &str) -> String {
    let req = Request::get(format!("http://127.0.0.1:{port}/"))
        .header("host", host)
        .body(empty())
        .unwrap();
    match send(&client(), req).await {
        Ok((StatusCode::OK, headers, _)) => origin_of(&headers),
        Ok((status, _, _)) => status.as_u16().to_string(),
        Err(e) => format!("error: {e}"),
    }
}

#[tokio::test]
async fn catalog_tags_open_a_listener_and_route_by_host() {
    let consul = ConsulDouble::start().await;
    let (one, two, three) = (
        Origin::start("one").await,
        Origin::start("two").await,
        Origin::start("three").await,
    );
    let port = free_port();
    let listen = format!("drover.listen=127.0.0.1:{port}");
    consul.register(
        "one-1",
        "one",
        one.addr,
        &["drover.enable", &listen, "drover.host=one.test"],
    );
    consul.register(
        "two-1",
        "two",
        two.addr,
        &[
            "drover.enable=true",
            &listen,
            "drover.host=two.test",
            "drover.policy=least_conn",
        ],
    );
    consul.register(
        "three-1",
        "three",
        three.addr,
        &["drover.enable", "drover.publish=eighty"],
    );
    consul.register("plain-1", "plain", three.addr, &["v1"]);
    let address = consul.address();
    let drover = Drover::start_args(&["--consul", &address, "--consul-tags"]).await;

    let start = Instant::now();
    while get_host(port, "one.test").await != "one" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no listener on {port}:\n{}",
            drover.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..5 {
        assert_eq!(get_host(port, "one.test").await, "one");
        assert_eq!(get_host(port, "two.test").await, "two");
    }
    assert_eq!(get_host(port, "other.test").await, "404");
    let log = drover
        .wait_log("consul service \"three\" is not published", 1)
        .await;
    assert!(log.contains("drover.publish=eighty"), "{log}");

    // A service that gets the tags later is published then; one that loses them goes.
    let four = Origin::start("four").await;
    consul.register(
        "four-1",
        "four",
        four.addr,
        &["drover.enable", &listen, "drover.host=four.test"],
    );
    let start = Instant::now();
    while get_host(port, "four.test").await != "four" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "four never published"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    consul.register("one-1", "one", one.addr, &[]);
    let start = Instant::now();
    while get_host(port, "one.test").await != "404" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "one never unpublished"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(get_host(port, "two.test").await, "two");
}

#[tokio::test]
async fn the_token_is_sent_and_a_wrong_one_is_reported() {
    let consul = ConsulDouble::start_requiring_token("s3cret").await;
    let a = Origin::start("a").await;
    consul.register("web-a", "web", a.addr, &[]);

    let (_good, port) = drover_for(&consul, "web", &["--consul-token", "s3cret"]).await;
    until_exactly(port, &["a"], Duration::from_secs(10)).await;

    let (wrong, port) = drover_for(&consul, "web", &["--consul-token", "wrong"]).await;
    let log = wrong.wait_log("Consul refused the token", 1).await;
    assert!(
        log.contains("ACL not found") && log.contains("--consul-token"),
        "{log}"
    );
    assert_eq!(names(&origins(port, 3).await), ["503"]);

    let (none, _) = drover_for(&consul, "web", &[]).await;
    let log = none.wait_log("Consul refused the token", 1).await;
    assert!(log.contains("requires an ACL token"), "{log}");
    // Logged once, not on every retry.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        none.log_text().matches("Consul refused the token").count(),
        1
    );
}

// ---- TLS ------------------------------------------------------------------------------

/// Writes the TLS double's CA to `ca.pem` in a new temporary directory.
fn write_ca(consul: &ConsulDouble) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, consul.ca_pem()).unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

#[tokio::test]
async fn over_tls_with_the_ca_file_a_registered_service_gets_traffic() {
    let consul = ConsulDouble::start_tls().await;
    assert!(consul.address().starts_with("https://127.0.0.1:"));
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    consul.register("web-a", "web", a.addr, &[]);
    let (_dir, ca) = write_ca(&consul);
    let (drover, port) = drover_for(&consul, "web", &["--consul-ca", &ca]).await;
    until_exactly(port, &["a"], Duration::from_secs(10)).await;
    // Blocking queries work over TLS as over HTTP.
    consul.register("web-b", "web", b.addr, &[]);
    until_exactly(port, &["a", "b"], Duration::from_secs(10)).await;
    let log = drover.log_text();
    assert!(
        log.contains("watching Consul") && log.contains(&format!("CA file {ca}")),
        "{log}"
    );
    assert!(!log.contains("unreachable"), "{log}");
}

#[tokio::test]
async fn over_tls_without_the_ca_file_the_certificate_is_refused() {
    let consul = ConsulDouble::start_tls().await;
    let a = Origin::start("a").await;
    consul.register("web-a", "web", a.addr, &[]);
    // The system's roots do not hold the double's CA.
    let (drover, port) = drover_for(&consul, "web", &[]).await;
    let log = drover.wait_log("consul unreachable since", 1).await;
    assert!(
        log.contains("invalid peer certificate")
            && log.contains("UnknownIssuer")
            && log.contains("system roots")
            && log.contains("--consul-ca"),
        "{log}"
    );
    assert_eq!(names(&origins(port, 3).await), ["503"]);
    assert_eq!(consul.health_queries(), 0, "no query got through");
}

/// A Consul agent with `verify_incoming` asks for a client certificate: drover shows the one
/// given with --consul-cert and --consul-key, and is refused without one.
#[tokio::test]
async fn a_consul_that_verifies_clients_is_watched_with_the_client_certificate() {
    let consul = ConsulDouble::start_tls_verifying_clients().await;
    let a = Origin::start("a").await;
    consul.register("web-a", "web", a.addr, &[]);
    let (dir, ca) = write_ca(&consul);
    let (cert_pem, key_pem) = consul.client_pem();
    let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());

    let args = [
        "--consul-ca",
        &ca,
        "--consul-cert",
        cert,
        "--consul-key",
        key,
    ];
    let (drover, port) = drover_for(&consul, "web", &args).await;
    until_exactly(port, &["a"], Duration::from_secs(10)).await;
    assert!(
        !drover.log_text().contains("unreachable"),
        "{}",
        drover.log_text()
    );
    // Its queries are counted as they come in: none after it stops.
    drop(drover);

    let queries = consul.health_queries();
    let (without, port) = drover_for(&consul, "web", &["--consul-ca", &ca]).await;
    let log = without.wait_log("consul unreachable since", 1).await;
    assert_eq!(names(&origins(port, 3).await), ["503"], "{log}");
    assert_eq!(
        consul.health_queries(),
        queries,
        "no query got through without a certificate"
    );
}

/// A client certificate renewed in place (by Vault, consul-template or cert-manager) is shown
/// on the connections drover opens after it, with no restart. Files that cannot be used are
/// logged, and the certificate loaded before stays in use.
#[tokio::test]
async fn a_renewed_consul_client_certificate_is_shown_without_a_restart() {
    let consul = ConsulDouble::start_tls_verifying_clients().await;
    let a = Origin::start("a").await;
    consul.register("web-a", "web", a.addr, &[]);
    let (dir, ca) = write_ca(&consul);
    // First a certificate that the double's CA did not sign.
    let stranger = rcgen::generate_simple_self_signed(vec!["drover".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    std::fs::write(&cert, stranger.cert.pem()).unwrap();
    std::fs::write(&key, stranger.key_pair.serialize_pem()).unwrap();
    let args = [
        "--consul-ca",
        &ca,
        "--consul-cert",
        cert.to_str().unwrap(),
        "--consul-key",
        key.to_str().unwrap(),
    ];
    let (drover, port) = drover_for(&consul, "web", &args).await;
    let log = drover.wait_log("consul unreachable since", 1).await;
    assert_eq!(names(&origins(port, 3).await), ["503"], "{log}");
    assert_eq!(consul.health_queries(), 0, "the stranger was refused");

    // Renewed in place with one the CA signed: drover's next try shows it.
    let (cert_pem, key_pem) = consul.client_pem();
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    drover
        .wait_log("Consul: reloaded client certificate", 1)
        .await;
    until_exactly(port, &["a"], Duration::from_secs(15)).await;

    // A key cut short is logged and not used: once Consul has restarted, closing every
    // connection, drover connects again with the certificate that works.
    std::fs::write(&key, &key_pem[..key_pem.len() / 2]).unwrap();
    let log = drover
        .wait_log(
            "cannot reload Consul: its client certificate, --consul-key",
            1,
        )
        .await;
    assert!(
        log.contains("the client certificate loaded before stays in use"),
        "{log}"
    );
    consul.stop();
    consul.start_again().await;
    let b = Origin::start("b").await;
    consul.register("web-b", "web", b.addr, &[]);
    until_exactly(port, &["a", "b"], Duration::from_secs(15)).await;
    assert_eq!(
        drover
            .log_text()
            .matches("reloaded client certificate")
            .count(),
        1,
        "{}",
        drover.log_text()
    );
}

#[tokio::test]
async fn a_consul_ca_file_that_cannot_be_read_stops_start_up() {
    let consul = ConsulDouble::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let mapping = format!("127.0.0.1:{}:web", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["run", "--consul", &consul.address()])
        .args(["--consul-ca", "/nonexistent/ca.pem", &mapping])
        .args(["--admin", &admin, "--data-dir"])
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("drover did not stop");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Consul: its CA bundle, --consul-ca /nonexistent/ca.pem: no such file"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_tls_server_name_is_the_host_of_the_address() {
    let consul = ConsulDouble::start_tls().await;
    consul.register("w1", "web", addr("10.0.0.1:8080"), &[]);
    let (_dir, ca) = write_ca(&consul);
    let source = ConsulSource::new(
        vec!["127.0.0.1:18090:web".parse().unwrap()],
        ConsulOptions {
            // The certificate names localhost as well as 127.0.0.1.
            address: format!("https://localhost:{}", consul.addr.port()),
            tls: Some(ConsulTls {
                ca_file: Some(ca.into()),
                client: None,
            }),
            ..ConsulOptions::default()
        },
    )
    .unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    tokio::spawn(source.run(tx, stop.clone()));
    until_endpoints(
        &mut rx,
        "web",
        &[addr("10.0.0.1:8080")],
        Duration::from_secs(10),
    )
    .await;
    stop.cancel();
}

// ---- The source alone, in process -------------------------------------------------------

/// Runs the source with `mappings` against the double; its snapshots arrive on the receiver.
fn run_source(
    consul: &ConsulDouble,
    mappings: &[&str],
    options: ConsulOptions,
) -> (mpsc::Receiver<Snapshot>, CancellationToken) {
    let mappings = mappings.iter().map(|m| m.parse().unwrap()).collect();
    let source = ConsulSource::new(
        mappings,
        ConsulOptions {
            address: consul.address(),
            ..options
        },
    )
    .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    tokio::spawn(source.run(tx, stop.clone()));
    (rx, stop)
}

/// Reads snapshots until `service` has exactly `want` endpoints.
async fn until_endpoints(
    rx: &mut mpsc::Receiver<Snapshot>,
    service: &str,
    want: &[SocketAddr],
    within: Duration,
) -> Snapshot {
    let mut want = want.to_vec();
    want.sort();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let snapshot = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{service} never had {want:?}"))
            .expect("the source stopped");
        let mut got: Vec<SocketAddr> = snapshot
            .config
            .services
            .get(service)
            .map(|s| s.endpoints.iter().map(|e| e.address).collect())
            .unwrap_or_default();
        got.sort();
        if got == want {
            return snapshot;
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn the_first_snapshot_comes_at_once_and_idle_watching_does_not_poll() {
    let consul = ConsulDouble::start().await;
    let (mut rx, stop) = run_source(
        &consul,
        &["127.0.0.1:18080:webserver", "127.0.0.1:18081:graphite"],
        ConsulOptions {
            wait: Duration::from_secs(30),
            ..ConsulOptions::default()
        },
    );
    let first = rx.recv().await.unwrap();
    assert_eq!(first.source.0, "consul");
    assert_eq!(first.reason, "startup");
    assert_eq!(first.config.listeners.len(), 2);

    consul.register("w1", "webserver", addr("10.0.0.1:8080"), &[]);
    let s = until_endpoints(
        &mut rx,
        "webserver",
        &[addr("10.0.0.1:8080")],
        Duration::from_secs(5),
    )
    .await;
    assert!(s.reason.contains("webserver changed"), "{}", s.reason);

    // Nothing changes for a second: two watchers hold one blocking query each.
    let before = consul.health_queries();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(consul.health_queries() - before <= 2, "the source polls");

    // A change that does not touch a service's instances (another service's) sends nothing
    // for it: a wake-up with the same answer changes nothing.
    consul.register("other", "other", addr("10.0.0.9:1"), &[]);
    consul.register("g1", "graphite", addr("10.0.0.2:2003"), &[]);
    let s = until_endpoints(
        &mut rx,
        "graphite",
        &[addr("10.0.0.2:2003")],
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(s.reason, "graphite changed");
    stop.cancel();
}

#[tokio::test]
async fn an_index_that_goes_backwards_starts_over_from_zero() {
    let wait = Duration::from_secs(2);
    let consul = ConsulDouble::start().await;
    for i in 0..20 {
        consul.register(&format!("noise-{i}"), "noise", addr("10.0.0.9:1"), &[]);
    }
    consul.register("w1", "web", addr("10.0.0.1:80"), &[]);
    let (mut rx, stop) = run_source(
        &consul,
        &["127.0.0.1:18080:web"],
        ConsulOptions {
            wait,
            ..ConsulOptions::default()
        },
    );
    until_endpoints(
        &mut rx,
        "web",
        &[addr("10.0.0.1:80")],
        Duration::from_secs(5),
    )
    .await;
    let high = consul.index();

    // Consul restored from an older snapshot: its index is now far below the watcher's.
    consul.rewind_index(3);
    // The watcher's query with the old index waits out `wait`, sees the index went back and
    // starts over from 0; from then on it blocks on the new index.
    tokio::time::sleep(wait + Duration::from_millis(700)).await;
    let start = Instant::now();
    consul.register("w2", "web", addr("10.0.0.2:80"), &[]);
    assert!(consul.index() < high);
    until_endpoints(
        &mut rx,
        "web",
        &[addr("10.0.0.1:80"), addr("10.0.0.2:80")],
        Duration::from_secs(5),
    )
    .await;
    let took = start.elapsed();
    println!("after the index went back from {high} to 3, a change took {took:?}");
    assert!(took < wait / 2, "still waiting on the old index: {took:?}");
    stop.cancel();
}

#[tokio::test]
async fn the_datacenter_is_asked_for() {
    let consul = ConsulDouble::start().await;
    consul.register("w1", "web", addr("10.0.0.1:80"), &[]);
    let (mut rx, stop) = run_source(
        &consul,
        &["127.0.0.1:18080:web"],
        ConsulOptions {
            datacenter: Some(support::consul::DATACENTER.into()),
            ..ConsulOptions::default()
        },
    );
    until_endpoints(
        &mut rx,
        "web",
        &[addr("10.0.0.1:80")],
        Duration::from_secs(5),
    )
    .await;
    stop.cancel();

    let (mut rx, stop) = run_source(
        &consul,
        &["127.0.0.1:18080:web"],
        ConsulOptions {
            datacenter: Some("dc9".into()),
            ..ConsulOptions::default()
        },
    );
    let first = rx.recv().await.unwrap();
    assert!(first.config.services["web"].endpoints.is_empty());
    // dc9 is unknown: no answer with endpoints ever comes.
    let more = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
    assert!(more.is_err(), "a snapshot came from an unknown datacenter");
    stop.cancel();
}

#[test]
fn the_double_reads_go_durations_and_escapes() {
    use support::consul::{decode, parse_duration};
    assert_eq!(parse_duration("60000ms").unwrap(), Duration::from_secs(60));
    assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("10x").is_err());
    assert_eq!(decode("a%20b%2Fc"), "a b/c");
}
