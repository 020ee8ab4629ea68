//! The HTTP/1 front end: bytes from a client, through hyper with a listener's settings and
//! drover's request checks and routing, over an in-memory stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(drover_proxy::fuzz_front_end(data));
});
