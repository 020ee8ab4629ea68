//! Access log options of `drover run`. (Being written.)

/// Where and how requests are logged.
#[derive(clap::Args)]
pub struct AccessLogArgs {}
