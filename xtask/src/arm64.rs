//! The tap on Debian's arm64 kernels: the same VM driver and checks as on
//! x86-64 (exact counts through `/metrics`, other maps ignored, the agent
//! following a recreated `cilium_events`), run in `qemu-system-aarch64`
//! (`virt` board, TCG) with the agent and the driver cross-built for
//! aarch64 (`cross.rs`), their eBPF object built for
//! `bpf_target_arch = "aarch64"` (the kprobe reads arm64 `pt_regs`).
//!
//! fentry on a kernel function needs BPF trampolines that the function's
//! ftrace entry can call directly; on arm64 that came after 6.1 (ftrace
//! direct calls, 6.4 in mainline). Measured 2026-12-04 on Debian's arm64
//! kernels: 5.10 and 6.1 load the fentry program but refuse to attach it
//! (errno 524, ENOTSUPP), 6.12 attaches it. Where fentry is refused only
//! kprobe must pass, and fentry must stay refused: if it ever attached, the
//! table in docs/operations.md would be wrong, and this step says so.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};

use crate::{
    cross, tools,
    vm::{self, Arch, Kernel, VmPayload},
};

const TARGET: &str = "aarch64-unknown-linux-gnu";

/// Whether each series' arm64 kernel attaches fentry (measured, see above).
pub const FENTRY_ON_ARM64: &[(&str, bool)] = &[("5.10", false), ("6.1", false), ("6.12", true)];

/// The arm64 kernels, downloaded and unpacked under target/vm/kernels-arm64.
pub fn kernels() -> Result<Vec<Kernel>> {
    vm::kernels::ensure_kernels_for(Arch::Arm64)
}

/// A stripped copy (TCG boots a small initramfs faster).
fn stripped(bin: PathBuf) -> Result<PathBuf> {
    let dir = tools::target_dir().join("vm/payload-arm64");
    std::fs::create_dir_all(&dir)?;
    let dst = dir.join(bin.file_name().context("binary without a name")?);
    tools::run(Command::new("aarch64-linux-gnu-strip").arg("--strip-debug").arg(&bin).arg("-o").arg(&dst))
        .with_context(|| format!("stripping {}", bin.display()))?;
    Ok(dst)
}

/// Boots per kernel when the guest kernel itself panics (emulator faults).
const MAX_BOOTS: u32 = 3;

pub fn vm_test(kernel: &Kernel) -> Result<()> {
    ensure!(kernel.arch == Arch::Arm64, "{} is not an arm64 kernel", kernel.version);
    let agent = stripped(cross::build_static_agent(TARGET)?)?;
    let driver = stripped(cross::build_static(TARGET, "verdict-agent-tests", "vm-driver")?)?;
    let payload = VmPayload {
        files: vec![(agent, "/bin/verdict-agent".into()), (driver, "/bin/vm-driver".into())],
        command: crate::test::vm_driver_command(kernel)?,
        modules: Vec::new(),
        timeout: Duration::from_secs(1200),
    };
    let outcome = vm::run_retrying_kernel_panics(kernel, &payload, MAX_BOOTS)?;
    let lines: Vec<&str> = outcome.console.lines().filter(|l| l.contains("VMTEST")).collect();
    for line in &lines {
        println!("  {line}");
    }
    let log = format!("target/vm/logs/arm64-{}.log", kernel.series);
    let passed = |tap: &str| {
        lines.iter().any(|l| l.contains(&format!("VMTEST {tap} counted=")))
            && lines.iter().any(|l| l.contains(&format!("VMTEST {tap} recreate")))
            && !lines.iter().any(|l| l.contains(&format!("VMTEST {tap} FAIL")))
    };
    ensure!(passed("kprobe"), "kprobe tap failed on arm64 kernel {} (console in {log})", kernel.version);
    // The trial runs on the first tap that attached, so it runs here either way.
    ensure!(
        lines.iter().any(|l| l.contains("VMTEST trial ") && l.contains(" reverted "))
            && !lines.iter().any(|l| l.contains("VMTEST trial FAIL")),
        "the enforcement trial on the real tap failed on arm64 kernel {} (console in {log})",
        kernel.version
    );
    let fentry_expected = FENTRY_ON_ARM64
        .iter()
        .find(|(s, _)| *s == kernel.series)
        .map(|(_, f)| *f)
        .with_context(|| format!("no fentry expectation for arm64 series {}", kernel.series))?;
    if fentry_expected {
        ensure!(passed("fentry"), "fentry tap failed on arm64 kernel {} (console in {log})", kernel.version);
        ensure!(
            outcome.exit_code == 0 && outcome.console.contains("VMTEST RESULT pass"),
            "the VM driver failed on arm64 kernel {} (exit {}; console in {log})",
            kernel.version,
            outcome.exit_code
        );
    } else {
        ensure!(
            lines.iter().any(|l| l.contains("VMTEST fentry FAIL")),
            "fentry worked on arm64 kernel {}, which docs/operations.md says refuses it: update FENTRY_ON_ARM64 and the docs",
            kernel.version
        );
        println!("  fentry refused on arm64 {} as documented; kprobe counted exactly", kernel.series);
    }
    Ok(())
}
