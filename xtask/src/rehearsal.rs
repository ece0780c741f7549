//! `cargo xtask rehearse`: the install steps of `cargo xtask setup` / `test`
//! / `demo`, run in a clean Debian 12 root file system, and every external
//! program in [`tools::EXTERNAL_PROGRAMS`] probed there.
//!
//! Why: CI runs on a machine that earlier work may have left packages on,
//! so a green run can hide an install step that a fresh machine needs
//! (kmod/depmod was one). Here the root starts as `mmdebstrap
//! --variant=minbase bookworm` (Debian's essential packages plus apt,
//! nothing else), this very xtask binary is copied in and runs its own
//! installer (`ensure_apt(host_packages())`) inside it, and then each
//! program must be found on PATH and answer its probe.
//!
//! Cached under `target/rehearsal/`: the base root as a tarball (made once,
//! remade after [`BASE_MAX_AGE`]) and the downloaded .deb files (bind
//! mounted as the root's apt archive), so a repeat costs an unpack and an
//! offline install. The root itself is made anew on every run and removed
//! after it.
//!
//! Toolchain programs (cargo, rustc, rustup) are the README's premise and
//! bpf-linker is built by `cargo install`; neither comes from Debian, and
//! neither is rehearsed here (the host's build step builds and runs them).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};

use crate::tools::{self, EXTERNAL_PROGRAMS, Source, target_dir};

/// Debian 12, the machine the README's two commands are written for.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Point releases move on; a month-old base would still be "fresh", but
/// not the Debian 12 a new machine gets.
const BASE_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Where the copied xtask lives inside the root.
const XTASK_IN_ROOT: &str = "usr/local/bin/xtask";

#[derive(clap::Args)]
pub struct RehearseArgs {
    /// Internal: run the installer and the probes in the current root
    /// (what the rehearsal runs inside the chroot).
    #[arg(long, hide = true)]
    pub inside: bool,
}

pub fn run_cli(args: RehearseArgs) -> Result<()> {
    if args.inside { inside() } else { run() }
}

/// Makes a clean root, runs `xtask rehearse --inside` in it, removes it.
pub fn run() -> Result<()> {
    tools::ensure_root("the rehearsal makes and enters a root file system")?;
    tools::ensure_apt(&["mmdebstrap", "debian-archive-keyring"])?;
    let dir = target_dir().join("rehearsal");
    let debs = dir.join("debs");
    fs::create_dir_all(debs.join("partial")).with_context(|| format!("cannot create {}", debs.display()))?;
    let base = ensure_base(&dir)?;

    let root = dir.join(format!("root-{}", std::process::id()));
    if root.exists() {
        remove_root(&root)?;
    }
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    tools::run(Command::new("tar").arg("-C").arg(&root).arg("-xf").arg(&base))
        .with_context(|| format!("unpacking {} into {}", base.display(), root.display()))?;
    let mounts = Mounts::enter(&root, &debs)?;
    let outcome = run_inside(&root);
    // A root that could not be unmounted is left in place: removing it
    // would reach into the .deb cache. remove_root checks again.
    mounts.leave()?;
    remove_root(&root)?;
    outcome
}

/// The base root tarball, made by mmdebstrap when missing or old.
fn ensure_base(dir: &Path) -> Result<PathBuf> {
    let base = dir.join(format!("{SUITE}-minbase.tar"));
    let fresh = fs::metadata(&base)
        .and_then(|m| m.modified())
        .is_ok_and(|t| SystemTime::now().duration_since(t).is_ok_and(|age| age < BASE_MAX_AGE));
    if fresh {
        println!("rehearsal: base root {} (cached)", base.display());
        return Ok(base);
    }
    let partial = dir.join(format!("{SUITE}-minbase.partial-{}.tar", std::process::id()));
    println!("rehearsal: making a clean {SUITE} root with mmdebstrap (about a minute)");
    tools::run(
        Command::new("mmdebstrap")
            .args(["--quiet", "--mode=root", "--variant=minbase", "--include=ca-certificates"])
            .args([SUITE])
            .arg(&partial)
            .arg(format!("deb {MIRROR} {SUITE} main"))
            .arg(format!("deb {MIRROR} {SUITE}-updates main"))
            .arg(format!("deb http://deb.debian.org/debian-security {SUITE}-security main")),
    )
    .context("mmdebstrap could not make the base root; is Debian's archive reachable?")?;
    fs::rename(&partial, &base).with_context(|| format!("cannot move {} to {}", partial.display(), base.display()))?;
    Ok(base)
}

/// What the rehearsal mounts in the root, unmounted in reverse order.
struct Mounts {
    mounted: Vec<PathBuf>,
}

impl Mounts {
    fn enter(root: &Path, debs: &Path) -> Result<Mounts> {
        let mut mounts = Mounts { mounted: Vec::new() };
        let result = mounts.mount_all(root, debs);
        match result {
            Ok(()) => Ok(mounts),
            Err(e) => {
                mounts.leave().context("and unmounting after that failed too")?;
                Err(e)
            }
        }
    }

    fn mount_all(&mut self, root: &Path, debs: &Path) -> Result<()> {
        // /proc for apt and dpkg's maintainer scripts.
        self.mount(&root.join("proc"), &["-t", "proc", "proc"])?;
        // A private /dev with the few nodes apt, dpkg and the probes use; the
        // host's /dev is never bind mounted, so nothing here can touch it.
        let dev = root.join("dev");
        self.mount(&dev, &["-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs"])?;
        for (name, minor) in [("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)] {
            tools::run(Command::new("mknod").args(["-m", "666"]).arg(dev.join(name)).args([
                "c",
                "1",
                &minor.to_string(),
            ]))?;
        }
        // The .deb cache, kept across runs so a repeat installs offline.
        let archives = root.join("var/cache/apt/archives");
        fs::create_dir_all(&archives)?;
        self.mount(&archives, &["--bind", &debs.to_string_lossy()])?;
        // Name resolution for apt-get update, as the host has it.
        fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf")).context("copying /etc/resolv.conf into the root")?;
        // This xtask, to run its own installer inside.
        let exe = std::env::current_exe().context("cannot find the running xtask binary")?;
        let dst = root.join(XTASK_IN_ROOT);
        fs::create_dir_all(dst.parent().unwrap_or(root))?;
        fs::copy(&exe, &dst).with_context(|| format!("copying {} into the root", exe.display()))?;
        Ok(())
    }

    fn mount(&mut self, at: &Path, how: &[&str]) -> Result<()> {
        fs::create_dir_all(at).with_context(|| format!("cannot create {}", at.display()))?;
        tools::run(Command::new("mount").args(how).arg(at))?;
        self.mounted.push(at.to_path_buf());
        Ok(())
    }

    fn leave(mut self) -> Result<()> {
        let mut failed = Vec::new();
        while let Some(at) = self.mounted.pop() {
            if let Err(e) = tools::run(Command::new("umount").arg(&at)) {
                failed.push(format!("{}: {e:#}", at.display()));
            }
        }
        ensure!(failed.is_empty(), "cannot unmount {}; unmount by hand before removing the root", failed.join("; "));
        Ok(())
    }
}

/// Removes a rehearsal root, refusing while anything is still mounted in it.
fn remove_root(root: &Path) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    let prefix = root.to_string_lossy().into_owned();
    if let Some(line) = mounts.lines().find(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&prefix))) {
        bail!("{} still has a mount ({line}); unmount it, then remove the directory", root.display());
    }
    fs::remove_dir_all(root).with_context(|| format!("cannot remove {}", root.display()))
}

fn run_inside(root: &Path) -> Result<()> {
    println!("rehearsal: running xtask's installers and probes inside {}", root.display());
    let status = Command::new("chroot")
        .arg(root)
        .arg(Path::new("/").join(XTASK_IN_ROOT))
        .args(["rehearse", "--inside"])
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .status()
        .context("cannot run chroot")?;
    ensure!(
        status.success(),
        "the rehearsal in a clean {SUITE} root failed ({status}): a program the suite or the demo runs is not installed by xtask's installers (see the lines above); add it to tools::EXTERNAL_PROGRAMS"
    );
    Ok(())
}

/// Inside the clean root: install with the real installer, then probe.
fn inside() -> Result<()> {
    tools::ensure_apt(&tools::host_packages())?;
    let mut failed = Vec::new();
    let mut probed = 0;
    for program in EXTERNAL_PROGRAMS {
        let Source::Apt(package) = program.source else { continue };
        probed += 1;
        let out = Command::new(program.name).args(program.probe).stdin(Stdio::null()).output();
        match out {
            Ok(o) if o.status.success() => {
                let text = if o.stdout.is_empty() { &o.stderr } else { &o.stdout };
                let first = String::from_utf8_lossy(text).lines().next().unwrap_or("").trim().to_string();
                println!("  found {:<24} ({package}): {first}", program.name);
            }
            Ok(o) => failed.push(format!(
                "`{} {}` ({package}) exited with {}: {}",
                program.name,
                program.probe.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => failed.push(format!("`{}` ({package}) cannot be started: {e}", program.name)),
        }
    }
    // `python3 -m pip` is how deploy's installer downloads helm, kubectl and
    // kubernetes-validate; pip3 on PATH alone would not show the module.
    if let Err(e) = tools::output(Command::new("python3").args(["-m", "pip", "--version"])) {
        failed.push(format!("python3 -m pip: {e:#}"));
    }
    if !failed.is_empty() {
        for f in &failed {
            println!("  MISSING {f}");
        }
        bail!("{} of {probed} programs missing or broken in a clean root", failed.len());
    }
    println!("rehearsal: all {probed} programs found and ran in a clean root");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program started by a literal name (`Command::new` of a string) in the sources must be in the
    /// table, or the rehearsal would not install or probe it.
    #[test]
    fn every_started_program_is_in_the_table() {
        let root = tools::workspace_root();
        let mut files = Vec::new();
        for dir in ["xtask/src", "tests/src", "agent/src"] {
            collect_rust_files(&root.join(dir), &mut files);
        }
        assert!(files.len() > 10, "found only {} source files under {}", files.len(), root.display());
        let mut missing = Vec::new();
        for file in &files {
            let text = fs::read_to_string(file).unwrap();
            for name in literal_commands(&text) {
                if !EXTERNAL_PROGRAMS.iter().any(|p| p.name == name) {
                    missing.push(format!("{name} (in {})", file.display()));
                }
            }
        }
        assert!(missing.is_empty(), "programs started but not in tools::EXTERNAL_PROGRAMS: {missing:?}");
    }

    #[test]
    fn literal_commands_are_read() {
        let src = r#"Command::new("depmod").arg(x); Command::new(&bin); Command::new( "ip" )"#;
        assert_eq!(literal_commands(src), ["depmod", "ip"]);
    }

    #[test]
    fn host_packages_are_unique_and_include_every_apt_source() {
        let packages = tools::host_packages();
        for p in EXTERNAL_PROGRAMS {
            if let Source::Apt(package) = p.source {
                assert!(packages.contains(&package), "{package} for {} not installed", p.name);
            }
        }
        let mut sorted = packages.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), packages.len(), "a package is listed twice: {packages:?}");
        assert!(packages.contains(&"kmod"), "depmod's package (a fresh Debian 12 lacks it)");
    }

    fn literal_commands(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("Command::new(") {
            rest = &rest[at + "Command::new(".len()..];
            let arg = rest.trim_start();
            if let Some(quoted) = arg.strip_prefix('"')
                && let Some(end) = quoted.find('"')
            {
                let name = &quoted[..end];
                // A program name, not prose that happens to follow the call in a comment.
                let program_like = name.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
                if program_like {
                    out.push(name.to_string());
                }
            }
        }
        out
    }

    fn collect_rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                collect_rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
}
