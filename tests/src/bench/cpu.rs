//! Userspace cost against the event rate: `verdict-agent run --tap none`
//! as a child process (the release binary), verdicts driven through the
//! replay entry into its pinned maps at stepped rates, /metrics scraped
//! every 5 s, and the agent's CPU time (utime + stime of /proc/<pid>/stat)
//! divided by wall time per step. The agent reads the maps on a timer,
//! never per event, so the figure should not grow with the rate.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    Report,
    common::{Bench, PinDir, Priority, REPLAY, cpu_seconds, drive, notification, progress, short_rate, start_agent},
};

const FLOW_TABLE: u32 = 16_384;
/// Distinct flows the stream cycles through: the same at every rate, so
/// only the rate changes between steps.
const FLOWS: u32 = 1000;

pub fn run(report: &mut Report, quick: bool) -> Result<()> {
    let rates: &[f64] = &[10e3, 100e3, 1e6];
    // Long enough that the agent's CPU time, in 10 ms clock ticks, reads to a few percent.
    let step = if quick { Duration::from_secs(3) } else { Duration::from_secs(15) };
    let scrape_every = if quick { Duration::from_secs(1) } else { Duration::from_secs(5) };
    let poll = "1s";

    let pins = PinDir::new("bench-cpu");
    let agent = start_agent(&pins, FLOW_TABLE, &["--poll-interval", poll], "cpu")?;
    let pid = agent.child.id();
    let bench = Bench::load(&pins.0, FLOW_TABLE, &[])?;
    let replay = bench.prog(REPLAY)?;
    let inputs: Vec<Vec<u8>> = (0..FLOWS).map(notification).collect();
    // Create every flow first, so each step reads the same table.
    for i in &inputs {
        super::common::test_run(replay, i, 1)?;
    }

    let mut rows = Vec::new();
    // Rate 0 first: what the agent costs with nothing happening.
    for &rate in std::iter::once(&0.0).chain(rates) {
        progress!("agent cpu: {}/s for {step:?}", short_rate(rate));
        let stop = AtomicBool::new(false);
        let cpu0 = cpu_seconds(pid)?;
        let started = Instant::now();
        let (driven, scrapes) = std::thread::scope(|s| -> Result<_> {
            let scraper = s.spawn(|| {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if agent.scrape().is_ok() {
                        n += 1;
                    }
                    let next = Instant::now() + scrape_every;
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                n
            });
            let driven = if rate > 0.0 {
                drive(replay, &inputs, Some(rate), step, Priority::Fair, &stop)
            } else {
                std::thread::sleep(step);
                Ok(Default::default())
            };
            stop.store(true, Ordering::Relaxed);
            let scrapes = scraper.join().unwrap_or(0);
            Ok((driven?, scrapes))
        })?;
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid)? - cpu0;
        rows.push((rate, driven.runs as f64 / wall, cpu / wall, scrapes));
    }
    let counted = agent.scrape()?.counted();
    let _ = agent.stop();
    drop(bench);
    drop(pins);

    report.table(&format!(
        "Agent CPU against the event rate (verdict-agent run --tap none, map read every {poll}, /metrics every {} s, {} s per rate)",
        scrape_every.as_secs(),
        step.as_secs()
    ));
    report.table(&format!("  {:>8} {:>12} {:>10} {:>12}", "target/s", "achieved/s", "cpu s/s", "x at 10k/s"));
    let at_10k = rows.iter().find(|r| r.0 == 10e3).map(|r| r.2).unwrap_or(f64::NAN);
    let mut json = serde_json::Map::new();
    for &(rate, achieved, cpu_per_s, scrapes) in &rows {
        report.table(&format!(
            "  {:>8} {:>12.0} {:>10.4} {:>12}",
            if rate == 0.0 { "idle".into() } else { short_rate(rate) },
            achieved,
            cpu_per_s,
            if rate == 0.0 { "-".into() } else { format!("{:.2}", cpu_per_s / at_10k) }
        ));
        json.insert(
            if rate == 0.0 { "idle".into() } else { short_rate(rate) },
            serde_json::json!({
                "target_rate_per_s": rate,
                "achieved_rate_per_s": achieved,
                "cpu_s_per_s": cpu_per_s,
                "ratio_to_10k": if rate == 0.0 { None } else { Some(cpu_per_s / at_10k) },
                "scrapes": scrapes,
            }),
        );
    }
    let at_1m = rows.iter().find(|r| r.0 == 1e6).map(|r| r.2).unwrap_or(f64::NAN);
    report.table(&format!(
        "  1M/s vs 10k/s: {:.2}x the CPU for 100x the verdicts ({} verdicts counted in all)",
        at_1m / at_10k,
        counted
    ));
    json.insert("ratio_1m_to_10k".into(), serde_json::json!(at_1m / at_10k));
    json.insert("poll_interval_s".into(), serde_json::json!(1.0));
    json.insert("scrape_interval_s".into(), serde_json::json!(scrape_every.as_secs_f64()));
    json.insert("step_duration_s".into(), serde_json::json!(step.as_secs_f64()));
    json.insert("flows".into(), serde_json::json!(FLOWS));
    report.set("agent_cpu", serde_json::Value::Object(json));
    Ok(())
}
