//! The flow table and the world-port table: layouts and the arithmetic both
//! sides run on them.
//!
//! Why not a kernel hash map: an LRU hash evicts whatever it likes,
//! including a flow whose counts nobody has read yet (a port scan between
//! two reads erased the evidence of a lockout that way), and a per-CPU hash
//! zero-fills the value on every *possible* CPU at each insert, so a new
//! flow cost grows with the machine, not with the work.
//!
//! The flow table is one `BPF_F_MMAPABLE` array of [`FlowBucket`]s split
//! into one shard per possible CPU: a CPU writes only its own shard (no
//! atomics, no contention), userspace reads every shard through a shared
//! mapping (no syscall per entry). A bucket holds [`BUCKET_WAYS`] slots; a
//! key lives in the bucket its hash names.
//!
//! **No eviction of unread counts.** Each slot has a counter word the kernel
//! writes and an acknowledgement word only userspace writes: the value of
//! the counter word userspace last read and accounted. The kernel reuses a
//! slot for another key only when the two are equal (everything counted has
//! been read); with no such slot in the bucket the verdict is still counted
//! in the endpoint totals and, per endpoint, direction and verdict class, as
//! overflow. The counter word holds a 48-bit count that keeps running
//! across the slot's keys, and in its top 16 bits a tag of the current key
//! ([`key_tag`]): userspace takes "count now minus count acknowledged" for
//! the key whose tag the word carries, and skips (does not acknowledge) a
//! slot whose key it read does not match the tag, a read that raced a
//! reuse. A count is therefore attributed once, to the right key, and the
//! kernel never overwrites what userspace has not read.
//!
//! Time is an epoch userspace writes into [`FlowConfig::epoch`] (Unix
//! seconds, refreshed every second): the kernel reads a number instead of
//! calling `bpf_ktime_get_ns` on every verdict.
//!
//! The world-port table keeps internet probes out of the flow table: audited,
//! allowed or denied TCP and UDP verdicts from a world identity to the host
//! endpoint on a port that no critical flow uses are counted per protocol
//! and port (all 65,535 of each), not per flow, so a full scan fills 131,072
//! fixed counters (7 MiB, shared by all CPUs) and displaces nothing.

use crate::maps::{FlowKey, VerdictClass};

/// Slots per bucket.
pub const BUCKET_WAYS: usize = 8;

/// Low bits of a counter word: the running count.
pub const COUNT_BITS: u32 = 48;
pub const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Per-slot counters, written by the CPU owning the shard only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounts {
    /// `key_tag(key) << 48 | running count`; 0 while the slot never held a key.
    pub tagged_notifications: u64,
    /// Running sum of `len_orig` over every key the slot held.
    pub bytes: u64,
    /// Epoch of the first notification of the current key.
    pub first_epoch: u32,
    /// Epoch of the latest notification of the current key.
    pub last_epoch: u32,
}

/// What userspace has read and accounted of a slot; written by userspace only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotAck {
    /// The `tagged_notifications` value last accounted.
    pub tagged_notifications: u64,
    /// The `bytes` value last accounted.
    pub bytes: u64,
}

/// One bucket: keys first, so a lookup touches two cache lines for its
/// comparisons; counters and acknowledgements after them. An all-zero key
/// is an empty slot (a real key has direction 1 or 2).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    pub keys: [[u64; 2]; BUCKET_WAYS],
    pub counts: [SlotCounts; BUCKET_WAYS],
    pub acks: [SlotAck; BUCKET_WAYS],
}

/// Written by userspace (mapped shared), read by the kernel on every verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowConfig {
    /// Unix seconds, refreshed by the agent every second; 0 before it runs.
    pub epoch: u32,
    /// The host endpoint's ID once the agent knows it (0: none, so no world
    /// verdict goes to the world-port table and every one gets a flow).
    pub host_endpoint_id: u32,
    /// Buckets in each CPU's shard; a power of two.
    pub buckets_per_cpu: u32,
    /// Shards in the table: highest possible CPU number plus one.
    pub cpu_shards: u32,
    /// Ports of the critical-flow catalogue, one bit per port, [TCP, UDP]:
    /// world verdicts to these keep their own flows.
    pub critical_ports: [[u64; PORT_WORDS]; WORLD_PORT_PROTOS],
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            epoch: 0,
            host_endpoint_id: 0,
            buckets_per_cpu: 0,
            cpu_shards: 0,
            critical_ports: [[0; PORT_WORDS]; WORLD_PORT_PROTOS],
        }
    }
}

/// 65,536 bits.
pub const PORT_WORDS: usize = 1024;
/// TCP and UDP.
pub const WORLD_PORT_PROTOS: usize = 2;
pub const WORLD_PORT_ENTRIES: u32 = (WORLD_PORT_PROTOS * 65536) as u32;

/// Counter slots of one world port, by [`world_port_kind`].
pub const WORLD_PORT_KINDS: usize = 5;

/// One protocol and port of world traffic to the host. Shared by all CPUs:
/// counts are added atomically (64-bit: the BPF instruction set has no
/// narrower atomic add before cpu v3).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorldPortCounters {
    pub counts: [u64; WORLD_PORT_KINDS],
    pub first_epoch: u32,
    pub last_epoch: u32,
    /// The match type of the latest audited verdict whose match type was
    /// not none (kind 4): which kind of rule it hit.
    pub audited_match_type: u8,
    pub _pad: [u8; 7],
}

/// Index into [`WorldPortCounters::counts`]: allowed 0, denied 1,
/// redirected 2, audited with match type none 3 (a missing allow), audited
/// with any other match type 4 (an audited hit of a deny rule, not a
/// missing allow; its match type in `audited_match_type`).
#[inline(always)]
pub const fn world_port_kind(class: u8, match_type: u8) -> Option<usize> {
    match class {
        c if c == VerdictClass::Allowed as u8 => Some(0),
        c if c == VerdictClass::Denied as u8 => Some(1),
        c if c == VerdictClass::Redirected as u8 => Some(2),
        c if c == VerdictClass::Audited as u8 && match_type == 0 => Some(3),
        c if c == VerdictClass::Audited as u8 => Some(4),
        _ => None,
    }
}

/// The verdict class of a [`world_port_kind`] index, and whether its match
/// type is none.
pub const fn world_port_kind_parts(kind: usize) -> (VerdictClass, bool) {
    match kind {
        0 => (VerdictClass::Allowed, true),
        1 => (VerdictClass::Denied, true),
        2 => (VerdictClass::Redirected, true),
        3 => (VerdictClass::Audited, true),
        _ => (VerdictClass::Audited, false),
    }
}

/// Table slot of TCP (6) or UDP (17) `port`, else `None`.
#[inline(always)]
pub const fn world_port_proto_index(proto: u8) -> Option<usize> {
    match proto {
        6 => Some(0),
        17 => Some(1),
        _ => None,
    }
}

/// The protocol number of a [`world_port_proto_index`].
pub const fn world_port_proto(index: usize) -> u8 {
    if index == 0 { 6 } else { 17 }
}

/// Reserved identities Cilium gives traffic from outside the cluster that
/// no CIDR policy names: world 2, world-ipv4 9, world-ipv6 10. A CIDR
/// identity is left out on purpose: a policy names that range.
#[inline(always)]
pub const fn is_world_identity(id: u32) -> bool {
    matches!(id, 2 | 9 | 10)
}

/// Whether `port` of protocol slot `proto_index` is marked critical.
#[inline(always)]
pub fn is_critical_port(config: &FlowConfig, proto_index: usize, port: u16) -> bool {
    let words = &config.critical_ports[proto_index & 1];
    words[(port as usize >> 6) & (PORT_WORDS - 1)] & (1u64 << (port & 63)) != 0
}

/// Marks `port` critical in `config`.
pub fn mark_critical_port(config: &mut FlowConfig, proto_index: usize, port: u16) {
    config.critical_ports[proto_index & 1][(port as usize >> 6) & (PORT_WORDS - 1)] |= 1u64 << (port & 63);
}

/// The key's two words, as the bucket stores them.
#[inline(always)]
pub fn key_words(key: &FlowKey) -> [u64; 2] {
    // SAFETY: FlowKey is 16 bytes of plain integers without padding
    // (asserted in `maps`); any 16 bytes are two valid u64s.
    unsafe { core::mem::transmute::<FlowKey, [u64; 2]>(*key) }
}

/// The key a bucket's words hold.
pub fn key_from_words(words: [u64; 2]) -> FlowKey {
    // SAFETY: as in `key_words`; every bit pattern is a valid FlowKey.
    unsafe { core::mem::transmute::<[u64; 2], FlowKey>(words) }
}

#[inline(always)]
fn mix(words: [u64; 2]) -> u64 {
    // A multiply carries only upwards: fold the high half down and multiply
    // again, so the tag (bits 16..32) depends on every key bit, as does the
    // bucket (bits 32..).
    let h = (words[0] ^ words[1].rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h ^ (h >> 32)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// Bucket of `words` within a shard of `buckets_per_cpu` (a power of two).
#[inline(always)]
pub fn bucket_of(words: [u64; 2], buckets_per_cpu: u32) -> u32 {
    ((mix(words) >> 32) as u32) & buckets_per_cpu.wrapping_sub(1)
}

/// The 16-bit tag of a key, stored above the count (independent of the
/// bucket bits).
#[inline(always)]
pub fn key_tag(words: [u64; 2]) -> u64 {
    (mix(words) >> 16) & 0xffff
}

/// The counter word of a slot taken over by a key with `tag`, continuing the
/// running count acknowledged as `acked`.
#[inline(always)]
pub fn reused_word(tag: u64, acked: u64) -> u64 {
    (tag << COUNT_BITS) | ((acked & COUNT_MASK) + 1)
}

/// Where [`store`] put a notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Added to the slot already holding the key.
    Existing,
    /// Took an empty slot.
    New,
    /// Took a slot whose previous key had every count acknowledged.
    Reused,
    /// Every slot holds unread counts: nothing stored (overflow).
    Full,
}

/// Counts one notification of the key `words` (`bytes` long, at `epoch`)
/// in `bucket`: the kernel's whole flow-table write, here so the host's
/// tests run the very code the tap runs.
///
/// # Safety
/// `bucket` is a bucket of the calling CPU's shard (no other writer of its
/// keys and counts); userspace may concurrently write its `acks` and read
/// everything.
#[inline(always)]
pub unsafe fn store(bucket: *mut FlowBucket, words: [u64; 2], bytes: u64, epoch: u32) -> Stored {
    // SAFETY (all below): in-bounds places of a live bucket, see above;
    // the acks are read with volatile loads since userspace writes them.
    unsafe {
        let mut free = BUCKET_WAYS;
        let mut free_epoch = u32::MAX;
        for i in 0..BUCKET_WAYS {
            if (*bucket).keys[i] == words {
                let c = &raw mut (*bucket).counts[i];
                (*c).tagged_notifications += 1;
                (*c).bytes += bytes;
                (*c).last_epoch = epoch;
                return Stored::Existing;
            }
            // Reusable: every count of the slot has been read. The oldest wins.
            let word = (*bucket).counts[i].tagged_notifications;
            let acked = core::ptr::read_volatile(&raw const (*bucket).acks[i].tagged_notifications);
            if word == acked && (*bucket).counts[i].last_epoch < free_epoch {
                free = i;
                free_epoch = (*bucket).counts[i].last_epoch;
            }
        }
        if free >= BUCKET_WAYS {
            return Stored::Full;
        }
        let acked = core::ptr::read_volatile(&raw const (*bucket).acks[free].tagged_notifications);
        let reused = (*bucket).keys[free] != [0, 0];
        // The key before the counter word: a reader that sees the new count
        // (it reads the word first) finds the key it belongs to, or a key
        // whose tag does not match, which it skips.
        core::ptr::write_volatile(&raw mut (*bucket).keys[free], words);
        core::ptr::write_volatile(
            &raw mut (*bucket).counts[free].tagged_notifications,
            reused_word(key_tag(words), acked),
        );
        let c = &raw mut (*bucket).counts[free];
        (*c).bytes += bytes;
        (*c).first_epoch = epoch;
        (*c).last_epoch = epoch;
        if reused { Stored::Reused } else { Stored::New }
    }
}

/// What userspace reads from one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRead {
    /// Never used.
    Empty,
    /// Holds `key`; `notifications` and `bytes` were counted since the last
    /// acknowledgement (both may be 0).
    Key { key: FlowKey, notifications: u64, bytes: u64 },
    /// The key read does not carry the counter word's tag: the read raced
    /// the slot's reuse. Not acknowledged; the next read settles it.
    Torn,
}

/// Interprets one slot from its counter word, key, bytes and ack, read in
/// that order (counter word first: a count newer than the ack can only
/// belong to the key written before it).
pub fn read_slot(word: u64, key_words_read: [u64; 2], bytes: u64, ack: &SlotAck) -> SlotRead {
    if word == 0 && key_words_read == [0, 0] {
        return SlotRead::Empty;
    }
    if word >> COUNT_BITS != key_tag(key_words_read) {
        return SlotRead::Torn;
    }
    let key = key_from_words(key_words_read);
    SlotRead::Key {
        key,
        notifications: (word & COUNT_MASK).wrapping_sub(ack.tagged_notifications & COUNT_MASK) & COUNT_MASK,
        bytes: bytes.wrapping_sub(ack.bytes),
    }
}

/// The table's geometry for `slots_per_cpu` requested slots and
/// `cpu_shards` shards: (buckets per shard, a power of two; array entries).
pub const fn geometry(slots_per_cpu: u32, cpu_shards: u32) -> (u32, u32) {
    let wanted = slots_per_cpu.div_ceil(BUCKET_WAYS as u32);
    let buckets = if wanted <= 1 { 1 } else { wanted.next_power_of_two() };
    (buckets, buckets * cpu_shards)
}

const _: () = assert!(core::mem::size_of::<SlotCounts>() == 24);
const _: () = assert!(core::mem::size_of::<SlotAck>() == 16);
const _: () = assert!(core::mem::size_of::<FlowBucket>() == 448);
const _: () = assert!(core::mem::size_of::<WorldPortCounters>() == 56);
const _: () = assert!(core::mem::size_of::<FlowConfig>() == 16 + 16384);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and arrays, no padding, any bit
    // pattern is valid.
    unsafe impl aya::Pod for super::FlowBucket {}
    unsafe impl aya::Pod for super::FlowConfig {}
    unsafe impl aya::Pod for super::WorldPortCounters {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{
        boxed::Box,
        collections::HashMap,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };

    use super::*;

    fn key(i: u32) -> [u64; 2] {
        key_words(&FlowKey { endpoint_id: 1, remote_identity: i, direction: 1, dst_port: 80, ..Default::default() })
    }

    struct Shared(*mut FlowBucket);
    unsafe impl Send for Shared {}
    unsafe impl Sync for Shared {}

    /// Reads every slot like the agent, acknowledging what it took.
    fn read_and_ack(bucket: *mut FlowBucket, into: &mut HashMap<[u64; 2], u64>) -> usize {
        let mut torn = 0;
        for way in 0..BUCKET_WAYS {
            // SAFETY: a live bucket; the reader's side of the protocol.
            unsafe {
                let word = core::ptr::read_volatile(&raw const (*bucket).counts[way].tagged_notifications);
                core::sync::atomic::fence(Ordering::Acquire);
                let k = core::ptr::read_volatile(&raw const (*bucket).keys[way]);
                let bytes = core::ptr::read_volatile(&raw const (*bucket).counts[way].bytes);
                let ack = core::ptr::read_volatile(&raw const (*bucket).acks[way]);
                match read_slot(word, k, bytes, &ack) {
                    SlotRead::Empty => {}
                    SlotRead::Torn => torn += 1,
                    SlotRead::Key { notifications, .. } => {
                        *into.entry(k).or_default() += notifications;
                        core::ptr::write_volatile(&raw mut (*bucket).acks[way].bytes, bytes);
                        core::sync::atomic::fence(Ordering::Release);
                        core::ptr::write_volatile(&raw mut (*bucket).acks[way].tagged_notifications, word);
                    }
                }
            }
        }
        torn
    }

    #[test]
    fn a_slot_reads_empty_torn_or_its_delta() {
        let ack = SlotAck::default();
        assert_eq!(read_slot(0, [0, 0], 0, &ack), SlotRead::Empty);
        let k = key(7);
        let word = reused_word(key_tag(k), 0);
        assert_eq!(read_slot(word, k, 60, &ack), SlotRead::Key { key: key_from_words(k), notifications: 1, bytes: 60 });
        // The counter word of a new key with the old key still read: skipped.
        assert_eq!(read_slot(word, key(8), 60, &ack), SlotRead::Torn);
        // After a reuse the count continues from the ack.
        let acked = SlotAck { tagged_notifications: word + 4, bytes: 300 };
        let reused = reused_word(key_tag(key(9)), acked.tagged_notifications);
        assert_eq!(
            read_slot(reused, key(9), 360, &acked),
            SlotRead::Key { key: key_from_words(key(9)), notifications: 1, bytes: 60 }
        );
    }

    #[test]
    fn tags_and_buckets_depend_on_every_field() {
        let base =
            FlowKey { endpoint_id: 1, remote_identity: 7, direction: 1, dst_port: 80, proto: 6, ..Default::default() };
        let variants = [
            FlowKey { endpoint_id: 2, ..base },
            FlowKey { remote_identity: 8, ..base },
            FlowKey { dst_port: 81, ..base },
            FlowKey { proto: 17, ..base },
            FlowKey { class: 2, ..base },
        ];
        for v in variants {
            assert_ne!(key_tag(key_words(&v)), key_tag(key_words(&base)), "{v:?}");
        }
        let buckets: std::collections::HashSet<u32> = (0..4096).map(|i| bucket_of(key(i), 512)).collect();
        assert!(buckets.len() > 480, "remote identities spread over {} of 512 buckets", buckets.len());
    }

    #[test]
    fn a_full_bucket_keeps_every_unread_count() {
        let mut b = FlowBucket::default();
        for i in 0..BUCKET_WAYS as u32 {
            assert_eq!(unsafe { store(&mut b, key(i), 60, 1) }, Stored::New);
        }
        assert_eq!(unsafe { store(&mut b, key(100), 60, 1) }, Stored::Full, "no unread slot is taken");
        let mut seen = HashMap::new();
        read_and_ack(&mut b, &mut seen);
        assert_eq!(unsafe { store(&mut b, key(100), 60, 2) }, Stored::Reused, "an acknowledged slot is");
        assert_eq!(seen.values().sum::<u64>(), BUCKET_WAYS as u64);
    }

    /// The protocol under a concurrent reader: one writer (the kernel's CPU)
    /// storing many keys into one bucket, one reader acknowledging; every
    /// stored notification is read exactly once, per key.
    #[test]
    fn no_count_is_lost_or_misattributed_with_a_concurrent_reader() {
        let bucket = Box::into_raw(Box::<FlowBucket>::default());
        let shared = Arc::new(Shared(bucket));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (shared, done) = (shared.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen = HashMap::new();
                let mut torn = 0;
                loop {
                    let finished = done.load(Ordering::Acquire);
                    torn += read_and_ack(shared.0, &mut seen);
                    if finished {
                        return (seen, torn);
                    }
                }
            })
        };
        let mut stored: HashMap<[u64; 2], u64> = HashMap::new();
        let (mut full, mut reused) = (0u64, 0u64);
        for n in 0..2_000_000u32 {
            let k = key(n % 64);
            match unsafe { store(shared.0, k, 1, n / 1000) } {
                Stored::Full => full += 1,
                s => {
                    reused += (s == Stored::Reused) as u64;
                    *stored.entry(k).or_default() += 1;
                }
            }
        }
        done.store(true, Ordering::Release);
        let (mut seen, _torn) = reader.join().unwrap();
        // The final pass after the writer stopped leaves nothing unread.
        read_and_ack(shared.0, &mut seen);
        seen.retain(|_, n| *n > 0);
        assert_eq!(seen, stored, "per-key counts read != stored ({full} overflowed, {reused} slot reuses)");
        assert!(reused > 0, "the test must exercise slot reuse");
        drop(unsafe { Box::from_raw(bucket) });
    }
}
