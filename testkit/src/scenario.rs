//! Built-in traffic scenarios, written as the notifications Cilium's
//! datapath would emit for them, byte for byte (`NotificationBuilder`).
//! Played through the emitter (the real tap path) or the replay entry by
//! `verdict-scenario`, the demo, the tests and the benchmark.

use serde::{Deserialize, Serialize};
use verdict_common::cilium::{capture_hdr, drop_notify, notify_type, policy_verdict};

use verdict_agent::{
    cilium::identity,
    model::{DirectionPolicy, EndpointInfo, EndpointKind, FactSource},
};

/// Cilium release whose layout a notification uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Layout {
    /// v1.14–v1.18: 32-byte policy verdict, 40-byte drop (v1.17.4+).
    V1_18,
    /// v1.19+: 40-byte policy verdict with cookie, 48-byte drop.
    V1_19,
}

/// Builds one `policy_verdict_notify` field by field (`bpf/lib/policy_log.h`).
#[derive(Clone, Debug)]
pub struct PolicyVerdict {
    pub layout: Layout,
    pub endpoint: u16,
    pub remote_identity: u32,
    /// 0 allow, < 0 drop reason, > 0 proxy port.
    pub verdict: i32,
    pub dst_port: u16,
    pub proto: u8,
    /// 1 ingress, 2 egress.
    pub dir: u8,
    pub ipv6: bool,
    pub match_type: u8,
    pub audited: bool,
    pub packet_len: u32,
}

impl PolicyVerdict {
    pub fn encode(&self) -> Vec<u8> {
        let size = match self.layout {
            Layout::V1_18 => policy_verdict::SIZE_V1,
            Layout::V1_19 => policy_verdict::SIZE_V2,
        };
        let mut b = vec![0u8; size];
        b[capture_hdr::TYPE] = notify_type::POLICY_VERDICT;
        b[capture_hdr::SOURCE..][..2].copy_from_slice(&self.endpoint.to_ne_bytes());
        b[capture_hdr::LEN_ORIG..][..4].copy_from_slice(&self.packet_len.to_ne_bytes());
        b[capture_hdr::LEN_CAP..][..2].copy_from_slice(&(self.packet_len.min(128) as u16).to_ne_bytes());
        b[capture_hdr::VERSION] = policy_verdict::VERSION;
        b[policy_verdict::REMOTE_LABEL..][..4].copy_from_slice(&self.remote_identity.to_ne_bytes());
        b[policy_verdict::VERDICT..][..4].copy_from_slice(&self.verdict.to_ne_bytes());
        b[policy_verdict::DST_PORT..][..2].copy_from_slice(&self.dst_port.to_ne_bytes());
        b[policy_verdict::PROTO] = self.proto;
        b[policy_verdict::FLAGS] = (self.dir & policy_verdict::FLAG_DIR_MASK)
            | if self.ipv6 { policy_verdict::FLAG_IPV6 } else { 0 }
            | ((self.match_type << policy_verdict::FLAG_MATCH_TYPE_SHIFT) & policy_verdict::FLAG_MATCH_TYPE_MASK)
            | if self.audited { policy_verdict::FLAG_AUDITED } else { 0 };
        b
    }
}

/// Builds one `drop_notify` with a policy reason (`bpf/lib/drop.h`).
#[derive(Clone, Debug)]
pub struct PolicyDrop {
    pub layout: Layout,
    pub endpoint: u16,
    pub reason: u8,
    pub src_label: u32,
    pub dst_label: u32,
    /// The local endpoint's ID on ingress, 0 on egress.
    pub dst_id: u32,
    pub packet_len: u32,
}

impl PolicyDrop {
    pub fn encode(&self) -> Vec<u8> {
        let (size, version) = match self.layout {
            Layout::V1_18 => (drop_notify::SIZE_V1_17, 2u8),
            Layout::V1_19 => (drop_notify::SIZE_V1_19, 3u8),
        };
        let mut b = vec![0u8; size];
        b[capture_hdr::TYPE] = notify_type::DROP;
        b[capture_hdr::SUBTYPE] = self.reason;
        b[capture_hdr::SOURCE..][..2].copy_from_slice(&self.endpoint.to_ne_bytes());
        b[capture_hdr::LEN_ORIG..][..4].copy_from_slice(&self.packet_len.to_ne_bytes());
        b[capture_hdr::LEN_CAP..][..2].copy_from_slice(&(self.packet_len.min(128) as u16).to_ne_bytes());
        b[capture_hdr::VERSION] = version;
        b[drop_notify::SRC_LABEL..][..4].copy_from_slice(&self.src_label.to_ne_bytes());
        b[drop_notify::DST_LABEL..][..4].copy_from_slice(&self.dst_label.to_ne_bytes());
        b[drop_notify::DST_ID..][..4].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }
}

/// One step: a notification and how many times Cilium emits it.
#[derive(Clone, Debug)]
pub struct Step {
    pub notification: Vec<u8>,
    pub repeat: u32,
    pub what: String,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub steps: Vec<Step>,
    /// The endpoints the scenario's notifications come from, as Cilium's
    /// API would describe them.
    pub endpoints: Vec<EndpointInfo>,
}

impl Scenario {
    pub fn total_notifications(&self) -> u64 {
        self.steps.iter().map(|s| s.repeat as u64).sum()
    }
}

pub const DEMO_HOST_ENDPOINT: u16 = 1187;
pub const DEMO_CHECKOUT_ENDPOINT: u16 = 2211;
pub const DEMO_FRONTEND_ENDPOINT: u16 = 904;
/// A local CIDR identity for 10.20.0.0/16 (a private range outside the cluster).
pub const DEMO_PRIVATE_CIDR_IDENTITY: u32 = 16_777_217;
pub const DEMO_FRONTEND_IDENTITY: u32 = 48_213;
pub const DEMO_CHECKOUT_IDENTITY: u32 = 30_117;

/// kube-apiserver (reserved identity 7) -> the demo host endpoint on
/// 6443/tcp, ingress, match type none, in the v1.19 layout: audited in audit
/// mode, denied (`verdict` < 0) once enforcement cuts it. The flow an
/// enforcement trial must notice first.
pub fn api_server_to_host(verdict: i32, audited: bool) -> Vec<u8> {
    PolicyVerdict {
        layout: Layout::V1_19,
        endpoint: DEMO_HOST_ENDPOINT,
        remote_identity: 7,
        verdict,
        dst_port: 6443,
        proto: 6,
        dir: 1,
        ipv6: false,
        match_type: 0,
        audited,
        packet_len: 60,
    }
    .encode()
}

/// The rollout scenario of `cargo xtask demo`: the host endpoint in audit
/// mode with a host policy that allows SSH, VXLAN and health checks but
/// forgot the API server and the kubelet, receiving an internet port scan;
/// a pod whose egress to a private range is denied.
pub fn demo(layout: Layout) -> Scenario {
    let host = DEMO_HOST_ENDPOINT;
    let v = |remote: u32, port: u16, proto: u8, verdict: i32, audited: bool, dir: u8, repeat: u32, what: &str| Step {
        notification: PolicyVerdict {
            layout,
            endpoint: host,
            remote_identity: remote,
            verdict,
            dst_port: port,
            proto,
            dir,
            ipv6: false,
            match_type: if verdict == 0 && !audited { 2 } else { 0 },
            audited,
            packet_len: 74,
        }
        .encode(),
        repeat,
        what: what.into(),
    };
    let mut steps = vec![
        v(
            identity::KUBE_APISERVER,
            6443,
            6,
            0,
            true,
            1,
            40,
            "kube-apiserver -> host:6443/tcp (forgotten: would break)",
        ),
        v(identity::REMOTE_NODE, 6443, 6, 0, true, 1, 25, "remote-node -> host:6443/tcp (forgotten: would break)"),
        v(
            identity::REMOTE_NODE,
            10250,
            6,
            0,
            true,
            1,
            30,
            "remote-node -> host:10250/tcp kubelet (forgotten: would break)",
        ),
        v(identity::REMOTE_NODE, 8472, 17, 0, false, 1, 12, "remote-node -> host:8472/udp VXLAN (allowed)"),
        v(identity::HEALTH, 4240, 6, 0, false, 1, 20, "health -> host:4240/tcp (allowed)"),
        v(identity::WORLD, 22, 6, 0, false, 1, 6, "world -> host:22/tcp SSH (allowed)"),
    ];
    // An internet port scan: many ports, one or two probes each.
    for (i, port) in [21u16, 23, 25, 80, 110, 135, 139, 443, 445, 1433, 3306, 3389, 5900, 8080, 8443, 9200]
        .into_iter()
        .chain(30000..30064)
        .enumerate()
    {
        steps.push(v(identity::WORLD, port, 6, 0, true, 1, 1 + (i % 2) as u32, "world port scan (noise)"));
    }
    // checkout -> 10.20.0.0/16:5432 denied: a verdict and a drop per packet.
    steps.push(Step {
        notification: PolicyVerdict {
            layout,
            endpoint: DEMO_CHECKOUT_ENDPOINT,
            remote_identity: DEMO_PRIVATE_CIDR_IDENTITY,
            verdict: -133,
            dst_port: 5432,
            proto: 6,
            dir: 2,
            ipv6: false,
            match_type: 0,
            audited: false,
            packet_len: 74,
        }
        .encode(),
        repeat: 18,
        what: "checkout -> 10.20.0.0/16:5432/tcp (denied, per packet)".into(),
    });
    steps.push(Step {
        notification: PolicyDrop {
            layout,
            endpoint: DEMO_CHECKOUT_ENDPOINT,
            reason: 133,
            src_label: DEMO_CHECKOUT_IDENTITY,
            dst_label: DEMO_PRIVATE_CIDR_IDENTITY,
            dst_id: 0,
            packet_len: 74,
        }
        .encode(),
        repeat: 18,
        what: "checkout -> 10.20.0.0/16 drop notification (Policy denied)".into(),
    });
    // frontend -> checkout:8080 allowed, one per connection.
    steps.push(Step {
        notification: PolicyVerdict {
            layout,
            endpoint: DEMO_CHECKOUT_ENDPOINT,
            remote_identity: DEMO_FRONTEND_IDENTITY,
            verdict: 0,
            dst_port: 8080,
            proto: 6,
            dir: 1,
            ipv6: false,
            match_type: 2,
            audited: false,
            packet_len: 74,
        }
        .encode(),
        repeat: 55,
        what: "frontend -> checkout:8080/tcp (allowed)".into(),
    });

    let enforcing = Some(DirectionPolicy { enabled: true, audit: false });
    let auditing = Some(DirectionPolicy { enabled: true, audit: true });
    Scenario {
        name: "demo",
        steps,
        endpoints: vec![
            EndpointInfo {
                id: host,
                kind: EndpointKind::Host,
                identity: Some(identity::HOST),
                labels: vec!["reserved:host".into()],
                ingress: auditing,
                egress: Some(DirectionPolicy { enabled: false, audit: true }),
                policy_source: Some(FactSource::CiliumApi),
                ..Default::default()
            },
            EndpointInfo {
                id: DEMO_CHECKOUT_ENDPOINT,
                kind: EndpointKind::Pod,
                namespace: Some("shop".into()),
                pod: Some("checkout-7d9f8b6c5-x2lqp".into()),
                workload: Some("Deployment/checkout".into()),
                identity: Some(DEMO_CHECKOUT_IDENTITY),
                labels: vec!["k8s:app=checkout".into(), "k8s:io.kubernetes.pod.namespace=shop".into()],
                ingress: enforcing,
                egress: enforcing,
                policy_source: Some(FactSource::CiliumApi),
            },
            EndpointInfo {
                id: DEMO_FRONTEND_ENDPOINT,
                kind: EndpointKind::Pod,
                namespace: Some("shop".into()),
                pod: Some("frontend-5c6d7f8-q9zk1".into()),
                workload: Some("Deployment/frontend".into()),
                identity: Some(DEMO_FRONTEND_IDENTITY),
                labels: vec!["k8s:app=frontend".into(), "k8s:io.kubernetes.pod.namespace=shop".into()],
                ingress: Some(DirectionPolicy { enabled: false, audit: false }),
                egress: Some(DirectionPolicy { enabled: false, audit: false }),
                policy_source: Some(FactSource::CiliumApi),
            },
        ],
    }
}

/// The scenario's endpoints as `cilium endpoint list -o json` prints them
/// (`Endpoint` model of `api/v1/openapi.yaml`), so demos and tests feed the
/// agent through the same parser as real output.
pub fn cilium_endpoint_list(endpoints: &[EndpointInfo]) -> serde_json::Value {
    let enabled = |e: &EndpointInfo| {
        let dir = |p: Option<DirectionPolicy>| p.is_some_and(|p| p.enabled);
        let audit = [e.ingress, e.egress].iter().any(|p| p.is_some_and(|p| p.audit));
        let word = match (dir(e.ingress), dir(e.egress)) {
            (true, true) => "both",
            (true, false) => "ingress",
            (false, true) => "egress",
            (false, false) => "none",
        };
        if audit && word != "none" { format!("audit-{word}") } else { word.to_string() }
    };
    let list: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|e| {
            let audit = if [e.ingress, e.egress].iter().any(|p| p.is_some_and(|p| p.audit)) { "Enabled" } else { "Disabled" };
            let options = serde_json::json!({ "PolicyAuditMode": audit, "PolicyVerdictNotification": "Enabled" });
            let mut ids = serde_json::json!({});
            if let (Some(ns), Some(pod)) = (&e.namespace, &e.pod) {
                ids = serde_json::json!({ "k8s-namespace": ns, "k8s-pod-name": pod, "pod-name": format!("{ns}/{pod}") });
            }
            let policy = serde_json::json!({ "policy-enabled": enabled(e) });
            serde_json::json!({
                "id": e.id,
                "spec": { "options": options },
                "status": {
                    "identity": { "id": e.identity.unwrap_or(0), "labels": e.labels },
                    "labels": { "security-relevant": e.labels, "derived": [], "disabled": [], "realized": { "user": [] } },
                    "external-identifiers": ids,
                    "realized": { "options": options },
                    "policy": { "spec": policy, "realized": policy },
                    "state": "ready",
                }
            })
        })
        .collect();
    serde_json::Value::Array(list)
}
