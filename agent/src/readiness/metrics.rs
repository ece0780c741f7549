//! The "Audit readiness and host lockout" metrics of `docs/metrics.md`,
//! encoded from a report on every scrape (no stale series survive a
//! resolved risk).

use prometheus_client::{encoding::DescriptorEncoder, metrics::MetricType};

use super::report::{EndpointReadiness, ReadinessReport};
use crate::model::Direction;

type Labels = Vec<(&'static str, String)>;

/// The ENDPOINT label set: always present, empty when unknown.
fn endpoint_labels(e: &EndpointReadiness) -> Labels {
    vec![
        ("endpoint", e.endpoint_id.to_string()),
        ("kind", e.kind.as_str().to_owned()),
        ("namespace", e.namespace.clone().unwrap_or_default()),
        ("pod", e.pod.clone().unwrap_or_default()),
    ]
}

fn lockout_port_label(protocol: &str, port: u16) -> String {
    // ICMP has no port: the catalogue entry names it (`service`).
    if protocol.starts_with("icmp") { String::new() } else { port.to_string() }
}

/// Writes the readiness metrics. Counter names are given without `_total`:
/// the encoder appends it (`verdict_agent_would_deny_total`).
pub fn encode_metrics(report: &ReadinessReport, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    {
        let mut m = encoder.encode_descriptor(
            "verdict_agent_would_deny",
            "Audited verdicts: traffic enforcement would drop (per new connection).",
            None,
            MetricType::Counter,
        )?;
        for e in &report.endpoints {
            for dir in [Direction::Ingress, Direction::Egress] {
                let total = e.directions.iter().find(|d| d.direction == dir).map_or(0, |d| d.would_deny_total);
                let mut labels = endpoint_labels(e);
                labels.push(("direction", dir.as_str().to_owned()));
                m.encode_family(&labels)?.encode_counter::<Labels, u64, f64>(&total, None)?;
            }
        }
    }
    {
        let mut m = encoder.encode_descriptor(
            "verdict_agent_audit_readiness",
            "1 for the endpoint's current readiness state (ready, would_break, no_evidence) with its reason.",
            None,
            MetricType::Gauge,
        )?;
        for e in &report.endpoints {
            let mut labels = endpoint_labels(e);
            labels.push(("state", e.state.as_str().to_owned()));
            labels.push(("reason", e.reason.as_str().to_owned()));
            m.encode_family(&labels)?.encode_gauge(&1i64)?;
        }
    }
    for (name, help, entries) in [
        (
            "verdict_agent_host_lockout_risk",
            "1 while the host endpoint has audited (would-deny) traffic on a critical flow in the window.",
            &report.lockout.risk,
        ),
        (
            "verdict_agent_host_lockout_in_progress",
            "1 while the host endpoint has denied traffic on a critical flow in the window.",
            &report.lockout.in_progress,
        ),
    ] {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        let mut seen = std::collections::BTreeSet::new();
        for r in entries {
            let labels: Labels = vec![
                ("port", lockout_port_label(&r.protocol, r.port)),
                ("protocol", r.protocol.clone()),
                ("remote", r.remote.clone()),
                ("service", r.service.clone()),
            ];
            // Ingress and egress of one service share a series.
            if seen.insert(labels.clone()) {
                m.encode_family(&labels)?.encode_gauge(&1i64)?;
            }
        }
        if name == "verdict_agent_host_lockout_in_progress" {
            // Replies of pre-existing connections: the service port is
            // unknown (only the ephemeral port is in the notification).
            for r in &report.lockout.suspected_reply_drops {
                let service = if r.confirmed && r.possible_services.len() == 1 {
                    r.possible_services[0].clone()
                } else {
                    "reply_to_pre_existing_connection".to_owned()
                };
                let labels: Labels = vec![
                    ("port", String::new()),
                    ("protocol", r.protocol.clone()),
                    ("remote", r.remote.clone()),
                    ("service", service),
                ];
                if seen.insert(labels.clone()) {
                    m.encode_family(&labels)?.encode_gauge(&1i64)?;
                }
            }
            // Policy drops carry no port (before Cilium 1.16 the host's only
            // denial signal): the infrastructure is being denied something.
            for d in &report.lockout.unattributed_drops {
                let labels: Labels = vec![
                    ("port", String::new()),
                    ("protocol", String::new()),
                    ("remote", d.remote.clone()),
                    ("service", "unattributed_policy_drop".to_owned()),
                ];
                if seen.insert(labels.clone()) {
                    m.encode_family(&labels)?.encode_gauge(&1i64)?;
                }
            }
        }
    }
    if let Some(selected) = report.host.policy_selected {
        let mut m = encoder.encode_descriptor(
            "verdict_agent_host_policy_selected",
            "1 when at least one host policy selects this node; 0 when none does.",
            None,
            MetricType::Gauge,
        )?;
        let source = report.host.policy_selected_source.map(source_label).unwrap_or_default();
        m.encode_family(&vec![("source", source.to_owned())])?.encode_gauge(&i64::from(selected))?;
    }
    {
        let mut m = encoder.encode_descriptor(
            "verdict_agent_scan_noise_ports",
            "Distinct ports world probed in the window (summarised, never a lockout).",
            None,
            MetricType::Gauge,
        )?;
        for e in &report.endpoints {
            let ports: usize = report.noise.iter().filter(|n| n.endpoint_id == e.endpoint_id).map(|n| n.ports).sum();
            m.encode_family(&endpoint_labels(e))?.encode_gauge(&(ports as i64))?;
        }
    }
    {
        let mut m = encoder.encode_descriptor(
            "verdict_agent_scan_noise_notifications",
            "Notifications classified as scan noise.",
            None,
            MetricType::Counter,
        )?;
        for e in &report.endpoints {
            m.encode_family(&endpoint_labels(e))?
                .encode_counter::<Labels, u64, f64>(&e.noise_notifications_total, None)?;
        }
    }
    Ok(())
}

fn source_label(s: crate::model::FactSource) -> &'static str {
    use crate::model::FactSource::*;
    match s {
        CiliumApi => "cilium_api",
        Kubernetes => "kubernetes",
        EndpointsFile => "endpoints_file",
        Inferred => "inferred",
    }
}

/// A collector that serves a fixed report: how the agent registers these
/// metrics (swap the report behind the lock on every evaluation).
#[derive(Debug, Default)]
pub struct ReadinessCollector {
    pub report: std::sync::RwLock<Option<ReadinessReport>>,
}

impl prometheus_client::collector::Collector for ReadinessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.report.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(r) => encode_metrics(r, &mut encoder),
            None => Ok(()),
        }
    }
}
