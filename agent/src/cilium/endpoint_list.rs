//! Cilium's `Endpoint` model (`api/v1/openapi.yaml`), as `GET /v1/endpoint`
//! on the agent socket and `cilium endpoint list -o json` return it, reduced
//! to what verdict-agent reads: ID, identity, pod, labels, policy and audit
//! state.
//!
//! Every field is optional and unknown fields are ignored: the model has
//! grown across releases (v1.12 to main) and a missing field must leave an
//! answer unknown, never fail the whole list.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::{DirectionPolicy, EndpointInfo, EndpointKind, FactSource};

/// Why an endpoint list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EndpointListError {
    #[error(
        "not a Cilium endpoint list: {0}; expected the JSON array that `cilium-dbg endpoint list -o json` \
         (or `cilium endpoint list -o json` before v1.15) prints"
    )]
    Json(#[from] serde_json::Error),
    #[error("endpoint #{index} in the list has no `id`; is this really `endpoint list` output?")]
    MissingId { index: usize },
    #[error("endpoint #{index} has id {id}, outside Cilium's endpoint ID range (0..=65535)")]
    IdOutOfRange { index: usize, id: u64 },
}

/// `Endpoint`: "a namespaced network interface to which cilium applies policies".
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ApiEndpoint {
    /// The cilium-agent-local ID.
    pub id: Option<u64>,
    /// Desired configuration (`EndpointConfigurationSpec`).
    pub spec: Option<ConfigurationSpec>,
    pub status: Option<EndpointStatus>,
}

/// `EndpointConfigurationSpec`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConfigurationSpec {
    /// `ConfigurationMap`: option name to "Enabled"/"Disabled" (strings in
    /// every release read; kept as JSON values so a typed value elsewhere
    /// cannot fail the list).
    pub options: Option<BTreeMap<String, serde_json::Value>>,
}

/// `EndpointStatus`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EndpointStatus {
    pub external_identifiers: Option<EndpointIdentifiers>,
    pub identity: Option<ApiIdentity>,
    pub labels: Option<LabelConfigurationStatus>,
    /// The configuration in effect (`EndpointConfigurationSpec`).
    pub realized: Option<ConfigurationSpec>,
    pub policy: Option<EndpointPolicyStatus>,
    /// `EndpointState`: ready, regenerating, waiting-for-identity, ...
    pub state: Option<String>,
}

/// `EndpointIdentifiers`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EndpointIdentifiers {
    pub k8s_namespace: Option<String>,
    pub k8s_pod_name: Option<String>,
    /// "namespace/name", from `GetK8sNamespaceAndPodName`.
    pub pod_name: Option<String>,
    pub container_id: Option<String>,
    pub cni_attachment_id: Option<String>,
}

/// `Identity`, also the answer of `GET /v1/identity/{id}`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ApiIdentity {
    pub id: Option<u64>,
    /// "source:key=value" strings (`Labels`).
    pub labels: Option<Vec<String>>,
}

/// `LabelConfigurationStatus`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LabelConfigurationStatus {
    pub security_relevant: Option<Vec<String>>,
    pub derived: Option<Vec<String>>,
}

/// `EndpointPolicyStatus`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointPolicyStatus {
    pub spec: Option<EndpointPolicy>,
    pub realized: Option<EndpointPolicy>,
}

/// `EndpointPolicy`, reduced to the enforcement state.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EndpointPolicy {
    /// `EndpointPolicyEnabled`; kept as a string so a value added by a
    /// future release makes this endpoint's policy unknown, not the list
    /// unreadable.
    pub policy_enabled: Option<String>,
    pub policy_revision: Option<u64>,
}

/// `EndpointPolicyEnabled`, identical from v1.12 to main.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEnabled {
    pub ingress: bool,
    pub egress: bool,
    /// The `audit-` prefix: the endpoint has PolicyAuditMode on.
    pub audit: bool,
}

impl PolicyEnabled {
    pub fn parse(s: &str) -> Option<PolicyEnabled> {
        let (audit, rest) = match s.strip_prefix("audit-") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (ingress, egress) = match rest {
            "none" if !audit => (false, false),
            "ingress" => (true, false),
            "egress" => (false, true),
            "both" => (true, true),
            _ => return None,
        };
        Some(PolicyEnabled { ingress, egress, audit })
    }
}

/// An option of a `ConfigurationMap` that reads "Enabled"/"Disabled"
/// (or a boolean, to be lenient).
pub fn option_enabled(options: Option<&BTreeMap<String, serde_json::Value>>, name: &str) -> Option<bool> {
    match options?.get(name)? {
        serde_json::Value::String(s) => match s.as_str() {
            "Enabled" | "enabled" | "true" => Some(true),
            "Disabled" | "disabled" | "false" => Some(false),
            _ => None,
        },
        serde_json::Value::Bool(b) => Some(*b),
        _ => None,
    }
}

impl ApiEndpoint {
    /// The endpoint ID, if present and in range.
    pub fn endpoint_id(&self) -> Option<u16> {
        self.id.and_then(|id| u16::try_from(id).ok())
    }

    /// Security identity of the endpoint.
    pub fn identity_id(&self) -> Option<u32> {
        let id = self.status.as_ref()?.identity.as_ref()?.id?;
        u32::try_from(id).ok()
    }

    /// Labels of the endpoint's identity, sorted.
    pub fn identity_labels(&self) -> Option<Vec<String>> {
        let mut labels = self.status.as_ref()?.identity.as_ref()?.labels.clone()?;
        labels.sort();
        Some(labels)
    }

    /// PolicyAuditMode from the realized options, else the desired ones.
    pub fn audit_option(&self) -> Option<bool> {
        let realized = self.status.as_ref().and_then(|s| s.realized.as_ref()).and_then(|r| r.options.as_ref());
        let spec = self.spec.as_ref().and_then(|s| s.options.as_ref());
        option_enabled(realized, "PolicyAuditMode").or_else(|| option_enabled(spec, "PolicyAuditMode"))
    }

    /// PolicyVerdictNotification from the realized options, else the desired ones.
    pub fn verdict_notification_option(&self) -> Option<bool> {
        let realized = self.status.as_ref().and_then(|s| s.realized.as_ref()).and_then(|r| r.options.as_ref());
        let spec = self.spec.as_ref().and_then(|s| s.options.as_ref());
        option_enabled(realized, "PolicyVerdictNotification")
            .or_else(|| option_enabled(spec, "PolicyVerdictNotification"))
    }

    /// `policy-enabled` of the policy in the datapath, else of the desired one.
    pub fn policy_enabled(&self) -> Option<PolicyEnabled> {
        let policy = self.status.as_ref()?.policy.as_ref()?;
        let raw = policy
            .realized
            .as_ref()
            .and_then(|p| p.policy_enabled.as_deref())
            .or_else(|| policy.spec.as_ref().and_then(|p| p.policy_enabled.as_deref()))?;
        let parsed = PolicyEnabled::parse(raw);
        if parsed.is_none() {
            tracing::debug!(endpoint = ?self.id, value = raw, "unknown policy-enabled value; policy state left unknown");
        }
        parsed
    }

    /// Everything verdict-agent knows about the endpoint from this model.
    /// `source` says where the JSON came from (the API or a file).
    pub fn to_info(&self, id: u16, source: FactSource) -> EndpointInfo {
        let status = self.status.as_ref();
        let ids = status.and_then(|s| s.external_identifiers.as_ref());
        let identity = self.identity_id();
        let identity_labels = self.identity_labels().unwrap_or_default();
        let mut labels = status
            .and_then(|s| s.labels.as_ref())
            .and_then(|l| l.security_relevant.clone())
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| identity_labels.clone());
        labels.sort();
        labels.dedup();

        // `pod-name` ("ns/name") is the fallback for releases or runtimes
        // that leave the k8s-* identifiers empty. From v1.20 (be4ff1becd,
        // `pkg/endpoint/api.go`) the API fills none of them: the namespace
        // comes from the `k8s:io.kubernetes.pod.namespace` label, the pod
        // name from an `io.kubernetes.pod.name` label where one is present,
        // else from this node's CiliumEndpoints (see `enrich::directory`).
        let split_pod_name = ids
            .and_then(|i| i.pod_name.as_deref())
            .and_then(|p| p.split_once('/'))
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty());
        let derived = status.and_then(|s| s.labels.as_ref()).and_then(|l| l.derived.as_deref()).unwrap_or_default();
        let from_labels = |keys: &[&str]| {
            keys.iter().find_map(|key| {
                [labels.as_slice(), identity_labels.as_slice(), derived]
                    .into_iter()
                    .find_map(|set| label_value(set, key))
                    .filter(|v| !v.is_empty())
            })
        };
        let namespace = ids
            .and_then(|i| non_empty(i.k8s_namespace.as_deref()))
            .or_else(|| split_pod_name.map(|(ns, _)| ns.to_owned()))
            .or_else(|| from_labels(&[POD_NAMESPACE_LABEL]));
        let pod = ids
            .and_then(|i| non_empty(i.k8s_pod_name.as_deref()))
            .or_else(|| split_pod_name.map(|(_, name)| name.to_owned()))
            .or_else(|| from_labels(&POD_NAME_LABELS));

        // A Kubernetes namespace makes it a pod, named or not (v1.20+).
        let kind = EndpointKind::classify(
            identity,
            labels.iter().chain(identity_labels.iter()).map(String::as_str),
            pod.is_some() || namespace.is_some(),
        );

        let enabled = self.policy_enabled();
        // The audit bit is a property of the endpoint, not of a direction:
        // `audit-ingress` says egress has no policy, not that egress would
        // be enforced if it had one.
        let audit = enabled.map(|p| p.audit || self.audit_option() == Some(true));
        let (ingress, egress, policy_source) = match (enabled, audit) {
            (Some(p), Some(audit)) => (
                Some(DirectionPolicy { enabled: p.ingress, audit }),
                Some(DirectionPolicy { enabled: p.egress, audit }),
                Some(source),
            ),
            _ => (None, None, None),
        };

        EndpointInfo { id, kind, namespace, pod, workload: None, identity, labels, ingress, egress, policy_source }
    }
}

/// The namespace label Cilium gives every pod endpoint
/// (`k8s:` + `PodNamespaceLabel`, `pkg/k8s/apis/cilium.io/const.go`).
pub const POD_NAMESPACE_LABEL: &str = "k8s:io.kubernetes.pod.namespace";

/// Pod-name labels (`PodNameLabel` with the sources it appears under).
pub const POD_NAME_LABELS: [&str; 2] = ["k8s:io.kubernetes.pod.name", "container:io.kubernetes.pod.name"];

fn non_empty(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(str::to_owned)
}

/// The value of "key=value" in Cilium-printed labels.
pub(crate) fn label_value(labels: &[String], key: &str) -> Option<String> {
    labels.iter().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Many(Vec<ApiEndpoint>),
    One(Box<ApiEndpoint>),
}

/// Reads the raw endpoint models: an array (`endpoint list`, `endpoint get`)
/// or a single object.
pub fn parse_api_endpoints(json: &str) -> Result<Vec<ApiEndpoint>, EndpointListError> {
    // Parse strictly first so a syntax error reports its position instead of
    // serde's "did not match any variant".
    let value: serde_json::Value = serde_json::from_str(json)?;
    Ok(match serde_json::from_value::<OneOrMany>(value) {
        Ok(OneOrMany::Many(v)) => v,
        Ok(OneOrMany::One(e)) => vec![*e],
        Err(_) => {
            // Re-run the array form to surface the precise field error.
            serde_json::from_str::<Vec<ApiEndpoint>>(json)?
        }
    })
}

/// Parses `cilium endpoint list -o json` output (or a `GET /v1/endpoint`
/// body) into the agent's endpoint model, with `EndpointsFile` as the
/// policy source.
pub fn parse_endpoint_list(json: &str) -> Result<Vec<EndpointInfo>, EndpointListError> {
    let endpoints = parse_api_endpoints(json)?;
    endpoints_to_infos(&endpoints, FactSource::EndpointsFile)
}

/// Converts raw models, rejecting entries without a usable ID.
pub fn endpoints_to_infos(
    endpoints: &[ApiEndpoint],
    source: FactSource,
) -> Result<Vec<EndpointInfo>, EndpointListError> {
    endpoints
        .iter()
        .enumerate()
        .map(|(index, ep)| {
            let raw = ep.id.ok_or(EndpointListError::MissingId { index })?;
            let id = u16::try_from(raw).map_err(|_| EndpointListError::IdOutOfRange { index, id: raw })?;
            Ok(ep.to_info(id, source))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like `cilium-dbg endpoint list -o json` on v1.16: the host
    /// endpoint in audit mode and a pod with ingress policy.
    const LIST: &str = r#"[
      {
        "id": 1234,
        "spec": {"label-configuration": {}, "options": {"PolicyAuditMode": "Enabled", "PolicyVerdictNotification": "Enabled"}},
        "status": {
          "external-identifiers": {"container-name": "cilium-agent"},
          "identity": {"id": 1, "labels": ["reserved:host", "k8s:node-role.kubernetes.io/control-plane"]},
          "labels": {"security-relevant": ["reserved:host"], "derived": [], "realized": {}},
          "realized": {"label-configuration": {}, "options": {"PolicyAuditMode": "Enabled", "PolicyVerdictNotification": "Enabled"}},
          "policy": {
            "realized": {"policy-enabled": "audit-both", "policy-revision": 12, "id": 1, "build": 3},
            "spec": {"policy-enabled": "audit-both", "policy-revision": 12}
          },
          "state": "ready",
          "health": {"bpf": "OK", "policy": "OK", "connected": true, "overallHealth": "OK"}
        }
      },
      {
        "id": 311,
        "spec": {"options": {"PolicyAuditMode": "Disabled"}},
        "status": {
          "external-identifiers": {"k8s-namespace": "shop", "k8s-pod-name": "web-7d4f9-abcde", "pod-name": "shop/web-7d4f9-abcde",
                                   "container-id": "abc", "cni-attachment-id": "abc:eth0"},
          "identity": {"id": 48213, "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"]},
          "labels": {"security-relevant": ["k8s:io.kubernetes.pod.namespace=shop", "k8s:app=web"]},
          "realized": {"options": {"PolicyAuditMode": "Disabled"}},
          "policy": {"realized": {"policy-enabled": "ingress", "allowed-ingress-identities": [1, 48000]}},
          "state": "ready",
          "namedPorts": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }
      },
      {"id": 7, "status": {"state": "waiting-for-identity"}}
    ]"#;

    #[test]
    fn parses_host_and_pod() {
        let eps = parse_endpoint_list(LIST).unwrap();
        assert_eq!(eps.len(), 3);

        let host = &eps[0];
        assert_eq!(host.id, 1234);
        assert_eq!(host.kind, EndpointKind::Host);
        assert_eq!(host.identity, Some(1));
        assert_eq!(host.namespace, None);
        assert_eq!(host.labels, vec!["reserved:host"]);
        assert_eq!(host.ingress, Some(DirectionPolicy { enabled: true, audit: true }));
        assert_eq!(host.egress, Some(DirectionPolicy { enabled: true, audit: true }));
        assert_eq!(host.policy_source, Some(FactSource::EndpointsFile));

        let pod = &eps[1];
        assert_eq!(pod.kind, EndpointKind::Pod);
        assert_eq!(pod.namespace.as_deref(), Some("shop"));
        assert_eq!(pod.pod.as_deref(), Some("web-7d4f9-abcde"));
        assert_eq!(pod.identity, Some(48213));
        assert_eq!(pod.labels, vec!["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"]);
        assert_eq!(pod.ingress, Some(DirectionPolicy { enabled: true, audit: false }));
        assert_eq!(pod.egress, Some(DirectionPolicy { enabled: false, audit: false }));

        let pending = &eps[2];
        assert_eq!(pending.kind, EndpointKind::Unknown);
        assert_eq!(pending.ingress, None);
        assert_eq!(pending.policy_source, None);
    }

    /// v1.20+: the API leaves the pod identifiers empty; the namespace is
    /// read from the label, the pod stays unknown (the directory fills it
    /// from CiliumEndpoints), and the endpoint is still a pod.
    #[test]
    fn v1_20_endpoints_without_pod_identifiers() {
        let eps = parse_endpoint_list(include_str!("../enrich/testdata/cilium-endpoints-v1.20.json")).unwrap();
        let by_id = |id: u16| eps.iter().find(|e| e.id == id).unwrap();
        let web = by_id(311);
        assert_eq!(web.namespace.as_deref(), Some("shop"));
        assert_eq!(web.pod, None, "no pod name anywhere in a v1.20 endpoint");
        assert_eq!(web.kind, EndpointKind::Pod);
        assert_eq!(web.identity, Some(48213));
        assert_eq!(by_id(412).namespace.as_deref(), Some("shop"));
        assert_eq!(by_id(1234).kind, EndpointKind::Host);
        assert_eq!(by_id(1234).namespace, None);
        assert_eq!(by_id(99).kind, EndpointKind::Health);

        // A pod-name label, where a runtime adds one, names the pod.
        let json = r#"[{"id": 5, "status": {"external-identifiers": {"cni-attachment-id": "x:eth0"},
            "labels": {"security-relevant": ["k8s:io.kubernetes.pod.namespace=ns1"],
                       "derived": ["container:io.kubernetes.pod.name=p1"]}}}]"#;
        let ep = &parse_endpoint_list(json).unwrap()[0];
        assert_eq!((ep.namespace.as_deref(), ep.pod.as_deref()), (Some("ns1"), Some("p1")));
    }

    #[test]
    fn policy_enabled_values() {
        let p = |s| PolicyEnabled::parse(s);
        assert_eq!(p("none"), Some(PolicyEnabled { ingress: false, egress: false, audit: false }));
        assert_eq!(p("both"), Some(PolicyEnabled { ingress: true, egress: true, audit: false }));
        assert_eq!(p("audit-egress"), Some(PolicyEnabled { ingress: false, egress: true, audit: true }));
        assert_eq!(p("audit-none"), None);
        assert_eq!(p("sideways"), None);
    }

    #[test]
    fn audit_option_without_audit_prefix() {
        // Audit mode on an endpoint that no policy selects: Cilium prints
        // "none", the option still says Enabled.
        let json = r#"[{"id": 9, "status": {"policy": {"realized": {"policy-enabled": "none"}},
                         "realized": {"options": {"PolicyAuditMode": "Enabled"}},
                         "external-identifiers": {"pod-name": "kube-system/coredns-1"}}}]"#;
        let ep = &parse_endpoint_list(json).unwrap()[0];
        assert_eq!(ep.ingress, Some(DirectionPolicy { enabled: false, audit: true }));
        assert_eq!(ep.namespace.as_deref(), Some("kube-system"));
        assert_eq!(ep.pod.as_deref(), Some("coredns-1"));
        assert_eq!(ep.kind, EndpointKind::Pod);
    }

    #[test]
    fn single_object_and_errors() {
        let one = parse_endpoint_list(r#"{"id": 5, "status": {"identity": {"id": 4, "labels": ["reserved:health"]}}}"#)
            .unwrap();
        assert_eq!(one[0].id, 5);
        assert_eq!(one[0].identity, Some(4));
        assert_eq!(one[0].kind, EndpointKind::Health);

        assert!(matches!(parse_endpoint_list("[{\"status\":{}}]"), Err(EndpointListError::MissingId { index: 0 })));
        assert!(matches!(
            parse_endpoint_list("[{\"id\": 70000}]"),
            Err(EndpointListError::IdOutOfRange { id: 70000, .. })
        ));
        let err = parse_endpoint_list("[{\"id\": 1,").unwrap_err();
        assert!(err.to_string().contains("endpoint list -o json"), "{err}");
        assert!(parse_endpoint_list("[{\"id\": \"x\"}]").is_err());
    }
}
