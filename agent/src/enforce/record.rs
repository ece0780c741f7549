//! One enforcement trial as the node records it: what was switched, what it
//! was before, who asked and why, and where the trial stands. The record is
//! the agent's only licence to touch an endpoint's PolicyAuditMode: it
//! reverts only what a record says it switched, and only to the value the
//! record says the endpoint had.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::cilium_config::OptionValue;
use crate::{model::EndpointKind, timefmt::rfc3339};

/// Where a trial stands.
///
/// `requested` -> `switched` (audit mode off, read back) -> `confirmed` |
/// `reverted` | `expired`; `refused` when the switch was never made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialPhase {
    /// Recorded, the PATCH not yet read back. A record found in this phase
    /// at start-up means the agent died mid-switch.
    Requested,
    /// PolicyAuditMode is Disabled (read back); watching until the deadline.
    Switched,
    /// The operator confirmed: enforcement stays, the lockout watch goes on
    /// until `watch_until`.
    Confirmed,
    /// Put back in audit mode by the agent (critical signal, abort, or a
    /// restart that found the trial in a state it could not continue).
    Reverted,
    /// The deadline passed without confirmation: put back in audit mode.
    Expired,
    /// The switch was not made (or not completed and undone): see `outcome`.
    Refused,
    /// Reverting failed: the endpoint may still enforce. Retried on every
    /// watch round; `outcome` says what failed.
    RevertFailed,
}

impl TrialPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            TrialPhase::Requested => "requested",
            TrialPhase::Switched => "switched",
            TrialPhase::Confirmed => "confirmed",
            TrialPhase::Reverted => "reverted",
            TrialPhase::Expired => "expired",
            TrialPhase::Refused => "refused",
            TrialPhase::RevertFailed => "revert_failed",
        }
    }
}

/// Who asked for a trial, confirmation or abort, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    /// As the CLI reports it (user@host); not authenticated: the HTTP API
    /// listens on loopback, so whoever can reach it is on this node or
    /// port-forwarded into the pod.
    pub who: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What the operator's readiness check said when the trial was requested.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightVerdict {
    /// `ready`, `would_break` or `no_evidence`.
    pub state: String,
    /// Preflight's exit code (0 safe, 1 would break, 3 not enough evidence).
    pub exit_code: u8,
    /// The check was overridden with `--force --reason`.
    pub forced: bool,
}

/// One line of a trial's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialEvent {
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
    pub phase: TrialPhase,
    pub message: String,
}

/// One trial, as written to the state directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    pub id: String,
    pub endpoint_id: u16,
    /// `host`, `NAMESPACE/POD` or the ID, for people.
    pub endpoint_name: String,
    pub endpoint_kind: EndpointKind,
    /// The realized PolicyAuditMode before the switch: the only value a
    /// revert writes.
    pub audit_mode_before: OptionValue,
    pub requested_by: Requester,
    pub preflight: PreflightVerdict,
    /// Revert on any new denied flow of the endpoint, not only critical ones.
    pub strict: bool,
    /// Seconds of the trial, from the switch.
    pub try_seconds: u64,
    /// After confirmation, how long the lockout watch goes on.
    pub watch_after_confirm_seconds: u64,
    /// After confirmation, a critical signal reverts (else it only alarms).
    pub revert_after_confirm: bool,
    #[serde(with = "rfc3339")]
    pub requested_at: SystemTime,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timefmt::rfc3339_opt")]
    pub switched_at: Option<SystemTime>,
    /// Revert unless confirmed by then.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timefmt::rfc3339_opt")]
    pub deadline: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timefmt::rfc3339_opt")]
    pub confirmed_at: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_by: Option<Requester>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timefmt::rfc3339_opt")]
    pub ended_at: Option<SystemTime>,
    pub phase: TrialPhase,
    /// Why the trial ended as it did (the refusal, the signal, the abort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Seconds from the first critical signal to the revert PATCH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_revert_seconds: Option<f64>,
    /// A revert that failed and is retried every watch round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_revert: Option<PendingRevert>,
    /// Host trials: the API server endpoints (`address:port`) this node
    /// reached by TCP just before the switch; losing one after it is a
    /// critical signal (see `reach`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reach_baseline: Vec<String>,
    pub history: Vec<TrialEvent>,
}

/// How a failed revert ends once it succeeds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRevert {
    pub phase: TrialPhase,
    /// The metric outcome (`reverted`, `expired`, `aborted`).
    pub outcome: String,
    pub why: String,
}

impl TrialRecord {
    /// The agent still owns the endpoint's audit mode: switching it,
    /// watching it, or owing it a revert. A confirmed trial stops being
    /// active when its lockout watch ends.
    pub fn is_active(&self) -> bool {
        match self.phase {
            TrialPhase::Requested | TrialPhase::Switched | TrialPhase::RevertFailed => true,
            TrialPhase::Confirmed => self.ended_at.is_none(),
            TrialPhase::Reverted | TrialPhase::Expired | TrialPhase::Refused => false,
        }
    }

    pub fn try_for(&self) -> Duration {
        Duration::from_secs(self.try_seconds)
    }

    /// Until when the lockout watch runs after confirmation.
    pub fn watch_until(&self) -> Option<SystemTime> {
        self.confirmed_at.map(|t| t + Duration::from_secs(self.watch_after_confirm_seconds))
    }

    pub fn note(&mut self, at: SystemTime, phase: TrialPhase, message: impl Into<String>) {
        self.phase = phase;
        self.history.push(TrialEvent { at, phase, message: message.into() });
    }

    /// Ends the trial.
    pub fn end(&mut self, at: SystemTime, phase: TrialPhase, outcome: impl Into<String>) {
        let outcome = outcome.into();
        self.ended_at = Some(at);
        self.pending_revert = None;
        self.outcome = Some(outcome.clone());
        self.note(at, phase, outcome);
    }
}
