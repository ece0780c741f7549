//! The agent's BPF maps: names, keys and values.
//!
//! The kernel side writes them, the userspace side reads them; neither side
//! declares a layout of its own. Maps whose contents must survive an agent
//! restart are pinned under [`PIN_DIR`]/[`LAYOUT_VERSION`]: bump the version
//! whenever a key or value below changes, so a new agent never reads an old
//! layout.

/// bpffs directory for the agent's pinned maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/verdict-agent";
/// Layout generation of the pinned maps; part of the pin path.
pub const LAYOUT_VERSION: &str = "v2";

/// Cilium allocates endpoint IDs from 1 to 4095
/// (`pkg/endpointmanager/idallocator`), so an array this long never evicts.
pub const MAX_ENDPOINTS: u32 = 4096;
/// Default flow slots per CPU shard of the flow table (configurable at
/// load, rounded up to whole buckets of a power-of-two count): 4,096 slots
/// of 56 bytes, 224 KiB per possible CPU.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 4096;
/// Largest notification the tap copies out of the datapath's stack.
pub const MAX_NOTIFICATION_SIZE: usize = 64;

/// Benchmark only: the map ID `bench_tap` presents as its `map` argument
/// (through the same `bpf_probe_read_kernel` as the tap); the benchmark
/// writes it into [`TapConfig::events_map_id`] so the tap's filter passes.
pub const BENCH_FAKE_MAP_ID: u32 = 0x7ffe_0001;

/// Benchmark only: packet bytes after the notification in a perf record,
/// Cilium's default `--trace-payloadlen`.
pub const BENCH_TRACE_PAYLOAD_LEN: usize = 128;

/// Benchmark only: the input the testkit's bench programs read from their
/// `BENCH_INPUT` map, written by the benchmark before each test run. The
/// first 64 + 128 bytes are the perf record Cilium would emit (the
/// notification, then `len_cap` packet bytes); `fake_map` stands in for
/// `struct bpf_map`, with [`BENCH_FAKE_MAP_ID`] at offset 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BenchInput {
    pub notification: [u8; MAX_NOTIFICATION_SIZE],
    pub packet: [u8; BENCH_TRACE_PAYLOAD_LEN],
    /// The notification's length (`meta_size`).
    pub len: u32,
    pub fake_map: [u32; 2],
}

/// Immediate of the tap's raw kfunc call to `bpf_rdonly_cast` in the
/// compiled object (`agent-ebpf/src/tap.rs`, `DirectRead`); the loader
/// replaces it with the function's BTF ID in the running kernel.
pub const RDONLY_CAST_MARKER: u32 = 0x7ea7_ca57;

/// `Array<TapConfig>` with one entry, written by userspace.
pub const TAP_CONFIG: &str = "TAP_CONFIG";
/// `PerCpuArray<EndpointCounters>`, indexed by endpoint ID. Pinned.
pub const ENDPOINT_COUNTERS: &str = "ENDPOINT_COUNTERS";
/// `Array<FlowBucket>` (`BPF_F_MMAPABLE`), one shard per possible CPU: the
/// flow table (`crate::flow_table`). Pinned.
pub const FLOW_TABLE: &str = "FLOW_TABLE";
/// `Array<FlowConfig>` (`BPF_F_MMAPABLE`) with one entry, written by the
/// agent: epoch, host endpoint, shard geometry, critical ports. Pinned, so
/// the testkit's replay object sees what the agent wrote.
pub const FLOW_CONFIG: &str = "FLOW_CONFIG";
/// `Array<WorldPortCounters>` (`BPF_F_MMAPABLE`), 2 x 65,536 entries. Pinned.
pub const WORLD_PORTS: &str = "WORLD_PORTS";
/// `PerCpuArray<u64>`, indexed by [`Stat`]. Pinned.
pub const STATS: &str = "STATS";

/// What userspace tells the tap. Written whole; read once per call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapConfig {
    /// Kernel ID of Cilium's `cilium_events` map; 0 while it does not exist,
    /// in which case every write is filtered.
    pub events_map_id: u32,
    /// Byte offset of `id` in `struct bpf_map`, read from the kernel's BTF.
    pub map_id_offset: u32,
    /// Written by the tap: the address of the `struct bpf_map` whose ID it
    /// last found to be `events_map_id`, so later calls compare a pointer
    /// instead of reading the ID again. Userspace writes 0 with every
    /// config (at least once a second): a map freed and another allocated
    /// at its address is never taken for Cilium's for longer than that.
    pub events_map_ptr: u64,
}

/// Verdict class, the one word an operator reads: what happened to traffic.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VerdictClass {
    /// verdict 0, not audited.
    Allowed = 0,
    /// verdict < 0 (a drop reason) or a policy drop notification.
    Denied = 1,
    /// `audited` set: the endpoint is in PolicyAuditMode and enforcement
    /// would have dropped it. Cilium checks this before the verdict's sign.
    Audited = 2,
    /// verdict > 0: redirected to the L7 proxy on that port.
    Redirected = 3,
}

impl VerdictClass {
    pub const COUNT: usize = 4;
    pub const ALL: [VerdictClass; 4] =
        [VerdictClass::Allowed, VerdictClass::Denied, VerdictClass::Audited, VerdictClass::Redirected];

    pub const fn from_u8(v: u8) -> Option<VerdictClass> {
        match v {
            0 => Some(VerdictClass::Allowed),
            1 => Some(VerdictClass::Denied),
            2 => Some(VerdictClass::Audited),
            3 => Some(VerdictClass::Redirected),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            VerdictClass::Allowed => "allowed",
            VerdictClass::Denied => "denied",
            VerdictClass::Audited => "audited",
            VerdictClass::Redirected => "redirected",
        }
    }
}

/// Direction slot in [`EndpointCounters`]: 0 ingress, 1 egress.
pub const DIRECTIONS: usize = 2;

/// One flow of policy decisions, as seen from one endpoint.
///
/// 16 bytes, no implicit padding: the kernel hashes the raw bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Cilium endpoint ID that emitted the notification (`source`).
    pub endpoint_id: u16,
    /// Destination port (host order); 0 for drops and port-less protocols.
    pub dst_port: u16,
    /// Security identity of the other side.
    pub remote_identity: u32,
    /// IP protocol number; 0 for drop notifications (not in `drop_notify`).
    pub proto: u8,
    /// [`crate::cilium::direction`]: 1 ingress, 2 egress.
    pub direction: u8,
    /// [`VerdictClass`] as u8.
    pub class: u8,
    /// Policy match type (0 none .. 6 Proto-Only); 0 for drops.
    pub match_type: u8,
    /// Notification type it came from: 5 policy verdict, 1 drop.
    pub notify_type: u8,
    /// Drop reason (positive) for denials, 0 otherwise.
    pub reason: u8,
    /// Bit 0: IPv6.
    pub flags: u8,
    pub _pad: u8,
}

pub const FLOW_FLAG_IPV6: u8 = 0x01;
/// Userspace only: the key stands for one port of the world-port table
/// (every world identity, both IP families), not for one flow.
pub const FLOW_FLAG_WORLD_PORT: u8 = 0x02;

/// Overflow slot in [`EndpointCounters::overflow`] of policy drops (the
/// verdict classes take 0..4).
pub const OVERFLOW_POLICY_DROP: usize = VerdictClass::COUNT;

/// Per-CPU totals of one endpoint. This array never evicts, so it is the
/// source of truth for every per-endpoint total.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// Policy verdict notifications by [direction slot][`VerdictClass`].
    pub verdicts: [[u64; VerdictClass::COUNT]; DIRECTIONS],
    /// Drop notifications with a policy reason, by direction slot.
    pub policy_drops: [u64; DIRECTIONS],
    /// Of the above, those no flow slot could take (the bucket was full of
    /// counts userspace had not read yet), by [direction slot][class, or
    /// [`OVERFLOW_POLICY_DROP`]]: in the totals, in no flow.
    pub overflow: [[u64; VerdictClass::COUNT + 1]; DIRECTIONS],
    /// Epoch (Unix seconds, `FlowConfig::epoch`) of the earliest notification
    /// on this CPU (0 = none, or before the agent wrote an epoch).
    pub first_seen_s: u64,
    /// Epoch of the latest notification on this CPU.
    pub last_seen_s: u64,
    /// Notifications on this CPU; nonzero once the endpoint was seen (the
    /// epochs can be 0 when no agent wrote one).
    pub notifications: u64,
}

/// Index into [`STATS`]. Every call of the hooked function ends in exactly
/// one of `OtherMap`, `Counted`, `Filtered`, `Malformed*` or `ReadFailed`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A perf output to some other map: not Cilium's.
    OtherMap = 0,
    /// Written to `cilium_events` and accounted (verdict or policy drop).
    Counted = 1,
    /// Written to `cilium_events` but not about policy (trace, debug,
    /// capture, non-policy drop).
    Filtered = 2,
    /// Shorter than its type's smallest layout.
    MalformedTruncated = 3,
    /// A version or size no Cilium release has used.
    MalformedVersion = 4,
    /// A field outside the values Cilium emits (direction not 1 or 2).
    MalformedField = 5,
    /// `bpf_probe_read_kernel` of the notification or the map failed.
    ReadFailed = 6,
    /// A flow slot taken by a key (empty, or every count of its previous
    /// key read by userspace).
    FlowsCreated = 7,
    /// No slot in the flow's bucket was free of unread counts: counted in
    /// the endpoint totals and as overflow only.
    FlowTableFull = 8,
    /// Endpoint ID >= [`MAX_ENDPOINTS`]: flow counted, no endpoint total.
    EndpointOutOfRange = 9,
    /// Of `FlowsCreated`, slots that held another key before.
    FlowSlotsReused = 10,
    /// World verdicts to the host on a non-critical port, counted in the
    /// world-port table instead of a flow.
    WorldPort = 11,
    /// `FLOW_CONFIG` not written yet or a CPU beyond the table's shards:
    /// counted in the endpoint totals and as overflow only.
    FlowTableUnavailable = 12,
}

impl Stat {
    pub const COUNT: u32 = 13;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and arrays, no padding, any bit
    // pattern is valid.
    unsafe impl aya::Pod for super::TapConfig {}
    unsafe impl aya::Pod for super::BenchInput {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::EndpointCounters {}
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<BenchInput>() == 204);
const _: () = assert!(core::mem::size_of::<EndpointCounters>() == 8 * (8 + 2 + 10 + 3));

/// `HashMap<FlowKey, LedgerRecord>`, created and written by userspace only:
/// the flow ledger's state, pinned so a restarted agent continues every
/// flow counter where the previous one left it.
pub const FLOW_LEDGER: &str = "FLOW_LEDGER";

/// `FlowKey::_pad` value marking a ledger record that holds the folded
/// totals of evicted flows for one aggregate label set (remote and port 0).
pub const LEDGER_AGGREGATE_MARK: u8 = 0xff;

/// `FlowKey::_pad` value marking a ledger record that holds the verdicts of
/// one endpoint, direction and class that no flow read carries (lost
/// evidence, `agent/src/unattributed.rs`): `base_notifications` is the
/// count, `last_seen_unix_ns` when it last grew.
pub const LEDGER_UNATTRIBUTED_MARK: u8 = 0xfe;

/// `FlowKey::_pad` value marking a ledger record that holds one of the
/// readiness engine's `_total` counters (`agent/src/readiness_totals.rs`).
pub const LEDGER_READINESS_MARK: u8 = 0xfd;

/// One flow's ledger state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerRecord {
    /// Every notification of the flow the agent has accounted.
    pub base_notifications: u64,
    pub base_bytes: u64,
    /// [`LEDGER_FLAG_SERVICE_LIKE`], ...
    pub flags: u64,
    pub _reserved: [u64; 2],
    /// Wall-clock first and last notification, Unix nanoseconds.
    pub first_seen_unix_ns: u64,
    pub last_seen_unix_ns: u64,
    /// 1 if the kernel table held the flow at the latest read.
    pub live: u64,
}

/// A world port that grew outside a scan burst at least once: real use.
pub const LEDGER_FLAG_SERVICE_LIKE: u64 = 1;

#[cfg(feature = "user")]
// SAFETY: plain #[repr(C)] u64s, no padding.
unsafe impl aya::Pod for LedgerRecord {}

const _: () = assert!(core::mem::size_of::<LedgerRecord>() == 64);
