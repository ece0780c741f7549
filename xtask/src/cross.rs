//! Static release builds of the agent for each image platform, on this
//! x86-64 machine: natively for x86_64, with Debian's aarch64 cross
//! toolchain for arm64.
//!
//! The eBPF object needs no flag of ours: aya-build (agent/build.rs) reads
//! the agent's `CARGO_CFG_TARGET_ARCH` and builds the eBPF crate with
//! `--cfg bpf_target_arch="aarch64"`, so the kprobe's `pt_regs` argument
//! access matches the arm64 kernel. No prebuilt aarch64 standard library
//! can be downloaded here (`rustup target add` fails), so std is built
//! from rust-src (`-Z build-std`, allowed on stable by RUSTC_BOOTSTRAP=1,
//! as aya-build does for the BPF target).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, ensure};

use crate::tools::{self, target_dir};

/// What the aarch64 build needs from Debian (all in tools::EXTERNAL_PROGRAMS).
const AARCH64_PACKAGES: &[&str] = &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user-static"];

/// Builds `verdict-agent` static for `rust_target`, checks that it starts
/// (`--version`, under qemu-user for a foreign arch), returns its path.
pub fn build_static_agent(rust_target: &str) -> Result<PathBuf> {
    let bin = build_static(rust_target, "verdict-agent", "verdict-agent")?;
    let mut smoke = match emulator(rust_target) {
        Some(emulator) => {
            let mut c = Command::new(emulator);
            c.arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let version = tools::output(smoke.arg("--version")).with_context(|| format!("{} does not start", bin.display()))?;
    ensure!(version.contains(env!("CARGO_PKG_VERSION")), "{} --version printed {version:?}", bin.display());
    println!("image: {rust_target}: {}", version.trim());
    Ok(bin)
}

/// The user-mode emulator that runs `rust_target` binaries here, if foreign.
fn emulator(rust_target: &str) -> Option<&'static str> {
    rust_target.starts_with("aarch64-").then_some("qemu-aarch64-static")
}

/// `cargo build --release` of one binary of one package, static, for `rust_target`.
pub fn build_static(rust_target: &str, package: &str, bin: &str) -> Result<PathBuf> {
    tools::ensure_rust_src()?;
    tools::ensure_bpf_linker()?;
    let env_target = rust_target.to_uppercase().replace('-', "_");
    let target_dir = build_dir(rust_target);
    let mut cmd = tools::cargo();
    cmd.env("CARGO_TARGET_DIR", &target_dir);
    cmd.args(["build", "--release", "--locked", "-p", package, "--bin", bin, "--target"])
        .arg(rust_target)
        // Target-specific: reaches neither build scripts nor the BPF build.
        .env(format!("CARGO_TARGET_{env_target}_RUSTFLAGS"), "-C target-feature=+crt-static");
    match rust_target {
        "x86_64-unknown-linux-gnu" => {}
        "aarch64-unknown-linux-gnu" => {
            tools::ensure_apt(AARCH64_PACKAGES)?;
            cmd.args(["-Z", "build-std=std,panic_abort"])
                .env("RUSTC_BOOTSTRAP", "1")
                .env(format!("CARGO_TARGET_{env_target}_LINKER"), "aarch64-linux-gnu-gcc")
                // ring compiles C and assembly for the target.
                .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
                .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar");
        }
        other => anyhow::bail!("no cross build for {other}: only x86_64 and aarch64 are built"),
    }
    println!("cross: building {package} {bin} for {rust_target} (release, static)");
    tools::run(&mut cmd).with_context(|| format!("building {bin} for {rust_target}"))?;
    Ok(target_dir.join(rust_target).join("release").join(bin))
}

/// Where cargo builds for `rust_target`. A foreign target gets a target
/// directory of its own: sharing target/ with the x86_64 build (whose
/// environment differs: RUSTC_BOOTSTRAP, linker and C compiler variables)
/// made cargo rebuild the host's build scripts and proc macros each time
/// the two builds took turns (seen 2026-12-04), and the two could not run
/// side by side under cargo's lock.
fn build_dir(rust_target: &str) -> PathBuf {
    match rust_target {
        "x86_64-unknown-linux-gnu" => target_dir(),
        other => target_dir().join(format!("cross-{}", other.split('-').next().unwrap_or(other))),
    }
}
