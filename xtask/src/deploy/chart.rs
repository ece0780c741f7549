//! The rendered chart: fresh copies, every object validated against the
//! Kubernetes schemas, the least-privilege invariants, the agent's flags.

use super::*;

pub(super) fn check_fresh(tools: &Tools) -> Result<()> {
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
pub(super) const CRD_KINDS: &[&str] = &["ServiceMonitor", "PrometheusRule"];

pub(super) fn check_templates(tools: &Tools, work: &Path) -> Result<()> {
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
pub(super) fn check_crd_object(tools: &Tools, d: &Doc, docs: &[Doc], work: &Path) -> Result<()> {
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
            // Every runbook link absolute (the chart's runbookBaseUrl).
            let m: Yaml = m.into();
            for a in alerts(&m) {
                let url = a.annotations.get("runbook_url").map(String::as_str).unwrap_or("");
                ensure!(
                    url.starts_with("https://") || url.starts_with("http://"),
                    "{}: runbook_url {url:?} is not absolute",
                    a.name
                );
            }
            // Same alerts as the canonical file.
            let canonical: Yaml = serde_yaml::from_str(&read(RULES)?)?;
            ensure!(alert_names(&canonical) == alert_names(&m), "the PrometheusRule's alerts differ from {RULES}");
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

pub(super) fn is_prom_duration(s: &str) -> bool {
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
pub(super) fn check_invariants(docs: &[Doc], label: &str) -> Result<()> {
    let mut problems = Vec::new();
    // Enforcement brings the AuditModeTrial CRD and its RBAC, and only it.
    let enforcing_chart = docs.iter().any(|d| {
        d.kind() == "DaemonSet"
            && d.value["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|c| c["args"].as_sequence().into_iter().flatten())
                .any(|a| a.as_str() == Some("--enable-enforcement"))
    });
    let crds: Vec<String> = docs
        .iter()
        .filter(|d| d.kind() == "CustomResourceDefinition")
        .map(|d| d.value["metadata"]["name"].as_str().unwrap_or("?").to_string())
        .collect();
    let expected_crds: Vec<String> =
        if enforcing_chart { vec!["auditmodetrials.verdict-agent.io".into()] } else { Vec::new() };
    if crds != expected_crds {
        problems.push(format!("CRDs rendered {crds:?}, expected {expected_crds:?} (only with enforcement)"));
    }
    for d in docs {
        let id = d.id();
        if d.kind() == "DaemonSet" || d.kind() == "Job" {
            let pod = &d.value["spec"]["template"]["spec"];
            // Writing to the Cilium API (enforcement trials) is off unless the
            // agent gets --enable-enforcement; only then may the Cilium socket
            // directory be read-write and a state directory come from the host.
            let enforcing = pod["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|c| c["args"].as_sequence().into_iter().flatten())
                .any(|a| a.as_str() == Some("--enable-enforcement"));
            let state_volume = pod["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|v| v["name"].as_str() == Some("state"))
                .and_then(|v| v["hostPath"]["path"].as_str());
            let mut allowed_agent_paths = vec!["/sys/fs/bpf", "/sys/kernel/btf", "/var/run/cilium"];
            let mut writable_mounts = vec!["/sys/fs/bpf"];
            if enforcing {
                allowed_agent_paths.extend(state_volume);
                writable_mounts.extend(["/var/run/cilium", "/var/lib/verdict-agent"]);
                if state_volume.is_none() {
                    problems.push(format!("{id}: --enable-enforcement without a state hostPath volume"));
                }
            } else if state_volume.is_some() {
                problems.push(format!("{id}: a state volume without --enable-enforcement"));
            }
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
                // Cilium's own agent settings: default LSM profiles block bpffs writes.
                if agent && label == "default" {
                    let se = &sc["seLinuxOptions"];
                    if se["type"].as_str() != Some("spc_t") || se["level"].as_str() != Some("s0") {
                        problems
                            .push(format!("{id}/{cname}: default seLinuxOptions must be {{level: s0, type: spc_t}}"));
                    }
                    let annotation = d.value["spec"]["template"]["metadata"]["annotations"]
                        [format!("container.apparmor.security.beta.kubernetes.io/{cname}").as_str()]
                    .as_str();
                    let field = sc["appArmorProfile"]["type"].as_str();
                    if field != Some("Unconfined") && annotation != Some("unconfined") {
                        problems.push(format!("{id}/{cname}: default AppArmor profile must be Unconfined"));
                    }
                    if field.is_some() && annotation.is_some() {
                        problems.push(format!("{id}/{cname}: AppArmor set both as field and annotation"));
                    }
                }
                for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
                    let path = m["mountPath"].as_str().unwrap_or("");
                    if !writable_mounts.contains(&path) && m["readOnly"].as_bool() != Some(true) {
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
                    for v in ["list", "watch"] {
                        s.insert(("cilium.io".into(), r.into(), v.into()));
                    }
                }
                for v in ["get", "list", "watch"] {
                    s.insert(("".into(), "nodes".into(), v.into()));
                }
                for v in ["list", "watch"] {
                    s.insert(("".into(), "pods".into(), v.into()));
                }
                for g in ["", "events.k8s.io"] {
                    for v in ["create", "patch"] {
                        s.insert((g.into(), "events".into(), v.into()));
                    }
                }
                if enforcing_chart {
                    for v in ["list", "watch"] {
                        s.insert(("verdict-agent.io".into(), "auditmodetrials".into(), v.into()));
                    }
                    s.insert(("verdict-agent.io".into(), "auditmodetrials/status".into(), "patch".into()));
                }
                s
            } else if d.value["metadata"]["name"].as_str().is_some_and(|n| n.ends_with("-api-server")) {
                if d.value["metadata"]["namespace"].as_str() != Some("default") {
                    problems.push(format!("{id}: the API server's EndpointSlices live in namespace default"));
                }
                ["get", "list", "watch"]
                    .iter()
                    .map(|v| ("discovery.k8s.io".to_string(), "endpointslices".to_string(), v.to_string()))
                    .collect()
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

#[cfg(test)]
mod tests {
    use super::{super::render::split_docs, check_invariants};

    fn daemonset(args: &str, cilium_read_only: bool, state_volume: bool) -> String {
        let state = if state_volume {
            "\n        - name: state\n          hostPath: {path: /var/lib/verdict-agent, type: DirectoryOrCreate}"
        } else {
            ""
        };
        format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: verdict-agent}}\nspec:\n  template:\n    spec:\n      \
             containers:\n        - name: agent\n          args: [{args}]\n          volumeMounts:\n            \
             - {{name: cilium-run, mountPath: /var/run/cilium, readOnly: {cilium_read_only}}}\n      volumes:\n        \
             - name: cilium-run\n          hostPath: {{path: /var/run/cilium}}{state}\n"
        )
    }

    fn problems(yaml: &str) -> String {
        let docs = split_docs(yaml).unwrap();
        check_invariants(&docs, "test").err().map(|e| format!("{e:#}")).unwrap_or_default()
    }

    #[test]
    fn the_cilium_socket_is_writable_and_a_state_dir_mounted_only_with_enforcement() {
        let off = problems(&daemonset("run", false, false));
        assert!(off.contains("mount /var/run/cilium must be readOnly"), "{off}");
        let stray = problems(&daemonset("run", true, true));
        assert!(stray.contains("a state volume without --enable-enforcement"), "{stray}");
        let on = problems(&daemonset("run, --enable-enforcement", false, true));
        assert!(!on.contains("/var/run/cilium must be readOnly") && !on.contains("hostPath /var/lib"), "{on}");
        let no_state = problems(&daemonset("run, --enable-enforcement", false, false));
        assert!(no_state.contains("without a state hostPath volume"), "{no_state}");
    }
}
