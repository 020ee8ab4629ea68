//! The DNS source end to end: the real drover binary (`drover run --dns ADDR MAPPING...`),
//! a real DNS server (dnsmasq, 1 s TTL) and drover-echo origins on several loopback
//! addresses (127.0.0.0/8 is all loopback on Linux), so that one name can have several
//! addresses on one port, as weave-nginx's `webserver` containers had.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::dnsmasq::{Dnsmasq, Srv};
use support::*;

/// A drover-echo origin on a given loopback address; stopped on drop.
struct IpOrigin {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IpOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn origin_at(ip: &str, port: u16, name: &str) -> std::io::Result<IpOrigin> {
    let listener = tokio::net::TcpListener::bind((ip, port)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(drover_echo::serve(listener, name.to_string()));
    Ok(IpOrigin { addr, task })
}

/// Origins named after their IPs (`127.0.0.2`), all on one port.
async fn origins_on_one_port(ips: &[&str]) -> Vec<IpOrigin> {
    'again: for _ in 0..20 {
        let first = origin_at(ips[0], 0, ips[0]).await.unwrap();
        let port = first.addr.port();
        let mut all = vec![first];
        for ip in &ips[1..] {
            match origin_at(ip, port, ip).await {
                Ok(o) => all.push(o),
                Err(_) => continue 'again,
            }
        }
        return all;
    }
    panic!("no port free on all of {ips:?}");
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Which origins answer `n` requests (a 503 counts as `503`, a failed request as `error`).
async fn answers(url: &str, n: usize) -> BTreeSet<String> {
    let client = client();
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        match try_get(&client, url).await {
            Ok((StatusCode::OK, headers, _)) => seen.insert(origin_of(&headers)),
            Ok((status, _, _)) => seen.insert(status.as_u16().to_string()),
            Err(_) => seen.insert("error".to_string()),
        };
    }
    seen
}

/// Waits until `n` requests are answered by exactly `want`; returns how long that took.
async fn wait_answers(url: &str, want: &[&str], within: Duration, d: &Drover) -> Duration {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let start = Instant::now();
    loop {
        let seen = answers(url, 12).await;
        if seen == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "after {within:?} {url} was answered by {seen:?}, not {want:?}:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_names_addresses_all_take_traffic() {
    let origins = origins_on_one_port(&["127.0.0.2", "127.0.0.3"]).await;
    let port = origins[0].addr.port();
    let mut hosts = vec![
        ("webserver", ip("127.0.0.2")),
        ("webserver", ip("127.0.0.3")),
    ];
    let mut want = vec!["127.0.0.2", "127.0.0.3"];
    let mut endpoints = format!("127.0.0.2:{port}, 127.0.0.3:{port}");
    // An AAAA record too, where this machine has IPv6 loopback.
    let v6 = origin_at("::1", port, "::1").await.ok();
    if v6.is_some() {
        hosts.push(("webserver", ip("::1")));
        want.push("::1");
        endpoints.push_str(&format!(", [::1]:{port}"));
    } else {
        println!("no IPv6 loopback here: A records only");
    }
    let dns = Dnsmasq::start(&hosts, &[]).await;
    let listen = free_port();
    let start = Instant::now();
    let d = Drover::start_args(&[
        "--dns",
        &dns.addr.to_string(),
        &format!("127.0.0.1:{listen}:webserver:{port}"),
    ])
    .await;
    let url = format!("http://127.0.0.1:{listen}/");
    wait_answers(&url, &want, Duration::from_secs(10), &d).await;
    println!(
        "webserver served by all its addresses {:?} after drover was started",
        start.elapsed()
    );
    d.wait_log(&format!("dns: webserver now {endpoints}"), 1)
        .await;
}

#[tokio::test]
async fn a_changed_record_is_picked_up_when_its_ttl_runs_out() {
    let origins = origins_on_one_port(&["127.0.0.2", "127.0.0.3", "127.0.0.4"]).await;
    let port = origins[0].addr.port();
    // weave's form: the mapping names `webserver`, the domain is appended.
    let name = "webserver.weave.local";
    let dns = Dnsmasq::start(&[(name, ip("127.0.0.2")), (name, ip("127.0.0.3"))], &[]).await;
    let listen = free_port();
    let d = Drover::start_args(&[
        "--dns",
        &dns.addr.to_string(),
        "--dns-domain",
        "weave.local",
        &format!("127.0.0.1:{listen}:webserver:{port}"),
    ])
    .await;
    let url = format!("http://127.0.0.1:{listen}/");
    wait_answers(
        &url,
        &["127.0.0.2", "127.0.0.3"],
        Duration::from_secs(10),
        &d,
    )
    .await;

    // One container dies, another appears: 127.0.0.2 goes, 127.0.0.4 comes.
    dns.set_hosts(&[(name, ip("127.0.0.3")), (name, ip("127.0.0.4"))])
        .await;
    let took = wait_answers(
        &url,
        &["127.0.0.3", "127.0.0.4"],
        Duration::from_secs(10),
        &d,
    )
    .await;
    println!("a changed A record (TTL 1 s, --dns-min-ttl 1s) reached the traffic in {took:?}");
    assert!(
        took < Duration::from_secs(4),
        "the change took {took:?}, several TTLs"
    );

    // And back again, to measure twice.
    dns.set_hosts(&[(name, ip("127.0.0.2"))]).await;
    let took = wait_answers(&url, &["127.0.0.2"], Duration::from_secs(10), &d).await;
    println!("a second change reached the traffic in {took:?}");
    assert!(took < Duration::from_secs(4), "the change took {took:?}");
    d.wait_log(&format!("dns: webserver now 127.0.0.2:{port}"), 1)
        .await;

    // The resolver's cache is bypassed: every TTL really asks the server.
    let before = dns.queries("A", name);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let asked = dns.queries("A", name) - before;
    println!("{asked} A queries in 3.5 s with a 1 s TTL");
    assert!((2..=6).contains(&asked), "{asked} A queries in 3.5 s");
}

#[tokio::test]
async fn srv_records_give_each_endpoint_its_port_and_weight() {
    let a = origin_at("127.0.0.2", 0, "a").await.unwrap();
    let b = origin_at("127.0.0.3", 0, "b").await.unwrap();
    let name = "_http._tcp.webserver";
    let mut dns = Dnsmasq::start(
        &[("origin-a", ip("127.0.0.2")), ("origin-b", ip("127.0.0.3"))],
        &[
            Srv::new(name, "origin-a", a.addr.port()),
            Srv::new(name, "origin-b", b.addr.port()).weight(3),
        ],
    )
    .await;
    let listen = free_port();
    let d = Drover::start_args(&[
        "--dns",
        &dns.addr.to_string(),
        &format!("127.0.0.1:{listen}:{name}"),
    ])
    .await;
    let url = format!("http://127.0.0.1:{listen}/");
    wait_answers(&url, &["a", "b"], Duration::from_secs(10), &d).await;
    d.wait_log(
        &format!("dns: {name} now {}, {} (weight 3)", a.addr, b.addr),
        1,
    )
    .await;
    let (_, service) = d
        .api("GET", &format!("/api/v1/services/{name}"), None)
        .await;
    let weights: Vec<(String, u64)> = service["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("no endpoints in {service}"))
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["weight"].as_u64().unwrap_or(1),
            )
        })
        .collect();
    assert_eq!(
        weights,
        vec![(a.addr.to_string(), 1), (b.addr.to_string(), 3)]
    );

    // A lower priority is a backup: only the first priority serves while it resolves.
    dns.restart_with_srv(&[
        Srv::new(name, "origin-a", a.addr.port()).priority(10),
        Srv::new(name, "origin-b", b.addr.port()),
    ])
    .await;
    let took = wait_answers(&url, &["b"], Duration::from_secs(10), &d).await;
    println!("new SRV records (dnsmasq restarted) reached the traffic in {took:?}");
}

#[tokio::test]
async fn a_dns_failure_holds_the_last_answer_then_drops_it() {
    let origins = origins_on_one_port(&["127.0.0.2", "127.0.0.3"]).await;
    let port = origins[0].addr.port();
    let mut dns = Dnsmasq::start(
        &[
            ("webserver", ip("127.0.0.2")),
            ("webserver", ip("127.0.0.3")),
        ],
        &[],
    )
    .await;
    let listen = free_port();
    let d = Drover::start_args(&[
        "--dns",
        &dns.addr.to_string(),
        "--dns-hold",
        "2s",
        &format!("127.0.0.1:{listen}:webserver:{port}"),
    ])
    .await;
    let url = format!("http://127.0.0.1:{listen}/");
    wait_answers(
        &url,
        &["127.0.0.2", "127.0.0.3"],
        Duration::from_secs(10),
        &d,
    )
    .await;

    dns.stop();
    let stopped = Instant::now();
    // For the hold, traffic goes on to the last answer's addresses.
    while stopped.elapsed() < Duration::from_millis(1500) {
        let seen = answers(&url, 4).await;
        assert!(
            seen.iter().all(|s| s.starts_with("127.0.0.")),
            "{seen:?} {:?} after the DNS server stopped:\n{}",
            stopped.elapsed(),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // After it, the service has no endpoints.
    wait_answers(&url, &["503"], Duration::from_secs(20), &d).await;
    let took = stopped.elapsed();
    println!(
        "with --dns-hold 2s, the last answer served for {took:?} after the DNS server stopped"
    );
    // Its last success was at most 1 s (the TTL) before the stop, due 1 s later, held 2 s.
    // ...and a dead server is noticed within 2 s (1 s timeout, one retry).
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "dropped after {took:?}"
    );
    d.wait_log("dns: webserver now no endpoints", 1).await;
    // Several failed lookups (a retry every second), one warning.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = d.log_text();
    assert_eq!(
        log.matches("dns: cannot resolve webserver").count(),
        1,
        "one warning for the switch into failure:\n{log}"
    );

    // The server comes back: so do the endpoints.
    dns.restart().await;
    let took = wait_answers(
        &url,
        &["127.0.0.2", "127.0.0.3"],
        Duration::from_secs(10),
        &d,
    )
    .await;
    println!("after the DNS server came back, traffic flowed again in {took:?}");
    d.wait_log("dns: webserver resolves again", 1).await;
}
