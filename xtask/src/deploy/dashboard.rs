//! The Grafana dashboard's structure.

use super::*;

pub(super) fn check_dashboard() -> Result<()> {
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
