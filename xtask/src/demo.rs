//! `cargo xtask demo`: the agent on the built-in rollout scenario.
//!
//! Builds the shipped agent and the testkit's `verdict-scenario`, starts
//! the agent with the real tap where the kernel allows one and plays the
//! scenario through the Cilium-compatible emitter; where the kernel allows
//! no tap (this project's build host), starts it with `--tap none` (no
//! hook; visible as `tap="none"` and `verdict_agent_tap_attached 0`) and
//! plays the scenario through the testkit's replay entry into the agent's
//! pinned counters: the same in-kernel accounting code, fed by
//! BPF_PROG_TEST_RUN instead of the hook. It says which. The scenario (a host
//! endpoint in audit mode whose host policy forgot the API server and the
//! kubelet, receiving an internet port scan; a pod with denied egress to a
//! private range), prints a per-endpoint table, and keeps serving
//! /metrics on 127.0.0.1:9975 until Ctrl-C (or `--seconds`).

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::tools::{self, target_dir};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Stop after serving this many seconds (default: until Ctrl-C).
    #[arg(long)]
    pub seconds: Option<u64>,
    #[arg(long, default_value = "127.0.0.1:9975")]
    pub listen: String,
}

const PIN_DIR: &str = "/sys/fs/bpf/verdict-agent-demo";
const EVENTS: &str = "/sys/fs/bpf/verdict-agent-demo-events/cilium_events";

pub fn run(args: DemoArgs) -> Result<()> {
    tools::ensure_rust_src()?;
    tools::ensure_bpf_linker()?;
    crate::test::ensure_bpffs()?;
    tools::run(tools::cargo().args([
        "build",
        "--release",
        "-p",
        "verdict-agent",
        "-p",
        "verdict-testkit",
        "--bin",
        "verdict-agent",
        "--bin",
        "verdict-scenario",
    ]))?;
    let bin = target_dir().join("release").join("verdict-agent");
    // Test tooling, not part of the shipped agent: it writes notifications.
    let scenario = target_dir().join("release").join("verdict-scenario");
    let _ = std::fs::remove_dir_all(PIN_DIR);
    let _ = std::fs::remove_file(EVENTS);

    // The scenario's endpoints, as `cilium endpoint list -o json` prints them:
    // no Cilium and no Kubernetes API are needed to name them.
    let endpoints = target_dir().join("demo-endpoints.json");
    let out = Command::new(&scenario).arg("--print-endpoints").output().context("verdict-scenario")?;
    std::fs::write(&endpoints, &out.stdout)?;

    let start = |tap: &str| -> Result<Child> {
        Command::new(&bin)
            .args(["run", "--tap", tap, "--listen", &args.listen, "--pin-dir", PIN_DIR, "--cilium-events-map", EVENTS])
            .args(["--poll-interval", "1s", "--flow-metrics", "--no-events", "--endpoints-file"])
            .arg(&endpoints)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting verdict-agent")
    };
    let (mut agent, via) = match start("auto").and_then(|c| wait_ready(c, &args.listen)) {
        Ok(child) => {
            println!("\n== mode: real tap attached; the scenario goes through the Cilium-compatible emitter");
            (child, "emitter")
        }
        Err(e) => {
            println!("\nThis kernel allows no tap (fentry and kprobe refused: {e:#}).");
            println!("== mode: no hook (`verdict-agent run --tap none`, tap_attached 0); the testkit's replay entry");
            println!(
                "   feeds the agent's pinned counters: the same in-kernel accounting code, run by BPF_PROG_TEST_RUN."
            );
            println!("   `cargo xtask test --only vm` runs the real tap on Debian kernels in QEMU.\n");
            let _ = std::fs::remove_dir_all(PIN_DIR);
            (wait_ready(start("none")?, &args.listen)?, "replay")
        }
    };
    println!("== playing the demo scenario via the {via} (verdict-scenario, test tooling)");
    tools::run(Command::new(&scenario).args(["--via", via, "--pin-dir", PIN_DIR, "--cilium-events-map", EVENTS]))?;
    std::thread::sleep(Duration::from_millis(2500));

    let metrics = get(&args.listen, "/metrics")?;
    for line in metrics.lines().filter(|l| l.starts_with("verdict_agent_tap_attached")) {
        println!("{line}");
    }
    print_table(&metrics);
    println!("\n== host lockout and readiness (from /metrics)");
    for line in metrics.lines().filter(|l| {
        (l.starts_with("verdict_agent_host_lockout")
            || l.starts_with("verdict_agent_audit_readiness{")
            || l.starts_with("verdict_agent_scan_noise"))
            && !l.ends_with(" 0")
    }) {
        println!("{line}");
    }
    let agent_url = format!("http://{}", args.listen);
    println!("\n== verdict-agent preflight --endpoint host   (may audit mode be switched off on the host?)");
    let status = Command::new(&bin).args(["preflight", "--endpoint", "host", "--agent", &agent_url]).status()?;
    println!("(exit code {}: 0 safe, 1 would break, 2 error, 3 not enough evidence)", status.code().unwrap_or(-1));
    println!("\n== verdict-agent suggest --endpoint host   (the host policy rules the scenario forgot)");
    Command::new(&bin)
        .args(["suggest", "--endpoint", "host", "--node", "demo-node", "--agent", &agent_url])
        .status()?;
    println!("\nServing http://{0}/metrics, http://{0}/api/v1/flows and http://{0}/api/v1/readiness", args.listen);
    match args.seconds {
        Some(s) => std::thread::sleep(Duration::from_secs(s)),
        None => {
            println!("Ctrl-C to stop.");
            let _ = agent.wait();
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(PIN_DIR);
    let _ =
        std::fs::remove_dir_all(std::path::Path::new(EVENTS).parent().unwrap_or(std::path::Path::new("/nonexistent")));
    Ok(())
}

fn wait_ready(mut child: Child, listen: &str) -> Result<Child> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Some(status) = child.try_wait()? {
            bail!("verdict-agent exited ({status})");
        }
        if get(listen, "/readyz").is_ok() {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    bail!("verdict-agent did not become ready")
}

fn get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").context("bad HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

fn label<'a>(series: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    series.find(&key).map(|i| &series[i + key.len()..]).and_then(|r| r.split('"').next()).unwrap_or("")
}

/// One row per endpoint and direction: allowed / denied / audited / redirected.
fn print_table(metrics: &str) {
    use std::collections::BTreeMap;
    let mut rows: BTreeMap<(String, String, String), [u64; 4]> = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with("verdict_agent_endpoint_verdicts_total{")) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let name = match (label(series, "kind"), label(series, "namespace"), label(series, "pod")) {
            ("host", _, _) => "(host)".to_string(),
            (_, ns, pod) if !pod.is_empty() => format!("{ns}/{pod}"),
            _ => String::new(),
        };
        let key = (label(series, "endpoint").to_string(), name, label(series, "direction").to_string());
        let slot = match label(series, "verdict") {
            "allowed" => 0,
            "denied" => 1,
            "audited" => 2,
            _ => 3,
        };
        rows.entry(key).or_default()[slot] += value.parse::<f64>().unwrap_or(0.0) as u64;
    }
    println!(
        "\n{:<9} {:<34} {:<8} {:>8} {:>8} {:>8} {:>10}",
        "ENDPOINT", "NAME", "DIR", "ALLOWED", "DENIED", "AUDITED", "REDIRECTED"
    );
    for ((ep, name, dir), c) in rows.iter().filter(|(_, c)| c.iter().any(|v| *v > 0)) {
        println!("{ep:<9} {name:<34} {dir:<8} {:>8} {:>8} {:>8} {:>10}", c[0], c[1], c[2], c[3]);
    }
    println!("(allowed/audited/redirected: per new connection; denied: per packet)");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("verdict_agent_events_total") || l.starts_with("verdict_agent_tap_info"))
    {
        println!("{line}");
    }
}
