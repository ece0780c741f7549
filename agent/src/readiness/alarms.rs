//! Alarms: a WARN log line once per new risk, and a Kubernetes Event on the
//! Node (host endpoint) or the Pod (other endpoints), deduplicated and
//! rate-limited so a flapping flow cannot flood the API server.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use thiserror::Error;

use super::report::{EndpointReadiness, ReadinessReport, ReadinessState};
use crate::{
    model::{Direction, EndpointKind},
    text::{escape_for_terminal as escape, neutralize},
};

/// Longest alarm message logged, in characters.
const MAX_MESSAGE_CHARS: usize = 2048;

/// The object an Event is attached to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlarmTarget {
    Node { name: String },
    Pod { namespace: String, name: String },
}

impl std::fmt::Display for AlarmTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AlarmTarget::Node { name } => write!(f, "node/{name}"),
            AlarmTarget::Pod { namespace, name } => write!(f, "pod/{namespace}/{name}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlarmKind {
    /// Audited critical flows on the host: enforcement would cut them.
    HostLockoutRisk,
    /// Denied critical flows on the host: the node is losing them.
    HostLockoutInProgress,
    /// An endpoint has would-deny flows.
    AuditModeWouldBreak,
}

impl AlarmKind {
    /// The Event `reason` (PascalCase, as Kubernetes expects).
    pub fn reason(self) -> &'static str {
        match self {
            AlarmKind::HostLockoutRisk => "HostLockoutRisk",
            AlarmKind::HostLockoutInProgress => "HostLockoutInProgress",
            AlarmKind::AuditModeWouldBreak => "AuditModeWouldBreak",
        }
    }
}

/// One risk, identified by `key` for deduplication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alarm {
    pub key: String,
    pub kind: AlarmKind,
    /// None when the object is unknown (no node name, pod not enriched):
    /// then only the log line is written.
    pub target: Option<AlarmTarget>,
    pub message: String,
}

/// What is published: one Event per target and kind, covering its new keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlarmEvent {
    pub target: AlarmTarget,
    pub kind: AlarmKind,
    pub keys: Vec<String>,
    /// At most 1 kB, as Kubernetes requires of an Event note.
    pub note: String,
}

#[derive(Debug, Error)]
pub enum AlarmError {
    #[error(
        "cannot publish the {reason} event on {target}: {source}; check the agent's RBAC (create/patch events.k8s.io events)"
    )]
    Kube { target: String, reason: String, source: kube::Error },
}

/// Where Events go.
pub trait AlarmSink: Send + Sync {
    fn publish<'a>(&'a self, event: &'a AlarmEvent) -> BoxFuture<'a, Result<(), AlarmError>>;
}

/// Keeps what was published, for tests and dry runs.
#[derive(Debug, Default)]
pub struct MemorySink {
    pub events: Mutex<Vec<AlarmEvent>>,
}

impl MemorySink {
    pub fn take(&self) -> Vec<AlarmEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl AlarmSink for MemorySink {
    fn publish<'a>(&'a self, event: &'a AlarmEvent) -> BoxFuture<'a, Result<(), AlarmError>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(event.clone());
        Box::pin(async { Ok(()) })
    }
}

/// Publishes through kube-runtime's event recorder (events.k8s.io/v1),
/// which turns repeats of the same reason on the same object into a series.
pub struct KubeEventSink {
    client: kube::Client,
    recorder: kube::runtime::events::Recorder,
    uids: Mutex<HashMap<AlarmTarget, String>>,
    /// UIDs the agent already knows (its pod metadata and node watches):
    /// the chart's RBAC grants no `get` on pods.
    known_uid: Option<UidLookup>,
}

/// Finds a target's UID without asking the API server.
pub type UidLookup = Arc<dyn Fn(&AlarmTarget) -> Option<String> + Send + Sync>;

impl KubeEventSink {
    /// `instance` names this agent (usually its pod name).
    pub fn new(client: kube::Client, instance: Option<String>) -> KubeEventSink {
        let reporter = kube::runtime::events::Reporter { controller: "verdict-agent".into(), instance };
        KubeEventSink {
            recorder: kube::runtime::events::Recorder::new(client.clone(), reporter),
            client,
            uids: Mutex::new(HashMap::new()),
            known_uid: None,
        }
    }

    /// Takes UIDs from `lookup` first (see [`UidLookup`]).
    pub fn with_uid_lookup(mut self, lookup: UidLookup) -> KubeEventSink {
        self.known_uid = Some(lookup);
        self
    }

    /// `kubectl describe` matches events by UID too, so look it up once;
    /// without it the event is still created, just harder to find.
    async fn uid(&self, target: &AlarmTarget) -> Option<String> {
        if let Some(uid) = self.uids.lock().unwrap_or_else(|e| e.into_inner()).get(target) {
            return Some(uid.clone());
        }
        use k8s_openapi::api::core::v1::Node;
        let known = self.known_uid.as_ref().and_then(|lookup| lookup(target));
        let uid = match (known, target) {
            (Some(uid), _) => uid,
            (None, AlarmTarget::Node { name }) => {
                kube::Api::<Node>::all(self.client.clone()).get(name).await.ok().and_then(|n| n.metadata.uid)?
            }
            // No `get` on pods (RBAC): a pod the watch has not seen yet
            // gets its Event without a UID, and the next one may have it.
            (None, AlarmTarget::Pod { .. }) => return None,
        };
        self.uids.lock().unwrap_or_else(|e| e.into_inner()).insert(target.clone(), uid.clone());
        Some(uid)
    }
}

impl AlarmSink for KubeEventSink {
    fn publish<'a>(&'a self, event: &'a AlarmEvent) -> BoxFuture<'a, Result<(), AlarmError>> {
        Box::pin(async move {
            use k8s_openapi::api::core::v1::ObjectReference;
            let uid = self.uid(&event.target).await;
            let reference = match &event.target {
                AlarmTarget::Node { name } => ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(name.clone()),
                    uid,
                    ..ObjectReference::default()
                },
                AlarmTarget::Pod { namespace, name } => ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    namespace: Some(namespace.clone()),
                    name: Some(name.clone()),
                    uid,
                    ..ObjectReference::default()
                },
            };
            let ev = kube::runtime::events::Event {
                type_: kube::runtime::events::EventType::Warning,
                reason: event.kind.reason().into(),
                note: Some(event.note.clone()),
                action: "AuditReadiness".into(),
                secondary: None,
            };
            self.recorder.publish(&ev, &reference).await.map_err(|source| AlarmError::Kube {
                target: event.target.to_string(),
                reason: event.kind.reason().into(),
                source,
            })
        })
    }
}

/// Rate limits: a token bucket over all Events, and a floor per object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlarmLimits {
    /// Bucket size: Events that may go out at once.
    pub burst: u32,
    /// One token comes back every this long.
    pub refill_every: Duration,
    /// Minimum time between two Events of the same kind on one object.
    pub per_target_interval: Duration,
    /// A risk still active is announced again after this long.
    pub repeat_after: Duration,
}

impl Default for AlarmLimits {
    fn default() -> Self {
        AlarmLimits {
            burst: 10,
            refill_every: Duration::from_secs(6),
            per_target_interval: Duration::from_secs(60),
            repeat_after: Duration::from_secs(3600),
        }
    }
}

/// What one round of alarms did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlarmOutcome {
    /// Keys that were new this round (each logged once at WARN).
    pub new: Vec<String>,
    pub published: Vec<AlarmEvent>,
    /// Events held back by the rate limits; their keys stay pending.
    pub deferred: usize,
    pub errors: Vec<String>,
}

/// Turns reports into log lines and Events; keep one per agent.
pub struct AlarmManager {
    sink: Arc<dyn AlarmSink>,
    limits: AlarmLimits,
    /// Keys active in the previous round.
    active: BTreeSet<String>,
    /// Keys not yet covered by a published Event.
    pending: BTreeMap<String, Alarm>,
    /// When each key was last covered by an Event.
    announced: HashMap<String, SystemTime>,
    last_event: HashMap<(AlarmTarget, AlarmKind), SystemTime>,
    tokens: f64,
    last_refill: Option<SystemTime>,
}

impl AlarmManager {
    pub fn new(sink: Arc<dyn AlarmSink>, limits: AlarmLimits) -> AlarmManager {
        AlarmManager {
            sink,
            limits,
            active: BTreeSet::new(),
            pending: BTreeMap::new(),
            announced: HashMap::new(),
            last_event: HashMap::new(),
            tokens: f64::from(limits.burst),
            last_refill: None,
        }
    }

    /// Logs new risks, then publishes what the limits allow.
    pub async fn process(&mut self, report: &ReadinessReport, now: SystemTime) -> AlarmOutcome {
        let alarms = alarms_from(report);
        let mut outcome = AlarmOutcome::default();
        let current: BTreeSet<String> = alarms.iter().map(|a| a.key.clone()).collect();
        for a in &alarms {
            let due = self
                .announced
                .get(&a.key)
                .is_none_or(|&t| now.duration_since(t).unwrap_or_default() >= self.limits.repeat_after);
            if !self.active.contains(&a.key) {
                let (key, target, message) = logged(a);
                tracing::warn!(key = %key, kind = a.kind.reason(), target = ?target, "{message}");
                outcome.new.push(a.key.clone());
            }
            if due && a.target.is_some() {
                self.pending.insert(a.key.clone(), a.clone());
            }
        }
        // A risk that went away is no longer worth an Event.
        self.pending.retain(|k, _| current.contains(k));
        self.announced.retain(|k, _| current.contains(k));
        self.active = current;

        self.refill(now);
        let mut groups: BTreeMap<(AlarmTarget, AlarmKind), Vec<Alarm>> = BTreeMap::new();
        for a in self.pending.values() {
            if let Some(t) = &a.target {
                groups.entry((t.clone(), a.kind)).or_default().push(a.clone());
            }
        }
        for ((target, kind), group) in groups {
            let recent = self
                .last_event
                .get(&(target.clone(), kind))
                .is_some_and(|&t| now.duration_since(t).unwrap_or_default() < self.limits.per_target_interval);
            if recent || self.tokens < 1.0 {
                outcome.deferred += 1;
                continue;
            }
            self.tokens -= 1.0;
            let event = AlarmEvent {
                target: target.clone(),
                kind,
                keys: group.iter().map(|a| a.key.clone()).collect(),
                note: note(&group),
            };
            match self.sink.publish(&event).await {
                Ok(()) => {
                    self.last_event.insert((target, kind), now);
                    for k in &event.keys {
                        self.pending.remove(k);
                        self.announced.insert(k.clone(), now);
                    }
                    outcome.published.push(event);
                }
                Err(e) => {
                    tracing::warn!(error = %neutralize(&e.to_string(), MAX_MESSAGE_CHARS), "alarm event not published; will retry next round");
                    outcome.errors.push(e.to_string());
                }
            }
        }
        outcome
    }

    fn refill(&mut self, now: SystemTime) {
        if let Some(last) = self.last_refill {
            let elapsed = now.duration_since(last).unwrap_or_default().as_secs_f64();
            let per = self.limits.refill_every.as_secs_f64().max(0.001);
            self.tokens = (self.tokens + elapsed / per).min(f64::from(self.limits.burst));
        }
        self.last_refill = Some(now);
    }
}

/// The key, target and message of an alarm as the WARN line shows them:
/// names in them came from the cluster and are escaped, so no name can end
/// the line or forge another (`text::neutralize`).
pub(crate) fn logged(a: &Alarm) -> (String, Option<String>, String) {
    (
        neutralize(&a.key, MAX_MESSAGE_CHARS),
        a.target.as_ref().map(|t| escape(&t.to_string())),
        neutralize(&a.message, MAX_MESSAGE_CHARS),
    )
}

/// Joins messages into an Event note of at most 1 kB.
fn note(group: &[Alarm]) -> String {
    let mut out = String::new();
    for (i, a) in group.iter().enumerate() {
        let line = if out.is_empty() { a.message.clone() } else { format!("; {}", a.message) };
        if out.len() + line.len() > 960 {
            out.push_str(&format!("; and {} more", group.len() - i));
            break;
        }
        out.push_str(&line);
    }
    out
}

fn endpoint_target(e: &EndpointReadiness, node: Option<&str>) -> Option<AlarmTarget> {
    match e.kind {
        EndpointKind::Host => node.map(|n| AlarmTarget::Node { name: n.into() }),
        _ => match (&e.namespace, &e.pod) {
            (Some(ns), Some(pod)) => Some(AlarmTarget::Pod { namespace: ns.clone(), name: pod.clone() }),
            _ => None,
        },
    }
}

fn arrow(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    }
}

/// Every alarm a report calls for. Keys are stable across rounds for the
/// same risk; ephemeral-port replies are keyed per remote side, since each
/// connection has its own port.
pub fn alarms_from(report: &ReadinessReport) -> Vec<Alarm> {
    let node = report.node.as_deref();
    let node_target = node.map(|n| AlarmTarget::Node { name: n.into() });
    let mut out = Vec::new();
    for r in &report.lockout.risk {
        out.push(Alarm {
            key: format!("risk/{}/{}/{}/{}/{}", r.service, r.direction.as_str(), r.remote, r.port, r.protocol),
            kind: AlarmKind::HostLockoutRisk,
            target: node_target.clone(),
            message: format!(
                "host lockout risk: {} is audited ({} notifications, last {}); enforcement would drop it",
                r.describe(),
                r.notifications,
                crate::timefmt::format_rfc3339(r.last_seen)
            ),
        });
    }
    for r in &report.lockout.in_progress {
        out.push(Alarm {
            key: format!("in_progress/{}/{}/{}/{}/{}", r.service, r.direction.as_str(), r.remote, r.port, r.protocol),
            kind: AlarmKind::HostLockoutInProgress,
            target: node_target.clone(),
            message: format!(
                "host lockout in progress: {} is denied ({} notifications, last {}{}): {}",
                r.describe(),
                r.notifications,
                crate::timefmt::format_rfc3339(r.last_seen),
                if r.after_switch { ", right after audit mode went off" } else { "" },
                r.why
            ),
        });
    }
    let mut reply_sides: BTreeMap<&str, (u64, Vec<String>)> = BTreeMap::new();
    for r in &report.lockout.suspected_reply_drops {
        let e = reply_sides.entry(&r.remote).or_default();
        e.0 += r.notifications;
        e.1.extend(r.possible_services.iter().cloned());
    }
    for (remote, (n, mut services)) in reply_sides {
        services.sort();
        services.dedup();
        out.push(Alarm {
            key: format!("reply/{remote}"),
            kind: AlarmKind::HostLockoutInProgress,
            target: node_target.clone(),
            message: format!(
                "host firewall is dropping what look like replies from {} to the node's ephemeral ports ({n} \
                 notifications): connections opened before enforcement ({}) may be cut",
                escape(remote),
                if services.is_empty() { "service unknown".into() } else { escape(&services.join(", ")) }
            ),
        });
    }
    for d in &report.lockout.unattributed_drops {
        out.push(Alarm {
            key: format!("drop/{}/{}", d.direction.as_str(), d.remote),
            kind: AlarmKind::HostLockoutInProgress,
            target: node_target.clone(),
            message: format!(
                "host firewall dropped {} packet(s) {} {} (reason {}; drop notifications carry no port){}",
                d.notifications,
                arrow(d.direction),
                escape(&d.remote),
                d.reason,
                if d.after_switch { ", right after audit mode went off" } else { "" }
            ),
        });
    }
    for e in &report.endpoints {
        if e.state != ReadinessState::WouldBreak {
            continue;
        }
        for f in &e.would_deny {
            // Host critical flows already have their lockout alarm.
            if e.kind == EndpointKind::Host && f.service.is_some() {
                continue;
            }
            out.push(Alarm {
                key: format!(
                    "would_break/{}/{}/{}/{}/{}",
                    e.endpoint_id,
                    f.direction.as_str(),
                    f.remote_identity,
                    f.port,
                    f.protocol
                ),
                kind: AlarmKind::AuditModeWouldBreak,
                target: endpoint_target(e, node),
                message: format!(
                    "{}: {} {} {} {}/{} would be denied once PolicyAuditMode is off ({} notifications)",
                    e.display_name(),
                    f.direction.as_str(),
                    arrow(f.direction),
                    escape(&f.remote_name),
                    f.port,
                    f.protocol,
                    f.notifications
                ),
            });
        }
    }
    out
}
