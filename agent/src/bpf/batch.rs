//! Reading a per-CPU hash map in batches: `BPF_MAP_LOOKUP_BATCH` (Linux
//! 5.6) returns thousands of entries per syscall, where walking the map
//! costs two syscalls per entry (next key, then lookup). At 100 k flows
//! that walk is about 0.3 s of the agent's CPU per read. aya 0.14 has no
//! batch operations, so this is the one raw `bpf(2)` call of the agent.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

use aya::{Pod, maps::MapData};

/// `BPF_MAP_LOOKUP_BATCH` from `include/uapi/linux/bpf.h`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's `ENOTSUPP` (524): no batch support for this map type.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr`, in the kernel's field order.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    /// Where to resume (null for the first call): an opaque bucket token.
    in_batch: u64,
    /// Where the kernel writes the token to resume from.
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: room in `keys`/`values`. Out: entries written.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Whether the running kernel could answer in batches.
#[derive(Debug, PartialEq, Eq)]
pub enum Batched {
    Done,
    /// Batch lookups are refused for this map (kernel before 5.6): walk it.
    Unsupported,
}

/// Calls `entry(key, per_cpu_values)` for every entry of the per-CPU hash
/// map `map`, `possible_cpus` values each. Entries added or evicted while
/// the batches run may or may not be seen, as with any walk of a live map.
pub fn for_each_per_cpu<K: Pod + Default, V: Pod + Default>(
    map: &MapData,
    possible_cpus: usize,
    mut entry: impl FnMut(K, &[V]),
) -> io::Result<Batched> {
    // The kernel lays per-CPU values out 8-byte aligned; V must already be.
    assert_eq!(size_of::<V>() % 8, 0, "per-CPU value sizes must be multiples of 8");
    // A hash bucket that holds more entries than `chunk` is answered with
    // ENOSPC: grow and retry from the same token.
    let mut chunk: usize = 4096;
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk * possible_cpus];
    let mut token: Option<u32> = None;
    loop {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: token.as_ref().map_or(0, |t| t as *const u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` for its size; the key,
        // value and token buffers it points to outlive the call and have room
        // for `count` entries of `possible_cpus` values each.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let got = attr.count as usize;
        let last = match (rc < 0).then(io::Error::last_os_error) {
            None => false,
            Some(error) => match error.raw_os_error() {
                Some(libc::ENOSPC) if got == 0 && chunk < (1 << 20) => {
                    chunk *= 4;
                    keys.resize(chunk, K::default());
                    values.resize(chunk * possible_cpus, V::default());
                    continue;
                }
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if token.is_none() && got == 0 => {
                    return Ok(Batched::Unsupported);
                }
                // ENOENT: these are the last entries.
                Some(libc::ENOENT) => true,
                _ => return Err(error),
            },
        };
        for (k, v) in keys.iter().zip(values.chunks_exact(possible_cpus)).take(got) {
            entry(*k, v);
        }
        if last {
            return Ok(Batched::Done);
        }
        token = Some(next);
    }
}
