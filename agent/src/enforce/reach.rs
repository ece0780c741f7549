//! The node's own reach to the API server during a host trial: a TCP
//! connect from the host network namespace (the agent's) to every ready
//! endpoint of the `kubernetes` Service, once a second. It backs up the
//! verdict-based signals: a cut that Cilium does not notify (rate-limited
//! notifications, a drop the tap cannot see) still shows as connects that
//! time out.
//!
//! Only a loss counts: a target reached just before the switch (the
//! baseline, kept in the trial record) that then fails
//! [`FAILURES_TO_SIGNAL`] times in a row after it. A target that was
//! unreachable before the switch says nothing about the switch. The
//! kubelet's port is not probed: its critical traffic comes in from the API
//! server, and a connect from the node to its own address travels over
//! loopback, which host policies never cut; the lockout detector watches
//! that flow through its verdicts.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tracing::debug;

/// Time allowed for one connect; a SYN that enforcement drops times out.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
/// How often the targets are probed while a host trial runs.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive failed connects after the switch that make a signal.
pub const FAILURES_TO_SIGNAL: u32 = 2;

/// Where the API server is, as the node sees it now (empty: unknown).
pub type ReachTargets = Arc<dyn Fn() -> Vec<SocketAddr> + Send + Sync>;

/// One connect attempt's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    Connected,
    Failed(String),
}

/// Connects to every target at once; each gets [`CONNECT_TIMEOUT`].
pub async fn probe(targets: &[SocketAddr]) -> Vec<(SocketAddr, Attempt)> {
    let attempts = targets.iter().map(|&addr| async move {
        let outcome = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_stream)) => Attempt::Connected,
            Ok(Err(e)) => Attempt::Failed(e.to_string()),
            Err(_) => Attempt::Failed(format!("no answer within {} ms", CONNECT_TIMEOUT.as_millis())),
        };
        (addr, outcome)
    });
    futures::future::join_all(attempts).await
}

/// What the probes have seen of each target since the watch began.
#[derive(Clone, Debug, Default)]
struct TargetState {
    consecutive_failures: u32,
    /// The first failure of the current run of failures.
    failing_since: Option<SystemTime>,
    last_error: String,
}

/// A lost target: reached at the baseline, failing since `since`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReachLoss {
    pub target: SocketAddr,
    pub since: SystemTime,
    pub failures: u32,
    pub error: String,
}

/// Probe results, shared by the probe loop and the trial watch.
#[derive(Clone, Debug, Default)]
pub struct ReachWatch {
    targets: Arc<Mutex<BTreeMap<SocketAddr, TargetState>>>,
}

impl ReachWatch {
    /// Takes one probe round into account.
    pub fn record(&self, round: &[(SocketAddr, Attempt)], at: SystemTime) {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        for (addr, attempt) in round {
            let state = targets.entry(*addr).or_default();
            match attempt {
                Attempt::Connected => *state = TargetState::default(),
                Attempt::Failed(error) => {
                    state.consecutive_failures += 1;
                    state.failing_since.get_or_insert(at);
                    state.last_error = error.clone();
                }
            }
        }
    }

    /// Targets of `baseline` lost after `switched`: failing at least
    /// [`FAILURES_TO_SIGNAL`] times in a row, the whole run after the switch.
    pub fn losses(&self, baseline: &[SocketAddr], switched: SystemTime) -> Vec<ReachLoss> {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        baseline
            .iter()
            .filter_map(|addr| {
                let s = targets.get(addr)?;
                let since = s.failing_since?;
                (s.consecutive_failures >= FAILURES_TO_SIGNAL && since >= switched).then(|| ReachLoss {
                    target: *addr,
                    since,
                    failures: s.consecutive_failures,
                    error: s.last_error.clone(),
                })
            })
            .collect()
    }

    /// Forgets every target (no host trial runs any more).
    pub fn clear(&self) {
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The targets reached right now: a host trial's baseline, taken just
/// before its switch.
pub async fn baseline(targets: &ReachTargets) -> Vec<SocketAddr> {
    let targets = targets();
    let round = probe(&targets).await;
    for (addr, attempt) in &round {
        debug!(target = %addr, ?attempt, "API server reach before the switch");
    }
    round.into_iter().filter(|(_, a)| *a == Attempt::Connected).map(|(addr, _)| addr).collect()
}

/// Parses `host:port` targets written as strings (the trial record).
pub fn parse_targets(raw: &[String]) -> Vec<SocketAddr> {
    raw.iter().filter_map(|t| t.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_target_reached_before_the_switch_and_refused_after_it_is_lost() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets: ReachTargets = Arc::new(move || vec![addr]);
        let reached = baseline(&targets).await;
        assert_eq!(reached, vec![addr]);
        let watch = ReachWatch::default();
        let switched = SystemTime::now();
        watch.record(&probe(&[addr]).await, SystemTime::now());
        assert!(watch.losses(&reached, switched).is_empty(), "still reachable");
        drop(listener); // the cut: connects are refused now
        watch.record(&probe(&[addr]).await, SystemTime::now());
        assert!(watch.losses(&reached, switched).is_empty(), "one failure is not a loss");
        watch.record(&probe(&[addr]).await, SystemTime::now());
        let losses = watch.losses(&reached, switched);
        assert_eq!(losses.len(), 1, "{losses:?}");
        assert_eq!(losses[0].failures, 2);
        assert!(losses[0].since >= switched);
    }

    #[tokio::test]
    async fn a_target_failing_before_the_switch_says_nothing_about_it() {
        let watch = ReachWatch::default();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let round = vec![(addr, Attempt::Failed("refused".into()))];
        let before = SystemTime::now();
        watch.record(&round, before);
        watch.record(&round, before);
        let switched = before + Duration::from_secs(1);
        watch.record(&round, switched + Duration::from_secs(1));
        // Not in the baseline (it failed when the baseline was taken), and
        // failing since before the switch anyway.
        assert!(watch.losses(&[], switched).is_empty());
        assert!(watch.losses(&[addr], switched).is_empty());
    }

    #[tokio::test]
    async fn a_reconnect_ends_the_run_of_failures() {
        let watch = ReachWatch::default();
        let addr: SocketAddr = "10.0.0.1:6443".parse().unwrap();
        let switched = SystemTime::now();
        let failed = vec![(addr, Attempt::Failed("timeout".into()))];
        watch.record(&failed, switched);
        watch.record(&[(addr, Attempt::Connected)], switched);
        watch.record(&failed, switched);
        assert!(watch.losses(&[addr], switched).is_empty());
    }
}
