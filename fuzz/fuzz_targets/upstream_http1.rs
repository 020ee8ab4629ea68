//! drover's HTTP/1.1 client reading an upstream's answer: the head, its framing, and a
//! chunked body with trailers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = drover_proxy::fuzz_upstream_answer(data);
});
