//! Reads `hubble observe -o json` (an alias of `-o jsonpb`: one
//! `GetFlowsResponse` per line, `{"flow":{...},"node_name":...,"time":...}`)
//! and the legacy bare-`Flow` lines (`HUBBLE_COMPAT=legacy-json-output`)
//! into [`CapturedVerdict`]s.
//!
//! Field names are protojson's proto names from Cilium's
//! `api/v1/flow/flow.proto`: `event_type`, `traffic_direction`,
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
//!   denied, source `PolicyDrop`. Drops with any other reason (205 and 207,
//!   new on main, included) are counted as benign.
//! * A flow without `event_type` (exporters with a field mask, older
//!   relays) is a verdict when it says so itself: verdict AUDIT, a
//!   `policy_match_type`, `*_allowed_by`/`*_denied_by`, or DROPPED with a
//!   policy drop reason. Any other such flow with a verdict is rejected:
//!   what it was cannot be told.
//! * Trace, debug, capture, L7 and agent events are benign, counted by kind.
//!
//! The local endpoint is the destination on ingress and the source on
//! egress; the other side gives the remote identity and labels. Host
//! firewall flows carry no endpoint ID for the host and Hubble labels
//! every host-firewall drop INGRESS (CILIUM.md j): a flow whose local side
//! has no ID but one side is the host (identity 1 or `reserved:host`) is
//! the host's, in the direction the host side says (source: egress), with
//! `local_is_host` set. A flow whose local side has no ID and is not the
//! host cannot be attributed and is rejected.
//!
//! An exporter-aggregated flow (`aggregate`, v1.19+) stands for the events
//! its counts say; one whose counts cannot be read is rejected. Redacted
//! addresses read as unknown, with their ports.

use std::{io::BufRead, net::IpAddr};

use serde_json::Value;
use verdict_common::cilium::{drop_reason, notify_type};

use crate::{
    cilium::{
        capture_lines::{
            CaptureError, CaptureParse, Line, LineOutcome, LineReader, MAX_LINE_BYTES, kind, read_capture,
        },
        monitor::api::drop_reason_from_hubble_name,
    },
    model::{CapturedVerdict, Direction, NotifySource, Verdict},
    timefmt::parse_rfc3339,
};

/// Reads a whole `hubble observe -o json` capture; fails only on binary input.
pub fn parse_hubble_json<R: BufRead>(input: R) -> Result<CaptureParse, CaptureError> {
    read_capture(input, |line, reader| {
        if let Some((joined, n)) = rejoin_json(line, reader) {
            return Ok((parse_line(&joined), n));
        }
        Ok((parse_line(line), 0))
    })
}

/// Lines a JSON object may be wrapped over (a 2 KiB flow at 80 columns is 26).
const MAX_JSON_LINES: usize = 64;

/// A flow a terminal or page wrapped over several lines: the object that
/// starts here and ends on a following line, joined directly. Whitespace
/// between JSON tokens is insignificant, and no field read here (numbers,
/// enums, addresses, names, labels) can hold a space, so a space lost at a
/// page's wrap changes nothing read.
fn rejoin_json<R: BufRead>(line: &Line, reader: &mut LineReader<R>) -> Option<(Line, usize)> {
    let first = line.text.trim();
    if !first.starts_with('{') || !serde_json::from_str::<Value>(first).err()?.is_eof() {
        return None;
    }
    let mut joined = first.to_owned();
    for n in 1..=MAX_JSON_LINES {
        let next = reader.peek(n - 1).ok()??;
        let t = next.text.trim();
        if next.binary || next.overlong.is_some() || t.starts_with("{\"flow\"") || t.is_empty() {
            return None;
        }
        joined.push_str(t);
        if joined.len() > MAX_LINE_BYTES {
            return None;
        }
        match serde_json::from_str::<Value>(&joined) {
            Ok(_) => {
                reader.consume_ahead(n);
                return Some((Line { text: joined, ..line.clone() }, n));
            }
            Err(e) if e.is_eof() => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Keys whose presence makes a line look like a verdict.
const VERDICT_KEYS: &[&str] = &["\"verdict\"", "\"drop_reason", "\"policy_match_type\"", "\"event_type\""];

fn looks_like_verdict(text: &str) -> bool {
    VERDICT_KEYS.iter().any(|k| text.contains(k))
}

fn parse_line(line: &Line) -> LineOutcome {
    let text = line.text.trim();
    if text.is_empty() {
        return LineOutcome::Blank;
    }
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) if looks_like_verdict(text) => {
            return LineOutcome::Rejected(format!("a flow that is not valid JSON (cut or wrapped?): {e}"));
        }
        Err(e) => return LineOutcome::Unknown(format!("not JSON: {e}")),
    };
    let (flow, envelope_time) = if let Some(flow) = v.get("flow") {
        (flow, v.get("time"))
    } else if v.get("node_status").is_some() {
        return LineOutcome::Benign(kind::NODE_STATUS);
    } else if let Some(lost) = v.get("lost_events") {
        let n = u64_of(lost.get("num_events_lost")).unwrap_or(0);
        return LineOutcome::Lost(
            n,
            format!("{n} flows lost ({}): verdicts in them are missing", text_of(lost.get("source"))),
        );
    } else if v.get("event_type").is_some() || v.get("verdict").is_some() {
        (&v, None)
    } else if looks_like_verdict(text) {
        return LineOutcome::Rejected("JSON naming verdict fields, but neither a GetFlowsResponse nor a Flow".into());
    } else {
        return LineOutcome::Unknown("JSON, but neither a GetFlowsResponse nor a Flow".into());
    };
    match flow_verdict(flow, envelope_time, line.number) {
        Ok(Some(v)) => LineOutcome::Verdict(Box::new(v)),
        Ok(None) => LineOutcome::Benign(benign_kind(flow)),
        Err(why) => LineOutcome::Rejected(why),
    }
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

/// The benign kind of a flow that is not a verdict.
fn benign_kind(flow: &Value) -> &'static str {
    let t = u64_of(flow.get("event_type").and_then(|e| e.get("type")));
    match t {
        Some(1) => kind::NON_POLICY_DROP,
        Some(2) => kind::DEBUG,
        Some(3 | 6) => kind::CAPTURE,
        Some(129) => kind::L7,
        Some(130) => kind::AGENT_EVENT,
        Some(4 | 7) => kind::TRACE,
        _ if flow.get("l7").is_some() => kind::L7,
        _ if flow.get("trace_observation_point").is_some() => kind::TRACE,
        _ if flow.get("verdict").is_some_and(|v| v == "DROPPED" || v == 2) => kind::NON_POLICY_DROP,
        _ => kind::OTHER_EVENT,
    }
}

/// The policy drop reason a flow names, if it names one.
fn policy_reason_of(flow: &Value) -> Option<u8> {
    let code = u64_of(flow.get("drop_reason")).and_then(|c| u8::try_from(c).ok()).filter(|&c| c != 0).or_else(
        || match flow.get("drop_reason_desc") {
            Some(Value::String(name)) => drop_reason_from_hubble_name(name),
            Some(Value::Number(n)) => n.as_u64().and_then(|n| u8::try_from(n).ok()),
            _ => None,
        },
    )?;
    drop_reason::is_policy(code).then_some(code)
}

/// The event type a flow without `event_type` must have been, when the flow
/// says; `Err` when it has a verdict and cannot be told.
fn implied_event_type(flow: &Value) -> Result<Option<u8>, String> {
    if flow.get("l7").is_some() || flow.get("trace_observation_point").is_some() {
        return Ok(None);
    }
    let verdict = enum_of(flow.get("verdict"), VERDICTS);
    let policy_named = flow.get("policy_match_type").is_some()
        || ["ingress_allowed_by", "egress_allowed_by", "ingress_denied_by", "egress_denied_by"]
            .iter()
            .any(|k| flow.get(k).is_some());
    match verdict {
        Some("AUDIT") => Ok(Some(notify_type::POLICY_VERDICT)),
        Some("DROPPED") if policy_reason_of(flow).is_some() => {
            Ok(Some(if policy_named { notify_type::POLICY_VERDICT } else { notify_type::DROP }))
        }
        Some("DROPPED") => Ok(None),
        Some("FORWARDED" | "REDIRECTED") if policy_named => Ok(Some(notify_type::POLICY_VERDICT)),
        Some(v) => Err(format!(
            "flow without event_type, verdict {v}: it cannot be told whether it was a policy verdict (capture with \
             `hubble observe --type policy-verdict -o jsonpb`)"
        )),
        None => Ok(None),
    }
}

/// Whether an `Endpoint` object is the host.
fn is_host(ep: &Value) -> bool {
    u64_of(ep.get("identity")) == Some(1) || strings(ep.get("labels")).iter().any(|l| l == "reserved:host")
}

/// The events an exporter-aggregated flow stands for.
fn aggregated_events(flow: &Value) -> Result<u64, String> {
    let Some(agg) = flow.get("aggregate") else { return Ok(1) };
    let counts: Vec<u64> = match agg {
        Value::Object(m) => {
            m.iter().filter(|(k, _)| k.ends_with("count")).filter_map(|(_, v)| u64_of(Some(v))).collect()
        }
        other => u64_of(Some(other)).into_iter().collect(),
    };
    match counts.iter().sum::<u64>() {
        0 => Err(format!(
            "exporter-aggregated flow whose event count cannot be read ({}): how many events it stands for is unknown",
            clip(&agg.to_string())
        )),
        n => Ok(n),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// An address field: the address, or `None` and redacted when it is
/// something else (`10.xxx.0.xxx`, `<redacted>`).
fn address(ip: Option<&Value>, key: &str) -> (Option<IpAddr>, bool) {
    match ip.and_then(|ip| ip.get(key)).and_then(Value::as_str) {
        None | Some("") => (None, false),
        Some(s) => match s.parse::<IpAddr>() {
            Ok(a) => (Some(a), false),
            Err(_) => (None, true),
        },
    }
}

fn flow_verdict(flow: &Value, envelope_time: Option<&Value>, line: usize) -> Result<Option<CapturedVerdict>, String> {
    let event = flow.get("event_type");
    let event_type = match event {
        Some(e) => {
            u64_of(e.get("type")).ok_or_else(|| format!("event_type {} has no readable type", clip(&e.to_string())))?
        }
        None => match implied_event_type(flow)? {
            Some(t) => u64::from(t),
            None => return Ok(None),
        },
    };
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
            let code = match event {
                Some(e) => {
                    let sub = u64_of(e.get("sub_type")).unwrap_or(0);
                    u8::try_from(sub).map_err(|_| format!("drop sub_type {sub} out of range"))?
                }
                None => policy_reason_of(flow).unwrap_or(0),
            };
            if !drop_reason::is_policy(code) {
                return Ok(None);
            }
            (Verdict::Denied, NotifySource::PolicyDrop, code)
        }
        _ => return Ok(None),
    };

    let empty = Value::Null;
    let src = flow.get("source").unwrap_or(&empty);
    let dst = flow.get("destination").unwrap_or(&empty);
    let labelled = enum_of(flow.get("traffic_direction"), DIRECTIONS);
    let by_label = match labelled {
        Some("INGRESS") => Some(Direction::Ingress),
        Some("EGRESS") => Some(Direction::Egress),
        _ => None,
    };
    let has_id = |ep: &Value| u64_of(ep.get("ID")).is_some_and(|id| id != 0);
    let local_of = |d: Direction| match d {
        Direction::Ingress => dst,
        Direction::Egress => src,
    };
    let (direction, local_is_host) = match by_label {
        Some(d) if has_id(local_of(d)) => (d, false),
        // The host has no endpoint ID in Hubble, and its drops all say INGRESS.
        _ if is_host(src) && !is_host(dst) => (Direction::Egress, true),
        _ if is_host(dst) && !is_host(src) => (Direction::Ingress, true),
        _ if is_host(src) && is_host(dst) => (by_label.unwrap_or(Direction::Ingress), true),
        Some(_) => {
            return Err("the flow's local side has no endpoint ID and is not the host: it cannot be attributed to an \
                 endpoint"
                .into());
        }
        None => return Err("flow without a traffic direction (Hubble could not tell the local endpoint)".into()),
    };
    let (local, remote) = match direction {
        Direction::Ingress => (dst, src),
        Direction::Egress => (src, dst),
    };
    // 0 for the host unless Hubble names its ID (host correlation, main 2026-08).
    let local_id = u64_of(local.get("ID")).unwrap_or(0);
    let endpoint_id =
        u16::try_from(local_id).map_err(|_| format!("endpoint ID {local_id} is outside Cilium's range"))?;
    let remote_identity = u64_of(remote.get("identity")).unwrap_or(0);
    let remote_identity =
        u32::try_from(remote_identity).map_err(|_| format!("identity {remote_identity} is out of range"))?;

    let ip = flow.get("IP");
    let ((src_addr, r1), (dst_addr, r2)) = (address(ip, "source"), address(ip, "destination"));
    let ipv6 = match enum_of(ip.and_then(|ip| ip.get("ipVersion")), IP_VERSIONS) {
        Some("IPv6") => true,
        Some("IPv4") => false,
        _ => src_addr.or(dst_addr).is_some_and(|a| a.is_ipv6()),
    };

    let l4 = layer4(flow.get("l4"));
    let match_type = if source == NotifySource::PolicyVerdict {
        let m = u64_of(flow.get("policy_match_type")).unwrap_or(0);
        u8::try_from(m).map_err(|_| format!("policy_match_type {m} out of range"))?
    } else {
        0
    };
    let time = flow.get("time").or(envelope_time).and_then(Value::as_str).and_then(|t| parse_rfc3339(t).ok());
    let events = aggregated_events(flow)?;

    Ok(Some(CapturedVerdict {
        line,
        endpoint_id,
        direction,
        remote_identity,
        proto: l4.proto,
        dst_port: l4.dst_port,
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
        events,
        local_is_host,
        redacted: r1 || r2,
    }))
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
        collections::BTreeMap,
        io::Cursor,
        time::{Duration, SystemTime},
    };

    use super::*;

    fn parse(text: &str) -> CaptureParse {
        parse_hubble_json(Cursor::new(text.as_bytes())).unwrap()
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
        assert!(p.rejected.is_empty() && p.unknown.is_empty(), "{:?} {:?}", p.rejected, p.unknown);
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
                events: 1,
                local_is_host: false,
                redacted: false,
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
                proto: 6,
                dst_port: 22,
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
                events: 1,
                local_is_host: false,
                redacted: false,
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
        let r: Vec<(usize, &str)> = p.rejected.iter().map(|s| (s.line, s.reason.as_str())).collect();
        assert_eq!(r[0], (7, "flow without a traffic direction (Hubble could not tell the local endpoint)"));
        assert_eq!(r[1].0, 9);
        assert_eq!(p.rejected_total, 2);
        assert_eq!((p.unknown_total, p.unknown[0].line), (1, 6));
        assert!(p.unknown[0].reason.starts_with("not JSON"));
        assert_eq!(p.lost_events, 12);
        assert_eq!(
            p.benign,
            BTreeMap::from([
                (kind::TRACE, 1),
                (kind::NON_POLICY_DROP, 1),
                (kind::LOST, 1),
                (kind::NODE_STATUS, 1),
                (kind::L7, 1)
            ])
        );
    }

    #[test]
    fn numeric_enums_are_accepted() {
        let line = FORWARDED
            .replace(r#""verdict":"FORWARDED""#, r#""verdict":1"#)
            .replace(r#""traffic_direction":"INGRESS""#, r#""traffic_direction":1"#);
        assert_eq!(parse(&line).verdicts[0].verdict, Verdict::Allowed);
    }

    #[test]
    fn a_wrapped_flow_is_rejoined() {
        let chunks: Vec<String> = AUDIT.as_bytes().chunks(80).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect();
        let input = format!("{}\n{FORWARDED}\n", chunks.join("\n"));
        let p = parse(&input);
        assert_eq!((p.rejected_total, p.unknown_total, p.rejoined), (0, 0, 1), "{:?}", p.rejected);
        assert_eq!(p.verdicts.len(), 2);
        assert_eq!((p.verdicts[0].line, p.verdicts[0].dst_port), (1, 53));
        assert_eq!(p.verdicts[1].line, chunks.len() + 1);
        // A flow cut off for good is rejected, and the next one still read.
        let p = parse(&format!("{}\n{FORWARDED}\n", &AUDIT[..300]));
        assert_eq!((p.rejected_total, p.verdicts.len()), (1, 1));
    }

    #[test]
    fn host_firewall_drop_labelled_ingress_is_the_hosts_egress() {
        let line = r#"{"flow":{"time":"2026-11-22T10:01:00Z","verdict":"DROPPED","IP":{"source":"10.0.0.11","destination":"203.0.113.53","ipVersion":"IPv4"},"l4":{"UDP":{"source_port":41000,"destination_port":53}},"source":{"identity":1,"labels":["reserved:host"]},"destination":{"identity":2,"labels":["reserved:world"]},"event_type":{"type":1,"sub_type":133},"traffic_direction":"INGRESS"}}"#;
        let v = &parse(line).verdicts[0];
        assert_eq!(
            (v.direction, v.local_is_host, v.remote_identity, v.proto, v.dst_port),
            (Direction::Egress, true, 2, 17, 53)
        );
        // Where Hubble names the host's ID (main), it is kept.
        let v = &parse(&line.replace(r#""source":{"identity":1,"#, r#""source":{"ID":5,"identity":1,"#)).verdicts[0];
        assert_eq!((v.endpoint_id, v.direction, v.local_is_host), (5, Direction::Egress, true));
        // No ID and not the host: not attributable.
        let p = parse(&line.replace(r#"{"identity":1,"labels":["reserved:host"]}"#, r#"{"identity":41312}"#));
        assert_eq!(p.rejected_total, 1);
        assert!(p.rejected[0].reason.contains("cannot be attributed"), "{}", p.rejected[0].reason);
    }

    #[test]
    fn aggregated_flows_and_flows_without_event_type() {
        let agg = FORWARDED
            .replace(r#""Summary""#, r#""aggregate":{"ingress_flow_count":"7","egress_flow_count":2},"Summary""#);
        assert_eq!(parse(&agg).verdicts[0].events, 9);
        let unreadable = FORWARDED.replace(r#""Summary""#, r#""aggregate":{"state":"x"},"Summary""#);
        assert_eq!(parse(&unreadable).rejected_total, 1);
        let no_type = FORWARDED.replace(r#""event_type":{"type":5},"#, "");
        // FORWARDED with policy_match_type 2: a verdict.
        assert_eq!(parse(&no_type).verdicts[0].verdict, Verdict::Allowed);
        let bare = no_type.replace(r#""policy_match_type":2,"#, "");
        let p = parse(&bare);
        assert_eq!(p.rejected_total, 1, "FORWARDED alone cannot be told from a trace");
        let drop205 = POLICY_DROP.replace(r#""sub_type":133"#, r#""sub_type":205"#);
        assert_eq!(parse(&drop205).benign[kind::NON_POLICY_DROP], 1);
    }
}
