//! Enrichment: readable names and policy state for node-local endpoint IDs
//! and security identities.
//!
//! Two sources feed one directory:
//! - the node's Cilium agent API (unix socket), polled every `refresh`:
//!   the endpoints of this node with their policy and audit state, the
//!   daemon's settings, and identity labels on demand;
//! - the Kubernetes API, watched: this node's CiliumEndpoints, every
//!   CiliumIdentity, node labels, this node's pods (owners) and host
//!   policies (CiliumClusterwideNetworkPolicies with a node selector).
//!
//! Every answer comes from caches; background tasks do all I/O, so a
//! caller (a scrape, the readiness engine) never waits on a remote API. A
//! source that is disabled or unreachable leaves its answers unknown, and
//! answers it gave before an outage stay available.
//!
//! See [`directory::merge`] for how the sources combine.

mod backoff;
pub mod cilium_api;
mod directory;
pub mod escape;
mod health;
pub mod kubernetes;
mod lifecycle;
mod metrics;
pub mod retire;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::AbortHandle};

use self::{
    backoff::Backoff,
    directory::{IdentityCache, Lookup},
    health::SourceHealth,
    kubernetes::KubeState,
    lifecycle::Lifecycle,
};
pub use self::{
    cilium_api::{CiliumApiClient, CiliumApiError, DEFAULT_SOCKET, DaemonFacts},
    directory::remote_name,
    health::SourceStatus,
    kubernetes::{ApiServerPort, KubeError},
    lifecycle::EndpointOwner,
    metrics::EndpointLabels,
    retire::SeriesRetirement,
};
use crate::model::{EndpointDirectory, EndpointInfo, FactSource, HostPolicyCoverage};

/// How enrichment reaches its sources.
#[derive(Clone, Debug)]
pub struct EnrichmentConfig {
    /// The Cilium agent API socket; None disables the source.
    pub cilium_socket: Option<PathBuf>,
    /// Watch the Kubernetes API.
    pub kube: bool,
    /// Kubeconfig file; None: KUBECONFIG, ~/.kube/config, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`--node-name`, `NODE_NAME` from the downward API).
    pub node_name: Option<String>,
    /// This node's IPs as CiliumEndpoints record them, in addition to the
    /// Node object's addresses (`NODE_IP` from `status.hostIP`).
    pub node_ips: Vec<String>,
    /// Interval between Cilium API refreshes.
    pub refresh: Duration,
    /// Bound on every Cilium API request, connect to last byte.
    pub request_timeout: Duration,
    /// First retry delay after a failure of the Cilium API or of a watch;
    /// doubles (with jitter) up to `backoff_max`, and starts over after a
    /// success.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Remote identities whose labels are kept (LRU).
    pub identity_cache_size: usize,
    /// How long "identity not found" is believed before asking again.
    pub identity_retry: Duration,
}

impl Default for EnrichmentConfig {
    fn default() -> EnrichmentConfig {
        EnrichmentConfig {
            cilium_socket: Some(PathBuf::from(DEFAULT_SOCKET)),
            kube: false,
            kubeconfig: None,
            node_name: None,
            node_ips: Vec::new(),
            refresh: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            identity_cache_size: 4096,
            identity_retry: Duration::from_secs(60),
        }
    }
}

/// Command-line options for enrichment, for `verdict-agent run` to flatten.
#[derive(clap::Args, Debug, Clone)]
pub struct EnrichArgs {
    /// Cilium agent API socket.
    #[arg(long, default_value = DEFAULT_SOCKET, env = "CILIUM_SOCKET")]
    pub cilium_socket: PathBuf,
    /// Do not ask the Cilium agent API (policy and audit state then come
    /// from CiliumEndpoints, when `--endpoint-status=policy` fills them).
    #[arg(long)]
    pub no_cilium_api: bool,
    /// Do not watch the Kubernetes API (no owners, no host policy coverage).
    #[arg(long = "no-kube", action = clap::ArgAction::SetFalse)]
    pub kube: bool,
    /// Kubeconfig; default: KUBECONFIG, ~/.kube/config, then the pod's service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (use the downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's IPs, comma-separated (downward API: status.hostIP); the
    /// Node object's addresses are used as well.
    #[arg(long = "node-ip", env = "NODE_IP", value_delimiter = ',')]
    pub node_ips: Vec<String>,
    /// How often the Cilium agent API is read, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = crate::duration::positive_arg)]
    pub enrich_refresh: Duration,
    /// Timeout of each Cilium agent API request.
    #[arg(long, default_value = "10s", value_parser = crate::duration::positive_arg)]
    pub cilium_api_timeout: Duration,
}

impl EnrichArgs {
    pub fn config(&self) -> EnrichmentConfig {
        EnrichmentConfig {
            cilium_socket: (!self.no_cilium_api).then(|| self.cilium_socket.clone()),
            kube: self.kube,
            kubeconfig: self.kubeconfig.clone(),
            node_name: self.node_name.clone().filter(|n| !n.is_empty()),
            node_ips: self.node_ips.iter().filter(|s| !s.is_empty()).cloned().collect(),
            refresh: self.enrich_refresh,
            request_timeout: self.cilium_api_timeout,
            ..EnrichmentConfig::default()
        }
    }
}

/// What the Cilium API said at its latest successful answer.
#[derive(Debug, Default)]
pub(crate) struct ApiState {
    /// None until the first successful endpoint list.
    pub endpoints: Option<HashMap<u16, EndpointInfo>>,
    /// Identity labels of this node's endpoints.
    pub identities: HashMap<u32, Vec<String>>,
    pub daemon: Option<DaemonFacts>,
}

#[derive(Debug, Default)]
struct Merged {
    version: u64,
    endpoints: Arc<BTreeMap<u16, EndpointInfo>>,
}

/// State shared by the directory and its background tasks.
pub(crate) struct Shared {
    node_name: Option<String>,
    node_ips: Vec<String>,
    kube_enabled: bool,
    api: RwLock<ApiState>,
    kube: RwLock<KubeState>,
    /// Bumped on every change to `api` or `kube`; the merged view is
    /// rebuilt lazily, at most once per change and only when read.
    version: AtomicU64,
    merged: Mutex<Merged>,
    /// Owners of endpoint IDs across rebuilds of `merged`.
    lifecycle: Mutex<Lifecycle>,
    identity_cache: Mutex<IdentityCache>,
    identity_tx: Option<mpsc::Sender<u32>>,
    /// Retry delays of every source: (initial, max).
    pub(crate) retry: (Duration, Duration),
    pub(crate) api_health: SourceHealth,
    pub(crate) kube_health: SourceHealth,
    pub(crate) tasks: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    pub(crate) fn update_kube(&self, f: impl FnOnce(&mut KubeState)) {
        let mut k = self.kube.write().unwrap_or_else(|e| e.into_inner());
        f(&mut k);
        self.version.fetch_add(1, Ordering::Release);
    }

    fn update_api(&self, f: impl FnOnce(&mut ApiState)) {
        let mut a = self.api.write().unwrap_or_else(|e| e.into_inner());
        f(&mut a);
        self.version.fetch_add(1, Ordering::Release);
    }

    fn read_api(&self) -> std::sync::RwLockReadGuard<'_, ApiState> {
        self.api.read().unwrap_or_else(|e| e.into_inner())
    }

    fn read_kube(&self) -> std::sync::RwLockReadGuard<'_, KubeState> {
        self.kube.read().unwrap_or_else(|e| e.into_inner())
    }

    fn merged(&self) -> Arc<BTreeMap<u16, EndpointInfo>> {
        let version = self.version.load(Ordering::Acquire);
        let mut m = self.merged.lock().unwrap_or_else(|e| e.into_inner());
        if m.version != version {
            let api = self.read_api();
            let kube = self.read_kube();
            m.endpoints = Arc::new(directory::merge(&api, &kube, self.node_name.as_deref(), &self.node_ips));
            m.version = version;
            self.lifecycle().observe(&m.endpoints);
        }
        Arc::clone(&m.endpoints)
    }

    fn lifecycle(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, IdentityCache> {
        self.identity_cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Aborts the background tasks when the last [`Enrichment`] clone goes.
struct TaskGuard(Arc<Shared>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for t in self.0.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }
}

/// The enrichment directory: cheap to clone, answers from caches.
#[derive(Clone)]
pub struct Enrichment {
    shared: Arc<Shared>,
    _tasks: Arc<TaskGuard>,
}

impl fmt::Debug for Enrichment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrichment")
            .field("node_name", &self.shared.node_name)
            .field("sources", &self.source_status())
            .finish_non_exhaustive()
    }
}

/// Starts enrichment: spawns the refresh and watch tasks and returns at
/// once. Must run inside a tokio runtime.
pub async fn start(config: EnrichmentConfig) -> Enrichment {
    start_with_kube_client(config, None)
}

/// [`start`], with a ready Kubernetes client instead of one built from the
/// configuration (tests, or a caller that shares one client).
pub fn start_with_kube_client(config: EnrichmentConfig, kube_client: Option<kube::Client>) -> Enrichment {
    let (identity_tx, identity_rx) = match config.cilium_socket {
        Some(_) => {
            let (tx, rx) = mpsc::channel(256);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let shared = Arc::new(Shared {
        node_name: config.node_name.clone(),
        node_ips: config.node_ips.clone(),
        kube_enabled: config.kube,
        api: RwLock::default(),
        kube: RwLock::default(),
        version: AtomicU64::new(1),
        merged: Mutex::default(),
        lifecycle: Mutex::default(),
        identity_cache: Mutex::new(IdentityCache::new(config.identity_cache_size)),
        identity_tx,
        retry: (config.backoff_initial, config.backoff_max),
        api_health: SourceHealth::new("cilium_api", config.backoff_max),
        kube_health: SourceHealth::new("kubernetes", config.backoff_max),
        tasks: Mutex::default(),
    });
    let enrichment = Enrichment { shared: Arc::clone(&shared), _tasks: Arc::new(TaskGuard(Arc::clone(&shared))) };

    let mut tasks = Vec::new();
    if let (Some(socket), Some(rx)) = (&config.cilium_socket, identity_rx) {
        shared.api_health.register("api");
        let client = CiliumApiClient::new(socket, config.request_timeout);
        tasks.push(tokio::spawn(run_api_refresh(Arc::clone(&shared), client.clone(), config.clone())).abort_handle());
        tasks.push(
            tokio::spawn(run_identity_lookups(Arc::clone(&shared), client, rx, config.identity_retry)).abort_handle(),
        );
    }
    if config.kube {
        match kube_client {
            Some(client) => kubernetes::spawn_watches(&shared, client, config.node_name.as_deref()),
            None => {
                shared.kube_health.register("client");
                let shared2 = Arc::clone(&shared);
                let (kubeconfig, node) = (config.kubeconfig.clone(), config.node_name.clone());
                tasks.push(
                    tokio::spawn(async move {
                        match kubernetes::client(kubeconfig.as_deref()).await {
                            Ok(client) => {
                                shared2.kube_health.success("client");
                                kubernetes::spawn_watches(&shared2, client, node.as_deref());
                            }
                            Err(e) => shared2.kube_health.failure("client", &e.to_string()),
                        }
                    })
                    .abort_handle(),
                );
            }
        }
    }
    shared.tasks.lock().unwrap_or_else(|e| e.into_inner()).extend(tasks);
    enrichment
}

/// Polls the Cilium API forever: every `refresh` while it answers, with
/// growing, jittered delays while it does not.
async fn run_api_refresh(shared: Arc<Shared>, client: CiliumApiClient, config: EnrichmentConfig) {
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    loop {
        let delay = if refresh_api(&shared, &client).await {
            backoff.reset();
            config.refresh
        } else {
            backoff.next_delay()
        };
        tokio::time::sleep(delay).await;
    }
}

/// One refresh round. True when the endpoint list (the part callers
/// depend on) was read.
async fn refresh_api(shared: &Shared, client: &CiliumApiClient) -> bool {
    let health = &shared.api_health;
    let endpoints = match client.endpoints().await {
        Ok(eps) => eps,
        Err(e) => {
            health.failure("api", &e.to_string());
            return false;
        }
    };
    let mut infos = HashMap::with_capacity(endpoints.len());
    let mut identities = HashMap::new();
    for ep in &endpoints {
        let Some(id) = ep.endpoint_id() else {
            tracing::debug!(id = ?ep.id, "Cilium API endpoint without a usable ID; skipped");
            continue;
        };
        infos.insert(id, ep.to_info(id, FactSource::CiliumApi));
        if let (Some(identity), Some(labels)) = (ep.identity_id(), ep.identity_labels()) {
            identities.insert(identity, labels);
        }
    }
    shared.update_api(|a| {
        a.endpoints = Some(infos);
        a.identities = identities;
    });
    health.success("api");

    match client.config().await {
        Ok(cfg) => {
            let facts = cfg.facts();
            shared.update_api(|a| a.daemon = Some(facts));
            health.success("api");
        }
        Err(e) => health.failure("api", &e.to_string()),
    }
    true
}

/// Answers queued identity lookups one at a time: lookups are rare (a new
/// remote identity in the verdicts) and must not compete with the agent's
/// own work.
async fn run_identity_lookups(
    shared: Arc<Shared>,
    client: CiliumApiClient,
    mut rx: mpsc::Receiver<u32>,
    retry: Duration,
) {
    while let Some(id) = rx.recv().await {
        match client.identity(id).await {
            Ok(identity) => {
                let mut labels = identity.labels.unwrap_or_default();
                labels.sort();
                shared.cache().found(id, labels);
                shared.api_health.success("api");
            }
            Err(e) if e.is_not_found() => {
                shared.cache().missing(id, Instant::now() + retry);
                shared.api_health.success("api");
            }
            Err(e) => {
                shared.api_health.failure("api", &e.to_string());
                // The API is failing: answer the queued lookups "later"
                // instead of failing each of them against it.
                let until = Instant::now() + retry.min(Duration::from_secs(10));
                let mut cache = shared.cache();
                cache.missing(id, until);
                while let Ok(queued) = rx.try_recv() {
                    cache.missing(queued, until);
                }
            }
        }
    }
}

impl Enrichment {
    /// A directory over a fixed endpoint list (`analyze --endpoints FILE`):
    /// no sources, no tasks.
    pub fn from_endpoints(endpoints: Vec<EndpointInfo>) -> Enrichment {
        let e =
            start_with_kube_client(EnrichmentConfig { cilium_socket: None, kube: false, ..Default::default() }, None);
        e.shared.update_api(|a| {
            a.identities = endpoints
                .iter()
                .filter_map(|ep| Some((ep.identity?, ep.labels.clone())))
                .filter(|(_, labels)| !labels.is_empty())
                .collect();
            a.endpoints = Some(endpoints.into_iter().map(|ep| (ep.id, ep)).collect());
        });
        e
    }

    /// The per-endpoint label set of every per-endpoint series.
    pub fn endpoint_labels(&self, id: u16) -> EndpointLabels {
        EndpointLabels::new(id, self.shared.merged().get(&id))
    }

    /// A readable, bounded name for a remote identity: the reserved name,
    /// "cidr" for local CIDR identities, "namespace/app" when its labels are
    /// known, else the number. Unknown identities are looked up in the
    /// background, so a later call may return a name.
    pub fn remote_name(&self, identity: u32) -> String {
        directory::remote_name(identity, self.identity_labels(identity).as_deref())
    }

    /// Daemon settings from the latest `GET /v1/config`.
    pub fn daemon_facts(&self) -> Option<DaemonFacts> {
        self.shared.read_api().daemon.clone()
    }

    /// Health of the enabled sources.
    pub fn source_status(&self) -> Vec<SourceStatus> {
        [&self.shared.api_health, &self.shared.kube_health]
            .into_iter()
            .filter(|h| h.is_enabled())
            .map(|h| h.status())
            .collect()
    }

    /// The ports the API server listens on (on its hosts), from the
    /// `kubernetes` Service's EndpointSlices in `default`, for the
    /// readiness catalogue's critical flows. None when unknown: Kubernetes
    /// is not watched, the slices were never listed (forbidden, API down
    /// since start), or they name no port. A later outage keeps the last
    /// answer.
    pub fn api_server_ports(&self) -> Option<Vec<ApiServerPort>> {
        kubernetes::api_server_ports(&self.shared.read_kube())
    }

    /// The API server's ready addresses from the same slices; None when
    /// unknown, as for [`Self::api_server_ports`].
    pub fn api_server_addresses(&self) -> Option<Vec<String>> {
        kubernetes::api_server_addresses(&self.shared.read_kube())
    }

    /// The UID of this node's pod `namespace/name`, from the pod metadata
    /// watch (for Events that `kubectl describe` finds; no `get` on pods
    /// needed). None when the pod is unknown or Kubernetes is off.
    pub fn pod_uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.shared.read_kube().pods.get(&format!("{namespace}/{name}"))?.uid.clone()
    }

    /// This node's labels, from the node watch; None while unknown (no
    /// node name, Kubernetes off, or the watch has not listed yet).
    pub fn own_node_labels(&self) -> Option<BTreeMap<String, String>> {
        let node = self.shared.node_name.as_deref()?;
        self.shared.read_kube().nodes.get(node).cloned()
    }

    /// The UID of this node's Node object, from the own-node watch.
    pub fn node_uid(&self) -> Option<String> {
        let node = self.shared.node_name.as_deref()?;
        self.shared.read_kube().own_node.get(node)?.uid.clone()
    }

    /// The owner of endpoint `id` and its generation, which changes when
    /// the ID passes to another owner (another pod under the same ID, or
    /// the ID deleted and allocated again). Counters kept per ID should
    /// start from zero when the generation changes. None while the
    /// directory does not list the ID.
    pub fn endpoint_owner(&self, id: u16) -> Option<EndpointOwner> {
        self.shared.merged();
        self.shared.lifecycle().owner(id)
    }

    /// True when the directory listed `id` before and its sources, all
    /// answering, no longer do: the endpoint was deleted. False when it
    /// cannot know (a source is down, or the ID was never listed).
    pub fn endpoint_gone(&self, id: u16) -> bool {
        let sources = [&self.shared.api_health, &self.shared.kube_health];
        if sources.iter().any(|h| h.is_enabled() && h.is_down()) {
            return false;
        }
        self.shared.merged();
        self.shared.lifecycle().is_gone(id)
    }

    /// Identities with labels in the caches of the endpoint and Kubernetes
    /// sources (not the on-demand lookups).
    pub fn known_identities(&self) -> Vec<u32> {
        directory::known_identities(&self.shared.read_api(), &self.shared.read_kube()).into_iter().collect()
    }
}

impl EndpointDirectory for Enrichment {
    fn endpoint(&self, id: u16) -> Option<EndpointInfo> {
        self.shared.merged().get(&id).cloned()
    }

    fn endpoint_gone(&self, id: u16) -> bool {
        Enrichment::endpoint_gone(self, id)
    }

    fn endpoint_generation(&self, id: u16) -> Option<u64> {
        self.endpoint_owner(id).map(|o| o.generation)
    }

    fn endpoints(&self) -> Vec<EndpointInfo> {
        self.shared.merged().values().cloned().collect()
    }

    fn identity_labels(&self, identity: u32) -> Option<Vec<String>> {
        if let Some(labels) = directory::reserved_labels(identity) {
            return Some(labels);
        }
        if identity == 0 {
            return None;
        }
        if let Some(labels) = self.shared.read_api().identities.get(&identity) {
            return Some(labels.clone());
        }
        if let Some(labels) = self.shared.read_kube().identities.get(&identity.to_string()) {
            return Some(labels.clone());
        }
        let tx = self.shared.identity_tx.as_ref()?;
        let mut cache = self.shared.cache();
        match cache.lookup(identity) {
            Lookup::Found(labels) => Some(labels),
            Lookup::Missing | Lookup::InFlight => None,
            Lookup::Unknown => {
                // A full queue means lookups are backed up: ask again on a
                // later call rather than block this one.
                if cache.begin(identity) && tx.try_send(identity).is_err() {
                    cache.abandon(identity);
                }
                None
            }
        }
    }

    fn host_policy_coverage(&self) -> Option<HostPolicyCoverage> {
        if !self.shared.kube_enabled {
            return None;
        }
        let node = self.shared.node_name.as_deref()?;
        kubernetes::host_policy_coverage(&self.shared.read_kube(), node)
    }
}

#[cfg(test)]
mod config_tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        enrich: EnrichArgs,
    }

    #[test]
    fn args_to_config() {
        let cli = Cli::try_parse_from([
            "x",
            "--node-name",
            "n1",
            "--node-ip",
            "10.0.0.1,fd00::1",
            "--enrich-refresh",
            "500ms",
        ])
        .unwrap();
        let c = cli.enrich.config();
        assert_eq!(c.cilium_socket.as_deref(), Some(std::path::Path::new(DEFAULT_SOCKET)));
        assert!(c.kube);
        assert_eq!(c.node_name.as_deref(), Some("n1"));
        assert_eq!(c.node_ips, vec!["10.0.0.1", "fd00::1"]);
        assert_eq!(c.refresh, Duration::from_millis(500));

        let cli = Cli::try_parse_from(["x", "--no-kube", "--no-cilium-api"]).unwrap();
        let c = cli.enrich.config();
        assert!(!c.kube);
        assert!(c.cilium_socket.is_none());
        // One duration grammar everywhere (crate::duration).
        let cli = Cli::try_parse_from(["x", "--enrich-refresh", "1h30m"]).unwrap();
        assert_eq!(cli.enrich.config().refresh, Duration::from_secs(5400));
        assert!(Cli::try_parse_from(["x", "--enrich-refresh", "-3s"]).is_err());
    }
}
