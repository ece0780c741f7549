//! Test and demo tool: writes notifications into a perf event array named
//! `cilium_events`, through the same helper Cilium's datapath uses
//! (`bpf_perf_event_output` from a tc program, which the kernel runs as
//! `bpf_skb_event_output`). Driven with BPF_PROG_TEST_RUN: the packet data
//! is the notification, byte for byte, and its length is `meta_size`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_CPU, TC_ACT_OK},
    helpers::generated::bpf_perf_event_output,
    macros::{classifier, map},
    maps::{PerCpuArray, PerfEventArray},
    programs::TcContext,
};

use verdict_common::maps::MAX_NOTIFICATION_SIZE;
use verdict_testkit_ebpf::packet::copy_packet;

/// Same name, type, key and value as Cilium's map; pinned by userspace at
/// the path the agent watches.
#[map(name = "cilium_events")]
static CILIUM_EVENTS: PerfEventArray<u32> = PerfEventArray::new(0);

/// Any other perf event array: the tap must ignore writes to it.
#[map(name = "other_events")]
static OTHER_EVENTS: PerfEventArray<u32> = PerfEventArray::new(0);

/// Index 0: outputs attempted into `cilium_events`; 1: of those, delivered
/// to a reader; 2: outputs attempted into `other_events`.
#[map(name = "EMITTED")]
static EMITTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = EMITTED.get_ptr_mut(index) {
        // SAFETY: this CPU's slot.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn emit(ctx: &TcContext, map: *const core::ffi::c_void) -> i64 {
    let mut buf = [0u8; MAX_NOTIFICATION_SIZE];
    let n = copy_packet(ctx, &mut buf);
    // Only whole notifications: a length off the copy ladder is refused.
    if n == 0 || n != ctx.len() as usize {
        return -1;
    }
    // SAFETY: `n` <= size of `buf`; `map` is a perf event array of this object.
    unsafe { bpf_perf_event_output(ctx.as_ptr(), map as *mut _, BPF_F_CURRENT_CPU, buf.as_mut_ptr().cast(), n as u64) }
}

#[classifier]
pub fn emit_cilium_events(ctx: TcContext) -> i32 {
    bump(0);
    if emit(&ctx, (&CILIUM_EVENTS as *const PerfEventArray<u32>).cast()) == 0 {
        bump(1);
    }
    TC_ACT_OK
}

#[classifier]
pub fn emit_other_events(ctx: TcContext) -> i32 {
    bump(2);
    emit(&ctx, (&OTHER_EVENTS as *const PerfEventArray<u32>).cast());
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
