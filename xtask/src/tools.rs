//! Idempotent installers: each `ensure_*` checks first, installs only what is
//! missing, and prints one line saying what it did, so `cargo xtask setup`
//! (and every command that calls these) is cheap to repeat.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;

use anyhow::{Context, Result, bail};

/// Where an external program that xtask, the tests or the demo run comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Debian package, installed by [`ensure_apt`] from [`host_packages`].
    Apt(&'static str),
    /// The Rust toolchain the README asks for (rustup, cargo, rustc).
    Toolchain,
    /// Built by `cargo install` ([`ensure_bpf_linker`]).
    CargoInstall,
}

/// One external program: its name on PATH, where it comes from, and a
/// call that shows it is there and runs (the fresh-root rehearsal makes it).
#[derive(Clone, Copy, Debug)]
pub struct ExternalProgram {
    pub name: &'static str,
    pub source: Source,
    pub probe: &'static [&'static str],
}

const fn apt(name: &'static str, package: &'static str, probe: &'static [&'static str]) -> ExternalProgram {
    ExternalProgram { name, source: Source::Apt(package), probe }
}

/// Every program that `cargo xtask` (setup, test, demo, deploy, image,
/// vm, bench) and the test binaries start, with the package that provides
/// it. [`host_packages`] installs them and the rehearsal
/// (`cargo xtask rehearse`) installs them in a clean Debian 12 root and
/// runs each probe there; a test fails when the sources start a program
/// (`Command::new("...")`) that is missing here.
pub const EXTERNAL_PROGRAMS: &[ExternalProgram] = &[
    // Package management: the installers themselves and the kernel unpacking.
    apt("apt-get", "apt", &["--version"]),
    apt("dpkg", "dpkg", &["--version"]),
    apt("dpkg-query", "dpkg", &["--version"]),
    // The VM tests: QEMU, the initramfs' busybox, modules.dep for the guest kernels.
    apt("qemu-system-x86_64", "qemu-system-x86", &["--version"]),
    apt("qemu-system-aarch64", "qemu-system-arm", &["--version"]),
    apt("busybox", "busybox-static", &["--list-full"]),
    apt("cpio", "cpio", &["--version"]),
    apt("depmod", "kmod", &["--version"]),
    apt("strip", "binutils", &["--version"]),
    apt("ldd", "libc-bin", &["--version"]),
    apt("xz", "xz-utils", &["--version"]),
    apt("zstd", "zstd", &["--version"]),
    apt("gzip", "gzip", &["--version"]),
    // bpffs and the rehearsal's own mounts, capability sets for the tests.
    apt("mount", "mount", &["--version"]),
    apt("umount", "mount", &["--version"]),
    apt("mountpoint", "util-linux", &["--version"]),
    apt("setpriv", "util-linux", &["--version"]),
    apt("unshare", "util-linux", &["--version"]),
    // Looking at BPF state and network namespaces when a test fails.
    apt("bpftool", "bpftool", &["version"]),
    apt("ip", "iproute2", &["-V"]),
    // deploy checks and the end-to-end step.
    apt("prometheus", "prometheus", &["--version"]),
    apt("promtool", "prometheus", &["--version"]),
    apt("python3", "python3", &["--version"]),
    apt("pip3", "python3-pip", &["--version"]),
    // The image: the commit it names, and skopeo as a second reader of the layout.
    apt("git", "git", &["--version"]),
    apt("skopeo", "skopeo", &["--version"]),
    // The rehearsal: a clean Debian 12 root, unpacked and entered.
    apt("mmdebstrap", "mmdebstrap", &["--version"]),
    apt("tar", "tar", &["--version"]),
    apt("chroot", "coreutils", &["--version"]),
    apt("mknod", "coreutils", &["--version"]),
    apt("sleep", "coreutils", &["--version"]),
    // The arm64 cross build: linker and C compiler for aarch64 (ring), and
    // the agent run under user-mode emulation as a smoke test.
    apt("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", &["--version"]),
    apt("aarch64-linux-gnu-strip", "binutils-aarch64-linux-gnu", &["--version"]),
    apt("qemu-aarch64-static", "qemu-user-static", &["--version"]),
    ExternalProgram { name: "cargo", source: Source::Toolchain, probe: &["--version"] },
    ExternalProgram { name: "rustc", source: Source::Toolchain, probe: &["--version"] },
    ExternalProgram { name: "rustup", source: Source::Toolchain, probe: &["--version"] },
    ExternalProgram { name: "bpf-linker", source: Source::CargoInstall, probe: &["--version"] },
];

/// Packages that provide no program of their own but that the installers
/// need: the Debian archive key for the private kernel source list, the
/// aarch64 C library for the cross build.
const SUPPORT_PACKAGES: &[&str] = &["debian-archive-keyring", "ca-certificates", "libc6-dev-arm64-cross"];

/// The packages `cargo xtask setup` (and `test`, `demo`, and the
/// rehearsal) install on the host: every package named in
/// [`EXTERNAL_PROGRAMS`] and [`SUPPORT_PACKAGES`], each once, in table order.
pub fn host_packages() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    let named = EXTERNAL_PROGRAMS.iter().filter_map(|p| match p.source {
        Source::Apt(package) => Some(package),
        Source::Toolchain | Source::CargoInstall => None,
    });
    for package in named.chain(SUPPORT_PACKAGES.iter().copied()) {
        if !out.contains(&package) {
            out.push(package);
        }
    }
    out
}

/// Install everything the project's build, tests and VMs need.
pub fn setup_all() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_apt(&host_packages())?;
    let kernels = crate::vm::kernels::ensure_kernels()?;
    for k in &kernels {
        println!("kernel {}: {} ({})", k.series, k.version, k.vmlinuz.display());
    }
    Ok(())
}

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` like cargo does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() { dir } else { workspace_root().join(dir) }
        }
        _ => workspace_root().join("target"),
    }
}

/// Run a command, failing with its stderr (and what it was) if it exits non-zero.
/// The cargo that runs xtask (`$CARGO`), in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Fails unless running as root; `why` says what needs it.
pub fn ensure_root(why: &str) -> Result<()> {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("{why}: run it as root");
    }
    Ok(())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    let status = cmd.status().with_context(|| format!("cannot start `{shown}` (is it installed?)"))?;
    if !status.success() {
        bail!("`{shown}` failed with {status}");
    }
    Ok(())
}

/// Run a command and return its stdout; stderr is included in the error.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out =
        cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start `{shown}` (is it installed?)"))?;
    if !out.status.success() {
        bail!("`{shown}` failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn apt_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "install ok installed")
        .unwrap_or(false)
}

/// Other engineers and CI jobs may hold the dpkg lock; wait for it instead of failing.
const APT_LOCK_WAIT: &str = "DPkg::Lock::Timeout=600";

/// Install the Debian packages that are not installed yet.
pub fn ensure_apt(packages: &[&str]) -> Result<()> {
    static UPDATE: Once = Once::new();
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !apt_installed(p)).collect();
    if missing.is_empty() {
        println!("apt: already installed: {}", packages.join(" "));
        return Ok(());
    }
    let mut update_result = Ok(());
    UPDATE.call_once(|| {
        update_result = run(Command::new("apt-get").args(["-q", "-o", APT_LOCK_WAIT, "update"]))
            .context("apt-get update failed; check the network and /etc/apt/sources.list*");
    });
    update_result?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-q", "-y", "-o", APT_LOCK_WAIT, "install", "--no-install-recommends"])
        .args(&missing))
    .with_context(|| format!("installing {} with apt-get failed", missing.join(" ")))?;
    println!("apt: installed {}", missing.join(" "));
    Ok(())
}

fn rustc_sysroot() -> Result<PathBuf> {
    let out = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

/// aya-build compiles `core` for the BPF target, which needs the library sources.
pub fn ensure_rust_src() -> Result<()> {
    let lock = rustc_sysroot()?.join("lib/rustlib/src/rust/library/Cargo.lock");
    if lock.exists() {
        println!("rust-src: already installed");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src"]))
        .context("installing rust-src failed; run `rustup component add rust-src` by hand to see why")?;
    if !lock.exists() {
        bail!(
            "rustup added rust-src but {} is still missing; is `rustc` from a different toolchain than rustup's default?",
            lock.display()
        );
    }
    println!("rust-src: installed");
    Ok(())
}

/// rustfmt and clippy, for the lint step: in rustup's default profile,
/// but a minimal toolchain lacks them.
pub fn ensure_lint_tools() -> Result<()> {
    for (tool, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let present = Command::new("cargo")
            .args([tool, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if present {
            println!("{component}: already installed");
            continue;
        }
        run(Command::new("rustup").args(["component", "add", component]))
            .with_context(|| format!("installing {component} failed; run `rustup component add {component}`"))?;
        println!("{component}: installed");
    }
    Ok(())
}

const BPF_LINKER_VERSION: &str = "0.13.0";

fn bpf_linker_runs(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Where `cargo install` puts binaries (same rules as cargo).
fn cargo_install_bin_dir() -> PathBuf {
    if let Some(root) = std::env::var_os("CARGO_INSTALL_ROOT").filter(|r| !r.is_empty()) {
        return PathBuf::from(root).join("bin");
    }
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home).join("bin");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo/bin")
}

/// bpf-linker links against the Rust toolchain's own libLLVM (there is no
/// system LLVM 22 here). It finds that library only through `$PREFIX/lib`, so
/// when the toolchain changes the library's file name changes, the binary stops
/// starting, and it has to be rebuilt: that is the "does it run" check below.
pub fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_runs(Path::new("bpf-linker")) {
        println!("bpf-linker: already installed and runs");
        return Ok(());
    }
    let sysroot_lib = rustc_sysroot()?.join("lib");
    let mut libllvm: Vec<PathBuf> = std::fs::read_dir(&sysroot_lib)
        .with_context(|| format!("cannot list {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("libLLVM.so.") && name.contains("-rust-") && name.ends_with("-stable")
        })
        .collect();
    libllvm.sort();
    let Some(lib) = libllvm.last() else {
        bail!(
            "no libLLVM.so.*-rust-*-stable in {}; bpf-linker needs a stable toolchain that ships libLLVM (`rustup toolchain install stable`)",
            sysroot_lib.display()
        );
    };
    let lib_name = lib.file_name().unwrap_or_default().to_string_lossy().into_owned();
    // "libLLVM.so.22.1-rust-1.95.0-stable" -> bpf-linker feature "llvm-22".
    let major = lib_name
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()) && !m.is_empty())
        .with_context(|| format!("cannot read the LLVM major version from {lib_name}"))?
        .to_string();

    // Beside the installed binary, not in this checkout's target/: the
    // binary keeps this path as its library search path, and a checkout
    // (or its target/) may be deleted while the binary stays installed.
    let prefix = cargo_install_bin_dir().parent().unwrap_or(Path::new("/")).join("verdict-agent-bpf-linker-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib).with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    // The build script links `libLLVM.so`; the built binary asks for the
    // versioned soname and searches only `$PREFIX/lib`, so both links are needed.
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(&lib_name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib, &link)
            .with_context(|| format!("cannot link {} -> {}", link.display(), lib.display()))?;
    }
    println!("bpf-linker: building {BPF_LINKER_VERSION} against {} (takes about 2 minutes)", lib.display());
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--force"])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")]))
    .context("building bpf-linker failed; see cargo's output above")?;

    let installed = cargo_install_bin_dir().join("bpf-linker");
    if !bpf_linker_runs(&installed) {
        bail!(
            "{} was built but `--version` fails; check `ldd {}` against {}",
            installed.display(),
            installed.display(),
            prefix_lib.display()
        );
    }
    if !bpf_linker_runs(Path::new("bpf-linker")) {
        bail!(
            "bpf-linker was installed to {} but the `bpf-linker` on PATH still does not run; put {} first on PATH",
            installed.display(),
            installed.parent().unwrap_or(Path::new("")).display()
        );
    }
    println!("bpf-linker: installed {BPF_LINKER_VERSION} to {}", installed.display());
    Ok(())
}
