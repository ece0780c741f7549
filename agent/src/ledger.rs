//! Keeping exported flow counters monotonic while the kernel's LRU flow
//! table evicts and re-creates entries.
//!
//! Each read of the flow table is compared with the previous one. A flow
//! that disappeared was evicted; a flow whose first-seen time changed, or
//! whose count went down, was evicted and created again. In both cases the
//! last count read is added to the flow's *base*, and the exported value is
//! base + current count, so it never decreases. Notifications that arrived
//! between the last read and the eviction are not in the flow (they are in
//! the endpoint totals, which never evict): the ledger counts them as lost
//! evidence per endpoint, direction and class (`crate::unattributed`). Dead flows are kept up to a
//! bound, then folded into per-label-set aggregates, which is all that
//! `verdict_agent_policy_verdicts_total` needs.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use verdict_common::maps::{FlowKey, LEDGER_AGGREGATE_MARK, LedgerRecord, VerdictClass};

use crate::{
    bpf::snapshot::{FlowTotals, MapSnapshot},
    model::{Direction, FlowRecord, NotifySource, Verdict},
    readiness_totals::{self, ReadinessTotals},
    unattributed::{ClassKey, LostEvidence, Unattributed},
};

/// The label set of `verdict_agent_policy_verdicts_total`: a flow without
/// its remote side and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggregateKey {
    pub endpoint_id: u16,
    pub direction: u8,
    pub class: u8,
    pub match_type: u8,
    pub proto: u8,
    pub notify_type: u8,
    pub reason: u8,
}

impl From<&FlowKey> for AggregateKey {
    fn from(k: &FlowKey) -> Self {
        AggregateKey {
            endpoint_id: k.endpoint_id,
            direction: k.direction,
            class: k.class,
            match_type: k.match_type,
            proto: k.proto,
            notify_type: k.notify_type,
            reason: k.reason,
        }
    }
}

/// Exported totals of one flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub notifications: u64,
    pub bytes: u64,
}

impl Totals {
    fn add(&mut self, notifications: u64, bytes: u64) {
        self.notifications += notifications;
        self.bytes += bytes;
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    /// Counts of earlier incarnations of this flow.
    base: Totals,
    /// The kernel's counters at the latest read (zero while evicted).
    observed: FlowTotals,
    live: bool,
    first_seen: SystemTime,
    last_seen: SystemTime,
}

impl Entry {
    fn totals(&self) -> Totals {
        Totals {
            notifications: self.base.notifications + self.observed.notifications,
            bytes: self.base.bytes + self.observed.bytes,
        }
    }
}

pub struct FlowLedger {
    entries: HashMap<FlowKey, Entry>,
    /// Keys whose state changed since the last `take_changes`.
    changed: HashSet<FlowKey>,
    /// Keys folded away since the last `take_changes`.
    removed: Vec<FlowKey>,
    changed_aggregates: HashSet<AggregateKey>,
    /// Dead flows folded away, per aggregate label set.
    retired: HashMap<AggregateKey, Totals>,
    /// Dead flows kept individually before folding.
    max_dead: usize,
    dead: usize,
    evictions_observed: u64,
    /// Verdicts of the endpoint totals that no flow read carries.
    unattributed: Unattributed,
    /// The readiness engine's counters, stored here so they survive a restart.
    readiness_totals: ReadinessTotals,
    readiness_changed: Vec<(crate::readiness_totals::ReadinessCounter, u64)>,
}

impl FlowLedger {
    pub fn new(max_dead: usize) -> FlowLedger {
        FlowLedger {
            entries: HashMap::new(),
            changed: HashSet::new(),
            removed: Vec::new(),
            changed_aggregates: HashSet::new(),
            retired: HashMap::new(),
            max_dead,
            dead: 0,
            evictions_observed: 0,
            unattributed: Unattributed::default(),
            readiness_totals: ReadinessTotals::new(),
            readiness_changed: Vec::new(),
        }
    }

    /// A ledger continuing from persisted state (see `bpf::ledger_store`).
    /// The next `update` reconciles it with the kernel: flows evicted or
    /// re-created while no agent ran get their last known count as base.
    pub fn restore(max_dead: usize, records: impl IntoIterator<Item = (FlowKey, LedgerRecord)>) -> FlowLedger {
        let mut ledger = FlowLedger::new(max_dead);
        for (key, r) in records {
            if ledger.unattributed.restore(&key, &r) {
                continue;
            }
            if let Some((counter, value)) = readiness_totals::from_record(&key, &r) {
                ledger.readiness_totals.insert(counter, value);
                continue;
            }
            if key._pad == LEDGER_AGGREGATE_MARK {
                let totals = Totals { notifications: r.base_notifications, bytes: r.base_bytes };
                ledger.retired.insert(AggregateKey::from(&key), totals);
                continue;
            }
            let live = r.live != 0;
            if !live {
                ledger.dead += 1;
            }
            ledger.entries.insert(
                key,
                Entry {
                    base: Totals { notifications: r.base_notifications, bytes: r.base_bytes },
                    observed: FlowTotals {
                        notifications: r.observed_notifications,
                        bytes: r.observed_bytes,
                        first_seen_ns: r.incarnation_first_seen_ns,
                        last_seen_ns: 0,
                    },
                    live,
                    first_seen: UNIX_EPOCH + Duration::from_nanos(r.first_seen_unix_ns),
                    last_seen: UNIX_EPOCH + Duration::from_nanos(r.last_seen_unix_ns),
                },
            );
        }
        ledger
    }

    /// Records to persist and keys to delete since the last call.
    pub fn take_changes(&mut self) -> (Vec<(FlowKey, LedgerRecord)>, Vec<FlowKey>) {
        let mut out: Vec<(FlowKey, LedgerRecord)> =
            self.changed.drain().filter_map(|k| self.entries.get(&k).map(|e| (k, record_of(e)))).collect();
        for agg in self.changed_aggregates.drain() {
            if let Some(t) = self.retired.get(&agg) {
                out.push((
                    aggregate_key(&agg),
                    LedgerRecord { base_notifications: t.notifications, base_bytes: t.bytes, ..Default::default() },
                ));
            }
        }
        out.extend(self.unattributed.take_changes());
        out.extend(self.readiness_changed.drain(..).map(|(c, v)| readiness_totals::to_record(c, v)));
        // The first read marks every flow changed: do not keep a 100 k-slot
        // set around for the handful that change per read afterwards.
        self.changed.shrink_to(out.len().min(4096));
        self.changed_aggregates.shrink_to(64);
        (out, std::mem::take(&mut self.removed))
    }

    /// Takes one read of the flow table into account.
    pub fn update(&mut self, snapshot: &MapSnapshot) {
        let clock = snapshot.clock;
        let mut seen: HashMap<FlowKey, ()> = HashMap::with_capacity(snapshot.flows.len());
        for (key, cur) in &snapshot.flows {
            seen.insert(*key, ());
            let first = clock.to_wall(cur.first_seen_ns);
            let last = clock.to_wall(cur.last_seen_ns);
            match self.entries.get_mut(key) {
                None => {
                    self.changed.insert(*key);
                    self.entries.insert(
                        *key,
                        Entry {
                            base: Totals::default(),
                            observed: *cur,
                            live: true,
                            first_seen: first,
                            last_seen: last,
                        },
                    );
                }
                Some(e) => {
                    let recreated = cur.first_seen_ns != e.observed.first_seen_ns
                        || cur.notifications < e.observed.notifications
                        || cur.bytes < e.observed.bytes;
                    if e.live && recreated {
                        e.base.add(e.observed.notifications, e.observed.bytes);
                        self.evictions_observed += 1;
                    }
                    if !e.live {
                        self.dead -= 1;
                    }
                    if !e.live || e.observed != *cur {
                        self.changed.insert(*key);
                    }
                    e.observed = *cur;
                    e.live = true;
                    e.first_seen = e.first_seen.min(first);
                    e.last_seen = e.last_seen.max(last);
                }
            }
        }
        for (key, e) in self.entries.iter_mut() {
            if e.live && !seen.contains_key(key) {
                e.base.add(e.observed.notifications, e.observed.bytes);
                e.observed = FlowTotals::default();
                e.live = false;
                self.dead += 1;
                self.evictions_observed += 1;
                self.changed.insert(*key);
            }
        }
        self.fold_oldest_dead();
        let attributed = self.attributed();
        self.unattributed.update(&snapshot.endpoints, &attributed, snapshot.clock.taken_at());
    }

    /// Notifications attributed to flows (live, evicted or folded) per
    /// endpoint, direction and verdict class.
    pub fn attributed(&self) -> HashMap<ClassKey, u64> {
        let mut out: HashMap<ClassKey, u64> = HashMap::new();
        for (agg, t) in &self.retired {
            *out.entry((agg.endpoint_id, agg.direction, agg.class)).or_default() += t.notifications;
        }
        for (key, e) in &self.entries {
            *out.entry((key.endpoint_id, key.direction, key.class)).or_default() += e.totals().notifications;
        }
        out
    }

    /// Verdicts counted in the endpoint totals that no flow read carries.
    pub fn lost_evidence(&self) -> Vec<LostEvidence> {
        self.unattributed.lost()
    }

    /// The readiness counters restored from the pinned ledger.
    pub fn readiness_totals(&self) -> &ReadinessTotals {
        &self.readiness_totals
    }

    /// Takes the readiness engine's latest counters; only grown ones are
    /// written (a counter never goes down, so a smaller value is ignored).
    pub fn set_readiness_totals(&mut self, totals: &ReadinessTotals) {
        for (&counter, &value) in totals {
            let known = self.readiness_totals.entry(counter).or_default();
            if value > *known {
                *known = value;
                self.readiness_changed.push((counter, value));
            }
        }
    }

    fn fold_oldest_dead(&mut self) {
        if self.dead <= self.max_dead {
            return;
        }
        let mut dead: Vec<(SystemTime, FlowKey)> =
            self.entries.iter().filter(|(_, e)| !e.live).map(|(k, e)| (e.last_seen, *k)).collect();
        dead.sort();
        let excess = self.dead - self.max_dead;
        for (_, key) in dead.into_iter().take(excess) {
            if let Some(e) = self.entries.remove(&key) {
                let t = e.totals();
                let agg = AggregateKey::from(&key);
                self.retired.entry(agg).or_default().add(t.notifications, t.bytes);
                self.changed_aggregates.insert(agg);
                self.changed.remove(&key);
                self.removed.push(key);
                self.dead -= 1;
            }
        }
    }

    /// Evictions (and re-creations) this ledger has seen between reads.
    pub fn evictions_observed(&self) -> u64 {
        self.evictions_observed
    }

    /// Totals per aggregate label set, including folded flows.
    pub fn aggregates(&self) -> HashMap<AggregateKey, Totals> {
        let mut out = self.retired.clone();
        for (key, e) in &self.entries {
            let t = e.totals();
            out.entry(AggregateKey::from(key)).or_default().add(t.notifications, t.bytes);
        }
        out
    }

    /// Every flow still known individually, live or evicted.
    pub fn records(&self) -> Vec<FlowRecord> {
        let mut out: Vec<FlowRecord> = self.entries.iter().filter_map(|(k, e)| to_record(k, e)).collect();
        out.sort_by(|a, b| {
            (a.endpoint_id, a.direction, a.remote_identity, a.proto, a.dst_port, a.verdict).cmp(&(
                b.endpoint_id,
                b.direction,
                b.remote_identity,
                b.proto,
                b.dst_port,
                b.verdict,
            ))
        });
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn record_of(e: &Entry) -> LedgerRecord {
    LedgerRecord {
        base_notifications: e.base.notifications,
        base_bytes: e.base.bytes,
        observed_notifications: e.observed.notifications,
        observed_bytes: e.observed.bytes,
        incarnation_first_seen_ns: e.observed.first_seen_ns,
        first_seen_unix_ns: unix_ns(e.first_seen),
        last_seen_unix_ns: unix_ns(e.last_seen),
        live: e.live as u64,
    }
}

/// The ledger key holding an aggregate's folded totals.
fn aggregate_key(a: &AggregateKey) -> FlowKey {
    FlowKey {
        endpoint_id: a.endpoint_id,
        direction: a.direction,
        class: a.class,
        match_type: a.match_type,
        proto: a.proto,
        notify_type: a.notify_type,
        reason: a.reason,
        _pad: LEDGER_AGGREGATE_MARK,
        ..Default::default()
    }
}

fn to_record(key: &FlowKey, e: &Entry) -> Option<FlowRecord> {
    let t = e.totals();
    Some(FlowRecord {
        endpoint_id: key.endpoint_id,
        direction: Direction::from_cilium(key.direction)?,
        remote_identity: key.remote_identity,
        proto: key.proto,
        dst_port: key.dst_port,
        verdict: Verdict::from(VerdictClass::from_u8(key.class)?),
        match_type: key.match_type,
        source: if key.notify_type == verdict_common::cilium::notify_type::DROP {
            NotifySource::PolicyDrop
        } else {
            NotifySource::PolicyVerdict
        },
        reason: key.reason,
        ipv6: key.flags & verdict_common::maps::FLOW_FLAG_IPV6 != 0,
        notifications: t.notifications,
        bytes: t.bytes,
        first_seen: e.first_seen,
        last_seen: e.last_seen,
        remote_addrs: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::snapshot::KernelClock;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            endpoint_id: 7,
            dst_port: port,
            remote_identity: 2,
            proto: 6,
            direction: 1,
            class: 2,
            notify_type: 5,
            ..Default::default()
        }
    }

    fn snap(flows: &[(u16, u64, u64)]) -> MapSnapshot {
        MapSnapshot {
            clock: KernelClock::now(),
            endpoints: vec![],
            live_flows: flows.len(),
            flows: flows
                .iter()
                .map(|&(port, n, first)| {
                    (
                        key(port),
                        FlowTotals { notifications: n, bytes: n * 60, first_seen_ns: first, last_seen_ns: first + n },
                    )
                })
                .collect(),
            stats: Default::default(),
            read_duration: Default::default(),
        }
    }

    fn total(l: &FlowLedger, port: u16) -> u64 {
        l.records().iter().find(|r| r.dst_port == port).map(|r| r.notifications).unwrap_or(0)
    }

    #[test]
    fn eviction_keeps_the_count() {
        let mut l = FlowLedger::new(100);
        l.update(&snap(&[(22, 5, 100), (443, 3, 100)]));
        l.update(&snap(&[(443, 4, 100)])); // 22 evicted
        assert_eq!(total(&l, 22), 5);
        assert_eq!(l.evictions_observed(), 1);
        l.update(&snap(&[(22, 2, 900), (443, 4, 100)])); // 22 re-created
        assert_eq!(total(&l, 22), 7);
        assert_eq!(total(&l, 443), 4);
    }

    #[test]
    fn recreation_between_reads_is_detected_by_first_seen() {
        let mut l = FlowLedger::new(100);
        l.update(&snap(&[(22, 5, 100)]));
        // Evicted and re-created between two reads, already past the old count.
        l.update(&snap(&[(22, 9, 500)]));
        assert_eq!(total(&l, 22), 14);
    }

    #[test]
    fn folded_dead_flows_stay_in_the_aggregates() {
        let mut l = FlowLedger::new(1);
        l.update(&snap(&[(1, 1, 10), (2, 2, 10), (3, 3, 10)]));
        l.update(&snap(&[]));
        assert_eq!(l.len(), 1, "only one dead flow kept individually");
        let agg: u64 = l.aggregates().values().map(|t| t.notifications).sum();
        assert_eq!(agg, 6);
    }

    #[test]
    fn a_restored_ledger_continues_across_evictions_while_down() {
        let mut l = FlowLedger::new(1);
        l.update(&snap(&[(22, 5, 100), (443, 3, 100), (80, 1, 100), (81, 1, 100)]));
        l.update(&snap(&[(22, 6, 100), (443, 3, 100)])); // 80, 81 evicted; one folded
        let (changes, removed) = l.take_changes();
        assert_eq!(removed.len(), 1);
        // Restart: 22 was evicted and re-created while no agent ran, 443 evicted.
        // The store holds each key once: the later write wins.
        let store: HashMap<FlowKey, LedgerRecord> = l_all(&l).into_iter().chain(changes).collect();
        let mut r = FlowLedger::restore(10, store);
        r.update(&snap(&[(22, 2, 900)]));
        assert_eq!(total(&r, 22), 8, "6 before the restart + 2 since");
        assert_eq!(total(&r, 443), 3);
        let agg: u64 = r.aggregates().values().map(|t| t.notifications).sum();
        assert_eq!(agg, 8 + 3 + 1 + 1);
    }

    /// Every record, as a pinned store would hold them after all writes.
    fn l_all(l: &FlowLedger) -> Vec<(FlowKey, LedgerRecord)> {
        let mut v: Vec<_> = l.entries.iter().map(|(k, e)| (*k, record_of(e))).collect();
        v.extend(l.retired.iter().map(|(a, t)| {
            (
                aggregate_key(a),
                LedgerRecord { base_notifications: t.notifications, base_bytes: t.bytes, ..Default::default() },
            )
        }));
        v
    }

    #[test]
    fn totals_never_decrease() {
        let mut l = FlowLedger::new(2);
        let mut last = 0;
        let reads: &[&[(u16, u64, u64)]] =
            &[&[(1, 3, 10)], &[(1, 5, 10), (2, 1, 20)], &[(2, 4, 20)], &[(1, 1, 99)], &[], &[(3, 1, 5)], &[(1, 2, 99)]];
        for r in reads {
            l.update(&snap(r));
            let sum: u64 = l.aggregates().values().map(|t| t.notifications).sum();
            assert!(sum >= last, "aggregate went down from {last} to {sum}");
            last = sum;
        }
    }
}
