//! Scan noise: `world` probing many ports with few notifications each.
//!
//! A scanner sends one SYN per port, so each probed port is a flow with a
//! handful of notifications; real outside users hit few ports, often. The
//! classifier therefore looks at the *rate* of each world flow (per window)
//! and at how many distinct ports such low-rate flows cover on one
//! endpoint. Ports of the kernel's world-port table carry a judgement of
//! their own, made when each count grew (`crate::scan_behaviour`): a port
//! only scan bursts touched is noise however often the scanner returns, and
//! one real use made it a service. Noise is summarised, never suggested, and never a lockout,
//! unless it hits a port of the critical-flow catalogue from a side that
//! matters there (world to 22/tcp is still a lockout risk: the agent cannot
//! tell the operator's SSH from the scanner's).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::{Duration, SystemTime},
};

use super::{Ctx, report::NoiseSummary};
use crate::{
    cilium::identity,
    model::{Direction, NotifySource, Verdict, proto_name},
};

/// Tunables of the classifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoiseConfig {
    /// Distinct low-rate ports from world on one endpoint that make a scan.
    pub min_ports: usize,
    /// A world flow above this many notifications per window is real use.
    pub max_notifications_per_port: u64,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        NoiseConfig { min_ports: 10, max_notifications_per_port: 3 }
    }
}

/// Result of one classification over a horizon.
pub(super) struct Classified {
    /// Indices into the input flows.
    pub noise: HashSet<usize>,
    pub summaries: Vec<NoiseSummary>,
}

/// Only the world identities Cilium assigns to unmanaged outside traffic
/// (2, 9, 10): a CIDR identity means a policy names that range on purpose.
fn is_scan_source(remote_identity: u32) -> bool {
    identity::is_world(remote_identity)
}

/// Classifies the flows last seen since `horizon_start`.
pub(super) fn classify(ctx: &Ctx<'_>, horizon_start: SystemTime, use_window_counts: bool) -> Classified {
    let cfg = ctx.config.noise;
    let window = ctx.config.window.max(Duration::from_secs(1));
    struct Candidate {
        idx: usize,
        count: u64,
        critical: Option<String>,
    }
    let mut per_endpoint: BTreeMap<u16, Vec<Candidate>> = BTreeMap::new();
    for (idx, f) in ctx.input.flows.iter().enumerate() {
        if f.direction != Direction::Ingress
            || !is_scan_source(f.remote_identity)
            || f.source != NotifySource::PolicyVerdict
            || !matches!(f.verdict, Verdict::Audited | Verdict::Denied)
            || f.last_seen < horizon_start
        {
            continue;
        }
        let count = if use_window_counts { ctx.window_counts[idx].unwrap_or(f.notifications) } else { f.notifications };
        match f.port_aggregate {
            // The kernel's world-port table, judged by behaviour when each
            // count grew (`crate::scan_behaviour`): only scan bursts ever
            // touched it, or real use did at least once.
            Some(aggregate) if !aggregate.scan_only => continue,
            Some(_) => {}
            None => {
                let start = f.first_seen.max(horizon_start);
                let span = ctx.input.now.duration_since(start).unwrap_or_default();
                let windows = span.as_secs().div_ceil(window.as_secs()).max(1);
                if count > cfg.max_notifications_per_port.saturating_mul(windows) {
                    continue;
                }
            }
        }
        let critical = (Some(f.endpoint_id) == ctx.host)
            .then(|| ctx.critical_service(f))
            .flatten()
            .map(|_| format!("{}/{}", f.dst_port, proto_name(f.proto)));
        per_endpoint.entry(f.endpoint_id).or_default().push(Candidate { idx, count, critical });
    }

    let mut noise = HashSet::new();
    let mut summaries = Vec::new();
    for (endpoint_id, cands) in per_endpoint {
        let distinct: BTreeSet<(u8, u16)> = cands
            .iter()
            .map(|c| {
                let f = &ctx.input.flows[c.idx];
                (f.proto, f.dst_port)
            })
            .collect();
        if distinct.len() < cfg.min_ports {
            continue;
        }
        let mut ports = BTreeSet::new();
        let mut sources = BTreeSet::new();
        let mut critical_hit = BTreeSet::new();
        let (mut notifications, mut audited, mut denied, mut flows) = (0u64, 0u64, 0u64, 0usize);
        let mut first = None::<SystemTime>;
        let mut last = None::<SystemTime>;
        for c in &cands {
            let f = &ctx.input.flows[c.idx];
            if let Some(label) = &c.critical {
                critical_hit.insert(label.clone());
                continue;
            }
            noise.insert(c.idx);
            ports.insert(f.dst_port);
            sources.extend(f.remote_addrs.iter().copied());
            flows += 1;
            notifications += c.count;
            match f.verdict {
                Verdict::Audited => audited += c.count,
                _ => denied += c.count,
            }
            first = Some(first.map_or(f.first_seen, |t| t.min(f.first_seen)));
            last = Some(last.map_or(f.last_seen, |t| t.max(f.last_seen)));
        }
        let (Some(first_seen), Some(last_seen)) = (first, last) else { continue };
        summaries.push(NoiseSummary {
            endpoint_id,
            direction: Direction::Ingress,
            remote: "world".into(),
            ports: ports.len(),
            port_min: *ports.first().unwrap_or(&0),
            port_max: *ports.last().unwrap_or(&0),
            sample_ports: ports.iter().copied().take(20).collect(),
            flows,
            notifications,
            audited,
            denied,
            first_seen,
            last_seen,
            critical_ports_hit: critical_hit.into_iter().collect(),
            sources: sources.into_iter().take(64).collect(),
        });
    }
    Classified { noise, summaries }
}
