//! One Cilium notification in, counter increments out.
//!
//! [`account`] is the whole in-kernel pipeline after the hook: the shared
//! classifier (`verdict_common::classify`, the same code the userspace
//! decoders run) decides whether the bytes are a policy verdict or a policy
//! drop in a layout some Cilium release has emitted, and this module adds
//! them to the endpoint totals and the flow table. Anything else ends as exactly one [`Stat`] outcome, never as
//! a flow. Every program (fentry, kprobe, replay) calls it the same way.
//!
//! Counters are per-CPU and updated without atomics: the tap runs in the
//! context of the tc program that emitted the notification, with bottom
//! halves disabled, so nothing else on this CPU touches the same slot.

use aya_ebpf::helpers::bpf_ktime_get_ns;
pub use verdict_common::classify::Notification;
use verdict_common::{
    cilium::{direction, notify_type},
    classify::{Accounted, classify},
    maps::{EndpointCounters, FlowCounters, MAX_ENDPOINTS, Stat},
};

use crate::maps::{ENDPOINT_COUNTERS, FLOWS, STATS};

/// `BPF_NOEXIST`: create the flow only if no other CPU just did.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

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
    // SAFETY: plain helper call, no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = &decision.key;

    let endpoint = key.endpoint_id as u32;
    if endpoint < MAX_ENDPOINTS {
        if let Some(totals) = ENDPOINT_COUNTERS.get_ptr_mut(endpoint) {
            // SAFETY: this CPU's slot, see the module comment.
            let totals: &mut EndpointCounters = unsafe { &mut *totals };
            let slot = if key.direction == direction::INGRESS { 0 } else { 1 };
            if key.notify_type == notify_type::DROP {
                totals.policy_drops[slot] += 1;
            } else {
                totals.verdicts[slot][(key.class & 3) as usize] += 1;
            }
            if totals.first_seen_ns == 0 {
                totals.first_seen_ns = now;
            }
            totals.last_seen_ns = now;
        }
    } else {
        count(Stat::EndpointOutOfRange);
    }

    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a live entry.
        add(unsafe { &mut *flow }, decision.bytes, now);
        return;
    }
    let fresh = FlowCounters { notifications: 1, bytes: decision.bytes, first_seen_ns: now, last_seen_ns: now };
    match FLOWS.insert(key, &fresh, BPF_NOEXIST) {
        Ok(()) => count(Stat::FlowsCreated),
        // Another CPU created it between our lookup and insert.
        Err(e) if e == -EEXIST => match FLOWS.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(flow) => add(unsafe { &mut *flow }, decision.bytes, now),
            None => count(Stat::FlowUpdateFailed),
        },
        Err(_) => count(Stat::FlowUpdateFailed),
    }
}

#[inline(always)]
fn add(flow: &mut FlowCounters, bytes: u64, now: u64) {
    flow.notifications += 1;
    flow.bytes += bytes;
    if flow.first_seen_ns == 0 {
        flow.first_seen_ns = now;
    }
    flow.last_seen_ns = now;
}
