//! Which labels a suggested selector may use: stable ones only, and only
//! when Kubernetes would accept them.
//!
//! A selector on `pod-template-hash` or a namespace's `version: v2.1.2`
//! stops matching at the next rollout or upgrade, and the policy silently
//! allows nothing. Labels come from captures, endpoint files and APIs, so
//! they are also checked against Kubernetes' label syntax: a key or value
//! Kubernetes would refuse (a line break, `---`, 100 KB) never reaches a
//! selector, whatever the serializer would make of it.

use std::collections::BTreeMap;

/// Label keys (after Cilium's `k8s:` source prefix) that name what a
/// workload is and survive rollouts, in order of preference. Documented in
/// `docs/critical-flows.md` ("Stable labels in suggestions").
pub const STABLE_WORKLOAD_KEYS: &[&str] = &[
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "k8s-app",
    "app",
    "component",
    "tier",
    "role",
    "name",
];

/// Cilium's label for the pod's service account: stable, used only when no
/// workload key is there.
pub const SERVICE_ACCOUNT_KEY: &str = "io.cilium.k8s.policy.serviceaccount";

/// Cilium's label for the pod's namespace name.
pub const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";

/// `k8s:KEY=VALUE` labels of an identity, split, keeping only those whose key
/// and value Kubernetes accepts.
fn k8s_labels(labels: &[String]) -> BTreeMap<&str, &str> {
    labels
        .iter()
        .filter_map(|l| l.strip_prefix("k8s:"))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, v)| is_label_key(k) && is_label_value(v))
        .collect()
}

/// The stable labels of a workload, with the `k8s:` prefix: the preferred
/// workload keys present, else the service account. Empty when the identity
/// has neither. Never a namespace label.
fn stable_workload(labels: &BTreeMap<&str, &str>) -> BTreeMap<String, String> {
    let picked: BTreeMap<String, String> = STABLE_WORKLOAD_KEYS
        .iter()
        .filter_map(|k| labels.get(k).map(|v| (format!("k8s:{k}"), (*v).to_owned())))
        .collect();
    if !picked.is_empty() {
        return picked;
    }
    labels
        .get(SERVICE_ACCOUNT_KEY)
        .map(|v| [(format!("k8s:{SERVICE_ACCOUNT_KEY}"), (*v).to_owned())].into())
        .unwrap_or_default()
}

/// A selector for a remote workload identity: its stable labels and its
/// namespace (so the selector does not default to the policy's own
/// namespace). Empty when no stable label is known.
pub fn peer_selector(labels: &[String]) -> BTreeMap<String, String> {
    let all = k8s_labels(labels);
    let mut sel = stable_workload(&all);
    if sel.is_empty() {
        return sel;
    }
    if let Some(ns) = all.get(NAMESPACE_KEY).filter(|ns| is_dns_label(ns)) {
        sel.insert(format!("k8s:{NAMESPACE_KEY}"), (*ns).to_owned());
    }
    sel
}

/// The endpoint's own selector: its stable labels, without the namespace (a
/// CiliumNetworkPolicy selects only in its own namespace).
pub fn subject_selector(labels: &[String]) -> BTreeMap<String, String> {
    stable_workload(&k8s_labels(labels))
}

/// Kubernetes' label value: at most 63 characters, alphanumerics with `-`,
/// `_`, `.` inside; empty is allowed.
pub fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && (v.is_empty()
            || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())
                && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))))
}

/// Kubernetes' label key: an optional DNS subdomain prefix and `/`, then a
/// name with the syntax of a non-empty label value.
pub fn is_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    !name.is_empty() && is_label_value(name) && prefix.is_none_or(is_dns_subdomain)
}

/// RFC 1123 label: a namespace name.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// RFC 1123 subdomain: an object name.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn volatile_labels_never_select() {
        let labels = l(&[
            "k8s:app=web",
            "k8s:pod-template-hash=7d9f8b6c5",
            "k8s:controller-revision-hash=web-6b7c",
            "k8s:statefulset.kubernetes.io/pod-name=web-0",
            "k8s:app.kubernetes.io/version=v2.1.2",
            "k8s:io.cilium.k8s.namespace.labels.version=v2.1.2",
            "k8s:io.kubernetes.pod.namespace=shop",
            "k8s:io.cilium.k8s.policy.serviceaccount=web",
            "k8s:io.cilium.k8s.policy.cluster=default",
        ]);
        assert_eq!(subject_selector(&labels), BTreeMap::from([("k8s:app".into(), "web".into())]));
        assert_eq!(
            peer_selector(&labels),
            BTreeMap::from([
                ("k8s:app".into(), "web".into()),
                ("k8s:io.kubernetes.pod.namespace".into(), "shop".into())
            ])
        );
    }

    #[test]
    fn service_account_when_no_workload_key() {
        let labels =
            l(&["k8s:io.cilium.k8s.policy.serviceaccount=coredns", "k8s:io.kubernetes.pod.namespace=kube-system"]);
        assert_eq!(
            peer_selector(&labels),
            BTreeMap::from([
                ("k8s:io.cilium.k8s.policy.serviceaccount".into(), "coredns".into()),
                ("k8s:io.kubernetes.pod.namespace".into(), "kube-system".into())
            ])
        );
        assert!(subject_selector(&l(&["k8s:pod-template-hash=abc", "k8s:io.kubernetes.pod.namespace=x"])).is_empty());
        assert!(
            peer_selector(&l(&["k8s:io.kubernetes.pod.namespace=x"])).is_empty(),
            "a namespace alone is not a workload"
        );
    }

    #[test]
    fn hostile_labels_are_refused() {
        let long = "a".repeat(100_000);
        let labels = vec![
            "k8s:app=web\n---\nkind: CiliumClusterwideNetworkPolicy".to_owned(),
            "k8s:k8s-app=#comment".into(),
            "k8s:app.kubernetes.io/name=\"quoted\"".into(),
            "k8s:tier=a\u{202e}b".into(),
            format!("k8s:role={long}"),
            format!("k8s:{long}=x"),
            "k8s:io.kubernetes.pod.namespace=shop\n".into(),
        ];
        assert!(subject_selector(&labels).is_empty());
        assert!(peer_selector(&labels).is_empty());
    }

    #[test]
    fn label_syntax() {
        assert!(
            is_label_value("") && is_label_value("a") && is_label_value("a-b_c.d") && is_label_value(&"x".repeat(63))
        );
        assert!(
            !is_label_value("-a")
                && !is_label_value("a.")
                && !is_label_value(&"x".repeat(64))
                && !is_label_value("a b")
        );
        assert!(
            is_label_key("app.kubernetes.io/name")
                && is_label_key("app")
                && is_label_key("io.cilium.k8s.policy.serviceaccount")
        );
        assert!(!is_label_key("") && !is_label_key("a/") && !is_label_key("A_B/x") && !is_label_key("a/b/c"));
        assert!(is_dns_label("kube-system") && !is_dns_label("Kube") && !is_dns_label("a.b"));
    }
}
