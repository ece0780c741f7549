//! Reading the counters back: one pass over the maps, summing per-CPU
//! endpoint totals, taking each flow slot's counts since its last
//! acknowledgement (`flow_table`). Done on a timer, never per event, so the cost depends on the
//! number of endpoints and flows, not on the event rate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aya::maps::{Map, MapError, PerCpuArray};
use verdict_common::maps::{EndpointCounters, MAX_ENDPOINTS, Stat, VerdictClass};

use super::flow_table::{FlowRead, FlowTables, PendingAcks, WorldPortRead};

/// The wall time of an epoch the kernel stored (Unix seconds); 0 is "not
/// known" (no agent had written an epoch yet) and reads as `fallback`.
pub fn epoch_time(epoch_s: u64, fallback: SystemTime) -> SystemTime {
    if epoch_s == 0 { fallback } else { UNIX_EPOCH + Duration::from_secs(epoch_s) }
}

/// One endpoint's totals, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointTotals {
    pub id: u16,
    /// [ingress, egress][VerdictClass]
    pub verdicts: [[u64; 4]; 2],
    pub policy_drops: [u64; 2],
    /// Of the above, counted in no flow slot: [ingress, egress][class, 4 = policy drop].
    pub overflow: [[u64; VerdictClass::COUNT + 1]; 2],
    /// Epoch seconds (0: unknown).
    pub first_seen_s: u64,
    pub last_seen_s: u64,
    pub notifications: u64,
}

#[derive(Clone, Debug)]
pub struct MapSnapshot {
    pub taken_at: SystemTime,
    /// Endpoints with at least one notification.
    pub endpoints: Vec<EndpointTotals>,
    /// Every occupied flow slot with what it counted since the last
    /// acknowledged read; the agent hands them to the ledger and keeps none.
    pub flows: Vec<FlowRead>,
    /// Every world port with a count (absolute).
    pub world_ports: Vec<WorldPortRead>,
    /// The host endpoint the world-port table counts for.
    pub world_ports_endpoint: Option<u16>,
    /// Occupied slots in the flow table at this read.
    pub live_flows: usize,
    /// Slots skipped because the read raced their reuse.
    pub torn_slots: usize,
    /// Slots per CPU shard and shards.
    pub table_geometry: (u32, u32),
    /// Indexed by `Stat`.
    pub stats: [u64; Stat::COUNT as usize],
    pub read_duration: Duration,
}

/// The counting maps, borrowed from a loaded object.
pub struct CountingMaps<'a> {
    pub endpoints: &'a Map,
    pub tables: &'a FlowTables,
    pub stats: &'a Map,
}

impl MapSnapshot {
    /// Reads every counting map. The acknowledgements the read owes are
    /// returned apart: hand them to [`FlowTables::acknowledge`] once the
    /// read is accounted.
    pub fn read(maps: CountingMaps<'_>) -> Result<(MapSnapshot, PendingAcks), MapError> {
        let started = std::time::Instant::now();
        // The kernel adds to the endpoint total, then the flow, then the
        // outcome counter. Reading in the reverse order means that in one
        // snapshot endpoint totals >= flows >= `counted`: nothing read
        // later lags behind something read earlier.
        let stats = read_stats(maps.stats)?;
        let world_ports_endpoint = maps.tables.host_endpoint();
        let table = maps.tables.read_table();
        let world_ports = maps.tables.read_world_ports();
        let endpoints = read_endpoints(maps.endpoints)?;
        Ok((
            MapSnapshot {
                taken_at: SystemTime::now(),
                endpoints,
                live_flows: table.occupied,
                torn_slots: table.torn,
                flows: table.flows,
                world_ports,
                world_ports_endpoint,
                table_geometry: maps.tables.geometry(),
                stats,
                read_duration: started.elapsed(),
            },
            table.acks,
        ))
    }

    /// A read that saw nothing (tests build on it).
    pub fn empty() -> MapSnapshot {
        MapSnapshot {
            taken_at: SystemTime::now(),
            endpoints: Vec::new(),
            flows: Vec::new(),
            world_ports: Vec::new(),
            world_ports_endpoint: None,
            live_flows: 0,
            torn_slots: 0,
            table_geometry: (0, 0),
            stats: [0; Stat::COUNT as usize],
            read_duration: Duration::ZERO,
        }
    }

    pub fn stat(&self, s: Stat) -> u64 {
        self.stats[s as usize]
    }

    /// Overflow of every endpoint, summed.
    pub fn overflow_total(&self) -> u64 {
        self.endpoints.iter().flat_map(|e| e.overflow.iter().flatten()).sum()
    }
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
                for c in 0..=VerdictClass::COUNT {
                    t.overflow[d][c] += v.overflow[d][c];
                }
                t.policy_drops[d] += v.policy_drops[d];
            }
            if v.first_seen_s != 0 && (t.first_seen_s == 0 || v.first_seen_s < t.first_seen_s) {
                t.first_seen_s = v.first_seen_s;
            }
            t.last_seen_s = t.last_seen_s.max(v.last_seen_s);
            t.notifications += v.notifications;
        }
        if t.notifications != 0 {
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
