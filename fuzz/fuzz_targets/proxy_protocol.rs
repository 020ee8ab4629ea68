//! PROXY protocol v1 and v2 headers from a trusted downstream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok((_, used)) = drover_proxy::proxy_protocol::parse(data) {
        assert!(
            used <= data.len(),
            "consumed {used} of {} bytes",
            data.len()
        );
    }
});
