//! The tap: thin programs over `account::account`.
//!
//! Cilium's datapath reports policy verdicts with `bpf_perf_event_output`
//! into its `cilium_events` map; for tc programs the kernel implements that
//! helper as `bpf_skb_event_output(skb, map, flags, meta, meta_size)`. The
//! tap hooks that function, keeps only calls whose `map` is Cilium's (by
//! kernel map ID), copies `meta` (the notification struct on the emitter's
//! stack) and accounts it. fentry is preferred; kprobe is the fallback for
//! kernels without BPF trampolines. This object is what ships: it has no
//! program that can write counters from anything but a hooked Cilium
//! notification (the replay and benchmark entries are the testkit's,
//! `testkit/ebpf`).
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_probe_read_kernel as probe_read_raw},
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use verdict_agent_ebpf::{
    account::{Notification, account, count},
    maps::TAP_CONFIG,
};
use verdict_common::maps::{MAX_NOTIFICATION_SIZE, Stat};

/// Argument positions of `bpf_skb_event_output`.
const ARG_MAP: usize = 1;
const ARG_META: usize = 3;
const ARG_META_SIZE: usize = 4;

#[fentry(function = "bpf_skb_event_output")]
pub fn tap_fentry(ctx: FEntryContext) -> u32 {
    tap(ctx.arg(ARG_MAP), ctx.arg(ARG_META), ctx.arg(ARG_META_SIZE));
    0
}

#[kprobe]
pub fn tap_kprobe(ctx: ProbeContext) -> u32 {
    match (ctx.arg(ARG_MAP), ctx.arg(ARG_META), ctx.arg(ARG_META_SIZE)) {
        (Some(map), Some(meta), Some(size)) => tap(map, meta, size),
        _ => count(Stat::ReadFailed),
    }
    0
}

/// Filters on the map, copies the notification, accounts it.
#[inline(always)]
fn tap(map: u64, meta: u64, meta_size: u64) {
    let Some(config) = TAP_CONFIG.get(0) else {
        return;
    };
    if config.events_map_id == 0 {
        count(Stat::OtherMap);
        return;
    }
    let id_ptr = (map + config.map_id_offset as u64) as *const u32;
    // SAFETY: a kernel pointer read through the fault-tolerant helper.
    let Ok(map_id) = (unsafe { bpf_probe_read_kernel(id_ptr) }) else {
        count(Stat::ReadFailed);
        return;
    };
    if map_id != config.events_map_id {
        count(Stat::OtherMap);
        return;
    }

    let mut buf: Notification = [0; MAX_NOTIFICATION_SIZE];
    let copy = if meta_size > MAX_NOTIFICATION_SIZE as u64 { MAX_NOTIFICATION_SIZE as u32 } else { meta_size as u32 };
    if copy > 0 {
        // SAFETY: `copy` <= size of `buf`; the source is read fault-tolerantly.
        let rc = unsafe { probe_read_raw(buf.as_mut_ptr().cast(), copy, meta as *const core::ffi::c_void) };
        if rc != 0 {
            count(Stat::ReadFailed);
            return;
        }
    }
    account(&buf, meta_size as usize);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
