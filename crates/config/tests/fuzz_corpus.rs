//! Replays the committed fuzz corpus of the config parser (fuzz/corpus/config/).

use std::path::{Path, PathBuf};

#[test]
fn config_corpus_replays() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        if let Ok(text) = std::str::from_utf8(&data) {
            let _ = drover_config::parse(text, Path::new("fuzz.toml"));
        }
        n += 1;
    }
    assert!(n > 0, "{} is empty", dir.display());
}
