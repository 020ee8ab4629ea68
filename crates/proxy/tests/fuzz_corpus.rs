//! Replays the committed fuzz corpora (fuzz/corpus/) of the data plane's targets through the
//! functions the fuzz targets call, so every input that once found a bug stays fixed.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

#[test]
fn route_corpus_replays() {
    let mut matched = 0;
    for (_, data) in corpus("route") {
        matched += usize::from(drover_proxy::fuzz_route(&data));
    }
    assert!(matched > 0, "some seed routes");
}

#[test]
fn proxy_protocol_corpus_replays() {
    let mut parsed = 0;
    for (path, data) in corpus("proxy_protocol") {
        if let Ok((_, used)) = drover_proxy::proxy_protocol::parse(&data) {
            assert!(used <= data.len(), "{}", path.display());
            parsed += 1;
        }
    }
    assert!(parsed > 0, "the seeds hold valid headers");
}

#[test]
fn http1_corpus_replays() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (path, data) in corpus("http1") {
        let out = rt.block_on(drover_proxy::fuzz_front_end(&data));
        if data.starts_with(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n") {
            assert!(
                out.starts_with(b"HTTP/1.1 503"),
                "{}: {:?}",
                path.display(),
                String::from_utf8_lossy(&out)
            );
        }
    }
}

#[test]
fn upstream_http1_corpus_replays() {
    for (path, data) in corpus("upstream_http1") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let read = drover_proxy::fuzz_upstream_answer(&data);
        let expected: Option<(u16, &[u8])> = match name.as_str() {
            "length" => Some((200, b"hello")),
            "chunked_trailers" => Some((200, b"hello world")),
            "interim" => Some((201, b"ok")),
            "until_close" => Some((200, b"all of it")),
            "no_content" => Some((204, b"")),
            "cl_te" | "chunk_overflow" => None,
            // Inputs the fuzzer found: they must not panic.
            _ => continue,
        };
        assert_eq!(
            read.as_ref().map(|(s, b)| (*s, b.as_slice())),
            expected,
            "{}",
            path.display()
        );
    }
}

#[test]
fn session_ticket_corpus_replays() {
    for (path, data) in corpus("session_ticket") {
        assert!(
            !drover_proxy::fuzz_session_ticket(&data),
            "{} opened as a ticket",
            path.display()
        );
    }
}
