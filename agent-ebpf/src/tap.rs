//! The tap's whole path after the hook: filter on Cilium's map, copy the
//! notification, account it.
//!
//! The filter reads the map's ID (a `bpf_probe_read_kernel`) only for a
//! `struct bpf_map *` it has not matched before: once an address has been
//! found to carry Cilium's ID it is remembered in `TAP_CONFIG` until
//! userspace rewrites the config (every second, and whenever Cilium's map
//! changes), so the steady state costs one pointer comparison and the
//! notification's copy.
//!
//! The copy is made one of two ways ([`ReadNotification`]):
//! * [`ProbeRead`], one `bpf_probe_read_kernel` (a helper call, 20-45 ns
//!   whatever the size): every kernel;
//! * [`DirectRead`], plain loads through `bpf_rdonly_cast(meta, 0)`, which
//!   the verifier types as read-only untrusted memory and the JIT turns into
//!   fault-tolerant loads (`BPF_PROBE_MEM`, a few ns for the 64 bytes). BTF
//!   types the hooked function's arguments as `u64`, so without the cast no
//!   load from `meta` passes the verifier; the cast to `void` needs a kernel
//!   whose BTF has `BPF_FEAT_RDONLY_CAST_TO_VOID` (Linux 6.17 and later).
//!   The call is emitted as a raw kfunc instruction whose BTF ID the loader
//!   patches in from the running kernel ([`RDONLY_CAST_MARKER`]); aya's
//!   object loader has no kfunc relocations.
//!
//! The shipped programs (`src/bin/verdict-tap.rs`: fentry, kprobe) are thin
//! shells that pass the hooked function's arguments here; the benchmark's
//! `bench_tap` (testkit) runs this very function, so the bench measures
//! every helper call the real tap makes.

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_probe_read_kernel as probe_read_raw};
use verdict_common::maps::{MAX_NOTIFICATION_SIZE, Stat};

use crate::{
    account::{Notification, account, count},
    maps::TAP_CONFIG,
};

/// Argument positions of `bpf_skb_event_output(skb, map, flags, meta, meta_size)`.
pub const ARG_MAP: usize = 1;
pub const ARG_META: usize = 3;
pub const ARG_META_SIZE: usize = 4;

/// Immediate of the kfunc call to `bpf_rdonly_cast` in the compiled object,
/// replaced by the loader with the function's BTF ID in the running kernel.
/// Mirrored in userspace as `verdict_common::maps::RDONLY_CAST_MARKER`.
const _: () = assert!(verdict_common::maps::RDONLY_CAST_MARKER == 0x7ea7_ca57);

/// How the notification is copied out of the emitter's stack.
pub trait ReadNotification {
    /// Copies up to `copy` bytes at `meta` into `buf`; false if the read failed.
    fn read(meta: u64, copy: u32, buf: &mut Notification) -> bool;
}

/// One `bpf_probe_read_kernel`: any kernel.
pub struct ProbeRead;

impl ReadNotification for ProbeRead {
    #[inline(always)]
    fn read(meta: u64, copy: u32, buf: &mut Notification) -> bool {
        if copy == 0 {
            return true;
        }
        // SAFETY: `copy` <= size of `buf`; the source is read fault-tolerantly.
        let rc = unsafe { probe_read_raw(buf.as_mut_ptr().cast(), copy, meta as *const core::ffi::c_void) };
        rc == 0
    }
}

/// Direct loads through `bpf_rdonly_cast(meta, 0)`: kernels with
/// `BPF_FEAT_RDONLY_CAST_TO_VOID`. All 64 bytes are loaded whatever
/// `meta_size` says (bytes past the notification are the emitter's stack,
/// which `classify` never reads: it checks each layout against the size).
/// A faulting load reads zeros, which `classify` rejects as another
/// notification type; `meta` is always the emitter's stack in practice.
pub struct DirectRead;

impl ReadNotification for DirectRead {
    #[inline(always)]
    fn read(meta: u64, _copy: u32, buf: &mut Notification) -> bool {
        let base = rdonly_cast_void(meta);
        let mut words = [0u64; MAX_NOTIFICATION_SIZE / 8];
        for (i, w) in words.iter_mut().enumerate() {
            // SAFETY: the verifier types `base` as read-only untrusted
            // memory; the JIT makes each load fault-tolerant.
            *w = unsafe { core::ptr::read_volatile((base + 8 * i as u64) as *const u64) };
        }
        for (i, w) in words.iter().enumerate() {
            buf[8 * i..8 * i + 8].copy_from_slice(&w.to_ne_bytes());
        }
        true
    }
}

/// `bpf_rdonly_cast(ptr, 0)`: a kfunc call (`BPF_CALL`, src_reg
/// `BPF_PSEUDO_KFUNC_CALL` = 2, imm = BTF ID) written as raw bytes, imm
/// [`verdict_common::maps::RDONLY_CAST_MARKER`] until the loader patches it.
/// The verifier inlines the call (`KF_FASTCALL`): it costs nothing.
#[inline(always)]
fn rdonly_cast_void(ptr: u64) -> u64 {
    let out: u64;
    // SAFETY: the kfunc only retypes its first argument; r1-r5 are
    // clobbered as by any call.
    unsafe {
        core::arch::asm!(
            ".quad 0x7ea7ca5700002085",
            inout("r1") ptr => _,
            inout("r2") 0u64 => _,
            lateout("r0") out,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack),
        );
    }
    out
}

/// One call of the hooked function: `map` is its `struct bpf_map *`, `meta`
/// and `meta_size` the notification on the emitter's stack.
#[inline(always)]
pub fn try_tap<R: ReadNotification>(map: u64, meta: u64, meta_size: u64) {
    let Some(config) = TAP_CONFIG.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the one element of an array map; userspace rewrites it whole,
    // this CPU only ever stores `events_map_ptr`.
    let config = unsafe { &mut *config };
    if config.events_map_id == 0 {
        count(Stat::OtherMap);
        return;
    }
    if map != config.events_map_ptr {
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
        config.events_map_ptr = map;
    }

    let mut buf: Notification = [0; MAX_NOTIFICATION_SIZE];
    let copy = if meta_size > MAX_NOTIFICATION_SIZE as u64 { MAX_NOTIFICATION_SIZE as u32 } else { meta_size as u32 };
    if !R::read(meta, copy, &mut buf) {
        count(Stat::ReadFailed);
        return;
    }
    account(&buf, meta_size as usize);
}
