//! The lines `cilium monitor` (`cilium-dbg monitor` from v1.15) prints for
//! decoded notifications, kept apart from decoding as in `pkg/monitor`.
//! Used by tests (to produce real-shaped input for `monitor_text`) and the
//! demo. The packet summary is the caller's: build it with the `*_summary`
//! helpers, which follow `GetConnectionSummary` (`pkg/monitor/dissect.go`).

use std::net::{IpAddr, SocketAddr};

use super::{
    DropNotify, PolicyVerdictNotify,
    api::{auth_type_name, drop_reason_ext, match_type_name},
};
use crate::{cilium::identity, model::Direction};

/// The generations of monitor text. Policy verdict lines gained `auth:` in
/// v1.14; drop lines changed in v1.13 (ifindex, numeric file), v1.14 (file
/// name again) and v1.19 (ip-trace-id). Identical at every verbosity for
/// verdicts; drops print this at INFO and `-v` (`DumpInfo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MonitorText {
    /// `datapath_policy.go@v1.12.16`, `datapath_drop.go@v1.12.16`.
    V1_12,
    /// `@v1.13.9`.
    V1_13,
    /// `@v1.14.4` through `@v1.18.3`.
    V1_14,
    /// `@v1.19bp` (2ba24a2a3d) and `@main`.
    V1_19,
}

impl MonitorText {
    pub const ALL: [MonitorText; 4] = [MonitorText::V1_12, MonitorText::V1_13, MonitorText::V1_14, MonitorText::V1_19];
}

fn identity_text(id: u32, numeric: bool) -> String {
    if numeric { id.to_string() } else { identity::display(id) }
}

fn dir_word(d: Direction) -> &'static str {
    // DumpInfo prints "ingress" for dir == 1 and "egress" for anything else;
    // the decoder has already rejected anything else.
    d.as_str()
}

/// `PolicyVerdictNotify.DumpInfo`.
pub fn policy_verdict_line(n: &PolicyVerdictNotify, text: MonitorText, numeric: bool, summary: &str) -> String {
    let auth =
        if text >= MonitorText::V1_14 { format!("auth: {}, ", auth_type_name(n.auth_type)) } else { String::new() };
    format!(
        "Policy verdict log: flow {:#x} local EP ID {}, remote ID {}, proto {}, {}, action {}, {}match {}, {}",
        n.hdr.hash,
        n.hdr.source,
        identity_text(n.remote_label, numeric),
        n.proto,
        dir_word(n.dir),
        n.action(),
        auth,
        match_type_name(n.match_type),
        summary
    )
}

/// `DropNotify.DumpInfo`, including the doubled comma Cilium prints.
pub fn drop_line(n: &DropNotify, text: MonitorText, numeric: bool, summary: &str) -> String {
    let reason = drop_reason_ext(n.reason(), n.ext_error);
    let mut s = format!("xx drop ({reason}) flow {:#x} to endpoint {}, ", n.hdr.hash, n.dst_id);
    let ifindex = n.ifindex.unwrap_or(0);
    match text {
        MonitorText::V1_12 => s += &format!("file {} line {}, ", bpf_file_name(text, n.file), n.line),
        MonitorText::V1_13 => s += &format!("ifindex {ifindex}, file {}:{}, ", n.file, n.line),
        MonitorText::V1_14 | MonitorText::V1_19 => {
            s += &format!("ifindex {ifindex}, file {}:{}, ", bpf_file_name(text, n.file), n.line)
        }
    }
    if text == MonitorText::V1_19
        && let Some(id) = n.ip_trace_id.filter(|&id| id > 0)
    {
        s += &format!(" [ ip-trace-id = {id} ]");
    }
    s += &format!(
        ", identity {}->{}: {summary}",
        identity_text(n.src_label, numeric),
        identity_text(n.dst_label, numeric)
    );
    s
}

/// The first line of `DropNotify.DumpVerbose` (`-vv`), which follows a
/// separator line and precedes the packet dump.
pub fn drop_verbose_line(n: &DropNotify, cpu: u32, numeric: bool) -> String {
    let mut s = format!(
        "CPU {cpu:02}: MARK {:#x} FROM {} DROP: {} bytes, reason {}",
        n.hdr.hash,
        n.hdr.source,
        n.hdr.len_orig,
        drop_reason_ext(n.reason(), n.ext_error)
    );
    if n.src_label != 0 || n.dst_label != 0 {
        s += &format!(", identity {}->{}", identity_text(n.src_label, numeric), identity_text(n.dst_label, numeric));
    }
    if n.dst_id != 0 {
        s += &format!(", to endpoint {}", n.dst_id);
    }
    s
}

/// The separator `-vv` prints before each drop (`msgSeparator`).
pub const SEPARATOR: &str = "------------------------------------------------------------------------------";

/// Source file names by ID. v1.12 numbers them in the loader
/// (`pkg/datapath/loader/compile.go@v1.12.16`); v1.14 onwards in
/// `source_names_to_ids.h` (the table below is `pkg/monitor/api/files.go@main`;
/// v1.14–v1.15 know fewer headers and print "<unknown-id-N>" for the rest).
pub fn bpf_file_name(text: MonitorText, id: u8) -> String {
    let known = match text {
        MonitorText::V1_12 => match id {
            1 => Some("bpf_network.c"),
            2 => Some("bpf_sock.c"),
            3 => Some("bpf_host.c"),
            4 => Some("bpf_overlay.c"),
            5 => Some("bpf_xdp.c"),
            6 => Some("bpf_alignchecker.c"),
            7 => Some("cilium-probe-kernel-hz.c"),
            8 => Some("bpf_lxc.c"),
            _ => return "unknown".into(),
        },
        MonitorText::V1_13 => return id.to_string(),
        MonitorText::V1_14 | MonitorText::V1_19 => match id {
            1 => Some("bpf_host.c"),
            2 => Some("bpf_lxc.c"),
            3 => Some("bpf_overlay.c"),
            4 => Some("bpf_xdp.c"),
            5 => Some("bpf_sock.c"),
            7 => Some("bpf_wireguard.c"),
            101 => Some("drop.h"),
            102 => Some("srv6.h"),
            103 => Some("icmp6.h"),
            104 => Some("nodeport.h"),
            105 => Some("lb.h"),
            106 => Some("mcast.h"),
            107 => Some("ipv4.h"),
            108 => Some("conntrack.h"),
            109 => Some("local_delivery.h"),
            110 => Some("trace.h"),
            111 => Some("encap.h"),
            112 => Some("host_firewall.h"),
            113 => Some("nodeport_egress.h"),
            114 => Some("ipv6.h"),
            115 => Some("classifiers.h"),
            _ => None,
        },
    };
    known.map(str::to_owned).unwrap_or_else(|| format!("unknown({id})"))
}

/// TCP/UDP/SCTP: `net.JoinHostPort` on both ends, then the protocol, then
/// for TCP the flags among SYN, ACK, RST, FIN joined by ", " (a TCP packet
/// without them leaves a trailing space, as Cilium does).
pub fn l4_summary(src: SocketAddr, dst: SocketAddr, proto: &str, tcp_flags: &[&str]) -> String {
    let mut s = format!("{src} -> {dst} {proto}");
    if proto == "tcp" {
        s.push(' ');
        s += &tcp_flags.join(", ");
    }
    s
}

/// ICMP and ICMPv6: `a -> b EchoRequest` up to v1.17, `a -> b icmp
/// EchoRequest` from v1.18 (for both families).
pub fn icmp_summary(src: IpAddr, dst: IpAddr, type_code: &str, icmp_word: bool) -> String {
    if icmp_word { format!("{src} -> {dst} icmp {type_code}") } else { format!("{src} -> {dst} {type_code}") }
}

/// IP without a decoded L4 header.
pub fn ip_summary(src: IpAddr, dst: IpAddr) -> String {
    format!("{src} -> {dst}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cilium::{golden::golden_notifications, monitor::Notification, monitor::decode};

    fn decoded(name: &str) -> Notification {
        let g = golden_notifications().into_iter().find(|g| g.name == name).unwrap();
        decode(&g.bytes).unwrap()
    }

    #[test]
    fn verdict_lines_per_generation() {
        let Notification::PolicyVerdict(n) = decoded("p2_audit_ingress_none") else { panic!() };
        let summary =
            l4_summary("89.23.224.44:56372".parse().unwrap(), "159.69.60.182:6443".parse().unwrap(), "tcp", &["SYN"]);
        assert_eq!(
            policy_verdict_line(&n, MonitorText::V1_14, false, &summary),
            "Policy verdict log: flow 0x0 local EP ID 3001, remote ID world, proto 6, ingress, action audit, \
             auth: disabled, match none, 89.23.224.44:56372 -> 159.69.60.182:6443 tcp SYN"
        );
        assert_eq!(
            policy_verdict_line(&n, MonitorText::V1_12, true, &summary),
            "Policy verdict log: flow 0x0 local EP ID 3001, remote ID 2, proto 6, ingress, action audit, \
             match none, 89.23.224.44:56372 -> 159.69.60.182:6443 tcp SYN"
        );
    }

    #[test]
    fn drop_lines_per_generation() {
        let Notification::Drop(n) = decoded("d4_auth_required") else { panic!() };
        let s = "10.0.0.1:1 -> 10.0.0.2:2 tcp SYN";
        assert_eq!(
            drop_line(&n, MonitorText::V1_19, true, s),
            "xx drop (Authentication required, 1) flow 0xabc to endpoint 0, ifindex 4, file bpf_lxc.c:1672,  \
             [ ip-trace-id = 72623859790382856 ], identity 12345->70000: 10.0.0.1:1 -> 10.0.0.2:2 tcp SYN"
        );
        assert_eq!(
            drop_line(&n, MonitorText::V1_13, false, s),
            "xx drop (Authentication required, 1) flow 0xabc to endpoint 0, ifindex 4, file 2:1672, , \
             identity 12345->70000: 10.0.0.1:1 -> 10.0.0.2:2 tcp SYN"
        );
        let Notification::Drop(n) = decoded("d1_policy_denied_ingress") else { panic!() };
        assert_eq!(
            drop_line(&n, MonitorText::V1_12, false, "[unknown]"),
            "xx drop (Policy denied) flow 0x11112222 to endpoint 1234, file bpf_lxc.c line 1120, , \
             identity world->12345: [unknown]"
        );
        assert_eq!(
            drop_verbose_line(&n, 3, false),
            "CPU 03: MARK 0x11112222 FROM 1234 DROP: 60 bytes, reason Policy denied, identity world->12345, to endpoint 1234"
        );
    }

    #[test]
    fn summaries() {
        assert_eq!(
            l4_summary("[2001:db8::1]:443".parse().unwrap(), "[2001:db8::2]:80".parse().unwrap(), "udp", &[]),
            "[2001:db8::1]:443 -> [2001:db8::2]:80 udp"
        );
        assert_eq!(
            l4_summary("1.1.1.1:1".parse().unwrap(), "2.2.2.2:2".parse().unwrap(), "tcp", &[]),
            "1.1.1.1:1 -> 2.2.2.2:2 tcp "
        );
        assert_eq!(
            icmp_summary("1.1.1.1".parse().unwrap(), "2.2.2.2".parse().unwrap(), "EchoRequest", true),
            "1.1.1.1 -> 2.2.2.2 icmp EchoRequest"
        );
    }
}
