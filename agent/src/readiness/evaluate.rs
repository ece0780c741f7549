//! Readiness per endpoint and direction: the evidence gates and the state
//! they add up to. Silence is never `ready`: every way of seeing nothing
//! has its own `no_evidence` reason.

use std::{
    cmp::Reverse,
    collections::HashSet,
    time::{Duration, SystemTime},
};

use super::{
    Ctx,
    remote::RemoteSide,
    report::{
        DirectionReadiness, EndpointReadiness, FlowEntry, FlowsLeftOut, Gate, GateStatus, HostChecks, HostIdentifiedBy,
        MAX_LISTED_FLOWS, ReadinessState, Reason,
    },
};
use crate::{
    cilium::identity,
    model::{Direction, EndpointInfo, EndpointKind, FactSource, FlowRecord, NotifySource, Verdict, proto_name},
    timefmt::{format_duration, format_rfc3339},
};

pub use crate::cilium::monitor::api::match_type_name;

pub(super) fn flow_entry(ctx: &Ctx<'_>, idx: usize) -> FlowEntry {
    let f = &ctx.input.flows[idx];
    FlowEntry {
        direction: f.direction,
        remote: RemoteSide::of_identity(f.remote_identity).as_str().into(),
        remote_identity: f.remote_identity,
        remote_name: identity::display(f.remote_identity),
        remote_labels: ctx.input.directory.identity_labels(f.remote_identity).unwrap_or_default(),
        protocol: proto_name(f.proto),
        proto: f.proto,
        port: f.dst_port,
        verdict: f.verdict,
        match_type: match_type_name(f.match_type).into(),
        source: f.source,
        ipv6: f.ipv6,
        notifications: f.notifications,
        notifications_in_window: ctx.window_counts[idx],
        first_seen: f.first_seen,
        last_seen: f.last_seen,
        remote_addrs: f.remote_addrs.iter().copied().collect(),
        service: (Some(f.endpoint_id) == ctx.host)
            .then(|| ctx.critical_service(f))
            .flatten()
            .map(|c| c.service.clone()),
    }
}

/// The entries an endpoint's report lists out of `flows` (indices into the
/// input): at most [`MAX_LISTED_FLOWS`], the host's critical flows first,
/// then the most recently seen, so "anything in the last N minutes" stays
/// answerable from the list; and how many were left out.
fn listed(ctx: &Ctx<'_>, mut flows: Vec<usize>) -> (Vec<FlowEntry>, usize) {
    let left_out = flows.len().saturating_sub(MAX_LISTED_FLOWS);
    if left_out > 0 {
        let priority = |&i: &usize| {
            let f = &ctx.input.flows[i];
            let critical = Some(f.endpoint_id) == ctx.host && ctx.critical_service(f).is_some();
            (Reverse(critical), Reverse(f.last_seen))
        };
        flows.select_nth_unstable_by_key(MAX_LISTED_FLOWS - 1, priority);
        flows.truncate(MAX_LISTED_FLOWS);
    }
    let mut entries: Vec<FlowEntry> = flows.into_iter().map(|i| flow_entry(ctx, i)).collect();
    sort_entries(&mut entries);
    (entries, left_out)
}

fn sort_entries(v: &mut [FlowEntry]) {
    v.sort_by(|a, b| {
        (a.direction, &a.remote, a.remote_identity, a.proto, a.port, a.verdict).cmp(&(
            b.direction,
            &b.remote,
            b.remote_identity,
            b.proto,
            b.port,
            b.verdict,
        ))
    });
}

/// A gate before its outcome: what it checks, for which direction, and the
/// `no_evidence` reason it stands for. Gates block by default: a failed or
/// unknown one keeps the state at `no_evidence`; `advisory` ones only inform.
#[derive(Clone, Copy)]
struct GateCheck {
    name: &'static str,
    direction: Option<Direction>,
    cause: Option<Reason>,
    blocking: bool,
}

impl GateCheck {
    fn new(name: &'static str, direction: Option<Direction>) -> GateCheck {
        GateCheck { name, direction, cause: None, blocking: true }
    }

    fn because(self, cause: Reason) -> GateCheck {
        GateCheck { cause: Some(cause), ..self }
    }

    fn advisory(self) -> GateCheck {
        GateCheck { blocking: false, ..self }
    }

    fn passed(self, source: Option<FactSource>, detail: impl Into<String>) -> Gate {
        self.outcome(GateStatus::Passed, source, detail.into())
    }

    fn failed(self, source: Option<FactSource>, detail: impl Into<String>) -> Gate {
        self.outcome(GateStatus::Failed, source, detail.into())
    }

    fn unknown(self, source: Option<FactSource>, detail: impl Into<String>) -> Gate {
        self.outcome(GateStatus::Unknown, source, detail.into())
    }

    fn outcome(self, status: GateStatus, source: Option<FactSource>, detail: String) -> Gate {
        let GateCheck { name, direction, cause, blocking } = self;
        Gate { name: name.into(), direction, status, blocking, cause, source, detail }
    }
}

/// The direction policy facts: from the directory, else inferred from the
/// verdicts (bpf_lxc only emits verdicts for directions with policy, and
/// `audited` is only ever set in PolicyAuditMode).
struct Facts {
    enabled: Option<bool>,
    audit: Option<bool>,
    source: Option<FactSource>,
    inferred_enabled: bool,
}

fn facts(info: Option<&EndpointInfo>, dir: Direction, flows: &[&FlowRecord], lookback_start: SystemTime) -> Facts {
    let known = info.and_then(|i| match dir {
        Direction::Ingress => i.ingress,
        Direction::Egress => i.egress,
    });
    if let Some(k) = known {
        return Facts {
            enabled: Some(k.enabled),
            audit: Some(k.audit),
            source: Some(info.and_then(|i| i.policy_source).unwrap_or(FactSource::CiliumApi)),
            inferred_enabled: false,
        };
    }
    let recent = |v: Verdict| flows.iter().any(|f| f.verdict == v && f.last_seen >= lookback_start);
    let audit = if recent(Verdict::Audited) {
        Some(true)
    } else if recent(Verdict::Denied) {
        Some(false)
    } else {
        None
    };
    let enabled = (!flows.is_empty()).then_some(true);
    let source = (enabled.is_some() || audit.is_some()).then_some(FactSource::Inferred);
    Facts { enabled, audit, source, inferred_enabled: enabled.is_some() }
}

/// State of one direction from its facts and gates.
pub fn decide_direction(
    is_host: bool,
    dir: Direction,
    policy_enabled: Option<bool>,
    audit: Option<bool>,
    would_deny: usize,
    gates: &[&Gate],
) -> (ReadinessState, Reason) {
    if policy_enabled == Some(false) && !(is_host && dir == Direction::Ingress) {
        return (ReadinessState::Ready, Reason::NotEnforced);
    }
    if audit == Some(false) && policy_enabled == Some(true) {
        return (ReadinessState::Ready, Reason::Enforcing);
    }
    if would_deny > 0 {
        return (ReadinessState::WouldBreak, Reason::WouldDenyFlows);
    }
    match gates.iter().filter(|g| g.holds_back()).filter_map(|g| g.cause).min() {
        Some(cause) => (ReadinessState::NoEvidence, cause),
        None => (ReadinessState::Ready, Reason::NoWouldDeny),
    }
}

/// State of the endpoint from its directions.
pub fn combine(directions: &[DirectionReadiness]) -> (ReadinessState, Reason) {
    if directions.iter().any(|d| d.state == ReadinessState::WouldBreak) {
        return (ReadinessState::WouldBreak, Reason::WouldDenyFlows);
    }
    if let Some(r) = directions.iter().filter(|d| d.state == ReadinessState::NoEvidence).map(|d| d.reason).min() {
        return (ReadinessState::NoEvidence, r);
    }
    if directions.iter().all(|d| d.reason == Reason::NotEnforced) {
        return (ReadinessState::NoEvidence, Reason::NoPolicy);
    }
    if directions.iter().all(|d| matches!(d.reason, Reason::Enforcing | Reason::NotEnforced)) {
        return (ReadinessState::Ready, Reason::Enforcing);
    }
    (ReadinessState::Ready, Reason::NoWouldDeny)
}

/// The gates that concern the whole node's notifications (not one endpoint's).
pub(super) fn node_gates(ctx: &Ctx<'_>, endpoint_has_verdicts: bool) -> Vec<Gate> {
    let env = ctx.input.environment;
    let mut gates = Vec::new();
    let notifications = GateCheck::new("verdict_notifications", None).because(Reason::VerdictNotificationsOff);
    gates.push(match env.verdict_notifications {
        Some(true) => notifications.passed(Some(FactSource::CiliumApi), "policy verdict notifications are on"),
        Some(false) => notifications.failed(
            Some(FactSource::CiliumApi),
            "policy verdict notifications are off (--bpf-events-policy-verdict-enabled=false or the endpoint's \
             PolicyVerdictNotification option): audited flows are invisible; turn them on and wait for evidence",
        ),
        None if endpoint_has_verdicts => notifications
            .passed(Some(FactSource::Inferred), "inferred on: this endpoint's policy verdicts are arriving"),
        None => notifications.advisory().unknown(
            None,
            if ctx.any_policy_verdicts {
                "unknown for this endpoint: other endpoints' verdicts arrive, so the agent flag is on, but the \
                     endpoint option PolicyVerdictNotification could not be read"
            } else {
                "unknown: no policy verdict from any endpoint of this node yet, and the setting could not be read"
            },
        ),
    });
    let rate_limit = GateCheck::new("rate_limit", None).because(Reason::RateLimited);
    gates.push(match env.rate_limit {
        None => rate_limit.advisory().unknown(
            None,
            "could not read Cilium's events rate limit; its default (v1.17+: --bpf-events-default-rate-limit=0) is off",
        ),
        Some(rl) if !rl.configured => {
            rate_limit.passed(Some(FactSource::CiliumApi), "Cilium's events rate limit is off")
        }
        Some(rl) => match rl.dropped {
            Some(0) => rate_limit.passed(
                Some(FactSource::CiliumApi),
                "Cilium's events rate limit is on and dropped nothing in the window",
            ),
            Some(n) => rate_limit.failed(
                Some(FactSource::CiliumApi),
                format!(
                    "Cilium's events rate limit dropped {n} notifications in the window: audited flows may be \
                         missing; raise --bpf-events-default-rate-limit/--bpf-events-default-burst-limit or wait \
                         for a quiet window"
                ),
            ),
            None => rate_limit.unknown(
                Some(FactSource::CiliumApi),
                "Cilium's events rate limit is on and the agent cannot read how many notifications it dropped \
                 (cilium_ratelimit_metrics): audited flows may be missing",
            ),
        },
    });
    gates
}

pub(super) fn evaluate_endpoint(ctx: &Ctx<'_>, id: u16) -> EndpointReadiness {
    let info = ctx.endpoint_info(id);
    let is_host = Some(id) == ctx.host;
    let kind = if is_host { EndpointKind::Host } else { info.as_ref().map(|i| i.kind).unwrap_or_default() };
    let flows: Vec<(usize, &FlowRecord)> =
        ctx.by_endpoint.get(&id).into_iter().flatten().map(|&i| (i, &ctx.input.flows[i])).collect();
    let has_verdicts = flows.iter().any(|(_, f)| f.source == NotifySource::PolicyVerdict);

    let mut endpoint_gates = node_gates(ctx, has_verdicts);
    if is_host {
        endpoint_gates.extend(host_endpoint_gates(ctx, &flows));
    }

    let mut directions = Vec::new();
    let mut all_gates = endpoint_gates.clone();
    let (mut would_deny, mut allowed, mut denied, mut explicit_deny) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for dir in [Direction::Ingress, Direction::Egress] {
        let dflows: Vec<(usize, &FlowRecord)> = flows.iter().copied().filter(|(_, f)| f.direction == dir).collect();
        let refs: Vec<&FlowRecord> = dflows.iter().map(|(_, f)| *f).collect();
        let fx = facts(info.as_ref(), dir, &refs, ctx.lookback_start);
        let recent: Vec<(usize, &FlowRecord)> =
            dflows.iter().copied().filter(|(_, f)| f.last_seen >= ctx.lookback_start).collect();
        let mut wd = 0usize;
        for &(idx, f) in &recent {
            if ctx.noise.contains(&idx) {
                continue;
            }
            match f.verdict {
                Verdict::Audited if super::is_explicit_deny_hit(f) => explicit_deny.push(idx),
                Verdict::Audited => {
                    wd += 1;
                    would_deny.push(idx);
                }
                Verdict::Allowed | Verdict::Redirected => allowed.push(idx),
                Verdict::Denied => denied.push(idx),
            }
        }
        let observed_since = ctx.input.observation.since(id, dir);
        let dgates = direction_gates(ctx, id, is_host, dir, &fx, observed_since, &recent);
        let refs: Vec<&Gate> = endpoint_gates.iter().chain(dgates.iter()).collect();
        let (state, reason) = decide_direction(is_host, dir, fx.enabled, fx.audit, wd, &refs);
        directions.push(DirectionReadiness {
            direction: dir,
            state,
            reason,
            policy_enabled: fx.enabled,
            audit_mode: fx.audit,
            facts_source: fx.source,
            observed_since,
            would_deny_total: ctx.would_deny_totals.get(&(id, dir)).copied().unwrap_or(0),
        });
        all_gates.extend(dgates);
    }
    let (would_deny, would_deny_left_out) = listed(ctx, would_deny);
    let (allowed, allowed_left_out) = listed(ctx, allowed);
    let (denied, denied_left_out) = listed(ctx, denied);
    let (explicit_deny, explicit_deny_left_out) = listed(ctx, explicit_deny);
    let (state, reason) = combine(&directions);
    let mut ep = EndpointReadiness {
        endpoint_id: id,
        kind,
        namespace: info.as_ref().and_then(|i| i.namespace.clone()),
        pod: info.as_ref().and_then(|i| i.pod.clone()),
        workload: info.as_ref().and_then(|i| i.workload.clone()),
        identity: info.as_ref().and_then(|i| i.identity).or(is_host.then_some(identity::HOST)),
        labels: info.as_ref().map(|i| i.labels.clone()).unwrap_or_default(),
        state,
        reason,
        detail: String::new(),
        directions,
        would_deny,
        allowed,
        denied,
        explicit_deny,
        left_out: FlowsLeftOut {
            would_deny: would_deny_left_out,
            allowed: allowed_left_out,
            denied: denied_left_out,
            explicit_deny: explicit_deny_left_out,
        },
        gates: all_gates,
        noise_notifications_total: ctx.noise_totals.get(&id).copied().unwrap_or(0),
    };
    ep.detail = describe(&ep, ctx.config.min_evidence);
    ep
}

/// Whether every audited verdict the kernel counted for the endpoint in
/// this direction is in a flow the agent read: one that is not could be
/// the flow that breaks, so its absence is no evidence of safety.
fn evidence_complete(ctx: &Ctx<'_>, id: u16, dir: Direction) -> Gate {
    let gate = GateCheck::new("evidence_complete", Some(dir)).because(Reason::EvidenceLost);
    let lost = ctx
        .input
        .lost_evidence
        .iter()
        .find(|l| l.endpoint_id == id && l.direction == dir && l.verdict == Verdict::Audited);
    match lost {
        Some(l) if l.last_grew >= ctx.window_start => gate.failed(
            None,
            format!(
                "{} audited verdicts in {} were counted by the kernel but are in no flow the agent read (the flow                  table evicted them before a read, last at {}): the flow that would break is unknown; raise                  --flow-table-size or lower --poll-interval, and wait until the evidence period no longer                  contains a loss",
                l.verdicts,
                dir.as_str(),
                format_rfc3339(l.last_grew)
            ),
        ),
        Some(l) => gate.passed(
            None,
            format!(
                "{} audited verdicts were lost before the evidence period (last at {}); none since",
                l.verdicts,
                format_rfc3339(l.last_grew)
            ),
        ),
        None => gate.passed(None, "every audited verdict the kernel counted is in a flow the agent read"),
    }
}

fn direction_gates(
    ctx: &Ctx<'_>,
    id: u16,
    is_host: bool,
    dir: Direction,
    fx: &Facts,
    observed_since: Option<SystemTime>,
    recent: &[(usize, &FlowRecord)],
) -> Vec<Gate> {
    let d = Some(dir);
    let mut gates = Vec::new();
    let host_ingress = is_host && dir == Direction::Ingress;
    let name = if host_ingress { "host_policy_enabled_ingress" } else { "policy_enabled" };
    let policy = GateCheck::new(name, d);
    gates.push(match fx.enabled {
        Some(true) if fx.inferred_enabled => policy.because(Reason::NoPolicy).passed(
            Some(FactSource::Inferred),
            format!("inferred: verdicts were seen in {} (Cilium emits them only where policy applies)", dir.as_str()),
        ),
        Some(true) => policy
            .because(Reason::NoPolicy)
            .passed(fx.source, format!("a policy selects the endpoint in {}", dir.as_str())),
        Some(false) if host_ingress => policy.because(Reason::HostNotPolicyEnabled).failed(
            fx.source,
            "the host endpoint is not policy-enabled for ingress: no host policy applies to it, so it emits no \
             verdicts; apply a CiliumClusterwideNetworkPolicy with a nodeSelector matching this node (in audit \
             mode) and gather evidence",
        ),
        Some(false) => policy.because(Reason::NoPolicy).advisory().passed(
            fx.source,
            format!("no policy selects the endpoint in {}: enforcement changes nothing there", dir.as_str()),
        ),
        None => policy
            .because(Reason::NoPolicy)
            .advisory()
            .unknown(None, format!("unknown: no enrichment source knows, and no verdict was seen in {}", dir.as_str())),
    });
    let audit = GateCheck::new("audit_mode", d).advisory();
    gates.push(match fx.audit {
        Some(true) => audit.passed(fx.source, "PolicyAuditMode is on"),
        Some(false) => audit.passed(fx.source, "PolicyAuditMode is off: enforcement is on, denials are real"),
        None => audit.unknown(None, "unknown: no source knows and no verdict tells"),
    });
    if fx.enabled == Some(false) && !host_ingress {
        return gates;
    }
    gates.push(evidence_complete(ctx, id, dir));
    let observation = GateCheck::new("observation_period", d).because(Reason::WindowTooShort);
    let short = match observed_since {
        Some(since) => {
            let watched = ctx.input.now.duration_since(since).unwrap_or_default();
            if watched >= ctx.config.min_evidence {
                gates.push(observation.passed(
                    None,
                    format!(
                        "observed for {} (at least {} required)",
                        format_duration(watched),
                        format_duration(ctx.config.min_evidence)
                    ),
                ));
                false
            } else {
                let ready_at = since + ctx.config.min_evidence;
                gates.push(observation.failed(
                    None,
                    format!(
                        "observed for {} of the {} required: rare flows (nightly jobs, failovers) may not have \
                             happened yet; evidence complete at {}",
                        format_duration(watched),
                        format_duration(ctx.config.min_evidence),
                        format_rfc3339(ready_at)
                    ),
                ));
                true
            }
        }
        None => {
            gates.push(observation.unknown(
                None,
                "the agent does not know since when this endpoint has been watched (for a capture: pass \
                 --capture-duration)",
            ));
            true
        }
    };
    let count = |pred: fn(Verdict) -> bool| recent.iter().filter(|(_, f)| pred(f.verdict)).count();
    let (a, w, x) = (
        count(|v| matches!(v, Verdict::Allowed | Verdict::Redirected)),
        count(|v| v == Verdict::Audited),
        count(|v| v == Verdict::Denied),
    );
    if a + w + x > 0 {
        gates.push(GateCheck::new("verdicts_seen", d).because(Reason::NoTraffic).passed(
            None,
            format!(
                "{a} allowed, {w} audited, {x} denied flows in the last {}",
                format_duration(ctx.config.min_evidence)
            ),
        ));
    } else {
        let (cause, why) = diagnose_silence(ctx, is_host, fx, short);
        gates.push(GateCheck::new("verdicts_seen", d).because(cause).failed(
            None,
            format!("no verdict in {} in the last {}: {why}", dir.as_str(), format_duration(ctx.config.min_evidence)),
        ));
    }
    gates
}

/// Why a silent host direction in audit mode (Cilium 1.16+) is no evidence:
/// `policy_log.h` in bpf_host returns before emitting when the match type is
/// `all` and the verdict is CTX_ACT_OK, which it is after audit mode turned
/// a deny into an allow (see docs/cilium-compatibility.md, "Silence of the
/// host firewall").
const HOST_MATCH_ALL_SILENCE: &str = "bpf_host (Cilium 1.16+) emits no verdict for traffic matched with match type \
    `all` once audit mode has allowed it: traffic audited by a catch-all host deny (`fromEntities: [all]` without \
    ports) and, from 1.20, by entity rules without ports leaves no trace, so this silence may hide traffic \
    enforcement would drop; give the catch-all rule ports or capture drops after a short enforcement test";

/// The most likely reason a direction is silent, most fundamental first.
fn diagnose_silence(ctx: &Ctx<'_>, is_host: bool, fx: &Facts, short_observation: bool) -> (Reason, String) {
    let env = ctx.input.environment;
    if env.verdict_notifications == Some(false) {
        return (Reason::VerdictNotificationsOff, "policy verdict notifications are off".into());
    }
    if is_host && env.cilium_version.is_some_and(|v| !v.at_least(1, 16)) {
        return (
            Reason::HostProgramPre116,
            "before Cilium 1.16 bpf_host emits verdicts only for the directions its filter had when it was compiled \
             (at load time, not on policy changes, cilium#21884); restart the Cilium agent on this node after the \
             last host policy change, and capture drops as well"
                .into(),
        );
    }
    if env.rate_limit.is_some_and(|r| r.configured && r.dropped.is_some_and(|n| n > 0)) {
        return (Reason::RateLimited, "Cilium's events rate limit dropped notifications".into());
    }
    if short_observation {
        return (Reason::WindowTooShort, "the observation is too short to call silence evidence".into());
    }
    if fx.enabled != Some(true) {
        return (
            Reason::NoPolicy,
            "most likely no policy selects the endpoint in this direction (inferred: nothing was ever seen)".into(),
        );
    }
    if is_host && fx.audit != Some(false) {
        return (Reason::HostMatchAllSuppressed, HOST_MATCH_ALL_SILENCE.into());
    }
    (
        Reason::NoTraffic,
        "policy applies and notifications are on, but no traffic was seen: nothing shows what the policy selects"
            .into(),
    )
}

fn host_endpoint_gates(ctx: &Ctx<'_>, flows: &[(usize, &FlowRecord)]) -> Vec<Gate> {
    let mut gates = Vec::new();
    let host_verdicts = flows.iter().filter(|(_, f)| f.source == NotifySource::PolicyVerdict).count();
    let selects_node = GateCheck::new("host_policy_selects_node", None).because(Reason::NoHostPolicy);
    gates.push(match ctx.input.directory.host_policy_coverage() {
        Some(c) if !c.selecting.is_empty() => selects_node.passed(
            Some(c.source),
            format!("selected by {}{}", c.selecting.join(", "), no_node_callout(&c.selecting_no_node)),
        ),
        Some(c) => selects_node.failed(
            Some(c.source),
            format!(
                "no CiliumClusterwideNetworkPolicy with a nodeSelector selects this node{}",
                no_node_callout(&c.selecting_no_node)
            ),
        ),
        None if !flows.is_empty() => selects_node.passed(
            Some(FactSource::Inferred),
            format!(
                "inferred: the host endpoint emitted {} flows, which it only does under a host policy",
                flows.len()
            ),
        ),
        None => selects_node.unknown(
            None,
            "unknown: no source could tell whether a host policy selects this node, and the host endpoint emitted \
             nothing; check `kubectl get ccnp` for a nodeSelector matching this node",
        ),
    });
    let host_program = GateCheck::new("host_program_version", None).because(Reason::HostProgramPre116);
    gates.push(match ctx.input.environment.cilium_version {
        Some(v) if v.at_least(1, 16) => host_program
            .passed(Some(FactSource::CiliumApi), format!("Cilium {v}: the host firewall emits policy verdicts")),
        // Before 1.16 bpf_host takes its verdict filter from the host's
        // policy when it is compiled and is not reloaded when the policy
        // changes (cilium#21884): verdicts that flow are real, but a
        // direction whose policy came later may be silent.
        Some(v) if host_verdicts > 0 => host_program.advisory().passed(
            Some(FactSource::CiliumApi),
            format!(
                "Cilium {v}: the host firewall emits policy verdicts ({host_verdicts} flows seen), but before 1.16 \
                 only for the directions its filter had when bpf_host was last compiled (not on policy changes, \
                 cilium#21884): a direction or rule added since the Cilium agent last restarted may emit nothing; \
                 restart the Cilium agent on this node after the last host policy change to be sure"
            ),
        ),
        Some(v) => host_program.failed(
            Some(FactSource::CiliumApi),
            format!(
                "Cilium {v}: no host policy verdict seen; before 1.16 bpf_host emits verdicts only for the \
                 directions its filter had when it was compiled (at load time, cilium#21884), so audited host \
                 traffic may be invisible; restart the Cilium agent on this node after the last host policy change, \
                 or capture with `-t drop` as well"
            ),
        ),
        None if host_verdicts > 0 => host_program.passed(
            Some(FactSource::Inferred),
            "inferred: the host endpoint emits policy verdicts (Cilium 1.16 or later)",
        ),
        None => host_program.advisory().unknown(
            None,
            "unknown Cilium version and no host policy verdict seen; before 1.16 the host firewall emits none",
        ),
    });
    gates
}

fn no_node_callout(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(
            "; host policies whose nodeSelector matches no node at all (check their labels, a classic way to lose \
             a node when you think it is covered): {}",
            names.join(", ")
        )
    }
}

/// The host checks section, also when the host endpoint is unknown.
pub(super) fn host_checks(ctx: &Ctx<'_>, host_entry: Option<&EndpointReadiness>) -> HostChecks {
    let mut gates = Vec::new();
    let directory_knows_endpoints = !ctx.input.directory.endpoints().is_empty();
    let host_endpoint = GateCheck::new("host_endpoint_exists", None).because(Reason::HostEndpointMissing);
    gates.push(match (ctx.host, ctx.host_by) {
        (Some(id), HostIdentifiedBy::Directory) => host_endpoint.passed(ctx.host_source, format!("host endpoint {id}")),
        (Some(id), _) => host_endpoint.passed(
            None,
            format!("host endpoint {id}, as given by the operator (not confirmed by an enrichment source)"),
        ),
        (None, _) if directory_knows_endpoints => host_endpoint.failed(
            Some(FactSource::CiliumApi),
            "no host endpoint among this node's endpoints: the host firewall is off (enable-host-firewall)",
        ),
        (None, _) => host_endpoint
            .unknown(None, "unknown: no enrichment source lists endpoints; pass --host-endpoint or --endpoints"),
    });
    let (policy_selected, policy_selected_source) = match host_entry {
        Some(h) => {
            for g in &h.gates {
                if g.name.starts_with("host_") {
                    gates.push(g.clone());
                }
            }
            let sel = h.gates.iter().find(|g| g.name == "host_policy_selects_node");
            match sel.map(|g| g.status) {
                Some(GateStatus::Passed) => (Some(true), sel.and_then(|g| g.source)),
                Some(GateStatus::Failed) => (Some(false), sel.and_then(|g| g.source)),
                _ => (None, None),
            }
        }
        None => match ctx.input.directory.host_policy_coverage() {
            Some(c) => (Some(!c.selecting.is_empty()), Some(c.source)),
            None => (None, None),
        },
    };
    HostChecks {
        endpoint_id: ctx.host,
        identified_by: ctx.host_by,
        policy_selected,
        policy_selected_source,
        coverage: ctx.input.directory.host_policy_coverage(),
        gates,
    }
}

fn describe(ep: &EndpointReadiness, min_evidence: Duration) -> String {
    let mut text = describe_reason(ep, min_evidence);
    // Traffic dropped now is news whatever the state says: an enforcing or
    // silent endpoint that is dropping must not read as quiet.
    let denied = ep.denied.len() + ep.left_out.denied;
    if denied > 0 && ep.reason != Reason::Enforcing {
        let f = &ep.denied[0];
        text.push_str(&format!(
            "; {denied} flow(s) denied now, e.g. {} {} {} {}/{}",
            f.direction.as_str(),
            if f.direction == Direction::Ingress { "from" } else { "to" },
            crate::text::escape_for_terminal(&f.remote_name),
            f.port,
            f.protocol
        ));
    }
    let explicit = ep.explicit_deny.len() + ep.left_out.explicit_deny;
    if explicit > 0 {
        text.push_str(&format!(
            "; {explicit} audited flow(s) matched a deny rule: enforcement drops them as the policy says (no allow \
             is suggested for them)"
        ));
    }
    text
}

fn describe_reason(ep: &EndpointReadiness, min_evidence: Duration) -> String {
    match ep.reason {
        Reason::WouldDenyFlows => {
            let first = &ep.would_deny[0];
            format!(
                "{} flow(s) would be denied once PolicyAuditMode is off, e.g. {} {} {} {}/{}",
                ep.would_deny_flows(),
                first.direction.as_str(),
                if first.direction == Direction::Ingress { "from" } else { "to" },
                crate::text::escape_for_terminal(&first.remote_name),
                first.port,
                first.protocol
            )
        }
        Reason::NoWouldDeny => format!(
            "{} allowed flow(s) and nothing audited over the last {}: switching PolicyAuditMode off breaks nothing seen",
            ep.allowed.len() + ep.left_out.allowed,
            format_duration(min_evidence)
        ),
        Reason::Enforcing => format!("PolicyAuditMode is already off: {} denied flow(s) in the evidence period", ep.denied.len() + ep.left_out.denied),
        Reason::NoPolicy if ep.directions.iter().all(|d| d.reason == Reason::NotEnforced) => {
            "no policy selects this endpoint: audit mode changes nothing today, and nothing shows what a policy would drop".into()
        }
        _ => ep
            .gates
            .iter()
            .filter(|g| g.holds_back() && g.cause == Some(ep.reason))
            .map(|g| g.detail.clone())
            .next()
            .unwrap_or_else(|| ep.reason.as_str().replace('_', " ")),
    }
}

/// The same endpoint judged on a shorter evidence period `lookback`
/// (preflight `--window`): only would-deny flows last seen within it count,
/// and the observation must cover it. Gates computed by the agent on facts
/// (policy, notifications, rate limit, host checks) are kept as they are.
pub fn rejudge(ep: &EndpointReadiness, generated_at: SystemTime, lookback: Duration) -> EndpointReadiness {
    let start = generated_at.checked_sub(lookback).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut out = ep.clone();
    let keep = |v: &mut Vec<FlowEntry>| v.retain(|f| f.last_seen >= start);
    keep(&mut out.would_deny);
    keep(&mut out.allowed);
    keep(&mut out.denied);
    keep(&mut out.explicit_deny);
    let is_host = ep.kind == EndpointKind::Host;
    let mut gates: Vec<Gate> = Vec::new();
    for g in &ep.gates {
        let mut g = g.clone();
        match (g.name.as_str(), g.direction) {
            ("observation_period", Some(dir)) => {
                let since = ep.directions.iter().find(|d| d.direction == dir).and_then(|d| d.observed_since);
                let watched = since.map(|s| generated_at.duration_since(s).unwrap_or_default());
                match watched {
                    Some(w) if w >= lookback => {
                        g.status = GateStatus::Passed;
                        g.detail = format!(
                            "observed for {} (at least {} asked)",
                            format_duration(w),
                            format_duration(lookback)
                        );
                    }
                    Some(w) => {
                        g.status = GateStatus::Failed;
                        g.detail =
                            format!("observed for {} of the {} asked", format_duration(w), format_duration(lookback));
                    }
                    None => g.status = GateStatus::Unknown,
                }
            }
            ("verdicts_seen", Some(dir)) => {
                let n = |v: &Vec<FlowEntry>| v.iter().filter(|f| f.direction == dir).count();
                let (a, w, x) = (n(&out.allowed), n(&out.would_deny) + n(&out.explicit_deny), n(&out.denied));
                if a + w + x > 0 {
                    g.status = GateStatus::Passed;
                    g.cause = Some(Reason::NoTraffic);
                    // Lists keep the most recent flows, so a shorter period's
                    // counts are exact unless a list was cut.
                    let at_least = if out.left_out.is_empty() { "" } else { "at least " };
                    g.detail = format!(
                        "{at_least}{a} allowed, {w} audited, {x} denied flows in the last {}",
                        format_duration(lookback)
                    );
                } else if g.status == GateStatus::Passed {
                    g.status = GateStatus::Failed;
                    g.cause = Some(Reason::NoTraffic);
                    g.detail = format!("no verdict in {} in the last {}", dir.as_str(), format_duration(lookback));
                }
            }
            _ => {}
        }
        gates.push(g);
    }
    let mut directions = ep.directions.clone();
    for d in &mut directions {
        let refs: Vec<&Gate> =
            gates.iter().filter(|g| g.direction.is_none() || g.direction == Some(d.direction)).collect();
        let wd = out.would_deny.iter().filter(|f| f.direction == d.direction).count();
        (d.state, d.reason) = decide_direction(is_host, d.direction, d.policy_enabled, d.audit_mode, wd, &refs);
    }
    out.gates = gates;
    (out.state, out.reason) = combine(&directions);
    out.directions = directions;
    out.detail = describe(&out, lookback);
    out
}

/// Endpoint IDs to report: every endpoint the directory knows, every one
/// with flows, and the host.
pub(super) fn endpoint_ids(ctx: &Ctx<'_>) -> Vec<u16> {
    let mut ids: HashSet<u16> = ctx.input.directory.endpoints().iter().map(|e| e.id).collect();
    ids.extend(ctx.input.flows.iter().map(|f| f.endpoint_id));
    ids.extend(ctx.host);
    let mut ids: Vec<u16> = ids.into_iter().collect();
    ids.sort_unstable();
    ids
}
