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
    (words[0] ^ words[1].rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
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
