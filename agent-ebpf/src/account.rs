//! One Cilium notification in, counter increments out.
//!
//! [`account`] is the whole in-kernel pipeline after the hook: the shared
//! classifier (`verdict_common::classify`, the same code the userspace
//! decoders run) decides whether the bytes are a policy verdict or a policy
//! drop in a layout some Cilium release has emitted, and this module adds
//! them to the endpoint totals and to the flow table or, for world probes of
//! the host on non-critical ports, the world-port table (layouts and the
//! no-eviction-of-unread-counts rule: `verdict_common::flow_table`).
//! Anything else ends as exactly one [`Stat`] outcome, never as a flow.
//! Every program (fentry, kprobe, replay) calls it the same way.
//!
//! Counters are per-CPU and updated without atomics: the tap runs in the
//! context of the tc program that emitted the notification, with bottom
//! halves disabled, so nothing else on this CPU touches the same slot.

use aya_ebpf::helpers::bpf_get_smp_processor_id;
pub use verdict_common::classify::Notification;
use verdict_common::{
    cilium::{direction, notify_type},
    classify::{Accounted, classify},
    flow_table::{
        FlowConfig, Stored, bucket_of, is_critical_port, is_world_identity, key_words, store, world_port_kind,
        world_port_proto_index,
    },
    maps::{EndpointCounters, MAX_ENDPOINTS, OVERFLOW_POLICY_DROP, Stat},
};

use crate::maps::{ENDPOINT_COUNTERS, FLOW_CONFIG, FLOW_TABLE, STATS, WORLD_PORTS};

/// Adds one to the outcome counter `stat`.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot of this CPU, see the module comment.
        unsafe { *slot += 1 };
    }
}

/// Accounts one notification of `len` bytes (the helper's `meta_size`);
/// `buf` holds its first `min(len, MAX_NOTIFICATION_SIZE)` bytes.
#[inline(always)]
pub fn account(buf: &Notification, len: usize) {
    let outcome = match classify(buf, len) {
        Ok(accounted) => {
            record(&accounted);
            Stat::Counted
        }
        Err(reject) => reject.stat(),
    };
    count(outcome);
}

#[inline(always)]
fn record(decision: &Accounted) {
    let key = &decision.key;
    let config = FLOW_CONFIG.get(0);
    let epoch = match config {
        Some(c) => c.epoch as u64,
        None => 0,
    };
    let drop = key.notify_type == notify_type::DROP;
    let slot = if key.direction == direction::INGRESS { 0 } else { 1 };
    let class = if drop { OVERFLOW_POLICY_DROP } else { (key.class & 3) as usize };

    let endpoint = key.endpoint_id as u32;
    let totals: Option<&mut EndpointCounters> = if endpoint < MAX_ENDPOINTS {
        // SAFETY: this CPU's slot, see the module comment.
        ENDPOINT_COUNTERS.get_ptr_mut(endpoint).map(|t| unsafe { &mut *t })
    } else {
        count(Stat::EndpointOutOfRange);
        None
    };
    let Some(totals) = totals else {
        // No endpoint total to keep exact: the flow alone carries it.
        if let Some(c) = config
            && let Err(stat) = store_flow(c, decision, epoch)
        {
            count(stat);
        }
        return;
    };
    if drop {
        totals.policy_drops[slot] += 1;
    } else {
        totals.verdicts[slot][class & 3] += 1;
    }
    totals.notifications += 1;
    if totals.first_seen_s == 0 {
        totals.first_seen_s = epoch;
    }
    totals.last_seen_s = epoch;

    let stored = match config {
        Some(c) => store_flow(c, decision, epoch),
        None => Err(Stat::FlowTableUnavailable),
    };
    if let Err(stat) = stored {
        totals.overflow[slot][class] += 1;
        count(stat);
    }
}

/// `*counter += value` as one BPF atomic add (`BPF_XADD`, every kernel the
/// agent supports); core's atomics offer no read-modify-write on this target.
///
/// # Safety
/// `counter` points to a live, 8-byte aligned u64 in a map value.
#[inline(always)]
unsafe fn atomic_add(counter: *mut u64, value: u64) {
    // SAFETY: the caller's promise; the instruction only adds.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({counter} + 0) += {value}",
            counter = in(reg) counter,
            value = in(reg) value,
            options(nostack, preserves_flags),
        )
    };
}

/// Counts the notification in the world-port table or the flow table.
#[inline(always)]
fn store_flow(config: &FlowConfig, decision: &Accounted, epoch: u64) -> Result<(), Stat> {
    let key = &decision.key;
    if key.direction == direction::INGRESS
        && key.endpoint_id as u32 == config.host_endpoint_id
        && is_world_identity(key.remote_identity)
        && key.notify_type != notify_type::DROP
        && let Some(proto) = world_port_proto_index(key.proto)
        && !is_critical_port(config, proto, key.dst_port)
        && let Some(kind) = world_port_kind(key.class, key.match_type)
    {
        let index = (proto as u32) << 16 | key.dst_port as u32;
        if let Some(port) = WORLD_PORTS.get_ptr_mut(index) {
            // SAFETY: a live array element; every CPU adds to it, so the
            // count is added atomically; the epochs are plain stores (the
            // latest writer wins, any of them is right to a second).
            unsafe {
                atomic_add(&raw mut (*port).counts[kind], 1);
                if key.match_type != 0 {
                    (*port).audited_match_type = key.match_type;
                }
                if (*port).first_epoch == 0 {
                    (*port).first_epoch = epoch as u32;
                }
                (*port).last_epoch = epoch as u32;
            }
            count(Stat::WorldPort);
            return Ok(());
        }
    }

    // SAFETY: plain helper call, no arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if cpu >= config.cpu_shards || config.buckets_per_cpu == 0 {
        return Err(Stat::FlowTableUnavailable);
    }
    let words = key_words(key);
    let index = cpu * config.buckets_per_cpu + bucket_of(words, config.buckets_per_cpu);
    let Some(bucket) = FLOW_TABLE.get_ptr_mut(index) else {
        return Err(Stat::FlowTableUnavailable);
    };
    // SAFETY: a bucket of this CPU's shard: only this CPU's programs write
    // its keys and counts (userspace writes only the acknowledgements).
    match unsafe { store(bucket, words, decision.bytes, epoch as u32) } {
        Stored::Existing => {}
        Stored::New => count(Stat::FlowsCreated),
        Stored::Reused => {
            count(Stat::FlowsCreated);
            count(Stat::FlowSlotsReused);
        }
        Stored::Full => return Err(Stat::FlowTableFull),
    }
    Ok(())
}
