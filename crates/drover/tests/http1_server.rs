//! drover's own HTTP/1.1 server (crates/proxy/src/front.rs) answers plain requests, with a body
//! that came with the head or none, and leaves the rest (streamed bodies, upgrades, HTTP/1.0,
//! HEAD) to hyper. A client must not be able to tell which of the two served it, and a
//! connection that goes from one to the other and back loses nothing.

mod raw;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

/// What an origin answers, by path; each answer closes its upstream connection, so that every
/// request meets the same origin afresh.
const ANSWERS: [(&str, &[u8]); 7] = [
    (
        "/length",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\
          X-Two: 1\r\nX-Two: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello",
    ),
    (
        "/chunked",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 1\r\n\r\n",
    ),
    (
        "/no-content",
        b"HTTP/1.1 204 No Content\r\nConnection: close\r\nX-A: b\r\n\r\n",
    ),
    (
        "/not-modified",
        b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\nContent-Length: 10\r\nETag: \"e\"\r\n\r\n",
    ),
    (
        "/dated",
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\
          Content-Length: 3\r\n\r\nnot",
    ),
    (
        "/until-close",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\nuntil the end",
    ),
    (
        "/odd",
        b"HTTP/1.1 599 Whatever\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    ),
];

/// One drover with a route per answer (and none for other paths, which drover answers 404
/// itself).
async fn setup() -> (Drover, SocketAddr) {
    let port = free_port();
    let mut config = format!("[[listeners]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\n");
    for (i, (path, answer)) in ANSWERS.iter().enumerate() {
        let origin = raw::scripted_origin(answer).await;
        config.push_str(&format!(
            "\n[[routes]]\nlistener = \"web\"\npath_prefix = \"{path}\"\nservice = \"s{i}\"\n\
             \n[services.s{i}]\nendpoints = [ {{ address = \"{origin}\" }} ]\n"
        ));
    }
    let drover = Drover::start(&config).await;
    (drover, format!("127.0.0.1:{port}").parse().unwrap())
}

/// A reply as text with the value of a `date` field drover wrote itself masked, and whether
/// the connection was closed after it.
async fn reply(addr: SocketAddr, request: String) -> (String, bool) {
    let reply = raw::send_raw(addr, request.as_bytes(), Duration::from_millis(700)).await;
    let mut text = reply.text();
    if let Some(at) = text.find("\r\ndate: ")
        && !text[at..].starts_with("\r\ndate: Mon, 01 Jan 2024")
    {
        text.replace_range(at + 8..at + 8 + 29, "DATE");
    }
    (text, reply.closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_the_same_bytes_from_drover_s_server_and_from_hyper() {
    let (_drover, addr) = setup().await;
    let paths = ANSWERS.iter().map(|(p, _)| *p).chain(["/nowhere"]);
    let mut cases = Vec::new();
    for path in paths {
        for close in [false, true] {
            for (method, end) in [("GET", "\r\n"), ("POST", "Content-Length: 3\r\n\r\nabc")] {
                // The same request twice; a `Connection` option other than close and
                // keep-alive sends the second to hyper.
                let close_field = if close { "Connection: close\r\n" } else { "" };
                let options = if close {
                    "close, x-via-hyper"
                } else {
                    "x-via-hyper"
                };
                let ours = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{close_field}{end}");
                let theirs = format!(
                    "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: {options}\r\n{end}"
                );
                let case = format!("{method} {path} close={close}");
                cases.push(tokio::spawn(async move {
                    let (ours, theirs) = tokio::join!(reply(addr, ours), reply(addr, theirs));
                    (case, close, ours, theirs)
                }));
            }
        }
    }
    for case in cases {
        let (case, close, ours, theirs) = case.await.unwrap();
        assert_eq!(ours, theirs, "{case}");
        let (text, closed) = ours;
        assert!(text.starts_with("HTTP/1.1 "), "{case}: {text}");
        assert_eq!(closed, close, "{case}: {text}");
        assert_eq!(
            text.contains("connection: close\r\n"),
            close,
            "{case}: {text}"
        );
    }
    // What the answers hold, written out once.
    let (length, _) = reply(addr, "GET /length HTTP/1.1\r\nHost: t\r\n\r\n".into()).await;
    assert_eq!(
        length,
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\nx-two: 1\r\n\
         x-two: 2\r\nset-cookie: a=1\r\nset-cookie: b=2\r\ndate: DATE\r\n\r\nhello"
    );
    let (chunked, _) = reply(addr, "GET /chunked HTTP/1.1\r\nHost: t\r\n\r\n".into()).await;
    assert!(
        chunked.starts_with("HTTP/1.1 200 OK\r\ntrailer: x-sum\r\ntransfer-encoding: chunked\r\n"),
        "{chunked}"
    );
    assert_eq!(dechunk(&chunked), "hello world", "{chunked}");
    let (until_close, _) = reply(addr, "GET /until-close HTTP/1.1\r\nHost: t\r\n\r\n".into()).await;
    assert!(
        until_close.contains("transfer-encoding: chunked"),
        "{until_close}"
    );
    assert_eq!(dechunk(&until_close), "until the end", "{until_close}");
}

/// The data of a chunked answer (after its head), without trailers.
fn dechunk(reply: &str) -> String {
    let (_, mut rest) = reply.split_once("\r\n\r\n").expect("a head");
    let mut data = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size, 16).expect("a hexadecimal size");
        if size == 0 {
            assert_eq!(after, "\r\n", "no trailers, and nothing after the end");
            return data;
        }
        data.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").expect("a chunk's end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_passed_between_the_two_servers_loses_nothing() {
    let origin = raw::Recorder::start().await;
    let port = free_port();
    let _drover = Drover::start(&one_service(port, &[(origin.addr, 1)])).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let quiet = Duration::from_millis(400);
    use tokio::io::AsyncWriteExt;
    // Pipelined in one write: drover's, hyper's (a chunked body), hyper's again until it
    // lets go of the connection.
    s.write_all(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /3 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let replies = raw::read_reply(&mut s, quiet).await;
    assert_eq!(replies.statuses(), [200, 200, 200], "{}", replies.text());
    // After a wait past the release of hyper's state, drover's: a head in two pieces, then a
    // body that came with its head, then one that did not, which is hyper's.
    s.write_all(b"GET /4 HT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"TP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let fourth = raw::read_reply(&mut s, quiet).await;
    assert_eq!(fourth.statuses(), [200], "{}", fourth.text());
    s.write_all(b"PUT /5 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz")
        .await
        .unwrap();
    let fifth = raw::read_reply(&mut s, quiet).await;
    assert_eq!(fifth.statuses(), [200], "{}", fifth.text());
    s.write_all(b"POST /6 HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"def").await.unwrap();
    let sixth = raw::read_reply(&mut s, quiet).await;
    assert_eq!(sixth.statuses(), [200], "{}", sixth.text());
    assert!(!sixth.closed);
    let seen = origin.seen();
    let targets: Vec<&str> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/1", "/2", "/3", "/4", "/5", "/6"]);
    let bodies: Vec<&[u8]> = seen.iter().map(|r| &r.body[..]).collect();
    assert_eq!(
        bodies,
        [&b""[..], b"abc", b"", b"", b"xyz", b"abcdef"],
        "{seen:?}"
    );
    let methods: Vec<&str> = seen.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["GET", "POST", "GET", "GET", "PUT", "POST"]);
    assert_eq!(seen[4].headers["content-length"], "3");
}

/// As with hyper: a client that closes its connection while drover awaits the answer cancels
/// the request (its upstream connection is closed at once, not at the upstream's timeout),
/// and the request is logged as 499.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_its_answer_cancels_the_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An origin that reads the request and never answers, and tells when drover lets go.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let (let_go, upstream_closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await
            && n > 0
        {}
        let _ = let_go.send(());
    });
    let port = free_port();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    let _drover = Drover::start_with(
        &one_service(port, &[(origin, 1)]),
        &["--access-log", path.to_str().unwrap()],
    )
    .await;
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    client
        .write_all(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), upstream_closed)
        .await
        .expect("the upstream request outlived its client")
        .unwrap();
    let mut logged = String::new();
    for _ in 0..50 {
        logged = std::fs::read_to_string(&path).unwrap_or_default();
        if !logged.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line: serde_json::Value = serde_json::from_str(logged.trim()).expect(&logged);
    assert_eq!(line["status"], 499, "{logged}");
    assert_eq!(line["path"], "/never", "{logged}");
}
