//! A reused endpoint ID starts from zero for its new owner.
//!
//! Cilium frees an endpoint's ID when its pod goes and gives it to a later
//! pod; the kernel's per-endpoint totals (and the flows keyed by the ID)
//! keep counting from where the old pod left them. When enrichment reports
//! a different owner (namespace/pod) for an ID than before, the totals at
//! that moment become the ID's baseline and the exported counters are the
//! growth since: the new pod's series (its labels name the new pod) start
//! at zero, and the old pod's series leave the scrape.
//!
//! An owner only replaces another one: an ID whose owner was unknown (no
//! enrichment yet) and becomes known keeps its counts, since that is the
//! same pod being named late. The baseline is taken when the change is
//! first seen (at a scrape), so verdicts of the new pod that arrived
//! earlier are in the baseline.

use std::collections::HashMap;

use crate::{bpf::snapshot::EndpointTotals, ledger::AggregateKey, model::EndpointInfo};

/// Who owns an endpoint ID, as enrichment names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub pod: String,
}

impl Owner {
    /// The owner enrichment reports; None when it names no pod (host,
    /// health, unknown).
    pub fn of(info: Option<&EndpointInfo>) -> Option<Owner> {
        let info = info?;
        Some(Owner { namespace: info.namespace.clone().unwrap_or_default(), pod: info.pod.clone()? })
    }
}

#[derive(Debug, Default)]
struct Baseline {
    verdicts: [[u64; 4]; 2],
    policy_drops: [u64; 2],
    aggregates: HashMap<AggregateKey, u64>,
}

#[derive(Debug, Default)]
pub struct OwnerBaselines {
    owners: HashMap<u16, Owner>,
    baselines: HashMap<u16, Baseline>,
}

impl OwnerBaselines {
    /// Records the owner of `totals.id`; when it replaces another, the
    /// current totals and the endpoint's `aggregates` become the baseline.
    /// Returns whether a new baseline was taken.
    pub fn observe(
        &mut self,
        totals: &EndpointTotals,
        owner: Option<Owner>,
        aggregates: &HashMap<AggregateKey, crate::ledger::Totals>,
    ) -> bool {
        let Some(owner) = owner else { return false };
        let id = totals.id;
        let previous = self.owners.insert(id, owner.clone());
        if previous.is_none_or(|p| p == owner) {
            return false;
        }
        let aggregates =
            aggregates.iter().filter(|(k, _)| k.endpoint_id == id).map(|(k, t)| (*k, t.notifications)).collect();
        self.baselines
            .insert(id, Baseline { verdicts: totals.verdicts, policy_drops: totals.policy_drops, aggregates });
        true
    }

    /// The endpoint's totals since its current owner got the ID.
    pub fn endpoint(&self, totals: &EndpointTotals) -> EndpointTotals {
        let mut out = totals.clone();
        if let Some(b) = self.baselines.get(&totals.id) {
            for d in 0..2 {
                for c in 0..4 {
                    out.verdicts[d][c] = out.verdicts[d][c].saturating_sub(b.verdicts[d][c]);
                }
                out.policy_drops[d] = out.policy_drops[d].saturating_sub(b.policy_drops[d]);
            }
        }
        out
    }

    /// An aggregate's notifications since its endpoint's current owner got the ID.
    pub fn aggregate(&self, key: &AggregateKey, notifications: u64) -> u64 {
        let base = self.baselines.get(&key.endpoint_id).and_then(|b| b.aggregates.get(key)).copied().unwrap_or(0);
        notifications.saturating_sub(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Totals;

    fn totals(id: u16, audited: u64) -> EndpointTotals {
        let mut t = EndpointTotals { id, notifications: 1, ..Default::default() };
        t.verdicts[0][2] = audited;
        t
    }

    fn owner(pod: &str) -> Option<Owner> {
        Some(Owner { namespace: "shop".into(), pod: pod.into() })
    }

    fn agg(id: u16) -> AggregateKey {
        AggregateKey { endpoint_id: id, direction: 1, class: 2, match_type: 0, proto: 6, notify_type: 5, reason: 0 }
    }

    #[test]
    fn a_new_owner_starts_from_zero_and_the_same_owner_keeps_counting() {
        let mut b = OwnerBaselines::default();
        let aggs = HashMap::from([(agg(7), Totals { notifications: 40, bytes: 0 })]);
        // Owner unknown at first, then named: the same pod, nothing reset.
        assert!(!b.observe(&totals(7, 40), None, &aggs));
        assert!(!b.observe(&totals(7, 40), owner("cart-1"), &aggs));
        assert_eq!(b.endpoint(&totals(7, 40)).verdicts[0][2], 40);
        // cart-1 is gone; Cilium gives ID 7 to web-9.
        assert!(b.observe(&totals(7, 41), owner("web-9"), &aggs));
        assert_eq!(b.endpoint(&totals(7, 41)).verdicts[0][2], 0);
        assert_eq!(b.endpoint(&totals(7, 45)).verdicts[0][2], 4);
        assert_eq!(b.aggregate(&agg(7), 44), 4);
        // Still web-9: no new baseline.
        assert!(!b.observe(&totals(7, 45), owner("web-9"), &aggs));
        assert_eq!(b.endpoint(&totals(7, 45)).verdicts[0][2], 4);
        // Other endpoints are untouched.
        assert_eq!(b.endpoint(&totals(8, 5)).verdicts[0][2], 5);
    }
}
