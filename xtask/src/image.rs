//! `cargo xtask image`: the agent's container image for linux/amd64 and
//! linux/arm64, as an OCI image layout and an OCI archive, with no
//! container engine.
//!
//! Each platform's image is one layer: the static release binary at
//! `/usr/local/bin/verdict-agent`, `/etc/passwd` and `/etc/group` naming
//! uid/gid 65532 (`nonroot`, as distroless does), Debian's CA bundle, and `/tmp`. No shell, no
//! libc, no package manager: the binary is static (`+crt-static`), so
//! nothing else is needed. The layout is written here directly (tar, gzip,
//! sha256, the OCI JSON documents):
//!
//! ```text
//! target/image/
//!   oci/                          the OCI image layout
//!     oci-layout, index.json      index.json: one image index, ref.name = the version
//!     blobs/sha256/...            that index (both platforms), manifests, configs, layers
//!   verdict-agent-<version>.oci.tar   the same layout as one tar (skopeo's oci-archive:)
//! ```
//!
//! Push with `skopeo copy --all oci-archive:target/image/verdict-agent-0.1.0.oci.tar:0.1.0
//! docker://REGISTRY/verdict-agent:0.1.0` (docs/operations.md, "Container image").
//!
//! [`check`] reads the layout back and fails unless both platforms are
//! there with valid digests and sizes, the entrypoint is a static ELF for
//! the platform's machine, the user is not root and the image has no shell;
//! skopeo (Debian's) then inspects it as a second, independent reader.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::tools::{self, target_dir, workspace_root};

const ENTRYPOINT: &str = "/usr/local/bin/verdict-agent";
/// distroless' `nonroot`. The DaemonSet runs the agent as uid 0 with only
/// the BPF capabilities (docs/operations.md, "Why uid 0"); the image's own
/// default is the least it can be.
const USER: &str = "65532:65532";
/// Debian's ca-certificates bundle, copied from the build machine.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Every file's mtime in the layers: the same sources give the same digests.
const EPOCH: u64 = 0;

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A platform the image is built for.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// OCI `architecture` (Go's GOARCH).
    pub oci_arch: &'static str,
    pub variant: Option<&'static str>,
    /// The Rust target the agent is built for.
    pub rust_target: &'static str,
    /// ELF `e_machine` of that target.
    pub elf_machine: u16,
    /// binutils' strip for that target.
    pub strip: &'static str,
}

pub const PLATFORMS: &[Platform] = &[
    Platform {
        oci_arch: "amd64",
        variant: None,
        rust_target: "x86_64-unknown-linux-gnu",
        elf_machine: 62,
        strip: "strip",
    },
    Platform {
        oci_arch: "arm64",
        variant: Some("v8"),
        rust_target: "aarch64-unknown-linux-gnu",
        elf_machine: 183,
        strip: "aarch64-linux-gnu-strip",
    },
];

#[derive(clap::Args)]
pub struct ImageArgs {
    /// Only check an existing target/image/oci, do not build.
    #[arg(long)]
    pub check_only: bool,
    /// Build and check only this platform (amd64 or arm64; repeatable). The
    /// default, and what `cargo xtask test` does, is both.
    #[arg(long = "platform", value_name = "ARCH")]
    pub platforms: Vec<String>,
}

/// The `xtask test` step: both images built from this tree, then checked.
pub fn build_and_check() -> Result<()> {
    build(PLATFORMS)?;
    check(PLATFORMS)
}

pub fn run_cli(args: ImageArgs) -> Result<()> {
    let mut wanted = Vec::new();
    for name in &args.platforms {
        let p = PLATFORMS
            .iter()
            .find(|p| p.oci_arch == name)
            .with_context(|| format!("--platform {name}: expected amd64 or arm64"))?;
        wanted.push(*p);
    }
    let wanted = if wanted.is_empty() { PLATFORMS.to_vec() } else { wanted };
    if !args.check_only {
        build(&wanted)?;
    }
    check(&wanted)
}

/// The image's tag: the agent's version, which must be the chart's appVersion
/// (the chart's default image tag), or the chart would pull a tag nobody pushed.
pub fn version() -> Result<String> {
    let crate_version = env!("CARGO_PKG_VERSION");
    let chart = fs::read_to_string(workspace_root().join("deploy/helm/verdict-agent/Chart.yaml"))
        .context("reading deploy/helm/verdict-agent/Chart.yaml")?;
    let chart: serde_yaml::Value = serde_yaml::from_str(&chart).context("parsing Chart.yaml")?;
    let app_version = chart["appVersion"].as_str().context("Chart.yaml has no appVersion")?;
    ensure!(
        app_version == crate_version,
        "Chart.yaml appVersion {app_version} differs from the workspace version {crate_version}: the chart's default tag would name an image this build does not make"
    );
    Ok(crate_version.to_string())
}

pub fn image_dir() -> PathBuf {
    target_dir().join("image")
}

pub fn archive_path(version: &str) -> PathBuf {
    image_dir().join(format!("verdict-agent-{version}.oci.tar"))
}

/// Builds the binaries, then writes the layout and the archive.
pub fn build(platforms: &[Platform]) -> Result<()> {
    let version = version()?;
    let mut binaries = Vec::new();
    for platform in platforms {
        let built = crate::cross::build_static_agent(platform.rust_target)?;
        binaries.push((*platform, stripped(platform, &built)?));
    }
    write_layout(&version, &binaries)?;
    println!("image: {}", archive_path(&version).display());
    Ok(())
}

/// The release profile keeps debug info (about 120 MB); the image carries
/// the binary without it (symbols stay, for backtraces).
fn stripped(platform: &Platform, built: &Path) -> Result<PathBuf> {
    let dir = image_dir().join("bin").join(platform.oci_arch);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let out = dir.join("verdict-agent");
    tools::run(Command::new(platform.strip).arg("--strip-debug").arg(built).arg("-o").arg(&out))
        .with_context(|| format!("stripping {}", built.display()))?;
    Ok(out)
}

/// A blob store: each blob written once under blobs/sha256/, its descriptor returned.
struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    fn put(&self, media_type: &str, bytes: &[u8]) -> Result<Value> {
        let digest = sha256_hex(bytes);
        let path = self.dir.join(&digest);
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        Ok(json!({ "mediaType": media_type, "digest": format!("sha256:{digest}"), "size": bytes.len() }))
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn write_layout(version: &str, binaries: &[(Platform, PathBuf)]) -> Result<()> {
    let dir = image_dir();
    let layout = dir.join("oci");
    let _ = fs::remove_dir_all(&layout);
    let blobs = Blobs { dir: layout.join("blobs/sha256") };
    fs::create_dir_all(&blobs.dir).with_context(|| format!("cannot create {}", blobs.dir.display()))?;
    let source = source_revision();

    let mut manifests = Vec::new();
    for (platform, binary) in binaries {
        let layer_tar = layer(binary)?;
        let diff_id = format!("sha256:{}", sha256_hex(&layer_tar));
        let layer = blobs.put(MEDIA_LAYER, &gzip(&layer_tar)?)?;
        let mut platform_json = json!({ "architecture": platform.oci_arch, "os": "linux" });
        if let Some(v) = platform.variant {
            platform_json["variant"] = json!(v);
        }
        let mut config = platform_json.clone();
        config["config"] = json!({
            "User": USER,
            "Entrypoint": [ENTRYPOINT],
            "Cmd": ["run"],
            "Env": ["PATH=/usr/local/bin"],
            "Labels": labels(version, &source),
        });
        config["rootfs"] = json!({ "type": "layers", "diff_ids": [diff_id] });
        let config = blobs.put(MEDIA_CONFIG, &serde_json::to_vec(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config,
            "layers": [layer],
            "annotations": labels(version, &source),
        });
        let mut descriptor = blobs.put(MEDIA_MANIFEST, &serde_json::to_vec(&manifest)?)?;
        descriptor["platform"] = platform_json;
        manifests.push(descriptor);
    }
    let image_index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": manifests,
        "annotations": labels(version, &source),
    });
    let mut image_index = blobs.put(MEDIA_INDEX, &serde_json::to_vec(&image_index)?)?;
    // The tag skopeo's `oci-archive:FILE:TAG` names.
    image_index["annotations"] = json!({ "org.opencontainers.image.ref.name": version });
    let top = json!({ "schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [image_index] });
    fs::write(layout.join("index.json"), serde_json::to_vec(&top)?)?;
    fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;

    // The archive: the layout's files at the tar's top level.
    let archive = archive_path(version);
    let partial = archive.with_extension("partial");
    {
        let mut tar = tar::Builder::new(fs::File::create(&partial)?);
        tar.mode(tar::HeaderMode::Deterministic);
        tar.append_dir_all(".", &layout).with_context(|| format!("archiving {}", layout.display()))?;
        tar.into_inner()?.flush()?;
    }
    fs::rename(&partial, &archive)?;
    Ok(())
}

fn labels(version: &str, source: &str) -> Value {
    json!({
        "org.opencontainers.image.title": "verdict-agent",
        "org.opencontainers.image.description": "Counts Cilium policy verdicts in the kernel and warns before host-firewall lockouts",
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": source,
    })
}

/// The commit the image was built from ("unknown" outside a git checkout).
fn source_revision() -> String {
    tools::output(Command::new("git").arg("-C").arg(workspace_root()).args(["rev-parse", "HEAD"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The single layer: the binary, the nonroot user, /tmp.
fn layer(binary: &Path) -> Result<Vec<u8>> {
    let agent = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(EPOCH);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data).with_context(|| format!("adding {path} to the layer"))
    };
    for dir in ["etc/", "tmp/", "usr/", "usr/local/", "usr/local/bin/"] {
        let mode = if dir == "tmp/" { 0o1777 } else { 0o755 };
        add(dir, tar::EntryType::Directory, mode, &[])?;
    }
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )?;
    add("etc/group", tar::EntryType::Regular, 0o644, b"root:x:0:\nnonroot:x:65532:\n")?;
    // Trust roots for any TLS peer that is not the API server (whose CA the
    // service account mounts), as distroless/static carries them.
    let roots = fs::read(CA_BUNDLE).with_context(|| format!("reading {CA_BUNDLE} (Debian's ca-certificates)"))?;
    for dir in ["etc/ssl/", "etc/ssl/certs/"] {
        add(dir, tar::EntryType::Directory, 0o755, &[])?;
    }
    add(CA_BUNDLE.trim_start_matches('/'), tar::EntryType::Regular, 0o644, &roots)?;
    add(ENTRYPOINT.trim_start_matches('/'), tar::EntryType::Regular, 0o755, &agent)?;
    Ok(tar.into_inner()?)
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    // mtime 0 in the gzip header (GzBuilder's default): reproducible digests.
    let mut enc = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes)?;
    Ok(enc.finish()?)
}

// ---------------------------------------------------------------- check

/// Reads target/image/oci back: both platforms, digests and sizes, entrypoint,
/// user, no shell; then the archive through skopeo.
pub fn check(platforms: &[Platform]) -> Result<()> {
    let version = version()?;
    let layout = image_dir().join("oci");
    let blob = |descriptor: &Value| -> Result<Vec<u8>> {
        let digest = descriptor["digest"].as_str().context("descriptor without digest")?;
        let hex = digest.strip_prefix("sha256:").with_context(|| format!("digest {digest} is not sha256"))?;
        let bytes =
            fs::read(layout.join("blobs/sha256").join(hex)).with_context(|| format!("blob {digest} missing"))?;
        ensure!(sha256_hex(&bytes) == hex, "blob {digest} does not match its digest");
        ensure!(
            descriptor["size"].as_u64() == Some(bytes.len() as u64),
            "blob {digest}: size differs from its descriptor"
        );
        Ok(bytes)
    };
    let top: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).context("index.json missing")?)?;
    ensure!(top["schemaVersion"] == 2, "index.json: schemaVersion is not 2");
    let tagged = top["manifests"]
        .as_array()
        .and_then(|m| m.iter().find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == version.as_str()))
        .with_context(|| format!("index.json names no image {version}"))?;
    ensure!(tagged["mediaType"] == MEDIA_INDEX, "the tagged image is not an image index");
    let index: Value = serde_json::from_slice(&blob(tagged)?)?;
    let manifests = index["manifests"].as_array().context("image index without manifests")?;
    let mut seen = BTreeMap::new();
    for descriptor in manifests {
        ensure!(descriptor["mediaType"] == MEDIA_MANIFEST, "index entry is not an image manifest: {descriptor}");
        let arch = descriptor["platform"]["architecture"].as_str().context("manifest without platform")?;
        ensure!(descriptor["platform"]["os"] == "linux", "{arch}: os is not linux");
        let platform =
            PLATFORMS.iter().find(|p| p.oci_arch == arch).with_context(|| format!("unexpected platform {arch}"))?;
        let manifest: Value = serde_json::from_slice(&blob(descriptor)?)?;
        ensure!(manifest["config"]["mediaType"] == MEDIA_CONFIG, "{arch}: config media type");
        let config: Value = serde_json::from_slice(&blob(&manifest["config"])?)?;
        ensure!(config["architecture"] == arch && config["os"] == "linux", "{arch}: config names another platform");
        let user = config["config"]["User"].as_str().unwrap_or("");
        ensure!(
            !user.is_empty() && !user.starts_with("0") && !user.starts_with("root"),
            "{arch}: image runs as root ({user:?})"
        );
        ensure!(config["config"]["Entrypoint"] == json!([ENTRYPOINT]), "{arch}: entrypoint is not {ENTRYPOINT}");
        let layers = manifest["layers"].as_array().context("manifest without layers")?;
        let diff_ids = config["rootfs"]["diff_ids"].as_array().context("config without diff_ids")?;
        ensure!(layers.len() == diff_ids.len(), "{arch}: {} layers but {} diff_ids", layers.len(), diff_ids.len());
        let mut files = BTreeMap::new();
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            ensure!(layer["mediaType"] == MEDIA_LAYER, "{arch}: layer media type {}", layer["mediaType"]);
            let mut tar_bytes = Vec::new();
            flate2::read::GzDecoder::new(&blob(layer)?[..]).read_to_end(&mut tar_bytes)?;
            ensure!(
                diff_id.as_str() == Some(&format!("sha256:{}", sha256_hex(&tar_bytes))),
                "{arch}: a layer's diff_id does not match its content"
            );
            let mut archive = tar::Archive::new(&tar_bytes[..]);
            for entry in archive.entries()? {
                let mut entry = entry?;
                let path = format!("/{}", entry.path()?.to_string_lossy().trim_end_matches('/'));
                let mode = entry.header().mode()?;
                let mut data = Vec::new();
                entry.read_to_end(&mut data)?;
                files.insert(path, (mode, data));
            }
        }
        for shell in ["/bin/sh", "/bin/bash", "/bin/busybox", "/usr/bin/sh"] {
            ensure!(!files.contains_key(shell), "{arch}: the image has a shell ({shell})");
        }
        let (mode, elf) = files.get(ENTRYPOINT).with_context(|| format!("{arch}: {ENTRYPOINT} is not in the image"))?;
        ensure!(mode & 0o111 != 0, "{arch}: {ENTRYPOINT} is not executable");
        check_static_elf(elf, platform.elf_machine).with_context(|| format!("{arch}: {ENTRYPOINT}"))?;
        seen.insert(arch.to_string(), descriptor["digest"].as_str().unwrap_or("").to_string());
    }
    for p in platforms {
        ensure!(seen.contains_key(p.oci_arch), "the image index lacks linux/{}", p.oci_arch);
    }
    // A second reader: skopeo must accept the archive and each platform in it.
    tools::ensure_apt(&["skopeo"])?;
    let reference = format!("oci-archive:{}:{version}", archive_path(&version).display());
    for p in platforms {
        let raw = tools::output(
            Command::new("skopeo")
                .args(["inspect", "--override-os", "linux", "--override-arch", p.oci_arch])
                .arg(&reference),
        )
        .with_context(|| format!("skopeo cannot read linux/{} from the archive", p.oci_arch))?;
        let inspected: Value = serde_json::from_str(&raw)?;
        ensure!(
            inspected["Architecture"] == p.oci_arch,
            "skopeo found {} for linux/{}",
            inspected["Architecture"],
            p.oci_arch
        );
    }
    for (arch, digest) in &seen {
        println!("image: linux/{arch} {digest}");
    }
    println!(
        "image: checked {} (user {USER}, entrypoint {ENTRYPOINT}, static, no shell)",
        archive_path(&version).display()
    );
    Ok(())
}

/// A 64-bit little-endian ELF executable for `machine` with no program
/// interpreter (PT_INTERP) and no dynamic section: it needs nothing in the image.
fn check_static_elf(elf: &[u8], machine: u16) -> Result<()> {
    ensure!(elf.len() > 64 && &elf[..4] == b"\x7fELF", "not an ELF file");
    ensure!(elf[4] == 2 && elf[5] == 1, "not a 64-bit little-endian ELF");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap_or_default());
    let found = u16_at(18);
    ensure!(found == machine, "ELF machine {found}, expected {machine}");
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56) as usize);
    ensure!(phoff + phentsize * phnum <= elf.len() && phentsize >= 56, "program headers out of range");
    for i in 0..phnum {
        let kind = u32_at(phoff + i * phentsize);
        const PT_INTERP: u32 = 3;
        if kind == PT_INTERP {
            bail!("has a program interpreter: it is dynamically linked, and the image has no libc");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_elf_is_refused() {
        // The test binary itself is dynamically linked (cargo's default).
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = check_static_elf(&me, 62).unwrap_err();
        assert!(format!("{err:#}").contains("interpreter"), "{err:#}");
        assert!(check_static_elf(&me, 183).is_err(), "wrong machine accepted");
        assert!(check_static_elf(b"#!/bin/sh\n", 62).is_err());
    }

    #[test]
    fn chart_app_version_is_the_image_tag() {
        assert_eq!(version().unwrap(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn layer_holds_the_binary_and_no_shell() {
        let dir = std::env::temp_dir().join(format!("xtask-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("agent");
        fs::write(&bin, b"\x7fELF-not-really").unwrap();
        let tar_bytes = layer(&bin).unwrap();
        let mut names = Vec::new();
        for e in tar::Archive::new(&tar_bytes[..]).entries().unwrap() {
            let e = e.unwrap();
            names.push(e.path().unwrap().to_string_lossy().into_owned());
            assert_eq!(e.header().mtime().unwrap(), 0);
        }
        assert!(names.contains(&"usr/local/bin/verdict-agent".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("sh")), "{names:?}");
        assert_eq!(layer(&bin).unwrap(), tar_bytes, "the layer is not reproducible");
        fs::remove_dir_all(dir).unwrap();
    }
}
