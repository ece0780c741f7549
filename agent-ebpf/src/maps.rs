//! Every map of the tap object, declared once. Names are the constants in
//! `verdict_common::maps`, which userspace uses to find them; layouts are in
//! `verdict_common::flow_table`.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use verdict_common::{
    flow_table::{FlowBucket, FlowConfig, WORLD_PORT_ENTRIES, WorldPortCounters},
    maps::{DEFAULT_FLOW_TABLE_SIZE, EndpointCounters, MAX_ENDPOINTS, Stat, TapConfig},
};

/// `BPF_F_MMAPABLE`: userspace maps the array instead of a syscall per entry.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Which map is Cilium's and where `struct bpf_map` keeps its ID.
#[map(name = "TAP_CONFIG")]
pub static TAP_CONFIG: Array<TapConfig> = Array::with_max_entries(1, 0);

/// Exact per-endpoint totals; indexed by endpoint ID, never evicts.
#[map(name = "ENDPOINT_COUNTERS")]
pub static ENDPOINT_COUNTERS: PerCpuArray<EndpointCounters> = PerCpuArray::with_max_entries(MAX_ENDPOINTS, 0);

/// The flow table: one shard of buckets per possible CPU. Userspace sizes it
/// at load (shards x buckets per shard) and writes the geometry into
/// `FLOW_CONFIG`.
#[map(name = "FLOW_TABLE")]
pub static FLOW_TABLE: Array<FlowBucket> =
    Array::with_max_entries(DEFAULT_FLOW_TABLE_SIZE / verdict_common::flow_table::BUCKET_WAYS as u32, BPF_F_MMAPABLE);

/// Epoch, host endpoint, geometry and critical ports, written by the agent.
#[map(name = "FLOW_CONFIG")]
pub static FLOW_CONFIG: Array<FlowConfig> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// World verdicts to the host on non-critical ports, per protocol and port.
#[map(name = "WORLD_PORTS")]
pub static WORLD_PORTS: Array<WorldPortCounters> = Array::with_max_entries(WORLD_PORT_ENTRIES, BPF_F_MMAPABLE);

/// Outcome counters, indexed by `Stat`.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);
