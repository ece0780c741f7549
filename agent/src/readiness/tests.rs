//! Scenario tests of the readiness engine: the exact sets reported as
//! would-break, lockout risk, in progress, noise and no evidence.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use super::{
    alarms::{AlarmKind, AlarmLimits, AlarmManager, AlarmTarget, MemorySink},
    testkit::*,
    *,
};
use crate::model::{
    Direction, EndpointInfo, EndpointKind, FactSource, FlowRecord, HostPolicyCoverage, NotifySource, Verdict,
};

fn env_ok() -> EvidenceEnvironment {
    EvidenceEnvironment {
        cilium_version: Some("1.16.3".parse().unwrap()),
        verdict_notifications: Some(true),
        rate_limit: Some(RateLimit { configured: false, dropped: None }),
    }
}

fn report_for(
    dir: &FakeDirectory,
    flows: &[FlowRecord],
    since: std::time::SystemTime,
    env: EvidenceEnvironment,
) -> ReadinessReport {
    let obs = Observation::since_start(since);
    let mut input = ReadinessInput::new(flows, dir, &obs, now());
    input.environment = env;
    input.node = Some(NODE.into());
    evaluate(&input, &ReadinessConfig::default())
}

fn scenario_report() -> (Scenario, ReadinessReport) {
    let sc = Scenario::lockout();
    let flows = sc.flows(&sc.policies, false);
    let r = report_for(&sc.directory, &flows, sc.observed_since, env_ok());
    (sc, r)
}

fn ep(r: &ReadinessReport, id: u16) -> &EndpointReadiness {
    r.endpoints.iter().find(|e| e.endpoint_id == id).unwrap_or_else(|| panic!("endpoint {id} in report"))
}

fn flow_set(v: &[FlowEntry]) -> BTreeSet<(Direction, u32, u16, String)> {
    v.iter().map(|f| (f.direction, f.remote_identity, f.port, f.protocol.clone())).collect()
}

fn s(v: &str) -> String {
    v.to_owned()
}

#[test]
fn lockout_scenario_states_per_endpoint() {
    let (_, r) = scenario_report();
    let states: Vec<(u16, ReadinessState, Reason)> =
        r.endpoints.iter().map(|e| (e.endpoint_id, e.state, e.reason)).collect();
    assert_eq!(
        states,
        vec![
            (HOST, ReadinessState::WouldBreak, Reason::WouldDenyFlows),
            (WEB, ReadinessState::WouldBreak, Reason::WouldDenyFlows),
            (API, ReadinessState::Ready, Reason::Enforcing),
            (QUIET, ReadinessState::NoEvidence, Reason::NoTraffic),
        ]
    );
    assert_eq!((r.summary.ready, r.summary.would_break, r.summary.no_evidence), (1, 2, 1));
}

#[test]
fn lockout_scenario_would_deny_sets() {
    let (_, r) = scenario_report();
    use Direction::*;
    // The host policy forgot kubelet, health (TCP and ICMP) and SSH; the
    // scan's ports are noise, except 22 which the operator uses too.
    assert_eq!(
        flow_set(&ep(&r, HOST).would_deny),
        BTreeSet::from([
            (Ingress, 2, 22, s("tcp")),
            (Ingress, 4, 0, s("icmp")),
            (Ingress, 4, 4240, s("tcp")),
            (Ingress, 6, 10250, s("tcp")),
            (Ingress, 9, 22, s("tcp")),
        ])
    );
    assert_eq!(
        flow_set(&ep(&r, HOST).allowed),
        BTreeSet::from([(Ingress, 6, 8472, s("udp")), (Ingress, 7, 6443, s("tcp"))])
    );
    assert_eq!(flow_set(&ep(&r, WEB).would_deny), BTreeSet::from([(Egress, 2, 5432, s("tcp"))]));
    assert_eq!(
        flow_set(&ep(&r, WEB).allowed),
        BTreeSet::from([(Ingress, FRONTEND_ID, 8080, s("tcp")), (Egress, KUBE_DNS_ID, 53, s("udp"))])
    );
    assert!(ep(&r, API).would_deny.is_empty());
    assert_eq!(flow_set(&ep(&r, API).denied), BTreeSet::from([(Egress, 2, 443, s("tcp"))]));
    assert!(ep(&r, QUIET).would_deny.is_empty() && ep(&r, QUIET).allowed.is_empty());
    // Critical flows carry their catalogue service.
    let services: BTreeSet<Option<String>> = ep(&r, HOST).would_deny.iter().map(|f| f.service.clone()).collect();
    assert_eq!(
        services,
        BTreeSet::from([Some(s("cilium-health")), Some(s("cilium-health-icmp")), Some(s("kubelet")), Some(s("ssh"))])
    );
}

#[test]
fn lockout_scenario_risk_noise_and_nothing_in_progress() {
    let (_, r) = scenario_report();
    let risk: BTreeSet<(String, u16, String, String)> =
        r.lockout.risk.iter().map(|e| (e.service.clone(), e.port, e.protocol.clone(), e.remote.clone())).collect();
    assert_eq!(
        risk,
        BTreeSet::from([
            (s("cilium-health"), 4240, s("tcp"), s("health")),
            (s("cilium-health-icmp"), 0, s("icmp"), s("health")),
            (s("kubelet"), 10250, s("tcp"), s("remote-node")),
            (s("ssh"), 22, s("tcp"), s("world")),
        ])
    );
    let ssh = r.lockout.risk.iter().find(|e| e.service == "ssh").unwrap();
    assert_eq!(ssh.remote_identities, vec![2, 9], "the operator's and the scanner's SSH are one risk");
    assert_eq!(ssh.notifications, 7);
    assert!(r.lockout.in_progress.is_empty());
    assert!(r.lockout.suspected_reply_drops.is_empty());
    assert!(r.lockout.unattributed_drops.is_empty());
    assert!(r.lockout.enforcement_switch.is_empty());

    assert_eq!(r.noise.len(), 1);
    let n = &r.noise[0];
    assert_eq!(n.endpoint_id, HOST);
    let expected: Vec<u16> = scan_ports().into_iter().filter(|&p| p != 22).collect();
    assert_eq!(n.ports, expected.len());
    assert_eq!(n.sample_ports, expected);
    assert_eq!(n.critical_ports_hit, vec![s("22/tcp")]);
    assert_eq!((n.audited, n.denied), (19, 0));
    assert_eq!(ep(&r, HOST).noise_notifications_total, 19);
}

#[test]
fn lockout_scenario_host_checks() {
    let (_, r) = scenario_report();
    assert_eq!(r.host.endpoint_id, Some(HOST));
    assert_eq!(r.host.identified_by, HostIdentifiedBy::Directory);
    assert_eq!(r.host.policy_selected, Some(true));
    assert_eq!(r.host.policy_selected_source, Some(FactSource::Kubernetes));
    let names: Vec<&str> = r.host.gates.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        names,
        ["host_endpoint_exists", "host_policy_selects_node", "host_program_version", "host_policy_enabled_ingress"]
    );
    let sel = r.host.gates.iter().find(|g| g.name == "host_policy_selects_node").unwrap();
    assert!(sel.detail.contains("host-baseline") && sel.detail.contains("host-control-plane"), "{}", sel.detail);
    assert!(r.host.gates.iter().all(|g| g.status == GateStatus::Passed));
}

#[test]
fn the_report_round_trips_through_json() {
    let (_, r) = scenario_report();
    let json = serde_json::to_string(&r).unwrap();
    let back: ReadinessReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["generated_at"], "2026-11-22T12:00:00Z");
    assert_eq!(v["endpoints"][0]["state"], "would_break");
    assert_eq!(v["endpoints"][0]["would_deny"][0]["protocol"], "icmp");
    assert_eq!(v["endpoints"][0]["would_deny"][0]["remote"], "health");
    assert_eq!(v["lockout"]["risk"][0]["service"], "cilium-health");
    assert!(v["noise"][0]["ports"].is_number());
}

fn quiet_dir(
    ingress: Option<crate::model::DirectionPolicy>,
    egress: Option<crate::model::DirectionPolicy>,
) -> FakeDirectory {
    FakeDirectory {
        endpoints: vec![pod_info(QUIET, "shop", "quiet-0", "quiet", 51_003, ingress, egress)],
        ..FakeDirectory::default()
    }
}

fn quiet_reason(
    dir: &FakeDirectory,
    flows: &[FlowRecord],
    since_secs: u64,
    env: EvidenceEnvironment,
) -> (ReadinessState, Reason) {
    let r = report_for(dir, flows, ago(since_secs), env);
    let e = ep(&r, QUIET);
    (e.state, e.reason)
}

#[test]
fn silence_is_never_ready_each_cause_has_its_reason() {
    let enabled = quiet_dir(dp(true, true), dp(false, true));
    let long = 48 * 3600;
    use ReadinessState::NoEvidence;
    // Policy, notifications, no rate limit, long enough: just no traffic.
    assert_eq!(quiet_reason(&enabled, &[], long, env_ok()), (NoEvidence, Reason::NoTraffic));
    // No policy in any direction (known).
    assert_eq!(
        quiet_reason(&quiet_dir(dp(false, true), dp(false, true)), &[], long, env_ok()),
        (NoEvidence, Reason::NoPolicy)
    );
    // Nothing known and nothing seen: most likely no policy (inferred).
    assert_eq!(quiet_reason(&quiet_dir(None, None), &[], long, env_ok()), (NoEvidence, Reason::NoPolicy));
    // Verdict notifications off.
    let off = EvidenceEnvironment { verdict_notifications: Some(false), ..env_ok() };
    assert_eq!(quiet_reason(&enabled, &[], long, off), (NoEvidence, Reason::VerdictNotificationsOff));
    // Rate limited.
    let limited =
        EvidenceEnvironment { rate_limit: Some(RateLimit { configured: true, dropped: Some(12) }), ..env_ok() };
    assert_eq!(quiet_reason(&enabled, &[], long, limited), (NoEvidence, Reason::RateLimited));
    // Window too short.
    assert_eq!(quiet_reason(&enabled, &[], 2 * 3600, env_ok()), (NoEvidence, Reason::WindowTooShort));
    // Unknown observation start is no better than a short one.
    let obs = Observation::default();
    let input = ReadinessInput { environment: env_ok(), ..ReadinessInput::new(&[], &enabled, &obs, now()) };
    let r = evaluate(&input, &ReadinessConfig::default());
    assert_eq!(ep(&r, QUIET).reason, Reason::WindowTooShort);
}

#[test]
fn silence_causes_also_hold_back_endpoints_with_traffic() {
    let dir = quiet_dir(dp(true, true), dp(false, true));
    let flows = [flow(QUIET, Direction::Ingress, FRONTEND_ID, 6, 80, Verdict::Allowed, 50, ago(40 * 3600), ago(60))];
    let long = 48 * 3600;
    assert_eq!(quiet_reason(&dir, &flows, long, env_ok()), (ReadinessState::Ready, Reason::NoWouldDeny));
    let limited =
        EvidenceEnvironment { rate_limit: Some(RateLimit { configured: true, dropped: Some(3) }), ..env_ok() };
    assert_eq!(quiet_reason(&dir, &flows, long, limited), (ReadinessState::NoEvidence, Reason::RateLimited));
    let unknown_drops =
        EvidenceEnvironment { rate_limit: Some(RateLimit { configured: true, dropped: None }), ..env_ok() };
    assert_eq!(quiet_reason(&dir, &flows, long, unknown_drops), (ReadinessState::NoEvidence, Reason::RateLimited));
    assert_eq!(quiet_reason(&dir, &flows, 3600, env_ok()), (ReadinessState::NoEvidence, Reason::WindowTooShort));
    // What the agent cannot read does not block when verdicts arrive.
    assert_eq!(
        quiet_reason(&dir, &flows, long, EvidenceEnvironment::default()),
        (ReadinessState::Ready, Reason::NoWouldDeny)
    );
}

fn host_only(host: EndpointInfo, coverage: Option<HostPolicyCoverage>) -> FakeDirectory {
    FakeDirectory { endpoints: vec![host], coverage, ..FakeDirectory::default() }
}

#[test]
fn host_silence_causes() {
    let long = ago(48 * 3600);
    let covered = Some(HostPolicyCoverage {
        selecting: vec!["hp".into()],
        selecting_no_node: vec![],
        source: FactSource::Kubernetes,
    });
    // Before 1.16 the host firewall emits no verdicts.
    let old = EvidenceEnvironment { cilium_version: Some("v1.15.7".parse().unwrap()), ..env_ok() };
    let r = report_for(&host_only(host_info(true), covered.clone()), &[], long, old);
    assert_eq!((ep(&r, HOST).state, ep(&r, HOST).reason), (ReadinessState::NoEvidence, Reason::HostProgramPre116));
    // ... even with its drops visible.
    let mut drop = flow(HOST, Direction::Ingress, 6, 0, 0, Verdict::Denied, 3, ago(100), ago(50));
    drop.source = NotifySource::PolicyDrop;
    let r = report_for(&host_only(host_info(true), covered.clone()), &[drop], long, old);
    assert_eq!(ep(&r, HOST).reason, Reason::HostProgramPre116);
    // Verdicts flowing before 1.16 (cilium#21884): the version gate passes,
    // says what may be missing, and does not tell the user to upgrade.
    let flowing = [
        flow(HOST, Direction::Ingress, 7, 6, 6443, Verdict::Allowed, 10, ago(40 * 3600), ago(10)),
        flow(HOST, Direction::Egress, 7, 6, 6443, Verdict::Allowed, 10, ago(40 * 3600), ago(10)),
    ];
    let r = report_for(&host_only(host_info(true), covered.clone()), &flowing, long, old);
    let gate = ep(&r, HOST).gates.iter().find(|g| g.name == "host_program_version").unwrap();
    assert_eq!(gate.status, GateStatus::Passed, "{}", gate.detail);
    assert!(gate.detail.contains("cilium#21884") && !gate.detail.contains("upgrade"), "{}", gate.detail);
    assert_ne!(ep(&r, HOST).reason, Reason::HostProgramPre116);
    // No host policy selects the node; a policy selecting no node is named.
    let none = Some(HostPolicyCoverage {
        selecting: vec![],
        selecting_no_node: vec!["cp-only".into()],
        source: FactSource::Kubernetes,
    });
    let allowed = [flow(HOST, Direction::Ingress, 7, 6, 6443, Verdict::Allowed, 10, ago(40 * 3600), ago(10))];
    let r = report_for(&host_only(host_info(true), none), &allowed, long, env_ok());
    assert_eq!((ep(&r, HOST).state, ep(&r, HOST).reason), (ReadinessState::NoEvidence, Reason::NoHostPolicy));
    assert_eq!(r.host.policy_selected, Some(false));
    assert!(ep(&r, HOST).detail.contains("cp-only"), "{}", ep(&r, HOST).detail);
    // Not policy-enabled for ingress.
    let mut h = host_info(true);
    h.ingress = dp(false, true);
    let r = report_for(&host_only(h, covered.clone()), &[], long, env_ok());
    assert_eq!(ep(&r, HOST).reason, Reason::HostNotPolicyEnabled);
    // The directory lists endpoints but none is the host: the host firewall is off.
    let r = report_for(&quiet_dir(dp(true, true), None), &[], long, env_ok());
    let exists = r.host.gates.iter().find(|g| g.name == "host_endpoint_exists").unwrap();
    assert_eq!((exists.status, r.host.endpoint_id), (GateStatus::Failed, None));
    assert!(r.lockout.notes[0].contains("host endpoint is unknown"));
}

#[test]
fn host_facts_inferred_without_a_directory() {
    let flows = [
        flow(HOST, Direction::Ingress, 7, 6, 6443, Verdict::Allowed, 10, ago(40 * 3600), ago(10)),
        flow(HOST, Direction::Ingress, 6, 6, 10250, Verdict::Audited, 3, ago(40 * 3600), ago(10)),
    ];
    let obs = Observation::since_start(ago(48 * 3600));
    let mut input = ReadinessInput::new(&flows, &crate::model::NoDirectory, &obs, now());
    input.host_endpoint = Some(HOST);
    let r = evaluate(&input, &ReadinessConfig::default());
    let h = ep(&r, HOST);
    assert_eq!((h.kind, h.state), (EndpointKind::Host, ReadinessState::WouldBreak));
    assert_eq!(r.host.identified_by, HostIdentifiedBy::Operator);
    assert_eq!((r.host.policy_selected, r.host.policy_selected_source), (Some(true), Some(FactSource::Inferred)));
    let ingress = &h.directions[0];
    assert_eq!(
        (ingress.policy_enabled, ingress.audit_mode, ingress.facts_source),
        (Some(true), Some(true), Some(FactSource::Inferred))
    );
    assert_eq!(r.lockout.risk.len(), 1);
}

#[test]
fn old_would_deny_still_breaks_and_preflight_window_can_narrow_it() {
    let dir = quiet_dir(dp(true, true), dp(false, true));
    let flows = [
        flow(QUIET, Direction::Ingress, FRONTEND_ID, 6, 80, Verdict::Allowed, 50, ago(40 * 3600), ago(60)),
        // A nightly job, 20 hours ago: still within the evidence period.
        flow(QUIET, Direction::Ingress, FRONTEND_ID, 6, 9090, Verdict::Audited, 2, ago(20 * 3600), ago(20 * 3600)),
    ];
    let r = report_for(&dir, &flows, ago(48 * 3600), env_ok());
    assert_eq!(ep(&r, QUIET).state, ReadinessState::WouldBreak);
    // After fixing the policy, the operator judges on the last 2 hours.
    let re = rejudge(ep(&r, QUIET), r.generated_at, Duration::from_secs(2 * 3600));
    assert_eq!((re.state, re.reason), (ReadinessState::Ready, Reason::NoWouldDeny));
    // A window longer than the observation is not enough evidence.
    let r2 = report_for(&dir, &flows[..1], ago(3 * 3600), env_ok());
    let re = rejudge(ep(&r2, QUIET), r2.generated_at, Duration::from_secs(6 * 3600));
    assert_eq!((re.state, re.reason), (ReadinessState::NoEvidence, Reason::WindowTooShort));
    // A window with no traffic in it is silence.
    let re = rejudge(ep(&r, QUIET), r.generated_at, Duration::from_secs(30));
    assert_eq!((re.state, re.reason), (ReadinessState::NoEvidence, Reason::NoTraffic));
}

#[test]
fn lists_are_bounded_critical_and_recent_first_and_counts_stay_exact() {
    // Within the one-day evidence period, the host has 150 audited flows
    // from remote nodes on high ports seen 10 hours ago, one critical flow
    // (kubelet) seen even earlier, and one recent audited flow.
    let mut flows: Vec<FlowRecord> = (0..150)
        .map(|i| flow(HOST, Direction::Ingress, 6, 6, 20_000 + i, Verdict::Audited, 1, ago(40 * 3600), ago(10 * 3600)))
        .collect();
    flows.push(flow(HOST, Direction::Ingress, 6, 6, 10250, Verdict::Audited, 1, ago(45 * 3600), ago(20 * 3600)));
    flows.push(flow(HOST, Direction::Ingress, 6, 6, 31_000, Verdict::Audited, 1, ago(3600), ago(60)));
    let obs = Observation::since_start(ago(48 * 3600));
    let mut input = ReadinessInput::new(&flows, &crate::model::NoDirectory, &obs, now());
    input.host_endpoint = Some(HOST);
    let r = evaluate(&input, &ReadinessConfig::default());
    let h = ep(&r, HOST);
    assert_eq!(h.would_deny.len(), report::MAX_LISTED_FLOWS);
    assert_eq!(h.left_out.would_deny, 152 - report::MAX_LISTED_FLOWS);
    assert_eq!(h.would_deny_flows(), 152);
    let ports: BTreeSet<u16> = h.would_deny.iter().map(|f| f.port).collect();
    assert!(ports.contains(&10250), "the critical flow is always listed");
    assert!(ports.contains(&31_000), "the most recent flow is listed");
    assert!(h.detail.starts_with("152 flow(s) would be denied"), "{}", h.detail);
    // Judged on the last 2 hours, only the recent flow is left: still would break.
    let re = rejudge(h, r.generated_at, Duration::from_secs(2 * 3600));
    assert_eq!(re.state, ReadinessState::WouldBreak);
    let json = serde_json::to_value(h).unwrap();
    assert_eq!(json["left_out"]["would_deny"], 52);
}

/// The host leaves audit mode: kubelet traffic that was audited is now
/// denied, a reply of a connection opened before the switch is dropped,
/// and a scanner knocks on SSH (which nobody used before).
fn after_switch_flows() -> Vec<FlowRecord> {
    use Direction::*;
    let mut v = vec![
        flow(HOST, Ingress, 6, 6, 10250, Verdict::Audited, 40, ago(30 * 3600), ago(1000)),
        flow(HOST, Ingress, 6, 6, 10250, Verdict::Denied, 12, ago(500), ago(10)),
        flow(HOST, Ingress, 7, 6, 45678, Verdict::Denied, 5, ago(480), ago(400)),
        flow(HOST, Ingress, 7, 6, 6443, Verdict::Allowed, 300, ago(30 * 3600), ago(5)),
        flow(HOST, Egress, 7, 6, 6443, Verdict::Allowed, 30, ago(30 * 3600), ago(5)),
    ];
    for p in scan_ports() {
        v.push(flow(HOST, Ingress, 2, 6, p, Verdict::Denied, 1, ago(200), ago(200)));
    }
    let mut drop = flow(HOST, Ingress, 4, 0, 0, Verdict::Denied, 2, ago(300), ago(290));
    drop.source = NotifySource::PolicyDrop;
    v.push(drop);
    v
}

#[test]
fn lockout_in_progress_after_the_switch_from_the_directory() {
    let mut dir = host_only(host_info(true), None);
    let mut engine = ReadinessEngine::new(ReadinessConfig::default());
    let obs = Observation::since_start(ago(48 * 3600));
    let before: Vec<FlowRecord> = after_switch_flows().into_iter().filter(|f| f.verdict != Verdict::Denied).collect();
    let mut input = ReadinessInput::new(&before, &dir, &obs, ago(600));
    input.environment = env_ok();
    let r1 = engine.evaluate(&input);
    assert!(r1.lockout.enforcement_switch.is_empty());
    assert_eq!(r1.lockout.risk.len(), 1);

    dir.endpoints[0] = host_info(false);
    let flows = after_switch_flows();
    let mut input = ReadinessInput::new(&flows, &dir, &obs, now());
    input.environment = env_ok();
    let r = engine.evaluate(&input);

    let sw = &r.lockout.enforcement_switch;
    assert_eq!(sw.len(), 1);
    assert_eq!((sw[0].direction, sw[0].source, sw[0].at), (Direction::Ingress, SwitchSource::Directory, ago(600)));
    let in_progress: Vec<(String, u16, String, bool)> =
        r.lockout.in_progress.iter().map(|e| (e.service.clone(), e.port, e.remote.clone(), e.after_switch)).collect();
    // SSH denials from a scan, on a port nobody used, are not a lockout.
    assert_eq!(in_progress, vec![(s("kubelet"), 10250, s("remote-node"), true)]);
    assert!(r.lockout.in_progress[0].why.contains("accepted before"));
    assert!(r.lockout.risk.is_empty(), "audited 1000 s ago is outside the 15 min window");

    let replies = &r.lockout.suspected_reply_drops;
    assert_eq!(replies.len(), 1);
    assert_eq!((replies[0].remote.as_str(), replies[0].port, replies[0].confirmed), ("kube-apiserver", 45678, false));
    assert!(replies[0].possible_services.contains(&s("kube-apiserver")), "{:?}", replies[0].possible_services);
    assert!(replies[0].after_switch);
    assert!(r.lockout.notes.iter().any(|n| n.contains("ephemeral port")));

    // The health drop has no port; no denied verdict explains it.
    let un: Vec<(String, u8)> = r.lockout.unattributed_drops.iter().map(|d| (d.remote.clone(), d.reason)).collect();
    assert_eq!(un, vec![(s("health"), 133)]);

    assert_eq!(r.noise.len(), 1);
    assert_eq!(r.noise[0].denied, 19);
    assert_eq!(ep(&r, HOST).reason, Reason::Enforcing);

    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let collector = metrics::ReadinessCollector::default();
    *collector.report.write().unwrap() = Some(r.clone());
    registry.register_collector(Box::new(collector));
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let in_progress: BTreeSet<&str> =
        text.lines().filter(|l| l.starts_with("verdict_agent_host_lockout_in_progress{")).collect();
    assert_eq!(
        in_progress,
        BTreeSet::from([
            r#"verdict_agent_host_lockout_in_progress{port="10250",protocol="tcp",remote="remote-node",service="kubelet"} 1"#,
            r#"verdict_agent_host_lockout_in_progress{port="",protocol="tcp",remote="kube-apiserver",service="reply_to_pre_existing_connection"} 1"#,
            r#"verdict_agent_host_lockout_in_progress{port="",protocol="",remote="health",service="unattributed_policy_drop"} 1"#,
        ])
    );
    let keys: BTreeSet<String> = alarms::alarms_from(&r).into_iter().map(|a| a.key).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            s("in_progress/kubelet/ingress/remote-node/10250/tcp"),
            s("reply/kube-apiserver"),
            s("drop/ingress/health")
        ])
    );
}

#[test]
fn lockout_switch_inferred_from_counts_and_replies_confirmed_by_ports() {
    let dir = host_only(host_info(false), None);
    let flows = after_switch_flows();
    let obs = Observation::since_start(ago(48 * 3600));
    let mut ports = SourcePorts::new();
    ports.insert(FlowKey::from(&flows[2]), BTreeSet::from([6443]));
    let mut input = ReadinessInput::new(&flows, &dir, &obs, now());
    input.source_ports = Some(&ports);
    let r = evaluate(&input, &ReadinessConfig::default());
    let sw = &r.lockout.enforcement_switch;
    assert_eq!((sw.len(), sw[0].source, sw[0].at), (1, SwitchSource::Counts, ago(500)));
    let reply = &r.lockout.suspected_reply_drops[0];
    assert_eq!(
        (reply.confirmed, reply.remote_ports.clone(), reply.possible_services.clone()),
        (true, vec![6443], vec![s("kube-apiserver")])
    );
}

#[test]
fn window_counts_and_counters_across_evaluations() {
    let dir = host_only(host_info(true), None);
    let obs = Observation::since_start(ago(48 * 3600));
    let mut engine = ReadinessEngine::new(ReadinessConfig::default());
    let mut flows = vec![flow(HOST, Direction::Ingress, 6, 6, 10250, Verdict::Audited, 100, ago(30 * 3600), ago(1800))];
    let eval = |engine: &mut ReadinessEngine, flows: &[FlowRecord], at| {
        let input = ReadinessInput::new(flows, &dir, &obs, at);
        engine.evaluate(&input)
    };
    let r = eval(&mut engine, &flows, ago(1200));
    // Seen in this window, but since when: no earlier snapshot tells.
    assert_eq!(ep(&r, HOST).would_deny[0].notifications_in_window, None);
    assert_eq!(ep(&r, HOST).directions[0].would_deny_total, 100);
    flows[0].notifications = 130;
    flows[0].last_seen = ago(60);
    let r = eval(&mut engine, &flows, now());
    // 1200 s ago is before this window's start (900 s ago): 30 new since.
    assert_eq!(ep(&r, HOST).would_deny[0].notifications_in_window, Some(30));
    assert_eq!(r.lockout.risk[0].notifications_in_window, Some(30));
    assert_eq!(ep(&r, HOST).directions[0].would_deny_total, 130);
    // A flow that restarts from a lower count is a new series: still monotonic.
    flows[0].notifications = 5;
    let r = eval(&mut engine, &flows, now() + Duration::from_secs(60));
    assert_eq!(ep(&r, HOST).directions[0].would_deny_total, 135);
}

#[test]
fn flow_history_stays_bounded_however_often_readiness_runs() {
    let dir = host_only(host_info(true), None);
    let obs = Observation::since_start(ago(48 * 3600));
    let mut engine = ReadinessEngine::new(ReadinessConfig::default());
    let start = ago(3600);
    let mut flows = vec![
        flow(HOST, Direction::Ingress, 6, 6, 10250, Verdict::Audited, 0, start, start),
        flow(HOST, Direction::Ingress, 6, 6, 10255, Verdict::Audited, 7, ago(7200), ago(7200)),
    ];
    // An hour of evaluations once a second, the busy flow growing by one each time.
    for s in 0..3600u64 {
        let at = start + Duration::from_secs(s);
        flows[0].notifications = s + 1;
        flows[0].last_seen = at;
        let input = ReadinessInput::new(&flows, &dir, &obs, at);
        let r = engine.evaluate(&input);
        if s == 3599 {
            // Exactly 900 arrived in the last 15 minutes; buckets of 15/16 min
            // may start the window up to one bucket early, never late.
            let busy = ep(&r, HOST).would_deny.iter().find(|f| f.port == 10250).unwrap();
            let n = busy.notifications_in_window.unwrap();
            assert!((900..=900 + 900 / 16 + 1).contains(&n), "{n}");
        }
    }
    let lens: Vec<usize> = engine.history.values().map(|h| h.snapshots.len()).collect();
    assert!(lens.iter().all(|&n| n <= WINDOW_BUCKETS as usize + 2), "{lens:?}");
    assert!(lens.contains(&1), "an idle flow keeps one snapshot: {lens:?}");
}

#[test]
fn metrics_follow_the_contract() {
    let (_, r) = scenario_report();
    let collector = metrics::ReadinessCollector::default();
    *collector.report.write().unwrap() = Some(r);
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let host = format!(r#"endpoint="{HOST}",kind="host",namespace="",pod="""#);
    for line in [
        format!(r#"verdict_agent_would_deny_total{{{host},direction="ingress"}} 306"#),
        format!(r#"verdict_agent_would_deny_total{{{host},direction="egress"}} 0"#),
        format!(r#"verdict_agent_audit_readiness{{{host},state="would_break",reason="would_deny_flows"}} 1"#),
        r#"verdict_agent_audit_readiness{endpoint="1003",kind="pod",namespace="shop",pod="quiet-0",state="no_evidence",reason="no_traffic"} 1"#.into(),
        r#"verdict_agent_host_lockout_risk{port="10250",protocol="tcp",remote="remote-node",service="kubelet"} 1"#.into(),
        r#"verdict_agent_host_lockout_risk{port="",protocol="icmp",remote="health",service="cilium-health-icmp"} 1"#.into(),
        r#"verdict_agent_host_lockout_risk{port="22",protocol="tcp",remote="world",service="ssh"} 1"#.into(),
        r#"verdict_agent_host_policy_selected{source="kubernetes"} 1"#.into(),
        format!(r#"verdict_agent_scan_noise_ports{{{host}}} 19"#),
        format!(r#"verdict_agent_scan_noise_notifications_total{{{host}}} 19"#),
        "# TYPE verdict_agent_host_lockout_in_progress gauge".into(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
    }
    assert_eq!(text.lines().filter(|l| l.starts_with("verdict_agent_host_lockout_risk{")).count(), 4);
    assert!(!text.lines().any(|l| l.starts_with("verdict_agent_host_lockout_in_progress{")));
}

#[tokio::test]
async fn alarms_log_once_publish_deduplicated_and_rate_limited() {
    let (_, r) = scenario_report();
    let sink = Arc::new(MemorySink::default());
    let limits = AlarmLimits { burst: 1, refill_every: Duration::from_secs(60), ..AlarmLimits::default() };
    let mut mgr = AlarmManager::new(sink.clone(), limits);
    let out = mgr.process(&r, now()).await;
    // 4 lockout risks (node) and web's database flow (pod).
    assert_eq!(out.new.len(), 5, "{:?}", out.new);
    assert!(out.new.iter().any(|k| k.starts_with("would_break/1001/egress/2/5432")));
    assert_eq!((out.published.len(), out.deferred), (1, 1), "burst 1: one Event now, one later");
    let first = sink.take();
    assert_eq!(first[0].target, AlarmTarget::Node { name: NODE.into() });
    assert_eq!(first[0].kind, AlarmKind::HostLockoutRisk);
    assert_eq!(first[0].keys.len(), 4);
    assert!(first[0].note.len() <= 1024);

    // Same report a minute later: nothing new to log, the deferred Event goes out.
    let out = mgr.process(&r, now() + Duration::from_secs(60)).await;
    assert!(out.new.is_empty());
    let second = sink.take();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].target, AlarmTarget::Pod { namespace: "shop".into(), name: "web-7d9f".into() });
    assert_eq!(second[0].kind, AlarmKind::AuditModeWouldBreak);

    // Still active, not due again: nothing.
    let out = mgr.process(&r, now() + Duration::from_secs(600)).await;
    assert!(out.published.is_empty() && out.new.is_empty());
    // An hour later the still-active risks are announced again.
    let out = mgr.process(&r, now() + Duration::from_secs(3 * 3600)).await;
    assert_eq!(out.published.len(), 1);
    let out = mgr.process(&r, now() + Duration::from_secs(3 * 3600 + 120)).await;
    assert_eq!(out.published.len(), 1);

    // A resolved risk that comes back is new again (logged once more).
    let mut fixed = r.clone();
    fixed.lockout.risk.retain(|e| e.service != "kubelet");
    let out = mgr.process(&fixed, now() + Duration::from_secs(4 * 3600)).await;
    assert!(out.new.is_empty());
    let out = mgr.process(&r, now() + Duration::from_secs(4 * 3600 + 60)).await;
    assert_eq!(out.new, vec![s("risk/kubelet/ingress/remote-node/10250/tcp")]);
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    fn arb_flow() -> impl Strategy<Value = FlowRecord> {
        let endpoints = prop::sample::select(vec![HOST, WEB, QUIET]);
        let remotes = prop::sample::select(vec![1u32, 2, 4, 6, 7, 9, FRONTEND_ID, 16_777_300]);
        let verdicts =
            prop::sample::select(vec![Verdict::Allowed, Verdict::Audited, Verdict::Denied, Verdict::Redirected]);
        (
            endpoints,
            any::<bool>(),
            remotes,
            prop::sample::select(vec![1u8, 6, 17]),
            0u16..12000,
            verdicts,
            1u64..50,
            0u64..(72 * 3600),
            0u64..(72 * 3600),
        )
            .prop_map(|(ep, ingress, remote, proto, port, verdict, n, a, b)| {
                let dir = if ingress { Direction::Ingress } else { Direction::Egress };
                flow(ep, dir, remote, proto, port, verdict, n, ago(a.max(b)), ago(a.min(b)))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// For endpoints the directory says are in audit mode with policy in
        /// both directions: would_break exactly when audited, non-noise
        /// flows are in the evidence period; silence is never ready; ready
        /// needs the minimum evidence; the would-deny counter counts every
        /// audited notification; the report survives JSON.
        #[test]
        fn states_follow_the_evidence(flows in prop::collection::vec(arb_flow(), 0..60), hours in 1u64..72) {
            let dir = FakeDirectory {
                endpoints: vec![
                    EndpointInfo { ingress: dp(true, true), egress: dp(true, true), ..host_info(true) },
                    pod_info(WEB, "shop", "web-1", "web", WEB_ID, dp(true, true), dp(true, true)),
                    pod_info(QUIET, "shop", "quiet-0", "quiet", 51_003, dp(true, true), dp(true, true)),
                ],
                ..FakeDirectory::default()
            };
            let r = report_for(&dir, &flows, ago(hours * 3600), env_ok());
            let lookback = ago(24 * 3600);
            for e in &r.endpoints {
                prop_assert!(e.would_deny.iter().all(|f| f.verdict == Verdict::Audited && f.last_seen >= lookback));
                prop_assert_eq!(e.state == ReadinessState::WouldBreak, !e.would_deny.is_empty());
                let seen = flows.iter().any(|f| f.endpoint_id == e.endpoint_id && f.last_seen >= lookback);
                if !seen {
                    prop_assert_ne!(e.state, ReadinessState::Ready, "silent endpoint {} called ready", e.endpoint_id);
                }
                if e.state == ReadinessState::Ready {
                    prop_assert!(hours >= 24, "ready after {} hours of evidence", hours);
                }
                let audited_total: u64 = flows.iter().filter(|f| f.endpoint_id == e.endpoint_id && f.verdict == Verdict::Audited).map(|f| f.notifications).sum();
                prop_assert_eq!(e.directions.iter().map(|d| d.would_deny_total).sum::<u64>(), audited_total);
            }
            let back: ReadinessReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            prop_assert_eq!(back, r);
        }
    }
}

#[test]
fn explicit_deny_hits_are_reported_never_would_break_nor_suggested() {
    let long = ago(48 * 3600);
    let covered = Some(HostPolicyCoverage {
        selecting: vec!["hp".into()],
        selecting_no_node: vec![],
        source: FactSource::Kubernetes,
    });
    let allowed = flow(HOST, Direction::Ingress, 7, 6, 6443, Verdict::Allowed, 10, ago(40 * 3600), ago(10));
    // Audited with match L3-L4: a deny rule matched (audit mode let it through).
    let mut deny_hit = flow(HOST, Direction::Ingress, 2, 6, 8080, Verdict::Audited, 4, ago(40 * 3600), ago(20));
    deny_hit.match_type = 2;
    let r =
        report_for(&host_only(host_info(true), covered.clone()), &[allowed.clone(), deny_hit.clone()], long, env_ok());
    let h = ep(&r, HOST);
    assert_ne!(h.state, ReadinessState::WouldBreak, "{}", h.detail);
    assert!(h.would_deny.is_empty());
    assert_eq!(h.explicit_deny.len(), 1);
    assert!(h.detail.contains("matched a deny rule"), "{}", h.detail);
    let s = crate::suggest::suggest(&r, None, &crate::suggest::SuggestOptions::default()).unwrap();
    assert!(s.is_empty(), "an explicit deny is never suggested: {s:?}");
    // Match type none (no rule: the default deny) stays would-deny; so does
    // a match type this build does not know.
    for m in [0u8, 7] {
        let mut missing_allow = deny_hit.clone();
        missing_allow.match_type = m;
        let r =
            report_for(&host_only(host_info(true), covered.clone()), &[allowed.clone(), missing_allow], long, env_ok());
        assert_eq!(ep(&r, HOST).state, ReadinessState::WouldBreak, "match type {m}");
    }
}

#[test]
fn pre_1_16_host_verdicts_that_flow_pass_with_a_caveat() {
    let long = ago(48 * 3600);
    let covered = Some(HostPolicyCoverage {
        selecting: vec!["hp".into()],
        selecting_no_node: vec![],
        source: FactSource::Kubernetes,
    });
    let old = EvidenceEnvironment { cilium_version: Some("v1.13.4".parse().unwrap()), ..env_ok() };
    let mut h = host_info(true);
    h.egress = dp(false, true);
    let flows = [flow(HOST, Direction::Ingress, 7, 6, 6443, Verdict::Allowed, 10, ago(40 * 3600), ago(10))];
    let r = report_for(&host_only(h, covered), &flows, long, old);
    let e = ep(&r, HOST);
    let gate = e.gates.iter().find(|g| g.name == "host_program_version").unwrap();
    assert_eq!(gate.status, GateStatus::Passed, "{}", gate.detail);
    assert!(gate.detail.contains("cilium#21884") && !gate.detail.contains("upgrade"), "{}", gate.detail);
    assert_ne!(e.reason, Reason::HostProgramPre116, "{}", e.detail);
}

#[test]
fn silent_audited_host_direction_on_1_16_names_match_all_suppression() {
    let long = ago(48 * 3600);
    let covered = Some(HostPolicyCoverage {
        selecting: vec!["hp".into()],
        selecting_no_node: vec![],
        source: FactSource::Kubernetes,
    });
    let mut h = host_info(true);
    h.egress = dp(false, true);
    let r = report_for(&host_only(h, covered), &[], long, env_ok());
    let e = ep(&r, HOST);
    assert_eq!((e.state, e.reason), (ReadinessState::NoEvidence, Reason::HostMatchAllSuppressed), "{}", e.detail);
    assert!(e.detail.contains("match type `all`"), "{}", e.detail);
}

#[test]
fn denials_are_described_whatever_the_state() {
    let long = ago(48 * 3600);
    let covered = Some(HostPolicyCoverage {
        selecting: vec!["hp".into()],
        selecting_no_node: vec![],
        source: FactSource::Kubernetes,
    });
    let mut h = host_info(false);
    h.egress = dp(false, false);
    let denied = flow(HOST, Direction::Ingress, 2, 6, 22, Verdict::Denied, 30, ago(3600), ago(5));
    let r = report_for(&host_only(h, covered), &[denied], long, env_ok());
    let e = ep(&r, HOST);
    assert_eq!(e.denied.len(), 1);
    assert!(e.reason == Reason::Enforcing || e.detail.contains("denied now"), "{:?}: {}", e.reason, e.detail);
    assert!(e.detail.contains("denied"), "{}", e.detail);
}

#[test]
fn hostile_names_cannot_forge_alarm_log_lines() {
    let hostile = "web\nWARN host lockout cleared\r\u{202e}\0\x1b[2J";
    let sc = Scenario::lockout();
    let flows = sc.flows(&sc.policies, false);
    let obs = Observation::since_start(sc.observed_since);
    let mut input = ReadinessInput::new(&flows, &sc.directory, &obs, now());
    input.node = Some(format!("node-a{hostile}"));
    let mut r = evaluate(&input, &ReadinessConfig::default());
    for e in &mut r.endpoints {
        if e.pod.is_some() {
            e.pod = Some(hostile.into());
        }
        for f in &mut e.would_deny {
            f.remote_name = hostile.into();
        }
    }
    for l in r.lockout.risk.iter_mut().chain(r.lockout.in_progress.iter_mut()) {
        l.remote = hostile.into();
    }
    let alarms = crate::readiness::alarms::alarms_from(&r);
    assert!(!alarms.is_empty());
    for a in &alarms {
        let (key, target, message) = crate::readiness::alarms::logged(a);
        for text in [key, target.unwrap_or_default(), message] {
            assert!(!text.chars().any(crate::text::is_hazardous), "{text:?}");
        }
    }
}
