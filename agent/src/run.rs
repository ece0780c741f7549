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
use tracing::{error, info, warn};
use verdict_common::maps::{DEFAULT_FLOW_TABLE_SIZE, ENDPOINT_COUNTERS, FLOWS, PIN_DIR, STATS};

use crate::{
    bpf::{
        events_map::{self, EventsMapFollower},
        loader::{LoaderConfig, Pipeline, TapChoice},
        ledger_store::LedgerStore,
        snapshot::{CountingMaps, MapSnapshot},
    },
    http::{self, HttpState},
    ledger::FlowLedger,
    metrics::{self, VerdictCollector},
    model::{EndpointDirectory, NoDirectory},
    state::{AgentView, SharedView},
};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Address for /metrics, /healthz, /readyz and /api/v1/*.
    #[arg(long, default_value = "127.0.0.1:9965", env = "VERDICT_AGENT_LISTEN")]
    pub listen: SocketAddr,
    /// How verdicts reach the counters: fentry (kernel >= 5.5 with BTF), kprobe, auto (fentry, else
    /// kprobe), or replay (no hook; only for tests and kernels that allow neither).
    #[arg(long, value_enum, default_value = "auto")]
    pub tap: TapChoice,
    /// Pin path of Cilium's perf event array that carries policy verdicts.
    #[arg(long, default_value = events_map::DEFAULT_PATH)]
    pub cilium_events_map: PathBuf,
    /// bpffs directory where the agent pins its counters (kept across restarts).
    #[arg(long, default_value = PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Flows kept in the kernel flow table (LRU). Memory: entries x (16 + 32 x CPUs) bytes.
    #[arg(long, default_value_t = DEFAULT_FLOW_TABLE_SIZE)]
    pub flow_table_size: u32,
    /// How often the BPF maps are read. Shorter loses less of evicted flows' last counts.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Kernel BTF used to find struct layouts and the hooked function.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
    /// Export per-flow series (remote identity, port), at most --flow-metrics-limit of them.
    #[arg(long)]
    pub flow_metrics: bool,
    #[arg(long, default_value_t = 2000)]
    pub flow_metrics_limit: usize,
    /// Evicted flows remembered individually before folding into aggregates.
    #[arg(long, default_value_t = 65536)]
    pub max_retained_flows: usize,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 5s, 15m, 24h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m, h or d")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Extra parts other modules plug into the daemon.
pub struct Extensions {
    pub directory: Arc<dyn EndpointDirectory>,
    pub collectors: Vec<Box<dyn prometheus_client::collector::Collector>>,
    pub readiness: Option<http::ReadinessFn>,
}

impl Default for Extensions {
    fn default() -> Self {
        Extensions { directory: Arc::new(NoDirectory), collectors: Vec::new(), readiness: None }
    }
}

/// Loads the pipeline and starts the map reader. Returns the shared view and
/// a handle that stops the reader (and detaches the tap) when dropped.
pub fn start_pipeline(args: &RunArgs) -> anyhow::Result<(SharedView, ReaderHandle)> {
    let loader = LoaderConfig {
        pin_dir: args.pin_dir.clone(),
        flow_table_size: args.flow_table_size,
        tap: args.tap,
        btf_path: args.btf.clone(),
    };
    let pipeline = Pipeline::load(&loader).context("starting the in-kernel pipeline")?;
    info!(tap = pipeline.tap().as_str(), "tap in place");
    let follower = EventsMapFollower::new(args.cilium_events_map.clone());
    let view: SharedView = Arc::new(RwLock::new(AgentView::new(
        pipeline.tap(),
        follower.state().clone(),
        args.flow_table_size,
    )));
    let stop = Arc::new(AtomicBool::new(false));
    // Room for every live flow, every remembered dead one, and aggregates.
    let ledger_capacity = args.flow_table_size.saturating_add(args.max_retained_flows as u32).saturating_add(4096);
    let store = LedgerStore::open(&loader.pin_path(), ledger_capacity).context("opening the pinned flow ledger")?;
    let ledger = FlowLedger::restore(args.max_retained_flows, store.load());
    let reader = MapReader {
        pipeline,
        follower,
        ledger,
        store,
        view: view.clone(),
        interval: args.poll_interval,
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
    view: SharedView,
    interval: Duration,
}

impl MapReader {
    fn run(mut self, stop: &AtomicBool) {
        // Cilium's map is looked up more often than the counters are read,
        // so a recreated map loses at most a second of verdicts.
        let follow_every = Duration::from_secs(1).min(self.interval);
        let mut next_read = Instant::now();
        let mut next_follow = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= next_follow {
                self.follow();
                next_follow = now + follow_every;
            }
            if now >= next_read {
                self.read();
                next_read = now + self.interval;
            }
            thread::sleep(Duration::from_millis(50));
        }
        info!("map reader stopped; detaching the tap, pinned maps stay");
    }

    fn follow(&mut self) {
        if let Some(id) = self.follower.refresh() {
            if let Err(e) = self.pipeline.set_events_map_id(id.unwrap_or(0)) {
                error!(error = %e, "could not hand the cilium_events map ID to the tap");
            }
            self.view.write().unwrap_or_else(|e| e.into_inner()).events_map = self.follower.state().clone();
        }
    }

    fn read(&mut self) {
        let ebpf = self.pipeline.ebpf();
        let maps = match (ebpf.map(ENDPOINT_COUNTERS), ebpf.map(FLOWS), ebpf.map(STATS)) {
            (Some(endpoints), Some(flows), Some(stats)) => CountingMaps { endpoints, flows, stats },
            _ => {
                error!("the tap object lost a counting map; rebuild the binary");
                return;
            }
        };
        match MapSnapshot::read(maps) {
            Ok(snapshot) => {
                self.ledger.update(&snapshot);
                let (changed, removed) = self.ledger.take_changes();
                self.store.write(&changed, &removed);
                let aggregates = self.ledger.aggregates();
                let flows = self.ledger.records();
                let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
                view.snapshot = Some(snapshot);
                view.aggregates = aggregates;
                view.flows = flows;
                view.map_reads += 1;
                view.last_read = Some(Instant::now());
            }
            Err(e) => {
                warn!(error = %e, "reading the BPF maps failed; will retry next interval");
                self.view.write().unwrap_or_else(|e| e.into_inner()).map_read_errors += 1;
            }
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(args: RunArgs, ext: Extensions) -> anyhow::Result<()> {
    let (view, reader) = start_pipeline(&args)?;
    let mut collectors = ext.collectors;
    collectors.insert(
        0,
        Box::new(VerdictCollector {
            view: view.clone(),
            directory: ext.directory.clone(),
            flow_metrics: args.flow_metrics.then_some(args.flow_metrics_limit),
        }),
    );
    let state = HttpState {
        view,
        registry: Arc::new(metrics::registry(collectors)),
        directory: ext.directory,
        readiness: ext.readiness,
        stale_after: args.poll_interval * 3 + Duration::from_secs(5),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {} (is another agent running? use --listen)", args.listen))?;
    info!(listen = %args.listen, "serving /metrics, /healthz, /readyz, /api/v1/flows, /api/v1/readiness");
    axum::serve(listener, http::router(state)).with_graceful_shutdown(shutdown_signal()).await.context("HTTP server")?;
    drop(reader);
    info!("stopped");
    Ok(())
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
