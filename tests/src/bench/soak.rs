//! Soak: steady emission through `bench_replay_and_emit` (the replay
//! entry's accounting plus a kernel-side count of every offer) into a
//! small flow table, so slots are reused (and buckets overflow) all along; /metrics scraped every
//! second; the agent killed with SIGKILL half-way and started again on
//! the same pinned maps. At the end, every emitted verdict is counted (in
//! the kernel's STATS, in the agent's /metrics, in the endpoint totals),
//! and no exported `_total` series ever went down between two scrapes.
//!
//! Each property is a check; the last line is `soak: N passed, M failed`.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::scrape::Scrape;
use anyhow::Result;
use verdict_testkit::scenario::{Layout, PolicyVerdict};

use super::{
    Report,
    common::{Bench, PinDir, Priority, REPLAY_AND_EMIT, drive, progress, start_agent},
};

const FLOW_TABLE: u32 = 1024;
/// Distinct flows in the stream: four times the table, so slots are reused.
const FLOWS: u32 = 4096;
const RATE_PER_S: f64 = 20_000.0;
use crate::scrape::PROCESS_SCOPED;
/// Which flows get their own series is decided per agent process.
const FLOW_FAMILY: &str = "verdict_agent_flow_verdicts_total";
const AGENT_ARGS: &[&str] = &["--poll-interval", "200ms", "--flow-metrics", "--flow-metrics-limit", "500"];

fn notification(i: u32) -> Vec<u8> {
    PolicyVerdict {
        layout: if i.is_multiple_of(7) { Layout::V1_18 } else { Layout::V1_19 },
        endpoint: 40 + (i % 5) as u16,
        remote_identity: 2 + (i / 5) % 300,
        verdict: if i.is_multiple_of(4) { -133 } else { 0 },
        dst_port: 1 + (i % 4096) as u16,
        proto: if i.is_multiple_of(3) { 17 } else { 6 },
        dir: 1 + (i % 2) as u8,
        ipv6: i.is_multiple_of(11),
        match_type: (i % 4) as u8,
        audited: i % 4 == 1,
        packet_len: 60 + i % 1400,
    }
    .encode()
}

/// Highest value each `_total` series ever had.
#[derive(Default)]
struct HighWater {
    high: BTreeMap<String, f64>,
    violations: Vec<String>,
}

fn family(series: &str) -> &str {
    series.split('{').next().unwrap_or("")
}

impl HighWater {
    /// Checks `scrape` against every earlier one: no `_total` series may
    /// come back lower, even after being absent for a scrape. Only per-flow
    /// series may disappear within one process (their membership is decided
    /// per process); across a restart, series the new process has not
    /// computed yet (readiness is evaluated after the first map read) may
    /// be absent for a scrape, which Prometheus treats as staleness, not a
    /// reset.
    fn check(&mut self, scrape: &Scrape, previous: &Scrape, when: &str, across_restart: bool) {
        if across_restart {
            self.high.retain(|k, _| {
                let f = family(k);
                f != FLOW_FAMILY && !PROCESS_SCOPED.contains(&f)
            });
        }
        for (series, v) in &previous.series {
            let name = family(series);
            if name.ends_with("_total")
                && !PROCESS_SCOPED.contains(&name)
                && name != FLOW_FAMILY
                && !across_restart
                && !scrape.series.contains_key(series)
            {
                self.violations.push(format!("{when}: {series} (was {v}) disappeared"));
            }
        }
        for (series, now) in &scrape.series {
            if !family(series).ends_with("_total") {
                continue;
            }
            let high = self.high.entry(series.clone()).or_insert(*now);
            if *now < *high {
                self.violations.push(format!("{when}: {series} went down from {high} to {now}"));
            }
            *high = high.max(*now);
        }
    }
}

pub struct Outcome {
    pub failed: usize,
}

pub fn run(report: &mut Report, seconds: u64) -> Result<Outcome> {
    let pins = PinDir::new("bench-soak");
    progress!("soak: {seconds} s at {RATE_PER_S}/s, SIGKILL at {} s", seconds / 2);
    let mut agent = Some(start_agent(&pins, FLOW_TABLE, AGENT_ARGS, "soak")?);
    let bench = Bench::load(&pins.0, FLOW_TABLE, &[REPLAY_AND_EMIT])?;
    let inputs: Vec<Vec<u8>> = (0..FLOWS).map(notification).collect();
    let stop = AtomicBool::new(false);
    let duration = Duration::from_secs(seconds);

    let mut high = HighWater::default();
    let mut scrapes = 0u64;
    let mut failed_scrapes = Vec::new();
    let mut restarted: Option<Result<()>> = None;
    let prog = bench.prog(REPLAY_AND_EMIT)?;
    let driven = std::thread::scope(|s| -> Result<_> {
        let emitter = s.spawn(|| drive(prog, &inputs, Some(RATE_PER_S), duration, Priority::Fair, &stop));
        let started = Instant::now();
        let mut last = agent.as_ref().map(|a| a.scrape()).transpose()?.unwrap_or_default();
        let mut tick = 1;
        while started.elapsed() < duration {
            let next = Duration::from_secs(tick);
            if let Some(wait) = next.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            tick += 1;
            let restart = restarted.is_none() && started.elapsed() >= duration / 2;
            if restart {
                progress!("soak: SIGKILL and restart at {:.1} s", started.elapsed().as_secs_f64());
                let r = agent.take().map(|a| a.kill()).transpose();
                let r = r.and_then(|_| start_agent(&pins, FLOW_TABLE, AGENT_ARGS, "soak"));
                restarted = Some(r.map(|a| {
                    agent = Some(a);
                }));
            }
            let Some(a) = agent.as_ref() else { break };
            match a.scrape() {
                Ok(now) => {
                    scrapes += 1;
                    let when = if restart { "across the SIGKILL restart" } else { "between scrapes" };
                    high.check(&now, &last, &format!("{when} at {:.0} s", started.elapsed().as_secs_f64()), restart);
                    last = now;
                }
                Err(e) => failed_scrapes.push(format!("{:.0} s: {e:#}", started.elapsed().as_secs_f64())),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let driven = emitter.join().map_err(|_| anyhow::anyhow!("emitter panicked"))??;
        // The end state, once the agent has read everything emitted.
        let emitted = bench.emitted()?[0];
        if let Some(a) = agent.as_ref() {
            let end = a.scrape_until(Duration::from_secs(10), |s| s.counted() >= emitted as f64)?;
            high.check(&end, &last, "at the end", false);
            last = end;
        }
        Ok((driven, last))
    })?;
    let (driven, end) = driven;
    let emitted = bench.emitted()?[0];
    let kernel_counted = bench.stat(verdict_common::maps::Stat::Counted)?;
    let agent_counted = end.counted() as u64;
    let endpoint_totals = end.sum("verdict_agent_endpoint_verdicts_total", &[]) as u64;
    let evictions = end.sum("verdict_agent_flow_table_evictions_total", &[]);
    let by_flow = end.sum("verdict_agent_policy_verdicts_total", &[]) as u64;
    let overflow = end.sum("verdict_agent_flow_table_overflow_verdicts_total", &[]) as u64;
    if let Some(a) = agent.take() {
        let _ = a.stop();
    }
    drop(bench);
    drop(pins);

    let restart_ok = matches!(restarted, Some(Ok(())));
    let checks: Vec<(String, bool)> = vec![
        (
            format!(
                "agent killed with SIGKILL and ready again on the pinned maps{}",
                match &restarted {
                    Some(Err(e)) => format!(" ({e:#})"),
                    None => " (never reached)".into(),
                    _ => String::new(),
                }
            ),
            restart_ok,
        ),
        (format!("every scrape answered ({scrapes} ok, {} failed)", failed_scrapes.len()), failed_scrapes.is_empty()),
        (format!("kernel offers == runs issued ({emitted} == {})", driven.runs), emitted == driven.runs),
        (format!("kernel STATS counted == emitted ({kernel_counted} == {emitted})"), kernel_counted == emitted),
        (format!("agent /metrics counted == emitted ({agent_counted} == {emitted})"), agent_counted == emitted),
        (format!("endpoint totals == emitted ({endpoint_totals} == {emitted})"), endpoint_totals == emitted),
        (
            format!("no _total series went down or vanished ({} violations)", high.violations.len()),
            high.violations.is_empty(),
        ),
        (format!("flow slots were reused after their counts were read ({evictions} reuses)"), evictions > 0.0),
        (
            // A SIGKILL between the ledger's write and the acknowledgement
            // counts that read's deltas twice (never loses them): >=.
            format!("flows + overflow >= endpoint totals ({by_flow} + {overflow} >= {endpoint_totals})"),
            by_flow + overflow >= endpoint_totals,
        ),
        (
            "per-flow series capped (remote=\"overflow\" present)".into(),
            end.has("verdict_agent_flow_verdicts_total", &["remote=\"overflow\""]),
        ),
    ];
    let passed = checks.iter().filter(|c| c.1).count();
    let failed = checks.len() - passed;
    report.table(&format!(
        "Soak: {seconds} s at {RATE_PER_S:.0} verdicts/s, {FLOWS} flows through a {FLOW_TABLE}-entry table, scrape every second, SIGKILL + restart at {} s",
        seconds / 2
    ));
    for (what, ok) in &checks {
        report.table(&format!("  {} {what}", if *ok { "ok  " } else { "FAIL" }));
    }
    for v in high.violations.iter().take(20) {
        report.table(&format!("       {v}"));
    }
    for f in failed_scrapes.iter().take(5) {
        report.table(&format!("       scrape failed at {f}"));
    }
    report.set(
        "soak",
        serde_json::json!({
            "seconds": seconds,
            "rate_per_s": RATE_PER_S,
            "emitted": emitted,
            "kernel_counted": kernel_counted,
            "agent_counted": agent_counted,
            "endpoint_totals": endpoint_totals,
            "scrapes": scrapes,
            "failed_scrapes": failed_scrapes.len(),
            "counter_decreases": high.violations.len(),
            "evictions": evictions,
            "attributed_to_flows": by_flow,
            "overflow": overflow,
            "restarted_after_sigkill": restart_ok,
            "checks_passed": passed,
            "checks_failed": failed,
        }),
    );
    report.table(&format!("soak: {passed} passed, {failed} failed"));
    Ok(Outcome { failed })
}
