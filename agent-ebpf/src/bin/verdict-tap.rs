//! The tap: thin programs over `account::account`.
//!
//! Cilium's datapath reports policy verdicts with `bpf_perf_event_output`
//! into its `cilium_events` map; for tc programs the kernel implements that
//! helper as `bpf_skb_event_output(skb, map, flags, meta, meta_size)`. The
//! tap hooks that function, keeps only calls whose `map` is Cilium's (by
//! kernel map ID), copies `meta` (the notification struct on the emitter's
//! stack) and accounts it. fentry is preferred; kprobe is the fallback for
//! kernels without BPF trampolines. `replay` feeds the same core from packet
//! data, for tests and the benchmark.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_CPU, TC_ACT_OK},
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_perf_event_output, bpf_probe_read_kernel as probe_read_raw},
    },
    macros::{classifier, fentry, kprobe},
    programs::{FEntryContext, ProbeContext, TcContext},
};
use verdict_agent_ebpf::{
    account::{Notification, account, count},
    maps::{BENCH_EMITTED, BENCH_EVENTS, TAP_CONFIG},
    packet::copy_packet,
};
use verdict_common::{
    cilium::capture_hdr::LEN_CAP,
    maps::{BENCH_FAKE_MAP_ID, MAX_NOTIFICATION_SIZE, Stat},
};

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

/// Replay entry: the packet data is one notification, accounted exactly as
/// the tap would account it. Run with BPF_PROG_TEST_RUN.
#[classifier]
pub fn replay(ctx: TcContext) -> i32 {
    let mut buf: Notification = [0; MAX_NOTIFICATION_SIZE];
    copy_packet(&ctx, &mut buf);
    // The packet's length is the notification's length (`meta_size`), even
    // beyond the bytes copied, exactly as the tap sees it.
    account(&buf, ctx.len() as usize);
    TC_ACT_OK
}

/// Does nothing: the benchmark's baseline for the cost of a test run.
#[classifier]
pub fn bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Benchmark only: the tap's whole path after the hook, every helper call
/// included: the `TAP_CONFIG` lookup, the `bpf_probe_read_kernel` of the
/// map's ID (here from a stand-in `struct bpf_map` on this stack, whose ID
/// is at offset 0: the benchmark sets `map_id_offset` 0 and
/// `events_map_id` [`BENCH_FAKE_MAP_ID`]) and the `bpf_probe_read_kernel`
/// of the notification (from a kernel stack buffer holding the packet, as
/// Cilium's is on its program's stack), then `account`.
#[classifier]
pub fn bench_tap(ctx: TcContext) -> i32 {
    let fake_map: [u32; 2] = [BENCH_FAKE_MAP_ID, 0];
    let mut meta: Notification = [0; MAX_NOTIFICATION_SIZE];
    copy_packet(&ctx, &mut meta);
    let meta_size = ctx.len() as u64;
    // Keep the stand-ins in memory: the tap reads them through the helper.
    let map = core::hint::black_box(fake_map.as_ptr()) as u64;
    let meta_ptr = core::hint::black_box(meta.as_ptr()) as u64;
    tap(map, meta_ptr, meta_size);
    TC_ACT_OK
}

/// Benchmark only: Cilium's own cost of one notification, a
/// `bpf_perf_event_output` (BPF_F_CURRENT_CPU) of the notification and
/// `len_cap` packet bytes (at most 128, Cilium's default
/// `--trace-payloadlen`) into `BENCH_EVENTS`, whose rings the benchmark
/// opens and never reads.
#[classifier]
pub fn bench_notify(ctx: TcContext) -> i32 {
    let mut record = BenchRecord { notification: [0; MAX_NOTIFICATION_SIZE], packet: [0; TRACE_PAYLOAD_LEN] };
    let n = copy_packet(&ctx, &mut record.notification);
    if n > 0 {
        let cap = u16::from_ne_bytes([record.notification[LEN_CAP], record.notification[LEN_CAP + 1]]) as usize;
        let size = n + cap.min(TRACE_PAYLOAD_LEN);
        // SAFETY: `size` <= size of `record`; BENCH_EVENTS is a perf event array of this object.
        unsafe {
            bpf_perf_event_output(
                ctx.as_ptr(),
                (&BENCH_EVENTS as *const aya_ebpf::maps::PerfEventArray<u32>).cast_mut().cast(),
                BPF_F_CURRENT_CPU,
                (&mut record as *mut BenchRecord).cast(),
                size as u64,
            )
        };
    }
    TC_ACT_OK
}

/// Cilium's default `--trace-payloadlen`: at most this many packet bytes
/// follow a notification in its perf record (`len_cap`).
const TRACE_PAYLOAD_LEN: usize = 128;

/// A perf record the size Cilium's would be: the notification, then
/// `len_cap` bytes of (here zeroed) packet.
#[repr(C)]
struct BenchRecord {
    notification: Notification,
    packet: [u8; TRACE_PAYLOAD_LEN],
}

/// Benchmark only: one notification from packet data, accounted exactly as
/// `replay` does AND offered to a userspace perf reader (`BENCH_EVENTS`),
/// so one test run is one verdict both counted in the kernel and delivered
/// to (or lost by) a Hubble-style consumer. The record carries `len_cap`
/// packet bytes after the notification, as Cilium's do, so the ring holds
/// as many records as `cilium_events` would. `BENCH_EMITTED` counts the
/// offers and their outcome independently of both.
#[classifier]
pub fn bench_replay_and_emit(ctx: TcContext) -> i32 {
    let mut record = BenchRecord { notification: [0; MAX_NOTIFICATION_SIZE], packet: [0; TRACE_PAYLOAD_LEN] };
    let n = copy_packet(&ctx, &mut record.notification);
    account(&record.notification, ctx.len() as usize);
    bench_bump(0);
    if n > 0 {
        let cap = u16::from_ne_bytes([record.notification[LEN_CAP], record.notification[LEN_CAP + 1]]) as usize;
        let size = n + cap.min(TRACE_PAYLOAD_LEN);
        // SAFETY: `size` <= size of `record`; BENCH_EVENTS is a perf event array of this object.
        let rc = unsafe {
            bpf_perf_event_output(
                ctx.as_ptr(),
                (&BENCH_EVENTS as *const aya_ebpf::maps::PerfEventArray<u32>).cast_mut().cast(),
                BPF_F_CURRENT_CPU,
                (&mut record as *mut BenchRecord).cast(),
                size as u64,
            )
        };
        bench_bump(if rc == 0 { 1 } else { 2 });
    } else {
        bench_bump(2);
    }
    TC_ACT_OK
}

#[inline(always)]
fn bench_bump(index: u32) {
    if let Some(slot) = BENCH_EMITTED.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; tc programs do not nest on one CPU.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
