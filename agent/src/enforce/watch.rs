//! What makes a trial revert: the first critical signal on a switched
//! endpoint, read from the flows of each map read.
//!
//! For the host endpoint the readiness engine's lockout detector decides
//! what is critical (the catalogue of flows a node cannot live without,
//! replies of connections opened before the switch, policy drops from the
//! cluster's infrastructure); this module only keeps what happened after the
//! switch. For every switched endpoint, a flow it accepted before (allowed
//! or audited) that is now denied is critical: that is exactly the break the
//! readiness check promised would not happen. `strict` trials also revert on
//! any new denied flow.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    model::{Direction, EndpointDirectory, FlowRecord, Verdict, proto_name},
    readiness::{self, Observation, ReadinessConfig, ReadinessInput, RemoteSide},
    timefmt::rfc3339,
};

/// How often the maps are read while a trial runs: the revert follows the
/// first denied critical verdict within about twice this plus the Cilium
/// API's answer time.
pub const TRIAL_READ_INTERVAL: Duration = Duration::from_millis(100);

/// One endpoint under watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchedEndpoint {
    pub endpoint_id: u16,
    pub is_host: bool,
    /// The switch: only what was seen at or after it counts.
    pub since: SystemTime,
    pub strict: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    /// A catalogue flow of the host, denied (the lockout detector's in-progress list).
    LockoutInProgress,
    /// Denied ingress to the node's ephemeral ports from the infrastructure:
    /// replies of connections opened before the switch.
    ReplyDrop,
    /// Port-less policy drops from the infrastructure on the host.
    InfrastructureDrop,
    /// A flow the endpoint accepted before, denied now.
    AcceptedNowDenied,
    /// Any new denied flow (strict trials only).
    NewDenied,
    /// The node stopped reaching an API server endpoint it reached just
    /// before the switch (TCP connects, see `reach`).
    ReachLost,
}

impl SignalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::LockoutInProgress => "lockout_in_progress",
            SignalKind::ReplyDrop => "reply_drop",
            SignalKind::InfrastructureDrop => "infrastructure_drop",
            SignalKind::AcceptedNowDenied => "accepted_now_denied",
            SignalKind::NewDenied => "new_denied",
            SignalKind::ReachLost => "reach_lost",
        }
    }
}

/// One reason to revert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CriticalSignal {
    pub endpoint_id: u16,
    pub kind: SignalKind,
    /// What was cut, e.g. "kube-apiserver egress kube-apiserver 6443/tcp".
    pub description: String,
    /// The first notification of it at or after the switch, as far as the
    /// counters tell (a flow's first_seen, or the switch when the flow
    /// was seen before it too).
    #[serde(with = "rfc3339")]
    pub first_seen: SystemTime,
}

/// Finds critical signals in the flows of one map read.
#[derive(Clone, Debug)]
pub struct TrialWatch {
    config: ReadinessConfig,
}

impl TrialWatch {
    /// `config`: the agent's readiness settings (catalogue, window), so the
    /// watch and the readiness report agree on what is critical.
    pub fn new(config: ReadinessConfig) -> TrialWatch {
        TrialWatch { config }
    }

    /// Every signal on `watched`, earliest first.
    pub fn signals(
        &self,
        flows: &[FlowRecord],
        directory: &dyn EndpointDirectory,
        watched: &[WatchedEndpoint],
        now: SystemTime,
    ) -> Vec<CriticalSignal> {
        let mut out = Vec::new();
        for w in watched {
            let own: Vec<FlowRecord> = flows.iter().filter(|f| f.endpoint_id == w.endpoint_id).cloned().collect();
            if w.is_host {
                self.host_signals(&own, directory, w, now, &mut out);
            }
            denial_signals(&own, w, &mut out);
        }
        out.sort_by_key(|s| s.first_seen);
        let mut seen = HashSet::new();
        out.retain(|s| seen.insert((s.endpoint_id, s.kind, s.description.clone())));
        out
    }

    /// The lockout detector over the host's own flows only: it looks at
    /// nothing else, and a trial's 100 ms cadence must not evaluate the
    /// whole node.
    fn host_signals(
        &self,
        host_flows: &[FlowRecord],
        directory: &dyn EndpointDirectory,
        w: &WatchedEndpoint,
        now: SystemTime,
        out: &mut Vec<CriticalSignal>,
    ) {
        let observation = Observation::since_start(w.since);
        let mut input = ReadinessInput::new(host_flows, directory, &observation, now);
        input.host_endpoint = Some(w.endpoint_id);
        let report = readiness::evaluate(&input, &self.config);
        let lockout = report.lockout;
        if lockout.host_endpoint_id != Some(w.endpoint_id) {
            // The directory names another endpoint as the host: the
            // detector watched that one, which has no flows here.
            return;
        }
        let after = |last_seen: SystemTime| last_seen >= w.since;
        let first = |first_seen: SystemTime| first_seen.max(w.since);
        for e in lockout.in_progress.iter().filter(|e| after(e.last_seen)) {
            out.push(CriticalSignal {
                endpoint_id: w.endpoint_id,
                kind: SignalKind::LockoutInProgress,
                description: format!("{} ({})", e.describe(), e.why),
                first_seen: first(e.first_seen),
            });
        }
        for r in lockout.suspected_reply_drops.iter().filter(|r| after(r.last_seen)) {
            out.push(CriticalSignal {
                endpoint_id: w.endpoint_id,
                kind: SignalKind::ReplyDrop,
                description: format!(
                    "replies from {} to ephemeral port {}/{} dropped (connections opened before the switch; \
                     possibly {})",
                    r.remote,
                    r.port,
                    r.protocol,
                    r.possible_services.join(", ")
                ),
                first_seen: first(r.first_seen),
            });
        }
        for d in lockout.unattributed_drops.iter().filter(|d| after(d.last_seen)) {
            out.push(CriticalSignal {
                endpoint_id: w.endpoint_id,
                kind: SignalKind::InfrastructureDrop,
                description: format!(
                    "policy drops (reason {}) {} {} without a port",
                    d.reason,
                    d.direction.as_str(),
                    d.remote
                ),
                // Drop flows carry no first-seen of their own here: the
                // last one is at or after the switch.
                first_seen: d.last_seen.min(now).max(w.since),
            });
        }
    }
}

/// Denials of the endpoint since the switch: critical when the same
/// (direction, remote identity, protocol, port) was accepted before. On the
/// host, flows from `world` are left to the lockout detector, which tells a
/// port scan (audited before, denied now, and meant to be) from sustained
/// traffic on a critical port.
fn denial_signals(own: &[FlowRecord], w: &WatchedEndpoint, out: &mut Vec<CriticalSignal>) {
    let accepted: HashSet<(Direction, u32, u8, u16)> = own
        .iter()
        .filter(|f| matches!(f.verdict, Verdict::Allowed | Verdict::Audited | Verdict::Redirected))
        .map(|f| (f.direction, f.remote_identity, f.proto, f.dst_port))
        .collect();
    for f in own.iter().filter(|f| f.verdict == Verdict::Denied && f.last_seen >= w.since) {
        let key = (f.direction, f.remote_identity, f.proto, f.dst_port);
        let from_world = RemoteSide::of_identity(f.remote_identity) == RemoteSide::World;
        let kind = if accepted.contains(&key) && !(w.is_host && from_world) {
            SignalKind::AcceptedNowDenied
        } else if w.strict {
            SignalKind::NewDenied
        } else {
            continue;
        };
        out.push(CriticalSignal {
            endpoint_id: w.endpoint_id,
            kind,
            description: format!(
                "{} identity {} {}/{} denied",
                f.direction.as_str(),
                f.remote_identity,
                f.dst_port,
                proto_name(f.proto)
            ),
            first_seen: f.first_seen.max(w.since),
        });
    }
}

/// Tells the map reader to read at [`TRIAL_READ_INTERVAL`] while a trial
/// runs, at its configured interval otherwise; wakes the watch loop when a
/// trial starts.
#[derive(Clone, Debug, Default)]
pub struct ReadCadence {
    fast: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
}

impl ReadCadence {
    pub fn set_fast(&self, fast: bool) {
        if !self.fast.swap(fast, Ordering::Relaxed) && fast {
            self.wake.notify_one();
        }
    }

    pub fn is_fast(&self) -> bool {
        self.fast.load(Ordering::Relaxed)
    }

    /// The interval the map reader should wait now.
    pub fn interval(&self, configured: Duration) -> Duration {
        if self.is_fast() { configured.min(TRIAL_READ_INTERVAL) } else { configured }
    }

    /// Sleeps the watch loop's interval, or until a trial starts.
    pub async fn pause(&self, idle: Duration) {
        let wait = if self.is_fast() { TRIAL_READ_INTERVAL } else { idle };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = self.wake.notified() => {}
        }
    }
}
