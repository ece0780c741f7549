//! The plugin against the fake Kubernetes API, whose `pods/portforward`
//! dials each agent pod's address as the kubelet would: readiness across
//! nodes with preflight's exit codes, and a trial started, listed and
//! aborted on one node through the agent's loopback-only trial API.

use std::{sync::Arc, time::Duration};

use clap::Parser as _;
use serde_json::json;

use super::{KubectlArgs, run_with};
use crate::{
    enrich::fake::FakeKube,
    model::{Direction, FlowRecord, Verdict},
    readiness::{self, EvidenceEnvironment, Observation, RateLimit, ReadinessConfig, ReadinessInput, testkit::*},
};

fn env() -> EvidenceEnvironment {
    EvidenceEnvironment {
        cilium_version: Some("1.17.8".parse().unwrap()),
        verdict_notifications: Some(true),
        rate_limit: Some(RateLimit { configured: false, dropped: None }),
    }
}

/// The lockout scenario: the host would break.
fn lockout_report(node: &str) -> serde_json::Value {
    let sc = Scenario::lockout();
    let flows = sc.flows(&sc.policies, false);
    let obs = Observation::since_start(sc.observed_since);
    let mut input = ReadinessInput::new(&flows, &sc.directory, &obs, now());
    input.environment = env();
    input.node = Some(node.into());
    serde_json::to_value(readiness::evaluate(&input, &ReadinessConfig::default())).unwrap()
}

/// QUIET has allowed traffic only, and an audited call from 20 hours ago
/// (safe over a 2 h window).
fn quiet_report(node: &str) -> serde_json::Value {
    let sc = Scenario::lockout();
    let flows: Vec<FlowRecord> = vec![
        flow(QUIET, Direction::Ingress, FRONTEND_ID, 6, 80, Verdict::Allowed, 500, ago(40 * 3600), ago(30)),
        flow(QUIET, Direction::Ingress, FRONTEND_ID, 6, 9090, Verdict::Audited, 1, ago(20 * 3600), ago(20 * 3600)),
    ];
    let obs = Observation::since_start(sc.observed_since);
    let mut input = ReadinessInput::new(&flows, &sc.directory, &obs, now());
    input.environment = env();
    input.node = Some(node.into());
    serde_json::to_value(readiness::evaluate(&input, &ReadinessConfig::default())).unwrap()
}

/// An agent's HTTP API on 127.0.0.1 with this router; returns its port.
async fn serve_agent(router: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>()).await
    });
    port
}

fn readiness_router(report: serde_json::Value) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/readiness", axum::routing::get(move || async move { axum::Json(report.clone()) }))
}

fn agent_pod(node: &str, port: u16, ready: bool) -> serde_json::Value {
    json!({
        "metadata": {"name": format!("verdict-agent-{node}"), "namespace": "kube-system",
                     "labels": {"app.kubernetes.io/name": "verdict-agent"}},
        "spec": {"nodeName": node, "containers": [{"name": "agent", "ports": [{"name": "metrics", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

fn node(name: &str) -> serde_json::Value {
    json!({"metadata": {"name": name}})
}

async fn plugin(kube: &FakeKube, argv: &[&str]) -> (u8, String, String) {
    let mut full = vec!["kubectl-verdict"];
    full.extend_from_slice(argv);
    let args = KubectlArgs::try_parse_from(full).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_with(args, kube.client(), &mut out, &mut err).await;
    (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_of_every_node_through_port_forward_with_preflights_exit_codes() {
    let kube = FakeKube::start().await;
    let safe = serve_agent(readiness_router(quiet_report("node-a"))).await;
    let breaks = serve_agent(readiness_router(lockout_report("node-b"))).await;
    kube.apply("pods", agent_pod("node-a", safe, true));
    kube.apply("pods", agent_pod("node-b", breaks, true));
    for n in ["node-a", "node-b"] {
        kube.apply("nodes", node(n));
    }

    // QUIET is safe over 2 h on node-a; on node-b the lockout scenario has
    // no such endpoint... ask for the host: node-b's would break.
    let (code, out, err) = plugin(&kube, &["readiness"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("NOT SAFE: switching PolicyAuditMode off would break traffic on"), "{out}");
    assert!(out.contains("details: kubectl verdict preflight --node node-b"), "{out}");
    assert!(kube.requests("pods/portforward") >= 2, "each agent was reached through pods/portforward");

    let (code, out, err) = plugin(&kube, &["readiness", "--endpoint", "1003", "--window", "2h"]).await;
    // node-b has endpoint 1003 too (the scenario's directory), with its
    // would-deny flows: still not safe there.
    assert!(code == 1 || code == 3, "{out}{err}");
    assert!(out.lines().any(|l| l.starts_with("node-a") && l.contains(" SAFE ")), "{out}");

    // A node without an agent is unknown, never safe.
    kube.apply("nodes", node("node-c"));
    kube.delete("pods", "kube-system/verdict-agent-node-b");
    let (code, out, err) = plugin(&kube, &["readiness", "--endpoint", "1003", "--window", "2h"]).await;
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.lines().any(|l| l.starts_with("node-c") && l.contains("UNKNOWN") && l.contains("no verdict-agent pod")),
        "{out}"
    );
    assert!(out.contains("UNKNOWN: 2 of 3 node(s) could not be called safe."), "{out}");

    // JSON carries the same exit code.
    let (code, out, _) = plugin(&kube, &["readiness", "--endpoint", "1003", "--window", "2h", "-o", "json"]).await;
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["nodes"].as_array().unwrap().len(), 3);

    // An agent that does not answer (its pod's port is closed) is unknown.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().port();
    drop(l);
    kube.apply("pods", agent_pod("node-c", dead, true));
    let (code, out, _) = plugin(&kube, &["readiness", "--endpoint", "1003", "--window", "2h", "--timeout", "3"]).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.lines().any(|l| l.starts_with("node-c") && l.contains("UNKNOWN")), "{out}");

    // No RBAC for port-forward: unknown, and the message says what to grant.
    kube.forbid("pods/portforward");
    let (code, out, _) = plugin(&kube, &["readiness"]).await;
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("pods/portforward"), "{out}");

    // preflight on one node: preflight's own output and exit code.
    let kube = FakeKube::start().await;
    kube.apply("pods", agent_pod("node-a", safe, true));
    let (code, out, err) =
        plugin(&kube, &["preflight", "--node", "node-a", "--endpoint", "1003", "--window", "2h"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("SAFE: nothing seen would be denied"), "{out}");
    let (code, _, err) = plugin(&kube, &["preflight", "--node", "node-z"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no verdict-agent pod runs on node \"node-z\" (nodes with one: node-a)"), "{err}");
}

/// `kubectl verdict enforce --node N`: the trial is handed to that node's
/// agent through the port-forward, which arrives on the pod's loopback, as
/// the trial API requires; status and abort go the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_on_a_node_through_port_forward() {
    use crate::enforce::{
        api::{self, ApiState},
        cilium_config::{EndpointConfigClient, OptionValue},
        fake::FakeCiliumConfig,
        metrics::EnforcementMetrics,
        store::TrialStore,
        trial::{TrialManager, TrialSettings},
        watch::{ReadCadence, TrialWatch},
    };
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeCiliumConfig::new(&dir.path().join("cilium.sock"), &[QUIET]);
    fake.start();
    let manager = TrialManager::open(
        EndpointConfigClient::new(dir.path().join("cilium.sock"), Duration::from_millis(500)),
        TrialStore::new(dir.path().join("state")),
        TrialSettings { enabled: true, ..TrialSettings::default() },
        TrialWatch::new(ReadinessConfig::default()),
        Arc::new(EnforcementMetrics::default()),
    )
    .unwrap();
    let manager = Arc::new(tokio::sync::Mutex::new(manager));
    let router = readiness_router(quiet_report("node-a"))
        .merge(api::router(ApiState { trials: manager.clone(), cadence: ReadCadence::default() }));
    let port = serve_agent(router).await;
    let kube = FakeKube::start().await;
    kube.apply("pods", agent_pod("node-a", port, true));

    let (code, out, err) = plugin(
        &kube,
        &["enforce", "--node", "node-a", "--endpoint", "1003", "--try", "5m", "--force", "--reason", "kubectl test"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("keep it:    kubectl verdict enforce --node node-a --endpoint shop/quiet-0 --confirm"),
        "{out}"
    );
    assert_eq!(fake.audit(QUIET), Some(OptionValue::Disabled));

    let (code, out, _) = plugin(&kube, &["enforce", "--node", "node-a", "--status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("shop/quiet-0 (1003)") && out.contains("switched"), "{out}");

    let (code, out, err) = plugin(&kube, &["enforce", "--node", "node-a", "--endpoint", "1003", "--abort"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(fake.audit(QUIET), Some(OptionValue::Enabled));
    assert!(!manager.lock().await.any_active());
}
