//! The config file is live: rewriting it changes traffic without a failed request, an invalid
//! file is rejected with its line and field while the old configuration keeps serving, and
//! SIGHUP re-reads it.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use support::*;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, result: Result<StatusCode, String>) {
        match result {
            Ok(StatusCode::OK) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut e = self.errors.lock().unwrap();
                if e.len() < 10 {
                    e.push(format!("{other:?}"));
                }
            }
        }
    }
}

fn config_for(round: usize, port: u16, extra_port: u16, origins: &[SocketAddr]) -> String {
    // Endpoint sets rotate so that every round adds or removes some, and never leave the
    // service empty; weights change too.
    let sets: [&[usize]; 4] = [&[0], &[0, 1], &[1, 2], &[2, 0, 1]];
    let set = sets[round % sets.len()];
    let endpoints: Vec<(SocketAddr, u32)> = set
        .iter()
        .map(|&i| (origins[i], 1 + ((round + i) % 3) as u32))
        .collect();
    let mut text = one_service(port, &endpoints);
    if round.is_multiple_of(2) {
        text.push_str(&format!(
            r#"
[[listeners]]
name = "extra"
listen = "127.0.0.1:{extra_port}"

[[routes]]
listener = "extra"
service = "web"
"#
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_rewrites_under_load_fail_no_request() {
    let origins = [
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    ];
    let addrs: Vec<SocketAddr> = origins.iter().map(|o| o.addr).collect();
    let (port, extra) = (free_port(), free_port());
    let d = Drover::start(&config_for(1, port, extra, &addrs)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut workers = Vec::new();
    for w in 0..6 {
        let (stop, tally) = (stop.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            let client = client();
            while !stop.load(Ordering::Relaxed) {
                let result = match w {
                    // Keep-alive clients, one of them with requests that span reloads.
                    0..=2 => try_get(&client, &format!("http://{target}/"))
                        .await
                        .map(|r| r.0),
                    3 => try_get(&client, &format!("http://{target}/slow?ms=40"))
                        .await
                        .map(|r| r.0),
                    // A new connection for every request.
                    _ => get_fresh(target, "/").await.map(|r| r.0),
                };
                tally.record(result);
            }
        }));
    }

    let mut generation = d.generation().await;
    for round in 2..202 {
        d.write_config(&config_for(round, port, extra, &addrs));
        generation += 1;
        d.wait_generation(generation).await;
        if round.is_multiple_of(20) {
            // The extra listener is there in even rounds, and serves.
            let (status, _) = get_fresh(format!("127.0.0.1:{extra}").parse().unwrap(), "/")
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    eprintln!("{ok} requests succeeded over 200 rewrites");
    assert_eq!(
        failed,
        0,
        "failures: {:?}\n{}",
        tally.errors.lock().unwrap(),
        d.log_text()
    );
    assert!(
        ok > 1000,
        "too little load to prove anything: {ok} requests"
    );
    // Round 201 was odd: the extra listener is gone and its port refuses connections.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", extra))
            .await
            .is_err()
    );
    let log = d.log_text();
    assert!(log.contains("listener extra added on"), "{log}");
    assert!(log.contains("listener extra on"), "removal logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_files_are_rejected_with_line_and_field_while_the_old_config_serves() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let port = free_port();
    let good = one_service(port, &[(a.addr, 1)]);
    let d = Drover::start(&good).await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let client = client();
    let url = format!("http://127.0.0.1:{port}/");
    let generation = d.generation().await;

    // `one_service` starts with a blank line: [[listeners]] is line 2, [[routes]] line 6,
    // its service line 8, [services.web] line 10, endpoints line 11.
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a syntax error",
            good.replace("[[routes]]", "[[routes]"),
            "drover.toml:6:10: unclosed array table",
        ),
        (
            "an unknown policy",
            good.replace("[services.web]", "[services.web]\npolicy = \"fastest\""),
            "drover.toml:11:10: services.web.policy: unknown variant `fastest`, expected one of `round_robin`, `least_conn`, `random`, `p2c_ewma`, `consistent_hash`",
        ),
        (
            "an address that does not parse",
            good.replace(&a.addr.to_string(), "127.0.0.1:http"),
            "drover.toml:11:", // and the field, checked below
        ),
        (
            "two listeners on one address",
            format!("{good}\n[[listeners]]\nname = \"twin\"\nlisten = \"127.0.0.1:{port}\"\n"),
            "drover.toml:15:10: listeners[1].listen: 127.0.0.1:",
        ),
        (
            "a route to a missing service",
            good.replace("service = \"web\"", "service = \"nope\""),
            "drover.toml:8:11: routes[0].service: no service named \"nope\"; defined services: \"web\"",
        ),
    ];
    for (i, (what, text, expected)) in cases.iter().enumerate() {
        d.write_config(text);
        let log = d.wait_log("config file rejected", i + 1).await;
        assert!(
            log.contains(expected),
            "{what}: expected {expected:?} in\n{log}"
        );
        let (status, headers, _) = get(&client, &url).await;
        assert_eq!(
            (status, origin_of(&headers)),
            (StatusCode::OK, "a".into()),
            "{what}"
        );
        assert_eq!(
            d.generation().await,
            generation,
            "{what} changed the generation"
        );
    }
    assert!(
        d.log_text()
            .contains("services.web.endpoints[0].address: invalid address \"127.0.0.1:http\"")
    );

    // Valid as a file, but its new listener's port is taken: the reconciler rejects it.
    let taken = format!(
        "{good}\n[[listeners]]\nname = \"taken\"\nlisten = \"127.0.0.1:{busy_port}\"\n\n[[routes]]\nlistener = \"taken\"\nservice = \"web\"\n"
    );
    d.write_config(&taken);
    let log = d.wait_log("configuration rejected", 1).await;
    assert!(
        log.contains(&format!(
            "listener taken: cannot listen on 127.0.0.1:{busy_port}"
        )),
        "{log}"
    );
    let s = d.status().await.unwrap();
    assert!(
        s["last_rejection"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot listen")
    );
    let (_, headers, _) = get(&client, &url).await;
    assert_eq!(origin_of(&headers), "a");

    // SIGHUP retries the same file; with the port freed it now applies.
    drop(busy);
    d.signal("HUP");
    d.wait_generation(generation + 1).await;
    let (status, _) = get_fresh(format!("127.0.0.1:{busy_port}").parse().unwrap(), "/")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    // And a good change after all that is applied as usual.
    d.write_config(&one_service(port, &[(b.addr, 1)]));
    d.wait_generation(generation + 2).await;
    let (_, headers, _) = get(&client, &url).await;
    assert_eq!(origin_of(&headers), "b");
}
