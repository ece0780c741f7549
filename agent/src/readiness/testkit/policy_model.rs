//! A small model of Cilium's L3/L4 allow policy, enough to replay the
//! scenarios: which (endpoint, direction, peer, protocol, port) a set of
//! CiliumNetworkPolicies and CiliumClusterwideNetworkPolicies allows.
//!
//! It reads the policies through their JSON form, where the two CRDs share
//! field names. Covered: endpointSelector / nodeSelector (matchLabels,
//! matchExpressions), from/toEntities, from/toEndpoints (with a CNP's
//! implicit namespace), from/toCIDR and CIDRSet (without excepts), toPorts
//! (port, endPort, protocol), icmps. Default deny per direction as Cilium
//! applies it: once some policy with rules in that direction selects the
//! endpoint. Deny rules and L7 are out of scope (never suggested).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_crds_cilium::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy};
use serde_json::Value;

use crate::{model::Direction, readiness::RemoteSide};

#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    Namespaced(CiliumNetworkPolicy),
    Clusterwide(CiliumClusterwideNetworkPolicy),
}

impl Policy {
    fn parts(&self) -> (Option<String>, Value) {
        match self {
            Policy::Namespaced(p) => {
                (p.metadata.namespace.clone(), serde_json::to_value(&p.spec).expect("spec to JSON"))
            }
            Policy::Clusterwide(p) => (None, serde_json::to_value(&p.spec).expect("spec to JSON")),
        }
    }

    /// Every document of a YAML stream, by `kind`.
    pub fn parse_stream(yaml: &str) -> Vec<Policy> {
        let mut out = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("YAML document");
            match v.get("kind").and_then(|k| k.as_str()) {
                Some("CiliumNetworkPolicy") => {
                    out.push(Policy::Namespaced(serde_yaml::from_value(v).expect("typed CNP")))
                }
                Some("CiliumClusterwideNetworkPolicy") => {
                    out.push(Policy::Clusterwide(serde_yaml::from_value(v).expect("typed CCNP")))
                }
                _ => {}
            }
        }
        out
    }
}

/// The endpoint a policy may select.
#[derive(Clone, Debug)]
pub struct Subject {
    /// "source:key=value".
    pub labels: Vec<String>,
    pub namespace: Option<String>,
    pub is_host: bool,
    pub node_labels: BTreeMap<String, String>,
}

/// The other side of the traffic.
#[derive(Clone, Debug)]
pub struct Peer {
    pub identity: u32,
    pub labels: Vec<String>,
    pub addrs: Vec<IpAddr>,
}

fn split_label(l: &str) -> Option<(&str, &str, &str)> {
    let (sk, v) = l.split_once('=').unwrap_or((l, ""));
    let (src, k) = sk.split_once(':')?;
    Some((src, k, v))
}

/// Cilium's label matching: a selector key `source:key` matches that
/// source only, a bare `key` (or `any:key`) any source.
fn label_value<'a>(labels: &'a [String], key: &str) -> Option<&'a str> {
    let (want_src, want_key) = match key.split_once(':') {
        Some((s, k)) if s != "any" => (Some(s), k),
        Some((_, k)) => (None, k),
        None => (None, key),
    };
    labels.iter().find_map(|l| {
        let (src, k, v) = split_label(l)?;
        (k == want_key && want_src.is_none_or(|s| s == src)).then_some(v)
    })
}

fn selector_matches(sel: &Value, labels: &[String]) -> bool {
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in ml {
            if label_value(labels, k) != v.as_str() {
                return false;
            }
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let have = label_value(labels, key);
            let ok = match e["operator"].as_str().unwrap_or_default() {
                "In" => have.is_some_and(|h| values.contains(&h)),
                "NotIn" => have.is_none_or(|h| !values.contains(&h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

fn node_selector_matches(sel: &Value, node_labels: &BTreeMap<String, String>) -> bool {
    let labels: Vec<String> = node_labels.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect();
    selector_matches(sel, &labels)
}

fn selects(namespace: &Option<String>, spec: &Value, s: &Subject) -> bool {
    if let Some(ns) = namespace
        && s.namespace.as_ref() != Some(ns)
    {
        return false;
    }
    if let Some(sel) = spec.get("nodeSelector") {
        return s.is_host && node_selector_matches(sel, &s.node_labels);
    }
    match spec.get("endpointSelector") {
        Some(sel) => !s.is_host && selector_matches(sel, &s.labels),
        None => false,
    }
}

fn entity_identities(entity: &str, identity: u32) -> bool {
    let side = RemoteSide::of_identity(identity);
    match entity {
        "all" => true,
        "world" => side == RemoteSide::World,
        "cluster" => !matches!(side, RemoteSide::World | RemoteSide::Unknown),
        "host" => side == RemoteSide::Host,
        "remote-node" => side == RemoteSide::RemoteNode,
        "kube-apiserver" => side == RemoteSide::KubeApiserver,
        "health" => side == RemoteSide::Health,
        "init" => side == RemoteSide::Init,
        "ingress" => side == RemoteSide::Ingress,
        "unmanaged" => side == RemoteSide::Unmanaged,
        _ => false,
    }
}

fn cidr_contains(cidr: &str, addr: &IpAddr) -> bool {
    let Some((net, len)) = cidr.split_once('/') else { return false };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else { return false };
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len.min(32)) };
            (u32::from(n) & mask) == (u32::from(*a) & mask)
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len.min(128)) };
            (u128::from(n) & mask) == (u128::from(*a) & mask)
        }
        _ => false,
    }
}

fn peer_matches(rule: &Value, dir: Direction, policy_ns: &Option<String>, peer: &Peer) -> bool {
    let (ents, eps, cidr, cidrset) = match dir {
        Direction::Ingress => ("fromEntities", "fromEndpoints", "fromCIDR", "fromCIDRSet"),
        Direction::Egress => ("toEntities", "toEndpoints", "toCIDR", "toCIDRSet"),
    };
    let mut any_peer_field = false;
    if let Some(list) = rule.get(ents).and_then(Value::as_array) {
        any_peer_field = true;
        if list.iter().filter_map(Value::as_str).any(|e| entity_identities(e, peer.identity)) {
            return true;
        }
    }
    if let Some(list) = rule.get(eps).and_then(Value::as_array) {
        any_peer_field = true;
        let side = RemoteSide::of_identity(peer.identity);
        for sel in list {
            let labels = &peer.labels;
            // A CNP's endpoint selector without a namespace means its own.
            let names_ns = sel
                .get("matchLabels")
                .and_then(Value::as_object)
                .is_some_and(|m| m.keys().any(|k| k.ends_with("io.kubernetes.pod.namespace")));
            if let (Some(ns), false) = (policy_ns, names_ns)
                && label_value(labels, "k8s:io.kubernetes.pod.namespace") != Some(ns.as_str())
            {
                continue;
            }
            if side == RemoteSide::Cluster && selector_matches(sel, labels) {
                return true;
            }
        }
    }
    let mut cidrs: Vec<String> = rule
        .get(cidr)
        .and_then(Value::as_array)
        .map(|v| v.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    if let Some(set) = rule.get(cidrset).and_then(Value::as_array) {
        cidrs.extend(set.iter().filter_map(|c| c.get("cidr").and_then(Value::as_str)).map(str::to_owned));
    }
    if rule.get(cidr).is_some() || rule.get(cidrset).is_some() {
        any_peer_field = true;
        // CIDR rules only ever match traffic from outside the cluster.
        if RemoteSide::of_identity(peer.identity) == RemoteSide::World
            && !peer.addrs.is_empty()
            && peer.addrs.iter().all(|a| cidrs.iter().any(|c| cidr_contains(c, a)))
        {
            return true;
        }
    }
    // No peer field: the rule is L4-only and applies to every peer.
    !any_peer_field
}

fn l4_matches(rule: &Value, proto: u8, port: u16, icmp_type: Option<u8>) -> bool {
    let to_ports = rule.get("toPorts").and_then(Value::as_array);
    let icmps = rule.get("icmps").and_then(Value::as_array);
    if to_ports.is_none() && icmps.is_none() {
        return true;
    }
    if let Some(tp) = to_ports {
        for pr in tp {
            for p in pr.get("ports").and_then(Value::as_array).into_iter().flatten() {
                let want = p.get("protocol").and_then(Value::as_str).unwrap_or("ANY");
                let proto_ok = match want {
                    "TCP" => proto == 6,
                    "UDP" => proto == 17,
                    "SCTP" => proto == 132,
                    "ANY" => matches!(proto, 6 | 17 | 132),
                    "GRE" => proto == 47,
                    "ESP" => proto == 50,
                    "AH" => proto == 51,
                    "VRRP" => proto == 112,
                    "IGMP" => proto == 2,
                    "IPIP" => proto == 4,
                    "IPV6" => proto == 41,
                    _ => false,
                };
                if !proto_ok {
                    continue;
                }
                let first: u16 = p.get("port").and_then(Value::as_str).and_then(|s| s.parse().ok()).unwrap_or(0);
                let end = p.get("endPort").and_then(Value::as_u64).map(|e| e as u16);
                let port_ok = first == 0
                    || match end {
                        Some(e) => (first..=e).contains(&port),
                        None => port == first,
                    };
                if port_ok {
                    return true;
                }
            }
        }
    }
    if let Some(ic) = icmps
        && matches!(proto, 1 | 58)
    {
        let ty = icmp_type.unwrap_or(port as u8);
        for r in ic {
            for f in r.get("fields").and_then(Value::as_array).into_iter().flatten() {
                let fam_v6 = f.get("family").and_then(Value::as_str) == Some("IPv6");
                let t = match &f["type"] {
                    Value::Number(n) => n.as_u64().map(|n| n as u8),
                    Value::String(s) => match s.as_str() {
                        "EchoRequest" | "Echo" => Some(if fam_v6 { 128 } else { 8 }),
                        other => other.parse().ok(),
                    },
                    _ => None,
                };
                if (proto == 58) == fam_v6 && t == Some(ty) {
                    return true;
                }
            }
        }
    }
    false
}

/// Whether the policies allow the traffic: a rule allows it, or no policy
/// with rules in that direction selects the endpoint (no default deny).
pub fn allows(
    policies: &[Policy],
    s: &Subject,
    dir: Direction,
    peer: &Peer,
    proto: u8,
    port: u16,
    icmp_type: Option<u8>,
) -> bool {
    let (allowed, enforced) = evaluate(policies, s, dir, peer, proto, port, icmp_type);
    allowed || !enforced
}

/// Whether some rule of the policies allows the traffic (what a policy
/// adds, regardless of default deny).
pub fn rule_allows(
    policies: &[Policy],
    s: &Subject,
    dir: Direction,
    peer: &Peer,
    proto: u8,
    port: u16,
    icmp_type: Option<u8>,
) -> bool {
    evaluate(policies, s, dir, peer, proto, port, icmp_type).0
}

fn evaluate(
    policies: &[Policy],
    s: &Subject,
    dir: Direction,
    peer: &Peer,
    proto: u8,
    port: u16,
    icmp_type: Option<u8>,
) -> (bool, bool) {
    let key = match dir {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let mut enforced = false;
    for p in policies {
        let (ns, spec) = p.parts();
        if !selects(&ns, &spec, s) {
            continue;
        }
        let Some(rules) = spec.get(key).and_then(Value::as_array) else { continue };
        enforced = true;
        for r in rules {
            if peer_matches(r, dir, &ns, peer) && l4_matches(r, proto, port, icmp_type) {
                return (true, true);
            }
        }
    }
    (false, enforced)
}
