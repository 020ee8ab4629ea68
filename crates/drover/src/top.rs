//! `drover top`: the dashboard's view in a terminal. (Being written.)

use std::process::ExitCode;

/// Options of `drover top`.
#[derive(clap::Args)]
pub struct TopArgs {}

pub fn main(_args: TopArgs) -> ExitCode {
    eprintln!("drover top: not written yet");
    ExitCode::FAILURE
}
