//! Leaving audit mode with a safety net: the daemon switches an endpoint's
//! PolicyAuditMode off through the node's Cilium agent API, watches the
//! verdicts of every map read, and puts audit mode back on the first
//! critical signal, on abort, or when the trial ends unconfirmed.
//!
//! - [`cilium_config`]: `GET`/`PATCH /v1/endpoint/{id}/config`.
//! - [`record`] and [`store`]: the trial as the node records it, durably.
//! - [`trial`]: the state machine.
//! - [`watch`]: what counts as a critical signal; the fast read cadence.
//! - [`reach`]: the node's TCP reach to the API server during host trials.
//! - [`api`]: the daemon's `/api/v1/enforcement/trials` routes.
//! - [`cli`]: `verdict-agent enforce`.
//! - [`cluster`]: the `AuditModeTrial` custom resource, reconciled per node.
//! - [`metrics`]: trial outcomes and time to revert.
//!
//! Wiring in the daemon (`run`): [`EnforcementArgs`] flattened into the run
//! arguments, [`Enforcement::start`] after the readiness config is known,
//! `api::router` merged into the HTTP router, [`metrics::EnforcementCollector`]
//! added to the collectors, and the map reader waiting
//! `cadence.interval(poll_interval)` between reads.

pub mod api;
pub mod cilium_config;
pub mod cli;
pub mod cluster;
pub mod events;
pub mod metrics;
pub mod reach;
pub mod record;
pub mod store;
pub mod trial;
pub mod watch;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{sync::Mutex, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    model::{EndpointDirectory, FlowRecord},
    readiness::ReadinessConfig,
    state::SharedView,
};
use cilium_config::EndpointConfigClient;
use metrics::EnforcementMetrics;
use reach::{ReachTargets, ReachWatch};
use store::{StoreError, TrialStore};
use trial::{ReadinessLookup, TrialEvents, TrialManager, TrialSettings};
use watch::{ReadCadence, TrialWatch};

/// Default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/verdict-agent";

/// How often deadlines are checked when no trial is active.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// `verdict-agent run` flags of the enforcement feature.
#[derive(clap::Args, Debug, Clone)]
pub struct EnforcementArgs {
    /// Let `verdict-agent enforce` switch PolicyAuditMode off through the Cilium API (off: the agent
    /// never writes to Cilium). Needs the Cilium socket mounted read-write.
    #[arg(long)]
    pub enable_enforcement: bool,
    /// Directory on the node where trials are recorded (a hostPath, so a restarted agent continues
    /// or reverts them).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// After `--confirm`, how long the lockout watch goes on.
    #[arg(long, default_value = "10m", value_parser = crate::preflight::parse_duration_arg)]
    pub enforcement_watch_after_confirm: Duration,
    /// After `--confirm`, revert on a critical signal instead of only alarming.
    #[arg(long)]
    pub enforcement_revert_after_confirm: bool,
    /// The longest trial accepted.
    #[arg(long, default_value = "24h", value_parser = crate::preflight::parse_duration_arg)]
    pub enforcement_max_try: Duration,
    /// Seconds to wait for each Cilium API request of a switch or revert.
    #[arg(long, default_value_t = 5)]
    pub enforcement_api_timeout: u64,
}

impl EnforcementArgs {
    pub fn settings(&self) -> TrialSettings {
        TrialSettings {
            enabled: self.enable_enforcement,
            max_try: self.enforcement_max_try,
            watch_after_confirm: self.enforcement_watch_after_confirm,
            revert_after_confirm: self.enforcement_revert_after_confirm,
        }
    }
}

/// The trials, shared by the HTTP handlers and the watch loop.
pub type SharedTrials = Arc<Mutex<TrialManager>>;

/// Where the watch gets the flows of the latest map read.
pub type FlowSource = Arc<dyn Fn() -> Arc<[FlowRecord]> + Send + Sync>;

/// The running feature: what the daemon wires into HTTP, metrics and the
/// map reader.
pub struct Enforcement {
    pub trials: SharedTrials,
    pub metrics: Arc<EnforcementMetrics>,
    pub cadence: ReadCadence,
    pub task: JoinHandle<()>,
}

/// What the daemon hands the feature besides its flags.
pub struct DaemonContext {
    pub cilium_socket: PathBuf,
    /// The agent's readiness settings (catalogue, window), for the watch.
    pub readiness: ReadinessConfig,
    pub directory: Arc<dyn EndpointDirectory>,
    /// Shared with the map reader.
    pub cadence: ReadCadence,
    /// The agent's own readiness per endpoint.
    pub readiness_lookup: ReadinessLookup,
    /// Kubernetes Events, when the agent has a client.
    pub events: Option<Arc<dyn TrialEvents>>,
    /// The API server's endpoints, for host trials' reach probes (empty
    /// while unknown: then only the verdicts are watched).
    pub api_server: ReachTargets,
}

impl Enforcement {
    /// Loads the recorded trials, continues or reverts them, and starts the
    /// watch loop. Fails only when the record cannot be read: the agent
    /// must not forget a trial it may owe a revert.
    pub async fn start(
        args: &EnforcementArgs,
        ctx: DaemonContext,
        flows: FlowSource,
    ) -> Result<Enforcement, StoreError> {
        let metrics = Arc::new(EnforcementMetrics::default());
        let api = EndpointConfigClient::new(ctx.cilium_socket, Duration::from_secs(args.enforcement_api_timeout));
        let mut manager = TrialManager::open(
            api,
            TrialStore::new(&args.state_dir),
            args.settings(),
            TrialWatch::new(ctx.readiness),
            metrics.clone(),
        )?
        .with_readiness(ctx.readiness_lookup);
        let reach = ReachWatch::default();
        manager = manager.with_reach(ctx.api_server.clone(), reach.clone());
        if let Some(events) = ctx.events {
            manager = manager.with_events(events);
        }
        manager.resume(SystemTime::now()).await;
        info!(enabled = args.enable_enforcement, state_dir = %args.state_dir.display(),
              recorded = manager.trials().len(), active = manager.any_active(), "enforcement trials loaded");
        let cadence = ctx.cadence;
        cadence.set_fast(manager.any_active());
        let trials = Arc::new(Mutex::new(manager));
        let task = tokio::spawn(watch_loop(trials.clone(), flows, ctx.directory, cadence.clone()));
        tokio::spawn(reach_loop(trials.clone(), ctx.api_server, reach));
        Ok(Enforcement { trials, metrics, cadence, task })
    }

    /// [`Enforcement::start`] for `verdict-agent run`: flows from the shared
    /// view. An unreadable record stops the agent only when enforcement is
    /// enabled (it may owe a revert); otherwise the feature stays off.
    pub async fn start_for_daemon(
        args: &EnforcementArgs,
        ctx: DaemonContext,
        view: SharedView,
    ) -> anyhow::Result<Option<Enforcement>> {
        let flows: FlowSource = Arc::new(move || view.read().unwrap_or_else(|e| e.into_inner()).flows.clone());
        match Enforcement::start(args, ctx, flows).await {
            Ok(e) => Ok(Some(e)),
            Err(e) if args.enable_enforcement => Err(anyhow::Error::new(e).context("starting enforcement trials")),
            Err(e) => {
                warn!(error = %e, "enforcement trials unavailable (enforcement is off)");
                Ok(None)
            }
        }
    }

    /// The `/api/v1/enforcement/trials` routes, to merge into the agent's router.
    pub fn router(&self) -> axum::Router {
        api::router(api::ApiState { trials: self.trials.clone(), cadence: self.cadence.clone() })
    }

    /// `/metrics`: trial outcomes and time to revert.
    pub fn collector(&self) -> Box<dyn prometheus_client::collector::Collector> {
        Box::new(metrics::EnforcementCollector(self.metrics.clone()))
    }
}

/// Checks the trials after every fast map read while one is active, every
/// second otherwise (deadlines of trials resumed from the record).
pub async fn watch_loop(
    trials: SharedTrials,
    flows: FlowSource,
    directory: Arc<dyn EndpointDirectory>,
    cadence: ReadCadence,
) {
    loop {
        cadence.pause(IDLE_TICK).await;
        let mut manager = trials.lock().await;
        if manager.any_active() {
            let flows = flows();
            manager.tick(&flows, &*directory, SystemTime::now()).await;
        }
        cadence.set_fast(manager.any_active());
    }
}

/// Probes the API server's endpoints once a second while a host trial with
/// a reach baseline is active; idle (and forgetting) otherwise.
pub async fn reach_loop(trials: SharedTrials, targets: ReachTargets, watch: ReachWatch) {
    let mut probing = false;
    loop {
        tokio::time::sleep(reach::PROBE_INTERVAL).await;
        let wanted = trials.lock().await.wants_reach();
        if !wanted {
            if probing {
                watch.clear();
                probing = false;
            }
            continue;
        }
        probing = true;
        let round = reach::probe(&targets()).await;
        watch.record(&round, SystemTime::now());
    }
}
