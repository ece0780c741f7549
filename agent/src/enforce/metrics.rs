//! `verdict_agent_enforcement_trials_total{outcome}` and the time from the
//! first critical signal to the revert PATCH.

use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};

/// Every outcome a trial step can have; each series exists from the start.
pub const OUTCOMES: [&str; 8] =
    ["switched", "confirmed", "reverted", "expired", "aborted", "refused", "revert_failed", "alarm"];

/// Revert latency buckets: 50 ms to about 13 s (goal: p99 under 1 s plus
/// the Cilium API's own answer time).
const REVERT_BUCKETS: [f64; 9] = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8];

type OutcomeLabels = Vec<(String, String)>;

#[derive(Debug)]
pub struct EnforcementMetrics {
    trials: Family<OutcomeLabels, Counter>,
    time_to_revert: Histogram,
}

impl Default for EnforcementMetrics {
    fn default() -> Self {
        let trials = Family::default();
        for outcome in OUTCOMES {
            let _ = trials.get_or_create(&labels(outcome));
        }
        EnforcementMetrics { trials, time_to_revert: Histogram::new(REVERT_BUCKETS) }
    }
}

fn labels(outcome: &str) -> OutcomeLabels {
    vec![("outcome".to_owned(), outcome.to_owned())]
}

impl EnforcementMetrics {
    /// Counts one outcome; `outcome` must be one of [`OUTCOMES`].
    pub fn count(&self, outcome: &'static str) {
        debug_assert!(OUTCOMES.contains(&outcome), "unknown outcome {outcome}");
        self.trials.get_or_create(&labels(outcome)).inc();
    }

    pub fn observe_time_to_revert(&self, seconds: f64) {
        self.time_to_revert.observe(seconds);
    }

    pub fn outcome_total(&self, outcome: &str) -> u64 {
        self.trials.get_or_create(&labels(outcome)).get()
    }
}

/// Exposes [`EnforcementMetrics`] on `/metrics`.
pub struct EnforcementCollector(pub Arc<EnforcementMetrics>);

impl fmt::Debug for EnforcementCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnforcementCollector")
    }
}

impl Collector for EnforcementCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let m = &self.0;
        m.trials.encode(encoder.encode_descriptor(
            // The encoder appends `_total`.
            "verdict_agent_enforcement_trials",
            "Enforcement trial steps by outcome: switched (audit mode off, read back), confirmed, reverted \
             (critical signal or abort), expired (no confirmation in time), aborted, refused (nothing switched), \
             revert_failed (the endpoint may still enforce), alarm (critical signal after confirmation).",
            None,
            m.trials.metric_type(),
        )?)?;
        m.time_to_revert.encode(encoder.encode_descriptor(
            "verdict_agent_enforcement_time_to_revert_seconds",
            "Time from the first critical signal of a trial (its first notification after the switch) to the \
             revert PATCH.",
            None,
            m.time_to_revert.metric_type(),
        )?)
    }
}
