//! Time to revert: how long after the first denied critical verdict the
//! agent puts audit mode back, over many trials, against the Cilium API's
//! own answer time measured in the same run.
//!
//! One shipped agent (`--tap none`, `--enable-enforcement`) on pinned maps
//! the testkit's replay object feeds, a fake Cilium API on a unix socket
//! (`verdict_testkit::fake_cilium`). Each trial: `POST /api/v1/enforcement/trials`
//! for the host endpoint (forced: the point is a wrong answer), then one
//! denied kube-apiserver -> host:6443 verdict replayed through the real
//! accounting core; the figure is from the replay to the fake API receiving
//! the `PolicyAuditMode=Enabled` PATCH. The baseline is a PATCH round trip
//! from this process to the same fake API.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use verdict_testkit::{
    fake_cilium::FakeCilium,
    scenario::{self, DEMO_HOST_ENDPOINT, Layout, api_server_to_host},
};

use super::{
    Report,
    common::{PinDir, free_addr, percentile, progress},
};
use crate::{agent_process::AgentProcess, scrape::http_post};

/// The goal of the guarded-switch issue: p99 under a second plus the API's answer time.
const GOAL: Duration = Duration::from_secs(1);

pub fn run(report: &mut Report, quick: bool) -> Result<()> {
    let trials = if quick { 20 } else { 40 };
    progress!("revert: {trials} trials, each reverted by one denied critical verdict");
    let dir = std::env::temp_dir().join(format!("verdict-bench-revert-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("cilium.sock");
    let fake = FakeCilium::start(&socket, DEMO_HOST_ENDPOINT)?;
    let endpoints = dir.join("endpoints.json");
    let sc = scenario::demo(Layout::V1_19);
    std::fs::write(&endpoints, scenario::cilium_endpoint_list(&sc.endpoints).to_string())?;
    let pins = PinDir::new("bench-revert");
    let addr = free_addr()?;
    let state = dir.join("state");
    let args = [
        "--tap",
        "none",
        "--pin-dir",
        pins.as_str(),
        "--poll-interval",
        "2s",
        "--endpoints-file",
        endpoints.to_str().context("temp path")?,
        "--cilium-socket",
        socket.to_str().context("temp path")?,
        "--enable-enforcement",
        "--state-dir",
        state.to_str().context("temp path")?,
        "--no-events",
    ];
    let agent = AgentProcess::start(addr, &args, &std::env::temp_dir().join("verdict-bench-revert.log"))?;
    let replayer = verdict_testkit::replay::Replayer::load(&pins.0, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE)
        .context("joining the agent's maps with the replay object")?;
    // In audit mode the API server's connections to the host are audited.
    verdict_testkit::replay::replay_with(replayer.ebpf(), &api_server_to_host(0, true), 20)?;

    let request = serde_json::json!({
        "endpoint_id": DEMO_HOST_ENDPOINT, "endpoint_name": "host", "endpoint_kind": "host",
        "try_seconds": 120, "strict": false,
        "requested_by": {"who": "bench", "reason": "time-to-revert bench"},
        "preflight": {"state": "would_break", "exit_code": 1, "forced": true},
    });
    let mut latencies = Vec::new();
    for trial in 0..trials {
        let before = fake.patches().len();
        let (status, body) = http_post(addr, "/api/v1/enforcement/trials", &request.to_string())?;
        ensure!(status == 201, "trial {trial}: the agent answered {status}: {body}");
        ensure!(fake.patches().len() == before + 1, "trial {trial}: no switch PATCH");
        // Let the switch's own read pass, as an operator's traffic would.
        std::thread::sleep(Duration::from_millis(300));
        let denied_at = Instant::now();
        verdict_testkit::replay::replay_with(replayer.ebpf(), &api_server_to_host(-133, false), 1)?;
        let deadline = denied_at + Duration::from_secs(10);
        let reverted_at = loop {
            if let Some((at, mode)) = fake.patches().get(before + 1).cloned() {
                ensure!(mode == "Enabled", "trial {trial}: the second PATCH set {mode}");
                break at;
            }
            if Instant::now() > deadline {
                bail!("trial {trial}: no revert within 10 s of the denied verdict");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        latencies.push(reverted_at.saturating_duration_since(denied_at).as_secs_f64() * 1000.0);
    }
    let mut api = Vec::new();
    for _ in 0..trials {
        api.push(fake.patch_round_trip("Enabled")?.as_secs_f64() * 1000.0);
    }
    drop(agent);
    drop(replayer);
    drop(pins);
    let _ = std::fs::remove_dir_all(&dir);

    let p50 = percentile(&mut latencies, 50.0);
    let p99 = percentile(&mut latencies, 99.0);
    let max = percentile(&mut latencies, 100.0);
    let api_p50 = percentile(&mut api, 50.0);
    let api_p99 = percentile(&mut api, 99.0);
    let goal_ms = GOAL.as_secs_f64() * 1000.0 + api_p99;
    report.table(&format!("Time to revert ({trials} trials: first denied critical verdict -> revert PATCH received)"));
    report.table(&format!("  {:<44} {:>9} {:>9} {:>9}", "case", "p50 ms", "p99 ms", "max ms"));
    report.table(&format!("  {:<44} {p50:>9.1} {p99:>9.1} {max:>9.1}", "time to revert"));
    report.table(&format!("  {:<44} {api_p50:>9.2} {api_p99:>9.2} {:>9}", "baseline: the API's PATCH round trip", "-"));
    report.table(&format!(
        "  p99 {p99:.0} ms against the goal of 1 s + the API's p99 ({goal_ms:.0} ms): {}; {:.0}x the API's own p99",
        if p99 <= goal_ms { "met" } else { "MISSED" },
        p99 / api_p99.max(0.001)
    ));
    report.set(
        "revert",
        serde_json::json!({
            "trials": trials,
            "time_to_revert_ms_p50": p50,
            "time_to_revert_ms_p99": p99,
            "time_to_revert_ms_max": max,
            "cilium_api_patch_ms_p50": api_p50,
            "cilium_api_patch_ms_p99": api_p99,
            "goal_ms": goal_ms,
            "goal_met": p99 <= goal_ms,
        }),
    );
    Ok(())
}
