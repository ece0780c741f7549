//! End-to-end checks against a running agent (issue: deploy):
//! 1. every metric and label the alerts and the dashboard use is in a live
//!    scrape of the agent on the demo scenario;
//! 2. a real Prometheus (Debian's package) scrapes the agent, evaluates
//!    deploy/prometheus/verdict-agent.rules.yml, and the host lockout risk
//!    alert goes pending.
//!
//! The agent runs with `--tap none` and the testkit's replay entry feeds
//! its pinned counters (the host kernel allows no tap);
//! the tap itself is proven in the VM step.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::tools::{self, target_dir};

const AGENT: &str = "127.0.0.1:19990";
const PROMETHEUS: &str = "127.0.0.1:19091";
const PINS: &str = "/sys/fs/bpf/verdict-e2e";

/// Kills the child on drop, so a failed check leaves nothing running.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").context("bad HTTP answer")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {}", head.lines().next().unwrap_or(""));
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return dechunk(body);
    }
    Ok(body.to_string())
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("bad chunk header")?;
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("short chunk")?);
        body = rest.get(n + 2..).context("short chunk")?;
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("timed out after {timeout:?} waiting for {what}{}", last.map(|e| format!(": {e:#}")).unwrap_or_default())
}

pub fn run() -> Result<()> {
    tools::ensure_apt(&["prometheus"])?;
    let agent_bin = target_dir().join("debug").join("verdict-agent");
    // Test tooling (testkit): plays the scenario into the agent's pinned counters.
    let scenario_bin = target_dir().join("debug").join("verdict-scenario");
    let dir = target_dir().join("e2e");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_dir_all(PINS);

    let endpoints = dir.join("endpoints.json");
    let out = Command::new(&scenario_bin)
        .arg("--print-endpoints")
        .output()
        .with_context(|| format!("running {}", scenario_bin.display()))?;
    ensure!(out.status.success(), "verdict-scenario --print-endpoints failed");
    std::fs::write(&endpoints, &out.stdout)?;

    let log = std::fs::File::create(dir.join("agent.log"))?;
    let agent = Guard(
        Command::new(&agent_bin)
            .args(["run", "--tap", "none", "--listen", AGENT, "--pin-dir", PINS, "--poll-interval", "1s"])
            .args(["--cilium-events-map", "/sys/fs/bpf/verdict-e2e-no-cilium", "--no-events", "--flow-metrics"])
            .arg("--endpoints-file")
            .arg(&endpoints)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting verdict-agent")?,
    );
    wait_for("the agent's /readyz", Duration::from_secs(30), || Ok(get(AGENT, "/readyz").is_ok()))?;
    tools::run(Command::new(&scenario_bin).args(["--via", "replay", "--pin-dir", PINS]))?;
    wait_for("the lockout risk in /metrics", Duration::from_secs(30), || {
        Ok(get(AGENT, "/metrics")?
            .lines()
            .any(|l| l.starts_with("verdict_agent_host_lockout_risk{") && l.ends_with(" 1")))
    })?;

    check_metrics_against_scrape(&get(AGENT, "/metrics")?)?;
    prometheus_sees_the_lockout(&dir)?;
    drop(agent);
    let _ = std::fs::remove_dir_all(PINS);
    Ok(())
}

/// Every metric the rules and the dashboard use exists in the scrape, with
/// every label they use on at least one of its series.
fn check_metrics_against_scrape(scrape: &str) -> Result<()> {
    let used = crate::deploy::metric_names_in_rules_and_dashboard()?;
    let mut missing = Vec::new();
    for (metric, labels) in &used {
        let series: Vec<&str> = scrape
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(metric.as_str()))
            .collect();
        let declared = scrape.lines().any(|l| {
            l.starts_with("# TYPE ") && {
                let name = l.split_whitespace().nth(2).unwrap_or("");
                metric == name || metric.strip_suffix("_total") == Some(name)
            }
        });
        if series.is_empty() && !declared {
            missing.push(format!("{metric}: not exported"));
            continue;
        }
        for label in labels {
            let needle = format!("{label}=\"");
            if !series.is_empty() && !series.iter().any(|s| s.contains(&needle)) {
                missing.push(format!("{metric}: no series has label {label}"));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "the alerts or the dashboard use what the agent does not export:\n  {}",
        missing.join("\n  ")
    );
    println!("  {} metrics used by alerts and dashboard, all in the live scrape", used.len());
    Ok(())
}

fn prometheus_sees_the_lockout(dir: &std::path::Path) -> Result<()> {
    let config = crate::deploy::prometheus_e2e_config(AGENT, dir)?;
    let data: PathBuf = dir.join("prometheus-data");
    let log = std::fs::File::create(dir.join("prometheus.log"))?;
    let _prometheus = Guard(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus (Debian package `prometheus`)")?,
    );
    wait_for("Prometheus to scrape the agent (up == 1)", Duration::from_secs(60), || {
        Ok(get(PROMETHEUS, "/api/v1/query?query=up%7Bjob%3D%22verdict-agent%22%7D")?.contains("\"value\":[")
            && get(PROMETHEUS, "/api/v1/query?query=up%7Bjob%3D%22verdict-agent%22%7D")?.contains("\"1\"]"))
    })?;
    wait_for("VerdictAgentHostLockoutRisk to go pending or firing", Duration::from_secs(60), || {
        let alerts = get(PROMETHEUS, "/api/v1/alerts")?;
        let v: serde_json::Value = serde_json::from_str(&alerts)?;
        Ok(v["data"]["alerts"].as_array().is_some_and(|a| {
            a.iter().any(|al| {
                al["labels"]["alertname"] == "VerdictAgentHostLockoutRisk"
                    && (al["state"] == "pending" || al["state"] == "firing")
                    && al["labels"]["port"] == "6443"
            })
        }))
    })?;
    println!("  a real Prometheus scraped the agent; VerdictAgentHostLockoutRisk is pending for 6443/tcp");
    Ok(())
}
