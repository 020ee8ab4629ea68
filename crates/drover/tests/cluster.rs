//! Several drover instances on one real etcd cluster (`drover run --store etcd://…`): what one
//! instance's API makes serves through the others, concurrent writes through different
//! instances all land, and the cluster rides out etcd members, all of etcd, and an instance
//! dying. Every etcd is a real 3-member cluster on loopback ports (tests/support/etcd.rs).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use serde_json::{Value, json};
use support::etcd::EtcdCluster;
use support::*;

/// How long a change may take to reach every instance before a test fails.
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);

/// The key of the API's state under the default prefix.
const STATE_KEY: &str = "/drover/api/state";

/// A gateway on `etcd` with a config file that defines the service `web`, with no endpoints,
/// behind a listener of its own. Returns it and its listener's port.
async fn gateway(etcd: &EtcdCluster) -> (Drover, u16) {
    let port = free_port();
    let d = Drover::start_with(&one_service(port, &[]), &["--store", &etcd.url()]).await;
    (d, port)
}

/// The admin API, with transport errors as errors (an instance may be dead).
async fn try_api(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), String> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .body(full(body.map(|b| b.to_string()).unwrap_or_default()))
        .unwrap();
    let (status, _, bytes) = send(&client(), req).await?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

async fn add(d: &Drover, address: SocketAddr, weight: u32) -> (StatusCode, Value) {
    let body = json!({"address": address.to_string(), "weight": weight}).to_string();
    d.api("POST", "/api/v1/services/web/endpoints", Some(&body))
        .await
}

async fn set_weight(d: &Drover, address: SocketAddr, weight: u32) -> (StatusCode, Value) {
    let body = json!({ "weight": weight }).to_string();
    d.api(
        "PATCH",
        &format!("/api/v1/services/web/endpoints/{address}"),
        Some(&body),
    )
    .await
}

/// The endpoints of `web` and their weights, as an instance's API shows them.
async fn endpoints(d: &Drover) -> BTreeMap<String, u64> {
    let (status, v) = d.api("GET", "/api/v1/services/web", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Waits until `d`'s API shows `address` with `weight`; returns when it did.
async fn wait_endpoint(d: &Drover, address: SocketAddr, weight: u64) -> Instant {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    loop {
        if endpoints(d).await.get(&address.to_string()) == Some(&weight) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{address} with weight {weight} never showed; endpoints: {:?}\n{}",
            endpoints(d).await,
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until `d`'s API shows exactly `expected`.
async fn wait_endpoints(d: &Drover, expected: &BTreeMap<String, u64>) {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    while endpoints(d).await != *expected {
        assert!(
            Instant::now() < deadline,
            "the endpoints never became {expected:?}; they are {:?}\n{}",
            endpoints(d).await,
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until a request through `port` is answered by `origin`.
async fn wait_traffic(port: u16, origin: &str) {
    let http = client();
    let url = format!("http://127.0.0.1:{port}/");
    let deadline = Instant::now() + CONVERGE_WITHIN;
    loop {
        if let Ok((StatusCode::OK, headers, _)) = try_get(&http, &url).await
            && origin_of(&headers) == origin
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{origin} never answered through port {port}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The API's state as etcd holds it.
async fn state_in_etcd(etcd: &EtcdCluster) -> Value {
    let (text, _) = etcd.get(STATE_KEY).await.expect("the state key exists");
    serde_json::from_str(&text).unwrap()
}

/// The endpoints the API added to `web`, and their weights, from a state document.
fn added_in(state: &Value) -> BTreeMap<String, u64> {
    let overrides = &state["patches"]["overrides"]["web"];
    state["patches"]["added"]["web"]
        .as_array()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let address = e["address"].as_str().unwrap().to_string();
            let weight = overrides[&address]["weight"]
                .as_u64()
                .unwrap_or_else(|| e["weight"].as_u64().unwrap());
            (address, weight)
        })
        .collect()
}

/// `drover_source_up{source="api"}` from an instance's /metrics.
async fn api_source_up(d: &Drover) -> Option<f64> {
    let (_, _, body) = get(&client(), &format!("http://{}/metrics", d.admin)).await;
    String::from_utf8_lossy(&body).lines().find_map(|l| {
        l.strip_prefix("drover_source_up{source=\"api\"} ")
            .and_then(|v| v.trim().parse().ok())
    })
}

async fn wait_api_source_up(d: &Drover, up: f64) {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    while api_source_up(d).await != Some(up) {
        assert!(
            Instant::now() < deadline,
            "drover_source_up{{source=\"api\"}} never became {up}: {:?}",
            api_source_up(d).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_through_one_instance_serves_through_the_other() {
    let etcd = EtcdCluster::start(3).await;
    let (a, _a_port) = gateway(&etcd).await;
    let (b, b_port) = gateway(&etcd).await;
    let names: Vec<String> = (0..26).map(|i| format!("o{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let origins = origins(&names).await;

    let (status, _, _) = get(&client(), &format!("http://127.0.0.1:{b_port}/")).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "web has no endpoint yet"
    );
    let (status, v) = add(&a, origins[0].addr, 1).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    wait_traffic(b_port, "o0").await;
    let (_, v) = b.api("GET", "/api/v1/services/web", None).await;
    assert_eq!(
        v["endpoints"][0]["source"], "api",
        "B shows the endpoint as the API's: {v}"
    );

    // 50 changes through A, alternately an endpoint added and a weight changed, each timed
    // from the call to A until B's API shows it.
    let mut propagation = Vec::new();
    let mut calls = Vec::new();
    let mut after_answer = Vec::new();
    for i in 0..50 {
        let started = Instant::now();
        let (address, weight) = if i % 2 == 0 {
            let address = origins[i / 2 + 1].addr;
            let (status, v) = add(&a, address, 1).await;
            assert_eq!(status, StatusCode::CREATED, "{v}");
            (address, 1)
        } else {
            let weight = i as u32 + 1;
            let (status, v) = set_weight(&a, origins[0].addr, weight).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            (origins[0].addr, weight)
        };
        let answered = Instant::now();
        calls.push(answered - started);
        let seen = wait_endpoint(&b, address, u64::from(weight)).await;
        propagation.push(seen - started);
        after_answer.push(seen - answered);
    }
    propagation.sort();
    calls.sort();
    after_answer.sort();
    eprintln!(
        "propagation of 50 changes, from the call to A until B's API shows it: p50 {}, p99 {}, max {} (A's call alone: p50 {}, p99 {}, max {}; from A's answer to B: p50 {}, p99 {}, max {})",
        ms(percentile(&propagation, 0.5)),
        ms(percentile(&propagation, 0.99)),
        ms(*propagation.last().unwrap()),
        ms(percentile(&calls, 0.5)),
        ms(percentile(&calls, 0.99)),
        ms(*calls.last().unwrap()),
        ms(percentile(&after_answer, 0.5)),
        ms(percentile(&after_answer, 0.99)),
        ms(*after_answer.last().unwrap()),
    );

    // Both instances and etcd agree, and B's traffic reaches an origin added last.
    let expected = endpoints(&a).await;
    assert_eq!(expected.len(), 26);
    assert_eq!(endpoints(&b).await, expected);
    assert_eq!(added_in(&state_in_etcd(&etcd).await), expected);
    wait_traffic(b_port, "o25").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_two_instances_all_land() {
    let etcd = EtcdCluster::start(3).await;
    let (a, _) = gateway(&etcd).await;
    let (b, _) = gateway(&etcd).await;
    let first: Vec<SocketAddr> = (0..6)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 30001 + i)))
        .collect();
    for address in &first {
        assert_eq!(add(&a, *address, 1).await.0, StatusCode::CREATED);
    }
    wait_endpoint(&b, first[5], 1).await;

    // 20 endpoints added and 6 weights set, all at once, half through each instance.
    let mut calls = tokio::task::JoinSet::new();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..20u16 {
        let address = SocketAddr::from(([127, 0, 0, 1], 31001 + i));
        expected.insert(address.to_string(), 1);
        let admin = if i % 2 == 0 { a.admin } else { b.admin };
        calls.spawn(async move {
            let body = json!({"address": address.to_string(), "weight": 1});
            let answer = try_api(admin, "POST", "/api/v1/services/web/endpoints", Some(body)).await;
            (
                format!("add {address} through {admin}"),
                answer,
                StatusCode::CREATED,
            )
        });
    }
    for (i, address) in first.iter().enumerate() {
        let weight = 10 + i as u64;
        expected.insert(address.to_string(), weight);
        let admin = if i % 2 == 0 { b.admin } else { a.admin };
        let address = *address;
        calls.spawn(async move {
            let answer = try_api(
                admin,
                "PATCH",
                &format!("/api/v1/services/web/endpoints/{address}"),
                Some(json!({ "weight": weight })),
            )
            .await;
            (
                format!("weight of {address} through {admin}"),
                answer,
                StatusCode::OK,
            )
        });
    }
    while let Some(done) = calls.join_next().await {
        let (what, answer, wanted) = done.unwrap();
        let (status, body) = answer.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(status, wanted, "{what}: {body}");
    }

    // Nothing lost: both instances and etcd hold all 26 endpoints and the 6 weights.
    wait_endpoints(&a, &expected).await;
    wait_endpoints(&b, &expected).await;
    assert_eq!(added_in(&state_in_etcd(&etcd).await), expected);
    let retried = a
        .log_text()
        .matches("changed through another instance")
        .count()
        + b.log_text()
            .matches("changed through another instance")
            .count();
    eprintln!(
        "26 concurrent changes through two instances: {retried} states applied from the other instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_watches_go_on_with_one_etcd_member_down() {
    let mut etcd = EtcdCluster::start(3).await;
    let (a, _) = gateway(&etcd).await;
    let (b, b_port) = gateway(&etcd).await;
    let origins = origins(&["one", "two", "three", "four", "five"]).await;
    assert_eq!(add(&a, origins[0].addr, 1).await.0, StatusCode::CREATED);
    wait_traffic(b_port, "one").await;

    // The leader first: a write its followers had sent it is lost with it, and the next
    // leader takes about a second to be elected. Then a follower.
    for step in 0..2 {
        let leader = etcd.leader().await;
        let down = if step == 0 { leader } else { (leader + 1) % 3 };
        etcd.kill(down);
        // Writes through either instance succeed at once, and the other sees them.
        for round in 0..2 {
            let origin = &origins[1 + step * 2 + round];
            let (writer, reader) = if round == 0 { (&a, &b) } else { (&b, &a) };
            let started = Instant::now();
            let (status, v) = add(writer, origin.addr, 1).await;
            eprintln!(
                "with member {down} down{}: a write answered {status} in {}",
                if step == 0 {
                    " (the leader)"
                } else {
                    " (a follower)"
                },
                ms(started.elapsed())
            );
            assert_eq!(
                status,
                StatusCode::CREATED,
                "with member {down} down: {v}\n{}",
                writer.log_text()
            );
            wait_endpoint(reader, origin.addr, 1).await;
            let (status, v) = set_weight(reader, origin.addr, 3).await;
            assert_eq!(status, StatusCode::OK, "with member {down} down: {v}");
            wait_endpoint(writer, origin.addr, 3).await;
        }
        etcd.restart(down).await;
    }
    wait_traffic(b_port, "five").await;
    let expected = endpoints(&a).await;
    assert_eq!(expected.len(), 5);
    assert_eq!(endpoints(&b).await, expected);
    assert_eq!(added_in(&state_in_etcd(&etcd).await), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_all_of_etcd_down_instances_keep_serving_and_refuse_writes_then_converge() {
    let mut etcd = EtcdCluster::start(3).await;
    let (a, a_port) = gateway(&etcd).await;
    let (b, b_port) = gateway(&etcd).await;
    let origins = origins(&["one", "two", "three"]).await;
    assert_eq!(add(&a, origins[0].addr, 1).await.0, StatusCode::CREATED);
    wait_traffic(a_port, "one").await;
    wait_traffic(b_port, "one").await;
    wait_api_source_up(&a, 1.0).await;

    etcd.stop_all();
    // Both notice, and say so in /metrics.
    wait_api_source_up(&a, 0.0).await;
    wait_api_source_up(&b, 0.0).await;
    // The last pool keeps serving.
    let http = client();
    for port in [a_port, b_port] {
        for _ in 0..20 {
            let (status, headers, _) = get(&http, &format!("http://127.0.0.1:{port}/")).await;
            assert_eq!(
                (status, origin_of(&headers)),
                (StatusCode::OK, "one".into())
            );
        }
    }
    // Writes are refused, saying why and that nothing changed: not even for a moment.
    let generation = a.generation().await;
    let started = Instant::now();
    let (status, v) = add(&a, origins[1].addr, 1).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            "the cluster store {}/drover cannot be reached: ",
            etcd.url()
        )) && error.ends_with("; nothing was changed"),
        "{error}"
    );
    eprintln!(
        "a write with etcd down answered in {}: {error}",
        ms(started.elapsed())
    );
    let (status, v) = set_weight(&b, origins[0].addr, 5).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(
        a.generation().await,
        generation,
        "the refused change never went in force"
    );
    // Nothing changed: reads answer from memory, with the pool as it was.
    let before: BTreeMap<String, u64> = [(origins[0].addr.to_string(), 1)].into();
    assert_eq!(endpoints(&a).await, before);
    assert_eq!(endpoints(&b).await, before);
    for port in [a_port, b_port] {
        let (status, headers, _) = get(&http, &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(
            (status, origin_of(&headers)),
            (StatusCode::OK, "one".into())
        );
    }

    // etcd comes back: writes work again, through either instance, and both converge.
    etcd.start_all().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = add(&b, origins[1].addr, 1).await;
        if status == StatusCode::CREATED {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert!(Instant::now() < deadline, "writes never worked again: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_endpoint(&a, origins[1].addr, 1).await;
    wait_traffic(a_port, "two").await;
    let (status, v) = add(&a, origins[2].addr, 1).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    wait_endpoint(&b, origins[2].addr, 1).await;
    wait_traffic(b_port, "three").await;
    wait_api_source_up(&a, 1.0).await;
    wait_api_source_up(&b, 1.0).await;
    assert_eq!(endpoints(&a).await, endpoints(&b).await);
    assert_eq!(added_in(&state_in_etcd(&etcd).await), endpoints(&a).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_under_load_loses_nothing_and_reads_it_all_back() {
    let etcd = EtcdCluster::start(3).await;
    let (mut a, a_port) = gateway(&etcd).await;
    let (b, b_port) = gateway(&etcd).await;
    let origins = origins(&["one", "two", "three"]).await;
    for (i, origin) in origins[..2].iter().enumerate() {
        assert_eq!(
            add(&a, origin.addr, i as u32 + 1).await.0,
            StatusCode::CREATED
        );
    }
    wait_endpoint(&b, origins[1].addr, 2).await;

    // Traffic through B all along.
    let (stop_load, mut stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let http = client();
        let url = format!("http://127.0.0.1:{b_port}/");
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !*stopped.borrow_and_update() {
            match try_get(&http, &url).await {
                Ok((StatusCode::OK, _, _)) => ok += 1,
                other => failed.push(format!("{:?}", other.map(|r| r.0))),
            }
        }
        (ok, failed)
    });
    // Writes through A, one after the other, until A dies: disabled endpoints, so that
    // they take no traffic. Each one A acknowledged must survive it.
    let admin = a.admin;
    let writer = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        for i in 0..10_000u16 {
            // On 127.0.0.2: the origins listen on 127.0.0.1, on ports the kernel picks, and
            // one of them once took a port of this range (a 409 for an endpoint it has).
            let address = SocketAddr::from(([127, 0, 0, 2], 41000 + i));
            let body = json!({"address": address.to_string(), "weight": 1, "state": "disabled"});
            match try_api(admin, "POST", "/api/v1/services/web/endpoints", Some(body)).await {
                Ok((StatusCode::CREATED, _)) => acknowledged.push(address.to_string()),
                Ok((status, v)) => panic!("{address}: {status} {v}"),
                Err(_) => break,
            }
        }
        acknowledged
    });
    let deadline = Instant::now() + CONVERGE_WITHIN;
    while endpoints(&b).await.len() < 2 + 20 {
        assert!(Instant::now() < deadline, "A's writes did not reach B");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.signal("KILL");
    let acknowledged = writer.await.unwrap();
    assert!(acknowledged.len() >= 20);

    // Every change A acknowledged is in etcd and in force on B.
    let in_etcd = added_in(&state_in_etcd(&etcd).await);
    for address in &acknowledged {
        assert!(in_etcd.contains_key(address), "{address} was lost");
    }
    wait_endpoints(&b, &in_etcd).await;
    // B goes on taking writes while A is dead.
    assert_eq!(add(&b, origins[2].addr, 1).await.0, StatusCode::CREATED);
    wait_traffic(b_port, "three").await;

    // A comes back and reads it all, B's write included.
    a.kill_and_restart().await;
    let in_etcd = added_in(&state_in_etcd(&etcd).await);
    assert!(in_etcd.contains_key(&origins[2].addr.to_string()));
    wait_endpoints(&a, &in_etcd).await;
    wait_traffic(a_port, "three").await;
    assert_eq!(endpoints(&b).await, in_etcd);
    stop_load.send(true).unwrap();
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "B failed {} of {} requests while A died: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!(
        "B served {ok} requests without a failure; A acknowledged {} writes before SIGKILL, all in etcd",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_while_etcd_is_down_serves_its_file_then_applies_the_state() {
    let mut etcd = EtcdCluster::start(3).await;
    let (a, _) = gateway(&etcd).await;
    let origin = Origin::start("one").await;
    assert_eq!(add(&a, origin.addr, 1).await.0, StatusCode::CREATED);
    // An api-state.json left from before --store is not used, and the log says so.
    etcd.stop_all();
    let (c, c_port) = gateway(&etcd).await;
    c.wait_log("starting without the state made through the API", 1)
        .await;
    let (status, _, _) = get(&client(), &format!("http://127.0.0.1:{c_port}/")).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "only the file's world: web has no endpoint"
    );
    let (status, v) = add(&c, origin.addr, 1).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("cannot be reached"),
        "{v}"
    );

    etcd.start_all().await;
    wait_traffic(c_port, "one").await;
    wait_endpoint(&c, origin.addr, 1).await;
    let (_, v) = c.api("GET", "/api/v1/services/web", None).await;
    assert_eq!(v["endpoints"][0]["source"], "api");
}

/// A drover process started by hand, killed on drop.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_is_not_used_with_a_store() {
    let etcd = EtcdCluster::start(3).await;
    let origin = Origin::start("one").await;
    let port = free_port();
    // A drover on its own saves to api-state.json...
    let mut alone = Drover::start(&one_service(port, &[])).await;
    assert_eq!(add(&alone, origin.addr, 1).await.0, StatusCode::CREATED);
    let data = alone.dir.path().join("data");
    assert!(data.join("api-state.json").exists());
    alone.signal("TERM");
    alone.wait_exit(Duration::from_secs(10)).await;

    // ...which the same drover with --store leaves alone, saying where its state is now.
    let admin = format!("127.0.0.1:{}", free_port());
    let log = alone.dir.path().join("with-store.log");
    let out = std::fs::File::create(&log).unwrap();
    let _d = Process(
        Command::new(env!("CARGO_BIN_EXE_drover"))
            .arg("run")
            .arg("--config")
            .arg(&alone.config)
            .arg("--data-dir")
            .arg(&data)
            .args(["--admin", &admin, "--store", &etcd.url()])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("admin API on") {
            break text;
        }
        assert!(Instant::now() < deadline, "drover did not start:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        text.contains("api-state.json is not used: with --store")
            && text.contains(&format!("etcdctl put {STATE_KEY} <")),
        "{text}"
    );
    let (_, _, body) = get(&client(), &format!("http://{admin}/api/v1/services/web")).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["endpoints"], json!([]), "the file's state is not applied");
    assert!(etcd.get(STATE_KEY).await.is_none(), "nor written to etcd");
}

/// Runs `drover run ARGS`, which must fail at start-up; returns its exit code and output.
fn run_failing(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("run")
        .args(args)
        .env_remove("DROVER_STORE_PASSWORD")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn bad_store_flags_stop_start_up_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let base = ["--admin", admin.as_str(), "--data-dir", data];
    for (args, expected) in [
        (
            vec!["--store", "http://127.0.0.1:2379"],
            "invalid store \"http://127.0.0.1:2379\": it must start with etcd:// (or etcds:// for TLS)",
        ),
        (
            vec!["--store", "etcd://127.0.0.1:2379", "--store-cert", "c.pem"],
            "--store-cert needs --store-key",
        ),
        (
            vec!["--store", "etcds://127.0.0.1:2379"],
            "uses TLS: give --store-ca FILE",
        ),
        (
            vec!["--store", "etcd://127.0.0.1:2379", "--store-user", "root"],
            "--store-user needs a password",
        ),
        (vec!["--store-ca", "ca.pem"], "--store-ca needs --store"),
    ] {
        let mut all = base.to_vec();
        all.extend(args.iter().copied());
        let (code, text) = run_failing(&all);
        assert_ne!(code, 0, "{args:?}");
        assert!(text.contains(expected), "{args:?}: {text}");
    }
}
