//! Test support shared by the readiness, suggest, analyze and preflight
//! tests: a fake directory, flow builders, and the lockout scenario, whose
//! verdicts come from a small policy model (so that replaying it with the
//! suggested policies applied is a real check, not a restatement).

pub mod policy_model;
pub mod schema;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_crds_cilium::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy};

use self::policy_model::{Peer, Policy, Subject};
use crate::model::{
    Direction, DirectionPolicy, EndpointDirectory, EndpointInfo, EndpointKind, FactSource, FlowRecord,
    HostPolicyCoverage, NotifySource, Verdict,
};

/// 2026-11-22T12:00:00Z: "now" in every scenario.
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_348_800)
}

pub fn ago(secs: u64) -> SystemTime {
    now() - Duration::from_secs(secs)
}

pub const NODE: &str = "node-a";
pub const HOST: u16 = 227;
pub const WEB: u16 = 1001;
pub const API: u16 = 1002;
pub const QUIET: u16 = 1003;
/// Identity of the `frontend` pods that call web.
pub const FRONTEND_ID: u32 = 48_213;
pub const KUBE_DNS_ID: u32 = 102;
pub const WEB_ID: u32 = 51_001;

#[derive(Clone, Debug, Default)]
pub struct FakeDirectory {
    pub endpoints: Vec<EndpointInfo>,
    pub identities: HashMap<u32, Vec<String>>,
    pub coverage: Option<HostPolicyCoverage>,
}

impl EndpointDirectory for FakeDirectory {
    fn endpoint(&self, id: u16) -> Option<EndpointInfo> {
        self.endpoints.iter().find(|e| e.id == id).cloned()
    }
    fn endpoints(&self) -> Vec<EndpointInfo> {
        self.endpoints.clone()
    }
    fn identity_labels(&self, identity: u32) -> Option<Vec<String>> {
        self.identities.get(&identity).cloned()
    }
    fn host_policy_coverage(&self) -> Option<HostPolicyCoverage> {
        self.coverage.clone()
    }
}

pub fn dp(enabled: bool, audit: bool) -> Option<DirectionPolicy> {
    Some(DirectionPolicy { enabled, audit })
}

pub fn pod_labels(ns: &str, app: &str) -> Vec<String> {
    vec![
        format!("k8s:app={app}"),
        format!("k8s:io.kubernetes.pod.namespace={ns}"),
        "k8s:io.cilium.k8s.policy.serviceaccount=default".into(),
        "k8s:io.cilium.k8s.policy.cluster=default".into(),
    ]
}

pub fn host_info(audit: bool) -> EndpointInfo {
    EndpointInfo {
        id: HOST,
        kind: EndpointKind::Host,
        identity: Some(1),
        labels: vec!["reserved:host".into(), format!("k8s:kubernetes.io/hostname={NODE}")],
        ingress: dp(true, audit),
        egress: dp(false, audit),
        policy_source: Some(FactSource::CiliumApi),
        ..EndpointInfo::default()
    }
}

pub fn pod_info(
    id: u16,
    ns: &str,
    pod: &str,
    app: &str,
    identity: u32,
    ingress: Option<DirectionPolicy>,
    egress: Option<DirectionPolicy>,
) -> EndpointInfo {
    EndpointInfo {
        id,
        kind: EndpointKind::Pod,
        namespace: Some(ns.into()),
        pod: Some(pod.into()),
        workload: Some(format!("Deployment/{app}")),
        identity: Some(identity),
        labels: pod_labels(ns, app),
        ingress,
        egress,
        policy_source: Some(FactSource::CiliumApi),
    }
}

/// A flow record as the kernel path produces it (no addresses).
#[allow(clippy::too_many_arguments)]
pub fn flow(
    endpoint: u16,
    dir: Direction,
    remote: u32,
    proto: u8,
    port: u16,
    verdict: Verdict,
    n: u64,
    first: SystemTime,
    last: SystemTime,
) -> FlowRecord {
    FlowRecord {
        endpoint_id: endpoint,
        direction: dir,
        remote_identity: remote,
        proto,
        dst_port: port,
        verdict,
        match_type: if verdict == Verdict::Allowed { 2 } else { 0 },
        source: NotifySource::PolicyVerdict,
        reason: if verdict == Verdict::Denied { 133 } else { 0 },
        ipv6: false,
        notifications: n,
        bytes: 60 * n,
        first_seen: first,
        last_seen: last,
        remote_addrs: BTreeSet::new(),
        port_aggregate: None,
    }
}

/// Traffic the scenario sends; the policy model decides its verdict.
#[derive(Clone, Debug)]
pub struct Traffic {
    pub endpoint: u16,
    pub direction: Direction,
    pub remote_identity: u32,
    pub proto: u8,
    /// What the notification reports as port (0 for ICMP).
    pub port: u16,
    /// The packet's ICMP type, which the notification does not carry.
    pub icmp_type: Option<u8>,
    pub notifications: u64,
    pub first: SystemTime,
    pub last: SystemTime,
    pub addrs: Vec<IpAddr>,
    /// Part of the port scan (never to be suggested).
    pub scan: bool,
}

impl Traffic {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        endpoint: u16,
        direction: Direction,
        remote_identity: u32,
        proto: u8,
        port: u16,
        n: u64,
        first: SystemTime,
        last: SystemTime,
    ) -> Traffic {
        Traffic {
            endpoint,
            direction,
            remote_identity,
            proto,
            port,
            icmp_type: None,
            notifications: n,
            first,
            last,
            addrs: Vec::new(),
            scan: false,
        }
    }
}

/// The lockout scenario of the issue, with a pod that would lose egress to
/// a private range, an enforcing pod, and a quiet pod.
pub struct Scenario {
    pub directory: FakeDirectory,
    pub traffic: Vec<Traffic>,
    pub policies: Vec<Policy>,
    pub observed_since: SystemTime,
}

/// The ports the world scanner probes (22 among them: it is also SSH).
pub fn scan_ports() -> Vec<u16> {
    vec![21, 22, 23, 25, 80, 110, 135, 139, 143, 443, 445, 993, 995, 1433, 1723, 3306, 3389, 5900, 8080, 8443]
}

const HOST_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: host-baseline
spec:
  nodeSelector:
    matchLabels:
      kubernetes.io/hostname: node-a
  ingress:
  - fromEntities: [kube-apiserver]
    toPorts:
    - ports:
      - {port: "6443", protocol: TCP}
  - fromEntities: [remote-node]
    toPorts:
    - ports:
      - {port: "8472", protocol: UDP}
"#;

const WEB_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web
  namespace: shop
spec:
  endpointSelector:
    matchLabels:
      k8s:app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        k8s:app: frontend
    toPorts:
    - ports:
      - {port: "8080", protocol: TCP}
  egress:
  - toEndpoints:
    - matchLabels:
        k8s:io.kubernetes.pod.namespace: kube-system
        k8s:k8s-app: kube-dns
    toPorts:
    - ports:
      - {port: "53", protocol: UDP}
"#;

const API_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api
  namespace: shop
spec:
  endpointSelector:
    matchLabels:
      k8s:app: api
  egress:
  - toEndpoints:
    - matchLabels:
        k8s:io.kubernetes.pod.namespace: kube-system
        k8s:k8s-app: kube-dns
    toPorts:
    - ports:
      - {port: "53", protocol: UDP}
"#;

pub fn parse_ccnp(yaml: &str) -> CiliumClusterwideNetworkPolicy {
    serde_yaml::from_str(yaml).expect("scenario CCNP parses")
}

pub fn parse_cnp(yaml: &str) -> CiliumNetworkPolicy {
    serde_yaml::from_str(yaml).expect("scenario CNP parses")
}

impl Scenario {
    pub fn lockout() -> Scenario {
        use Direction::*;
        let mut identities = HashMap::new();
        identities.insert(FRONTEND_ID, pod_labels("shop", "frontend"));
        identities.insert(
            KUBE_DNS_ID,
            vec![
                "k8s:k8s-app=kube-dns".to_owned(),
                "k8s:io.kubernetes.pod.namespace=kube-system".into(),
                "k8s:io.cilium.k8s.policy.serviceaccount=coredns".into(),
            ],
        );
        identities.insert(WEB_ID, pod_labels("shop", "web"));
        let directory = FakeDirectory {
            endpoints: vec![
                host_info(true),
                pod_info(WEB, "shop", "web-7d9f", "web", WEB_ID, dp(true, true), dp(true, true)),
                pod_info(API, "shop", "api-5c4b", "api", 51_002, dp(false, false), dp(true, false)),
                pod_info(QUIET, "shop", "quiet-0", "quiet", 51_003, dp(true, true), dp(false, true)),
            ],
            identities,
            coverage: Some(HostPolicyCoverage {
                selecting: vec!["host-baseline".into()],
                selecting_no_node: vec!["host-control-plane".into()],
                source: FactSource::Kubernetes,
            }),
        };
        let mut traffic = vec![
            Traffic::new(HOST, Ingress, 7, 6, 6443, 340, ago(30 * 3600), ago(20)),
            Traffic::new(HOST, Ingress, 6, 6, 10250, 42, ago(30 * 3600), ago(60)),
            Traffic::new(HOST, Ingress, 6, 17, 8472, 9, ago(30 * 3600), ago(5)),
            Traffic::new(HOST, Ingress, 4, 6, 4240, 120, ago(30 * 3600), ago(30)),
            Traffic { icmp_type: Some(8), ..Traffic::new(HOST, Ingress, 4, 1, 0, 118, ago(30 * 3600), ago(30)) },
            // The operator's SSH sessions (the scan adds one probe below).
            Traffic {
                addrs: vec!["203.0.113.10".parse().unwrap()],
                ..Traffic::new(HOST, Ingress, 2, 6, 22, 6, ago(6 * 3600), ago(300))
            },
            // web: frontend calls it (allowed), it resolves names (allowed),
            // and it talks to a database in a private range outside the
            // cluster, which its policy forgot.
            Traffic::new(WEB, Ingress, FRONTEND_ID, 6, 8080, 5000, ago(30 * 3600), ago(2)),
            Traffic::new(WEB, Egress, KUBE_DNS_ID, 17, 53, 800, ago(30 * 3600), ago(3)),
            Traffic {
                addrs: vec!["10.20.30.40".parse().unwrap()],
                ..Traffic::new(WEB, Egress, 2, 6, 5432, 77, ago(29 * 3600), ago(40))
            },
            // api enforces egress: its calls to a private range are denied.
            Traffic::new(API, Egress, KUBE_DNS_ID, 17, 53, 300, ago(30 * 3600), ago(8)),
            Traffic {
                addrs: vec!["192.168.7.9".parse().unwrap()],
                ..Traffic::new(API, Egress, 2, 6, 443, 25, ago(3600), ago(100))
            },
        ];
        for p in scan_ports() {
            let mut t = Traffic::new(HOST, Ingress, 9, 6, p, 1, ago(400), ago(400));
            t.scan = p != 22;
            t.addrs = vec!["198.51.100.66".parse().unwrap()];
            traffic.push(t);
        }
        Scenario {
            directory,
            traffic,
            policies: vec![
                Policy::Clusterwide(parse_ccnp(HOST_POLICY)),
                Policy::Namespaced(parse_cnp(WEB_POLICY)),
                Policy::Namespaced(parse_cnp(API_POLICY)),
            ],
            observed_since: ago(48 * 3600),
        }
    }

    pub fn subject(&self, endpoint: u16) -> Subject {
        let info = self.directory.endpoint(endpoint).expect("scenario endpoint");
        let node_labels: BTreeMap<String, String> = [("kubernetes.io/hostname".to_owned(), NODE.to_owned())].into();
        Subject {
            labels: info.labels.clone(),
            namespace: info.namespace.clone(),
            is_host: info.kind == EndpointKind::Host,
            node_labels,
        }
    }

    pub fn peer(&self, t: &Traffic) -> Peer {
        Peer {
            identity: t.remote_identity,
            labels: self.directory.identities.get(&t.remote_identity).cloned().unwrap_or_default(),
            addrs: t.addrs.clone(),
        }
    }

    /// Whether `policies` let this traffic through.
    pub fn allowed(&self, t: &Traffic, policies: &[Policy]) -> bool {
        policy_model::allows(
            policies,
            &self.subject(t.endpoint),
            t.direction,
            &self.peer(t),
            t.proto,
            t.port,
            t.icmp_type,
        )
    }

    /// The flows the kernel path would count: allowed where the model
    /// allows, else audited (audit mode) or denied (enforcing). The scan's
    /// probe of port 22 lands on the same flow as the SSH sessions.
    pub fn flows(&self, policies: &[Policy], with_addrs: bool) -> Vec<FlowRecord> {
        let mut out: BTreeMap<super::FlowKey, FlowRecord> = BTreeMap::new();
        for t in &self.traffic {
            let info = self.directory.endpoint(t.endpoint).expect("scenario endpoint");
            let audit = match t.direction {
                Direction::Ingress => info.ingress,
                Direction::Egress => info.egress,
            }
            .is_some_and(|p| p.audit);
            let verdict = if self.allowed(t, policies) {
                Verdict::Allowed
            } else if audit {
                Verdict::Audited
            } else {
                Verdict::Denied
            };
            let mut f = flow(
                t.endpoint,
                t.direction,
                t.remote_identity,
                t.proto,
                t.port,
                verdict,
                t.notifications,
                t.first,
                t.last,
            );
            if with_addrs {
                f.remote_addrs = t.addrs.iter().copied().collect();
            }
            let key = super::FlowKey::from(&f);
            match out.get_mut(&key) {
                Some(e) => {
                    e.notifications += f.notifications;
                    e.first_seen = e.first_seen.min(f.first_seen);
                    e.last_seen = e.last_seen.max(f.last_seen);
                    e.remote_addrs.extend(f.remote_addrs);
                }
                None => {
                    out.insert(key, f);
                }
            }
        }
        out.into_values().collect()
    }
}

/// A stand-in for the agent's HTTP server: one fixed answer to every
/// request; the request lines are recorded.
pub async fn serve(status: u16, body: String) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    serve_at("127.0.0.1:0", status, body).await
}

/// [`serve`] on a given loopback address (tests that must stay in a port range).
pub async fn serve_at(
    addr: &str,
    status: u16,
    body: String,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            let req = String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_owned();
            log.lock().unwrap().push(req);
            let resp = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
    });
    (url, seen)
}
