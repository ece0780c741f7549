//! Trial steps as Kubernetes Events on the node (host trials) or the pod,
//! published in the background: a revert never waits for the API server,
//! which may be what the trial just cut off.

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

use super::{record::TrialRecord, trial::TrialEvents};
use crate::model::EndpointKind;

/// The Event `reason` of an outcome (PascalCase, as Kubernetes expects).
pub fn reason(outcome: &str) -> &'static str {
    match outcome {
        "switched" => "EnforcementTrialStarted",
        "confirmed" => "EnforcementTrialConfirmed",
        "reverted" => "EnforcementTrialReverted",
        "expired" => "EnforcementTrialExpired",
        "aborted" => "EnforcementTrialAborted",
        "refused" => "EnforcementTrialRefused",
        "revert_failed" => "EnforcementRevertFailed",
        _ => "EnforcementLockoutAlarm",
    }
}

/// The Event's note: who asked, why, and the step's own message, at most
/// 1 kB as Kubernetes requires.
pub fn note(record: &TrialRecord) -> String {
    let step = record.history.last().map_or("", |h| h.message.as_str());
    let text = format!(
        "trial {} on endpoint {} ({}), requested by {}{}: {step}",
        record.id,
        record.endpoint_name,
        record.endpoint_id,
        record.requested_by.who,
        record.requested_by.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
    );
    let mut end = text.len().min(1024);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Publishes through kube-runtime's recorder (events.k8s.io/v1).
pub struct KubeTrialEvents {
    recorder: Recorder,
    node: Option<String>,
}

impl KubeTrialEvents {
    /// `node`: this node's name, for host trials (without it they are logged only).
    pub fn new(client: kube::Client, instance: Option<String>, node: Option<String>) -> KubeTrialEvents {
        let reporter = Reporter { controller: "verdict-agent".into(), instance };
        KubeTrialEvents { recorder: Recorder::new(client, reporter), node }
    }

    fn target(&self, record: &TrialRecord) -> Option<k8s_openapi::api::core::v1::ObjectReference> {
        use k8s_openapi::api::core::v1::ObjectReference;
        match record.endpoint_kind {
            EndpointKind::Host => Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(self.node.clone()?),
                ..ObjectReference::default()
            }),
            _ => {
                let (namespace, name) = record.endpoint_name.split_once('/')?;
                Some(ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    namespace: Some(namespace.to_owned()),
                    name: Some(name.to_owned()),
                    ..ObjectReference::default()
                })
            }
        }
    }
}

impl TrialEvents for KubeTrialEvents {
    fn publish(&self, record: &TrialRecord, outcome: &'static str) {
        let Some(reference) = self.target(record) else { return };
        let event = Event {
            type_: if matches!(outcome, "switched" | "confirmed" | "aborted") {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: reason(outcome).into(),
            note: Some(note(record)),
            action: "EnforcementTrial".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let trial = record.id.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(trial = %trial, reason = event.reason, error = %e,
                      "cannot publish the enforcement Event; check the agent's RBAC (create events.k8s.io events)");
            }
        });
    }
}
