//! Traffic management against real origins that fail, stop and come back: active health
//! checks (fall and rise), outlier ejection with backoff, panic mode, retries while origins
//! die under load, policies and stickiness.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::Value;
use support::*;

/// A config with one listener routing everything to service `web`, whose section ends with
/// `extra` (TOML lines such as `policy = "random"` or a `[services.web.health_check]` table).
fn service_config(port: u16, endpoints: &[(SocketAddr, u32)], extra: &str) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "[[listeners]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\n\n[[routes]]\nlistener = \"web\"\nservice = \"web\"\n\n[services.web]\nendpoints = [ {} ]\n{extra}\n",
        list.join(", ")
    )
}

/// One endpoint of service `web`, from the API's service view.
async fn endpoint_view(d: &Drover, address: SocketAddr) -> Value {
    let (_, service) = d.api("GET", "/api/v1/services/web", None).await;
    service["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == address.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {address} in {service}"))
}

async fn wait_for_state(d: &Drover, address: SocketAddr, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = endpoint_view(d, address).await;
        if v["health"]["state"] == state {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{address} never became {state}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hits(port: u16, n: usize) -> HashMap<String, usize> {
    let client = client();
    let mut out = HashMap::new();
    for _ in 0..n {
        let (_, headers, _) = get(&client, &format!("http://127.0.0.1:{port}/")).await;
        *out.entry(origin_of(&headers)).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_an_endpoint_down_after_fall_and_back_after_rise() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    let check = "[services.web.health_check]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nfall = 3\nrise = 2";
    let d = Drover::start(&service_config(port, &[(a.addr, 1), (b.addr, 1)], check)).await;
    assert_eq!(hits(port, 10).await.len(), 2);

    a.state.fail_with(500);
    let failed_at = Instant::now();
    let v = wait_for_state(&d, a.addr, "unhealthy", Duration::from_secs(5)).await;
    let took = failed_at.elapsed();
    // Three failed checks 200 ms apart: not before the third one.
    assert!(
        took >= Duration::from_millis(400),
        "down too soon: {took:?}"
    );
    assert!(
        v["health"]["reason"]
            .as_str()
            .unwrap()
            .contains("3 consecutive failed checks"),
        "{v}"
    );
    assert_eq!(
        v["health"]["last_check_error"],
        "status 500, expected 200-299"
    );
    assert_eq!(hits(port, 10).await, HashMap::from([("b".to_string(), 10)]));

    a.state.recover();
    let v = wait_for_state(&d, a.addr, "healthy", Duration::from_secs(5)).await;
    assert!(
        v["health"]["reason"]
            .as_str()
            .unwrap()
            .contains("2 consecutive passing checks"),
        "{v}"
    );
    assert_eq!(hits(port, 10).await.len(), 2, "a takes traffic again");
    let log = d.log_text();
    assert!(
        log.contains("endpoint is down after 3 failed checks")
            && log.contains("endpoint is healthy again")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_check_notices_a_stopped_origin_and_waiting_endpoints_start_after_a_pass() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    let check = "wait_for_first_check = true\n[services.web.health_check]\nkind = \"tcp\"\ninterval = \"150ms\"\nfall = 2\nrise = 1";
    let d = Drover::start(&service_config(port, &[(a.addr, 1), (b.addr, 1)], check)).await;
    wait_for_state(&d, a.addr, "healthy", Duration::from_secs(5)).await;
    wait_for_state(&d, b.addr, "healthy", Duration::from_secs(5)).await;
    a.stop();
    let v = wait_for_state(&d, a.addr, "unhealthy", Duration::from_secs(5)).await;
    assert!(
        v["health"]["last_check_error"]
            .as_str()
            .unwrap()
            .starts_with("connect:"),
        "{v}"
    );
    assert_eq!(hits(port, 6).await, HashMap::from([("b".to_string(), 6)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_an_endpoint_with_a_growing_time() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    let outlier = "[services.web.outlier]\nconsecutive_failures = 3\nbase_ejection = \"500ms\"\nmax_ejection = \"10s\"";
    let d = Drover::start(&service_config(port, &[(a.addr, 1), (b.addr, 1)], outlier)).await;
    a.state.fail_with(500);
    let client = client();
    // a answers 500 until it has failed three times in a row; then only b answers.
    let mut from_a = 0;
    for _ in 0..20 {
        let (status, headers, _) = get(&client, &format!("http://127.0.0.1:{port}/")).await;
        if origin_of(&headers) == "a" {
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            from_a += 1;
        }
    }
    assert_eq!(from_a, 3, "ejected at the third failure");
    let v = endpoint_view(&d, a.addr).await;
    assert_eq!(
        (
            v["health"]["state"].as_str(),
            v["health"]["ejections"].as_u64()
        ),
        (Some("ejected"), Some(1)),
        "{v}"
    );

    // After 500 ms it is back; three more failures eject it for twice as long.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut from_a = 0;
    for _ in 0..20 {
        let (_, headers, _) = get(&client, &format!("http://127.0.0.1:{port}/")).await;
        from_a += usize::from(origin_of(&headers) == "a");
    }
    assert_eq!(from_a, 3);
    let v = endpoint_view(&d, a.addr).await;
    assert_eq!(v["health"]["ejections"], 2, "{v}");
    assert!(
        v["health"]["reason"]
            .as_str()
            .unwrap()
            .contains("ejected for 1s (ejection 2)"),
        "{v}"
    );
    assert!(
        d.log_text()
            .contains("endpoint ejected for 1s after 3 consecutive failures")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_endpoint_down_all_are_served_and_the_service_says_panic() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    let check = "[services.web.health_check]\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1";
    let d = Drover::start(&service_config(port, &[(a.addr, 1), (b.addr, 1)], check)).await;
    a.state.fail_with(503);
    b.state.fail_with(503);
    wait_for_state(&d, a.addr, "unhealthy", Duration::from_secs(5)).await;
    wait_for_state(&d, b.addr, "unhealthy", Duration::from_secs(5)).await;
    // Both down: requests still reach them rather than nobody.
    let before = endpoint_view(&d, a.addr).await["responses"]
        .as_u64()
        .unwrap()
        + endpoint_view(&d, b.addr).await["responses"]
            .as_u64()
            .unwrap();
    let seen = hits(port, 10).await;
    assert!(
        seen.contains_key("a") || seen.contains_key("b"),
        "answered by an origin: {seen:?}"
    );
    for origin in [&a, &b] {
        let v = endpoint_view(&d, origin.addr).await;
        assert!(
            v["responses"].as_u64().unwrap() > 0,
            "{} got no request in panic mode: {v}",
            origin.name
        );
    }
    let after = endpoint_view(&d, a.addr).await["responses"]
        .as_u64()
        .unwrap()
        + endpoint_view(&d, b.addr).await["responses"]
            .as_u64()
            .unwrap();
    assert!(
        after >= before + 10,
        "every request reached an origin: {before} -> {after}"
    );
    let (_, service) = d.api("GET", "/api/v1/services/web", None).await;
    assert_eq!(service["panic"], true, "{service}");
    assert!(d.log_text().contains("panic mode: no endpoint is healthy"));
    a.state.recover();
    wait_for_state(&d, a.addr, "healthy", Duration::from_secs(5)).await;
    assert_eq!(hits(port, 6).await, HashMap::from([("a".to_string(), 6)]));
    let (_, service) = d.api("GET", "/api/v1/services/web", None).await;
    assert_eq!(service["panic"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_killed_one_by_one_under_load_fail_no_get() {
    let mut origins = origins(&["a", "b", "c"]).await;
    let addrs: Vec<(SocketAddr, u32)> = origins.iter().map(|o| (o.addr, 1)).collect();
    let port = free_port();
    let check =
        "[services.web.health_check]\npath = \"/health\"\ninterval = \"250ms\"\nfall = 2\nrise = 2";
    let d = Drover::start(&service_config(port, &addrs, check)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for w in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let client = client();
            let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            while !stop.load(Ordering::Relaxed) {
                let status = if w == 3 {
                    get_fresh(target, "/").await.map(|r| r.0)
                } else {
                    try_get(&client, &format!("http://{target}/"))
                        .await
                        .map(|r| r.0)
                };
                match status {
                    Ok(StatusCode::OK) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for origin in origins.iter_mut() {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (name, addr) = (origin.name.clone(), origin.addr);
        origin.stop();
        tokio::time::sleep(Duration::from_millis(800)).await;
        *origin = Origin::start_on(&name, addr.port()).await;
        wait_for_state(&d, addr, "healthy", Duration::from_secs(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (_, service) = d.api("GET", "/api/v1/services/web", None).await;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "{ok} GETs succeeded, {failed} failed, {} retries",
        service["retries"]
    );
    assert_eq!(failed, 0, "{}", d.log_text());
    assert!(ok > 500, "too little load: {ok}");
    assert!(
        service["retries"].as_u64().unwrap() > 0,
        "killing origins took retries: {service}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_is_retried_for_gets_but_not_for_posts() {
    let bad = Origin::start("bad").await;
    let good = Origin::start("good").await;
    bad.state.fail_with(502);
    let port = free_port();
    // Outlier ejection off, so that the failing origin stays in the pool for the POSTs.
    let no_ejection = "[services.web.outlier]\nconsecutive_failures = 0";
    let d = Drover::start(&service_config(
        port,
        &[(bad.addr, 1), (good.addr, 1)],
        no_ejection,
    ))
    .await;
    let client = client();
    for _ in 0..6 {
        let (status, headers, _) = get(&client, &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(
            (status, origin_of(&headers)),
            (StatusCode::OK, "good".to_string())
        );
    }
    let mut posts = HashMap::new();
    for _ in 0..6 {
        let req = Request::post(format!("http://127.0.0.1:{port}/echo"))
            .body(full("x"))
            .unwrap();
        let (status, _, _) = send(&client, req).await.unwrap();
        *posts.entry(status.as_u16()).or_insert(0) += 1;
    }
    assert!(
        posts.get(&502).is_some_and(|n| *n > 0),
        "a POST's 502 is passed on: {posts:?}"
    );
    let (_, service) = d.api("GET", "/api/v1/services/web", None).await;
    assert!(service["retries"].as_u64().unwrap() >= 3, "{service}");
}

/// GETs to service `web` while its endpoint `a` takes 3 s to answer, until one of them is
/// tried on `a` (its failures counter rises; round robin gets there within a few): each must
/// come back from `b`, well before `a` would have answered. Sent with the caller's `client`.
async fn gets_until_a_times_out(
    d: &Drover,
    client: &Client<HttpConnector, Body>,
    a: SocketAddr,
    url: &str,
) {
    let failures = || async { endpoint_view(d, a).await["failures"].as_u64().unwrap() };
    let before = failures().await;
    for _ in 0..4 {
        let started = Instant::now();
        let (status, headers, _) = get(client, url).await;
        assert_eq!((status, origin_of(&headers)), (StatusCode::OK, "b".into()));
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "the try on a was not cut at its deadline: {:?}",
            started.elapsed()
        );
        if failures().await > before {
            return;
        }
    }
    panic!("no GET was tried on a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_past_its_deadline_goes_to_another_endpoint_on_a_reused_connection_too() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    // Ejection off, so that `a` stays in turn however often it times out.
    let extra = "[services.web.retries]\nper_try_timeout = \"300ms\"\n\n[services.web.outlier]\nconsecutive_failures = 0";
    // One worker, whose pool every request draws on, whichever client connection carries
    // it (see `a_request_crossing_the_origin_s_idle_close_goes_again_when_it_may`).
    let config = service_config(port, &[(a.addr, 1), (b.addr, 1)], extra);
    let d = Drover::start_with(&config, &["--workers", "1"]).await;
    let client = client();
    let url = format!("http://127.0.0.1:{port}/");

    // Requests one after another: each endpoint's pooled connection carries all of them, and
    // each one's deadline moves the connection's timer later.
    for _ in 0..6 {
        let (status, _, _) = get(&client, &url).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!((a.state.connections(), b.state.connections()), (1, 1));

    // Right away, within the last deadline: `a` turns slow, and the first GET it gets is
    // cut at 300 ms and answered by `b`.
    a.state.delay(Duration::from_secs(3));
    gets_until_a_times_out(&d, &client, a.addr, &url).await;

    // Its connection broke with the cut try; a new one carries the next GETs. Then it sits
    // idle in the pool past its last deadline, so its timer goes off there, and the next
    // request must set it again.
    a.state.delay(Duration::ZERO);
    for _ in 0..4 {
        let (status, _, _) = get(&client, &url).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(a.state.connections(), 2);
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.state.delay(Duration::from_secs(3));
    gets_until_a_times_out(&d, &client, a.addr, &url).await;
    assert_eq!(
        a.state.connections(),
        2,
        "the try was cut on the reused connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_random_and_least_conn_spread_as_configured() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    let d = Drover::start(&service_config(
        port,
        &[(a.addr, 1), (b.addr, 3)],
        "policy = \"random\"",
    ))
    .await;
    let seen = hits(port, 800).await;
    let share = seen["b"] as f64 / 800.0;
    assert!(
        (0.68..=0.82).contains(&share),
        "weight 3 of 4 got {share}: {seen:?}"
    );
    drop(d);

    // least_conn: with three slow requests in flight, split 2:1, the next request goes to
    // the endpoint with fewer.
    let port = free_port();
    let d = Drover::start(&service_config(
        port,
        &[(a.addr, 1), (b.addr, 1)],
        "policy = \"least_conn\"",
    ))
    .await;
    let mut slow = Vec::new();
    for _ in 0..3 {
        let url = format!("http://127.0.0.1:{port}/slow?ms=1500");
        slow.push(tokio::spawn(async move { get(&client(), &url).await.1 }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let in_flight = |v: Value| v["in_flight"].as_u64().unwrap();
    let (on_a, on_b) = (
        in_flight(endpoint_view(&d, a.addr).await),
        in_flight(endpoint_view(&d, b.addr).await),
    );
    assert_eq!(on_a + on_b, 3, "{on_a} + {on_b}");
    let lighter = if on_a < on_b { "a" } else { "b" };
    let (_, headers, _) = get(&client(), &format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(
        origin_of(&headers),
        lighter,
        "a has {on_a} in flight, b {on_b}"
    );
    for s in slow {
        s.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let origins = origins(&["a", "b", "c"]).await;
    let port = free_port();
    let eps: Vec<(SocketAddr, u32)> = origins.iter().map(|o| (o.addr, 1)).collect();
    let _d = Drover::start(&service_config(
        port,
        &eps,
        "policy = \"consistent_hash\"\nhash_on = \"header:X-User\"",
    ))
    .await;
    let client = client();
    let mut owners = HashMap::new();
    for user in 0..30 {
        for _ in 0..3 {
            let req = Request::get(format!("http://127.0.0.1:{port}/"))
                .header("x-user", format!("user-{user}"))
                .body(empty())
                .unwrap();
            let (_, headers, _) = send(&client, req).await.unwrap();
            let owner = owners.entry(user).or_insert_with(|| origin_of(&headers));
            assert_eq!(*owner, origin_of(&headers), "user-{user} moved");
        }
    }
    let used: std::collections::HashSet<_> = owners.values().collect();
    assert_eq!(used.len(), 3, "30 keys use all three endpoints: {owners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_holds_while_its_endpoint_is_healthy_and_moves_when_not() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    let extra = "[services.web.sticky]\nmode = \"cookie\"\ncookie = \"SRV\"\n[services.web.health_check]\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1";
    let d = Drover::start(&service_config(port, &[(a.addr, 1), (b.addr, 1)], extra)).await;
    let client = client();
    let url = format!("http://127.0.0.1:{port}/");
    let (_, headers, _) = get(&client, &url).await;
    let first = origin_of(&headers);
    let set = headers["set-cookie"].to_str().unwrap().to_string();
    assert!(set.starts_with("SRV=") && set.contains("HttpOnly"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let with_cookie = |cookie: String| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let req = Request::get(url)
                .header("cookie", format!("other=1; {cookie}"))
                .body(empty())
                .unwrap();
            send(&client, req).await.unwrap().1
        }
    };
    for _ in 0..8 {
        let headers = with_cookie(cookie.clone()).await;
        assert_eq!(origin_of(&headers), first, "held by the cookie");
        assert!(
            headers.get("set-cookie").is_none(),
            "no new cookie while it holds"
        );
    }
    let holder = if first == "a" { &a } else { &b };
    holder.state.fail_with(500);
    wait_for_state(&d, holder.addr, "unhealthy", Duration::from_secs(5)).await;
    let headers = with_cookie(cookie.clone()).await;
    assert_ne!(
        origin_of(&headers),
        first,
        "moved off the unhealthy endpoint"
    );
    assert!(
        headers["set-cookie"].to_str().unwrap().starts_with("SRV="),
        "and told the new one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ip_stickiness_keeps_a_client_on_one_endpoint() {
    let origins = origins(&["a", "b", "c"]).await;
    let port = free_port();
    let eps: Vec<(SocketAddr, u32)> = origins.iter().map(|o| (o.addr, 1)).collect();
    let _d = Drover::start(&service_config(
        port,
        &eps,
        "[services.web.sticky]\nmode = \"source_ip\"\nexpire = \"1m\"",
    ))
    .await;
    let seen = hits(port, 20).await;
    assert_eq!(seen.len(), 1, "one client IP, one endpoint: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_counters_survive_a_config_change() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    let check =
        "[services.web.health_check]\npath = \"/health\"\ninterval = \"150ms\"\nfall = 2\nrise = 2";
    let d = Drover::start(&service_config(port, &[(a.addr, 1), (b.addr, 1)], check)).await;
    hits(port, 10).await;
    a.state.fail_with(500);
    let before = wait_for_state(&d, a.addr, "unhealthy", Duration::from_secs(5)).await;
    let b_before = endpoint_view(&d, b.addr).await["responses"]
        .as_u64()
        .unwrap();
    assert!(b_before >= 5, "{b_before}");

    // A rebuild: weights change, a third endpoint comes in. a stays down, b keeps its count.
    let c = Origin::start("c").await;
    let generation = d.generation().await;
    d.write_config(&service_config(
        port,
        &[(a.addr, 2), (b.addr, 3), (c.addr, 1)],
        check,
    ));
    d.wait_generation(generation + 1).await;
    let after = endpoint_view(&d, a.addr).await;
    assert_eq!(after["health"]["state"], "unhealthy", "{after}");
    assert_eq!(
        after["health"]["since_ms"], before["health"]["since_ms"],
        "not reset: {after}"
    );
    assert_eq!(after["weight"], 2);
    let b_after = endpoint_view(&d, b.addr).await["responses"]
        .as_u64()
        .unwrap();
    assert!(
        b_after >= b_before,
        "b's counter went from {b_before} to {b_after}"
    );
    let seen = hits(port, 12).await;
    assert!(!seen.contains_key("a"), "a is still out: {seen:?}");
}
