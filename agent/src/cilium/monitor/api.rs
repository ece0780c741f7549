//! The names Cilium prints for notification fields, after
//! `pkg/monitor/api` (`types.go`, `drop.go`), `pkg/policy/types/auth.go`,
//! Hubble's `flow.proto`, and gopacket's ICMP `TypeCode.String()`.

/// `PolicyMatchType.String()` (`pkg/monitor/api/types.go`). 5 and 6 exist
/// from v1.13; v1.12 prints them as "unknown" (it never sends them).
pub fn match_type_name(match_type: u8) -> &'static str {
    match match_type {
        0 => "none",
        1 => "L3-Only",
        2 => "L3-L4",
        3 => "L4-Only",
        4 => "all",
        5 => "L3-Proto",
        6 => "Proto-Only",
        _ => "unknown",
    }
}

/// The inverse of [`match_type_name`]; "unknown" has no number.
pub fn match_type_from_name(name: &str) -> Option<u8> {
    (0..=6).find(|&m| match_type_name(m) == name)
}

/// `AuthType.String()` (`pkg/policy/types/auth.go@main`, `l4.go@v1.14.4`).
pub fn auth_type_name(auth_type: u8) -> String {
    match auth_type {
        0 => "disabled".into(),
        1 => "spire".into(),
        2 => "test-always-fail".into(),
        n => format!("Unknown-auth-type-{n}"),
    }
}

/// The inverse of [`auth_type_name`].
pub fn auth_type_from_name(name: &str) -> Option<u8> {
    match name {
        "disabled" => Some(0),
        "spire" => Some(1),
        "test-always-fail" => Some(2),
        _ => name.strip_prefix("Unknown-auth-type-")?.parse().ok(),
    }
}

/// One policy-related drop reason: the code in `subtype` (or minus the
/// verdict), `drop.go`'s text, Hubble's `DropReason` enum name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropReasonInfo {
    pub code: u8,
    pub text: &'static str,
    pub hubble: &'static str,
}

/// Texts are identical at `drop.go@v1.12.16`, `@v1.14.4`, `@v1.16.8` and
/// `@main`; 189 exists from v1.13, 202 and 203 from v1.15.7 (CILIUM.md c).
/// Names from `flow.proto@main`.
pub const POLICY_DROP_REASONS: &[DropReasonInfo] = &[
    DropReasonInfo { code: 133, text: "Policy denied", hubble: "POLICY_DENIED" },
    DropReasonInfo { code: 157, text: "IP fragmentation not supported", hubble: "IP_FRAGMENTATION_NOT_SUPPORTED" },
    DropReasonInfo {
        code: 165,
        text: "No configuration available to perform policy decision",
        hubble: "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
    },
    DropReasonInfo {
        code: 170,
        text: "Encapsulation traffic is prohibited",
        hubble: "ENCAPSULATION_TRAFFIC_IS_PROHIBITED",
    },
    DropReasonInfo { code: 181, text: "Policy denied by denylist", hubble: "POLICY_DENY" },
    DropReasonInfo { code: 189, text: "Authentication required", hubble: "AUTH_REQUIRED" },
    DropReasonInfo { code: 202, text: "Host datapath not ready", hubble: "DROP_HOST_NOT_READY" },
    DropReasonInfo { code: 203, text: "Endpoint policy program not available", hubble: "DROP_EP_NOT_READY" },
];

pub fn policy_drop_reason(code: u8) -> Option<&'static DropReasonInfo> {
    POLICY_DROP_REASONS.iter().find(|r| r.code == code)
}

/// `drop.go`'s text for a policy reason; other reasons are not tabled here.
pub fn drop_reason_text(code: u8) -> Option<&'static str> {
    policy_drop_reason(code).map(|r| r.text)
}

/// Hubble's `DropReason` name for a policy reason.
pub fn hubble_drop_reason_name(code: u8) -> Option<&'static str> {
    policy_drop_reason(code).map(|r| r.hubble)
}

pub fn drop_reason_from_hubble_name(name: &str) -> Option<u8> {
    POLICY_DROP_REASONS.iter().find(|r| r.hubble == name).map(|r| r.code)
}

/// `DropReasonExt(reason, ext_error)`: the text, plus ", <ext>" when
/// `ext_error` is non-zero; "<reason>, <ext>" for a code without text
/// (only policy texts are known here, so any other code prints that way).
pub fn drop_reason_ext(code: u8, ext_error: i8) -> String {
    match (drop_reason_text(code), ext_error) {
        (Some(t), 0) => t.to_owned(),
        (Some(t), e) => format!("{t}, {e}"),
        (None, e) => format!("{code}, {e}"),
    }
}

/// What a printed drop reason means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrintedReason {
    /// A policy reason, with the extended error if one was printed.
    Policy { code: u8, ext_error: i8 },
    /// Cilium's "N, M" form for a code without text.
    Numeric { code: u8, ext_error: i8 },
    /// Some other text: a drop reason that is not about policy.
    Other,
}

/// Reads what [`drop_reason_ext`] (and Cilium's `DropReasonExt`) prints.
pub fn parse_drop_reason(printed: &str) -> PrintedReason {
    let printed = printed.trim();
    for r in POLICY_DROP_REASONS {
        if printed == r.text {
            return PrintedReason::Policy { code: r.code, ext_error: 0 };
        }
        if let Some(ext) = printed.strip_prefix(r.text).and_then(|s| s.strip_prefix(", "))
            && let Ok(ext_error) = ext.parse()
        {
            return PrintedReason::Policy { code: r.code, ext_error };
        }
    }
    if let Some((a, b)) = printed.split_once(", ")
        && let (Ok(code), Ok(ext_error)) = (a.parse(), b.parse())
    {
        return PrintedReason::Numeric { code, ext_error };
    }
    PrintedReason::Other
}

/// gopacket's ICMPv4 type names (`layers/icmp4.go`).
const ICMP4_TYPES: &[(u8, &str)] = &[
    (0, "EchoReply"),
    (3, "DestinationUnreachable"),
    (4, "SourceQuench"),
    (5, "Redirect"),
    (8, "EchoRequest"),
    (9, "RouterAdvertisement"),
    (10, "RouterSolicitation"),
    (11, "TimeExceeded"),
    (12, "ParameterProblem"),
    (13, "TimestampRequest"),
    (14, "TimestampReply"),
    (15, "InfoRequest"),
    (16, "InfoReply"),
    (17, "AddressMaskRequest"),
    (18, "AddressMaskReply"),
];

/// gopacket's ICMPv6 type names (`layers/icmp6.go`).
const ICMP6_TYPES: &[(u8, &str)] = &[
    (1, "DestinationUnreachable"),
    (2, "PacketTooBig"),
    (3, "TimeExceeded"),
    (4, "ParameterProblem"),
    (128, "EchoRequest"),
    (129, "EchoReply"),
    (133, "RouterSolicitation"),
    (134, "RouterAdvertisement"),
    (135, "NeighborSolicitation"),
    (136, "NeighborAdvertisement"),
    (137, "Redirect"),
];

fn icmp_table(ipv6: bool) -> &'static [(u8, &'static str)] {
    if ipv6 { ICMP6_TYPES } else { ICMP4_TYPES }
}

/// `ICMPv4TypeCode.String()` / `ICMPv6TypeCode.String()`, except that the
/// code names of unreachable/exceeded/problem types print as "(Code: N)".
pub fn icmp_type_code_string(ipv6: bool, icmp_type: u8, code: u8) -> String {
    match icmp_table(ipv6).iter().find(|(t, _)| *t == icmp_type) {
        Some((_, name)) if code == 0 => (*name).to_owned(),
        Some((_, name)) => format!("{name}(Code: {code})"),
        None => format!("{icmp_type}({code})"),
    }
}

/// The ICMP type in a printed `TypeCode`: "EchoRequest",
/// "DestinationUnreachable(Port)", "42(0)".
pub fn icmp_type_from_string(ipv6: bool, printed: &str) -> Option<u8> {
    let name = printed.split('(').next().unwrap_or(printed);
    if let Some((t, _)) = icmp_table(ipv6).iter().find(|(_, n)| *n == name) {
        return Some(*t);
    }
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in 0..=6 {
            assert_eq!(match_type_from_name(match_type_name(m)), Some(m));
        }
        assert_eq!(match_type_name(7), "unknown");
        assert_eq!(match_type_from_name("unknown"), None);
        for a in 0..=255u8 {
            assert_eq!(auth_type_from_name(&auth_type_name(a)), Some(a));
        }
        assert_eq!(auth_type_name(9), "Unknown-auth-type-9");
        for r in POLICY_DROP_REASONS {
            assert_eq!(drop_reason_from_hubble_name(r.hubble), Some(r.code));
            assert_eq!(
                parse_drop_reason(&drop_reason_ext(r.code, 0)),
                PrintedReason::Policy { code: r.code, ext_error: 0 }
            );
            assert_eq!(
                parse_drop_reason(&drop_reason_ext(r.code, -3)),
                PrintedReason::Policy { code: r.code, ext_error: -3 }
            );
        }
        assert_eq!(drop_reason_ext(189, 1), "Authentication required, 1");
        assert_eq!(parse_drop_reason("150, 0"), PrintedReason::Numeric { code: 150, ext_error: 0 });
        assert_eq!(parse_drop_reason("Invalid source ip"), PrintedReason::Other);
        // A longer text that merely starts like a policy reason.
        assert_eq!(parse_drop_reason("Policy denied, but why"), PrintedReason::Other);
    }

    #[test]
    fn icmp_names() {
        assert_eq!(icmp_type_from_string(false, "EchoRequest"), Some(8));
        assert_eq!(icmp_type_from_string(true, "EchoRequest"), Some(128));
        assert_eq!(icmp_type_from_string(false, "DestinationUnreachable(Port)"), Some(3));
        assert_eq!(icmp_type_from_string(true, "NeighborSolicitation"), Some(135));
        assert_eq!(icmp_type_from_string(false, "42(0)"), Some(42));
        assert_eq!(icmp_type_from_string(false, "Bogus"), None);
        assert_eq!(icmp_type_code_string(false, 8, 0), "EchoRequest");
        assert_eq!(icmp_type_code_string(false, 42, 1), "42(1)");
    }
}
