//! Silence is not safety: an endpoint direction that has policy but sent
//! no verdict in the evidence period, with the likely cause (verdict
//! notifications off, Cilium's rate limit, the host program before 1.16, or
//! simply no traffic). Exported as `verdict_agent_endpoint_verdicts_silent`
//! and logged once when it starts.

use std::{collections::BTreeSet, fmt};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
};
use tracing::warn;

use crate::{
    model::Direction,
    readiness::{ReadinessReport, ReadinessState, Reason},
};

/// One silent endpoint direction.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Silence {
    pub endpoint: u16,
    pub kind: String,
    pub namespace: String,
    pub pod: String,
    pub direction: Direction,
    /// The readiness reason, as the report spells it.
    pub cause: String,
}

/// The readiness reasons that mean "policy applies, yet nothing arrives".
fn is_silence(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::VerdictNotificationsOff
            | Reason::HostProgramPre116
            | Reason::RateLimited
            | Reason::HostMatchAllSuppressed
            | Reason::NoTraffic
    )
}

pub fn silences(report: &ReadinessReport) -> Vec<Silence> {
    let mut out = Vec::new();
    for e in &report.endpoints {
        for d in &e.directions {
            if d.policy_enabled == Some(true) && d.state == ReadinessState::NoEvidence && is_silence(d.reason) {
                let cause =
                    serde_json::to_value(d.reason).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                out.push(Silence {
                    endpoint: e.endpoint_id,
                    kind: e.kind.as_str().to_string(),
                    namespace: e.namespace.clone().unwrap_or_default(),
                    pod: e.pod.clone().unwrap_or_default(),
                    direction: d.direction,
                    cause,
                });
            }
        }
    }
    out
}

pub fn encode(report: &ReadinessReport, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let mut family = encoder.encode_descriptor(
        "verdict_agent_endpoint_verdicts_silent",
        "1 when the endpoint has policy in that direction but no verdict arrived in the evidence period; \
         cause is the likely reason. Silence is not safety.",
        None,
        MetricType::Gauge,
    )?;
    for s in silences(report) {
        let labels: Vec<(&str, String)> = vec![
            ("endpoint", s.endpoint.to_string()),
            ("kind", s.kind),
            ("namespace", s.namespace),
            ("pod", s.pod),
            ("direction", s.direction.as_str().to_string()),
            ("cause", s.cause),
        ];
        ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Logs each silence once, when it begins.
#[derive(Default)]
pub struct SilenceLog {
    known: BTreeSet<(u16, Direction, String)>,
}

impl SilenceLog {
    pub fn update(&mut self, report: &ReadinessReport) {
        let now: BTreeSet<(u16, Direction, String)> =
            silences(report).into_iter().map(|s| (s.endpoint, s.direction, s.cause)).collect();
        for (endpoint, direction, cause) in now.difference(&self.known) {
            warn!(
                endpoint,
                direction = direction.as_str(),
                cause = cause.as_str(),
                "endpoint has policy but sends no verdicts: its silence proves nothing about what enforcement would drop"
            );
        }
        self.known = now;
    }
}
