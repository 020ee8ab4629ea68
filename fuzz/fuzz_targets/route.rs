//! Route matching: routes and a request, one a line (`drover_proxy::fuzz_route`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = drover_proxy::fuzz_route(data);
});
