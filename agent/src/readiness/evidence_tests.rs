//! Lost evidence (verdicts the kernel counted that no flow read carries)
//! is never read as safe: readiness `no_evidence` (`evidence_lost`), the
//! host lockout state `unknown`.

use std::time::Duration;

use super::{testkit::*, *};
use crate::{model::Verdict, unattributed::LostEvidence};

fn env_ok() -> EvidenceEnvironment {
    EvidenceEnvironment {
        cilium_version: Some("1.16.3".parse().unwrap()),
        verdict_notifications: Some(true),
        rate_limit: Some(RateLimit { configured: false, dropped: None }),
    }
}

fn report(sc: &Scenario, flows: &[FlowRecord], lost: &[LostEvidence]) -> ReadinessReport {
    let obs = Observation::since_start(sc.observed_since);
    let mut input = ReadinessInput::new(flows, &sc.directory, &obs, now());
    input.environment = env_ok();
    input.node = Some(NODE.into());
    input.lost_evidence = lost;
    evaluate(&input, &ReadinessConfig::default())
}

fn lost(endpoint_id: u16, verdict: Verdict, ago: Duration) -> LostEvidence {
    LostEvidence { endpoint_id, direction: Direction::Ingress, verdict, verdicts: 3, last_grew: now() - ago }
}

fn endpoint(r: &ReadinessReport, id: u16) -> &EndpointReadiness {
    r.endpoints.iter().find(|e| e.endpoint_id == id).unwrap_or_else(|| panic!("endpoint {id} in report"))
}

/// The lockout scenario without its audited flows: endpoints in audit
/// mode that saw traffic are ready to leave it.
fn nothing_audited(sc: &Scenario) -> Vec<FlowRecord> {
    sc.flows(&sc.policies, false).into_iter().filter(|f| f.verdict != Verdict::Audited).collect()
}

#[test]
fn a_ready_endpoint_with_lost_audited_verdicts_is_no_evidence() {
    let sc = Scenario::lockout();
    let flows = nothing_audited(&sc);
    let base = report(&sc, &flows, &[]);
    let ready: Vec<u16> =
        base.endpoints.iter().filter(|e| e.reason == Reason::NoWouldDeny).map(|e| e.endpoint_id).collect();
    assert!(!ready.is_empty(), "the scenario has an endpoint ready to leave audit mode");
    for id in ready {
        let r = report(&sc, &flows, &[lost(id, Verdict::Audited, Duration::from_secs(60))]);
        let e = endpoint(&r, id);
        assert_eq!((e.state, e.reason), (ReadinessState::NoEvidence, Reason::EvidenceLost), "endpoint {id}");
        let gate = e.gates.iter().find(|g| g.name == "evidence_complete" && g.direction == Some(Direction::Ingress));
        assert_eq!(gate.map(|g| g.status), Some(GateStatus::Failed), "endpoint {id}: {:?}", e.gates);
        assert!(e.detail.contains("3 audited verdicts"), "{}", e.detail);
    }
}

#[test]
fn losses_outside_the_window_or_of_other_classes_do_not_hold_back() {
    let sc = Scenario::lockout();
    let flows = nothing_audited(&sc);
    let base = report(&sc, &flows, &[]);
    let window = ReadinessConfig::default().window;
    let ready: Vec<&EndpointReadiness> = base.endpoints.iter().filter(|e| e.reason == Reason::NoWouldDeny).collect();
    assert!(!ready.is_empty());
    for e in ready {
        let old = lost(e.endpoint_id, Verdict::Audited, window + Duration::from_secs(60));
        let allowed = lost(e.endpoint_id, Verdict::Allowed, Duration::from_secs(60));
        let r = report(&sc, &flows, &[old, allowed]);
        assert_eq!(endpoint(&r, e.endpoint_id).reason, Reason::NoWouldDeny);
    }
}

#[test]
fn host_lockout_is_unknown_never_clear_while_host_evidence_is_lost() {
    let sc = Scenario::lockout();
    // The host's allowed flows only: no risk, nothing in progress.
    let flows: Vec<FlowRecord> = sc
        .flows(&sc.policies, false)
        .into_iter()
        .filter(|f| f.endpoint_id != HOST || f.verdict == Verdict::Allowed)
        .collect();
    let clear = report(&sc, &flows, &[]);
    assert_eq!(clear.lockout.state, LockoutState::Clear);
    for verdict in [Verdict::Audited, Verdict::Denied] {
        let r = report(&sc, &flows, &[lost(HOST, verdict, Duration::from_secs(30))]);
        assert_eq!(r.lockout.state, LockoutState::Unknown, "{verdict:?}");
        assert_eq!(r.lockout.evidence_lost.len(), 1);
        assert!(r.lockout.notes[0].contains("unknown, not clear"), "{:?}", r.lockout.notes);
    }
    // Another endpoint's loss says nothing about the host.
    let r = report(&sc, &flows, &[lost(WEB, Verdict::Audited, Duration::from_secs(30))]);
    assert_eq!(r.lockout.state, LockoutState::Clear);
}

/// A scanner sweeping 40 high ports from world once an hour for a day
/// stays noise at every evaluation, however often it returns; a real
/// service on a high port (world, 30 connections an hour) is never noise.
#[test]
fn a_scanner_repeated_every_hour_for_a_day_stays_noise() {
    let sc = Scenario::lockout();
    let hour = Duration::from_secs(3600);
    let start = now() - 25 * hour;
    let mut engine = ReadinessEngine::new(ReadinessConfig::default());
    let scanned = 20_000u16..20_040;
    let service = 30_000u16;
    for h in 0..24u32 {
        let at = start + h * hour + Duration::from_secs(60);
        let mut flows: Vec<FlowRecord> = scanned
            .clone()
            .map(|port| {
                let last = at - Duration::from_secs(30);
                flow(WEB, Direction::Ingress, 2, 6, port, Verdict::Audited, u64::from(h) + 1, start, last)
            })
            .collect();
        flows.push(flow(WEB, Direction::Ingress, 2, 6, service, Verdict::Audited, 30 * (u64::from(h) + 1), start, at));
        let obs = Observation::since_start(start - hour);
        let mut input = ReadinessInput::new(&flows, &sc.directory, &obs, at);
        input.environment = env_ok();
        let r = engine.evaluate(&input);
        let web = endpoint(&r, WEB);
        let would_deny: Vec<u16> = web.would_deny.iter().map(|f| f.port).collect();
        assert!(
            !would_deny.iter().any(|p| scanned.contains(p)),
            "hour {h}: scanned ports became would-deny flows: {would_deny:?}"
        );
        assert!(would_deny.contains(&service), "hour {h}: the real service on {service} is not noise: {would_deny:?}");
        let noise: usize = r.noise.iter().filter(|n| n.endpoint_id == WEB).map(|n| n.ports).sum();
        assert_eq!(noise, scanned.len(), "hour {h}: every scanned port is summarised as noise");
    }
}
