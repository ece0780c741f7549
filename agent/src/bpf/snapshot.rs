//! Reading the counters back: one pass over the maps, summing per-CPU
//! values. Done on a timer, never per event, so the cost depends on the
//! number of endpoints and flows, not on the event rate.

use std::time::{Duration, SystemTime};

use aya::{
    maps::{Map, MapError, PerCpuArray, PerCpuHashMap},
    sys::SyscallError,
};
use verdict_common::maps::{EndpointCounters, FlowCounters, FlowKey, MAX_ENDPOINTS, Stat};

use super::batch::{self, Batched};

/// `bpf_ktime_get_ns()` is CLOCK_MONOTONIC; this maps it to wall time.
#[derive(Clone, Copy, Debug)]
pub struct KernelClock {
    mono_ns: u64,
    wall: SystemTime,
}

impl KernelClock {
    pub fn now() -> KernelClock {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        KernelClock { mono_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64, wall: SystemTime::now() }
    }

    /// Wall time of the read.
    pub fn taken_at(&self) -> SystemTime {
        self.wall
    }

    pub fn to_wall(&self, ktime_ns: u64) -> SystemTime {
        self.wall - Duration::from_nanos(self.mono_ns.saturating_sub(ktime_ns))
    }
}

/// One endpoint's totals, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointTotals {
    pub id: u16,
    /// [ingress, egress][VerdictClass]
    pub verdicts: [[u64; 4]; 2],
    pub policy_drops: [u64; 2],
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
}

/// One flow's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTotals {
    pub notifications: u64,
    pub bytes: u64,
    /// Earliest first-seen over CPUs: identifies this incarnation of the
    /// entry (a re-created entry has a later one).
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
}

#[derive(Clone, Debug)]
pub struct MapSnapshot {
    pub clock: KernelClock,
    /// Endpoints with at least one notification.
    pub endpoints: Vec<EndpointTotals>,
    /// Every flow read; the agent hands them to the ledger and keeps
    /// only `live_flows` (100 k flows would be 5 MiB held twice).
    pub flows: Vec<(FlowKey, FlowTotals)>,
    /// Entries in the flow table at this read.
    pub live_flows: usize,
    /// Indexed by `Stat`.
    pub stats: [u64; Stat::COUNT as usize],
    pub read_duration: Duration,
}

/// The three counting maps, borrowed from a loaded object.
pub struct CountingMaps<'a> {
    pub endpoints: &'a Map,
    pub flows: &'a Map,
    pub stats: &'a Map,
}

impl MapSnapshot {
    pub fn read(maps: CountingMaps<'_>) -> Result<MapSnapshot, MapError> {
        let started = std::time::Instant::now();
        // The kernel adds to the endpoint total, then the flow, then the
        // outcome counter. Reading in the reverse order means that in one
        // snapshot endpoint totals >= flows >= `counted`: nothing read
        // later lags behind something read earlier.
        let stats = read_stats(maps.stats)?;
        let flows = read_flows(maps.flows)?;
        let endpoints = read_endpoints(maps.endpoints)?;
        Ok(MapSnapshot {
            clock: KernelClock::now(),
            endpoints,
            live_flows: flows.len(),
            flows,
            stats,
            read_duration: started.elapsed(),
        })
    }

    pub fn stat(&self, s: Stat) -> u64 {
        self.stats[s as usize]
    }
}

fn read_flows(map: &Map) -> Result<Vec<(FlowKey, FlowTotals)>, MapError> {
    if let Map::PerCpuLruHashMap(data) | Map::PerCpuHashMap(data) = map {
        let cpus = aya::util::nr_cpus().map_err(|(_, io_error)| SyscallError { call: "nr_cpus", io_error })?;
        let mut out = Vec::new();
        let batched = batch::for_each_per_cpu(data, cpus, |key: FlowKey, values: &[FlowCounters]| {
            out.push((key, sum_flow(values)))
        })
        .map_err(|io_error| SyscallError { call: "bpf_map_lookup_batch", io_error })?;
        if batched == Batched::Done {
            return Ok(out);
        }
    }
    let flows: PerCpuHashMap<_, FlowKey, FlowCounters> = PerCpuHashMap::try_from(map)?;
    let mut out = Vec::new();
    for entry in flows.iter() {
        // An entry evicted between "next key" and "lookup" is just gone.
        let Ok((key, values)) = entry else { continue };
        out.push((key, sum_flow(values.iter())));
    }
    Ok(out)
}

fn sum_flow<'a>(values: impl IntoIterator<Item = &'a FlowCounters>) -> FlowTotals {
    let mut t = FlowTotals::default();
    for v in values {
        t.notifications += v.notifications;
        t.bytes += v.bytes;
        if v.first_seen_ns != 0 && (t.first_seen_ns == 0 || v.first_seen_ns < t.first_seen_ns) {
            t.first_seen_ns = v.first_seen_ns;
        }
        t.last_seen_ns = t.last_seen_ns.max(v.last_seen_ns);
    }
    t
}

fn read_endpoints(map: &Map) -> Result<Vec<EndpointTotals>, MapError> {
    let arr: PerCpuArray<_, EndpointCounters> = PerCpuArray::try_from(map)?;
    let mut out = Vec::new();
    for id in 0..MAX_ENDPOINTS {
        let values = arr.get(&id, 0)?;
        let mut t = EndpointTotals { id: id as u16, ..Default::default() };
        for v in values.iter() {
            for d in 0..2 {
                for c in 0..4 {
                    t.verdicts[d][c] += v.verdicts[d][c];
                }
                t.policy_drops[d] += v.policy_drops[d];
            }
            if v.first_seen_ns != 0 && (t.first_seen_ns == 0 || v.first_seen_ns < t.first_seen_ns) {
                t.first_seen_ns = v.first_seen_ns;
            }
            t.last_seen_ns = t.last_seen_ns.max(v.last_seen_ns);
        }
        if t.last_seen_ns != 0 {
            out.push(t);
        }
    }
    Ok(out)
}

fn read_stats(map: &Map) -> Result<[u64; Stat::COUNT as usize], MapError> {
    let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
    let mut out = [0u64; Stat::COUNT as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = arr.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(out)
}
