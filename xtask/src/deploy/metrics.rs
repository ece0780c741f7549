//! Every metric and label the alerts and the dashboard use, against
//! docs/metrics.md (and, in e2e.rs, a live scrape).

use super::*;

/// Metric name -> labels, as docs/metrics.md lists them.
pub(super) fn documented_metrics() -> Result<BTreeMap<String, BTreeSet<String>>> {
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
pub(super) fn expressions() -> Result<Vec<(String, String, Vec<String>)>> {
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
pub(super) fn template_labels(s: &str, prefix: &str) -> Vec<String> {
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

pub(super) fn check_metric_usage() -> Result<BTreeMap<String, BTreeSet<String>>> {
    let docs = documented_metrics()?;
    let mut known = docs.clone();
    for m in SYNTHETIC_METRICS {
        known.insert(m.to_string(), BTreeSet::new());
    }
    for labels in known.values_mut() {
        labels.extend(TARGET_LABELS.iter().map(|s| s.to_string()));
    }
    for (m, labels) in EXTERNAL_METRICS {
        known.insert(m.to_string(), labels.iter().map(|l| l.to_string()).collect());
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
        .filter(|(m, _)| !EXTERNAL_METRICS.iter().any(|(e, _)| e == m))
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
