//! Soak, short form (the bench runs the long one): steady emission through
//! the replay entry into a small flow table (so the LRU evicts), a scrape
//! every second, and the agent killed with SIGKILL and restarted half-way.
//! At the end every emitted verdict is counted, and no exported counter
//! went down between any two scrapes. Needs root and bpffs.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use verdict_agent::{
    bpf::loader::{LoaderConfig, Pipeline, TapChoice, replay_with},
    scenario::{Layout, PolicyVerdict},
};
use verdict_agent_tests::{agent_process::AgentProcess, scrape::Scrape};

const SECONDS: u64 = 20;
const FLOW_TABLE: u32 = 256;
/// Counters of the agent process itself, which restart with it.
const PROCESS_SCOPED: &[&str] = &["verdict_agent_map_reads_total"];

/// Opt-in per-flow series: which flows get their own series is decided per
/// agent process, so this family is compared within a process only.
const FLOW_FAMILY: &str = "verdict_agent_flow_verdicts_total";

/// Highest value each `_total` series ever had: no series may come back
/// lower, even after being absent for a scrape.
#[derive(Default)]
struct HighWater(std::collections::BTreeMap<String, f64>);

impl HighWater {
    /// Checks `scrape` against every earlier one. Only per-flow series may
    /// disappear within one process; across a restart, series the new
    /// process has not computed yet (readiness is evaluated after the first
    /// map read) may be absent for a scrape, which Prometheus treats as
    /// staleness, not a reset.
    fn check(&mut self, scrape: &Scrape, previous: &Scrape, when: &str, across_restart: bool) {
        if across_restart {
            self.0.retain(|k, _| !k.starts_with(FLOW_FAMILY));
        }
        for (series, v) in &previous.series {
            let name = series.split('{').next().unwrap_or("");
            if name.ends_with("_total") && !PROCESS_SCOPED.contains(&name) && !scrape.series.contains_key(series) {
                assert!(name == FLOW_FAMILY || across_restart, "{when}: {series} (was {v}) disappeared");
            }
        }
        for (series, now) in &scrape.series {
            let name = series.split('{').next().unwrap_or("");
            if !name.ends_with("_total") || PROCESS_SCOPED.contains(&name) {
                continue;
            }
            let high = self.0.entry(series.clone()).or_insert(*now);
            assert!(*now >= *high, "{when}: {series} went down from {high} to {now}");
            *high = *now;
        }
    }
}

#[test]
fn sigkill_mid_soak_loses_no_count_and_no_counter_goes_down() {
    let pins = PathBuf::from(format!("/sys/fs/bpf/verdict-test-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pins);
    let addr = "127.0.0.1:19984".parse().unwrap();
    let log = std::env::temp_dir().join("verdict-test-soak.log");
    let args = [
        "--tap",
        "replay",
        "--pin-dir",
        pins.to_str().unwrap(),
        "--poll-interval",
        "200ms",
        "--flow-table-size",
        "256",
        "--no-kube",
        "--no-cilium-api",
        "--flow-metrics",
    ];
    let mut agent = Some(AgentProcess::start(addr, &args, &log).unwrap());

    let emitted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let emitter = {
        let (emitted, stop, pins) = (emitted.clone(), stop.clone(), pins.clone());
        std::thread::spawn(move || {
            let p = Pipeline::load(&LoaderConfig {
                pin_dir: pins,
                flow_table_size: FLOW_TABLE,
                tap: TapChoice::Replay,
                btf_path: "/sys/kernel/btf/vmlinux".into(),
            })
            .unwrap();
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                // 1000 distinct flows through a 256-entry table: steady eviction.
                let n = PolicyVerdict {
                    layout: Layout::V1_19,
                    endpoint: 70 + (i % 3) as u16,
                    remote_identity: 2,
                    verdict: if i % 5 == 0 { -133 } else { 0 },
                    dst_port: (i % 1000) as u16 + 1,
                    proto: 6,
                    dir: 1,
                    ipv6: false,
                    match_type: 0,
                    audited: i % 5 != 0,
                    packet_len: 60,
                }
                .encode();
                replay_with(p.ebpf(), &n, 50).unwrap();
                emitted.fetch_add(50, Ordering::SeqCst);
                i = i.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let started = Instant::now();
    let mut last = agent.as_ref().unwrap().scrape().unwrap();
    let mut high = HighWater::default();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(SECONDS) {
        std::thread::sleep(Duration::from_secs(1));
        let restart = !killed && started.elapsed() >= Duration::from_secs(SECONDS / 2);
        if restart {
            agent.take().unwrap().kill().unwrap();
            agent = Some(AgentProcess::start(addr, &args, &log).unwrap());
            killed = true;
        }
        let now = agent.as_ref().unwrap().scrape().unwrap();
        high.check(&now, &last, if restart { "across the SIGKILL restart" } else { "between scrapes" }, restart);
        last = now;
    }
    stop.store(true, Ordering::SeqCst);
    emitter.join().unwrap();
    let total = emitted.load(Ordering::SeqCst) as f64;
    let agent = agent.unwrap();
    let end = agent
        .scrape_until(Duration::from_secs(10), |s| {
            s.sum("verdict_agent_events_total", &["outcome=\"counted\""]) >= total
        })
        .unwrap();
    high.check(&end, &last, "at the end", false);
    assert!(end.has(FLOW_FAMILY, &["remote=\"overflow\""]), "the flow cap must have been reached");
    assert_eq!(end.sum("verdict_agent_events_total", &["outcome=\"counted\""]), total, "emitted vs counted");
    assert_eq!(end.sum("verdict_agent_endpoint_verdicts_total", &[]), total, "endpoint totals are exact");
    assert!(end.sum("verdict_agent_flow_table_evictions_total", &[]) > 0.0, "the soak must evict");
    drop(agent);
    let _ = std::fs::remove_dir_all(&pins);
}
