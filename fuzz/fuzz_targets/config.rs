//! The config file: TOML parse, then validation, with errors that point at a line.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = drover_config::parse(text, std::path::Path::new("fuzz.toml"));
    }
});
