//! Verdicts the kernel counted for an endpoint but no flow userspace read
//! carries: lost evidence.
//!
//! The per-endpoint totals (`ENDPOINT_COUNTERS`) never evict; flows can be
//! evicted from the kernel's table before a read took their counts (a port
//! scan between two reads can push out a flow seen once), or never be
//! created (`FlowUpdateFailed`). Per endpoint, direction and verdict class,
//! the difference between the endpoint totals and the counts the ledger
//! attributed to flows is what no flow list shows: readiness must not read
//! its absence as "nothing would break".
//!
//! The comparison uses the endpoint totals of the *previous* read: the
//! snapshot reads flows before endpoint totals, so verdicts arriving during
//! a read are in the totals but not yet in the flows; by the next read they
//! are in their flow unless it was evicted unread. The result is kept as a
//! monotonic maximum (a loss is permanent) with the time it last grew, and
//! persisted in the pinned ledger, so a restart neither forgets a loss nor
//! dates an old one as new.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use verdict_common::maps::{FlowKey, LEDGER_UNATTRIBUTED_MARK, LedgerRecord, VerdictClass};

use crate::{
    bpf::snapshot::EndpointTotals,
    model::{Direction, Verdict},
};

/// Endpoint ID, Cilium direction code (1 ingress, 2 egress), verdict class.
pub type ClassKey = (u16, u8, u8);

/// Lost evidence of one endpoint, direction and verdict class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostEvidence {
    pub endpoint_id: u16,
    pub direction: Direction,
    pub verdict: Verdict,
    /// Verdicts in the endpoint totals that no flow read carries (monotonic).
    pub verdicts: u64,
    /// When the count last grew, as seen by the agent (within one read).
    pub last_grew: SystemTime,
}

#[derive(Debug, Default)]
pub struct Unattributed {
    /// Endpoint totals per class at the previous read.
    previous_totals: Option<HashMap<ClassKey, u64>>,
    lost: BTreeMap<ClassKey, (u64, SystemTime)>,
    changed: Vec<ClassKey>,
}

/// The endpoint totals per class: policy drops count as denied, as their
/// flows do.
pub fn class_totals(endpoints: &[EndpointTotals]) -> HashMap<ClassKey, u64> {
    let mut out = HashMap::new();
    for ep in endpoints {
        for (slot, dir) in [(0usize, 1u8), (1, 2)] {
            for class in VerdictClass::ALL {
                let mut n = ep.verdicts[slot][class as usize];
                if class == VerdictClass::Denied {
                    n += ep.policy_drops[slot];
                }
                if n > 0 {
                    out.insert((ep.id, dir, class as u8), n);
                }
            }
        }
    }
    out
}

impl Unattributed {
    /// One read: `endpoints` are this read's totals, `attributed` what the
    /// ledger holds per class after taking this read's flows into account.
    pub fn update(&mut self, endpoints: &[EndpointTotals], attributed: &HashMap<ClassKey, u64>, now: SystemTime) {
        let totals = class_totals(endpoints);
        if let Some(previous) = self.previous_totals.take() {
            for (key, total) in previous {
                let missing = total.saturating_sub(attributed.get(&key).copied().unwrap_or(0));
                let known = self.lost.get(&key).map_or(0, |l| l.0);
                if missing > known {
                    self.lost.insert(key, (missing, now));
                    self.changed.push(key);
                }
            }
        }
        self.previous_totals = Some(totals);
    }

    pub fn lost(&self) -> Vec<LostEvidence> {
        self.lost
            .iter()
            .filter_map(|(&(endpoint_id, dir, class), &(verdicts, last_grew))| {
                Some(LostEvidence {
                    endpoint_id,
                    direction: Direction::from_cilium(dir)?,
                    verdict: Verdict::from(VerdictClass::from_u8(class)?),
                    verdicts,
                    last_grew,
                })
            })
            .collect()
    }

    /// Ledger records for the losses that changed since the last call.
    pub fn take_changes(&mut self) -> Vec<(FlowKey, LedgerRecord)> {
        let mut out = Vec::new();
        for key in std::mem::take(&mut self.changed) {
            let Some(&(verdicts, at)) = self.lost.get(&key) else { continue };
            out.push((
                store_key(key),
                LedgerRecord {
                    base_notifications: verdicts,
                    last_seen_unix_ns: at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
                    ..Default::default()
                },
            ));
        }
        out
    }

    /// Takes a persisted record back; false when it is not one of ours.
    pub fn restore(&mut self, key: &FlowKey, record: &LedgerRecord) -> bool {
        if key._pad != LEDGER_UNATTRIBUTED_MARK {
            return false;
        }
        if record.base_notifications > 0 {
            let at = UNIX_EPOCH + Duration::from_nanos(record.last_seen_unix_ns);
            self.lost.insert((key.endpoint_id, key.direction, key.class), (record.base_notifications, at));
        }
        true
    }
}

fn store_key((endpoint_id, direction, class): ClassKey) -> FlowKey {
    FlowKey { endpoint_id, direction, class, _pad: LEDGER_UNATTRIBUTED_MARK, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: u16, audited_ingress: u64) -> EndpointTotals {
        let mut t = EndpointTotals { id, notifications: 1, ..Default::default() };
        t.verdicts[0][VerdictClass::Audited as usize] = audited_ingress;
        t
    }

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    #[test]
    fn verdicts_arriving_during_a_read_are_not_a_loss() {
        let mut u = Unattributed::default();
        let key = (7, 1, VerdictClass::Audited as u8);
        // Read 1: flows carry 10, totals (read later) already 12.
        u.update(&[ep(7, 12)], &HashMap::from([(key, 10)]), at(0));
        assert!(u.lost().is_empty());
        // Read 2: the two are in their flow now.
        u.update(&[ep(7, 12)], &HashMap::from([(key, 12)]), at(5));
        assert!(u.lost().is_empty());
    }

    #[test]
    fn an_evicted_unread_flow_is_lost_evidence_and_stays_lost() {
        let mut u = Unattributed::default();
        let key = (7, 1, VerdictClass::Audited as u8);
        u.update(&[ep(7, 1)], &HashMap::new(), at(0));
        // The flow was evicted before any read took its count.
        u.update(&[ep(7, 1)], &HashMap::new(), at(5));
        let lost = u.lost();
        assert_eq!(lost.len(), 1);
        assert_eq!(
            (lost[0].endpoint_id, lost[0].direction, lost[0].verdict),
            (7, Direction::Ingress, Verdict::Audited)
        );
        assert_eq!((lost[0].verdicts, lost[0].last_grew), (1, at(5)));
        // More verdicts, all attributed: the loss neither grows nor heals.
        u.update(&[ep(7, 5)], &HashMap::from([(key, 4)]), at(10));
        u.update(&[ep(7, 5)], &HashMap::from([(key, 4)]), at(15));
        assert_eq!((u.lost()[0].verdicts, u.lost()[0].last_grew), (1, at(5)));
    }

    #[test]
    fn losses_survive_a_restart_with_their_time() {
        let mut u = Unattributed::default();
        u.update(&[ep(9, 3)], &HashMap::new(), at(0));
        u.update(&[ep(9, 3)], &HashMap::new(), at(5));
        let store = u.take_changes();
        assert_eq!(store.len(), 1);
        let mut r = Unattributed::default();
        for (k, rec) in &store {
            assert!(r.restore(k, rec));
        }
        assert_eq!(r.lost(), u.lost());
        // The first reads after the restart find the same difference: no growth.
        r.update(&[ep(9, 3)], &HashMap::new(), at(100));
        r.update(&[ep(9, 3)], &HashMap::new(), at(105));
        assert_eq!(r.lost()[0].last_grew, at(5));
    }
}
