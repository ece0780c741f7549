//! What the running agent knows right now, shared between the map reader
//! (writer), the HTTP handlers and the collectors (readers). Rebuilt once
//! per map read; a scrape only reads it.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Instant, SystemTime},
};

use crate::{
    bpf::{
        events_map::EventsMapState,
        loader::{NotificationRead, TapKind},
        snapshot::MapSnapshot,
    },
    ledger::{AggregateKey, Totals},
    model::FlowRecord,
    readiness_totals::ReadinessTotals,
    unattributed::LostEvidence,
};

#[derive(Debug)]
pub struct AgentView {
    pub started: SystemTime,
    pub tap: TapKind,
    /// How the tap copies each notification (direct loads or a probe read).
    pub notification_read: NotificationRead,
    pub events_map: EventsMapState,
    pub flow_table_capacity: u32,
    /// Latest read of the maps (None before the first).
    pub snapshot: Option<MapSnapshot>,
    /// `verdict_agent_policy_verdicts_total` values.
    pub aggregates: HashMap<AggregateKey, Totals>,
    /// Every flow known individually, with monotonic totals. Shared, so
    /// readers take a reference instead of a copy of 100 k records.
    pub flows: Arc<[FlowRecord]>,
    /// Verdicts in the endpoint totals that no flow read carries.
    pub lost_evidence: Arc<[LostEvidence]>,
    /// The readiness engine's `_total` counters: restored from the pinned
    /// ledger at start, then published by the engine after each evaluation
    /// for the map reader to persist.
    pub readiness_totals: ReadinessTotals,
    pub map_reads: u64,
    pub last_read: Option<Instant>,
    pub map_read_errors: u64,
    /// What the readiness loop tells the kernel through the flow config:
    /// the host endpoint (world probes of it on non-critical ports go to the
    /// world-port table) and the critical ports (protocol, port) that keep
    /// flows of their own.
    pub world_ports: WorldPortSettings,
}

/// See [`AgentView::world_ports`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorldPortSettings {
    pub host_endpoint: Option<u16>,
    pub critical_ports: Vec<(u8, u16)>,
}

pub type SharedView = Arc<RwLock<AgentView>>;

impl AgentView {
    pub fn new(
        tap: TapKind,
        notification_read: NotificationRead,
        events_map: EventsMapState,
        flow_table_capacity: u32,
    ) -> AgentView {
        AgentView {
            started: SystemTime::now(),
            tap,
            notification_read,
            events_map,
            flow_table_capacity,
            snapshot: None,
            aggregates: HashMap::new(),
            flows: Arc::from([]),
            lost_evidence: Arc::from([]),
            readiness_totals: ReadinessTotals::new(),
            map_reads: 0,
            last_read: None,
            map_read_errors: 0,
            world_ports: WorldPortSettings::default(),
        }
    }
}
