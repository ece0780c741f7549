//! The agent's side of the flow table and the world-port table
//! (`verdict_common::flow_table` has the layouts and the protocol): maps
//! them, writes the config the kernel reads, reads every slot, and
//! acknowledges what it has accounted.
//!
//! Acknowledging is a separate step ([`FlowTables::acknowledge`]) taken
//! only after the ledger has taken the read and written it to its pin:
//! until then the kernel keeps every slot the read saw. If the agent dies
//! between the two, the next agent reads the same counts again (counted
//! twice, never lost).

use std::{
    sync::atomic::{Ordering, fence},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::Ebpf;
use verdict_common::{
    flow_table::{
        BUCKET_WAYS, FlowBucket, FlowConfig, SlotAck, SlotRead, WORLD_PORT_ENTRIES, WORLD_PORT_KINDS,
        WorldPortCounters, geometry, mark_critical_port, read_slot, world_port_proto, world_port_proto_index,
    },
    maps::{FLOW_CONFIG, FLOW_TABLE, FlowKey, WORLD_PORTS},
};

use super::shared_array::{SharedArray, SharedArrayError, load, store};

/// One occupied slot at a read: its key and what it counted since the last
/// acknowledgement. A flow counted on several CPUs has a slot on each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRead {
    pub key: FlowKey,
    pub notifications: u64,
    pub bytes: u64,
    /// Epoch seconds of the slot's first and latest notification of this key.
    pub first_seen_s: u32,
    pub last_seen_s: u32,
}

/// One nonzero port of the world-port table (absolute counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorldPortRead {
    pub proto: u8,
    pub port: u16,
    pub counts: [u64; WORLD_PORT_KINDS],
    pub audited_match_type: u8,
    pub first_seen_s: u32,
    pub last_seen_s: u32,
}

/// Acknowledgements owed for one read.
#[derive(Debug, Default)]
pub struct PendingAcks {
    acks: Vec<(u32, usize, SlotAck)>,
}

impl PendingAcks {
    pub fn len(&self) -> usize {
        self.acks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.acks.is_empty()
    }
}

/// What one pass over the flow table saw.
#[derive(Debug, Default)]
pub struct TableRead {
    pub flows: Vec<FlowRead>,
    /// Slots holding a key.
    pub occupied: usize,
    /// Slots whose key did not match their tag (a read racing a reuse).
    pub torn: usize,
    pub acks: PendingAcks,
}

pub struct FlowTables {
    table: SharedArray<FlowBucket>,
    config: SharedArray<FlowConfig>,
    world: SharedArray<WorldPortCounters>,
    buckets_per_cpu: u32,
    cpu_shards: u32,
}

/// Highest possible CPU number plus one: the shards the table needs (the
/// kernel's `bpf_get_smp_processor_id` is below it).
pub fn cpu_shards() -> Result<u32, std::io::Error> {
    let text = std::fs::read_to_string(POSSIBLE_CPUS)?;
    parse_highest_cpu(&text)
        .map(|m| m + 1)
        .ok_or_else(|| std::io::Error::other(format!("cannot read {POSSIBLE_CPUS}: {:?}", text.trim())))
}

pub const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// The highest CPU of a kernel CPU list ("0-3,8-11").
fn parse_highest_cpu(list: &str) -> Option<u32> {
    list.trim().split(',').filter_map(|r| r.rsplit('-').next()?.trim().parse::<u32>().ok()).max()
}

/// Array entries of the flow table for `slots_per_cpu` on this machine.
pub fn table_entries(slots_per_cpu: u32) -> Result<u32, std::io::Error> {
    Ok(geometry(slots_per_cpu, cpu_shards()?).1)
}

impl FlowTables {
    /// Maps the three arrays of a loaded object (the tap's, or the
    /// testkit's replay object sharing its pins) and writes the geometry
    /// and the current epoch into the config.
    pub fn open(ebpf: &Ebpf) -> Result<FlowTables, SharedArrayError> {
        let map = |name| ebpf.map(name).ok_or(SharedArrayError::NotAnArray { map: name });
        let table = SharedArray::<FlowBucket>::map(map(FLOW_TABLE)?, FLOW_TABLE)?;
        let config = SharedArray::<FlowConfig>::map(map(FLOW_CONFIG)?, FLOW_CONFIG)?;
        let world = SharedArray::<WorldPortCounters>::map(map(WORLD_PORTS)?, WORLD_PORTS)?;
        if world.entries() != WORLD_PORT_ENTRIES {
            return Err(SharedArrayError::ValueSize {
                map: WORLD_PORTS,
                found: world.entries(),
                expected: WORLD_PORT_ENTRIES as usize,
            });
        }
        let shards = cpu_shards().unwrap_or(1).max(1);
        let buckets_per_cpu = table.entries() / shards;
        let tables = FlowTables { table, config, world, buckets_per_cpu, cpu_shards: shards };
        let c = tables.config_ptr();
        // SAFETY: integer fields of the mapped config entry.
        unsafe {
            store(&raw mut (*c).buckets_per_cpu, buckets_per_cpu);
            store(&raw mut (*c).cpu_shards, if buckets_per_cpu.is_power_of_two() { shards } else { 0 });
        }
        tables.tick();
        Ok(tables)
    }

    fn config_ptr(&self) -> *mut FlowConfig {
        self.config.entry(0).expect("FLOW_CONFIG has one entry")
    }

    /// Slots per CPU shard and shards.
    pub fn geometry(&self) -> (u32, u32) {
        (self.buckets_per_cpu * BUCKET_WAYS as u32, self.cpu_shards)
    }

    /// Writes the current epoch; the agent calls it every second.
    pub fn tick(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
        // SAFETY: an integer field of the mapped config entry.
        unsafe { store(&raw mut (*self.config_ptr()).epoch, now) };
    }

    /// The host endpoint, once known: world verdicts to it on non-critical
    /// ports go to the world-port table from now on.
    pub fn set_host_endpoint(&self, id: Option<u16>) {
        // SAFETY: as in `tick`.
        unsafe { store(&raw mut (*self.config_ptr()).host_endpoint_id, id.map_or(0, u32::from)) };
    }

    pub fn host_endpoint(&self) -> Option<u16> {
        // SAFETY: as in `tick`.
        let id = unsafe { load(&raw const (*self.config_ptr()).host_endpoint_id) };
        (id != 0).then_some(id as u16)
    }

    /// Marks the ports of the critical-flow catalogue (protocol, port):
    /// world verdicts to them keep flows of their own.
    pub fn set_critical_ports(&self, ports: impl IntoIterator<Item = (u8, u16)>) {
        let mut bits = FlowConfig::default();
        for (proto, port) in ports {
            if let Some(index) = world_port_proto_index(proto) {
                mark_critical_port(&mut bits, index, port);
            }
        }
        let c = self.config_ptr();
        for (p, words) in bits.critical_ports.iter().enumerate() {
            for (w, &word) in words.iter().enumerate() {
                // SAFETY: in-bounds u64 of the mapped config entry.
                unsafe { store(&raw mut (*c).critical_ports[p][w], word) };
            }
        }
    }

    /// Reads every slot of every shard.
    pub fn read_table(&self) -> TableRead {
        let mut out = TableRead::default();
        for index in 0..self.table.entries() {
            let Some(bucket) = self.table.entry(index) else { break };
            for way in 0..BUCKET_WAYS {
                // SAFETY: aligned integer fields of a mapped bucket; the
                // counter word first, then (after an acquire fence) the
                // key and bytes: see `read_slot`.
                let (word, key, bytes, first, last, ack) = unsafe {
                    let word = load(&raw const (*bucket).counts[way].tagged_notifications);
                    fence(Ordering::Acquire);
                    let key = [load(&raw const (*bucket).keys[way][0]), load(&raw const (*bucket).keys[way][1])];
                    let bytes = load(&raw const (*bucket).counts[way].bytes);
                    let first = load(&raw const (*bucket).counts[way].first_epoch);
                    let last = load(&raw const (*bucket).counts[way].last_epoch);
                    let ack = SlotAck {
                        tagged_notifications: load(&raw const (*bucket).acks[way].tagged_notifications),
                        bytes: load(&raw const (*bucket).acks[way].bytes),
                    };
                    (word, key, bytes, first, last, ack)
                };
                match read_slot(word, key, bytes, &ack) {
                    SlotRead::Empty => {}
                    SlotRead::Torn => out.torn += 1,
                    SlotRead::Key { key, notifications, bytes: b } => {
                        out.occupied += 1;
                        if notifications > 0 || b > 0 {
                            out.acks.acks.push((index, way, SlotAck { tagged_notifications: word, bytes }));
                        }
                        out.flows.push(FlowRead {
                            key,
                            notifications,
                            bytes: b,
                            first_seen_s: first,
                            last_seen_s: last,
                        });
                    }
                }
            }
        }
        out
    }

    /// Every world port with a count.
    pub fn read_world_ports(&self) -> Vec<WorldPortRead> {
        let mut out = Vec::new();
        for index in 0..self.world.entries() {
            let Some(p) = self.world.entry(index) else { break };
            // SAFETY: aligned integer fields of a mapped entry.
            let last = unsafe { load(&raw const (*p).last_epoch) };
            let mut counts = [0u64; WORLD_PORT_KINDS];
            let mut any = last != 0;
            for (k, c) in counts.iter_mut().enumerate() {
                // SAFETY: as above.
                *c = unsafe { load(&raw const (*p).counts[k]) };
                any |= *c != 0;
            }
            if !any {
                continue;
            }
            out.push(WorldPortRead {
                proto: world_port_proto((index >> 16) as usize),
                port: (index & 0xffff) as u16,
                counts,
                // SAFETY: as above.
                audited_match_type: unsafe { load(&raw const (*p).audited_match_type) },
                // SAFETY: as above.
                first_seen_s: unsafe { load(&raw const (*p).first_epoch) },
                last_seen_s: last,
            });
        }
        out
    }

    /// Tells the kernel the read's counts are accounted: their slots may be
    /// reused. Only after the ledger has taken (and stored) the read.
    pub fn acknowledge(&self, acks: PendingAcks) {
        for (index, way, ack) in acks.acks {
            let Some(bucket) = self.table.entry(index) else { continue };
            // SAFETY: aligned integer fields of a mapped bucket; bytes
            // first, the counter word (what the kernel compares) last.
            unsafe {
                store(&raw mut (*bucket).acks[way].bytes, ack.bytes);
                fence(Ordering::Release);
                store(&raw mut (*bucket).acks[way].tagged_notifications, ack.tagged_notifications);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_lists() {
        assert_eq!(super::parse_highest_cpu("0-3,8-11\n"), Some(11));
        assert_eq!(super::parse_highest_cpu("0\n"), Some(0));
        assert_eq!(super::parse_highest_cpu(""), None);
    }
}
