//! Host-firewall lockout: critical flows of the host endpoint that
//! enforcement would cut (risk: audited) or is cutting (in progress:
//! denied), watched closely in the minutes after audit mode goes off.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::SystemTime,
};

use super::{
    Ctx,
    remote::RemoteSide,
    report::{
        EnforcementSwitch, LockoutEntry, LockoutReport, LockoutState, LostVerdicts, SuspectedReplyDrop, SwitchSource,
        UnattributedDrop,
    },
};
use crate::model::{Direction, FlowRecord, NotifySource, Verdict, proto_name};

/// What the kernel notification can and cannot tell about replies of
/// connections opened before enforcement. Shown in every lockout report.
pub const REPLY_NOTE: &str = "Cilium's host firewall drops replies of connections opened before enforcement \
(they have no conntrack entry created under policy, so the reply is judged as a new connection). Such a \
reply shows up as denied ingress on the host, addressed to the node's ephemeral port (the node opened \
the connection), from the remote side the node was talking to. The kernel notification carries the \
destination port only: the agent sees the ephemeral port and the remote identity, not the reply's \
source port, so it cannot tell which service (6443, 2379, 10250, ...) the connection was for, nor \
whether the connection predates the switch. Listed as suspected_reply_drops with the services that \
remote side uses; a capture with ports (hubble observe -o json) confirms the source port.";

const DROPS_NOTE: &str = "Policy drop notifications carry no port or protocol: a drop with no matching \
denied verdict is listed under unattributed_drops. Before Cilium 1.16 the host firewall reports denials \
only this way.";

const LOST_NOTE: &str = "Some audited or denied verdicts of the host in the window are in no flow the \
agent read (the flow table evicted them before a read): any of them could be a critical flow, so the \
lockout state is unknown, not clear. Raise --flow-table-size or lower --poll-interval.";

/// The host's audited and denied verdicts lost within the window.
fn lost_in_window(ctx: &Ctx<'_>, host: u16) -> Vec<LostVerdicts> {
    ctx.input
        .lost_evidence
        .iter()
        .filter(|l| l.endpoint_id == host && matches!(l.verdict, Verdict::Audited | Verdict::Denied))
        .filter(|l| l.last_grew >= ctx.window_start)
        .map(|l| LostVerdicts {
            direction: l.direction,
            verdict: l.verdict,
            verdicts: l.verdicts,
            last_grew: l.last_grew,
        })
        .collect()
}

/// Tracks the host endpoint across evaluations: the audit-mode switch.
#[derive(Debug, Default)]
pub struct HostLockoutDetector {
    host_id: Option<u16>,
    last_audit: BTreeMap<Direction, bool>,
    directory_switch: BTreeMap<Direction, SystemTime>,
    /// The previous evaluation: the switch happened after it.
    last_eval: Option<SystemTime>,
}

impl HostLockoutDetector {
    pub fn new() -> HostLockoutDetector {
        HostLockoutDetector::default()
    }

    pub(super) fn detect(&mut self, ctx: &Ctx<'_>, noise: &HashSet<usize>, scanned: &BTreeSet<u16>) -> LockoutReport {
        let mut report = LockoutReport {
            host_endpoint_id: ctx.host,
            state: LockoutState::Unknown,
            notes: vec![REPLY_NOTE.into(), DROPS_NOTE.into()],
            ..LockoutReport::default()
        };
        let Some(host) = ctx.host else {
            report.notes.insert(
                0,
                "The host endpoint is unknown (no enrichment source named it and no --host-endpoint was \
                 given): lockout detection is off."
                    .into(),
            );
            *self = HostLockoutDetector::default();
            return report;
        };
        if self.host_id != Some(host) {
            *self = HostLockoutDetector { host_id: Some(host), ..HostLockoutDetector::default() };
        }
        let host_flows: Vec<(usize, &FlowRecord)> =
            ctx.input.flows.iter().enumerate().filter(|(i, f)| f.endpoint_id == host && !noise.contains(i)).collect();

        self.track_directory(ctx, host);
        report.enforcement_switch = self.switches(ctx, &host_flows);

        let in_window = |f: &FlowRecord| f.last_seen >= ctx.window_start;
        let after_switch = |dir: Direction, f: &FlowRecord| {
            report_switch(&report.enforcement_switch, dir)
                .is_some_and(|s| f.last_seen >= s.at && f.first_seen <= s.watch_until)
        };

        // Sides and ports the node accepted (allowed or audited) before:
        // a denial of one of them is a loss, even from world.
        let accepted: HashSet<(Direction, RemoteSide, u8, u16)> = host_flows
            .iter()
            .filter(|(_, f)| matches!(f.verdict, Verdict::Allowed | Verdict::Audited | Verdict::Redirected))
            .filter(|(_, f)| f.last_seen >= ctx.lookback_start)
            .map(|(_, f)| (f.direction, RemoteSide::of_identity(f.remote_identity), f.proto, f.dst_port))
            .collect();

        for &(idx, f) in &host_flows {
            if !in_window(f) || f.source != NotifySource::PolicyVerdict {
                continue;
            }
            let side = RemoteSide::of_identity(f.remote_identity);
            let Some(critical) = ctx.critical_service(f) else { continue };
            let entry = |why: String| LockoutEntry {
                service: critical.service.clone(),
                port: f.dst_port,
                protocol: proto_name(f.proto),
                remote: side.as_str().into(),
                remote_identities: vec![f.remote_identity],
                direction: f.direction,
                notifications: f.notifications,
                notifications_in_window: ctx.window_counts[idx],
                first_seen: f.first_seen,
                last_seen: f.last_seen,
                after_switch: after_switch(f.direction, f),
                why,
                remote_addrs: f.remote_addrs.iter().copied().collect(),
            };
            match f.verdict {
                Verdict::Audited => report.risk.push(entry(String::new())),
                Verdict::Denied => {
                    let why = if accepted.contains(&(f.direction, side, f.proto, f.dst_port)) {
                        Some("accepted before in the evidence period, denied now".to_owned())
                    } else if side != RemoteSide::World {
                        Some(format!("{} traffic the node needs", side))
                    } else if !scanned.contains(&host) || !ctx.low_rate(idx) {
                        Some("sustained attempts from outside, not a scan".to_owned())
                    } else {
                        // A scanner knocking on 22 while the port is meant to be closed.
                        None
                    };
                    if let Some(why) = why {
                        report.in_progress.push(entry(why));
                    }
                }
                _ => {}
            }
        }

        report.suspected_reply_drops = self.reply_drops(ctx, &host_flows, &report.enforcement_switch);
        report.unattributed_drops = unattributed(ctx, &host_flows, &report.enforcement_switch);

        report.risk = merge(std::mem::take(&mut report.risk));
        report.in_progress = merge(std::mem::take(&mut report.in_progress));
        report.evidence_lost = lost_in_window(ctx, host);
        report.state = if !report.in_progress.is_empty() {
            LockoutState::InProgress
        } else if !report.risk.is_empty() {
            LockoutState::Risk
        } else if !report.evidence_lost.is_empty() {
            report.notes.insert(0, LOST_NOTE.into());
            LockoutState::Unknown
        } else {
            LockoutState::Clear
        };
        self.last_eval = Some(ctx.input.now);
        report
    }

    fn track_directory(&mut self, ctx: &Ctx<'_>, host: u16) {
        let Some(info) = ctx.input.directory.endpoint(host) else { return };
        for (dir, policy) in [(Direction::Ingress, info.ingress), (Direction::Egress, info.egress)] {
            // A direction without policy has nothing to enforce.
            let Some(p) = policy.filter(|p| p.enabled) else { continue };
            if self.last_audit.get(&dir) == Some(&true) && !p.audit {
                // Somewhere since the last look: take the earliest moment, so
                // the watch covers every denial that can follow the switch.
                self.directory_switch.insert(dir, self.last_eval.unwrap_or(ctx.input.now));
            }
            if p.audit {
                // Back in audit mode: a later switch starts a new watch.
                self.directory_switch.remove(&dir);
            }
            self.last_audit.insert(dir, p.audit);
        }
    }

    /// The switch per direction: the directory's flag when it flipped while
    /// the agent watched, else inferred from a flow that was audited and is
    /// now denied (the earliest such denial).
    fn switches(&self, ctx: &Ctx<'_>, host_flows: &[(usize, &FlowRecord)]) -> Vec<EnforcementSwitch> {
        let mut out = Vec::new();
        for dir in [Direction::Ingress, Direction::Egress] {
            let from_directory = self.directory_switch.get(&dir).map(|&at| (at, SwitchSource::Directory));
            let from_counts = || {
                let audited: BTreeMap<(u32, u8, u16), SystemTime> = host_flows
                    .iter()
                    .filter(|(_, f)| f.direction == dir && f.verdict == Verdict::Audited)
                    .map(|(_, f)| ((f.remote_identity, f.proto, f.dst_port), f.last_seen))
                    .fold(BTreeMap::new(), |mut m, (k, t)| {
                        let e = m.entry(k).or_insert(t);
                        *e = (*e).max(t);
                        m
                    });
                host_flows
                    .iter()
                    .filter(|(_, f)| {
                        f.direction == dir && f.verdict == Verdict::Denied && f.source == NotifySource::PolicyVerdict
                    })
                    .filter(|(_, f)| {
                        audited.get(&(f.remote_identity, f.proto, f.dst_port)).is_some_and(|&a| f.first_seen >= a)
                    })
                    .map(|(_, f)| f.first_seen)
                    .min()
                    .map(|at| (at, SwitchSource::Counts))
            };
            if let Some((at, source)) = from_directory.or_else(from_counts) {
                out.push(EnforcementSwitch {
                    direction: dir,
                    at,
                    source,
                    watch_until: at + ctx.config.watch_after_switch,
                });
            }
        }
        out
    }

    fn reply_drops(
        &self,
        ctx: &Ctx<'_>,
        host_flows: &[(usize, &FlowRecord)],
        switches: &[EnforcementSwitch],
    ) -> Vec<SuspectedReplyDrop> {
        let mut out = Vec::new();
        for &(_, f) in host_flows {
            if f.direction != Direction::Ingress
                || f.verdict != Verdict::Denied
                || f.source != NotifySource::PolicyVerdict
                || f.last_seen < ctx.window_start
                || !matches!(f.proto, 6 | 17 | 132)
                || !ctx.config.ephemeral_ports.contains(f.dst_port)
                || ctx.critical_service(f).is_some()
            {
                continue;
            }
            let side = RemoteSide::of_identity(f.remote_identity);
            let remote_ports: Vec<u16> = ctx
                .input
                .source_ports
                .and_then(|m| m.get(&super::FlowKey::from(f)))
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            // World replies are indistinguishable from scans of high ports
            // unless a capture shows a critical source port.
            if !(side.is_infrastructure() || side == RemoteSide::Cluster) && remote_ports.is_empty() {
                continue;
            }
            let confirmed_services: BTreeSet<String> = remote_ports
                .iter()
                .flat_map(|&p| ctx.config.catalogue.find_l4(f.proto, p))
                .filter(|c| c.remotes.contains(&side) && c.directions.contains(&Direction::Egress))
                .map(|c| c.service.clone())
                .collect();
            if !remote_ports.is_empty() && confirmed_services.is_empty() && !side.is_infrastructure() {
                continue;
            }
            let confirmed = !confirmed_services.is_empty();
            let possible_services: Vec<String> = if confirmed {
                confirmed_services.into_iter().collect()
            } else {
                ctx.config
                    .catalogue
                    .flows
                    .iter()
                    .filter(|c| {
                        c.protocol.matches(f.proto)
                            && c.remotes.contains(&side)
                            && c.directions.contains(&Direction::Egress)
                    })
                    .map(|c| c.service.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            };
            let after_switch = report_switch(switches, Direction::Ingress)
                .or_else(|| report_switch(switches, Direction::Egress))
                .is_some_and(|s| f.last_seen >= s.at && f.first_seen <= s.watch_until);
            out.push(SuspectedReplyDrop {
                remote: side.as_str().into(),
                remote_identity: f.remote_identity,
                protocol: proto_name(f.proto),
                port: f.dst_port,
                notifications: f.notifications,
                first_seen: f.first_seen,
                last_seen: f.last_seen,
                after_switch,
                remote_ports,
                possible_services,
                confirmed,
            });
        }
        out.sort_by(|a, b| (&a.remote, a.port, &a.protocol).cmp(&(&b.remote, b.port, &b.protocol)));
        out
    }
}

/// One entry per service, direction, remote side, port and protocol: the
/// operator's SSH from world and a scanner's from world-ipv4 are one risk.
fn merge(entries: Vec<LockoutEntry>) -> Vec<LockoutEntry> {
    let mut out: BTreeMap<(String, Direction, String, u16, String), LockoutEntry> = BTreeMap::new();
    for e in entries {
        let key = (e.service.clone(), e.direction, e.remote.clone(), e.port, e.protocol.clone());
        match out.get_mut(&key) {
            None => {
                out.insert(key, e);
            }
            Some(m) => {
                m.remote_identities.extend(e.remote_identities);
                m.remote_identities.sort_unstable();
                m.remote_identities.dedup();
                m.notifications += e.notifications;
                m.notifications_in_window =
                    m.notifications_in_window.zip(e.notifications_in_window).map(|(a, b)| a + b);
                m.first_seen = m.first_seen.min(e.first_seen);
                m.last_seen = m.last_seen.max(e.last_seen);
                m.after_switch |= e.after_switch;
                m.remote_addrs.extend(e.remote_addrs);
                m.remote_addrs.sort_unstable();
                m.remote_addrs.dedup();
                if m.why.is_empty() {
                    m.why = e.why;
                }
            }
        }
    }
    out.into_values().collect()
}

fn report_switch(switches: &[EnforcementSwitch], dir: Direction) -> Option<&EnforcementSwitch> {
    switches.iter().find(|s| s.direction == dir)
}

fn unattributed(
    ctx: &Ctx<'_>,
    host_flows: &[(usize, &FlowRecord)],
    switches: &[EnforcementSwitch],
) -> Vec<UnattributedDrop> {
    let explained: HashSet<(Direction, u32)> = host_flows
        .iter()
        .filter(|(_, f)| {
            f.verdict == Verdict::Denied && f.source == NotifySource::PolicyVerdict && f.last_seen >= ctx.window_start
        })
        .map(|(_, f)| (f.direction, f.remote_identity))
        .collect();
    let mut out: Vec<UnattributedDrop> = host_flows
        .iter()
        .filter(|(_, f)| f.source == NotifySource::PolicyDrop && f.last_seen >= ctx.window_start)
        .filter(|(_, f)| RemoteSide::of_identity(f.remote_identity).is_infrastructure())
        .filter(|(_, f)| !explained.contains(&(f.direction, f.remote_identity)))
        .map(|(_, f)| UnattributedDrop {
            remote: RemoteSide::of_identity(f.remote_identity).as_str().into(),
            remote_identity: f.remote_identity,
            direction: f.direction,
            reason: f.reason,
            notifications: f.notifications,
            last_seen: f.last_seen,
            after_switch: report_switch(switches, f.direction)
                .is_some_and(|s| f.last_seen >= s.at && f.first_seen <= s.watch_until),
        })
        .collect();
    out.sort_by_key(|d| (d.direction, d.remote.clone(), d.reason));
    out
}
