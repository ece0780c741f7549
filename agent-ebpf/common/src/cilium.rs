//! Cilium's datapath notification format, as read by the tap.
//!
//! Every offset below was checked against Cilium's C sources at the tags
//! named in `docs/cilium-compatibility.md` (v1.12.16 through main at
//! 2026-06-25, aeb2d1b68e). All multi-byte fields are host byte order.

/// `enum { CILIUM_NOTIFY_* }` in `bpf/lib/common.h` (v1.12–v1.18) and
/// `bpf/lib/notify.h` (v1.19+); Go mirror `pkg/monitor/api/types.go`.
pub mod notify_type {
    pub const UNSPEC: u8 = 0;
    pub const DROP: u8 = 1;
    pub const DBG_MSG: u8 = 2;
    pub const DBG_CAPTURE: u8 = 3;
    pub const TRACE: u8 = 4;
    pub const POLICY_VERDICT: u8 = 5;
    pub const CAPTURE: u8 = 6;
    pub const TRACE_SOCK: u8 = 7;
}

/// `NOTIFY_CAPTURE_HDR`: the 16-byte header in front of drop, trace and
/// policy-verdict notifications (`bpf/lib/common.h`).
pub mod capture_hdr {
    /// u8 `type`, one of [`super::notify_type`].
    pub const TYPE: usize = 0;
    /// u8 `subtype`: the drop reason for drops, 0 for policy verdicts.
    pub const SUBTYPE: usize = 1;
    /// u16 `source`: the ID of the endpoint whose program emitted it.
    pub const SOURCE: usize = 2;
    /// u32 `hash`: skb hash (often 0 from v1.16).
    pub const HASH: usize = 4;
    /// u32 `len_orig`: length of the original packet.
    pub const LEN_ORIG: usize = 8;
    /// u16 `len_cap`: packet bytes appended after the struct.
    pub const LEN_CAP: usize = 12;
    /// u16 `version` up to v1.18; u8 `version` from v1.19 (main 51fcd69a1c).
    pub const VERSION: usize = 14;
    /// u8 `ext_version` from v1.19; the high byte of `version` before.
    pub const EXT_VERSION: usize = 15;
    pub const SIZE: usize = 16;
}

/// `struct policy_verdict_notify` (`bpf/lib/policy_log.h`).
pub mod policy_verdict {
    /// u32 `remote_label`: source identity on ingress, destination on egress.
    pub const REMOTE_LABEL: usize = 16;
    /// s32 `verdict`: 0 allow, < 0 drop reason, > 0 proxy port.
    pub const VERDICT: usize = 20;
    /// u16 `dst_port`, already converted to host order by `bpf_ntohs`.
    pub const DST_PORT: usize = 24;
    /// u8 `proto`: IP protocol number.
    pub const PROTO: usize = 26;
    /// u8 bitfield: dir:2, ipv6:1, match_type:3, audited:1, l3/pad0:1.
    pub const FLAGS: usize = 27;
    /// u8 `auth_type` (v1.14+; the first byte of a zero pad before).
    pub const AUTH_TYPE: usize = 28;
    /// u32 `cookie`: the policy log cookie (v1.19+ only).
    pub const COOKIE: usize = 32;

    /// Size of the v1.12–v1.18 layouts (P1, P2).
    pub const SIZE_V1: usize = 32;
    /// Size of the v1.19+ layout (P3), before any downstream extension.
    pub const SIZE_V2: usize = 40;
    /// `NOTIFY_CAPTURE_VER`: the only version any release has emitted.
    pub const VERSION: u8 = 1;

    pub const FLAG_DIR_MASK: u8 = 0x03;
    pub const FLAG_IPV6: u8 = 0x04;
    pub const FLAG_MATCH_TYPE_SHIFT: u8 = 3;
    pub const FLAG_MATCH_TYPE_MASK: u8 = 0x38;
    pub const FLAG_AUDITED: u8 = 0x40;
    /// `l3` from v1.17.12 / v1.19: the captured packet starts at the IP header.
    pub const FLAG_L3: u8 = 0x80;
}

/// `struct drop_notify` (`bpf/lib/drop.h`).
pub mod drop_notify {
    /// u32 `src_label`: source security identity.
    pub const SRC_LABEL: usize = 16;
    /// u32 `dst_label`: destination security identity.
    pub const DST_LABEL: usize = 20;
    /// u32 `dst_id`: destination endpoint ID (0 when not a local endpoint).
    pub const DST_ID: usize = 24;
    /// u16 `line`: source line of the drop.
    pub const LINE: usize = 28;
    /// u8 `file`: source file ID of the drop.
    pub const FILE: usize = 30;
    /// s8 `ext_error`: extended error (`error >> 8`), auth type for 189.
    pub const EXT_ERROR: usize = 31;
    /// u32 `ifindex` (v1.13+).
    pub const IFINDEX: usize = 32;
    /// u8 flags: bit0 ipv6, bit1 l3 device, bit2 vxlan, bit3 geneve (v1.17.4+).
    pub const FLAGS: usize = 36;
    /// u64 `ip_trace_id` (v1.19+).
    pub const IP_TRACE_ID: usize = 40;

    /// D1: v1.12.x, version 1.
    pub const SIZE_V1_12: usize = 32;
    /// D2: v1.13.0–v1.17.3, version 1.
    pub const SIZE_V1_13: usize = 36;
    /// D3: v1.17.4–v1.18.x, version 2.
    pub const SIZE_V1_17: usize = 40;
    /// D4: v1.19+, version 3.
    pub const SIZE_V1_19: usize = 48;

    /// `flags` bits (`datapath_drop.go@v1.18.3`; v1.17 has only the first
    /// two, as C bitfields `ipv6:1, l3_dev:1`).
    pub const FLAG_IPV6: u8 = 1 << 0;
    pub const FLAG_L3_DEVICE: u8 = 1 << 1;
    pub const FLAG_VXLAN: u8 = 1 << 2;
    pub const FLAG_GENEVE: u8 = 1 << 3;
}

/// Policy verdict directions (`POLICY_INGRESS`, `POLICY_EGRESS`).
pub mod direction {
    pub const INGRESS: u8 = 1;
    pub const EGRESS: u8 = 2;
}

/// Drop reasons (positive, as carried in `subtype`) that are about policy.
/// Names from `bpf/lib/common.h`, texts from `pkg/monitor/api/drop.go`.
pub mod drop_reason {
    /// "Policy denied" (`DROP_POLICY`).
    pub const POLICY: u8 = 133;
    /// "IP fragmentation not supported"; appears as verdict -157 when an
    /// untracked fragment meets L4 policy.
    pub const FRAG_NOSUPPORT: u8 = 157;
    /// "No configuration available to perform policy decision" (unused upstream).
    pub const NO_CONFIG: u8 = 165;
    /// "Encapsulation traffic is prohibited"; appears as verdict -170 on egress.
    pub const ENCAP_PROHIBITED: u8 = 170;
    /// "Policy denied by denylist" (`DROP_POLICY_DENY`).
    pub const POLICY_DENY: u8 = 181;
    /// "Authentication required" (`DROP_POLICY_AUTH_REQUIRED`, v1.13+).
    pub const POLICY_AUTH_REQUIRED: u8 = 189;
    /// "Host datapath not ready" (`DROP_HOST_NOT_READY`).
    pub const HOST_NOT_READY: u8 = 202;
    /// "Endpoint policy program not available" (`DROP_EP_NOT_READY`).
    pub const EP_NOT_READY: u8 = 203;

    /// Whether a drop notification with this reason is a policy decision the
    /// agent accounts for. Fragments and encapsulation are policy verdicts'
    /// reasons but not policy drops: their drop notification is not counted.
    #[inline(always)]
    pub const fn is_policy(reason: u8) -> bool {
        matches!(reason, POLICY | POLICY_DENY | POLICY_AUTH_REQUIRED | NO_CONFIG | HOST_NOT_READY | EP_NOT_READY)
    }
}
