//! Per-source health: the `source_up` and `errors_total` metrics, and logs
//! that say each outage exactly twice: one WARN when the source goes down
//! (what failed, and what the agent does meanwhile), one INFO when it
//! answers again (how long it was down). Repetitions go to DEBUG.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use super::escape;

/// The latest outcome of one part of a source (one watch; the API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PartState {
    /// Registered, no answer yet.
    Pending,
    Up,
    Down,
}

/// An outage under way: from the first failure while every part was fine
/// to the success that leaves no part failing.
#[derive(Debug)]
struct Outage {
    since: Instant,
    failures: u64,
}

#[derive(Debug, Default)]
struct HealthState {
    parts: BTreeMap<&'static str, PartState>,
    last_error: Option<String>,
    last_success: Option<SystemTime>,
    outage: Option<Outage>,
}

/// Request outcomes of one source.
#[derive(Debug)]
pub(crate) struct SourceHealth {
    pub name: &'static str,
    /// The longest retry delay, for the WARN line's "meanwhile".
    retry_max: Duration,
    errors: AtomicU64,
    state: Mutex<HealthState>,
}

/// Health of one source, as [`super::Enrichment::source_status`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SourceStatus {
    /// `cilium_api` or `kubernetes`.
    pub source: &'static str,
    pub enabled: bool,
    /// The latest request (every watch, for Kubernetes) succeeded.
    pub up: bool,
    pub errors: u64,
    pub last_error: Option<String>,
    pub last_success: Option<SystemTime>,
    /// Parts (watches) whose latest request failed or that never succeeded.
    pub failing: Vec<&'static str>,
}

impl SourceHealth {
    pub fn new(name: &'static str, retry_max: Duration) -> SourceHealth {
        SourceHealth { name, retry_max, errors: AtomicU64::new(0), state: Mutex::new(HealthState::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, part: &'static str) {
        self.lock().parts.entry(part).or_insert(PartState::Pending);
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn is_enabled(&self) -> bool {
        !self.lock().parts.is_empty()
    }

    /// True while an outage is under way (some part's latest request failed).
    pub fn is_down(&self) -> bool {
        self.lock().outage.is_some()
    }

    pub fn success(&self, part: &'static str) {
        let mut s = self.lock();
        s.parts.insert(part, PartState::Up);
        s.last_success = Some(SystemTime::now());
        if s.outage.is_some() && !s.parts.values().any(|p| *p == PartState::Down) {
            let outage = s.outage.take().expect("checked");
            tracing::info!(
                source = self.name,
                part,
                down_for_ms = u64::try_from(outage.since.elapsed().as_millis()).unwrap_or(u64::MAX),
                failed_requests = outage.failures,
                "enrichment source {} answers again after {}; its answers are current again",
                self.name,
                human(outage.since.elapsed()),
            );
        }
    }

    /// `message` may carry names from the remote side: it is escaped before
    /// it reaches the log.
    pub fn failure(&self, part: &'static str, message: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        s.parts.insert(part, PartState::Down);
        s.last_error = Some(message.to_owned());
        match &mut s.outage {
            Some(outage) => {
                outage.failures += 1;
                tracing::debug!(source = self.name, part, "still down: {}", escape::for_log(message));
            }
            None => {
                s.outage = Some(Outage { since: Instant::now(), failures: 1 });
                tracing::warn!(
                    source = self.name,
                    part,
                    "enrichment source {} is down: {}; meanwhile answers come from what it said before \
                     (unknown where it never answered), and it is retried with backoff (at most every {})",
                    self.name,
                    escape::for_log(message),
                    human(self.retry_max),
                );
            }
        }
    }

    pub fn status(&self) -> SourceStatus {
        let s = self.lock();
        SourceStatus {
            source: self.name,
            enabled: !s.parts.is_empty(),
            up: !s.parts.is_empty() && s.parts.values().all(|p| *p == PartState::Up),
            errors: self.errors(),
            last_error: s.last_error.clone(),
            last_success: s.last_success,
            failing: s.parts.iter().filter(|(_, p)| **p != PartState::Up).map(|(p, _)| *p).collect(),
        }
    }
}

/// `90s`, `2m30s`; below a second in milliseconds (tests use short delays).
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) { format!("{}ms", d.as_millis()) } else { crate::timefmt::format_duration(d) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_all_parts() {
        let h = SourceHealth::new("kubernetes", Duration::from_secs(60));
        assert!(!h.is_enabled());
        h.register("a");
        h.register("b");
        assert!(!h.status().up);
        assert!(!h.is_down(), "pending is not an outage");
        h.success("a");
        h.success("b");
        assert!(h.status().up);
        h.failure("b", "watching b: boom");
        assert!(!h.status().up);
        assert!(h.is_down());
        assert_eq!(h.errors(), 1);
        assert_eq!(h.status().failing, vec!["b"]);
        h.failure("a", "watching a: boom");
        h.success("b");
        assert!(h.is_down(), "a still fails");
        h.success("a");
        assert!(h.status().up);
        assert!(!h.is_down());
    }
}
