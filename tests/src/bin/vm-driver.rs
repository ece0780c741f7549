//! Runs inside a QEMU VM booted on a real distribution kernel (see
//! `xtask/src/vm.rs`): proves the tap on that kernel, end to end.
//!
//! For each tap (fentry, then kprobe): start `verdict-agent run` with that
//! tap, write N notifications into a pinned `cilium_events` and M into
//! another perf event array through the Cilium-compatible emitter, and
//! check through `/metrics` that exactly N were counted (the map-ID filter
//! works) and the M ignored. Then recreate `cilium_events` (new map ID, as
//! a Cilium restart does) and check the agent follows it.
//!
//! Prints one `VMTEST ...` line per check and `VMTEST RESULT pass|fail`.

use std::{net::SocketAddr, path::Path, process::ExitCode, time::Duration};

use anyhow::{Context, bail, ensure};
use verdict_agent_tests::agent_process::AgentProcess;
use verdict_testkit::{
    emitter::{Emitter, Target},
    scenario::{Layout, PolicyVerdict},
};

const EVENTS: &str = "/sys/fs/bpf/tc/globals/cilium_events";
const N: u32 = 1000;
const M: u32 = 500;
const K: u32 = 250;

fn notification(i: u32) -> Vec<u8> {
    PolicyVerdict {
        layout: if i.is_multiple_of(2) { Layout::V1_19 } else { Layout::V1_18 },
        endpoint: 100 + (i % 7) as u16,
        remote_identity: 2,
        verdict: 0,
        dst_port: 1000 + (i % 13) as u16,
        proto: 6,
        dir: 1,
        ipv6: false,
        match_type: 0,
        audited: true,
        packet_len: 60,
    }
    .encode()
}

/// Emits `count` notifications, a handful of distinct ones repeated.
fn emit(emitter: &Emitter, target: Target, count: u32) -> anyhow::Result<()> {
    let distinct = 10;
    for i in 0..distinct {
        let share = count / distinct + u32::from(i < count % distinct);
        if share > 0 {
            emitter.emit(target, &notification(i), share)?;
        }
    }
    Ok(())
}

fn check_tap(tap: &str, port: u16) -> anyhow::Result<()> {
    let pins = format!("/sys/fs/bpf/verdict-vmtest-{tap}");
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_file(EVENTS);

    let emitter = Emitter::load(Path::new(EVENTS)).context("loading the emitter")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = format!("/tmp/agent-{tap}.log");
    let agent = AgentProcess::start(
        addr,
        &["--tap", tap, "--pin-dir", &pins, "--cilium-events-map", EVENTS, "--poll-interval", "500ms"],
        Path::new(&log),
    )?;
    let s = agent
        .scrape_until(Duration::from_secs(20), |s| s.sum("verdict_agent_cilium_events_map_present", &[]) == 1.0)?;
    ensure!(s.has("verdict_agent_tap_info", &[&format!("tap=\"{tap}\"")]), "tap_info does not say {tap}");
    let first_id = map_id(&s)?;

    emit(&emitter, Target::CiliumEvents, N)?;
    emit(&emitter, Target::OtherEvents, M)?;
    let emitted = emitter.counts()?;
    ensure!(emitted.cilium_events == N as u64 && emitted.other_events == M as u64, "emitter counted {emitted:?}");
    let s = agent.scrape_until(Duration::from_secs(20), |s| s.counted() >= N as f64)?;
    ensure!(s.counted() == N as f64, "{tap}: counted {} of {N} (log:\n{})", s.counted(), agent.log_text());
    ensure!(
        s.sum("verdict_agent_tap_other_map_writes_total", &[]) >= M as f64,
        "{tap}: other-map writes not seen: {}",
        s.sum("verdict_agent_tap_other_map_writes_total", &[])
    );
    let audited = s.sum("verdict_agent_endpoint_verdicts_total", &["verdict=\"audited\""]);
    ensure!(audited == N as f64, "{tap}: endpoint totals say {audited} audited, expected {N}");
    println!("VMTEST {tap} counted={N}/{N} other_map_ignored={M} endpoint_totals=ok");

    // Cilium restarts: its map is recreated with a new ID at the same path.
    drop(emitter);
    std::fs::remove_file(EVENTS).context("unpinning cilium_events")?;
    let emitter = Emitter::load(Path::new(EVENTS)).context("recreating cilium_events")?;
    let s = agent.scrape_until(Duration::from_secs(20), |s| map_id(s).is_ok_and(|id| id != first_id))?;
    let second_id = map_id(&s)?;
    ensure!(second_id != first_id, "{tap}: agent still follows map {first_id} after recreation");
    emit(&emitter, Target::CiliumEvents, K)?;
    let s = agent.scrape_until(Duration::from_secs(20), |s| s.counted() >= (N + K) as f64)?;
    ensure!(s.counted() == (N + K) as f64, "{tap}: after recreation counted {} of {}", s.counted(), N + K);
    println!("VMTEST {tap} recreate map_id {first_id}->{second_id} counted={}/{}", N + K, N + K);

    ensure!(agent.stop()?, "{tap}: agent did not exit cleanly on SIGTERM");
    ensure!(Path::new(&pins).join("v1/FLOWS").exists(), "{tap}: pins removed on shutdown");
    let _ = std::fs::remove_dir_all(&pins);
    Ok(())
}

fn map_id(s: &verdict_agent_tests::scrape::Scrape) -> anyhow::Result<String> {
    for k in s.series.keys() {
        if let Some(rest) = k.strip_prefix("verdict_agent_cilium_events_map_info{")
            && let Some(i) = rest.find("map_id=\"")
        {
            let v = &rest[i + 8..];
            return Ok(v[..v.find('"').unwrap_or(v.len())].to_string());
        }
    }
    bail!("no cilium_events_map_info series")
}

fn main() -> ExitCode {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("VMTEST kernel {}", kernel.trim());
    let mut ok = true;
    for (tap, port) in [("fentry", 19971), ("kprobe", 19972)] {
        if let Err(e) = check_tap(tap, port) {
            println!("VMTEST {tap} FAIL: {e:#}");
            ok = false;
        }
    }
    println!("VMTEST RESULT {}", if ok { "pass" } else { "fail" });
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
