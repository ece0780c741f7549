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
//! `agent-ebpf/src/tap.rs`), and the copy of the notification: one
//! `bpf_probe_read_kernel`, or direct loads through `bpf_rdonly_cast` where
//! the kernel allows it (Linux 6.17+). `bench_tap` and `bench_tap_direct`
//! run that whole path on kernel stack buffers and are measured beside it,
//! as is `bench_notify`, Cilium's own cost of a notification (a perf output
//! into rings this benchmark opens and never reads), so the tap's cost is
//! stated as a share of it.
//!
//! `replay` (the product's replay entry) first copies the notification out
//! of the test packet. The tap's, the notify's and the core's bench
//! programs instead find it in place in a map (`BENCH_INPUT`, written
//! before each run; Cilium builds its notification on its own stack, which
//! is neither the notify's cost nor the tap's), so their figures above the
//! empty program are their own costs (plus one inlined array lookup).
//! Not included: the fentry trampoline (or kprobe) entry itself, which this
//! host's kernel refuses to attach.

use anyhow::{Context, Result};
use aya::maps::PerfEventArray;
use verdict_common::{
    flow_table::{FlowBucket, FlowConfig, WORLD_PORT_ENTRIES, WorldPortCounters},
    maps::BENCH_FAKE_MAP_ID,
};

use std::os::fd::AsFd;

use super::{
    Report,
    common::{
        ACCOUNT, Bench, EMPTY, LRU_FLOW, NOTIFY, PROBE_READ, PinDir, REPLAY, TAP, TAP_DIRECT, notification, progress,
        test_run,
    },
    perf_ring::WatermarkRing,
};

/// Pages per CPU of the bench's perf rings, and records per test run into a
/// ring with room (well below what the pages hold: some 100-200 bytes each).
const RING_PAGES: usize = 256;
const RING_RUN: u32 = 4096;

/// Targets of the evidence issue (ns above the empty program, this machine).
const TARGET_HOT_NS: f64 = 40.0;
const TARGET_NEW_NS: f64 = 120.0;
const TARGET_SHARE_OF_NOTIFY: f64 = 0.25;

/// Loads the bench programs and points the tap's filter at the stand-in map.
fn load_bench(pins: &PinDir, flow_table_size: u32, direct: bool) -> Result<Bench> {
    let mut programs = vec![EMPTY, ACCOUNT, TAP, NOTIFY, LRU_FLOW, PROBE_READ];
    if direct {
        programs.push(TAP_DIRECT);
    }
    let mut bench = Bench::load(&pins.0, flow_table_size, &programs)?;
    bench.pipeline.set_tap_config(BENCH_FAKE_MAP_ID, 0).context("writing TAP_CONFIG for bench_tap")?;
    Ok(bench)
}

pub fn run(report: &mut Report, quick: bool) -> Result<()> {
    let repeat: u32 = if quick { 100_000 } else { 2_000_000 };
    let rounds = if quick { 3 } else { 7 };
    let distinct: u32 = if quick { 5_000 } else { 40_000 };
    progress!("kernel: hot flow, {rounds} rounds of {repeat} repetitions, interleaved with the empty program");
    pin_to_one_cpu();

    // The direct-read tap needs a kernel that casts to void (Linux 6.17+).
    let direct = verdict_testkit::replay::direct_read_kfunc().is_some();
    if !direct {
        progress!("kernel: no BPF_FEAT_RDONLY_CAST_TO_VOID in this kernel's BTF: the direct-read tap is not measured");
    }
    let pins = PinDir::new("bench-kernel");
    let mut bench = load_bench(&pins, verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE, direct)?;
    // Cilium's rings, open on every CPU. In the hot rounds nobody reads
    // them: they fill, then refuse each record (Cilium's notify with a
    // reader that fell behind). The "ring with room" rounds below drain the
    // pinned CPU's ring between runs, so every record is written (with the
    // wakeup per record that a Cilium monitor's reader asks for).
    let events = bench.pipeline.ebpf_mut().take_map("BENCH_EVENTS").context("map BENCH_EVENTS missing")?;
    let events_fd = match &events {
        aya::maps::Map::PerfEventArray(data) => data.fd().as_fd().try_clone_to_owned()?,
        _ => anyhow::bail!("BENCH_EVENTS is not a perf event array"),
    };
    let mut events = PerfEventArray::try_from(events)?;
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e)?;
    let mut rings = cpus.iter().map(|&cpu| events.open(cpu, Some(RING_PAGES))).collect::<Result<Vec<_>, _>>()?;
    let mut hot_programs = vec![EMPTY, REPLAY, ACCOUNT, TAP, NOTIFY, PROBE_READ];
    if direct {
        hot_programs.push(TAP_DIRECT);
    }
    let hot_input = notification(0);
    bench.pipeline.set_bench_input(&hot_input)?;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); hot_programs.len()];
    for _ in 0..rounds {
        for (program, out) in hot_programs.iter().zip(samples.iter_mut()) {
            // REPLAY reads the packet; the others ignore it.
            out.push(test_run(bench.prog(program)?, &hot_input, repeat)?.as_nanos() as f64);
        }
    }
    let hot_of = |name: &str| hot_programs.iter().position(|p| *p == name).map(|i| median(&mut samples[i].clone()));
    let empty_ns = hot_of(EMPTY).unwrap_or_default();
    let hot_ns = hot_of(REPLAY).unwrap_or_default();
    let tap_hot_ns = hot_of(TAP).unwrap_or_default();
    let notify_ns = hot_of(NOTIFY).unwrap_or_default();
    let probe_read_ns = hot_of(PROBE_READ).unwrap_or_default();
    let account_ns = hot_of(ACCOUNT).unwrap_or_default();
    let direct_hot_ns = hot_of(TAP_DIRECT);

    progress!(
        "kernel: Cilium's notify into a ring with room, {rounds} x 4 runs of {RING_RUN} records, drained between runs"
    );
    let pinned_ring = rings.first_mut().context("no online CPU")?;
    let drain = |ring: &mut aya::maps::perf::PerfEventArrayBuffer<_>| {
        // Samples only: the first write after the full rounds is preceded
        // by the kernel's record of what the full ring lost.
        let mut n = 0u64;
        ring.for_each(|event| {
            if matches!(event, aya::maps::perf::PerfEvent::Sample { .. }) {
                n += 1;
            }
        });
        n
    };
    drain(pinned_ring);
    // aya's ring: a wakeup per record, as cilium/ebpf's default reader asks.
    let (mut e, mut w, mut written) = (Vec::new(), Vec::new(), 0u64);
    for _ in 0..rounds * 4 {
        e.push(test_run(bench.prog(EMPTY)?, &hot_input, RING_RUN)?.as_nanos() as f64);
        w.push(test_run(bench.prog(NOTIFY)?, &hot_input, RING_RUN)?.as_nanos() as f64);
        written += drain(pinned_ring);
    }
    let empty_ring_ns = median(&mut e);
    let notify_wakeup_ns = median(&mut w);
    let expected = u64::from(RING_RUN) * rounds as u64 * 4;
    anyhow::ensure!(written == expected, "the ring with room lost records: {written} of {expected} read back");
    // A ring that wakes its reader at half its size: records written, nobody woken.
    let mut ring = WatermarkRing::open(cpus[0], RING_PAGES)?;
    ring.install(events_fd.as_fd(), cpus[0])?;
    let (mut e, mut w, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds * 4 {
        e.push(test_run(bench.prog(EMPTY)?, &hot_input, RING_RUN)?.as_nanos() as f64);
        w.push(test_run(bench.prog(NOTIFY)?, &hot_input, RING_RUN)?.as_nanos() as f64);
        sizes.push(ring.drain());
    }
    // Every run wrote RING_RUN records of one size: nothing was refused.
    let record = sizes[0] / u64::from(RING_RUN);
    anyhow::ensure!(
        record > 0 && sizes.iter().all(|&b| b == record * u64::from(RING_RUN)),
        "the watermark ring did not take every record: bytes per run {sizes:?}"
    );
    let empty_batched_ns = median(&mut e);
    let notify_written_ns = median(&mut w);

    // Fewer keys than the default table holds, so both stay below capacity.
    let distinct = distinct.min(verdict_common::maps::DEFAULT_FLOW_TABLE_SIZE / 2 - 1);
    progress!("kernel: new flows, {distinct} distinct keys per program, one run each");
    let (empty_single_ns, new_ns) = singles(&mut bench, REPLAY, 1, distinct)?;
    let (_, tap_new_ns) = singles(&mut bench, TAP, 1_000_000, distinct)?;
    let direct_new_ns = match direct {
        true => Some(singles(&mut bench, TAP_DIRECT, 2_000_000, distinct)?.1),
        false => None,
    };
    // The previous design, the same keys into an empty LRU per-CPU hash.
    let (_, lru_new_ns) = singles(&mut bench, LRU_FLOW, 1, distinct)?;
    drop(bench);
    drop(pins);

    progress!("kernel: new flows into a full table of 1024 slots per CPU");
    let pins = PinDir::new("bench-kernel-full");
    let mut bench = load_bench(&pins, 1024, direct)?;
    for i in 0..8192 {
        test_run(bench.prog(REPLAY)?, &notification(10_000_000 + i), 1)?; // fill every bucket; nobody reads
    }
    let (empty_full_ns, evict_ns) = singles(&mut bench, REPLAY, 20_000_000, distinct)?;
    let (_, tap_evict_ns) = singles(&mut bench, TAP, 30_000_000, distinct)?;
    let direct_evict_ns = match direct {
        true => Some(singles(&mut bench, TAP_DIRECT, 40_000_000, distinct)?.1),
        false => None,
    };
    drop(bench);
    drop(pins);

    let hot = hot_ns - empty_ns;
    let new = new_ns - empty_single_ns;
    let evict = evict_ns - empty_full_ns;
    let tap_hot = tap_hot_ns - empty_ns;
    let tap_new = tap_new_ns - empty_single_ns;
    let tap_evict = tap_evict_ns - empty_full_ns;
    let direct_hot = direct_hot_ns.map(|d| d - empty_ns);
    let direct_new = direct_new_ns.map(|d| d - empty_single_ns);
    let direct_evict = direct_evict_ns.map(|d| d - empty_full_ns);
    let lru_new = lru_new_ns - empty_single_ns;
    let notify = notify_ns - empty_ns;
    let probe = probe_read_ns - empty_ns;
    let core = account_ns - empty_ns;
    let notify_written = notify_written_ns - empty_batched_ns;
    let notify_wakeup = notify_wakeup_ns - empty_ring_ns;
    // The target's basis: Cilium's notify into a perf ring (the record written).
    let share = tap_hot / notify_written;
    let direct_share = direct_hot.map(|d| d / notify_written);
    let direct_share_of_full = direct_hot.map(|d| d / notify);
    // The shipped agent's figure: direct reads where this kernel has them.
    let shipped_share = direct_share.unwrap_or(share);
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
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    report.table(&row("tap path, hot flow (probe read)", tap_hot_ns, tap_hot, format!("<= {TARGET_HOT_NS}")));
    report.table(&row("tap path, new flow (probe read)", tap_new_ns, tap_new, format!("<= {TARGET_NEW_NS}")));
    report.table(&row("tap path, full table (probe read)", tap_evict_ns, tap_evict, format!("<= {TARGET_NEW_NS}")));
    let row_opt = |name: &str, run: Option<f64>, above: Option<f64>, target: String| {
        format!("  {name:<44} {:>9} {:>12} {target:>9}", opt(run), opt(above))
    };
    report.table(&row_opt(
        "tap path, hot flow (direct read)",
        direct_hot_ns,
        direct_hot,
        format!("<= {TARGET_HOT_NS}"),
    ));
    report.table(&row_opt(
        "tap path, new flow (direct read)",
        direct_new_ns,
        direct_new,
        format!("<= {TARGET_NEW_NS}"),
    ));
    report.table(&row_opt(
        "tap path, full table (direct read)",
        direct_evict_ns,
        direct_evict,
        format!("<= {TARGET_NEW_NS}"),
    ));
    report.table(&row(
        "Cilium notify, record written (reader at watermark)",
        notify_written_ns,
        notify_written,
        "-".into(),
    ));
    report.table(&row(
        "Cilium notify, record written + wakeup per record",
        notify_wakeup_ns,
        notify_wakeup,
        "-".into(),
    ));
    report.table(&row("Cilium notify into a full ring (refused)", notify_ns, notify, "-".into()));
    report.table(&row("one bpf_probe_read_kernel of the notification", probe_read_ns, probe, "-".into()));
    report.table(&row("accounting core alone (notification in place)", account_ns, core, "-".into()));
    let percent =
        |v: Option<f64>| v.map_or("not measured on this kernel".to_string(), |s| format!("{:.0} %", s * 100.0));
    report.table(&format!(
        "  tap (hot) as a share of Cilium's notify into a ring: {:.0} % with the probe read, {} with direct reads \
         (target <= {:.0} %; the shipped tap reads directly where the kernel allows); of a notify refused by a \
         full ring: {}",
        share * 100.0,
        percent(direct_share),
        TARGET_SHARE_OF_NOTIFY * 100.0,
        percent(direct_share_of_full),
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
            "notify_ring_with_room_ns_above_empty": notify_written,
            "notify_ring_with_room_wakeup_per_record_ns_above_empty": notify_wakeup,
            "notify_record_bytes": record,
            "tap_direct_share_of_notify_full_ring": direct_share_of_full,
            "tap_share_of_notify": shipped_share,
            "tap_probe_read_share_of_notify": share,
            "tap_direct_share_of_notify": direct_share,
            "tap_direct_hot_ns_above_empty": direct_hot,
            "tap_direct_new_flow_ns_above_empty": direct_new,
            "tap_direct_new_flow_at_capacity_ns_above_empty": direct_evict,
            "accounting_core_in_place_ns_above_empty": core,
            "probe_read_ns_above_empty": probe,
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

/// Mean ns of single runs, the empty program and `program` interleaved,
/// one distinct key per run starting at `start` (in the packet for
/// `replay`, in `BENCH_INPUT` for the others).
fn singles(bench: &mut Bench, program: &str, start: u32, n: u32) -> Result<(f64, f64)> {
    let (mut e, mut r) = (0.0, 0.0);
    for i in start..start + n {
        let input = notification(i);
        bench.pipeline.set_bench_input(&input)?;
        e += test_run(bench.prog(EMPTY)?, &input, 1)?.as_nanos() as f64;
        r += test_run(bench.prog(program)?, &input, 1)?.as_nanos() as f64;
    }
    Ok((e / n as f64, r / n as f64))
}
