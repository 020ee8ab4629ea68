//! A container's labels (`drover.*`): one `key=value` a line.
#![no_main]

use std::collections::HashMap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let labels: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let _ = drover_discovery::docker::labels::parse(&labels);
});
