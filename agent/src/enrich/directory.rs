//! Merging the sources into one view of this node's endpoints, and the
//! identity label cache.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::Instant,
};

use super::{ApiState, kubernetes::KubeState};
use crate::{
    cilium::identity,
    model::{DirectionPolicy, EndpointInfo, EndpointKind, FactSource},
};

/// Builds the merged endpoint view.
///
/// - The Cilium API is authoritative on this node: when it has an ID, its
///   kind, identity, labels and policy/audit state win, even from a cache
///   older than the latest failed refresh. CiliumEndpoints are written by
///   that same agent, so they are never fresher than its last answer.
/// - CiliumEndpoints of this node (matched on `status.networking.node`
///   against the node's addresses or name) fill in IDs the API has not
///   reported (API disabled, down since before the first answer, or an
///   endpoint newer than the last refresh), and namespace/pod the API left
///   empty.
/// - Pods of this node give the owning workload.
pub(crate) fn merge(
    api: &ApiState,
    kube: &KubeState,
    node_name: Option<&str>,
    node_ips: &[String],
) -> BTreeMap<u16, EndpointInfo> {
    let mut out: BTreeMap<u16, EndpointInfo> = BTreeMap::new();
    if let Some(eps) = &api.endpoints {
        out.extend(eps.iter().map(|(id, info)| (*id, info.clone())));
    }

    let own: HashSet<&str> = kube
        .own_node
        .values()
        .flat_map(|n| n.addresses.iter())
        .map(String::as_str)
        .chain(node_ips.iter().map(String::as_str))
        .chain(node_name)
        .collect();
    if !own.is_empty() {
        // Sorted by key so that two CiliumEndpoints claiming one ID (a
        // stale object next to its successor) resolve the same way on
        // every build.
        let mut local: Vec<_> =
            kube.ceps.iter().filter(|(_, c)| c.node.as_deref().is_some_and(|n| own.contains(n))).collect();
        local.sort_by(|a, b| a.0.cmp(b.0));
        let from_api: HashSet<u16> = out.keys().copied().collect();
        for (_, cep) in local {
            match out.get_mut(&cep.id) {
                Some(info) if from_api.contains(&cep.id) => {
                    // The API's answer; the CiliumEndpoint only fills gaps,
                    // and only when it describes the same identity.
                    if info.identity.is_none() || info.identity == cep.identity {
                        if info.namespace.is_none() {
                            info.namespace = Some(cep.namespace.clone());
                        }
                        if info.pod.is_none() {
                            info.pod = Some(cep.pod.clone());
                        }
                        if info.kind == EndpointKind::Unknown {
                            info.kind = EndpointKind::Pod;
                        }
                    }
                }
                // Another CiliumEndpoint already claimed the ID.
                Some(_) => {}
                None => {
                    out.insert(cep.id, from_cep(cep));
                }
            }
        }
    }

    for info in out.values_mut() {
        if let (Some(ns), Some(pod)) = (&info.namespace, &info.pod)
            && let Some(meta) = kube.pods.get(&format!("{ns}/{pod}"))
        {
            info.workload.clone_from(&meta.workload);
        }
    }
    out
}

fn from_cep(cep: &super::kubernetes::CepEntry) -> EndpointInfo {
    // CiliumEndpoints do not say whether the endpoint audits; `false` is
    // the safe reading of "enforcing" and the metrics leave audit state
    // unreported for this source.
    let dir = |enforcing: Option<bool>| enforcing.map(|enabled| DirectionPolicy { enabled, audit: false });
    let ingress = dir(cep.ingress_enforcing);
    let egress = dir(cep.egress_enforcing);
    EndpointInfo {
        id: cep.id,
        kind: EndpointKind::Pod,
        namespace: Some(cep.namespace.clone()),
        pod: Some(cep.pod.clone()),
        workload: None,
        identity: cep.identity,
        labels: cep.identity_labels.clone(),
        policy_source: (ingress.is_some() || egress.is_some()).then_some(FactSource::Kubernetes),
        ingress,
        egress,
    }
}

/// Labels Cilium gives a reserved identity. None for the aggregates
/// (11-14), which carry no `reserved:` label of their name.
pub(crate) fn reserved_labels(id: u32) -> Option<Vec<String>> {
    if identity::is_aggregate(id) {
        return None;
    }
    match identity::classify(id) {
        identity::IdentityClass::Reserved("unknown") => None,
        identity::IdentityClass::Reserved(name) => Some(vec![format!("reserved:{name}")]),
        _ => None,
    }
}

/// A readable, bounded name for a remote identity: its reserved name,
/// "cidr" for local CIDR/FQDN identities, "namespace/app" from its labels,
/// else the number.
pub fn remote_name(id: u32, labels: Option<&[String]>) -> String {
    match identity::classify(id) {
        identity::IdentityClass::Reserved(name) => return name.to_owned(),
        identity::IdentityClass::Cidr => return "cidr".to_owned(),
        _ => {}
    }
    let Some(labels) = labels else { return id.to_string() };
    // Remote-node and other scoped identities carry a reserved label
    // instead of a reserved number.
    if let Some(name) = labels.iter().find_map(|l| l.strip_prefix("reserved:")) {
        return name.split('=').next().unwrap_or(name).to_owned();
    }
    if labels.iter().any(|l| l.starts_with("cidr:") || l.starts_with("fqdn:")) {
        return "cidr".to_owned();
    }
    let get = |key: &str| crate::cilium::endpoint_list::label_value(labels, key);
    let ns = get("k8s:io.kubernetes.pod.namespace");
    let app = get("k8s:app").or_else(|| get("k8s:app.kubernetes.io/name")).or_else(|| get("k8s:k8s-app"));
    match (ns, app) {
        (Some(ns), Some(app)) => format!("{ns}/{app}"),
        _ => id.to_string(),
    }
}

// ---- Identity label cache (answers of GET /v1/identity/{id}) ----

#[derive(Debug)]
enum Cached {
    Found(Vec<String>),
    /// Not found, or the lookup failed: do not ask again before `until`.
    Missing {
        until: Instant,
    },
}

#[derive(Debug)]
struct CacheEntry {
    value: Cached,
    last_used: u64,
}

/// What the cache says about an identity.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Found(Vec<String>),
    /// Recently asked and not found: do not ask again yet.
    Missing,
    /// Not asked yet (or the negative answer expired), and no lookup is
    /// under way: the caller should queue one.
    Unknown,
    InFlight,
}

/// Bounded LRU of identity labels. Remote identities are cluster-wide and
/// unbounded in number; only the ones seen in verdicts are asked for.
#[derive(Debug)]
pub(crate) struct IdentityCache {
    capacity: usize,
    tick: u64,
    entries: HashMap<u32, CacheEntry>,
    in_flight: HashSet<u32>,
}

impl IdentityCache {
    pub fn new(capacity: usize) -> IdentityCache {
        IdentityCache { capacity: capacity.max(1), tick: 0, entries: HashMap::new(), in_flight: HashSet::new() }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn lookup(&mut self, id: u32) -> Lookup {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(&id) {
            e.last_used = tick;
            match &e.value {
                Cached::Found(labels) => return Lookup::Found(labels.clone()),
                Cached::Missing { until } if *until > Instant::now() => return Lookup::Missing,
                Cached::Missing { .. } => {}
            }
        }
        if self.in_flight.contains(&id) { Lookup::InFlight } else { Lookup::Unknown }
    }

    /// Marks `id` as being looked up; false if it already was.
    pub fn begin(&mut self, id: u32) -> bool {
        self.in_flight.insert(id)
    }

    /// Forgets a queued lookup that could not be queued after all.
    pub fn abandon(&mut self, id: u32) {
        self.in_flight.remove(&id);
    }

    pub fn found(&mut self, id: u32, labels: Vec<String>) {
        self.store(id, Cached::Found(labels));
    }

    pub fn missing(&mut self, id: u32, until: Instant) {
        self.store(id, Cached::Missing { until });
    }

    fn store(&mut self, id: u32, value: Cached) {
        self.in_flight.remove(&id);
        self.tick += 1;
        if !self.entries.contains_key(&id) && self.entries.len() >= self.capacity {
            self.evict();
        }
        self.entries.insert(id, CacheEntry { value, last_used: self.tick });
    }

    /// Drops the least recently used eighth in one pass, so a full cache
    /// pays for a scan once per capacity/8 insertions, not on each.
    fn evict(&mut self) {
        let n = (self.capacity / 8).max(1);
        let mut by_age: Vec<(u64, u32)> = self.entries.iter().map(|(id, e)| (e.last_used, *id)).collect();
        by_age.sort_unstable();
        for (_, id) in by_age.into_iter().take(n) {
            self.entries.remove(&id);
        }
    }
}

/// Every identity label set the merged sources know, for callers that
/// want to list them (suggestions).
pub(crate) fn known_identities(api: &ApiState, kube: &KubeState) -> BTreeSet<u32> {
    api.identities.keys().copied().chain(kube.identities.keys().filter_map(|k| k.parse().ok())).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn remote_names() {
        let l = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(remote_name(2, None), "world");
        assert_eq!(remote_name(7, None), "kube-apiserver");
        assert_eq!(remote_name(13, None), "aggregate-world");
        assert_eq!(reserved_labels(13), None, "no invented labels for aggregates");
        assert_eq!(reserved_labels(6), Some(vec!["reserved:remote-node".to_owned()]));
        assert_eq!(remote_name(16_777_300, None), "cidr");
        assert_eq!(remote_name(48213, None), "48213");
        assert_eq!(remote_name(48213, Some(&l(&["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"]))), "shop/web");
        assert_eq!(
            remote_name(102, Some(&l(&["k8s:io.kubernetes.pod.namespace=kube-system", "k8s:k8s-app=kube-dns"]))),
            "kube-system/kube-dns"
        );
        assert_eq!(remote_name(48214, Some(&l(&["k8s:io.kubernetes.pod.namespace=shop"]))), "48214");
        assert_eq!(remote_name(0x0200_0005, Some(&l(&["reserved:remote-node"]))), "remote-node");
    }

    #[test]
    fn identity_cache_is_bounded_lru() {
        let mut c = IdentityCache::new(16);
        for id in 0..16 {
            assert!(c.begin(id));
            c.found(id, vec![format!("k8s:n={id}")]);
        }
        // Touch 0 so it survives the next eviction.
        assert_eq!(c.lookup(0), Lookup::Found(vec!["k8s:n=0".into()]));
        c.found(100, vec![]);
        assert_eq!(c.len(), 15);
        assert!(matches!(c.lookup(0), Lookup::Found(_)));
        assert_eq!(c.lookup(1), Lookup::Unknown, "least recently used is gone");

        assert!(c.begin(200));
        assert!(!c.begin(200));
        assert_eq!(c.lookup(200), Lookup::InFlight);
        c.missing(200, Instant::now() + Duration::from_secs(60));
        assert_eq!(c.lookup(200), Lookup::Missing);
        c.missing(200, Instant::now() - Duration::from_secs(1));
        assert_eq!(c.lookup(200), Lookup::Unknown, "expired negative answer");
    }
}
