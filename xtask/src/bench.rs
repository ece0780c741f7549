//! `cargo xtask bench`: performance figures, only ever from here, each as a
//! ratio or difference against a baseline measured in the same run.
//! Writes the table to stdout and everything to target/bench/summary.json.

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::tools::{self, target_dir, workspace_root};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Shorter runs (seconds instead of minutes), for a smoke test.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    tools::ensure_rust_src()?;
    tools::ensure_bpf_linker()?;
    crate::test::ensure_bpffs()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    tools::run(Command::new(&cargo).current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "verdict-agent",
        "-p",
        "verdict-agent-tests",
        "--bins",
    ]))?;
    let bin = target_dir().join("release").join("kernel-cost");
    let mut cmd = Command::new(&bin);
    if args.quick {
        cmd.arg("--quick");
    }
    let out = cmd.output().with_context(|| format!("running {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "kernel-cost failed: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
    let (table, json) = stdout.trim_end().rsplit_once('\n').context("kernel-cost printed no summary")?;
    println!("{table}");
    let summary: serde_json::Value = serde_json::from_str(json).context("kernel-cost summary is not JSON")?;
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}
