//! Hostile names through every way into `suggest`: a capture
//! (`--input`), an endpoint file (`--endpoints`) and the agent's API. The
//! output is parsed as a YAML stream: exactly the expected policies, each
//! valid against Cilium's CRD schema, no name outside a comment or a
//! serialized value, no comment line broken.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::*;
use crate::readiness::testkit::{
    schema::{CrdSchema, crd_dir},
    serve_at,
};

/// Names an attacker would give a pod, a namespace, a label value or a node.
fn hostile_names() -> Vec<String> {
    vec![
        // Ends the comment and adds an allow-all document.
        "web\n---\napiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: pwned\nspec:\n  \
         endpointSelector: {}\n  ingress:\n  - fromEntities: [all]\n"
            .into(),
        "web\r\n--- # \"quoted\" 'single' {flow: [x]} &a *a !tag |".into(),
        "nul\0esc\x1b[2Jbell\x07del\x7f\u{85}next".into(),
        "bidi\u{202e}gnp.exe\u{2066}x\u{2069}\u{2028}\u{2029}\u{feff}".into(),
        "#".repeat(40),
        format!("long-{}", "x".repeat(100_000)),
    ]
}

fn lockout_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/readiness").join(name)
}

/// The lockout capture without its deliberately cut line (the readers'
/// own tests keep it: a cut verdict line makes any answer incomplete).
fn complete_capture() -> String {
    let capture = std::fs::read_to_string(lockout_fixture("lockout-hubble.jsonl")).unwrap();
    let lines: Vec<&str> = capture.lines().filter(|l| serde_json::from_str::<Value>(l).is_ok()).collect();
    assert!(lines.len() + 1 >= capture.lines().count(), "the fixture lost more than its one cut line");
    lines.join("\n") + "\n"
}

/// Longest line `analyze` reads (`cilium::capture_lines`); a longer one
/// is a counted rejection, never an allocation of the whole line.
const MAX_CAPTURE_LINE: usize = 64 * 1024;

/// `s` as the inside of a JSON string.
fn json_inner(s: &str) -> String {
    let q = serde_json::to_string(s).unwrap();
    q[1..q.len() - 1].to_owned()
}

/// Every document of the stream, which must each be a Cilium policy.
fn documents(yaml: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(yaml) {
        let v = serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("not YAML: {e}\n{yaml}"));
        // A stream of comments only is one empty document: nothing to apply.
        if !v.is_null() {
            docs.push(serde_json::to_value(v).unwrap());
        }
    }
    docs
}

/// Checks the stream: `expected` documents (kind, name), each CRD-valid,
/// nothing but comments outside them, every comment line free of
/// characters that could break it.
fn check_stream(yaml: &str, expected: &[(&str, &str)]) {
    let cnp = CrdSchema::load(&crd_dir().join("ciliumnetworkpolicies.yaml"), "v2");
    let ccnp = CrdSchema::load(&crd_dir().join("ciliumclusterwidenetworkpolicies.yaml"), "v2");
    let docs = documents(yaml);
    let got: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            (d["kind"].as_str().unwrap_or("?").to_owned(), d["metadata"]["name"].as_str().unwrap_or("?").to_owned())
        })
        .collect();
    let want: Vec<(String, String)> = expected.iter().map(|(k, n)| ((*k).to_owned(), (*n).to_owned())).collect();
    assert_eq!(got, want, "{}", crate::text::escape_with_limit(yaml, 4000));
    for d in &docs {
        let schema = if d["kind"] == "CiliumNetworkPolicy" { &cnp } else { &ccnp };
        assert_eq!(schema.validate(d), Vec::<String>::new(), "{d}");
        // Names may appear inside serialized strings (the description),
        // never as structure: no injected object, no allow-all rule.
        assert_ne!(d["metadata"]["name"], "pwned", "{d}");
        for dir in ["ingress", "egress"] {
            for rule in d["spec"][dir].as_array().into_iter().flatten() {
                for key in ["fromEntities", "toEntities"] {
                    let entities = rule[key].as_array().into_iter().flatten();
                    assert!(entities.clone().all(|e| e != "all" && e != "cluster"), "{d}");
                }
            }
        }
    }
    for line in yaml.lines() {
        assert!(!line.chars().any(crate::text::is_hazardous), "raw control or bidi character in {line:?}");
        let t = line.trim_start();
        if t.starts_with('#') {
            assert!(t.len() < 1000, "an unbounded comment line: {} bytes", t.len());
        }
    }
}

fn args(input: &Path, endpoints: &Path) -> SuggestArgs {
    SuggestArgs {
        endpoint: None,
        agent: crate::preflight::DEFAULT_AGENT.into(),
        input: Some(input.to_owned()),
        format: None,
        endpoints: Some(endpoints.to_owned()),
        host_endpoint: None,
        window: None,
        node: None,
        node_selector: vec![],
        max_cidrs: 8,
        output: SuggestFormat::Yaml,
        output_file: None,
    }
}

async fn suggest_capture(capture: &str, endpoints: &str) -> (String, u8) {
    let dir = tempfile::tempdir().unwrap();
    let (c, e) = (dir.path().join("capture.jsonl"), dir.path().join("endpoints.json"));
    std::fs::write(&c, capture).unwrap();
    std::fs::write(&e, endpoints).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run_with(args(&c, &e), &mut out, &mut err).await;
    assert!(code != 2, "{}", String::from_utf8_lossy(&err));
    (String::from_utf8(out).unwrap(), code)
}

const HOST: (&str, &str) = ("CiliumClusterwideNetworkPolicy", "allow-observed-host-node-a");
const WEB: (&str, &str) = ("CiliumNetworkPolicy", "allow-observed-web-7d9f");

#[tokio::test]
async fn clean_capture_gives_the_two_policies() {
    let capture = complete_capture();
    let endpoints = std::fs::read_to_string(lockout_fixture("lockout-endpoints.json")).unwrap();
    let (yaml, code) = suggest_capture(&capture, &endpoints).await;
    assert_eq!(code, 0, "{yaml}");
    check_stream(&yaml, &[HOST, WEB]);
}

#[tokio::test]
async fn hostile_pod_names_in_capture_and_endpoint_file_stay_in_comments() {
    let capture = complete_capture();
    let endpoints = std::fs::read_to_string(lockout_fixture("lockout-endpoints.json")).unwrap();
    for h in hostile_names() {
        let pod = format!("\"{}\"", json_inner(&h));
        let hostile_capture = capture.replace("\"web-7d9f\"", &pod);
        let (yaml, code) = suggest_capture(
            &hostile_capture,
            &endpoints
                .replace("\"web-7d9f\"", &pod)
                .replace("\"shop/web-7d9f\"", &format!("\"shop/{}\"", json_inner(&h))),
        )
        .await;
        if hostile_capture.lines().any(|l| l.len() > MAX_CAPTURE_LINE) {
            // The pod's flows are rejected lines (counted, exit 3): only
            // the host's policy, and nothing injected.
            assert_eq!(code, 3, "{}", crate::text::escape_with_limit(&yaml, 4000));
            check_stream(&yaml, &[HOST]);
            continue;
        }
        // The pod's name only names the policy, sanitized to a DNS name.
        let docs = documents(&yaml);
        assert_eq!(docs.len(), 2, "{}", crate::text::escape_with_limit(&yaml, 4000));
        let web_name = docs[1]["metadata"]["name"].as_str().unwrap().to_owned();
        assert!(crate::suggest::labels::is_dns_subdomain(&web_name), "{web_name}");
        check_stream(&yaml, &[HOST, ("CiliumNetworkPolicy", &web_name)]);
    }
}

#[tokio::test]
async fn hostile_labels_and_namespaces_are_never_selected() {
    let capture = complete_capture();
    let endpoints = std::fs::read_to_string(lockout_fixture("lockout-endpoints.json")).unwrap();
    for h in hostile_names() {
        let inner = json_inner(&h);
        // The web pod's only workload label and its namespace are hostile:
        // no selector can name it, so there is no policy for it, and a note.
        let eps = endpoints
            .replace("\"k8s:app=web\"", &format!("\"k8s:app={inner}\""))
            .replace("\"k8s-namespace\": \"shop\"", &format!("\"k8s-namespace\": \"{inner}\""));
        let (yaml, code) = suggest_capture(&capture, &eps).await;
        assert_eq!(code, 1, "an endpoint left without policy is exit 1");
        check_stream(&yaml, &[HOST]);
        assert!(yaml.contains("no policy: the endpoint's namespace or labels are unknown"), "{yaml}");
        // The node name from the endpoint file is hostile too: no host policy either.
        let eps = eps.replace("k8s:kubernetes.io/hostname=node-a", &format!("k8s:kubernetes.io/hostname={inner}"));
        let capture = capture.replace("\"node-a\"", &format!("\"{inner}\""));
        if capture.lines().any(|l| l.len() > MAX_CAPTURE_LINE) {
            // Every line names the node: every line is a counted rejection,
            // so there is no evidence and nothing is suggested.
            let dir = tempfile::tempdir().unwrap();
            let (c, e) = (dir.path().join("capture.jsonl"), dir.path().join("endpoints.json"));
            std::fs::write(&c, &capture).unwrap();
            std::fs::write(&e, &eps).unwrap();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let code = run_with(args(&c, &e), &mut out, &mut err).await;
            assert_ne!(code, 0, "{}", String::from_utf8_lossy(&err));
            check_stream(&String::from_utf8(out).unwrap(), &[]);
            continue;
        }
        let (yaml, _) = suggest_capture(&capture, &eps).await;
        check_stream(&yaml, &[]);
    }
}

fn report_with_hostile_names(h: &str) -> ReadinessReport {
    use crate::readiness::testkit::*;
    let sc = Scenario::lockout();
    let obs = crate::readiness::Observation::since_start(sc.observed_since);
    let flows = sc.flows(&sc.policies, false);
    let mut input = crate::readiness::ReadinessInput::new(&flows, &sc.directory, &obs, now());
    input.environment =
        crate::readiness::EvidenceEnvironment { cilium_version: Some("1.16.3".parse().unwrap()), ..Default::default() };
    input.node = Some(NODE.into());
    let mut r = crate::readiness::evaluate(&input, &crate::readiness::ReadinessConfig::default());
    for e in &mut r.endpoints {
        if e.pod.is_some() {
            e.pod = Some(h.to_owned());
            e.workload = Some(format!("Deployment/{h}"));
        }
        for f in &mut e.would_deny {
            f.remote_name = h.to_owned();
        }
    }
    r
}

#[tokio::test]
async fn hostile_names_from_the_agent_api() {
    for (i, h) in hostile_names().into_iter().enumerate() {
        let body = serde_json::to_string(&report_with_hostile_names(&h)).unwrap();
        let (url, _) = serve_at(&format!("127.0.0.1:{}", 19710 + i), 200, body).await;
        let mut a = args(Path::new("-"), Path::new("-"));
        a.input = None;
        a.endpoints = None;
        a.agent = url;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_with(a, &mut out, &mut err).await;
        assert!(code != 2, "{}", String::from_utf8_lossy(&err));
        let yaml = String::from_utf8(out).unwrap();
        let docs = documents(&yaml);
        assert_eq!(docs.len(), 2, "{}", crate::text::escape_with_limit(&yaml, 4000));
        let web_name = docs[1]["metadata"]["name"].as_str().unwrap().to_owned();
        check_stream(
            &yaml,
            &[("CiliumClusterwideNetworkPolicy", "allow-observed-host-node-a"), ("CiliumNetworkPolicy", &web_name)],
        );
    }
}

#[test]
fn a_hostile_node_selector_value_is_refused_not_printed() {
    let r = report_with_hostile_names("web");
    let opts = SuggestOptions { node: Some("node-a\n---\nkind: X".into()), ..SuggestOptions::default() };
    let s = suggest(&r, Some("host"), &opts).unwrap();
    assert!(s[0].policy.is_none());
    let yaml = render(&s).unwrap();
    check_stream(&yaml, &[]);
    assert!(yaml.contains("node-a\\n---\\nkind: X"), "{yaml}");
}

#[tokio::test]
async fn json_output_carries_the_same_policies() {
    let capture = complete_capture();
    let endpoints = std::fs::read_to_string(lockout_fixture("lockout-endpoints.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (c, e) = (dir.path().join("capture.jsonl"), dir.path().join("endpoints.json"));
    std::fs::write(&c, &capture).unwrap();
    std::fs::write(&e, &endpoints).unwrap();
    let mut a = args(&c, &e);
    a.output = SuggestFormat::Json;
    a.output_file = Some(dir.path().join("out.json"));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(run_with(a, &mut out, &mut err).await, 0, "{}", String::from_utf8_lossy(&err));
    assert!(out.is_empty());
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("out.json")).unwrap()).unwrap();
    let kinds: Vec<&str> =
        v["suggestions"].as_array().unwrap().iter().filter_map(|s| s["policy"]["kind"].as_str()).collect();
    assert_eq!(kinds, ["CiliumClusterwideNetworkPolicy", "CiliumNetworkPolicy"]);
}
