//! Trials against the fake Cilium endpoint-config API on a unix socket, with
//! the counters a real switch would produce fed to the watch.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde_json::Value;

use super::{
    FlowSource,
    api::{self, ApiState},
    cilium_config::{
        EndpointConfigClient, EndpointConfigError, EndpointConfigurationSpec, EndpointConfigurationStatus, OptionValue,
    },
    cli::{self, EnforceArgs},
    fake::{Datapath, FakeCiliumConfig, PatchMode, Traffic},
    metrics::{EnforcementCollector, EnforcementMetrics},
    record::{PreflightVerdict, Requester, TrialPhase},
    store::TrialStore,
    trial::{TrialError, TrialManager, TrialRequest, TrialSettings},
    watch::{ReadCadence, TrialWatch},
};
use crate::{
    model::{Direction, EndpointKind, FlowRecord, NoDirectory},
    readiness::ReadinessConfig,
};

const HOST: u16 = 2801;
const POD: u16 = 1017;
/// Reserved identity kube-apiserver.
const KUBE_APISERVER: u32 = 7;
const DEFINITIONS: &str = include_str!("testdata/cilium-endpoint-config-definitions.json");

struct Rig {
    dir: tempfile::TempDir,
    fake: FakeCiliumConfig,
    metrics: Arc<EnforcementMetrics>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeCiliumConfig::new(&dir.path().join("cilium.sock"), &[HOST, POD]);
        fake.start();
        Rig { dir, fake, metrics: Arc::new(EnforcementMetrics::default()) }
    }

    fn client(&self) -> EndpointConfigClient {
        EndpointConfigClient::new(self.dir.path().join("cilium.sock"), Duration::from_millis(500))
    }

    fn store(&self) -> TrialStore {
        TrialStore::new(self.dir.path().join("state"))
    }

    fn manager(&self, settings: TrialSettings) -> TrialManager {
        TrialManager::open(
            self.client(),
            self.store(),
            settings,
            TrialWatch::new(ReadinessConfig::default()),
            self.metrics.clone(),
        )
        .unwrap()
    }
}

fn enabled() -> TrialSettings {
    TrialSettings { enabled: true, ..TrialSettings::default() }
}

fn safe(endpoint_id: u16, try_seconds: u64) -> TrialRequest {
    let (name, kind) =
        if endpoint_id == HOST { ("host", EndpointKind::Host) } else { ("shop/web-0", EndpointKind::Pod) };
    TrialRequest {
        endpoint_id,
        endpoint_name: name.into(),
        endpoint_kind: kind,
        try_seconds,
        strict: false,
        requested_by: Requester { who: "alice@node-1".into(), reason: Some("leave audit mode".into()) },
        preflight: PreflightVerdict { state: "ready".into(), exit_code: 0, forced: false },
    }
}

fn by(who: &str) -> Requester {
    Requester { who: who.into(), reason: None }
}

/// The host talks to the API server (would be denied: the forgotten flow)
/// and answers SSH (allowed).
fn host_traffic() -> Vec<Traffic> {
    vec![
        Traffic {
            endpoint_id: HOST,
            direction: Direction::Egress,
            remote_identity: KUBE_APISERVER,
            proto: 6,
            dst_port: 6443,
            policy_denies: true,
        },
        Traffic {
            endpoint_id: HOST,
            direction: Direction::Ingress,
            remote_identity: 2,
            proto: 6,
            dst_port: 22,
            policy_denies: false,
        },
    ]
}

fn pod_traffic_allowed() -> Vec<Traffic> {
    vec![Traffic {
        endpoint_id: POD,
        direction: Direction::Ingress,
        remote_identity: 51234,
        proto: 6,
        dst_port: 8080,
        policy_denies: false,
    }]
}

#[test]
fn request_and_status_match_ciliums_models() {
    let defs: Value = serde_json::from_str(DEFINITIONS).unwrap();
    let d = &defs["definitions"];
    // The PATCH body: only `options`, a map of strings.
    let body = serde_json::to_value(EndpointConfigurationSpec::audit_mode(OptionValue::Disabled)).unwrap();
    assert_eq!(body, serde_json::json!({"options": {"PolicyAuditMode": "Disabled"}}));
    let spec_props = d["EndpointConfigurationSpec"]["properties"].as_object().unwrap();
    for (k, _) in body.as_object().unwrap() {
        assert!(spec_props.contains_key(k), "{k} is not an EndpointConfigurationSpec property");
    }
    assert_eq!(spec_props["options"]["$ref"], "#/definitions/ConfigurationMap");
    assert_eq!(d["ConfigurationMap"]["additionalProperties"]["type"], "string");
    // The status: realized (a spec), immutable (a map), error (a string).
    let status_props = d["EndpointConfigurationStatus"]["properties"].as_object().unwrap();
    let mut ours: Vec<&str> = vec!["realized", "immutable", "error"];
    let mut theirs: Vec<&str> = status_props.keys().map(String::as_str).collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    assert_eq!(d["Error"]["type"], "string");
    // The path and the answers a refusal is built from.
    let patch = &defs["paths"]["/endpoint/{id}/config"]["patch"]["responses"];
    for code in ["200", "400", "403", "404", "429", "500", "503"] {
        assert!(patch.get(code).is_some(), "PATCH answer {code} missing from the copied definitions");
    }
    let status: EndpointConfigurationStatus = serde_json::from_str(
        r#"{"realized": {"options": {"PolicyAuditMode": "Enabled", "Debug": "Disabled"}}, "immutable": {}}"#,
    )
    .unwrap();
    assert_eq!(status.audit_mode(), Some(OptionValue::Enabled));
    let missing: EndpointConfigurationStatus =
        serde_json::from_str(r#"{"error": "endpoint is disconnecting"}"#).unwrap();
    assert_eq!(missing.audit_mode(), None);
}

#[tokio::test]
async fn expiry_without_confirm_reverts() {
    let rig = Rig::new();
    let mut m = rig.manager(enabled());
    let t = m.start(safe(POD, 1), SystemTime::now()).await.unwrap();
    assert_eq!(t.phase, TrialPhase::Switched);
    assert_eq!(rig.fake.audit(POD), Some(OptionValue::Disabled));
    assert_eq!(t.audit_mode_before, OptionValue::Enabled);

    // Before the deadline nothing happens.
    let dp = Datapath::new(rig.fake.clone(), pod_traffic_allowed());
    m.tick(&dp.flows(), &NoDirectory, SystemTime::now()).await;
    assert_eq!(m.get(&t.id).unwrap().phase, TrialPhase::Switched);

    m.tick(&dp.flows(), &NoDirectory, t.deadline.unwrap() + Duration::from_millis(1)).await;
    let after = m.get(&t.id).unwrap();
    assert_eq!(after.phase, TrialPhase::Expired, "{after:?}");
    assert!(!after.is_active());
    assert_eq!(rig.fake.audit(POD), Some(OptionValue::Enabled));
    let asked: Vec<String> = rig.fake.patches().into_iter().map(|p| p.2).collect();
    assert_eq!(asked, ["Disabled", "Enabled"]);
    assert_eq!(rig.metrics.outcome_total("expired"), 1);
    assert_eq!(rig.metrics.outcome_total("switched"), 1);
    // And it is on disk that way.
    let recorded = rig.store().load().unwrap();
    assert_eq!(recorded[0].phase, TrialPhase::Expired);
}

/// Every step goes to the Event sink too, with who asked and why.
#[derive(Default)]
struct Events(std::sync::Mutex<Vec<(String, String, String)>>);

impl super::trial::TrialEvents for Events {
    fn publish(&self, record: &super::record::TrialRecord, outcome: &'static str) {
        let reason = super::events::reason(outcome).to_owned();
        self.0.lock().unwrap().push((outcome.to_owned(), reason, super::events::note(record)));
    }
}

#[tokio::test]
async fn switches_and_reverts_are_published_as_events() {
    let rig = Rig::new();
    let events = Arc::new(Events::default());
    let mut m = rig.manager(enabled()).with_events(events.clone());
    let t = m.start(safe(POD, 1), SystemTime::now()).await.unwrap();
    m.tick(&[], &NoDirectory, t.deadline.unwrap()).await;
    let got = events.0.lock().unwrap().clone();
    let reasons: Vec<&str> = got.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(reasons, ["EnforcementTrialStarted", "EnforcementTrialExpired"]);
    assert!(got[0].2.contains("requested by alice@node-1 (leave audit mode)"), "{}", got[0].2);
    assert!(got[1].2.contains("ended without confirmation"), "{}", got[1].2);
}

#[tokio::test]
async fn confirm_keeps_enforcement_and_watch_only_alarms() {
    let rig = Rig::new();
    let mut m = rig.manager(TrialSettings { watch_after_confirm: Duration::from_secs(600), ..enabled() });
    let t = m.start(safe(HOST, 60), SystemTime::now()).await.unwrap();
    let c = m.confirm(&t.id, by("bob@laptop"), SystemTime::now()).await.unwrap();
    assert_eq!(c.phase, TrialPhase::Confirmed);
    assert_eq!(c.confirmed_by.as_ref().unwrap().who, "bob@laptop");

    // Past the trial's deadline: a confirmed trial does not expire.
    let dp = Datapath::new(rig.fake.clone(), vec![host_traffic()[1]]);
    m.tick(&dp.flows(), &NoDirectory, t.deadline.unwrap() + Duration::from_secs(1)).await;
    assert_eq!(rig.fake.audit(HOST), Some(OptionValue::Disabled));
    assert_eq!(m.get(&t.id).unwrap().phase, TrialPhase::Confirmed);

    // A critical flow dropped after confirmation: an alarm, not a revert
    // (revert_after_confirm is off), once per flow.
    let dp = Datapath::new(rig.fake.clone(), host_traffic());
    for _ in 0..3 {
        m.tick(&dp.flows(), &NoDirectory, SystemTime::now()).await;
    }
    assert_eq!(rig.fake.audit(HOST), Some(OptionValue::Disabled));
    assert_eq!(rig.metrics.outcome_total("alarm"), 1);
    assert!(m.get(&t.id).unwrap().history.iter().any(|h| h.message.starts_with("alarm: kube-apiserver")));

    // The watch ends; enforcement stays, the trial is no longer active.
    m.tick(&dp.flows(), &NoDirectory, c.watch_until().unwrap()).await;
    let done = m.get(&t.id).unwrap();
    assert_eq!(done.phase, TrialPhase::Confirmed);
    assert!(!done.is_active());
    assert_eq!(rig.fake.audit(HOST), Some(OptionValue::Disabled));
    assert_eq!(rig.fake.patches().len(), 1, "only the switch was sent");
    assert!(!m.any_active());
}

#[tokio::test]
async fn refused_when_preflight_is_not_safe_or_enforcement_is_off() {
    let rig = Rig::new();
    let mut m = rig.manager(enabled());
    for (state, code) in [("would_break", 1), ("no_evidence", 3)] {
        let mut req = safe(POD, 60);
        req.preflight = PreflightVerdict { state: state.into(), exit_code: code, forced: false };
        let e = m.start(req, SystemTime::now()).await.unwrap_err();
        assert!(matches!(e, TrialError::NotSafe { .. }), "{e}");
        assert_eq!(e.http_status(), 412);
        assert!(e.to_string().contains("--force --reason"), "{e}");
    }
    // --force without a reason is refused too.
    let mut req = safe(POD, 60);
    req.preflight = PreflightVerdict { state: "no_evidence".into(), exit_code: 3, forced: true };
    req.requested_by.reason = None;
    assert!(matches!(m.start(req.clone(), SystemTime::now()).await, Err(TrialError::BadRequest(_))));
    // Names from the client are hostile: no forged log lines.
    let mut forged = safe(POD, 60);
    forged.requested_by.reason = Some("ok\n2026-12-04T22:00:00Z INFO trial confirmed by admin".into());
    assert!(matches!(m.start(forged, SystemTime::now()).await, Err(TrialError::BadRequest(_))));
    assert!(rig.fake.patches().is_empty(), "nothing was sent to Cilium");
    assert_eq!(rig.metrics.outcome_total("refused"), 4);

    // Forced with a reason: recorded.
    req.requested_by.reason = Some("maintenance window, console open".into());
    let t = m.start(req, SystemTime::now()).await.unwrap();
    assert!(t.preflight.forced);
    assert_eq!(t.requested_by.reason.as_deref(), Some("maintenance window, console open"));

    // An agent without --enable-enforcement never writes.
    let rig = Rig::new();
    let mut off = rig.manager(TrialSettings::default());
    let e = off.start(safe(POD, 60), SystemTime::now()).await.unwrap_err();
    assert!(matches!(e, TrialError::Disabled));
    assert!(e.to_string().contains("--enable-enforcement"));
    assert!(rig.fake.patches().is_empty());
}

#[tokio::test]
async fn the_daemon_checks_its_own_readiness_not_the_clients_word() {
    use crate::readiness::ReadinessState;
    let rig = Rig::new();
    let lookup = |state: Option<ReadinessState>| -> super::trial::ReadinessLookup { Arc::new(move |_| state) };
    for (state, code) in [(Some(ReadinessState::WouldBreak), 1), (Some(ReadinessState::NoEvidence), 3), (None, 3)] {
        let mut m = rig.manager(enabled()).with_readiness(lookup(state));
        // The client claims preflight said ready.
        let e = m.start(safe(POD, 60), SystemTime::now()).await.unwrap_err();
        assert!(matches!(e, TrialError::NotSafe { exit_code, .. } if exit_code == code), "{state:?}: {e}");
    }
    assert!(rig.fake.patches().is_empty());
    let mut m = rig.manager(enabled()).with_readiness(lookup(Some(ReadinessState::Ready)));
    m.start(safe(POD, 60), SystemTime::now()).await.unwrap();
}

#[tokio::test]
async fn second_trial_on_the_same_endpoint_is_refused() {
    let rig = Rig::new();
    let mut m = rig.manager(enabled());
    let t = m.start(safe(POD, 60), SystemTime::now()).await.unwrap();
    let e = m.start(safe(POD, 60), SystemTime::now()).await.unwrap_err();
    assert!(matches!(e, TrialError::AlreadyRunning { ref id, .. } if *id == t.id), "{e}");
    assert_eq!(e.http_status(), 409);
    assert_eq!(rig.fake.patches().len(), 1);
    // Another endpoint is fine.
    m.start(safe(HOST, 60), SystemTime::now()).await.unwrap();
    // After the first one ends, a new one may start.
    m.abort(&t.id, by("alice"), SystemTime::now()).await.unwrap();
    m.start(safe(POD, 60), SystemTime::now()).await.unwrap();
}

#[tokio::test]
async fn an_endpoint_already_enforcing_is_not_touched() {
    let rig = Rig::new();
    rig.fake.lock().audit.insert(POD, OptionValue::Disabled);
    let mut m = rig.manager(enabled());
    let e = m.start(safe(POD, 60), SystemTime::now()).await.unwrap_err();
    assert!(matches!(e, TrialError::NotInAuditMode { .. }), "{e}");
    assert!(rig.fake.patches().is_empty());
}

#[tokio::test]
async fn cilium_refusals_are_clear_and_leave_the_endpoint_as_it_was() {
    for (mode, kind, hint) in [
        (PatchMode::Forbidden, "forbidden", "--enable-cilium-api-server-access"),
        (PatchMode::NotFound, "not_found", "cilium-dbg endpoint list"),
        (PatchMode::RateLimited, "rate_limited", "retry"),
        (PatchMode::Ignores, "", "nothing was switched"),
    ] {
        let rig = Rig::new();
        rig.fake.set_patch_mode(mode);
        let mut m = rig.manager(enabled());
        let e = m.start(safe(POD, 60), SystemTime::now()).await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("shop/web-0"), "{mode:?}: the refusal names the endpoint: {text}");
        assert!(text.contains(hint), "{mode:?}: {text}");
        if let TrialError::Cilium { source, .. } = &e {
            assert_eq!(source.kind(), kind);
            assert!(source.refused_before_applying());
        }
        assert_eq!(rig.fake.audit(POD), Some(OptionValue::Enabled), "{mode:?}");
        assert_eq!(rig.fake.patches().len(), 1, "{mode:?}: no second write");
        let rec = rig.store().load().unwrap();
        assert_eq!(rec[0].phase, TrialPhase::Refused, "{mode:?}");
        assert!(!m.any_active());
        assert_eq!(rig.metrics.outcome_total("refused"), 1);
    }

    // GET refused: nothing is written at all.
    let rig = Rig::new();
    let mut m = rig.manager(enabled());
    let mut req = safe(POD, 60);
    req.endpoint_id = 999;
    let e = m.start(req, SystemTime::now()).await.unwrap_err();
    assert!(matches!(&e, TrialError::Cilium { source: EndpointConfigError::NotFound { endpoint: 999 }, .. }), "{e}");
    assert!(rig.fake.patches().is_empty());
    assert!(rig.store().load().unwrap().is_empty());
}

#[tokio::test]
async fn a_timed_out_switch_is_undone_not_left_half_done() {
    let rig = Rig::new();
    // Cilium applies the option but answers after the client's 500 ms.
    rig.fake.set_patch_mode(PatchMode::AppliesThenSlow(Duration::from_secs(2)));
    let mut m = rig.manager(enabled());
    let started = m.start(safe(POD, 60), SystemTime::now());
    // The restore PATCH must answer: switch the fake back to normal once
    // the first PATCH arrived.
    let fake = rig.fake.clone();
    let unblock = tokio::spawn(async move {
        while fake.patches().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fake.set_patch_mode(PatchMode::Normal);
    });
    let e = started.await.unwrap_err();
    unblock.await.unwrap();
    assert!(matches!(e, TrialError::SwitchUndone { .. }), "{e}");
    assert!(e.to_string().contains("did not answer within"), "{e}");
    assert_eq!(rig.fake.audit(POD), Some(OptionValue::Enabled));
    let asked: Vec<String> = rig.fake.patches().into_iter().map(|p| p.2).collect();
    assert_eq!(asked, ["Disabled", "Enabled"]);
    assert_eq!(rig.store().load().unwrap()[0].phase, TrialPhase::Refused);

    // When the restore fails too, the trial stays owed a revert and the
    // next round retries it.
    let rig = Rig::new();
    rig.fake.set_patch_mode(PatchMode::AppliesThenSlow(Duration::from_secs(2)));
    let mut m = rig.manager(enabled());
    let e = m.start(safe(POD, 60), SystemTime::now()).await.unwrap_err();
    assert!(matches!(e, TrialError::HalfSwitched { .. }), "{e}");
    assert!(e.to_string().contains("cilium-dbg endpoint config 1017 PolicyAuditMode=Enabled"), "{e}");
    assert!(m.any_active());
    rig.fake.set_patch_mode(PatchMode::Normal);
    rig.fake.lock().audit.insert(POD, OptionValue::Disabled);
    m.tick(&[], &NoDirectory, SystemTime::now()).await;
    assert_eq!(rig.fake.audit(POD), Some(OptionValue::Enabled));
    assert!(!m.any_active());
    assert_eq!(rig.store().load().unwrap()[0].phase, TrialPhase::Refused);

    // A 500 does not say whether anything was applied: the same path.
    let rig = Rig::new();
    rig.fake.set_patch_mode(PatchMode::Failed);
    let mut m = rig.manager(enabled());
    let e = m.start(safe(POD, 60), SystemTime::now()).await.unwrap_err();
    assert!(matches!(e, TrialError::HalfSwitched { .. }), "{e}");
    assert!(e.to_string().contains("endpoint regeneration failed"), "{e}");
    rig.fake.set_patch_mode(PatchMode::Normal);
    m.tick(&[], &NoDirectory, SystemTime::now()).await;
    assert!(!m.any_active());
    assert_eq!(rig.fake.audit(POD), Some(OptionValue::Enabled));
}

#[tokio::test]
async fn a_restarted_agent_continues_or_reverts_as_recorded() {
    let rig = Rig::new();
    let (continuing, expiring) = {
        let mut m = rig.manager(enabled());
        let a = m.start(safe(HOST, 600), SystemTime::now()).await.unwrap();
        let b = m.start(safe(POD, 1), SystemTime::now()).await.unwrap();
        (a, b)
        // The agent dies here: the manager is dropped without a word.
    };
    let mut m = rig.manager(enabled());
    assert_eq!(m.trials().len(), 2);
    m.resume(expiring.deadline.unwrap() + Duration::from_secs(1)).await;
    assert_eq!(m.get(&continuing.id).unwrap().phase, TrialPhase::Switched);
    assert_eq!(rig.fake.audit(HOST), Some(OptionValue::Disabled), "the host trial continues");
    assert_eq!(m.get(&expiring.id).unwrap().phase, TrialPhase::Expired);
    assert_eq!(rig.fake.audit(POD), Some(OptionValue::Enabled), "the pod trial's deadline had passed");
    // The continued trial still refuses a second one and still reverts.
    assert!(matches!(m.start(safe(HOST, 60), SystemTime::now()).await, Err(TrialError::AlreadyRunning { .. })));
    m.tick(&[], &NoDirectory, continuing.deadline.unwrap()).await;
    assert_eq!(rig.fake.audit(HOST), Some(OptionValue::Enabled));

    // Killed mid-switch (record says requested) while Cilium had applied it:
    // the restart puts the recorded value back.
    let rig = Rig::new();
    {
        let mut m = rig.manager(enabled());
        m.start(safe(POD, 600), SystemTime::now()).await.unwrap();
    }
    let mut recorded = rig.store().load().unwrap();
    recorded[0].phase = TrialPhase::Requested;
    recorded[0].switched_at = None;
    recorded[0].deadline = None;
    rig.store().save(&recorded).unwrap();
    let mut m = rig.manager(enabled());
    m.resume(SystemTime::now()).await;
    assert_eq!(rig.fake.audit(POD), Some(OptionValue::Enabled));
    assert_eq!(m.trials()[0].phase, TrialPhase::Reverted);

    // Someone else put audit mode back while the agent was down: nothing of
    // ours to write.
    let rig = Rig::new();
    {
        let mut m = rig.manager(enabled());
        m.start(safe(POD, 600), SystemTime::now()).await.unwrap();
    }
    rig.fake.lock().audit.insert(POD, OptionValue::Enabled);
    let mut m = rig.manager(enabled());
    m.resume(SystemTime::now()).await;
    assert_eq!(m.trials()[0].phase, TrialPhase::Reverted);
    assert_eq!(rig.fake.patches().len(), 1, "only the original switch");
}

#[tokio::test]
async fn strict_reverts_on_any_new_denial_of_a_pod() {
    let rig = Rig::new();
    let mut m = rig.manager(enabled());
    let mut req = safe(POD, 600);
    req.strict = true;
    let t = m.start(req, SystemTime::now()).await.unwrap();
    let dp = Datapath::new(
        rig.fake.clone(),
        vec![Traffic {
            endpoint_id: POD,
            direction: Direction::Egress,
            remote_identity: 61000,
            proto: 17,
            dst_port: 5353,
            policy_denies: true,
        }],
    );
    m.tick(&dp.flows(), &NoDirectory, SystemTime::now()).await;
    let r = m.get(&t.id).unwrap();
    assert_eq!(r.phase, TrialPhase::Reverted);
    assert!(r.outcome.as_deref().unwrap().contains("new_denied"), "{:?}", r.outcome);
    assert_eq!(rig.fake.audit(POD), Some(OptionValue::Enabled));
}

#[tokio::test]
async fn a_port_scan_on_the_host_does_not_revert_but_a_lost_pod_flow_does() {
    let rig = Rig::new();
    let mut m = rig.manager(enabled());
    // Before the switch: a world scanner probed 8080 (audited), and the pod
    // served its frontend on 8080 (audited: readiness was wrong).
    let scan = Traffic {
        endpoint_id: HOST,
        direction: Direction::Ingress,
        remote_identity: 2,
        proto: 6,
        dst_port: 8080,
        policy_denies: true,
    };
    let frontend = Traffic { endpoint_id: POD, remote_identity: 51234, ..scan };
    let dp = Datapath::new(rig.fake.clone(), vec![scan, frontend]);
    dp.flows();
    let host = m.start(safe(HOST, 600), SystemTime::now()).await.unwrap();
    let pod = m.start(safe(POD, 600), SystemTime::now()).await.unwrap();
    m.tick(&dp.flows(), &NoDirectory, SystemTime::now()).await;
    assert_eq!(m.get(&host.id).unwrap().phase, TrialPhase::Switched, "a scan is not a lockout");
    let r = m.get(&pod.id).unwrap();
    assert_eq!(r.phase, TrialPhase::Reverted);
    assert!(r.outcome.as_deref().unwrap().contains("accepted_now_denied"), "{:?}", r.outcome);
}

/// The whole loop: watch every 100 ms over the datapath's counters; the
/// forgotten API-server flow turns denied at the switch; the revert PATCH
/// reaches Cilium within a second of the first denied verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_from_first_denied_critical_verdict_to_revert_is_under_a_second() {
    let rig = Rig::new();
    let manager = Arc::new(tokio::sync::Mutex::new(rig.manager(enabled())));
    let dp = Datapath::new(rig.fake.clone(), host_traffic());
    let dp2 = dp.clone();
    let flows: FlowSource = Arc::new(move || dp2.flows());
    let cadence = ReadCadence::default();
    let watch = tokio::spawn(super::watch_loop(manager.clone(), flows, Arc::new(NoDirectory), cadence.clone()));

    // Audit mode: the flow is audited, nothing happens.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = manager.lock().await.start(safe(HOST, 300), SystemTime::now()).await.unwrap();
    cadence.set_fast(true);
    assert!(cadence.is_fast());
    assert_eq!(cadence.interval(Duration::from_secs(5)), Duration::from_millis(100));

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if manager.lock().await.get(&t.id).unwrap().phase != TrialPhase::Switched {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no revert within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watch.abort();
    let r = manager.lock().await.get(&t.id).unwrap().clone();
    assert_eq!(r.phase, TrialPhase::Reverted, "{r:?}");
    assert!(r.outcome.as_deref().unwrap().contains("lockout_in_progress"), "{:?}", r.outcome);
    assert_eq!(rig.fake.audit(HOST), Some(OptionValue::Enabled));

    // First denied verdict: the datapath's denied record; the revert: the
    // fake's second PATCH.
    let first_denied = dp
        .flows()
        .iter()
        .filter(|f: &&FlowRecord| f.verdict == crate::model::Verdict::Denied)
        .map(|f| f.first_seen)
        .min()
        .unwrap();
    let patches = rig.fake.patches();
    assert_eq!(patches.len(), 2);
    assert_eq!(patches[1].2, "Enabled");
    let latency = patches[1].0.duration_since(first_denied).unwrap();
    assert!(latency < Duration::from_secs(1), "revert took {latency:?} after the first denied verdict");
    let recorded = r.time_to_revert_seconds.unwrap();
    assert!(recorded < 1.0, "{recorded}");
    assert!(!cadence.is_fast() || manager.lock().await.any_active());

    // The histogram and the counter are on /metrics.
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(EnforcementCollector(rig.metrics.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("verdict_agent_enforcement_trials_total{outcome=\"reverted\"} 1"), "{text}");
    assert!(text.contains("verdict_agent_enforcement_time_to_revert_seconds_count 1"), "{text}");
    assert!(text.contains("verdict_agent_enforcement_time_to_revert_seconds_bucket{le=\"1.6\"} 1"), "{text}");
}

/// The CLI and the daemon's routes together: --status, refusal without a
/// running trial, --abort of a running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_status_and_abort_through_the_daemon_api() {
    let rig = Rig::new();
    let manager = Arc::new(tokio::sync::Mutex::new(rig.manager(enabled())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:19811").await.unwrap();
    let router = api::router(ApiState { trials: manager.clone(), cadence: ReadCadence::default() });
    let server = tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>()).await
    });
    let t = manager.lock().await.start(safe(POD, 600), SystemTime::now()).await.unwrap();

    let args = |extra: &[&str]| {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            a: EnforceArgs,
        }
        let mut argv = vec!["enforce", "--agent", "http://127.0.0.1:19811"];
        argv.extend_from_slice(extra);
        Wrap::parse_from(argv).a
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(cli::run_with(args(&["--status"]), &mut out, &mut err).await, 0);
    let shown = String::from_utf8_lossy(&out);
    assert!(shown.contains(&t.id) && shown.contains("switched") && shown.contains("alice@node-1"), "{shown}");

    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(cli::run_with(args(&["--endpoint", "host", "--confirm"]), &mut out, &mut err).await, 2);
    assert!(String::from_utf8_lossy(&err).contains("no running trial on endpoint \"host\""));

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code =
        cli::run_with(args(&["--endpoint", "shop/web-0", "--abort", "--reason", "done"]), &mut out, &mut err).await;
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(String::from_utf8_lossy(&out).contains("aborted by"), "{}", String::from_utf8_lossy(&out));
    assert_eq!(rig.fake.audit(POD), Some(OptionValue::Enabled));
    assert_eq!(rig.metrics.outcome_total("aborted"), 1);

    // A second abort is refused with the API's message.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(cli::run_with(args(&["--endpoint", "1017", "--abort"]), &mut out, &mut err).await, 2);
    server.abort();
}

#[test]
fn the_record_is_replaced_atomically_and_refuses_unknown_formats() {
    let dir = tempfile::tempdir().unwrap();
    let store = TrialStore::new(dir.path().join("nested/state"));
    assert!(store.load().unwrap().is_empty());
    store.save(&[]).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path().join("nested/state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [super::store::FILE_NAME], "no temp file left behind");
    std::fs::write(store.path(), r#"{"format": 2, "trials": []}"#).unwrap();
    let e = store.load().unwrap_err();
    assert!(e.to_string().contains("cilium-dbg endpoint config"), "{e}");
}

/// `enforce` asks for readiness as `preflight` does and refuses with its
/// exit codes; `--force --reason` goes through and is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refuses_unless_preflight_says_safe() {
    use crate::readiness::{self, Observation, ReadinessInput, testkit};
    let sc = testkit::Scenario::lockout();
    let flows = sc.flows(&sc.policies, false);
    let obs = Observation::since_start(sc.observed_since);
    let mut input = ReadinessInput::new(&flows, &sc.directory, &obs, testkit::now());
    input.node = Some(testkit::NODE.into());
    let report = serde_json::to_value(readiness::evaluate(&input, &ReadinessConfig::default())).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let fake = FakeCiliumConfig::new(&dir.path().join("cilium.sock"), &[testkit::HOST, testkit::QUIET]);
    fake.start();
    let metrics = Arc::new(EnforcementMetrics::default());
    let manager = TrialManager::open(
        EndpointConfigClient::new(dir.path().join("cilium.sock"), Duration::from_millis(500)),
        TrialStore::new(dir.path().join("state")),
        enabled(),
        TrialWatch::new(ReadinessConfig::default()),
        metrics.clone(),
    )
    .unwrap();
    let manager = Arc::new(tokio::sync::Mutex::new(manager));
    let readiness_route = axum::Router::new()
        .route("/api/v1/readiness", axum::routing::get(move || async move { axum::Json(report.clone()) }));
    let router =
        readiness_route.merge(api::router(ApiState { trials: manager.clone(), cadence: ReadCadence::default() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:19812").await.unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>()).await
    });

    let args = |extra: &[&str]| {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            a: EnforceArgs,
        }
        let mut argv = vec!["enforce", "--agent", "http://127.0.0.1:19812"];
        argv.extend_from_slice(extra);
        Wrap::parse_from(argv).a
    };
    let run = |extra: &'static [&'static str]| async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = cli::run_with(args(extra), &mut out, &mut err).await;
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    };

    // The host would break (kubelet audited): preflight's exit 1, nothing sent.
    let (code, out, err) = run(&["--endpoint", "host", "--try", "5m"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("NOT SAFE"), "preflight's own output: {out}");
    assert!(err.contains("refusing to leave audit mode on host"), "{err}");
    // Not enough evidence: exit 3.
    let (code, out, err) = run(&["--endpoint", "shop/quiet-0"]).await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(fake.patches().is_empty(), "a refused trial writes nothing");
    assert!(manager.lock().await.trials().is_empty());

    // Forced, with the reason recorded.
    let (code, out, err) = run(&["--endpoint", "host", "--try", "2m", "--force", "--reason", "console attached"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Trial t") && out.contains("--confirm"), "{out}");
    let m = manager.lock().await;
    let t = &m.trials()[0];
    assert_eq!(t.endpoint_id, testkit::HOST);
    assert_eq!(t.endpoint_name, "host");
    assert_eq!(t.try_seconds, 120);
    assert!(t.preflight.forced);
    assert_eq!(t.preflight.exit_code, 1);
    assert_eq!(t.requested_by.reason.as_deref(), Some("console attached"));
    assert_eq!(fake.audit(testkit::HOST), Some(OptionValue::Disabled));
    drop(m);
    server.abort();
}

/// A host trial also watches the node's TCP reach to the API server: a
/// target reached just before the switch that then refuses connects twice
/// in a row reverts the trial, even with no denied verdict in the counters.
#[tokio::test]
async fn a_host_trial_reverts_when_the_node_stops_reaching_the_api_server() {
    use super::reach::{self, ReachTargets, ReachWatch};
    let rig = Rig::new();
    let api_server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = api_server.local_addr().unwrap();
    let targets: ReachTargets = Arc::new(move || vec![addr]);
    let watch = ReachWatch::default();
    let mut m = rig.manager(enabled()).with_reach(targets.clone(), watch.clone());
    let t = m.start(safe(HOST, 300), SystemTime::now()).await.unwrap();
    assert_eq!(t.reach_baseline, vec![addr.to_string()], "the baseline is taken before the switch");
    assert!(m.wants_reach());

    // Reached after the switch: nothing happens.
    let no_flows: Vec<FlowRecord> = Vec::new();
    watch.record(&reach::probe(&targets()).await, SystemTime::now());
    m.tick(&no_flows, &NoDirectory, SystemTime::now()).await;
    assert_eq!(m.get(&t.id).unwrap().phase, TrialPhase::Switched);

    // The cut: connects fail. One failure is not enough, two are.
    drop(api_server);
    watch.record(&reach::probe(&targets()).await, SystemTime::now());
    m.tick(&no_flows, &NoDirectory, SystemTime::now()).await;
    assert_eq!(m.get(&t.id).unwrap().phase, TrialPhase::Switched, "one failed connect reverts nothing");
    watch.record(&reach::probe(&targets()).await, SystemTime::now());
    m.tick(&no_flows, &NoDirectory, SystemTime::now()).await;
    let after = m.get(&t.id).unwrap();
    assert_eq!(after.phase, TrialPhase::Reverted, "{after:?}");
    let outcome = after.outcome.clone().unwrap_or_default();
    assert!(outcome.contains("reach_lost") && outcome.contains(&addr.to_string()), "{outcome}");
    assert_eq!(rig.fake.audit(HOST), Some(OptionValue::Enabled));
    assert!(!m.wants_reach(), "no host trial left to probe for");
}

/// A pod trial takes no reach baseline: the node's reach is the host's.
#[tokio::test]
async fn a_pod_trial_does_not_probe_the_api_server() {
    use super::reach::{ReachTargets, ReachWatch};
    let rig = Rig::new();
    let targets: ReachTargets = Arc::new(|| vec!["127.0.0.1:9".parse().unwrap()]);
    let mut m = rig.manager(enabled()).with_reach(targets, ReachWatch::default());
    let t = m.start(safe(POD, 300), SystemTime::now()).await.unwrap();
    assert!(t.reach_baseline.is_empty());
    assert!(!m.wants_reach());
}

/// `--namespace`: one trial per pod endpoint of the namespace, only when
/// preflight says safe for all (or forced); all or nothing when one cannot
/// start; `--abort` ends them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_namespace_trials_are_all_or_nothing() {
    use crate::readiness::{self, Observation, ReadinessInput, testkit};
    let sc = testkit::Scenario::lockout();
    let flows = sc.flows(&sc.policies, false);
    let obs = Observation::since_start(sc.observed_since);
    let mut input = ReadinessInput::new(&flows, &sc.directory, &obs, testkit::now());
    input.node = Some(testkit::NODE.into());
    let report = serde_json::to_value(readiness::evaluate(&input, &ReadinessConfig::default())).unwrap();

    // Cilium knows web and api only: the quiet pod's switch is refused (404).
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeCiliumConfig::new(&dir.path().join("cilium.sock"), &[testkit::WEB, testkit::API]);
    fake.start();
    let manager = TrialManager::open(
        EndpointConfigClient::new(dir.path().join("cilium.sock"), Duration::from_millis(500)),
        TrialStore::new(dir.path().join("state")),
        enabled(),
        TrialWatch::new(ReadinessConfig::default()),
        Arc::new(EnforcementMetrics::default()),
    )
    .unwrap();
    let manager = Arc::new(tokio::sync::Mutex::new(manager));
    let readiness_route = axum::Router::new()
        .route("/api/v1/readiness", axum::routing::get(move || async move { axum::Json(report.clone()) }));
    let router =
        readiness_route.merge(api::router(ApiState { trials: manager.clone(), cadence: ReadCadence::default() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:19813").await.unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>()).await
    });
    let run = |extra: &'static [&'static str]| async move {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            a: EnforceArgs,
        }
        let mut argv = vec!["enforce", "--agent", "http://127.0.0.1:19813"];
        argv.extend_from_slice(extra);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = cli::run_with(Wrap::parse_from(argv).a, &mut out, &mut err).await;
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    };

    // web would break: preflight's exit 1 for the namespace, nothing sent.
    let (code, out, err) = run(&["--namespace", "shop"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("refusing to leave audit mode on shop/*"), "{err}");
    assert!(fake.patches().is_empty());

    // Forced: web and api switch, quiet is refused, so web and api are undone.
    let (code, out, err) = run(&["--namespace", "shop", "--force", "--reason", "stage shop"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("shop/quiet-0") && err.contains("aborted, audit mode back on"), "{err}");
    assert_eq!(fake.audit(testkit::WEB), Some(OptionValue::Enabled));
    assert_eq!(fake.audit(testkit::API), Some(OptionValue::Enabled));
    let m = manager.lock().await;
    assert!(!m.any_active(), "every trial of the request ended");
    // The refused switch left no record (Cilium answered 404 before it);
    // the two started ones are recorded as aborted.
    let ended: Vec<(&str, TrialPhase)> = m.trials().iter().map(|t| (t.endpoint_name.as_str(), t.phase)).collect();
    assert_eq!(ended, [("shop/web-7d9f", TrialPhase::Reverted), ("shop/api-5c4b", TrialPhase::Reverted)]);
    drop(m);

    let (code, _, err) = run(&["--namespace", "shop", "--abort"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no running trial in namespace \"shop\""), "{err}");
    server.abort();
}

/// The `AuditModeTrial` custom resource reconciled by two agents (two
/// nodes) against the fake Kubernetes API: one node at a time
/// (`maxParallel: 1`), each confirmed after `tryDuration`, with a status
/// entry per node; a claim made on a stale read loses (409) and starts
/// nothing; a node whose own readiness says no is `Refused`, with why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_mode_trial_is_staged_node_by_node_with_status_per_node() {
    use super::cluster::{NodeEndpoint, NodeView, PLURAL, Reconciler};
    use crate::{enrich::fake::FakeKube, readiness::ReadinessState};
    use kube::api::{Api, DynamicObject, ListParams};

    let kube = FakeKube::start().await;
    kube.apply(
        PLURAL,
        serde_json::json!({
            "metadata": {"name": "host-firewall", "generation": 1},
            "spec": {"nodeSelector": {"matchLabels": {"role": "worker"}}, "host": true, "tryDuration": "2s",
                     "maxParallel": 1, "mode": "Enforce", "reason": "stage the host firewall"},
        }),
    );
    struct Node {
        rig: Rig,
        reconciler: Reconciler,
        trials: super::SharedTrials,
    }
    let node = |name: &'static str, labels: &'static [(&'static str, &'static str)], ready: ReadinessState| {
        let rig = Rig::new();
        let manager = rig.manager(enabled()).with_readiness(Arc::new(move |_| Some(ready)));
        let trials = Arc::new(tokio::sync::Mutex::new(manager));
        let view = NodeView {
            node: name.into(),
            labels: Box::new(move || Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())),
            endpoints: Box::new(move || {
                vec![NodeEndpoint {
                    endpoint_id: HOST,
                    name: "host".into(),
                    kind: EndpointKind::Host,
                    namespace: None,
                    state: ready,
                }]
            }),
        };
        Node { reconciler: Reconciler::new(kube.client(), trials.clone(), view), rig, trials }
    };
    let a = node("node-a", &[("role", "worker")], ReadinessState::Ready);
    let b = node("node-b", &[("role", "worker")], ReadinessState::Ready);
    let c = node("node-c", &[("role", "worker")], ReadinessState::NoEvidence);
    let control_plane = node("node-cp", &[("role", "control-plane")], ReadinessState::Ready);
    let api: Api<DynamicObject> = Api::all_with(kube.client(), &super::cluster::api_resource());
    let nodes_status = || {
        let obj = kube.get(PLURAL, "host-firewall").unwrap();
        obj["status"]["nodes"].clone()
    };

    // Both read the same version; A claims the one place, B's claim on the
    // stale read is refused (409) and B starts nothing.
    let stale = api.list(&ListParams::default()).await.unwrap().items.remove(0);
    let t0 = SystemTime::now();
    a.reconciler.reconcile_one(&stale, t0).await.unwrap();
    b.reconciler.reconcile_one(&stale, t0).await.unwrap();
    assert_eq!(nodes_status()["node-a"]["phase"], "Trying", "{}", nodes_status());
    assert!(nodes_status().get("node-b").is_none(), "B's stale claim wrote nothing: {}", nodes_status());
    assert_eq!(a.rig.fake.audit(HOST), Some(OptionValue::Disabled));
    assert_eq!(b.rig.fake.audit(HOST), Some(OptionValue::Enabled), "B switched nothing");

    // B and C look again: one node is in trial, so they wait; the control
    // plane is not selected and writes nothing.
    b.reconciler.reconcile_all(t0).await.unwrap();
    c.reconciler.reconcile_all(t0).await.unwrap();
    control_plane.reconciler.reconcile_all(t0).await.unwrap();
    let s = nodes_status();
    assert_eq!(s["node-b"]["phase"], "Pending", "{s}");
    assert_eq!(s["node-b"]["message"], "waiting: 1 of 1 nodes in trial");
    assert!(s.get("node-cp").is_none(), "{s}");
    assert_eq!(control_plane.rig.fake.audit(HOST), Some(OptionValue::Enabled));

    // tryDuration later, A is confirmed (enforcing); B takes the place.
    let t1 = t0 + Duration::from_secs(3);
    a.reconciler.reconcile_all(t1).await.unwrap();
    assert_eq!(nodes_status()["node-a"]["phase"], "Confirmed", "{}", nodes_status());
    assert_eq!(a.rig.fake.audit(HOST), Some(OptionValue::Disabled), "A keeps enforcing");
    let a_trials = a.trials.lock().await.trials().to_vec();
    assert_eq!(a_trials[0].requested_by.who, "AuditModeTrial/host-firewall");
    assert_eq!(a_trials[0].requested_by.reason.as_deref(), Some("stage the host firewall"));
    b.reconciler.reconcile_all(t1).await.unwrap();
    assert_eq!(nodes_status()["node-b"]["phase"], "Trying", "{}", nodes_status());
    // C's own readiness says no evidence: refused, and it says why.
    let t2 = t1 + Duration::from_secs(3);
    b.reconciler.reconcile_all(t2).await.unwrap();
    c.reconciler.reconcile_all(t2).await.unwrap();
    let s = nodes_status();
    assert_eq!(s["node-b"]["phase"], "Confirmed", "{s}");
    assert_eq!(s["node-c"]["phase"], "Refused", "{s}");
    assert!(s["node-c"]["message"].as_str().unwrap().contains("no_evidence"), "{s}");
    assert_eq!(c.rig.fake.audit(HOST), Some(OptionValue::Enabled), "C was never switched");
    for (n, entry) in s.as_object().unwrap() {
        assert!(entry["lastTransitionTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{n}: {entry}");
    }
    // Done nodes are left alone.
    let before = kube.requests(&format!("{PLURAL}/status"));
    a.reconciler.reconcile_all(t2).await.unwrap();
    assert_eq!(kube.requests(&format!("{PLURAL}/status")), before);
}

/// Stopping a rollout: `spec.abort` (what `kubectl verdict trials --abort`
/// writes) reverts the node in trial and keeps the waiting node from ever
/// starting; deleting an object reverts the unconfirmed trials it started,
/// and leaves confirmed ones enforcing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_or_deleted_audit_mode_trial_reverts_unconfirmed_trials() {
    use super::cluster::{NodeEndpoint, NodeView, PLURAL, Reconciler};
    use crate::{enrich::fake::FakeKube, readiness::ReadinessState};

    let kube = FakeKube::start().await;
    let trial = |name: &str, try_for: &str| {
        serde_json::json!({
            "metadata": {"name": name, "generation": 1},
            "spec": {"host": true, "tryDuration": try_for, "maxParallel": 1, "mode": "Enforce"},
        })
    };
    kube.apply(PLURAL, trial("rollout", "1h"));
    let node = |name: &'static str| {
        let rig = Rig::new();
        let manager = rig.manager(enabled()).with_readiness(Arc::new(|_| Some(ReadinessState::Ready)));
        let trials: super::SharedTrials = Arc::new(tokio::sync::Mutex::new(manager));
        let view = NodeView {
            node: name.into(),
            labels: Box::new(|| Some(Default::default())),
            endpoints: Box::new(|| {
                vec![NodeEndpoint {
                    endpoint_id: HOST,
                    name: "host".into(),
                    kind: EndpointKind::Host,
                    namespace: None,
                    state: ReadinessState::Ready,
                }]
            }),
        };
        (Reconciler::new(kube.client(), trials.clone(), view), rig, trials)
    };
    let (a, a_rig, a_trials) = node("node-a");
    let (b, b_rig, _) = node("node-b");
    let t0 = SystemTime::now();
    a.reconcile_all(t0).await.unwrap();
    b.reconcile_all(t0).await.unwrap();
    let status = |name: &str| kube.get(PLURAL, name).unwrap()["status"]["nodes"].clone();
    assert_eq!(status("rollout")["node-a"]["phase"], "Trying", "{}", status("rollout"));
    assert_eq!(status("rollout")["node-b"]["phase"], "Pending", "{}", status("rollout"));
    assert_eq!(a_rig.fake.audit(HOST), Some(OptionValue::Disabled));

    // The plugin's abort: a merge patch of spec.abort.
    let mut out = Vec::new();
    let args = crate::kubectl::trials::TrialsArgs {
        name: Some("rollout".into()),
        abort: true,
        reason: Some("rollback".into()),
    };
    crate::kubectl::trials::run(&kube.client(), &args, &mut out).await.unwrap();
    let t1 = t0 + Duration::from_secs(1);
    a.reconcile_all(t1).await.unwrap();
    b.reconcile_all(t1).await.unwrap();
    let s = status("rollout");
    assert_eq!(s["node-a"]["phase"], "Reverted", "{s}");
    assert_eq!(s["node-a"]["message"], "aborted (spec.abort): audit mode back on", "{s}");
    assert_eq!(s["node-b"]["phase"], "Refused", "{s}");
    assert_eq!(a_rig.fake.audit(HOST), Some(OptionValue::Enabled), "A is back in audit mode");
    assert_eq!(b_rig.fake.audit(HOST), Some(OptionValue::Enabled), "B never switched");
    let ended = a_trials.lock().await.trials().last().cloned().unwrap();
    assert_eq!(ended.phase, TrialPhase::Reverted);
    assert_eq!(ended.requested_by.who, "AuditModeTrial/rollout");

    // A new rollout starts on A; its object is deleted mid-trial: A reverts.
    kube.apply(PLURAL, trial("second", "1h"));
    let t2 = t1 + Duration::from_secs(1);
    a.reconcile_all(t2).await.unwrap();
    assert_eq!(status("second")["node-a"]["phase"], "Trying", "{}", status("second"));
    assert_eq!(a_rig.fake.audit(HOST), Some(OptionValue::Disabled));
    kube.delete(PLURAL, "second");
    a.reconcile_all(t2 + Duration::from_secs(1)).await.unwrap();
    assert_eq!(a_rig.fake.audit(HOST), Some(OptionValue::Enabled), "deleting the object reverted its trial");
    let last = a_trials.lock().await.trials().last().cloned().unwrap();
    assert_eq!(last.phase, TrialPhase::Reverted, "{last:?}");

    // A confirmed node keeps enforcing when its finished rollout is deleted.
    kube.apply(PLURAL, trial("third", "2s"));
    let t3 = t2 + Duration::from_secs(10);
    a.reconcile_all(t3).await.unwrap();
    a.reconcile_all(t3 + Duration::from_secs(3)).await.unwrap();
    assert_eq!(status("third")["node-a"]["phase"], "Confirmed", "{}", status("third"));
    kube.delete(PLURAL, "third");
    a.reconcile_all(t3 + Duration::from_secs(4)).await.unwrap();
    assert_eq!(a_rig.fake.audit(HOST), Some(OptionValue::Disabled), "a confirmed node is not undone by a delete");
}
