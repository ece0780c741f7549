//! The trial state machine, owned by the daemon: switch PolicyAuditMode off
//! through the Cilium API, read it back, record it durably, watch, and put
//! it back on the first critical signal, on abort, or at the deadline
//! unless confirmed.
//!
//! Every step is saved before the next one starts, so an agent killed at
//! any point finds on restart what it switched and what the endpoint had
//! before ([`TrialManager::resume`]). It reverts only endpoints a record
//! says it switched, and only to the value recorded.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::{
    cilium_config::{EndpointConfigClient, EndpointConfigError, OptionValue},
    metrics::EnforcementMetrics,
    reach::{self, ReachTargets, ReachWatch},
    record::{PendingRevert, PreflightVerdict, Requester, TrialEvent, TrialPhase, TrialRecord},
    store::{StoreError, TrialStore},
    watch::{CriticalSignal, SignalKind, TrialWatch, WatchedEndpoint},
};
use crate::{
    model::{EndpointDirectory, EndpointKind, FlowRecord},
    readiness::ReadinessState,
    timefmt::{format_duration, format_rfc3339},
};

/// The daemon's own readiness verdict for an endpoint (None: no report
/// names it yet). The CLI's preflight is what the operator saw; this is
/// what the agent knows, so a client that skips preflight gains nothing.
pub type ReadinessLookup = Arc<dyn Fn(u16) -> Option<ReadinessState> + Send + Sync>;

/// Daemon-side settings (`verdict-agent run --enable-enforcement ...`).
#[derive(Clone, Debug)]
pub struct TrialSettings {
    /// Writing to the Cilium API is off unless enabled.
    pub enabled: bool,
    /// The longest `--try` accepted.
    pub max_try: Duration,
    /// After confirmation, how long the lockout watch goes on.
    pub watch_after_confirm: Duration,
    /// After confirmation, a critical signal reverts (else it only alarms).
    pub revert_after_confirm: bool,
}

impl Default for TrialSettings {
    fn default() -> Self {
        TrialSettings {
            enabled: false,
            max_try: Duration::from_secs(24 * 3600),
            watch_after_confirm: Duration::from_secs(10 * 60),
            revert_after_confirm: false,
        }
    }
}

/// `POST /api/v1/enforcement/trials`: what the CLI hands the daemon after
/// its preflight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialRequest {
    pub endpoint_id: u16,
    pub endpoint_name: String,
    pub endpoint_kind: EndpointKind,
    pub try_seconds: u64,
    #[serde(default)]
    pub strict: bool,
    pub requested_by: Requester,
    pub preflight: PreflightVerdict,
}

/// Why a request was refused or a step failed. Nothing here leaves an
/// endpoint half-switched unless the message says so.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error(
        "enforcement is off in this agent: it never writes to the Cilium API unless started with \
         --enable-enforcement (chart: enforcement.enabled=true, which also mounts the Cilium socket read-write)"
    )]
    Disabled,
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "preflight did not call endpoint {endpoint} safe ({state}, exit code {exit_code}); fix what it reports, or \
         override with --force --reason TEXT"
    )]
    NotSafe { endpoint: String, state: String, exit_code: u8 },
    #[error(
        "endpoint {endpoint} already has trial {id} ({phase}); confirm or abort it first (verdict-agent enforce \
         --endpoint {endpoint} --confirm | --abort)"
    )]
    AlreadyRunning { endpoint: String, id: String, phase: &'static str },
    #[error("endpoint {endpoint} is not in audit mode (PolicyAuditMode is {value}): there is nothing to try")]
    NotInAuditMode { endpoint: String, value: &'static str },
    #[error("no trial switched for endpoint {endpoint}: {source}; the endpoint was left as it was")]
    Cilium {
        endpoint: String,
        #[source]
        source: EndpointConfigError,
    },
    #[error(
        "Cilium accepted the switch of endpoint {endpoint} but its realized PolicyAuditMode reads {read_back}; \
         nothing was switched"
    )]
    NotRealized { endpoint: String, read_back: &'static str },
    #[error(
        "switching endpoint {endpoint} failed part-way ({source}) and putting it back failed too: {restore}; \
         the agent retries the revert every watch round; by hand: cilium-dbg endpoint config {id} \
         PolicyAuditMode=Enabled"
    )]
    HalfSwitched {
        endpoint: String,
        id: u16,
        restore: String,
        #[source]
        source: EndpointConfigError,
    },
    #[error("switching endpoint {endpoint} failed part-way ({source}); it was put back in audit mode (read back)")]
    SwitchUndone {
        endpoint: String,
        #[source]
        source: EndpointConfigError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no trial {0}; list them with verdict-agent enforce --status")]
    NotFound(String),
    #[error("trial {id} is {phase}: it can no longer be {action}")]
    NotActive { id: String, phase: &'static str, action: &'static str },
}

impl TrialError {
    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            TrialError::Disabled => 403,
            TrialError::BadRequest(_) => 400,
            TrialError::NotSafe { .. } => 412,
            TrialError::AlreadyRunning { .. } | TrialError::NotInAuditMode { .. } | TrialError::NotActive { .. } => 409,
            TrialError::NotFound(_) => 404,
            TrialError::Cilium { .. }
            | TrialError::NotRealized { .. }
            | TrialError::HalfSwitched { .. }
            | TrialError::SwitchUndone { .. } => 502,
            TrialError::Store(_) => 500,
        }
    }
}

/// All trials of this node.
pub struct TrialManager {
    api: EndpointConfigClient,
    store: TrialStore,
    settings: TrialSettings,
    watch: TrialWatch,
    metrics: Arc<EnforcementMetrics>,
    trials: Vec<TrialRecord>,
    /// Signals already alarmed on after confirmation (trial id, description).
    alarmed: HashSet<(String, String)>,
    readiness: Option<ReadinessLookup>,
    events: Option<Arc<dyn TrialEvents>>,
    /// Host trials: where the API server is, and what the probes saw.
    reach: Option<(ReachTargets, ReachWatch)>,
}

/// Where switches, reverts and refusals are published besides the log and
/// the metrics (Kubernetes Events in the daemon). Must not block: a revert
/// is not delayed by the API server.
pub trait TrialEvents: Send + Sync {
    fn publish(&self, record: &TrialRecord, outcome: &'static str);
}

/// Counts the outcome and publishes it.
fn announce(
    metrics: &EnforcementMetrics,
    events: Option<&dyn TrialEvents>,
    record: &TrialRecord,
    outcome: &'static str,
) {
    metrics.count(outcome);
    if let Some(events) = events {
        events.publish(record, outcome);
    }
}

impl TrialManager {
    /// Loads the recorded trials; call [`TrialManager::resume`] next.
    pub fn open(
        api: EndpointConfigClient,
        store: TrialStore,
        settings: TrialSettings,
        watch: TrialWatch,
        metrics: Arc<EnforcementMetrics>,
    ) -> Result<TrialManager, StoreError> {
        let trials = store.load()?;
        Ok(TrialManager {
            api,
            store,
            settings,
            watch,
            metrics,
            trials,
            alarmed: HashSet::new(),
            readiness: None,
            events: None,
            reach: None,
        })
    }

    /// Host trials also watch the node's TCP reach to `targets` (the API
    /// server's endpoints), probed by [`super::reach_loop`] into `watch`.
    pub fn with_reach(mut self, targets: ReachTargets, watch: ReachWatch) -> TrialManager {
        self.reach = Some((targets, watch));
        self
    }

    /// A host trial is switched or confirmed: the reach probes are wanted.
    pub fn wants_reach(&self) -> bool {
        self.trials
            .iter()
            .any(|t| t.is_active() && t.endpoint_kind == EndpointKind::Host && !t.reach_baseline.is_empty())
    }

    /// Publishes every trial step to `events` too.
    pub fn with_events(mut self, events: Arc<dyn TrialEvents>) -> TrialManager {
        self.events = Some(events);
        self
    }

    /// Checks every unforced request against the agent's own readiness.
    pub fn with_readiness(mut self, lookup: ReadinessLookup) -> TrialManager {
        self.readiness = Some(lookup);
        self
    }

    pub fn settings(&self) -> &TrialSettings {
        &self.settings
    }

    pub fn trials(&self) -> &[TrialRecord] {
        &self.trials
    }

    pub fn get(&self, id: &str) -> Option<&TrialRecord> {
        self.trials.iter().find(|t| t.id == id)
    }

    /// Some trial owns an endpoint's audit mode (the maps should be read fast).
    pub fn any_active(&self) -> bool {
        self.trials.iter().any(TrialRecord::is_active)
    }

    /// The active trial of an endpoint.
    pub fn active_for(&self, endpoint_id: u16) -> Option<&TrialRecord> {
        self.trials.iter().find(|t| t.endpoint_id == endpoint_id && t.is_active())
    }

    fn save(&self) -> Result<(), StoreError> {
        self.store.save(&self.trials)
    }

    /// Saves, and logs instead of failing when the step already happened in
    /// Cilium (the record must not stop a revert).
    fn save_logged(&self) {
        if let Err(e) = self.save() {
            error!(error = %e, path = %self.store.path().display(), "could not record an enforcement trial step");
        }
    }

    fn index(&self, id: &str) -> Result<usize, TrialError> {
        self.trials.iter().position(|t| t.id == id).ok_or_else(|| TrialError::NotFound(id.to_owned()))
    }

    /// Starts a trial: refuses, or returns the record in `switched`.
    pub async fn start(&mut self, req: TrialRequest, now: SystemTime) -> Result<TrialRecord, TrialError> {
        let result = self.start_inner(req.clone(), now).await;
        if let Err(e) = &result {
            // Refusals before a record exists are logged here; the others
            // were logged with the record.
            if !matches!(e, TrialError::HalfSwitched { .. } | TrialError::SwitchUndone { .. }) {
                warn!(endpoint = %req.endpoint_name, endpoint_id = req.endpoint_id, who = %req.requested_by.who,
                      reason = req.requested_by.reason.as_deref().unwrap_or(""), error = %e,
                      "enforcement trial refused");
                self.metrics.count("refused");
            }
        }
        result
    }

    async fn start_inner(&mut self, req: TrialRequest, now: SystemTime) -> Result<TrialRecord, TrialError> {
        if !self.settings.enabled {
            return Err(TrialError::Disabled);
        }
        validate(&req, &self.settings)?;
        if let (Some(lookup), false) = (&self.readiness, req.preflight.forced) {
            let (state, exit_code) = match lookup(req.endpoint_id) {
                Some(ReadinessState::Ready) => ("ready", 0),
                Some(ReadinessState::WouldBreak) => ("would_break (the agent's own report)", 1),
                Some(ReadinessState::NoEvidence) => ("no_evidence (the agent's own report)", 3),
                None => ("unknown: the agent's readiness report does not name this endpoint yet", 3),
            };
            if exit_code != 0 {
                return Err(TrialError::NotSafe {
                    endpoint: req.endpoint_name.clone(),
                    state: state.into(),
                    exit_code,
                });
            }
        }
        if let Some(t) = self.active_for(req.endpoint_id) {
            return Err(TrialError::AlreadyRunning {
                endpoint: req.endpoint_name.clone(),
                id: t.id.clone(),
                phase: t.phase.as_str(),
            });
        }
        let endpoint = req.endpoint_name.clone();
        let before = self
            .api
            .audit_mode(req.endpoint_id)
            .await
            .map_err(|source| TrialError::Cilium { endpoint: endpoint.clone(), source })?;
        if before != OptionValue::Enabled {
            return Err(TrialError::NotInAuditMode { endpoint, value: before.as_str() });
        }

        let mut record = new_record(req, before, &self.settings, now);
        if let (EndpointKind::Host, Some((targets, _))) = (record.endpoint_kind, &self.reach) {
            record.reach_baseline = reach::baseline(targets).await.iter().map(ToString::to_string).collect();
        }
        record.note(now, TrialPhase::Requested, "trial requested; switching PolicyAuditMode off");
        self.trials.push(record);
        let idx = self.trials.len() - 1;
        if let Err(e) = self.save() {
            // Nothing switched: without a record there is no licence to revert later.
            self.trials.pop();
            return Err(e.into());
        }

        let id = self.trials[idx].endpoint_id;
        match self.api.set_audit_mode(id, OptionValue::Disabled).await {
            Ok(OptionValue::Disabled) => {
                let t = &mut self.trials[idx];
                let switched = SystemTime::now();
                t.switched_at = Some(switched);
                t.deadline = Some(switched + t.try_for());
                t.note(switched, TrialPhase::Switched, "PolicyAuditMode Disabled (read back)");
                info!(trial = %t.id, endpoint = %t.endpoint_name, endpoint_id = t.endpoint_id,
                      who = %t.requested_by.who, reason = t.requested_by.reason.as_deref().unwrap_or(""),
                      forced = t.preflight.forced, try_for = %format_duration(t.try_for()),
                      deadline = %format_rfc3339(switched + t.try_for()),
                      "enforcement trial: audit mode switched off");
                announce(&self.metrics, self.events.as_deref(), &self.trials[idx], "switched");
                self.save_logged();
                Ok(self.trials[idx].clone())
            }
            Ok(OptionValue::Enabled) => {
                let endpoint = self.trials[idx].endpoint_name.clone();
                let e = TrialError::NotRealized { endpoint, read_back: "Enabled" };
                self.trials[idx].end(SystemTime::now(), TrialPhase::Refused, e.to_string());
                self.save_logged();
                Err(e)
            }
            Err(source) if source.refused_before_applying() => {
                let e = TrialError::Cilium { endpoint: self.trials[idx].endpoint_name.clone(), source };
                self.trials[idx].end(SystemTime::now(), TrialPhase::Refused, e.to_string());
                self.save_logged();
                Err(e)
            }
            Err(source) => Err(self.undo_partial_switch(idx, source).await),
        }
    }

    /// The PATCH failed in a way that does not tell whether Cilium applied
    /// it (timeout, broken exchange, 5xx): write back the recorded value.
    async fn undo_partial_switch(&mut self, idx: usize, source: EndpointConfigError) -> TrialError {
        let (id, before, endpoint) = {
            let t = &self.trials[idx];
            (t.endpoint_id, t.audit_mode_before, t.endpoint_name.clone())
        };
        let restored = self.api.set_audit_mode(id, before).await;
        let now = SystemTime::now();
        let err = match restored {
            Ok(v) if v == before => {
                let e = TrialError::SwitchUndone { endpoint, source };
                self.trials[idx].end(now, TrialPhase::Refused, e.to_string());
                announce(&self.metrics, self.events.as_deref(), &self.trials[idx], "refused");
                warn!(trial = %self.trials[idx].id, error = %e, "enforcement trial refused");
                e
            }
            other => {
                let restore = match other {
                    Ok(v) => format!("the realized option reads {}", v.as_str()),
                    Err(e) => e.to_string(),
                };
                let e = TrialError::HalfSwitched { endpoint, id, restore, source };
                let t = &mut self.trials[idx];
                t.outcome = Some(e.to_string());
                t.pending_revert = Some(PendingRevert {
                    phase: TrialPhase::Refused,
                    outcome: "refused".to_owned(),
                    why: "the switch failed part-way and was undone".to_owned(),
                });
                t.note(now, TrialPhase::RevertFailed, e.to_string());
                announce(&self.metrics, self.events.as_deref(), t, "revert_failed");
                error!(trial = %t.id, error = %e, "enforcement trial: endpoint may be left enforcing");
                e
            }
        };
        self.save_logged();
        err
    }

    /// `--confirm`: enforcement stays; the lockout watch goes on.
    pub async fn confirm(&mut self, id: &str, by: Requester, now: SystemTime) -> Result<TrialRecord, TrialError> {
        check_requester(&by)?;
        let idx = self.index(id)?;
        let t = &mut self.trials[idx];
        if t.phase != TrialPhase::Switched {
            return Err(TrialError::NotActive { id: id.to_owned(), phase: t.phase.as_str(), action: "confirmed" });
        }
        t.confirmed_at = Some(now);
        t.confirmed_by = Some(by.clone());
        let watch_until = t.watch_until().unwrap_or(now);
        t.note(
            now,
            TrialPhase::Confirmed,
            format!(
                "confirmed by {}{}; lockout watch until {}",
                by.who,
                by.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
                format_rfc3339(watch_until)
            ),
        );
        info!(trial = %t.id, endpoint = %t.endpoint_name, who = %by.who, reason = by.reason.as_deref().unwrap_or(""),
              watch_until = %format_rfc3339(watch_until), "enforcement trial confirmed: enforcement stays");
        announce(&self.metrics, self.events.as_deref(), t, "confirmed");
        let out = t.clone();
        self.save()?;
        Ok(out)
    }

    /// `--abort`: back to audit mode now.
    pub async fn abort(&mut self, id: &str, by: Requester, now: SystemTime) -> Result<TrialRecord, TrialError> {
        check_requester(&by)?;
        let idx = self.index(id)?;
        let t = &self.trials[idx];
        if !t.is_active() || t.phase == TrialPhase::Requested {
            return Err(TrialError::NotActive { id: id.to_owned(), phase: t.phase.as_str(), action: "aborted" });
        }
        let why =
            format!("aborted by {}{}", by.who, by.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default());
        self.revert(idx, TrialPhase::Reverted, "aborted", why, None, now).await;
        Ok(self.trials[idx].clone())
    }

    /// Puts the recorded value back. On failure the trial stays active in
    /// `revert_failed` and the next round retries.
    async fn revert(
        &mut self,
        idx: usize,
        phase: TrialPhase,
        outcome: &'static str,
        why: String,
        first_signal: Option<SystemTime>,
        now: SystemTime,
    ) {
        let (id, before) = (self.trials[idx].endpoint_id, self.trials[idx].audit_mode_before);
        let patch_at = SystemTime::now();
        let latency = first_signal.map(|s| patch_at.duration_since(s).unwrap_or_default().as_secs_f64());
        let result = self.api.set_audit_mode(id, before).await;
        let t = &mut self.trials[idx];
        if let Some(l) = latency {
            t.time_to_revert_seconds.get_or_insert(l);
        }
        match result {
            Ok(v) if v == before => {
                t.end(now.max(patch_at), phase, format!("{why}; PolicyAuditMode {} (read back)", v.as_str()));
                info!(trial = %t.id, endpoint = %t.endpoint_name, endpoint_id = t.endpoint_id, outcome,
                      why = %why, time_to_revert_seconds = latency, "enforcement trial: back in audit mode");
                announce(&self.metrics, self.events.as_deref(), t, outcome);
                if let Some(l) = latency {
                    self.metrics.observe_time_to_revert(l);
                }
            }
            other => {
                let failure = match other {
                    Ok(v) => format!("the realized option still reads {}", v.as_str()),
                    Err(e) => e.to_string(),
                };
                let first_failure = t.phase != TrialPhase::RevertFailed;
                t.outcome = Some(format!(
                    "{why}; revert failed: {failure}; retried every watch round; by hand: cilium-dbg endpoint \
                     config {id} PolicyAuditMode={}",
                    before.as_str()
                ));
                if first_failure {
                    t.note(now, TrialPhase::RevertFailed, t.outcome.clone().unwrap_or_default());
                    announce(&self.metrics, self.events.as_deref(), t, "revert_failed");
                }
                error!(trial = %t.id, endpoint = %t.endpoint_name, endpoint_id = id, error = %failure,
                       "enforcement trial: revert failed; the endpoint may still enforce");
                // The reason to revert stays: the next round retries it.
                t.pending_revert = Some(PendingRevert { phase, outcome: outcome.to_owned(), why });
            }
        }
        self.save_logged();
    }

    /// One watch round, after a map read: deadlines, critical signals,
    /// pending reverts.
    pub async fn tick(&mut self, flows: &[FlowRecord], directory: &dyn EndpointDirectory, now: SystemTime) {
        for idx in 0..self.trials.len() {
            if !self.trials[idx].is_active() {
                continue;
            }
            let t = &self.trials[idx];
            match t.phase {
                TrialPhase::RevertFailed => {
                    let p = t.pending_revert.clone().unwrap_or(PendingRevert {
                        phase: TrialPhase::Reverted,
                        outcome: "reverted".to_owned(),
                        why: "revert owed after a switch that failed part-way".to_owned(),
                    });
                    self.revert(idx, p.phase, outcome_name(&p.outcome), p.why, None, now).await;
                }
                TrialPhase::Switched => {
                    if let Some(signal) = self.first_signal(idx, flows, directory, now) {
                        let why = format!("critical signal {}: {}", signal.kind.as_str(), signal.description);
                        warn!(trial = %t.id, endpoint = %t.endpoint_name, signal = signal.kind.as_str(),
                              detail = %signal.description, first_seen = %format_rfc3339(signal.first_seen),
                              "enforcement trial: critical signal, reverting");
                        self.revert(idx, TrialPhase::Reverted, "reverted", why, Some(signal.first_seen), now).await;
                    } else if t.deadline.is_some_and(|d| now >= d) {
                        let why = format!("the trial of {} ended without confirmation", format_duration(t.try_for()));
                        self.revert(idx, TrialPhase::Expired, "expired", why, None, now).await;
                    }
                }
                TrialPhase::Confirmed => {
                    if t.watch_until().is_some_and(|w| now >= w) {
                        let t = &mut self.trials[idx];
                        t.ended_at = Some(now);
                        t.outcome = Some("confirmed; the lockout watch ended without a critical signal".into());
                        t.note(now, TrialPhase::Confirmed, "lockout watch ended");
                        self.save_logged();
                        continue;
                    }
                    let Some(signal) = self.first_signal(idx, flows, directory, now) else { continue };
                    if self.settings.revert_after_confirm {
                        let why = format!(
                            "critical signal {} after confirmation: {}",
                            signal.kind.as_str(),
                            signal.description
                        );
                        self.revert(idx, TrialPhase::Reverted, "reverted", why, Some(signal.first_seen), now).await;
                    } else if self.alarmed.insert((t.id.clone(), signal.description.clone())) {
                        warn!(trial = %t.id, endpoint = %t.endpoint_name, signal = signal.kind.as_str(),
                              detail = %signal.description,
                              "enforcement confirmed but a critical flow is being dropped; not reverting \
                               (--enforcement-revert-after-confirm is off): put audit mode back with \
                               cilium-dbg endpoint config ID PolicyAuditMode=Enabled if the node is cut off");
                        announce(&self.metrics, self.events.as_deref(), t, "alarm");
                        let t = &mut self.trials[idx];
                        t.history.push(TrialEvent {
                            at: now,
                            phase: TrialPhase::Confirmed,
                            message: format!("alarm: {}", signal.description),
                        });
                        self.save_logged();
                    }
                }
                TrialPhase::Requested | TrialPhase::Reverted | TrialPhase::Expired | TrialPhase::Refused => {}
            }
        }
    }

    fn first_signal(
        &self,
        idx: usize,
        flows: &[FlowRecord],
        directory: &dyn EndpointDirectory,
        now: SystemTime,
    ) -> Option<CriticalSignal> {
        let t = &self.trials[idx];
        let watched = WatchedEndpoint {
            endpoint_id: t.endpoint_id,
            is_host: t.endpoint_kind == EndpointKind::Host,
            since: t.switched_at?,
            strict: t.strict,
        };
        let mut signals = self.watch.signals(flows, directory, &[watched], now);
        if let (true, Some((_, reach))) = (watched.is_host, &self.reach) {
            for loss in reach.losses(&reach::parse_targets(&t.reach_baseline), watched.since) {
                signals.push(CriticalSignal {
                    endpoint_id: t.endpoint_id,
                    kind: SignalKind::ReachLost,
                    description: format!(
                        "this node no longer reaches the API server at {} ({} connects failed in a row since the \
                         switch: {})",
                        loss.target, loss.failures, loss.error
                    ),
                    first_seen: loss.since,
                });
            }
            signals.sort_by_key(|s| s.first_seen);
        }
        signals.into_iter().next()
    }

    /// At start-up: continue or revert what the record says was under way.
    pub async fn resume(&mut self, now: SystemTime) {
        for idx in 0..self.trials.len() {
            if !self.trials[idx].is_active() {
                continue;
            }
            let (id, phase, trial) =
                (self.trials[idx].endpoint_id, self.trials[idx].phase, self.trials[idx].id.clone());
            match phase {
                TrialPhase::Requested => {
                    // Killed between the record and the read-back: whatever
                    // Cilium did, the recorded value is the safe one.
                    let why = "the agent restarted before the switch was read back".to_owned();
                    match self.api.audit_mode(id).await {
                        Ok(v) if v == self.trials[idx].audit_mode_before => {
                            self.trials[idx].end(now, TrialPhase::Refused, format!("{why}; the endpoint is as it was"));
                            announce(&self.metrics, self.events.as_deref(), &self.trials[idx], "refused");
                            self.save_logged();
                        }
                        _ => self.revert(idx, TrialPhase::Reverted, "reverted", why, None, now).await,
                    }
                }
                TrialPhase::Switched => {
                    let deadline = self.trials[idx].deadline.unwrap_or(now);
                    if now >= deadline {
                        let why = "the trial's deadline passed while the agent was down".to_owned();
                        self.revert(idx, TrialPhase::Expired, "expired", why, None, now).await;
                        continue;
                    }
                    match self.api.audit_mode(id).await {
                        Ok(OptionValue::Disabled) => {
                            info!(trial = %trial, endpoint_id = id, deadline = %format_rfc3339(deadline),
                                  "enforcement trial continues after an agent restart");
                            self.trials[idx].history.push(TrialEvent {
                                at: now,
                                phase,
                                message: "agent restarted; the trial continues".into(),
                            });
                            self.save_logged();
                        }
                        Ok(OptionValue::Enabled) => {
                            // Someone else put it back: nothing of ours to revert.
                            let t = &mut self.trials[idx];
                            t.end(
                                now,
                                TrialPhase::Reverted,
                                "found back in audit mode after an agent restart (not by this agent)",
                            );
                            announce(&self.metrics, self.events.as_deref(), t, "reverted");
                            self.save_logged();
                        }
                        Err(e) => {
                            // Cannot tell: the watch cannot be trusted to have
                            // seen the gap either; revert.
                            let why = format!("the agent restarted and could not read the endpoint back ({e})");
                            self.revert(idx, TrialPhase::Reverted, "reverted", why, None, now).await;
                        }
                    }
                }
                TrialPhase::Confirmed | TrialPhase::RevertFailed => {
                    info!(trial = %trial, endpoint_id = id, phase = phase.as_str(),
                          "enforcement trial resumed after an agent restart");
                }
                TrialPhase::Reverted | TrialPhase::Expired | TrialPhase::Refused => {}
            }
        }
    }
}

fn outcome_name(s: &str) -> &'static str {
    super::metrics::OUTCOMES.into_iter().find(|o| *o == s).unwrap_or("reverted")
}

/// These strings reach log lines, Event notes and the record: no control
/// characters (a newline would forge a log line), bounded length.
fn check_text(what: &str, text: Option<&str>, max: usize) -> Result<(), TrialError> {
    match text {
        Some(t) if t.chars().any(char::is_control) || t.chars().count() > max => {
            Err(TrialError::BadRequest(format!("{what} must be at most {max} characters without control characters")))
        }
        _ => Ok(()),
    }
}

fn check_requester(by: &Requester) -> Result<(), TrialError> {
    check_text("who", Some(&by.who), 256)?;
    check_text("reason", by.reason.as_deref(), 512)
}

fn validate(req: &TrialRequest, settings: &TrialSettings) -> Result<(), TrialError> {
    if req.try_seconds == 0 || Duration::from_secs(req.try_seconds) > settings.max_try {
        return Err(TrialError::BadRequest(format!(
            "--try must be between 1s and {} (got {}s)",
            format_duration(settings.max_try),
            req.try_seconds
        )));
    }
    check_text("endpoint_name", Some(&req.endpoint_name), 320)?;
    check_requester(&req.requested_by)?;
    if req.requested_by.who.trim().is_empty() {
        return Err(TrialError::BadRequest("a trial needs requested_by.who (who asked)".into()));
    }
    let p = &req.preflight;
    if p.forced {
        if req.requested_by.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
            return Err(TrialError::BadRequest("--force needs --reason TEXT: the reason is recorded".into()));
        }
    } else if p.exit_code != 0 || p.state != "ready" {
        return Err(TrialError::NotSafe {
            endpoint: req.endpoint_name.clone(),
            state: p.state.clone(),
            exit_code: p.exit_code,
        });
    }
    Ok(())
}

fn new_record(req: TrialRequest, before: OptionValue, settings: &TrialSettings, now: SystemTime) -> TrialRecord {
    let unix_ms = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
    TrialRecord {
        id: format!("t{unix_ms}-{}", req.endpoint_id),
        endpoint_id: req.endpoint_id,
        endpoint_name: req.endpoint_name,
        endpoint_kind: req.endpoint_kind,
        audit_mode_before: before,
        requested_by: req.requested_by,
        preflight: req.preflight,
        strict: req.strict,
        try_seconds: req.try_seconds,
        watch_after_confirm_seconds: settings.watch_after_confirm.as_secs(),
        revert_after_confirm: settings.revert_after_confirm,
        requested_at: now,
        switched_at: None,
        deadline: None,
        confirmed_at: None,
        confirmed_by: None,
        ended_at: None,
        phase: TrialPhase::Requested,
        outcome: None,
        time_to_revert_seconds: None,
        pending_revert: None,
        reach_baseline: Vec::new(),
        history: Vec::new(),
    }
}
