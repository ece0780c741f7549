//! The tap's whole path after the hook: filter on Cilium's map, copy the
//! notification, account it.
//!
//! The filter reads the map's ID (a `bpf_probe_read_kernel`) only for a
//! `struct bpf_map *` it has not matched before: once an address has been
//! found to carry Cilium's ID it is remembered in `TAP_CONFIG` until
//! userspace rewrites the config (every second, and whenever Cilium's map
//! changes), so the steady state costs one pointer comparison and one probe
//! read (the notification's copy).
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

/// One call of the hooked function: `map` is its `struct bpf_map *`, `meta`
/// and `meta_size` the notification on the emitter's stack.
#[inline(always)]
pub fn try_tap(map: u64, meta: u64, meta_size: u64) {
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
