//! Test-support object (never shipped): the tap's accounting core fed from
//! packet data instead of a hook.
//!
//! `replay` accounts one notification per BPF_PROG_TEST_RUN into the same
//! counting maps the tap writes (declared once in `verdict_agent_ebpf::maps`
//! and, in use, reopened from the agent's pins), exactly as the tap would
//! account it. `bench_empty` and `bench_replay_and_emit` are the
//! benchmark's baseline and its Hubble-style reader's feed; their maps live
//! here, so the shipped tap object has none of them.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_CPU, TC_ACT_OK},
    helpers::bpf_ktime_get_ns,
    helpers::generated::bpf_perf_event_output,
    macros::{classifier, map},
    maps::{Array, LruPerCpuHashMap, PerCpuArray, PerfEventArray},
    programs::TcContext,
};
use verdict_agent_ebpf::{
    account::{Notification, account},
    tap::{DirectRead, ProbeRead, try_tap},
};
use verdict_common::{
    cilium::capture_hdr::LEN_CAP,
    classify::classify,
    maps::{BENCH_TRACE_PAYLOAD_LEN, BenchInput, FlowKey, MAX_NOTIFICATION_SIZE},
};
use verdict_testkit_ebpf::packet::copy_packet;

/// Benchmark only: the perf ring the benchmark's baseline reader (a
/// stand-in for `cilium monitor` / Hubble reading `cilium_events`) consumes.
/// Never pinned; each load of the object gets its own.
#[map(name = "BENCH_EVENTS")]
static BENCH_EVENTS: PerfEventArray<u32> = PerfEventArray::new(0);

/// Benchmark only: index 0 notifications offered (program runs), 1 perf
/// outputs written into `BENCH_EVENTS`, 2 perf outputs refused (ring full,
/// or no reader on this CPU). Counted in the kernel, independently of both
/// the agent and the reader.
#[map(name = "BENCH_EMITTED")]
static BENCH_EMITTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

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

/// Cilium's default `--trace-payloadlen`: at most this many packet bytes
/// follow a notification in its perf record (`len_cap`).
const TRACE_PAYLOAD_LEN: usize = BENCH_TRACE_PAYLOAD_LEN;

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
                (&BENCH_EVENTS as *const PerfEventArray<u32>).cast_mut().cast(),
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

/// Benchmark only: the input of the programs below
/// ([`verdict_common::maps::BenchInput`]), written by userspace before each
/// test run, so that none of them spends anything building it (Cilium
/// builds its notification on its own stack before the notify; that is
/// neither the notify's cost nor the tap's). Its `fake_map` keeps one
/// address across runs, as Cilium's map does.
#[map(name = "BENCH_INPUT")]
static BENCH_INPUT: Array<BenchInput> = Array::with_max_entries(1, 0);

/// Benchmark only: the accounting core alone, on the notification in place.
#[classifier]
pub fn bench_account(_ctx: TcContext) -> i32 {
    if let Some(input) = BENCH_INPUT.get(0) {
        account(&input.notification, input.len as usize);
    }
    TC_ACT_OK
}

/// Benchmark only: the tap's whole path, every helper call included: the
/// `TAP_CONFIG` lookup, the map filter (a `bpf_probe_read_kernel` of the
/// map's ID the first time it sees the address), the
/// `bpf_probe_read_kernel` of the notification, then `account`: the
/// shipped `try_tap` itself, with the shipped `tap_fentry`'s reader.
#[classifier]
pub fn bench_tap(_ctx: TcContext) -> i32 {
    if let Some(input) = BENCH_INPUT.get(0) {
        let meta = input.notification.as_ptr() as u64;
        try_tap::<ProbeRead>(input.fake_map.as_ptr() as u64, meta, input.len as u64);
    }
    TC_ACT_OK
}

/// Benchmark only: `bench_tap` with `tap_fentry_direct`'s reader (direct
/// loads through `bpf_rdonly_cast`; kernels with
/// `BPF_FEAT_RDONLY_CAST_TO_VOID`).
#[classifier]
pub fn bench_tap_direct(_ctx: TcContext) -> i32 {
    if let Some(input) = BENCH_INPUT.get(0) {
        let meta = input.notification.as_ptr() as u64;
        try_tap::<DirectRead>(input.fake_map.as_ptr() as u64, meta, input.len as u64);
    }
    TC_ACT_OK
}

/// Benchmark only: Cilium's own cost of one notification, a
/// `bpf_perf_event_output` (BPF_F_CURRENT_CPU) of the notification and
/// `len_cap` packet bytes (at most 128, Cilium's default
/// `--trace-payloadlen`) into `BENCH_EVENTS`, whose rings the benchmark
/// opens and never reads.
#[classifier]
pub fn bench_notify(ctx: TcContext) -> i32 {
    if let Some(input) = BENCH_INPUT.get(0) {
        let n = &input.notification;
        let cap = u16::from_ne_bytes([n[LEN_CAP], n[LEN_CAP + 1]]) as usize;
        let len = input.len as usize;
        let size = if len > MAX_NOTIFICATION_SIZE { MAX_NOTIFICATION_SIZE } else { len }
            + if cap > BENCH_TRACE_PAYLOAD_LEN { BENCH_TRACE_PAYLOAD_LEN } else { cap };
        // SAFETY: `size` <= size of the record, a map value of this object;
        // BENCH_EVENTS is a perf event array of this object.
        unsafe {
            bpf_perf_event_output(
                ctx.as_ptr(),
                (&BENCH_EVENTS as *const PerfEventArray<u32>).cast_mut().cast(),
                BPF_F_CURRENT_CPU,
                (input as *const BenchInput).cast_mut().cast(),
                size as u64,
            )
        };
    }
    TC_ACT_OK
}

/// Benchmark only: one `bpf_probe_read_kernel` of the notification into
/// this stack, as the probe-read tap copies it, so the table can say what
/// the helper costs on this kernel.
#[classifier]
pub fn bench_probe_read(_ctx: TcContext) -> i32 {
    if let Some(input) = BENCH_INPUT.get(0) {
        let mut buf: Notification = [0; MAX_NOTIFICATION_SIZE];
        let len = input.len as usize;
        let len = if len > MAX_NOTIFICATION_SIZE { MAX_NOTIFICATION_SIZE } else { len } as u32;
        // SAFETY: `len` <= size of both buffers; a fault-tolerant read.
        unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_kernel(
                buf.as_mut_ptr().cast(),
                len,
                input.notification.as_ptr().cast(),
            );
        }
        core::hint::black_box(&buf);
    }
    TC_ACT_OK
}

/// Benchmark only: the previous design's flow table, an LRU per-CPU hash of
/// the same keys with 32-byte values (notifications, bytes, first and last
/// `bpf_ktime_get_ns`), at the default 16,384 entries. Its inserts
/// zero-fill the value on every possible CPU; measured beside the flow
/// table in the same run, so the two designs are compared as a ratio.
#[map(name = "BENCH_LRU_FLOWS")]
static BENCH_LRU_FLOWS: LruPerCpuHashMap<FlowKey, [u64; 4]> = LruPerCpuHashMap::with_max_entries(16384, 0);

/// Benchmark only: the previous design's accounting of one flow (lookup,
/// else insert with BPF_NOEXIST), after the same classifier.
#[classifier]
pub fn bench_lru_flow(ctx: TcContext) -> i32 {
    let mut buf: Notification = [0; MAX_NOTIFICATION_SIZE];
    copy_packet(&ctx, &mut buf);
    if let Ok(decision) = classify(&buf, ctx.len() as usize) {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_ns() };
        match BENCH_LRU_FLOWS.get_ptr_mut(&decision.key) {
            // SAFETY: this CPU's value of a live entry.
            Some(v) => unsafe {
                (*v)[0] += 1;
                (*v)[1] += decision.bytes;
                (*v)[3] = now;
            },
            None => {
                let _ = BENCH_LRU_FLOWS.insert(&decision.key, &[1, decision.bytes, now, now], 1);
            }
        }
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
