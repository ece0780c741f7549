//! Cluster-wide trials: the `AuditModeTrial` custom resource
//! (`verdict-agent.io/v1alpha1`, cluster-scoped), which every agent
//! reconciles for its own node, so that GitOps users can stage enforcement
//! node by node.
//!
//! ```yaml
//! apiVersion: verdict-agent.io/v1alpha1
//! kind: AuditModeTrial
//! metadata: {name: host-firewall}
//! spec:
//!   nodeSelector: {matchLabels: {node-role.kubernetes.io/worker: ""}}
//!   host: true                 # the host endpoint
//!   namespaces: [shop]         # and/or every pod endpoint of these namespaces
//!   tryDuration: 10m
//!   maxParallel: 1             # nodes in trial at once
//!   mode: Enforce              # or Try: every node reverts at the end
//!   stopOnRevert: true         # no new node starts once one reverted
//!   abort: false               # true: nodes in trial revert now, the rest never start
//! status:
//!   nodes:
//!     node-a: {phase: Confirmed, message: ..., trials: [t...], lastTransitionTime: ...}
//! ```
//!
//! Each agent writes only its own `status.nodes.<node>` entry, with a JSON
//! merge patch (maps merge, so agents never overwrite each other). Claiming
//! one of the `maxParallel` places carries the listed object's
//! `resourceVersion` as a precondition: two agents that saw the same free
//! place cannot both take it (the second gets 409 and looks again).
//!
//! The trials themselves are the node's ordinary trials ([`TrialManager`]):
//! the same readiness gate (the agent's own report: a node that is not
//! ready is `Refused`, and says why), the same watch and reverts, the same
//! record. In `Enforce` mode the reconciler confirms a node's trials once
//! `tryDuration` has passed without a revert; their own deadline is a
//! minute later, so a reconciler that cannot reach the API server leaves
//! the node reverting by itself, never enforcing unconfirmed.
//!
//! Stopping a rollout: `spec.abort: true` (what `kubectl verdict trials
//! abort` writes) reverts every node still in trial and starts no other;
//! deleting the object does the same for the trials it started that are
//! not confirmed yet. Confirmed nodes keep enforcing either way: deleting a
//! finished rollout must not undo it.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, SystemTime},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use super::{
    SharedTrials,
    record::{PreflightVerdict, Requester, TrialPhase, TrialRecord},
    trial::TrialRequest,
};
use crate::{
    duration::parse as parse_duration, model::EndpointKind, readiness::ReadinessState, timefmt::format_rfc3339,
};

pub const GROUP: &str = "verdict-agent.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "AuditModeTrial";
pub const PLURAL: &str = "auditmodetrials";

/// How often each agent looks at the trials.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);
/// In `Enforce` mode, how long after `tryDuration` a trial's own deadline
/// falls: the reconciler confirms before it, or the node reverts.
pub const CONFIRM_GRACE: Duration = Duration::from_secs(60);

pub fn api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Each node enforces for `tryDuration`, then reverts (a rehearsal).
    Try,
    /// A node whose trial ran `tryDuration` without a revert keeps
    /// enforcement (confirmed), and the next node starts.
    #[default]
    Enforce,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditModeTrialSpec {
    /// Nodes taking part; none: every node.
    #[serde(default)]
    pub node_selector: Option<LabelSelector>,
    /// Switch the host endpoint.
    #[serde(default)]
    pub host: bool,
    /// Switch every pod endpoint of these namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Trial length per node, e.g. `10m`.
    pub try_duration: String,
    /// Nodes in trial at once.
    #[serde(default = "one")]
    pub max_parallel: u32,
    #[serde(default)]
    pub mode: Mode,
    /// Start no new node once one reverted on a critical signal.
    #[serde(default = "yes")]
    pub stop_on_revert: bool,
    /// Recorded with every trial.
    #[serde(default)]
    pub reason: Option<String>,
    /// Stop the rollout: nodes in trial revert now, nodes not started never
    /// start; confirmed nodes keep enforcing.
    #[serde(default)]
    pub abort: bool,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// Where one node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodePhase {
    /// Waiting for a place (`maxParallel`), or halted (`stopOnRevert`).
    Pending,
    /// The node's trials run.
    Trying,
    /// `Enforce`: the trials ran their time and were confirmed.
    Confirmed,
    /// `Try`: the trials ran their time and reverted as planned.
    Passed,
    /// Reverted before their time: a critical signal, an abort, or an
    /// unconfirmed expiry.
    Reverted,
    /// Not started: the node's readiness, Cilium or the spec said no.
    Refused,
}

impl NodePhase {
    fn done(self) -> bool {
        matches!(self, NodePhase::Confirmed | NodePhase::Passed | NodePhase::Reverted | NodePhase::Refused)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub phase: NodePhase,
    pub message: String,
    #[serde(default)]
    pub trials: Vec<String>,
    pub last_transition_time: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditModeTrialStatus {
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeStatus>,
}

/// One endpoint of this node a trial may switch, from the agent's own
/// readiness report.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeEndpoint {
    pub endpoint_id: u16,
    pub name: String,
    pub kind: EndpointKind,
    pub namespace: Option<String>,
    pub state: ReadinessState,
}

/// What this node's agent knows that the reconciler needs.
pub struct NodeView {
    pub node: String,
    /// This Node's labels; None while unknown (the node is then skipped).
    pub labels: Box<dyn Fn() -> Option<BTreeMap<String, String>> + Send + Sync>,
    /// This node's endpoints as the latest readiness report has them.
    pub endpoints: Box<dyn Fn() -> Vec<NodeEndpoint> + Send + Sync>,
}

pub struct Reconciler {
    api: Api<DynamicObject>,
    trials: SharedTrials,
    view: NodeView,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(
        "cannot list {PLURAL}.{GROUP}: is the CRD installed (the chart installs it with enforcement.enabled) and may the \
         agent list it?"
    )]
    List(#[source] kube::Error),
    #[error("cannot write status.nodes.{node} of {PLURAL}.{GROUP} {name}")]
    Status {
        node: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Reconciler {
    pub fn new(client: Client, trials: SharedTrials, view: NodeView) -> Reconciler {
        Reconciler { api: Api::all_with(client, &api_resource()), trials, view }
    }

    /// Reconciles until the task is dropped; errors are logged, once per
    /// kind of failure in a row.
    pub async fn run(self) {
        let mut last_error = String::new();
        loop {
            match self.reconcile_all(SystemTime::now()).await {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    let text = crate::errors::chain(&e);
                    if text != last_error {
                        warn!(error = %text, "AuditModeTrial reconcile failed; retrying every {}s", RECONCILE_INTERVAL.as_secs());
                        last_error = text;
                    }
                }
            }
            tokio::time::sleep(RECONCILE_INTERVAL).await;
        }
    }

    /// One pass over every AuditModeTrial.
    pub async fn reconcile_all(&self, now: SystemTime) -> Result<(), ReconcileError> {
        let list = self.api.list(&ListParams::default()).await.map_err(ReconcileError::List)?;
        let live: HashSet<String> = list.items.iter().filter_map(|o| o.metadata.name.clone()).collect();
        self.revert_orphans(&live, now).await;
        for obj in list.items {
            let name = obj.metadata.name.clone().unwrap_or_default();
            match self.reconcile_one(&obj, now).await {
                Ok(()) => {}
                Err(e) => warn!(trial = %name, error = %crate::errors::chain(&e), "AuditModeTrial not reconciled"),
            }
        }
        Ok(())
    }

    /// Trials that an `AuditModeTrial` no longer listed started, and that
    /// are not confirmed: deleting the object stops its rollout, so they go
    /// back to audit mode. Only after a list that succeeded.
    async fn revert_orphans(&self, live: &HashSet<String>, now: SystemTime) {
        let prefix = format!("{KIND}/");
        let mut manager = self.trials.lock().await;
        let orphans: Vec<(String, String)> = manager
            .trials()
            .iter()
            .filter(|t| matches!(t.phase, TrialPhase::Requested | TrialPhase::Switched))
            .filter_map(|t| {
                let name = t.requested_by.who.strip_prefix(&prefix)?;
                (!live.contains(name)).then(|| (t.id.clone(), name.to_owned()))
            })
            .collect();
        for (id, name) in orphans {
            let by = Requester { who: format!("{KIND}/{name}"), reason: Some(format!("{KIND} {name} was deleted")) };
            match manager.abort(&id, by, now).await {
                Ok(t) => {
                    info!(trial = %name, id = %id, endpoint = %t.endpoint_name, "AuditModeTrial deleted: trial aborted, audit mode back on")
                }
                Err(e) => {
                    warn!(trial = %name, id = %id, error = %crate::errors::chain(&e), "AuditModeTrial deleted: abort failed; the trial reverts at its deadline")
                }
            }
        }
    }

    pub(crate) async fn reconcile_one(&self, obj: &DynamicObject, now: SystemTime) -> Result<(), ReconcileError> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let spec: AuditModeTrialSpec = match serde_json::from_value(obj.data["spec"].clone()) {
            Ok(s) => s,
            Err(e) => {
                return self
                    .write(&name, None, NodePhase::Refused, format!("spec not understood: {e}"), vec![], now)
                    .await;
            }
        };
        let status: AuditModeTrialStatus = serde_json::from_value(obj.data["status"].clone()).unwrap_or_default();
        let node = &self.view.node;
        let Some(labels) = (self.view.labels)() else { return Ok(()) };
        if let Some(sel) = &spec.node_selector
            && !crate::enrich::kubernetes::selector_matches(sel, &labels)
        {
            return Ok(());
        }
        let mine = status.nodes.get(node);
        if mine.is_some_and(|m| m.phase.done()) {
            return Ok(());
        }
        if spec.abort {
            return self.abort(&name, &spec, mine, now).await;
        }
        if let Some(m) = mine.filter(|m| m.phase == NodePhase::Trying && !m.trials.is_empty()) {
            return self.follow(&name, &spec, m, now).await;
        }
        // Pending or new: a free place, unless a revert halted the rollout.
        if spec.stop_on_revert
            && let Some((other, _)) = status.nodes.iter().find(|(_, s)| s.phase == NodePhase::Reverted)
        {
            let message = format!("halted: node {other} reverted (stopOnRevert)");
            return self.write_if_changed(&name, mine, NodePhase::Pending, message, now).await;
        }
        let in_trial = status.nodes.iter().filter(|(n, s)| *n != node && s.phase == NodePhase::Trying).count();
        if in_trial >= spec.max_parallel.max(1) as usize {
            let message = format!("waiting: {in_trial} of {} nodes in trial", spec.max_parallel.max(1));
            return self.write_if_changed(&name, mine, NodePhase::Pending, message, now).await;
        }
        // Claim the place against the version we read.
        let claimed = self
            .write(&name, obj.metadata.resource_version.as_deref(), NodePhase::Trying, "starting".into(), vec![], now)
            .await;
        match claimed {
            Err(ReconcileError::Status { source: kube::Error::Api(s), .. }) if s.code == 409 => return Ok(()),
            other => other?,
        }
        let (phase, message, ids) = self.start(&name, &spec, now).await;
        info!(trial = %name, node = %node, phase = ?phase, %message, "AuditModeTrial: node trial started");
        self.write(&name, None, phase, message, ids, now).await
    }

    /// Starts the node's trials: all or none.
    async fn start(&self, name: &str, spec: &AuditModeTrialSpec, now: SystemTime) -> (NodePhase, String, Vec<String>) {
        let try_for = match parse_duration(&spec.try_duration) {
            Ok(d) if d >= Duration::from_secs(1) => d,
            _ => return (NodePhase::Refused, format!("tryDuration {:?} is not a duration", spec.try_duration), vec![]),
        };
        let endpoints: Vec<NodeEndpoint> = (self.view.endpoints)()
            .into_iter()
            .filter(|e| {
                (spec.host && e.kind == EndpointKind::Host)
                    || (e.kind != EndpointKind::Host
                        && e.namespace.as_ref().is_some_and(|ns| spec.namespaces.contains(ns)))
            })
            .collect();
        if endpoints.is_empty() {
            return (NodePhase::Refused, "no endpoint of this node matches host/namespaces".into(), vec![]);
        }
        let try_seconds = match spec.mode {
            Mode::Try => try_for.as_secs(),
            Mode::Enforce => (try_for + CONFIRM_GRACE).as_secs(),
        };
        let by = Requester { who: format!("{KIND}/{name}"), reason: spec.reason.clone() };
        let mut manager = self.trials.lock().await;
        let mut started: Vec<TrialRecord> = Vec::new();
        for e in &endpoints {
            let exit_code = crate::preflight::exit_code(e.state);
            let req = TrialRequest {
                endpoint_id: e.endpoint_id,
                endpoint_name: e.name.clone(),
                endpoint_kind: e.kind,
                try_seconds,
                strict: false,
                requested_by: by.clone(),
                preflight: PreflightVerdict { state: e.state.as_str().into(), exit_code, forced: false },
            };
            match manager.start(req, now).await {
                Ok(t) => started.push(t),
                Err(err) => {
                    let undo = Requester { who: by.who.clone(), reason: Some(format!("{} could not start", e.name)) };
                    for t in &started {
                        let _ = manager.abort(&t.id, undo.clone(), SystemTime::now()).await;
                    }
                    return (NodePhase::Refused, format!("{}: {err}", e.name), vec![]);
                }
            }
        }
        let names: Vec<&str> = started.iter().map(|t| t.endpoint_name.as_str()).collect();
        let message = format!("enforcing on {} for {}", names.join(", "), spec.try_duration);
        (NodePhase::Trying, message, started.into_iter().map(|t| t.id).collect())
    }

    /// A node in trial: confirm when its time is up (`Enforce`), report how
    /// its trials ended.
    async fn follow(
        &self,
        name: &str,
        spec: &AuditModeTrialSpec,
        mine: &NodeStatus,
        now: SystemTime,
    ) -> Result<(), ReconcileError> {
        let try_for = parse_duration(&spec.try_duration).unwrap_or(Duration::ZERO);
        let mut manager = self.trials.lock().await;
        let records: Vec<TrialRecord> = mine.trials.iter().filter_map(|id| manager.get(id).cloned()).collect();
        if records.len() != mine.trials.len() {
            drop(manager);
            let message = "the node's trial records are gone (state directory lost?)".to_string();
            return self.write(name, None, NodePhase::Reverted, message, mine.trials.clone(), now).await;
        }
        let by = Requester { who: format!("{KIND}/{name}"), reason: spec.reason.clone() };
        // A revert of one endpoint ends the node's trial: undo the others.
        if let Some(r) = records.iter().find(|r| matches!(r.phase, TrialPhase::Reverted | TrialPhase::Refused)) {
            let undo = Requester { who: by.who.clone(), reason: Some(format!("{} reverted", r.endpoint_name)) };
            for other in records.iter().filter(|o| o.is_active()) {
                let _ = manager.abort(&other.id, undo.clone(), now).await;
            }
            drop(manager);
            let message = format!("{} reverted: {}", r.endpoint_name, r.outcome.clone().unwrap_or_default());
            return self.write(name, None, NodePhase::Reverted, message, mine.trials.clone(), now).await;
        }
        let (phase, message) = match spec.mode {
            Mode::Try if records.iter().all(|r| r.phase == TrialPhase::Expired) => (
                NodePhase::Passed,
                format!("ran {} without a critical signal, then reverted as planned", spec.try_duration),
            ),
            Mode::Enforce if records.iter().any(|r| r.phase == TrialPhase::Expired) => {
                (NodePhase::Reverted, "expired before the reconciler confirmed it".to_string())
            }
            Mode::Enforce if records.iter().all(|r| r.phase == TrialPhase::Confirmed) => {
                (NodePhase::Confirmed, format!("ran {} without a critical signal; enforcing", spec.try_duration))
            }
            Mode::Enforce
                if records.iter().all(|r| r.switched_at.is_some_and(|s| now >= s + try_for))
                    && records.iter().all(|r| r.phase == TrialPhase::Switched) =>
            {
                for r in &records {
                    if let Err(e) = manager.confirm(&r.id, by.clone(), now).await {
                        warn!(trial = %name, id = %r.id, error = %e, "AuditModeTrial: confirm failed");
                    }
                }
                (NodePhase::Confirmed, format!("ran {} without a critical signal; enforcing", spec.try_duration))
            }
            _ => return Ok(()),
        };
        drop(manager);
        self.write(name, None, phase, message, mine.trials.clone(), now).await
    }

    /// `spec.abort`: this node's running trials revert; a node that had not
    /// started never will.
    async fn abort(
        &self,
        name: &str,
        spec: &AuditModeTrialSpec,
        mine: Option<&NodeStatus>,
        now: SystemTime,
    ) -> Result<(), ReconcileError> {
        let trials = mine.map(|m| m.trials.clone()).unwrap_or_default();
        if mine.is_none_or(|m| m.phase != NodePhase::Trying) {
            let message = "aborted (spec.abort) before this node started".to_string();
            return self.write(name, None, NodePhase::Refused, message, trials, now).await;
        }
        let by = Requester { who: format!("{KIND}/{name}"), reason: spec.reason.clone().or(Some("spec.abort".into())) };
        let mut manager = self.trials.lock().await;
        let mut failed = Vec::new();
        for id in &trials {
            if manager.get(id).is_some_and(|t| t.is_active())
                && let Err(e) = manager.abort(id, by.clone(), now).await
            {
                failed.push(format!("{id}: {e}"));
            }
        }
        drop(manager);
        let message = if failed.is_empty() {
            "aborted (spec.abort): audit mode back on".to_string()
        } else {
            format!("aborted (spec.abort); not yet reverted, retried at the trial's deadline: {}", failed.join("; "))
        };
        info!(trial = %name, node = %self.view.node, %message, "AuditModeTrial aborted");
        self.write(name, None, NodePhase::Reverted, message, trials, now).await
    }

    async fn write_if_changed(
        &self,
        name: &str,
        mine: Option<&NodeStatus>,
        phase: NodePhase,
        message: String,
        now: SystemTime,
    ) -> Result<(), ReconcileError> {
        if mine.is_some_and(|m| m.phase == phase && m.message == message) {
            return Ok(());
        }
        self.write(name, None, phase, message, vec![], now).await
    }

    /// Merge-patches `status.nodes.<this node>`; with `resource_version`,
    /// only if the object has not changed since it was read.
    async fn write(
        &self,
        name: &str,
        resource_version: Option<&str>,
        phase: NodePhase,
        message: String,
        trials: Vec<String>,
        now: SystemTime,
    ) -> Result<(), ReconcileError> {
        let entry = NodeStatus { phase, message, trials, last_transition_time: format_rfc3339(now) };
        let mut patch = json!({"status": {"nodes": {self.view.node.clone(): entry}}});
        if let Some(rv) = resource_version {
            patch["metadata"] = json!({"resourceVersion": rv});
        }
        self.api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|source| ReconcileError::Status { node: self.view.node.clone(), name: name.into(), source })
    }
}
