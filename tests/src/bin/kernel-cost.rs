//! In-kernel cost of accounting one verdict, measured with
//! BPF_PROG_TEST_RUN on the host kernel: the replay entry (which runs the
//! tap's accounting core on the same maps) minus an empty tc program, in
//! the same run. The kernel reports the mean duration per repetition.
//!
//! * hot flow: the same notification over and over (a lookup and adds);
//! * new flow: a distinct flow key per run (an insert into the LRU hash);
//! * new flow at capacity: distinct keys into a full table (insert + evict).
//!
//! Prints a table and one JSON object on the last line (xtask writes it to
//! target/bench/summary.json). Figures are whole-kernel-run figures of this
//! machine, meant as ratios against the empty program of the same run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use verdict_agent::{
    bpf::loader::{LoaderConfig, Pipeline, TapChoice},
    scenario::{Layout, PolicyVerdict},
};

fn notification(i: u32) -> Vec<u8> {
    PolicyVerdict {
        layout: Layout::V1_19,
        endpoint: 100 + (i % 50) as u16,
        remote_identity: 2 + (i / 50_000),
        verdict: 0,
        dst_port: (i % 50_000) as u16 + 1,
        proto: 6,
        dir: 1,
        ipv6: false,
        match_type: 0,
        audited: true,
        packet_len: 60,
    }
    .encode()
}

fn load(name: &str, flow_table_size: u32) -> Result<(Pipeline, PathBuf)> {
    let pins = PathBuf::from(format!("/sys/fs/bpf/verdict-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pins);
    let mut p = Pipeline::load(&LoaderConfig {
        pin_dir: pins.clone(),
        flow_table_size,
        tap: TapChoice::Replay,
        btf_path: "/sys/kernel/btf/vmlinux".into(),
    })
    .context("loading the tap object (root and bpffs needed)")?;
    let empty: &mut SchedClassifier = p.ebpf_mut().program_mut("bench_empty").context("bench_empty")?.try_into()?;
    empty.load()?;
    Ok((p, pins))
}

fn prog<'a>(p: &'a Pipeline, name: &str) -> Result<&'a SchedClassifier> {
    Ok(p.ebpf().program(name).with_context(|| name.to_string())?.try_into()?)
}

/// Mean ns per repetition, as the kernel measured it.
fn run(prog: &SchedClassifier, data: &[u8], repeat: u32) -> Result<f64> {
    let r = prog.test_run(TestRunOptions { data_in: Some(data), repeat, ..Default::default() })?;
    Ok(r.duration.as_nanos() as f64)
}

/// Median of `rounds` measurements of `repeat` repetitions each.
fn median_of(rounds: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut v = (0..rounds).map(|_| f()).collect::<Result<Vec<_>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let repeat = if quick { 100_000 } else { 2_000_000 };
    let distinct = if quick { 5_000 } else { 40_000 };

    let (p, pins) = load("hot", 65_536)?;
    let hot_input = notification(0);
    let empty = prog(&p, "bench_empty")?;
    let replay = prog(&p, "replay")?;
    let empty_ns = median_of(5, || run(empty, &hot_input, repeat))?;
    let hot_ns = median_of(5, || run(replay, &hot_input, repeat))?;

    // One run per distinct key: each call reports a single repetition, so
    // the empty program is measured the same way for the baseline.
    let single = |prog: &SchedClassifier, start: u32| -> Result<f64> {
        let mut total = 0.0;
        for i in start..start + distinct {
            total += run(prog, &notification(i), 1)?;
        }
        Ok(total / distinct as f64)
    };
    let empty_single_ns = single(empty, 0)?;
    let new_ns = single(replay, 1)?;
    drop(p);
    let _ = std::fs::remove_dir_all(&pins);

    let (p, pins) = load("full", 1024)?;
    let replay = prog(&p, "replay")?;
    single(replay, 0)?; // fill the table
    let evict_ns = single(replay, 500_000)?;
    drop(p);
    let _ = std::fs::remove_dir_all(&pins);

    let machine = format!(
        "{} cores, kernel {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    println!("in-kernel cost per verdict (BPF_PROG_TEST_RUN, {machine})");
    println!("  {:<38} {:>10} {:>14}", "case", "ns/run", "minus empty");
    println!("  {:<38} {:>10.1} {:>14}", format!("empty tc program (repeat {repeat})"), empty_ns, "-");
    println!("  {:<38} {:>10.1} {:>14.1}", "hot flow (same key)", hot_ns, hot_ns - empty_ns);
    println!("  {:<38} {:>10.1} {:>14}", "empty tc program (single runs)", empty_single_ns, "-");
    println!("  {:<38} {:>10.1} {:>14.1}", "new flow (insert)", new_ns, new_ns - empty_single_ns);
    println!("  {:<38} {:>10.1} {:>14.1}", "new flow into a full table (evict)", evict_ns, evict_ns - empty_single_ns);
    let summary = serde_json::json!({
        "machine": machine,
        "kernel": {
            "empty_program_ns": empty_ns,
            "hot_flow_ns_per_run": hot_ns,
            "hot_flow_ns_per_verdict": hot_ns - empty_ns,
            "hot_flow_ratio_to_empty": hot_ns / empty_ns,
            "empty_program_single_run_ns": empty_single_ns,
            "new_flow_ns_per_run": new_ns,
            "new_flow_ns_per_verdict": new_ns - empty_single_ns,
            "new_flow_at_capacity_ns_per_verdict": evict_ns - empty_single_ns,
            "repeat": repeat,
            "distinct_keys": distinct,
        }
    });
    println!("{summary}");
    Ok(())
}
