//! `verdict-agent suggest`: policies that allow exactly the would-deny
//! flows a readiness report lists, as CiliumNetworkPolicy (pods) or
//! CiliumClusterwideNetworkPolicy with a `nodeSelector` (the host).
//!
//! Built from the typed CRD structs of `k8s-crds-cilium`, serialized to YAML,
//! then annotated with one comment per rule (counts, first and last seen,
//! and whatever makes the rule wider than what was observed). Scan noise
//! never reaches the report's `would_deny`, so it is never suggested.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::SystemTime,
};

use k8s_crds_cilium::{
    CiliumClusterwideNetworkPolicy, CiliumClusterwideNetworkPolicyEgress, CiliumClusterwideNetworkPolicyEgressIcmps,
    CiliumClusterwideNetworkPolicyEgressIcmpsFields, CiliumClusterwideNetworkPolicyEgressIcmpsFieldsFamily,
    CiliumClusterwideNetworkPolicyEgressToEndpoints, CiliumClusterwideNetworkPolicyEgressToPorts,
    CiliumClusterwideNetworkPolicyEgressToPortsPorts, CiliumClusterwideNetworkPolicyEgressToPortsPortsProtocol,
    CiliumClusterwideNetworkPolicyIngress, CiliumClusterwideNetworkPolicyIngressFromEndpoints,
    CiliumClusterwideNetworkPolicyIngressIcmps, CiliumClusterwideNetworkPolicyIngressIcmpsFields,
    CiliumClusterwideNetworkPolicyIngressIcmpsFieldsFamily, CiliumClusterwideNetworkPolicyIngressToPorts,
    CiliumClusterwideNetworkPolicyIngressToPortsPorts, CiliumClusterwideNetworkPolicyIngressToPortsPortsProtocol,
    CiliumClusterwideNetworkPolicyNodeSelector, CiliumClusterwideNetworkPolicySpec, CiliumNetworkPolicy,
    CiliumNetworkPolicyEgress, CiliumNetworkPolicyEgressIcmps, CiliumNetworkPolicyEgressIcmpsFields,
    CiliumNetworkPolicyEgressIcmpsFieldsFamily, CiliumNetworkPolicyEgressToEndpoints, CiliumNetworkPolicyEgressToPorts,
    CiliumNetworkPolicyEgressToPortsPorts, CiliumNetworkPolicyEgressToPortsPortsProtocol,
    CiliumNetworkPolicyEndpointSelector, CiliumNetworkPolicyIngress, CiliumNetworkPolicyIngressFromEndpoints,
    CiliumNetworkPolicyIngressIcmps, CiliumNetworkPolicyIngressIcmpsFields,
    CiliumNetworkPolicyIngressIcmpsFieldsFamily, CiliumNetworkPolicyIngressToPorts,
    CiliumNetworkPolicyIngressToPortsPorts, CiliumNetworkPolicyIngressToPortsPortsProtocol, CiliumNetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString};
use thiserror::Error;

use crate::{
    model::{Direction, EndpointKind},
    readiness::{
        RemoteSide,
        report::{EndpointReadiness, FlowEntry, ReadinessReport},
    },
    text::escape_for_terminal as escape,
    timefmt::format_rfc3339,
};

mod cli;
#[cfg(test)]
mod hostile_tests;
pub mod labels;
mod render;

pub use cli::{SuggestArgs, SuggestFormat, run, run_with};
pub use render::render;

/// Choices the report cannot make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuggestOptions {
    /// A world flow with at most this many remote addresses is allowed by
    /// address (`fromCIDR`/`toCIDR`); above it, as the whole `world`.
    pub max_cidrs: usize,
    /// The node's name when the report does not carry it.
    pub node: Option<String>,
    /// Overrides the host policy's nodeSelector (`key=value` pairs).
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Prefix of suggested policy names.
    pub name_prefix: String,
    /// The flows' times are stand-ins (a capture without timestamps):
    /// comments then leave first/last seen out.
    pub times_unknown: bool,
}

impl Default for SuggestOptions {
    fn default() -> Self {
        SuggestOptions {
            max_cidrs: 8,
            node: None,
            node_selector: None,
            name_prefix: "allow-observed".into(),
            times_unknown: false,
        }
    }
}

#[derive(Debug, Error)]
pub enum SuggestError {
    #[error(
        "no endpoint in the report matches \"{}\"; use `host`, an endpoint ID, or NAMESPACE/POD as `preflight` lists them",
        escape(selector)
    )]
    NoSuchEndpoint { selector: String },
    #[error("cannot serialize the suggested policy {name}")]
    Yaml {
        name: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("refusing to print the suggested policy {name}: {problem}; this is a bug, please report it with the input")]
    Unsafe { name: String, problem: String },
}

/// Either kind of policy, as built.
#[derive(Clone, Debug, PartialEq)]
pub enum SuggestedPolicy {
    Namespaced(CiliumNetworkPolicy),
    Clusterwide(CiliumClusterwideNetworkPolicy),
}

impl SuggestedPolicy {
    pub fn name(&self) -> String {
        match self {
            SuggestedPolicy::Namespaced(p) => p.metadata.name.clone().unwrap_or_default(),
            SuggestedPolicy::Clusterwide(p) => p.metadata.name.clone().unwrap_or_default(),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            SuggestedPolicy::Namespaced(_) => "CiliumNetworkPolicy",
            SuggestedPolicy::Clusterwide(_) => "CiliumClusterwideNetworkPolicy",
        }
    }
}

/// One endpoint's suggestion, or why there is none.
#[derive(Clone, Debug, PartialEq)]
pub struct Suggestion {
    pub endpoint_id: u16,
    pub endpoint: String,
    pub policy: Option<SuggestedPolicy>,
    /// Comment per rule, ingress rules first, in the policy's order.
    pub rule_comments: Vec<String>,
    /// What the policy does not cover, or covers wider than observed.
    pub notes: Vec<String>,
}

/// Who a rule allows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Peer {
    Entity(String),
    Endpoints(BTreeMap<String, String>),
    Cidrs(BTreeSet<String>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum L4Proto {
    Tcp,
    Udp,
    Sctp,
    Other(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortItem {
    proto: L4Proto,
    port: u16,
    end: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum L4Kind {
    Ports,
    Icmp,
}

/// One rule before it becomes a CRD struct.
#[derive(Clone, Debug)]
struct RuleSpec {
    direction: Direction,
    /// Would-deny flows this rule allows.
    flows: usize,
    peer: Peer,
    ports: Vec<PortItem>,
    /// (ipv6, type)
    icmp: Vec<(bool, u8)>,
    comment: String,
}

#[derive(Default)]
struct Group {
    flows: usize,
    notifications: u64,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
    ports: BTreeSet<(L4Proto, u16)>,
    icmp: BTreeSet<(bool, u8)>,
    icmp_assumed: bool,
    widened: Option<String>,
}

/// The longest `cidr:` label of a CIDR identity (Cilium writes IPv6 with
/// `-` for `:`), as a prefix for fromCIDR/toCIDR.
fn cidr_from_labels(labels: &[String]) -> Option<String> {
    labels
        .iter()
        .filter_map(|l| l.strip_prefix("cidr:"))
        .map(|c| if c.contains('.') { c.to_owned() } else { c.replace('-', ":") })
        .filter_map(|c| {
            let (addr, len) = c.split_once('/')?;
            addr.parse::<IpAddr>().ok()?;
            Some((len.parse::<u8>().ok()?, c.clone()))
        })
        .max()
        .map(|(_, c)| c)
}

fn host_cidr(a: &IpAddr) -> String {
    match a {
        IpAddr::V4(_) => format!("{a}/32"),
        IpAddr::V6(_) => format!("{a}/128"),
    }
}

/// A DNS-subdomain object name from `s`: lower case, every other character
/// `-`, at most 253 characters; `fallback` when nothing usable is left.
fn dns_name(s: &str, fallback: &str) -> String {
    let mut out: String =
        s.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    out.truncate(253);
    let out = out.trim_matches('-').to_owned();
    if labels::is_dns_subdomain(&out) { out } else { fallback.to_owned() }
}

fn peer_for(f: &FlowEntry, opts: &SuggestOptions) -> Result<(Peer, Option<String>), String> {
    let side = RemoteSide::parse(&f.remote).unwrap_or_else(|| RemoteSide::of_identity(f.remote_identity));
    match side {
        RemoteSide::World => {
            if !f.remote_addrs.is_empty() && f.remote_addrs.len() <= opts.max_cidrs {
                return Ok((Peer::Cidrs(f.remote_addrs.iter().map(host_cidr).collect()), None));
            }
            if f.remote_addrs.is_empty()
                && let Some(c) = cidr_from_labels(&f.remote_labels)
            {
                return Ok((Peer::Cidrs([c].into()), None));
            }
            let why = if f.remote_addrs.is_empty() {
                "allows all of `world`, wider than observed: the kernel notification carries no addresses (a \
                 capture analysed with `analyze` does); narrow it to fromCIDR/toCIDR before applying"
                    .to_owned()
            } else {
                format!(
                    "allows all of `world`, wider than observed: {} distinct addresses (more than --max-cidrs {}); \
                     narrow it to the ranges they belong to before applying",
                    f.remote_addrs.len(),
                    opts.max_cidrs
                )
            };
            Ok((Peer::Entity("world".into()), Some(why)))
        }
        RemoteSide::Cluster => {
            let labels = labels::peer_selector(&f.remote_labels);
            if labels.is_empty() {
                Err(format!(
                    "{} {} identity {} on {}/{}: no stable label of it is known (no enrichment, or only volatile or \
                     invalid labels), so no selector can name it; run the agent with enrichment or give `analyze` an \
                     --endpoints file",
                    f.direction.as_str(),
                    if f.direction == Direction::Ingress { "from" } else { "to" },
                    f.remote_identity,
                    f.port,
                    f.protocol
                ))
            } else {
                Ok((Peer::Endpoints(labels), None))
            }
        }
        RemoteSide::Unknown => Err(format!(
            "{} flow with remote identity {} on {}/{}: Cilium could not resolve the identity; no entity names it",
            f.direction.as_str(),
            f.remote_identity,
            f.port,
            f.protocol
        )),
        s => Ok((Peer::Entity(s.as_str().into()), None)),
    }
}

fn l4_of(proto: u8) -> Option<L4Proto> {
    match proto {
        6 => Some(L4Proto::Tcp),
        17 => Some(L4Proto::Udp),
        132 => Some(L4Proto::Sctp),
        // The extended protocols CiliumNetworkPolicy accepts (no ports).
        2 | 4 | 41 | 47 | 50 | 51 | 112 => Some(L4Proto::Other(proto)),
        _ => None,
    }
}

/// Merges runs of consecutive ports into port/endPort: every port in the
/// range was observed, so the range is exact.
fn compress(ports: &BTreeSet<(L4Proto, u16)>) -> Vec<PortItem> {
    let mut out: Vec<PortItem> = Vec::new();
    for &(proto, port) in ports {
        if let Some(last) = out.last_mut()
            && last.proto == proto
            && !matches!(proto, L4Proto::Other(_))
            && last.end.unwrap_or(last.port).checked_add(1) == Some(port)
        {
            last.end = Some(port);
            continue;
        }
        out.push(PortItem { proto, port, end: None });
    }
    out
}

fn rules_for(
    e: &EndpointReadiness,
    scanners: &BTreeSet<IpAddr>,
    opts: &SuggestOptions,
    notes: &mut Vec<String>,
) -> Vec<RuleSpec> {
    let mut groups: BTreeMap<(Direction, Peer, L4Kind), Group> = BTreeMap::new();
    for f in &e.would_deny {
        // A scanner that also knocked on a critical port (22) is in the
        // would-deny list as a lockout risk, but never gets a rule.
        let scanned: Vec<IpAddr> = f.remote_addrs.iter().filter(|a| scanners.contains(a)).copied().collect();
        let kept;
        let f = if scanned.is_empty() {
            f
        } else {
            let addrs: Vec<String> = scanned.iter().map(IpAddr::to_string).collect();
            if scanned.len() == f.remote_addrs.len() {
                notes.push(format!(
                    "not suggested: {} {}/{} from {}: the address also scanned this endpoint's ports (scan noise)",
                    f.direction.as_str(),
                    f.port,
                    f.protocol,
                    addrs.join(", ")
                ));
                continue;
            }
            notes.push(format!(
                "{} {}/{}: left out {} (scanned this endpoint's ports)",
                f.direction.as_str(),
                f.port,
                f.protocol,
                addrs.join(", ")
            ));
            kept = FlowEntry {
                remote_addrs: f.remote_addrs.iter().filter(|a| !scanners.contains(a)).copied().collect(),
                ..f.clone()
            };
            &kept
        };
        let (peer, widened) = match peer_for(f, opts) {
            Ok(p) => p,
            Err(why) => {
                notes.push(format!("not suggested: {why}"));
                continue;
            }
        };
        let kind = if matches!(f.proto, 1 | 58) { L4Kind::Icmp } else { L4Kind::Ports };
        let g = groups.entry((f.direction, peer, kind.clone())).or_default();
        match kind {
            L4Kind::Icmp => {
                let v6 = f.proto == 58;
                // The conntrack port of ICMP is 0 in most releases: the type
                // is not in the notification, echo request is assumed.
                let ty = if f.port == 0 || f.port > 255 {
                    g.icmp_assumed = true;
                    if v6 { 128 } else { 8 }
                } else {
                    f.port as u8
                };
                g.icmp.insert((v6, ty));
            }
            L4Kind::Ports => match l4_of(f.proto) {
                Some(L4Proto::Tcp | L4Proto::Udp | L4Proto::Sctp) if f.port == 0 => {
                    notes.push(format!(
                        "not suggested: {} {} {} with port 0: port 0 means every port in a policy, far wider than observed",
                        f.direction.as_str(),
                        escape(&f.remote_name),
                        f.protocol
                    ));
                    continue;
                }
                Some(p) => {
                    g.ports.insert((p, if matches!(p, L4Proto::Other(_)) { 0 } else { f.port }));
                }
                None => {
                    notes.push(format!(
                        "not suggested: {} {} protocol {}: a policy drop carries no protocol or port, and policies \
                         cannot name this protocol",
                        f.direction.as_str(),
                        escape(&f.remote_name),
                        f.protocol
                    ));
                    continue;
                }
            },
        }
        g.flows += 1;
        g.notifications += f.notifications;
        g.first = Some(g.first.map_or(f.first_seen, |t| t.min(f.first_seen)));
        g.last = Some(g.last.map_or(f.last_seen, |t| t.max(f.last_seen)));
        if widened.is_some() {
            g.widened = widened;
        }
    }
    let mut rules = Vec::new();
    for ((direction, peer, kind), g) in groups {
        if g.flows == 0 {
            continue;
        }
        let mut comment = if opts.times_unknown {
            format!("{} flow(s), {} notification(s) in the capture", g.flows, g.notifications)
        } else {
            format!(
                "{} flow(s), {} notification(s), first seen {}, last seen {}",
                g.flows,
                g.notifications,
                g.first.map(format_rfc3339).unwrap_or_default(),
                g.last.map(format_rfc3339).unwrap_or_default()
            )
        };
        if g.icmp_assumed {
            comment.push_str("; ICMP type not in the notification: echo request assumed");
        }
        if g.ports.iter().any(|(p, _)| matches!(p, L4Proto::Other(_))) {
            comment.push_str("; protocols without ports need --enable-extended-ip-protocols");
        }
        if let Some(w) = &g.widened {
            comment.push_str("; ");
            comment.push_str(w);
        }
        rules.push(RuleSpec {
            direction,
            flows: g.flows,
            peer,
            ports: if kind == L4Kind::Ports { compress(&g.ports) } else { Vec::new() },
            icmp: g.icmp.into_iter().collect(),
            comment,
        });
    }
    // Ingress rules first, as the policy lists them.
    rules.sort_by_key(|r| r.direction != Direction::Ingress);
    rules
}

/// Generates the builder of one rule type: the four rule types (namespaced
/// and clusterwide, ingress and egress) share a shape but not a type.
macro_rules! rule_builder {
    ($fn:ident, $Rule:ident, $Sel:ident, $ToPorts:ident, $Port:ident, $Proto:ident, $Icmps:ident, $Field:ident, $Family:ident,
     $entities:ident, $endpoints:ident, $cidr:ident) => {
        fn $fn(r: &RuleSpec) -> $Rule {
            let mut rule = $Rule::default();
            match &r.peer {
                Peer::Entity(e) => rule.$entities = Some(vec![e.clone()]),
                Peer::Endpoints(labels) => {
                    rule.$endpoints = Some(vec![$Sel { match_labels: Some(labels.clone()), match_expressions: None }])
                }
                Peer::Cidrs(c) => rule.$cidr = Some(c.iter().cloned().collect()),
            }
            if !r.ports.is_empty() {
                let ports = r
                    .ports
                    .iter()
                    .map(|p| {
                        let protocol = match p.proto {
                            L4Proto::Tcp => $Proto::Tcp,
                            L4Proto::Udp => $Proto::Udp,
                            L4Proto::Sctp => $Proto::Sctp,
                            L4Proto::Other(2) => $Proto::Igmp,
                            L4Proto::Other(4) => $Proto::Ipip,
                            L4Proto::Other(41) => $Proto::Ipv6,
                            L4Proto::Other(47) => $Proto::Gre,
                            L4Proto::Other(50) => $Proto::Esp,
                            L4Proto::Other(51) => $Proto::Ah,
                            // l4_of admits only these protocols; 112 is VRRP.
                            L4Proto::Other(_) => $Proto::Vrrp,
                        };
                        let has_port = !matches!(p.proto, L4Proto::Other(_));
                        $Port {
                            port: has_port.then(|| p.port.to_string()),
                            end_port: p.end.map(i32::from),
                            protocol: Some(protocol),
                        }
                    })
                    .collect();
                rule.to_ports = Some(vec![$ToPorts { ports: Some(ports), ..Default::default() }]);
            }
            if !r.icmp.is_empty() {
                let fields = r
                    .icmp
                    .iter()
                    .map(|&(v6, ty)| $Field {
                        family: Some(if v6 { $Family::IPv6 } else { $Family::IPv4 }),
                        r#type: IntOrString::Int(i32::from(ty)),
                    })
                    .collect();
                rule.icmps = Some(vec![$Icmps { fields: Some(fields) }]);
            }
            rule
        }
    };
}

rule_builder!(
    cnp_ingress,
    CiliumNetworkPolicyIngress,
    CiliumNetworkPolicyIngressFromEndpoints,
    CiliumNetworkPolicyIngressToPorts,
    CiliumNetworkPolicyIngressToPortsPorts,
    CiliumNetworkPolicyIngressToPortsPortsProtocol,
    CiliumNetworkPolicyIngressIcmps,
    CiliumNetworkPolicyIngressIcmpsFields,
    CiliumNetworkPolicyIngressIcmpsFieldsFamily,
    from_entities,
    from_endpoints,
    from_cidr
);
rule_builder!(
    cnp_egress,
    CiliumNetworkPolicyEgress,
    CiliumNetworkPolicyEgressToEndpoints,
    CiliumNetworkPolicyEgressToPorts,
    CiliumNetworkPolicyEgressToPortsPorts,
    CiliumNetworkPolicyEgressToPortsPortsProtocol,
    CiliumNetworkPolicyEgressIcmps,
    CiliumNetworkPolicyEgressIcmpsFields,
    CiliumNetworkPolicyEgressIcmpsFieldsFamily,
    to_entities,
    to_endpoints,
    to_cidr
);
rule_builder!(
    ccnp_ingress,
    CiliumClusterwideNetworkPolicyIngress,
    CiliumClusterwideNetworkPolicyIngressFromEndpoints,
    CiliumClusterwideNetworkPolicyIngressToPorts,
    CiliumClusterwideNetworkPolicyIngressToPortsPorts,
    CiliumClusterwideNetworkPolicyIngressToPortsPortsProtocol,
    CiliumClusterwideNetworkPolicyIngressIcmps,
    CiliumClusterwideNetworkPolicyIngressIcmpsFields,
    CiliumClusterwideNetworkPolicyIngressIcmpsFieldsFamily,
    from_entities,
    from_endpoints,
    from_cidr
);
rule_builder!(
    ccnp_egress,
    CiliumClusterwideNetworkPolicyEgress,
    CiliumClusterwideNetworkPolicyEgressToEndpoints,
    CiliumClusterwideNetworkPolicyEgressToPorts,
    CiliumClusterwideNetworkPolicyEgressToPortsPorts,
    CiliumClusterwideNetworkPolicyEgressToPortsPortsProtocol,
    CiliumClusterwideNetworkPolicyEgressIcmps,
    CiliumClusterwideNetworkPolicyEgressIcmpsFields,
    CiliumClusterwideNetworkPolicyEgressIcmpsFieldsFamily,
    to_entities,
    to_endpoints,
    to_cidr
);

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

fn node_selector(
    e: &EndpointReadiness,
    report: &ReadinessReport,
    opts: &SuggestOptions,
) -> Option<(BTreeMap<String, String>, String)> {
    if let Some(sel) = &opts.node_selector {
        return Some((sel.clone(), "given with --node-selector".into()));
    }
    let hostname = "kubernetes.io/hostname".to_owned();
    if let Some(node) = opts.node.clone().or_else(|| report.node.clone()) {
        return Some(([(hostname, node)].into(), "this node only (kubernetes.io/hostname)".into()));
    }
    e.labels
        .iter()
        .find_map(|l| l.strip_prefix("k8s:kubernetes.io/hostname="))
        .map(|n| ([(hostname, n.to_owned())].into(), "this node only (from the host endpoint's labels)".into()))
}

/// One suggestion per endpoint with would-deny flows (or only the ones
/// `selector` names: `host`, an ID, `NAMESPACE/POD`).
pub fn suggest(
    report: &ReadinessReport,
    selector: Option<&str>,
    opts: &SuggestOptions,
) -> Result<Vec<Suggestion>, SuggestError> {
    let endpoints: Vec<&EndpointReadiness> = match selector {
        Some(s) => {
            let v = report.select(s);
            if v.is_empty() {
                return Err(SuggestError::NoSuchEndpoint { selector: s.into() });
            }
            v
        }
        None => report.endpoints.iter().filter(|e| !e.would_deny.is_empty()).collect(),
    };
    let mut out = Vec::new();
    for e in endpoints {
        out.push(suggest_one(report, e, opts));
    }
    Ok(out)
}

fn suggest_one(report: &ReadinessReport, e: &EndpointReadiness, opts: &SuggestOptions) -> Suggestion {
    let mut notes = Vec::new();
    let name_of = |e: &EndpointReadiness| e.display_name();
    if e.would_deny.is_empty() {
        notes.push("no would-deny flow: nothing to allow".into());
        return Suggestion {
            endpoint_id: e.endpoint_id,
            endpoint: name_of(e),
            policy: None,
            rule_comments: vec![],
            notes,
        };
    }
    let first = e.would_deny.iter().map(|f| f.first_seen).min().unwrap_or(report.generated_at);
    let last = e.would_deny.iter().map(|f| f.last_seen).max().unwrap_or(report.generated_at);
    let scanners: BTreeSet<IpAddr> = report
        .noise
        .iter()
        .filter(|n| n.endpoint_id == e.endpoint_id)
        .flat_map(|n| n.sources.iter().copied())
        .collect();
    let mut skipped = Vec::new();
    let rules = rules_for(e, &scanners, opts, &mut skipped);
    let covered: usize = rules.iter().map(|r| r.flows).sum();
    let when = if opts.times_unknown {
        "in the capture".to_owned()
    } else {
        format!("observed between {} and {}", format_rfc3339(first), format_rfc3339(last))
    };
    notes.push(format!(
        "Allows exactly {covered} of the {} would-deny flow(s) {when}; scan noise is left out. Review before applying.",
        e.would_deny_flows(),
    ));
    if e.left_out.would_deny > 0 {
        notes.push(format!(
            "{} more would-deny flow(s) are not listed by the agent and not covered here: allow these, then ask again.",
            e.left_out.would_deny
        ));
    }
    notes.extend(skipped);
    let rule_comments: Vec<String> = rules.iter().map(|r| r.comment.clone()).collect();
    let description =
        format!("Suggested by verdict-agent from audited flows of {} ({} rule(s))", name_of(e), rules.len());
    let policy = if rules.is_empty() {
        None
    } else if e.kind == EndpointKind::Host {
        match node_selector(e, report, opts) {
            Some((sel, _)) if !sel.iter().all(|(k, v)| labels::is_label_key(k) && labels::is_label_value(v)) => {
                let shown: Vec<String> = sel.iter().map(|(k, v)| format!("{}={}", escape(k), escape(v))).collect();
                notes.push(format!(
                    "no policy: the nodeSelector {} is not a valid Kubernetes label selector, so no policy can select \
                     this node; pass --node NAME or --node-selector key=value with a valid label",
                    shown.join(",")
                ));
                None
            }
            Some((sel, how)) => {
                notes.push(format!("nodeSelector: {how}"));
                let node = sel.values().next().cloned().unwrap_or_default();
                let fallback = format!("{}-host", dns_name(&opts.name_prefix, "allow-observed"));
                let name = dns_name(&format!("{}-host-{node}", opts.name_prefix), &fallback);
                let spec = CiliumClusterwideNetworkPolicySpec {
                    description: Some(description),
                    node_selector: Some(CiliumClusterwideNetworkPolicyNodeSelector {
                        match_labels: Some(sel),
                        match_expressions: None,
                    }),
                    ingress: non_empty(
                        rules.iter().filter(|r| r.direction == Direction::Ingress).map(ccnp_ingress).collect(),
                    ),
                    egress: non_empty(
                        rules.iter().filter(|r| r.direction == Direction::Egress).map(ccnp_egress).collect(),
                    ),
                    ..Default::default()
                };
                Some(SuggestedPolicy::Clusterwide(CiliumClusterwideNetworkPolicy {
                    metadata: ObjectMeta { name: Some(name), ..Default::default() },
                    spec,
                    status: None,
                }))
            }
            None => {
                notes.push(
                    "no policy: the node's name is unknown, so no nodeSelector can select only this node; pass --node \
                     NAME or --node-selector key=value"
                        .into(),
                );
                None
            }
        }
    } else {
        let selector = labels::subject_selector(&e.labels);
        match (e.namespace.as_deref().filter(|ns| labels::is_dns_label(ns)), selector.is_empty()) {
            (Some(ns), false) => {
                let base =
                    e.workload.as_deref().map(|w| w.rsplit('/').next().unwrap_or(w).to_owned()).or(e.pod.clone());
                let fallback = format!("{}-{}", dns_name(&opts.name_prefix, "allow-observed"), e.endpoint_id);
                let name = dns_name(
                    &format!("{}-{}", opts.name_prefix, base.unwrap_or_else(|| e.endpoint_id.to_string())),
                    &fallback,
                );
                let spec = CiliumNetworkPolicySpec {
                    description: Some(description),
                    endpoint_selector: Some(CiliumNetworkPolicyEndpointSelector {
                        match_labels: Some(selector),
                        match_expressions: None,
                    }),
                    ingress: non_empty(
                        rules.iter().filter(|r| r.direction == Direction::Ingress).map(cnp_ingress).collect(),
                    ),
                    egress: non_empty(
                        rules.iter().filter(|r| r.direction == Direction::Egress).map(cnp_egress).collect(),
                    ),
                    ..Default::default()
                };
                Some(SuggestedPolicy::Namespaced(CiliumNetworkPolicy {
                    metadata: ObjectMeta { name: Some(name), namespace: Some(ns.to_owned()), ..Default::default() },
                    spec,
                    status: None,
                }))
            }
            _ => {
                notes.push(format!(
                    "no policy: the endpoint's namespace or labels are unknown ({}), so no endpointSelector can name \
                     it; run the agent with enrichment or give `analyze` an --endpoints file",
                    match &e.namespace {
                        None => "no namespace".to_owned(),
                        Some(ns) if !labels::is_dns_label(ns) =>
                            format!("namespace {} is not a valid name", escape(ns)),
                        Some(_) => "no stable k8s label; see docs/critical-flows.md for the keys used".to_owned(),
                    }
                ));
                None
            }
        }
    };
    Suggestion { endpoint_id: e.endpoint_id, endpoint: name_of(e), policy, rule_comments, notes }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;
    use crate::{
        model::{FlowRecord, Verdict},
        readiness::{
            self, EvidenceEnvironment, Observation, ReadinessConfig, ReadinessInput,
            testkit::{
                policy_model::{self, Peer as ModelPeer, Policy},
                schema::{CrdSchema, crd_dir},
                *,
            },
        },
    };

    fn report(sc: &Scenario, flows: &[FlowRecord]) -> ReadinessReport {
        let obs = Observation::since_start(sc.observed_since);
        let mut input = ReadinessInput::new(flows, &sc.directory, &obs, now());
        input.environment =
            EvidenceEnvironment { cilium_version: Some("1.16.3".parse().unwrap()), ..EvidenceEnvironment::default() };
        input.node = Some(NODE.into());
        readiness::evaluate(&input, &ReadinessConfig::default())
    }

    fn schema_errors(policies: &[Policy]) -> Vec<String> {
        let cnp = CrdSchema::load(&crd_dir().join("ciliumnetworkpolicies.yaml"), "v2");
        let ccnp = CrdSchema::load(&crd_dir().join("ciliumclusterwidenetworkpolicies.yaml"), "v2");
        let mut errs = Vec::new();
        for p in policies {
            let (schema, v): (&CrdSchema, Value) = match p {
                Policy::Namespaced(p) => (&cnp, serde_json::to_value(p).unwrap()),
                Policy::Clusterwide(p) => (&ccnp, serde_json::to_value(p).unwrap()),
            };
            assert_eq!(v["kind"], schema.kind.as_str());
            errs.extend(schema.validate(&v).into_iter().map(|e| format!("{}: {e}", schema.kind)));
        }
        errs
    }

    /// What a probe's remote side is, at the resolution the input had:
    /// world by address when addresses were observed, else as a whole;
    /// workloads by identity; reserved identities by entity.
    fn remote_key(identity: u32, addr: Option<std::net::IpAddr>) -> String {
        match RemoteSide::of_identity(identity) {
            RemoteSide::World => format!("world{}", addr.map(|a| format!("@{a}")).unwrap_or_default()),
            RemoteSide::Cluster => format!("id{identity}"),
            s => s.as_str().to_owned(),
        }
    }

    type Key = (u16, Direction, String, u8, u16);

    /// Replays the scenario with the suggestions applied, and probes what
    /// the suggestions allow on their own.
    fn check_exact(sc: &Scenario, with_addrs: bool) {
        let flows = sc.flows(&sc.policies, with_addrs);
        let r = report(sc, &flows);
        let suggestions = suggest(&r, None, &SuggestOptions::default()).unwrap();
        assert_eq!(suggestions.iter().map(|s| s.endpoint_id).collect::<Vec<_>>(), vec![HOST, WEB]);
        // With addresses, the scanner's probe of SSH is recognised and left out.
        let scanner: Option<std::net::IpAddr> = with_addrs.then(|| "198.51.100.66".parse().unwrap());
        let is_scanner = |f: &FlowEntry| scanner.is_some_and(|s| f.remote_addrs == vec![s]);
        if with_addrs {
            assert!(
                suggestions[0].notes.iter().any(|n| n.contains("from 198.51.100.66") && n.contains("scan noise")),
                "{:?}",
                suggestions[0].notes
            );
        }
        let yaml = render(&suggestions).unwrap();
        let suggested = Policy::parse_stream(&yaml);
        assert_eq!(suggested.len(), 2, "{yaml}");
        assert_eq!(schema_errors(&suggested), Vec::<String>::new(), "{yaml}");

        // Every rule carries its comment.
        let rules: usize = suggestions.iter().map(|s| s.rule_comments.len()).sum();
        let comments = yaml.lines().filter(|l| l.starts_with("  # ") && l.contains("notification(s)")).count();
        assert_eq!(comments, rules, "{yaml}");

        // Replay: nothing the scenario sends is would-deny any more, and
        // the scan is still not allowed.
        let mut all = sc.policies.clone();
        all.extend(suggested.iter().cloned());
        let replayed = report(sc, &sc.flows(&all, with_addrs));
        let left: Vec<&FlowEntry> = replayed.endpoints.iter().flat_map(|e| e.would_deny.iter()).collect();
        assert!(left.iter().all(|f| is_scanner(f)), "{left:?}");
        assert_eq!(left.len(), usize::from(with_addrs));
        for t in sc.traffic.iter().filter(|t| t.scan) {
            assert!(!sc.allowed(t, &all), "scan port {} must stay closed", t.port);
        }

        // Exactness: the suggestions alone allow exactly the observed
        // would-deny flows, at the resolution of the input.
        let observed: BTreeSet<Key> = r
            .endpoints
            .iter()
            .flat_map(|e| {
                e.would_deny.iter().filter(|f| !is_scanner(f)).flat_map(move |f| {
                    let addrs: Vec<Option<std::net::IpAddr>> = if with_addrs && !f.remote_addrs.is_empty() {
                        f.remote_addrs.iter().copied().map(Some).collect()
                    } else {
                        vec![None]
                    };
                    addrs
                        .into_iter()
                        .map(move |a| (e.endpoint_id, f.direction, remote_key(f.remote_identity, a), f.proto, f.port))
                })
            })
            .collect();
        let world_addrs: Vec<Option<std::net::IpAddr>> = if with_addrs {
            let mut v: Vec<Option<std::net::IpAddr>> =
                sc.traffic.iter().flat_map(|t| t.addrs.iter().copied().map(Some)).collect();
            v.push(Some("10.20.30.41".parse().unwrap()));
            v
        } else {
            vec![None]
        };
        let identities = [1u32, 2, 4, 6, 7, 9, FRONTEND_ID, KUBE_DNS_ID];
        let l4: Vec<(u8, u16)> = vec![
            (6, 22),
            (6, 4240),
            (6, 10250),
            (6, 6443),
            (6, 5432),
            (6, 5433),
            (6, 8080),
            (6, 23),
            (17, 8472),
            (17, 4240),
            (17, 53),
            (1, 0),
        ];
        let mut checked = 0;
        for ep in [HOST, WEB, API] {
            for dir in [Direction::Ingress, Direction::Egress] {
                for &id in &identities {
                    let addrs =
                        if RemoteSide::of_identity(id) == RemoteSide::World { world_addrs.clone() } else { vec![None] };
                    for addr in addrs {
                        for &(proto, port) in &l4 {
                            for icmp in if proto == 1 { vec![Some(8), Some(13)] } else { vec![None] } {
                                let peer = ModelPeer {
                                    identity: id,
                                    labels: sc.directory.identities.get(&id).cloned().unwrap_or_default(),
                                    addrs: addr.into_iter().collect(),
                                };
                                let allowed = suggested.iter().any(|p| {
                                    policy_model::rule_allows(
                                        std::slice::from_ref(p),
                                        &sc.subject(ep),
                                        dir,
                                        &peer,
                                        proto,
                                        port,
                                        icmp,
                                    )
                                });
                                // Observed ICMP had no type in the notification: echo assumed.
                                let key = (ep, dir, remote_key(id, addr), proto, port);
                                let expected = observed.contains(&key) && icmp != Some(13);
                                assert_eq!(allowed, expected, "probe {key:?} icmp {icmp:?}\n{yaml}");
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 500);
    }

    #[test]
    fn kernel_path_suggestions_validate_and_replay_exactly() {
        check_exact(&Scenario::lockout(), false);
    }

    #[test]
    fn capture_path_suggestions_use_observed_addresses() {
        check_exact(&Scenario::lockout(), true);
    }

    #[test]
    fn suggested_yaml_reads_like_a_reviewed_policy() {
        let sc = Scenario::lockout();
        let r = report(&sc, &sc.flows(&sc.policies, false));
        let s = suggest(&r, Some("host"), &SuggestOptions::default()).unwrap();
        assert_eq!(s.len(), 1);
        let yaml = s[0].to_yaml().unwrap();
        let policy: Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(policy["kind"], "CiliumClusterwideNetworkPolicy");
        assert_eq!(policy["metadata"]["name"], "allow-observed-host-node-a");
        assert_eq!(policy["spec"]["nodeSelector"]["matchLabels"]["kubernetes.io/hostname"], "node-a");
        let rules = policy["spec"]["ingress"].as_array().unwrap();
        let entities: Vec<&str> = rules.iter().map(|r| r["fromEntities"][0].as_str().unwrap()).collect();
        assert_eq!(entities, ["health", "health", "remote-node", "world"]);
        assert_eq!(rules[1]["icmps"][0]["fields"][0]["type"], 8);
        assert_eq!(rules[1]["icmps"][0]["fields"][0]["family"], "IPv4");
        assert!(yaml.contains("  # 1 flow(s), 42 notification(s), first seen 2026-11-21T06:00:00Z, last seen 2026-11-22T11:59:00Z\n  - fromEntities:"), "{yaml}");
        assert!(yaml.contains("ICMP type not in the notification: echo request assumed"), "{yaml}");
        assert!(yaml.contains("allows all of `world`, wider than observed"), "{yaml}");
        assert!(yaml.starts_with("# verdict-agent suggestion for host (endpoint 227)\n"), "{yaml}");

        let web = suggest(&r, Some("shop/web-7d9f"), &SuggestOptions::default()).unwrap();
        let policy: Value = serde_yaml::from_str(&web[0].to_yaml().unwrap()).unwrap();
        assert_eq!(policy["kind"], "CiliumNetworkPolicy");
        assert_eq!(policy["metadata"]["namespace"], "shop");
        assert_eq!(policy["metadata"]["name"], "allow-observed-web");
        assert_eq!(policy["spec"]["endpointSelector"]["matchLabels"], serde_json::json!({"k8s:app": "web"}));
        assert!(policy["spec"].get("ingress").is_none());
        assert!(matches!(
            suggest(&r, Some("shop/nope"), &SuggestOptions::default()),
            Err(SuggestError::NoSuchEndpoint { .. })
        ));
    }

    #[test]
    fn what_cannot_be_named_is_said_not_guessed() {
        let mut sc = Scenario::lockout();
        sc.directory.identities.remove(&FRONTEND_ID);
        let mut flows = sc.flows(&sc.policies, false);
        // frontend now calls a port web's policy does not allow.
        flows.push(flow(WEB, Direction::Ingress, FRONTEND_ID, 6, 9090, Verdict::Audited, 4, ago(3600), ago(60)));
        // Consecutive ports become one range, every port of it observed.
        for p in 7000..=7002 {
            flows.push(flow(WEB, Direction::Egress, 6, 6, p, Verdict::Audited, 1, ago(3600), ago(60)));
        }
        let mut r = report(&sc, &flows);
        // Neither the report nor the host endpoint's labels name the node.
        r.node = None;
        for e in &mut r.endpoints {
            e.labels.retain(|l| !l.contains("kubernetes.io/hostname"));
        }
        let s = suggest(&r, None, &SuggestOptions::default()).unwrap();
        let host = s.iter().find(|s| s.endpoint_id == HOST).unwrap();
        assert!(host.policy.is_none());
        assert!(host.notes.iter().any(|n| n.contains("pass --node NAME")), "{:?}", host.notes);
        let web = s.iter().find(|s| s.endpoint_id == WEB).unwrap();
        assert!(
            web.notes.iter().any(|n| n.starts_with("not suggested") && n.contains("identity 48213")),
            "{:?}",
            web.notes
        );
        let Some(SuggestedPolicy::Namespaced(p)) = &web.policy else { panic!("web policy") };
        let v = serde_json::to_value(&p.spec).unwrap();
        let ranges: Vec<&Value> =
            v["egress"].as_array().unwrap().iter().flat_map(|r| r["toPorts"][0]["ports"].as_array().unwrap()).collect();
        assert!(ranges.iter().any(|p| p["port"] == "7000" && p["endPort"] == 7002), "{ranges:?}");
        assert_eq!(schema_errors(&[Policy::Namespaced(p.clone())]), Vec::<String>::new());

        // The node given on the command line makes the host policy possible.
        let opts = SuggestOptions { node: Some("node-b".into()), ..SuggestOptions::default() };
        let s = suggest(&r, Some("host"), &opts).unwrap();
        assert!(s[0].policy.is_some());
        assert_eq!(s[0].policy.as_ref().unwrap().name(), "allow-observed-host-node-b");
    }

    fn cli(agent: &str, endpoint: Option<&str>) -> SuggestArgs {
        SuggestArgs {
            endpoint: endpoint.map(str::to_owned),
            agent: agent.into(),
            input: None,
            format: None,
            endpoints: None,
            host_endpoint: None,
            window: None,
            node: None,
            node_selector: vec![],
            max_cidrs: 8,
            output: SuggestFormat::Yaml,
            output_file: None,
        }
    }

    #[tokio::test]
    async fn cli_against_a_running_agent() {
        let sc = Scenario::lockout();
        let body = serde_json::to_string(&report(&sc, &sc.flows(&sc.policies, false))).unwrap();
        let (url, seen) = serve(200, body).await;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(run_with(cli(&url, Some("host")), &mut out, &mut err).await, 0, "{}", String::from_utf8_lossy(&err));
        let yaml = String::from_utf8(out).unwrap();
        assert_eq!(Policy::parse_stream(&yaml).len(), 1);
        assert!(yaml.contains("kind: CiliumClusterwideNetworkPolicy"));
        assert_eq!(seen.lock().unwrap()[0], "GET /api/v1/readiness?endpoint=host HTTP/1.1");

        // The node selector given on the command line wins; the output goes to a file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("host.yaml");
        let mut a = cli(&url, Some("host"));
        a.node_selector = vec![("node-role.kubernetes.io/control-plane".into(), "".into())];
        a.output_file = Some(file.clone());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(run_with(a, &mut out, &mut err).await, 0);
        assert!(out.is_empty());
        let written = std::fs::read_to_string(&file).unwrap();
        assert!(written.contains("node-role.kubernetes.io/control-plane: ''"), "{written}");

        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(run_with(cli(&url, Some("shop/nope")), &mut out, &mut err).await, 2);
        assert!(String::from_utf8_lossy(&err).contains("no endpoint in the report matches \"shop/nope\""));
    }

    #[test]
    fn cidr_labels_and_many_addresses() {
        assert_eq!(
            cidr_from_labels(&["reserved:world".into(), "cidr:10.0.0.0/8".into(), "cidr:10.1.0.0/16".into()]),
            Some("10.1.0.0/16".into())
        );
        assert_eq!(cidr_from_labels(&["cidr:2001-db8--/32".into()]), Some("2001:db8::/32".into()));
        let mut f = FlowEntry {
            direction: Direction::Egress,
            remote: "world".into(),
            remote_identity: 2,
            remote_name: "world".into(),
            remote_labels: vec![],
            protocol: "tcp".into(),
            proto: 6,
            port: 443,
            verdict: Verdict::Audited,
            match_type: "none".into(),
            source: crate::model::NotifySource::PolicyVerdict,
            ipv6: false,
            notifications: 9,
            notifications_in_window: None,
            first_seen: now(),
            last_seen: now(),
            remote_addrs: (1..=9).map(|i| format!("192.0.2.{i}").parse().unwrap()).collect(),
            service: None,
        };
        let opts = SuggestOptions::default();
        let (peer, why) = peer_for(&f, &opts).unwrap();
        assert_eq!(peer, Peer::Entity("world".into()));
        assert!(why.unwrap().contains("9 distinct addresses"));
        f.remote_addrs.truncate(2);
        let (peer, why) = peer_for(&f, &opts).unwrap();
        assert_eq!(peer, Peer::Cidrs(["192.0.2.1/32".to_owned(), "192.0.2.2/32".to_owned()].into()));
        assert!(why.is_none());
    }
}
