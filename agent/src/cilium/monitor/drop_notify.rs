//! `struct drop_notify` (`bpf/lib/drop.h`), sent from the
//! `CILIUM_CALL_DROP_NOTIFY` tail call.
//!
//! | layout | releases | size | version | added |
//! |---|---|---|---|---|
//! | D1 | v1.12.x | 32 | u16 1 | `line`, `file`, `ext_error` |
//! | D2 | v1.13.0–v1.17.3 | 36 | u16 1 | `ifindex` |
//! | D3 | v1.17.4–v1.18.x | 40 | u16 2 (`NOTIFY_DROP_VER`) | `flags`, `pad2[3]` |
//! | D4 | v1.19+ | 48 (+ extension) | u8 3, u8 `ext_version` | `ip_trace_id` |
//!
//! Checked at `drop.h@v1.12.16`, `@v1.13.9`, `@v1.14.4`, `@v1.16.8`,
//! `@v1.17.3` (no `NOTIFY_DROP_VER`), `@v1.17.4`, `@v1.18.3`, `@main`, and
//! against `pkg/monitor/datapath_drop.go` at the same tags. D1 and D2 both
//! say version 1; only the size tells them apart.

use verdict_common::{
    cilium::{drop_reason, notify_type},
    maps::{FLOW_FLAG_IPV6, FlowKey, VerdictClass},
};

use super::{DecodeError, NotifyCaptureHdr, ne_u16, ne_u32, policy_verdict::direction_code, prefix};
use crate::{cilium::identity, model::Direction};

const WHAT: &str = "drop notification";
pub const D1_SIZE: usize = 32;
pub const D2_SIZE: usize = 36;
pub const D3_SIZE: usize = 40;
pub const D4_SIZE: usize = 48;

/// `flags` bits (`datapath_drop.go@v1.18.3`; v1.17 has only the first two,
/// as C bitfields `ipv6:1, l3_dev:1`).
pub const FLAG_IPV6: u8 = 1 << 0;
pub const FLAG_L3_DEVICE: u8 = 1 << 1;
pub const FLAG_VXLAN: u8 = 1 << 2;
pub const FLAG_GENEVE: u8 = 1 << 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropLayout {
    D1,
    D2,
    D3,
    D4,
}

/// A decoded drop notification, C field order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropNotify {
    /// `NOTIFY_CAPTURE_HDR`; `hdr.subtype` is the drop reason and
    /// `hdr.source` the endpoint whose program dropped it.
    pub hdr: NotifyCaptureHdr,
    /// `src_label`: source security identity.
    pub src_label: u32,
    /// `dst_label`: destination security identity (0 from the
    /// `send_drop_notify_error*` helpers, which the host firewall uses).
    pub dst_label: u32,
    /// `dst_id`: the local destination endpoint on ingress, 0 otherwise.
    pub dst_id: u32,
    /// `line`: source line of the drop.
    pub line: u16,
    /// `file`: source file ID of the drop (table differs per release).
    pub file: u8,
    /// `ext_error`: `error >> 8`; the auth type for reason 189.
    pub ext_error: i8,
    /// `ifindex` (D2+).
    pub ifindex: Option<u32>,
    /// `flags` (D3+): [`FLAG_IPV6`], [`FLAG_L3_DEVICE`], ...
    pub flags: Option<u8>,
    /// `ip_trace_id` (D4).
    pub ip_trace_id: Option<u64>,
    pub layout: DropLayout,
    /// `meta_size`.
    pub size: usize,
}

impl DropNotify {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let hdr = NotifyCaptureHdr::decode(bytes)?;
        let b = prefix::<D1_SIZE>(bytes, WHAT)?;
        let size = bytes.len();
        let v16 = hdr.version_u16();

        let layout = match size {
            D1_SIZE if v16 == 1 => DropLayout::D1,
            D2_SIZE if v16 == 1 => DropLayout::D2,
            D3_SIZE if v16 == 2 => DropLayout::D3,
            s if s >= D4_SIZE && hdr.version == 3 => DropLayout::D4,
            _ => {
                let version = if size >= D4_SIZE { u16::from(hdr.version) } else { v16 };
                return Err(DecodeError::UnknownVersion { what: WHAT, size, version });
            }
        };

        let mut n = DropNotify {
            hdr,
            src_label: ne_u32([b[16], b[17], b[18], b[19]]),
            dst_label: ne_u32([b[20], b[21], b[22], b[23]]),
            dst_id: ne_u32([b[24], b[25], b[26], b[27]]),
            line: ne_u16([b[28], b[29]]),
            file: b[30],
            ext_error: b[31] as i8,
            ifindex: None,
            flags: None,
            ip_trace_id: None,
            layout,
            size,
        };
        if layout != DropLayout::D1 {
            let b = prefix::<D2_SIZE>(bytes, WHAT)?;
            n.ifindex = Some(ne_u32([b[32], b[33], b[34], b[35]]));
        }
        if matches!(layout, DropLayout::D3 | DropLayout::D4) {
            let b = prefix::<D3_SIZE>(bytes, WHAT)?;
            n.flags = Some(b[36]);
        }
        if layout == DropLayout::D4 {
            let b = prefix::<D4_SIZE>(bytes, WHAT)?;
            n.ip_trace_id = Some(u64::from_ne_bytes([b[40], b[41], b[42], b[43], b[44], b[45], b[46], b[47]]));
        }
        Ok(n)
    }

    /// The drop reason (positive).
    pub fn reason(&self) -> u8 {
        self.hdr.subtype
    }

    /// Whether the agent counts this drop as a policy decision.
    pub fn is_policy(&self) -> bool {
        drop_reason::is_policy(self.reason())
    }

    fn flag(&self, bit: u8) -> bool {
        self.flags.is_some_and(|f| f & bit != 0)
    }
    /// Only D3/D4 say; earlier layouts read as IPv4.
    pub fn ipv6(&self) -> bool {
        self.flag(FLAG_IPV6)
    }
    pub fn l3_device(&self) -> bool {
        self.flag(FLAG_L3_DEVICE)
    }
    pub fn vxlan(&self) -> bool {
        self.flag(FLAG_VXLAN)
    }
    pub fn geneve(&self) -> bool {
        self.flag(FLAG_GENEVE)
    }

    /// Direction and remote identity, as the in-kernel classifier guesses
    /// them ([`guess_direction`]).
    pub fn direction(&self) -> (Direction, u32) {
        guess_direction(self.src_label, self.dst_label, self.dst_id)
    }

    /// The key `account.rs` counts this drop under (meaningful only when
    /// [`Self::is_policy`]).
    pub fn flow_key(&self) -> FlowKey {
        let (dir, remote) = self.direction();
        FlowKey {
            endpoint_id: self.hdr.source,
            dst_port: 0,
            remote_identity: remote,
            proto: 0,
            direction: direction_code(dir),
            class: VerdictClass::Denied as u8,
            match_type: 0,
            notify_type: notify_type::DROP,
            reason: self.reason(),
            flags: if self.ipv6() { FLOW_FLAG_IPV6 } else { 0 },
            _pad: 0,
        }
    }
}

/// A drop carries no direction; this is the rule `account.rs` applies in
/// the kernel, from Cilium's call sites:
///
/// * bpf_lxc (v1.14.4, v1.16.8, main): `send_drop_notify_ext(ctx, src,
///   SECLABEL, LXC_ID, ...)` on ingress, `(ctx, SECLABEL, dst_sec_identity,
///   0, ...)` on egress: a non-zero `dst_id` means ingress, remote = source;
/// * the host firewall (bpf_host, `cil_host_policy`) reports through
///   `send_drop_notify_error*` with `dst = 0, dst_id = 0`; `src` is the
///   remote peer on ingress and `HOST_ID` (v1.16+) or 0
///   (`cil_to_netdev@v1.14.4`) on egress, whose destination is not sent.
pub fn guess_direction(src_label: u32, dst_label: u32, dst_id: u32) -> (Direction, u32) {
    if dst_id != 0 {
        (Direction::Ingress, src_label)
    } else if dst_label != 0 || src_label == 0 || src_label == identity::HOST {
        (Direction::Egress, dst_label)
    } else {
        (Direction::Ingress, src_label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cilium::{golden::golden_notifications, monitor::DecodeErrorKind};

    fn golden(name: &str) -> Vec<u8> {
        golden_notifications()
            .into_iter()
            .find(|g| g.name == name)
            .unwrap_or_else(|| panic!("no golden vector {name}"))
            .bytes
    }

    #[test]
    fn d1_ingress_policy_denied() {
        let n = DropNotify::decode(&golden("d1_policy_denied_ingress")).unwrap();
        assert_eq!(n.layout, DropLayout::D1);
        assert_eq!(n.size, 32);
        assert_eq!(n.hdr.notify_type, 1);
        assert_eq!(n.reason(), 133);
        assert_eq!(n.hdr.source, 1234);
        assert_eq!(n.hdr.hash, 0x1111_2222);
        assert_eq!(n.hdr.len_orig, 60);
        assert_eq!(n.hdr.len_cap, 60);
        assert_eq!(n.src_label, 2);
        assert_eq!(n.dst_label, 12345);
        assert_eq!(n.dst_id, 1234);
        assert_eq!(n.line, 1120);
        assert_eq!(n.file, 8);
        assert_eq!(n.ext_error, 0);
        assert_eq!(n.ifindex, None);
        assert_eq!(n.flags, None);
        assert_eq!(n.ip_trace_id, None);
        assert!(!n.ipv6());
        assert_eq!(n.direction(), (Direction::Ingress, 2));
    }

    #[test]
    fn d2_egress_deny_rule() {
        let n = DropNotify::decode(&golden("d2_policy_deny_egress")).unwrap();
        assert_eq!(n.layout, DropLayout::D2);
        assert_eq!(n.reason(), 181);
        assert_eq!(n.hdr.source, 42);
        assert_eq!(n.src_label, 12345);
        assert_eq!(n.dst_label, 2);
        assert_eq!(n.dst_id, 0);
        assert_eq!(n.line, 1326);
        assert_eq!(n.file, 2);
        assert_eq!(n.ifindex, Some(17));
        assert_eq!(n.direction(), (Direction::Egress, 2));
    }

    #[test]
    fn d3_ipv6_flag() {
        let n = DropNotify::decode(&golden("d3_policy_denied_ipv6")).unwrap();
        assert_eq!(n.layout, DropLayout::D3);
        assert_eq!(n.hdr.version_u16(), 2);
        assert_eq!(n.flags, Some(FLAG_IPV6 | FLAG_L3_DEVICE));
        assert!(n.ipv6());
        assert!(n.l3_device());
        assert!(!n.vxlan());
        assert_eq!(n.ifindex, Some(9));
        assert_eq!(n.direction(), (Direction::Ingress, 10));
    }

    #[test]
    fn d4_trace_id_and_auth_ext_error() {
        let n = DropNotify::decode(&golden("d4_auth_required")).unwrap();
        assert_eq!(n.layout, DropLayout::D4);
        assert_eq!(n.hdr.version, 3);
        assert_eq!(n.hdr.ext_version, 0);
        assert_eq!(n.reason(), 189);
        assert_eq!(n.ext_error, 1);
        assert_eq!(n.ip_trace_id, Some(0x0102_0304_0506_0708));
        assert_eq!(n.flags, Some(0));
        assert_eq!(n.direction(), (Direction::Egress, 70_000));
    }

    #[test]
    fn d4_extension_accepted() {
        let n = DropNotify::decode(&golden("d4_extension")).unwrap();
        assert_eq!(n.size, 56);
        assert_eq!(n.hdr.ext_version, 2);
        assert_eq!(n.reason(), 202);
    }

    #[test]
    fn host_firewall_ingress_shape() {
        let n = DropNotify::decode(&golden("d2_hostfw_ingress_policy_denied")).unwrap();
        assert_eq!((n.src_label, n.dst_label, n.dst_id), (2, 0, 0));
        assert_eq!(n.direction(), (Direction::Ingress, 2), "host firewall ingress: remote is the source");
        assert_eq!(guess_direction(1, 0, 0), (Direction::Egress, 0));
        assert_eq!(guess_direction(0, 0, 0), (Direction::Egress, 0));
        assert_eq!(guess_direction(12345, 2, 0), (Direction::Egress, 2));
    }

    #[test]
    fn rejects() {
        let kind = |name: &str| DropNotify::decode(&golden(name)).map_err(|e| e.kind());
        assert_eq!(kind("d_size_33").unwrap_err(), DecodeErrorKind::UnknownVersion);
        assert_eq!(kind("d2_size_version_2").unwrap_err(), DecodeErrorKind::UnknownVersion);
        assert_eq!(kind("d3_size_version_1").unwrap_err(), DecodeErrorKind::UnknownVersion);
        assert_eq!(kind("d4_version_2").unwrap_err(), DecodeErrorKind::UnknownVersion);
        assert_eq!(kind("d_truncated_31").unwrap_err(), DecodeErrorKind::Truncated);
    }
}
