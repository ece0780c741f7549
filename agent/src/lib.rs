//! verdict-agent: counts Cilium's policy verdicts in the kernel, exports
//! them for Prometheus, and tells an operator whether leaving
//! PolicyAuditMode will break something.

pub mod analyze;
pub mod bpf;
pub mod cilium;
pub mod duration;
pub mod enforce;
pub mod enrich;
pub mod errors;
pub mod http;
pub mod kubectl;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod owner_baseline;
pub mod preflight;
pub mod readiness;
pub mod readiness_totals;
pub mod run;
pub mod scan_behaviour;
pub mod silence;
pub mod state;
pub mod suggest;
pub mod text;
pub mod timefmt;
pub mod unattributed;
