//! Debian cloud kernels for the VM tests, cached under `target/vm/kernels/`.
//!
//! The packages come straight from Debian's archive through a private apt
//! configuration (own source list, lists and cache directories), so the
//! machine's apt setup is never changed. Layout:
//!
//! ```text
//! target/vm/kernels/
//!   apt/            sources.list, apt.conf, lists/, cache/
//!   resolved.json   the package chosen for each series (lets later runs skip the network)
//!   debs/           downloaded .deb files
//!   <uname -r>/     `dpkg -x` of the package, plus modules.dep from depmod
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::tools::{self, output, run};

/// Kernel series under test and the Debian release that ships each: Debian
/// builds a `cloud-amd64` and a `cloud-arm64` flavour of each. [`LATEST`]
/// floats: the newest cloud kernel of trixie-backports (7.2 in 2026-12),
/// the one kernel here whose verifier takes the direct-read tap
/// (`BPF_FEAT_RDONLY_CAST_TO_VOID`, Linux 6.17+); it is booted on amd64
/// only (each arm64 boot is minutes of TCG). Backports split the kernel
/// into `linux-binary-unsigned-*` (the image) and `linux-modules-*`.
pub const SERIES: &[(&str, &str)] =
    &[("5.10", "bullseye"), ("6.1", "bookworm"), ("6.12", "trixie"), (LATEST, "trixie-backports")];

/// The floating series: whatever trixie-backports ships newest.
pub const LATEST: &str = "latest";

/// The series booted on `arch`.
pub fn series_for(arch: Arch) -> Vec<&'static str> {
    SERIES.iter().map(|(s, _)| *s).filter(|s| arch == Arch::Amd64 || *s != LATEST).collect()
}

/// The architecture a kernel (and the payload that runs on it) is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Debian's name, as in `linux-image-*-cloud-<arch>-unsigned` and `[arch=...]`.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Each architecture has its own cache (lists, choice, debs, unpacked
    /// trees), so pruning one never removes the other's kernels.
    pub fn kernels_dir(self) -> PathBuf {
        match self {
            Arch::Amd64 => tools::target_dir().join("vm/kernels"),
            Arch::Arm64 => tools::target_dir().join("vm/kernels-arm64"),
        }
    }
}

const MIRROR: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Point releases ship new kernel ABIs every few weeks; look again after this
/// long, but keep using the cached choice when the archive is unreachable.
const REFRESH_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Debug)]
pub struct Kernel {
    pub arch: Arch,
    /// "5.10", "6.1", "6.12" or [`LATEST`].
    pub series: &'static str,
    /// `uname -r` inside the VM, e.g. "6.1.0-50-cloud-amd64".
    pub version: String,
    /// Debian package name and version it came from.
    pub package: String,
    pub package_version: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the unpacked package, with a modules.dep.
    pub modules_dir: PathBuf,
}

/// A kernel module to load, resolved against one kernel's modules.dep.
#[derive(Clone, Debug)]
pub struct ModuleFile {
    pub name: String,
    /// Path under `lib/modules/<version>/` without any compression suffix.
    pub rel_path: String,
    /// File in the unpacked package; may be `.ko.xz` or `.ko.zst`.
    pub host_path: PathBuf,
}

impl Kernel {
    /// The modules to insmod, dependencies first, for the requested names.
    /// Names match with `-` and `_` treated alike, as modprobe does. Modules
    /// built into the kernel are left out.
    pub fn module_load_order(&self, names: &[String]) -> Result<Vec<ModuleFile>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let dep_path = self.modules_dir.join("modules.dep");
        let dep_text = fs::read_to_string(&dep_path).with_context(|| {
            format!("cannot read {} (delete {} to unpack again)", dep_path.display(), self.modules_dir.display())
        })?;
        let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
        for line in dep_text.lines() {
            let Some((path, rest)) = line.split_once(':') else { continue };
            deps.insert(module_name(path), (path.to_string(), rest.split_whitespace().map(module_name).collect()));
        }
        let builtin: BTreeSet<String> = fs::read_to_string(self.modules_dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(module_name)
            .collect();

        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in names {
            let key = name.trim_end_matches(".ko").replace('-', "_");
            if !deps.contains_key(&key) {
                if builtin.contains(&key) {
                    continue;
                }
                bail!(
                    "kernel {} ({}) has no module `{name}` (not in {} nor built in)",
                    self.series,
                    self.version,
                    dep_path.display()
                );
            }
            self.visit_module(&key, &deps, &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit_module(
        &self,
        key: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<ModuleFile>,
    ) -> Result<()> {
        if !seen.insert(key.to_string()) {
            return Ok(());
        }
        let (path, needs) = deps.get(key).with_context(|| {
            format!("modules.dep of kernel {} names `{key}` as a dependency but has no entry for it", self.version)
        })?;
        // modules.dep lists the deepest dependency last; load those first.
        for dep in needs.iter().rev() {
            self.visit_module(dep, deps, seen, order)?;
        }
        order.push(ModuleFile {
            name: key.to_string(),
            rel_path: strip_compression(path).to_string(),
            host_path: self.modules_dir.join(path),
        });
        Ok(())
    }
}

impl ModuleFile {
    /// The module as `init_module` wants it: busybox insmod cannot read
    /// compressed modules, and trixie's are `.ko.xz`.
    pub fn read_uncompressed(&self) -> Result<Vec<u8>> {
        let path = &self.host_path;
        let name = path.to_string_lossy();
        let tool = if name.ends_with(".xz") {
            Some(("xz", "xz-utils"))
        } else if name.ends_with(".zst") {
            Some(("zstd", "zstd"))
        } else if name.ends_with(".gz") {
            Some(("gzip", "gzip"))
        } else {
            None
        };
        match tool {
            None => fs::read(path).with_context(|| format!("cannot read module {}", path.display())),
            Some((bin, package)) => {
                ensure_decompressor(package)?;
                let out = Command::new(bin)
                    .arg("-dc")
                    .arg(path)
                    .stdin(Stdio::null())
                    .output()
                    .with_context(|| format!("cannot run {bin} to decompress {}", path.display()))?;
                if !out.status.success() {
                    bail!("{bin} -dc {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
                }
                Ok(out.stdout)
            }
        }
    }
}

/// Checked once per process: a VM run decompresses a module per file.
fn ensure_decompressor(package: &'static str) -> Result<()> {
    static CHECKED: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if !checked.contains(package) {
        tools::ensure_apt(&[package])?;
        checked.insert(package);
    }
    Ok(())
}

fn strip_compression(path: &str) -> &str {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(p) = path.strip_suffix(ext) {
            return p;
        }
    }
    path
}

fn module_name(path: &str) -> String {
    let file = path.trim().rsplit('/').next().unwrap_or(path);
    strip_compression(file).trim_end_matches(".ko").replace('-', "_")
}

/// All three amd64 kernels, downloading and unpacking what is not cached yet.
pub fn ensure_kernels() -> Result<Vec<Kernel>> {
    ensure_kernels_for(Arch::Amd64)
}

/// Every kernel series booted on `arch`.
pub fn ensure_kernels_for(arch: Arch) -> Result<Vec<Kernel>> {
    ensure_series_for(arch, &series_for(arch), false)
}

/// The kernels of `arch` of the given series ("5.10", "6.1", "6.12").
/// `refresh` asks the archive for newer packages even when the cached
/// choice is recent.
pub fn ensure_series_for(arch: Arch, series: &[&str], refresh: bool) -> Result<Vec<Kernel>> {
    for s in series {
        if !SERIES.iter().any(|(name, _)| name == s) {
            bail!("unknown kernel series `{s}`; known: {}", series_names());
        }
    }
    let dir = arch.kernels_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Several engineers and test binaries share this cache.
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", lock_path.display()))?;

    let apt = PrivateApt::new(&dir, arch)?;
    let cached = Resolved::load(&dir);
    let cache_covers = cached.as_ref().is_some_and(|c| series.iter().all(|s| c.packages.contains_key(*s)));
    let cache_fresh = cached.as_ref().is_some_and(|c| c.age() < REFRESH_AFTER);
    let resolved = if cache_covers && cache_fresh && !refresh {
        cached.unwrap()
    } else {
        match apt.update().and_then(|()| apt.resolve()) {
            Ok(fresh) => {
                fresh.save(&dir)?;
                fresh
            }
            Err(e) if cache_covers => {
                println!("kernels: cannot refresh the package choice ({e:#}); using the cached one");
                cached.unwrap()
            }
            Err(e) => return Err(e.context("cannot find the Debian kernel packages, and none are cached")),
        }
    };

    let mut kernels = Vec::new();
    for s in series {
        let series: &'static str = SERIES.iter().find(|(n, _)| n == s).map(|(n, _)| *n).unwrap();
        let pkg = &resolved.packages[series];
        kernels.push(ensure_unpacked(&apt, &dir, arch, series, pkg)?);
    }
    prune(&dir, &resolved);
    Ok(kernels)
}

fn series_names() -> String {
    SERIES.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(", ")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Package {
    name: String,
    version: String,
}

impl Package {
    /// "linux-image-6.1.0-50-cloud-amd64-unsigned" -> "6.1.0-50-cloud-amd64",
    /// "linux-binary-unsigned-7.2.12+deb13-cloud-amd64" -> "7.2.12+deb13-cloud-amd64".
    fn uname(&self) -> Result<String> {
        self.name
            .strip_prefix("linux-image-")
            .and_then(|n| n.strip_suffix("-unsigned"))
            .or_else(|| self.name.strip_prefix(BINARY_UNSIGNED))
            .map(str::to_string)
            .with_context(|| format!("unexpected kernel package name {}", self.name))
    }

    /// The modules package of a split kernel (backports), else None: the
    /// image package holds its modules.
    fn modules(&self) -> Result<Option<Package>> {
        if !self.name.starts_with(BINARY_UNSIGNED) {
            return Ok(None);
        }
        Ok(Some(Package { name: format!("linux-modules-{}", self.uname()?), version: self.version.clone() }))
    }

    /// Every package to unpack for this kernel.
    fn all(&self) -> Result<Vec<Package>> {
        Ok(std::iter::once(self.clone()).chain(self.modules()?).collect())
    }
}

/// Name prefix of a split kernel's image package.
const BINARY_UNSIGNED: &str = "linux-binary-unsigned-";

#[derive(Debug, Serialize, Deserialize)]
struct Resolved {
    resolved_at_unix: u64,
    packages: BTreeMap<String, Package>,
}

impl Resolved {
    fn path(dir: &Path) -> PathBuf {
        dir.join("resolved.json")
    }

    fn load(dir: &Path) -> Option<Resolved> {
        serde_json::from_str(&fs::read_to_string(Self::path(dir)).ok()?).ok()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    }

    fn age(&self) -> Duration {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        Duration::from_secs(now.saturating_sub(self.resolved_at_unix))
    }
}

/// apt-get/apt-cache pointed at our own source list, lists and cache, for
/// one architecture (which need not be the machine's: nothing is installed).
struct PrivateApt {
    root: PathBuf,
    arch: Arch,
}

impl PrivateApt {
    fn new(kernels_dir: &Path, arch: Arch) -> Result<PrivateApt> {
        tools::ensure_apt(&["debian-archive-keyring"])?;
        let root = kernels_dir.join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("cannot create {}", root.join(sub).display()))?;
        }
        let sources: String = SERIES
            .iter()
            .map(|(_, suite)| {
                if arch == Arch::Amd64 {
                    // As it always was: an unchanged list keeps the cached lists valid.
                    format!("deb [signed-by={KEYRING}] {MIRROR} {suite} main\n")
                } else {
                    format!("deb [arch={} signed-by={KEYRING}] {MIRROR} {suite} main\n", arch.debian())
                }
            })
            .collect();
        write_if_changed(&root.join("sources.list"), &sources)?;
        // The machine's apt.conf.d has update/dpkg hooks that delete
        // /var/cache/apt/archives/*.deb; running them from here could pull
        // packages out from under someone else's concurrent apt-get install.
        write_if_changed(
            &root.join("apt.conf"),
            "#clear APT::Update::Pre-Invoke;\n#clear APT::Update::Post-Invoke;\n#clear APT::Update::Post-Invoke-Success;\n#clear DPkg::Post-Invoke;\n",
        )?;
        Ok(PrivateApt { root, arch })
    }

    fn command(&self, program: &str) -> Command {
        let r = &self.root;
        let mut cmd = Command::new(program);
        cmd.arg("-c").arg(r.join("apt.conf"));
        for opt in [
            format!("Dir::Etc::SourceList={}", r.join("sources.list").display()),
            "Dir::Etc::SourceParts=/dev/null".to_string(),
            format!("Dir::State::Lists={}", r.join("lists").display()),
            format!("Dir::Cache={}", r.join("cache").display()),
            // Only the Packages indices are needed: no translations, no AppStream.
            "Acquire::Languages=none".to_string(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_string(),
            // Our directories belong to root; apt's _apt sandbox user cannot write them.
            "APT::Sandbox::User=root".to_string(),
            // Plain package names mean this architecture's packages.
            format!("APT::Architecture={}", self.arch.debian()),
            format!("APT::Architectures={}", self.arch.debian()),
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd
    }

    fn update(&self) -> Result<()> {
        println!(
            "kernels: apt-get update (private lists for {})",
            SERIES.iter().map(|(_, s)| *s).collect::<Vec<_>>().join(", ")
        );
        output(self.command("apt-get").args(["-q", "update"]))
            .map(drop)
            .context("apt-get update of the private kernel sources failed (network to deb.debian.org?)")
    }

    fn lists_present(&self) -> bool {
        fs::read_dir(self.root.join("lists"))
            .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().contains("_Packages")))
            .unwrap_or(false)
    }

    /// The newest `linux-image-<series>.*-cloud-<arch>-unsigned` of each series,
    /// taken only from that series' own suite (bullseye also carries 6.1
    /// backports, which are not the kernel we mean by "6.1").
    fn resolve(&self) -> Result<Resolved> {
        let arch = self.arch.debian();
        let mut names = String::new();
        for pattern in
            [format!("^linux-image-.*-cloud-{arch}-unsigned$"), format!("^{BINARY_UNSIGNED}.*-cloud-{arch}$")]
        {
            names.push_str(&output(self.command("apt-cache").args(["search", "--names-only", &pattern]))?);
        }
        let names: Vec<&str> = names.lines().filter_map(|l| l.split_whitespace().next()).collect();
        if names.is_empty() {
            bail!("apt-cache found no linux-image-*-cloud-{arch}-unsigned packages in the private lists");
        }
        let madison = output(self.command("apt-cache").arg("madison").args(&names))?;
        let mut best: BTreeMap<String, Package> = BTreeMap::new();
        for line in madison.lines() {
            // "linux-image-6.1.0-50-cloud-amd64-unsigned |  6.1.176-1 | http://deb.debian.org/debian bookworm/main amd64 Packages"
            let fields: Vec<&str> = line.split('|').map(str::trim).collect();
            let [name, version, source] = fields[..] else { continue };
            let Some(suite) = source.split_whitespace().nth(1).and_then(|s| s.split('/').next()) else { continue };
            let Some((series, _)) = SERIES.iter().find(|(series, s)| {
                *s == suite
                    && (*series == LATEST
                        || name.strip_prefix("linux-image-").is_some_and(|v| v.starts_with(&format!("{series}."))))
            }) else {
                continue;
            };
            let candidate = Package { name: name.to_string(), version: version.to_string() };
            let newer = match best.get(*series) {
                None => true,
                Some(current) => version_gt(&candidate.version, &current.version)?,
            };
            if newer {
                best.insert(series.to_string(), candidate);
            }
        }
        for (series, suite) in SERIES {
            if *series == LATEST && self.arch != Arch::Amd64 {
                continue;
            }
            if !best.contains_key(*series) {
                bail!("no linux-image-{series}.*-cloud-{arch}-unsigned in Debian {suite} main");
            }
        }
        let resolved_at_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let resolved = Resolved { resolved_at_unix, packages: best };
        for (series, p) in &resolved.packages {
            println!("kernels: {series} -> {} {}", p.name, p.version);
        }
        Ok(resolved)
    }

    fn download(&self, pkg: &Package, debs: &Path) -> Result<PathBuf> {
        let partial = debs.join(format!("partial-{}", std::process::id()));
        fs::create_dir_all(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
        let spec = format!("{}={}", pkg.name, pkg.version);
        let attempt = |apt: &PrivateApt| {
            output(apt.command("apt-get").current_dir(&partial).args(["-q", "download", &spec])).map(drop)
        };
        println!("kernels: downloading {spec}");
        let mut result = attempt(self);
        if result.is_err() && !self.lists_present() {
            // The choice came from the cache but the lists were removed.
            self.update()?;
            result = attempt(self);
        }
        result.with_context(|| {
            format!("cannot download {spec}; run `cargo xtask vm --refresh-kernels` if the archive dropped it")
        })?;
        let file = fs::read_dir(&partial)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {spec} left no .deb in {}", partial.display()))?;
        let dest = debs.join(file.file_name().unwrap());
        fs::rename(&file, &dest).with_context(|| format!("cannot move {} to {}", file.display(), dest.display()))?;
        let _ = fs::remove_dir_all(&partial);
        Ok(dest)
    }
}

fn write_if_changed(path: &Path, content: &str) -> Result<()> {
    if fs::read_to_string(path).is_ok_and(|c| c == content) {
        return Ok(());
    }
    fs::write(path, content).with_context(|| format!("cannot write {}", path.display()))
}

fn version_gt(a: &str, b: &str) -> Result<bool> {
    let status = Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("cannot run dpkg --compare-versions")?;
    Ok(status.success())
}

fn deb_for(debs: &Path, pkg: &Package) -> Option<PathBuf> {
    // apt-get download escapes ':' (epochs) as %3a; kernels have no epoch,
    // but match on the prefix to stay independent of that.
    let prefix = format!("{}_{}_", pkg.name, pkg.version.replace(':', "%3a"));
    fs::read_dir(debs).ok()?.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
        p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            && p.extension().is_some_and(|e| e == "deb")
    })
}

fn find_modules_dir(root: &Path, uname: &str) -> Option<PathBuf> {
    // bullseye/bookworm ship /lib/modules, trixie (merged /usr) /usr/lib/modules.
    ["lib/modules", "usr/lib/modules"].iter().map(|d| root.join(d).join(uname)).find(|p| p.is_dir())
}

fn ensure_unpacked(apt: &PrivateApt, dir: &Path, arch: Arch, series: &'static str, pkg: &Package) -> Result<Kernel> {
    let uname = pkg.uname()?;
    let root = dir.join(&uname);
    let complete = root.join(".verdict-complete");
    if !complete.exists() {
        let debs = dir.join("debs");
        fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;
        let tmp = dir.join(format!(".unpack-{uname}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        for part in pkg.all()? {
            let deb = match deb_for(&debs, &part) {
                Some(deb) => deb,
                None => apt.download(&part, &debs)?,
            };
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))
                .with_context(|| format!("cannot unpack {}; delete it to download again", deb.display()))?;
        }
        let deb = pkg.name.clone();
        let modules = find_modules_dir(&tmp, &uname).with_context(|| format!("{deb} has no lib/modules/{uname}"))?;
        // Debian generates modules.dep in postinst, so the package has none.
        // The host's depmod only looks in <base>/lib/modules.
        if !tmp.join("lib").exists() {
            std::os::unix::fs::symlink("usr/lib", tmp.join("lib"))?;
        }
        // depmod is in kmod, which a fresh Debian 12 machine lacks.
        tools::ensure_apt(&["kmod"])?;
        run(Command::new("depmod").arg("-b").arg(&tmp).arg(&uname))
            .with_context(|| format!("depmod for {uname} failed ({})", modules.display()))?;
        File::create(tmp.join(".verdict-complete"))?;
        let _ = fs::remove_dir_all(&root);
        fs::rename(&tmp, &root).with_context(|| format!("cannot move {} to {}", tmp.display(), root.display()))?;
        println!("kernels: {series} unpacked {} into {}", pkg.name, root.display());
    }
    // A split kernel keeps its image beside its modules.
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{uname}")),
        root.join("usr/lib/modules").join(&uname).join("vmlinuz.unsigned"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| root.join("boot").join(format!("vmlinuz-{uname}")));
    let modules_dir = find_modules_dir(&root, &uname)
        .with_context(|| format!("{} has no lib/modules/{uname}; delete it to unpack again", root.display()))?;
    if !vmlinuz.is_file() {
        bail!("{} is missing; delete {} to unpack again", vmlinuz.display(), root.display());
    }
    Ok(Kernel {
        arch,
        series,
        version: uname,
        package: pkg.name.clone(),
        package_version: pkg.version.clone(),
        vmlinuz,
        modules_dir,
    })
}

/// Drop debs and unpacked trees of kernels that are no longer the choice
/// for any series (a point release replaced them).
fn prune(dir: &Path, resolved: &Resolved) {
    let keep_debs: Vec<String> = resolved
        .packages
        .values()
        .flat_map(|p| p.all().unwrap_or_default())
        .map(|p| format!("{}_{}_", p.name, p.version))
        .collect();
    let keep_roots: Vec<String> = resolved.packages.values().filter_map(|p| p.uname().ok()).collect();
    if let Ok(entries) = fs::read_dir(dir.join("debs")) {
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".deb") && !keep_debs.iter().any(|k| name.starts_with(k)) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_kernel_root = e.path().join(".verdict-complete").exists() || name.starts_with(".unpack-");
            if is_kernel_root && !keep_roots.contains(&name) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The guest's /bin/busybox for a foreign architecture: Debian's
/// busybox-static built for it, from bookworm through the private lists,
/// unpacked under that architecture's cache. (amd64 guests get the
/// machine's own, see vm.rs.)
pub fn foreign_busybox(arch: Arch) -> Result<PathBuf> {
    ensure!(arch != Arch::Amd64, "amd64 guests use the machine's own busybox");
    let dir = arch.kernels_dir();
    let unpacked = dir.join("busybox");
    let busybox = unpacked.join("bin/busybox");
    if busybox.is_file() {
        return Ok(busybox);
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", lock_path.display()))?;
    let apt = PrivateApt::new(&dir, arch)?;
    if !apt.lists_present() {
        apt.update()?;
    }
    let partial = dir.join(format!("busybox-partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    println!("kernels: downloading busybox-static for {}", arch.debian());
    output(apt.command("apt-get").current_dir(&partial).args(["-q", "download", "busybox-static/bookworm"]))
        .with_context(|| format!("cannot download busybox-static for {}", arch.debian()))?;
    let deb = fs::read_dir(&partial)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download busybox-static left no .deb in {}", partial.display()))?;
    let tmp = partial.join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
    ensure!(tmp.join("bin/busybox").is_file(), "{} has no bin/busybox", deb.display());
    let _ = fs::remove_dir_all(&unpacked);
    fs::rename(&tmp, &unpacked)?;
    let _ = fs::remove_dir_all(&partial);
    Ok(busybox)
}
