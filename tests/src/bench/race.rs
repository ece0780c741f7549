//! The loss race: one notification stream, two consumers, side by side.
//!
//! Every BPF_PROG_TEST_RUN of `bench_replay_and_emit` is one policy verdict
//! that (a) goes through the agent's in-kernel accounting core into the
//! maps a running `verdict-agent run --tap none` reads (same pin
//! directory), and (b) is written with `bpf_perf_event_output` into a perf
//! event array read by the baseline: what `cilium monitor` and Hubble do
//! with `cilium_events`, i.e. one ring of 64 pages per CPU (Cilium's
//! default), a wakeup per record (aya's reader, Cilium's monitor), one
//! reader thread polling every CPU's ring and decoding every record into a
//! per-flow count. The kernel counts the offers itself (`BENCH_EMITTED`).
//!
//! Target rates are driven from one thread per core with batches of test
//! runs; the reader competes for the same two cores, as a node agent does
//! with the datapath. Per step: emitted (kernel), counted by the agent
//! (its /metrics, `verdict_agent_events_total{outcome="counted"}`),
//! received and lost by the baseline.

use std::{
    collections::HashMap,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::agent_process::AgentProcess;
use anyhow::{Context, Result};
use aya::maps::{
    MapData, PerfEventArray,
    perf::{PerfEvent, PerfEventArrayBuffer},
};
use verdict_common::maps::FlowKey;

use super::{
    Report,
    common::{
        Bench, Driven, PinDir, Priority, REPLAY_AND_EMIT, drive, notification, progress, short_rate, start_agent,
    },
};

/// Cilium's perf ring size per CPU: `defaults.MonitorBufferPages = 64`
/// (`pkg/defaults/defaults.go`), passed to `AttachToEventsMap` by the
/// monitor agent (`pkg/monitor/agent`), a constant, not a flag. Its
/// reader (cilium/ebpf `perf.NewReader`) wakes on the first byte written,
/// i.e. per record, as aya's does.
const PAGES_PER_CPU: usize = 64;
const FLOW_TABLE: u32 = 16_384;

#[derive(Default)]
struct ReaderCounts {
    received: AtomicU64,
    lost_records: AtomicU64,
    undecodable: AtomicU64,
    wakeups: AtomicU64,
}

/// The baseline: one thread, poll(2) over every CPU's ring, drain, decode.
struct Baseline {
    counts: Arc<ReaderCounts>,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<usize>>,
}

impl Baseline {
    fn spawn(mut bufs: Vec<PerfEventArrayBuffer<MapData>>) -> Baseline {
        let counts = Arc::new(ReaderCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        let join = std::thread::Builder::new()
            .name("baseline-reader".into())
            .spawn(move || {
                // What Hubble's flow metrics keep: a count per flow.
                let mut flows: HashMap<FlowKey, u64> = HashMap::new();
                let mut pfds: Vec<libc::pollfd> =
                    bufs.iter().map(|b| libc::pollfd { fd: b.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
                let mut scratch = Vec::with_capacity(128);
                while !s.load(Ordering::Relaxed) {
                    // SAFETY: valid pollfd array of the given length.
                    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
                    if n <= 0 {
                        continue;
                    }
                    c.wakeups.fetch_add(1, Ordering::Relaxed);
                    for (b, p) in bufs.iter_mut().zip(pfds.iter_mut()) {
                        if p.revents == 0 && !b.readable() {
                            continue;
                        }
                        p.revents = 0;
                        let (mut got, mut lost, mut bad) = (0u64, 0u64, 0u64);
                        b.for_each(|ev| match ev {
                            PerfEvent::Sample { head, tail } => {
                                let bytes: &[u8] = if tail.is_empty() {
                                    head
                                } else {
                                    scratch.clear();
                                    scratch.extend_from_slice(head);
                                    scratch.extend_from_slice(tail);
                                    &scratch
                                };
                                match verdict_agent::cilium::monitor::expected_accounting(bytes) {
                                    Ok(Some(a)) => *flows.entry(a.key).or_default() += 1,
                                    _ => bad += 1,
                                }
                                got += 1;
                            }
                            PerfEvent::Lost { count } => lost += count,
                        });
                        c.received.fetch_add(got, Ordering::Relaxed);
                        c.lost_records.fetch_add(lost, Ordering::Relaxed);
                        c.undecodable.fetch_add(bad, Ordering::Relaxed);
                    }
                }
                flows.len()
            })
            .expect("spawning the baseline reader");
        Baseline { counts, stop, join: Some(join) }
    }

    fn snapshot(&self) -> [u64; 4] {
        let c = &self.counts;
        [
            c.received.load(Ordering::Relaxed),
            c.lost_records.load(Ordering::Relaxed),
            c.undecodable.load(Ordering::Relaxed),
            c.wakeups.load(Ordering::Relaxed),
        ]
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.join.take().map(|j| j.join().unwrap_or(0)).unwrap_or(0)
    }
}

fn agent_counted(agent: &AgentProcess) -> Result<f64> {
    Ok(agent.scrape()?.counted())
}

/// Waits until the agent has read at least `want` counted verdicts.
fn agent_counted_at_least(agent: &AgentProcess, want: f64) -> Result<f64> {
    let s = agent.scrape_until(Duration::from_secs(10), |s| s.counted() >= want)?;
    Ok(s.counted())
}

struct Step {
    target: Option<f64>,
    driven: Driven,
    emitted: u64,
    written: u64,
    refused: u64,
    agent_counted: u64,
    received: u64,
    lost_records: u64,
    undecodable: u64,
    wakeups: u64,
}

impl Step {
    fn agent_lost(&self) -> i64 {
        self.emitted as i64 - self.agent_counted as i64
    }
    fn baseline_lost(&self) -> i64 {
        self.emitted as i64 - self.received as i64
    }
    fn baseline_loss_pct(&self) -> f64 {
        100.0 * self.baseline_lost() as f64 / self.emitted.max(1) as f64
    }
    fn achieved(&self) -> f64 {
        self.emitted as f64 / self.driven.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One stepped run against the baseline already reading.
fn steps(
    bench: &Bench,
    agent: &AgentProcess,
    baseline: &Baseline,
    inputs: &[Vec<u8>],
    rates: &[Option<f64>],
    step_time: Duration,
    priority: Priority,
) -> Result<Vec<Step>> {
    let never = AtomicBool::new(false);
    let mut out = Vec::new();
    for &target in rates {
        let label = target.map(short_rate).unwrap_or_else(|| "max".into());
        progress!("loss race ({priority:?} emitters): {label}/s for {step_time:?}");
        let c0 = agent_counted(agent)?;
        let e0 = bench.emitted()?;
        let r0 = baseline.snapshot();
        let driven = drive(bench.prog(REPLAY_AND_EMIT)?, inputs, target, step_time, priority, &never)?;
        let e1 = bench.emitted()?;
        let emitted = e1[0] - e0[0];
        let written = e1[1] - e0[1];
        // Let the reader drain what is still in the rings: until it has
        // everything written, or nothing moved for a second.
        let drained = Instant::now();
        let mut last = baseline.snapshot();
        let mut still = Instant::now();
        while drained.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
            let now = baseline.snapshot();
            if now[0] - r0[0] >= written {
                break;
            }
            if now[..2] != last[..2] {
                still = Instant::now();
            } else if still.elapsed() > Duration::from_secs(1) {
                break;
            }
            last = now;
        }
        let r1 = baseline.snapshot();
        let counted = agent_counted_at_least(agent, c0 + emitted as f64)?;
        out.push(Step {
            target,
            driven,
            emitted,
            written,
            refused: e1[2] - e0[2],
            agent_counted: (counted - c0) as u64,
            received: r1[0] - r0[0],
            lost_records: r1[1] - r0[1],
            undecodable: r1[2] - r0[2],
            wakeups: r1[3] - r0[3],
        });
    }
    Ok(out)
}

/// Highest achieved rate up to which a consumer lost nothing.
fn loss_free(steps: &[Step], lost: impl Fn(&Step) -> i64) -> f64 {
    let mut best = 0.0;
    for s in steps {
        if lost(s) != 0 {
            break;
        }
        best = f64::max(best, s.achieved());
    }
    best
}

fn print_steps(report: &mut Report, steps: &[Step]) {
    report.table(&format!(
        "  {:>8} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8} {:>10}",
        "target/s", "achieved/s", "emitted", "agent", "a.lost", "received", "b.lost", "b.loss%", "refused"
    ));
    for s in steps {
        report.table(&format!(
            "  {:>8} {:>10.0} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8.2} {:>10}",
            s.target.map(short_rate).unwrap_or_else(|| "max".into()),
            s.achieved(),
            s.emitted,
            s.agent_counted,
            s.agent_lost(),
            s.received,
            s.baseline_lost(),
            s.baseline_loss_pct(),
            s.refused
        ));
    }
}

fn rows(steps: &[Step]) -> serde_json::Value {
    steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "target_rate_per_s": s.target,
                "achieved_rate_per_s": s.achieved(),
                "duration_s": s.driven.elapsed.as_secs_f64(),
                "emitted": s.emitted,
                "agent_counted": s.agent_counted,
                "agent_lost": s.agent_lost(),
                "baseline_received": s.received,
                "baseline_lost": s.baseline_lost(),
                "baseline_loss_pct": s.baseline_loss_pct(),
                // PERF_RECORD_LOST totals as the reader saw them during the
                // step: the kernel reports a loss only once the ring has room
                // again, so some land in the next step.
                "baseline_ring_lost_records": s.lost_records,
                "baseline_undecodable": s.undecodable,
                "baseline_reader_wakeups": s.wakeups,
                "perf_output_written": s.written,
                "perf_output_refused": s.refused,
            })
        })
        .collect()
}

pub fn run(report: &mut Report, quick: bool) -> Result<()> {
    let rates: Vec<Option<f64>> = if quick {
        vec![Some(10e3), Some(100e3), None]
    } else {
        vec![Some(10e3), Some(30e3), Some(100e3), Some(300e3), Some(1e6), None]
    };
    let fair_rates: Vec<Option<f64>> = vec![Some(10e3), Some(100e3), None];
    let step_time = if quick { Duration::from_secs(1) } else { Duration::from_secs(4) };
    let fair_step_time = if quick { Duration::from_secs(1) } else { Duration::from_secs(3) };

    let pins = PinDir::new("bench-race");
    let agent = start_agent(&pins, FLOW_TABLE, &["--poll-interval", "250ms"], "race")?;
    let mut bench = Bench::load(&pins.0, FLOW_TABLE, &[REPLAY_AND_EMIT])?;
    let inputs: Vec<Vec<u8>> = (0..64).map(notification).collect();
    let never = AtomicBool::new(false);

    // The agent alone, as fast as this machine can emit: nobody has the
    // perf ring open, so each output is refused at once (no reader) and the
    // program run is only the accounting plus that refusal.
    progress!("loss race: agent alone, max rate, {step_time:?}");
    let c0 = agent_counted(&agent)?;
    let e0 = bench.emitted()?;
    let alone = drive(bench.prog(REPLAY_AND_EMIT)?, &inputs, None, step_time, Priority::Datapath, &never)?;
    let e1 = bench.emitted()?;
    let alone_emitted = e1[0] - e0[0];
    let alone_counted = (agent_counted_at_least(&agent, c0 + alone_emitted as f64)? - c0) as u64;
    let alone_rate = alone_emitted as f64 / alone.elapsed.as_secs_f64();

    // The baseline reader on every CPU's ring.
    let map = bench.pipeline.ebpf_mut().take_map("BENCH_EVENTS").context("map BENCH_EVENTS missing")?;
    let mut array = PerfEventArray::try_from(map)?;
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e)?;
    let bufs = cpus
        .iter()
        .map(|&cpu| array.open(cpu, Some(PAGES_PER_CPU)))
        .collect::<Result<Vec<_>, _>>()
        .context("opening the baseline's perf rings")?;
    let baseline = Baseline::spawn(bufs);

    let main = steps(&bench, &agent, &baseline, &inputs, &rates, step_time, Priority::Datapath)?;
    let fair = steps(&bench, &agent, &baseline, &inputs, &fair_rates, fair_step_time, Priority::Fair)?;
    let distinct = baseline.stop();
    let _ = agent.stop();
    drop(bench);
    drop(pins);

    let baseline_free = loss_free(&main, |s| s.baseline_lost());
    let agent_free = loss_free(&main, |s| s.agent_lost());
    let agent_never_lost = main.iter().chain(&fair).all(|s| s.agent_lost() == 0) && alone_counted == alone_emitted;
    let ratio = if baseline_free > 0.0 { Some(agent_free / baseline_free) } else { None };

    report.table("Loss race: one verdict stream, the agent's in-kernel counters vs a perf-ring reader, side by side");
    report.table(&format!(
        "  baseline: {PAGES_PER_CPU} pages/CPU (Cilium's), wakeup per record, one reader thread decoding every record;"
    ));
    report.table(&format!(
        "  emitters: one SCHED_FIFO thread per core (the datapath runs in softirq, ahead of any reader); {} s per step",
        step_time.as_secs()
    ));
    print_steps(report, &main);
    report.table(&format!(
        "  highest loss-free rate: agent {}{:.0}/s, baseline {}, ratio {}",
        if agent_never_lost { ">= " } else { "" },
        agent_free,
        if baseline_free > 0.0 {
            format!("{baseline_free:.0}/s")
        } else {
            format!("< {}/s (lost at every step)", short_rate(main.first().and_then(|s| s.target).unwrap_or(0.0)))
        },
        ratio.map(|r| format!("{r:.1}x")).unwrap_or_else(|| "n/a (baseline never loss-free)".into())
    ));
    report.table(&format!(
        "  agent alone (no perf reader attached): {alone_rate:.0}/s, {alone_emitted} emitted, {} lost",
        alone_emitted as i64 - alone_counted as i64
    ));
    report.table(&format!(
        "  same with fair scheduling (emitters as ordinary threads, {} s per step): the reader's wakeups throttle the emitters",
        fair_step_time.as_secs()
    ));
    print_steps(report, &fair);

    report.table("  (refused: perf outputs the full ring refused, counted in the kernel; b.lost = emitted - received)");
    report.set("loss_race", rows(&main));
    report.set("loss_race_fair_scheduling", rows(&fair));
    report.set(
        "loss_race_agent_alone",
        serde_json::json!({
            "achieved_rate_per_s": alone_rate,
            "emitted": alone_emitted,
            "agent_counted": alone_counted,
            "agent_lost": alone_emitted as i64 - alone_counted as i64,
        }),
    );
    report.set("loss_race_baseline_pages_per_cpu", serde_json::json!(PAGES_PER_CPU));
    report.set("loss_race_baseline_distinct_flows", serde_json::json!(distinct));
    report.set("agent_max_loss_free_rate_per_s", serde_json::json!(agent_free));
    report.set("agent_lost_nothing_at_any_rate", serde_json::json!(agent_never_lost));
    report.set("baseline_max_loss_free_rate_per_s", serde_json::json!(baseline_free));
    report.set("loss_free_ratio", serde_json::json!(ratio));
    Ok(())
}
