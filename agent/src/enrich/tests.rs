//! Enrichment against fake Cilium and Kubernetes APIs: what the directory
//! answers, how failures are counted, and that answers outlive outages.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{
    EnrichmentConfig,
    fake::{FakeCilium, FakeKube, Mode},
    start_with_kube_client,
};
use crate::model::{DirectionPolicy, EndpointDirectory, EndpointKind, FactSource, HostPolicyCoverage};

const ENDPOINTS: &str = include_str!("testdata/cilium-endpoints.json");
/// `GET /v1/endpoint` as v1.20+ answers it: the same endpoints with only
/// `cni-attachment-id` left in `external-identifiers` (be4ff1becd,
/// `pkg/endpoint/api.go@v1.20` branch point), so no pod name or namespace.
const ENDPOINTS_V1_20: &str = include_str!("testdata/cilium-endpoints-v1.20.json");
const IDENTITIES: &str = include_str!("testdata/cilium-identities.json");
const CONFIG: &str = include_str!("testdata/cilium-config.json");
const KUBE_OBJECTS: &str = include_str!("testdata/kube-objects.json");
const API_DEFINITIONS: &str = include_str!("testdata/cilium-openapi-definitions.json");
const CRD_SCHEMAS: &str = include_str!("testdata/cilium-crd-schemas.json");

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

fn identities() -> HashMap<u32, Value> {
    json(IDENTITIES).as_array().unwrap().iter().map(|i| (i["id"].as_u64().unwrap() as u32, i.clone())).collect()
}

fn fake_cilium(dir: &tempfile::TempDir) -> FakeCilium {
    FakeCilium::new(&dir.path().join("cilium.sock"), json(ENDPOINTS), identities(), json(CONFIG))
}

/// Short intervals so that a test sees several refreshes and backoffs.
fn api_config(dir: &tempfile::TempDir) -> EnrichmentConfig {
    EnrichmentConfig {
        cilium_socket: Some(dir.path().join("cilium.sock")),
        kube: false,
        node_name: Some("node-a".into()),
        refresh: Duration::from_millis(100),
        request_timeout: Duration::from_millis(300),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_millis(800),
        identity_retry: Duration::from_secs(60),
        ..EnrichmentConfig::default()
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status_of(e: &super::Enrichment, source: &str) -> super::SourceStatus {
    e.source_status().into_iter().find(|s| s.source == source).expect("source enabled")
}

fn load_kube(fake: &FakeKube) {
    let objects = json(KUBE_OBJECTS);
    for (plural, items) in objects.as_object().unwrap() {
        for item in items.as_array().unwrap() {
            fake.apply(plural, item.clone());
        }
    }
}

fn metrics_text(e: &super::Enrichment) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(e.clone()));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cilium_api_directory_outages_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_cilium(&dir);
    fake.start();
    let e = start_with_kube_client(api_config(&dir), None);

    wait_for("the first endpoint list", || e.endpoint(311).is_some()).await;
    wait_for("the daemon config", || e.daemon_facts().is_some()).await;

    let host = e.endpoint(1234).unwrap();
    assert_eq!(host.kind, EndpointKind::Host);
    assert_eq!(host.identity, Some(1));
    assert_eq!(host.ingress, Some(DirectionPolicy { enabled: true, audit: true }));
    assert_eq!(host.egress, Some(DirectionPolicy { enabled: true, audit: true }));
    assert_eq!(host.policy_source, Some(FactSource::CiliumApi));

    let web = e.endpoint(311).unwrap();
    assert_eq!(web.kind, EndpointKind::Pod);
    assert_eq!((web.namespace.as_deref(), web.pod.as_deref()), (Some("shop"), Some("web-7d4f9-abcde")));
    assert_eq!(web.identity, Some(48213));
    assert_eq!(web.ingress, Some(DirectionPolicy { enabled: true, audit: false }));
    assert_eq!(web.egress, Some(DirectionPolicy { enabled: false, audit: false }));
    assert_eq!(web.workload, None, "no Kubernetes source, no owner");

    let health = e.endpoint(99).unwrap();
    assert_eq!(health.kind, EndpointKind::Health);
    assert_eq!(health.ingress, Some(DirectionPolicy { enabled: false, audit: false }));
    assert_eq!(e.endpoints().iter().map(|i| i.id).collect::<Vec<_>>(), vec![99, 311, 1234]);

    let l = e.endpoint_labels(311);
    assert_eq!(
        (l.endpoint.as_str(), l.kind.as_str(), l.namespace.as_str(), l.pod.as_str()),
        ("311", "pod", "shop", "web-7d4f9-abcde")
    );
    let unknown = e.endpoint_labels(4000);
    assert_eq!((unknown.kind.as_str(), unknown.namespace.as_str()), ("unknown", ""));

    let facts = e.daemon_facts().unwrap();
    assert_eq!(facts.host_firewall, Some(true));
    assert_eq!(facts.policy_audit_mode, Some(false));
    assert_eq!(facts.bpf_events_policy_verdict, Some(true));
    assert_eq!(facts.policy_verdict_notification, Some(true));
    assert_eq!(e.host_policy_coverage(), None, "host policies come from Kubernetes only");

    // Identities: local ones from the endpoint list, remote ones on demand.
    assert_eq!(e.remote_name(48213), "shop/web");
    assert_eq!(e.remote_name(2), "world");
    assert_eq!(e.identity_labels(1), Some(vec!["reserved:host".to_owned()]));
    assert_eq!(e.remote_name(48300), "48300", "first ask queues a lookup");
    wait_for("identity 48300", || e.identity_labels(48300).is_some()).await;
    assert_eq!(e.remote_name(48300), "shop/db");
    assert_eq!(e.remote_name(16_777_217), "cidr");
    wait_for("CIDR identity", || e.identity_labels(16_777_217).is_some()).await;
    assert_eq!(e.identity_labels(16_777_217).unwrap(), vec!["cidr:10.1.0.0/16", "reserved:world"]);
    // Not found: asked once, then believed.
    assert_eq!(e.identity_labels(99_999), None);
    wait_for("the 404", || fake.requests("/v1/identity/99999") == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..10 {
        assert_eq!(e.identity_labels(99_999), None);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.requests("/v1/identity/99999"), 1, "negative answers are cached");

    let st = status_of(&e, "cilium_api");
    assert!(st.up, "{st:?}");
    assert_eq!(st.errors, 0, "a 404 is an answer, not an error: {st:?}");

    // HTTP 500: counted, source down, answers from cache, polling backs off.
    fake.set_mode(Mode::Error500);
    let before = fake.requests("/v1/endpoint");
    wait_for("a counted 500", || status_of(&e, "cilium_api").errors >= 1).await;
    let st = status_of(&e, "cilium_api");
    assert!(!st.up);
    assert!(st.last_error.as_deref().unwrap().contains("HTTP 500"), "{st:?}");
    assert!(st.last_error.as_deref().unwrap().contains("/v1/endpoint"), "{st:?}");
    assert_eq!(e.endpoint(311).unwrap().ingress, web.ingress, "answers survive the outage");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = fake.requests("/v1/endpoint") - before;
    // Refreshing every 100 ms would make ~15 requests; backoff (200, 400,
    // 800, 800 ms) makes ~4-5.
    assert!(during <= 7, "no backoff: {during} requests in 1.5 s of errors");
    assert!(status_of(&e, "cilium_api").errors >= 3);

    // Slow answers: timeouts are errors; callers never wait for them.
    fake.set_mode(Mode::Slow(Duration::from_secs(2)));
    let errors = status_of(&e, "cilium_api").errors;
    wait_for("a timeout", || {
        let st = status_of(&e, "cilium_api");
        st.errors > errors && st.last_error.as_deref().is_some_and(|m| m.contains("did not answer within"))
    })
    .await;
    let t = Instant::now();
    for _ in 0..100 {
        assert!(e.endpoint(1234).is_some());
        let _ = e.remote_name(424_242);
    }
    assert!(t.elapsed() < Duration::from_millis(200), "a directory call waited on I/O: {:?}", t.elapsed());

    // Restart: the agent goes away and comes back with changed endpoints.
    fake.set_mode(Mode::Normal);
    fake.stop();
    let errors = status_of(&e, "cilium_api").errors;
    wait_for("a refused connection", || {
        let st = status_of(&e, "cilium_api");
        st.errors > errors && st.last_error.as_deref().is_some_and(|m| m.contains("cannot connect"))
    })
    .await;
    assert!(e.endpoint(311).is_some(), "cache kept while the agent is away");
    {
        let mut d = fake.lock();
        let eps = d.endpoints.as_array_mut().unwrap();
        eps[1]["status"]["policy"]["realized"]["policy-enabled"] = "both".into();
        let mut newer = eps[1].clone();
        newer["id"] = 500.into();
        newer["status"]["external-identifiers"]["k8s-pod-name"] = "web-7d4f9-fghij".into();
        newer["status"]["external-identifiers"]["pod-name"] = "shop/web-7d4f9-fghij".into();
        eps.push(newer);
        eps.retain(|ep| ep["id"] != 99);
    }
    fake.start();
    wait_for("the restarted agent", || e.endpoint(500).is_some()).await;
    wait_for("source up", || status_of(&e, "cilium_api").up).await;
    assert_eq!(e.endpoint(311).unwrap().egress, Some(DirectionPolicy { enabled: true, audit: false }));
    assert_eq!(e.endpoint(99), None, "endpoints gone from the agent leave the directory");
    assert_eq!(e.endpoint(500).unwrap().pod.as_deref(), Some("web-7d4f9-fghij"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_directory_and_host_policy_coverage() {
    let fake = FakeKube::start().await;
    load_kube(&fake);
    let config =
        EnrichmentConfig { cilium_socket: None, kube: true, node_name: Some("node-a".into()), ..Default::default() };
    let e = start_with_kube_client(config, Some(fake.client()));

    wait_for("host policy coverage", || e.host_policy_coverage().is_some()).await;
    wait_for("endpoints and owners", || {
        e.endpoint(412).is_some_and(|i| i.workload.is_some()) && e.endpoint(311).is_some_and(|i| i.workload.is_some())
    })
    .await;
    wait_for("kubernetes up", || status_of(&e, "kubernetes").up).await;

    assert_eq!(
        e.host_policy_coverage().unwrap(),
        HostPolicyCoverage {
            selecting: vec!["host-edge".into()],
            selecting_no_node: vec!["host-gpu".into()],
            source: FactSource::Kubernetes,
        }
    );

    // Only node-a's endpoints: node-b also has an endpoint 311.
    assert_eq!(e.endpoints().iter().map(|i| i.id).collect::<Vec<_>>(), vec![311, 412]);
    let web = e.endpoint(311).unwrap();
    assert_eq!(web.namespace.as_deref(), Some("shop"));
    assert_eq!(web.pod.as_deref(), Some("web-7d4f9-abcde"));
    assert_eq!(web.workload.as_deref(), Some("Deployment/web"));
    assert_eq!(web.kind, EndpointKind::Pod);
    assert_eq!(web.identity, Some(48213));
    assert_eq!(web.policy_source, Some(FactSource::Kubernetes));
    assert_eq!(web.ingress, Some(DirectionPolicy { enabled: false, audit: false }));
    let api = e.endpoint(412).unwrap();
    assert_eq!(api.workload.as_deref(), Some("Deployment/api"));
    assert_eq!(api.ingress, Some(DirectionPolicy { enabled: true, audit: false }));

    // The API server's port from the `kubernetes` Service's slices in
    // `default` only; the unready host's address is left out.
    wait_for("API server slices", || e.api_server_ports().is_some()).await;
    assert_eq!(
        e.api_server_ports().unwrap(),
        vec![super::ApiServerPort { port: 8443, protocol: "TCP".into(), name: Some("https".into()) }]
    );
    assert_eq!(e.api_server_addresses().unwrap(), vec!["10.0.0.2"]);

    // UIDs for alarm Events, from the watches (no `get` on pods).
    assert_eq!(e.pod_uid("shop", "web-7d4f9-abcde").as_deref(), Some("uid-web-7d4f9-abcde"));
    assert_eq!(e.pod_uid("shop", "nope"), None);
    assert_eq!(e.node_uid().as_deref(), Some("uid-node-a"));

    assert_eq!(e.remote_name(48300), "shop/db", "from CiliumIdentity, no Cilium API");
    assert_eq!(e.remote_name(48700), "48700", "no CiliumIdentity, no API: the number");
    assert!(e.known_identities().contains(&48500));

    // Watch events: a node gains the GPU label, an endpoint goes away, a
    // new host policy selects this node.
    let mut node_b = json(KUBE_OBJECTS)["nodes"][1].clone();
    node_b["metadata"]["labels"]["gpu"] = "true".into();
    fake.apply("nodes", node_b);
    fake.delete("ciliumendpoints", "shop/api-5c8b6-xyz12");
    fake.apply(
        "ciliumclusterwidenetworkpolicies",
        serde_json::json!({"metadata": {"name": "host-all-linux"},
            "spec": {"nodeSelector": {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "Exists"}]},
                     "ingress": [{"fromEntities": ["cluster"]}]}}),
    );
    let mut slice = json(KUBE_OBJECTS)["endpointslices"][0].clone();
    slice["ports"] = serde_json::json!([{"name": "https", "port": 6443, "protocol": "TCP"}]);
    fake.apply("endpointslices", slice);
    wait_for("watch updates", || {
        e.api_server_ports().is_some_and(|p| p.len() == 1 && p[0].port == 6443)
            && e.endpoint(412).is_none()
            && e.host_policy_coverage().is_some_and(|c| c.selecting_no_node.is_empty() && c.selecting.len() == 2)
    })
    .await;
    assert_eq!(e.host_policy_coverage().unwrap().selecting, vec!["host-all-linux", "host-edge"]);
    assert_eq!(status_of(&e, "kubernetes").errors, 0);
    assert!(fake.requests("ciliumendpoints") >= 2, "a list, then a watch");

    let text = metrics_text(&e);
    assert!(
        text.contains(
            "verdict_agent_endpoint_info{endpoint=\"311\",kind=\"pod\",namespace=\"shop\",pod=\"web-7d4f9-abcde\",identity=\"48213\",workload=\"Deployment/web\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("verdict_agent_endpoint_policy_enforced{endpoint=\"311\",kind=\"pod\",namespace=\"shop\",pod=\"web-7d4f9-abcde\",direction=\"ingress\",source=\"kubernetes\"} 0"),
        "{text}"
    );
    assert!(!text.contains("verdict_agent_endpoint_audit_mode{"), "no audit state from CiliumEndpoints:\n{text}");
    assert!(text.contains("verdict_agent_enrichment_source_up{source=\"kubernetes\"} 1"), "{text}");
    assert!(!text.contains("source=\"cilium_api\""), "disabled sources are not exported:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_forbidden_resource_is_counted() {
    let fake = FakeKube::start().await;
    load_kube(&fake);
    fake.forbid("nodes");
    // Without the Node object only NODE_IP places CiliumEndpoints on this
    // node (they record the node's IP, not its name).
    let config = EnrichmentConfig {
        cilium_socket: None,
        kube: true,
        node_name: Some("node-a".into()),
        node_ips: vec!["10.0.0.5".into()],
        ..Default::default()
    };
    let e = start_with_kube_client(config, Some(fake.client()));

    wait_for("endpoints", || e.endpoint(311).is_some_and(|i| i.workload.is_some())).await;
    assert_eq!(e.endpoints().iter().map(|i| i.id).collect::<Vec<_>>(), vec![311, 412]);
    wait_for("a counted 403 and the other watches listed", || {
        let st = status_of(&e, "kubernetes");
        st.errors >= 2 && st.failing == ["node", "nodes"]
    })
    .await;
    let st = status_of(&e, "kubernetes");
    assert!(!st.up);
    assert_eq!(st.failing, vec!["node", "nodes"]);
    assert!(st.last_error.as_deref().unwrap().contains("grant list and watch"), "{st:?}");
    assert_eq!(e.host_policy_coverage(), None, "unknown without the node list");
    assert!(metrics_text(&e).contains("verdict_agent_enrichment_source_up{source=\"kubernetes\"} 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sources_merge() {
    let dir = tempfile::tempdir().unwrap();
    let kube = FakeKube::start().await;
    load_kube(&kube);
    // The Cilium agent is down when the agent starts: Kubernetes answers.
    let cilium = fake_cilium(&dir);
    let config = EnrichmentConfig { kube: true, ..api_config(&dir) };
    let e = start_with_kube_client(config, Some(kube.client()));

    wait_for("Kubernetes endpoints", || e.endpoint(311).is_some_and(|i| i.workload.is_some())).await;
    assert_eq!(e.endpoint(311).unwrap().policy_source, Some(FactSource::Kubernetes));
    assert!(!status_of(&e, "cilium_api").up);

    cilium.start();
    wait_for("the Cilium API", || e.endpoint(1234).is_some()).await;
    // The API wins on policy (the CiliumEndpoint says not enforcing), the
    // pods give the owner.
    let web = e.endpoint(311).unwrap();
    assert_eq!(web.policy_source, Some(FactSource::CiliumApi));
    assert_eq!(web.ingress, Some(DirectionPolicy { enabled: true, audit: false }));
    assert_eq!(web.workload.as_deref(), Some("Deployment/web"));
    // An endpoint only Kubernetes knows (newer than the last refresh).
    let api = e.endpoint(412).unwrap();
    assert_eq!(api.policy_source, Some(FactSource::Kubernetes));
    assert_eq!(e.endpoints().iter().map(|i| i.id).collect::<Vec<_>>(), vec![99, 311, 412, 1234]);
    assert_eq!(e.endpoint(1234).unwrap().kind, EndpointKind::Host);

    wait_for("both up", || e.source_status().iter().all(|s| s.up)).await;
    let text = metrics_text(&e);
    for line in [
        "verdict_agent_endpoint_info{endpoint=\"1234\",kind=\"host\",namespace=\"\",pod=\"\",identity=\"1\",workload=\"\"} 1",
        "verdict_agent_endpoint_policy_enforced{endpoint=\"311\",kind=\"pod\",namespace=\"shop\",pod=\"web-7d4f9-abcde\",direction=\"ingress\",source=\"cilium_api\"} 1",
        "verdict_agent_endpoint_policy_enforced{endpoint=\"311\",kind=\"pod\",namespace=\"shop\",pod=\"web-7d4f9-abcde\",direction=\"egress\",source=\"cilium_api\"} 0",
        "verdict_agent_endpoint_audit_mode{endpoint=\"1234\",kind=\"host\",namespace=\"\",pod=\"\",direction=\"ingress\",source=\"cilium_api\"} 1",
        "verdict_agent_endpoint_audit_mode{endpoint=\"311\",kind=\"pod\",namespace=\"shop\",pod=\"web-7d4f9-abcde\",direction=\"ingress\",source=\"cilium_api\"} 0",
        "verdict_agent_endpoint_policy_enforced{endpoint=\"412\",kind=\"pod\",namespace=\"shop\",pod=\"api-5c8b6-xyz12\",direction=\"ingress\",source=\"kubernetes\"} 1",
        "verdict_agent_enrichment_source_up{source=\"cilium_api\"} 1",
        "verdict_agent_enrichment_source_up{source=\"kubernetes\"} 1",
        "verdict_agent_enrichment_errors_total{source=\"kubernetes\"} 0",
        "# TYPE verdict_agent_enrichment_errors counter",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    let api_errors = status_of(&e, "cilium_api").errors;
    assert!(api_errors >= 1, "the initial outage was counted");
    assert!(
        text.contains(&format!("verdict_agent_enrichment_errors_total{{source=\"cilium_api\"}} {api_errors}")),
        "{text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("verdict_agent_endpoint_audit_mode{endpoint=\"412\"")),
        "no audit state from CiliumEndpoints:\n{text}"
    );
}

#[test]
fn static_directory_from_endpoint_list() {
    let eps = crate::cilium::endpoint_list::parse_endpoint_list(ENDPOINTS).unwrap();
    let e = super::Enrichment::from_endpoints(eps);
    assert_eq!(e.endpoint(1234).unwrap().policy_source, Some(FactSource::EndpointsFile));
    assert_eq!(e.remote_name(48213), "shop/web");
    assert_eq!(e.remote_name(48300), "48300");
    assert!(e.source_status().is_empty());
    assert!(metrics_text(&e).contains("source=\"endpoints_file\""));
}

// ---- Fixtures against the published schemas ----

/// Checks `value` against an OpenAPI v2 / v3 structural schema: field
/// names, types, enums, required fields.
fn check(schema: &Value, defs: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap();
        return check(&defs[name], defs, value, path, errors);
    }
    if schema.get("x-kubernetes-int-or-string").is_some() {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            errors.push(format!("{path}: want int or string, got {value}"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str).or_else(|| schema.get("properties").map(|_| "object"));
    match ty {
        Some("object") => {
            let Some(obj) = value.as_object() else {
                return errors.push(format!("{path}: want object, got {value}"));
            };
            for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !obj.contains_key(req.as_str().unwrap()) {
                    errors.push(format!("{path}: missing required {req}"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties");
            for (k, v) in obj {
                let sub = format!("{path}.{k}");
                if let Some(p) = props.and_then(|p| p.get(k)) {
                    check(p, defs, v, &sub, errors);
                } else if let Some(extra) = extra.filter(|e| e.is_object()) {
                    // go-swagger's interface{} is `type: object`: any value.
                    if extra.get("type").and_then(Value::as_str) == Some("object") && extra.get("properties").is_none()
                    {
                        continue;
                    }
                    check(extra, defs, v, &sub, errors);
                } else if props.is_some() && schema.get("x-kubernetes-preserve-unknown-fields").is_none() {
                    errors.push(format!("{sub}: not in the schema"));
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                return errors.push(format!("{path}: want array, got {value}"));
            };
            for (i, v) in items.iter().enumerate() {
                check(&schema["items"], defs, v, &format!("{path}[{i}]"), errors);
            }
        }
        Some("string") => {
            let Some(s) = value.as_str() else {
                return errors.push(format!("{path}: want string, got {value}"));
            };
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
                && !allowed.iter().any(|a| a == s)
            {
                errors.push(format!("{path}: {s:?} not in {allowed:?}"));
            }
        }
        Some("integer") if !(value.is_i64() || value.is_u64()) => {
            errors.push(format!("{path}: want integer, got {value}"))
        }
        Some("boolean") if !value.is_boolean() => errors.push(format!("{path}: want boolean, got {value}")),
        Some("number") if !value.is_number() => errors.push(format!("{path}: want number, got {value}")),
        _ => {}
    }
}

#[test]
fn fixtures_match_schemas() {
    let defs = json(API_DEFINITIONS);
    let crds = json(CRD_SCHEMAS);
    let mut errors = Vec::new();
    let endpoint = serde_json::json!({"$ref": "#/definitions/Endpoint"});
    for (i, ep) in json(ENDPOINTS).as_array().unwrap().iter().enumerate() {
        check(&endpoint, &defs, ep, &format!("endpoints[{i}]"), &mut errors);
    }
    for (i, ep) in json(ENDPOINTS_V1_20).as_array().unwrap().iter().enumerate() {
        check(&endpoint, &defs, ep, &format!("v1.20 endpoints[{i}]"), &mut errors);
    }
    for (id, ident) in identities() {
        check(
            &serde_json::json!({"$ref": "#/definitions/Identity"}),
            &defs,
            &ident,
            &format!("identity {id}"),
            &mut errors,
        );
    }
    check(
        &serde_json::json!({"$ref": "#/definitions/DaemonConfiguration"}),
        &defs,
        &json(CONFIG),
        "config",
        &mut errors,
    );

    let objects = json(KUBE_OBJECTS);
    for plural in ["ciliumendpoints", "ciliumidentities", "ciliumclusterwidenetworkpolicies"] {
        for (i, obj) in objects[plural].as_array().unwrap().iter().enumerate() {
            check(&crds[plural], &Value::Null, obj, &format!("{plural}[{i}]"), &mut errors);
        }
    }
    assert!(errors.is_empty(), "fixtures do not match the schemas:\n{}", errors.join("\n"));

    // Core objects: k8s-openapi's types are the schema.
    for node in objects["nodes"].as_array().unwrap() {
        serde_json::from_value::<k8s_openapi::api::core::v1::Node>(node.clone()).unwrap();
    }
    for pod in objects["pods"].as_array().unwrap() {
        serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(pod.clone()).unwrap();
    }
    for slice in objects["endpointslices"].as_array().unwrap() {
        serde_json::from_value::<k8s_openapi::api::discovery::v1::EndpointSlice>(slice.clone()).unwrap();
    }

    // The validator itself catches what it should.
    let mut errs = Vec::new();
    let bad = serde_json::json!({"id": "x", "status": {"policy": {"realized": {"policy-enabled": "sometimes"}}, "state": "ready", "bogus": 1}});
    check(&endpoint, &defs, &bad, "bad", &mut errs);
    assert_eq!(errs.len(), 3, "{errs:?}");
}

// ---- Outages: backoff, one line per outage ----

/// Log lines of the current thread, for tests on a current-thread runtime
/// (every task runs there, so every line is caught).
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        // tracing-core computes callsite interest from the calling thread's
        // default while only one dispatcher is registered: another test's
        // thread (no subscriber) would then disable the callsites for this
        // one. A second dispatcher, alive for the whole process, makes it
        // combine every registered dispatcher instead.
        static KEEP_TWO: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        KEEP_TWO.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        Self::refresh_interest();
        guard
    }

    /// Other tests hit the same callsites on threads without a subscriber;
    /// tracing may cache "never" for a callsite registered concurrently
    /// with this subscriber. Recomputing makes the capture complete.
    fn refresh_interest() {
        tracing::callsite::rebuild_interest_cache();
    }

    fn lines(&self, level: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(level)).map(str::to_owned).collect()
    }
}

/// The API server goes down for 4 s behind its address (connections are
/// accepted and closed, the way a restarting kube-apiserver behind a load
/// balancer looks): the seven watches back off (attempts counted by the
/// server, not by the agent), the outage is logged once at WARN and once at
/// INFO, and the watches resume with their caches.
#[tokio::test(flavor = "current_thread")]
async fn kubernetes_outage_backs_off_and_logs_once() {
    let logs = CapturedLogs::default();
    let _guard = logs.install();
    let fake = FakeKube::start_on(19601).await;
    load_kube(&fake);
    let config = EnrichmentConfig {
        cilium_socket: None,
        kube: true,
        node_name: Some("node-a".into()),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(1600),
        ..Default::default()
    };
    let e = start_with_kube_client(config, Some(fake.client()));
    wait_for("kubernetes up", || status_of(&e, "kubernetes").up).await;
    assert!(logs.lines("WARN").is_empty(), "{:?}", logs.lines("WARN"));

    CapturedLogs::refresh_interest();
    fake.refuse().await;
    let t0 = Instant::now();
    let mut attempts_at = Vec::new();
    while t0.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        attempts_at.push((t0.elapsed(), fake.refused()));
    }
    let attempts = fake.refused();
    let in_last_2s = attempts - attempts_at.iter().find(|(t, _)| *t >= Duration::from_secs(2)).unwrap().1;
    // Seven watches retrying every 100-200 ms (no growth) would make about
    // 190 attempts in 4 s. With doubling delays capped at 1.6 s each watch
    // makes at most 8 (0.1+0.2+0.4+0.8+0.8+0.8+0.8 s minimum) plus the one
    // that found the server gone, 63 in all; in the last two seconds at
    // most 3 per watch.
    let watches = 7;
    assert!(attempts >= watches, "every watch retries: {attempts} attempts");
    assert!(attempts <= 9 * watches, "no backoff growth: {attempts} attempts in 4 s ({attempts_at:?})");
    assert!(in_last_2s <= 3 * watches, "no backoff growth: {in_last_2s} attempts in the last 2 s ({attempts_at:?})");
    let st = status_of(&e, "kubernetes");
    assert!(!st.up);
    assert!(st.errors >= attempts as u64 / 2, "failures are counted: {st:?}");
    assert!(e.endpoint(311).is_some(), "answers from the caches meanwhile");

    let warns = logs.lines("WARN");
    assert_eq!(warns.len(), 1, "one WARN per outage:\n{}", warns.join("\n"));
    assert!(warns[0].contains("kubernetes is down"), "{}", warns[0]);
    assert!(warns[0].contains("retried with backoff"), "{}", warns[0]);

    CapturedLogs::refresh_interest();
    fake.resume().await;
    wait_for("kubernetes up again", || status_of(&e, "kubernetes").up).await;
    let infos: Vec<String> = logs.lines("INFO").into_iter().filter(|l| l.contains("answers again")).collect();
    assert_eq!(infos.len(), 1, "one INFO per recovery:\n{}", infos.join("\n"));
    assert!(infos[0].contains("down_for_ms="), "{}", infos[0]);
    assert_eq!(logs.lines("WARN").len(), 1, "{:?}", logs.lines("WARN"));

    // After the recovery the backoff starts over: watch events still flow.
    fake.delete("ciliumendpoints", "shop/api-5c8b6-xyz12");
    wait_for("a watch event after recovery", || e.endpoint(412).is_none()).await;
}

/// The pod watch asks for metadata only, of this node's pods only; so does
/// the node-labels watch (metadata of every node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_watch_is_metadata_of_this_node_only() {
    let fake = FakeKube::start().await;
    load_kube(&fake);
    let config =
        EnrichmentConfig { cilium_socket: None, kube: true, node_name: Some("node-a".into()), ..Default::default() };
    let e = start_with_kube_client(config, Some(fake.client()));
    wait_for("owners", || e.endpoint(311).is_some_and(|i| i.workload.is_some())).await;
    wait_for("a pod watch", || fake.seen().iter().any(|r| r.path.ends_with("/pods") && r.query.contains_key("watch")))
        .await;

    let pods: Vec<_> = fake.seen().into_iter().filter(|r| r.path == "/api/v1/pods").collect();
    assert!(pods.len() >= 2, "a list and a watch: {pods:?}");
    for r in &pods {
        assert_eq!(r.query.get("fieldSelector").map(String::as_str), Some("spec.nodeName=node-a"), "{r:?}");
        assert!(r.accept.contains("as=PartialObjectMetadata"), "metadata only: {r:?}");
        assert!(r.accept.contains("g=meta.k8s.io"), "{r:?}");
    }
    assert!(pods.iter().any(|r| r.accept.contains("as=PartialObjectMetadataList")), "the list: {pods:?}");
    let nodes: Vec<_> = fake
        .seen()
        .into_iter()
        .filter(|r| r.path == "/api/v1/nodes" && !r.query.contains_key("fieldSelector"))
        .collect();
    assert!(!nodes.is_empty() && nodes.iter().all(|r| r.accept.contains("as=PartialObjectMetadata")), "{nodes:?}");
    // The node-b pod never reached the agent.
    assert_eq!(e.endpoints().iter().map(|i| i.id).collect::<Vec<_>>(), vec![311, 412]);
}

/// v1.20+: the API names no pods; the directory takes the pod name from
/// this node's CiliumEndpoint with the same ID and identity, and the owner
/// from the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_20_api_names_come_from_ciliumendpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cilium = FakeCilium::new(&dir.path().join("cilium.sock"), json(ENDPOINTS_V1_20), identities(), json(CONFIG));
    cilium.start();
    let kube = FakeKube::start().await;
    load_kube(&kube);
    let config = EnrichmentConfig { kube: true, ..api_config(&dir) };
    let e = start_with_kube_client(config, Some(kube.client()));
    wait_for("names from CiliumEndpoints", || {
        e.endpoint(311)
            .is_some_and(|i| i.pod.is_some() && i.workload.is_some() && i.policy_source == Some(FactSource::CiliumApi))
    })
    .await;
    let web = e.endpoint(311).unwrap();
    assert_eq!((web.namespace.as_deref(), web.pod.as_deref()), (Some("shop"), Some("web-7d4f9-abcde")));
    assert_eq!(web.workload.as_deref(), Some("Deployment/web"));
    assert_eq!(web.kind, EndpointKind::Pod);
    wait_for("412 named", || e.endpoint(412).is_some_and(|i| i.pod.is_some())).await;
    assert_eq!(e.endpoint(412).unwrap().pod.as_deref(), Some("api-5c8b6-xyz12"));
    let l = e.endpoint_labels(311);
    assert_eq!((l.namespace.as_str(), l.pod.as_str()), ("shop", "web-7d4f9-abcde"));
}

/// Text from the remote side reaches a log line escaped: a crafted error
/// body cannot start a forged line.
#[tokio::test(flavor = "current_thread")]
async fn hostile_text_is_escaped_in_outage_logs() {
    let logs = CapturedLogs::default();
    let _guard = logs.install();
    let h = super::health::SourceHealth::new("cilium_api", Duration::from_secs(60));
    h.register("api");
    h.failure("api", "GET /v1/endpoint answered HTTP 500: \"x\nlevel=INFO msg=\\\"all clear\\\" pod=\u{202e}evil\"");
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("\\u{a}level=INFO"), "{text}");
    assert!(text.contains("\\u{202e}evil"), "{text}");
    assert!(!text.contains('\u{202e}'), "{text}");
}

/// A deleted pod's per-endpoint series leave the scrape once its counters
/// stopped moving for the grace period; the live pod's stay. While the
/// Kubernetes source is down nothing is retired (it cannot know).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_deleted_endpoints_leave_the_scrape() {
    use std::sync::{Arc, RwLock};

    use crate::{
        bpf::snapshot::{EndpointTotals, MapSnapshot},
        state::AgentView,
    };

    let fake = FakeKube::start_on(19602).await;
    load_kube(&fake);
    let config = EnrichmentConfig {
        cilium_socket: None,
        kube: true,
        node_name: Some("node-a".into()),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        ..Default::default()
    };
    let e = start_with_kube_client(config, Some(fake.client()));
    wait_for("endpoints", || e.endpoint(311).is_some() && e.endpoint(412).is_some()).await;
    wait_for("kubernetes up", || status_of(&e, "kubernetes").up).await;
    let owner = e.endpoint_owner(412).unwrap();
    assert_eq!((owner.generation, owner.pod.as_deref()), (1, Some("api-5c8b6-xyz12")));

    let totals = |id: u16, n: u64| EndpointTotals {
        id,
        verdicts: [[n, 0, 0, 0], [0; 4]],
        notifications: n,
        ..Default::default()
    };
    let view = Arc::new(RwLock::new(AgentView::new(
        crate::bpf::loader::TapKind::Fentry,
        crate::bpf::loader::NotificationRead::ProbeRead,
        Default::default(),
        1024,
    )));
    let set = |a: u64, b: u64| {
        view.write().unwrap().snapshot =
            Some(MapSnapshot { endpoints: vec![totals(311, a), totals(412, b)], ..MapSnapshot::empty() });
    };
    set(5, 7);
    let collector = crate::metrics::VerdictCollector::new(view.clone(), Arc::new(e.clone()), None)
        .with_retirement_grace(Duration::from_millis(300));
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector));
    let scrape = || {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    };
    let has = |text: &str, id: u16| text.contains(&format!("verdict_agent_endpoint_verdicts_total{{endpoint=\"{id}\""));
    assert!(has(&scrape(), 311) && has(&scrape(), 412));

    fake.delete("ciliumendpoints", "shop/api-5c8b6-xyz12");
    wait_for("412 gone", || e.endpoint_gone(412)).await;
    assert!(!e.endpoint_gone(311) && !e.endpoint_gone(4000), "live and never-known IDs are not gone");
    assert_eq!(e.endpoint_owner(412), None);
    // The final increment is still scraped (under the bare ID: the
    // directory no longer names it).
    set(5, 8);
    assert!(has(&scrape(), 412), "the final increment is scraped");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let text = scrape();
    assert!(!has(&text, 412), "gone and quiet for the grace period:\n{text}");
    assert!(has(&text, 311));

    // With the source down the agent cannot know what is gone: kept.
    fake.refuse().await;
    wait_for("kubernetes down", || status_of(&e, "kubernetes").errors > 0 && !status_of(&e, "kubernetes").up).await;
    assert!(!e.endpoint_gone(412), "unknown, not gone, while a source is down");
    assert!(has(&scrape(), 412));
    fake.resume().await;
    wait_for("kubernetes up again", || status_of(&e, "kubernetes").up).await;
    assert!(e.endpoint_gone(412));

    // Late counts bring it back; reuse by a new pod gives a new generation.
    set(5, 9);
    assert!(has(&scrape(), 412));
    let mut reused = json(KUBE_OBJECTS)["ciliumendpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["status"]["id"] == 412)
        .unwrap()
        .clone();
    reused["metadata"]["name"] = "api-5c8b6-new01".into();
    reused["metadata"]["uid"] = "uid-api-new01".into();
    reused["status"]["external-identifiers"]["k8s-pod-name"] = "api-5c8b6-new01".into();
    reused["status"]["external-identifiers"]["pod-name"] = "shop/api-5c8b6-new01".into();
    fake.apply("ciliumendpoints", reused);
    wait_for("412 reused", || e.endpoint(412).is_some()).await;
    let owner = e.endpoint_owner(412).unwrap();
    assert_eq!((owner.generation, owner.pod.as_deref()), (2, Some("api-5c8b6-new01")));
    assert_eq!(crate::model::EndpointDirectory::endpoint_generation(&e, 412), Some(2));
}

/// The Cilium agent goes away for 2 s: one WARN, one INFO with the
/// outage's duration, and the refresh backs off meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn cilium_api_outage_logs_once() {
    let logs = CapturedLogs::default();
    let _guard = logs.install();
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_cilium(&dir);
    fake.start();
    let e = start_with_kube_client(api_config(&dir), None);
    wait_for("the Cilium API", || status_of(&e, "cilium_api").up).await;

    CapturedLogs::refresh_interest();
    fake.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = status_of(&e, "cilium_api");
    assert!(!st.up);
    // Refreshing every 100 ms would fail ~20 times; backoff from 200 ms
    // to 800 ms fails at most 5 times (0.2+0.4+0.8+0.8 s minimum).
    assert!(st.errors >= 2 && st.errors <= 6, "{st:?}");
    let warns = logs.lines("WARN");
    assert_eq!(warns.len(), 1, "{}", warns.join("\n"));
    assert!(warns[0].contains("cilium_api is down") && warns[0].contains("cannot connect"), "{}", warns[0]);

    CapturedLogs::refresh_interest();
    fake.start();
    wait_for("the Cilium API again", || status_of(&e, "cilium_api").up).await;
    let infos: Vec<String> = logs.lines("INFO").into_iter().filter(|l| l.contains("answers again")).collect();
    assert_eq!(infos.len(), 1, "{}", infos.join("\n"));
    assert!(infos[0].contains("cilium_api answers again after"), "{}", infos[0]);
    assert_eq!(logs.lines("WARN").len(), 1);
}
