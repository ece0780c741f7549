//! Which agent runs on which node: the DaemonSet's pods, found by label in
//! the chart's namespace, and the nodes that have none.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, Client, api::ListParams};

use crate::suggest::labels::{is_dns_label, is_dns_subdomain};

/// The chart's default: `kube-system`, pods labelled with the chart name.
pub const DEFAULT_NAMESPACE: &str = "kube-system";
pub const DEFAULT_SELECTOR: &str = "app.kubernetes.io/name=verdict-agent";
/// The agent's port when the pod names none `metrics` (the chart's default).
pub const DEFAULT_PORT: u16 = 9975;

/// One agent pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPod {
    pub node: String,
    pub namespace: String,
    pub pod: String,
    /// The container port named `metrics` (the agent's HTTP port).
    pub port: u16,
    /// The pod's Ready condition.
    pub ready: bool,
}

impl AgentPod {
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    #[error(
        "cannot list pods {selector:?} in namespace {namespace}: may you list pods there (and is the chart installed \
         in that namespace? see --agent-namespace)"
    )]
    ListPods {
        namespace: String,
        selector: String,
        // Boxed: kube::Error is large and this error travels by value.
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "no verdict-agent pod matches {selector:?} in namespace {namespace}; see --agent-namespace and --agent-selector"
    )]
    NoAgents { namespace: String, selector: String },
    #[error("no verdict-agent pod runs on node {node:?} (nodes with one: {known})")]
    NoAgentOnNode { node: String, known: String },
}

/// The agent pods, one per node (a node with two, during a rollout, keeps
/// the ready one).
pub async fn list_agents(client: &Client, namespace: &str, selector: &str) -> Result<Vec<AgentPod>, AgentsError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods.list(&ListParams::default().labels(selector)).await.map_err(|source| AgentsError::ListPods {
        namespace: namespace.into(),
        selector: selector.into(),
        source: Box::new(source),
    })?;
    let mut by_node: BTreeMap<String, AgentPod> = BTreeMap::new();
    for pod in list.items {
        let Some(agent) = agent_pod(&pod, namespace) else { continue };
        match by_node.get(&agent.node) {
            Some(known) if known.ready || !agent.ready => {}
            _ => {
                by_node.insert(agent.node.clone(), agent);
            }
        }
    }
    if by_node.is_empty() {
        return Err(AgentsError::NoAgents { namespace: namespace.into(), selector: selector.into() });
    }
    Ok(by_node.into_values().collect())
}

/// A scheduled pod with names that are safe in an API path.
fn agent_pod(pod: &Pod, namespace: &str) -> Option<AgentPod> {
    let name = pod.metadata.name.clone()?;
    let node = pod.spec.as_ref()?.node_name.clone()?;
    // Names go into request paths: only what Kubernetes itself admits.
    if !is_dns_subdomain(&name) || !is_dns_label(namespace) || !is_dns_subdomain(&node) {
        return None;
    }
    let port = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("metrics"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_PORT);
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    Some(AgentPod { node, namespace: namespace.into(), pod: name, port, ready })
}

/// The agent on `node`.
pub fn on_node<'a>(agents: &'a [AgentPod], node: &str) -> Result<&'a AgentPod, AgentsError> {
    agents.iter().find(|a| a.node == node).ok_or_else(|| AgentsError::NoAgentOnNode {
        node: node.into(),
        known: agents.iter().map(|a| a.node.as_str()).collect::<Vec<_>>().join(", "),
    })
}

/// Nodes of the cluster, when the caller may list them (None otherwise:
/// the view then covers the nodes that have an agent, and says so).
pub async fn list_nodes(client: &Client) -> Option<Vec<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes.list(&ListParams::default()).await.ok()?;
    Some(list.items.into_iter().filter_map(|n| n.metadata.name).collect())
}
