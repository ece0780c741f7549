//! The readiness engine's own `_total` counters (would-deny and scan-noise
//! notifications per endpoint), kept monotonic across agent restarts.
//!
//! The engine adds each flow's growth between evaluations; that history is
//! in memory. Its totals are therefore persisted in the pinned flow ledger
//! (records marked [`LEDGER_READINESS_MARK`]): the map reader writes what
//! the engine published in the shared view, and a restarted engine starts
//! from what the ledger held, taking the first evaluation after a restore
//! as its new baseline (growth while no agent ran is not added to these
//! two counters; the endpoint and flow totals, which the kernel keeps,
//! carry it).

use std::collections::BTreeMap;

use verdict_common::maps::{FlowKey, LEDGER_READINESS_MARK, LedgerRecord};

use crate::model::Direction;

/// Which engine counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReadinessCounter {
    /// `verdict_agent_would_deny_total{endpoint, direction}`.
    WouldDeny(u16, Direction),
    /// `verdict_agent_scan_noise_notifications_total{endpoint}`.
    ScanNoise(u16),
}

/// Counter -> value.
pub type ReadinessTotals = BTreeMap<ReadinessCounter, u64>;

const WOULD_DENY: u8 = 1;
const SCAN_NOISE: u8 = 2;

fn direction_code(d: Direction) -> u8 {
    match d {
        Direction::Ingress => 1,
        Direction::Egress => 2,
    }
}

/// The ledger record of one counter.
pub fn to_record(counter: ReadinessCounter, value: u64) -> (FlowKey, LedgerRecord) {
    let (kind, endpoint_id, direction) = match counter {
        ReadinessCounter::WouldDeny(ep, d) => (WOULD_DENY, ep, direction_code(d)),
        ReadinessCounter::ScanNoise(ep) => (SCAN_NOISE, ep, 0),
    };
    let key = FlowKey { endpoint_id, direction, notify_type: kind, _pad: LEDGER_READINESS_MARK, ..Default::default() };
    (key, LedgerRecord { base_notifications: value, ..Default::default() })
}

/// The counter a ledger record holds; None when it is not one.
pub fn from_record(key: &FlowKey, record: &LedgerRecord) -> Option<(ReadinessCounter, u64)> {
    if key._pad != LEDGER_READINESS_MARK {
        return None;
    }
    let counter = match key.notify_type {
        WOULD_DENY => ReadinessCounter::WouldDeny(key.endpoint_id, Direction::from_cilium(key.direction)?),
        SCAN_NOISE => ReadinessCounter::ScanNoise(key.endpoint_id),
        _ => return None,
    };
    Some((counter, record.base_notifications))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_foreign_records_are_not_taken() {
        for c in [
            ReadinessCounter::WouldDeny(7, Direction::Ingress),
            ReadinessCounter::WouldDeny(7, Direction::Egress),
            ReadinessCounter::ScanNoise(4095),
        ] {
            let (k, r) = to_record(c, 120);
            assert_eq!(from_record(&k, &r), Some((c, 120)));
        }
        let (mut k, r) = to_record(ReadinessCounter::ScanNoise(1), 1);
        k._pad = 0;
        assert_eq!(from_record(&k, &r), None);
    }
}
