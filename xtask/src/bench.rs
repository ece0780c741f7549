//! `cargo xtask bench`: performance figures, only ever from here, each
//! beside a baseline measured in the same run and printed with the machine
//! it came from. Builds `verdict-bench` and `verdict-agent` in release,
//! runs the bench as root (it loads BPF programs and starts the agent),
//! streams its table, and writes target/bench/summary.json.
//!
//! Parts (see tests/src/bench/): in-kernel cost per verdict, the loss race
//! against a perf-ring reader, agent CPU against the event rate, scrapes
//! and RSS at 100 k flows, the time an enforcement trial takes to revert,
//! and a 5-minute soak with a SIGKILL restart.

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::tools::{self, target_dir};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Parts to run (default all): kernel, loss-race, cpu, scale, revert, soak.
    #[arg(value_parser = ["all", "kernel", "loss-race", "cpu", "scale", "revert", "soak"])]
    pub parts: Vec<String>,
    /// A few seconds per part (a smoke test; its figures are not to be quoted).
    #[arg(long)]
    pub quick: bool,
    /// Length of the soak (default 300 s, 20 s with --quick).
    #[arg(long)]
    pub soak_seconds: Option<u64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    tools::ensure_root("the benchmark loads BPF programs and runs them with BPF_PROG_TEST_RUN")?;
    tools::ensure_rust_src()?;
    tools::ensure_bpf_linker()?;
    crate::test::ensure_bpffs()?;
    tools::run(tools::cargo().args([
        "build",
        "--release",
        "-p",
        "verdict-agent-tests",
        "-p",
        "verdict-agent",
        "--bin",
        "verdict-bench",
        "--bin",
        "verdict-agent",
    ]))?;
    let release = target_dir().join("release");
    let summary = target_dir().join("bench").join("summary.json");
    let _ = std::fs::remove_file(&summary);
    let mut cmd = Command::new(release.join("verdict-bench"));
    cmd.args(&args.parts).arg("--json").arg(&summary).env("VERDICT_AGENT_BIN", release.join("verdict-agent"));
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(s) = args.soak_seconds {
        cmd.arg("--seconds").arg(s.to_string());
    }
    let started = std::time::Instant::now();
    // The table streams to our stdout; progress goes to stderr.
    let status = cmd.status().context("running verdict-bench")?;
    ensure!(summary.exists(), "verdict-bench wrote no summary ({status})");
    println!("\nwrote {} ({:.0} s)", summary.display(), started.elapsed().as_secs_f64());
    ensure!(status.success(), "verdict-bench reported a failure ({status}): see the table above");
    Ok(())
}
