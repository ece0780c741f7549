//! In-kernel cost of accounting one verdict, with BPF_PROG_TEST_RUN on the
//! host kernel: the replay entry (the tap's accounting core on the agent's
//! maps) against `bench_empty` (a tc program that does nothing), measured
//! interleaved in the same run. The kernel reports the mean duration per
//! repetition of each test run.
//!
//! * hot flow: one notification repeated (`repeat` large): a flow lookup and adds;
//! * new flow: one test run (`repeat` 1) per distinct flow key, so every run
//!   inserts into the LRU hash; the empty program is measured the same way,
//!   one run at a time, so the per-call timer overhead cancels out;
//! * new flow at capacity: the same into a full table (insert + evict).

use anyhow::Result;
use aya::programs::SchedClassifier;

use super::{
    Report,
    common::{Bench, EMPTY, PinDir, REPLAY, notification, progress, test_run},
};

pub fn run(report: &mut Report, quick: bool) -> Result<()> {
    let repeat: u32 = if quick { 100_000 } else { 2_000_000 };
    let rounds = if quick { 3 } else { 7 };
    let distinct: u32 = if quick { 5_000 } else { 40_000 };
    progress!("kernel: hot flow, {rounds} rounds of {repeat} repetitions, interleaved with the empty program");

    let pins = PinDir::new("kernel");
    let bench = Bench::load(&pins.0, 65_536, &[EMPTY])?;
    let empty = bench.prog(EMPTY)?;
    let replay = bench.prog(REPLAY)?;
    let hot_input = notification(0);
    let (mut e, mut h) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        e.push(test_run(empty, &hot_input, repeat)?.as_nanos() as f64);
        h.push(test_run(replay, &hot_input, repeat)?.as_nanos() as f64);
    }
    let empty_ns = median(&mut e);
    let hot_ns = median(&mut h);

    progress!("kernel: new flows, {distinct} distinct keys, one run each");
    let (empty_single_ns, new_ns) = singles(empty, replay, 1, distinct)?;
    drop(bench);
    drop(pins);

    progress!("kernel: new flows into a full 1024-entry table");
    let pins = PinDir::new("kernel-full");
    let bench = Bench::load(&pins.0, 1024, &[EMPTY])?;
    let (empty, replay) = (bench.prog(EMPTY)?, bench.prog(REPLAY)?);
    for i in 0..4096 {
        test_run(replay, &notification(10_000_000 + i), 1)?; // fill the table
    }
    let (empty_full_ns, evict_ns) = singles(empty, replay, 20_000_000, distinct)?;
    drop(bench);
    drop(pins);

    let hot = hot_ns - empty_ns;
    let new = new_ns - empty_single_ns;
    let evict = evict_ns - empty_full_ns;
    report.table("In-kernel cost per verdict (BPF_PROG_TEST_RUN, replay vs empty tc program, same run)");
    report.table(&format!("  {:<44} {:>9} {:>12} {:>9}", "case", "ns/run", "ns/verdict", "x empty"));
    report.table(&format!(
        "  {:<44} {:>9.1} {:>12} {:>9}",
        format!("empty program, repeat {repeat}"),
        empty_ns,
        "-",
        "1.0"
    ));
    report.table(&format!("  {:<44} {:>9.1} {:>12.1} {:>9.2}", "hot flow (same key)", hot_ns, hot, hot_ns / empty_ns));
    report.table(&format!("  {:<44} {:>9.1} {:>12} {:>9}", "empty program, single runs", empty_single_ns, "-", "1.0"));
    report.table(&format!(
        "  {:<44} {:>9.1} {:>12.1} {:>9.2}",
        format!("new flow ({distinct} distinct keys, LRU insert)"),
        new_ns,
        new,
        new_ns / empty_single_ns
    ));
    report.table(&format!(
        "  {:<44} {:>9.1} {:>12.1} {:>9.2}",
        "new flow into a full table (insert + evict)",
        evict_ns,
        evict,
        evict_ns / empty_full_ns
    ));
    report.set(
        "kernel",
        serde_json::json!({
            "empty_program_ns": empty_ns,
            "hot_flow_ns_per_run": hot_ns,
            "hot_flow_ns_per_verdict": hot,
            "hot_flow_ratio_to_empty": hot_ns / empty_ns,
            "empty_program_single_run_ns": empty_single_ns,
            "new_flow_ns_per_run": new_ns,
            "new_flow_ns_per_verdict": new,
            "new_flow_ratio_to_empty": new_ns / empty_single_ns,
            "new_flow_at_capacity_ns_per_run": evict_ns,
            "new_flow_at_capacity_ns_per_verdict": evict,
            "new_flow_at_capacity_ratio_to_empty": evict_ns / empty_full_ns,
            "repeat": repeat,
            "rounds": rounds,
            "distinct_keys": distinct,
        }),
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Mean ns of single runs, the empty program and replay interleaved, one
/// distinct key per replay run starting at `start`.
fn singles(empty: &SchedClassifier, replay: &SchedClassifier, start: u32, n: u32) -> Result<(f64, f64)> {
    let (mut e, mut r) = (0.0, 0.0);
    for i in start..start + n {
        let input = notification(i);
        e += test_run(empty, &input, 1)?.as_nanos() as f64;
        r += test_run(replay, &input, 1)?.as_nanos() as f64;
    }
    Ok((e / n as f64, r / n as f64))
}
