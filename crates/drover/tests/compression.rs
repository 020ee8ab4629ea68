//! Response compression end to end, checked with a real client: curl (Debian's, built with
//! gzip and brotli), which decodes what drover encodes.

mod support;

use std::process::Command;

use support::*;

/// A service with compression on (the defaults: br then gzip, the seed's types, 256 bytes)
/// and one without, over the same origin.
fn config(port: u16, origin: std::net::SocketAddr) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
listen = "127.0.0.1:{port}"

[[routes]]
listener = "web"
path_prefix = "/plain"
service = "plain"

[[routes]]
listener = "web"
service = "web"

[services.web]
endpoints = [ {{ address = "{origin}" }} ]
[services.web.compression]

[services.plain]
endpoints = [ {{ address = "{origin}" }} ]
"#
    )
}

/// What curl got: the response head (lower case) and the body as received.
struct Got {
    head: String,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::trim)
    }
}

/// `curl ARGS URL`, with the head on stdout and the body in a file.
async fn curl(args: &[&str], url: String) -> Got {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let body = tempfile::NamedTempFile::new().unwrap();
        let out = Command::new("curl")
            .args(["-s", "-S", "-D", "-", "-o", body.path().to_str().unwrap()])
            .args(&args)
            .arg(&url)
            .output()
            .expect("curl runs (scripts/test.sh installs it)");
        assert!(out.status.success(), "curl {args:?} {url}: {out:?}");
        Got {
            head: String::from_utf8_lossy(&out.stdout).to_ascii_lowercase(),
            body: std::fs::read(body.path()).unwrap(),
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn text_is_compressed_for_clients_that_accept_it_and_decodes_to_the_original() {
    let o = origins(&["a"]).await;
    let port = free_port();
    let _d = Drover::start(&config(port, o[0].addr)).await;
    let url = |q: &str| {
        format!(
            "http://127.0.0.1:{port}/bytes/100000?type=text/html;%20charset=utf-8&etag=%22v1%22{q}"
        )
    };

    // gzip, when that is all the client takes: the raw body is gzip, much smaller.
    let gz = curl(&["-H", "accept-encoding: gzip"], url("")).await;
    assert!(gz.head.starts_with("http/1.1 200"), "{}", gz.head);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("vary"), Some("accept-encoding"));
    assert_eq!(
        gz.header("etag"),
        Some("w/\"v1\""),
        "a strong ETag becomes weak"
    );
    assert_eq!(gz.header("content-length"), None);
    assert_eq!(&gz.body[..2], &[0x1f, 0x8b], "a gzip stream");
    assert!(gz.body.len() < 2_000, "{} bytes", gz.body.len());

    // curl --compressed offers br too, which drover prefers; curl decodes it.
    let br = curl(&["--compressed"], url("")).await;
    assert_eq!(br.header("content-encoding"), Some("br"));
    assert_eq!(br.body.len(), 100_000);
    assert!(br.body.iter().all(|b| *b == b'x'));

    // A refused encoding (q=0) is not used.
    let no_br = curl(&["-H", "accept-encoding: br;q=0, gzip"], url("")).await;
    assert_eq!(no_br.header("content-encoding"), Some("gzip"));

    // 10 MiB streams through compressed, and decodes whole.
    let big = curl(
        &["--compressed"],
        format!("http://127.0.0.1:{port}/bytes/10485760?type=application/json"),
    )
    .await;
    assert_eq!(big.header("content-encoding"), Some("br"));
    assert_eq!(big.body.len(), 10 * 1024 * 1024);
}

#[tokio::test]
async fn responses_that_should_not_be_compressed_pass_untouched() {
    let o = origins(&["a"]).await;
    let port = free_port();
    let _d = Drover::start(&config(port, o[0].addr)).await;
    let base = format!("http://127.0.0.1:{port}");
    let cases = [
        (
            "no accept-encoding",
            vec![],
            format!("{base}/bytes/5000?type=text/plain"),
        ),
        (
            "a type not listed",
            vec!["--compressed"],
            format!("{base}/bytes/5000?type=image/png"),
        ),
        (
            "no content type",
            vec!["--compressed"],
            format!("{base}/bytes/5000"),
        ),
        (
            "shorter than min_length",
            vec!["--compressed"],
            format!("{base}/bytes/100?type=text/plain"),
        ),
        (
            "no-transform",
            vec!["--compressed"],
            format!("{base}/bytes/5000?type=text/plain&cache=no-transform"),
        ),
        (
            "an error status",
            vec!["--compressed"],
            format!("{base}/status/404?type=text/plain"),
        ),
        (
            "a service without compression",
            vec!["--compressed"],
            format!("{base}/plain/bytes/5000?type=text/plain"),
        ),
    ];
    for (why, args, url) in cases {
        let got = curl(&args, url).await;
        assert_eq!(got.header("content-encoding"), None, "{why}: {}", got.head);
        assert!(got.header("vary").is_none(), "{why}: {}", got.head);
    }
    // What the upstream encoded itself is not encoded again.
    let encoded = curl(
        &["-H", "accept-encoding: gzip"],
        format!("{base}/bytes/5000?type=text/plain&encoding=gzip"),
    )
    .await;
    assert_eq!(encoded.header("content-encoding"), Some("gzip"));
    assert_eq!(encoded.header("content-length"), Some("5000"));
    assert_eq!(
        encoded.body,
        vec![b'x'; 5000],
        "the upstream's bytes, untouched"
    );
    // HEAD gets the head an uncompressed GET would.
    let head = curl(
        &["-I", "--compressed"],
        format!("{base}/bytes/5000?type=text/plain"),
    )
    .await;
    assert_eq!(head.header("content-encoding"), None, "{}", head.head);
    assert_eq!(head.header("content-length"), Some("5000"));
}
