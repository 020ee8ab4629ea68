//! Requests through a real drover to real origins: balancing, routing, forwarding headers,
//! HTTP/2 downstream, and each error status.

mod raw;
mod support;

use std::collections::HashMap;
use std::time::Duration;

use http::{Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_requests_by_weight() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let c = Origin::start("c").await;
    let port = free_port();
    let _d = Drover::start(&one_service(port, &[(a.addr, 3), (b.addr, 1), (c.addr, 2)])).await;
    let client = client();
    let mut hits: HashMap<String, u32> = HashMap::new();
    let mut order = Vec::new();
    for _ in 0..600 {
        let (status, headers, _) = get(&client, &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(status, StatusCode::OK);
        let who = origin_of(&headers);
        order.push(who.clone());
        *hits.entry(who).or_default() += 1;
    }
    // One client in sequence sees the exact smooth cycle: shares are exact.
    assert_eq!(hits["a"], 300, "{hits:?}");
    assert_eq!(hits["b"], 100, "{hits:?}");
    assert_eq!(hits["c"], 200, "{hits:?}");
    // Smooth: the heaviest endpoint never gets more than two turns in a row with 3:1:2.
    let longest_run = order
        .windows(3)
        .filter(|w| w.iter().all(|x| x == &w[0]))
        .count();
    assert_eq!(longest_run, 0, "three in a row: {:?}", &order[..12]);
}

/// drover writes the forwarding headers itself into an HTTP/1.1 request's head, unless the
/// route has header rules, which see them in the header map: both ways give the origin the
/// same fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_arrive_and_hop_by_hop_headers_do_not() {
    let a = Origin::start("a").await;
    let port = free_port();
    let config = one_service(port, &[(a.addr, 1)]).replace(
        "[[routes]]",
        "[[routes]]\nlistener = \"web\"\npath_prefix = \"/ruled\"\nservice = \"web\"\nrequest_headers = { add = { x-rule = \"1\" } }\n\n[[routes]]",
    );
    let _d = Drover::start(&config).await;
    for path in ["/headers", "/ruled"] {
        let req = Request::get(format!("http://127.0.0.1:{port}{path}"))
            .header("host", "shop.example.com")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-for", "198.51.100.1, 192.0.2.9")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "spoofed.example.com")
            .header("x-original-to", "10.9.9.9")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "must not pass")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("te", "trailers")
            .header("x-end-to-end", "passes")
            .body(empty())
            .unwrap();
        let (status, _, body) = send(&client(), req).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body.to_vec()).unwrap();
        let fields: Vec<(&str, &str)> = text
            .lines()
            .skip(2)
            .filter_map(|l| l.split_once(": "))
            .collect();
        let all = |name: &str| -> Vec<&str> {
            fields
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .collect()
        };
        assert_eq!(
            all("x-forwarded-for"),
            ["203.0.113.7, 198.51.100.1, 192.0.2.9, 127.0.0.1"],
            "{path}: {text}"
        );
        assert_eq!(all("x-forwarded-proto"), ["http"], "{path}: {text}");
        assert_eq!(
            all("x-forwarded-host"),
            ["shop.example.com"],
            "{path}: {text}"
        );
        assert_eq!(all("x-original-to"), ["127.0.0.1"], "{path}: {text}");
        assert_eq!(
            all("host"),
            ["shop.example.com"],
            "{path}: the Host header passes unchanged"
        );
        assert_eq!(all("x-end-to-end"), ["passes"], "{path}");
        let ruled = if path == "/ruled" { vec!["1"] } else { vec![] };
        assert_eq!(all("x-rule"), ruled, "{path}");
        for hop in ["x-private", "keep-alive", "proxy-authorization", "te"] {
            assert!(
                all(hop).is_empty(),
                "{path}: {hop} reached the origin:\n{text}"
            );
        }
        // drover's own connection to the origin may say keep-alive; the client's words may not.
        assert_ne!(all("connection"), ["keep-alive, x-private"], "{path}");

        // An HTTP/1.0 request with no Host: no X-Forwarded-Host, not even the client's.
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let wire = format!("GET {path} HTTP/1.0\r\nx-forwarded-host: spoofed.example.com\r\n\r\n");
        let reply = raw::send_raw(addr, wire.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(reply.status(), 200, "{path}: {}", reply.text());
        assert!(
            reply.text().contains("\nx-forwarded-for: 127.0.0.1\n"),
            "{}",
            reply.text()
        );
        assert!(
            !reply.text().contains("x-forwarded-host"),
            "{path}: {}",
            reply.text()
        );
    }
}

/// The other way: an answer's hop-by-hop fields, and those its Connection names, stop at
/// drover; `Trailer` and end-to-end fields pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_s_hop_by_hop_headers_do_not_reach_the_client() {
    let origin = raw::scripted_origin(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\nTrailer: x-sum\r\nX-End-To-End: passes\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let port = free_port();
    let _d = Drover::start(&one_service(port, &[(origin, 1)])).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let reply = raw::send_raw(
        addr,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(reply.status(), 200, "{}", reply.text());
    let head = reply.text().to_ascii_lowercase();
    assert!(head.contains("\r\nx-end-to-end: passes\r\n"), "{head}");
    assert!(head.contains("\r\ntrailer: x-sum\r\n"), "{head}");
    for hop in ["x-private", "keep-alive", "proxy-authenticate", "upgrade"] {
        assert!(
            !head.contains(&format!("\r\n{hop}:")),
            "{hop} reached the client:\n{head}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_longest_path_prefix() {
    let api = Origin::start("api").await;
    let www = Origin::start("www").await;
    let other = Origin::start("other").await;
    let port = free_port();
    let config = format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
host = "example.com"
path_prefix = "/api"
service = "api"

[[routes]]
listener = "web"
host = "example.com"
service = "www"

[[routes]]
listener = "web"
host = "*.example.org"
service = "other"

[services.api]
endpoints = [ {{ address = "{}" }} ]
[services.www]
endpoints = [ {{ address = "{}" }} ]
[services.other]
endpoints = [ {{ address = "{}" }} ]
"#,
        api.addr, www.addr, other.addr
    );
    let _d = Drover::start(&config).await;
    let client = client();
    let to = |host: &'static str, path: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://127.0.0.1:{port}{path}"))
                .header("host", host)
                .body(empty())
                .unwrap();
            let (status, headers, _) = send(&client, req).await.unwrap();
            (status, origin_of(&headers))
        }
    };
    assert_eq!(
        to("example.com", "/api/users").await,
        (StatusCode::OK, "api".into())
    );
    assert_eq!(
        to("Example.COM:80", "/api").await,
        (StatusCode::OK, "api".into())
    );
    assert_eq!(to("example.com", "/").await, (StatusCode::OK, "www".into()));
    assert_eq!(
        to("shop.example.org", "/x").await,
        (StatusCode::OK, "other".into())
    );
    assert_eq!(
        to("example.net", "/").await,
        (StatusCode::NOT_FOUND, String::new())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_status_has_its_cause() {
    let slow = Origin::start("slow").await;
    let closed = free_port(); // nothing listens here
    let port = free_port();
    let config = format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
path_prefix = "/empty"
service = "empty"

[[routes]]
listener = "web"
path_prefix = "/down"
service = "down"

[[routes]]
listener = "web"
path_prefix = "/slow"
service = "slow"

[services.empty]

[services.down]
endpoints = [ {{ address = "127.0.0.1:{closed}" }} ]

[services.slow]
response_timeout = "300ms"
endpoints = [ {{ address = "{}" }} ]
"#,
        slow.addr
    );
    let _d = Drover::start(&config).await;
    let client = client();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let cases = [
        ("/nowhere", StatusCode::NOT_FOUND, "no route"),
        ("/empty", StatusCode::SERVICE_UNAVAILABLE, "no endpoints"),
        ("/down", StatusCode::BAD_GATEWAY, "could be reached"),
        ("/slow?ms=3000", StatusCode::GATEWAY_TIMEOUT, "in time"),
    ];
    for (path, expected, words) in cases {
        let started = std::time::Instant::now();
        let (status, headers, body) = get(&client, &url(path)).await;
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, expected, "{path}: {body}");
        assert!(
            body.starts_with("drover: ") && body.contains(words),
            "{path}: {body}"
        );
        assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
        if expected == StatusCode::GATEWAY_TIMEOUT {
            assert!(
                started.elapsed() < Duration::from_millis(2500),
                "504 came at the deadline"
            );
        }
    }
    // The slow origin answers within its deadline.
    let (status, _, _) = get(&client, &url("/slow?ms=10")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_moves_on_to_another_endpoint() {
    let up = Origin::start("up").await;
    let closed = free_port();
    let port = free_port();
    let down: std::net::SocketAddr = format!("127.0.0.1:{closed}").parse().unwrap();
    let _d = Drover::start(&one_service(port, &[(down, 1), (up.addr, 1)])).await;
    let client = client();
    for _ in 0..20 {
        let (status, headers, _) = get(&client, &format!("http://127.0.0.1:{port}/")).await;
        assert_eq!(
            (status, origin_of(&headers)),
            (StatusCode::OK, "up".to_string())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_is_served() {
    let a = Origin::start("a").await;
    let port = free_port();
    let _d = Drover::start(&one_service(port, &[(a.addr, 1)])).await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::get(format!("http://h2.example.com:{port}/h2/{i}"))
            .body(empty())
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        assert_eq!(res.version(), http::Version::HTTP_2);
        assert_eq!(res.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        // Upstream it is HTTP/1.1, with the :authority as Host.
        assert!(
            text.starts_with(&format!("a\nGET /h2/{i} HTTP/1.1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("host: h2.example.com:{port}")),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_answers_503_until_it_has_endpoints() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Drover::start_args(&["--listen", &listen]).await;
    let (status, _, body) = get(&client(), &format!("http://{listen}/anything")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&body[..], b"drover: the service has no endpoints\n");
    let (status, _, body) = get(&client(), &format!("http://{}/healthz", d.admin)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
    let s = d.status().await.unwrap();
    assert_eq!(s["listeners"][0]["listen"], listen);
    assert_eq!(s["last_source"], "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_drips_its_headers_is_cut_at_the_header_deadline() {
    let a = Origin::start("a").await;
    let port = free_port();
    let config = one_service(port, &[(a.addr, 1)]).replace(
        "listen = ",
        "request_header_timeout = \"400ms\"\nidle_timeout = \"5s\"\nlisten = ",
    );
    let _d = Drover::start(&config).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut cut = false;
    // One byte every 100 ms: each read is quick, but the whole head never arrives in time.
    for b in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if s.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "the connection was still open after {:?}",
        started.elapsed()
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let a = Origin::start("a").await;
    let port = free_port();
    let config = one_service(port, &[(a.addr, 1)])
        .replace("listen = ", "idle_timeout = \"500ms\"\nlisten = ");
    let _d = Drover::start(&config).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle_from = std::time::Instant::now();
    // Still open well before the deadline: a second request is answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle_from_second = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed within 3 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without another byte");
    let idle = idle_from_second.elapsed();
    assert!(
        idle >= Duration::from_millis(450),
        "closed too early: {idle:?}"
    );
    assert!(idle_from.elapsed() < Duration::from_secs(3));
}

/// A keep-alive connection that waits for its next request gives up its HTTP state and
/// buffers after 100 ms, and builds them again when the request comes. Nothing the client
/// sent is lost on the way: not the start of a request that came while the one before was
/// being answered, nor a whole request after another wait. On shutdown it closes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_past_the_buffer_release_loses_nothing() {
    let origin = raw::Recorder::start().await;
    let port = free_port();
    let mut d = Drover::start(&one_service(port, &[(origin.addr, 1)])).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // Each reply is read until 300 ms pass without a byte, three times the release delay.
    let quiet = Duration::from_millis(300);
    s.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /sec")
        .await
        .unwrap();
    let first = raw::read_reply(&mut s, quiet).await;
    assert_eq!(first.statuses(), [200], "{}", first.text());
    s.write_all(b"ond HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let second = raw::read_reply(&mut s, quiet).await;
    assert_eq!(second.statuses(), [200], "{}", second.text());
    s.write_all(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let third = raw::read_reply(&mut s, quiet).await;
    assert_eq!(third.statuses(), [200], "{}", third.text());
    assert!(!third.closed, "the connection stays open");
    assert_eq!(origin.targets(), ["/first", "/second", "/third"]);
    // Idle again past the release, it does not hold drover's shutdown up (grace: 30 s).
    d.signal("TERM");
    let end = raw::read_reply(&mut s, Duration::from_secs(5)).await;
    assert!(end.closed && end.bytes.is_empty(), "{}", end.text());
    let exit = d.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(exit.code(), Some(0), "{}", d.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_for_a_free_slot() {
    let a = Origin::start("a").await;
    let port = free_port();
    let config =
        one_service(port, &[(a.addr, 1)]).replace("listen = ", "max_connections = 1\nlisten = ");
    let _d = Drover::start(&config).await;
    let mut first = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(first.read(&mut buf).await.unwrap() > 0);
    // The second connection is queued by the kernel, not served, while the first is open.
    let second = tokio::spawn(get_fresh(format!("127.0.0.1:{port}").parse().unwrap(), "/"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "served over the limit");
    drop(first);
    let (status, _) = tokio::time::timeout(Duration::from_secs(3), second)
        .await
        .expect("served once a slot was free")
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// Trailers a client sends after a chunked body reach an HTTP/1.1 origin with the last chunk,
/// small bodies (kept for a retry) and streamed ones alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_reach_an_http1_origin() {
    let origin = raw::Recorder::start().await;
    let port = free_port();
    let _d = Drover::start(&one_service(port, &[(origin.addr, 1)])).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let big = "x".repeat(100_000);
    for (path, data) in [("/small", "hello"), ("/large", big.as_str())] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\nconnection: close\r\n\r\n{:x}\r\n{data}\r\n0\r\nx-checksum: c0ffee\r\n\r\n",
            data.len()
        );
        let reply = raw::send_raw(addr, req.as_bytes(), Duration::from_secs(2)).await;
        assert_eq!(reply.status(), 200, "{path}: {}", reply.text());
    }
    let seen = origin.seen();
    assert_eq!(origin.targets(), ["/small", "/large"]);
    for (s, len) in seen.iter().zip([5, 100_000]) {
        assert_eq!(s.body.len(), len, "{}", s.target);
        let trailers = s
            .trailers
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no trailers", s.target));
        assert_eq!(trailers["x-checksum"], "c0ffee", "{}", s.target);
    }
}

/// An HTTP/2 client's body can carry both a `content-length` and trailers, which HTTP/1.1
/// cannot: a length-framed body has nowhere to put them. When the head names its trailers
/// (`Trailer`), drover chunks the body for the HTTP/1.1 origin and sends them with the last
/// chunk, kept and streamed bodies alike. When it does not, the head goes out with the length
/// before the trailers are known: the body arrives whole and the trailers are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_s_named_trailers_after_a_known_length_reach_an_http1_origin() {
    use http_body_util::BodyExt;
    let origin = raw::Recorder::start().await;
    let port = free_port();
    let d = Drover::start(&one_service(port, &[(origin.addr, 1)])).await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let small = bytes::Bytes::from_static(b"hello");
    // Over the 64 KiB that drover keeps for a retry: streamed.
    let large = bytes::Bytes::from(vec![b'x'; 100_000]);
    let cases = [
        ("/small-named", &small, true),
        ("/large-named", &large, true),
        ("/large-unnamed", &large, false),
    ];
    for (path, data, named) in cases {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("c0ffee"));
        let body = http_body_util::Full::new(data.clone())
            .with_trailers(std::future::ready(Some(Ok(trailers))));
        let mut req = Request::post(format!("http://127.0.0.1:{port}{path}"))
            .header("content-length", data.len());
        if named {
            req = req.header("trailer", "x-checksum");
        }
        let res = sender
            .send_request(req.body(body).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}\n{}", d.log_text()));
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    }
    let seen = origin.seen();
    assert_eq!(origin.targets(), cases.map(|(path, ..)| path));
    for (s, (path, data, named)) in seen.iter().zip(cases) {
        assert_eq!(&s.body, data, "{path}: the body arrives whole");
        let field = |name: &str| s.headers.get(name).map(|v| v.to_str().unwrap());
        if named {
            assert_eq!(field("transfer-encoding"), Some("chunked"), "{path}");
            assert_eq!(field("content-length"), None, "{path}");
            assert_eq!(field("trailer"), Some("x-checksum"), "{path}");
            let trailers = s
                .trailers
                .as_ref()
                .unwrap_or_else(|| panic!("{path}: no trailers"));
            assert_eq!(trailers["x-checksum"], "c0ffee", "{path}");
        } else {
            assert_eq!(field("content-length"), Some("100000"), "{path}");
            assert_eq!(s.trailers, None, "{path}");
        }
    }
}

/// An origin that closes a kept-alive connection while it waits in drover's pool: the next
/// request goes on a new connection, and the client never sees the closed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_origin_closed_is_not_used_again() {
    // Answers one request per connection, keeps it 300 ms, then closes it.
    let origin = raw::scripted_origin(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let port = free_port();
    let d = Drover::start(&one_service(port, &[(origin, 1)])).await;
    let url = format!("http://127.0.0.1:{port}/");
    for round in 0..3 {
        let (status, _, body) = get(&client(), &url).await;
        assert_eq!(status, StatusCode::OK, "round {round}");
        assert_eq!(body, "ok", "round {round}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, stats) = d.api("GET", "/stats/detail", None).await;
    let endpoint = &stats[0];
    assert_eq!(endpoint["success"], 3, "{stats}");
    assert_eq!(
        endpoint["failed"], 0,
        "no request was sent on a closed connection: {stats}"
    );
}

/// An origin whose idle close crosses drover's next request on a kept-alive connection: it
/// answers the first request on each connection, then closes the connection as soon as
/// the second request arrives, with no answer. A GET goes again on a new connection and the
/// client never knows; a POST, which may not be sent twice, gets 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_crossing_the_origin_s_idle_close_goes_again_when_it_may() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                for answered in [true, false] {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let line = head.lines().next().unwrap_or("").to_string();
                    seen.lock().unwrap().push(line);
                    if answered {
                        // A POST's small body follows its head: read it before answering.
                        if let Some(len) = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|n| n.trim().parse::<usize>().ok())
                        {
                            let mut body = vec![0u8; len];
                            let _ = s.read_exact(&mut body).await;
                        }
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
                // The second request's head is in: close with no answer.
            });
        }
    });
    let port = free_port();
    // One worker, whose pool every request draws on: with two, a second client connection
    // (hyper's client opens one when the first is not back in its pool yet, which a loaded
    // machine makes likely) may go to the other worker and its empty pool.
    let d = Drover::start_with(&one_service(port, &[(origin, 1)]), &["--workers", "1"]).await;
    let url = format!("http://127.0.0.1:{port}/");
    let client = client();
    let (status, _, body) = get(&client, &url).await;
    assert_eq!(
        (status, String::from_utf8_lossy(&body)),
        (StatusCode::OK, "ok".into())
    );
    // On the kept-alive connection: the origin closes it, and drover sends the GET again.
    let (status, _, body) = get(&client, &url).await;
    assert_eq!(
        (status, String::from_utf8_lossy(&body)),
        (StatusCode::OK, "ok".into()),
        "the GET went again"
    );
    let (_, stats) = d.api("GET", "/stats/detail", None).await;
    assert_eq!(
        stats[0]["failed"], 0,
        "not counted against the origin: {stats}"
    );
    // The GET's new connection is kept alive in turn: a POST on it meets the same close.
    let post = Request::post(&url).body(full("data")).unwrap();
    let (status, _, _) = send(&client, post).await.unwrap();
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "a POST is never sent twice"
    );
    let lines = heads.lock().unwrap().clone();
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("POST")).count(),
        1,
        "{lines:?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("GET")).count(),
        3,
        "the first GET, the crossed one and its resend: {lines:?}"
    );
}
