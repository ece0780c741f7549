//! Boot a Debian kernel in QEMU with a throw-away initramfs, run one shell
//! command as the only workload, and hand back its exit code and console.
//!
//! The initramfs holds busybox, the payload files, the shared libraries of
//! every dynamically linked payload (copied to the paths `ldd` resolves on the
//! host, so glibc test binaries run without a second static build), and the
//! requested kernel modules. It is written as an uncompressed newc archive:
//! under TCG the guest would spend longer inflating it than QEMU spends
//! loading it.

// main.rs (not owned here) declares only `tools` and `vm`; the kernel cache
// lives in its own file and is reached as `crate::vm::kernels`.
#[path = "kernels.rs"]
pub mod kernels;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub use kernels::{Arch, Kernel, ensure_kernels};

use crate::tools;

/// Printed by /init after the payload; the host reads the exit code from it.
const EXIT_MARKER: &str = "VERDICT-VM-EXIT ";
/// Printed by /init when the VM itself could not be set up (a mount, lo, insmod).
const SETUP_FAILED_MARKER: &str = "VERDICT-VM-SETUP-FAILED ";
/// After the exit marker, `poweroff -f` should end QEMU at once; if it does
/// not, the result is already known and QEMU is killed after this long.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);

pub struct VmPayload {
    /// (host path, absolute path inside the VM).
    pub files: Vec<(PathBuf, String)>,
    /// Shell command run by /init (busybox sh), cwd /root, stdin /dev/null.
    pub command: String,
    /// Kernel modules to insmod before the command, e.g. "veth", "sch_ingress", "cls_bpf".
    pub modules: Vec<String>,
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
#[allow(dead_code, reason = "read by the VM test commands, which call run_in_vm/run_matrix")]
pub struct VmOutcome {
    /// The payload command's exit status.
    pub exit_code: i32,
    /// Everything the VM printed on its serial console (kernel and payload), `\r` removed.
    pub console: String,
}

#[derive(clap::Args)]
pub struct VmArgs {
    /// Kernel series to boot: 5.10, 6.1, 6.12, latest (amd64: the newest of trixie-backports) or all.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Kernel architecture: amd64 (qemu-system-x86_64) or arm64 (qemu-system-aarch64; payload files must be aarch64).
    #[arg(long, default_value = "amd64")]
    arch: String,
    /// Copy a host file into the VM (repeatable); shared libraries of ELF files come along.
    #[arg(long = "file", value_name = "HOST:GUEST")]
    files: Vec<String>,
    /// insmod this kernel module (and its dependencies) before the command (repeatable).
    #[arg(long = "module", value_name = "NAME")]
    modules: Vec<String>,
    /// Kill the VM after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Ask the Debian archive for newer kernel packages even if the cached choice is recent.
    #[arg(long)]
    refresh_kernels: bool,
    /// Shell command to run inside the VM (words are joined with spaces).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `cargo xtask vm`: prints the console as it comes and exits with the
/// payload's exit code (the first non-zero one with `--kernel all`).
pub fn run_cli(args: VmArgs) -> Result<()> {
    let arch = match args.arch.as_str() {
        "amd64" => Arch::Amd64,
        "arm64" => Arch::Arm64,
        other => bail!("--arch {other}: expected amd64 or arm64"),
    };
    let series: Vec<&str> = if args.kernel == "all" { kernels::series_for(arch) } else { vec![args.kernel.as_str()] };
    let mut files = Vec::new();
    for spec in &args.files {
        let (host, guest) = spec
            .split_once(':')
            .with_context(|| format!("--file {spec}: expected HOST:GUEST, e.g. target/debug/foo:/bin/foo"))?;
        files.push((PathBuf::from(host), guest.to_string()));
    }
    let payload = VmPayload {
        files,
        command: args.command.join(" "),
        modules: args.modules.clone(),
        timeout: Duration::from_secs(args.timeout),
    };
    let kernels = kernels::ensure_series_for(arch, &series, args.refresh_kernels)?;

    let mut summary = Vec::new();
    let mut first_failure = 0;
    let mut errors = Vec::new();
    for kernel in &kernels {
        println!(
            "=== kernel {} ({}, from {} {}) ===",
            kernel.series, kernel.version, kernel.package, kernel.package_version
        );
        let started = Instant::now();
        match run(kernel, &payload, true) {
            Ok(outcome) => {
                if first_failure == 0 {
                    first_failure = outcome.exit_code;
                }
                summary.push(format!(
                    "kernel {:<5} {:<32} exit {:<3} {:>5.1} s",
                    kernel.series,
                    kernel.version,
                    outcome.exit_code,
                    started.elapsed().as_secs_f64()
                ));
            }
            Err(e) => {
                summary.push(format!("kernel {:<5} {:<32} VM ERROR", kernel.series, kernel.version));
                errors.push(format!("{e:#}"));
            }
        }
    }
    println!("=== summary ===");
    for line in &summary {
        println!("{line}");
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    if first_failure != 0 {
        std::process::exit(first_failure.clamp(1, 255));
    }
    Ok(())
}

/// Boot `kernel`, run the payload, return its exit code and console.
/// A VM that does not boot, times out, or cannot set itself up is an error.
/// Set `VERDICT_VM_ECHO=1` to see the console live.
#[allow(dead_code, reason = "entry point for the VM test commands")]
/// [`run_in_vm`], booting again (up to `max_boots` boots in all, each retry
/// printed) when the guest kernel itself panics: Debian's kernels sometimes
/// fault under QEMU 7.2's TCG (a double fault in __kmalloc, a fault in
/// down_write), during boot as often as under our payload. A payload that
/// fails is never retried.
pub fn run_retrying_kernel_panics(kernel: &Kernel, payload: &VmPayload, max_boots: u32) -> Result<VmOutcome> {
    let mut boots = 0;
    loop {
        boots += 1;
        match run_in_vm(kernel, payload) {
            Err(e) if e.downcast_ref::<KernelPanicked>().is_some() && boots < max_boots => {
                println!("  RETRY: the {} kernel panicked under emulation (boot {boots}): {e:#}", kernel.version);
            }
            other => return other,
        }
    }
}

pub fn run_in_vm(kernel: &Kernel, payload: &VmPayload) -> Result<VmOutcome> {
    let echo = std::env::var_os("VERDICT_VM_ECHO").is_some_and(|v| v != "0" && !v.is_empty());
    run(kernel, payload, echo)
}

/// Run the payload on every kernel series, one VM at a time (CI has two cores).
#[allow(dead_code, reason = "entry point for the VM test commands")]
pub fn run_matrix(payload: &VmPayload) -> Result<Vec<(Kernel, VmOutcome)>> {
    let mut results = Vec::new();
    for kernel in ensure_kernels()? {
        let outcome = run_in_vm(&kernel, payload)?;
        results.push((kernel, outcome));
    }
    Ok(results)
}

fn ensure_vm_tools(arch: Arch) -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    static DONE_ARM64: OnceLock<Result<(), String>> = OnceLock::new();
    let (done, packages): (_, &[&str]) = match arch {
        Arch::Amd64 => (&DONE, &["qemu-system-x86", "busybox-static"]),
        // qemu-user runs the arm64 busybox on the host to list its applets.
        Arch::Arm64 => (&DONE_ARM64, &["qemu-system-arm", "qemu-user-static"]),
    };
    done.get_or_init(|| tools::ensure_apt(packages).map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
}

/// Log and scratch file names: the series for amd64 (as they always were),
/// `arm64-<series>` for arm64.
fn vm_name(kernel: &Kernel) -> String {
    match kernel.arch {
        Arch::Amd64 => kernel.series.to_string(),
        Arch::Arm64 => format!("{}-{}", kernel.arch.debian(), kernel.series),
    }
}

fn run(kernel: &Kernel, payload: &VmPayload, echo: bool) -> Result<VmOutcome> {
    ensure_vm_tools(kernel.arch)?;
    let vm_dir = tools::target_dir().join("vm");
    let logs = vm_dir.join("logs");
    let scratch = vm_dir.join("initramfs");
    for d in [&logs, &scratch] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    // Per process: several test binaries may boot VMs at the same time.
    let initrd = scratch.join(format!("{}-{}.cpio", vm_name(kernel), std::process::id()));
    let result = build_initramfs(kernel, payload, &initrd)
        .with_context(|| format!("cannot build the initramfs for kernel {}", kernel.version))
        .and_then(|()| boot(kernel, payload, &initrd, &logs.join(format!("{}.log", vm_name(kernel))), echo));
    let _ = fs::remove_file(&initrd);
    result
}

fn boot(kernel: &Kernel, payload: &VmPayload, initrd: &Path, log_path: &Path, echo: bool) -> Result<VmOutcome> {
    let (qemu, console) = match kernel.arch {
        Arch::Amd64 => ("qemu-system-x86_64", "ttyS0"),
        Arch::Arm64 => ("qemu-system-aarch64", "ttyAMA0"),
    };
    let mut cmd = Command::new(qemu);
    // Nested KVM hangs at boot on these machines, so TCG. Debian's 6.12
    // kernel meets TCG faults (measured 2026-11-22): with two vCPUs it panics
    // in ACPI init in about one boot in five (0 of 30 with one); with
    // multi-threaded TCG it double-faults in __kmalloc (a cmpxchg16b fast
    // path) in about one run in six, in `swapper` as in any process, with
    // -cpu max or Skylake-Client-v4 (0 of 8 with single-threaded TCG, which
    // costs nothing with one vCPU). The per-CPU summing is covered by the
    // host tests (2 CPUs). VERDICT_VM_CPU / VERDICT_VM_ACCEL override, for
    // debugging the harness.
    //
    // arm64: QEMU's `virt` board (PL011 serial on ttyAMA0, no firmware:
    // -kernel takes Debian's gzip-compressed Image directly) with `-cpu
    // max`; pointer authentication is emulated with QEMU's own cheap
    // algorithm (pauth-impdef) instead of QARMA, which costs TCG most of
    // its time, and the guest cannot tell the difference.
    let default_cpu = match kernel.arch {
        Arch::Amd64 => "Skylake-Client-v4",
        Arch::Arm64 => "max,pauth-impdef=on",
    };
    let cpu = std::env::var("VERDICT_VM_CPU").unwrap_or_else(|_| default_cpu.into());
    let accel = std::env::var("VERDICT_VM_ACCEL").unwrap_or_else(|_| "tcg,thread=single".into());
    if kernel.arch == Arch::Arm64 {
        cmd.args(["-machine", "virt"]);
    }
    cmd.args(["-accel", &accel, "-cpu", &cpu, "-m", "1024", "-smp", "1"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &format!("console={console} panic=-1 quiet")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = tools::show(&cmd);

    let mut log = File::create(log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    writeln!(log, "# {shown}")?;
    let started = Instant::now();
    let mut child =
        cmd.spawn().with_context(|| format!("cannot start `{shown}`; is {qemu} installed (cargo xtask setup)?"))?;

    let console = Arc::new(Mutex::new(Vec::<u8>::new()));
    let marker_seen = Arc::new(Mutex::new(None::<Instant>));
    let mut stdout = child.stdout.take().unwrap();
    let reader = {
        let console = console.clone();
        let marker_seen = marker_seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let _ = log.write_all(&buf[..n]);
                let _ = log.flush();
                if echo {
                    let mut out = io::stdout().lock();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
                let mut c = console.lock().unwrap();
                let before = c.len().saturating_sub(EXIT_MARKER.len());
                c.extend_from_slice(&buf[..n]);
                if marker_seen.lock().unwrap().is_none() && contains(&c[before..], EXIT_MARKER.as_bytes()) {
                    *marker_seen.lock().unwrap() = Some(Instant::now());
                }
            }
        })
    };
    let mut stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let deadline = started + payload.timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("cannot wait for QEMU")? {
            break Some(status);
        }
        let grace_over = marker_seen.lock().unwrap().is_some_and(|t| t.elapsed() > POWEROFF_GRACE);
        if grace_over || Instant::now() >= deadline {
            timed_out = !grace_over;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reader.join();
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    let console = String::from_utf8_lossy(&console.lock().unwrap()).replace('\r', "");
    let elapsed = started.elapsed();
    let where_ = format!("kernel {} ({}), console log {}", kernel.series, kernel.version, log_path.display());

    if timed_out {
        bail!(
            "VM timed out after {} s: {where_}; last console lines:\n{}",
            payload.timeout.as_secs(),
            tail(&console, 20)
        );
    }
    if let Some(line) = console.lines().find_map(|l| l.split_once(SETUP_FAILED_MARKER).map(|(_, m)| m)) {
        bail!("VM setup failed inside the guest ({line}): {where_}; last console lines:\n{}", tail(&console, 20));
    }
    let exit_code = console
        .lines()
        .filter_map(|l| l.split_once(EXIT_MARKER).map(|(_, rc)| rc.trim()))
        .next_back()
        .map(|rc| rc.parse::<i32>().with_context(|| format!("bad exit marker `{EXIT_MARKER}{rc}`: {where_}")))
        .transpose()?;
    let Some(exit_code) = exit_code else {
        if console.contains("Kernel panic") {
            return Err(anyhow::Error::new(KernelPanicked)
                .context(format!("the kernel panicked: {where_}; last console lines:\n{}", tail(&console, 30))));
        }
        let why = if let Some(status) = status.filter(|s| !s.success()) {
            format!("QEMU exited with {status}: {}", qemu_stderr.trim())
        } else {
            "the VM stopped before the payload finished".to_string()
        };
        bail!("{why}: {where_}; last console lines:\n{}", tail(&console, 30));
    };
    if echo {
        println!("[vm] kernel {} payload exit {exit_code}, VM ran {:.1} s", kernel.series, elapsed.as_secs_f64());
    }
    Ok(VmOutcome { exit_code, console })
}

/// The guest kernel panicked (as opposed to the payload failing): under
/// TCG that can be the emulator's fault, see `boot`.
#[derive(Debug)]
pub struct KernelPanicked;

impl std::fmt::Display for KernelPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the guest kernel panicked")
    }
}

impl std::error::Error for KernelPanicked {}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What goes into the archive at one path.
enum Entry {
    Dir,
    HostFile { host: PathBuf, mode: u32 },
    Data { bytes: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

fn build_initramfs(kernel: &Kernel, payload: &VmPayload, out: &Path) -> Result<()> {
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    for dir in ["proc", "sys", "dev", "tmp", "run", "root", "etc", "sys/fs/bpf", "sys/kernel/tracing"] {
        entries.insert(dir.to_string(), Entry::Dir);
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    entries.insert("dev/console".into(), Entry::CharDev { major: 5, minor: 1 });

    let (busybox, applets) = match kernel.arch {
        Arch::Amd64 => {
            let busybox = which("busybox").context("busybox not found on PATH; run `cargo xtask setup`")?;
            let applets = tools::output(Command::new(&busybox).arg("--list-full"))?;
            (busybox, applets)
        }
        Arch::Arm64 => {
            let busybox = kernels::foreign_busybox(kernel.arch)?;
            let applets = tools::output(Command::new("qemu-aarch64-static").arg(&busybox).arg("--list-full"))?;
            (busybox, applets)
        }
    };
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        entries.insert(applet.trim_start_matches('/').to_string(), Entry::Symlink("/bin/busybox".into()));
    }
    let mut elves = vec![busybox.clone()];
    entries.insert("bin/busybox".into(), Entry::HostFile { host: busybox, mode: 0o755 });

    for (host, guest) in &payload.files {
        let meta = fs::metadata(host).with_context(|| format!("payload file {} does not exist", host.display()))?;
        if !meta.is_file() {
            bail!("payload file {} is not a regular file", host.display());
        }
        let guest = guest_path(guest)?;
        entries.insert(guest, Entry::HostFile { host: host.clone(), mode: meta.permissions().mode() & 0o7777 });
        if is_elf(host) {
            elves.push(host.clone());
        }
    }
    let mut libs = BTreeSet::new();
    for elf in &elves {
        libs.extend(shared_libraries(elf)?);
    }
    for lib in libs {
        let guest = guest_path(&lib.to_string_lossy())?;
        // A payload file placed at the same path wins over the host's copy.
        entries.entry(guest).or_insert(Entry::HostFile { host: lib, mode: 0o755 });
    }

    let modules = kernel.module_load_order(&payload.modules)?;
    let mut insmods = String::new();
    for m in &modules {
        let guest = format!("lib/modules/{}/{}", kernel.version, m.rel_path);
        insmods.push_str(&format!("insmod /{guest} || fail \"insmod {} ({guest})\"\n", m.name));
        entries.insert(guest, Entry::Data { bytes: m.read_uncompressed()?, mode: 0o644 });
    }

    entries.insert("init".into(), Entry::Data { bytes: init_script(&insmods).into_bytes(), mode: 0o755 });
    entries
        .insert("verdict/command.sh".into(), Entry::Data { bytes: payload.command.clone().into_bytes(), mode: 0o755 });

    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cpio =
        CpioWriter { out: BufWriter::with_capacity(1 << 20, file), next_ino: 1, written_dirs: BTreeSet::new() };
    for (path, entry) in &entries {
        cpio.write(path, entry).with_context(|| format!("cannot add /{path} to {}", out.display()))?;
    }
    cpio.finish().with_context(|| format!("cannot write {}", out.display()))
}

fn init_script(insmods: &str) -> String {
    format!(
        r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
fail() {{ echo "{SETUP_FAILED_MARKER}$*"; poweroff -f; }}
# Debian's busybox-static has no `mountpoint` applet.
mounted() {{ grep -q " $1 " /proc/mounts; }}
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
mounted /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || fail "mount bpffs on /sys/fs/bpf"
mounted /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing || fail "mount tracefs on /sys/kernel/tracing"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || echo "debugfs: not mounted"
ip link set lo up || fail "ip link set lo up"
{insmods}cd /root
sh /verdict/command.sh </dev/null
rc=$?
echo "{EXIT_MARKER}$rc"
poweroff -f
"#
    )
}

fn guest_path(path: &str) -> Result<String> {
    if !path.starts_with('/') {
        bail!("path inside the VM must be absolute, got `{path}`");
    }
    let mut parts = Vec::new();
    for c in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            bail!("path inside the VM must not contain `..`: `{path}`");
        }
        parts.push(c);
    }
    if parts.is_empty() {
        bail!("`{path}` is not a file path");
    }
    Ok(parts.join("/"))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_string_lossy().split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"\x7fELF"
}

/// The libraries and dynamic loader `ldd` resolves for `elf` on the host;
/// empty for static binaries.
fn shared_libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run ldd on {}", elf.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable") || stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", elf.display(), stderr.trim());
    }
    let mut libs = Vec::new();
    for line in stdout.lines().map(str::trim) {
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("{} needs {} which ldd cannot find on the host", elf.display(), name.trim());
                }
                rest.split(" (").next().unwrap_or("").trim()
            }
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        // linux-vdso.so.1 and friends live in the kernel, not on disk.
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// newc ("070701") cpio writer, enough for the kernel's initramfs unpacker.
struct CpioWriter {
    out: BufWriter<File>,
    next_ino: u32,
    written_dirs: BTreeSet<String>,
}

impl CpioWriter {
    fn write(&mut self, path: &str, entry: &Entry) -> Result<()> {
        // The unpacker does not create missing parent directories.
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            if self.written_dirs.insert(parent.clone()) {
                self.header(&parent, 0o040755, 0, 0, 0)?;
            }
        }
        match entry {
            Entry::Dir => {
                if self.written_dirs.insert(path.to_string()) {
                    self.header(path, 0o040755, 0, 0, 0)?;
                }
            }
            Entry::Symlink(target) => {
                self.header(path, 0o120777, target.len() as u32, 0, 0)?;
                self.data(target.as_bytes())?;
            }
            Entry::CharDev { major, minor } => self.header(path, 0o020600, 0, *major, *minor)?,
            Entry::Data { bytes, mode } => {
                self.header(path, 0o100000 | mode, len32(bytes.len() as u64, path)?, 0, 0)?;
                self.data(bytes)?;
            }
            Entry::HostFile { host, mode } => {
                let mut f = File::open(host).with_context(|| format!("cannot open {}", host.display()))?;
                let len = f.metadata()?.len();
                self.header(path, 0o100000 | mode, len32(len, path)?, 0, 0)?;
                let copied = io::copy(&mut (&mut f).take(len), &mut self.out)?;
                if copied != len {
                    bail!("{} shrank while being copied", host.display());
                }
                self.pad(len as usize)?;
            }
        }
        Ok(())
    }

    fn header(&mut self, name: &str, mode: u32, size: u32, rdev_major: u32, rdev_minor: u32) -> Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let namesize = name.len() + 1;
        write!(
            self.out,
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{rdev_major:08x}{rdev_minor:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, 0
        )?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + namesize)?;
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.pad(bytes.len())
    }

    fn pad(&mut self, len: usize) -> Result<()> {
        let pad = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.header("TRAILER!!!", 0, 0, 0, 0)?;
        self.out.flush()?;
        Ok(())
    }
}

fn len32(len: u64, path: &str) -> Result<u32> {
    u32::try_from(len).map_err(|_| anyhow!("/{path} is larger than the 4 GiB a newc cpio entry can hold"))
}
