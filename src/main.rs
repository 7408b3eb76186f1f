//! The `orcheo-gateway` binary: parse the command line and dispatch.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    orcheo_gateway::cli::run(orcheo_gateway::cli::Cli::parse())
}
