//! The Enrichment metrics of docs/metrics.md, encoded at scrape time from
//! the caches, and the per-endpoint label set every collector shares.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::Enrichment;
use crate::model::{Direction, EndpointDirectory, EndpointInfo, FactSource};

/// The per-endpoint label set (`ENDPOINT` in docs/metrics.md): always all
/// four labels, empty when unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointLabels {
    pub endpoint: String,
    /// `host`, `pod` or `unknown`.
    pub kind: String,
    pub namespace: String,
    pub pod: String,
}

impl EndpointLabels {
    pub fn new(id: u16, info: Option<&EndpointInfo>) -> EndpointLabels {
        EndpointLabels {
            endpoint: id.to_string(),
            kind: info.map(|i| i.kind).unwrap_or_default().as_str().to_owned(),
            namespace: info.and_then(|i| i.namespace.clone()).unwrap_or_default(),
            pod: info.and_then(|i| i.pod.clone()).unwrap_or_default(),
        }
    }

    /// As (name, value) pairs, to extend with a series' own labels.
    pub fn to_vec(&self) -> Vec<(&'static str, String)> {
        vec![
            ("endpoint", self.endpoint.clone()),
            ("kind", self.kind.clone()),
            ("namespace", self.namespace.clone()),
            ("pod", self.pod.clone()),
        ]
    }
}

impl EncodeLabelSet for EndpointLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        ("endpoint", self.endpoint.as_str()).encode(encoder.encode_label())?;
        ("kind", self.kind.as_str()).encode(encoder.encode_label())?;
        ("namespace", self.namespace.as_str()).encode(encoder.encode_label())?;
        ("pod", self.pod.as_str()).encode(encoder.encode_label())
    }
}

/// The `source` label value of a fact source.
pub fn source_label(source: FactSource) -> &'static str {
    match source {
        FactSource::CiliumApi => "cilium_api",
        FactSource::Kubernetes => "kubernetes",
        FactSource::EndpointsFile => "endpoints_file",
        FactSource::Inferred => "inferred",
    }
}

type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in rows {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Enrichment {
    /// Encodes verdict_agent_endpoint_info, _endpoint_policy_enforced,
    /// _endpoint_audit_mode, _enrichment_source_up and
    /// _enrichment_errors_total.
    pub fn encode_metrics(&self, encoder: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
        self.encode_metrics_inferring(encoder, &[])
    }

    /// [`Self::encode_metrics`], plus audit mode inferred (`source="inferred"`)
    /// for endpoint directions that sent audited verdicts while no source
    /// tells their audit state: only an endpoint in PolicyAuditMode marks
    /// verdicts audited.
    pub fn encode_metrics_inferring(
        &self,
        encoder: &mut DescriptorEncoder,
        audited: &[(u16, Direction)],
    ) -> Result<(), fmt::Error> {
        let endpoints = self.endpoints();

        let info = endpoints.iter().map(|ep| {
            let mut l = EndpointLabels::new(ep.id, Some(ep)).to_vec();
            l.push(("identity", ep.identity.map(|i| i.to_string()).unwrap_or_default()));
            l.push(("workload", ep.workload.clone().unwrap_or_default()));
            (l, ConstGauge::new(1i64))
        });
        family(encoder, "verdict_agent_endpoint_info", "1 per endpoint known on this node.", MetricType::Gauge, info)?;

        let mut enforced = Vec::new();
        let mut audit = Vec::new();
        for ep in &endpoints {
            let Some(source) = ep.policy_source else { continue };
            let base = EndpointLabels::new(ep.id, Some(ep));
            for (direction, policy) in [("ingress", ep.ingress), ("egress", ep.egress)] {
                let Some(policy) = policy else { continue };
                let mut l = base.to_vec();
                l.push(("direction", direction.to_owned()));
                l.push(("source", source_label(source).to_owned()));
                enforced.push((l.clone(), ConstGauge::new(i64::from(policy.enabled))));
                // CiliumEndpoints do not carry the audit option: reporting
                // 0 from them would claim enforcement nobody confirmed.
                if source != FactSource::Kubernetes {
                    audit.push((l, ConstGauge::new(i64::from(policy.audit))));
                }
            }
        }
        family(
            encoder,
            "verdict_agent_endpoint_policy_enforced",
            "1 when policy selects the endpoint in that direction.",
            MetricType::Gauge,
            enforced,
        )?;
        let known: std::collections::HashSet<(u16, &str)> = endpoints
            .iter()
            .filter(|ep| ep.policy_source.is_some_and(|s| s != FactSource::Kubernetes))
            .flat_map(|ep| [(ep.id, "ingress"), (ep.id, "egress")])
            .collect();
        for &(id, direction) in audited {
            if known.contains(&(id, direction.as_str())) {
                continue;
            }
            let ep = endpoints.iter().find(|e| e.id == id);
            let mut l = EndpointLabels::new(id, ep).to_vec();
            l.push(("direction", direction.as_str().to_owned()));
            l.push(("source", "inferred".to_owned()));
            audit.push((l, ConstGauge::new(1)));
        }
        family(
            encoder,
            "verdict_agent_endpoint_audit_mode",
            "1 when the endpoint is in PolicyAuditMode (denials are reported as audited and let through).",
            MetricType::Gauge,
            audit,
        )?;

        let status = self.source_status();
        family(
            encoder,
            "verdict_agent_enrichment_source_up",
            "1 when the latest request to the enrichment source succeeded (every watch, for kubernetes).",
            MetricType::Gauge,
            status.iter().map(|s| (vec![("source", s.source.to_owned())], ConstGauge::new(i64::from(s.up)))),
        )?;
        family(
            encoder,
            "verdict_agent_enrichment_errors",
            "Failed requests to an enrichment source.",
            MetricType::Counter,
            status.iter().map(|s| (vec![("source", s.source.to_owned())], ConstCounter::new(s.errors))),
        )
    }
}

impl Collector for Enrichment {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        self.encode_metrics(&mut encoder)
    }
}
