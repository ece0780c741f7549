//! Audit-mode readiness and host-firewall lockout: from the flows the agent
//! counted, can PolicyAuditMode be switched off without breaking anything,
//! and is the node about to lose (or losing) traffic it cannot live without?
//!
//! The engine is pure: flows, what enrichment knows, since when the agent
//! has watched, and the time go in; a [`ReadinessReport`] comes out. The
//! only state it keeps between evaluations is what a snapshot cannot show:
//! counts per window, monotonic totals for counters, and the moment the
//! host left audit mode.

pub mod alarms;
pub mod catalogue;
pub mod evaluate;
pub mod lockout;
pub mod metrics;
pub mod noise;
pub mod remote;
pub mod report;

#[cfg(test)]
mod evidence_tests;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    str::FromStr,
    time::{Duration, SystemTime},
};

pub use catalogue::{CatalogueError, CriticalCatalogue, CriticalFlow, PortRange};
pub use evaluate::rejudge;
pub use lockout::HostLockoutDetector;
pub use noise::NoiseConfig;
pub use remote::RemoteSide;
pub use report::*;

use crate::{
    model::{Direction, EndpointDirectory, EndpointInfo, EndpointKind, FactSource, FlowRecord, NotifySource, Verdict},
    readiness_totals::{ReadinessCounter, ReadinessTotals},
    unattributed::LostEvidence,
};

/// Tunables of the readiness engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadinessConfig {
    /// Recent past for lockout risk, lockout in progress and scan noise.
    pub window: Duration,
    /// Evidence needed before `ready`, and how far back would-deny flows
    /// count: a flow audited 20 hours ago (a nightly job) still breaks.
    pub min_evidence: Duration,
    pub catalogue: CriticalCatalogue,
    pub noise: NoiseConfig,
    /// The node's ephemeral port range (Linux default 32768-60999,
    /// `net.ipv4.ip_local_port_range`), for replies of pre-existing connections.
    pub ephemeral_ports: PortRange,
    /// How long after audit mode goes off in-progress findings are flagged.
    pub watch_after_switch: Duration,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        ReadinessConfig {
            window: Duration::from_secs(15 * 60),
            min_evidence: Duration::from_secs(24 * 3600),
            catalogue: CriticalCatalogue::builtin(),
            noise: NoiseConfig::default(),
            ephemeral_ports: PortRange::range(32768, 60999),
            watch_after_switch: Duration::from_secs(10 * 60),
        }
    }
}

/// A Cilium release, for the gates that depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CiliumVersion {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl CiliumVersion {
    pub fn at_least(self, major: u16, minor: u16) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for CiliumVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for CiliumVersion {
    type Err = String;
    /// `1.16.3`, `v1.17.0-rc.1`, `1.18.3 c160168901 2025-...` (as `cilium-dbg version` prints).
    fn from_str(s: &str) -> Result<CiliumVersion, String> {
        let word = s.split_whitespace().next().unwrap_or("");
        let core = word.trim_start_matches('v').split(['-', '+']).next().unwrap_or("");
        let mut it = core.split('.').map(|p| p.parse::<u16>());
        match (it.next(), it.next(), it.next()) {
            (Some(Ok(major)), Some(Ok(minor)), patch) => {
                Ok(CiliumVersion { major, minor, patch: patch.and_then(Result::ok).unwrap_or(0) })
            }
            _ => Err(format!("{s:?} is not a Cilium version (expected e.g. 1.16.3)")),
        }
    }
}

/// Cilium's events rate limiter (v1.17+ hidden flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// `--bpf-events-default-rate-limit` is non-zero.
    pub configured: bool,
    /// Notifications it dropped in the window (`cilium_ratelimit_metrics`), if read.
    pub dropped: Option<u64>,
}

/// Node-wide facts that decide whether silence means anything. `None`
/// everywhere means the agent could not read them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvidenceEnvironment {
    pub cilium_version: Option<CiliumVersion>,
    /// `--bpf-events-policy-verdict-enabled` (v1.16+; always on before).
    pub verdict_notifications: Option<bool>,
    pub rate_limit: Option<RateLimit>,
}

/// Since when the agent has been watching, per endpoint and direction
/// (an endpoint created later, or a policy change, starts a new watch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Applies to every endpoint without its own entry (the agent's start).
    pub since: Option<SystemTime>,
    pub per_endpoint: BTreeMap<(u16, Direction), SystemTime>,
}

impl Observation {
    pub fn since_start(t: SystemTime) -> Observation {
        Observation { since: Some(t), per_endpoint: BTreeMap::new() }
    }
    pub fn since(&self, endpoint: u16, dir: Direction) -> Option<SystemTime> {
        self.per_endpoint.get(&(endpoint, dir)).copied().or(self.since)
    }
}

/// What identifies one flow across evaluations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub endpoint_id: u16,
    pub direction: Direction,
    pub remote_identity: u32,
    pub proto: u8,
    pub dst_port: u16,
    pub verdict: Verdict,
    pub match_type: u8,
    pub source: NotifySource,
    pub reason: u8,
    pub ipv6: bool,
}

impl From<&FlowRecord> for FlowKey {
    fn from(f: &FlowRecord) -> FlowKey {
        FlowKey {
            endpoint_id: f.endpoint_id,
            direction: f.direction,
            remote_identity: f.remote_identity,
            proto: f.proto,
            dst_port: f.dst_port,
            verdict: f.verdict,
            match_type: f.match_type,
            source: f.source,
            reason: f.reason,
            ipv6: f.ipv6,
        }
    }
}

/// Source ports per flow, when a capture carried them (the kernel
/// notification does not): they confirm replies of pre-existing connections.
pub type SourcePorts = BTreeMap<FlowKey, BTreeSet<u16>>;

/// Everything one evaluation looks at.
pub struct ReadinessInput<'a> {
    pub flows: &'a [FlowRecord],
    pub directory: &'a dyn EndpointDirectory,
    pub observation: &'a Observation,
    pub now: SystemTime,
    pub environment: EvidenceEnvironment,
    /// The host endpoint, when the operator named it (`--host-endpoint`);
    /// the directory's answer wins when it has one.
    pub host_endpoint: Option<u16>,
    /// This node's name (for the report, alarms and suggested nodeSelectors).
    pub node: Option<String>,
    pub source_ports: Option<&'a SourcePorts>,
    /// Verdicts the kernel counted per endpoint that no flow carries
    /// (`crate::unattributed`); empty for captures, which lose nothing in
    /// the agent.
    pub lost_evidence: &'a [LostEvidence],
}

impl<'a> ReadinessInput<'a> {
    pub fn new(
        flows: &'a [FlowRecord],
        directory: &'a dyn EndpointDirectory,
        observation: &'a Observation,
        now: SystemTime,
    ) -> Self {
        ReadinessInput {
            flows,
            directory,
            observation,
            now,
            environment: EvidenceEnvironment::default(),
            host_endpoint: None,
            node: None,
            source_ports: None,
            lost_evidence: &[],
        }
    }
}

/// One evaluation's derived view, shared by the submodules.
pub(crate) struct Ctx<'a> {
    pub input: &'a ReadinessInput<'a>,
    pub config: &'a ReadinessConfig,
    pub window_start: SystemTime,
    pub lookback_start: SystemTime,
    /// Notifications in the window per flow (same index as the flows).
    pub window_counts: Vec<Option<u64>>,
    pub noise: HashSet<usize>,
    pub host: Option<u16>,
    pub host_by: HostIdentifiedBy,
    pub host_source: Option<FactSource>,
    pub any_policy_verdicts: bool,
    pub would_deny_totals: BTreeMap<(u16, Direction), u64>,
    pub noise_totals: BTreeMap<u16, u64>,
    endpoints: HashMap<u16, EndpointInfo>,
    /// Flow indices per endpoint, so each endpoint looks at its own flows only.
    pub by_endpoint: HashMap<u16, Vec<usize>>,
}

impl Ctx<'_> {
    /// The catalogue entry a flow of the host endpoint is, if any.
    pub fn critical_service(&self, f: &FlowRecord) -> Option<&CriticalFlow> {
        self.config.catalogue.find(f.direction, f.proto, f.dst_port, RemoteSide::of_identity(f.remote_identity))
    }

    pub fn endpoint_info(&self, id: u16) -> Option<EndpointInfo> {
        self.endpoints.get(&id).cloned().or_else(|| self.input.directory.endpoint(id))
    }

    /// Whether a flow's in-window count is at scan level.
    pub fn low_rate(&self, idx: usize) -> bool {
        let f = &self.input.flows[idx];
        self.window_counts[idx].unwrap_or(f.notifications) <= self.config.noise.max_notifications_per_port
    }
}

/// Granularity of the per-flow history behind the window counts.
const WINDOW_BUCKETS: u32 = 16;

/// What the engine remembers of one flow between evaluations: 48 bytes, no
/// allocation for a flow whose count has not moved within the window.
#[derive(Debug)]
struct FlowHistory {
    /// The count at the previous evaluation ([`NOT_YET`] before the first):
    /// the growth since is what the `_total` counters add.
    last_count: u64,
    snapshots: Snapshots,
}

const NOT_YET: u64 = u64::MAX;

impl Default for FlowHistory {
    fn default() -> Self {
        FlowHistory { last_count: NOT_YET, snapshots: Snapshots::default() }
    }
}

/// (unix seconds, count) snapshots of a flow, oldest first: the newest at
/// or before a window's start tells the flow's count inside the window.
/// The oldest is kept inline (time 0: none), since most flows need no other.
#[derive(Debug, Default)]
struct Snapshots {
    oldest: (u32, u64),
    newer: Vec<(u32, u64)>,
}

impl Snapshots {
    fn iter(&self) -> impl DoubleEndedIterator<Item = &(u32, u64)> {
        std::iter::once(&self.oldest).filter(|s| s.0 != 0).chain(&self.newer)
    }

    fn push(&mut self, snapshot: (u32, u64)) {
        if self.oldest.0 == 0 { self.oldest = snapshot } else { self.newer.push(snapshot) }
    }

    /// Forgets the snapshots before the newest one at or before `start`.
    fn forget_before(&mut self, start: u32) {
        if let Some(i) = self.newer.iter().rposition(|&(t, _)| t <= start) {
            self.oldest = self.newer[i];
            self.newer.drain(..=i);
            if self.newer.is_empty() {
                self.newer = Vec::new();
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.iter().count()
    }
}

/// Seconds since the epoch; u32 lasts until 2106.
fn unix_secs(t: SystemTime) -> u32 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32)
}

/// The readiness engine: evaluate as often as the flows are read.
#[derive(Debug)]
pub struct ReadinessEngine {
    config: ReadinessConfig,
    history: HashMap<FlowKey, FlowHistory>,
    would_deny_totals: BTreeMap<(u16, Direction), u64>,
    noise_totals: BTreeMap<u16, u64>,
    lockout: HostLockoutDetector,
    /// Restored totals: the next evaluation sets baselines, adds nothing.
    baseline_next: bool,
}

impl ReadinessEngine {
    pub fn new(config: ReadinessConfig) -> ReadinessEngine {
        ReadinessEngine {
            config,
            history: HashMap::new(),
            would_deny_totals: BTreeMap::new(),
            noise_totals: BTreeMap::new(),
            lockout: HostLockoutDetector::new(),
            baseline_next: false,
        }
    }

    pub fn config(&self) -> &ReadinessConfig {
        &self.config
    }

    /// Replaces the critical-flow catalogue (the API server's port was
    /// learned or changed); flow histories and totals are kept.
    pub fn set_catalogue(&mut self, catalogue: catalogue::CriticalCatalogue) {
        self.config.catalogue = catalogue;
    }

    /// Continues the `_total` counters of a previous agent (from the pinned
    /// ledger). The next evaluation only takes each flow's count as its
    /// baseline, so nothing counted before the restart is added twice.
    pub fn restore_totals(&mut self, totals: &ReadinessTotals) {
        for (&counter, &value) in totals {
            match counter {
                ReadinessCounter::WouldDeny(ep, dir) => {
                    self.would_deny_totals.insert((ep, dir), value);
                }
                ReadinessCounter::ScanNoise(ep) => {
                    self.noise_totals.insert(ep, value);
                }
            }
        }
        self.baseline_next = !totals.is_empty();
    }

    /// The `_total` counters, to persist.
    pub fn totals(&self) -> ReadinessTotals {
        let would_deny =
            self.would_deny_totals.iter().map(|(&(ep, dir), &v)| (ReadinessCounter::WouldDeny(ep, dir), v));
        let noise = self.noise_totals.iter().map(|(&ep, &v)| (ReadinessCounter::ScanNoise(ep), v));
        would_deny.chain(noise).collect()
    }

    pub fn evaluate(&mut self, input: &ReadinessInput<'_>) -> ReadinessReport {
        let now = input.now;
        let window_start = now.checked_sub(self.config.window).unwrap_or(SystemTime::UNIX_EPOCH);
        let lookback_start = now.checked_sub(self.config.min_evidence).unwrap_or(SystemTime::UNIX_EPOCH);
        let window_counts = self.window_counts(input.flows, window_start, now);

        let endpoints: HashMap<u16, EndpointInfo> =
            input.directory.endpoints().into_iter().map(|e| (e.id, e)).collect();
        let (host, host_by, host_source) = match endpoints.values().find(|e| e.kind == EndpointKind::Host) {
            Some(e) => (Some(e.id), HostIdentifiedBy::Directory, e.policy_source),
            None => match input.host_endpoint {
                Some(id) if input.directory.endpoint(id).is_some_and(|e| e.kind == EndpointKind::Host) => {
                    (Some(id), HostIdentifiedBy::Directory, input.directory.endpoint(id).and_then(|e| e.policy_source))
                }
                Some(id) => (Some(id), HostIdentifiedBy::Operator, None),
                None => (None, HostIdentifiedBy::Unknown, None),
            },
        };
        let mut ctx = Ctx {
            input,
            config: &self.config,
            window_start,
            lookback_start,
            window_counts,
            noise: HashSet::new(),
            host,
            host_by,
            host_source,
            any_policy_verdicts: input.flows.iter().any(|f| f.source == NotifySource::PolicyVerdict),
            would_deny_totals: BTreeMap::new(),
            noise_totals: BTreeMap::new(),
            endpoints,
            by_endpoint: input.flows.iter().enumerate().fold(HashMap::new(), |mut m, (i, f)| {
                m.entry(f.endpoint_id).or_insert_with(Vec::new).push(i);
                m
            }),
        };

        // Noise over the evidence period keeps old scans out of would_deny;
        // noise over the window is what the summaries and gauges show.
        let over_lookback = noise::classify(&ctx, lookback_start, false);
        let over_window = noise::classify(&ctx, window_start, true);
        ctx.noise = over_lookback.noise.union(&over_window.noise).copied().collect();
        let scanned: BTreeSet<u16> = over_window.summaries.iter().map(|s| s.endpoint_id).collect();

        if self.baseline_next {
            // Until the first read of the maps the flow list is empty: the
            // baseline is the first evaluation that has flows.
            let (mut wd, mut noise) = (BTreeMap::new(), BTreeMap::new());
            accumulate(&mut self.history, &mut wd, &mut noise, input.flows, &ctx.noise);
            self.baseline_next = input.flows.is_empty();
        } else {
            accumulate(&mut self.history, &mut self.would_deny_totals, &mut self.noise_totals, input.flows, &ctx.noise);
        }
        ctx.would_deny_totals = self.would_deny_totals.clone();
        ctx.noise_totals = self.noise_totals.clone();

        let lockout = self.lockout.detect(&ctx, &ctx.noise, &scanned);
        let endpoints: Vec<EndpointReadiness> =
            evaluate::endpoint_ids(&ctx).into_iter().map(|id| evaluate::evaluate_endpoint(&ctx, id)).collect();
        let host_entry = endpoints.iter().find(|e| Some(e.endpoint_id) == ctx.host);
        let host = evaluate::host_checks(&ctx, host_entry);

        let mut summary = Summary { endpoints: endpoints.len(), ..Summary::default() };
        for e in &endpoints {
            match e.state {
                ReadinessState::Ready => summary.ready += 1,
                ReadinessState::WouldBreak => summary.would_break += 1,
                ReadinessState::NoEvidence => summary.no_evidence += 1,
            }
            *summary.reasons.entry(e.reason.as_str().to_owned()).or_default() += 1;
        }
        summary.lockout_risk = lockout.risk.len();
        summary.lockout_in_progress = lockout.in_progress.len();

        let mut notes = vec![
            "Counts: allowed, audited and redirected traffic is notified once per new connection, denied traffic \
             once per packet; compare counts within a verdict, not across."
                .to_owned(),
        ];
        if input.flows.iter().all(|f| f.remote_addrs.is_empty()) {
            notes.push(
                "No remote addresses: the kernel notification carries none, so world flows can only be allowed as \
                 the whole `world` entity (captures carry addresses)."
                    .into(),
            );
        }

        ReadinessReport {
            generated_at: now,
            node: input.node.clone(),
            config: ReportConfig {
                window_seconds: self.config.window.as_secs(),
                min_evidence_seconds: self.config.min_evidence.as_secs(),
                noise_min_ports: self.config.noise.min_ports,
                noise_max_notifications_per_port: self.config.noise.max_notifications_per_port,
                ephemeral_ports: self.config.ephemeral_ports.to_string(),
                watch_after_switch_seconds: self.config.watch_after_switch.as_secs(),
                catalogue: self.config.catalogue.source.clone(),
            },
            summary,
            endpoints,
            host,
            lockout,
            noise: over_window.summaries,
            notes,
        }
    }

    /// In-window counts from the snapshots of earlier evaluations. Without
    /// one old enough, a flow first seen in the window counts whole and any
    /// other is unknown (None).
    fn window_counts(&mut self, flows: &[FlowRecord], window_start: SystemTime, now: SystemTime) -> Vec<Option<u64>> {
        let (start, now) = (unix_secs(window_start), unix_secs(now));
        let bucket = (self.config.window / WINDOW_BUCKETS).as_secs() as u32;
        let mut out = Vec::with_capacity(flows.len());
        let mut present = HashSet::with_capacity(flows.len());
        for f in flows {
            let key = FlowKey::from(f);
            present.insert(key);
            let snapshots = &mut self.history.entry(key).or_default().snapshots;
            let count = if f.first_seen >= window_start {
                Some(f.notifications)
            } else if f.last_seen < window_start {
                Some(0)
            } else {
                snapshots.iter().rev().find(|(t, _)| *t <= start).map(|&(_, n)| f.notifications.saturating_sub(n))
            };
            out.push(count);
            // A snapshot only when the count moved, and at most one per
            // bucket of the window: a flow's history stays bounded (idle:
            // one entry; busy: WINDOW_BUCKETS + 1) however often this runs.
            // Sparser snapshots can only start the window earlier, by at
            // most one bucket: a flow is kept in it longer, never dropped.
            let moved = snapshots.iter().next_back().is_none_or(|&(t, n)| n != f.notifications && t + bucket <= now);
            if moved {
                snapshots.push((now, f.notifications));
            }
            snapshots.forget_before(start);
        }
        self.history.retain(|k, _| present.contains(k));
        out
    }
}

/// Adds each flow's growth since the last evaluation to the monotonic
/// totals behind the `_total` counters.
fn accumulate(
    history: &mut HashMap<FlowKey, FlowHistory>,
    would_deny_totals: &mut BTreeMap<(u16, Direction), u64>,
    noise_totals: &mut BTreeMap<u16, u64>,
    flows: &[FlowRecord],
    noise: &HashSet<usize>,
) {
    for (idx, f) in flows.iter().enumerate() {
        let key = FlowKey::from(f);
        let prev = std::mem::replace(&mut history.entry(key).or_default().last_count, f.notifications);
        let prev = (prev != NOT_YET).then_some(prev);
        // A count below the last one is a new series: all of it is new.
        let delta = match prev {
            Some(p) if f.notifications >= p => f.notifications - p,
            _ => f.notifications,
        };
        if f.verdict == Verdict::Audited && !is_explicit_deny_hit(f) {
            *would_deny_totals.entry((f.endpoint_id, f.direction)).or_default() += delta;
        }
        if noise.contains(&idx) {
            *noise_totals.entry(f.endpoint_id).or_default() += delta;
        }
    }
}

/// An audited verdict whose match type is not `none` was matched by a deny
/// rule: audit mode let it through, enforcement will drop it as the
/// operator asked. It needs no allow (deny wins in Cilium) and breaks
/// nothing the operator did not mean to close. Match type `none` (no rule
/// matched: the default deny) and match types this build does not know
/// stay would-deny: an unknown value must not hide a flow that would break.
pub fn is_explicit_deny_hit(f: &FlowRecord) -> bool {
    f.verdict == Verdict::Audited && f.source == NotifySource::PolicyVerdict && (1..=6).contains(&f.match_type)
}

/// One evaluation without history: what `analyze` and tests use.
pub fn evaluate(input: &ReadinessInput<'_>, config: &ReadinessConfig) -> ReadinessReport {
    ReadinessEngine::new(config.clone()).evaluate(input)
}
