//! In-kernel cost of accounting one verdict, with BPF_PROG_TEST_RUN on the
//! host kernel: the replay entry (the tap's accounting core on the agent's
//! maps) against `bench_empty` (a tc program that does nothing), measured
//! interleaved in the same run. The kernel reports the mean duration per
//! repetition of each test run.
//!
//! * hot flow: one notification repeated (`repeat` large): a flow lookup and adds;
//! * new flow: one test run (`repeat` 1) per distinct flow key, so every run
//!   takes a slot of the flow table; the empty program is measured the same
//!   way, one run at a time, so the per-call timer overhead cancels out;
//! * new flow at capacity: the same into a table whose buckets hold only
//!   unread counts (the verdict goes to the overflow counters).
//!
//! The thread is pinned to one CPU, so every run writes the same shard.
//!
//! `replay` makes no helper call before `account`; the real tap makes the
//! `TAP_CONFIG` lookup, a `bpf_probe_read_kernel` of the map's ID for a map
//! address it has not matched before (once a second in steady state: see
//! `agent-ebpf/src/tap.rs`), and one of the notification. `bench_tap` runs that whole path on kernel
//! stack buffers and is measured beside it, as is `bench_notify`, Cilium's
//! own cost of a notification (a perf output into rings this benchmark
//! opens and never reads), so the tap's cost is stated as a share of it.
//! Not included: the fentry trampoline (or kprobe) entry itself, which this
//! host's kernel refuses to attach.

use anyhow::{Context, Result};
use aya::{maps::PerfEventArray, programs::SchedClassifier};
use verdict_common::{
    flow_table::{FlowBucket, FlowConfig, WORLD_PORT_ENTRIES, WorldPortCounters},
    maps::BENCH_FAKE_MAP_ID,
};

use super::{
    Report,
    common::{Bench, EMPTY, LRU_FLOW, NOTIFY, PROBE_READ, PinDir, REPLAY, TAP, notification, progress, test_run},
};

/// Targets of the evidence issue (ns above the empty program, this machine).
const TARGET_HOT_NS: f64 = 40.0;
const TARGET_NEW_NS: f64 = 120.0;
const TARGET_SHARE_OF_NOTIFY: f64 = 0.25;

/// Loads the bench programs and points the tap's filter at the stand-in map.
fn load_bench(pins: &PinDir, flow_table_size: u32) -> Result<Bench> {
    let mut bench = Bench::load(&pins.0, flow_table_size, &[EMPTY, TAP, NOTIFY, LRU_FLOW, PROBE_READ])?;
    bench.pipeline.set_tap_config(BENCH_FAKE_MAP_ID, 0).context("writing TAP_CONFIG for bench_tap")?;
    Ok(bench)
}

pub fn run(report: &mut Report, quick: bool) -> Result<()> {
    let repeat: u32 = if quick { 100_000 } else { 2_000_000 };
    let rounds = if quick { 3 } else { 7 };
    let distinct: u32 = if quick { 5_000 } else { 40_000 };
    progress!("kernel: hot flow, {rounds} rounds of {repeat} repetitions, interleaved with the empty program");
    pin_to_one_cpu();

    let pins = PinDir::new("bench-kernel");
    let mut bench = load_bench(&pins, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE)?;
    // Cilium's rings: open on every CPU, never read (they fill, then refuse).
    let events = bench.pipeline.ebpf_mut().take_map("BENCH_EVENTS").context("map BENCH_EVENTS missing")?;
    let mut events = PerfEventArray::try_from(events)?;
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e)?;
    let _rings = cpus.iter().map(|&cpu| events.open(cpu, Some(16))).collect::<Result<Vec<_>, _>>()?;
    let empty = bench.prog(EMPTY)?;
    let replay = bench.prog(REPLAY)?;
    let tap = bench.prog(TAP)?;
    let notify = bench.prog(NOTIFY)?;
    let probe_read = bench.prog(PROBE_READ)?;
    let hot_input = notification(0);
    let (mut e, mut h, mut t, mut n, mut r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        e.push(test_run(empty, &hot_input, repeat)?.as_nanos() as f64);
        h.push(test_run(replay, &hot_input, repeat)?.as_nanos() as f64);
        t.push(test_run(tap, &hot_input, repeat)?.as_nanos() as f64);
        n.push(test_run(notify, &hot_input, repeat)?.as_nanos() as f64);
        r.push(test_run(probe_read, &hot_input, repeat)?.as_nanos() as f64);
    }
    let probe_read_ns = median(&mut r);
    let empty_ns = median(&mut e);
    let hot_ns = median(&mut h);
    let tap_hot_ns = median(&mut t);
    let notify_ns = median(&mut n);

    // Fewer keys than the default table holds, so both stay below capacity.
    let distinct = distinct.min(verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE / 2 - 1);
    progress!("kernel: new flows, {distinct} distinct keys per program, one run each");
    let (empty_single_ns, new_ns) = singles(empty, replay, 1, distinct)?;
    let (_, tap_new_ns) = singles(empty, tap, 1_000_000, distinct)?;
    // The previous design, the same keys into an empty LRU per-CPU hash.
    let (_, lru_new_ns) = singles(empty, bench.prog(LRU_FLOW)?, 1, distinct)?;
    drop(bench);
    drop(pins);

    progress!("kernel: new flows into a full table of 1024 slots per CPU");
    let pins = PinDir::new("bench-kernel-full");
    let bench = load_bench(&pins, 1024)?;
    let (empty, replay, tap) = (bench.prog(EMPTY)?, bench.prog(REPLAY)?, bench.prog(TAP)?);
    for i in 0..8192 {
        test_run(replay, &notification(10_000_000 + i), 1)?; // fill every bucket; nobody reads
    }
    let (empty_full_ns, evict_ns) = singles(empty, replay, 20_000_000, distinct)?;
    let (_, tap_evict_ns) = singles(empty, tap, 30_000_000, distinct)?;
    drop(bench);
    drop(pins);

    let hot = hot_ns - empty_ns;
    let new = new_ns - empty_single_ns;
    let evict = evict_ns - empty_full_ns;
    let tap_hot = tap_hot_ns - empty_ns;
    let tap_new = tap_new_ns - empty_single_ns;
    let tap_evict = tap_evict_ns - empty_full_ns;
    let lru_new = lru_new_ns - empty_single_ns;
    let notify = notify_ns - empty_ns;
    let probe = probe_read_ns - empty_ns;
    let share = tap_hot / notify;
    let possible = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    // A slot is 1/8 of a bucket, on each CPU's shard; the world-port table
    // and the config are shared by all CPUs.
    let per_slot = size_of::<FlowBucket>() / verdict_common::flow_table::BUCKET_WAYS;
    let per_cpu = per_slot as u64 * u64::from(verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE);
    let shared =
        (size_of::<WorldPortCounters>() as u64) * u64::from(WORLD_PORT_ENTRIES) + size_of::<FlowConfig>() as u64;
    let per_node = per_cpu * possible as u64 + shared;
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
        format!("new flow ({distinct} distinct keys, slot taken)"),
        new_ns,
        new,
        new_ns / empty_single_ns
    ));
    report.table(&format!(
        "  {:<44} {:>9.1} {:>12.1} {:>9.2}",
        "new flow into a full table (overflow counted)",
        evict_ns,
        evict,
        evict_ns / empty_full_ns
    ));
    report.table(&format!(
        "  {:<44} {:>9.1} {:>12.1} {:>9}",
        "previous design: new flow into an LRU per-CPU hash",
        lru_new_ns,
        lru_new,
        format!("{:.2}x", new / lru_new)
    ));
    report.table(&format!(
        "  new flow, flow table vs the previous design in this run: {:.2} (the LRU's inserts zero-fill the value \
         on all {possible} possible CPUs; the flow table's cost does not depend on them)",
        new / lru_new
    ));
    report.table(
        "  The tap's whole path (TAP_CONFIG lookup, map filter, the notification's bpf_probe_read_kernel, account) \
         and Cilium's notify:",
    );
    report.table(&format!("  {:<44} {:>9} {:>12} {:>9}", "case", "ns/run", "ns above", "target"));
    let row =
        |name: &str, run: f64, above: f64, target: String| format!("  {name:<44} {run:>9.1} {above:>12.1} {target:>9}");
    report.table(&row("tap path, hot flow", tap_hot_ns, tap_hot, format!("<= {TARGET_HOT_NS}")));
    report.table(&row("tap path, new flow", tap_new_ns, tap_new, format!("<= {TARGET_NEW_NS}")));
    report.table(&row("tap path, new flow into a full table", tap_evict_ns, tap_evict, format!("<= {TARGET_NEW_NS}")));
    report.table(&row("Cilium notify (perf output, unread ring)", notify_ns, notify, "-".into()));
    report.table(&row("of the tap path: packet copy + the probe read", probe_read_ns, probe, "-".into()));
    report.table(&format!(
        "  tap (hot) as a share of Cilium's notify: {:.0} % (target <= {:.0} %); the tap's probe reads add {:.1} ns to replay",
        share * 100.0,
        TARGET_SHARE_OF_NOTIFY * 100.0,
        tap_hot - hot
    ));
    report.table(&format!(
        "  memory: {per_slot} B per flow slot per CPU; {:.0} KiB per possible CPU at the default {} slots; \
         {:.1} MiB shared (world ports, config); {:.1} MiB per node at {possible} possible CPUs",
        per_cpu as f64 / 1024.0,
        verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE,
        shared as f64 / 1_048_576.0,
        per_node as f64 / 1_048_576.0,
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
            "tap_path_hot_ns_above_empty": tap_hot,
            "tap_path_new_flow_ns_above_empty": tap_new,
            "tap_path_new_flow_at_capacity_ns_above_empty": tap_evict,
            "notify_unread_ring_ns_above_empty": notify,
            "tap_share_of_notify": share,
            "packet_copy_and_probe_read_ns_above_empty": probe,
            "previous_design_new_flow_ns_per_verdict": lru_new,
            "new_flow_ratio_to_previous_design": new / lru_new,
            "targets": {"hot_ns": TARGET_HOT_NS, "new_ns": TARGET_NEW_NS, "share_of_notify": TARGET_SHARE_OF_NOTIFY},
            "possible_cpus": possible,
            "flow_slot_bytes_per_cpu": per_slot,
            "flow_table_bytes_per_cpu_default": per_cpu,
            "shared_bytes": shared,
            "node_bytes_default": per_node,
        }),
    );
    Ok(())
}

/// Every test run on the same CPU: the same shard, the same caches.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is valid; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
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
