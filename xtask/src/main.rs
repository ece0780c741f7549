//! `cargo xtask <command>`: every step that builds, tests, demonstrates or
//! measures verdict-agent. Each command installs what it needs first, and
//! installing twice is a no-op.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod arm64;
mod bench;
mod cross;
mod demo;
mod deploy;
mod e2e;
mod image;
mod rehearsal;
mod test;
mod tools;
mod vm;

#[derive(Parser)]
#[command(name = "xtask", about = "Build, test, demo and benchmark verdict-agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain pieces and system packages the project needs.
    Setup,
    /// Build the agent (with its eBPF programs) and the test binaries, in release.
    Build,
    /// Boot a Debian kernel in QEMU and run a command inside it.
    Vm(vm::VmArgs),
    /// Performance figures, each beside a baseline of the same run: the loss race against a perf-ring reader, agent CPU against the event rate, 100 k flows, in-kernel cost, a 5-minute soak; writes target/bench/summary.json.
    Bench(bench::BenchArgs),
    /// Run the agent on the built-in rollout scenario and serve /metrics on localhost.
    Demo(demo::DemoArgs),
    /// Run the whole suite: host tests, the tap on real kernels in QEMU, deploy checks.
    Test(test::TestArgs),
    /// Render the Helm chart to deploy/manifests and check everything under deploy/.
    Deploy(deploy::DeployArgs),
    /// Run the installers in a clean Debian 12 root (mmdebstrap, chroot) and check that every external program the suite and the demo start is then found and runs.
    Rehearse(rehearsal::RehearseArgs),
    /// Build the container image for linux/amd64 and linux/arm64 (static binaries, no container engine) as an OCI layout and archive under target/image/, and check it.
    Image(image::ImageArgs),
}

/// The eBPF crate is built by aya-build from agent/build.rs, so building
/// the agent builds the programs too.
fn build() -> anyhow::Result<()> {
    tools::ensure_rust_src()?;
    tools::ensure_bpf_linker()?;
    tools::run(tools::cargo().args([
        "build",
        "--release",
        "-p",
        "verdict-agent",
        "-p",
        "verdict-agent-tests",
        "--bins",
    ]))?;
    println!("built {}", tools::target_dir().join("release").join("verdict-agent").display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => tools::setup_all(),
        Command::Build => build(),
        Command::Vm(args) => vm::run_cli(args),
        Command::Deploy(args) => deploy::run_cli(args),
        Command::Test(args) => test::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Rehearse(args) => rehearsal::run_cli(args),
        Command::Image(args) => image::run_cli(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
