//! `flotilla-control-plane`: parses the command line, sets up tracing, and runs the command.

use std::process::ExitCode;

use clap::Parser as _;
use flotilla_control_plane::{admin, cli::Cli};

#[tokio::main]
async fn main() -> ExitCode {
    flotilla::telemetry::init();
    match admin::run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
