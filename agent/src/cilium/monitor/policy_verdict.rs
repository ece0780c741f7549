//! `struct policy_verdict_notify` (`bpf/lib/policy_log.h`).
//!
//! | layout | releases | size | version |
//! |---|---|---|---|
//! | P1 | v1.12–v1.13 | 32 | u16 1 |
//! | P2 | v1.14–v1.18 | 32 | u16 1 (byte 28 becomes `auth_type`) |
//! | P3 | v1.19+ | 40 (+ extension) | u8 1, u8 `ext_version` (`cookie` at 32) |
//!
//! Checked at `policy_log.h@v1.12.16`, `@v1.13.9`, `@v1.14.4`, `@v1.16.8`,
//! `@v1.18.3` and `@main` (aeb2d1b68e). P1 and P2 share every byte but 28,
//! which is a zero pad in P1: read as `auth_type` it says "disabled", which
//! is what P1 meant, so both are decoded the same way.

pub use verdict_common::classify::PolicyVerdictLayout;
use verdict_common::{
    cilium::{direction, policy_verdict as pv},
    classify::{self, Reject, VerdictFacts, u16_at, u32_at},
    maps::{FlowKey, VerdictClass},
};

use super::{DecodeError, NotifyCaptureHdr};
use crate::model::Direction;

const WHAT: &str = "policy verdict notification";

/// A decoded policy verdict, C field order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyVerdictNotify {
    /// `NOTIFY_CAPTURE_HDR`; `hdr.source` is the local endpoint.
    pub hdr: NotifyCaptureHdr,
    /// `remote_label`: the source identity on ingress, the destination on egress.
    pub remote_label: u32,
    /// `verdict`: < 0 a drop reason, 0 allow, > 0 the L7 proxy port.
    pub verdict: i32,
    /// `dst_port`, host order (the datapath applies `bpf_ntohs`).
    pub dst_port: u16,
    /// `proto`: IP protocol number.
    pub proto: u8,
    /// `dir:2`; decoding rejects anything but ingress (1) and egress (2).
    pub dir: Direction,
    /// `ipv6:1`.
    pub ipv6: bool,
    /// `match_type:3`: `api::match_type_name`.
    pub match_type: u8,
    /// `audited:1`: PolicyAuditMode let through what enforcement would drop.
    pub audited: bool,
    /// `l3:1` (v1.17.12+, v1.19+; `pad0` before, always 0): the captured
    /// packet starts at the IP header.
    pub l3: bool,
    /// `auth_type` (v1.14+; zero pad, meaning "disabled", before).
    pub auth_type: u8,
    /// `cookie` (P3 only): the policy log cookie.
    pub cookie: Option<u32>,
    /// How it was told apart.
    pub layout: PolicyVerdictLayout,
    /// `meta_size`: 32, 40, or 40 plus a downstream extension.
    pub size: usize,
}

impl PolicyVerdictNotify {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let hdr = NotifyCaptureHdr::decode(bytes)?;
        let b = classify::copy_prefix(bytes);
        let size = bytes.len();

        // Which layout, and whether the direction is one Cilium emits, is
        // the shared classifier's decision; this decoder only adds names.
        let layout = classify::policy_verdict_layout(&b, size).map_err(|reject| match reject {
            Reject::Truncated => DecodeError::Truncated { what: WHAT, need: pv::SIZE_V1, got: size },
            _ => {
                let version = if size >= pv::SIZE_V2 { u16::from(hdr.version) } else { hdr.version_u16() };
                DecodeError::UnknownVersion { what: WHAT, size, version }
            }
        })?;
        let facts = VerdictFacts::read(&b);
        let dir = match classify::verdict_direction(facts.flags) {
            Ok(direction::INGRESS) => Direction::Ingress,
            Ok(_) => Direction::Egress,
            Err(_) => {
                let value = u32::from(facts.flags & pv::FLAG_DIR_MASK);
                return Err(DecodeError::BadField { what: WHAT, field: "dir", value });
            }
        };

        let cookie = match layout {
            PolicyVerdictLayout::P3 => Some(u32_at(&b, pv::COOKIE)),
            PolicyVerdictLayout::P1OrP2 => None,
        };

        Ok(PolicyVerdictNotify {
            hdr,
            remote_label: facts.remote_label,
            verdict: facts.verdict,
            dst_port: u16_at(&b, pv::DST_PORT),
            proto: facts.proto,
            dir,
            ipv6: facts.ipv6(),
            match_type: facts.match_type(),
            audited: facts.audited(),
            l3: facts.flags & pv::FLAG_L3 != 0,
            auth_type: b[pv::AUTH_TYPE],
            cookie,
            layout,
            size,
        })
    }

    /// The fields the shared classifier keys this verdict by.
    fn facts(&self) -> VerdictFacts {
        let mut flags =
            direction_code(self.dir) | ((self.match_type << pv::FLAG_MATCH_TYPE_SHIFT) & pv::FLAG_MATCH_TYPE_MASK);
        if self.ipv6 {
            flags |= pv::FLAG_IPV6;
        }
        if self.audited {
            flags |= pv::FLAG_AUDITED;
        }
        if self.l3 {
            flags |= pv::FLAG_L3;
        }
        VerdictFacts {
            endpoint_id: self.hdr.source,
            remote_label: self.remote_label,
            verdict: self.verdict,
            dst_port: self.dst_port,
            proto: self.proto,
            flags,
        }
    }

    /// The class the agent counts ([`classify::verdict_class`]): `audited`
    /// wins over the sign, as in `GetPolicyActionString`
    /// (`pkg/monitor/datapath_policy.go`); Hubble checks the sign first,
    /// which differs only if a proxy redirect is audited.
    pub fn class(&self) -> VerdictClass {
        classify::verdict_class(self.audited, self.verdict)
    }

    /// The drop reason a negative verdict carries (133, 181, 189, 157,
    /// 170, ...), 0 otherwise or when it does not fit the u8 reason space.
    pub fn drop_reason(&self) -> u8 {
        classify::verdict_reason(self.verdict)
    }

    /// `monitor`'s action word: audit, deny, redirect, allow.
    pub fn action(&self) -> &'static str {
        match self.class() {
            VerdictClass::Audited => "audit",
            VerdictClass::Denied => "deny",
            VerdictClass::Redirected => "redirect",
            VerdictClass::Allowed => "allow",
        }
    }

    /// The key the shared classifier counts this verdict under. For ICMP
    /// and ICMPv6 the port is 0: Cilium puts the echo identifier there.
    pub fn flow_key(&self) -> FlowKey {
        self.facts().key_in(direction_code(self.dir))
    }
}

pub(crate) fn direction_code(d: Direction) -> u8 {
    match d {
        Direction::Ingress => direction::INGRESS,
        Direction::Egress => direction::EGRESS,
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
    fn p1_allow_ingress() {
        let n = PolicyVerdictNotify::decode(&golden("p1_allow_ingress_tcp")).unwrap();
        assert_eq!(n.hdr.notify_type, 5);
        assert_eq!(n.hdr.subtype, 0);
        assert_eq!(n.hdr.source, 1234);
        assert_eq!(n.hdr.hash, 0x5a5a_0001);
        assert_eq!(n.hdr.len_orig, 74);
        assert_eq!(n.hdr.len_cap, 74);
        assert_eq!(n.hdr.version_u16(), 1);
        assert_eq!(n.remote_label, 2);
        assert_eq!(n.verdict, 0);
        assert_eq!(n.dst_port, 80);
        assert_eq!(n.proto, 6);
        assert_eq!(n.dir, Direction::Ingress);
        assert!(!n.ipv6);
        assert_eq!(n.match_type, 2);
        assert!(!n.audited);
        assert!(!n.l3);
        assert_eq!(n.auth_type, 0);
        assert_eq!(n.cookie, None);
        assert_eq!(n.layout, PolicyVerdictLayout::P1OrP2);
        assert_eq!(n.size, 32);
        assert_eq!(n.class(), VerdictClass::Allowed);
        assert_eq!(n.action(), "allow");
    }

    #[test]
    fn p1_redirect_egress_carries_proxy_port() {
        let n = PolicyVerdictNotify::decode(&golden("p1_redirect_egress_udp")).unwrap();
        assert_eq!(n.hdr.source, 77);
        assert_eq!(n.remote_label, 256);
        assert_eq!(n.verdict, 15001);
        assert_eq!(n.dst_port, 53);
        assert_eq!(n.proto, 17);
        assert_eq!(n.dir, Direction::Egress);
        assert_eq!(n.match_type, 2);
        assert_eq!(n.class(), VerdictClass::Redirected);
        assert_eq!(n.drop_reason(), 0);
    }

    #[test]
    fn p2_audit_default_deny() {
        let n = PolicyVerdictNotify::decode(&golden("p2_audit_ingress_none")).unwrap();
        assert_eq!(n.hdr.source, 3001);
        assert_eq!(n.remote_label, 2);
        assert_eq!(n.verdict, 0);
        assert_eq!(n.dst_port, 6443);
        assert_eq!(n.proto, 6);
        assert_eq!(n.dir, Direction::Ingress);
        assert_eq!(n.match_type, 0);
        assert!(n.audited);
        assert_eq!(n.auth_type, 0);
        assert_eq!(n.class(), VerdictClass::Audited);
        assert_eq!(n.action(), "audit");
    }

    #[test]
    fn p2_deny_ipv6_cidr() {
        let n = PolicyVerdictNotify::decode(&golden("p2_deny_egress_ipv6")).unwrap();
        assert_eq!(n.hdr.source, 42);
        assert_eq!(n.hdr.hash, 0);
        assert_eq!(n.remote_label, 16_777_217);
        assert_eq!(n.verdict, -133);
        assert_eq!(n.dst_port, 443);
        assert_eq!(n.proto, 6);
        assert_eq!(n.dir, Direction::Egress);
        assert!(n.ipv6);
        assert_eq!(n.match_type, 1);
        assert_eq!(n.class(), VerdictClass::Denied);
        assert_eq!(n.drop_reason(), 133);
    }

    #[test]
    fn p2_auth_required() {
        let n = PolicyVerdictNotify::decode(&golden("p2_deny_auth_required_spire")).unwrap();
        assert_eq!(n.verdict, -189);
        assert_eq!(n.auth_type, 1);
        assert_eq!(n.drop_reason(), 189);
        assert_eq!(n.remote_label, 70_000);
        assert_eq!(n.match_type, 2);
    }

    #[test]
    fn p2_l3_device_bit() {
        let n = PolicyVerdictNotify::decode(&golden("p2_allow_l3_device")).unwrap();
        assert!(n.l3);
        assert_eq!(n.proto, 1);
        assert_eq!(n.dst_port, 0);
        assert_eq!(n.match_type, 5);
        assert_eq!(n.dir, Direction::Egress);
    }

    #[test]
    fn p3_cookie() {
        let n = PolicyVerdictNotify::decode(&golden("p3_allow_ingress_cookie")).unwrap();
        assert_eq!(n.layout, PolicyVerdictLayout::P3);
        assert_eq!(n.size, 40);
        assert_eq!(n.hdr.version, 1);
        assert_eq!(n.hdr.ext_version, 0);
        assert_eq!(n.cookie, Some(0x0000_1234));
        assert_eq!(n.remote_label, 6);
        assert_eq!(n.dst_port, 10250);
        assert_eq!(n.match_type, 4);
        assert_eq!(n.dir, Direction::Ingress);
        assert_eq!(n.class(), VerdictClass::Allowed);
    }

    #[test]
    fn p3_downstream_extension() {
        let n = PolicyVerdictNotify::decode(&golden("p3_deny_extension")).unwrap();
        assert_eq!(n.size, 48);
        assert_eq!(n.hdr.ext_version, 1);
        assert_eq!(n.cookie, Some(7));
        assert_eq!(n.verdict, -181);
        assert_eq!(n.match_type, 6);
        assert!(n.ipv6);
    }

    #[test]
    fn rejects() {
        let kind = |name: &str| PolicyVerdictNotify::decode(&golden(name)).map_err(|e| e.kind());
        assert_eq!(kind("p_bad_dir_0").unwrap_err(), DecodeErrorKind::BadField);
        assert_eq!(kind("p_bad_dir_3").unwrap_err(), DecodeErrorKind::BadField);
        assert_eq!(kind("p_truncated_31").unwrap_err(), DecodeErrorKind::Truncated);
        assert_eq!(kind("p_size_36").unwrap_err(), DecodeErrorKind::UnknownVersion);
        assert_eq!(kind("p1_version_2").unwrap_err(), DecodeErrorKind::UnknownVersion);
        assert_eq!(kind("p3_version_2").unwrap_err(), DecodeErrorKind::UnknownVersion);
    }
}
