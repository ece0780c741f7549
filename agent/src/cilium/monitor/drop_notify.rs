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

pub use verdict_common::{
    cilium::drop_notify::{FLAG_GENEVE, FLAG_IPV6, FLAG_L3_DEVICE, FLAG_VXLAN},
    classify::DropLayout,
};
use verdict_common::{
    cilium::{direction, drop_notify as dn, drop_reason},
    classify::{self, DropFacts, Reject, u16_at, u32_at, u64_at},
    maps::FlowKey,
};

use super::{DecodeError, NotifyCaptureHdr};
use crate::model::Direction;

const WHAT: &str = "drop notification";

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
        let b = classify::copy_prefix(bytes);
        let size = bytes.len();

        // Which layout is the shared classifier's decision.
        let layout = classify::drop_layout(&b, size).map_err(|reject| match reject {
            Reject::Truncated => DecodeError::Truncated { what: WHAT, need: dn::SIZE_V1_12, got: size },
            _ => {
                let version = if size >= dn::SIZE_V1_19 { u16::from(hdr.version) } else { hdr.version_u16() };
                DecodeError::UnknownVersion { what: WHAT, size, version }
            }
        })?;
        let facts = DropFacts::read(&b, layout);

        Ok(DropNotify {
            hdr,
            src_label: facts.src_label,
            dst_label: facts.dst_label,
            dst_id: facts.dst_id,
            line: u16_at(&b, dn::LINE),
            file: b[dn::FILE],
            ext_error: b[dn::EXT_ERROR] as i8,
            ifindex: (layout != DropLayout::D1).then(|| u32_at(&b, dn::IFINDEX)),
            flags: layout.has_flags().then_some(b[dn::FLAGS]),
            ip_trace_id: (layout == DropLayout::D4).then(|| u64_at(&b, dn::IP_TRACE_ID)),
            layout,
            size,
        })
    }

    fn facts(&self) -> DropFacts {
        DropFacts {
            endpoint_id: self.hdr.source,
            reason: self.reason(),
            src_label: self.src_label,
            dst_label: self.dst_label,
            dst_id: self.dst_id,
            ipv6: self.ipv6(),
        }
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

    /// The key the shared classifier counts this drop under (meaningful
    /// only when [`Self::is_policy`]).
    pub fn flow_key(&self) -> FlowKey {
        self.facts().key()
    }
}

/// A drop carries no direction: the shared classifier's rule
/// ([`classify::drop_direction`], which cites Cilium's call sites), as a
/// [`Direction`] and the remote identity.
pub fn guess_direction(src_label: u32, dst_label: u32, dst_id: u32) -> (Direction, u32) {
    let (dir, remote) = classify::drop_direction(src_label, dst_label, dst_id);
    (if dir == direction::INGRESS { Direction::Ingress } else { Direction::Egress }, remote)
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
