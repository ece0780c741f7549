//! Golden notifications: byte strings laid out field by field from Cilium's
//! C definitions, with the flow key the in-kernel classifier must produce.
//!
//! Offsets here are written out from the structs themselves
//! (`NOTIFY_CAPTURE_HDR` in `bpf/lib/common.h@v1.12.16` / `notify.h@main`,
//! `struct policy_verdict_notify` in `policy_log.h`, `struct drop_notify` in
//! `drop.h`, at the tags named per vector), not from `verdict_common::cilium`
//! nor from any encoder of ours, so a wrong constant there shows up as a
//! mismatch here. The replay test feeds the same vectors to the kernel
//! program and compares its maps with `expected`.

use verdict_common::maps::{FlowKey, VerdictClass};

use verdict_agent::cilium::monitor::DecodeErrorKind;

/// One vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoldenNotification {
    pub name: &'static str,
    /// The releases that send this layout (or "none" for a malformed one).
    pub cilium_versions: &'static str,
    /// Exactly `meta_size` bytes.
    pub bytes: Vec<u8>,
    /// `Ok(None)`: counted as `Filtered`; `Err`: the `Malformed*` outcome.
    pub expected: Result<Option<FlowKey>, DecodeErrorKind>,
}

/// A `meta` buffer under construction; every field is written at its C
/// offset, host byte order.
struct Msg(Vec<u8>);

impl Msg {
    fn new(size: usize) -> Msg {
        Msg(vec![0; size])
    }
    fn u8(mut self, off: usize, v: u8) -> Msg {
        self.0[off] = v;
        self
    }
    fn u16(mut self, off: usize, v: u16) -> Msg {
        self.0[off..off + 2].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u32(mut self, off: usize, v: u32) -> Msg {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Msg {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    /// `NOTIFY_CAPTURE_HDR` up to v1.18: type@0 u8, subtype@1 u8, source@2
    /// u16, hash@4 u32, len_orig@8 u32, len_cap@12 u16, version@14 u16.
    fn hdr_u16(size: usize, ty: u8, subtype: u8, source: u16, hash: u32, len_orig: u32, version: u16) -> Msg {
        Msg::new(size)
            .u8(0, ty)
            .u8(1, subtype)
            .u16(2, source)
            .u32(4, hash)
            .u32(8, len_orig)
            .u16(12, len_orig.min(128) as u16)
            .u16(14, version)
    }

    /// From v1.19 (`notify.h@main`): version@14 u8, ext_version@15 u8.
    #[allow(clippy::too_many_arguments)]
    fn hdr_u8(size: usize, ty: u8, subtype: u8, source: u16, hash: u32, len_orig: u32, version: u8, ext: u8) -> Msg {
        Msg::new(size)
            .u8(0, ty)
            .u8(1, subtype)
            .u16(2, source)
            .u32(4, hash)
            .u32(8, len_orig)
            .u16(12, len_orig.min(128) as u16)
            .u8(14, version)
            .u8(15, ext)
    }

    /// `policy_verdict_notify` body: remote_label@16 u32, verdict@20 s32,
    /// dst_port@24 u16, proto@26 u8, flags@27 (dir:2 ipv6:1 match_type:3
    /// audited:1 pad0/l3:1, LSB first), auth_type@28 u8 (pad in v1.12–13).
    #[allow(clippy::too_many_arguments)]
    fn verdict(
        self,
        remote: u32,
        verdict: i32,
        port: u16,
        proto: u8,
        dir: u8,
        ipv6: bool,
        m: u8,
        audited: bool,
        l3: bool,
        auth: u8,
    ) -> Msg {
        let flags = dir | (u8::from(ipv6) << 2) | (m << 3) | (u8::from(audited) << 6) | (u8::from(l3) << 7);
        self.u32(16, remote).u32(20, verdict as u32).u16(24, port).u8(26, proto).u8(27, flags).u8(28, auth)
    }

    /// `drop_notify` body: src_label@16, dst_label@20, dst_id@24 (u32 each),
    /// line@28 u16, file@30 u8, ext_error@31 s8.
    fn drop(self, src: u32, dst: u32, dst_id: u32, line: u16, file: u8, ext_error: i8) -> Msg {
        self.u32(16, src).u32(20, dst).u32(24, dst_id).u16(28, line).u8(30, file).u8(31, ext_error as u8)
    }
}

/// The key a policy verdict is counted under (fields as in `account.rs`).
#[allow(clippy::too_many_arguments)]
fn pv_key(
    ep: u16,
    port: u16,
    remote: u32,
    proto: u8,
    dir: u8,
    class: VerdictClass,
    m: u8,
    reason: u8,
    ipv6: bool,
) -> FlowKey {
    FlowKey {
        endpoint_id: ep,
        dst_port: port,
        remote_identity: remote,
        proto,
        direction: dir,
        class: class as u8,
        match_type: m,
        notify_type: 5,
        reason,
        flags: u8::from(ipv6),
        _pad: 0,
    }
}

fn drop_key(ep: u16, remote: u32, dir: u8, reason: u8, ipv6: bool) -> FlowKey {
    FlowKey {
        endpoint_id: ep,
        dst_port: 0,
        remote_identity: remote,
        proto: 0,
        direction: dir,
        class: VerdictClass::Denied as u8,
        match_type: 0,
        notify_type: 1,
        reason,
        flags: u8::from(ipv6),
        _pad: 0,
    }
}

const INGRESS: u8 = 1;
const EGRESS: u8 = 2;

pub fn golden_notifications() -> Vec<GoldenNotification> {
    use DecodeErrorKind::*;
    use VerdictClass::*;
    let g =
        |name, cilium_versions, m: Msg, expected| GoldenNotification { name, cilium_versions, bytes: m.0, expected };
    vec![
        // ---- policy verdicts -------------------------------------------
        g(
            "p1_allow_ingress_tcp",
            "v1.12.x-v1.13.x (policy_log.h@v1.12.16)",
            Msg::hdr_u16(32, 5, 0, 1234, 0x5a5a_0001, 74, 1).verdict(2, 0, 80, 6, INGRESS, false, 2, false, false, 0),
            Ok(Some(pv_key(1234, 80, 2, 6, INGRESS, Allowed, 2, 0, false))),
        ),
        g(
            "p1_redirect_egress_udp",
            "v1.13.x (policy_log.h@v1.13.9: verdict = proxy_port)",
            Msg::hdr_u16(32, 5, 0, 77, 0, 80, 1).verdict(256, 15001, 53, 17, EGRESS, false, 2, false, false, 0),
            Ok(Some(pv_key(77, 53, 256, 17, EGRESS, Redirected, 2, 0, false))),
        ),
        g(
            "p2_audit_ingress_none",
            "v1.14.0-v1.18.x (policy_log.h@v1.14.4)",
            Msg::hdr_u16(32, 5, 0, 3001, 0, 74, 1).verdict(2, 0, 6443, 6, INGRESS, false, 0, true, false, 0),
            Ok(Some(pv_key(3001, 6443, 2, 6, INGRESS, Audited, 0, 0, false))),
        ),
        g(
            "p2_deny_egress_ipv6",
            "v1.14.0-v1.18.x (policy_log.h@v1.16.8)",
            Msg::hdr_u16(32, 5, 0, 42, 0, 94, 1).verdict(16_777_217, -133, 443, 6, EGRESS, true, 1, false, false, 0),
            Ok(Some(pv_key(42, 443, 16_777_217, 6, EGRESS, Denied, 1, 133, true))),
        ),
        g(
            "p2_deny_auth_required_spire",
            "v1.14.0-v1.18.x (policy_log.h@v1.14.4, auth_type)",
            Msg::hdr_u16(32, 5, 0, 42, 0, 74, 1).verdict(70_000, -189, 8080, 6, EGRESS, false, 2, false, false, 1),
            Ok(Some(pv_key(42, 8080, 70_000, 6, EGRESS, Denied, 2, 189, false))),
        ),
        g(
            "p2_icmp_echo_identifier_is_not_a_port",
            "v1.14-v1.18 (conntrack.h ct_extract_ports4: ICMP echo id in dport)",
            Msg::hdr_u16(32, 5, 0, 9, 0, 84, 1).verdict(4, 0, 0x1234, 1, INGRESS, false, 2, false, false, 0),
            Ok(Some(pv_key(9, 0, 4, 1, INGRESS, Allowed, 2, 0, false))),
        ),
        g(
            "p2_allow_l3_device",
            "v1.17.12+ (policy_log.h@v1.17.14, l3 bit)",
            Msg::hdr_u16(32, 5, 0, 9, 0, 84, 1).verdict(2, 0, 0, 1, EGRESS, false, 5, false, true, 0),
            Ok(Some(pv_key(9, 0, 2, 1, EGRESS, Allowed, 5, 0, false))),
        ),
        g(
            "p3_allow_ingress_cookie",
            "v1.19+ (policy_log.h@main, cookie)",
            Msg::hdr_u8(40, 5, 0, 1, 0, 60, 1, 0)
                .verdict(6, 0, 10250, 6, INGRESS, false, 4, false, false, 0)
                .u32(32, 0x1234),
            Ok(Some(pv_key(1, 10250, 6, 6, INGRESS, Allowed, 4, 0, false))),
        ),
        g(
            "p3_deny_extension",
            "v1.19+ with an 8-byte downstream POLICY_VERDICT_EXTENSION (ext_version 1)",
            Msg::hdr_u8(48, 5, 0, 5, 0, 100, 1, 1)
                .verdict(9, -181, 22, 6, INGRESS, true, 6, false, false, 0)
                .u32(32, 7)
                .u64(40, u64::MAX),
            Ok(Some(pv_key(5, 22, 9, 6, INGRESS, Denied, 6, 181, true))),
        ),
        g(
            "p_bad_dir_0",
            "none",
            Msg::hdr_u16(32, 5, 0, 1, 0, 60, 1).verdict(2, 0, 80, 6, 0, false, 0, false, false, 0),
            Err(BadField),
        ),
        g(
            "p_bad_dir_3",
            "none",
            Msg::hdr_u8(40, 5, 0, 1, 0, 60, 1, 0).verdict(2, 0, 80, 6, 3, false, 0, false, false, 0),
            Err(BadField),
        ),
        g("p_truncated_31", "none", Msg::hdr_u16(31, 5, 0, 1, 0, 60, 1), Err(Truncated)),
        g("p_header_only_16", "none", Msg::hdr_u16(16, 5, 0, 1, 0, 60, 1), Err(Truncated)),
        g(
            "p_size_36",
            "none (between P2 and P3)",
            Msg::hdr_u16(36, 5, 0, 1, 0, 60, 1).verdict(2, 0, 80, 6, INGRESS, false, 0, false, false, 0),
            Err(UnknownVersion),
        ),
        g(
            "p1_version_2",
            "none",
            Msg::hdr_u16(32, 5, 0, 1, 0, 60, 2).verdict(2, 0, 80, 6, INGRESS, false, 0, false, false, 0),
            Err(UnknownVersion),
        ),
        g(
            "p3_version_2",
            "none",
            Msg::hdr_u8(40, 5, 0, 1, 0, 60, 2, 0).verdict(2, 0, 80, 6, INGRESS, false, 0, false, false, 0),
            Err(UnknownVersion),
        ),
        // ---- drops -----------------------------------------------------
        g(
            "d1_policy_denied_ingress",
            "v1.12.x (drop.h@v1.12.16; file 8 = bpf_lxc.c in that release's loader)",
            Msg::hdr_u16(32, 1, 133, 1234, 0x1111_2222, 60, 1).drop(2, 12345, 1234, 1120, 8, 0),
            Ok(Some(drop_key(1234, 2, INGRESS, 133, false))),
        ),
        g(
            "d2_policy_deny_egress",
            "v1.13.0-v1.17.3 (drop.h@v1.14.4)",
            Msg::hdr_u16(36, 1, 181, 42, 0, 74, 1).drop(12345, 2, 0, 1326, 2, 0).u32(32, 17),
            Ok(Some(drop_key(42, 2, EGRESS, 181, false))),
        ),
        g(
            "d2_hostfw_ingress_policy_denied",
            "v1.13.0-v1.17.3 host firewall (bpf_host.c send_drop_notify_error_ext: dst 0, dst_id 0); \
             ingress: the source is the remote peer",
            Msg::hdr_u16(36, 1, 133, 3, 0, 60, 1).drop(2, 0, 0, 1800, 1, 0).u32(32, 2),
            Ok(Some(drop_key(3, 2, INGRESS, 133, false))),
        ),
        g(
            "d3_policy_denied_ipv6",
            "v1.17.4-v1.18.x (drop.h@v1.18.3, NOTIFY_DROP_VER 2)",
            Msg::hdr_u16(40, 1, 133, 300, 0, 90, 2).drop(10, 12345, 300, 2087, 2, 0).u32(32, 9).u8(36, 0b11),
            Ok(Some(drop_key(300, 10, INGRESS, 133, true))),
        ),
        g(
            "d4_auth_required",
            "v1.19+ (drop.h@main, NOTIFY_DROP_VER 3)",
            Msg::hdr_u8(48, 1, 189, 42, 0xabc, 74, 3, 0)
                .drop(12345, 70_000, 0, 1672, 2, 1)
                .u32(32, 4)
                .u8(36, 0)
                .u64(40, 0x0102_0304_0506_0708),
            Ok(Some(drop_key(42, 70_000, EGRESS, 189, false))),
        ),
        g(
            "d4_extension",
            "v1.19+ with an 8-byte downstream DROP_EXTENSION (ext_version 2)",
            Msg::hdr_u8(56, 1, 202, 77, 0, 60, 3, 2).drop(1, 4321, 77, 2681, 2, 0).u32(32, 12).u8(36, 1),
            Ok(Some(drop_key(77, 1, INGRESS, 202, true))),
        ),
        g(
            "d_non_policy_reason",
            "any (reason 153, not a policy reason)",
            Msg::hdr_u16(36, 1, 153, 42, 0, 60, 1).drop(12345, 2, 0, 10, 2, 0),
            Ok(None),
        ),
        g(
            "d_non_policy_short",
            "none (filtered before the size check)",
            Msg::hdr_u16(20, 1, 153, 42, 0, 60, 1),
            Ok(None),
        ),
        g("d_truncated_31", "none", Msg::hdr_u16(31, 1, 133, 42, 0, 60, 1), Err(Truncated)),
        g("d_size_33", "none", Msg::hdr_u16(33, 1, 133, 42, 0, 60, 1).drop(1, 2, 0, 1, 1, 0), Err(UnknownVersion)),
        g(
            "d2_size_version_2",
            "none",
            Msg::hdr_u16(36, 1, 133, 42, 0, 60, 2).drop(1, 2, 0, 1, 1, 0),
            Err(UnknownVersion),
        ),
        g(
            "d3_size_version_1",
            "none",
            Msg::hdr_u16(40, 1, 133, 42, 0, 60, 1).drop(1, 2, 0, 1, 1, 0),
            Err(UnknownVersion),
        ),
        g("d4_version_2", "none", Msg::hdr_u8(48, 1, 181, 42, 0, 60, 2, 0).drop(1, 2, 0, 1, 1, 0), Err(UnknownVersion)),
        // ---- other types -----------------------------------------------
        g("trace_notify", "any (CILIUM_NOTIFY_TRACE)", Msg::hdr_u16(56, 4, 0, 42, 0, 60, 2), Ok(None)),
        g("debug_capture", "any (CILIUM_NOTIFY_DBG_CAPTURE)", Msg::hdr_u16(24, 3, 5, 42, 0, 60, 0), Ok(None)),
        g("header_truncated_15", "none", Msg::new(15).u8(0, 4), Err(Truncated)),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_unique_and_sizes_are_meta_sizes() {
        let v = golden_notifications();
        let names: HashSet<_> = v.iter().map(|g| g.name).collect();
        assert_eq!(names.len(), v.len());
        for g in &v {
            assert!(g.bytes.len() <= 64, "{} exceeds the tap's copy", g.name);
        }
    }

    /// The userspace decoder gives every vector its expected outcome (the
    /// kernel side of the same check is `tests/tests/kernel_agreement.rs`).
    #[test]
    fn golden_vectors_match_expected_keys() {
        for g in golden_notifications() {
            let got = verdict_agent::cilium::monitor::expected_flow_key(&g.bytes).map_err(|e| e.kind());
            assert_eq!(got, g.expected, "{} ({})", g.name, g.cilium_versions);
        }
    }
}
