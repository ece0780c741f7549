//! Who owns an endpoint ID over time: a generation number per ID that
//! changes when its owner does, and whether an ID the directory knew is
//! gone. Endpoint IDs are node-local and reused; counters kept per ID must
//! not carry one pod's totals under the next pod's name, and series of a
//! deleted pod must not stay in the scrape forever.

use std::collections::{BTreeMap, HashMap};

use crate::model::{EndpointInfo, EndpointKind};

/// The owner of an endpoint ID as the directory saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointOwner {
    /// 1 for the first owner seen, +1 for each later owner of the same ID
    /// (seen while the agent runs; it starts at 1 again after a restart).
    pub generation: u64,
    pub kind: EndpointKind,
    pub namespace: Option<String>,
    pub pod: Option<String>,
}

impl EndpointOwner {
    /// Whether `info` describes a different owner. Only facts both sides
    /// know count: an endpoint whose pod name arrives later (the Cilium
    /// API before its CiliumEndpoint, or v1.20+ where the API names no pod)
    /// is the same owner.
    fn differs_from(&self, info: &EndpointInfo) -> bool {
        let known = |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(a), Some(b)) if a != b);
        let kinds_known = self.kind != EndpointKind::Unknown && info.kind != EndpointKind::Unknown;
        (kinds_known && self.kind != info.kind)
            || known(&self.namespace, &info.namespace)
            || known(&self.pod, &info.pod)
    }

    /// Fills what the latest answer adds to what was known.
    fn refine(&mut self, info: &EndpointInfo) {
        if self.kind == EndpointKind::Unknown {
            self.kind = info.kind;
        }
        if self.namespace.is_none() {
            self.namespace.clone_from(&info.namespace);
        }
        if self.pod.is_none() {
            self.pod.clone_from(&info.pod);
        }
    }
}

#[derive(Debug)]
struct Entry {
    owner: EndpointOwner,
    /// In the latest merged view.
    present: bool,
}

/// Per-ID owners across rebuilds of the merged view.
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    ids: HashMap<u16, Entry>,
}

impl Lifecycle {
    /// Records one rebuild of the merged view. An ID that was absent from
    /// a view and comes back is a new owner: Cilium frees an ID when its
    /// endpoint is deleted and may hand it to the next one.
    pub fn observe(&mut self, merged: &BTreeMap<u16, EndpointInfo>) {
        for (id, info) in merged {
            match self.ids.get_mut(id) {
                // In the previous view too, and the same owner.
                Some(entry) if entry.present && !entry.owner.differs_from(info) => entry.owner.refine(info),
                Some(entry) => {
                    entry.owner = owner_of(info, entry.owner.generation + 1);
                    entry.present = true;
                }
                None => {
                    self.ids.insert(*id, Entry { owner: owner_of(info, 1), present: true });
                }
            }
        }
        for (id, entry) in &mut self.ids {
            entry.present = merged.contains_key(id);
        }
    }

    pub fn owner(&self, id: u16) -> Option<EndpointOwner> {
        self.ids.get(&id).filter(|e| e.present).map(|e| e.owner.clone())
    }

    /// Known before, absent from the latest view.
    pub fn is_gone(&self, id: u16) -> bool {
        self.ids.get(&id).is_some_and(|e| !e.present)
    }
}

fn owner_of(info: &EndpointInfo, generation: u64) -> EndpointOwner {
    EndpointOwner { generation, kind: info.kind, namespace: info.namespace.clone(), pod: info.pod.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(id: u16, ns: Option<&str>, name: Option<&str>) -> EndpointInfo {
        EndpointInfo {
            id,
            kind: EndpointKind::Pod,
            namespace: ns.map(str::to_owned),
            pod: name.map(str::to_owned),
            ..Default::default()
        }
    }

    fn view(eps: &[EndpointInfo]) -> BTreeMap<u16, EndpointInfo> {
        eps.iter().map(|e| (e.id, e.clone())).collect()
    }

    #[test]
    fn generations_follow_owners() {
        let mut l = Lifecycle::default();
        assert_eq!(l.owner(7), None);
        assert!(!l.is_gone(7), "never known is not gone");

        // v1.20: namespace first, the pod name from the CiliumEndpoint later.
        l.observe(&view(&[pod(7, Some("shop"), None)]));
        assert_eq!(l.owner(7).unwrap().generation, 1);
        l.observe(&view(&[pod(7, Some("shop"), Some("web-1"))]));
        assert_eq!(l.owner(7).unwrap().generation, 1, "a name arriving is not a new owner");
        assert_eq!(l.owner(7).unwrap().pod.as_deref(), Some("web-1"));

        // Reused while present: another pod under the same ID.
        l.observe(&view(&[pod(7, Some("shop"), Some("web-2"))]));
        assert_eq!(l.owner(7).unwrap().generation, 2);

        // Deleted, then the ID comes back even with the same name: new owner.
        l.observe(&view(&[]));
        assert!(l.is_gone(7));
        assert_eq!(l.owner(7), None);
        l.observe(&view(&[pod(7, Some("shop"), Some("web-2"))]));
        assert!(!l.is_gone(7));
        assert_eq!(l.owner(7).unwrap().generation, 3);

        // Kind learnt later is the same owner; a different kind is not.
        let unknown = EndpointInfo { id: 9, ..Default::default() };
        l.observe(&view(&[unknown]));
        l.observe(&view(&[pod(9, Some("a"), Some("b"))]));
        assert_eq!(l.owner(9).unwrap().generation, 1);
        let host = EndpointInfo { id: 9, kind: EndpointKind::Host, ..Default::default() };
        l.observe(&view(&[host]));
        assert_eq!(l.owner(9).unwrap().generation, 2);
    }
}
