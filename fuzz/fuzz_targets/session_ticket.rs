//! A session ticket offered by a client: opened with a listener's keys, then its bytes sealed
//! and opened again.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    assert!(
        !drover_proxy::fuzz_session_ticket(data),
        "a forged ticket opened"
    );
});
