//! The `--map` shorthand of the command line.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<drover_discovery::mapping::Mapping>();
    }
});
