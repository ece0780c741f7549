//! `cargo xtask test`: the whole suite, as CI runs it.
//!
//! Steps, each reported as passed or failed (a failed step does not stop
//! the others, so one run shows everything that is broken):
//! 1. install what is missing (rust-src, bpf-linker, Debian packages, kernels),
//!    and rehearse that install in a clean Debian 12 root (`rehearsal.rs`);
//! 2. the host tests (`cargo test`, as root: they load real BPF programs
//!    through the host kernel's verifier and run them with BPF_PROG_TEST_RUN);
//! 3. the tap on real kernels: one QEMU VM per Debian kernel (5.10, 6.1,
//!    6.12) runs `vm-driver` (fentry and kprobe, end to end);
//!    The container image for amd64 and arm64 is built and checked (`image.rs`);
//!    The same on Debian's arm64 kernels in qemu-system-aarch64 (`arm64.rs`);
//! 4. the deploy/ checks (Helm, manifests, Prometheus rules);
//! 5. the agent end to end with a real Prometheus evaluating the alerts.
//!
//! Ends with one line `xtask test: N passed, M failed`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    tools::{self, target_dir},
    vm::{self, VmPayload, kernels},
};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Run only the steps whose name contains this (host, vm, deploy, soak).
    #[arg(long)]
    pub only: Option<String>,
}

struct Outcome {
    name: String,
    result: Result<()>,
    took: Duration,
}

pub fn run(args: TestArgs) -> Result<()> {
    setup().context("installing what the tests need")?;
    let wanted = |name: &str| args.only.as_deref().is_none_or(|o| name.contains(o));
    let mut outcomes = Vec::new();
    let mut step = |name: &str, f: &mut dyn FnMut() -> Result<()>| {
        if !wanted(name) {
            return;
        }
        println!("\n=== {name}");
        let started = Instant::now();
        let result = f();
        if let Err(e) = &result {
            println!("=== {name}: FAILED: {e:#}");
        }
        outcomes.push(Outcome { name: name.to_string(), result, took: started.elapsed() });
    };

    step("rehearsal (installers in a clean Debian 12 root, every program found)", &mut crate::rehearsal::run);
    step("build", &mut build);
    step("image (linux/amd64 + linux/arm64, static, OCI archive)", &mut crate::image::build_and_check);
    step("lint (rustfmt, clippy -D warnings)", &mut lint);
    step("host tests", &mut host_tests);
    let kernels = kernels::ensure_kernels();
    match kernels {
        Ok(kernels) => {
            for k in kernels {
                step(&format!("vm {} ({})", k.series, k.version), &mut || vm_test(&k));
            }
        }
        Err(e) => step("vm kernels", &mut || Err(anyhow::anyhow!("{e:#}"))),
    }
    match crate::arm64::kernels() {
        Ok(kernels) => {
            for k in kernels {
                step(&format!("vm arm64 {} ({})", k.series, k.version), &mut || crate::arm64::vm_test(&k));
            }
        }
        Err(e) => step("vm arm64 kernels", &mut || Err(anyhow::anyhow!("{e:#}"))),
    }
    step("bench smoke (runs, reports every key; no timing asserted)", &mut bench_smoke);
    step("deploy checks", &mut crate::deploy::check);
    step("agent + real Prometheus", &mut crate::e2e::run);

    println!("\n=== summary");
    for o in &outcomes {
        let word = if o.result.is_ok() { "passed" } else { "FAILED" };
        println!("  {word:6} {:<40} {:>6.1}s", o.name, o.took.as_secs_f64());
    }
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    println!("xtask test: {} passed, {failed} failed", outcomes.len() - failed);
    if failed > 0 {
        bail!("{failed} step(s) failed");
    }
    Ok(())
}

fn setup() -> Result<()> {
    tools::ensure_root("the suite loads BPF programs and boots VMs")?;
    tools::ensure_rust_src()?;
    tools::ensure_bpf_linker()?;
    tools::ensure_apt(&tools::host_packages())?;
    ensure_bpffs()
}

/// bpffs may or may not be mounted on a fresh machine.
pub fn ensure_bpffs() -> Result<()> {
    let mounted = Command::new("mountpoint").args(["-q", "/sys/fs/bpf"]).status().is_ok_and(|s| s.success());
    if !mounted {
        tools::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        println!("mounted bpffs at /sys/fs/bpf");
    }
    Ok(())
}

/// The eBPF crate builds for the BPF target only; the object's build runs
/// it through bpf-linker and the verifier tests load it.
fn lint() -> Result<()> {
    tools::ensure_lint_tools()?;
    tools::run(tools::cargo().args(["fmt", "--all", "--check"]))?;
    tools::run(tools::cargo().args([
        "clippy",
        "-p",
        "verdict-agent",
        "-p",
        "verdict-agent-tests",
        "-p",
        "verdict-common",
        "-p",
        "verdict-testkit",
        "-p",
        "xtask",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn build() -> Result<()> {
    tools::run(tools::cargo().args([
        "build",
        "-p",
        "verdict-agent",
        "-p",
        "verdict-testkit",
        "-p",
        "verdict-agent-tests",
        "--bins",
    ]))
}

/// `verdict-bench --quick` on the debug build, soak aside (the host tests
/// run its 20-second form): every part runs and reports every key, and the
/// agent lost no verdict at any rate. No figure is asserted.
fn bench_smoke() -> Result<()> {
    let debug = target_dir().join("debug");
    let summary = target_dir().join("bench").join("smoke.json");
    let _ = std::fs::remove_file(&summary);
    let out = Command::new(debug.join("verdict-bench"))
        .args(["--quick", "kernel", "loss-race", "cpu", "scale", "revert", "--json"])
        .arg(&summary)
        .env("VERDICT_AGENT_BIN", debug.join("verdict-agent"))
        .output()
        .context("running verdict-bench --quick")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    ensure!(out.status.success(), "verdict-bench --quick failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary)?)
        .with_context(|| format!("{} is not JSON", summary.display()))?;
    let number = |path: &str| -> Result<f64> {
        path.split('.')
            .try_fold(&json, |v, k| v.get(k))
            .and_then(|v| v.as_f64())
            .with_context(|| format!("summary lacks the number {path}"))
    };
    for key in [
        "kernel.hot_flow_ns_per_verdict",
        "kernel.new_flow_ns_per_verdict",
        "kernel.new_flow_at_capacity_ns_per_verdict",
        "agent_max_loss_free_rate_per_s",
        "baseline_max_loss_free_rate_per_s",
        "agent_cpu.10k.cpu_s_per_s",
        "agent_cpu.100k.cpu_s_per_s",
        "agent_cpu.1M.cpu_s_per_s",
        "scrape_100k_flows.metrics_p99_ms",
        "scrape_100k_flows.flows_api_p99_ms",
        "scrape_100k_flows.metrics_body_bytes",
        "rss_mib",
        "kernel.new_flow_ratio_to_previous_design",
        "kernel.probe_read_ns_above_empty",
        "kernel.tap_path_hot_ns_above_empty",
        "kernel.tap_direct_hot_ns_above_empty",
        "kernel.notify_ring_with_room_ns_above_empty",
        "kernel.tap_share_of_notify",
        "revert.time_to_revert_ms_p50",
        "revert.time_to_revert_ms_p99",
        "revert.cilium_api_patch_ms_p99",
    ] {
        number(key)?;
    }
    let steps = json["loss_race"].as_array().context("summary lacks loss_race[]")?;
    ensure!(!steps.is_empty(), "loss_race[] is empty");
    ensure!(json["revert"]["trials"].as_u64() >= Some(20), "the revert part ran fewer than 20 trials");
    for s in steps {
        ensure!(s["baseline_lost"].is_number(), "loss_race[] row lacks baseline_lost: {s}");
        ensure!(s["agent_lost"].as_i64() == Some(0), "the agent lost verdicts in the loss race: {s}");
    }
    ensure!(json["agent_lost_nothing_at_any_rate"] == true, "the agent lost verdicts: see the table above");
    Ok(())
}

fn host_tests() -> Result<()> {
    tools::run(tools::cargo().args(["test", "--no-fail-fast"]))
}

/// A stripped copy of a debug binary: TCG boots a small initramfs faster.
fn stripped(bin: &str) -> Result<PathBuf> {
    let src = target_dir().join("debug").join(bin);
    let dir = target_dir().join("vm").join("payload");
    std::fs::create_dir_all(&dir)?;
    let dst = dir.join(bin);
    tools::run(Command::new("strip").arg("--strip-debug").arg(&src).arg("-o").arg(&dst))
        .with_context(|| format!("stripping {}", src.display()))?;
    Ok(dst)
}

/// Boots per kernel when the guest kernel itself panics (emulator faults).
const MAX_BOOTS: u32 = 5;

/// Chart values a kernel needs beyond the defaults, and why.
fn chart_values_for(kernel: &kernels::Kernel) -> Vec<&'static str> {
    let mut parts = kernel.version.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    // Before 5.11 BPF maps are charged to RLIMIT_MEMLOCK (64 KiB for init
    // before 5.16): raising it takes CAP_SYS_RESOURCE.
    if version < (5, 11) { vec!["memlockCapability=true"] } else { Vec::new() }
}

/// The VM driver's command line: the agent runs with exactly the
/// DaemonSet's privileges, as the chart renders them (defaults, plus what
/// this kernel needs), on x86-64 and arm64 alike.
pub fn vm_driver_command(kernel: &kernels::Kernel) -> Result<String> {
    let values = chart_values_for(kernel);
    let needed = crate::deploy::agent_privileges(&values).context("rendering the chart's agent privileges")?;
    let mut command = format!(
        "VERDICT_AGENT_BIN=/bin/verdict-agent RUST_LOG=info VERDICT_AGENT_UID={} VERDICT_AGENT_CAPS={}",
        needed.uid,
        needed.capabilities.join(",")
    );
    if !values.is_empty() {
        // ... and without those values the agent must say what it lacks.
        let default = crate::deploy::agent_privileges(&[])?;
        command.push_str(&format!(
            " VERDICT_AGENT_CAPS_DEFAULT={} VERDICT_AGENT_NEEDED_VALUES={}",
            default.capabilities.join(","),
            values.join(",")
        ));
    }
    command.push_str(" /bin/vm-driver");
    println!(
        "  agent privileges from the chart ({}): {command}",
        if values.is_empty() { "defaults".to_string() } else { values.join(" ") }
    );
    Ok(command)
}

fn vm_test(kernel: &kernels::Kernel) -> Result<()> {
    let command = vm_driver_command(kernel)?;
    let payload = VmPayload {
        files: vec![
            (stripped("verdict-agent")?, "/bin/verdict-agent".into()),
            (stripped("vm-driver")?, "/bin/vm-driver".into()),
        ],
        command,
        modules: Vec::new(),
        timeout: Duration::from_secs(600),
    };
    let outcome = vm::run_retrying_kernel_panics(kernel, &payload, MAX_BOOTS)?;
    for line in outcome.console.lines().filter(|l| l.contains("VMTEST")) {
        println!("  {line}");
    }
    ensure!(
        outcome.exit_code == 0
            && outcome.console.contains("VMTEST RESULT pass")
            && outcome.console.contains("VMTEST trial ")
            && !outcome.console.contains("VMTEST trial FAIL"),
        "the tap or the enforcement trial failed on kernel {} (exit {}); console in {}",
        kernel.version,
        outcome.exit_code,
        Path::new("target/vm/logs").join(format!("{}.log", kernel.series)).display()
    );
    Ok(())
}
