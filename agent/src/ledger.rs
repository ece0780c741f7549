//! Flow totals from the kernel's reads, kept across slot reuse, restarts
//! and the world-port table.
//!
//! The kernel's flow table never drops a count nobody has read
//! (`verdict_common::flow_table`): each read hands over, per occupied slot,
//! what the slot counted since the last acknowledged read, and the ledger
//! adds it to the flow's totals, which therefore never decrease. A flow no
//! slot holds any more is *dead*: its totals stay, up to a bound, then are
//! folded into per-label-set aggregates, which is all that
//! `verdict_agent_policy_verdicts_total` needs.
//!
//! World verdicts to the host on non-critical ports come from the
//! world-port table as absolute counts per port and kind; the ledger keeps
//! one record per port and kind (flag `FLOW_FLAG_WORLD_PORT`) and takes the
//! growth. It also judges each such port by behaviour
//! ([`crate::scan_behaviour`]): a port that only ever grew inside a burst of
//! many ports from world is scan noise however often the scanner returns.
//!
//! Whatever the endpoint totals hold beyond what the ledger attributed is
//! lost evidence per endpoint, direction and class (`crate::unattributed`).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use verdict_common::{
    cilium::{direction, notify_type},
    flow_table::world_port_kind_parts,
    maps::{
        FLOW_FLAG_WORLD_PORT, FlowKey, LEDGER_AGGREGATE_MARK, LEDGER_FLAG_SERVICE_LIKE, LedgerRecord, VerdictClass,
    },
};

use crate::{
    bpf::snapshot::{MapSnapshot, epoch_time},
    model::{Direction, FlowRecord, NotifySource, PortAggregate, Verdict},
    readiness_totals::{self, ReadinessTotals},
    scan_behaviour::ScanBehaviour,
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
    totals: Totals,
    /// A kernel slot held the flow at the latest read.
    live: bool,
    first_seen: SystemTime,
    last_seen: SystemTime,
}

impl Entry {
    fn new(at: SystemTime) -> Entry {
        Entry { totals: Totals::default(), live: true, first_seen: at, last_seen: at }
    }

    fn totals(&self) -> Totals {
        self.totals
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
    /// World ports judged by how they grew.
    scan: ScanBehaviour,
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
            scan: ScanBehaviour::default(),
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
            if key.flags & FLOW_FLAG_WORLD_PORT != 0 && r.flags & LEDGER_FLAG_SERVICE_LIKE != 0 {
                ledger.scan.restore_service_like(key.proto, key.dst_port);
            }
            ledger.entries.insert(
                key,
                Entry {
                    totals: Totals { notifications: r.base_notifications, bytes: r.base_bytes },
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
        let scan = &self.scan;
        let mut out: Vec<(FlowKey, LedgerRecord)> =
            self.changed.drain().filter_map(|k| self.entries.get(&k).map(|e| (k, record_of(&k, e, scan)))).collect();
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

    /// Takes one read of the counting maps into account.
    pub fn update(&mut self, snapshot: &MapSnapshot) {
        let at = snapshot.taken_at;
        let mut seen: HashSet<FlowKey> = HashSet::with_capacity(snapshot.flows.len());
        for slot in &snapshot.flows {
            seen.insert(slot.key);
            let bounds = seen_bounds(slot.first_seen_s, slot.last_seen_s, at);
            self.note_read(slot.key, bounds, |_| (slot.notifications, slot.bytes));
        }
        self.update_world_ports(snapshot, &mut seen);
        for (key, e) in self.entries.iter_mut() {
            if e.live && !seen.contains(key) {
                e.live = false;
                self.dead += 1;
                self.evictions_observed += 1;
                self.changed.insert(*key);
            }
        }
        self.fold_oldest_dead();
        let attributed = self.attributed();
        self.unattributed.update(&snapshot.endpoints, &attributed, at);
    }

    /// The world-port table: one record per port and kind, on the host
    /// endpoint it counts for, growing with the kernel's absolute count.
    fn update_world_ports(&mut self, snapshot: &MapSnapshot, seen: &mut HashSet<FlowKey>) {
        let Some(host) = snapshot.world_ports_endpoint else { return };
        let at = snapshot.taken_at;
        let mut grown: Vec<(u8, u16, u64)> = Vec::new();
        for port in &snapshot.world_ports {
            let mut port_growth = 0;
            for (kind, &count) in port.counts.iter().enumerate() {
                if count == 0 {
                    continue;
                }
                let (class, match_none) = world_port_kind_parts(kind);
                let match_type = if match_none { 0 } else { port.audited_match_type.max(1) };
                let key = world_port_key(host, port.proto, port.port, class, match_type);
                seen.insert(key);
                let bounds = seen_bounds(port.first_seen_s, port.last_seen_s, at);
                // The kernel's count is absolute: the growth is what is new.
                port_growth += self.note_read(key, bounds, |totals| (count.saturating_sub(totals.notifications), 0));
            }
            if port_growth > 0 {
                grown.push((port.proto, port.port, port_growth));
            }
        }
        for (proto, port) in self.scan.observe(&grown, at) {
            // A port newly judged real use: persist the judgement.
            for e in self.entries.keys().filter(|k| is_world_port_of(k, proto, port)) {
                self.changed.insert(*e);
            }
        }
    }

    /// One flow seen in this read: created or revived, and `new_counts`
    /// (given the totals so far) added. Returns the notifications added.
    fn note_read(
        &mut self,
        key: FlowKey,
        (first, last): (SystemTime, SystemTime),
        new_counts: impl FnOnce(&Totals) -> (u64, u64),
    ) -> u64 {
        let e = self.entries.entry(key).or_insert_with(|| {
            self.changed.insert(key);
            Entry::new(first)
        });
        if !e.live {
            e.live = true;
            self.dead -= 1;
            self.changed.insert(key);
        }
        let (notifications, bytes) = new_counts(&e.totals);
        if notifications > 0 || bytes > 0 {
            e.totals.add(notifications, bytes);
            e.first_seen = e.first_seen.min(first);
            e.last_seen = e.last_seen.max(last);
            self.changed.insert(key);
        }
        notifications
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
        let mut out: Vec<FlowRecord> = self.entries.iter().filter_map(|(k, e)| to_record(k, e, &self.scan)).collect();
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

/// Turns the kernel's epoch seconds into times a reader can compare with
/// instants: the epoch is whole seconds and written every second, so a
/// notification stamped `s` happened in [s, s + 2 s), and before this read.
/// First-seen takes the earliest possible time, last-seen the latest (an
/// enforcement trial counts what came after its switch: in doubt, after).
fn seen_bounds(first_s: u32, last_s: u32, taken_at: SystemTime) -> (SystemTime, SystemTime) {
    let first = epoch_time(first_s as u64, taken_at).min(taken_at);
    let last = if last_s == 0 {
        taken_at
    } else {
        (epoch_time(last_s as u64, taken_at) + Duration::from_secs(2)).min(taken_at)
    };
    (first.min(last), last)
}

fn record_of(key: &FlowKey, e: &Entry, scan: &ScanBehaviour) -> LedgerRecord {
    let service_like = key.flags & FLOW_FLAG_WORLD_PORT != 0 && scan.service_like(key.proto, key.dst_port);
    LedgerRecord {
        base_notifications: e.totals.notifications,
        base_bytes: e.totals.bytes,
        flags: if service_like { LEDGER_FLAG_SERVICE_LIKE } else { 0 },
        first_seen_unix_ns: unix_ns(e.first_seen),
        last_seen_unix_ns: unix_ns(e.last_seen),
        live: e.live as u64,
        ..Default::default()
    }
}

/// The ledger key of one port and kind of the world-port table.
pub fn world_port_key(host: u16, proto: u8, port: u16, class: VerdictClass, match_type: u8) -> FlowKey {
    FlowKey {
        endpoint_id: host,
        dst_port: port,
        remote_identity: verdict_common::classify::WORLD_IDENTITY,
        proto,
        direction: direction::INGRESS,
        class: class as u8,
        match_type,
        notify_type: notify_type::POLICY_VERDICT,
        reason: 0,
        flags: FLOW_FLAG_WORLD_PORT,
        _pad: 0,
    }
}

fn is_world_port_of(key: &FlowKey, proto: u8, port: u16) -> bool {
    key.flags & FLOW_FLAG_WORLD_PORT != 0 && key.proto == proto && key.dst_port == port && key._pad == 0
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

fn to_record(key: &FlowKey, e: &Entry, scan: &ScanBehaviour) -> Option<FlowRecord> {
    let t = e.totals();
    Some(FlowRecord {
        endpoint_id: key.endpoint_id,
        direction: Direction::from_cilium(key.direction)?,
        remote_identity: key.remote_identity,
        proto: key.proto,
        dst_port: key.dst_port,
        verdict: Verdict::from(VerdictClass::from_u8(key.class)?),
        match_type: key.match_type,
        source: if key.notify_type == notify_type::DROP {
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
        port_aggregate: (key.flags & FLOW_FLAG_WORLD_PORT != 0)
            .then(|| PortAggregate { scan_only: !scan.service_like(key.proto, key.dst_port) }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::flow_table::{FlowRead, WorldPortRead};

    fn key(port: u16) -> FlowKey {
        FlowKey {
            endpoint_id: 7,
            dst_port: port,
            remote_identity: 6,
            proto: 6,
            direction: 1,
            class: 2,
            notify_type: 5,
            ..Default::default()
        }
    }

    /// A read: (port, notifications since the last read) per occupied slot.
    fn snap(slots: &[(u16, u64)]) -> MapSnapshot {
        MapSnapshot {
            live_flows: slots.len(),
            flows: slots
                .iter()
                .map(|&(port, n)| FlowRead {
                    key: key(port),
                    notifications: n,
                    bytes: n * 60,
                    first_seen_s: 1_800_000_000,
                    last_seen_s: 1_800_000_000,
                })
                .collect(),
            ..MapSnapshot::empty()
        }
    }

    fn total(l: &FlowLedger, port: u16) -> u64 {
        l.records()
            .iter()
            .find(|r| r.dst_port == port && r.port_aggregate.is_none())
            .map(|r| r.notifications)
            .unwrap_or(0)
    }

    #[test]
    fn counts_add_up_across_reads_and_slot_reuse() {
        let mut l = FlowLedger::new(100);
        l.update(&snap(&[(22, 5), (443, 3)]));
        l.update(&snap(&[(443, 1)])); // 22's slot reused after its counts were read
        assert_eq!(total(&l, 22), 5);
        assert_eq!(l.evictions_observed(), 1);
        l.update(&snap(&[(22, 2), (443, 0)])); // 22 back, in another slot
        assert_eq!((total(&l, 22), total(&l, 443)), (7, 4));
    }

    #[test]
    fn a_flow_on_two_cpus_sums_its_slots() {
        let mut l = FlowLedger::new(100);
        l.update(&snap(&[(22, 5), (22, 2)]));
        l.update(&snap(&[(22, 1)])); // one CPU's slot reused, the other grew
        assert_eq!(total(&l, 22), 8);
    }

    #[test]
    fn folded_dead_flows_stay_in_the_aggregates() {
        let mut l = FlowLedger::new(1);
        l.update(&snap(&[(1, 1), (2, 2), (3, 3)]));
        l.update(&snap(&[]));
        assert_eq!(l.len(), 1, "only one dead flow kept individually");
        let agg: u64 = l.aggregates().values().map(|t| t.notifications).sum();
        assert_eq!(agg, 6);
    }

    #[test]
    fn a_restored_ledger_continues() {
        let mut l = FlowLedger::new(1);
        l.update(&snap(&[(22, 5), (443, 3), (80, 1), (81, 1)]));
        l.update(&snap(&[(22, 1), (443, 0)])); // 80, 81 gone; one folded
        let (changes, removed) = l.take_changes();
        assert_eq!(removed.len(), 1);
        let store: HashMap<FlowKey, LedgerRecord> = l_all(&l).into_iter().chain(changes).collect();
        let mut r = FlowLedger::restore(10, store);
        r.update(&snap(&[(22, 2)]));
        assert_eq!(total(&r, 22), 8, "6 before the restart + 2 since");
        assert_eq!(total(&r, 443), 3);
        let agg: u64 = r.aggregates().values().map(|t| t.notifications).sum();
        assert_eq!(agg, 8 + 3 + 1 + 1);
    }

    /// Every record, as a pinned store would hold them after all writes.
    fn l_all(l: &FlowLedger) -> Vec<(FlowKey, LedgerRecord)> {
        let mut v: Vec<_> = l.entries.iter().map(|(k, e)| (*k, record_of(k, e, &l.scan))).collect();
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
        let reads: &[&[(u16, u64)]] = &[&[(1, 3)], &[(1, 2), (2, 1)], &[(2, 3)], &[(1, 1)], &[], &[(3, 1)], &[(1, 1)]];
        for r in reads {
            l.update(&snap(r));
            let sum: u64 = l.aggregates().values().map(|t| t.notifications).sum();
            assert!(sum >= last, "aggregate went down from {last} to {sum}");
            last = sum;
        }
        assert_eq!(last, 12);
    }

    fn world(ports: &[(u16, u64)]) -> MapSnapshot {
        let mut s = MapSnapshot::empty();
        s.world_ports_endpoint = Some(7);
        s.world_ports = ports
            .iter()
            .map(|&(port, audited)| WorldPortRead {
                proto: 6,
                port,
                counts: [0, 0, 0, audited, 0],
                audited_match_type: 0,
                first_seen_s: 1_800_000_000,
                last_seen_s: 1_800_000_000,
            })
            .collect();
        s
    }

    #[test]
    fn world_ports_become_port_records_and_a_scan_stays_noise() {
        let mut l = FlowLedger::new(100);
        let scan: Vec<(u16, u64)> = (1000..1100).map(|p| (p, 1)).collect();
        l.update(&world(&scan));
        let again: Vec<(u16, u64)> = (1000..1100).map(|p| (p, 2)).collect();
        l.update(&world(&again)); // the scanner came back
        let records = l.records();
        assert_eq!(records.len(), 100);
        assert!(
            records.iter().all(|r| r.notifications == 2 && r.remote_identity == 2 && r.verdict == Verdict::Audited)
        );
        assert!(records.iter().all(|r| r.port_aggregate == Some(PortAggregate { scan_only: true })));
        // A real service: busy, alone.
        let mut busy = again.clone();
        busy.push((8443, 40));
        l.update(&world(&busy));
        let r = l.records().into_iter().find(|r| r.dst_port == 8443).unwrap();
        assert_eq!(r.port_aggregate, Some(PortAggregate { scan_only: false }));
        // The judgement survives a restart.
        let store: HashMap<FlowKey, LedgerRecord> = l_all(&l).into_iter().collect();
        let r = FlowLedger::restore(100, store);
        let recs = r.records();
        let service = recs.iter().find(|r| r.dst_port == 8443).unwrap();
        assert_eq!(service.port_aggregate, Some(PortAggregate { scan_only: false }));
        assert_eq!(recs.iter().filter(|r| r.port_aggregate == Some(PortAggregate { scan_only: true })).count(), 100);
    }
}
