//! Prometheus collectors. Each encodes straight from the shared view at
//! scrape time, so the registry holds no per-series state and a scrape
//! costs what the output costs.

use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use verdict_common::{
    cilium::notify_type,
    maps::{Stat, VerdictClass},
};

use crate::{
    cilium::monitor::api::{drop_reason_text, match_type_name},
    model::{Direction, EndpointDirectory, proto_name},
    owner_baseline::{Owner, OwnerBaselines},
    state::SharedView,
};

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family from (labels, value) rows.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    let mut rows: Vec<(Labels, M)> = rows.into_iter().collect();
    if rows.len() == 1 && rows[0].0.is_empty() {
        // A single unlabelled series: no `{}` after the name.
        let (_, metric) = rows.remove(0);
        return metric.encode(family);
    }
    for (labels, metric) in rows {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: i64) -> ConstGauge<i64> {
    ConstGauge::new(v)
}

/// `verdict` label of the overflow counters, by `EndpointCounters::overflow`
/// index: the verdict classes, then policy drops.
fn overflow_kind(index: usize) -> &'static str {
    match VerdictClass::ALL.get(index) {
        Some(class) => class.as_str(),
        None => "policy_drop",
    }
}

/// The per-endpoint label set: endpoint, kind, namespace, pod.
pub fn endpoint_labels(directory: &dyn EndpointDirectory, id: u16) -> Labels {
    crate::enrich::EndpointLabels::new(id, directory.endpoint(id).as_ref()).to_vec()
}

/// A readable, bounded name for the remote side of a flow.
pub fn remote_name(directory: &dyn EndpointDirectory, id: u32) -> String {
    crate::enrich::remote_name(id, directory.identity_labels(id).as_deref())
}

/// Verdict counters and pipeline health.
pub struct VerdictCollector {
    view: SharedView,
    directory: Arc<dyn EndpointDirectory>,
    /// Some(limit): export per-flow series, at most `limit` of them.
    flow_metrics: Option<usize>,
    flow_series: std::sync::Mutex<FlowSeries>,
    /// Endpoints the directory reports deleted leave every per-endpoint
    /// family once their counters stopped moving (see enrich::retire).
    retirement: std::sync::Mutex<crate::enrich::SeriesRetirement>,
    /// Endpoint IDs reused by a new pod start from zero for it.
    owners: std::sync::Mutex<OwnerBaselines>,
}

/// Which flows have their own series. Membership is decided once, when the
/// collector first sees a flow: a flow never moves between its own series
/// and `remote="overflow"`, so neither ever goes down.
#[derive(Default)]
struct FlowSeries {
    own: std::collections::HashSet<FlowIdent>,
    in_overflow: std::collections::HashSet<FlowIdent>,
}

type FlowIdent = (u16, crate::model::Direction, u32, u8, u16, crate::model::Verdict);

impl VerdictCollector {
    pub fn new(view: SharedView, directory: Arc<dyn EndpointDirectory>, flow_metrics: Option<usize>) -> Self {
        VerdictCollector {
            view,
            directory,
            flow_metrics,
            flow_series: Default::default(),
            retirement: Default::default(),
            owners: Default::default(),
        }
    }

    /// How long a deleted endpoint's series stay after their last change
    /// (default `enrich::retire::DEFAULT_GRACE`).
    pub fn with_retirement_grace(mut self, grace: std::time::Duration) -> Self {
        self.retirement = std::sync::Mutex::new(crate::enrich::SeriesRetirement::new(grace));
        self
    }
}

impl fmt::Debug for VerdictCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerdictCollector")
    }
}

const VERDICT_HELP: &str = "Cilium policy verdict notifications. Allowed, audited and redirected \
    traffic is notified once per new connection, denied traffic once per packet.";

impl Collector for VerdictCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let dir = &*self.directory;
        let directions = [Direction::Ingress, Direction::Egress];

        if let Some(snap) = &view.snapshot {
            let totals = snap.endpoints.iter().map(|ep| {
                (ep.id, ep.verdicts.iter().flatten().chain(&ep.policy_drops).fold(0u64, |a, v| a.wrapping_add(*v)))
            });
            let retired = self.retirement.lock().unwrap_or_else(|e| e.into_inner()).retired(
                std::time::Instant::now(),
                totals,
                |id| dir.endpoint_gone(id),
            );
            let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            let mut rows = Vec::new();
            let mut drops = Vec::new();
            for ep in snap.endpoints.iter().filter(|ep| !retired.contains(&ep.id)) {
                owners.observe(ep, Owner::of(dir.endpoint(ep.id).as_ref()), &view.aggregates);
                let ep = &owners.endpoint(ep);
                let base = endpoint_labels(dir, ep.id);
                for (d, direction) in directions.iter().enumerate() {
                    for class in VerdictClass::ALL {
                        let mut l = base.clone();
                        l.push(("direction", direction.as_str().into()));
                        l.push(("verdict", class.as_str().into()));
                        rows.push((l, counter(ep.verdicts[d][class as usize])));
                    }
                }
            }
            family(
                &mut encoder,
                "verdict_agent_endpoint_verdicts",
                &format!("{VERDICT_HELP} Exact per-endpoint totals."),
                MetricType::Counter,
                rows,
            )?;

            let mut rows = Vec::new();
            let mut aggs: Vec<_> = view.aggregates.iter().collect();
            aggs.sort_by_key(|(k, _)| **k);
            for (k, t) in aggs.into_iter().filter(|(k, _)| !retired.contains(&k.endpoint_id)) {
                let Some(direction) = Direction::from_cilium(k.direction) else { continue };
                let mut l = endpoint_labels(dir, k.endpoint_id);
                l.push(("direction", direction.as_str().into()));
                let notifications = owners.aggregate(k, t.notifications);
                if k.notify_type == notify_type::DROP {
                    l.push(("reason", drop_reason_text(k.reason).map_or_else(|| k.reason.to_string(), str::to_owned)));
                    drops.push((l, counter(notifications)));
                    continue;
                }
                let Some(class) = VerdictClass::from_u8(k.class) else { continue };
                l.push(("verdict", class.as_str().into()));
                l.push(("match", match_type_name(k.match_type).into()));
                l.push(("proto", proto_name(k.proto)));
                rows.push((l, counter(notifications)));
            }
            family(
                &mut encoder,
                "verdict_agent_policy_verdicts",
                &format!("{VERDICT_HELP} By match type and protocol, from the flow table."),
                MetricType::Counter,
                rows,
            )?;
            family(
                &mut encoder,
                "verdict_agent_policy_drops",
                "Drop notifications with a policy reason, one per dropped packet.",
                MetricType::Counter,
                drops,
            )?;

            if let Some(limit) = self.flow_metrics {
                self.encode_flows(&mut encoder, &view.flows, &view.aggregates, limit, &retired)?;
            }

            let events = [
                ("counted", snap.stat(Stat::Counted)),
                ("filtered", snap.stat(Stat::Filtered)),
                (
                    "malformed",
                    snap.stat(Stat::MalformedTruncated)
                        + snap.stat(Stat::MalformedVersion)
                        + snap.stat(Stat::MalformedField)
                        + snap.stat(Stat::ReadFailed),
                ),
            ];
            family(
                &mut encoder,
                "verdict_agent_events",
                "Notifications written to cilium_events, by what the tap did with them.",
                MetricType::Counter,
                events.map(|(o, v)| (vec![("outcome", o.to_string())], counter(v))),
            )?;
            let malformed = [
                ("truncated", Stat::MalformedTruncated),
                ("unknown_version", Stat::MalformedVersion),
                ("bad_field", Stat::MalformedField),
                ("read_failed", Stat::ReadFailed),
            ];
            family(
                &mut encoder,
                "verdict_agent_malformed_events",
                "Notifications the tap could not account, by reason.",
                MetricType::Counter,
                malformed.map(|(r, s)| (vec![("reason", r.to_string())], counter(snap.stat(s)))),
            )?;
            family(
                &mut encoder,
                "verdict_agent_tap_other_map_writes",
                "Perf outputs to maps other than Cilium's cilium_events, ignored by the tap.",
                MetricType::Counter,
                [(vec![], counter(snap.stat(Stat::OtherMap)))],
            )?;

            let live = snap.live_flows as u64;
            family(
                &mut encoder,
                "verdict_agent_flow_table_entries",
                "Occupied slots in the kernel flow table (a flow counted on several CPUs has a slot on each).",
                MetricType::Gauge,
                [(vec![], gauge(live as i64))],
            )?;
            family(
                &mut encoder,
                "verdict_agent_flow_table_evictions",
                "Flow slots taken over by another flow after every count of the previous one was read \
                 (no count is lost: the kernel reuses only acknowledged slots).",
                MetricType::Counter,
                [(vec![], counter(snap.stat(Stat::FlowSlotsReused)))],
            )?;
            family(
                &mut encoder,
                "verdict_agent_flow_table_insert_failures",
                "Verdicts no flow slot could take (their bucket held only unread counts, or the table was not \
                 configured yet): in the endpoint totals and the overflow counters, in no flow.",
                MetricType::Counter,
                [(vec![], counter(snap.stat(Stat::FlowTableFull) + snap.stat(Stat::FlowTableUnavailable)))],
            )?;
            let overflow = snap.endpoints.iter().flat_map(|ep| {
                [(0usize, "ingress"), (1, "egress")].into_iter().flat_map(move |(slot, direction)| {
                    ep.overflow[slot]
                        .iter()
                        .enumerate()
                        .filter_map(move |(kind, &n)| (n > 0).then_some((ep.id, direction, overflow_kind(kind), n)))
                })
            });
            let overflow: Vec<_> = overflow
                .map(|(id, direction, verdict, n)| {
                    let mut labels = endpoint_labels(dir, id);
                    labels.push(("direction", direction.into()));
                    labels.push(("verdict", verdict.into()));
                    (labels, counter(n))
                })
                .collect();
            family(
                &mut encoder,
                "verdict_agent_flow_table_overflow_verdicts",
                "Verdicts of an endpoint that no flow slot could take, by direction and verdict \
                 (policy_drop: policy drop notifications): lost evidence for that endpoint.",
                MetricType::Counter,
                overflow,
            )?;
            family(
                &mut encoder,
                "verdict_agent_world_port_verdicts",
                "World verdicts to the host on non-critical ports, counted per port in the world-port table \
                 instead of per flow (so a port scan displaces no other flow).",
                MetricType::Counter,
                [(vec![], counter(snap.stat(Stat::WorldPort)))],
            )?;
            let lost = view.lost_evidence.iter().map(|l| {
                let mut labels = endpoint_labels(dir, l.endpoint_id);
                labels.push(("direction", l.direction.as_str().into()));
                labels.push(("verdict", l.verdict.as_str().into()));
                (labels, counter(l.verdicts))
            });
            family(
                &mut encoder,
                "verdict_agent_unattributed_verdicts",
                "Verdicts in the exact endpoint totals that no flow the agent read carries (evicted from the \
                 flow table before a read, or never created): lost evidence. While an endpoint's audited ones \
                 grow within the evidence window its readiness is no_evidence (evidence_lost).",
                MetricType::Counter,
                lost.collect::<Vec<_>>(),
            )?;
            family(
                &mut encoder,
                "verdict_agent_endpoint_id_out_of_range",
                "Notifications from endpoint IDs of 4096 and above (in flows, not in endpoint totals).",
                MetricType::Counter,
                [(vec![], counter(snap.stat(Stat::EndpointOutOfRange)))],
            )?;
            family(
                &mut encoder,
                "verdict_agent_map_read_duration_seconds",
                "Duration of the latest read of the BPF maps.",
                MetricType::Gauge,
                [(vec![], ConstGauge::new(snap.read_duration.as_secs_f64()))],
            )?;
        }

        family(
            &mut encoder,
            "verdict_agent_flow_table_capacity",
            "Slots of the kernel flow table, all CPU shards together.",
            MetricType::Gauge,
            [(vec![], gauge(view.flow_table_capacity as i64))],
        )?;
        family(
            &mut encoder,
            "verdict_agent_map_reads",
            "Reads of the BPF maps (per interval, never per event).",
            MetricType::Counter,
            [(vec![], counter(view.map_reads))],
        )?;
        family(
            &mut encoder,
            "verdict_agent_tap_info",
            "The tap feeding the counters.",
            MetricType::Gauge,
            [(
                vec![
                    ("tap", view.tap.as_str().to_string()),
                    ("function", crate::bpf::loader::HOOKED_FUNCTION.to_string()),
                    ("read", view.notification_read.as_str().to_string()),
                ],
                gauge(1),
            )],
        )?;
        let attached = view.tap.attached();
        family(
            &mut encoder,
            "verdict_agent_tap_attached",
            "1 while a tap is attached to the kernel.",
            MetricType::Gauge,
            [(vec![], gauge(attached as i64))],
        )?;
        let present = view.events_map.map_id.is_some();
        family(
            &mut encoder,
            "verdict_agent_cilium_events_map_present",
            "1 when the pinned cilium_events map exists.",
            MetricType::Gauge,
            [(vec![], gauge(present as i64))],
        )?;
        family(
            &mut encoder,
            "verdict_agent_cilium_events_map_info",
            "The cilium_events map the tap follows.",
            MetricType::Gauge,
            view.events_map.map_id.map(|id| {
                (vec![("path", view.events_map.path.display().to_string()), ("map_id", id.to_string())], gauge(1))
            }),
        )?;
        family(
            &mut encoder,
            "verdict_agent_build_info",
            "Build information.",
            MetricType::Gauge,
            [(vec![("version", env!("CARGO_PKG_VERSION").to_string())], gauge(1))],
        )?;
        Ok(())
    }
}

impl VerdictCollector {
    fn encode_flows(
        &self,
        encoder: &mut DescriptorEncoder,
        flows: &[crate::model::FlowRecord],
        aggregates: &std::collections::HashMap<crate::ledger::AggregateKey, crate::ledger::Totals>,
        limit: usize,
        retired: &std::collections::HashSet<u16>,
    ) -> fmt::Result {
        use std::collections::{BTreeMap, HashSet};
        let dir = &*self.directory;
        let mut series = self.flow_series.lock().unwrap_or_else(|e| e.into_inner());
        let verdict_flows: Vec<_> =
            flows.iter().filter(|f| f.source == crate::model::NotifySource::PolicyVerdict).collect();
        // Flows the ledger folded away leave both sets (their counts stay in
        // the totals, hence in the overflow series).
        let live: HashSet<FlowIdent> = verdict_flows
            .iter()
            .map(|f| (f.endpoint_id, f.direction, f.remote_identity, f.proto, f.dst_port, f.verdict))
            .collect();
        series.own.retain(|k| live.contains(k));
        series.in_overflow.retain(|k| live.contains(k));

        let mut rows = Vec::new();
        let mut own_totals: BTreeMap<(u16, &'static str, &'static str), u64> = BTreeMap::new();
        for f in verdict_flows.into_iter().filter(|f| !retired.contains(&f.endpoint_id)) {
            let ident = (f.endpoint_id, f.direction, f.remote_identity, f.proto, f.dst_port, f.verdict);
            if !series.own.contains(&ident) {
                if series.in_overflow.contains(&ident) || series.own.len() >= limit {
                    series.in_overflow.insert(ident);
                    continue;
                }
                series.own.insert(ident);
            }
            *own_totals.entry((f.endpoint_id, f.direction.as_str(), f.verdict.as_str())).or_default() +=
                f.notifications;
            let mut l = endpoint_labels(dir, f.endpoint_id);
            l.push(("direction", f.direction.as_str().into()));
            l.push(("verdict", f.verdict.as_str().into()));
            l.push(("remote", remote_name(dir, f.remote_identity)));
            l.push(("remote_identity", f.remote_identity.to_string()));
            l.push(("proto", proto_name(f.proto)));
            l.push(("port", f.dst_port.to_string()));
            rows.push((l, counter(f.notifications)));
        }
        // Overflow = every verdict ever counted (monotonic aggregates) minus
        // the flows with their own series.
        let mut totals: BTreeMap<(u16, &'static str, &'static str), u64> = BTreeMap::new();
        for (k, t) in aggregates.iter().filter(|(k, _)| k.notify_type == notify_type::POLICY_VERDICT) {
            let (Some(d), Some(c)) = (Direction::from_cilium(k.direction), VerdictClass::from_u8(k.class)) else {
                continue;
            };
            *totals.entry((k.endpoint_id, d.as_str(), c.as_str())).or_default() += t.notifications;
        }
        for ((ep, direction, verdict), total) in totals.into_iter().filter(|((ep, _, _), _)| !retired.contains(ep)) {
            let n = total.saturating_sub(own_totals.get(&(ep, direction, verdict)).copied().unwrap_or(0));
            if n == 0 {
                continue;
            }
            let mut l = endpoint_labels(dir, ep);
            l.extend([
                ("direction", direction.to_string()),
                ("verdict", verdict.to_string()),
                ("remote", "overflow".to_string()),
                ("remote_identity", String::new()),
                ("proto", String::new()),
                ("port", String::new()),
            ]);
            rows.push((l, counter(n)));
        }
        family(
            encoder,
            "verdict_agent_flow_verdicts",
            &format!("{VERDICT_HELP} Per flow (opt-in, capped; the rest in remote=\"overflow\")."),
            MetricType::Counter,
            rows,
        )
    }
}

/// Builds the registry with every collector.
pub fn registry(collectors: Vec<Box<dyn Collector>>) -> Registry {
    let mut registry = Registry::default();
    for c in collectors {
        registry.register_collector(c);
    }
    registry
}
