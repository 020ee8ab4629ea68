//! The Docker source end to end, against a real Docker Engine (Debian's docker.io; scripts/
//! test.sh starts dockerd) and containers made from a local busybox image. Each test's drover
//! takes only its own containers (`--docker-constraint test.run=ID`); the tests run one at a
//! time (.config/nextest.toml), because one of them restarts dockerd. Traffic goes to
//! drover on loopback, and from drover to the test's own containers on Docker's bridge.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::docker::{self, Container, docker, endpoint_states};
use support::*;

/// drover with `--docker`, taking the containers labelled `test.run=<run>`.
async fn drover(run: &str, config: Option<&str>, extra: &[&str]) -> Drover {
    docker::ready();
    let constraint = format!("test.run={run}");
    let mut args = vec!["--docker", "--docker-constraint", constraint.as_str()];
    args.extend_from_slice(extra);
    match config {
        Some(c) => Drover::start_with(c, &args).await,
        None => Drover::start_args(&args).await,
    }
}

/// The seed's three labels, publishing `port`, plus the test's own.
fn seed_labels(run: &str, port: u16) -> Vec<(String, String)> {
    vec![
        ("lb.enable".into(), "Y".into()),
        ("lb.publish".into(), port.to_string()),
        ("lb.target".into(), "80".into()),
        ("test.run".into(), run.into()),
    ]
}

fn run_web(name: &str, labels: &[(String, String)], extra: &[&str]) -> Container {
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Container::run(name, &labels, extra)
}

/// Waits until `GET /` on `port` has answered 200 with each of `hostnames`.
async fn wait_served_by(port: u16, hostnames: &[String], drover: &Drover) {
    wait_answers(port, hostnames, &|| drover.log_text()).await
}

async fn wait_answers(port: u16, hostnames: &[String], log: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = BTreeSet::new();
    loop {
        if let Ok((StatusCode::OK, body)) = get_fresh(([127, 0, 0, 1], port).into(), "/").await {
            seen.insert(String::from_utf8_lossy(&body).trim().to_string());
        }
        if hostnames.iter().all(|h| seen.contains(h)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "port {port}: wanted answers from {hostnames:?}, got {seen:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the admin API until `check` holds for the service (or it is gone, as None).
async fn wait_service(
    drover: &Drover,
    service: &str,
    what: &str,
    check: impl Fn(Option<&serde_json::Value>) -> bool,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = drover
            .api("GET", &format!("/api/v1/services/{service}"), None)
            .await;
        let found = (status == StatusCode::OK).then_some(body);
        if check(found.as_ref()) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "service {service}: never {what}; last {found:?}\n{}",
            drover.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_seeds_labels_publish_containers_and_requests_alternate() {
    let run = docker::run_id();
    let port = free_port();
    // Round robin without stickiness, so that one client sees both containers take turns.
    let config = "[docker.defaults]\npolicy = \"round_robin\"\n";
    let d = drover(&run, Some(config), &[]).await;
    let web1 = run_web(&format!("web1-{run}"), &seed_labels(&run, port), &[]);
    wait_served_by(port, &[web1.hostname()], &d).await;
    let log = d
        .wait_log(&format!("Backend web1-{run} at {}, port 80", web1.ip()), 1)
        .await;
    assert!(log.contains(&format!("Publish port {port} http")), "{log}");
    assert!(log.contains("backends changed"), "{log}");

    let web2 = run_web(&format!("web2-{run}"), &seed_labels(&run, port), &[]);
    wait_served_by(port, &[web2.hostname()], &d).await;
    d.wait_log(&format!("Backend web2-{run} at {}, port 80", web2.ip()), 1)
        .await;
    let mut answers = Vec::new();
    for _ in 0..10 {
        let (status, body) = get_fresh(([127, 0, 0, 1], port).into(), "/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        answers.push(String::from_utf8_lossy(&body).trim().to_string());
    }
    for pair in answers.windows(2) {
        assert_ne!(pair[0], pair[1], "requests alternate: {answers:?}");
    }
    let service = format!("docker-{port}");
    let (_, view) = d
        .api("GET", &format!("/api/v1/services/{service}"), None)
        .await;
    assert_eq!(view["source"], "docker");
    assert_eq!(
        view["policy"], "round_robin",
        "the file's [docker.defaults]"
    );
}

#[tokio::test]
async fn without_a_template_the_seeds_leastconn_and_stickiness_apply() {
    let run = docker::run_id();
    let port = free_port();
    let d = drover(&run, None, &[]).await;
    let web1 = run_web(&format!("web1-{run}"), &seed_labels(&run, port), &[]);
    let web2 = run_web(&format!("web2-{run}"), &seed_labels(&run, port), &[]);
    let service = format!("docker-{port}");
    let view = wait_service(&d, &service, "with two endpoints", |s| {
        s.is_some_and(|s| s["endpoints"].as_array().is_some_and(|e| e.len() == 2))
    })
    .await
    .unwrap();
    assert_eq!(view["policy"], "least_conn");
    let (_, config) = d.api("GET", "/api/v1/config", None).await;
    assert_eq!(
        config["config"]["services"][&service]["sticky"]["mode"], "source_ip",
        "{config}"
    );
    // One client (127.0.0.1) stays on one container.
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        let (status, body) = get_fresh(([127, 0, 0, 1], port).into(), "/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        seen.insert(String::from_utf8_lossy(&body).trim().to_string());
    }
    assert_eq!(seen.len(), 1, "stick on source: {seen:?}");
    assert!(seen.contains(&web1.hostname()) || seen.contains(&web2.hostname()));
}

#[tokio::test]
async fn a_new_publish_port_opens_a_listener_that_closes_with_its_last_container() {
    let run = docker::run_id();
    let (port_a, port_b) = (free_port(), free_port());
    let d = drover(&run, None, &[]).await;
    let a = run_web(&format!("a-{run}"), &seed_labels(&run, port_a), &[]);
    wait_served_by(port_a, &[a.hostname()], &d).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port_b)).is_err(),
        "nothing listens on {port_b} yet"
    );
    let b = run_web(&format!("b-{run}"), &seed_labels(&run, port_b), &[]);
    wait_served_by(port_b, &[b.hostname()], &d).await;
    let (_, listeners) = d.api("GET", "/api/v1/listeners", None).await;
    let names: Vec<&str> = listeners
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert!(
        names.contains(&format!("docker-{port_a}").as_str())
            && names.contains(&format!("docker-{port_b}").as_str()),
        "{names:?}"
    );

    docker(&["rm", "-f", &b.id]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port_b)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "port {port_b} still open after its last container left\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = get_fresh(([127, 0, 0, 1], port_a).into(), "/")
        .await
        .unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).trim()),
        (StatusCode::OK, a.hostname().as_str()),
        "the other port is untouched"
    );
}

#[tokio::test]
async fn stopping_a_container_under_load_drains_it_first_and_loses_no_request() {
    let run = docker::run_id();
    let port = free_port();
    let config = "[docker.defaults]\npolicy = \"round_robin\"\n";
    let d = drover(&run, Some(config), &[]).await;
    let web1 = run_web(&format!("web1-{run}"), &seed_labels(&run, port), &[]);
    let web2 = run_web(&format!("web2-{run}"), &seed_labels(&run, port), &[]);
    wait_served_by(port, &[web1.hostname(), web2.hostname()], &d).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match get_fresh(([127, 0, 0, 1], port).into(), "/").await {
                    Ok((StatusCode::OK, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        errors.push(format!("{other:?}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // busybox httpd as PID 1 ignores SIGTERM: the container lives 2 s after `kill`, until
    // Docker sends SIGKILL. drover drains it at `kill`, not at `die`.
    let stopping = tokio::task::spawn_blocking({
        let id = web1.id.clone();
        move || docker(&["stop", "-t", "2", &id])
    });
    let service = format!("docker-{port}");
    let address = web1.endpoint(80).to_string();
    let drained_at = Instant::now();
    wait_service(&d, &service, "draining web1", |s| {
        s.is_some_and(|s| endpoint_states(s).get(&address).map(String::as_str) == Some("drain"))
    })
    .await;
    assert!(
        drained_at.elapsed() < Duration::from_secs(2),
        "drained before the container died"
    );
    stopping.await.unwrap();
    wait_service(&d, &service, "without web1", |s| {
        s.is_some_and(|s| !endpoint_states(s).contains_key(&address))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.unwrap());
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("stop under load: {ok} requests answered, {failed} failed");
    assert!(ok > 100, "load ran: {ok}");
    assert_eq!(failed, 0, "{errors:?}\n{}", d.log_text());
    d.wait_log(&format!("web1-{run}: kill (signal 15), draining"), 1)
        .await;
}

#[tokio::test]
async fn a_container_gets_traffic_only_while_its_healthcheck_passes() {
    let run = docker::run_id();
    let port = free_port();
    let d = drover(&run, None, &[]).await;
    let steady = run_web(&format!("steady-{run}"), &seed_labels(&run, port), &[]);
    wait_served_by(port, &[steady.hostname()], &d).await;
    let checked = run_web(
        &format!("checked-{run}"),
        &seed_labels(&run, port),
        &[
            "--health-cmd",
            "test -f /www/healthy",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            "--health-start-period",
            "0s",
        ],
    );
    let service = format!("docker-{port}");
    let address = checked.endpoint(80).to_string();
    let state = |want: &'static str| {
        let address = address.clone();
        move |s: Option<&serde_json::Value>| {
            s.is_some_and(|s| endpoint_states(s).get(&address).map(String::as_str) == Some(want))
        }
    };
    wait_service(&d, &service, "with checked healthy", state("enabled")).await;
    docker(&["exec", &checked.id, "rm", "/www/healthy"]);
    wait_service(&d, &service, "with checked out", state("disabled")).await;
    d.wait_log(
        &format!(
            "Backend checked-{run} at {}, port 80 (not healthy: no traffic)",
            checked.ip()
        ),
        1,
    )
    .await;
    // New connections from other client addresses, so that stickiness cannot hide anything.
    for i in 0..20u8 {
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.bind(([127, 0, 0, 10 + i], 0).into()).unwrap();
        let stream = client.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let body = get_on(stream, port).await;
        assert_eq!(
            body,
            steady.hostname(),
            "only the healthy container answers"
        );
    }
    docker(&["exec", &checked.id, "touch", "/www/healthy"]);
    wait_service(&d, &service, "with checked back", state("enabled")).await;
}

/// GET / on a connected stream; the body.
async fn get_on(stream: tokio::net::TcpStream, port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = stream;
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn bad_labels_leave_that_container_out_with_a_warning_and_nothing_else() {
    let run = docker::run_id();
    let port = free_port();
    let d = drover(&run, None, &[]).await;
    let good = run_web(&format!("good-{run}"), &seed_labels(&run, port), &[]);
    wait_served_by(port, &[good.hostname()], &d).await;
    let mut bad_port = seed_labels(&run, port);
    bad_port[1].1 = "eighty".into();
    let _bad = run_web(&format!("bad-{run}"), &bad_port, &[]);
    let mut bad_policy = seed_labels(&run, port);
    bad_policy.push(("drover.policy".into(), "fastest".into()));
    let _worse = run_web(&format!("worse-{run}"), &bad_policy, &[]);
    let log = d
        .wait_log(
            &format!("container bad-{run} left out: label lb.publish=\"eighty\" is not a port"),
            1,
        )
        .await;
    let log = if log.contains(&format!("container worse-{run} left out")) {
        log
    } else {
        d.wait_log(
            &format!(
                "container worse-{run} left out: label drover.policy=\"fastest\" names no policy"
            ),
            1,
        )
        .await
    };
    assert!(log.contains("least_conn"), "the warning says what is right");
    let (_, view) = d
        .api("GET", &format!("/api/v1/services/docker-{port}"), None)
        .await;
    assert_eq!(
        endpoint_states(&view).keys().cloned().collect::<Vec<_>>(),
        [good.endpoint(80).to_string()]
    );
    let (status, body) = get_fresh(([127, 0, 0, 1], port).into(), "/").await.unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).trim()),
        (StatusCode::OK, good.hostname().as_str())
    );
    let (_, status) = d.api("GET", "/api/v1/status", None).await;
    assert!(
        status["last_rejection"].is_null(),
        "nothing was rejected: {status}"
    );
}

/// dockerd as scripts/test.sh (or the machine) started it: stopped and started again with
/// the same command line.
struct Dockerd {
    pid: String,
    command: Vec<String>,
}

impl Dockerd {
    fn find() -> Dockerd {
        let out = std::process::Command::new("pgrep")
            .args(["-x", "dockerd"])
            .output()
            .unwrap();
        let pid = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .expect("dockerd runs")
            .to_string();
        let command = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        Dockerd { pid, command }
    }

    /// SIGTERM, as `systemctl restart docker` sends: dockerd stops its containers and exits.
    fn stop(&self) {
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &self.pid])
                .status()
                .unwrap()
                .success()
        );
        // Gone, or a zombie nobody reaps: either way dockerd can start again.
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = format!("/proc/{}/status", self.pid);
        while std::fs::read_to_string(&status).is_ok_and(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        }) {
            assert!(Instant::now() < deadline, "dockerd did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!docker::engine_up(), "dockerd still answers");
    }

    #[expect(
        clippy::zombie_processes,
        reason = "dockerd outlives the test, like the one scripts/test.sh starts"
    )]
    fn start(&self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(std::env::temp_dir().join("drover-test-dockerd.log"))
            .unwrap();
        std::process::Command::new(&self.command[0])
            .args(&self.command[1..])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("dockerd starts again");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !docker::engine_up() {
            assert!(Instant::now() < deadline, "dockerd did not come back");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[tokio::test]
async fn a_dockerd_restart_is_survived_and_followed_by_a_resync() {
    let run = docker::run_id();
    let port = free_port();
    let config = "[docker.defaults]\npolicy = \"round_robin\"\n";
    let d = drover(&run, Some(config), &[]).await;
    // Restarted by Docker when it comes back; stopped within 1 s when it goes.
    let always = ["--restart", "always", "--stop-timeout", "1"];
    let web1 = run_web(&format!("web1-{run}"), &seed_labels(&run, port), &always);
    wait_served_by(port, &[web1.hostname()], &d).await;

    let dockerd = Dockerd::find();
    tokio::task::spawn_blocking(move || {
        dockerd.stop();
        dockerd.start();
    })
    .await
    .unwrap();
    let log = d.wait_log("docker: engine reachable again", 1).await;
    assert!(
        log.contains("docker: the event stream broke")
            || log.contains("docker: the engine closed the event stream"),
        "{log}"
    );
    // web1, started again by Docker, is served wherever it is now; and a container started
    // after the restart is picked up: the event stream is followed again.
    wait_served_by(port, &[web1.hostname()], &d).await;
    let web2 = run_web(&format!("web2-{run}"), &seed_labels(&run, port), &[]);
    wait_served_by(port, &[web1.hostname(), web2.hostname()], &d).await;
    let want = BTreeSet::from([web1.endpoint(80).to_string(), web2.endpoint(80).to_string()]);
    wait_service(
        &d,
        &format!("docker-{port}"),
        "matching the containers",
        |s| s.is_some_and(|s| endpoint_states(s).keys().cloned().collect::<BTreeSet<_>>() == want),
    )
    .await;
    // The outage shows in the source's metrics, and so does the recovery.
    let (status, _, body) = get(&client(), &format!("http://{}/metrics", d.admin)).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    let metric = |name: &str| -> f64 {
        let prefix = format!("{name}{{source=\"docker\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} for docker in:\n{text}"))
    };
    assert!(metric("drover_source_sync_errors_total") >= 1.0);
    assert_eq!(metric("drover_source_up"), 1.0);
}

#[tokio::test]
async fn drover_runs_in_a_container_with_the_docker_socket_mounted() {
    docker::ready();
    let run = docker::run_id();
    let (port, admin) = (free_port(), free_port());
    let tag = format!("drover-test:{run}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/docker-image.sh");
    let built = std::process::Command::new("bash")
        .args([script, env!("CARGO_BIN_EXE_drover"), &tag])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    struct Image(String);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = docker::try_docker(&["rmi", "-f", &self.0]);
        }
    }
    let _image = Image(tag.clone());
    // The seed's command line, with this test's admin port and constraint.
    let constraint = format!("test.run={run}");
    let admin_addr = format!("127.0.0.1:{admin}");
    let lb = Container {
        name: format!("lb-{run}"),
        id: docker(&[
            "run",
            "-d",
            "--name",
            &format!("lb-{run}"),
            "--net",
            "host",
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            &tag,
            "run",
            "--docker",
            "--docker-constraint",
            &constraint,
            "--admin",
            &admin_addr,
        ]),
    };
    let logs = || {
        docker(&["logs", &lb.id])
            + &docker::try_docker(&["logs", &lb.id])
                .stderr
                .iter()
                .map(|b| *b as char)
                .collect::<String>()
    };
    let web = run_web(&format!("web-{run}"), &seed_labels(&run, port), &[]);
    wait_answers(port, &[web.hostname()], &logs).await;
    // The log line comes through drover's log writer thread and Docker's log file, both
    // behind the change that made the answers: it may be read a moment after them.
    let expected = format!("Backend web-{run} at {}, port 80", web.ip());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = logs();
        if text.contains(&expected) {
            break;
        }
        assert!(Instant::now() < deadline, "no {expected:?} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A single-node swarm for the test's life; left again if the test made it.
struct Swarm {
    made_here: bool,
}

impl Swarm {
    fn join() -> Swarm {
        let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        if state == "active" {
            return Swarm { made_here: false };
        }
        docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        Swarm { made_here: true }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.made_here {
            let _ = docker::try_docker(&["swarm", "leave", "--force"]);
        }
    }
}

#[tokio::test]
async fn swarm_service_replicas_with_the_labels_as_container_labels_are_balanced() {
    let run = docker::run_id();
    let port = free_port();
    let d = drover(&run, None, &[]).await;
    let _swarm = Swarm::join();
    let name = format!("sw-{run}");
    // The seed's `docker service create --container-label ...` on one node.
    let mut args = vec![
        "service",
        "create",
        "-d",
        "--name",
        &name,
        "--replicas",
        "2",
    ];
    let labels: Vec<String> = seed_labels(&run, port)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for l in &labels {
        args.extend(["--container-label", l.as_str()]);
    }
    args.extend([docker::IMAGE, "sh", "-c", docker::WEB]);
    docker(&args);
    struct Service(String);
    impl Drop for Service {
        fn drop(&mut self) {
            let _ = docker::try_docker(&["service", "rm", &self.0]);
        }
    }
    let _service = Service(name.clone());
    let service = format!("docker-{port}");
    wait_service(&d, &service, "with both replicas", |s| {
        s.is_some_and(|s| endpoint_states(s).len() == 2)
    })
    .await;
    let replicas: Vec<String> = docker(&[
        "ps",
        "--filter",
        &format!("label=com.docker.swarm.service.name={name}"),
        "--format",
        "{{.ID}}",
    ])
    .lines()
    .map(str::to_string)
    .collect();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    // Both replicas answer: from two client addresses stickiness sends to each in turn at
    // least once over a few tries; least_conn alone would alternate.
    let mut seen = BTreeSet::new();
    for i in 0..40u8 {
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.bind(([127, 0, 0, 50 + i], 0).into()).unwrap();
        let stream = client.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        seen.insert(get_on(stream, port).await);
        if seen.len() == 2 {
            break;
        }
    }
    let want: BTreeSet<String> = replicas
        .iter()
        .map(|id| id.chars().take(12).collect())
        .collect();
    assert_eq!(seen, want, "both replicas serve");
}

#[tokio::test]
async fn a_started_container_gets_requests_once_its_port_takes_connections() {
    let run = docker::run_id();
    let port = free_port();
    let config = "[docker.defaults]\npolicy = \"round_robin\"\n";
    let d = drover(&run, Some(config), &[]).await;
    let base = run_web(&format!("base-{run}"), &seed_labels(&run, port), &[]);
    wait_served_by(port, &[base.hostname()], &d).await;

    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, failed) = (stop.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = get_fresh(([127, 0, 0, 1], port).into(), "/").await {
                    errors.push(e);
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            errors
        }));
    }
    // A server that takes a second to start listening after its container starts.
    let owned = seed_labels(&run, port);
    let labels: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let slow = Container::run_script(
        &format!("slow-{run}"),
        &labels,
        &[],
        &format!("sleep 1 && {}", docker::WEB),
    );
    let service = format!("docker-{port}");
    let address = slow.endpoint(80).to_string();
    wait_service(&d, &service, "with slow waiting", |s| {
        s.is_some_and(|s| endpoint_states(s).get(&address).map(String::as_str) == Some("disabled"))
    })
    .await;
    d.wait_log(
        &format!("Backend slow-{run} at {}, port 80 (starting", slow.ip()),
        1,
    )
    .await;
    wait_service(&d, &service, "with slow listening", |s| {
        s.is_some_and(|s| endpoint_states(s).get(&address).map(String::as_str) == Some("enabled"))
    })
    .await;
    // It takes requests at once: it was never sent one before it listened, so never ejected.
    wait_served_by(port, &[slow.hostname()], &d).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.unwrap());
    }
    assert!(errors.is_empty(), "{errors:?}");
    let (_, view) = d
        .api("GET", &format!("/api/v1/services/{service}"), None)
        .await;
    let slow_view = view["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == address.as_str())
        .unwrap();
    assert_eq!(
        slow_view["failures"], 0,
        "no request went to it before it listened"
    );
}
