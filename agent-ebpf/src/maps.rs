//! Every map of the tap object, declared once. Names are the constants in
//! `verdict_common::maps`, which userspace uses to find them.

use aya_ebpf::{
    macros::map,
    maps::{Array, LruPerCpuHashMap, PerCpuArray, PerfEventArray},
};
use verdict_common::maps::{
    DEFAULT_FLOW_TABLE_SIZE, EndpointCounters, FlowCounters, FlowKey, MAX_ENDPOINTS, Stat, TapConfig,
};

/// Which map is Cilium's and where `struct bpf_map` keeps its ID.
#[map(name = "TAP_CONFIG")]
pub static TAP_CONFIG: Array<TapConfig> = Array::with_max_entries(1, 0);

/// Exact per-endpoint totals; indexed by endpoint ID, never evicts.
#[map(name = "ENDPOINT_COUNTERS")]
pub static ENDPOINT_COUNTERS: PerCpuArray<EndpointCounters> = PerCpuArray::with_max_entries(MAX_ENDPOINTS, 0);

/// Flow table; bounded, least recently used flows are evicted. Userspace
/// resizes it at load time.
#[map(name = "FLOWS")]
pub static FLOWS: LruPerCpuHashMap<FlowKey, FlowCounters> =
    LruPerCpuHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Outcome counters, indexed by `Stat`.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

// ---------------------------------------------------------------------------
// Benchmark only (`cargo xtask bench`, program `bench_replay_and_emit`).
// The tap never touches these; they are never pinned, and each load of the
// object gets its own (a perf event array of one slot per CPU and three
// per-CPU counters: negligible).
// ---------------------------------------------------------------------------

/// Benchmark only: the perf ring the benchmark's baseline reader (a
/// stand-in for `cilium monitor` / Hubble reading `cilium_events`) consumes.
#[map(name = "BENCH_EVENTS")]
pub static BENCH_EVENTS: PerfEventArray<u32> = PerfEventArray::new(0);

/// Benchmark only: index 0 notifications offered (program runs), 1 perf
/// outputs written into `BENCH_EVENTS`, 2 perf outputs refused (ring full,
/// or no reader on this CPU). Counted in the kernel, independently of both
/// the agent and the reader.
#[map(name = "BENCH_EMITTED")]
pub static BENCH_EMITTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);
