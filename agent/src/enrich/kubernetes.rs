//! Kubernetes source: watch + cache of this node's CiliumEndpoints, every
//! CiliumIdentity, node labels, this node's pods (for owners) and the
//! host policies among CiliumClusterwideNetworkPolicies.
//!
//! Objects are reduced to the few fields enrichment reads as they arrive,
//! so the caches stay small; the resource types below deserialize only
//! those fields, which also keeps a schema change elsewhere in an object
//! from breaking the watch.
//!
//! Why not the `k8s-crds-cilium` types: its CiliumEndpoint and
//! CiliumIdentity modules carry no root type (neither CRD has a `spec`, so
//! kopium emitted only the status structs), and its CiliumClusterwideNetworkPolicy
//! requires `spec` and has no `specs`, so a policy written with `specs:`
//! alone fails to parse and its host rules would be invisible.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    path::Path,
    sync::Arc,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Client, Resource,
    core::{ClusterResourceScope, NamespaceResourceScope, PartialObjectMeta},
    runtime::watcher::{self, Event},
};
use serde::{Deserialize, de::DeserializeOwned};

use crate::cilium::endpoint_list::EndpointIdentifiers;

use super::{Shared, backoff::Backoff};

/// A failure to reach or configure the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}; pass a readable file to --kubeconfig")]
    Kubeconfig { path: String, source: kube::config::KubeconfigError },
    #[error(
        "no Kubernetes client configuration: {0}; run in a pod with a service account token, \
         set KUBECONFIG, or pass --kubeconfig"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error(
        "building the Kubernetes client for {url} failed: {message}; the rustls build of kube needs a \
         crypto provider (kube feature `ring` or `aws-lc-rs`) for https API servers"
    )]
    Tls { url: String, message: String },
}

/// Loads the client configuration from `kubeconfig`, else infers it
/// (KUBECONFIG, ~/.kube/config, then the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|source| KubeError::Kubeconfig { path: path.display().to_string(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig { path: path.display().to_string(), source })?
        }
        None => kube::Config::infer().await?,
    };
    client_from_config(config)
}

/// A client for `config`. Plain-http servers (a `kubectl proxy`, the test
/// fake) get a connector without TLS; https goes through kube's rustls
/// stack.
pub fn client_from_config(config: kube::Config) -> Result<Client, KubeError> {
    use kube::client::{ClientBuilder, ConfigExt};

    if config.cluster_url.scheme_str() == Some("http") {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        // Credentials are never sent in clear text: a plain-http server is
        // a local proxy that authenticates on our behalf, or a test.
        if config.auth_layer()?.is_some() {
            tracing::warn!(url = %config.cluster_url, "not sending Kubernetes credentials over plain http");
        }
        return Ok(ClientBuilder::new(http, config.default_namespace.clone())
            .with_layer(&config.base_uri_layer())
            .build());
    }
    let url = config.cluster_url.to_string();
    // kube's rustls stack panics when no crypto provider is compiled in;
    // that must be an error the operator can read, not a crashed agent.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Client::try_from(config))) {
        Ok(r) => Ok(r?),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic while building the TLS stack".to_owned());
            let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
            Err(KubeError::Tls { url, message })
        }
    }
}

// ---- Resource types (only the fields enrichment reads) ----

/// `cilium.io/v2` CiliumEndpoint.
#[derive(Clone, Debug, Deserialize)]
pub struct CiliumEndpoint {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<CepStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CepStatus {
    pub id: Option<i64>,
    pub identity: Option<CepIdentity>,
    pub external_identifiers: Option<EndpointIdentifiers>,
    pub networking: Option<CepNetworking>,
    pub policy: Option<CepPolicy>,
    pub state: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CepIdentity {
    pub id: Option<i64>,
    pub labels: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CepNetworking {
    /// The node's IP (not its name), as Cilium writes it.
    pub node: Option<String>,
}

/// Filled only with `--endpoint-status=policy` (off by default).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CepPolicy {
    pub ingress: Option<CepPolicyDirection>,
    pub egress: Option<CepPolicyDirection>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CepPolicyDirection {
    pub enforcing: Option<bool>,
}

/// `cilium.io/v2` CiliumIdentity: the name is the numeric identity.
#[derive(Clone, Debug, Deserialize)]
pub struct CiliumIdentity {
    pub metadata: ObjectMeta,
    #[serde(default, rename = "security-labels")]
    pub security_labels: BTreeMap<String, String>,
}

/// `cilium.io/v2` CiliumClusterwideNetworkPolicy, reduced to node selectors.
#[derive(Clone, Debug, Deserialize)]
pub struct CiliumClusterwideNetworkPolicy {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<RuleSelectors>,
    #[serde(default)]
    pub specs: Option<Vec<RuleSelectors>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct RuleSelectors {
    #[serde(default, rename = "nodeSelector")]
    pub node_selector: Option<LabelSelector>,
}

macro_rules! cilium_resource {
    ($ty:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                "cilium.io".into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                "v2".into()
            }
            fn api_version(_: &()) -> Cow<'_, str> {
                "cilium.io/v2".into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

cilium_resource!(CiliumEndpoint, "CiliumEndpoint", "ciliumendpoints", NamespaceResourceScope);
cilium_resource!(CiliumIdentity, "CiliumIdentity", "ciliumidentities", ClusterResourceScope);
cilium_resource!(
    CiliumClusterwideNetworkPolicy,
    "CiliumClusterwideNetworkPolicy",
    "ciliumclusterwidenetworkpolicies",
    ClusterResourceScope
);

// ---- Cached, reduced state ----

/// One CiliumEndpoint, as much as enrichment needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CepEntry {
    pub id: u16,
    pub namespace: String,
    pub pod: String,
    /// `status.networking.node`: the node IP the endpoint lives on.
    pub node: Option<String>,
    pub identity: Option<u32>,
    pub identity_labels: Vec<String>,
    pub ingress_enforcing: Option<bool>,
    pub egress_enforcing: Option<bool>,
}

/// What the pod metadata watch keeps of one pod of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PodMeta {
    pub workload: Option<String>,
    pub uid: Option<String>,
}

/// This node's Node object, as much as enrichment needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct OwnNode {
    /// Addresses other than the hostname.
    pub addresses: Vec<String>,
    pub uid: Option<String>,
}

/// Everything the watches have cached. Each map is replaced wholesale when
/// its watch relists, so objects deleted while disconnected disappear.
#[derive(Debug, Default)]
pub(crate) struct KubeState {
    /// Key "namespace/name". Every node's endpoints: filtering happens when
    /// the directory is built, because this node's addresses may arrive
    /// after its endpoints.
    pub ceps: HashMap<String, CepEntry>,
    /// Key: the numeric identity as text (the object name).
    pub identities: HashMap<String, Vec<String>>,
    /// Labels of every node, key node name.
    pub nodes: HashMap<String, BTreeMap<String, String>>,
    /// Addresses of this node (key: node name; at most one entry).
    pub own_node: HashMap<String, OwnNode>,
    /// Owner workload per pod of this node, key "namespace/name".
    pub pods: HashMap<String, PodMeta>,
    /// Host policies: CCNP name to its node selectors (spec and specs[]).
    pub host_policies: HashMap<String, Vec<LabelSelector>>,
    /// The `kubernetes` Service's EndpointSlices in `default`, by slice name.
    pub api_server: HashMap<String, ApiServerSlice>,
    /// Watches whose initial list completed.
    pub synced: HashMap<&'static str, bool>,
}

/// One port the API server serves on, as the `kubernetes` Service's
/// EndpointSlice publishes it: the port on the API server's own hosts
/// (6443 on kubeadm, 8443 on minikube, 443 on many managed offerings),
/// not the Service's port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ApiServerPort {
    pub port: u16,
    /// `TCP` unless the slice says otherwise.
    pub protocol: String,
    /// The slice's port name (`https`), when it has one.
    pub name: Option<String>,
}

/// What one EndpointSlice of the `kubernetes` Service says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiServerSlice {
    pub ports: Vec<ApiServerPort>,
    /// Addresses of the endpoints not marked unready.
    pub addresses: Vec<String>,
}

impl KubeState {
    pub fn is_synced(&self, watch: &str) -> bool {
        self.synced.get(watch).copied().unwrap_or(false)
    }
}

pub(crate) const W_CEP: &str = "ciliumendpoints";
pub(crate) const W_IDENTITY: &str = "ciliumidentities";
pub(crate) const W_NODES: &str = "nodes";
pub(crate) const W_OWN_NODE: &str = "node";
pub(crate) const W_PODS: &str = "pods";
pub(crate) const W_CCNP: &str = "ciliumclusterwidenetworkpolicies";
pub(crate) const W_API_SERVER: &str = "endpointslices";

/// The Service every cluster has for its API server, and the label
/// EndpointSlices carry to name their Service.
pub(crate) const API_SERVER_NAMESPACE: &str = "default";
pub(crate) const API_SERVER_SELECTOR: &str = "kubernetes.io/service-name=kubernetes";

fn ns_name(meta: &ObjectMeta) -> Option<String> {
    Some(format!("{}/{}", meta.namespace.as_deref()?, meta.name.as_deref()?))
}

/// A watched object's cache key, and its reduced value when it has one
/// worth caching.
type Converted<V> = Option<(String, Option<V>)>;

fn cep_entry(cep: &CiliumEndpoint) -> Converted<CepEntry> {
    let key = ns_name(&cep.metadata)?;
    Some((key, cep_value(cep)))
}

fn cep_value(cep: &CiliumEndpoint) -> Option<CepEntry> {
    let status = cep.status.as_ref()?;
    let id = u16::try_from(status.id?).ok()?;
    let ids = status.external_identifiers.as_ref();
    let namespace = ids
        .and_then(|i| i.k8s_namespace.clone())
        .filter(|s| !s.is_empty())
        .or_else(|| cep.metadata.namespace.clone())?;
    // The CiliumEndpoint is named after its pod.
    let pod =
        ids.and_then(|i| i.k8s_pod_name.clone()).filter(|s| !s.is_empty()).or_else(|| cep.metadata.name.clone())?;
    let identity = status.identity.as_ref();
    let mut identity_labels = identity.and_then(|i| i.labels.clone()).unwrap_or_default();
    identity_labels.sort();
    let policy = status.policy.as_ref();
    Some(CepEntry {
        id,
        namespace,
        pod,
        node: status.networking.as_ref().and_then(|n| n.node.clone()),
        identity: identity.and_then(|i| i.id).and_then(|i| u32::try_from(i).ok()),
        identity_labels,
        ingress_enforcing: policy.and_then(|p| p.ingress.as_ref()).and_then(|d| d.enforcing),
        egress_enforcing: policy.and_then(|p| p.egress.as_ref()).and_then(|d| d.enforcing),
    })
}

/// "source:key=value" as Cilium prints a label; no "=" when the value is empty.
fn cilium_label(key: &str, value: &str) -> String {
    if value.is_empty() { key.to_owned() } else { format!("{key}={value}") }
}

fn identity_entry(id: &CiliumIdentity) -> Converted<Vec<String>> {
    let name = id.metadata.name.clone()?;
    // Names that are not numbers are not identities Cilium allocated.
    if name.parse::<u32>().is_err() {
        return Some((name, None));
    }
    let labels = id.security_labels.iter().map(|(k, v)| cilium_label(k, v)).collect();
    Some((name, Some(labels)))
}

fn node_labels(node: &PartialObjectMeta<Node>) -> Converted<BTreeMap<String, String>> {
    Some((node.metadata.name.clone()?, Some(node.metadata.labels.clone().unwrap_or_default())))
}

fn own_node(node: &Node) -> Converted<OwnNode> {
    let name = node.metadata.name.clone()?;
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| a.iter().filter(|a| a.type_ != "Hostname").map(|a| a.address.clone()).collect())
        .unwrap_or_default();
    Some((name, Some(OwnNode { addresses, uid: node.metadata.uid.clone() })))
}

fn pod_meta(pod: &PartialObjectMeta<Pod>) -> Converted<PodMeta> {
    let key = ns_name(&pod.metadata)?;
    Some((key, Some(PodMeta { workload: workload_of(&pod.metadata), uid: pod.metadata.uid.clone() })))
}

/// The workload owning a pod, the way Cilium's `GetWorkloadMetaFromPod`
/// names it: a ReplicaSet with a pod-template-hash is its Deployment, a
/// Job named `<cronjob>-<schedule-number>` is its CronJob.
pub(crate) fn workload_of(meta: &ObjectMeta) -> Option<String> {
    let owner = meta.owner_references.as_ref()?.iter().find(|o| o.controller == Some(true))?;
    let name = owner.name.as_str();
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = meta.labels.as_ref().and_then(|l| l.get("pod-template-hash"));
            match hash.and_then(|h| name.strip_suffix(h.as_str())).and_then(|n| n.strip_suffix('-')) {
                Some(deployment) if !deployment.is_empty() => Some(format!("Deployment/{deployment}")),
                _ => Some(format!("ReplicaSet/{name}")),
            }
        }
        "Job" => match name.rsplit_once('-') {
            Some((cronjob, n)) if !cronjob.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                Some(format!("CronJob/{cronjob}"))
            }
            _ => Some(format!("Job/{name}")),
        },
        kind => Some(format!("{kind}/{name}")),
    }
}

fn api_server_slice(slice: &EndpointSlice) -> Converted<ApiServerSlice> {
    let name = slice.metadata.name.clone()?;
    let mut ports: Vec<ApiServerPort> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(ApiServerPort {
                port: u16::try_from(p.port?).ok().filter(|p| *p != 0)?,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                name: p.name.clone().filter(|n| !n.is_empty()),
            })
        })
        .collect();
    ports.sort();
    ports.dedup();
    // `ready` unset means ready (discovery.k8s.io/v1 EndpointConditions).
    let mut addresses: Vec<String> = slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    addresses.sort();
    addresses.dedup();
    Some((name, Some(ApiServerSlice { ports, addresses })))
}

/// The API server's ports from every slice, once the watch has listed.
pub(crate) fn api_server_ports(state: &KubeState) -> Option<Vec<ApiServerPort>> {
    if !state.is_synced(W_API_SERVER) {
        return None;
    }
    let mut ports: Vec<ApiServerPort> = state.api_server.values().flat_map(|s| s.ports.iter().cloned()).collect();
    ports.sort();
    ports.dedup();
    // A Service without ports says nothing about where the API server is.
    (!ports.is_empty()).then_some(ports)
}

/// The API server's ready addresses from every slice, once listed.
pub(crate) fn api_server_addresses(state: &KubeState) -> Option<Vec<String>> {
    if !state.is_synced(W_API_SERVER) {
        return None;
    }
    let mut addresses: Vec<String> = state.api_server.values().flat_map(|s| s.addresses.iter().cloned()).collect();
    addresses.sort();
    addresses.dedup();
    (!addresses.is_empty()).then_some(addresses)
}

fn host_policy(p: &CiliumClusterwideNetworkPolicy) -> Converted<Vec<LabelSelector>> {
    let name = p.metadata.name.clone()?;
    let selectors: Vec<LabelSelector> =
        p.spec.iter().chain(p.specs.iter().flatten()).filter_map(|r| r.node_selector.clone()).collect();
    // Policies without a node selector select endpoints, not hosts: not
    // kept, so the cache holds host policies only.
    Some((name, (!selectors.is_empty()).then_some(selectors)))
}

// ---- Label selectors ----

/// Cilium accepts selector keys with a label source ("k8s:", "any:");
/// node labels come from Kubernetes, so either matches the bare key.
fn selector_key(key: &str) -> &str {
    key.strip_prefix("k8s:").or_else(|| key.strip_prefix("any:")).unwrap_or(key)
}

/// Kubernetes label selector semantics; an empty selector matches every
/// node. An unknown operator matches nothing, as the API server would have
/// rejected it.
pub(crate) fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let get = |k: &str| labels.get(selector_key(k));
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| get(k) == Some(v));
    labels_ok
        && selector.match_expressions.iter().flatten().all(|req| {
            let values = req.values.as_deref().unwrap_or_default();
            let value = get(&req.key);
            match req.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Host policy coverage of `node`, when the policies and node labels are
/// both known.
pub(crate) fn host_policy_coverage(state: &KubeState, node: &str) -> Option<crate::model::HostPolicyCoverage> {
    if !state.is_synced(W_CCNP) || !state.is_synced(W_NODES) {
        return None;
    }
    let own = state.nodes.get(node)?;
    let matches_node =
        |sels: &[LabelSelector], labels: &BTreeMap<String, String>| sels.iter().any(|s| selector_matches(s, labels));
    let mut selecting = Vec::new();
    let mut selecting_no_node = Vec::new();
    for (name, sels) in &state.host_policies {
        if matches_node(sels, own) {
            selecting.push(name.clone());
        } else if !state.nodes.values().any(|labels| matches_node(sels, labels)) {
            selecting_no_node.push(name.clone());
        }
    }
    selecting.sort();
    selecting_no_node.sort();
    Some(crate::model::HostPolicyCoverage {
        selecting,
        selecting_no_node,
        source: crate::model::FactSource::Kubernetes,
    })
}

// ---- Watches ----

/// Which map of [`KubeState`] a watch fills.
type Slot<V> = fn(&mut KubeState) -> &mut HashMap<String, V>;

/// Starts every watch on `client`. Without a node name only identities can
/// be trusted: endpoint IDs are node-local, and the node is what selects
/// host policies.
pub(crate) fn spawn_watches(shared: &Arc<Shared>, client: Client, node_name: Option<&str>) {
    let cfg = watcher::Config::default;
    spawn_watch(shared, W_IDENTITY, Api::<CiliumIdentity>::all(client.clone()), cfg(), identity_entry, |s| {
        &mut s.identities
    });
    spawn_watch(shared, W_CCNP, Api::<CiliumClusterwideNetworkPolicy>::all(client.clone()), cfg(), host_policy, |s| {
        &mut s.host_policies
    });
    // Where the API server listens: the readiness catalogue's critical
    // ports. Its EndpointSlices in `default` (RBAC: a Role there).
    spawn_watch(
        shared,
        W_API_SERVER,
        Api::<EndpointSlice>::namespaced(client.clone(), API_SERVER_NAMESPACE),
        cfg().labels(API_SERVER_SELECTOR),
        api_server_slice,
        |s| &mut s.api_server,
    );
    let Some(node) = node_name else {
        tracing::warn!(
            "no node name (--node-name / NODE_NAME): Kubernetes enrichment is limited to identity labels; \
             endpoints and host policy coverage need the node"
        );
        return;
    };
    // Node metadata only: labels of every node are all host policy
    // selection needs, and full Node objects carry image lists and
    // heartbeats.
    spawn_watch(shared, W_NODES, Api::<PartialObjectMeta<Node>>::all(client.clone()), cfg(), node_labels, |s| {
        &mut s.nodes
    });
    spawn_watch(
        shared,
        W_OWN_NODE,
        Api::<Node>::all(client.clone()),
        cfg().fields(&format!("metadata.name={node}")),
        own_node,
        |s| &mut s.own_node,
    );
    // Pod metadata (owners and labels), of this node's pods only.
    spawn_watch(
        shared,
        W_PODS,
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        cfg().fields(&format!("spec.nodeName={node}")),
        pod_meta,
        |s| &mut s.pods,
    );
    // CiliumEndpoint supports no field selector on status.networking.node.
    spawn_watch(shared, W_CEP, Api::<CiliumEndpoint>::all(client), cfg(), cep_entry, |s| &mut s.ceps);
}

/// Watches `api` forever, filling `slot` of the cache.
///
/// After a failure the watch starts over with a fresh list (after a
/// growing, jittered delay): a resumed watch that answers nothing would
/// leave no sign that the source is back, and the list also replaces
/// whatever changed while it was away.
fn spawn_watch<K, V>(
    shared: &Arc<Shared>,
    name: &'static str,
    api: Api<K>,
    config: watcher::Config,
    convert: fn(&K) -> Converted<V>,
    slot: Slot<V>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    V: Send + Sync + 'static,
{
    shared.kube_health.register(name);
    let tasks = Arc::clone(shared);
    let shared = Arc::clone(shared);
    let task = tokio::spawn(async move {
        let watch = || watcher::watcher(api.clone(), config.clone()).boxed();
        let mut stream = watch();
        let mut backoff = Backoff::new(shared.retry.0, shared.retry.1);
        let mut init: Option<HashMap<String, V>> = None;
        loop {
            let Some(item) = stream.next().await else {
                // The watcher's stream never ends; should it, start over.
                stream = watch();
                continue;
            };
            let event = match item {
                Ok(event) => event,
                Err(e) => {
                    shared.kube_health.failure(name, &describe(name, &e));
                    tokio::time::sleep(backoff.next_delay()).await;
                    init = None;
                    stream = watch();
                    continue;
                }
            };
            match event {
                // Announces a list attempt, not a success: no reset here.
                Event::Init => init = Some(HashMap::new()),
                Event::InitApply(obj) => {
                    if let (Some(buf), Some((k, Some(v)))) = (init.as_mut(), convert(&obj)) {
                        buf.insert(k, v);
                    }
                }
                Event::InitDone => {
                    backoff.reset();
                    let fresh = init.take().unwrap_or_default();
                    let count = fresh.len();
                    shared.update_kube(|s| {
                        *slot(s) = fresh;
                        s.synced.insert(name, true);
                    });
                    shared.kube_health.success(name);
                    tracing::debug!(watch = name, objects = count, "Kubernetes watch (re)listed");
                }
                Event::Apply(obj) => {
                    backoff.reset();
                    // An object that no longer converts (an endpoint that
                    // lost its ID, a policy that dropped its node selector)
                    // leaves the cache.
                    if let Some((k, v)) = convert(&obj) {
                        shared.update_kube(|s| match v {
                            Some(v) => {
                                slot(s).insert(k, v);
                            }
                            None => {
                                slot(s).remove(&k);
                            }
                        });
                    }
                    shared.kube_health.success(name);
                }
                Event::Delete(obj) => {
                    backoff.reset();
                    if let Some((k, _)) = convert(&obj) {
                        shared.update_kube(|s| {
                            slot(s).remove(&k);
                        });
                    }
                    shared.kube_health.success(name);
                }
            }
        }
    });
    tasks.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(task.abort_handle());
}

/// The watch error with what to do about it.
fn describe(watch: &str, e: &watcher::Error) -> String {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    };
    let hint = match status {
        Some(401) => "; the service account token was rejected",
        Some(403) => "; grant list and watch on this resource to verdict-agent's service account",
        Some(404) => "; is the Cilium CRD installed (or the resource served) in this cluster?",
        _ => "",
    };
    format!("watching {watch}: {e}{hint}")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, OwnerReference};

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn selectors() {
        let node = labels(&[("kubernetes.io/hostname", "n1"), ("node-role.kubernetes.io/worker", "")]);
        let all = LabelSelector::default();
        assert!(selector_matches(&all, &node));

        let by_label =
            LabelSelector { match_labels: Some(labels(&[("k8s:kubernetes.io/hostname", "n1")])), ..Default::default() };
        assert!(selector_matches(&by_label, &node));
        let other =
            LabelSelector { match_labels: Some(labels(&[("kubernetes.io/hostname", "n2")])), ..Default::default() };
        assert!(!selector_matches(&other, &node));

        let sel = |r| LabelSelector { match_expressions: Some(vec![r]), ..Default::default() };
        assert!(selector_matches(&sel(req("node-role.kubernetes.io/worker", "Exists", &[])), &node));
        assert!(!selector_matches(&sel(req("node-role.kubernetes.io/control-plane", "Exists", &[])), &node));
        assert!(selector_matches(&sel(req("node-role.kubernetes.io/control-plane", "DoesNotExist", &[])), &node));
        assert!(selector_matches(&sel(req("kubernetes.io/hostname", "In", &["n0", "n1"])), &node));
        assert!(!selector_matches(&sel(req("kubernetes.io/hostname", "NotIn", &["n1"])), &node));
        assert!(selector_matches(&sel(req("zone", "NotIn", &["a"])), &node));
        assert!(!selector_matches(&sel(req("zone", "Sideways", &["a"])), &node));
    }

    fn owned(kind: &str, name: &str, hash: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: kind.into(),
                name: name.into(),
                uid: "u".into(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            labels: hash.map(|h| labels(&[("pod-template-hash", h)])),
            ..Default::default()
        }
    }

    #[test]
    fn workloads() {
        assert_eq!(workload_of(&owned("ReplicaSet", "web-7d4f9", Some("7d4f9"))).as_deref(), Some("Deployment/web"));
        assert_eq!(workload_of(&owned("ReplicaSet", "web-7d4f9", None)).as_deref(), Some("ReplicaSet/web-7d4f9"));
        assert_eq!(workload_of(&owned("Job", "backup-28391230", None)).as_deref(), Some("CronJob/backup"));
        assert_eq!(workload_of(&owned("Job", "migrate", None)).as_deref(), Some("Job/migrate"));
        assert_eq!(workload_of(&owned("DaemonSet", "cilium", None)).as_deref(), Some("DaemonSet/cilium"));
        assert_eq!(workload_of(&ObjectMeta::default()), None);
    }

    #[test]
    fn ccnp_with_specs_only_parses() {
        let p: CiliumClusterwideNetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": "host-ssh"},
            "specs": [
                {"endpointSelector": {}, "ingress": [{"fromEntities": ["cluster"]}]},
                {"nodeSelector": {"matchLabels": {"role": "edge"}}, "ingress": [{"fromEntities": ["world"]}]}
            ]
        }))
        .unwrap();
        let (name, sels) = host_policy(&p).unwrap();
        assert_eq!(name, "host-ssh");
        assert_eq!(sels.unwrap().len(), 1);
    }
}

#[cfg(test)]
mod tls_tests {
    /// kube's rustls stack without a crypto provider panics while building
    /// the client; that must come back as an error.
    #[tokio::test]
    async fn https_without_crypto_provider_is_an_error_not_a_crash() {
        let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        match super::client_from_config(config) {
            Ok(_) => {} // a provider is compiled in
            Err(e) => {
                eprintln!("{e}");
                assert!(matches!(e, super::KubeError::Tls { .. }), "{e}");
            }
        }
    }
}
