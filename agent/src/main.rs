//! The `verdict-agent` binary: the daemon (`run`) and the operator's CLI.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use verdict_agent::run::{self, RunArgs};

#[derive(Parser)]
#[command(
    name = "verdict-agent",
    version,
    about = "Counts Cilium policy verdicts in the kernel, exports them for Prometheus, \
             and tells you whether leaving PolicyAuditMode will break something.",
    long_about = "Counts Cilium policy verdicts in the kernel, exports them for Prometheus, \
             and tells you whether leaving PolicyAuditMode will break something.\n\n\
             The agent hooks bpf_skb_event_output (fentry, else kprobe) and counts the policy-verdict and \
             policy-drop notifications Cilium's datapath writes to its cilium_events map, per endpoint and \
             per flow, in per-CPU BPF maps: nothing is lost under load and no event crosses to userspace. \
             Cilium emits a verdict only when the endpoint has policy in that direction, verdict \
             notifications are enabled and its events rate limit lets it through: silence is not safety."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format on stderr: text for people, json (one object per line) for log collectors.
    #[arg(long, global = true, value_enum, default_value = "text", env = "VERDICT_AGENT_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach the tap, serve /metrics, /healthz, /readyz, /api/v1/flows, /api/v1/readiness.
    Run(Box<RunArgs>),
    /// Ask a running agent whether switching PolicyAuditMode off is safe (exit 0 safe, 1 would break,
    /// 2 error, 3 not enough evidence).
    Preflight(verdict_agent::preflight::PreflightArgs),
    /// Write CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy YAML allowing exactly the observed
    /// would-deny flows (from a running agent or a capture).
    Suggest(verdict_agent::suggest::SuggestArgs),
    /// Readiness, lockout and suggestions offline, from `cilium monitor` text or `hubble observe -o json`.
    Analyze(verdict_agent::analyze::AnalyzeArgs),
    /// Leave audit mode on one endpoint for a trial the running agent reverts by itself (first critical
    /// drop, --abort, or the end of --try unless --confirm); refused unless preflight says safe.
    Enforce(verdict_agent::enforce::cli::EnforceArgs),
}

/// Logs go to stderr, filtered by RUST_LOG (default info). Colour only for
/// a terminal, and never with NO_COLOR set (no-color.org): `kubectl logs`
/// and log collectors get plain text or JSON, not escape sequences.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        // Fields at the top level next to "message", as log collectors expect.
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_ansi(false).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => tokio_main(run::run(*args)).map(|()| ExitCode::SUCCESS),
        Command::Preflight(args) => tokio_main(verdict_agent::preflight::run(args)),
        Command::Suggest(args) => tokio_main(verdict_agent::suggest::run(args)),
        Command::Analyze(args) => verdict_agent::analyze::run(args),
        Command::Enforce(args) => tokio_main(verdict_agent::enforce::cli::run(args)),
    };
    result.unwrap_or_else(|e| {
        match cli.log_format {
            LogFormat::Text => eprintln!("verdict-agent: {}", verdict_agent::errors::anyhow_chain(&e)),
            // Every stderr line stays one JSON object.
            LogFormat::Json => {
                tracing::error!(error = verdict_agent::errors::anyhow_chain(&e), "verdict-agent stopped on an error")
            }
        }
        ExitCode::from(2)
    })
}

fn tokio_main<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(f);
    // Dropping a runtime waits for its blocking tasks without bound; after
    // SIGTERM the exit must not wait on a stuck socket read.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}
