//! `drover agent` end to end: real etcd (Debian's etcd-server, a 3-member cluster on loopback
//! ports started by each test; one member where a lease's expiry is timed), the real Docker
//! Engine, and real drover processes: agents that
//! register their containers, and gateways (`drover run --agents etcd://…`, or `--consul …
//! --consul-tags` on the Consul double of the test kit) that serve them.
//!
//! All the "hosts" are this one: each agent takes only its own containers
//! (`--docker-constraint test.run=ID`) and advertises 127.0.0.1, so that its endpoints are the
//! host ports its containers publish (`-p HOSTPORT:80`) on loopback. The tests share the
//! Docker Engine with tests/docker.rs and run one at a time (.config/nextest.toml).

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use drover_etcd::etcd_client::CompactionOptions;
use http::StatusCode;
use support::consul::ConsulDouble;
use support::docker::{self, Container, docker, endpoint_states};
use support::etcd::EtcdCluster;
use support::*;

/// The store URL of `etcd` with a key prefix of the test's own.
fn store_url(etcd: &EtcdCluster, run: &str) -> String {
    format!("{}/agent-test-{run}", etcd.url())
}

/// Compacts etcd's history up to its current revision; returns that revision.
async fn compact(etcd: &EtcdCluster) -> i64 {
    let mut client = etcd.client().await;
    let revision = client
        .get("any key", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client
        .compact(revision, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    revision
}

/// A `drover agent` process, killed on drop.
struct Agent {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// `drover agent --docker --docker-constraint test.run=RUN --node NODE --advertise
    /// 127.0.0.1 EXTRA...`.
    fn start(run: &str, node: &str, extra: &[&str]) -> Agent {
        docker::ready();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("agent.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["agent", "--docker", "--docker-constraint"])
            .arg(format!("test.run={run}"))
            .args(["--node", node, "--advertise", "127.0.0.1"])
            .args(extra)
            .env_remove("CONSUL_HTTP_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("drover agent starts");
        Agent {
            child,
            log,
            _dir: dir,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = self.log_text();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the agent never logged {needle:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what its agents did.
        if std::thread::panicking() {
            eprintln!(
                "--- log of the agent {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// The seed's labels publishing `port`, taken by the agent of `run`.
fn labels(run: &str, port: u16) -> Vec<(String, String)> {
    vec![
        ("lb.enable".into(), "Y".into()),
        ("lb.publish".into(), port.to_string()),
        ("lb.target".into(), "80".into()),
        ("test.run".into(), run.into()),
    ]
}

/// A web container with `labels`, its port 80 published on `host_port` on every address.
fn run_web(name: &str, labels: &[(String, String)], host_port: u16) -> Container {
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Container::run(name, &labels, &["-p", &format!("{host_port}:80")])
}

/// The gateway: `drover run --agents URL`.
async fn gateway(url: &str) -> Drover {
    Drover::start_args(&["--agents", url]).await
}

/// The endpoint addresses of a gateway's service; empty when it has none or is gone.
async fn endpoints(gateway: &Drover, service: &str) -> BTreeSet<String> {
    let (status, body) = gateway
        .api("GET", &format!("/api/v1/services/{service}"), None)
        .await;
    if status != StatusCode::OK {
        return BTreeSet::new();
    }
    endpoint_states(&body).into_keys().collect()
}

/// Polls until the service's endpoints are `want`; the time it took.
async fn wait_endpoints(gateway: &Drover, service: &str, want: &[String]) -> Duration {
    let want: BTreeSet<String> = want.iter().cloned().collect();
    let start = Instant::now();
    loop {
        let have = endpoints(gateway, service).await;
        if have == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "service {service}: wanted endpoints {want:?}, have {have:?}\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `GET /` on `port` has been answered 200 by each of `hostnames`.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the gateway's /metrics until it has the line `sample`.
async fn wait_metric(gateway: &Drover, sample: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = match try_get(&client(), &format!("http://{}/metrics", gateway.admin)).await {
            Ok((_, _, body)) => String::from_utf8_lossy(&body).into_owned(),
            Err(e) => e,
        };
        if text.lines().any(|l| l == sample) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics never showed {sample}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn local(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// An agent's config file that makes round robin the template of its services, so that one
/// client sees every container take its turn (the seed's template sticks to one).
fn round_robin() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "[docker.defaults]\npolicy = \"round_robin\"\n").unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

/// Two agents and their containers behind one gateway, all on one publish port.
struct TwoHosts {
    etcd: EtcdCluster,
    /// The test's id; the agents take the containers labelled test.run=RUN-n1 and RUN-n2.
    run: String,
    _config: tempfile::TempDir,
    gateway: Drover,
    agents: [Agent; 2],
    containers: [Container; 2],
    host_ports: [u16; 2],
    port: u16,
}

impl TwoHosts {
    /// On an etcd cluster of `members`, with agents whose lease TTL is `ttl`.
    async fn start(members: usize, ttl: &str) -> TwoHosts {
        let etcd = EtcdCluster::start(members).await;
        let run = docker::run_id();
        let url = store_url(&etcd, &run);
        let port = free_port();
        let host_ports = [free_port(), free_port()];
        let gateway = gateway(&url).await;
        let (dir, config) = round_robin();
        let mut agents = Vec::new();
        let mut containers = Vec::new();
        for (i, node) in ["n1", "n2"].into_iter().enumerate() {
            let own = format!("{run}-{node}");
            let c = run_web(&format!("web-{own}"), &labels(&own, port), host_ports[i]);
            let args = ["--store", &url, "--ttl", ttl, "--config", &config];
            agents.push(Agent::start(&own, node, &args));
            containers.push(c);
        }
        let service = format!("docker-{port}");
        wait_endpoints(
            &gateway,
            &service,
            &[local(host_ports[0]), local(host_ports[1])],
        )
        .await;
        TwoHosts {
            etcd,
            run,
            _config: dir,
            gateway,
            agents: agents.try_into().ok().unwrap(),
            containers: containers.try_into().ok().unwrap(),
            host_ports,
            port,
        }
    }

    fn service(&self) -> String {
        format!("docker-{}", self.port)
    }
}

#[tokio::test]
async fn a_gateway_serves_an_agents_containers_and_a_second_agent_adds_its_own() {
    let etcd = EtcdCluster::start(3).await;
    let run = docker::run_id();
    let url = store_url(&etcd, &run);
    let port = free_port();
    let (h1, h2) = (free_port(), free_port());
    let service = format!("docker-{port}");

    let gateway = gateway(&url).await;
    let n1 = format!("{run}-n1");
    let web1 = run_web(&format!("web1-{run}"), &labels(&n1, port), h1);
    // Round robin, so that one client sees both hosts' containers take turns.
    let (_dir, config) = round_robin();
    let a1 = Agent::start(&n1, "n1", &["--store", &url, "--config", &config]);
    a1.wait_log(&format!(
        "registered as /agent-test-{run}/agents/n1 with 1 endpoints"
    ))
    .await;
    wait_endpoints(&gateway, &service, &[local(h1)]).await;
    wait_answers(port, &[web1.hostname()], &|| gateway.log_text()).await;
    let (_, view) = gateway
        .api("GET", &format!("/api/v1/services/{service}"), None)
        .await;
    assert_eq!(view["source"], "agents", "{view}");
    assert_eq!(
        view["policy"], "round_robin",
        "the agent's [docker.defaults]"
    );
    let (_, listeners) = gateway.api("GET", "/api/v1/listeners", None).await;
    let listener = listeners
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == service.as_str())
        .unwrap_or_else(|| panic!("no listener {service}: {listeners}"));
    assert_eq!(listener["listen"], format!("0.0.0.0:{port}"));

    // A second host: its own agent and container, on the same publish port.
    let n2 = format!("{run}-n2");
    let web2 = run_web(&format!("web2-{run}"), &labels(&n2, port), h2);
    let _a2 = Agent::start(&n2, "n2", &["--store", &url, "--config", &config]);
    wait_endpoints(&gateway, &service, &[local(h1), local(h2)]).await;
    wait_answers(port, &[web1.hostname(), web2.hostname()], &|| {
        gateway.log_text()
    })
    .await;
    let (_, listeners) = gateway.api("GET", "/api/v1/listeners", None).await;
    let ours = listeners
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["name"] == service.as_str())
        .count();
    assert_eq!(ours, 1, "one listener for both agents: {listeners}");
    gateway
        .wait_log("agents: serving 2 agents: n1 (1 endpoints at 127.0.0.1), n2 (1 endpoints at 127.0.0.1)", 1)
        .await;

    // A container that leaves takes its endpoint with it; the other host's stays.
    docker(&["rm", "-f", &web1.id]);
    wait_endpoints(&gateway, &service, &[local(h2)]).await;
    wait_answers(port, &[web2.hostname()], &|| gateway.log_text()).await;
}

#[tokio::test]
async fn an_agent_killed_with_sigkill_leaves_the_pool_within_its_lease_ttl() {
    let ttl = Duration::from_secs(2);
    // One member: a new etcd leader renews every lease (its TTL plus an election timeout),
    // which would add to what is measured here if a busy test machine made the members elect
    // one.
    let mut hosts = TwoHosts::start(1, "2s").await;
    let service = hosts.service();
    hosts.agents[1].child.kill().unwrap();
    let killed = Instant::now();
    hosts.agents[1].child.wait().unwrap();
    wait_endpoints(&hosts.gateway, &service, &[local(hosts.host_ports[0])]).await;
    let left = killed.elapsed();
    eprintln!(
        "agent n2 killed with SIGKILL: its endpoint left the gateway's pool after {} ms (lease TTL {} ms)",
        left.as_millis(),
        ttl.as_millis()
    );
    assert!(
        left <= ttl + Duration::from_millis(1500),
        "left after {left:?}, lease TTL {ttl:?}\n{}",
        hosts.gateway.log_text()
    );
    assert!(
        left >= Duration::from_millis(500),
        "left after {left:?}: too soon for an expiry, was the lease revoked?"
    );
    hosts
        .gateway
        .wait_log("agent n2 left (stopped, or its lease expired)", 1)
        .await;
    wait_answers(hosts.port, &[hosts.containers[0].hostname()], &|| {
        hosts.gateway.log_text()
    })
    .await;
}

#[tokio::test]
async fn sigterm_on_an_agent_withdraws_its_endpoints_at_once() {
    let mut hosts = TwoHosts::start(3, "10s").await;
    let service = hosts.service();
    hosts.agents[1].signal("TERM");
    let left = wait_endpoints(&hosts.gateway, &service, &[local(hosts.host_ports[0])]).await;
    eprintln!(
        "agent n2 stopped with SIGTERM: its endpoint left the gateway's pool after {} ms (lease TTL 10 s)",
        left.as_millis()
    );
    assert!(
        left < Duration::from_secs(2),
        "left after {left:?}: the lease was not revoked, it expired"
    );
    let status = hosts.agents[1].wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "the agent exits 0: {status}");
    let log = hosts.agents[1].log_text();
    assert!(
        log.contains("SIGTERM: withdrawing the registrations"),
        "{log}"
    );
    assert!(log.contains("revoked lease"), "{log}");
    wait_answers(hosts.port, &[hosts.containers[0].hostname()], &|| {
        hosts.gateway.log_text()
    })
    .await;
    // The other container is still running: only its registration is gone.
    let running = docker(&[
        "inspect",
        "-f",
        "{{.State.Running}}",
        &hosts.containers[1].id,
    ]);
    assert_eq!(running, "true");
}

#[tokio::test]
async fn with_one_etcd_member_killed_the_agents_and_the_gateway_go_on() {
    let mut hosts = TwoHosts::start(3, "2s").await;
    let service = hosts.service();
    let leader = hosts.etcd.leader().await;
    hosts.etcd.kill(leader);
    // Longer than the lease TTL: the agents keep their leases alive through the others.
    let killed = Instant::now();
    let both: BTreeSet<String> = hosts.host_ports.iter().map(|p| local(*p)).collect();
    while killed.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            endpoints(&hosts.gateway, &service).await,
            both,
            "the endpoints stay while a member is down\n{}",
            hosts.gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new container on the first host still reaches the gateway.
    let h3 = free_port();
    let run = format!("{}-n1", hosts.run);
    let web3 = run_web(&format!("web3-{run}"), &labels(&run, hosts.port), h3);
    let mut all: Vec<String> = both.into_iter().collect();
    all.push(local(h3));
    wait_endpoints(&hosts.gateway, &service, &all).await;
    wait_answers(hosts.port, &[web3.hostname()], &|| hosts.gateway.log_text()).await;
}

#[tokio::test]
async fn with_the_etcd_leader_frozen_the_agents_keep_their_leases() {
    // A frozen member keeps its connections open and answers nothing. A client learns that
    // it is gone only from its HTTP/2 pings, after up to 4 s: twice this lease's TTL. An
    // agent whose keep-alives go there, directly or through a follower that forwards them
    // to the frozen leader, must notice the silence itself and go to the members that answer.
    let hosts = TwoHosts::start(3, "2s").await;
    let service = hosts.service();
    let leader = hosts.etcd.leader().await;
    hosts.etcd.freeze(leader);
    let frozen = Instant::now();
    let both: BTreeSet<String> = hosts.host_ports.iter().map(|p| local(*p)).collect();
    while frozen.elapsed() < Duration::from_secs(6) {
        let now = endpoints(&hosts.gateway, &service).await;
        if now != both {
            hosts.etcd.thaw(leader);
            panic!(
                "after {:?} with the leader frozen the gateway has {now:?}, not {both:?}\n\
                 gateway:\n{}\nagent n1:\n{}\nagent n2:\n{}",
                frozen.elapsed(),
                hosts.gateway.log_text(),
                hosts.agents[0].log_text(),
                hosts.agents[1].log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hosts.etcd.thaw(leader);
}

#[tokio::test]
async fn the_gateway_keeps_serving_while_etcd_is_down_and_catches_up_after_a_compaction() {
    let mut hosts = TwoHosts::start(3, "2s").await;
    let service = hosts.service();
    let both = [local(hosts.host_ports[0]), local(hosts.host_ports[1])];
    let hostnames = [
        hosts.containers[0].hostname(),
        hosts.containers[1].hostname(),
    ];
    // Round robin or sticky, the answers come from the two containers.
    let answered = |body: &[u8]| hostnames.contains(&String::from_utf8_lossy(body).trim().into());

    // etcd goes away for longer than the agents' lease TTL: the gateway keeps the last known
    // agents' endpoints, and serves them.
    hosts.etcd.stop_all();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(3) {
        let (status, body) = get_fresh(([127, 0, 0, 1], hosts.port).into(), "/")
            .await
            .unwrap();
        assert!(
            status == StatusCode::OK && answered(&body),
            "{status} {body:?} while etcd is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        endpoints(&hosts.gateway, &service).await,
        both.iter().cloned().collect()
    );
    hosts
        .gateway
        .wait_log("serving the last known agents' endpoints and retrying", 1)
        .await;
    wait_metric(&hosts.gateway, "drover_source_up{source=\"agents\"} 0").await;

    // The gateway misses what happens next: etcd comes back, the agents register again, one
    // of them stops, and the history is compacted past what the gateway saw.
    hosts.gateway.signal("STOP");
    hosts.etcd.start_all().await;
    for agent in &hosts.agents {
        agent.wait_log("registered again as").await;
    }
    hosts.agents[1].signal("TERM");
    assert!(
        hosts.agents[1]
            .wait_exit(Duration::from_secs(10))
            .await
            .success()
    );
    assert!(hosts.agents[1].log_text().contains("revoked lease"));
    let revision = compact(&hosts.etcd).await;
    hosts.gateway.signal("CONT");

    // It resumes its watch from the revision it had, finds it compacted, and reads every
    // agent again: the stopped agent's endpoint leaves.
    wait_endpoints(&hosts.gateway, &service, &[local(hosts.host_ports[0])]).await;
    let log = hosts.gateway.wait_log("was compacted", 1).await;
    assert!(log.contains("reading every agent again"), "{log}");
    assert!(log.contains("reachable again"), "{log}");
    eprintln!("compacted at revision {revision}; the gateway read every agent again");
    wait_metric(&hosts.gateway, "drover_source_up{source=\"agents\"} 1").await;
    wait_answers(hosts.port, &[hosts.containers[0].hostname()], &|| {
        hosts.gateway.log_text()
    })
    .await;
}

#[tokio::test]
async fn register_puts_containers_in_consul_with_drover_tags_for_a_consul_tags_gateway() {
    let consul = ConsulDouble::start().await;
    let run = docker::run_id();
    let port = free_port();
    let (h1, h2) = (free_port(), free_port());
    let web1 = run_web(&format!("web1-{run}"), &labels(&run, port), h1);
    let register = format!("consul://{}", consul.addr);
    let mut agent = Agent::start(&run, "n1", &["--register", &register, "--ttl", "3s"]);
    let id1 = format!("drover-n1-web1-{run}");

    let deadline = Instant::now() + Duration::from_secs(15);
    let registered = loop {
        if let Some(r) = consul.services().get(&id1) {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{id1} never registered: {:?}\n{}",
            consul.services(),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(registered.name, format!("docker-{port}"));
    assert_eq!(
        (registered.address.as_str(), registered.port),
        ("127.0.0.1", h1)
    );
    for tag in [
        "drover.enable".to_string(),
        format!("drover.publish={port}"),
        "drover.policy=least_conn".to_string(),
    ] {
        assert!(registered.tags.contains(&tag), "{tag}: {registered:?}");
    }
    assert_eq!(
        registered.checks,
        [(format!("service:{id1}"), "passing".to_string())],
        "a TTL check the agent passes"
    );

    // A gateway that publishes Consul's services by their tags serves it.
    let gateway = Drover::start_args(&["--consul", &consul.address(), "--consul-tags"]).await;
    wait_answers(port, &[web1.hostname()], &|| gateway.log_text()).await;
    let service = format!("docker-{port}");
    wait_endpoints(&gateway, &service, &[local(h1)]).await;
    // The check stays passing over several TTLs: the agent passes it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        consul.services()[&id1].checks[0].1,
        "passing",
        "{}",
        agent.log_text()
    );

    let web2 = run_web(&format!("web2-{run}"), &labels(&run, port), h2);
    wait_endpoints(&gateway, &service, &[local(h1), local(h2)]).await;

    // A container that stops leaves Consul, and the gateway.
    docker(&["stop", "-t", "1", &web1.id]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while consul.services().contains_key(&id1) {
        assert!(
            Instant::now() < deadline,
            "{id1} still registered after its container stopped\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_endpoints(&gateway, &service, &[local(h2)]).await;
    wait_answers(port, &[web2.hostname()], &|| gateway.log_text()).await;

    // SIGTERM: the agent deregisters what it registered.
    agent.signal("TERM");
    assert!(agent.wait_exit(Duration::from_secs(10)).await.success());
    let left: Vec<String> = consul
        .services()
        .into_keys()
        .filter(|id| id.starts_with("drover-n1-"))
        .collect();
    assert!(left.is_empty(), "still registered: {left:?}");
    wait_endpoints(&gateway, &service, &[]).await;
}

/// `drover agent ARGS`: its exit status and what it printed on stderr.
fn agent_refuses(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("agent")
        .args(args)
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("DOCKER_HOST")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "drover agent {args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_flags_are_refused_with_what_would_be_right() {
    let e = agent_refuses(&["--store", "etcd://127.0.0.1:2379"]);
    assert!(e.contains("drover agent needs --docker"), "{e}");
    let e = agent_refuses(&["--docker"]);
    assert!(
        e.contains("--store etcd://HOST:PORT") && e.contains("--register consul://HOST:PORT"),
        "{e}"
    );
    let e = agent_refuses(&["--docker", "--store", "http://127.0.0.1:2379"]);
    assert!(
        e.contains("must start with etcd://") && e.contains("etcd://HOST:PORT"),
        "{e}"
    );
    let e = agent_refuses(&["--docker", "--store", "etcd://127.0.0.1"]);
    assert!(e.contains("has no port"), "{e}");
    let e = agent_refuses(&["--docker", "--register", "127.0.0.1:8500"]);
    assert!(e.contains("write consul://HOST:PORT"), "{e}");
    let e = agent_refuses(&["--docker", "--register", "consul://h", "--node", "a/b"]);
    assert!(e.contains("invalid node name"), "{e}");
    let e = agent_refuses(&["--docker", "--register", "consul://h", "--ttl", "100ms"]);
    assert!(e.contains("give 1s to 1h"), "{e}");
    let e = agent_refuses(&[
        "--docker",
        "--store",
        "etcd://127.0.0.1:2379",
        "--store-ca",
        "/nonexistent.pem",
    ]);
    assert!(
        e.contains("--store-ca is for TLS to etcd: write --store etcds://"),
        "{e}"
    );
    let e = agent_refuses(&[
        "--docker",
        "--register",
        "consul://127.0.0.1:1",
        "--docker-host",
        "ftp://x",
    ]);
    assert!(e.contains("invalid Docker address"), "{e}");

    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["run", "--agents", "consul://127.0.0.1:8500"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("must start with etcd://"), "{e}");
}
