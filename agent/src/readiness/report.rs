//! The readiness report: what `/api/v1/readiness` serves, what `preflight`
//! and `suggest` read back, and what `analyze` prints. Field names say what
//! they hold; times are RFC 3339 UTC strings.

use std::{collections::BTreeMap, net::IpAddr, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::model::{Direction, EndpointKind, FactSource, HostPolicyCoverage, NotifySource, Verdict};
use crate::timefmt::{rfc3339, rfc3339_opt};

/// Whether switching PolicyAuditMode off is known to be safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadinessState {
    /// Every gate passed and nothing would be denied.
    Ready,
    /// Audited flows show enforcement would drop traffic.
    WouldBreak,
    /// Silence, or not enough of it: the agent cannot tell.
    NoEvidence,
}

impl ReadinessState {
    pub const ALL: [ReadinessState; 3] =
        [ReadinessState::Ready, ReadinessState::WouldBreak, ReadinessState::NoEvidence];
    pub fn as_str(self) -> &'static str {
        match self {
            ReadinessState::Ready => "ready",
            ReadinessState::WouldBreak => "would_break",
            ReadinessState::NoEvidence => "no_evidence",
        }
    }
}

/// Why an endpoint (or one direction of it) is in its state. The
/// `no_evidence` reasons are listed in the order they are reported when
/// several apply: the first one is the one to fix first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    // --- would_break
    /// Audited flows in the evidence period.
    WouldDenyFlows,
    // --- ready
    /// Enough evidence, and none of it would be denied.
    NoWouldDeny,
    /// PolicyAuditMode is already off: enforcement is on.
    Enforcing,
    /// No policy selects this direction: enforcement changes nothing there.
    NotEnforced,
    // --- no_evidence, most fundamental first
    /// The host endpoint is not known to exist.
    HostEndpointMissing,
    /// No host policy selects this node.
    NoHostPolicy,
    /// The host endpoint has no ingress policy.
    HostNotPolicyEnabled,
    /// No policy selects the endpoint (or the direction), so it emits nothing.
    NoPolicy,
    /// Policy verdict notifications are off (endpoint option or agent flag).
    VerdictNotificationsOff,
    /// The host firewall of Cilium before 1.16 emits verdicts only for the
    /// directions its filter had when bpf_host was compiled (cilium#21884).
    #[serde(rename = "host_program_pre_1_16")]
    HostProgramPre116,
    /// Cilium's events rate limit dropped notifications.
    RateLimited,
    /// A silent host direction in audit mode on Cilium 1.16+: bpf_host emits
    /// nothing for traffic a catch-all deny audited (match type `all`).
    HostMatchAllSuppressed,
    /// The kernel counted audited verdicts of the endpoint that no flow the
    /// agent read carries (flows evicted unread, or never created).
    EvidenceLost,
    /// Observed for less than the minimum evidence time (or unknown).
    WindowTooShort,
    /// Policy applies, notifications flow, nothing was seen.
    NoTraffic,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WouldDenyFlows => "would_deny_flows",
            Reason::NoWouldDeny => "no_would_deny",
            Reason::Enforcing => "enforcing",
            Reason::NotEnforced => "not_enforced",
            Reason::HostEndpointMissing => "host_endpoint_missing",
            Reason::NoHostPolicy => "no_host_policy",
            Reason::HostNotPolicyEnabled => "host_not_policy_enabled",
            Reason::NoPolicy => "no_policy",
            Reason::VerdictNotificationsOff => "verdict_notifications_off",
            Reason::HostProgramPre116 => "host_program_pre_1_16",
            Reason::RateLimited => "rate_limited",
            Reason::HostMatchAllSuppressed => "host_match_all_suppressed",
            Reason::EvidenceLost => "evidence_lost",
            Reason::WindowTooShort => "window_too_short",
            Reason::NoTraffic => "no_traffic",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateStatus {
    Passed,
    Failed,
    Unknown,
}

/// One check behind a readiness state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// `host_endpoint_exists`, `host_policy_enabled_ingress`,
    /// `host_policy_selects_node`, `host_program_version`, `policy_enabled`,
    /// `audit_mode`, `verdict_notifications`, `rate_limit`,
    /// `observation_period`, `verdicts_seen`.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    pub status: GateStatus,
    /// A failed or unknown blocking gate keeps the state at `no_evidence`.
    pub blocking: bool,
    /// The `no_evidence` reason this gate stands for when it blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Reason>,
    /// Where the fact came from; `inferred` means guessed from verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<FactSource>,
    pub detail: String,
}

impl Gate {
    pub fn holds_back(&self) -> bool {
        self.blocking && self.status != GateStatus::Passed
    }
}

/// One flow as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEntry {
    pub direction: Direction,
    /// Entity of the remote side: `world`, `remote-node`, `cluster`, ...
    pub remote: String,
    pub remote_identity: u32,
    /// How Cilium prints the identity (`world-ipv4`, `48213`).
    pub remote_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_labels: Vec<String>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, `any` (drops carry none).
    pub protocol: String,
    pub proto: u8,
    /// Destination port (ICMP: the type when Cilium reports one, else 0).
    pub port: u16,
    pub verdict: Verdict,
    /// Cilium match type name (`none`, `L3-Only`, `L3-L4`, ...).
    #[serde(rename = "match")]
    pub match_type: String,
    pub source: NotifySource,
    pub ipv6: bool,
    /// Notifications since the flow was first seen.
    pub notifications: u64,
    /// Notifications in the window, when the agent could tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications_in_window: Option<u64>,
    #[serde(with = "rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "rfc3339")]
    pub last_seen: SystemTime,
    /// Remote addresses, when the input carried them (captures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_addrs: Vec<IpAddr>,
    /// Critical-flow catalogue entry this flow is (host endpoint only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// One direction of one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionReadiness {
    pub direction: Direction,
    pub state: ReadinessState,
    pub reason: Reason,
    /// Some policy selects the endpoint in this direction; null: unknown.
    pub policy_enabled: Option<bool>,
    /// PolicyAuditMode; null: unknown.
    pub audit_mode: Option<bool>,
    /// Where `policy_enabled`/`audit_mode` came from.
    pub facts_source: Option<FactSource>,
    /// Since when the agent has been watching this direction.
    #[serde(with = "rfc3339_opt")]
    pub observed_since: Option<SystemTime>,
    /// Audited notifications ever counted (the `would_deny_total` counter).
    pub would_deny_total: u64,
}

/// One endpoint of the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointReadiness {
    pub endpoint_id: u16,
    pub kind: EndpointKind,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub workload: Option<String>,
    pub identity: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    pub state: ReadinessState,
    pub reason: Reason,
    /// One sentence: what the state means for this endpoint.
    pub detail: String,
    pub directions: Vec<DirectionReadiness>,
    /// Audited flows in the evidence period: what enforcement would drop.
    /// Each list holds at most [`MAX_LISTED_FLOWS`]: the host's critical
    /// flows first, then the most recently seen; `left_out` counts the rest.
    pub would_deny: Vec<FlowEntry>,
    /// Allowed (and redirected) flows: proof the policy selects something.
    pub allowed: Vec<FlowEntry>,
    /// Flows already denied (enforcing, or deny rules).
    pub denied: Vec<FlowEntry>,
    /// Audited flows a deny rule matched (match type not `none`): enforcement
    /// drops them on purpose. Never would-deny, never suggested.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub explicit_deny: Vec<FlowEntry>,
    /// Flows of the evidence period beyond what the lists above hold.
    #[serde(default, skip_serializing_if = "FlowsLeftOut::is_empty")]
    pub left_out: FlowsLeftOut,
    pub gates: Vec<Gate>,
    /// Notifications classified as scan noise, ever (monotonic).
    pub noise_notifications_total: u64,
}

/// Flows listed per endpoint and verdict class. The states and counters are
/// computed from every flow; the lists only show them, and a node can have
/// 100 k flows: listing them all would cost the agent hundreds of MiB.
pub const MAX_LISTED_FLOWS: usize = 100;

/// How many flows of each list an endpoint's report leaves out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsLeftOut {
    pub would_deny: usize,
    pub allowed: usize,
    pub denied: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub explicit_deny: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl FlowsLeftOut {
    pub fn is_empty(&self) -> bool {
        *self == FlowsLeftOut::default()
    }
}

impl EndpointReadiness {
    /// Would-deny flows in the evidence period, listed or not.
    pub fn would_deny_flows(&self) -> usize {
        self.would_deny.len() + self.left_out.would_deny
    }

    /// The endpoint's name for people (logs, terminals, comments): `host`,
    /// `NAMESPACE/POD` escaped with [`crate::text::escape_for_terminal`], or
    /// `endpoint ID`. The raw names stay in `namespace` and `pod`.
    pub fn display_name(&self) -> String {
        match (&self.namespace, &self.pod, self.kind) {
            (_, _, EndpointKind::Host) => "host".into(),
            (_, _, EndpointKind::Health) => "health".into(),
            (Some(ns), Some(pod), _) => crate::text::escape_for_terminal(&format!("{ns}/{pod}")),
            _ => format!("endpoint {}", self.endpoint_id),
        }
    }
}

/// How the host endpoint was identified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostIdentifiedBy {
    /// An enrichment source (Cilium API, Kubernetes, endpoints file).
    Directory,
    /// The operator said so (`--host-endpoint`).
    Operator,
    /// Not identified.
    Unknown,
}

/// The host-firewall checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostChecks {
    pub endpoint_id: Option<u16>,
    pub identified_by: HostIdentifiedBy,
    /// At least one host policy selects the node; null: unknown.
    pub policy_selected: Option<bool>,
    pub policy_selected_source: Option<FactSource>,
    /// What the directory knows about host policies, when it knows.
    pub coverage: Option<HostPolicyCoverage>,
    /// `host_endpoint_exists`, `host_policy_enabled_ingress`,
    /// `host_policy_selects_node`, `host_program_version`.
    pub gates: Vec<Gate>,
}

/// A critical flow at risk (audited) or being lost (denied).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockoutEntry {
    pub service: String,
    pub port: u16,
    pub protocol: String,
    pub remote: String,
    /// Identities merged into this entry (world and world-ipv4, ...).
    pub remote_identities: Vec<u32>,
    pub direction: Direction,
    pub notifications: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications_in_window: Option<u64>,
    #[serde(with = "rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "rfc3339")]
    pub last_seen: SystemTime,
    /// Seen while watching the first minutes after audit mode went off.
    pub after_switch: bool,
    /// Why a denial counts (in_progress only): e.g. it was audited before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_addrs: Vec<IpAddr>,
}

impl LockoutEntry {
    /// "service direction remote port/protocol", as logs, alarms and the CLI print it.
    pub fn describe(&self) -> String {
        use crate::text::escape_for_terminal as escape;
        format!(
            "{} {} {} {}/{}",
            escape(&self.service),
            self.direction.as_str(),
            escape(&self.remote),
            self.port,
            escape(&self.protocol)
        )
    }
}

/// Denied ingress to an ephemeral port from the cluster's infrastructure:
/// most likely the reply of a connection the node opened before enforcement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspectedReplyDrop {
    pub remote: String,
    pub remote_identity: u32,
    pub protocol: String,
    /// The node's local (ephemeral) port the reply was addressed to.
    pub port: u16,
    pub notifications: u64,
    #[serde(with = "rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "rfc3339")]
    pub last_seen: SystemTime,
    pub after_switch: bool,
    /// Source ports of the dropped packets, when a capture carried them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ports: Vec<u16>,
    /// Catalogue services the reply may belong to: from `remote_ports`
    /// when known (confirmed), else every service that remote side uses.
    pub possible_services: Vec<String>,
    /// The source port was seen and is a critical service port.
    pub confirmed: bool,
}

/// Policy drops without a port (drop notifications carry none) from the
/// infrastructure, with no port-carrying denial to explain them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnattributedDrop {
    pub remote: String,
    pub remote_identity: u32,
    pub direction: Direction,
    /// Cilium drop reason code (133 policy denied, 181 deny rule, ...).
    pub reason: u8,
    pub notifications: u64,
    #[serde(with = "rfc3339")]
    pub last_seen: SystemTime,
    pub after_switch: bool,
}

/// Where the agent saw the host go from audit to enforcement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchSource {
    /// The directory's PolicyAuditMode flag went from on to off.
    Directory,
    /// A critical flow that was audited started being denied.
    Counts,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcementSwitch {
    pub direction: Direction,
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    pub source: SwitchSource,
    /// Until when in-progress findings carry `after_switch`.
    #[serde(with = "rfc3339")]
    pub watch_until: SystemTime,
}

/// The host lockout answer in one word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockoutState {
    /// The agent saw every verdict of the host in the window, and none of
    /// them puts a critical flow at risk.
    #[default]
    Clear,
    /// Audited critical flows: enforcement would cut them.
    Risk,
    /// Denied critical flows: the node is losing them now.
    InProgress,
    /// The agent cannot tell: the host endpoint is unknown, or some of its
    /// audited or denied verdicts in the window are in no flow it read.
    Unknown,
}

/// Verdicts of one direction and class the kernel counted for an endpoint
/// that no flow the agent read carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostVerdicts {
    pub direction: Direction,
    pub verdict: Verdict,
    /// Since the counters began (monotonic).
    pub verdicts: u64,
    /// When the agent last saw the count grow.
    #[serde(with = "rfc3339")]
    pub last_grew: SystemTime,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockoutReport {
    pub host_endpoint_id: Option<u16>,
    /// `unknown` whenever the lists below cannot be complete.
    #[serde(default)]
    pub state: LockoutState,
    /// The host's audited and denied verdicts lost within the window: any of
    /// them could be a critical flow, so the state is `unknown`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence_lost: Vec<LostVerdicts>,
    /// Audited critical flows in the window: enforcement would cut them.
    pub risk: Vec<LockoutEntry>,
    /// Denied critical flows in the window: the node is losing them now.
    pub in_progress: Vec<LockoutEntry>,
    pub suspected_reply_drops: Vec<SuspectedReplyDrop>,
    pub unattributed_drops: Vec<UnattributedDrop>,
    pub enforcement_switch: Vec<EnforcementSwitch>,
    /// What the agent can and cannot see here.
    pub notes: Vec<String>,
}

/// `world` probing many ports with few notifications each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseSummary {
    pub endpoint_id: u16,
    pub direction: Direction,
    pub remote: String,
    /// Distinct ports probed (non-critical ones; the critical ones are
    /// in `critical_ports_hit` and reported as lockout risk instead).
    pub ports: usize,
    pub port_min: u16,
    pub port_max: u16,
    /// Up to 20 of the ports, lowest first.
    pub sample_ports: Vec<u16>,
    pub flows: usize,
    pub notifications: u64,
    pub audited: u64,
    pub denied: u64,
    #[serde(with = "rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "rfc3339")]
    pub last_seen: SystemTime,
    /// Critical ports the scan also hit (`22/tcp`, ...).
    pub critical_ports_hit: Vec<String>,
    /// Scanning addresses, when the input carried them (captures); up to 64.
    /// Suggestions never allow them, not even on a critical port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportConfig {
    pub window_seconds: u64,
    pub min_evidence_seconds: u64,
    pub noise_min_ports: usize,
    pub noise_max_notifications_per_port: u64,
    pub ephemeral_ports: String,
    pub watch_after_switch_seconds: u64,
    pub catalogue: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub endpoints: usize,
    pub ready: usize,
    pub would_break: usize,
    pub no_evidence: usize,
    pub lockout_risk: usize,
    pub lockout_in_progress: usize,
    /// Count per reason, for the table footer.
    pub reasons: BTreeMap<String, usize>,
}

/// `/api/v1/readiness`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadinessReport {
    #[serde(with = "rfc3339")]
    pub generated_at: SystemTime,
    pub node: Option<String>,
    pub config: ReportConfig,
    pub summary: Summary,
    pub endpoints: Vec<EndpointReadiness>,
    pub host: HostChecks,
    pub lockout: LockoutReport,
    pub noise: Vec<NoiseSummary>,
    pub notes: Vec<String>,
}

impl ReadinessReport {
    /// Endpoints an operator named: `host`, an endpoint ID, or
    /// `NAMESPACE/POD`. None when nothing matches.
    pub fn select(&self, selector: &str) -> Vec<&EndpointReadiness> {
        self.endpoints.iter().filter(|e| endpoint_matches(e, selector)).collect()
    }
}

/// `host`, an endpoint ID, `NAMESPACE/POD`, or `NAMESPACE/*` (every pod
/// endpoint of the namespace on this node; `*` is no valid pod name).
pub fn endpoint_matches(e: &EndpointReadiness, selector: &str) -> bool {
    if selector == "host" {
        return e.kind == EndpointKind::Host;
    }
    if let Ok(id) = selector.parse::<u16>() {
        return e.endpoint_id == id;
    }
    match selector.split_once('/') {
        Some((ns, "*")) => e.namespace.as_deref() == Some(ns) && e.kind != EndpointKind::Host,
        Some((ns, pod)) => e.namespace.as_deref() == Some(ns) && e.pod.as_deref() == Some(pod),
        None => false,
    }
}
