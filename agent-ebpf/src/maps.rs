//! Every map of the tap object, declared once. Names are the constants in
//! `verdict_common::maps`, which userspace uses to find them.

use aya_ebpf::{
    macros::map,
    maps::{Array, LruPerCpuHashMap, PerCpuArray},
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
