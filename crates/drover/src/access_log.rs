//! Access log options of `drover run` (docs/observability.md).

use std::path::PathBuf;

use anyhow::{Context, ensure};
use drover_proxy::AccessLog;
use drover_proxy::access::{Format, Target};

/// The queue's size when --access-log-buffer is not given.
const DEFAULT_BUFFER: usize = 8192;

/// Where and how requests are logged.
#[derive(clap::Args)]
pub struct AccessLogArgs {
    /// Log every request to PATH (appended to, and reopened on SIGUSR1), or to stdout with
    /// `-` [default: no access log].
    #[arg(long, value_name = "PATH|-")]
    access_log: Option<PathBuf>,
    /// Line format: `json` (one object per line, every field) or `combined` (nginx's and
    /// Apache's) [default: json].
    #[arg(long, value_name = "FORMAT", value_parser = parse_format)]
    access_log_format: Option<Format>,
    /// Records that may wait for the writer; when it falls behind, more are dropped (and
    /// counted in drover_access_log_dropped_total) rather than slow requests down
    /// [default: 8192].
    #[arg(long, value_name = "N")]
    access_log_buffer: Option<usize>,
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}

impl AccessLogArgs {
    /// Opens the access log and starts its writer, if one was asked for. Opening a FIFO
    /// waits for its reader.
    pub fn start(&self) -> anyhow::Result<Option<AccessLog>> {
        let Some(path) = &self.access_log else {
            ensure!(
                self.access_log_format.is_none() && self.access_log_buffer.is_none(),
                "--access-log-format and --access-log-buffer need --access-log PATH (or - for stdout)"
            );
            return Ok(None);
        };
        let buffer = self.access_log_buffer.unwrap_or(DEFAULT_BUFFER);
        ensure!(
            buffer > 0,
            "--access-log-buffer must be at least 1 (it is {buffer}); the default is {DEFAULT_BUFFER}"
        );
        let target = if path.as_os_str() == "-" {
            Target::Stdout
        } else {
            Target::File(path.clone())
        };
        let format = self.access_log_format.unwrap_or_default();
        let log = AccessLog::start(target.clone(), format, buffer)
            .with_context(|| format!("cannot open the access log {target}"))?;
        tracing::info!("access log: {format} to {target}, queue of {buffer} records");
        Ok(Some(log))
    }
}
