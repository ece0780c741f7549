//! The agent's vocabulary in userspace: what one flow of policy decisions
//! and one endpoint are, whatever produced them (the in-kernel maps, or a
//! `cilium monitor` / `hubble observe` capture read by `analyze`).

use std::{collections::BTreeSet, net::IpAddr, time::SystemTime};

use serde::{Deserialize, Serialize};
use verdict_common::maps::VerdictClass;

/// What happened to the traffic, in the words an operator reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Allowed by policy.
    Allowed,
    /// Dropped by policy (enforcing).
    Denied,
    /// Would have been dropped, let through by PolicyAuditMode.
    Audited,
    /// Allowed and redirected to the L7 proxy.
    Redirected,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [Verdict::Allowed, Verdict::Denied, Verdict::Audited, Verdict::Redirected];

    pub fn as_str(self) -> &'static str {
        VerdictClass::from(self).as_str()
    }
}

impl From<VerdictClass> for Verdict {
    fn from(c: VerdictClass) -> Verdict {
        match c {
            VerdictClass::Allowed => Verdict::Allowed,
            VerdictClass::Denied => Verdict::Denied,
            VerdictClass::Audited => Verdict::Audited,
            VerdictClass::Redirected => Verdict::Redirected,
        }
    }
}

impl From<Verdict> for VerdictClass {
    fn from(v: Verdict) -> VerdictClass {
        match v {
            Verdict::Allowed => VerdictClass::Allowed,
            Verdict::Denied => VerdictClass::Denied,
            Verdict::Audited => VerdictClass::Audited,
            Verdict::Redirected => VerdictClass::Redirected,
        }
    }
}

/// Direction of a policy decision, from the endpoint's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// From Cilium's `dir` bits (1 ingress, 2 egress).
    pub fn from_cilium(dir: u8) -> Option<Direction> {
        match dir {
            1 => Some(Direction::Ingress),
            2 => Some(Direction::Egress),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Which notification a flow was counted from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifySource {
    /// `policy_verdict_notify` (type 5): once per new connection when
    /// allowed, audited or redirected; once per packet when denied.
    PolicyVerdict,
    /// `drop_notify` (type 1) with a policy reason: once per dropped packet.
    PolicyDrop,
}

/// Lower-case protocol name as Cilium's monitor prints it, or the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        0 => "any".into(),
        n => n.to_string(),
    }
}

/// One flow: every notification sharing endpoint, direction, remote
/// identity, protocol, port, verdict class and match type, with totals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub endpoint_id: u16,
    pub direction: Direction,
    pub remote_identity: u32,
    /// IP protocol number; 0 when the notification does not say (drops).
    pub proto: u8,
    /// Destination port; 0 for drops and port-less protocols.
    pub dst_port: u16,
    pub verdict: Verdict,
    /// Cilium policy match type, 0 ("none") .. 6 ("Proto-Only").
    pub match_type: u8,
    pub source: NotifySource,
    /// Drop reason for denials (133 policy denied, 181 deny rule, ...), else 0.
    pub reason: u8,
    pub ipv6: bool,
    /// Notifications counted; never decreases for the life of the series.
    pub notifications: u64,
    /// Sum of the notified packets' original lengths.
    pub bytes: u64,
    #[serde(with = "crate::timefmt::rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "crate::timefmt::rfc3339")]
    pub last_seen: SystemTime,
    /// Remote addresses, when the input carried them (captures do, the
    /// kernel notification does not).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub remote_addrs: BTreeSet<IpAddr>,
    /// Set when the record is one port of the kernel's world-port table:
    /// every world identity and both IP families to this port of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_aggregate: Option<PortAggregate>,
}

/// A world-port record (`FlowRecord::port_aggregate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAggregate {
    /// Only scan bursts ever touched the port (`crate::scan_behaviour`):
    /// noise, never suggested.
    pub scan_only: bool,
}

/// What kind of endpoint an ID is, as far as the agent knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// The node itself (identity `host`, label `reserved:host`).
    Host,
    /// Cilium's health endpoint (identity `health`, label `reserved:health`):
    /// answers other nodes' connectivity probes; no pod behind it.
    Health,
    Pod,
    /// Not (yet) known to any enrichment source.
    #[default]
    Unknown,
}

impl EndpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointKind::Host => "host",
            EndpointKind::Health => "health",
            EndpointKind::Pod => "pod",
            EndpointKind::Unknown => "unknown",
        }
    }

    /// Classifies an endpoint from its security identity and labels (any
    /// of the endpoint's or its identity's), as Cilium's API and captures
    /// describe it.
    pub fn classify<'a>(identity: Option<u32>, mut labels: impl Iterator<Item = &'a str>, has_pod: bool) -> Self {
        let reserved = |id: u32| identity == Some(id);
        let mut host = reserved(crate::cilium::identity::HOST);
        let mut health = reserved(crate::cilium::identity::HEALTH);
        if !host && !health {
            for label in labels.by_ref() {
                host |= label == "reserved:host";
                health |= label == "reserved:health";
            }
        }
        if host {
            EndpointKind::Host
        } else if health {
            EndpointKind::Health
        } else if has_pod {
            EndpointKind::Pod
        } else {
            EndpointKind::Unknown
        }
    }
}

/// Policy state of one direction of an endpoint, from Cilium's API
/// (`status.policy.realized.policy-enabled` and the PolicyAuditMode option).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionPolicy {
    /// Some policy selects the endpoint in this direction.
    pub enabled: bool,
    /// PolicyAuditMode: denials are reported as audited and let through.
    pub audit: bool,
}

/// Where a fact about an endpoint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactSource {
    /// The node's Cilium agent API.
    CiliumApi,
    /// CiliumEndpoint objects from the Kubernetes API.
    Kubernetes,
    /// An `cilium endpoint list -o json` file given to `analyze`.
    EndpointsFile,
    /// Guessed from the notifications themselves (the `audited` flag).
    Inferred,
}

/// Everything the agent knows about one endpoint of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub id: u16,
    pub kind: EndpointKind,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// Owning workload, e.g. "Deployment/web", when known.
    pub workload: Option<String>,
    /// Security identity of the endpoint.
    pub identity: Option<u32>,
    /// Security-relevant labels, "source:key=value" as Cilium prints them.
    pub labels: Vec<String>,
    pub ingress: Option<DirectionPolicy>,
    pub egress: Option<DirectionPolicy>,
    /// Where `ingress`/`egress` came from.
    pub policy_source: Option<FactSource>,
}

/// One policy decision read from a capture (`cilium monitor` text or
/// `hubble observe -o json`), before aggregation into [`FlowRecord`]s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedVerdict {
    /// 1-based line number in the input.
    pub line: usize,
    pub endpoint_id: u16,
    pub direction: Direction,
    pub remote_identity: u32,
    pub proto: u8,
    pub dst_port: u16,
    pub verdict: Verdict,
    pub match_type: u8,
    pub source: NotifySource,
    pub reason: u8,
    pub ipv6: bool,
    pub src_addr: Option<IpAddr>,
    pub dst_addr: Option<IpAddr>,
    pub src_port: Option<u16>,
    /// When the capture says (Hubble does, the monitor text does not).
    pub time: Option<SystemTime>,
    /// Labels of the local endpoint and of the remote side, when the
    /// capture carries them (Hubble does).
    pub local_labels: Vec<String>,
    pub remote_labels: Vec<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// How many events the record stands for: 1, or the count of a Hubble
    /// exporter-aggregated flow.
    pub events: u64,
    /// The local side is the host, named by identity (Hubble host-firewall
    /// flows carry no endpoint ID for it): `endpoint_id` is 0 until the
    /// analysis knows the host endpoint's ID.
    pub local_is_host: bool,
    /// An address was redacted by the capture's author: it is `None` here,
    /// every other field is as printed.
    pub redacted: bool,
}

/// Whether host-firewall policies select this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPolicyCoverage {
    /// Names of CiliumClusterwideNetworkPolicies with a `nodeSelector`
    /// that matches this node's labels.
    pub selecting: Vec<String>,
    /// Host policies whose `nodeSelector` matches no node at all.
    pub selecting_no_node: Vec<String>,
    pub source: FactSource,
}

/// What enrichment knows, as metrics, readiness and suggestions ask it.
/// Answers come from caches: no call blocks on a remote API.
pub trait EndpointDirectory: Send + Sync {
    fn endpoint(&self, id: u16) -> Option<EndpointInfo>;
    fn endpoints(&self) -> Vec<EndpointInfo>;
    /// Labels of a security identity ("k8s:app=web", ...).
    fn identity_labels(&self, identity: u32) -> Option<Vec<String>>;
    /// None when no source could tell.
    fn host_policy_coverage(&self) -> Option<HostPolicyCoverage>;
    /// True only when the directory knows the endpoint was deleted (it
    /// listed the ID, and its sources, all answering, no longer do).
    fn endpoint_gone(&self, _id: u16) -> bool {
        false
    }
    /// Changes when the ID passes to another owner; None when unknown.
    fn endpoint_generation(&self, _id: u16) -> Option<u64> {
        None
    }
}

/// A directory that knows nothing: every answer is "unknown".
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDirectory;

impl EndpointDirectory for NoDirectory {
    fn endpoint(&self, _: u16) -> Option<EndpointInfo> {
        None
    }
    fn endpoints(&self) -> Vec<EndpointInfo> {
        Vec::new()
    }
    fn identity_labels(&self, _: u32) -> Option<Vec<String>> {
        None
    }
    fn host_policy_coverage(&self) -> Option<HostPolicyCoverage> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_kind_from_identity_or_labels() {
        let none = std::iter::empty::<&str>;
        assert_eq!(EndpointKind::classify(Some(1), none(), false), EndpointKind::Host);
        assert_eq!(EndpointKind::classify(Some(4), none(), false), EndpointKind::Health);
        assert_eq!(EndpointKind::classify(None, ["reserved:health"].into_iter(), false), EndpointKind::Health);
        // Should both reserved labels appear, the host firewall's view wins.
        assert_eq!(
            EndpointKind::classify(None, ["reserved:health", "reserved:host"].into_iter(), false),
            EndpointKind::Host
        );
        assert_eq!(EndpointKind::classify(Some(48213), ["k8s:app=web"].into_iter(), true), EndpointKind::Pod);
        assert_eq!(EndpointKind::classify(None, none(), false), EndpointKind::Unknown);
        assert_eq!(EndpointKind::Health.as_str(), "health");
    }
}
