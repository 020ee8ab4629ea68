//! `drover ctl`: the management API from the command line.

use std::process::ExitCode;

/// Arguments of `drover ctl`.
#[derive(clap::Args)]
pub struct CtlArgs {}

pub fn main(_args: CtlArgs) -> ExitCode {
    eprintln!("drover ctl: not written yet");
    ExitCode::FAILURE
}
