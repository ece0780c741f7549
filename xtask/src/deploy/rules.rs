//! The alert rules: promtool checks and unit tests, annotations, runbook
//! sections.

use super::*;

pub(super) fn alert_names(rules: &Yaml) -> BTreeSet<String> {
    alerts(rules).into_iter().map(|a| a.name).collect()
}

pub(super) struct Alert {
    pub(super) name: String,
    pub(super) expr: String,
    pub(super) annotations: BTreeMap<String, String>,
}

pub(super) fn alerts(rules: &Yaml) -> Vec<Alert> {
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

pub(super) fn rule_test_files() -> Result<Vec<PathBuf>> {
    let mut tests: Vec<PathBuf> = fs::read_dir(root(RULE_TESTS))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".test.yml"))
        .collect();
    tests.sort();
    ensure!(!tests.is_empty(), "no unit tests in {RULE_TESTS}");
    Ok(tests)
}

pub(super) fn check_rules(tools: &Tools) -> Result<()> {
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
pub(super) fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

pub(super) fn check_runbooks() -> Result<()> {
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
