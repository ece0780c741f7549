//! The tap: thin programs over `tap::try_tap`.
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
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use verdict_agent_ebpf::{
    account::count,
    tap::{ARG_MAP, ARG_META, ARG_META_SIZE, DirectRead, ProbeRead, try_tap},
};
use verdict_common::maps::Stat;

#[fentry(function = "bpf_skb_event_output")]
pub fn tap_fentry(ctx: FEntryContext) -> u32 {
    try_tap::<ProbeRead>(ctx.arg(ARG_MAP), ctx.arg(ARG_META), ctx.arg(ARG_META_SIZE));
    0
}

/// The fentry tap on kernels that can cast `meta` for direct loads (Linux
/// 6.17+): the loader prefers it there and falls back to `tap_fentry`.
#[fentry(function = "bpf_skb_event_output")]
pub fn tap_fentry_direct(ctx: FEntryContext) -> u32 {
    try_tap::<DirectRead>(ctx.arg(ARG_MAP), ctx.arg(ARG_META), ctx.arg(ARG_META_SIZE));
    0
}

#[kprobe]
pub fn tap_kprobe(ctx: ProbeContext) -> u32 {
    match (ctx.arg(ARG_MAP), ctx.arg(ARG_META), ctx.arg(ARG_META_SIZE)) {
        (Some(map), Some(meta), Some(size)) => try_tap::<ProbeRead>(map, meta, size),
        _ => count(Stat::ReadFailed),
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
