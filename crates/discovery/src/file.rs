//! The config file source.
//!
//! The file's directory is watched (inotify on Linux), so that every way of changing a file
//! is seen: written in place, or written beside it and renamed over it as editors and
//! Kubernetes config maps do. A change is read after a short settling delay; when its text
//! differs from what was last sent, it is parsed and validated, and a valid file becomes a
//! snapshot for the reconciler. An invalid one is logged with every problem's line and field,
//! and the configuration in force keeps serving. SIGHUP (forwarded by the binary) re-reads the
//! file and sends it even when unchanged, so a rejected configuration can be retried.
//!
//! Each read is reported to the source's [`SourceHealth`]: a file read and parsed is a sync,
//! a file that cannot be read or does not validate is a failed one.
//!
//! [`SourceHealth`]: drover_control::sources::SourceHealth

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_control::{Snapshot, SnapshotSender};
use drover_model::SourceId;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Time for a burst of writes to one file to settle before it is read.
const SETTLE: Duration = Duration::from_millis(20);

/// The source id of a config file: `file:<path>`.
pub fn source_id(path: &Path) -> SourceId {
    SourceId(format!("file:{}", path.display()))
}

/// A watched config file.
pub struct FileSource {
    path: PathBuf,
    events: mpsc::Receiver<()>,
    _watcher: notify::RecommendedWatcher,
}

impl FileSource {
    /// Starts watching `path`'s directory. Watch before the first read, so that no change
    /// between the read and the watch is missed.
    pub fn watch(path: &Path) -> Result<Self, notify::Error> {
        let path = std::path::absolute(path).map_err(notify::Error::io)?;
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = path.file_name().map(ToOwned::to_owned);
        let (tx, events) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let ours = match &event {
                    // Opening or reading the file changes nothing. The source's own read
                    // opens it, so taking that for a change would re-read it forever.
                    Ok(e) if e.kind.is_access() => false,
                    Ok(e) => e.paths.iter().any(|p| p.file_name() == name.as_deref()),
                    // An error from the watcher: re-read, so that nothing is missed.
                    Err(_) => true,
                };
                if ours {
                    // Full means a read is already due; that read will see this change too.
                    let _ = tx.try_send(());
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(Self {
            path,
            events,
            _watcher: watcher,
        })
    }

    /// The file's absolute path; its source id is [`source_id`] of it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a snapshot for every change of the file, and on every `reload` signal, until the
    /// reconciler is gone. `last_text` is the text already in force.
    pub async fn run(
        mut self,
        snapshots: SnapshotSender,
        mut reload: mpsc::Receiver<()>,
        mut last_text: String,
    ) {
        let source = source_id(&self.path);
        let health = drover_control::sources::health(&source);
        loop {
            let forced = tokio::select! {
                Some(()) = self.events.recv() => false,
                Some(()) = reload.recv() => true,
                else => return,
            };
            tokio::time::sleep(SETTLE).await;
            while self.events.try_recv().is_ok() {}
            let text = match tokio::fs::read_to_string(&self.path).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(
                        file = %self.path.display(),
                        "cannot read the config file, the configuration in force keeps serving: {e}"
                    );
                    health.failed(format!("cannot read {}: {e}", self.path.display()));
                    continue;
                }
            };
            if !forced && text == last_text {
                continue;
            }
            let config = match drover_config::parse(&text, &self.path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(
                        "config file rejected, the configuration in force keeps serving:\n{e}"
                    );
                    health.failed(&e);
                    last_text = text;
                    continue;
                }
            };
            health.synced();
            last_text = text;
            let reason = if forced { "SIGHUP" } else { "file changed" };
            if snapshots
                .send(Snapshot::new(source.clone(), config, reason))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watcher wakes the source for a write, and not for a read: the source reads the file
    /// after every wake-up, so a read taken for a change would keep it re-reading for good.
    #[tokio::test]
    async fn a_write_wakes_the_source_and_a_read_does_not() {
        let dir = std::env::temp_dir().join(format!("drover-file-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("drover.toml");
        std::fs::write(&path, "# first\n").unwrap();
        let mut source = FileSource::watch(&path).unwrap();
        let wait = Duration::from_millis(300);

        std::fs::read_to_string(&path).unwrap();
        let woken = tokio::time::timeout(wait, source.events.recv()).await;
        assert!(woken.is_err(), "reading the file woke the source");

        std::fs::write(&path, "# second\n").unwrap();
        let woken = tokio::time::timeout(Duration::from_secs(5), source.events.recv()).await;
        assert_eq!(
            woken,
            Ok(Some(())),
            "writing the file did not wake the source"
        );

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
