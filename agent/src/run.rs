//! `verdict-agent run`: the daemon. Reading order: load and attach the
//! in-kernel pipeline, start the map reader thread (the only code that
//! touches the maps, once per interval), serve HTTP from the shared view,
//! and on SIGTERM/SIGINT detach the tap and leave the pinned maps in place.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};
use tracing::{error, info, warn};
use verdict_common::maps::{
    DEFAULT_FLOW_TABLE_SIZE, ENDPOINT_COUNTERS, FLOW_CONFIG, FLOW_TABLE, PIN_DIR, STATS, WORLD_PORTS,
};

use crate::{
    bpf::{
        events_map::{self, EventsMapFollower},
        ledger_store::LedgerStore,
        loader::{LoaderConfig, Pipeline, TapChoice},
        snapshot::{CountingMaps, MapSnapshot},
    },
    cilium::endpoint_list::parse_endpoint_list,
    duration,
    enforce::{DaemonContext, Enforcement, events::KubeTrialEvents, trial::TrialEvents, watch::ReadCadence},
    enrich::{self, EnrichArgs, Enrichment},
    http::{self, HttpState},
    ledger::FlowLedger,
    metrics::{self, VerdictCollector},
    model::EndpointDirectory,
    readiness::{
        self, CiliumVersion, CriticalCatalogue, EvidenceEnvironment, Observation, RateLimit, ReadinessConfig,
        ReadinessEngine, ReadinessInput, ReadinessReport,
        alarms::{AlarmLimits, AlarmManager, AlarmSink, AlarmTarget, KubeEventSink, MemorySink},
    },
    state::{AgentView, SharedView, WorldPortSettings},
};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Address for /metrics, /healthz, /readyz and /api/v1/*: 0.0.0.0:PORT (IPv4), [::]:PORT
    /// (IPv4 and IPv6), or one address.
    #[arg(long, default_value = http::DEFAULT_LISTEN, env = "VERDICT_AGENT_LISTEN")]
    pub listen: SocketAddr,
    /// Who may read /api/v1/* (pods, identities, ports): local = loopback clients only
    /// (kubectl exec, kubectl port-forward); any = whoever reaches the port.
    #[arg(long, value_enum, default_value = "local", env = "VERDICT_AGENT_API_ACCESS")]
    pub api_access: http::ApiAccess,
    /// Open HTTP connections at most; a new one displaces the one waiting longest.
    #[arg(long, default_value_t = http::server::Limits::default().max_connections)]
    pub http_max_connections: usize,
    /// Time a client has to send a request's headers (also the keep-alive idle limit).
    #[arg(long, default_value = "5s", value_parser = duration::positive_arg)]
    pub http_header_timeout: Duration,
    /// Connections with no request in progress for this long are closed (slow readers).
    #[arg(long, default_value = "30s", value_parser = duration::positive_arg)]
    pub http_idle_timeout: Duration,
    /// On SIGTERM, how long requests in progress may take before the agent exits anyway.
    #[arg(long, default_value = "5s", value_parser = duration::arg)]
    pub shutdown_grace: Duration,
    /// How verdicts reach the counters: fentry (kernel >= 5.5 with BTF), kprobe, auto (fentry, else
    /// kprobe), or none (no hook: the pinned counters move only if another program feeds them;
    /// tests and demos on kernels that allow neither).
    #[arg(long, value_enum, default_value = "auto")]
    pub tap: TapChoice,
    /// Pin path of Cilium's perf event array that carries policy verdicts.
    #[arg(long, default_value = events_map::DEFAULT_PATH)]
    pub cilium_events_map: PathBuf,
    /// bpffs directory where the agent pins its counters (kept across restarts).
    #[arg(long, default_value = PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Flow slots per CPU in the kernel flow table (rounded up to a power-of-two number of
    /// 8-slot buckets). Memory: 56 bytes per slot per possible CPU. A full bucket never drops
    /// unread counts: its verdicts are counted as overflow (lost evidence) instead.
    #[arg(long, default_value_t = DEFAULT_FLOW_TABLE_SIZE)]
    pub flow_table_size: u32,
    /// How often the BPF maps are read. Shorter loses less of evicted flows' last counts.
    #[arg(long, default_value = "5s", value_parser = duration::positive_arg)]
    pub poll_interval: Duration,
    /// Kernel BTF used to find struct layouts and the hooked function.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
    /// Export per-flow series (remote identity, port), at most --flow-metrics-limit of them.
    #[arg(long)]
    pub flow_metrics: bool,
    /// Cap on per-flow series; flows past it are summed into remote="overflow".
    #[arg(long, default_value_t = 2000)]
    pub flow_metrics_limit: usize,
    /// Evicted flows remembered individually before folding into aggregates.
    #[arg(long, default_value_t = 65536)]
    pub max_retained_flows: usize,

    #[command(flatten)]
    pub enrich: EnrichArgs,
    /// Read endpoints from this `cilium endpoint list -o json` file instead of the Cilium
    /// API and Kubernetes (air-gapped nodes, demos, tests).
    #[arg(long)]
    pub endpoints_file: Option<PathBuf>,

    /// Recent past for lockout risk, lockout in progress and scan noise.
    #[arg(long, default_value = "15m", value_parser = duration::positive_arg)]
    pub window: Duration,
    /// Observation needed before an endpoint can be called ready to leave audit mode.
    #[arg(long, default_value = "24h", value_parser = duration::arg)]
    pub min_evidence: Duration,
    /// YAML file overriding the built-in catalogue of flows a node cannot live without.
    #[arg(long)]
    pub critical_flows: Option<PathBuf>,
    /// The Cilium release on this node (e.g. 1.16.3), for the evidence gates that depend
    /// on it; unknown when not given.
    #[arg(long)]
    pub cilium_version: Option<String>,
    /// The host endpoint's ID, when no enrichment source can tell.
    #[arg(long)]
    pub host_endpoint: Option<u16>,
    /// Do not publish Kubernetes Events for alarms (the WARN log line stays).
    #[arg(long)]
    pub no_events: bool,

    #[command(flatten)]
    pub enforcement: crate::enforce::EnforcementArgs,
}

/// Loads the pipeline and starts the map reader. Returns the shared view and
/// a handle that stops the reader (and detaches the tap) when dropped.
pub fn start_pipeline(args: &RunArgs, cadence: ReadCadence) -> anyhow::Result<(SharedView, ReaderHandle)> {
    let loader = LoaderConfig {
        pin_dir: args.pin_dir.clone(),
        flow_table_size: args.flow_table_size,
        tap: args.tap,
        btf_path: args.btf.clone(),
    };
    let pipeline = Pipeline::load(&loader).context("starting the in-kernel pipeline")?;
    info!(tap = pipeline.tap().as_str(), read = pipeline.notification_read().as_str(), "tap in place");
    let follower = EventsMapFollower::new(args.cilium_events_map.clone());
    let (slots, shards) = pipeline.tables().geometry();
    let view: SharedView = Arc::new(RwLock::new(AgentView::new(
        pipeline.tap(),
        pipeline.notification_read(),
        follower.state().clone(),
        slots.saturating_mul(shards),
    )));
    let stop = Arc::new(AtomicBool::new(false));
    // Room for every live flow, every remembered dead one, every world port,
    // and aggregates.
    let ledger_capacity = slots
        .saturating_mul(shards)
        .saturating_add(args.max_retained_flows as u32)
        .saturating_add(verdict_common::flow_table::WORLD_PORT_ENTRIES)
        .saturating_add(4096);
    let store = LedgerStore::open(&loader.pin_path(), ledger_capacity).context("opening the pinned flow ledger")?;
    let ledger = FlowLedger::restore(args.max_retained_flows, store.load());
    view.write().unwrap_or_else(|e| e.into_inner()).readiness_totals = ledger.readiness_totals().clone();
    let pins = PinWatch::new(loader.pin_path());
    let reader = MapReader {
        pipeline,
        follower,
        ledger,
        store,
        pins,
        view: view.clone(),
        interval: args.poll_interval,
        cadence,
        world_ports: WorldPortSettings::default(),
    };
    let thread_stop = stop.clone();
    let join = thread::Builder::new()
        .name("map-reader".into())
        .spawn(move || reader.run(&thread_stop))
        .context("spawning the map reader thread")?;
    Ok((view, ReaderHandle { stop, join: Some(join) }))
}

pub struct ReaderHandle {
    stop: Arc<AtomicBool>,
    join: Option<thread::JoinHandle<()>>,
}

impl Drop for ReaderHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Owns the pipeline; the only code that reads the maps.
struct MapReader {
    pipeline: Pipeline,
    follower: EventsMapFollower,
    ledger: FlowLedger,
    store: LedgerStore,
    pins: PinWatch,
    view: SharedView,
    interval: Duration,
    /// Shorter reads while an enforcement trial runs.
    cadence: ReadCadence,
    /// What the kernel's flow config holds now.
    world_ports: WorldPortSettings,
}

/// Notices the pin directory vanishing under the running agent (removed
/// by hand, a bpffs remount, a cleanup job): the maps still count through
/// the agent's descriptors, but nothing keeps them past its exit, so the
/// node's history would silently end at the next restart. From then on the
/// reader stops reporting fresh reads, so `/healthz` fails (and the pod is
/// restarted onto fresh pins), and the log says so once.
struct PinWatch {
    path: PathBuf,
    lost: bool,
}

impl PinWatch {
    fn new(path: PathBuf) -> PinWatch {
        PinWatch { path, lost: false }
    }

    /// Checks the pins again; true while they are all in place.
    fn check(&mut self) -> bool {
        if self.lost {
            return false;
        }
        if let Some(missing) = [ENDPOINT_COUNTERS, FLOW_TABLE, FLOW_CONFIG, WORLD_PORTS, STATS]
            .iter()
            .map(|m| self.path.join(m))
            .find(|p| !p.exists())
        {
            error!(
                pins = %self.path.display(),
                missing = %missing.display(),
                "the agent's pinned maps were removed while it runs: counts will not survive a restart; \
                 /healthz now fails so the agent is restarted onto new pins"
            );
            self.lost = true;
        }
        !self.lost
    }
}

impl MapReader {
    fn run(mut self, stop: &AtomicBool) {
        // Cilium's map is looked up more often than the counters are read,
        // so a recreated map loses at most a second of verdicts.
        let follow_every = Duration::from_secs(1).min(self.interval);
        // From the last read, not scheduled at it: a trial that starts
        // shortens the wait that is already running.
        let mut last_read: Option<Instant> = None;
        let mut next_follow = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= next_follow {
                self.pins.check();
                self.pipeline.tables().tick();
                self.apply_world_port_settings();
                self.follow();
                next_follow = now + follow_every;
            }
            if last_read.is_none_or(|t| now >= t + self.cadence.interval(self.interval)) {
                self.read();
                last_read = Some(now);
            }
            thread::sleep(Duration::from_millis(if self.cadence.is_fast() { 10 } else { 50 }));
        }
        info!("map reader stopped; detaching the tap, pinned maps stay");
    }

    /// Hands the readiness loop's host endpoint and critical ports to the kernel.
    fn apply_world_port_settings(&mut self) {
        let wanted = self.view.read().unwrap_or_else(|e| e.into_inner()).world_ports.clone();
        if wanted == self.world_ports {
            return;
        }
        let tables = self.pipeline.tables();
        if wanted.critical_ports != self.world_ports.critical_ports {
            tables.set_critical_ports(wanted.critical_ports.iter().copied());
        }
        tables.set_host_endpoint(wanted.host_endpoint);
        info!(host_endpoint = ?wanted.host_endpoint, critical_ports = wanted.critical_ports.len(),
            "world probes of the host on non-critical ports now go to the world-port table");
        self.world_ports = wanted;
    }

    /// Follows Cilium's map, and rewrites the tap's config every time: that
    /// also forgets the map address the tap remembered (`TapConfig`).
    fn follow(&mut self) {
        let changed = self.follower.refresh().is_some();
        let id = self.follower.state().map_id.unwrap_or(0);
        if let Err(e) = self.pipeline.set_events_map_id(id)
            && changed
        {
            error!(error = %e, "could not hand the cilium_events map ID to the tap");
        }
        if changed {
            self.view.write().unwrap_or_else(|e| e.into_inner()).events_map = self.follower.state().clone();
        }
    }

    fn read(&mut self) {
        let ebpf = self.pipeline.ebpf();
        let tables = self.pipeline.tables();
        let maps = match (ebpf.map(ENDPOINT_COUNTERS), ebpf.map(STATS)) {
            (Some(endpoints), Some(stats)) => CountingMaps { endpoints, tables, stats },
            _ => {
                error!("the tap object lost a counting map; rebuild the binary");
                return;
            }
        };
        match MapSnapshot::read(maps) {
            Ok((mut snapshot, acks)) => {
                let readiness_totals = self.view.read().unwrap_or_else(|e| e.into_inner()).readiness_totals.clone();
                self.ledger.set_readiness_totals(&readiness_totals);
                self.ledger.update(&snapshot);
                snapshot.flows = Vec::new();
                snapshot.world_ports = Vec::new();
                let (changed, removed) = self.ledger.take_changes();
                self.store.write(&changed, &removed);
                // Only now may the kernel reuse the slots this read emptied.
                tables.acknowledge(acks);
                let aggregates = self.ledger.aggregates();
                let flows = self.ledger.records();
                let lost_evidence = self.ledger.lost_evidence();
                let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
                view.lost_evidence = lost_evidence.into();
                view.snapshot = Some(snapshot);
                view.aggregates = aggregates;
                view.flows = flows.into();
                view.map_reads += 1;
                // With the pins gone the read is no longer one to trust
                // across a restart: /healthz goes stale on purpose.
                if self.pins.check() {
                    view.last_read = Some(Instant::now());
                }
            }
            Err(e) => {
                warn!(error = %e, "reading the BPF maps failed; will retry next interval");
                self.view.write().unwrap_or_else(|e| e.into_inner()).map_read_errors += 1;
            }
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    keep_large_buffers_returnable();
    let readiness_config = readiness_config(&args)?;
    let cadence = ReadCadence::default();
    let (view, reader) = start_pipeline(&args, cadence.clone())?;
    // The maps were created when counting began: that is how long this
    // node has been observed, across agent restarts.
    let observed_since = std::fs::metadata(args.pin_dir.join(verdict_common::maps::LAYOUT_VERSION).join(FLOW_TABLE))
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| std::time::SystemTime::now());

    let (enrichment, kube_client) = start_enrichment(&args).await?;
    let directory: Arc<dyn EndpointDirectory> = Arc::new(enrichment.clone());
    let report: SharedReport = Arc::new(RwLock::new(None));
    let lookup_report = report.clone();
    let trial_events = kube_client.clone().filter(|_| !args.no_events).map(|client| {
        Arc::new(KubeTrialEvents::new(client, std::env::var("POD_NAME").ok(), args.enrich.node_name.clone()))
            as Arc<dyn TrialEvents>
    });
    let enforcement = Enforcement::start_for_daemon(
        &args.enforcement,
        DaemonContext {
            cilium_socket: args.enrich.cilium_socket.clone(),
            readiness: readiness_config.clone(),
            directory: directory.clone(),
            cadence,
            readiness_lookup: Arc::new(move |id| {
                let guard = lookup_report.read().unwrap_or_else(|e| e.into_inner());
                guard.as_ref()?.endpoints.iter().find(|e| e.endpoint_id == id).map(|e| e.state)
            }),
            events: trial_events,
            api_server: api_server_targets(enrichment.clone()),
        },
        view.clone(),
    )
    .await?;
    // Cluster-wide trials: this node's part of every AuditModeTrial.
    let reconciler = match (&enforcement, &kube_client, &args.enrich.node_name) {
        (Some(e), Some(client), Some(node)) if args.enforcement.enable_enforcement => {
            let labels = enrichment.clone();
            let endpoints_report = report.clone();
            let view = crate::enforce::cluster::NodeView {
                node: node.clone(),
                labels: Box::new(move || labels.own_node_labels()),
                endpoints: Box::new(move || node_endpoints(&endpoints_report)),
            };
            let r = crate::enforce::cluster::Reconciler::new(client.clone(), e.trials.clone(), view);
            Some(tokio::spawn(r.run()))
        }
        _ => None,
    };
    let sink: Arc<dyn AlarmSink> = match kube_client.filter(|_| !args.no_events) {
        Some(client) => {
            let known = enrichment.clone();
            let lookup: crate::readiness::alarms::UidLookup = Arc::new(move |target| match target {
                AlarmTarget::Pod { namespace, name } => known.pod_uid(namespace, name),
                AlarmTarget::Node { .. } => known.node_uid(),
            });
            Arc::new(KubeEventSink::new(client, std::env::var("POD_NAME").ok()).with_uid_lookup(lookup))
        }
        // Alarms still go to the log; Events need a Kubernetes client.
        None => Arc::new(MemorySink::default()),
    };
    let readiness_task = tokio::spawn(readiness_loop(ReadinessLoop {
        view: view.clone(),
        enrichment: enrichment.clone(),
        report: report.clone(),
        engine: {
            let mut engine = ReadinessEngine::new(readiness_config);
            engine.restore_totals(&view.read().unwrap_or_else(|e| e.into_inner()).readiness_totals);
            engine
        },
        observation: Observation::since_start(observed_since),
        cilium_version: args.cilium_version.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?,
        host_endpoint: args.host_endpoint,
        node: args.enrich.node_name.clone(),
        alarms: AlarmManager::new(sink, AlarmLimits::default()),
        interval: args.poll_interval.max(Duration::from_secs(1)),
        critical_flows: args.critical_flows.clone(),
    }));

    let http_stats = Arc::new(http::server::ServerStats::default());
    let mut collectors: Vec<Box<dyn Collector>> = vec![
        Box::new(VerdictCollector::new(
            view.clone(),
            directory.clone(),
            args.flow_metrics.then_some(args.flow_metrics_limit),
        )),
        Box::new(EnrichmentCollector { enrichment, view: view.clone() }),
        Box::new(ReadinessCollector(report.clone())),
        Box::new(http::server::ServerCollector(http_stats.clone())),
    ];
    collectors.extend(enforcement.as_ref().map(Enforcement::collector));
    let readiness_report = report.clone();
    let state = HttpState {
        view,
        registry: Arc::new(metrics::registry(collectors)),
        directory,
        readiness: Some(Arc::new(move |selector: Option<&str>| readiness_json(&readiness_report, selector))),
        stale_after: args.poll_interval.saturating_mul(3).saturating_add(Duration::from_secs(5)),
        api_access: args.api_access,
    };
    let app = http::router(state);
    let app = match &enforcement {
        Some(e) => app.merge(http::loopback_only(e.router())),
        None => app,
    };
    let listener = http::server::bind(args.listen).with_context(|| {
        format!("listening on {} (is another agent running? choose another with --listen)", args.listen)
    })?;
    info!(listen = %args.listen, api_access = args.api_access.as_str(), "serving /metrics, /healthz, /readyz, /api/v1/flows, /api/v1/readiness");
    let limits = http::server::Limits {
        max_connections: args.http_max_connections.max(1),
        header_read_timeout: args.http_header_timeout,
        idle_timeout: args.http_idle_timeout,
        shutdown_grace: args.shutdown_grace,
        ..http::server::Limits::default()
    };
    http::server::serve(listener, app, limits, http_stats, shutdown_signal()).await;
    readiness_task.abort();
    if let Some(r) = reconciler {
        r.abort();
    }
    drop(reader);
    info!("stopped");
    Ok(())
}

fn readiness_config(args: &RunArgs) -> anyhow::Result<ReadinessConfig> {
    let catalogue = catalogue_for(args.critical_flows.as_deref(), &[])?;
    Ok(ReadinessConfig {
        window: args.window,
        min_evidence: args.min_evidence,
        catalogue,
        ..ReadinessConfig::default()
    })
}

/// The critical-flow catalogue for the API server's TCP ports (`ports`
/// empty: the catalogue's default, 6443), from `--critical-flows` or the
/// built-in one.
fn catalogue_for(path: Option<&std::path::Path>, ports: &[u16]) -> anyhow::Result<CriticalCatalogue> {
    Ok(match path {
        Some(path) => CriticalCatalogue::load_for(path, ports)?,
        None => CriticalCatalogue::builtin_for(ports),
    })
}

/// Enrichment from a fixed file, or from the Cilium API and Kubernetes.
async fn start_enrichment(args: &RunArgs) -> anyhow::Result<(Enrichment, Option<kube::Client>)> {
    if let Some(path) = &args.endpoints_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading --endpoints-file {}", path.display()))?;
        let endpoints = parse_endpoint_list(&text)
            .with_context(|| format!("parsing {} as `cilium endpoint list -o json`", path.display()))?;
        info!(endpoints = endpoints.len(), file = %path.display(), "endpoints from file; Cilium API and Kubernetes not used");
        return Ok((Enrichment::from_endpoints(endpoints), None));
    }
    let config = args.enrich.config();
    let client = if config.kube { kube_client(&config).await } else { None };
    Ok((enrich::start_with_kube_client(config, client.clone()), client))
}

async fn kube_client(config: &enrich::EnrichmentConfig) -> Option<kube::Client> {
    match enrich::kubernetes::client(config.kubeconfig.as_deref()).await {
        Ok(client) => Some(client),
        Err(e) => {
            warn!(error = %e, "no Kubernetes API: no owners, no host policy coverage, no Events (use --no-kube to silence)");
            None
        }
    }
}

type SharedReport = Arc<RwLock<Option<ReadinessReport>>>;

struct ReadinessLoop {
    view: SharedView,
    enrichment: Enrichment,
    report: SharedReport,
    /// Keeps state between evaluations: window counts, audit-mode switches.
    engine: ReadinessEngine,
    observation: Observation,
    cilium_version: Option<CiliumVersion>,
    host_endpoint: Option<u16>,
    node: Option<String>,
    alarms: AlarmManager,
    interval: Duration,
    /// `--critical-flows`, rebuilt for the API server ports the
    /// `kubernetes` Service's EndpointSlices name.
    critical_flows: Option<PathBuf>,
}

/// Re-evaluates readiness after each map read and raises alarms.
async fn readiness_loop(mut l: ReadinessLoop) {
    let mut tick = tokio::time::interval(l.interval);
    let mut silence_log = crate::silence::SilenceLog::default();
    let mut api_server_ports: Vec<u16> = Vec::new();
    loop {
        tick.tick().await;
        // The API server's port is learned, not assumed (6443 kubeadm,
        // 8443 minikube, 443 managed): rebuild the catalogue when it moves.
        let mut ports: Vec<u16> = l
            .enrichment
            .api_server_ports()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.protocol.eq_ignore_ascii_case("tcp"))
            .map(|p| p.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        if ports != api_server_ports {
            match catalogue_for(l.critical_flows.as_deref(), &ports) {
                Ok(catalogue) => {
                    info!(ports = ?ports, "critical flows now use the API server ports of the kubernetes Service");
                    l.engine.set_catalogue(catalogue);
                }
                Err(e) => {
                    warn!("keeping the critical-flow catalogue: rebuilding it for API server ports {ports:?}: {e:#}")
                }
            }
            api_server_ports = ports;
        }
        let (flows, lost_evidence) = {
            let view = l.view.read().unwrap_or_else(|e| e.into_inner());
            (view.flows.clone(), view.lost_evidence.clone())
        };
        let now = std::time::SystemTime::now();
        let facts = l.enrichment.daemon_facts();
        let environment = EvidenceEnvironment {
            cilium_version: l.cilium_version,
            verdict_notifications: facts
                .as_ref()
                .and_then(|f| f.bpf_events_policy_verdict.or(f.policy_verdict_notification)),
            rate_limit: facts
                .as_ref()
                .and_then(|f| f.bpf_events_rate_limit)
                .map(|r| RateLimit { configured: r > 0, dropped: None }),
        };
        let mut input = ReadinessInput::new(&flows, &l.enrichment, &l.observation, now);
        input.environment = environment;
        input.host_endpoint = l.host_endpoint;
        input.node = l.node.clone();
        input.lost_evidence = &lost_evidence;
        let report = l.engine.evaluate(&input);
        let world_ports = WorldPortSettings {
            host_endpoint: report.host.endpoint_id,
            critical_ports: critical_ports(&l.engine.config().catalogue),
        };
        {
            let mut view = l.view.write().unwrap_or_else(|e| e.into_inner());
            view.readiness_totals = l.engine.totals();
            view.world_ports = world_ports;
        }
        l.alarms.process(&report, now).await;
        silence_log.update(&report);
        *l.report.write().unwrap_or_else(|e| e.into_inner()) = Some(report);
        return_freed_memory();
    }
}

/// This node's endpoints as the latest readiness report has them, for the
/// AuditModeTrial reconciler.
fn node_endpoints(report: &SharedReport) -> Vec<crate::enforce::cluster::NodeEndpoint> {
    let guard = report.read().unwrap_or_else(|e| e.into_inner());
    let Some(r) = guard.as_ref() else { return Vec::new() };
    r.endpoints
        .iter()
        .map(|e| crate::enforce::cluster::NodeEndpoint {
            endpoint_id: e.endpoint_id,
            name: match (e.kind, &e.namespace, &e.pod) {
                (crate::model::EndpointKind::Host, _, _) => "host".to_owned(),
                (_, Some(ns), Some(pod)) => format!("{ns}/{pod}"),
                _ => e.endpoint_id.to_string(),
            },
            kind: e.kind,
            namespace: e.namespace.clone(),
            state: e.state,
        })
        .collect()
}

/// The API server's TCP endpoints (every ready address of the `kubernetes`
/// Service's slices, on each TCP port), for host trials' reach probes;
/// empty while Kubernetes is not watched or the slices were never listed.
fn api_server_targets(enrichment: Enrichment) -> crate::enforce::reach::ReachTargets {
    Arc::new(move || {
        let (Some(addresses), Some(ports)) = (enrichment.api_server_addresses(), enrichment.api_server_ports()) else {
            return Vec::new();
        };
        let tcp: Vec<u16> = ports.iter().filter(|p| p.protocol.eq_ignore_ascii_case("tcp")).map(|p| p.port).collect();
        addresses
            .iter()
            .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
            .flat_map(|ip| tcp.iter().map(move |&port| std::net::SocketAddr::new(ip, port)))
            .collect()
    })
}

/// TCP and UDP ports of the catalogue's entries, for the kernel: world
/// verdicts to them keep flows of their own (a lockout is judged per flow).
fn critical_ports(catalogue: &CriticalCatalogue) -> Vec<(u8, u16)> {
    let mut out = Vec::new();
    for flow in &catalogue.flows {
        let proto = match flow.protocol {
            crate::readiness::catalogue::CatalogueProtocol::Tcp => 6,
            crate::readiness::catalogue::CatalogueProtocol::Udp => 17,
            _ => continue,
        };
        if let Some(r) = flow.ports {
            out.extend((r.first..=r.last).map(|p| (proto, p)));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The latest report, narrowed to `selector`; None before the first evaluation.
fn readiness_json(report: &SharedReport, selector: Option<&str>) -> Option<serde_json::Value> {
    let guard = report.read().unwrap_or_else(|e| e.into_inner());
    let report = guard.as_ref()?;
    match selector {
        None => serde_json::to_value(report).ok(),
        Some(sel) => {
            let mut filtered = report.clone();
            filtered.endpoints.retain(|e| readiness::endpoint_matches(e, sel));
            serde_json::to_value(&filtered).ok()
        }
    }
}

/// Enrichment metrics, with audit mode inferred from audited verdicts
/// where no source knows it.
struct EnrichmentCollector {
    enrichment: Enrichment,
    view: SharedView,
}

impl std::fmt::Debug for EnrichmentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnrichmentCollector")
    }
}

impl Collector for EnrichmentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let audited: Vec<(u16, crate::model::Direction)> = {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            let audited_slot = verdict_common::maps::VerdictClass::Audited as usize;
            view.snapshot
                .iter()
                .flat_map(|s| &s.endpoints)
                .flat_map(|e| {
                    [(0, crate::model::Direction::Ingress), (1, crate::model::Direction::Egress)]
                        .into_iter()
                        .filter(move |(slot, _)| e.verdicts[*slot][audited_slot] > 0)
                        .map(move |(_, d)| (e.id, d))
                })
                .collect()
        };
        self.enrichment.encode_metrics_inferring(&mut encoder, &audited)
    }
}

#[derive(Debug)]
struct ReadinessCollector(SharedReport);

impl Collector for ReadinessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        match self.0.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(report) => {
                readiness::metrics::encode_metrics(report, &mut encoder)?;
                crate::silence::encode(report, &mut encoder)
            }
            None => Ok(()),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
}

/// glibc serves blocks above its mmap threshold with mmap and unmaps them on
/// free, but raises the threshold (up to 32 MiB) the first time one is freed.
/// From then on each map read's multi-MiB snapshot and flow list come from the
/// heap, which keeps their pages: RSS ratchets up to the read's peak (about
/// 55 MiB instead of 42 MiB at 100 k flows in `cargo xtask bench`). A fixed
/// threshold keeps large buffers mmap'd, so they go back to the kernel.
/// An evaluation over 100 k flows frees thousands of small blocks across
/// glibc's per-thread arenas, which keep them. Handing the free pages back
/// after each evaluation (every poll interval, a few ms) keeps RSS at what
/// the agent holds, not at what it once held.
fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn keep_large_buffers_returnable() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes an allocator tunable, which is sound at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
