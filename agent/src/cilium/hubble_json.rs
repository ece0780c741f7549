//! Reads `hubble observe -o json` (an alias of `-o jsonpb`: one
//! `GetFlowsResponse` per line, `{"flow":{...},"node_name":...,"time":...}`)
//! and the legacy bare-`Flow` lines (`HUBBLE_COMPAT=legacy-json-output`)
//! into [`CapturedVerdict`]s.
//!
//! Field names are protojson's proto names from `flow.proto` (copy in
//! `/work/shared/cilium-api/`): `event_type`, `traffic_direction`,
//! `policy_match_type`, `IP`, `l4`, `source_port`, ... Enums are strings,
//! but numbers are accepted too.
//!
//! Which flows count:
//! * `event_type.type == 5` (policy verdict): FORWARDED → allowed, DROPPED
//!   → denied, AUDIT → audited, REDIRECTED → redirected. Hubble tests the
//!   verdict's sign before `audited` (`decodeVerdict`, `threefour/parser.go@main`),
//!   so an audited proxy redirect reads as redirected here while the
//!   kernel counts it as audited.
//! * `event_type.type == 1` (drop) whose `sub_type` is a policy reason:
//!   denied, source `PolicyDrop`. Drops with any other reason are skipped.
//!
//! The local endpoint is the destination on ingress and the source on
//! egress; the other side gives the remote identity and labels. As in the
//! monitor reader, drops record `proto` 0 and `dst_port` 0 like the
//! kernel's flow keys, and ICMP verdicts record the ICMP type as `dst_port`.

use std::{io::BufRead, net::IpAddr};

use serde_json::Value;
use verdict_common::cilium::{drop_reason, notify_type};

use crate::{
    cilium::{
        monitor::api::{drop_reason_from_hubble_name, hubble_drop_reason_name},
        monitor_text::{CaptureParse, LineOutcome, read_lines},
    },
    model::{CapturedVerdict, Direction, NotifySource, Verdict},
    timefmt::parse_rfc3339,
};

/// Reads a whole `hubble observe -o json` capture; never fails.
pub fn parse_hubble_json(input: impl BufRead) -> CaptureParse {
    read_lines(input, parse_line)
}

fn parse_line(text: &str, line: usize) -> LineOutcome {
    if text.trim().is_empty() {
        return LineOutcome::Blank;
    }
    match parse_value(text, line) {
        Ok(v) => LineOutcome::Verdict(Box::new(v)),
        Err(why) => LineOutcome::Skip(why),
    }
}

fn parse_value(text: &str, line: usize) -> Result<CapturedVerdict, String> {
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| format!("not JSON: {e}"))?;
    let (flow, envelope_time) = if let Some(flow) = v.get("flow") {
        (flow, v.get("time"))
    } else if v.get("node_status").is_some() {
        return Err("hubble relay node status event".into());
    } else if let Some(lost) = v.get("lost_events") {
        let n = lost.get("num_events_lost").map(|n| n.to_string()).unwrap_or_else(|| "?".into());
        return Err(format!(
            "{n} flows lost ({}): verdicts in them are missing from the capture",
            text_of(lost.get("source"))
        ));
    } else if v.get("event_type").is_some() || v.get("verdict").is_some() {
        (&v, None)
    } else {
        return Err("JSON, but neither a GetFlowsResponse nor a Flow".into());
    };
    flow_verdict(flow, envelope_time, line)
}

fn text_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "unknown source".into(),
    }
}

fn u64_of(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n.as_u64(),
        // protojson writes 64-bit integers as strings.
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// An enum field: its name, or the name for its number.
fn enum_of<'a>(v: Option<&'a Value>, names: &[(&'a str, u64)]) -> Option<&'a str> {
    match v? {
        Value::String(s) => Some(s.as_str()),
        Value::Number(n) => {
            let n = n.as_u64()?;
            names.iter().find(|(_, k)| *k == n).map(|(name, _)| *name)
        }
        _ => None,
    }
}

const VERDICTS: &[(&str, u64)] = &[
    ("VERDICT_UNKNOWN", 0),
    ("FORWARDED", 1),
    ("DROPPED", 2),
    ("ERROR", 3),
    ("AUDIT", 4),
    ("REDIRECTED", 5),
    ("TRACED", 6),
    ("TRANSLATED", 7),
];
const DIRECTIONS: &[(&str, u64)] = &[("TRAFFIC_DIRECTION_UNKNOWN", 0), ("INGRESS", 1), ("EGRESS", 2)];
const IP_VERSIONS: &[(&str, u64)] = &[("IP_NOT_USED", 0), ("IPv4", 1), ("IPv6", 2)];

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn flow_verdict(flow: &Value, envelope_time: Option<&Value>, line: usize) -> Result<CapturedVerdict, String> {
    let event = flow.get("event_type");
    let event_type = u64_of(event.and_then(|e| e.get("type"))).unwrap_or(0);
    let sub_type = u64_of(event.and_then(|e| e.get("sub_type"))).unwrap_or(0);
    let hubble_verdict = enum_of(flow.get("verdict"), VERDICTS).unwrap_or("VERDICT_UNKNOWN");

    let (verdict, source, reason) = match u8::try_from(event_type) {
        Ok(notify_type::POLICY_VERDICT) => {
            let verdict = match hubble_verdict {
                "FORWARDED" => Verdict::Allowed,
                "DROPPED" => Verdict::Denied,
                "AUDIT" => Verdict::Audited,
                "REDIRECTED" => Verdict::Redirected,
                other => return Err(format!("policy verdict flow with verdict {other}")),
            };
            let reason = if verdict == Verdict::Denied { flow_drop_reason(flow) } else { 0 };
            (verdict, NotifySource::PolicyVerdict, reason)
        }
        Ok(notify_type::DROP) => {
            let code = u8::try_from(sub_type).map_err(|_| format!("drop sub_type {sub_type} out of range"))?;
            if !drop_reason::is_policy(code) {
                let name = enum_name(flow.get("drop_reason_desc")).unwrap_or_else(|| code.to_string());
                return Err(format!("drop with a non-policy reason ({name})"));
            }
            (Verdict::Denied, NotifySource::PolicyDrop, code)
        }
        _ => {
            return Err(format!(
                "Hubble flow of event type {event_type} ({}), not a policy verdict or drop",
                event_type_name(event_type)
            ));
        }
    };

    let direction = match enum_of(flow.get("traffic_direction"), DIRECTIONS) {
        Some("INGRESS") => Direction::Ingress,
        Some("EGRESS") => Direction::Egress,
        _ => return Err("flow without a traffic direction (Hubble could not tell the local endpoint)".into()),
    };
    let empty = Value::Null;
    let src = flow.get("source").unwrap_or(&empty);
    let dst = flow.get("destination").unwrap_or(&empty);
    let (local, remote) = match direction {
        Direction::Ingress => (dst, src),
        Direction::Egress => (src, dst),
    };
    let local_id = u64_of(local.get("ID")).unwrap_or(0);
    let endpoint_id =
        u16::try_from(local_id).map_err(|_| format!("endpoint ID {local_id} is outside Cilium's range"))?;
    let remote_identity = u64_of(remote.get("identity")).unwrap_or(0);
    let remote_identity =
        u32::try_from(remote_identity).map_err(|_| format!("identity {remote_identity} is out of range"))?;

    let ip = flow.get("IP");
    let addr = |k: &str| ip.and_then(|ip| ip.get(k)).and_then(Value::as_str).and_then(|s| s.parse::<IpAddr>().ok());
    let (src_addr, dst_addr) = (addr("source"), addr("destination"));
    let ipv6 = match enum_of(ip.and_then(|ip| ip.get("ipVersion")), IP_VERSIONS) {
        Some("IPv6") => true,
        Some("IPv4") => false,
        _ => src_addr.or(dst_addr).is_some_and(|a| a.is_ipv6()),
    };

    let l4 = layer4(flow.get("l4"));
    let (proto, dst_port) = if source == NotifySource::PolicyDrop { (0, 0) } else { (l4.proto, l4.dst_port) };
    let match_type = if source == NotifySource::PolicyVerdict {
        let m = u64_of(flow.get("policy_match_type")).unwrap_or(0);
        u8::try_from(m).map_err(|_| format!("policy_match_type {m} out of range"))?
    } else {
        0
    };
    let time = flow.get("time").or(envelope_time).and_then(Value::as_str).and_then(|t| parse_rfc3339(t).ok());

    Ok(CapturedVerdict {
        line,
        endpoint_id,
        direction,
        remote_identity,
        proto,
        dst_port,
        verdict,
        match_type,
        source,
        reason,
        ipv6,
        src_addr,
        dst_addr,
        src_port: l4.src_port,
        time,
        local_labels: strings(local.get("labels")),
        remote_labels: strings(remote.get("labels")),
        namespace: local.get("namespace").and_then(Value::as_str).map(str::to_owned),
        pod: local.get("pod_name").and_then(Value::as_str).map(str::to_owned),
    })
}

fn enum_name(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => {
            n.as_u64().and_then(|n| u8::try_from(n).ok()).and_then(hubble_drop_reason_name).map(str::to_owned)
        }
        _ => None,
    }
}

/// The reason of a DROPPED policy verdict: the deprecated numeric
/// `drop_reason` when present, else `drop_reason_desc` by name.
fn flow_drop_reason(flow: &Value) -> u8 {
    if let Some(code) = u64_of(flow.get("drop_reason")).and_then(|c| u8::try_from(c).ok()).filter(|&c| c != 0) {
        return code;
    }
    match flow.get("drop_reason_desc") {
        Some(Value::String(name)) => drop_reason_from_hubble_name(name).unwrap_or(0),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u8::try_from(n).ok()).unwrap_or(0),
        _ => 0,
    }
}

fn event_type_name(t: u64) -> &'static str {
    match t {
        0 => "unspecified",
        2 => "debug",
        3 => "debug capture",
        4 => "trace",
        6 => "recorder capture",
        7 => "trace sock",
        129 => "L7 access log",
        130 => "agent event",
        _ => "unknown",
    }
}

#[derive(Default)]
struct L4 {
    proto: u8,
    src_port: Option<u16>,
    dst_port: u16,
}

/// The `Layer4` oneof.
fn layer4(l4: Option<&Value>) -> L4 {
    let Some(l4) = l4 else { return L4::default() };
    let port = |v: &Value, k: &str| u64_of(v.get(k)).and_then(|p| u16::try_from(p).ok());
    for (key, proto) in [("TCP", 6u8), ("UDP", 17), ("SCTP", 132)] {
        if let Some(v) = l4.get(key) {
            return L4 { proto, src_port: port(v, "source_port"), dst_port: port(v, "destination_port").unwrap_or(0) };
        }
    }
    for (key, proto) in [("ICMPv4", 1u8), ("ICMPv6", 58)] {
        if let Some(v) = l4.get(key) {
            return L4 { proto, src_port: None, dst_port: port(v, "type").unwrap_or(0) };
        }
    }
    L4::default()
}

#[cfg(test)]
mod tests {
    use std::{
        io::Cursor,
        time::{Duration, SystemTime},
    };

    use super::*;

    fn parse(text: &str) -> CaptureParse {
        parse_hubble_json(Cursor::new(text.as_bytes()))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn at(secs: u64, nanos: u32) -> Option<SystemTime> {
        Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
    }

    // Shapes follow flow.proto@main marshalled by protojson with proto
    // names; values are from a kind cluster with PolicyAuditMode.
    const AUDIT: &str = r#"{"flow":{"time":"2024-05-01T12:00:01.123456789Z","uuid":"5d0e6f2c-7b0e-4b8e-9a52-1b1b9f2d6c11","verdict":"AUDIT","ethernet":{"source":"3a:7f:1c:aa:10:01","destination":"de:ad:be:ef:00:01"},"IP":{"source":"10.244.1.17","destination":"10.96.0.10","ipVersion":"IPv4"},"l4":{"UDP":{"source_port":40215,"destination_port":53}},"source":{"ID":3001,"identity":41312,"namespace":"shop","labels":["k8s:app=web","k8s:io.kubernetes.pod.namespace=shop"],"pod_name":"web-6d9f7c9b8-x2x7q","workloads":[{"name":"web","kind":"Deployment"}]},"destination":{"identity":102,"namespace":"kube-system","labels":["k8s:k8s-app=kube-dns","k8s:io.kubernetes.pod.namespace=kube-system"],"pod_name":"coredns-7db6d8ff4d-abcde"},"Type":"L3_L4","node_name":"kind-worker","event_type":{"type":5},"traffic_direction":"EGRESS","policy_match_type":0,"is_reply":false,"Summary":"UDP","egress_denied_by":[{"name":"default-deny","namespace":"shop","kind":"CiliumNetworkPolicy"}]},"node_name":"kind-worker","time":"2024-05-01T12:00:01.123456789Z"}"#;

    const FORWARDED: &str = r#"{"flow":{"time":"2024-05-01T12:00:02Z","verdict":"FORWARDED","IP":{"source":"192.168.1.10","destination":"10.244.1.17","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":51234,"destination_port":8080,"flags":{"SYN":true}}},"source":{"identity":2,"labels":["reserved:world"]},"destination":{"ID":3001,"identity":41312,"namespace":"shop","labels":["k8s:app=web"],"pod_name":"web-6d9f7c9b8-x2x7q"},"Type":"L3_L4","node_name":"kind-worker","event_type":{"type":5},"traffic_direction":"INGRESS","policy_match_type":2,"is_reply":false,"auth_type":"DISABLED","Summary":"TCP Flags: SYN"},"node_name":"kind-worker","time":"2024-05-01T12:00:02Z"}"#;

    const DROPPED_VERDICT: &str = r#"{"flow":{"time":"2024-05-01T12:00:03.5Z","verdict":"DROPPED","drop_reason":181,"IP":{"source":"fd00:10:244:1::17","destination":"2001:db8::5","ipVersion":"IPv6"},"l4":{"TCP":{"source_port":40000,"destination_port":443,"flags":{"SYN":true}}},"source":{"ID":3001,"identity":41312,"namespace":"shop","labels":["k8s:app=web"],"pod_name":"web-6d9f7c9b8-x2x7q"},"destination":{"identity":16777217,"labels":["cidr:2001:db8::/64","reserved:world"]},"Type":"L3_L4","event_type":{"type":5},"traffic_direction":"EGRESS","policy_match_type":1,"drop_reason_desc":"POLICY_DENY"},"node_name":"kind-worker"}"#;

    const REDIRECTED: &str = r#"{"flow":{"time":"2024-05-01T12:00:04Z","verdict":"REDIRECTED","IP":{"source":"10.244.1.17","destination":"10.244.2.9","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":33000,"destination_port":80,"flags":{"SYN":true}}},"source":{"ID":3001,"identity":41312,"namespace":"shop","pod_name":"web-6d9f7c9b8-x2x7q"},"destination":{"identity":5123,"namespace":"shop","labels":["k8s:app=api"],"pod_name":"api-0"},"Type":"L3_L4","event_type":{"type":5},"traffic_direction":"EGRESS","policy_match_type":2,"is_reply":false},"node_name":"kind-worker","time":"2024-05-01T12:00:04Z"}"#;

    const POLICY_DROP: &str = r#"{"flow":{"time":"2024-05-01T12:00:05Z","verdict":"DROPPED","drop_reason":133,"IP":{"source":"172.18.0.1","destination":"10.244.1.17","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":60000,"destination_port":22,"flags":{"SYN":true}}},"source":{"identity":2,"labels":["reserved:world"]},"destination":{"ID":3001,"identity":41312,"namespace":"shop","labels":["k8s:app=web"],"pod_name":"web-6d9f7c9b8-x2x7q"},"Type":"L3_L4","node_name":"kind-worker","event_type":{"type":1,"sub_type":133},"traffic_direction":"INGRESS","drop_reason_desc":"POLICY_DENIED","file":{"name":"bpf_lxc.c","line":2087},"Summary":"TCP Flags: SYN"},"node_name":"kind-worker","time":"2024-05-01T12:00:05Z"}"#;

    #[test]
    fn audit_egress() {
        let p = parse(AUDIT);
        assert!(p.skipped.is_empty(), "{:?}", p.skipped);
        assert_eq!(
            p.verdicts,
            vec![CapturedVerdict {
                line: 1,
                endpoint_id: 3001,
                direction: Direction::Egress,
                remote_identity: 102,
                proto: 17,
                dst_port: 53,
                verdict: Verdict::Audited,
                match_type: 0,
                source: NotifySource::PolicyVerdict,
                reason: 0,
                ipv6: false,
                src_addr: ip("10.244.1.17"),
                dst_addr: ip("10.96.0.10"),
                src_port: Some(40215),
                time: at(1_714_564_801, 123_456_789),
                local_labels: vec!["k8s:app=web".into(), "k8s:io.kubernetes.pod.namespace=shop".into()],
                remote_labels: vec![
                    "k8s:k8s-app=kube-dns".into(),
                    "k8s:io.kubernetes.pod.namespace=kube-system".into()
                ],
                namespace: Some("shop".into()),
                pod: Some("web-6d9f7c9b8-x2x7q".into()),
            }]
        );
    }

    #[test]
    fn forwarded_ingress_local_is_destination() {
        let v = &parse(FORWARDED).verdicts[0];
        assert_eq!(
            (v.endpoint_id, v.direction, v.remote_identity, v.verdict, v.match_type, v.proto, v.dst_port, v.src_port),
            (3001, Direction::Ingress, 2, Verdict::Allowed, 2, 6, 8080, Some(51234))
        );
        assert_eq!(v.remote_labels, vec!["reserved:world".to_owned()]);
        assert_eq!(v.local_labels, vec!["k8s:app=web".to_owned()]);
        assert_eq!(v.namespace.as_deref(), Some("shop"));
        assert_eq!(v.time, at(1_714_564_802, 0));
    }

    #[test]
    fn dropped_verdict_ipv6_with_reason() {
        let v = &parse(DROPPED_VERDICT).verdicts[0];
        assert_eq!(
            (v.verdict, v.reason, v.ipv6, v.remote_identity, v.match_type, v.dst_port, v.source),
            (Verdict::Denied, 181, true, 16_777_217, 1, 443, NotifySource::PolicyVerdict)
        );
        assert_eq!(v.dst_addr, ip("2001:db8::5"));
        assert_eq!(v.time, at(1_714_564_803, 500_000_000));
        // drop_reason_desc alone is enough.
        let v = &parse(&DROPPED_VERDICT.replace(r#""drop_reason":181,"#, "")).verdicts[0];
        assert_eq!(v.reason, 181);
    }

    #[test]
    fn redirected() {
        let v = &parse(REDIRECTED).verdicts[0];
        assert_eq!(
            (v.verdict, v.remote_identity, v.dst_port, v.pod.as_deref()),
            (Verdict::Redirected, 5123, 80, Some("web-6d9f7c9b8-x2x7q"))
        );
    }

    #[test]
    fn policy_drop() {
        let v = &parse(POLICY_DROP).verdicts[0];
        assert_eq!(
            v,
            &CapturedVerdict {
                line: 1,
                endpoint_id: 3001,
                direction: Direction::Ingress,
                remote_identity: 2,
                proto: 0,
                dst_port: 0,
                verdict: Verdict::Denied,
                match_type: 0,
                source: NotifySource::PolicyDrop,
                reason: 133,
                ipv6: false,
                src_addr: ip("172.18.0.1"),
                dst_addr: ip("10.244.1.17"),
                src_port: Some(60000),
                time: at(1_714_564_805, 0),
                local_labels: vec!["k8s:app=web".into()],
                remote_labels: vec!["reserved:world".into()],
                namespace: Some("shop".into()),
                pod: Some("web-6d9f7c9b8-x2x7q".into()),
            }
        );
    }

    #[test]
    fn legacy_bare_flow_and_icmp() {
        let legacy = r#"{"time":"2023-01-02T03:04:05.000001Z","verdict":"FORWARDED","IP":{"source":"10.0.0.1","destination":"10.0.0.2","ipVersion":"IPv4"},"l4":{"ICMPv4":{"type":8}},"source":{"ID":12,"identity":300,"labels":["k8s:app=a"]},"destination":{"identity":301},"Type":"L3_L4","node_name":"n1","event_type":{"type":5},"traffic_direction":"EGRESS","policy_match_type":5}"#;
        let v = &parse(legacy).verdicts[0];
        assert_eq!((v.endpoint_id, v.remote_identity, v.proto, v.dst_port, v.match_type), (12, 301, 1, 8, 5));
        assert_eq!(v.time, at(1_672_628_645, 1_000));
        let v6 = legacy.replace(r#""ICMPv4":{"type":8}"#, r#""ICMPv6":{"type":128}"#).replace("IPv4", "IPv6");
        let v = &parse(&v6).verdicts[0];
        assert_eq!((v.proto, v.dst_port, v.ipv6), (58, 128, true));
    }

    #[test]
    fn skipped_lines_say_why() {
        let input = [
            r#"{"flow":{"verdict":"FORWARDED","event_type":{"type":4,"sub_type":3},"trace_observation_point":"TO_ENDPOINT","traffic_direction":"INGRESS"},"node_name":"n"}"#,
            r#"{"flow":{"verdict":"DROPPED","event_type":{"type":1,"sub_type":132},"drop_reason_desc":"INVALID_SOURCE_IP","traffic_direction":"EGRESS"}}"#,
            r#"{"lost_events":{"source":"HUBBLE_RING_BUFFER","num_events_lost":"12","cpu":null},"node_name":"n"}"#,
            r#"{"node_status":{"state_change":"NODE_CONNECTED","node_names":["n"]}}"#,
            "",
            "this is not json",
            r#"{"flow":{"verdict":"FORWARDED","event_type":{"type":5},"source":{"ID":1}}}"#,
            r#"{"flow":{"verdict":"FORWARDED","event_type":{"type":129},"l7":{"type":"REQUEST"},"traffic_direction":"INGRESS"}}"#,
            r#"{"flow":{"verdict":"DROPPED","event_type":{"type":1,"sub_type":133},"traffic_direction":"TRAFFIC_DIRECTION_UNKNOWN"}}"#,
        ]
        .join("\n");
        let p = parse(&input);
        assert_eq!(p.lines, 9);
        assert!(p.verdicts.is_empty());
        let r: Vec<(usize, &str)> = p.skipped.iter().map(|s| (s.line, s.reason.as_str())).collect();
        assert_eq!(r[0], (1, "Hubble flow of event type 4 (trace), not a policy verdict or drop"));
        assert_eq!(r[1], (2, "drop with a non-policy reason (INVALID_SOURCE_IP)"));
        assert_eq!(r[2], (3, "\"12\" flows lost (HUBBLE_RING_BUFFER): verdicts in them are missing from the capture"));
        assert_eq!(r[3], (4, "hubble relay node status event"));
        assert_eq!(r[4].0, 6);
        assert!(r[4].1.starts_with("not JSON"));
        assert_eq!(r[5], (7, "flow without a traffic direction (Hubble could not tell the local endpoint)"));
        assert_eq!(r[6], (8, "Hubble flow of event type 129 (L7 access log), not a policy verdict or drop"));
        assert_eq!(r[7].0, 9);
        assert_eq!(p.skipped.len(), 8);
    }

    #[test]
    fn numeric_enums_are_accepted() {
        let line = FORWARDED
            .replace(r#""verdict":"FORWARDED""#, r#""verdict":1"#)
            .replace(r#""traffic_direction":"INGRESS""#, r#""traffic_direction":1"#);
        assert_eq!(parse(&line).verdicts[0].verdict, Verdict::Allowed);
    }
}
