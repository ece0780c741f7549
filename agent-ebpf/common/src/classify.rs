//! The one classifier: a notification's bytes in, the flow key it is
//! counted under (or the one outcome it is counted as) out.
//!
//! Compiled twice from this one source: into the BPF object, where
//! `account()` calls [`classify`] on the bytes the tap copied, and into the
//! agent, where the decoders of `agent/src/cilium/monitor/` call the same
//! layout, direction and class decisions and `expected_accounting` calls
//! [`classify`] itself. The kernel-agreement test replays byte strings
//! through the real program and compares, so the two builds cannot drift.
//!
//! Every function takes the fixed-size copy the tap makes
//! ([`Notification`], zero-filled past what was copied) and the
//! notification's real length (`meta_size`), and reads it only at constant
//! offsets from [`crate::cilium`]: the BPF verifier sees constant,
//! in-bounds stack reads, and no input can make the host build panic.

use crate::{
    cilium::{capture_hdr, direction, drop_notify, drop_reason, notify_type, policy_verdict as pv},
    maps::{FLOW_FLAG_IPV6, FlowKey, MAX_NOTIFICATION_SIZE, Stat, VerdictClass},
};

/// The bytes of one notification as the tap copies them: the first
/// `min(meta_size, MAX_NOTIFICATION_SIZE)` bytes, zeros after.
pub type Notification = [u8; MAX_NOTIFICATION_SIZE];

/// Reserved identity `host` (`pkg/identity/numericidentity.go`).
pub const HOST_IDENTITY: u32 = 1;
/// `reserved:world`: the identity the world-port table's records carry (they
/// stand for every world identity, see `flow_table::is_world_identity`).
pub const WORLD_IDENTITY: u32 = 2;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

// Every field the classifier reads lies inside the copy.
const _: () = assert!(drop_notify::SIZE_V1_19 <= MAX_NOTIFICATION_SIZE);

/// Why a notification is not counted as a flow: each is one [`Stat`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Not a policy verdict, nor a drop with a policy reason.
    Filtered,
    /// Shorter than its type's smallest layout.
    Truncated,
    /// A size/version pair no Cilium release has emitted.
    UnknownVersion,
    /// A field outside the values Cilium emits (direction not 1 or 2).
    BadField,
}

impl Reject {
    /// The `STATS` slot counted for this outcome.
    #[inline(always)]
    pub const fn stat(self) -> Stat {
        match self {
            Reject::Filtered => Stat::Filtered,
            Reject::Truncated => Stat::MalformedTruncated,
            Reject::UnknownVersion => Stat::MalformedVersion,
            Reject::BadField => Stat::MalformedField,
        }
    }
}

/// What one counted notification adds: one to the flow `key`, `bytes` to
/// its byte count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accounted {
    pub key: FlowKey,
    /// `len_orig` of the notified packet.
    pub bytes: u64,
}

/// Which `struct policy_verdict_notify` layout was sent. P1 (v1.12–v1.13)
/// and P2 (v1.14–v1.18) have the same size and version and cannot be told
/// apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyVerdictLayout {
    /// 32 bytes, u16 version 1: v1.12–v1.18.
    P1OrP2,
    /// 40 bytes or more, u8 version 1 plus `ext_version`: v1.19+.
    P3,
}

/// Which `struct drop_notify` layout was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropLayout {
    /// 32 bytes, u16 version 1: v1.12.x.
    D1,
    /// 36 bytes, u16 version 1: v1.13.0–v1.17.3 (`ifindex`).
    D2,
    /// 40 bytes, u16 version 2: v1.17.4–v1.18.x (`flags`).
    D3,
    /// 48 bytes or more, u8 version 3: v1.19+ (`ip_trace_id`).
    D4,
}

impl DropLayout {
    /// Whether the layout has the `flags` byte (and so says IPv6).
    #[inline(always)]
    pub const fn has_flags(self) -> bool {
        matches!(self, DropLayout::D3 | DropLayout::D4)
    }
}

/// Host-order u16 at a constant offset.
#[inline(always)]
pub fn u16_at<const N: usize>(buf: &[u8; N], off: usize) -> u16 {
    u16::from_ne_bytes([buf[off], buf[off + 1]])
}

/// Host-order u32 at a constant offset.
#[inline(always)]
pub fn u32_at<const N: usize>(buf: &[u8; N], off: usize) -> u32 {
    u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
}

/// Host-order u64 at a constant offset.
#[inline(always)]
pub fn u64_at<const N: usize>(buf: &[u8; N], off: usize) -> u64 {
    (u32_at(buf, off) as u64) | ((u32_at(buf, off + 4) as u64) << 32)
}

/// Bytes 14–15 as the u16 `version` of v1.12–v1.18.
#[inline(always)]
pub fn version_u16(buf: &Notification) -> u16 {
    u16_at(buf, capture_hdr::VERSION)
}

/// Size and version of a policy verdict: which layout, or why none.
#[inline(always)]
pub fn policy_verdict_layout(buf: &Notification, len: usize) -> Result<PolicyVerdictLayout, Reject> {
    if len < pv::SIZE_V1 {
        Err(Reject::Truncated)
    } else if len == pv::SIZE_V1 && version_u16(buf) == pv::VERSION as u16 {
        Ok(PolicyVerdictLayout::P1OrP2)
    } else if len >= pv::SIZE_V2 && buf[capture_hdr::VERSION] == pv::VERSION {
        Ok(PolicyVerdictLayout::P3)
    } else {
        // A wrong version, or 33..=39 bytes: no release sends that.
        Err(Reject::UnknownVersion)
    }
}

/// Size and version of a drop notification: which layout, or why none.
#[inline(always)]
pub fn drop_layout(buf: &Notification, len: usize) -> Result<DropLayout, Reject> {
    let version16 = version_u16(buf);
    if len < drop_notify::SIZE_V1_12 {
        Err(Reject::Truncated)
    } else if len == drop_notify::SIZE_V1_12 && version16 == 1 {
        Ok(DropLayout::D1)
    } else if len == drop_notify::SIZE_V1_13 && version16 == 1 {
        Ok(DropLayout::D2)
    } else if len == drop_notify::SIZE_V1_17 && version16 == 2 {
        Ok(DropLayout::D3)
    } else if len >= drop_notify::SIZE_V1_19 && buf[capture_hdr::VERSION] == 3 {
        Ok(DropLayout::D4)
    } else {
        Err(Reject::UnknownVersion)
    }
}

/// The `dir:2` bits of a policy verdict's flags: ingress or egress, or a
/// value Cilium never emits.
#[inline(always)]
pub fn verdict_direction(flags: u8) -> Result<u8, Reject> {
    let dir = flags & pv::FLAG_DIR_MASK;
    if dir == direction::INGRESS || dir == direction::EGRESS { Ok(dir) } else { Err(Reject::BadField) }
}

/// The class a policy verdict is counted as. `audited` wins over the sign,
/// as in Cilium's `GetPolicyActionString` (`pkg/monitor/datapath_policy.go`).
#[inline(always)]
pub fn verdict_class(audited: bool, verdict: i32) -> VerdictClass {
    if audited {
        VerdictClass::Audited
    } else if verdict < 0 {
        VerdictClass::Denied
    } else if verdict > 0 {
        VerdictClass::Redirected
    } else {
        VerdictClass::Allowed
    }
}

/// The drop reason a negative verdict carries, 0 otherwise or when it does
/// not fit the u8 reason space.
#[inline(always)]
pub fn verdict_reason(verdict: i32) -> u8 {
    if (-255..0).contains(&verdict) { (-verdict) as u8 } else { 0 }
}

/// The port a flow is keyed by. For ICMP echo Cilium's `dst_port` is the
/// echo identifier (`ct_extract_ports4`): one flow per ping would fill the
/// table.
#[inline(always)]
pub fn flow_port(proto: u8, dst_port: u16) -> u16 {
    if proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6 { 0 } else { dst_port }
}

/// Direction and remote identity of a drop, which carries no direction;
/// the rule follows Cilium's call sites:
/// * bpf_lxc passes the endpoint's ID as `dst_id` on ingress (remote =
///   source) and 0 on egress (remote = destination);
/// * the host firewall (`send_drop_notify_error*`) passes dst_label = 0
///   and dst_id = 0: the source is the host (1, or 0 in v1.14's
///   `cil_to_netdev`) on egress, the remote peer on ingress.
///
/// Before Cilium 1.16 these drops are the host firewall's only report.
#[inline(always)]
pub fn drop_direction(src_label: u32, dst_label: u32, dst_id: u32) -> (u8, u32) {
    if dst_id != 0 {
        (direction::INGRESS, src_label)
    } else if dst_label != 0 || src_label == 0 || src_label == HOST_IDENTITY {
        (direction::EGRESS, dst_label)
    } else {
        (direction::INGRESS, src_label)
    }
}

/// The fields of a policy verdict that make its flow key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictFacts {
    pub endpoint_id: u16,
    pub remote_label: u32,
    pub verdict: i32,
    pub dst_port: u16,
    pub proto: u8,
    /// The raw flags byte: dir:2, ipv6:1, match_type:3, audited:1, l3:1.
    pub flags: u8,
}

impl VerdictFacts {
    /// Reads the fields at their offsets (valid for every layout).
    #[inline(always)]
    pub fn read(buf: &Notification) -> VerdictFacts {
        VerdictFacts {
            endpoint_id: u16_at(buf, capture_hdr::SOURCE),
            remote_label: u32_at(buf, pv::REMOTE_LABEL),
            verdict: u32_at(buf, pv::VERDICT) as i32,
            dst_port: u16_at(buf, pv::DST_PORT),
            proto: buf[pv::PROTO],
            flags: buf[pv::FLAGS],
        }
    }

    #[inline(always)]
    pub fn audited(&self) -> bool {
        self.flags & pv::FLAG_AUDITED != 0
    }

    #[inline(always)]
    pub fn ipv6(&self) -> bool {
        self.flags & pv::FLAG_IPV6 != 0
    }

    #[inline(always)]
    pub fn match_type(&self) -> u8 {
        (self.flags & pv::FLAG_MATCH_TYPE_MASK) >> pv::FLAG_MATCH_TYPE_SHIFT
    }

    #[inline(always)]
    pub fn class(&self) -> VerdictClass {
        verdict_class(self.audited(), self.verdict)
    }

    /// The flow key, or `BadField` for a direction Cilium never emits.
    #[inline(always)]
    pub fn key(&self) -> Result<FlowKey, Reject> {
        Ok(self.key_in(verdict_direction(self.flags)?))
    }

    /// The flow key in a direction already checked by [`verdict_direction`].
    #[inline(always)]
    pub fn key_in(&self, direction: u8) -> FlowKey {
        FlowKey {
            endpoint_id: self.endpoint_id,
            dst_port: flow_port(self.proto, self.dst_port),
            remote_identity: self.remote_label,
            proto: self.proto,
            direction,
            class: self.class() as u8,
            match_type: self.match_type(),
            notify_type: notify_type::POLICY_VERDICT,
            reason: verdict_reason(self.verdict),
            flags: if self.ipv6() { FLOW_FLAG_IPV6 } else { 0 },
            _pad: 0,
        }
    }
}

/// The fields of a policy drop that make its flow key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropFacts {
    pub endpoint_id: u16,
    /// The drop reason (`subtype`).
    pub reason: u8,
    pub src_label: u32,
    pub dst_label: u32,
    pub dst_id: u32,
    /// Only D3/D4 say; earlier layouts read as IPv4.
    pub ipv6: bool,
}

impl DropFacts {
    #[inline(always)]
    pub fn read(buf: &Notification, layout: DropLayout) -> DropFacts {
        DropFacts {
            endpoint_id: u16_at(buf, capture_hdr::SOURCE),
            reason: buf[capture_hdr::SUBTYPE],
            src_label: u32_at(buf, drop_notify::SRC_LABEL),
            dst_label: u32_at(buf, drop_notify::DST_LABEL),
            dst_id: u32_at(buf, drop_notify::DST_ID),
            ipv6: layout.has_flags() && buf[drop_notify::FLAGS] & drop_notify::FLAG_IPV6 != 0,
        }
    }

    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        let (dir, remote) = drop_direction(self.src_label, self.dst_label, self.dst_id);
        FlowKey {
            endpoint_id: self.endpoint_id,
            dst_port: 0,
            remote_identity: remote,
            proto: 0,
            direction: dir,
            class: VerdictClass::Denied as u8,
            match_type: 0,
            notify_type: notify_type::DROP,
            reason: self.reason,
            flags: if self.ipv6 { FLOW_FLAG_IPV6 } else { 0 },
            _pad: 0,
        }
    }
}

/// The whole decision for one notification of `len` bytes (`meta_size`)
/// whose first bytes are in `buf`.
#[inline(always)]
pub fn classify(buf: &Notification, len: usize) -> Result<Accounted, Reject> {
    if len < capture_hdr::SIZE {
        return Err(Reject::Truncated);
    }
    let key = match buf[capture_hdr::TYPE] {
        notify_type::POLICY_VERDICT => {
            policy_verdict_layout(buf, len)?;
            VerdictFacts::read(buf).key()?
        }
        // The reason is checked before the size, so a short non-policy drop
        // is Filtered, not Truncated.
        notify_type::DROP if !drop_reason::is_policy(buf[capture_hdr::SUBTYPE]) => return Err(Reject::Filtered),
        notify_type::DROP => DropFacts::read(buf, drop_layout(buf, len)?).key(),
        _ => return Err(Reject::Filtered),
    };
    Ok(Accounted { key, bytes: u32_at(buf, capture_hdr::LEN_ORIG) as u64 })
}

/// Copies the first bytes of a slice the way the tap copies `meta`.
pub fn copy_prefix(bytes: &[u8]) -> Notification {
    let mut buf = [0u8; MAX_NOTIFICATION_SIZE];
    let n = bytes.len().min(MAX_NOTIFICATION_SIZE);
    buf[..n].copy_from_slice(&bytes[..n]);
    buf
}

/// [`classify`] of a whole notification held in a slice (userspace).
pub fn classify_slice(bytes: &[u8]) -> Result<Accounted, Reject> {
    classify(&copy_prefix(bytes), bytes.len())
}
