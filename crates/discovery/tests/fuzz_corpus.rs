//! Replays the committed fuzz corpora of the label and `--map` parsers (fuzz/corpus/).

use std::collections::HashMap;
use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let files: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

#[test]
fn docker_labels_corpus_replays() {
    let mut wanted = 0;
    for data in corpus("docker_labels") {
        let text = String::from_utf8_lossy(&data);
        let labels: HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Ok(Some(_)) = drover_discovery::docker::labels::parse(&labels) {
            wanted += 1;
        }
    }
    assert!(wanted > 0, "some seeds are valid label sets");
}

#[test]
fn mapping_corpus_replays() {
    let mut ok = 0;
    for data in corpus("mapping") {
        if let Ok(text) = std::str::from_utf8(&data) {
            ok += usize::from(text.parse::<drover_discovery::mapping::Mapping>().is_ok());
        }
    }
    assert!(ok > 0, "some seeds are valid mappings");
}
