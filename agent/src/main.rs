//! The `verdict-agent` binary: the daemon (`run`) and the operator's CLI.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "verdict-agent",
    version,
    about = "Counts Cilium policy verdicts in the kernel, exports them for Prometheus, \
             and tells you whether leaving PolicyAuditMode will break something."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {}
}
